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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench import common
from engine import files

STUDENT = common.STUDENTS / "4step"
STAGES = ("text", "vision", "tower", "search")
STAGE_LABELS = {"text": "text encoder (MiniLM)", "vision": "ResNet-50 regions of the anchors",
                "tower": "query tower (hybrid attention + heads)", "search": "gallery search, top-10"}
TINY_MODEL = {"latent_dim": 32, "concept_dim": 16, "attn_dim": 16, "video_gru_hidden": 16, "video_local_dim": 32}
TINY_GLSCL = {"glscl_heads": 4, "glscl_frames": 5, "glscl_queries": 3, "glscl_decoder_layers": 1,
              "glscl_temporal_layers": 1}
HEADS = {"cvr": "CVR-SDGM (full model, 4-step student anchors)", "glscl": "GLSCL (text-only)"}
HEAD_STAGES = ("text", "anchor", "vision", "tower", "search", "rerank")
HEAD_TWO_STAGE = (16, 100)  # (nprobe, M) of the heads part's two-stage rows


@dataclass
class Settings:
    batch: int = 32
    repeats: int = 10  # warm runs at batch 1
    batch_repeats: int = 3  # warm runs at the larger batch
    gallery: int = 1000  # videos in the gallery of the stage timings
    sizes: tuple = (1_000, 10_000, 100_000, 1_000_000)
    queries: int = 16  # queries per batch in the gallery-size part
    two_stage: tuple = ((16, 100), (64, 100))  # (FAISS nprobe, candidates M) of the two-stage search
    device: str = "cpu"
    backends: str = "all"  # or comma-separated names
    tiny: bool = False
    head_sizes: tuple = (1_000, 10_000, 100_000)  # galleries of the heads part
    rerank_steps: tuple = (1, 5, 10, 50)  # DDIM steps of the reranker rows (T = 50, the default)


# ---------------------------------------------------------------------------------------------
# The model, the queries, the galleries


def make_checkpoint(folder: str, tiny: bool, use_anchor: bool = True) -> str:
    """The default architecture (tiny widths with --tiny) at random init, with the anchor meta a
    trained full model carries (`use_anchor`), saved as a checkpoint folder."""
    from engine import paths
    from engine.checkpoint import save_checkpoint
    from engine.config import ModelConfig
    from engine.model import CVRModel

    torch.manual_seed(0)
    model = CVRModel(ModelConfig(use_anchor=use_anchor, **(TINY_MODEL if tiny else {})))
    # Plausible frozen constants (cosines around 0, Jaccards around 0.3): they only scale scores.
    model.matcher.norm.copy_(torch.tensor([[-0.2, 1.0], [-0.2, 1.0], [0.0, 1.0], [0.0, 1.0]]))
    from engine.portable import NOISE_SCHEME

    # As a checkpoint trained now records them: its anchors' noise scheme included (else every
    # load warns that the model was trained on anchors drawn another way).
    anchors = {"generator": paths.reference(STUDENT, folder), "steps": 4, "seed": 0, "image_size": 64,
               "protocol": "query", "noise": NOISE_SCHEME}
    save_checkpoint(model, folder, [], {"anchors": anchors if use_anchor else None})
    return folder


def captions(n: int, seed: int = 0) -> list:
    """n distinct captions of the built-in set's kind (no collection needed)."""
    from training.synthetic import make_caption, sample_scene

    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        caption = make_caption(sample_scene(rng, f"video{len(out)}"), rng)
        # The longest captions exceed the text encoder's 32 tokens (a warning per search): skipped.
        if caption not in out and len(caption.split()) <= 20:
            out.append(caption)
    return out


def write_stage_gallery(folder: str, checkpoint: str, n: int) -> str:
    """A background-only synthetic gallery of n videos for the stage timings."""
    from bench.gallery_sizes import aimed_gallery
    from engine.checkpoint import checkpoint_id, read_checkpoint_config
    from engine.indexing import write_gallery

    config = read_checkpoint_config(checkpoint)["model"]
    d, k = config["latent_dim"], config["concept_dim"]
    lat, con = aimed_gallery(n, np.zeros((0, 2, d), np.float32), np.zeros((0, 2, k), np.float32))
    write_gallery(folder, [f"video{i}" for i in range(n)], lat, con, {"id": checkpoint_id(checkpoint)})
    return folder


# ---------------------------------------------------------------------------------------------
# Part 1 and 2: stages and end to end


