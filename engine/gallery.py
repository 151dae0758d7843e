"""A persisted gallery: video ids + the video tower's embeddings, versioned, checksummed, atomic.

A gallery is a folder (ARCHITECTURE.md section 12) of one or more immutable *parts*, each a
folder of rows (the gallery folder itself, `.`, for a gallery written at once; `parts/<name>/` for
the batches `cvr index --videos` commits):

- `ids.txt`: one video id per line, in row order;
- `embeddings.safetensors`: `lat` (n, S, D) and `con` (n, T, K), float16 by default (float32 on
  request). For the CVR head S = T = 2: index 0 of dim 1 is the global branch, 1 the local one;
  other heads record their slot counts in the manifest's dims (`lat_slots`, `con_slots`; absent
  means 2 and 2, every gallery written before heads existed); the glscl head's are in
  engine/glscl.py. The FAISS first stage always indexes slot 0 of `lat`;
- for video files (optional): `videos.jsonl`, one record per row (content hash, duration, fps,
  sampled timestamps, thumbnail, decoding warnings), `thumbs/<row>.jpg`, and
  `segments.safetensors`: the global latent vector `lat` (s, D) of every segment (window of
  seconds) with its `row` (s,) and `span` (s, 2) [start, end] in seconds: all that locating the
  matching moment needs;

and beside them:

- `faiss.index` (optional, or `faiss-<generation>.index`): a FAISS first stage over the global
  latent vectors `lat[:, 0]` of the live rows, described by a faiss `index_factory` string
  (`IVF1000,SQfp16`, `HNSW32`, `Flat`, ...);
- `manifest.json`, replaced atomically at every commit: format and version, the checkpoint's id
  (sha256 of its weights + config) and where it was (relative to the gallery), dims, dtype, the
  live count, the parts in row order with the rows each has dropped (deleted or re-indexed
  videos), the sha256 of every other file, the checkpoint's min-max constants (for information:
  scoring always uses the model's), the FAISS factory string and default search parameters, and
  for video files the media root, every path with its size and mtime, the extractor, the frame
  sampling and the segment window; metadata fields; creation time, sources.

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
from dataclasses import dataclass

import numpy as np

from engine.errors import CVRError
from engine.integrity import check_seal, verify_files
from engine.rows import Rows

FORMAT = "cvr-sdgm/gallery"
VERSION = 3  # 3: parts, dropped rows, media; 2: FAISS described by a factory string; no absolute paths
READABLE_VERSIONS = (2, 3)  # a version-2 gallery is one part, the folder itself
REBUILD = "rebuild it with `cvr index`"
IDS = "ids.txt"
EMBEDDINGS = "embeddings.safetensors"
FAISS_FILE = "faiss.index"
MANIFEST = "manifest.json"
VIDEOS = "videos.jsonl"
SEGMENTS = "segments.safetensors"
THUMBS = "thumbs"
ROOT_PART = "."  # the part a gallery written at once keeps in its own folder
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


def slot_counts(dims: dict) -> tuple:
    """(lat slots S, con slots T) of a manifest's dims: 2 and 2 where not recorded."""
    return int(dims.get("lat_slots", 2)), int(dims.get("con_slots", 2))


def embedding_dims(lat, con) -> dict:
    """The manifest's dims of embeddings lat (n, S, D) and con (n, T, K): latent D and concept K,
    and the slot counts where they are not the CVR head's 2 and 2 (so that its manifests stay as
    they were)."""
    dims = {"latent": int(lat.shape[2]), "concept": int(con.shape[2])}
    if (lat.shape[1], con.shape[1]) != (2, 2):
        dims.update(lat_slots=int(lat.shape[1]), con_slots=int(con.shape[1]))
    return dims


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


