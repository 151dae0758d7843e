"""Latency: per stage, end to end, and search time against gallery size (exhaustive vs two-stage).

Three parts, written as one Markdown file, one JSON file and two PNG plots:

1. **Stages** at batch 1 and 32, p50/p95 over warm runs: the text encoder, anchor generation per
   step count (teacher at 28 steps, student at 4, 2 and 1), the ResNet-50 over the anchors, the
   query tower and the gallery search over `--gallery` videos, the last two per backend. Text,
   ResNet, tower and search come from `engine.retriever.Retriever.last_timings`, so they are the
   stages of a real search; anchor rows call the generator directly, once per step count.
2. **End to end**: `Retriever.search` wall time per batch and queries per second, per backend.
3. **Gallery size** (1k, 10k, 100k, 1M by default; bench/gallery_sizes.py): the search stage of
   `Retriever.search` (warm, batch 1 and 16), exhaustive and two-stage (FAISS IVF first stage,
   exact rerank of M candidates per query) over galleries written as `cvr index` writes them, with
   the recall@10 of two stages against exhaustive, the index build time and the process's peak
   memory over its memory with the models loaded.
4. **Heads and reranker** (issue 18): the per-query cost of each scoring head, `Retriever.search`
   end to end at batch 1 with its stages, for the CVR-SDGM head (the full model: anchors drawn by
   the 4-step student) and the GLSCL head (`--head glscl`, text-only: its gallery rows hold 1+F+K
   vectors) over galleries of 1k, 10k and 100k videos, exhaustive and two-stage; then the
   generative reranker (engine/reranking.py) over each head's first stage at 1, 5, 10 and 50 DDIM
   steps (its cost does not depend on the gallery: it reads M candidates).

Timings need no trained weights, so the models are the default architecture at random init, saved
as checkpoints; the galleries are synthetic (bench/gallery_sizes.py, `aimed_gallery`). On a GPU
the end-to-end times are exact, but the retriever does not synchronise between stages, so its
per-stage split there is approximate. Backends are engine.retriever.BACKENDS: each one that
constructs is timed, the others are listed with the reason; triton only with CUDA (on a CPU only
Triton's interpreter runs, which is far too slow to time). CPU timings use one thread (torch and
FAISS).

    python -m bench.latency                   # bench/results/<machine>/latency.*
    python -m bench.latency --sizes 1000,100000 --queries 32
    python -m bench.latency --tiny --out /tmp/l   # seconds: a smoke run (tests)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import common
from bench.latency_galleries import (  # noqa: F401 (re-exported: bench.latency is the public module)
    HEAD_STAGES,
    HEAD_TWO_STAGE,
    HEADS,
    TINY_GLSCL,
    glscl_rows,
    make_glscl_checkpoint,
    make_reranker,
    time_gallery_size,
    time_heads,
    write_head_gallery,
)
from bench.latency_report import (  # noqa: F401 (re-exported)
    heads_markdown,
    heads_notes,
    markdown,
    notes,
    plot_heads,
    plot_sizes,
    plot_stages,
    write_outputs,
)
from bench.latency_stages import (  # noqa: F401 (re-exported)
    STAGE_LABELS,
    STAGES,
    STUDENT,
    TINY_MODEL,
    Settings,
    anchor_sources,
    backends,
    captions,
    export_search_modules,
    make_checkpoint,
    time_anchors,
    time_retriever,
    write_stage_gallery,
)

# ---------------------------------------------------------------------------------------------
# main


def time_backends(checkpoint: str, gallery: str, texts: list, s: Settings) -> tuple:
    """(stage rows, end-to-end rows, {backend: None or why it was not timed})."""
    available = backends(s.device, s.backends)
    stages, e2e = [], []
    for name in (n for n, why in available.items() if why is None):
        try:
            stage_rows, e2e_rows = time_retriever(checkpoint, gallery, name, texts, s)
        except Exception as error:  # a backend that cannot run here is reported, not fatal
            available[name] = "not available here: " + (str(error).splitlines() or [type(error).__name__])[0]
            continue
        stages += stage_rows
        e2e += e2e_rows
    return stages, e2e, available


def run(s: Settings, work: str) -> dict:
    from tqdm import tqdm

    checkpoint = make_checkpoint(os.path.join(work, "checkpoint"), s.tiny)
    gallery = write_stage_gallery(os.path.join(work, "gallery"), checkpoint, s.gallery)
    texts = captions(max(s.batch * (s.batch_repeats + 1), s.repeats + 1))
    clock = [time.perf_counter()]
    lap = lambda: clock.append(time.perf_counter()) or round(clock[-1] - clock[-2], 1)
    stages = time_anchors(texts, s)
    part_seconds = {"anchors": lap()}
    backend_stages, e2e, available = time_backends(checkpoint, gallery, texts, s)
    part_seconds["backends (exports included)"] = lap()
    text_only = make_checkpoint(os.path.join(work, "text_only"), s.tiny, use_anchor=False)
    size_texts = captions(s.queries, seed=1)
    sizes = []
    for n in tqdm(s.sizes, desc="gallery sizes", unit="size", disable=s.tiny):
        sizes += time_gallery_size(text_only, size_texts, n, s, work)
    part_seconds["gallery sizes"] = lap()
    glscl = make_glscl_checkpoint(os.path.join(work, "glscl"), s.tiny)
    heads = time_heads({"cvr": checkpoint, "glscl": glscl}, texts, s, work)
    part_seconds["heads and reranker"] = lap()
    model_desc = "tiny widths" if s.tiny else "D=1024, K=512, cvr train defaults"
    return {"format": "cvr-sdgm/bench-latency/1", "stages": stages + backend_stages, "end_to_end": e2e,
            "gallery_size": sizes, "heads": heads, "backends": available, "model": model_desc,
            "part_seconds": part_seconds}


def parse_args(argv) -> tuple:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32, help="the larger batch of the stage timings")
    p.add_argument("--repeats", type=int, default=10, help="warm runs at batch 1")
    p.add_argument("--batch-repeats", type=int, default=3, help="warm runs at the larger batch")
    p.add_argument("--gallery", type=int, default=1000, help="videos in the stage timings' gallery")
    p.add_argument("--sizes", default="1000,10000,100000,1000000", help="gallery sizes, comma-separated")
    p.add_argument("--queries", type=int, default=16, help="queries per batch in the gallery-size part")
    p.add_argument("--two-stage", default="16:100,64:100",
                   help="two-stage variants as NPROBE:M pairs (FAISS lists probed, candidates reranked)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends to time (default: every one available; torch with --tiny, "
                        "since an exported backend first exports the model, which takes a minute)")
    p.add_argument("--out", default=None, help="result folder (default: bench/results/<machine>/)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    args = p.parse_args(argv)
    s = Settings(batch=args.batch, repeats=args.repeats, batch_repeats=args.batch_repeats, gallery=args.gallery,
                 sizes=tuple(int(x) for x in args.sizes.split(",")), queries=args.queries,
                 two_stage=tuple(tuple(int(v) for v in pair.split(":")) for pair in args.two_stage.split(",")),
                 device=args.device, backends=args.backends or "all", tiny=args.tiny)
    if args.tiny:
        s = Settings(batch=4, repeats=2, batch_repeats=1, gallery=64, sizes=(500, 2000), queries=4,
                     two_stage=((4, 20),), device=args.device, backends=args.backends or "torch",
                     tiny=True, head_sizes=(300,), rerank_steps=(1, 5))
    return s, args.out


def main(argv=None) -> int:
    settings, out = parse_args(argv)
    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    start = time.perf_counter()
    info = common.machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as work:
        result = run(settings, work)
    for part in ("stages", "end_to_end", "gallery_size", "heads"):
        result[part] = common.stamp(result[part], info)
    result.update(machine=info, machine_slug=common.machine_slug(info), settings=settings.__dict__,
                  threads=torch.get_num_threads(), wall_seconds=round(time.perf_counter() - start, 1),
                  cpu_seconds=common.cpu_seconds(), tiny=settings.tiny)
    folder = common.results_dir(out or (tempfile.mkdtemp(prefix="bench-latency-out-") if settings.tiny else None),
                                info)
    paths = write_outputs(result, folder)
    print(Path(paths["md"]).read_text())
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
