"""A persisted gallery: video ids + the video tower's embeddings, versioned, checksummed, atomic.

A gallery is a folder (ARCHITECTURE.md section 12):

- `ids.txt`: one video id per line, in row order;
- `embeddings.safetensors`: `lat` (N, 2, D) and `con` (N, 2, K), float16 by default (float32 on
  request); index 0 of dim 1 is the global branch, 1 the local one;
- `faiss.index` (optional): a FAISS first stage over the global latent vectors `lat[:, 0]`,
  described by a faiss `index_factory` string (`IVF1000,SQfp16`, `HNSW32`, `Flat`, ...);
- `manifest.json`: format and version, the checkpoint's id (sha256 of its weights + config) and
  where it was (relative to the gallery), dims, dtype, count, the sha256 of every other file, the
  checkpoint's min-max constants (for information: scoring always uses the model's), the FAISS
  factory string and default search parameters, creation time, sources.

Loading validates everything and refuses with one line (`GalleryError`), including a gallery built
with another checkpoint than the one scoring it. The embeddings are memory-mapped, never copied:
search reads them block by block (engine/search.py), so a gallery costs its file size in memory
at most. This module needs numpy, safetensors and faiss, not torch. Writing is engine/indexing.py.
"""
from __future__ import annotations

import json
import math
import os
import struct

import numpy as np

from engine.errors import CVRError
from engine.integrity import check_seal, verify_files

FORMAT = "cvr-sdgm/gallery"
VERSION = 2  # 2: FAISS described by a factory string; no absolute paths
REBUILD = "rebuild it with `cvr index`"
IDS = "ids.txt"
EMBEDDINGS = "embeddings.safetensors"
FAISS_FILE = "faiss.index"
MANIFEST = "manifest.json"
DATA_FILES = (IDS, EMBEDDINGS, FAISS_FILE)  # every file a manifest may list (never a path)
DTYPES = {"float16": np.float16, "float32": np.float32}
SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32}
# FAISS index shorthands: `ivf` gets sqrt(N) lists with fp16 codes (ARCHITECTURE.md section 14; the
# latency benchmark's index), `hnsw` 32 links per node.
FAISS_SHORTHANDS = {"flat": "Flat", "ivf": "IVF{nlist},SQfp16", "hnsw": "HNSW32"}
DEFAULT_NPROBE = 16
DEFAULT_EF_SEARCH = 64
TRAIN_POINTS_PER_LIST = 40  # k-means sample: FAISS's own minimum per centroid, a few seconds at 1M
FINITE_CHECK_ROWS = 1 << 16


class GalleryError(CVRError):
    """A gallery (or the input to build one) that cannot be used; the message is one line."""


# ---------------------------------------------------------------------------------------------
# FAISS first stage


def faiss_factory(spec: str, n: int) -> str:
    """The faiss `index_factory` string for `spec` (a shorthand or a factory string) over n vectors:
    `ivf` becomes IVF<round(sqrt n)>,SQfp16 (at most n lists: k-means cannot make more)."""
    if not isinstance(spec, str) or not spec.strip():
        raise GalleryError("the FAISS index needs a shorthand (flat, ivf, hnsw) or an index_factory string")
    factory = FAISS_SHORTHANDS.get(spec, spec)
    return factory.format(nlist=max(1, min(n, round(math.sqrt(n)))))


def build_faiss_index(vectors, factory: str, seed: int = 0) -> tuple:
    """(index, training points) of a FAISS inner-product index over (N, D) vectors (any float
    dtype, e.g. a float16 memory map) built as the factory string says: trained (IVF k-means, PQ
    codebooks) on a seeded sample of TRAIN_POINTS_PER_LIST points per list and filled in chunks,
    so no float32 copy of the gallery is ever made. GalleryError for a factory string faiss does
    not understand."""
    import faiss

    n, dim = vectors.shape
    train_points = None
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise GalleryError(f"FAISS cannot build {factory!r}: {_faiss_message(error)}") from None
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.cp.min_points_per_centroid = 1  # small galleries: no warning for a small sample
        lists = ivf.nlist if ivf is not None else 256
        # Product quantisers train 256 centroids per sub-vector: FAISS asks 39 points per centroid.
        train_points = min(n, max(TRAIN_POINTS_PER_LIST * lists, 39 * 256 if "PQ" in factory else 0))
        rows = np.random.default_rng(seed).choice(n, train_points, replace=False)
        try:
            index.train(np.ascontiguousarray(vectors[np.sort(rows)], dtype=np.float32))
        except RuntimeError as error:
            raise GalleryError(f"FAISS cannot train {factory!r} on {n} vectors: {_faiss_message(error)}") from None
    try:
        for start in range(0, n, 16384):
            index.add(np.ascontiguousarray(vectors[start : start + 16384], dtype=np.float32))
    except RuntimeError as error:  # e.g. IDMap indexes, which need ids the gallery does not give
        raise GalleryError(f"FAISS cannot fill {factory!r}: {_faiss_message(error)}") from None
    return index, train_points


