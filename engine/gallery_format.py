"""The gallery's on-disk format: file names, versions, GalleryError, checked readers of manifest and parts."""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from engine.errors import CVRError
from engine.integrity import check_seal

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
