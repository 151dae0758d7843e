"""A gallery of random embeddings with everything a gallery of video files holds (not collected):
several parts with dropped rows, records, thumbnails, segments, metadata fields on some videos,
duplicate embeddings (exact ties) that straddle shard boundaries, and a FAISS index. Scored with
the shipped checkpoint's matcher, so sharded and unsharded searches run the real scorer without
loading a text encoder."""
from __future__ import annotations

import os

import numpy as np

from engine.cli.demo import SHIPPED_RETRIEVAL as BUILTIN


def random_gallery(folder: str, media: str, parts=(13, 11, 14), seed: int = 0, faiss: str | None = "flat",
                   dropped=(2, 15, 30), grid: bool = False) -> list:
    """Write the gallery at `folder` (media root `media`, which need not hold the files); returns
    its live ids in row order. `grid`: values on a 1/8 grid with duplicated videos, so every
    product and sum is exact in any order and duplicates score exactly alike in any block (a
    float32 dot product's last bit depends on the block the BLAS kernel is given)."""
    from engine import paths
    from engine.checkpoint import checkpoint_id, read_checkpoint_config
    from engine.indexing import manifest_base
    from engine.parts import GalleryWriter
    from engine.video import Sampling

    rng = np.random.default_rng(seed)
    config = read_checkpoint_config(BUILTIN)
    dim, concepts = config["model"]["latent_dim"], config["model"]["concept_dim"]
    base = manifest_base({"id": checkpoint_id(BUILTIN), "path": BUILTIN, "norm": None}, folder, dim, concepts,
                         "float16")
    base.update(media={"root": paths.reference(media, folder), "paths": {}},
                extractor=config["train"]["job"]["extractor"], sampling=Sampling().to_dict(),
                segments={"window": 4.0, "stride": 2.0}, faiss_spec=faiss, sources=[{"videos": "test"}])
    writer = GalleryWriter.new(folder, base)
    total = sum(parts)
    if grid:
        lat = (rng.integers(0, 5, (total, 2, dim)) / 8).astype(np.float16)
        con = (rng.integers(0, 5, (total, 2, concepts)) / 8).astype(np.float16)
        for copy, original in ((30, 5), (20, 12), (25, 8), (14, 13)):  # exact ties, across shards and parts
            lat[copy], con[copy] = lat[original], con[original]
    else:
        lat = rng.normal(size=(total, 2, dim))
        lat = (lat / np.linalg.norm(lat, axis=2, keepdims=True)).astype(np.float16)  # unit vectors, as the tower's
        con = rng.random(size=(total, 2, concepts)).astype(np.float16)
    start = 0
    for count in parts:
        ids = [f"clip{start + i:03d}" for i in range(count)]
        records, thumbs, seg_lat, seg_row, seg_span = [], [], [], [], []
        for i, video_id in enumerate(ids):
            duration = float(rng.integers(2, 12))
            records.append({"id": video_id, "sha256": f"{start + i:064x}", "size": 1000 + i, "duration": duration,
                            "fps": 8.0, "width": 64, "height": 48, "codec": "h264", "frames": 4,
                            "timestamps": [0.0, 1.0, 2.0, 3.0], "warnings": []})
            thumbs.append(None if i % 5 == 4 else f"jpeg of {video_id}".encode())
            for s in range(int(rng.integers(1, 4))):
                seg_lat.append(rng.normal(size=dim))
                seg_row.append(i)
                seg_span.append((2.0 * s, 2.0 * s + 4.0))
            writer.manifest["media"]["paths"][f"sub/{video_id}.mp4"] = {
                "id": video_id, "size": 1000 + i, "mtime_ns": 1, "sha256": f"{start + i:064x}"}
        segments = (np.asarray(seg_lat, np.float32), np.asarray(seg_row, np.int32), np.asarray(seg_span, np.float32))
        writer.add_part(ids, lat[start : start + count], con[start : start + count], segments, records, thumbs)
        start += count
    writer.drop([f"clip{row:03d}" for row in dropped])
    fields = writer.manifest["fields"]
    for row in range(0, total, 3):
        fields[f"clip{row:03d}"] = {"tag": "red" if row % 2 else "blue", "year": 2000 + row}
    fields.pop(f"clip{dropped[0]:03d}", None)
    writer.rebuild_index(faiss)
    writer.commit()
    from engine.gallery import Gallery

    return list(Gallery.load(folder).ids)


def scorer():
    from engine.backends.pytorch import TorchScorer
    from engine.checkpoint import load_matcher

    return TorchScorer(load_matcher(BUILTIN), "cpu")


def queries(count: int, seed: int = 1, grid: bool = False) -> tuple:
    from engine.checkpoint import read_checkpoint_config

    model = read_checkpoint_config(BUILTIN)["model"]
    rng = np.random.default_rng(seed)
    if grid:
        return tuple((rng.integers(0, 5, (count, 2, model[d])) / 8).astype(np.float32)
                     for d in ("latent_dim", "concept_dim"))
    q_lat = rng.normal(size=(count, 2, model["latent_dim"]))
    q_lat = (q_lat / np.linalg.norm(q_lat, axis=2, keepdims=True)).astype(np.float32)
    q_con = rng.random(size=(count, 2, model["concept_dim"])).astype(np.float32)
    return q_lat, q_con


def media_folder(base: str) -> str:
    folder = os.path.join(base, "media")
    os.makedirs(folder, exist_ok=True)
    return folder
