"""Finding video files and reading their metadata: what `cvr index --videos` and `cvr features`
take as input (engine/ingest.py runs them)."""
from __future__ import annotations

import csv
import glob
import json
import os
from dataclasses import dataclass

from engine.errors import InputError

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".gif", ".mpg", ".mpeg", ".wmv", ".flv",
                    ".ts", ".3gp", ".ogv")


@dataclass
class Skipped:
    path: str
    kind: str
    reason: str


def find_videos(inputs: list, list_file: str | None = None) -> tuple:
    """(video files as absolute paths, in a stable order without repeats; Skipped inputs). A
    folder is walked recursively for files with a video extension (hidden files left out); a
    file named directly, by a glob or in the list is taken whatever its extension."""
    named = list(inputs or [])
    if list_file:
        try:
            with open(list_file, encoding="utf-8") as handle:
                named += [line.strip() for line in handle if line.strip() and not line.startswith("#")]
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or error
            raise InputError(f"--list {list_file}: cannot read ({reason})") from None
    found, skipped, seen = [], [], set()
    for item in named:
        for path in _expand(item, skipped):
            path = os.path.abspath(path)
            if path not in seen:
                seen.add(path)
                found.append(path)
    return found, skipped


def _expand(item: str, skipped: list) -> list:
    if os.path.isdir(item):
        walked = []

        def unreadable(error: OSError) -> None:  # a folder the walk cannot enter is reported, not skipped silently
            skipped.append(Skipped(error.filename or item, "unreadable", error.strerror or "cannot be read"))
        for folder, subfolders, names in os.walk(item, onerror=unreadable):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            walked += [os.path.join(folder, n) for n in sorted(names)
                       if not n.startswith(".") and n.lower().endswith(VIDEO_EXTENSIONS)]
        return walked
    if glob.has_magic(item):
        matched = sorted(glob.glob(item, recursive=True))
        if not matched:
            skipped.append(Skipped(item, "missing", "the pattern matches no file"))
        return [m for m in matched if os.path.isfile(m)]
    if not os.path.lexists(item):
        skipped.append(Skipped(item, "missing", "no such file or folder"))
        return []
    return [item]


def media_root_for(found: list, inputs: list) -> str:
    """The default media root of a new gallery: the one folder given, or the deepest folder that
    holds every file."""
    folders = [os.path.abspath(i) for i in inputs or [] if os.path.isdir(i)]
    if len(folders) == 1 and all(p.startswith(folders[0] + os.sep) for p in found):
        return folders[0]
    return os.path.commonpath([os.path.dirname(p) for p in found]) if found else os.getcwd()


def video_id_of(rel: str) -> str:
    """A video's id: its path under the media root without the extension ('cooking/pasta'), made
    safe to store one per line: bytes that are not UTF-8 become U+FFFD, control characters '_',
    and spaces at either end go."""
    stem, _ = os.path.splitext(rel)
    text = os.fsencode(stem).decode("utf-8", "replace").replace(os.sep, "/")
    return "".join("_" if ord(c) < 32 or ord(c) == 127 else c for c in text).strip() or "_"



# ---------------------------------------------------------------------------------------------
# Metadata


def read_metadata(path: str) -> dict:
    """{key: {field: value}} from JSON lines or CSV; the key is the record's `id` or `path`.
    CSV cells that read as numbers become numbers; a cell with ';' becomes a list (tags)."""
    text = _read_text(path)
    rows = _csv_rows(text, path) if path.lower().endswith(".csv") else _jsonl_rows(text, path)
    table = {}
    for line, row in rows:
        key = row.pop("id", None) or row.pop("path", None)
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)  # a JSON id 7 names the video "7"
        if not isinstance(key, str) or not key:
            raise InputError(f"{path}:{line}: a metadata record needs an 'id' or a 'path'")
        row.pop("path", None)
        for field_name, value in row.items():
            if not _plain_value(value):
                raise InputError(f"{path}:{line}: field {field_name!r} must be text, a finite number, true/false or "
                                 "a list of those")
        table[key] = row
    return table


def _plain_value(value) -> bool:
    import math

    if isinstance(value, list):
        return all(_plain_value(v) and not isinstance(v, list) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int, bool))


def _jsonl_rows(text: str, path: str) -> list:
    rows = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except ValueError as error:
            raise InputError(f"{path}:{line}: not a JSON object ({getattr(error, 'msg', error)})") from None
        if not isinstance(value, dict):
            raise InputError(f"{path}:{line}: not a JSON object")
        rows.append((line, value))
    return rows


def _csv_rows(text: str, path: str) -> list:
    reader = csv.DictReader(text.splitlines())
    rows = []
    for line, row in enumerate(reader, 2):
        if None in row:
            raise InputError(f"{path}:{line}: more cells than the header names")
        # ids and paths stay text ('0007' is not 7); other cells that read as numbers are numbers
        rows.append((line, {k: (v if k in ("id", "path") else _cell(v)) for k, v in row.items()
                            if k and v is not None and v != ""}))
    return rows


def _cell(text: str):
    if ";" in text:
        return [_cell(part.strip()) for part in text.split(";") if part.strip()]
    import math

    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        return value if math.isfinite(value) else text  # 'nan', 'inf', '1e400' stay text
    return text



def feature_ids(found: list, ids_file: str | None) -> dict:
    """path -> video id: the file name without its extension, or the `path,id` CSV's mapping."""
    if not ids_file:
        return {p: os.path.splitext(os.path.basename(p))[0] for p in found}
    mapping = {}
    for line, row in _csv_rows(_read_text(ids_file), ids_file):
        if not isinstance(row.get("path"), str) or "id" not in row:
            raise InputError(f"{ids_file}:{line}: needs the columns path and id")
        mapping[os.path.abspath(row["path"])] = str(row["id"])
    return {p: mapping[p] for p in found if p in mapping}


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:  # -sig: a spreadsheet's BOM
            return handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read ({getattr(error, 'strerror', None) or error})") from None

