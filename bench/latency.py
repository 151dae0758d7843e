"""Latency: per stage, end to end, and scoring time against gallery size (exhaustive vs FAISS first stage).

Three parts, written as one Markdown file, one JSON file and two PNG plots:

1. **Stages** at batch 1 and 32, p50/p95 over warm runs: the text encoder, anchor generation per
   step count (teacher at 28 steps, student at 4, 2 and 1), the ResNet-50 over the anchors, the
   query tower and the scoring against a gallery of `--gallery` videos, the last two per backend.
   Text, ResNet, tower and scoring come from `engine.retriever.Retriever.last_timings`, so they are
   the stages of a real search; anchor rows call the generator directly, once per step count.
2. **End to end**: `Retriever.search` wall time per batch and queries per second, per backend.
3. **Gallery size** (1k, 10k, 100k, 1M by default): top-10 of a batch of queries and of one query,
   exhaustive (every video through the fused score, in chunks of fp16 rows cast to fp32) and in two
   stages (`engine.gallery.two_stage_search`: a FAISS IVF index over the global latent vectors
   proposes m candidates per query, the full fused score reranks them exactly), with the recall@10
   of the two-stage top-10 against the exhaustive top-10, the index build time and the memory.

Timings need no trained weights, so the model is the default architecture at random init, saved as
a checkpoint; the galleries are synthetic (see `synthetic_gallery`). On a GPU the end-to-end times
are exact, but the retriever does not synchronise between stages, so its per-stage split there is
approximate. Backends are the retriever's
(`engine.retriever.BACKENDS`, plus any module under engine/backends/): each one that constructs
is timed, the others are listed with the reason; triton only with CUDA (on a CPU only Triton's
interpreter runs, which is far too slow to time). CPU timings use one thread (torch and FAISS).

    python -m bench.latency                   # bench/results/<machine>/latency.*
    python -m bench.latency --sizes 1000,100000 --queries 32
    python -m bench.latency --tiny --out /tmp/l   # seconds: a smoke run (tests)
"""
from __future__ import annotations

import argparse
import math
import os
import pkgutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from bench import common

STUDENT = common.STUDENTS / "4step"
STAGES = ("text", "vision", "tower", "scoring")
STAGE_LABELS = {"text": "text encoder (MiniLM)", "vision": "ResNet-50 regions of the anchors",
                "tower": "query tower (hybrid attention + heads)", "scoring": "scoring + top-10"}
TINY_MODEL = {"latent_dim": 32, "concept_dim": 16, "attn_dim": 16, "video_gru_hidden": 16, "video_local_dim": 32}


@dataclass
class Settings:
    batch: int = 32
    repeats: int = 10  # warm runs at batch 1
    batch_repeats: int = 3  # warm runs at the larger batch
    gallery: int = 1000  # videos in the gallery of the stage timings
    sizes: tuple = (1_000, 10_000, 100_000, 1_000_000)
    queries: int = 16  # queries per batch in the gallery-size part
    two_stage: tuple = ((16, 100), (64, 100))  # (FAISS nprobe, candidates m) of the two-stage search
    device: str = "cpu"
    backends: str = "all"  # or comma-separated names
    tiny: bool = False


# ---------------------------------------------------------------------------------------------
# The model, the queries, the galleries


def make_checkpoint(folder: str, tiny: bool) -> str:
    """The default architecture (tiny widths with --tiny) at random init, with the anchor meta a
    trained full model carries, saved as a checkpoint folder."""
    from engine.checkpoint import CVRModel, save_checkpoint
    from engine.config import ModelConfig

    torch.manual_seed(0)
    model = CVRModel(ModelConfig(use_anchor=True, **(TINY_MODEL if tiny else {})))
    # Plausible frozen constants (cosines around 0, Jaccards around 0.3): they only scale scores.
    model.matcher.norm.copy_(torch.tensor([[-0.2, 1.0], [-0.2, 1.0], [0.0, 1.0], [0.0, 1.0]]))
    anchors = {"generator": str(STUDENT), "steps": 4, "seed": 0, "image_size": 64, "protocol": "query"}
    save_checkpoint(model, folder, [], {"anchors": anchors})
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


