"""bench/recall.py's output: rows aggregated over seeds, the Markdown table and its notes, the plot."""
from __future__ import annotations

from dataclasses import asdict

from bench import common
from bench.recall_plan import ANCHORS_PER_QUERY, HEADERS, METRICS

# ---------------------------------------------------------------------------------------------
# Aggregation and output


def aggregate(all_rows: list, results: list, seeds: list) -> list:
    """One dict per row: per-seed metrics and their mean and sample standard deviation (None for a
    metric a row does not have: a reranker row's v2t columns). A reranker row also keeps, per
    seed, its first stage through the same search path and the reranker's config."""
    per_seed, first_stage, rerankers = {}, {}, {}
    for result in results:
        seed = str(result["seed"])
        for name, metrics in result.get("metrics", {}).items():
            per_seed.setdefault(name, {})[seed] = metrics
        for name, metrics in result.get("first_stage", {}).items():
            first_stage.setdefault(name, {})[seed] = metrics
        for name, about in result.get("rerankers", {}).items():
            rerankers.setdefault(name, {})[seed] = about
    out = []
    for row in all_rows:
        found = per_seed.get(row.name, {})
        missing = [s for s in seeds if str(s) not in found]
        if missing:
            raise RuntimeError(f"row {row.name}: no result for seeds {missing}")
        values = {m: [found[str(s)][m] for s in seeds] for m in METRICS}
        stats = {m: (None, None) if None in v else common.mean_std(v) for m, v in values.items()}
        extra = {"first_stage_per_seed": first_stage[row.name], "reranker": rerankers[row.name]} \
            if row.rerank_of else {}
        out.append({**asdict(row), "per_seed": found, **extra,
                    "mean": {m: s[0] for m, s in stats.items()}, "std": {m: s[1] for m, s in stats.items()}})
    return out


def first_stage_agreement(rows: list) -> dict:
    """Per reranker row: the largest difference, over seeds and t2v metrics, between its first stage
    through the search path and the metric code's numbers of the row it reranks (0: the same)."""
    by_name = {r["name"]: r for r in rows}
    out = {}
    for row in (r for r in rows if r.get("rerank_of")):
        base = by_name[row["rerank_of"]]["per_seed"]
        out[row["name"]] = max(abs(metrics[m] - base[seed][m]) for seed, metrics in row["first_stage_per_seed"].items()
                               for m in ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "t2v_mnr", "t2v_map"))
    return out


def _cell(row: dict, metric: str) -> str:
    digits = 3 if metric.endswith("map") else 1
    mean, std = row["mean"][metric], row["std"][metric]
    if mean is None:
        return "–"
    text = f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")
    return f"**{text}**" if row["leaks_answer"] else text


def markdown(result: dict) -> str:
    """The table, a heading row per group of rows, then the notes that say what was measured."""
    table_rows, group = [], None
    for row in result["rows"]:
        if row["group"] != group:
            group = row["group"]
            table_rows.append([f"*{group}*"] + [""] * (len(HEADERS) - 1))
        table_rows.append([row["label"]] + [_cell(row, m) for m in METRICS])
    return common.markdown_table(HEADERS, table_rows) + "\n" + notes(result)


def notes(result: dict) -> str:
    s = result["sizes"]
    test, train = s["splits"]["test"], s["splits"]["train"]
    built = s["builtin"]
    data = (f"the built-in collection at {built['videos']} videos x {built['captions_per_video']} captions, "
            f"{built['frames']} frames" if built else f"collection {s['collection']} (--root)")
    seeds = ", ".join(str(x) for x in s["seeds"])
    return (f"Test split: {test['captions']} queries x {test['videos']} videos (chance t2v R@1 "
            f"{s['chance_t2v_r1']}%); trained on {train['captions']} captions of {train['videos']} videos "
            f"of {data}; {s['epochs']} epochs at most ({s['max_steps']} steps of batch {s['batch_size']}, "
            f"{s['model']}), model selected on the validation split, so models are far from converged at "
            f"small sizes; seeds {seeds}: mean ± sample standard deviation. R@K in %, mAP in [0, 1], SumR = "
            f"t2v R@1 + R@5 + R@10. The SSSS row (bold) draws each test anchor from all captions of the "
            f"answer video: it leaks the answer and is not comparable with the others. Anchor-source rows "
            f"evaluate the fair-protocol checkpoints with other test anchors (no retraining). {concept_note(result)}"
            f"{variant_notes(result)}"
            f"{peer_notes(result)}"
            f"Machine: {common.describe_machine(result['machine'])}. Wall time {result['wall_seconds']:.0f} s "
            f"with {result['jobs']} worker process(es) of one thread, {result['cpu_seconds']:.0f} CPU-seconds.\n")


