"""A persisted gallery: video ids + the video tower's embeddings, versioned, checksummed, atomic.

A gallery is a folder (ARCHITECTURE.md, "Data flow and contracts"):

- `ids.txt`: one video id per line, in row order;
- `embeddings.safetensors`: `lat` (N, 2, D) and `con` (N, 2, K), float16 by default (float32 on
  request); index 0 of dim 1 is the global branch, 1 the local one;
- `faiss.index` (optional): a FAISS first stage over the global latent vectors `lat[:, 0]`;
- `manifest.json`: format and version, the checkpoint's id (sha256 of its weights + config) and
  path, dims, dtype, count, the sha256 of every other file, the checkpoint's min-max constants (for
  information only: scoring always uses the model's), the FAISS parameters, creation time, sources.

It is written into a temporary sibling folder and renamed into place, so a crash never leaves a
half-written gallery where a good one was. Loading validates everything and refuses with one line
(`GalleryError`), including a gallery built with another checkpoint than the one scoring it.

Large galleries search in two stages (`two_stage_search`): FAISS proposes m candidates per query
from the global latent vector alone, then the full fused score reranks exactly those candidates.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.datasets import fsync_dir, sha256_file
from engine.model import Embeddings, topk_stable

FORMAT = "cvr-sdgm/gallery"
VERSION = 1
IDS = "ids.txt"
EMBEDDINGS = "embeddings.safetensors"
FAISS_FILE = "faiss.index"
MANIFEST = "manifest.json"
DATA_FILES = (IDS, EMBEDDINGS, FAISS_FILE)  # every file a manifest may list (never a path)
DTYPES = {"float16": torch.float16, "float32": torch.float32}
FAISS_KINDS = ("flat", "ivf", "hnsw")
# Above this many videos, search defaults to the two-stage path when the gallery has an index
# (engine.md section 4: exact scans cost about 3-4 s per 1k queries at 100k on this box).
TWO_STAGE_THRESHOLD = 100_000
# Two-stage reranking scores a group of queries against the union of their candidates in one
# call; this bounds group size x candidates so the score matrix stays small.
RERANK_BUDGET = 1 << 18


class GalleryError(ValueError):
    """A gallery (or the input to build one) that cannot be used; the message is one line."""


# ---------------------------------------------------------------------------------------------
# FAISS first stage


@dataclass
class FaissSpec:
    """Which FAISS index to build over the global latent vectors, and its parameters.

    None means "the default for this gallery size": nlist = 4 sqrt(N) capped by N, nprobe 32
    capped by nlist (engine.md section 4: IVF-Flat with nlist about 4 sqrt(N), nprobe 16-64);
    HNSW M 32, efConstruction 40, efSearch 64."""

    kind: str = "flat"  # flat | ivf | hnsw
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int | None = None
    ef_construction: int | None = None
    ef_search: int | None = None

    def resolved(self, n: int) -> dict:
        """The parameters actually used for n vectors, as recorded in the manifest."""
        if self.kind not in FAISS_KINDS:
            raise GalleryError(f"FAISS index must be one of {', '.join(FAISS_KINDS)}, got {self.kind!r}")
        for name in ("nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise GalleryError(f"FAISS {name} must be positive, got {value}")
        params = {"kind": self.kind, "metric": "inner_product", "vectors": "lat[:, 0]"}
        if self.kind == "ivf":
            # k-means cannot make more lists than there are points.
            nlist = min(n, self.nlist or max(1, round(4 * math.sqrt(n))))
            params.update(nlist=nlist, nprobe=min(nlist, self.nprobe or 32))
        elif self.kind == "hnsw":
            params.update(M=self.hnsw_m or 32, efConstruction=self.ef_construction or 40,
                          efSearch=self.ef_search or 64)
        return params


def build_faiss_index(vectors: np.ndarray, params: dict):
    """A FAISS inner-product index over (N, D) float32 vectors, built as `params` says."""
    import faiss

    n, dim = vectors.shape
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if params["kind"] == "flat":
        index = faiss.IndexFlatIP(dim)
    elif params["kind"] == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)  # k-means on the gallery itself
    else:
        index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["efConstruction"]
    index.add(vectors)
    _apply_search_params(index, params)
    return index


def _apply_search_params(index, params: dict) -> None:
    """Search-time parameters are not all kept by faiss.write_index: set them from the manifest."""
    if params["kind"] == "ivf":
        index.nprobe = params["nprobe"]
    elif params["kind"] == "hnsw":
        index.hnsw.efSearch = params["efSearch"]


# ---------------------------------------------------------------------------------------------
# The loaded gallery


class Gallery:
    """A validated gallery: `ids`, `lat` (N, 2, D), `con` (N, 2, K) in the stored dtype,
    `manifest`, `faiss_index` (None without one), `folder`."""

    def __init__(self, folder: str, ids: list, lat: torch.Tensor, con: torch.Tensor, manifest: dict,
                 faiss_index=None):
        self.folder, self.ids, self.lat, self.con = folder, ids, lat, con
        self.manifest, self.faiss_index = manifest, faiss_index

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Gallery({self.folder!r}, n={len(self)}, dtype={self.manifest['dtype']})"

    @property
    def checkpoint_id(self) -> str:
        return self.manifest["checkpoint"]["id"]

    @classmethod
    def load(cls, folder: str, checkpoint_id: str | None = None, verify: bool = True) -> Gallery:
        """Load and validate a gallery folder; with `checkpoint_id`, refuse one built by another
        checkpoint. `verify=False` skips the sha256 pass (the structural checks still run)."""
        manifest = _read_manifest(folder)
        if checkpoint_id is not None and manifest["checkpoint"]["id"] != checkpoint_id:
            raise GalleryError(
                f"{folder}: gallery was built with checkpoint {manifest['checkpoint']['id'][:12]}, not "
                f"{checkpoint_id[:12]}: rebuild it with `cvr index`")
        for name in manifest["files"]:
            if not os.path.isfile(os.path.join(folder, name)):
                raise GalleryError(f"{folder}: missing file {name}")
        ids = _read_ids(folder, manifest["count"])
        lat, con = _read_embeddings(folder, manifest)
        if verify:  # after the structural checks, whose messages are more specific
            for name, expected in manifest["files"].items():
                if sha256_file(os.path.join(folder, name)) != expected:
                    raise GalleryError(f"{os.path.join(folder, name)}: checksum mismatch (file damaged or edited)")
        index = _read_faiss(folder, manifest) if manifest.get("faiss") else None
        return cls(folder, ids, lat, con, manifest, index)

    def embeddings(self, dtype: torch.dtype = torch.float32) -> Embeddings:
        """The stored embeddings as `Embeddings`, cast to `dtype` (scoring runs in float32)."""
        return Embeddings(lat=self.lat.to(dtype), con=self.con.to(dtype))

    def subset(self, rows, dtype: torch.dtype = torch.float32) -> Embeddings:
        """Embeddings of some rows (index tensor or array), cast to `dtype`."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return Embeddings(lat=self.lat[rows].to(dtype), con=self.con[rows].to(dtype))

    def default_search_mode(self, threshold: int = TWO_STAGE_THRESHOLD) -> str:
        """'two_stage' for a gallery above `threshold` videos that has a FAISS index, else
        'exhaustive' (exact scoring of every video is cheap below that size)."""
        return "two_stage" if self.faiss_index is not None and len(self) > threshold else "exhaustive"

    def candidates(self, query_lat_global: np.ndarray, m: int) -> np.ndarray:
        """FAISS first stage: (Q, m') int64 gallery rows by global latent inner product, m' =
        min(m, N). A flat index always fills every slot; IVF/HNSW leave -1 where the probed part
        of the index held fewer than m' vectors."""
        if self.faiss_index is None:
            raise GalleryError(f"{self.folder}: gallery has no FAISS index (build it with --faiss flat|ivf|hnsw)")
        queries = np.ascontiguousarray(np.asarray(query_lat_global, dtype=np.float32))
        dim = self.manifest["dims"]["latent"]
        if queries.ndim != 2 or queries.shape[1] != dim:
            raise GalleryError(f"query latent vectors have shape {queries.shape}, expected (Q, {dim})")
        if m < 1:
            raise GalleryError(f"number of candidates must be positive, got {m}")
        _, rows = self.faiss_index.search(queries, min(m, len(self)))
        return rows.astype(np.int64, copy=False)


