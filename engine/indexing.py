"""Writing galleries: the video tower over a collection's videos (`build_gallery`, what `cvr index`
runs), and any ids + embeddings written as a gallery folder (`write_gallery`).

A gallery is written into a staging folder beside its target and swapped into place
(engine/files.py), so a crash never leaves a half-written gallery where a good one was. `--out`
may replace only a gallery (even a damaged one) or an empty folder. The format is engine/gallery.py.
"""
from __future__ import annotations

import os
import time

import numpy as np

from engine import files, locks, paths
from engine.gallery import Gallery
from engine.gallery_faiss import build_faiss_index, faiss_factory, faiss_record
from engine.gallery_format import (
    DTYPES,
    EMBEDDINGS,
    FAISS_FILE,
    FORMAT,
    IDS,
    MANIFEST,
    ROOT_PART,
    VERSION,
    GalleryError,
    check_finite,
    embedding_dims,
)
from engine.integrity import seal
from engine.outputs import claim

KEEP = "keep"  # `faiss=KEEP` when appending: the gallery's own index kind, rebuilt for the new size


def write_gallery(out: str, ids: list, lat, con, checkpoint: dict, dtype: str = "float16", faiss: str | None = None,
                  sources: list | None = None, overwrite: bool = False) -> dict:
    """Write a complete gallery folder atomically; returns its manifest.

    `lat` (N, S, D) and `con` (N, T, K) are numpy arrays (or anything numpy converts), cast to
    `dtype`; `checkpoint` is {"id": sha256, "path": folder, "norm": {...}}; `faiss` a shorthand
    (flat, ivf, hnsw) or a faiss index_factory string, built from the cast global latent vectors so
    that the first stage sees exactly what reranking sees. `out` may hold a gallery (or be empty);
    anything else only with `overwrite`."""
    if dtype not in DTYPES:
        raise GalleryError(f"dtype must be float16 or float32, got {dtype!r}")
    lat, con = (np.ascontiguousarray(np.asarray(x), dtype=DTYPES[dtype]) for x in (lat, con))
    _check_arrays(ids, lat, con)
    out = os.path.abspath(out)
    claim(out, "gallery", "cvr index", overwrite)
    with files.staged_folder(out) as work:
        written = {IDS: _write_ids(work, ids), EMBEDDINGS: _write_embeddings(work, lat, con)}
        faiss_info = None
        if faiss is not None:
            factory = faiss_factory(faiss, len(ids))
            index, train_points = build_faiss_index(lat[:, 0], factory)
            written[FAISS_FILE] = _write_faiss(work, index)
            faiss_info = faiss_record(index, faiss, factory, train_points)
        manifest = seal({
            **manifest_base(checkpoint, out, lat.shape[2], con.shape[2], dtype, lat.shape[1], con.shape[1]),
            "count": len(ids), "files": written, "parts": [{"name": ROOT_PART, "count": len(ids), "drop": []}],
            "faiss": faiss_info and dict(faiss_info, file=FAISS_FILE),
            "sources": sources or [],
        })  # sealed: an edited field is caught like a damaged file
        files.write_synced(os.path.join(work, MANIFEST), files.to_json(manifest))  # last: it makes a gallery
    return manifest