def _faiss_message(error: Exception) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def faiss_search_parameters(index, nprobe: int | None = None, ef_search: int | None = None):
    """faiss SearchParameters for one search (thread-safe: the index itself is not changed), or
    None when the index takes none. A parameter the index does not have is a GalleryError."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    hnsw = _hnsw_of(index)
    if nprobe is not None and ivf is None:
        raise GalleryError("--nprobe is a parameter of IVF indexes; this gallery's index has no inverted lists")
    if ef_search is not None and hnsw is None:
        raise GalleryError("--ef-search is a parameter of HNSW indexes; this gallery's index is no HNSW")
    for name, value in (("nprobe", nprobe), ("ef-search", ef_search)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise GalleryError(f"--{name} must be a positive integer, got {value!r}")
    params = None
    if ivf is not None:
        params = faiss.SearchParametersIVF(nprobe=min(ivf.nlist, nprobe or ivf.nprobe))
    elif hnsw is not None:
        params = faiss.SearchParametersHNSW(efSearch=ef_search or hnsw.hnsw.efSearch)
    refine = faiss.downcast_index(index)
    if params is not None and isinstance(refine, faiss.IndexRefine):  # `...,RFlat` / `Refine(...)`
        params = faiss.IndexRefineSearchParameters(k_factor=refine.k_factor, base_index_params=params)
    return params


def _hnsw_of(index):
    """The HNSW index of `index` (itself, or the base of a refining index), or None."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        index = faiss.downcast_index(index.base_index)
    return index if isinstance(index, faiss.IndexHNSW) else None


def _apply_defaults(index, params: dict) -> None:
    """The manifest's default search parameters (faiss.write_index does not keep them all)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and params.get("nprobe"):
        ivf.nprobe = int(params["nprobe"])
    hnsw = _hnsw_of(index)
    if hnsw is not None and params.get("efSearch"):
        hnsw.hnsw.efSearch = int(params["efSearch"])


def faiss_record(index, spec: str, factory: str, train_points: int | None) -> dict:
    """The manifest's description of a FAISS index: factory string (and the shorthand it came
    from, resolved again for a new size when the gallery grows), metric, vectors, defaults."""
    import faiss

    record = {"factory": factory, "metric": "inner_product", "vectors": "lat[:, 0]", "train_points": train_points}
    if spec in FAISS_SHORTHANDS:
        record["shorthand"] = spec
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        record.update(nlist=int(ivf.nlist), nprobe=min(int(ivf.nlist), DEFAULT_NPROBE))
    if _hnsw_of(index) is not None:
        record.update(efSearch=DEFAULT_EF_SEARCH)
    return record


# ---------------------------------------------------------------------------------------------
# The loaded gallery


class Gallery:
    """A validated gallery: `ids`, `lat` (N, 2, D) and `con` (N, 2, K) memory-mapped in the stored
    dtype, `manifest`, `faiss_index` (None without one), `folder`."""

    def __init__(self, folder: str, ids: list, lat: np.ndarray, con: np.ndarray, manifest: dict, faiss_index=None):
        self.folder, self.ids, self.lat, self.con = folder, ids, lat, con
        self.manifest, self.faiss_index = manifest, faiss_index

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Gallery({self.folder!r}, n={len(self)}, dtype={self.manifest['dtype']})"

    @property
    def checkpoint_id(self) -> str:
        return self.manifest["checkpoint"]["id"]

    @property
    def nbytes(self) -> int:
        """Bytes of the embeddings (what exhaustive search reads; the memory a loaded gallery uses)."""
        return int(self.lat.nbytes + self.con.nbytes)

    @classmethod
    def load(cls, folder: str, checkpoint_id: str | None = None, verify: bool = True) -> Gallery:
        """Load and validate a gallery folder; with `checkpoint_id`, refuse one built by another
        checkpoint. Every file is checked against its digest (engine.integrity.verify_files: hashed
        once, then vouched for by the folder's verified stamp); `verify=False` skips that (the
        structural checks and the manifest's own digest still run). A writer may swap a new
        folder in while this one reads (`cvr index --append`): a read that fails across a swap
        is tried once more on the new folder rather than reported as damage."""
        before = _folder_inode(folder)
        try:
            return cls._load(folder, checkpoint_id, verify)
        except GalleryError:
            if before is None or _folder_inode(folder) == before:
                raise
            return cls._load(folder, checkpoint_id, verify)

    @classmethod
    def _load(cls, folder: str, checkpoint_id: str | None, verify: bool) -> Gallery:
        manifest = read_manifest(folder)
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
            verify_files(folder, manifest["files"], REBUILD, GalleryError)
        index = _read_faiss(folder, manifest) if manifest.get("faiss") else None
        return cls(folder, ids, lat, con, manifest, index)


def _folder_inode(folder: str) -> int | None:
    try:
        return os.stat(folder).st_ino
    except OSError:
        return None


def read_manifest(folder: str) -> dict:
    """A gallery's manifest, checked (format, version and the fields loading relies on)."""
    from engine.config import read_format_json

    manifest = read_format_json(folder, MANIFEST, FORMAT, GalleryError, "gallery")
    path = os.path.join(folder, MANIFEST)
    if manifest.get("version") != VERSION:
        raise GalleryError(f"{path}: gallery format version {manifest.get('version')!r}, this engine reads {VERSION}: "
                           "rebuild it with `cvr index`")
    check_seal(manifest, path, REBUILD, GalleryError)  # before its fields are trusted
    _check_manifest_fields(manifest, path)
    return manifest


def _check_manifest_fields(manifest: dict, path: str) -> None:
    """Types and ranges of the fields that loading relies on, so a hand-edited manifest fails here
    with its field named rather than later with a KeyError."""
    def bad(field: str):
        return GalleryError(f"{path}: missing or invalid field {field!r}")

    def positive_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    checkpoint = manifest.get("checkpoint")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("id"), str):
        raise bad("checkpoint.id")
    dims = manifest.get("dims")
    for name in ("latent", "concept"):
        if not isinstance(dims, dict) or not positive_int(dims.get(name)):
            raise bad(f"dims.{name}")
    if manifest.get("dtype") not in DTYPES:
        raise bad("dtype")
    if not positive_int(manifest.get("count")):
        raise bad("count")
    files = manifest.get("files")
    if not isinstance(files, dict) or not {IDS, EMBEDDINGS} <= set(files) or not set(files) <= set(DATA_FILES):
        raise bad("files")
    faiss = manifest.get("faiss")
    if faiss is not None and not (isinstance(faiss, dict) and isinstance(faiss.get("factory"), str)):
        raise bad("faiss")
    if (FAISS_FILE in files) != bool(faiss):
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
    """`lat` and `con` as read-only memory maps of the safetensors file, after checking its header
    with safetensors (names, dtypes, shapes) against the manifest, and every value for finiteness."""
    path = os.path.join(folder, EMBEDDINGS)
    n, dims, dtype = manifest["count"], manifest["dims"], DTYPES[manifest["dtype"]]
    expected = {"lat": (n, 2, dims["latent"]), "con": (n, 2, dims["concept"])}
    header, offset = _safetensors_header(path, expected)
    arrays = {}
    for name, shape in expected.items():
        entry = header[name]
        if entry["shape"] != list(shape):
            raise GalleryError(f"{path}: {name} has shape {tuple(entry['shape'])}, the manifest says {shape}")
        if SAFETENSORS_DTYPES.get(entry["dtype"]) != dtype:
            raise GalleryError(f"{path}: {name} is {entry['dtype']}, the manifest says {manifest['dtype']}")
        start, end = entry["data_offsets"]
        if end - start != math.prod(shape) * np.dtype(dtype).itemsize:
            raise GalleryError(f"{path}: {name} holds {end - start} bytes, not {shape} of {manifest['dtype']}")
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset + start, shape=shape)
        check_finite(arrays[name], f"{path}: {name}")
    return arrays["lat"], arrays["con"]


