"""Anchor variants (issue 17 items 3 and 4): t2v R@1 beside the query path's latency per query.

One table: the pixel route (decoded anchor, ResNet-50 regions) at 4, 2 and 1 sampling steps and with
N = 1, 2, 4 anchors per query, and the "anchor from generator features" route (the student's final
latent tokens as regions: no decoding, no ResNet-50) at 4, 2 and 1 steps, with the text-only twin as
the reference. R@1 (mean ± std over seeds) comes from `bench.recall --variants`' recall.json (the
rows named in VARIANTS); the latency is timed here, through the code users run: `Retriever.search`
of one query (torch, warm, top-10) over a 1,000-video gallery, on a checkpoint of the default widths
whose anchors section says what the trained row's says (anchors per query, features); the weights
do not change the cost. Writes anchor_variants.{md,json,png} beside recall.json.

    python -m bench.anchor_variants                  # after bench.recall --variants (make bench)
    python -m bench.anchor_variants --tiny --recall /tmp/r/recall.json --out /tmp/v   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import common

# (recall row, route, anchors per query, sampling steps at search); route None: text-only.
VARIANTS = (("text-minilm", None, 0, 0),
            ("full", "pixels", 1, 4), ("anchors-student2", "pixels", 1, 2), ("anchors-student1", "pixels", 1, 1),
            ("per-query-2", "pixels", 2, 4), ("per-query-4", "pixels", 4, 4),
            ("latent", "latent", 1, 4), ("latent-student2", "latent", 1, 2), ("latent-student1", "latent", 1, 1))
ROUTES = {None: "text only (no anchor)", "pixels": "pixels: decoded anchor + ResNet-50 regions",
          "latent": "anchor from generator features (final latent tokens)"}
HEADERS = ["route", "anchors per query", "steps", "t2v R@1", "end to end p50 (ms/query)", "anchor + regions p50 (ms)",
           "recall row"]


def latent_width(generator: str) -> int:
    """The region width of a latent checkpoint: the generator's packed latent channels."""
    from engine.anchors import AnchorGenerator

    return int(AnchorGenerator.load(generator).generate_latents(["a red circle"]).shape[-1])


def time_variant(route, count: int, steps: int, texts: list, work: str, repeats: int, tiny: bool,
                 region_dim: int | None) -> dict:
    """p50 per query (ms) of Retriever.search at batch 1, end to end and of the anchor stages;
    `region_dim`: the latent route's region width (None: ResNet-50's, the model default)."""
    from bench.latency_stages import STUDENT, make_checkpoint, write_stage_gallery
    from engine.retriever import Retriever

    folder = os.path.join(work, f"{route}_{count}_{steps}")
    checkpoint = make_checkpoint(folder, tiny, use_anchor=route is not None, anchors_per_query=max(count, 1),
                                 features=route or "pixels", region_dim=region_dim)
    gallery = write_stage_gallery(folder + "_gallery", checkpoint, 64 if tiny else 1000)
    retriever = Retriever(checkpoint, gallery, generator=str(STUDENT) if route else None,
                          steps=steps if route else None)
    walls, anchors, vision = [], [], []
    for i in range(repeats + 1):  # the first run warms up and is dropped
        start = time.perf_counter()
        retriever.search([texts[i % len(texts)]], k=10)
        walls.append(time.perf_counter() - start)
        anchors.append(retriever.last_timings.anchor + retriever.last_timings.vision)
        vision.append(retriever.last_timings.vision)
    p50 = lambda seconds: common.p50_p95_ms(seconds[1:])[0]
    return {"p50_ms": p50(walls), "anchor_p50_ms": p50(anchors), "vision_p50_ms": p50(vision), "runs": repeats}