def _read_manifest(folder: str) -> dict:
    from engine.config import read_format_json

    manifest = read_format_json(folder, MANIFEST, FORMAT, GalleryError, "gallery")
    path = os.path.join(folder, MANIFEST)
    if manifest.get("version") != VERSION:
        raise GalleryError(f"{path}: gallery format version {manifest.get('version')!r}, this engine reads {VERSION}")
    _check_manifest_fields(manifest, path)
    return manifest


def _check_manifest_fields(manifest: dict, path: str) -> None:
    """Types and ranges of the fields that loading relies on, so a hand-edited manifest fails here
    with its field named rather than later with a KeyError."""
    def bad(field: str):
        return GalleryError(f"{path}: missing or invalid field {field!r}")

    checkpoint = manifest.get("checkpoint")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("id"), str):
        raise bad("checkpoint.id")
    dims = manifest.get("dims")
    for name in ("latent", "concept"):
        if not isinstance(dims, dict) or not isinstance(dims.get(name), int) or dims[name] < 1:
            raise bad(f"dims.{name}")
    if manifest.get("dtype") not in DTYPES:
        raise bad("dtype")
    if not isinstance(manifest.get("count"), int) or manifest["count"] < 1:
        raise bad("count")
    files = manifest.get("files")
    if not isinstance(files, dict) or not {IDS, EMBEDDINGS} <= set(files) or not set(files) <= set(DATA_FILES):
        raise bad("files")
    if (FAISS_FILE in files) != bool(manifest.get("faiss")):
        raise bad("faiss")