@dataclass
class Synthetic:
    lat: torch.Tensor  # (N, 2, D) float16
    con: torch.Tensor  # (N, 2, K) float16
    query_lat: torch.Tensor  # (Q, 2, D) float32
    query_con: torch.Tensor  # (Q, 2, K) float32
    seconds: float


def _views(z: torch.Tensor, noise: torch.Tensor, k: int) -> tuple:
    """Both branches' latent and concept vectors of identities z (n, D). Each branch sees z plus its
    own view of the noise: the noise rolled along the features by a branch's own shift, which is
    nearly orthogonal to the unrolled noise and far cheaper than drawing fresh noise at 1M rows.
    Concept probabilities squash fixed coordinates of the view (mostly small, as tag
    probabilities are): the first k for the global branch, the last k for the local one."""
    d = z.shape[1]
    lat, con = [], []
    for branch in (0, 1):
        view = z + 0.4 * torch.roll(noise, branch + 1, dims=1)
        lat.append(F.normalize(view, dim=-1))
        coordinates = view[:, :k] if branch == 0 else view[:, d - k :]
        con.append(torch.sigmoid(2.0 * math.sqrt(d) * coordinates - 2.0))
    return torch.stack(lat, 1), torch.stack(con, 1)


def synthetic_gallery(n: int, d: int, k: int, queries: int, seed: int = 0, chunk: int = 2048) -> Synthetic:
    """A clustered gallery with queries aimed at some of its videos.

    Identity of video i: z_i = c_{cluster(i)} + 0.6 u_i with n/100 cluster centres c and u_i
    Gaussian (both of norm ~1); each branch adds its own noise (0.4) and is L2-normalised; concept
    vectors are squashed coordinates of the same views. A query aims at a random video t:
    z_q = z_t + 0.5 u_q, so its exhaustive top-10 is mostly t and t's cluster mates. Recall of the
    first stage depends on this structure (engine.md section 4): it is a stand-in, not real data.
    Stored fp16, generated in small chunks (temporaries that stay in the allocator's reused memory:
    256 MB chunks run 2x slower here, in page faults), so 1M videos need 6 GB and no float32 copy."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(1, n // 100), d, generator=g) / math.sqrt(d)
    targets = torch.randint(n, (queries,), generator=g)
    lat, con = torch.empty(n, 2, d, dtype=torch.float16), torch.empty(n, 2, k, dtype=torch.float16)
    target_z = torch.empty(queries, d)
    for s in range(0, n, chunk):
        rows = min(chunk, n - s)
        noise = torch.randn(rows, d, generator=g) / math.sqrt(d)
        z = centres[torch.randint(len(centres), (rows,), generator=g)] + 0.6 * noise
        chunk_lat, chunk_con = _views(z, noise, k)
        lat[s : s + rows], con[s : s + rows] = chunk_lat.half(), chunk_con.half()
        inside = (targets >= s) & (targets < s + rows)
        target_z[inside] = z[targets[inside] - s]
    z_q = target_z + 0.5 * torch.randn(queries, d, generator=g) / math.sqrt(d)
    q_lat, q_con = _views(z_q, torch.randn(queries, d, generator=g) / math.sqrt(d), k)
    return Synthetic(lat, con, q_lat, q_con, time.perf_counter() - start)


def write_stage_gallery(folder: str, checkpoint: str, n: int) -> str:
    from engine.checkpoint import checkpoint_id, load_checkpoint
    from engine.gallery import write_gallery

    config = load_checkpoint(checkpoint).config
    data = synthetic_gallery(n, config.latent_dim, config.concept_dim, 1)
    write_gallery(folder, [f"video{i}" for i in range(n)], data.lat, data.con, {"id": checkpoint_id(checkpoint)})
    return folder


# ---------------------------------------------------------------------------------------------
# Part 1 and 2: stages and end to end


def backends(device: str, wanted: str = "all") -> dict:
    """Backend name -> None when worth timing here, else why not: the retriever's list plus any
    module under engine/backends/ (a backend added there is picked up without editing this file).
    `wanted`: "all", or the comma-separated names to time."""
    import engine.backends
    from engine import retriever

    names = list(dict.fromkeys([*getattr(retriever, "BACKENDS", ("torch",)),
                                *(m.name for m in pkgutil.iter_modules(engine.backends.__path__))]))
    out = {}
    for name in names:
        if wanted != "all" and name not in wanted.split(","):
            out[name] = "not requested (--backends)"
        elif name == "triton" and not device.startswith("cuda"):
            out[name] = "needs CUDA (on a CPU only Triton's interpreter runs: far too slow to time)"
        elif name not in getattr(retriever, "BACKENDS", ()):
            out[name] = f"engine/backends/{name}.py exists but engine.retriever does not offer it"
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
    from engine.retriever import Retriever

    retriever = Retriever(checkpoint, gallery, backend=backend, generator=str(STUDENT), device=s.device)
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
            variant = f"gallery of {len(retriever.gallery)}" if stage == "scoring" else ""
            stage_rows.append(_row(STAGE_LABELS[stage], variant, backend, batch, [r[1][stage] for r in runs],
                                   s.device))
        row = _row("end to end (Retriever.search)", "4-step student", backend, batch, [r[0] for r in runs],
                   s.device)
        row["queries_per_second"] = round(1000 * batch / row["p50_ms"], 2)
        e2e_rows.append(row)
    return stage_rows, e2e_rows


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


# Elements of the largest temporary of one exhaustive scoring call: the Jaccard passes materialise
# (queries x rows x K) twice, the fp32 copy of the rows is rows x (2D + 2K). Temporaries of a few MB
# are reused by the allocator; at 256 MB every call pays fresh page faults (5-10x slower here).
SCORE_BLOCK = 1 << 21


def chunk_rows(queries: int, d: int, k: int) -> int:
    return max(64, SCORE_BLOCK // max(queries * k, 2 * d + 2 * k))


def exhaustive_topk(model, lat, con, query, k: int) -> tuple:
    """Top-k of the fused score over every gallery row, scoring a few fp16 rows at a time in fp32
    (a 1M gallery in fp32 would need 12 GB); ties go to the lower row, as in one pass."""
    from engine.model import Embeddings, topk_stable

    chunk = chunk_rows(len(query), lat.shape[2], con.shape[2])
    best_values = best_rows = None
    for start in range(0, lat.shape[0], chunk):
        part = Embeddings(lat[start : start + chunk].float(), con[start : start + chunk].float())
        values, rows = model.score(query, part, k=min(k, len(part)))
        rows = rows + start
        if best_values is not None:  # earlier (lower) rows first, so the stable top-k keeps them on ties
            values, rows = torch.cat([best_values, values], 1), torch.cat([best_rows, rows], 1)
        top, order = topk_stable(values, min(k, values.shape[1]))
        best_values, best_rows = top, rows.gather(1, order)
    return best_values, best_rows


def ivf_index(vectors: torch.Tensor) -> tuple:
    """An IVF index with fp16 codes (IndexIVFScalarQuantizer, QT_fp16) over (N, D) fp16 vectors:
    nlist = sqrt(N) lists, k-means on a 40 x nlist sample (FAISS's own minimum per centroid),
    vectors added in chunks, so no float32 copy of the gallery is ever made. Returns (index,
    build seconds, parameters). fp16 codes halve the index (2 GB at 1M) and lose nothing that
    matters: the first stage only proposes candidates, which the fused score reranks exactly."""
    import faiss

    n, d = vectors.shape
    nlist = max(1, round(math.sqrt(n)))
    start = time.perf_counter()
    sample = np.random.default_rng(0).choice(n, min(n, 40 * nlist), replace=False)
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 1  # tiny galleries: no warning when the sample is small
    index.train(np.ascontiguousarray(vectors[torch.from_numpy(np.sort(sample))].float().numpy()))
    for s in range(0, n, 16384):
        index.add(np.ascontiguousarray(vectors[s : s + 16384].float().numpy()))
    params = {"kind": "IVF,SQfp16", "nlist": nlist, "train_points": len(sample)}
    return index, time.perf_counter() - start, params


def _runs(n: int, repeats: int) -> tuple:
    """(timed runs, warm-up runs) of an exhaustive search over n videos: one pass over 1M videos
    takes seconds, and a gallery that large gains nothing from a warm-up pass."""
    return (repeats, 1) if n <= 10_000 else (3, 1) if n <= 100_000 else (1, 0)


def time_gallery_size(model, n: int, s: Settings) -> list:
    """Rows for one gallery size: exhaustive and two-stage, one query and a batch, with recall."""
    from engine.model import Embeddings

    config = model.config
    data = synthetic_gallery(n, config.latent_dim, config.concept_dim, s.queries, seed=n)
    queries = {1: Embeddings(data.query_lat[:1], data.query_con[:1]),
               s.queries: Embeddings(data.query_lat, data.query_con)}
    base = {"gallery": n, "generate_s": round(data.seconds, 1),
            "gallery_gb": round((data.lat.numel() + data.con.numel()) * 2 / 1e9, 3)}
    rows, exact = _exhaustive_rows(model, data, queries, s)
    rows += _two_stage_rows(model, data, queries, exact[s.queries], s)
    return [{**base, **r} for r in rows]


def _exhaustive_rows(model, data: Synthetic, queries: dict, s: Settings) -> tuple:
    """Timed rows and each batch's exhaustive top-10 (the reference of the recall)."""
    rows, exact = [], {}
    runs, warm = _runs(data.lat.shape[0], s.repeats)
    for size, query in queries.items():
        def search(query=query, size=size):  # keeps the last top-10
            exact[size] = exhaustive_topk(model, data.lat, data.con, query, 10)[1]

        seconds = common.timed_runs(search, runs, warmup=warm)
        rows.append(_row("exhaustive", "fused score, chunked", "torch", size, seconds, "cpu"))
    return rows, exact


def _two_stage_rows(model, data: Synthetic, queries: dict, exact: torch.Tensor, s: Settings) -> list:
    from engine.gallery import Gallery, two_stage_search

    n, d = data.lat.shape[0], data.lat.shape[2]
    index, build_s, params = ivf_index(data.lat[:, 0])
    manifest = {"dims": {"latent": d, "concept": data.con.shape[2]}, "dtype": "float16"}
    gallery = Gallery(f"<synthetic {n}>", [str(i) for i in range(n)], data.lat, data.con, manifest, index)
    extra = {"build_s": round(build_s, 1), "index_gb": round(index.ntotal * (2 * d + 8) / 1e9, 3),  # fp16 + ids
             "faiss": params}
    rows = []
    for nprobe, m in s.two_stage:
        index.nprobe = min(nprobe, params["nlist"])  # a small gallery has fewer lists than asked for
        for size, query in queries.items():
            found = {}

            def search(query=query, m=m, found=found):  # keeps the last top-10
                found["rows"] = two_stage_search(model, gallery, query, 10, m)[1]

            seconds = common.timed_runs(search, s.repeats)
            variant = f"FAISS {params['kind']} nprobe={nprobe}, m={m}"
            row = {**_row("two-stage", variant, "torch", size, seconds, "cpu"), **extra, "candidates": m,
                   "nprobe": index.nprobe}
            if size == exact.shape[0]:
                row["recall_at_10"] = recall_at_10(found["rows"], exact)
            rows.append(row)
    return rows


def recall_at_10(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean fraction of each query's exhaustive top-10 that the two-stage top-10 contains."""
    hits = [len(set(f.tolist()) & set(e.tolist())) / e.numel() for f, e in zip(found, exact, strict=True)]
    return round(float(np.mean(hits)), 4)


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
                  r.get("recall_at_10", ""), r.get("build_s", ""), r["gallery_gb"], r.get("index_gb", ""), r["runs"]]
                 for r in result["gallery_size"]]
    return "\n".join([
        "**Stages** (p50/p95 over warm runs; ms/query = p50 / batch)\n",
        _table(["stage", "variant", "backend", "batch", "p50 ms", "p95 ms", "ms/query", "runs"], stage_rows),
        "\n**End to end** (`Retriever.search`: text, anchor, ResNet-50, tower, scoring)\n",
        _table(["backend", "batch", "p50 ms", "p95 ms", "queries/s", "runs"], e2e_rows),
        f"\n**Gallery size** (top-10; batch = 1 query or {s['queries']} queries; recall@10 of the two-stage "
        "top-10 against the exhaustive top-10)\n",
        _table(["videos", "search", "variant", "batch", "p50 ms", "p95 ms", "ms/query", "recall@10",
                "index build s", "gallery GB", "index GB", "runs"], size_rows),
        notes(result),
    ])


