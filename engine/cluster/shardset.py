"""A sharded gallery (`cvr gallery shard G --shards N --out DIR`): one gallery split into N shard
galleries that can load on different machines.

DIR holds `shard-000/`, `shard-001/`, ... (each a complete gallery of format 3: its own manifest,
its own FAISS index built with the source's spec, its videos' records, thumbnails, segments and
metadata) and one top manifest `shards.json`: the checkpoint, dims, dtype, the live count, the
filter fields of the whole set, and per shard its name, row offset, count and the sha256 of its
manifest (which itself records the sha256 of every file of the shard). The top manifest is sealed
(engine/integrity.py), so a shard swapped or edited after the split is refused where it loads.

Shard i holds the source's live rows [offset_i, offset_i + count_i), in order: a hit's global row is
offset + its row in the shard, so merging shards' top-k under the project's tie rule (the lower
row first) gives the unsharded order. The whole set is built in a staging folder and moved into
place at once: a killed split leaves the old DIR (or none), never half a set.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from engine import files, paths
from engine.errors import CVRError
from engine.gallery import MEDIA_FIELDS, Gallery
from engine.gallery_format import MANIFEST
from engine.integrity import check_seal, seal

SHARDS = "shards.json"
FORMAT = "cvr-sdgm/shards"
VERSION = 1
ROWS_PER_READ = 1 << 16  # rows copied per step: one shard's embeddings are read in pieces


class ShardSetError(CVRError):
    """A shard set that cannot be written or loaded (one-line message)."""


def shard_bounds(n: int, shards: int) -> list:
    """[(start, stop)] of `shards` contiguous row ranges over n rows, sizes differing by at most one."""
    edges = [round(i * n / shards) for i in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def index_spec(manifest: dict) -> str | None:
    """The FAISS spec a gallery was indexed with (its shorthand where it had one), or None."""
    record = manifest.get("faiss")
    if record:
        return record.get("shorthand", record["factory"])
    spec = manifest.get("faiss_spec")
    return None if spec in (None, "none") else spec


def field_names(gallery: Gallery) -> list:
    """The filter fields of a gallery: the built-in ones of video files and its metadata's."""
    names = set(MEDIA_FIELDS) if gallery.has_media else set()
    for values in (gallery.manifest.get("fields") or {}).values():
        names.update(values)
    return sorted(names)