def _read_ids(folder: str, count: int) -> list:
    path = os.path.join(folder, IDS)
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            text = handle.read()
    except UnicodeDecodeError:
        raise GalleryError(f"{path}: not UTF-8 text") from None
    ids = text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
    if len(ids) != count:
        raise GalleryError(f"{path}: {len(ids)} ids but the manifest says {count} videos")
    for line, video_id in enumerate(ids, 1):
        if not video_id or video_id != video_id.strip():
            raise GalleryError(f"{path}:{line}: empty id or stray whitespace")
    if len(set(ids)) != len(ids):
        seen = set()
        duplicate = next(v for v in ids if v in seen or seen.add(v))
        raise GalleryError(f"{path}: video {duplicate} appears twice")
    return ids


def _read_embeddings(folder: str, manifest: dict) -> tuple:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(folder, EMBEDDINGS)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise GalleryError(f"{path}: truncated or unreadable ({str(error).splitlines()[0]})") from None
    n, dims, dtype = manifest["count"], manifest["dims"], DTYPES[manifest["dtype"]]
    expected = {"lat": (n, 2, dims["latent"]), "con": (n, 2, dims["concept"])}
    if set(tensors) != set(expected):
        raise GalleryError(f"{path}: holds tensors {sorted(tensors)}, expected ['con', 'lat']")
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise GalleryError(f"{path}: {name} has shape {tuple(tensor.shape)}, the manifest says {shape}")
        if tensor.dtype != dtype:
            raise GalleryError(f"{path}: {name} is {tensor.dtype}, the manifest says {manifest['dtype']}")
        if not torch.isfinite(tensor).all():
            raise GalleryError(f"{path}: {name} holds NaN or infinite values")
    return tensors["lat"], tensors["con"]


def _read_faiss(folder: str, manifest: dict):
    import faiss

    path = os.path.join(folder, FAISS_FILE)
    try:
        index = faiss.read_index(path)
    except RuntimeError as error:
        raise GalleryError(f"{path}: unreadable FAISS index ({str(error).strip().splitlines()[-1]})") from None
    if index.ntotal != manifest["count"] or index.d != manifest["dims"]["latent"]:
        raise GalleryError(f"{path}: index holds {index.ntotal} vectors of width {index.d}, the manifest says "
                           f"{manifest['count']} of width {manifest['dims']['latent']}")
    _apply_search_params(index, manifest["faiss"])
    return index


# ---------------------------------------------------------------------------------------------
# Search


