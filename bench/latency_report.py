"""bench/latency.py's output: the Markdown tables and notes, the three plots, the result files."""
from __future__ import annotations

from pathlib import Path

from bench import common
from bench.latency_galleries import HEAD_STAGES, HEADS
from engine import files

# ---------------------------------------------------------------------------------------------
# Output


def _ms(value: float) -> str:
    """Three significant figures or so: 17744, 520, 11.6, 0.54."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _table(headers: list, rows: list) -> str:
    return common.markdown_table(headers, [[_ms(c) if isinstance(c, float) else c for c in r] for r in rows])


def markdown(result: dict) -> str:
    s = result["settings"]
    stage_rows = [[r["stage"], r["variant"], r["backend"], r["batch"], r["p50_ms"], r["p95_ms"], r["per_query_p50_ms"],
                   r["runs"]] for r in result["stages"]]
    e2e_rows = [[r["backend"], r["batch"], r["p50_ms"], r["p95_ms"], r["queries_per_second"], r["runs"]]
                for r in result["end_to_end"]]
    size_rows = [[r["gallery"], r["stage"], r["variant"], r["batch"], r["p50_ms"], r["p95_ms"], r["per_query_p50_ms"],
                  r.get("recall_at_10", ""), r["build_s"], r["gallery_gb"], r["index_gb"], r["peak_over_models_gb"],
                  r["peak_over_gallery"], r["runs"]]
                 for r in result["gallery_size"]]
    return "\n".join([
        "**Stages** (p50/p95 over warm runs; ms/query = p50 / batch)\n",
        _table(["stage", "variant", "backend", "batch", "p50 ms", "p95 ms", "ms/query", "runs"], stage_rows),
        "\n**End to end** (`Retriever.search`: text, anchor, ResNet-50, tower, search)\n",
        _table(["backend", "batch", "p50 ms", "p95 ms", "queries/s", "runs"], e2e_rows),
        "\n**Gallery size** (the search stage of `Retriever.search`, warm, top-10; batch = 1 query or "
        f"{s['queries']} queries; recall@10 of the two-stage top-10 against the exhaustive top-10; peak = the "
        "process's peak memory over its memory with the models loaded, also as a multiple of the gallery's "
        "bytes)\n",
        _table(["videos", "search", "variant", "batch", "p50 ms", "p95 ms", "ms/query", "recall@10",
                "write + index s", "gallery GB", "index GB", "peak GB", "peak / gallery", "runs"], size_rows),
        *heads_markdown(result),
        notes(result),
    ])


def heads_markdown(result: dict) -> list:
    """Part 4's table (absent from results written before it existed)."""
    if not result.get("heads"):
        return []
    rows = []
    for r in result["heads"]:
        stages = [r["stages_p50_ms"][k] or "–" for k in HEAD_STAGES]
        rows.append([HEADS[r["head"]], r["reranker"] or "none", r["gallery"], r["search"], r["p50_ms"], r["p95_ms"],
                     *stages, r["build_s"], r["runs"]])
    return ["\n**Heads and reranker** (the per-query cost of each scoring head, then of the generative reranker "
            "per DDIM step count: `Retriever.search` end to end at batch 1, warm, top-10, p50/p95 over runs, and "
            "each stage's p50 from `last_timings`, all in ms per query)\n",
            _table(["head", "reranker", "videos", "search", "p50 ms", "p95 ms", "text", "anchor", "ResNet-50",
                    "tower", "search ms", "rerank", "write + index s", "runs"], rows)]


def notes(result: dict) -> str:
    s = result["settings"]
    missing = "; ".join(f"{k}: {v}" for k, v in result["backends"].items() if v) or "none"
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in result["part_seconds"].items())
    return (
        f"\nMachine: {common.describe_machine(result['machine'])}. Device {s['device']}, {result['threads']} torch "
        f"thread, 1 FAISS thread. Model: the default architecture at random init ({result['model']}); the stage "
        f"gallery holds {s['gallery']} synthetic videos. Backends not timed: {missing}. Gallery-size rows time "
        "`Retriever.search` (torch backend, the text-only twin of the same architecture: the search stage does "
        "not depend on anchors) in a fresh process per size, over a synthetic gallery written by "
        "`engine.indexing.write_gallery` (fp16, clustered, with each query's own cluster; `aimed_gallery` in "
        "bench/gallery_sizes.py); exhaustive search scores blocks of fp16 rows cast to fp32 "
        "(`engine.search.exhaustive`); two-stage search is a FAISS `IVF<sqrt N>,SQfp16` first stage (k-means "
        "on 40 x nlist points) and the exact fused score of each query's own M candidates "
        "(`engine.search.two_stage`). HNSW is not timed: building it over 1M vectors takes tens of minutes on "
        f"2 cores (ARCHITECTURE.md section 14). {heads_notes(result)}Wall time {result['wall_seconds']:.0f} s "
        f"({parts}), {result['cpu_seconds']:.0f} CPU-seconds.\n")


