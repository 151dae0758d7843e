"""bench/latency.py's parts 3 and 4: search time against gallery size, and per scoring head and reranker."""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from bench import common
from bench.latency_stages import STUDENT, TINY_MODEL, Settings, timing_row
from engine import files

TINY_GLSCL = {"glscl_heads": 4, "glscl_frames": 5, "glscl_queries": 3, "glscl_decoder_layers": 1,
              "glscl_temporal_layers": 1}
HEADS = {"cvr": "CVR-SDGM (full model, 4-step student anchors)", "glscl": "GLSCL (text-only)"}
HEAD_STAGES = ("text", "anchor", "vision", "tower", "search", "rerank")
HEAD_TWO_STAGE = (16, 100)  # (nprobe, M) of the heads part's two-stage rows


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
        timed = timing_row(row["stage"], row["variant"], "torch", row["batch"], row["seconds"], "cpu")
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