def faiss_search_parameters(index, nprobe: int | None = None, ef_search: int | None = None,
                            allowed_rows: np.ndarray | None = None):
    """faiss SearchParameters for one search (thread-safe: the index itself is not changed), or
    None when the index takes none; `allowed_rows` restricts the search to those rows (an id
    selector). A parameter the index does not have is a GalleryError."""
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
    if allowed_rows is not None:
        params = params if params is not None else faiss.SearchParameters()
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_rows, dtype=np.int64))
        params.sel = selector
        params.selector_rows = selector  # faiss does not own it: it lives as long as the parameters
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


@dataclass
class Part:
    """One part as loaded: its folder, physical ids, memory maps, live rows (None: all), and the
    video records and segments of a part made from video files."""

    name: str
    folder: str
    ids: list
    lat: np.ndarray
    con: np.ndarray
    live: np.ndarray | None
    records: list | None = None
    segments: dict | None = None  # lat (s, D), span (s, 2), bounds (n + 1): row r has segments bounds[r]:bounds[r+1]

    def live_rows(self) -> np.ndarray:
        return np.arange(len(self.ids)) if self.live is None else self.live


class Gallery:
    """A validated gallery: `ids` of the live rows, `lat` (N, S, D) and `con` (N, T, K) in the
    stored dtype (a memory map, or engine.rows.Rows over several parts), `manifest`, `faiss_index`
    (None without one), `folder`, `parts`; for video files `media_root` and per-row `records`."""

    def __init__(self, folder: str, ids: list, lat, con, manifest: dict, faiss_index=None, parts: list | None = None):
        self.folder, self.ids, self.lat, self.con = folder, ids, lat, con
        self.manifest, self.faiss_index = manifest, faiss_index
        self.parts = parts or []
        media = manifest.get("media")
        self.media_root = os.path.normpath(os.path.join(folder, media["root"])) if media else None
        self._paths_of = None
        self._rows = None
        self._locator = None

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

    @property
    def has_media(self) -> bool:
        return self.media_root is not None

    def locate(self, rows) -> tuple:
        """(part index, physical row in that part) of each live row."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(self.parts) == 1 and self.parts[0].live is None:
            return np.zeros(len(rows), dtype=np.int64), rows
        if self._locator is None:  # built once: every lookup is then a binary search over the parts
            self._locator = Rows([(np.arange(len(p.ids)), p.live) for p in self.parts])
        return self._locator.locate(rows)

    def row_of(self, video_id: str) -> int | None:
        """The live row of a video id, or None."""
        if self._rows is None:
            self._rows = {v: i for i, v in enumerate(self.ids)}
        return self._rows.get(video_id)

    def record(self, row: int) -> dict | None:
        """The video record of a live row (None for a gallery built from feature files)."""
        part, physical = (int(x[0]) for x in self.locate([row]))
        records = self.parts[part].records
        return None if records is None else records[physical]

    def paths(self, video_id: str) -> list:
        """Every indexed path (absolute) of a video: the same content at two paths is one video."""
        if self._paths_of is None:
            self._paths_of = {}
            media = self.manifest.get("media") or {}
            for rel, entry in sorted(media.get("paths", {}).items()):
                self._paths_of.setdefault(entry["id"], []).append(os.path.join(self.media_root, rel))
        return self._paths_of.get(video_id, [])

    def metadata_of(self, video_id: str) -> dict:
        """The metadata fields attached to a video (`cvr index --metadata`)."""
        return dict((self.manifest.get("fields") or {}).get(video_id, {}))

    def thumbnail(self, row: int) -> str | None:
        record = self.record(row)
        if not record or not record.get("thumbnail"):
            return None
        part = int(self.locate([row])[0][0])
        return os.path.join(self.parts[part].folder, record["thumbnail"])

    def best_segments(self, rows, q_global: np.ndarray) -> list:
        """For each live row, the segment whose global latent vector is closest to the query's
        global latent vector `q_global` (D,): ([start, end] seconds, cosine), or None where the
        gallery keeps no segments. Ties go to the earlier segment."""
        rows = np.asarray(rows, dtype=np.int64)
        found = [None] * len(rows)
        if not any(p.segments for p in self.parts):
            return found
        query = np.asarray(q_global, dtype=np.float32)
        for i, (part, physical) in enumerate(zip(*self.locate(rows), strict=True)):
            segments = self.parts[part].segments
            if not segments:
                continue
            lo, hi = segments["bounds"][physical], segments["bounds"][physical + 1]
            if lo == hi:
                continue
            scores = np.asarray(segments["lat"][lo:hi], dtype=np.float32) @ query
            best = int(np.argmax(scores))
            span = segments["span"][lo + best]
            found[i] = ([round(float(span[0]), 3), round(float(span[1]), 3)], float(scores[best]))
        return found

    def fields(self) -> dict:
        """Filterable fields: {name: [value per live row, None where the video has none]}: the
        built-in ones of video files (duration, fps, width, height, frames, codec, path) and the
        metadata attached with `cvr index --metadata`."""
        table = {}
        n = len(self)
        if self.has_media:
            for name in MEDIA_FIELDS:
                table[name] = [None] * n
            parts, physical = self.locate(np.arange(n))
            for row in range(n):
                records = self.parts[parts[row]].records
                record = (records[physical[row]] if records else None) or {}
                for name in MEDIA_FIELDS[:-1]:
                    table[name][row] = record.get(name)
                table["path"][row] = [os.path.relpath(p, self.media_root) for p in self.paths(self.ids[row])]
        metadata = self.manifest.get("fields") or {}
        names = sorted({name for values in metadata.values() for name in values})
        for name in names:
            column = table.setdefault(name, [None] * n)
            for row, video_id in enumerate(self.ids):
                if name in metadata.get(video_id, {}):
                    column[row] = metadata[video_id][name]
        return table

    @classmethod
    def load(cls, folder: str, checkpoint_id: str | None = None, verify: bool = True) -> Gallery:
        """Load and validate a gallery folder; with `checkpoint_id`, refuse one built by another
        checkpoint. Every file is checked against its digest (engine.integrity.verify_files: hashed
        once, then vouched for by the folder's verified stamp); `verify=False` skips that (the
        structural checks and the manifest's own digest still run). A writer may swap a new
        folder in while this one reads (`cvr index --append`): a read that fails across a swap
        is tried once more on the new folder rather than reported as damage."""
        before = _folder_stamp(folder)
        try:
            return cls._load(folder, checkpoint_id, verify)
        except (GalleryError, FileNotFoundError):
            # A writer swapped the folder, or committed a new manifest (and deleted files the old
            # one listed) while this read: read the new state once more.
            if before is None or _folder_stamp(folder) == before:
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
        parts = [_read_part(folder, entry, manifest) for entry in manifest["parts"]]
        if verify:  # after the structural checks, whose messages are more specific
            verify_files(folder, manifest["files"], REBUILD, GalleryError)
        ids = [p.ids[i] for p in parts for i in p.live_rows()]
        _check_unique(ids, os.path.join(folder, MANIFEST))
        if len(ids) != manifest["count"]:
            raise GalleryError(f"{folder}: {len(ids)} live videos but the manifest says {manifest['count']}")
        if not parts:  # every video removed: an empty gallery, which searches refuse with one line
            dims = manifest["dims"]
            dtype = DTYPES[manifest["dtype"]]
            lat_slots, con_slots = slot_counts(dims)
            lat, con = np.zeros((0, lat_slots, dims["latent"]), dtype), np.zeros((0, con_slots, dims["concept"]), dtype)
        elif len(parts) == 1 and parts[0].live is None:
            lat, con = parts[0].lat, parts[0].con
        else:
            lat, con = (Rows([(getattr(p, name), p.live) for p in parts]) for name in ("lat", "con"))
        index = _read_faiss(folder, manifest) if manifest.get("faiss") else None
        return cls(folder, ids, lat, con, manifest, index, parts)


MEDIA_FIELDS = ("duration", "fps", "width", "height", "frames", "codec", "path")


def part_folder(folder: str, name: str) -> str:
    return folder if name == ROOT_PART else os.path.join(folder, name)


def _read_part(folder: str, entry: dict, manifest: dict) -> Part:
    path = part_folder(folder, entry["name"])
    count = entry["count"]
    ids = _read_ids(path, count)
    lat, con = _read_embeddings(path, count, manifest)
    drop = entry.get("drop") or []
    live = np.setdiff1d(np.arange(count), np.asarray(drop, dtype=np.int64)) if drop else None
    prefix = "" if entry["name"] == ROOT_PART else entry["name"] + "/"
    records = _read_records(path, count) if prefix + VIDEOS in manifest["files"] else None
    segments = _read_segments(path, count, manifest) if prefix + SEGMENTS in manifest["files"] else None
    return Part(entry["name"], path, ids, lat, con, live, records, segments)


def _read_records(path: str, count: int) -> list:
    records_path = os.path.join(path, VIDEOS)
    records = []
    with open(records_path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            try:
                record = json.loads(line)
            except ValueError:
                raise GalleryError(f"{records_path}:{line_no}: not a JSON record") from None
            if not isinstance(record, dict):
                raise GalleryError(f"{records_path}:{line_no}: not a JSON object")
            records.append(record)
    if len(records) != count:
        raise GalleryError(f"{records_path}: {len(records)} records for {count} videos")
    return records


def _read_segments(path: str, count: int, manifest: dict) -> dict:
    from safetensors.numpy import load_file

    segments_path = os.path.join(path, SEGMENTS)
    try:
        stored = load_file(segments_path)
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise GalleryError(f"{segments_path}: unreadable ({str(error).splitlines()[0]})") from None
    lat, row, span = stored.get("lat"), stored.get("row"), stored.get("span")
    dim = manifest["dims"]["latent"]
    if lat is None or row is None or span is None or lat.ndim != 2 or lat.shape[1] != dim \
            or row.shape != (len(lat),) or span.shape != (len(lat), 2):
        raise GalleryError(f"{segments_path}: expected lat (s, {dim}), row (s,) and span (s, 2)")
    if len(row) and (row.min() < 0 or row.max() >= count or np.any(np.diff(row) < 0)):
        raise GalleryError(f"{segments_path}: segment rows out of order or out of range")
    check_finite(lat, f"{segments_path}: lat")
    bounds = np.searchsorted(row, np.arange(count + 1), side="left")
    return {"lat": lat, "span": span, "bounds": bounds}


def _check_unique(ids: list, where: str) -> None:
    if len(set(ids)) != len(ids):
        seen = set()
        duplicate = next(v for v in ids if v in seen or seen.add(v))
        raise GalleryError(f"{where}: video {duplicate} appears twice")


def _folder_stamp(folder: str) -> tuple | None:
    """The folder's inode and its manifest's (inode, mtime): what a writer's swap or commit changes."""
    try:
        manifest = os.stat(os.path.join(folder, MANIFEST))
        return os.stat(folder).st_ino, manifest.st_ino, manifest.st_mtime_ns
    except OSError:
        return None


def read_manifest(folder: str) -> dict:
    """A gallery's manifest, checked (format, version and the fields loading relies on); a
    version-2 manifest is read as one part, the folder itself."""
    from engine.config import read_format_json

    manifest = read_format_json(folder, MANIFEST, FORMAT, GalleryError, "gallery")
    path = os.path.join(folder, MANIFEST)
    if manifest.get("version") not in READABLE_VERSIONS:
        raise GalleryError(f"{path}: gallery format version {manifest.get('version')!r}, this engine reads "
                           f"{' and '.join(map(str, READABLE_VERSIONS))}: rebuild it with `cvr index`")
    check_seal(manifest, path, REBUILD, GalleryError)  # before its fields are trusted
    if manifest["version"] == 2:
        manifest = dict(manifest, parts=[{"name": ROOT_PART, "count": manifest.get("count"), "drop": []}])
        if manifest.get("faiss"):
            manifest["faiss"] = dict(manifest["faiss"], file=FAISS_FILE)
    _check_manifest_fields(manifest, path)
    return manifest


def _check_manifest_fields(manifest: dict, path: str) -> None:
    """Types and ranges of the fields that loading relies on, so a hand-edited manifest fails here
    with its field named rather than later with a KeyError."""
    def bad(field: str):
        return GalleryError(f"{path}: missing or invalid field {field!r}")

    def count(value, least: int = 0) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    checkpoint = manifest.get("checkpoint")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("id"), str):
        raise bad("checkpoint.id")
    dims = manifest.get("dims")
    for name in ("latent", "concept"):
        if not isinstance(dims, dict) or not count(dims.get(name), 1):
            raise bad(f"dims.{name}")
    for name in ("lat_slots", "con_slots"):
        if name in dims and not count(dims[name], 1):
            raise bad(f"dims.{name}")
    if manifest.get("dtype") not in DTYPES:
        raise bad("dtype")
    if not count(manifest.get("count")):  # 0: every video removed (`cvr gallery rm`); searches refuse it
        raise bad("count")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not all(_plain_relative(name) for name in listed):
        raise bad("files")
    parts = manifest.get("parts")
    if not isinstance(parts, list) or (not parts and manifest["count"] != 0):
        raise bad("parts")
    for entry in parts:
        if not isinstance(entry, dict) or not _plain_relative(str(entry.get("name"))) \
                or not count(entry.get("count"), 1) or not isinstance(entry.get("drop", []), list) \
                or not all(count(r) and r < entry["count"] for r in entry.get("drop", [])):
            raise bad("parts")
        prefix = "" if entry["name"] == ROOT_PART else entry["name"] + "/"
        if not {prefix + IDS, prefix + EMBEDDINGS} <= set(listed):
            raise bad("files")
    faiss = manifest.get("faiss")
    if faiss is not None and not (isinstance(faiss, dict) and isinstance(faiss.get("factory"), str)
                                  and faiss.get("file") in listed):
        raise bad("faiss")
    media = manifest.get("media")
    if media is not None and not (isinstance(media, dict) and isinstance(media.get("root"), str)
                                  and isinstance(media.get("paths"), dict)):
        raise bad("media")
    if not isinstance(manifest.get("fields", {}), dict):
        raise bad("fields")