def _safetensors_header(path: str, expected: dict) -> tuple:
    """(header, byte offset of the data) of a safetensors file, validated by safetensors itself."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as handle:
            names = set(handle.keys())
        with open(path, "rb") as raw:
            (length,) = struct.unpack("<Q", raw.read(8))
            header = json.loads(raw.read(length))
    except (SafetensorError, OSError, ValueError, struct.error) as error:
        raise GalleryError(f"{path}: truncated or unreadable ({str(error).splitlines()[0]})") from None
    if names != set(expected):
        raise GalleryError(f"{path}: holds tensors {sorted(names)}, expected {sorted(expected)}")
    return header, 8 + length


def check_finite(array: np.ndarray, what: str) -> None:
    """GalleryError unless every value is finite; checked in blocks of rows (no temporary of the
    whole array's size)."""
    for start in range(0, array.shape[0], FINITE_CHECK_ROWS):
        if not np.isfinite(array[start : start + FINITE_CHECK_ROWS]).all():
            raise GalleryError(f"{what} holds NaN or infinite values")


def _read_faiss(folder: str, manifest: dict):
    import faiss

    path = os.path.join(folder, FAISS_FILE)
    try:
        index = faiss.read_index(path)
    except RuntimeError as error:
        raise GalleryError(f"{path}: unreadable FAISS index ({_faiss_message(error)})") from None
    if index.ntotal != manifest["count"] or index.d != manifest["dims"]["latent"]:
        raise GalleryError(f"{path}: index holds {index.ntotal} vectors of width {index.d}, the manifest says "
                           f"{manifest['count']} of width {manifest['dims']['latent']}")
    _apply_defaults(index, manifest["faiss"])
    return index
