"""On-disk data formats of the MSR-VTT feature release of the dual-encoding / RIVRL line.

Every reader here accepts the files exactly as that release ships them, and every writer produces
files the original RIVRL code reads, so each command runs unchanged on the real data.

Layout of one collection (``<root>/<collection>/``)::

    FeatureData/<feature>/feature.bin       raw float32 little-endian, row-major N x D, no header
    FeatureData/<feature>/shape.txt         one line: "N D"
    FeatureData/<feature>/id.txt            the N row ids, whitespace-separated
    FeatureData/<feature>/video2frames.txt  optional: Python dict literal video id -> [frame ids]
    TextData/<collection>{train,val,test}.caption.txt      "<cap_id> <caption>" per line
    TextData/tags/video_label_th_1.txt                     "<video_id>\\t<tag>:<count> ..."
    TextData/tags/video_label_th_1/tag_vocab_<size>.json   JSON list of tag strings

Every problem with a file's contents is a :class:`DataFormatError` whose message is one line,
``"<path>:<line>: <what>"`` (or ``"<path>: <what>"`` when no line applies), so a user can jump
straight to the offending spot. Bad arguments to a writer are plain ``ValueError``/``TypeError``:
they are the caller's mistake, not a file's.

Writers are atomic: everything is written beside the target under a hidden temporary name, synced,
then renamed into place, so a crash leaves either the old complete file/folder or the new one.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "SPLITS",
    "BigFile",
    "BigFileWriter",
    "Collection",
    "DataFormatError",
    "read_captions",
    "read_tag_vocab",
    "read_tags",
    "tag_targets",
    "video_id_of",
    "write_bigfile",
    "write_captions",
    "write_tag_vocab",
    "write_tags",
]

FEATURE_FILE = "feature.bin"
SHAPE_FILE = "shape.txt"
ID_FILE = "id.txt"
VIDEO2FRAMES_FILE = "video2frames.txt"
# The release stores little-endian float32 whatever machine reads it.
FEATURE_DTYPE = np.dtype("<f4")
SPLITS = ("train", "val", "test")
# Suffixes the release sometimes leaves on video ids inside caption ids (RIVRL's getVideoId).
_VIDEO_SUFFIXES = (".mp4", ".jpg")
# id.txt is split the way RIVRL splits it (bytes.split): on ASCII whitespace only, so a
# non-breaking space decoded from ISO-8859-1 stays inside an id instead of cutting it in two.
_ASCII_TOKEN = re.compile(r"[^ \t\n\r\x0b\x0c]+")
_COUNT = re.compile(r"[0-9]+")


# --------------------------------------------------------------------------------------------
# Errors and small helpers
# --------------------------------------------------------------------------------------------


class DataFormatError(ValueError):
    """A data file is missing or malformed.

    The message is always one line: ``"<path>:<line>: <what>"``, or ``"<path>: <what>"`` when
    no single line is to blame. ``path``, ``line`` and ``what`` are also kept as attributes.
    """

    def __init__(self, path: str | os.PathLike, what: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.what = what
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(_one_line(f"{where}: {what}"))

    def __reduce__(self):
        # Keep the error picklable (e.g. across multiprocessing workers) despite the custom
        # constructor signature.
        return (type(self), (self.path, self.what, self.line))


def _one_line(text: str) -> str:
    """Escape line breaks so a message stays on one line even when it quotes file content."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _show(value: object, limit: int = 60) -> str:
    """``repr`` of a value from a file, shortened so one bad line cannot flood a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode(data: bytes) -> str:
    """Decode file bytes as UTF-8 (dropping a BOM), falling back to ISO-8859-1.

    ISO-8859-1 maps every byte to a character, so the fallback never fails; it is what RIVRL's
    BigFile uses for id.txt.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("iso-8859-1")


def _read_text(path: Path) -> str:
    """Whole file as text; a missing file is a DataFormatError naming it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataFormatError(path, "file not found") from None
    except IsADirectoryError:
        raise DataFormatError(path, "is a directory, expected a file") from None
    except NotADirectoryError:
        raise DataFormatError(path, "a parent of this path is not a directory") from None
    return _decode(data)


def _text_lines(text: str) -> list[str]:
    """Lines of a text file with universal newlines, like Python's text-mode ``open``."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start a new one
    return lines


def _has_space(text: str) -> bool:
    return any(ch.isspace() for ch in text)


def _check_token(value: object, what: str) -> str:
    """A writer-side id check: a non-empty str without whitespace (the formats split on it)."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, got {type(value).__name__}: {_show(value)}")
    if not value or _has_space(value):
        raise ValueError(f"{what} must be non-empty and contain no whitespace: {_show(value)}")
    return value


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (galleries, exports and engines record these)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself is still atomic
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Write and fsync one file (inside a temporary folder, so it need not be atomic itself)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically: temp file beside it, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


# --------------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------------


def video_id_of(cap_id: str) -> str:
    """The video id of a caption id, as RIVRL's ``getVideoId`` computes it.

    The video id is what precedes the first ``#``; a trailing ``.mp4``/``.jpg`` is dropped
    (once): ``video7010#enc#3`` -> ``video7010``, ``v1.mp4#0`` -> ``v1``.
    """
    video_id = cap_id.split("#", 1)[0]
    for suffix in _VIDEO_SUFFIXES:
        if video_id.endswith(suffix):
            return video_id[: -len(suffix)]
    return video_id


# --------------------------------------------------------------------------------------------
# BigFile: feature.bin + shape.txt + id.txt (+ video2frames.txt)
# --------------------------------------------------------------------------------------------


def _parse_shape(path: Path) -> tuple[int, int]:
    """shape.txt: exactly one non-blank line holding two positive integers ``N D``."""
    lines = [(no, line) for no, line in enumerate(_text_lines(_read_text(path)), 1) if line.strip()]
    if not lines:
        raise DataFormatError(path, "empty, expected one line 'N D'")
    if len(lines) > 1:
        raise DataFormatError(path, "expected one line 'N D', found another line", lines[1][0])
    line_no, line = lines[0]
    fields = line.split()
    if len(fields) != 2 or not all(_COUNT.fullmatch(f) for f in fields):
        raise DataFormatError(path, f"expected two positive integers 'N D', found {_show(line)}", line_no)
    n, dim = int(fields[0]), int(fields[1])
    if n <= 0 or dim <= 0:
        raise DataFormatError(path, f"N and D must be positive, found N={n} D={dim}", line_no)
    return n, dim


def _parse_ids(path: Path, expected: int, shape_path: Path) -> list[str]:
    """id.txt: ``expected`` unique ids separated by any ASCII whitespace (one line or many)."""
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for line_no, line in enumerate(_read_text(path).split("\n"), 1):
        for token in _ASCII_TOKEN.findall(line):
            if token in first_line:
                raise DataFormatError(
                    path, f"duplicate id {_show(token)} (first on line {first_line[token]})", line_no
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
    text = _read_text(path)
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
                raise DataFormatError(path, f"duplicate video id {_show(key.value)}", key.lineno)
            key_line[key.value] = key.lineno

    known = known_ids if isinstance(known_ids, (set, dict)) else set(known_ids)
    for video_id, frames in value.items():
        line = key_line.get(video_id)
        if not isinstance(video_id, str):
            raise DataFormatError(path, f"video id {_show(video_id)} is not a str")
        if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
            raise DataFormatError(path, f"frames of {_show(video_id)} must be a list of str", line)
        missing = next((f for f in frames if f not in known), None)
        if missing is not None:
            raise DataFormatError(
                path, f"frame {_show(missing)} of video {_show(video_id)} is not in {ID_FILE}", line
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
            raise KeyError(f"id {_show(id_)} is not in {self.id_file}") from None

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
            raise KeyError(f"video {_show(video_id)} is not in {self.video2frames_file}")
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
        raise ValueError(f"rows must be a 2-D array, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"rows must hold real numbers, got dtype {arr.dtype}")
    if arr.shape[1] != dim:
        raise ValueError(f"rows have {arr.shape[1]} columns, expected dim={dim}")
    if arr.shape[0] != n_ids:
        raise ValueError(f"got {n_ids} ids for {arr.shape[0]} rows")
    # float64 values beyond float32 range become inf here and are caught just below.
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=FEATURE_DTYPE)
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        raise ValueError(f"row {int(np.argmin(finite))} of this block has a non-finite value (NaN/inf)")
    return out


def _check_video2frames(mapping: object) -> dict[str, list[str]]:
    """A writer-side check of a video2frames mapping; returns a plain dict of lists of str."""
    if not isinstance(mapping, Mapping):
        raise TypeError(f"video2frames must be a mapping, got {type(mapping).__name__}")
    plain: dict[str, list[str]] = {}
    for video_id, frames in mapping.items():
        _check_token(video_id, "video id")
        if isinstance(frames, str) or not isinstance(frames, Iterable):
            raise TypeError(f"frames of video {_show(video_id)} must be a list of frame ids")
        plain[video_id] = [_check_token(f, "frame id") for f in frames]
    return plain


def move_into_place(tmp, target) -> None:
    """Rename the finished folder ``tmp`` to ``target``, replacing an existing folder (the one
    folder swap that BigFiles, checkpoints, anchor stores and collections all use).

    An existing target is first moved aside under a hidden name, the new folder renamed in, and
    only then the old one deleted; if the second rename fails, the old folder is moved back.
    """
    tmp, target = Path(tmp), Path(target)
    if not os.path.lexists(target):
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


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
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.folder = Path(folder)
        self.dim = int(dim)
        if os.path.lexists(self.folder) and not self.folder.is_dir():
            raise ValueError(f"{self.folder} exists and is not a directory")
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        # Same parent directory, so the final rename stays on one filesystem and is atomic.
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.tmp-", dir=self.folder.parent))
        try:
            # Held open across add() calls to stream rows; closed in close()/abort().
            self._bin = open(self._tmp / FEATURE_FILE, "wb")  # noqa: SIM115
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self.ids: list[str] = []
        self._seen: set[str] = set()
        self._video2frames: dict[str, list[str]] | None = None
        self._from_add_video = False
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
            _check_token(id_, "id")
            if id_ in self._seen or id_ in fresh:
                raise ValueError(f"duplicate id {_show(id_)}")
            fresh.add(id_)
        self._bin.write(block.tobytes())
        self.ids.extend(ids)
        self._seen |= fresh

    def add_video(self, video_id: str, frame_ids: Sequence[str], rows: object) -> None:
        """Append one video's frame rows and record its entry in video2frames.txt."""
        self._check_open()
        _check_token(video_id, "video id")
        if self._video2frames is not None and not self._from_add_video:
            raise ValueError("set_video2frames() was already called; do not mix it with add_video()")
        if self._video2frames is not None and video_id in self._video2frames:
            raise ValueError(f"duplicate video id {_show(video_id)}")
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

    def _finish_files(self) -> None:
        """Complete the temporary folder: feature.bin synced, then the three text files."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        # Exactly what RIVRL's txt2bin writes: "N D" and the ids space-joined on one line.
        _write_file(self._tmp / SHAPE_FILE, f"{self.n} {self.dim}".encode("ascii"))
        _write_file(self._tmp / ID_FILE, " ".join(self.ids).encode("utf-8"))
        if self._video2frames is not None:
            for video_id, frames in self._video2frames.items():
                missing = next((f for f in frames if f not in self._seen), None)
                if missing is not None:
                    raise ValueError(f"frame {_show(missing)} of video {_show(video_id)} has no row")
            # repr of a plain dict of lists of str: what RIVRL writes and literal_eval reads.
            _write_file(self._tmp / VIDEO2FRAMES_FILE, repr(self._video2frames).encode("utf-8"))
        fsync_dir(self._tmp)

    def close(self) -> Path:
        """Finish the folder and rename it into place; returns the target path."""
        if self.closed:
            return self.folder
        try:
            if not self.ids:
                raise ValueError(f"no rows were added for {self.folder}; a feature folder needs N > 0")
            self._finish_files()
            move_into_place(self._tmp, self.folder)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        return self.folder

    def abort(self) -> None:
        """Drop everything written so far; the target is left as it was."""
        if not self._bin.closed:
            self._bin.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self.closed = True

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


# --------------------------------------------------------------------------------------------
# Captions: "<cap_id> <caption>" per line
# --------------------------------------------------------------------------------------------


def read_captions(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(cap_id, caption)`` pairs in file order.

    Each line is split on its first run of whitespace; blank lines are skipped. A line with no
    caption text, an empty cap_id (a line starting with whitespace, or one whose video id part
    before ``#`` is empty) or a repeated cap_id is a DataFormatError naming ``path:line``.
    """
    path = Path(path)
    pairs: list[tuple[str, str]] = []
    first_line: dict[str, int] = {}
    for line_no, raw in enumerate(_text_lines(_read_text(path)), 1):
        line = raw.rstrip()
        if not line:
            continue
        if line[0].isspace():
            raise DataFormatError(path, "empty cap_id (line starts with whitespace)", line_no)
        fields = line.split(None, 1)
        cap_id = fields[0]
        if len(fields) < 2:
            raise DataFormatError(path, f"cap_id {_show(cap_id)} has no caption text", line_no)
        if not video_id_of(cap_id):
            raise DataFormatError(path, f"cap_id {_show(cap_id)} has an empty video id", line_no)
        if cap_id in first_line:
            raise DataFormatError(
                path, f"duplicate cap_id {_show(cap_id)} (first on line {first_line[cap_id]})", line_no
            )
        first_line[cap_id] = line_no
        pairs.append((cap_id, fields[1]))
    return pairs


def write_captions(path: str | os.PathLike, pairs: Iterable[tuple[str, str]]) -> Path:
    """Write ``(cap_id, caption)`` pairs atomically, one ``"<cap_id> <caption>"`` per line.

    Captions must be one line without surrounding whitespace, so that :func:`read_captions`
    gives back exactly the same pairs.
    """
    lines: list[str] = []
    seen: set[str] = set()
    for cap_id, caption in pairs:
        _check_token(cap_id, "cap_id")
        if cap_id in seen:
            raise ValueError(f"duplicate cap_id {_show(cap_id)}")
        seen.add(cap_id)
        if not isinstance(caption, str):
            raise TypeError(f"caption of {_show(cap_id)} must be str, got {type(caption).__name__}")
        if not caption or caption != caption.strip() or len(caption.splitlines()) != 1:
            raise ValueError(
                f"caption of {_show(cap_id)} must be one non-empty line without surrounding "
                f"whitespace: {_show(caption)}"
            )
        lines.append(f"{cap_id} {caption}\n")
    return _atomic_write_text(path, "".join(lines))


# --------------------------------------------------------------------------------------------
# Tags: "<video_id>\t<tag>:<count> ..." and the JSON tag vocabulary
# --------------------------------------------------------------------------------------------


def _parse_tag_counts(path: Path, line_no: int, text: str) -> dict[str, int]:
    """The part after the tab: ``tag:count`` tokens; a tag may contain ':' (split on the last)."""
    counts: dict[str, int] = {}
    for token in text.split():
        tag, colon, count = token.rpartition(":")
        if not colon or not tag:
            raise DataFormatError(path, f"malformed tag:count {_show(token)}", line_no)
        if not _COUNT.fullmatch(count):
            raise DataFormatError(
                path, f"count of tag {_show(tag)} is not a non-negative integer: {_show(count)}", line_no
            )
        if tag in counts:
            raise DataFormatError(path, f"tag {_show(tag)} appears twice", line_no)
        counts[tag] = int(count)
    return counts


def read_tags(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """video id -> {tag: count}, in file order; blank lines are skipped.

    The part after the tab may be empty (a video with no tags). A line without a tab, a bad
    ``tag:count``, a non-integer count or a repeated video id is a DataFormatError with
    ``path:line``.
    """
    path = Path(path)
    tags: dict[str, dict[str, int]] = {}
    first_line: dict[str, int] = {}
    for line_no, raw in enumerate(_text_lines(_read_text(path)), 1):
        if not raw.strip():
            continue
        # No strip before splitting: the tab itself must survive when nothing follows it.
        video_id, tab, rest = raw.partition("\t")
        if not tab:
            raise DataFormatError(path, "no tab between video id and tags", line_no)
        if not video_id or _has_space(video_id):
            raise DataFormatError(
                path, f"video id must be non-empty without whitespace: {_show(video_id)}", line_no
            )
        if video_id in first_line:
            raise DataFormatError(
                path, f"duplicate video id {_show(video_id)} (first on line {first_line[video_id]})", line_no
            )
        first_line[video_id] = line_no
        tags[video_id] = _parse_tag_counts(path, line_no, rest)
    return tags


def write_tags(path: str | os.PathLike, video_tags: Mapping[str, Mapping[str, int]]) -> Path:
    """Write video id -> {tag: count} atomically in the ``video_label_th_1.txt`` format."""
    lines: list[str] = []
    for video_id, counts in video_tags.items():
        _check_token(video_id, "video id")
        tokens: list[str] = []
        for tag, count in counts.items():
            _check_token(tag, "tag")
            if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
                raise ValueError(f"count of tag {_show(tag)} must be a non-negative int, got {count!r}")
            tokens.append(f"{tag}:{int(count)}")
        lines.append(f"{video_id}\t{' '.join(tokens)}\n")
    return _atomic_write_text(path, "".join(lines))


def read_tag_vocab(path: str | os.PathLike) -> list[str]:
    """The tag vocabulary: a JSON list of unique strings (whatever its size)."""
    path = Path(path)
    try:
        vocab = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataFormatError(path, f"invalid JSON: {e.msg} (column {e.colno})", e.lineno) from None
    if not isinstance(vocab, list):
        raise DataFormatError(path, f"expected a JSON list of tags, found {type(vocab).__name__}")
    seen: set[str] = set()
    for i, tag in enumerate(vocab):
        if not isinstance(tag, str):
            raise DataFormatError(path, f"entry {i} is not a string: {_show(tag)}")
        if tag in seen:
            raise DataFormatError(path, f"duplicate tag {_show(tag)} at entry {i}")
        seen.add(tag)
    return vocab


def write_tag_vocab(path: str | os.PathLike, tags: Sequence[str]) -> Path:
    """Write a tag vocabulary atomically as a JSON list of unique strings."""
    tags = list(tags)
    if any(not isinstance(t, str) for t in tags):
        raise TypeError("tags must all be str")
    if len(set(tags)) != len(tags):
        raise ValueError("tags must be unique")
    return _atomic_write_text(path, json.dumps(tags, ensure_ascii=False))


def tag_targets(
    video_tags: Mapping[str, Mapping[str, int]],
    vocab: Sequence[str],
    video_ids: Sequence[str] | None = None,
) -> np.ndarray:
    """Soft tag targets, RIVRL-style: ``(n_videos, len(vocab))`` float32.

    Row ``i`` holds each in-vocabulary tag's count divided by the largest count among that
    video's in-vocabulary tags (tags outside the vocabulary neither appear nor set the scale);
    a video with no in-vocabulary tag gets a row of zeros. Rows follow ``video_ids`` when given,
    else ``video_tags``' order.
    """
    column = {tag: j for j, tag in enumerate(vocab)}
    if len(column) != len(vocab):
        raise ValueError("vocab has duplicate tags")
    order = list(video_tags) if video_ids is None else list(video_ids)
    out = np.zeros((len(order), len(vocab)), dtype=np.float32)
    for i, video_id in enumerate(order):
        if video_id not in video_tags:
            raise KeyError(f"video {_show(video_id)} has no tag entry")
        in_vocab = [(column[t], c) for t, c in video_tags[video_id].items() if t in column]
        top = max((c for _, c in in_vocab), default=0)
        if top <= 0:
            continue  # no in-vocabulary tag (or only zero counts): nothing to normalise by
        for j, count in in_vocab:
            out[i, j] = count / top
    return out


# --------------------------------------------------------------------------------------------
# A collection folder
# --------------------------------------------------------------------------------------------


class Collection:
    """One collection under a data root, e.g. ``Collection("~/VisualSearch", "msrvtt10k")``.

    Gives the release's paths and loads its files; a missing folder or file is a
    DataFormatError naming the path.
    """

    def __init__(self, root: str | os.PathLike, name: str):
        self.root = Path(root).expanduser()
        self.name = name
        self.path = self.root / name
        if not self.path.is_dir():
            raise DataFormatError(self.path, "collection folder not found")
        self._features: dict[str, BigFile] = {}

    def __repr__(self) -> str:
        return f"Collection({str(self.root)!r}, {self.name!r})"

    # -- features -----------------------------------------------------------------------------

    def feature_dir(self, feature: str) -> Path:
        return self.path / "FeatureData" / feature

    def features(self, feature: str) -> BigFile:
        """The feature folder as a BigFile (opened once, then cached)."""
        if feature not in self._features:
            self._features[feature] = BigFile(self.feature_dir(feature))
        return self._features[feature]

    # -- captions -----------------------------------------------------------------------------

    def caption_path(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.path / "TextData" / f"{self.name}{split}.caption.txt"

    def captions(self, split: str) -> list[tuple[str, str]]:
        return read_captions(self.caption_path(split))

    def split_video_ids(self, split: str) -> list[str]:
        """Video ids of a split's captions in order of first appearance (RIVRL's read_video_ids)."""
        return list(dict.fromkeys(video_id_of(cap_id) for cap_id, _ in self.captions(split)))

    # -- tags ---------------------------------------------------------------------------------

    def tags_path(self) -> Path:
        return self.path / "TextData" / "tags" / "video_label_th_1.txt"

    def tag_vocab_path(self, size: int = 512) -> Path:
        return self.path / "TextData" / "tags" / "video_label_th_1" / f"tag_vocab_{size}.json"

    def tags(self) -> dict[str, dict[str, int]]:
        return read_tags(self.tags_path())

    def tag_vocab(self, size: int = 512) -> list[str]:
        return read_tag_vocab(self.tag_vocab_path(size))

    # -- overview -----------------------------------------------------------------------------

    def summary(self, feature: str, tag_vocab_size: int = 512) -> dict:
        """A JSON-ready overview: per split (None where its caption file is absent) the videos,
        captions and videos without features; the feature shape; frames per video (None without
        video2frames.txt); the tag vocabulary size (None without the vocabulary file).
        """
        big = self.features(feature)
        has_frames = big.has_video2frames
        with_features = set(big.video2frames()) if has_frames else set(big.ids)
        splits: dict[str, dict | None] = {}
        for split in SPLITS:
            if not self.caption_path(split).is_file():
                splits[split] = None
                continue
            captions = self.captions(split)
            videos = list(dict.fromkeys(video_id_of(cap_id) for cap_id, _ in captions))
            splits[split] = {
                "videos": len(videos),
                "captions": len(captions),
                "videos_without_features": sum(v not in with_features for v in videos),
            }
        frames = None
        if has_frames:
            counts = [len(f) for f in big.video2frames().values()]
            frames = {
                "videos": len(counts),
                "min": min(counts, default=0),
                "mean": float(np.mean(counts)) if counts else 0.0,
                "max": max(counts, default=0),
            }
        vocab_path = self.tag_vocab_path(tag_vocab_size)
        return {
            "collection": self.name,
            "root": str(self.root),
            "feature": feature,
            "vectors": big.n,
            "dim": big.dim,
            "splits": splits,
            "frames_per_video": frames,
            "tag_vocab_size": len(read_tag_vocab(vocab_path)) if vocab_path.is_file() else None,
        }