def concept_note(result: dict) -> str:
    """Why the no-concept-space row can beat the full model at small sizes (issue 17's puzzle)."""
    if result["sizes"]["epochs"] >= 10 or not any(r["name"] == "no-concept" for r in result["rows"]):
        return ""
    return ("At this size the concept branches are barely trained (the text-only twin's score near chance on "
            "their own: they learn later than the latent branches), so the no-concept-space row measures training "
            "length, not the concept space: with 3x the epochs, or at the demo's size, the concept space helps or "
            "is neutral (README, \"The concept space at two sizes\"). ")


def variant_notes(result: dict) -> str:
    """What the anchor-variant rows are (issue 17's "anchors per query" and latent rows)."""
    names = {r["name"] for r in result["rows"]}
    counts = [n for n in ANCHORS_PER_QUERY if f"per-query-{n}" in names]
    text = ""
    if counts:
        text += (f"The anchors-per-query rows train and evaluate on N = {', '.join(map(str, counts))} anchors per "
                 f"caption (seeds 0..N-1, the first the full model's anchor), whose regions the hybrid attention "
                 f"reads jointly (`cvr anchors/train --anchors-per-query N`). ")
    if "latent" in names:
        text += ("The generator-features row stores the 4-step student's final packed latent tokens as the "
                 "anchor's regions (`cvr anchors --features latent`): no decoding, no ResNet-50 at search. ")
    return text


def peer_notes(result: dict) -> str:
    """What the peer rows are and which path scored them."""
    rows = [r for r in result["rows"] if r.get("rerank_of")]
    if not rows:
        return ""
    about = next(iter(rows[0]["reranker"].values()))["config"]
    epochs = sorted({a["best_epoch"] for r in rows for a in r["reranker"].values()})
    test_videos = result["sizes"]["splits"]["test"]["videos"]
    whole = (f" (M >= the {test_videos} test videos: each query's whole test gallery is reranked)"
             if about["candidates"] >= test_videos else "")
    worst = max(first_stage_agreement(result["rows"]).values())
    agree = ("reproduces the metric code's t2v numbers of the row it reranks exactly, for every seed" if worst == 0
             else f"differs from the metric code's t2v numbers of the row it reranks by at most {worst:.3g}")
    return (f"GLSCL (`cvr train --head glscl`, text-only: no anchors) is trained with the same flags, seeds and "
            f"epochs as the rows above and scored by the same metric code (`training.retrieval.evaluate_checkpoint`). "
            f"The reranker rows train `cvr train-reranker --base` on each seed's checkpoint of the full model "
            f"(fair protocol) and of GLSCL (that seed, {result['sizes']['epochs']} epochs at most, otherwise "
            f"`cvr train-reranker`'s defaults: M = {about['candidates']} candidates{whole}, T = "
            f"{about['diffusion_steps']} diffusion steps, {about['sample_steps'] or about['diffusion_steps']} DDIM "
            f"steps at search, hidden {about['hidden']}, fused score = first-stage score + {about['weight']:g} x "
            f"softmax({about['temp']:g} x0); "
            f"best validation epoch {', '.join(str(e) for e in epochs)}) and are scored through the search path "
            f"(`cvr index --split test --dtype float32`, then what `cvr evaluate --gallery --mode exhaustive "
            f"--rerank` runs: `engine.search_eval.search_metrics` over `Retriever.search` with k = the whole gallery, "
            f"anchors drawn at query time by the checkpoint's generator, one Retriever for both passes), so they "
            f"have t2v columns only (the reranker reorders a query's videos) and SumR is t2v's; "
            f"that path without `--rerank` {agree}. ")


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    data = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.42 * len(data) + 1.5), sharey=True)
    colours = {g: f"C{i}" for i, g in enumerate(dict.fromkeys(r["group"] for r in data))}
    positions = list(range(len(data)))[::-1]
    for axis, metric, title in zip(axes, ("t2v_r1", "sumr"), ("t2v R@1 (%)", "SumR (t2v R@1+5+10)"), strict=True):
        means = [r["mean"][metric] for r in data]
        errors = [r["std"][metric] or 0.0 for r in data]
        bars = axis.barh(positions, means, xerr=errors, color=[colours[r["group"]] for r in data], capsize=3)
        for bar, r in zip(bars, data, strict=True):
            if r["leaks_answer"]:
                bar.set_hatch("//")
        axis.set_title(title)
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(positions, [r["name"] + (" (leaks)" if r["leaks_answer"] else "") for r in data])
    fig.suptitle(f"Test recall, mean ± std over seeds {result['sizes']['seeds']} "
                 f"({result['sizes']['splits']['test']['videos']} test videos)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, list(colours), loc="lower center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, -0.08))
    common.save_figure_atomic(fig, path)
    plt.close(fig)