def heads_notes(result: dict) -> str:
    if not result.get("heads"):
        return ""
    s = result["settings"]
    return ("Heads rows: each head at random init with the `cvr train` defaults (D = 1024; GLSCL: F = 12 frame "
            "and K = 8 query slots, so a gallery row holds 21 vectors of D against CVR-SDGM's 2 and two concept "
            "vectors), torch backend, over a synthetic gallery per size written by `engine.indexing.write_gallery` "
            "(fp16, with a FAISS `IVF<sqrt N>,SQfp16` index; GLSCL's indexes the mean-pooled frame vector of slot "
            "0) and searched in this process; the CVR-SDGM head's cost includes drawing the query's anchor "
            "(4-step student) and its ResNet-50 regions, which GLSCL has not; exhaustive rows at 100k are 3 runs. "
            f"Reranker rows: a reranker at random init (M = 32 candidates, T = 50, hidden 256: `cvr "
            f"train-reranker`'s defaults) of each head's checkpoint, saved with each DDIM step count "
            f"({', '.join(str(x) for x in s['rerank_steps'])}) as `--sample-steps` records it and set on the "
            f"Retriever over the {s['head_sizes'][0]}-video gallery (exhaustive first stage of max(k, M) "
            "candidates); its cost reads M candidates whatever the gallery's size. ")


def plot_stages(result: dict, path) -> None:
    plt = common.pyplot()
    rows = result["stages"]
    names = list(dict.fromkeys(f"{r['stage']} {r['variant']} [{r['backend']}]".replace("  ", " ") for r in rows))
    fig, axis = plt.subplots(figsize=(10, 0.35 * len(names) + 1.5))
    batches = sorted({r["batch"] for r in rows})
    for i, batch in enumerate(batches):
        values = {f"{r['stage']} {r['variant']} [{r['backend']}]".replace("  ", " "): r["per_query_p50_ms"]
                  for r in rows if r["batch"] == batch}
        positions = [len(names) - 1 - j + (i - 0.5) * 0.4 for j in range(len(names))]
        axis.barh(positions, [values.get(n, 0) for n in names], height=0.4, label=f"batch {batch}")
    axis.set_yticks(range(len(names))[::-1], names, fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("ms per query (p50)")
    axis.legend()
    axis.grid(axis="x", alpha=0.3)
    axis.set_title(f"Latency per stage ({result['settings']['device']}, {result['threads']} thread)")
    common.save_figure_atomic(fig, path)
    plt.close(fig)


def plot_sizes(result: dict, path) -> None:
    """ms per query against gallery size: one line per (search, variant, batch); exhaustive solid,
    two-stage dashed; circles at batch 1, squares at the larger batch."""
    plt = common.pyplot()
    fig, axis = plt.subplots(figsize=(7.5, 4.8))
    rows = result["gallery_size"]
    for key in dict.fromkeys((r["stage"], r["variant"], r["batch"]) for r in rows):
        line = sorted((r["gallery"], r["per_query_p50_ms"]) for r in rows
                      if (r["stage"], r["variant"], r["batch"]) == key)
        stage, variant, batch = key
        label = f"{stage} ({variant.replace('FAISS ', '')}), batch {batch}"
        axis.plot(*zip(*line, strict=True), linestyle="-" if stage == "exhaustive" else "--",
                  marker="o" if batch == 1 else "s", label=label)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("gallery size (videos)")
    axis.set_ylabel("ms per query (p50)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    axis.set_title(f"Top-10 search time against gallery size (CPU, {result['threads']} thread)")
    common.save_figure_atomic(fig, path)
    plt.close(fig)


def plot_heads(result: dict, path) -> None:
    """Left: ms per query against gallery size per head and search (exhaustive solid, two-stage
    dashed); right: the reranker's stage against its DDIM steps, per head."""
    plt = common.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    rows = result["heads"]
    for i, head in enumerate(HEADS):
        for search in dict.fromkeys(r["search"] for r in rows if not r["reranker"]):
            line = sorted((r["gallery"], r["p50_ms"]) for r in rows
                          if r["head"] == head and r["search"] == search and not r["reranker"])
            if line:
                left.plot(*zip(*line, strict=True), color=f"C{i}", marker="o",
                          linestyle="-" if search == "exhaustive" else "--", label=f"{HEADS[head]}, {search}")
        steps = sorted((int(r["reranker"].split()[0]), r["stages_p50_ms"]["rerank"]) for r in rows
                       if r["head"] == head and r["reranker"])
        if steps:
            right.plot(*zip(*steps, strict=True), color=f"C{i}", marker="s", label=HEADS[head])
    for axis, x, title in ((left, "gallery size (videos)", "Retriever.search end to end, batch 1"),
                           (right, "DDIM steps", "rerank stage, batch 1 (M candidates)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel(x)
        axis.set_ylabel("ms per query (p50)")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7)
        axis.set_title(f"{title} (CPU, {result['threads']} thread)", fontsize=9)
    common.save_figure_atomic(fig, path)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> dict:
    paths = {"md": out / "latency.md", "json": out / "latency.json", "stages_png": out / "latency_stages.png",
             "sizes_png": out / "latency_sizes.png", "heads_png": out / "latency_heads.png"}
    files.write_json(paths["json"], result)
    files.atomic_write(paths["md"], markdown(result))
    plot_stages(result, paths["stages_png"])
    plot_sizes(result, paths["sizes_png"])
    plot_heads(result, paths["heads_png"])
    return {k: str(v) for k, v in paths.items()}