@torch.no_grad()
def two_stage_search(model, gallery: Gallery, query: Embeddings, k: int, m: int) -> tuple:
    """FAISS proposes m candidates per query, the full fused score reranks them.

    Returns (values (Q, k) float32, indices (Q, k) int64 into the gallery), best first. Candidates
    are scored with `model.score` (frozen normalisation) exactly as the exhaustive scorer scores
    them: a group of queries is scored against the union of its candidates kept in gallery order,
    so with m = N the computation is the exhaustive one and ties go to the lower gallery row.
    Where the first stage found fewer than k candidates the tail is (-inf, -1)."""
    if k < 1:
        raise GalleryError(f"k must be positive, got {k}")
    m = min(max(m, k), len(gallery))
    rows = gallery.candidates(query.lat[:, 0].float().cpu().numpy(), m)
    group = max(1, RERANK_BUDGET // m)
    values, indices = [], []
    for start in range(0, rows.shape[0], group):
        sub_query = Embeddings(lat=query.lat[start : start + group], con=query.con[start : start + group])
        v, i = _rerank(model, gallery, sub_query, rows[start : start + group], min(k, m))
        values.append(v)
        indices.append(i)
    return torch.cat(values), torch.cat(indices)


def _rerank(model, gallery: Gallery, query: Embeddings, rows: np.ndarray, k: int) -> tuple:
    """Fused scores of each query's candidate rows, top k of them (ties: lower gallery row)."""
    missing = rows < 0
    # Candidates in gallery order (the -1 padding sorted to the end), so that topk_stable's
    # tie-break by column is the exhaustive scorer's tie-break by gallery row.
    rows = np.sort(np.where(missing, np.iinfo(np.int64).max, rows), axis=1)
    missing = rows == np.iinfo(np.int64).max
    union = np.unique(rows[~missing])
    if union.size == 0:  # the first stage found nothing for any of these queries
        return torch.full((rows.shape[0], k), float("-inf")), torch.full((rows.shape[0], k), -1, dtype=torch.long)
    scores = model.score(query, gallery.subset(union))  # (q, |union|)
    columns = torch.from_numpy(np.searchsorted(union, np.where(missing, union[0], rows)))
    picked = scores.gather(1, columns).float()
    picked[torch.from_numpy(missing)] = float("-inf")
    values, order = topk_stable(picked, k)
    indices = torch.from_numpy(rows).gather(1, order)
    indices[torch.isinf(values) & (values < 0)] = -1
    return values, indices


@torch.no_grad()
def search(model, gallery: Gallery, query: Embeddings, k: int, mode: str | None = None, m: int | None = None):
    """Top-k over a gallery: exhaustive (model.score over every video) or two-stage; `mode` None
    picks `gallery.default_search_mode()`; m defaults to max(10 k, 100) candidates."""
    mode = mode or gallery.default_search_mode()
    if mode == "exhaustive":
        return model.score(query, gallery.embeddings(), k=min(k, len(gallery)))
    if mode == "two_stage":
        return two_stage_search(model, gallery, query, k, m or max(10 * k, 100))
    raise GalleryError(f"search mode must be exhaustive or two_stage, got {mode!r}")


# ---------------------------------------------------------------------------------------------
# Writing


def write_gallery(out: str, ids: list, lat: torch.Tensor, con: torch.Tensor, checkpoint: dict,
                  dtype: str = "float16", faiss: FaissSpec | None = None, sources: list | None = None) -> dict:
    """Write a complete gallery folder atomically; returns its manifest.

    `checkpoint` is {"id": sha256, "path": folder, "norm": {...}}. The arrays are cast to `dtype`;
    the FAISS index (if any) is built from the cast global latent vectors, so that the first stage
    sees exactly what reranking sees."""
    if dtype not in DTYPES:
        raise GalleryError(f"dtype must be float16 or float32, got {dtype!r}")
    lat, con = lat.detach().cpu().to(DTYPES[dtype]).contiguous(), con.detach().cpu().to(DTYPES[dtype]).contiguous()
    _check_arrays(ids, lat, con)
    out = os.path.abspath(out)
    _check_replaceable(out)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    clean_stale(out)
    work = tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent)
    try:
        files = {IDS: _write_ids(work, ids), EMBEDDINGS: _write_embeddings(work, lat, con)}
        faiss_params = None
        if faiss is not None:
            faiss_params = faiss.resolved(len(ids))
            files[FAISS_FILE] = _write_faiss(work, lat[:, 0].float().numpy(), faiss_params)
        manifest = {
            "format": FORMAT, "version": VERSION,
            "checkpoint": {"id": checkpoint["id"], "path": checkpoint.get("path")},
            "dims": {"latent": int(lat.shape[2]), "concept": int(con.shape[2])},
            "dtype": dtype, "count": len(ids), "files": files,
            "norm": checkpoint.get("norm"),  # for information: scoring uses the model's constants
            "faiss": faiss_params,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sources": sources or [],
        }
        _write_manifest(work, manifest)  # last: a folder without it is never taken for a gallery
        fsync_dir(work)
        _swap_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _check_arrays(ids: list, lat: torch.Tensor, con: torch.Tensor) -> None:
    if not ids:
        raise GalleryError("no videos to write")
    if lat.ndim != 3 or con.ndim != 3 or lat.shape[:2] != (len(ids), 2) or con.shape[:2] != (len(ids), 2):
        raise GalleryError(f"embeddings of shape {tuple(lat.shape)} and {tuple(con.shape)} do not match "
                           f"{len(ids)} videos x 2 branches")
    for video_id in ids:
        if not isinstance(video_id, str) or not video_id or video_id != video_id.strip() or "\n" in video_id:
            raise GalleryError(f"video id {video_id!r} cannot be written one per line")
    if not (torch.isfinite(lat).all() and torch.isfinite(con).all()):
        raise GalleryError("embeddings hold NaN or infinite values (out of float16 range?)")


def _check_replaceable(out: str) -> None:
    """Only a gallery (even a damaged one) or an empty folder may be replaced: `--out` pointing at
    some other folder by mistake must not delete it."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise GalleryError(f"{out}: exists and is not a folder: refusing to replace it with a gallery")
    if os.listdir(out) and not _looks_like_gallery(out):
        raise GalleryError(f"{out}: exists and is not a gallery: refusing to replace it")


def _looks_like_gallery(folder: str) -> bool:
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _write_ids(work: str, ids: list) -> str:
    path = os.path.join(work, IDS)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write("".join(f"{v}\n" for v in ids))
        handle.flush()
        os.fsync(handle.fileno())
    return sha256_file(path)


def _write_embeddings(work: str, lat: torch.Tensor, con: torch.Tensor) -> str:
    from safetensors.torch import save_file

    path = os.path.join(work, EMBEDDINGS)
    save_file({"lat": lat, "con": con}, path, metadata={"format": FORMAT, "version": str(VERSION)})
    _fsync_file(path)
    return sha256_file(path)


def _write_faiss(work: str, vectors: np.ndarray, params: dict) -> str:
    import faiss

    path = os.path.join(work, FAISS_FILE)
    faiss.write_index(build_faiss_index(vectors, params), path)
    _fsync_file(path)
    return sha256_file(path)


def _write_manifest(work: str, manifest: dict) -> None:
    path = os.path.join(work, MANIFEST)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _swap_into_place(work: str, target: str) -> None:
    """Rename the finished folder onto `target`. An existing gallery is moved aside first and
    deleted only once the new one is in place; if the second rename fails it is put back."""
    if not os.path.exists(target):
        os.replace(work, target)
        fsync_dir(os.path.dirname(target))
        return
    parent, name = os.path.split(target)
    old = tempfile.mkdtemp(prefix=f".{name}.old-{os.getpid()}-", dir=parent)
    os.rmdir(old)  # os.replace needs the destination name free
    os.replace(target, old)
    try:
        os.replace(work, target)
    except BaseException:
        os.replace(old, target)
        raise
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def clean_stale(target: str) -> list:
    """Remove what a killed writer left beside `target` (its temporary folder; the old gallery
    it had moved aside, put back if `target` is missing). Only folders whose writer process is
    gone are touched, so a concurrent writer's work is left alone. Returns the paths handled."""
    parent, name = os.path.split(os.path.abspath(target))
    handled = []
    if not os.path.isdir(parent):
        return handled
    for entry in sorted(os.listdir(parent)):
        for kind in ("tmp", "old"):
            prefix = f".{name}.{kind}-"
            if not entry.startswith(prefix):
                continue
            pid = entry[len(prefix):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            path = os.path.join(parent, entry)
            if kind == "old" and not os.path.exists(target):
                os.replace(path, target)  # the crash fell between the two renames
            else:
                shutil.rmtree(path, ignore_errors=True)
            handled.append(path)
    return handled


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True




def _fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# ---------------------------------------------------------------------------------------------
# Building from a collection


def build_gallery(checkpoint: str, root: str, collection: str, split: str | None = None, out: str = "gallery",
                  feature: str | None = None, dtype: str | None = None, batch_size: int = 256,
                  append: bool = False, progress: bool = True, faiss: FaissSpec | str | None = None,
                  model=None) -> dict:
    """Run the checkpoint's video tower over a collection's videos and write the gallery `out`.

    Videos: the split's (`split` given) or every video of the feature folder. `feature` defaults to
    the one the checkpoint was trained on. `dtype`: float16 (default for a new gallery) or float32;
    with `append`, the existing gallery's. `faiss`: a FaissSpec or kind ('none': no index); None
    keeps an appended gallery's index kind and parameters. `model`: the loaded checkpoint, to save
    loading it again. Returns the manifest written."""
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
    _check_replaceable(os.path.abspath(out))  # before the costly part, not only when writing
    dtype, faiss = _resolve_options(existing, dtype, faiss, out)

    bigfile, video_ids = _videos(root, collection, split, feature)
    if bigfile.dim != model.config.frame_dim:
        raise GalleryError(f"{bigfile.folder}: frame features are {bigfile.dim}-d but checkpoint {checkpoint} "
                           f"expects {model.config.frame_dim}-d")
    if existing is not None:
        present = set(existing.ids)
        duplicate = next((v for v in video_ids if v in present), None)
        if duplicate is not None:
            raise GalleryError(f"{out}: video {duplicate} is already in the gallery")
    lat, con = encode_videos(model, bigfile, video_ids, job.get("max_frames", 64), batch_size, progress,
                             dtype=DTYPES.get(dtype, torch.float32))
    source = {"root": os.path.abspath(root), "collection": collection, "split": split, "feature": feature,
              "count": len(video_ids)}
    sources = [source]
    if existing is not None:
        lat = torch.cat([existing.lat.to(lat.dtype), lat])
        con = torch.cat([existing.con.to(con.dtype), con])
        video_ids = existing.ids + video_ids
        sources = existing.manifest.get("sources", []) + sources
    info = {"id": model.checkpoint_id, "path": os.path.abspath(checkpoint), "norm": config.get("norm")}
    return write_gallery(out, video_ids, lat, con, info, dtype=dtype, faiss=faiss, sources=sources)


def _resolve_options(existing: Gallery | None, dtype: str | None, faiss, out: str) -> tuple:
    """dtype and FAISS spec: explicit values win ('none' drops an index); an appended gallery
    keeps its own."""
    drop_index = faiss == "none"
    if isinstance(faiss, str):
        faiss = None if drop_index else FaissSpec(kind=faiss)
    if existing is None:
        return dtype or "float16", faiss
    stored = existing.manifest["dtype"]
    if dtype is not None and dtype != stored:
        raise GalleryError(f"{out}: gallery is {stored}, cannot append as {dtype}")
    if faiss is None and not drop_index and existing.manifest.get("faiss"):
        params = existing.manifest["faiss"]
        # nlist is re-derived for the new size (it was capped by the old one); the rest is kept.
        faiss = FaissSpec(kind=params["kind"], nprobe=params.get("nprobe"), hnsw_m=params.get("M"),
                          ef_construction=params.get("efConstruction"), ef_search=params.get("efSearch"))
    return stored, faiss


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


@torch.no_grad()
def encode_videos(model, bigfile, video_ids: list, max_frames: int, batch_size: int = 256,
                  progress: bool = False, dtype: torch.dtype = torch.float32) -> tuple:
    """The video tower over every video, in batches: (lat (N, 2, D), con (N, 2, K)) cast to
    `dtype` batch by batch (a large gallery is never held in float32 when stored in float16).
    NaN/inf frames raise video_frames' ValueError, which names the video."""
    from tqdm import tqdm

    from training.retrieval import video_frames

    if batch_size < 1:
        raise GalleryError(f"batch size must be positive, got {batch_size}")
    model.eval()
    lats, cons = [], []
    starts = range(0, len(video_ids), batch_size)
    for start in tqdm(starts, desc="index", unit="batch", disable=not progress, leave=False):
        frames, mask = video_frames(bigfile, video_ids[start : start + batch_size], max_frames)
        emb = model.encode_video(frames, mask)
        lats.append(emb.lat.to(dtype))
        cons.append(emb.con.to(dtype))
    return torch.cat(lats), torch.cat(cons)


# ---------------------------------------------------------------------------------------------
# `cvr index`


def add_index_command(subparsers) -> argparse.ArgumentParser:
    """Add `cvr index` to a sub-parser collection."""
    index = subparsers.add_parser("index", help="embed a collection's videos into a gallery folder")
    index.add_argument("--checkpoint", required=True, help="checkpoint folder whose video tower embeds the videos")
    index.add_argument("--root", required=True, help="data root holding the collection")
    index.add_argument("--collection", required=True)
    index.add_argument("--split", default=None, choices=["train", "val", "test"],
                       help="only this split's videos (default: every video of the feature folder)")
    index.add_argument("--out", required=True, help="gallery folder to write (replaced atomically)")
    index.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                       help="stored precision (default: float16; when appending, the gallery's)")
    index.add_argument("--append", action="store_true",
                       help="add these videos to the existing gallery at --out (same checkpoint, no duplicate ids)")
    index.add_argument("--faiss", default=None, choices=[*FAISS_KINDS, "none"],
                       help="first-stage index over the global latent vectors (default: none; "
                            "when appending, the gallery's)")
    index.add_argument("--nlist", type=int, default=None, help="ivf: inverted lists (default 4 sqrt(N), capped by N)")
    index.add_argument("--nprobe", type=int, default=None, help="ivf: lists probed per query (default 32)")
    index.add_argument("--hnsw-m", type=int, default=None, help="hnsw: links per node (default 32)")
    index.add_argument("--ef-construction", type=int, default=None, help="hnsw: build beam (default 40)")
    index.add_argument("--ef-search", type=int, default=None, help="hnsw: search beam (default 64)")
    index.add_argument("--feature", default=None, help="frame feature folder (default: the checkpoint's)")
    index.add_argument("--batch-size", type=int, default=256)
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    index.set_defaults(func=handler)
    return index


