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
at most. This module needs numpy, safetensors and faiss, not torch. The format's file names and
checked readers are engine/gallery_format.py, the FAISS first stage engine/gallery_faiss.py;
writing is engine/indexing.py.
"""
from __future__ import annotations

import os

import numpy as np

from engine.gallery_faiss import (  # noqa: F401 (faiss_factory, faiss_search_parameters: re-exported for the tests)
    _read_faiss,
    faiss_factory,
    faiss_search_parameters,
)
from engine.gallery_format import (  # noqa: F401 (EMBEDDINGS, IDS: re-exported for the tests)
    DTYPES,
    EMBEDDINGS,
    IDS,
    MANIFEST,
    REBUILD,
    GalleryError,
    _check_unique,
    _read_part,
    read_manifest,
    slot_counts,
)
from engine.integrity import verify_files
from engine.rows import Rows


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


def _folder_stamp(folder: str) -> tuple | None:
    """The folder's inode and its manifest's (inode, mtime): what a writer's swap or commit changes."""
    try:
        manifest = os.stat(os.path.join(folder, MANIFEST))
        return os.stat(folder).st_ino, manifest.st_ino, manifest.st_mtime_ns
    except OSError:
        return None