def manifest_base(checkpoint: dict, out: str, latent: int, concept: int, dtype: str, lat_slots: int = 2,
                  con_slots: int = 2) -> dict:
    """The fields every gallery manifest starts with (slot counts recorded where not 2 and 2:
    engine.gallery_format.embedding_dims)."""
    dims = embedding_dims(np.empty((0, lat_slots, latent)), np.empty((0, con_slots, concept)))
    return {
        "format": FORMAT, "version": VERSION,
        "checkpoint": {"id": checkpoint["id"],
                       "path": checkpoint.get("path") and paths.reference(checkpoint["path"], out)},
        "dims": dims, "dtype": dtype,
        "norm": checkpoint.get("norm"),  # for information: scoring uses the model's constants
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _check_arrays(ids: list, lat: np.ndarray, con: np.ndarray) -> None:
    if not ids:
        raise GalleryError("no videos to write")
    if lat.ndim != 3 or con.ndim != 3 or lat.shape[0] != len(ids) or con.shape[0] != len(ids) \
            or 0 in lat.shape[1:] or 0 in con.shape[1:]:
        raise GalleryError(f"embeddings of shape {tuple(lat.shape)} and {tuple(con.shape)} do not match "
                           f"{len(ids)} videos x slots x width")
    for video_id in ids:
        if not isinstance(video_id, str) or not video_id or video_id != video_id.strip() or "\n" in video_id:
            raise GalleryError(f"video id {video_id!r} cannot be written one per line")
    check_finite(lat, "latent embeddings (out of float16 range?)")
    check_finite(con, "concept embeddings")


def _write_ids(work, ids: list) -> str:
    path = os.path.join(work, IDS)
    files.write_synced(path, "".join(f"{v}\n" for v in ids))
    return files.sha256_file(path)


def _write_embeddings(work, lat: np.ndarray, con: np.ndarray) -> str:
    from safetensors.numpy import save_file

    path = os.path.join(work, EMBEDDINGS)
    with files.safetensors_errors(path):
        save_file({"lat": lat, "con": con}, path, metadata={"format": FORMAT, "version": str(VERSION)})
    files.fsync_file(path)
    return files.sha256_file(path)


def _write_faiss(work, index) -> str:
    import faiss

    path = os.path.join(work, FAISS_FILE)
    faiss.write_index(index, path)
    files.fsync_file(path)
    return files.sha256_file(path)


# ---------------------------------------------------------------------------------------------
# Building from a collection


def build_gallery(checkpoint: str, root: str, collection: str, split: str | None = None, out: str = "gallery",
                  feature: str | None = None, dtype: str | None = None, batch_size: int = 256,
                  append: bool = False, progress: bool = True, faiss: str | None = None, model=None,
                  overwrite: bool = False) -> dict:
    """Run the checkpoint's video tower over a collection's videos and write the gallery `out`.

    Videos: the split's (`split` given) or every video of the feature folder. `feature` defaults to
    the one the checkpoint was trained on. `dtype`: float16 (default for a new gallery) or float32;
    with `append`, the existing gallery's. `faiss`: a shorthand or factory string, 'none' for no
    index; None (or KEEP) keeps an appended gallery's index. `model`: the loaded checkpoint, to save
    loading it again. One writer at a time (engine.locks.lock over the read of an appended gallery
    and the write). Returns the manifest written."""
    with locks.lock(os.path.abspath(out)):
        return _build_gallery(checkpoint, root, collection, split, out, feature, dtype, batch_size, append, progress,
                              faiss, model, overwrite)


def _build_gallery(checkpoint, root, collection, split, out, feature, dtype, batch_size, append, progress, faiss,
                   model, overwrite) -> dict:
    from engine.checkpoint import checkpoint_id, load_checkpoint, read_checkpoint_config

    config = read_checkpoint_config(checkpoint)  # CheckpointError for a missing or foreign folder
    if model is None:
        model = load_checkpoint(checkpoint)
    elif getattr(model, "checkpoint_id", None) != checkpoint_id(checkpoint):
        raise GalleryError(f"the model passed in is not the checkpoint at {checkpoint}")
    job = config.get("train", {}).get("job", {})
    feature = feature or job.get("feature")
    if not feature:
        raise GalleryError(f"{checkpoint}: the checkpoint records no training feature: pass --feature")
    existing = Gallery.load(out, checkpoint_id=model.checkpoint_id) if append else None
    claim(os.path.abspath(out), "gallery", "cvr index", overwrite)  # before the costly part
    dtype, faiss = _resolve_options(existing, dtype, faiss, out)

    bigfile, video_ids = _videos(root, collection, split, feature)
    _check_extractor(str(bigfile.folder), job.get("extractor"), checkpoint)
    if bigfile.dim != model.config.frame_dim:
        raise GalleryError(f"{bigfile.folder}: frame features are {bigfile.dim}-d but checkpoint {checkpoint} "
                           f"expects {model.config.frame_dim}-d")
    if existing is not None:
        present = set(existing.ids)
        duplicate = next((v for v in video_ids if v in present), None)
        if duplicate is not None:
            raise GalleryError(f"{out}: video {duplicate} is already in the gallery")
    lat, con = encode_videos(model, bigfile, video_ids, job.get("max_frames", 64), batch_size, progress,
                             dtype=DTYPES[dtype])
    sources = [{"root": paths.reference(root, os.path.abspath(out)), "collection": collection, "split": split,
                "feature": feature, "count": len(video_ids)}]
    if existing is not None:
        lat, con = np.concatenate([existing.lat, lat]), np.concatenate([existing.con, con])
        video_ids = existing.ids + video_ids
        sources = existing.manifest.get("sources", []) + sources
    info = {"id": model.checkpoint_id, "path": checkpoint, "norm": config.get("norm")}
    return write_gallery(out, video_ids, lat, con, info, dtype=dtype, faiss=faiss, sources=sources,
                         overwrite=overwrite)


def _check_extractor(feature_dir: str, trained_with: dict | None, checkpoint: str) -> None:
    """Frame features made by another ResNet-50 (or input size) than the checkpoint's training
    features would be embedded in another space: refused, where both say which made them."""
    from engine.vision import describe_extractor, read_extractor, same_extractor

    found = read_extractor(feature_dir)
    if found and trained_with and not same_extractor(found, trained_with):
        raise GalleryError(f"{feature_dir}: frame features made by {describe_extractor(found)}, but checkpoint "
                           f"{checkpoint} was trained on {describe_extractor(trained_with)}'s")


def _resolve_options(existing: Gallery | None, dtype: str | None, faiss, out: str) -> tuple:
    """dtype and FAISS index: explicit values win ('none' drops an index); an appended gallery
    keeps its own (its factory string, or the shorthand resolved again for the new size)."""
    faiss = None if faiss in (None, KEEP) and existing is None else faiss
    if existing is None:
        return dtype or "float16", None if faiss == "none" else faiss
    stored = existing.manifest["dtype"]
    if dtype is not None and dtype != stored:
        raise GalleryError(f"{out}: gallery is {stored}, cannot append as {dtype}")
    if faiss in (None, KEEP):
        record = existing.manifest.get("faiss")
        faiss = record and record.get("shorthand", record["factory"])
    return stored, None if faiss == "none" else faiss


def _videos(root: str, collection: str, split: str | None, feature: str) -> tuple:
    """(BigFile, video ids): the split's videos, or all videos of the feature folder."""
    from engine.datasets import Collection

    coll = Collection(root, collection)
    bigfile = coll.features(feature)
    video_ids = coll.split_video_ids(split) if split else bigfile.video_ids()
    if not video_ids:
        where = f"the {split} split of {coll.path}" if split else str(bigfile.folder)
        raise GalleryError(f"{where}: no videos to index")
    return bigfile, video_ids


def encode_videos(model, bigfile, video_ids: list, max_frames: int, batch_size: int = 256,
                  progress: bool = False, dtype=np.float32) -> tuple:
    """The video tower over every video, in batches: numpy (lat (N, S, D), con (N, T, K)) cast to
    `dtype` batch by batch (a large gallery is never held in float32 when stored in float16).
    NaN/inf frames raise engine.datasets.video_frames' ValueError, which names the video."""
    import torch
    from tqdm import tqdm

    from engine.datasets import video_frames

    if batch_size < 1:
        raise GalleryError(f"batch size must be positive, got {batch_size}")
    model.eval()
    lats, cons = [], []
    starts = range(0, len(video_ids), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="index", unit="batch", disable=not progress, leave=False):
            frames, mask = video_frames(bigfile, video_ids[start : start + batch_size], max_frames)
            emb = model.encode_video(torch.from_numpy(frames), torch.from_numpy(mask))
            lats.append(emb.lat.float().cpu().numpy().astype(dtype))
            cons.append(emb.con.float().cpu().numpy().astype(dtype))
    return np.concatenate(lats), np.concatenate(cons)
