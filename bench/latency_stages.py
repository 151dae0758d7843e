"""bench/latency.py's parts 1 and 2: the model, queries and gallery it times, each stage and end to end."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench import common

STUDENT = common.STUDENTS / "4step"
STAGES = ("text", "vision", "tower", "search")
STAGE_LABELS = {"text": "text encoder (MiniLM)", "vision": "ResNet-50 regions of the anchors",
                "tower": "query tower (hybrid attention + heads)", "search": "gallery search, top-10"}
TINY_MODEL = {"latent_dim": 32, "concept_dim": 16, "attn_dim": 16, "video_gru_hidden": 16, "video_local_dim": 32}


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


def make_checkpoint(folder: str, tiny: bool, use_anchor: bool = True, anchors_per_query: int = 1,
                    features: str = "pixels", region_dim: int | None = None) -> str:
    """The default architecture (tiny widths with --tiny) at random init, with the anchor meta a
    trained full model carries (`use_anchor`; its anchors per query and region features as a model
    trained on such a store records them), saved as a checkpoint folder."""
    from engine import paths
    from engine.checkpoint import save_checkpoint
    from engine.config import ModelConfig
    from engine.model import CVRModel

    torch.manual_seed(0)
    widths = {**(TINY_MODEL if tiny else {}), **({"region_dim": region_dim} if region_dim else {})}
    model = CVRModel(ModelConfig(use_anchor=use_anchor, **widths))
    # Plausible frozen constants (cosines around 0, Jaccards around 0.3): they only scale scores.
    model.matcher.norm.copy_(torch.tensor([[-0.2, 1.0], [-0.2, 1.0], [0.0, 1.0], [0.0, 1.0]]))
    from engine.portable import NOISE_SCHEME

    # As a checkpoint trained now records them: its anchors' noise scheme included (else every
    # load warns that the model was trained on anchors drawn another way).
    anchors = {"generator": paths.reference(STUDENT, folder), "steps": 4, "seed": 0, "image_size": 64,
               "protocol": "query", "noise": NOISE_SCHEME}
    if anchors_per_query > 1:
        anchors["anchors_per_query"] = anchors_per_query
    if features != "pixels":
        anchors["features"] = features
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


def timing_row(stage: str, variant: str, backend: str, batch: int, seconds: list, device: str) -> dict:
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
            stage_rows.append(timing_row(STAGE_LABELS[stage], variant, backend, batch, [r[1][stage] for r in runs],
                                   s.device))
        row = timing_row("end to end (Retriever.search)", "4-step student", backend, batch, [r[0] for r in runs],
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
            rows.append(timing_row("anchor generation", label, "torch", batch, seconds, s.device))
    return rows
