"""What every on-disk format of the MSR-VTT feature release shares: the one-line error type and
the small text-reading helpers (engine/bigfile.py and engine/datasets.py use them).

Every problem with a file's contents is a :class:`DataFormatError` whose message is one line,
``"<path>:<line>: <what>"`` (or ``"<path>: <what>"`` when no line applies), so a user can jump
straight to the offending spot.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from engine.errors import CVRError, InputError

# Non-negative decimal integers (shape.txt, tag counts).
COUNT = re.compile(r"[0-9]+")


class DataFormatError(CVRError):
    """A data file is missing or malformed.

    The message is always one line: ``"<path>:<line>: <what>"``, or ``"<path>: <what>"`` when
    no single line is to blame. ``path``, ``line`` and ``what`` are also kept as attributes.
    """

    def __init__(self, path: str | os.PathLike, what: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.what = what
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(one_line(f"{where}: {what}"))

    def __reduce__(self):
        # Keep the error picklable (e.g. across multiprocessing workers) despite the custom
        # constructor signature.
        return (type(self), (self.path, self.what, self.line))


def one_line(text: str) -> str:
    """Escape line breaks so a message stays on one line even when it quotes file content."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def show(value: object, limit: int = 60) -> str:
    """``repr`` of a value from a file, shortened so one bad line cannot flood a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode(data: bytes) -> str:
    """Decode file bytes as UTF-8 (dropping a BOM), falling back to ISO-8859-1.

    ISO-8859-1 maps every byte to a character, so the fallback never fails; it is what RIVRL's
    BigFile uses for id.txt.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("iso-8859-1")


def read_text(path: Path) -> str:
    """Whole file as text; a missing file is a DataFormatError naming it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataFormatError(path, "file not found") from None
    except IsADirectoryError:
        raise DataFormatError(path, "is a directory, expected a file") from None
    except NotADirectoryError:
        raise DataFormatError(path, "a parent of this path is not a directory") from None
    return decode(data)


def text_lines(text: str) -> list[str]:
    """Lines of a text file with universal newlines, like Python's text-mode ``open``."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start a new one
    return lines


def has_space(text: str) -> bool:
    return any(ch.isspace() for ch in text)


def check_token(value: object, what: str) -> str:
    """A writer-side id check: a non-empty str without whitespace (the formats split on it)."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, got {type(value).__name__}: {show(value)}")
    if not value or has_space(value):
        raise InputError(f"{what} must be non-empty and contain no whitespace: {show(value)}")
    return value