def notes(result: dict) -> str:
    s = result["settings"]
    missing = "; ".join(f"{k}: {v}" for k, v in result["backends"].items() if v) or "none"
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in result["part_seconds"].items())
    return (
        f"\nMachine: {common.describe_machine(result['machine'])}. Device {s['device']}, {result['threads']} torch "
        f"thread, 1 FAISS thread. Model: the default architecture at random init ({result['model']}); the stage "
        f"gallery holds {s['gallery']} synthetic videos. Backends not timed: {missing}. Gallery-size rows run on "
        "the CPU over a synthetic clustered gallery (fp16; `synthetic_gallery` in bench/latency.py); exhaustive "
        "search scores a few rows at a time (fp16 cast to fp32); the two-stage search is "
        "`engine.gallery.two_stage_search` over a FAISS IVF index (nlist = sqrt(N), k-means on 40 x nlist "
        "points, fp16 codes). HNSW is not timed: building it over 1M vectors takes tens of minutes on 2 cores "
        f"(engine.md section 4). Wall time {result['wall_seconds']:.0f} s ({parts}), "
        f"{result['cpu_seconds']:.0f} CPU-seconds.\n")


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


def write_outputs(result: dict, out: Path) -> dict:
    paths = {"md": out / "latency.md", "json": out / "latency.json", "stages_png": out / "latency_stages.png",
             "sizes_png": out / "latency_sizes.png"}
    common.write_json_atomic(paths["json"], result)
    common.write_text_atomic(paths["md"], markdown(result))
    plot_stages(result, paths["stages_png"])
    plot_sizes(result, paths["sizes_png"])
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

    from engine.checkpoint import load_checkpoint

    checkpoint = make_checkpoint(os.path.join(work, "checkpoint"), s.tiny)
    gallery = write_stage_gallery(os.path.join(work, "gallery"), checkpoint, s.gallery)
    texts = captions(max(s.batch * (s.batch_repeats + 1), s.repeats + 1))
    clock = [time.perf_counter()]
    lap = lambda: clock.append(time.perf_counter()) or round(clock[-1] - clock[-2], 1)
    stages = time_anchors(texts, s)
    part_seconds = {"anchors": lap()}
    backend_stages, e2e, available = time_backends(checkpoint, gallery, texts, s)
    part_seconds["backends (exports included)"] = lap()
    model = load_checkpoint(checkpoint)
    sizes = []
    for n in tqdm(s.sizes, desc="gallery sizes", unit="size", disable=s.tiny):
        sizes += time_gallery_size(model, n, s)
    part_seconds["gallery sizes"] = lap()
    model_desc = "tiny widths" if s.tiny else "D=1024, K=512, cvr train defaults"
    return {"format": "cvr-sdgm/bench-latency/1", "stages": stages + backend_stages, "end_to_end": e2e,
            "gallery_size": sizes, "backends": available, "model": model_desc, "part_seconds": part_seconds}


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
                     tiny=True)
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
    for part in ("stages", "end_to_end", "gallery_size"):
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
