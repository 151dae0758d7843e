"""Growing and shrinking a gallery in place: immutable parts plus an atomically replaced manifest.

A commit writes its new part into a hidden folder, renames it to `parts/p<generation>`, then
replaces `manifest.json` (written beside it and renamed over it): a reader sees the old manifest
or the new one, and the old one never names the new part. A kill before the rename of the manifest
leaves an unlisted part, which the next writer (holding the gallery's lock) deletes. Dropping a
video lists its row in its part's `drop` (the part's files never change); a part whose rows are
all dropped is deleted after the commit that stops listing it. A gallery's first commit builds the
whole folder beside it and moves it into place (engine/files.py), so a new gallery appears whole.
"""
from __future__ import annotations

import os
import shutil
import uuid

import numpy as np

from engine import files
from engine.gallery_faiss import build_faiss_index, faiss_factory, faiss_record
from engine.gallery_format import (
    EMBEDDINGS,
    FAISS_FILE,
    IDS,
    MANIFEST,
    ROOT_PART,
    SEGMENTS,
    THUMBS,
    VERSION,
    VIDEOS,
    GalleryError,
    _read_embeddings,
    _read_ids,
    embedding_dims,
    part_folder,
    read_manifest,
)
from engine.integrity import seal
from engine.rows import Rows

PARTS = "parts"


