"""One writer of a folder at a time: an OS lock (flock) on `<target>.lock` beside it (standard
library only). The OS releases it when its holder dies, killed or not; engine/files.py's staged
writers take it, and judge a dead writer's leftovers by it (`lock_state`).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

from engine.errors import CVRError

LOCK_FILE_MODE = 0o644


class LockedError(CVRError):
    """Another process holds the lock of a folder for longer than we were ready to wait."""


_HELD: dict = {}  # lock path -> [threading.RLock, depth, fd]: re-entrant within one process
_HELD_GUARD = threading.Lock()


def lock_timeout() -> float:
    """Seconds to wait for another writer (CVR_LOCK_TIMEOUT, default 600)."""
    try:
        return float(os.environ.get("CVR_LOCK_TIMEOUT", "600"))
    except ValueError:
        return 600.0


@contextlib.contextmanager
def lock(target: str | os.PathLike, timeout: float | None = None):
    """Hold the OS lock (flock) of `target`: the file `<target>.lock` beside it (a lock inside the
    folder would be swapped away with it). A second process waits for it (saying so once on
    stderr) up to `timeout` seconds (default `lock_timeout()`), then gets a LockedError naming the
    holder's pid. The OS releases the lock when its process dies, killed or not. Re-entrant within
    one process, so a command may lock a folder it then writes through a function that locks too."""
    path = _lock_path(target)
    timeout = lock_timeout() if timeout is None else timeout
    with _HELD_GUARD:
        entry = _HELD.setdefault(path, [threading.RLock(), 0, None])
    if not entry[0].acquire(timeout=max(timeout, 0)):  # another thread of this process writes it
        raise LockedError(f"{path[:-5]}: another writer in this process holds {path}; try again when it is done")
    try:
        if entry[1] == 0:
            entry[2] = _acquire(path, timeout)
        entry[1] += 1
        try:
            yield path
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                os.close(entry[2])  # releases the flock
                entry[2] = None
    finally:
        entry[0].release()


def _lock_path(target: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(target)) + ".lock"


def lock_state(target: str | os.PathLike) -> str:
    """Who holds the lock of `target`: "ours" (this process), "other" (another process), "free",
    or "unknown" (its lock file cannot be opened: a read-only folder)."""
    import fcntl

    path = _lock_path(target)
    entry = _HELD.get(path)
    if entry and entry[1] > 0:
        return "ours"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "free"  # never locked: writers create the file before anything else
    except OSError:
        return "unknown"
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a writer holds it exclusively
        return "free"
    except BlockingIOError:
        return "other"
    finally:
        os.close(fd)  # releases the shared lock at once


def _acquire(path: str, timeout: float) -> int:
    import fcntl

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, LOCK_FILE_MODE)
    try:
        deadline, told = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                if time.monotonic() >= deadline:
                    raise LockedError(f"{path[:-5]}: another writer (pid {holder}) holds {path}; try again when it "
                                      "is done") from None
                if not told:
                    print(f"cvr: waiting for {path} (pid {holder} is writing {path[:-5]})", file=sys.stderr)
                    told = True
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise
