"""BigFile, the feature-folder format of the MSR-VTT release: read through a memory map, written
atomically and streamed.

    FeatureData/<feature>/feature.bin       raw float32 little-endian, row-major N x D, no header
    FeatureData/<feature>/shape.txt         one line: "N D"
    FeatureData/<feature>/id.txt            the N row ids, whitespace-separated
    FeatureData/<feature>/video2frames.txt  optional: Python dict literal video id -> [frame ids]

Readers accept the files exactly as the release ships them; the writer produces files RIVRL's code
reads. Problems are one-line :class:`engine.formats.DataFormatError` messages naming the file.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from engine import files, locks
from engine.errors import InputError, MissingEntryError
from engine.formats import COUNT, DataFormatError, check_token, read_text, show, text_lines

FEATURE_FILE = "feature.bin"
SHAPE_FILE = "shape.txt"
ID_FILE = "id.txt"
VIDEO2FRAMES_FILE = "video2frames.txt"
# The release stores little-endian float32 whatever machine reads it.
FEATURE_DTYPE = np.dtype("<f4")
# id.txt is split the way RIVRL splits it (bytes.split): on ASCII whitespace only, so a
# non-breaking space decoded from ISO-8859-1 stays inside an id instead of cutting it in two.
_ASCII_TOKEN = re.compile(r"[^ \t\n\r\x0b\x0c]+")


# --------------------------------------------------------------------------------------------
# BigFile: feature.bin + shape.txt + id.txt (+ video2frames.txt)
# --------------------------------------------------------------------------------------------


def _parse_shape(path: Path) -> tuple[int, int]:
    """shape.txt: exactly one non-blank line holding two positive integers ``N D``."""
    lines = [(no, line) for no, line in enumerate(text_lines(read_text(path)), 1) if line.strip()]
    if not lines:
        raise DataFormatError(path, "empty, expected one line 'N D'")
    if len(lines) > 1:
        raise DataFormatError(path, "expected one line 'N D', found another line", lines[1][0])
    line_no, line = lines[0]
    fields = line.split()
    if len(fields) != 2 or not all(COUNT.fullmatch(f) for f in fields):
        raise DataFormatError(path, f"expected two positive integers 'N D', found {show(line)}", line_no)
    n, dim = int(fields[0]), int(fields[1])
    if n <= 0 or dim <= 0:
        raise DataFormatError(path, f"N and D must be positive, found N={n} D={dim}", line_no)
    return n, dim


def _parse_ids(path: Path, expected: int, shape_path: Path) -> list[str]:
    """id.txt: ``expected`` unique ids separated by any ASCII whitespace (one line or many)."""
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for line_no, line in enumerate(read_text(path).split("\n"), 1):
        for token in _ASCII_TOKEN.findall(line):
            if token in first_line:
                raise DataFormatError(
                    path, f"duplicate id {show(token)} (first on line {first_line[token]})", line_no
                )
            first_line[token] = line_no
            ids.append(token)
    if len(ids) != expected:
        raise DataFormatError(path, f"has {len(ids)} ids but {shape_path} says N={expected}")
    return ids


def _check_feature_size(path: Path, n: int, dim: int) -> None:
    """feature.bin must hold exactly N*D float32 values: no header, no trailing bytes."""
    try:
        found = path.stat().st_size
    except FileNotFoundError:
        raise DataFormatError(path, "file not found") from None
    if not path.is_file():
        raise DataFormatError(path, "is not a regular file")
    expected = n * dim * FEATURE_DTYPE.itemsize
    if found != expected:
        raise DataFormatError(
            path,
            f"size mismatch: expected {expected} bytes (N={n} x D={dim} x 4), found {found} bytes",
        )


# Nodes a Python literal may contain; anything else (a call, a name, an attribute...) is code.
_LITERAL_NODES = (
    ast.Expression, ast.Constant, ast.Dict, ast.List, ast.Tuple, ast.Set, ast.Load,
    ast.UnaryOp, ast.UAdd, ast.USub, ast.BinOp, ast.Add, ast.Sub,
)


def _parse_video2frames(path: Path, known_ids: Sequence[str] | set[str]) -> dict[str, list[str]]:
    """video2frames.txt: a dict literal video id -> ordered frame ids, read as data only.

    It is parsed with ``ast.literal_eval`` (never ``eval``): a file holding code is rejected,
    not run. Every frame id must be a row of the same feature folder.
    """
    text = read_text(path)
    try:
        tree = ast.parse(text, filename=str(path), mode="eval")
    except SyntaxError as e:
        raise DataFormatError(path, f"not a Python literal: {e.msg}", e.lineno) from None
    except (ValueError, RecursionError, MemoryError) as e:  # NUL bytes, absurd nesting
        raise DataFormatError(path, f"not a Python literal: {type(e).__name__}") from None
    try:
        value = ast.literal_eval(tree)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        bad = next((n for n in ast.walk(tree) if not isinstance(n, _LITERAL_NODES)), None)
        kind = type(bad).__name__ if bad is not None else "expression"
        line = getattr(bad, "lineno", None)
        raise DataFormatError(
            path, f"not a Python literal (found {kind}); it is read as data, never executed", line
        ) from None
    if not isinstance(value, dict):
        raise DataFormatError(path, f"expected a dict literal, found {type(value).__name__}", 1)

    # Line numbers for the checks below come from the syntax tree's dict keys.
    keys = tree.body.keys if isinstance(tree.body, ast.Dict) else []
    key_line: dict[object, int] = {}
    for key in keys:
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            if key.value in key_line:  # literal_eval would silently keep only the last entry
                raise DataFormatError(path, f"duplicate video id {show(key.value)}", key.lineno)
            key_line[key.value] = key.lineno

    known = known_ids if isinstance(known_ids, (set, dict)) else set(known_ids)
    for video_id, frames in value.items():
        line = key_line.get(video_id)
        if not isinstance(video_id, str):
            raise DataFormatError(path, f"video id {show(video_id)} is not a str")
        if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
            raise DataFormatError(path, f"frames of {show(video_id)} must be a list of str", line)
        missing = next((f for f in frames if f not in known), None)
        if missing is not None:
            raise DataFormatError(
                path, f"frame {show(missing)} of video {show(video_id)} is not in {ID_FILE}", line
            )
    return value


class BigFile:
    """A feature folder (feature.bin, shape.txt, id.txt, optional video2frames.txt), validated
    on open and read through a read-only memory map.

    ``ids``, ``n`` and ``dim`` describe the rows; ``vectors`` is the ``(n, dim)`` '<f4' memmap.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            what = "is not a directory" if self.folder.exists() else "feature folder not found"
            raise DataFormatError(self.folder, what)
        self.shape_file = self.folder / SHAPE_FILE
        self.id_file = self.folder / ID_FILE
        self.binary_file = self.folder / FEATURE_FILE
        self.video2frames_file = self.folder / VIDEO2FRAMES_FILE

        self.n, self.dim = _parse_shape(self.shape_file)
        _check_feature_size(self.binary_file, self.n, self.dim)
        self.ids: list[str] = _parse_ids(self.id_file, self.n, self.shape_file)
        self._index = {id_: i for i, id_ in enumerate(self.ids)}
        # Memory-mapped so opening a multi-GB release costs nothing until rows are read.
        self.vectors = np.memmap(self.binary_file, dtype=FEATURE_DTYPE, mode="r", shape=(self.n, self.dim))
        self._video2frames: dict[str, list[str]] | None = None

    # -- container protocol -------------------------------------------------------------------

    def __len__(self) -> int:
        return self.n

    def __contains__(self, id_: object) -> bool:
        return id_ in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __repr__(self) -> str:
        return f"BigFile({str(self.folder)!r}, n={self.n}, dim={self.dim})"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.dim)

    def index_of(self, id_: str) -> int:
        """Row number of ``id_``; KeyError naming the id and the id file when absent."""
        try:
            return self._index[id_]
        except (KeyError, TypeError):
            raise MissingEntryError(f"id {show(id_)} is not in {self.id_file}") from None

    # -- reading rows -------------------------------------------------------------------------

    def read(self, ids: Iterable[str]) -> np.ndarray:
        """Rows of ``ids`` in the requested order, as a fresh ``(len(ids), dim)`` float32 array."""
        if isinstance(ids, str):
            raise TypeError("read() takes a sequence of ids; use read_one() for a single id")
        rows = [self.index_of(id_) for id_ in ids]
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Fancy indexing copies; the explicit dtype makes the result native float32 even on a
        # big-endian machine.
        return np.asarray(self.vectors[np.asarray(rows, dtype=np.intp)], dtype=np.float32)

    def read_one(self, id_: str) -> np.ndarray:
        """Row of one id as a fresh ``(dim,)`` float32 array."""
        return np.array(self.vectors[self.index_of(id_)], dtype=np.float32)

    # -- frames -------------------------------------------------------------------------------

    @property
    def has_video2frames(self) -> bool:
        return self.video2frames_file.is_file()

    def video2frames(self) -> dict[str, list[str]]:
        """The parsed video2frames.txt (cached; do not mutate). DataFormatError if missing."""
        if self._video2frames is None:
            self._video2frames = _parse_video2frames(self.video2frames_file, self._index)
        return self._video2frames

    def frames_of(self, video_id: str) -> np.ndarray:
        """Frame features of one video, ``(F, dim)`` float32, in frame order."""
        mapping = self.video2frames()
        if video_id not in mapping:
            raise MissingEntryError(f"video {show(video_id)} is not in {self.video2frames_file}")
        return self.read(mapping[video_id])

    def video_ids(self) -> list[str]:
        """Videos this folder describes: video2frames keys when present, else the row ids."""
        return list(self.video2frames()) if self.has_video2frames else list(self.ids)


# --------------------------------------------------------------------------------------------
# Writing feature folders
# --------------------------------------------------------------------------------------------


def _as_f4_rows(rows: object, dim: int, n_ids: int) -> np.ndarray:
    """Validate one block of rows and return it as C-contiguous '<f4' (the on-disk layout)."""
    arr = np.asarray(rows)
    if arr.ndim != 2:
        raise InputError(f"rows must be a 2-D array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise InputError(f"rows must hold real numbers, got dtype {arr.dtype}")
    if arr.shape[1] != dim:
        raise InputError(f"rows have {arr.shape[1]} columns, expected dim={dim}")
    if arr.shape[0] != n_ids:
        raise InputError(f"got {n_ids} ids for {arr.shape[0]} rows")
    # float64 values beyond float32 range become inf here and are caught just below.
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=FEATURE_DTYPE)
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        raise InputError(f"row {int(np.argmin(finite))} of this block has a non-finite value (NaN/inf)")
    return out


def _check_video2frames(mapping: object) -> dict[str, list[str]]:
    """A writer-side check of a video2frames mapping; returns a plain dict of lists of str."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"video2frames must be a mapping, got {type(mapping).__name__}")
    plain: dict[str, list[str]] = {}
    for video_id, frames in mapping.items():
        check_token(video_id, "video id")
        if isinstance(frames, str) or not isinstance(frames, Iterable):
            raise TypeError(f"frames of video {show(video_id)} must be a list of frame ids")
        plain[video_id] = [check_token(f, "frame id") for f in frames]
    return plain


class BigFileWriter:
    """Streams rows into a new feature folder, atomically.

    Rows go to a hidden temporary sibling folder as they arrive (so features of many frames
    never need to sit in memory together); ``close()`` writes shape.txt, id.txt and the optional
    video2frames.txt and renames the folder into place. On an exception inside ``with`` the
    temporary folder is removed and the previous target, if any, is left untouched::

        with BigFileWriter(folder, dim) as w:
            for ids, rows in chunks:
                w.add(ids, rows)
    """

    def __init__(self, folder: str | os.PathLike, dim: int):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise InputError(f"dim must be a positive int, got {dim!r}")
        self.folder = Path(folder)
        self.dim = int(dim)
        if os.path.lexists(self.folder) and not self.folder.is_dir():
            raise InputError(f"{self.folder} exists and is not a directory")
        self._lock = contextlib.ExitStack()  # one writer of the folder at a time, until close/abort
        self._lock.enter_context(locks.lock(self.folder))
        try:
            self._tmp = files.make_staging(self.folder)
        except BaseException:
            self._lock.close()
            raise
        try:
            # Held open across add() calls to stream rows; closed in close()/abort().
            self._bin = open(self._tmp / FEATURE_FILE, "wb")  # noqa: SIM115
        except BaseException:
            files.remove(self._tmp)
            self._lock.close()
            raise
        self.ids: list[str] = []
        self._seen: set[str] = set()
        self._video2frames: dict[str, list[str]] | None = None
        self._from_add_video = False
        self._extra: dict = {}
        self._feature_digest = hashlib.sha256()
        self.closed = False

    @property
    def n(self) -> int:
        """Rows written so far."""
        return len(self.ids)

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"writer for {self.folder} is already closed")

    def add(self, ids: Iterable[str], rows: object) -> None:
        """Append rows (2-D, ``len(ids)`` x dim, finite reals) under new, unique ids.

        Everything is validated before anything is written, so a rejected block leaves the
        writer as it was.
        """
        self._check_open()
        if isinstance(ids, str):
            raise TypeError("ids must be a sequence of ids, not one str")
        ids = list(ids)
        block = _as_f4_rows(rows, self.dim, len(ids))
        fresh: set[str] = set()
        for id_ in ids:
            check_token(id_, "id")
            if id_ in self._seen or id_ in fresh:
                raise InputError(f"duplicate id {show(id_)}")
            fresh.add(id_)
        payload = block.tobytes()
        self._bin.write(payload)
        self._feature_digest.update(payload)  # hashed as it streams: no second read of a large file
        self.ids.extend(ids)
        self._seen |= fresh

    def add_video(self, video_id: str, frame_ids: Sequence[str], rows: object) -> None:
        """Append one video's frame rows and record its entry in video2frames.txt."""
        self._check_open()
        check_token(video_id, "video id")
        if self._video2frames is not None and not self._from_add_video:
            raise ValueError("set_video2frames() was already called; do not mix it with add_video()")
        if self._video2frames is not None and video_id in self._video2frames:
            raise ValueError(f"duplicate video id {show(video_id)}")
        frame_ids = list(frame_ids)
        self.add(frame_ids, rows)
        if self._video2frames is None:
            self._video2frames, self._from_add_video = {}, True
        self._video2frames[video_id] = frame_ids

    def set_video2frames(self, mapping: Mapping[str, Sequence[str]]) -> None:
        """Give the whole video2frames mapping at once (checked against the ids at close)."""
        self._check_open()
        if self._from_add_video:
            raise ValueError("add_video() was already used; do not mix it with set_video2frames()")
        self._video2frames = _check_video2frames(mapping)

    def add_file(self, name: str, data) -> None:
        """Another file to write into the folder at close (e.g. an anchor store's metadata), so the
        folder appears complete or not at all. `data`: bytes, str, or a function of the BigFile's
        files' sha256 ({name: hex}) returning either, for metadata that records them."""
        self._check_open()
        if os.path.basename(name) != name or name in (FEATURE_FILE, SHAPE_FILE, ID_FILE, VIDEO2FRAMES_FILE):
            raise ValueError(f"extra file name {name!r} must be a plain name, not one of the BigFile's own")
        self._extra[name] = data

    def _finish_files(self) -> None:
        """Complete the temporary folder: feature.bin synced, then the three text files."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        # Exactly what RIVRL's txt2bin writes: "N D" and the ids space-joined on one line.
        files.write_synced(self._tmp / SHAPE_FILE, f"{self.n} {self.dim}".encode("ascii"))
        files.write_synced(self._tmp / ID_FILE, " ".join(self.ids).encode("utf-8"))
        if self._video2frames is not None:
            for video_id, frames in self._video2frames.items():
                missing = next((f for f in frames if f not in self._seen), None)
                if missing is not None:
                    raise ValueError(f"frame {show(missing)} of video {show(video_id)} has no row")
            # repr of a plain dict of lists of str: what RIVRL writes and literal_eval reads.
            files.write_synced(self._tmp / VIDEO2FRAMES_FILE, repr(self._video2frames).encode("utf-8"))
        digests = {FEATURE_FILE: self._feature_digest.hexdigest()}
        for name in (SHAPE_FILE, ID_FILE, VIDEO2FRAMES_FILE):
            if (self._tmp / name).is_file():
                digests[name] = files.sha256_file(self._tmp / name)
        for name, data in self._extra.items():
            files.write_synced(self._tmp / name, data(digests) if callable(data) else data)

    def close(self) -> Path:
        """Finish the folder and rename it into place; returns the target path."""
        if self.closed:
            return self.folder
        try:
            if not self.ids:
                raise ValueError(f"no rows were added for {self.folder}; a feature folder needs N > 0")
            self._finish_files()
            files.move_into_place(self._tmp, self.folder)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self._lock.close()
        return self.folder

    def abort(self) -> None:
        """Drop everything written so far; the target is left as it was."""
        if not self._bin.closed:
            self._bin.close()
        files.remove(self._tmp)
        self.closed = True
        self._lock.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_bigfile(
    folder: str | os.PathLike,
    ids: Sequence[str],
    array: object,
    video2frames: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Write a whole feature folder atomically (see :class:`BigFileWriter`); returns its path."""
    arr = np.asarray(array)
    if arr.ndim != 2:
        raise ValueError(f"array must be 2-D, got shape {arr.shape}")
    with BigFileWriter(folder, arr.shape[1]) as writer:
        writer.add(ids, arr)
        if video2frames is not None:
            writer.set_video2frames(video2frames)
    return Path(folder)
