"""The project's one error base class (standard library only).

Every error that bad input, a bad or damaged file, a full disk or a missing optional package can
cause is a `CVRError` (or an OSError): the command line prints it as one line and exits 2. Any
other exception is a bug, and keeps its traceback. The classes stay ValueErrors too, so code that
catches ValueError keeps working.
"""
from __future__ import annotations


class CVRError(ValueError):
    """A user-facing error; its message is one line."""


class InputError(CVRError):
    """Bad input to a command or function: arguments, data, or a request it cannot serve."""


class MissingEntryError(CVRError, KeyError):
    """An id, video or entry that a file does not hold (a KeyError too, for mapping-like callers)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnavailableError(CVRError):
    """A part of the service that is down or too slow (a shard actor): a server answers 503, not 400."""