def shard_gallery(source: str, shards: int, out: str, overwrite: bool = False, progress: bool = True) -> dict:
    """Split the gallery `source` into `shards` shard galleries under `out`; returns the top manifest."""
    from engine.outputs import claim

    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ShardSetError(f"--shards must be a positive integer, got {shards!r}")
    source, out = os.path.abspath(source), os.path.abspath(out)
    if out == source or out.startswith(source + os.sep) or source.startswith(out + os.sep):
        raise ShardSetError(f"--out {out}: must not be the gallery {source}, inside it or a folder holding it")
    gallery = Gallery.load(source)
    if shards > len(gallery):
        raise ShardSetError(f"{source}: {len(gallery)} videos cannot fill {shards} shards (one video at least each)")
    claim(out, "shard set", "cvr gallery shard", overwrite)
    spec = index_spec(gallery.manifest)
    entries = []
    with files.staged_folder(out) as work:
        for number, (start, stop) in enumerate(shard_bounds(len(gallery), shards)):
            name = f"shard-{number:03d}"
            if progress:
                print(f"cvr gallery shard: {name}: rows {start}..{stop - 1} ({stop - start} videos)",
                      file=sys.stderr, flush=True)
            _write_shard(gallery, start, stop, os.path.join(work, name), os.path.join(out, name), spec,
                         f"{number + 1}/{shards}")
            entries.append({"name": name, "offset": start, "count": stop - start,
                            "manifest": files.sha256_file(os.path.join(work, name, MANIFEST))})
        manifest = gallery.manifest
        top = {"format": FORMAT, "version": VERSION, "checkpoint": {"id": gallery.checkpoint_id},
               "dims": manifest["dims"], "dtype": manifest["dtype"], "count": len(gallery),
               "source": paths.reference(source, out), "faiss_spec": spec, "media": gallery.has_media,
               "fields": field_names(gallery), "shards": entries,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        files.write_json(os.path.join(work, SHARDS), seal(top))
    return read_shardset(out)


def _write_shard(gallery: Gallery, start: int, stop: int, work: str, final: str, spec: str | None,
                 label: str) -> None:
    """Rows [start, stop) of `gallery` as one gallery at `work` (references measured from `final`,
    where it will live: the same depth, so relative paths stay right)."""
    from engine.parts import GalleryWriter

    manifest = gallery.manifest
    ids = gallery.ids[start:stop]
    keep = {"format", "version", "dims", "dtype", "norm", "created", "extractor", "sampling", "segments"}
    base = {k: v for k, v in manifest.items() if k in keep}
    checkpoint = dict(manifest["checkpoint"])
    if checkpoint.get("path"):
        checkpoint["path"] = paths.rebase(checkpoint["path"], gallery.folder, final)
    base["checkpoint"], base["faiss_spec"] = checkpoint, spec
    base["sources"] = list(manifest.get("sources") or []) + [
        {"shard": label, "of": paths.reference(gallery.folder, final)}]
    wanted = set(ids)
    if gallery.has_media:
        known = manifest["media"]["paths"]
        base["media"] = {"root": paths.reference(gallery.media_root, final),
                         "paths": {rel: entry for rel, entry in known.items() if entry["id"] in wanted}}
    writer = GalleryWriter.new(work, base)
    lat = _copy_rows(gallery.lat, start, stop)
    con = _copy_rows(gallery.con, start, stop)
    records, thumbnails, segments = _media_rows(gallery, start, stop) if gallery.has_media else (None, None, None)
    writer.add_part(ids, lat, con, segments, records, thumbnails)
    writer.manifest["fields"] = {v: f for v, f in (manifest.get("fields") or {}).items() if v in wanted}
    writer.rebuild_index(spec)
    writer.commit()


def _copy_rows(array, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a memory map or engine.rows.Rows, in its stored dtype."""
    out = np.empty((stop - start,) + tuple(array.shape[1:]), dtype=array.dtype)
    for first in range(start, stop, ROWS_PER_READ):
        last = min(stop, first + ROWS_PER_READ)
        out[first - start : last - start] = array[first:last]
    return out


def _media_rows(gallery: Gallery, start: int, stop: int) -> tuple:
    """(records, thumbnail JPEG bytes, segments (lat, row, span) or None) of rows [start, stop)."""
    records, thumbnails = [], []
    seg_lat, seg_row, seg_span = [], [], []
    parts, physical = gallery.locate(np.arange(start, stop))
    for local, (part_no, row) in enumerate(zip(parts.tolist(), physical.tolist(), strict=True)):
        part = gallery.parts[part_no]
        record = dict(part.records[row]) if part.records else {}
        thumb = record.pop("thumbnail", None)
        thumbnails.append(_read_bytes(os.path.join(part.folder, thumb)) if thumb else None)
        records.append(record)
        if part.segments:
            lo, hi = part.segments["bounds"][row], part.segments["bounds"][row + 1]
            seg_lat.append(np.asarray(part.segments["lat"][lo:hi]))
            seg_span.append(np.asarray(part.segments["span"][lo:hi], dtype=np.float32))
            seg_row.append(np.full(hi - lo, local, dtype=np.int32))
    if gallery.manifest.get("segments") is None:
        return records, thumbnails, None
    dim = gallery.manifest["dims"]["latent"]
    segments = (np.concatenate(seg_lat) if seg_lat else np.zeros((0, dim), np.float32),
                np.concatenate(seg_row) if seg_row else np.zeros(0, np.int32),
                np.concatenate(seg_span) if seg_span else np.zeros((0, 2), np.float32))
    return records, thumbnails, segments


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# Reading


def read_shardset(folder: str) -> dict:
    """The top manifest of a shard set, checked (format, version, seal, the shard entries)."""
    from engine.config import read_format_json

    top = read_format_json(folder, SHARDS, FORMAT, ShardSetError, "shard set")
    path = os.path.join(folder, SHARDS)
    if top.get("version") != VERSION:
        raise ShardSetError(f"{path}: shard set version {top.get('version')!r}, this engine reads {VERSION}")
    check_seal(top, path, "split the gallery again with `cvr gallery shard`", ShardSetError)
    shards = top.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ShardSetError(f"{path}: lists no shards")
    offset = 0
    for entry in shards:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry.get("offset") == offset
                and isinstance(entry.get("count"), int) and entry["count"] > 0
                and isinstance(entry.get("manifest"), str) and _plain(entry["name"])):
            raise ShardSetError(f"{path}: shard entry {entry!r} is malformed (rows must follow one another)")
        offset += entry["count"]
    if offset != top.get("count"):
        raise ShardSetError(f"{path}: the shards hold {offset} videos, the manifest says {top.get('count')}")
    return top


def _plain(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def shard_folder(folder: str, entry: dict) -> str:
    return os.path.join(folder, entry["name"])


def check_shards(folder: str, top: dict) -> None:
    """Every shard of the set is there with the manifest the split recorded (what a driver checks
    before it starts actors on them; each actor verifies its shard's files as it loads)."""
    for entry in top["shards"]:
        _check_manifest(folder, entry)


def _check_manifest(folder: str, entry: dict) -> None:
    path = shard_folder(folder, entry)
    try:
        digest = files.sha256_file(os.path.join(path, MANIFEST))
    except FileNotFoundError:
        raise ShardSetError(f"{path}: shard missing (no {MANIFEST}): copy it from the shard set") from None
    if digest != entry["manifest"]:
        raise ShardSetError(f"{path}: not the shard {SHARDS} recorded (its manifest differs): "
                            "split the gallery again with `cvr gallery shard`")


def load_shard(folder: str, entry: dict, checkpoint_id: str | None = None, verify: bool = True) -> Gallery:
    """One shard of the set at `folder` (its entry from the top manifest), refused when its
    manifest is not the one the split recorded."""
    path = shard_folder(folder, entry)
    _check_manifest(folder, entry)
    gallery = Gallery.load(path, checkpoint_id=checkpoint_id, verify=verify)
    if len(gallery) != entry["count"]:
        raise ShardSetError(f"{path}: {len(gallery)} videos, {SHARDS} says {entry['count']}")
    return gallery