def backends(device: str, wanted: str = "all") -> dict:
    """Backend name -> None when worth timing here, else why not (engine.retriever.BACKENDS).
    `wanted`: "all", or the comma-separated names to time."""
    from engine.retriever import BACKENDS

    out = {}
    for name in BACKENDS:
        if wanted != "all" and name not in wanted.split(","):
            out[name] = "not requested (--backends)"
        elif name == "triton" and not device.startswith("cuda"):
            out[name] = "needs CUDA (on a CPU only Triton's interpreter runs: far too slow to time)"
        else:
            out[name] = None
    return out


def _row(stage: str, variant: str, backend: str, batch: int, seconds: list, device: str) -> dict:
    p50, p95 = common.p50_p95_ms(seconds)
    return {"stage": stage, "variant": variant, "backend": backend, "batch": batch, "p50_ms": p50, "p95_ms": p95,
            "per_query_p50_ms": round(p50 / batch, 3), "runs": len(seconds), "device": device,
            "threads": torch.get_num_threads()}


def time_retriever(checkpoint: str, gallery: str, backend: str, texts: list, s: Settings) -> tuple:
    """(stage rows, end-to-end rows) of one backend, batch 1 and the larger batch."""
    from engine.retriever import EXPORTED, Retriever

    export_dir = export_search_modules(checkpoint, backend) if backend in EXPORTED else None
    retriever = Retriever(checkpoint, gallery, backend=backend, generator=str(STUDENT), device=s.device,
                          export_dir=export_dir)
    stage_rows, e2e_rows = [], []
    for batch, repeats in ((1, s.repeats), (s.batch, s.batch_repeats)):
        runs = []
        for i in range(repeats + 1):  # the first run warms up and is dropped
            start = time.perf_counter()
            retriever.search([texts[(i * batch + j) % len(texts)] for j in range(batch)], k=10)
            wall = time.perf_counter() - start
            runs.append((wall, {k: getattr(retriever.last_timings, k) for k in STAGES}))
        runs = runs[1:]
        for stage in STAGES:
            variant = f"gallery of {len(retriever.gallery)}" if stage == "search" else ""
            stage_rows.append(_row(STAGE_LABELS[stage], variant, backend, batch, [r[1][stage] for r in runs],
                                   s.device))
        row = _row("end to end (Retriever.search)", "4-step student", backend, batch, [r[0] for r in runs],
                   s.device)
        row["queries_per_second"] = round(1000 * batch / row["p50_ms"], 2)
        e2e_rows.append(row)
    return stage_rows, e2e_rows


def export_search_modules(checkpoint: str, backend: str) -> str:
    """The export an exported backend runs (made once in CHECKPOINT/onnx, as `cvr search` does)."""
    from export.onnx import SEARCH_MODULES, ExportOptions, export_onnx

    out = os.path.join(checkpoint, "onnx")
    if backend == "tensorrt":
        from export.tensorrt import TensorRTOptions, export_tensorrt

        export_tensorrt(checkpoint, out, TensorRTOptions(modules=SEARCH_MODULES, generator=str(STUDENT)))
        return out
    return export_onnx(checkpoint, out, ExportOptions(modules=SEARCH_MODULES, generator=str(STUDENT))).folder


def anchor_sources() -> list:
    """(label, generator folder, steps): the teacher at 28 steps, the student at 4, 2 and 1."""
    students = [(common.student_source(n), n) for n in (4, 2, 1)]
    return [("teacher at 28 steps", common.TEACHER, 28)] + [(label, folder, n) for (folder, label), n in students]


def time_anchors(texts: list, s: Settings) -> list:
    """Anchor generation (text encoding for the generator + sampling + decoding) per step count."""
    from tqdm import tqdm

    from engine.anchors import AnchorGenerator, GeneratorOptions

    rows, loaded = [], {}
    for label, folder, steps in tqdm(anchor_sources(), desc="anchor stages", unit="row", disable=s.tiny):
        if folder not in loaded:
            loaded[folder] = AnchorGenerator.load(folder, GeneratorOptions(batch_size=s.batch), device=s.device)
        generator = loaded[folder]
        for batch, repeats in ((1, s.repeats), (s.batch, s.batch_repeats)):
            seconds = common.timed_runs(lambda g=generator, b=batch, n=steps: g.generate(texts[:b], steps=n),
                                        repeats)
            rows.append(_row("anchor generation", label, "torch", batch, seconds, s.device))
    return rows


