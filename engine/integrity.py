"""Digests that vouch for what a load trusts (standard library only).

Each manifest (a gallery's manifest.json, a checkpoint's config.json, an export's manifest.json,
an anchor store's anchor_meta.json) records the sha256 of every file it describes, and is itself
sealed: its "digest" field is the sha256 of its own canonical JSON without that field, so an
edited field (another checkpoint id, a count, a dimension) is caught like a damaged file.

Hashing a large gallery at every load costs seconds (sha256 runs at ~1.6 GB/s), so a folder keeps
a verified stamp (`.verified.json`): the (size, mtime_ns, inode) of each file at the moment its
digest last matched. A file whose stat still matches is not read again; anything that rewrites a
file changes at least its mtime or inode. `cvr doctor` always rehashes.
"""
from __future__ import annotations

import hashlib
import json
import os

from engine import files
from engine.errors import CVRError

SEAL = "digest"
STAMP = ".verified.json"


class IntegrityError(CVRError):
    """A file or manifest whose contents do not match the digest recorded when it was written."""


def _canonical(value: dict) -> bytes:
    body = {k: v for k, v in value.items() if k != SEAL}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def seal(value: dict) -> dict:
    """`value` with its "digest" field set to the sha256 of the rest of it."""
    return {**value, SEAL: hashlib.sha256(_canonical(value)).hexdigest()}


def is_sealed(value: dict) -> bool:
    return isinstance(value.get(SEAL), str)


def check_seal(value: dict, path: str, hint: str, error: type = IntegrityError) -> bool:
    """Refuse (one line naming `path`) a manifest whose fields were edited or damaged since it was
    sealed. Returns False for a manifest written before seals were recorded (it loads as before)."""
    if SEAL not in value:
        return False
    if not is_sealed(value) or hashlib.sha256(_canonical(value)).hexdigest() != value[SEAL]:
        raise error(f"{path}: edited or damaged (its fields do not match its digest): {hint}")
    return True


def verify_files(folder: str, digests: dict, hint: str, error: type = IntegrityError, rehash: bool = False) -> list:
    """Check each file `folder/name` against its recorded sha256 ({name: hex}); one line naming the
    first file that is missing or differs. Files the folder's verified stamp vouches for (same
    digest, size, mtime_ns and inode) are not read again unless `rehash`. Returns the names hashed."""
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise error(f"{folder}: its manifest's list of file digests is malformed: {hint}")
    stamp_path = os.path.join(folder, STAMP)
    stamp = files.read_json_object(stamp_path) or {}
    hashed = []
    for name, expected in digests.items():
        path = os.path.join(folder, name)
        try:
            status = os.stat(path)
        except FileNotFoundError:
            raise error(f"{path}: missing: {hint}") from None
        key = {"sha256": expected, "size": status.st_size, "mtime_ns": status.st_mtime_ns, "inode": status.st_ino}
        if not rehash and stamp.get(name) == key:
            continue
        if files.sha256_file(path) != expected:
            raise error(f"{path}: checksum mismatch (file damaged or edited): {hint}")
        stamp[name] = key
        hashed.append(name)
    if hashed:
        try:
            files.write_json(stamp_path, stamp)
        except OSError:
            pass  # a read-only folder: the files are hashed again at the next load
    return hashed

