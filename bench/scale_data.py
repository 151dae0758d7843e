"""What bench/scale.py measures on and with: galleries of random embeddings (written as `cvr index`
writes one), random query batches, and the bytes of a gallery folder and of a process's memory."""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from bench import common

CHUNK = 1 << 16  # rows of random embeddings generated at a time (no float32 copy of a 1M gallery)


def random_embeddings(n: int, dim: int, concepts: int, rng, dtype=np.float16) -> tuple:
    """(lat (n, 2, dim) unit vectors, con (n, 2, concepts) in [0, 1]) in `dtype`, made in chunks."""
    lat, con = np.empty((n, 2, dim), dtype), np.empty((n, 2, concepts), dtype)
    for start in range(0, n, CHUNK):
        rows = min(CHUNK, n - start)
        block = rng.standard_normal((rows, 2, dim), dtype=np.float32)
        lat[start : start + rows] = block / np.linalg.norm(block, axis=2, keepdims=True)
        con[start : start + rows] = rng.random((rows, 2, concepts), dtype=np.float32)
    return lat, con


def dims() -> tuple:
    from engine.checkpoint import read_checkpoint_config
    from engine.cli.demo import SHIPPED_RETRIEVAL

    model = read_checkpoint_config(SHIPPED_RETRIEVAL)["model"]
    return model["latent_dim"], model["concept_dim"]


def write_random_gallery(folder: str, n: int, seed: int, batches: list) -> dict:
    """A gallery of n videos with a FAISS `ivf` index, as `cvr index` writes one: the clustered
    background of bench/gallery_sizes.py with, for each query of `batches`, videos aimed at it at
    growing distances (so that a query's exact top-10 is a real neighbourhood and the FAISS first
    stage, which reads the global latent vector alone, finds it only in part: recall@10 then
    measures something; over independent random vectors it is near zero by construction);
    returns how long generating and writing (index included) took."""
    from bench.gallery_sizes import aimed_gallery
    from engine.checkpoint import checkpoint_id
    from engine.cli.demo import SHIPPED_RETRIEVAL
    from engine.indexing import write_gallery

    clock = time.perf_counter()
    q_lat = np.concatenate([lat for lat, _ in batches])
    q_con = np.concatenate([con for _, con in batches])
    lat, con = aimed_gallery(n, q_lat, q_con, seed=seed, aimed=min(300, max(1, n // (10 * len(q_lat)))))
    generated = time.perf_counter() - clock
    clock = time.perf_counter()
    checkpoint = {"id": checkpoint_id(SHIPPED_RETRIEVAL), "path": SHIPPED_RETRIEVAL, "norm": None}
    manifest = write_gallery(folder, [f"video{i:07d}" for i in range(n)], lat, con, checkpoint, faiss="ivf")
    return {"generate_s": round(generated, 2), "write_s": round(time.perf_counter() - clock, 2),
            "factory": manifest["faiss"]["factory"], "nprobe": manifest["faiss"].get("nprobe")}


def query_batches(count: int, size: int, seed: int) -> list:
    """`count` batches of `size` random queries, float32 as the query tower returns them."""
    dim, concepts = dims()
    rng = np.random.default_rng(seed)
    return [random_embeddings(size, dim, concepts, rng, np.float32) for _ in range(count)]


def folder_bytes(folder: str) -> dict:
    """Bytes on disk of a gallery (or shard set) by kind: embeddings, ids, FAISS index, the rest."""
    kinds = {"embeddings": 0, "ids": 0, "faiss": 0, "other": 0}
    for root, _, names in os.walk(folder):
        for name in names:
            kind = ("embeddings" if name.endswith(".safetensors") else "ids" if name == "ids.txt"
                    else "faiss" if name.endswith(".index") else "other")
            kinds[kind] += os.path.getsize(os.path.join(root, name))
    return kinds


def ids_ram_per_video(ids: list) -> float:
    """Bytes per video of a gallery's ids held as a Python list of str (what a loaded shard keeps)."""
    return (sum(sys.getsizeof(i) for i in ids) + 8 * len(ids)) / max(1, len(ids))


def process_memory(pid: int) -> dict:
    """RssAnon (private: Python, torch, the FAISS index, the ids) and RssFile (the memory-mapped
    embeddings it touched) of a process on this machine, in bytes."""
    found = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile"):
                found[key] = int(line.split()[1]) * 1024
    return {"rss_anon": found.get("RssAnon"), "rss_file": found.get("RssFile")}


def cpu_clock(pids: list) -> float:
    """CPU seconds so far of this process (every thread) and of the processes `pids`."""
    return time.process_time() + sum(common.process_cpu_seconds(pid) for pid in pids)