def run(recall: dict, repeats: int, tiny: bool, work: str) -> list:
    from tqdm import tqdm

    from bench.latency_stages import STUDENT, captions

    by_name = {r["name"]: r for r in recall["rows"]}
    missing = [name for name, *_ in VARIANTS if name not in by_name]
    if missing:
        raise SystemExit(f"error: recall.json has no row {', '.join(missing)}: run `python -m bench.recall --variants`")
    texts = captions(repeats + 1)
    width = latent_width(str(STUDENT))  # once: loading the generator for it is not part of any timing
    rows = []
    for name, route, count, steps in tqdm(VARIANTS, desc="anchor variants", unit="row", disable=tiny):
        row = by_name[name]
        rows.append({"row": name, "route": route, "anchors_per_query": count, "steps": steps,
                     "t2v_r1": row["mean"]["t2v_r1"], "t2v_r1_std": row["std"]["t2v_r1"],
                     "seeds": sorted(row["per_seed"], key=int),
                     **time_variant(route, count, steps, texts, work, repeats, tiny,
                                    width if route == "latent" else None)})
    return rows


def markdown(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        r1 = f"{r['t2v_r1']:.1f}" + ("" if r["t2v_r1_std"] is None else f" ± {r['t2v_r1_std']:.1f}")
        rows.append([ROUTES[r["route"]], r["anchors_per_query"] or "", r["steps"] or "", r1, f"{r['p50_ms']:.1f}",
                     f"{r['anchor_p50_ms']:.1f}" if r["route"] else "", f"`{r['row']}`"])
    seeds = ", ".join(result["rows"][0]["seeds"])
    note = (f"t2v R@1 on the built-in test split, mean ± std over seeds {seeds}, from `bench.recall --variants` "
            f"(commit {result['recall_commit']}; the rows at 2 and 1 steps swap the test anchors of the model "
            f"trained at 4). Latency: `Retriever.search` of one query (torch, warm, top-10, p50 of "
            f"{result['repeats']} runs) over a {result['gallery']}-video gallery, default widths; "
            f"\"anchor + regions\" is the sampler, decoding and ResNet-50 (pixels) or the sampler alone (latent). "
            f"Machine: {common.describe_machine(result['machine'])}.\n")
    return common.markdown_table(HEADERS, rows) + "\n" + note


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    fig, axis = plt.subplots(figsize=(7, 4))
    for route, marker in ((None, "s"), ("pixels", "o"), ("latent", "^")):
        rows = [r for r in result["rows"] if r["route"] == route]
        axis.errorbar([r["p50_ms"] for r in rows], [r["t2v_r1"] for r in rows],
                      yerr=[r["t2v_r1_std"] or 0 for r in rows], fmt=marker, capsize=3, label=ROUTES[route])
        for r in rows:
            if route:
                axis.annotate(f"N={r['anchors_per_query']}, {r['steps']} st", (r["p50_ms"], r["t2v_r1"]),
                              fontsize=7, xytext=(4, 3), textcoords="offset points")
    axis.set_xlabel("end to end per query, p50 (ms, batch 1)")
    axis.set_ylabel("test t2v R@1 (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    fig.suptitle("Anchor variants: recall against query latency")
    fig.tight_layout()
    common.save_figure_atomic(fig, path)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.anchor_variants", description=__doc__.splitlines()[0])
    p.add_argument("--recall", default=None, help="recall.json of `bench.recall --variants` "
                                                  "(default: bench/results/<machine>/recall.json)")
    p.add_argument("--repeats", type=int, default=10, help="timed searches per variant (after one warm-up)")
    p.add_argument("--out", default=None, help="result folder (default: the recall.json's folder)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tiny widths, 2 runs)")
    args = p.parse_args(argv)
    if args.tiny:
        args.repeats = 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    info = common.machine_info()
    recall_path = Path(args.recall) if args.recall else common.results_dir(None, info) / "recall.json"
    if not recall_path.is_file():
        print(f"error: {recall_path} not found: run `python -m bench.recall --variants` first", file=sys.stderr)
        return 2
    recall = json.loads(recall_path.read_text())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as work:
        rows = run(recall, args.repeats, args.tiny, work)
    result = {"format": "cvr-sdgm/bench-anchor-variants/1", "rows": common.stamp(rows, info), "machine": info,
              "recall_commit": recall["machine"].get("commit"), "repeats": args.repeats,
              "gallery": 64 if args.tiny else 1000, "tiny": args.tiny,
              "wall_seconds": round(time.perf_counter() - start, 1)}
    out = common.results_dir(args.out or str(recall_path.parent), info)
    paths = common.write_results(out, "anchor_variants", result, markdown(result), plot)
    print(Path(paths["md"]).read_text())
    print(f"wrote {paths['md']}, {paths['json']} and {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