def _plain_relative(name: str) -> bool:
    """A file name inside the gallery: relative, no '..', no empty part (never a path outside)."""
    if name == ROOT_PART:
        return True
    parts = name.split("/")
    return bool(name) and not os.path.isabs(name) and all(p not in ("", ".", "..") for p in parts)


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
    _check_unique(ids, path)
    return ids


def _read_embeddings(folder: str, n: int, manifest: dict) -> tuple:
    """`lat` and `con` of a part's n rows as read-only memory maps of its safetensors file, after
    checking its header with safetensors (names, dtypes, shapes) against the manifest, and every
    value for finiteness."""
    path = os.path.join(folder, EMBEDDINGS)
    dims, dtype = manifest["dims"], DTYPES[manifest["dtype"]]
    lat_slots, con_slots = slot_counts(dims)
    expected = {"lat": (n, lat_slots, dims["latent"]), "con": (n, con_slots, dims["concept"])}
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

    path = os.path.join(folder, manifest["faiss"]["file"])
    try:
        index = faiss.read_index(path)
    except RuntimeError as error:
        raise GalleryError(f"{path}: unreadable FAISS index ({_faiss_message(error)})") from None
    if index.ntotal != manifest["count"] or index.d != manifest["dims"]["latent"]:
        raise GalleryError(f"{path}: index holds {index.ntotal} vectors of width {index.d}, the manifest says "
                           f"{manifest['count']} of width {manifest['dims']['latent']}")
    _apply_defaults(index, manifest["faiss"])
    return index