# ---------------------------------------------------------------------------------------------
# Part 3: gallery size


def time_gallery_size(checkpoint: str, texts: list, n: int, s: Settings, work: str) -> list:
    """Rows for one gallery size (bench/gallery_sizes.py): the gallery is written here, then timed
    and measured in a fresh process, then deleted."""
    from bench import gallery_sizes

    folder = os.path.join(work, f"gallery-{n}")
    built = gallery_sizes.write_size_gallery(folder, checkpoint, texts, n)
    try:
        measured = gallery_sizes.run_size(checkpoint, folder, texts, [list(p) for p in s.two_stage], s.repeats)
    finally:
        files.remove(folder)
    peak = measured["peak_over_models_mb"] * 2**20  # bytes
    base = {"gallery": n, "generate_s": built["generate_s"], "build_s": built["write_s"],
            "gallery_gb": round(measured["gallery_bytes"] / 1e9, 3),
            "index_gb": round(measured["index_bytes"] / 1e9, 3), "peak_over_models_gb": round(peak / 1e9, 3),
            "peak_over_gallery": round(peak / measured["gallery_bytes"], 2),
            "load_s": measured["load_s"], "faiss": built["faiss"]}
    rows = []
    for row in measured["rows"]:
        timed = _row(row["stage"], row["variant"], "torch", row["batch"], row["seconds"], "cpu")
        rows.append({**base, **timed, **{k: row[k] for k in ("nprobe", "candidates", "recall_at_10") if k in row}})
    return rows


# ---------------------------------------------------------------------------------------------
# Part 4: heads and reranker


def make_glscl_checkpoint(folder: str, tiny: bool) -> str:
    """The glscl head (`cvr train --head glscl` defaults, tiny widths with --tiny) at random init."""
    from engine.checkpoint import save_checkpoint
    from engine.config import ModelConfig
    from engine.model import CVRModel

    torch.manual_seed(0)
    model = CVRModel(ModelConfig(head="glscl", **({**TINY_MODEL, **TINY_GLSCL} if tiny else {})))
    save_checkpoint(model, folder, [], {"anchors": None})
    return folder