def handler(args) -> int:
    """`cvr index`: build (or extend) a gallery and print one summary line."""
    faiss = args.faiss
    for flag, kind in (("nlist", "ivf"), ("nprobe", "ivf"), ("hnsw_m", "hnsw"), ("ef_construction", "hnsw"),
                       ("ef_search", "hnsw")):
        if getattr(args, flag) is not None and faiss != kind:
            raise GalleryError(f"--{flag.replace('_', '-')} is a parameter of --faiss {kind}")
    if faiss not in (None, "none"):
        faiss = FaissSpec(kind=faiss, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                          ef_construction=args.ef_construction, ef_search=args.ef_search)
    manifest = build_gallery(args.checkpoint, args.root, args.collection, split=args.split, out=args.out,
                             feature=args.feature, dtype=args.dtype, batch_size=args.batch_size,
                             append=args.append, progress=not args.quiet, faiss=faiss)
    index = manifest["faiss"]
    described = "no FAISS index" if not index else "FAISS " + ", ".join(f"{k}={v}" for k, v in index.items()
                                                                       if k not in ("metric", "vectors"))
    print(f"wrote {args.out}: {manifest['count']} videos, D={manifest['dims']['latent']}, "
          f"K={manifest['dims']['concept']}, {manifest['dtype']}, {described}")
    return 0


__all__ = ["FaissSpec", "Gallery", "GalleryError", "add_index_command", "build_faiss_index", "build_gallery",
           "clean_stale", "encode_videos", "handler", "search", "two_stage_search", "write_gallery"]