class GalleryWriter:
    """The one writer of a gallery folder (the caller holds engine.locks.lock(folder))."""

    def __init__(self, folder: str, manifest: dict, exists: bool):
        self.folder, self.manifest, self.exists = os.path.abspath(folder), manifest, exists
        self.where = {}  # live id -> (part name, physical row)
        self._doomed = []  # part folders to delete once the manifest no longer lists them
        if exists:
            self._clean_unlisted()
            for entry in manifest["parts"]:
                dropped = set(entry.get("drop", []))
                for row, video_id in enumerate(_read_ids(part_folder(self.folder, entry["name"]), entry["count"])):
                    if row not in dropped:
                        self.where[video_id] = (entry["name"], row)

    @classmethod
    def open(cls, folder: str) -> GalleryWriter:
        return cls(folder, read_manifest(folder), exists=True)

    @classmethod
    def new(cls, folder: str, base: dict) -> GalleryWriter:
        """A gallery that does not exist yet: `base` holds the manifest's fixed fields."""
        manifest = dict(base, count=0, parts=[], files={}, faiss=None, generation=0, fields={})
        return cls(folder, manifest, exists=False)

    # -----------------------------------------------------------------------------------------

    def add_part(self, ids: list, lat: np.ndarray, con: np.ndarray, segments: tuple | None = None,
                 records: list | None = None, thumbnails: list | None = None) -> str:
        """Stage a part of new videos (committed by the next `commit`); returns its name."""
        dtype = np.float16 if self.manifest["dtype"] == "float16" else np.float32
        self._check_dims(lat, con)
        generation = self.manifest["generation"] + 1
        name = f"{PARTS}/p{generation:06d}"
        root = self._staging_root()
        work = os.path.join(root, PARTS, f".tmp-p{generation:06d}")
        files.remove(work)
        os.makedirs(work)
        written = _write_part_files(work, ids, lat.astype(dtype), con.astype(dtype), segments, records,
                                    thumbnails, dtype)
        files.fsync_dir(work)
        os.rename(work, os.path.join(root, name))
        files.fsync_dir(os.path.join(root, PARTS))
        self.manifest["files"].update({f"{name}/{k}": v for k, v in written.items()})
        self.manifest["parts"].append({"name": name, "count": len(ids), "drop": []})
        self.manifest["generation"] = generation
        for row, video_id in enumerate(ids):
            if video_id in self.where:
                raise GalleryError(f"{self.folder}: video {video_id} is already in the gallery")
            self.where[video_id] = (name, row)
        self.manifest["count"] += len(ids)
        self.manifest["faiss"] = self._without_index()
        return name

    def _check_dims(self, lat: np.ndarray, con: np.ndarray) -> None:
        """A new gallery's first part sets its dims (slot counts and widths come from the head that
        embedded it, which the caller's base may not know); every later part must match them."""
        found = embedding_dims(lat, con)
        if not self.manifest["parts"] and not self.exists:
            self.manifest["dims"] = found
        elif found != self.manifest["dims"]:
            raise GalleryError(f"{self.folder}: embeddings of dims {found}, the gallery's are {self.manifest['dims']}")

    def drop(self, video_ids) -> int:
        """Drop live videos (committed by the next `commit`); returns how many were dropped."""
        entries = {e["name"]: e for e in self.manifest["parts"]}
        dropped = 0
        for video_id in video_ids:
            if video_id not in self.where:
                continue
            name, row = self.where.pop(video_id)
            entries[name]["drop"] = sorted(set(entries[name]["drop"]) | {row})
            dropped += 1
        if dropped:
            self.manifest["count"] -= dropped
            self.manifest["faiss"] = self._without_index()
            self._forget_empty_parts()
        return dropped

    def commit(self) -> dict:
        """Write the manifest (sealed) atomically; a new gallery's folder is moved into place.
        Files the old manifest listed and the new one does not are deleted after it."""
        self.manifest["generation"] = self.manifest.get("generation", 0)
        self.manifest["version"] = VERSION  # a version-2 gallery written to is a version-3 one
        manifest = seal({k: v for k, v in self.manifest.items() if k != "digest"})
        if not self.exists:
            root = self._staging_root()
            files.write_synced(os.path.join(root, MANIFEST), files.to_json(manifest))
            files.move_into_place(root, self.folder)
            self.exists, self._staging = True, None
        else:
            files.write_json(os.path.join(self.folder, MANIFEST), manifest)
        self.manifest = manifest
        listed = {os.path.join(self.folder, name) for name in manifest["files"]}
        listed |= {os.path.join(self.folder, e["name"]) for e in manifest["parts"]}
        for path in self._doomed:
            if path not in listed and os.path.normpath(path) != self.folder:
                files.remove(path)
        self._doomed = []
        return manifest

    def rebuild_index(self, spec: str | None) -> None:
        """A FAISS first stage over the live rows (`spec` a shorthand or factory string; None or
        'none': no index), under a new file name so a reader of the old manifest keeps its file."""
        old = (self.manifest.get("faiss") or {}).get("file")
        self.manifest["faiss"] = None
        if spec and spec != "none" and self.manifest["count"] > 0:
            import faiss

            lat = self.live_latents()
            factory = faiss_factory(spec, len(lat))
            index, train_points = build_faiss_index(lat, factory)
            name = f"faiss-{self.manifest['generation']}-{uuid.uuid4().hex[:8]}.index"  # never a listed name
            path = os.path.join(self._staging_root() if not self.exists else self.folder, name)
            with files.atomic_path(path) as temporary:
                faiss.write_index(index, str(temporary))
            self.manifest["files"][name] = files.sha256_file(path)
            self.manifest["faiss"] = dict(faiss_record(index, spec, factory, train_points), file=name)
        if old and old != (self.manifest.get("faiss") or {}).get("file"):
            self.manifest["files"].pop(old, None)
            self._doomed.append(os.path.join(self.folder, old))

    def live_latents(self):
        """The global latent vectors of the live rows, in row order (a Rows view: no copy)."""
        pieces = []
        root = self._staging_root() if not self.exists else self.folder
        for entry in self.manifest["parts"]:
            lat, _ = _read_embeddings(part_folder(root, entry["name"]), entry["count"], self.manifest)
            drop = entry.get("drop") or []
            live = np.setdiff1d(np.arange(entry["count"]), drop) if drop else None
            pieces.append((lat[:, 0], live))
        return Rows(pieces)

    # -----------------------------------------------------------------------------------------

    def _without_index(self):
        """Rows changed: the FAISS index no longer matches them; rebuild_index makes a new one."""
        record = self.manifest.get("faiss")
        if record:
            self.manifest.setdefault("faiss_spec", record.get("shorthand", record["factory"]))
            self.manifest["files"].pop(record["file"], None)
            self._doomed.append(os.path.join(self.folder, record["file"]))
        return None

    def _forget_empty_parts(self) -> None:
        kept = []
        for entry in self.manifest["parts"]:
            # The folder itself (a gallery written at once) is never deleted: it holds the manifest.
            if len(set(entry["drop"])) < entry["count"] or entry["name"] == ROOT_PART:
                kept.append(entry)
                continue
            prefix = entry["name"] + "/"
            self.manifest["files"] = {k: v for k, v in self.manifest["files"].items() if not k.startswith(prefix)}
            self._doomed.append(os.path.join(self.folder, entry["name"]))
        self.manifest["parts"] = kept

    def _staging_root(self) -> str:
        """Where parts are written: the gallery itself, or the folder a new gallery is built in."""
        if self.exists:
            return self.folder
        if getattr(self, "_staging", None) is None:
            self._staging = str(files.make_staging(self.folder))
        return self._staging

    def _clean_unlisted(self) -> None:
        """Parts a killed writer wrote but never listed (the caller holds the lock: nobody else
        is writing), and hidden part folders in progress."""
        listed = {e["name"] for e in self.manifest["parts"]}
        folder = os.path.join(self.folder, PARTS)
        if not os.path.isdir(folder):
            return
        for name in os.listdir(folder):
            if f"{PARTS}/{name}" not in listed:
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def _write_part_files(work: str, ids: list, lat, con, segments, records, thumbnails, dtype) -> dict:
    from safetensors.numpy import save_file

    written = {}

    def done(name: str) -> None:
        path = os.path.join(work, name)
        os.chmod(path, files.FILE_MODE)  # safetensors creates 0600: a server running as another user reads it
        files.fsync_file(path)
        written[name] = files.sha256_file(path)

    files.write_synced(os.path.join(work, IDS), "".join(f"{v}\n" for v in ids))
    written[IDS] = files.sha256_file(os.path.join(work, IDS))
    with files.safetensors_errors(os.path.join(work, EMBEDDINGS)):
        save_file({"lat": np.ascontiguousarray(lat), "con": np.ascontiguousarray(con)}, os.path.join(work, EMBEDDINGS))
    done(EMBEDDINGS)
    if segments is not None:
        seg_lat, seg_row, seg_span = segments
        with files.safetensors_errors(os.path.join(work, SEGMENTS)):
            save_file({"lat": np.ascontiguousarray(seg_lat.astype(dtype)), "row": np.ascontiguousarray(seg_row),
                       "span": np.ascontiguousarray(seg_span)}, os.path.join(work, SEGMENTS))
        done(SEGMENTS)
    if thumbnails is not None:
        os.makedirs(os.path.join(work, THUMBS))
        for row, jpeg in enumerate(thumbnails):
            if jpeg:
                name = f"{THUMBS}/{row}.jpg"
                files.write_synced(os.path.join(work, name), jpeg)
                written[name] = files.sha256_file(os.path.join(work, name))
                records[row]["thumbnail"] = name
    if records is not None:
        files.write_synced(os.path.join(work, VIDEOS), "".join(files.to_json(r, indent=None) for r in records))
        written[VIDEOS] = files.sha256_file(os.path.join(work, VIDEOS))
    return written


__all__ = ["FAISS_FILE", "GalleryWriter", "PARTS"]