def glscl_rows(n: int, config: dict, seed: int = 0, chunk: int = 2048) -> tuple:
    """(lat (n, 1+F+K, D), con (n, 1, F)) float16 of n synthetic glscl gallery rows, as the glscl
    video tower lays them out (engine/glscl.py): the normalised mean of F frame vectors (clustered:
    n/100 centres plus noise), the F frame vectors, K normalised decoded vectors; every frame
    valid. Random values: the timings do not depend on them."""
    rng = np.random.default_rng(seed)
    d, frames, queries = config["latent_dim"], config["glscl_frames"], config["glscl_queries"]
    centres = rng.standard_normal((max(1, n // 100), d), dtype=np.float32) / np.sqrt(d)
    lat = np.empty((n, 1 + frames + queries, d), np.float16)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        v = centres[rng.integers(len(centres), size=rows)][:, None] + \
            0.6 * rng.standard_normal((rows, frames, d), dtype=np.float32) / np.sqrt(d)
        z = rng.standard_normal((rows, queries, d), dtype=np.float32)
        mean = v.mean(1)
        lat[start : start + rows, 0] = mean / np.linalg.norm(mean, axis=1, keepdims=True)
        lat[start : start + rows, 1 : 1 + frames] = v
        lat[start : start + rows, 1 + frames :] = z / np.linalg.norm(z, axis=2, keepdims=True)
    return lat, np.ones((n, 1, frames), np.float16)


def write_head_gallery(folder: str, checkpoint: str, n: int) -> float:
    """A synthetic gallery of n videos for the checkpoint's head with a FAISS `IVF<sqrt N>,SQfp16`
    index, written by `engine.indexing.write_gallery` as `cvr index` writes one; returns seconds."""
    from bench.gallery_sizes import aimed_gallery
    from engine.checkpoint import checkpoint_id, read_checkpoint_config
    from engine.indexing import write_gallery

    clock = time.perf_counter()
    config = read_checkpoint_config(checkpoint)["model"]
    if config.get("head", "cvr") == "glscl":
        lat, con = glscl_rows(n, config, seed=n)
    else:
        d, k = config["latent_dim"], config["concept_dim"]
        lat, con = aimed_gallery(n, np.zeros((0, 2, d), np.float32), np.zeros((0, 2, k), np.float32), seed=n)
    write_gallery(folder, [f"video{i}" for i in range(n)], lat, con, {"id": checkpoint_id(checkpoint)},
                  faiss=f"IVF{max(1, round(np.sqrt(n)))},SQfp16")
    return round(time.perf_counter() - clock, 1)


def make_reranker(folder: str, checkpoint: str, steps: int, tiny: bool) -> str:
    """A reranker of the checkpoint (`cvr train-reranker` defaults: M = 32, T = 50; hidden 32 with
    --tiny) at random init that samples with `steps` DDIM steps, as `--sample-steps` records it."""
    from engine.checkpoint import checkpoint_id, read_checkpoint_config
    from engine.rerank import build_denoiser, save_reranker
    from engine.reranking import RerankConfig

    model_config = read_checkpoint_config(checkpoint)["model"]
    config = RerankConfig(latent_dim=model_config["latent_dim"], sample_steps=steps,
                          **({"hidden": 32} if tiny else {})).validate()
    torch.manual_seed(0)
    base = {"id": checkpoint_id(checkpoint), "path": checkpoint, "head": model_config.get("head", "cvr")}
    save_reranker(build_denoiser(config), config, folder, base)
    return folder


def _head_row(head: str, n: int, mode: str, reranker: str, runs: list, build_s: float) -> dict:
    p50, p95 = common.p50_p95_ms([wall for wall, _ in runs])
    stages = {k: common.p50_p95_ms([t[k] for _, t in runs])[0] for k in HEAD_STAGES}
    return {"head": head, "gallery": n, "search": mode, "reranker": reranker, "batch": 1, "p50_ms": p50,
            "p95_ms": p95, "stages_p50_ms": stages, "runs": len(runs), "build_s": build_s,
            "threads": torch.get_num_threads()}


def _timed_searches(retriever, texts: list, options, runs: int) -> list:
    """(wall seconds, {stage: seconds}) of `runs` warm batch-1 searches (one untimed first), each
    with another text (anchors are drawn per text)."""
    out = []
    for i in range(runs + 1):
        start = time.perf_counter()
        retriever.search([texts[i % len(texts)]], k=10, options=options)
        wall = time.perf_counter() - start
        out.append((wall, {k: getattr(retriever.last_timings, k) for k in HEAD_STAGES}))
    return out[1:]


def time_heads(checkpoints: dict, texts: list, s: Settings, work: str) -> list:
    """Part 4 rows: each head at each gallery size, exhaustive and two-stage; then, over the first
    size's exhaustive first stage, the reranker at each step count."""
    from tqdm import tqdm

    from engine.retriever import Retriever
    from engine.search import SearchOptions

    nprobe, m = HEAD_TWO_STAGE if not s.tiny else (4, 20)
    modes = {"exhaustive": SearchOptions(mode="exhaustive"),
             "two-stage": SearchOptions(mode="two-stage", nprobe=nprobe, candidates=m)}
    rows = []
    for head, checkpoint in checkpoints.items():
        for n in tqdm(s.head_sizes, desc=f"{head} head sizes", unit="size", disable=s.tiny):
            folder = os.path.join(work, f"{head}-gallery-{n}")
            build_s = write_head_gallery(folder, checkpoint, n)
            generator = str(STUDENT) if head == "cvr" else None
            retriever = Retriever(checkpoint, folder, backend="torch", generator=generator, device=s.device)
            for mode, options in modes.items():
                runs = s.repeats if mode == "two-stage" or n <= 10_000 else 3
                label = mode if mode == "exhaustive" else f"two-stage (FAISS IVF, nprobe={nprobe}, M={m})"
                rows.append(_head_row(head, n, label, "", _timed_searches(retriever, texts, options, runs),
                                      build_s))
            if n == s.head_sizes[0]:
                for steps in s.rerank_steps:
                    reranker = make_reranker(os.path.join(work, f"{head}-reranker-{steps}"), checkpoint, steps,
                                             s.tiny)
                    retriever.set_reranker(reranker, s.device)
                    runs = _timed_searches(retriever, texts, modes["exhaustive"], s.repeats)
                    rows.append(_head_row(head, n, "exhaustive", f"{steps} DDIM step{'s' if steps > 1 else ''}, M = "
                                          f"{retriever.reranker.candidates}", runs, build_s))
                retriever.set_reranker(None)
            del retriever
            files.remove(folder)
    return rows


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
