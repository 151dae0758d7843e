"""Search time and memory against gallery size, timing `Retriever.search` (what users run).

For each size N the parent process writes a synthetic gallery of N videos as `cvr index` would
(engine.indexing.write_gallery: float16, a FAISS `IVF<sqrt N>,SQfp16` index), aimed at the
benchmark's query texts (see `aimed_gallery`); then a fresh child process (`python -m
bench.gallery_sizes ...`) loads the text-only model, notes its memory, loads the gallery, and times
`Retriever.search` warm at batch 1 and 16: exhaustive and two-stage for each (nprobe, M). It reports
the search stage of `last_timings` (FAISS first stage + exact rerank, or the blocked exhaustive
scan), the recall@10 of the two-stage top-10 against the exhaustive one, and the peak memory of
the process over its memory once the models were loaded (Linux VmHWM after resetting it), against
the gallery's bytes on disk.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np

RUN_TIMEOUT_S = 3600


def _views(z: np.ndarray, noise: np.ndarray, k: int) -> tuple:
    """Both branches' latent and concept vectors of identities z (n, D): each branch sees z plus its
    own view of the noise (the noise rolled along the features by a branch's own shift: nearly
    orthogonal to the unrolled noise, far cheaper than fresh noise at 1M rows). Concepts squash
    fixed coordinates of the view (mostly small, as tag probabilities are)."""
    d = z.shape[1]
    lat, con = [], []
    for branch in (0, 1):
        view = z + 0.4 * np.roll(noise, branch + 1, axis=1)
        lat.append(view / np.linalg.norm(view, axis=1, keepdims=True))
        coordinates = view[:, :k] if branch == 0 else view[:, d - k:]
        con.append(1.0 / (1.0 + np.exp(-(2.0 * math.sqrt(d) * coordinates - 2.0))))
    return np.stack(lat, 1), np.stack(con, 1)


def aimed_gallery(n: int, q_lat: np.ndarray, q_con: np.ndarray, seed: int = 0, chunk: int = 2048,
                  aimed: int = 300) -> tuple:
    """(lat (n, 2, D), con (n, 2, K)) float16: a clustered background plus, for each query, `aimed`
    videos around it at growing distances, each of its four parts at its own distance.

    Background: identity z_i = c_cluster(i) + 0.6 u_i with n/100 cluster centres (all of norm ~1),
    two noisy branch views, L2-normalised (`_views`). Aimed video j of query q: branch b's latent
    normalize(q_b + s g) and concepts clip(q_con_b + 0.05 s g', 0, 1), with g Gaussian of norm ~1,
    g' standard normal, and s in [0.3, 2.5] drawn for the global latent, the local latent and
    each concept vector in its own order. So the global latent alone (what the FAISS first stage
    reads) only partly predicts the fused score: with more aimed videos than candidates M, a
    query's exact top-10 need not all be among the M nearest global latents, and recall@10 measures
    how often they are. It depends on this structure (ARCHITECTURE.md section 14): a stand-in, not
    real data. Generated in chunks (no float32 copy of a 1M gallery)."""
    rng = np.random.default_rng(seed)
    d, k = q_lat.shape[2], q_con.shape[2]
    centres = rng.standard_normal((max(1, n // 100), d), dtype=np.float32) / math.sqrt(d)
    lat, con = np.empty((n, 2, d), np.float16), np.empty((n, 2, k), np.float16)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        noise = rng.standard_normal((rows, d), dtype=np.float32) / math.sqrt(d)
        z = centres[rng.integers(len(centres), size=rows)] + 0.6 * noise
        lat[start : start + rows], con[start : start + rows] = _views(z, noise, k)
    aimed = min(aimed, n // len(q_lat)) if len(q_lat) else 0
    spread = np.linspace(0.3, 2.5, aimed, dtype=np.float32)
    slots = rng.permutation(n)[: aimed * len(q_lat)].reshape(len(q_lat), aimed)
    for query, rows in enumerate(slots):
        for branch in (0, 1):
            s = spread[rng.permutation(aimed)][:, None] if branch else spread[:, None]
            g = rng.standard_normal((aimed, d), dtype=np.float32) / math.sqrt(d)
            view = q_lat[query, branch] + s * g
            lat[rows, branch] = view / np.linalg.norm(view, axis=1, keepdims=True)
            s = spread[rng.permutation(aimed)][:, None]
            c = rng.standard_normal((aimed, k), dtype=np.float32)
            con[rows, branch] = np.clip(q_con[query, branch] + 0.05 * s * c, 0, 1)
    return lat, con


def write_size_gallery(folder: str, checkpoint: str, texts: list, n: int) -> dict:
    """Write the aimed gallery of n videos for the query texts; returns how long it took."""
    from engine.backends.pytorch import TorchPipeline
    from engine.indexing import write_gallery

    pipeline = TorchPipeline(checkpoint)
    q_lat, q_con = pipeline.encode_queries(pipeline.encode_text(texts))
    clock = time.perf_counter()
    lat, con = aimed_gallery(n, q_lat, q_con, seed=n)
    generated = time.perf_counter() - clock
    factory = f"IVF{max(1, round(math.sqrt(n)))},SQfp16"
    clock = time.perf_counter()
    manifest = write_gallery(folder, [f"video{i}" for i in range(n)], lat, con, {"id": pipeline.checkpoint_id},
                             faiss=factory)
    return {"generate_s": round(generated, 1), "write_s": round(time.perf_counter() - clock, 1),
            "faiss": manifest["faiss"]}


# ---------------------------------------------------------------------------------------------
# The child process: load, measure memory, time Retriever.search


def _memory_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current resident size."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")


def _timed(retriever, texts: list, options, runs: int, warm: int) -> tuple:
    """(search-stage seconds of each timed run, the last results), after `warm` untimed runs."""
    seconds, results = [], None
    for i in range(warm + runs):
        results = retriever.search(texts, k=10, options=options)
        if i >= warm:
            seconds.append(retriever.last_timings.search)
    return seconds, results


def _runs(n: int, repeats: int) -> tuple:
    """(timed runs, warm-up runs) of an exhaustive search: one pass over 1M videos takes seconds."""
    return (repeats, 1) if n <= 10_000 else (3, 1) if n <= 100_000 else (1, 0)


def measure(checkpoint: str, gallery_dir: str, texts: list, two_stage: list, repeats: int) -> dict:
    """Everything one gallery size reports, measured in this (fresh) process."""
    from engine.backends.pytorch import TorchPipeline
    from engine.gallery import Gallery
    from engine.retriever import Retriever
    from engine.search import SearchOptions

    pipeline = TorchPipeline(checkpoint)
    pipeline.encode_queries(pipeline.encode_text(texts))  # first-use allocations belong to the models
    after_models_kb = _memory_kb("VmRSS")
    _reset_peak()
    clock = time.perf_counter()
    gallery = Gallery.load(gallery_dir, checkpoint_id=pipeline.checkpoint_id)
    load_s = time.perf_counter() - clock
    retriever = Retriever.from_parts(pipeline, gallery, "torch")
    n, rows, exact = len(gallery), [], {}
    batches = (1, len(texts))  # single queries, and all the texts as one batch
    for batch in batches:
        runs, warm = _runs(n, repeats)
        seconds, results = _timed(retriever, texts[:batch], SearchOptions(mode="exhaustive"), runs, warm)
        exact[batch] = [[v for v, _ in r.hits] for r in results]
        rows.append({"stage": "exhaustive", "variant": "blocked fused score, fp16 rows", "batch": batch,
                     "seconds": seconds})
    for nprobe, m in two_stage:
        for batch in batches:
            options = SearchOptions(mode="two-stage", nprobe=nprobe, candidates=m)
            seconds, results = _timed(retriever, texts[:batch], options, repeats, 1)
            found = [[v for v, _ in r.hits] for r in results]
            recall = np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact[batch], strict=True)])
            rows.append({"stage": "two-stage", "variant": f"FAISS {gallery.manifest['faiss']['factory']} "
                         f"nprobe={nprobe}, M={m}", "batch": batch, "seconds": seconds, "nprobe": nprobe,
                         "candidates": m, "recall_at_10": round(float(recall), 4)})
    peak_kb = _memory_kb("VmHWM")
    index_bytes = os.path.getsize(os.path.join(gallery_dir, "faiss.index"))
    return {"gallery": n, "rows": rows, "load_s": round(load_s, 1), "gallery_bytes": gallery.nbytes,
            "index_bytes": index_bytes, "after_models_mb": round(after_models_kb / 1024, 1),
            "peak_over_models_mb": round((peak_kb - after_models_kb) / 1024, 1)}


def run_size(checkpoint: str, folder: str, texts: list, two_stage: list, repeats: int) -> dict:
    """`measure` in a child process of one torch thread and one FAISS thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    argv = [sys.executable, "-m", "bench.gallery_sizes", json.dumps({
        "checkpoint": checkpoint, "gallery": folder, "texts": texts, "two_stage": two_stage, "repeats": repeats})]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        raise RuntimeError(f"gallery-size worker failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    job = json.loads((argv or sys.argv[1:])[0])
    result = measure(job["checkpoint"], job["gallery"], job["texts"], [tuple(p) for p in job["two_stage"]],
                     job["repeats"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
