"""One way to write files: atomic files and folders, JSON, fsync and sha256 (standard library only).

Every writer in the project goes through this module, so that all of them share one behaviour:

- a file is written under a hidden temporary name beside its target, flushed and fsynced, then
  renamed over the target (`atomic_write`, `write_json`, or `atomic_path` for libraries that
  want a path to write to: matplotlib, PIL, faiss, safetensors);
- a folder is built in a hidden staging sibling (`staged_folder`) and swapped into place
  (`move_into_place`): exchanged with the old one in one step (renameat2 RENAME_EXCHANGE), or
  where the filesystem cannot, the old one moved aside first and deleted once the new one is in;
- temporary names carry the writer's pid and a random part (`.NAME.tmp-PID-XXXX`,
  `.NAME.old-PID-XXXX`), so two writers never collide; `clean_stale` removes what killed writers
  left (judged by the folder's lock, engine/locks.py, which `staged_folder` holds) and puts a
  folder moved aside back (`recover`, which readers call);
- `fault_point` names the steps where the fault tests kill a writer.

Files get mode 0644 and folders 0755 (mkstemp and mkdtemp make owner-only ones).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

from engine.errors import CVRError
from engine.locks import lock, lock_state

FILE_MODE = 0o644
FOLDER_MODE = 0o755
_KINDS = ("tmp", "old")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes (cache keys, ids)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable; a no-op where directories cannot be opened or synced."""
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


def _temporary_name(target: Path, kind: str) -> str:
    """The `.NAME.KIND-PID-` prefix of a temporary name (tempfile adds a random part)."""
    return f".{target.name}.{kind}-{os.getpid()}-"


# This process's temporaries in flight (absolute paths): never another writer's leftovers, even
# when a pid is reused (in a container every run may be pid 1).
_IN_FLIGHT: set = set()


def _track(path) -> str:
    _IN_FLIGHT.add(os.path.abspath(path))
    return path


def _untrack(path) -> None:
    _IN_FLIGHT.discard(os.path.abspath(path))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yield a temporary path beside `path`; when the block ends without an exception it is
    fsynced and renamed onto `path`, else removed. The temporary name keeps `path`'s suffix
    (or `suffix`), for libraries that pick the format from it (matplotlib, PIL)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=_temporary_name(target, "tmp"),
                                     suffix=target.suffix if suffix is None else suffix, dir=target.parent)
    os.close(fd)
    _track(temporary)
    try:
        yield temporary
        os.chmod(temporary, FILE_MODE)
        fsync_file(temporary)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    finally:
        _untrack(temporary)
    fsync_dir(target.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Replace `path` with `data` (str as UTF-8) atomically."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(payload)
    return Path(path)


def write_synced(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write and fsync one file inside a staging folder (the folder's swap makes it atomic)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with open(path, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def to_json(value, indent: int | None = 1) -> str:
    """The project's JSON text: sorted keys, no NaN or infinity (they are not JSON), newline-ended."""
    return json.dumps(value, indent=indent, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, value) -> Path:
    """Write `value` as JSON atomically (sorted keys; NaN and infinity are refused, not written)."""
    return atomic_write(path, to_json(value))


@contextlib.contextmanager
def safetensors_errors(path: str | os.PathLike):
    """safetensors reports a failed write (a full disk, say) as a SafetensorError whose text holds
    the OS error code: raise it as the OSError it is, naming `path`, so it is one line."""
    import re

    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        code = re.search(r"(?:os error |code: )(\d+)", str(error))
        if code is None:
            raise CVRError(f"{path}: cannot write ({str(error).splitlines()[0]})") from None
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(path)) from None


def copy_atomic(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    with atomic_path(target) as temporary:
        shutil.copyfile(source, temporary)
    return Path(target)


# ---------------------------------------------------------------------------------------------
# Folders


def make_staging(target: str | os.PathLike) -> Path:
    """A new, empty hidden folder beside `target` to build it in (same filesystem, so the final
    rename is atomic); stale leftovers of dead writers of `target` are cleaned first."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    work = Path(_track(tempfile.mkdtemp(prefix=_temporary_name(target, "tmp"), dir=target.parent)))
    os.chmod(work, FOLDER_MODE)
    return work


def move_into_place(work: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished folder `work` at `target`, so that a kill at any moment leaves the old or
    the new folder there. An existing target is exchanged with `work` in one step (Linux
    renameat2 RENAME_EXCHANGE) and the old folder, now at the staging name, deleted. Where the
    filesystem cannot exchange, the target is moved aside under a hidden `.old-` name and the new
    folder renamed in; a kill between those two renames leaves the old folder aside, and
    `recover` (which every reader and writer of the target calls) puts it back."""
    work, target = Path(work), Path(target).absolute()
    fsync_dir(work)
    fault_point("before-swap")
    if not os.path.lexists(target):
        os.rename(work, target)
        _untrack(work)
        fsync_dir(target.parent)
        fault_point("after-swap")
        return
    if exchange(work, target):
        fsync_dir(target.parent)
        fault_point("after-swap")  # target is the new folder; the old one waits at the staging name
        remove(work)
        return
    old = Path(_track(tempfile.mkdtemp(prefix=_temporary_name(target, "old"), dir=target.parent)))
    os.rmdir(old)  # rename needs the name free; the random part keeps it ours
    os.rename(target, old)
    fault_point("between-renames")
    try:
        os.rename(work, target)
    except BaseException:
        os.rename(old, target)
        _untrack(old)
        raise
    _untrack(work)
    fsync_dir(target.parent)
    fault_point("after-swap")
    remove(old)


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one step (Linux renameat2 with RENAME_EXCHANGE). False where the
    C library, the kernel or the filesystem cannot (or CVR_RENAME_EXCHANGE=0 says not to)."""
    if os.environ.get("CVR_RENAME_EXCHANGE") == "0":
        return False
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(a), None, str(b))


@functools.cache
def _renameat2():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name, use_errno=True), "renameat2", None) if name else None
    except OSError:
        return None


def fault_point(step: str) -> None:
    """A named step of a write where the fault tests kill the process (CVR_TEST_KILL_AT=step): the
    real SIGKILL, which runs no clean-up, at exactly that point; with CVR_TEST_KILL_AFTER=N at the
    N-th time this process reaches it. Free when the variable is unset."""
    if os.environ.get("CVR_TEST_KILL_AT") != step:
        return
    _FAULT_COUNTS[step] = _FAULT_COUNTS.get(step, 0) + 1
    if _FAULT_COUNTS[step] >= int(os.environ.get("CVR_TEST_KILL_AFTER", "1")):
        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_COUNTS: dict = {}


def recover(target: str | os.PathLike) -> list:
    """What a killed writer left beside `target` is cleaned, and a folder it had moved aside is put
    back (`clean_stale`); readers call this first. Returns the paths handled; problems (a read-only
    folder) are left to the read itself to report."""
    try:
        return clean_stale(target)
    except OSError:
        return []


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike):
    """Build a folder atomically, as its one writer: holds `lock(target)`, yields a staging folder;
    when the block ends without an exception it replaces `target` (move_into_place), else it is
    removed and `target` is left as it was."""
    with lock(target):
        work = make_staging(target)
        try:
            yield work
            move_into_place(work, target)
        except BaseException:
            remove(work)
            raise


def remove(path: str | os.PathLike) -> None:
    """Delete a file or folder tree; a missing path is fine."""
    _untrack(path)
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def leftovers(target: str | os.PathLike) -> list:
    """What writers left beside `target`: (path, kind "tmp" or "old", pid, whether it is stale).

    Staging and moved-aside folders are only made by a writer holding the target's lock, so while
    another process holds it they are its work, and while nobody does (or this process does) every
    one not in flight here is stale, whatever its pid says. A temporary file (written without the
    lock) is stale when its writer's pid is gone, or is this process's and not in flight."""
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return []
    state = None
    found = []
    for entry in sorted(os.listdir(target.parent)):
        for kind in _KINDS:
            prefix = f".{target.name}.{kind}-"
            pid = entry[len(prefix):].split("-", 1)[0] if entry.startswith(prefix) else ""
            if not pid.isdigit():
                continue
            path = target.parent / entry
            if str(path) in _IN_FLIGHT:
                stale = False
            elif int(pid) == os.getpid():
                stale = True
            elif path.is_dir() and not path.is_symlink():
                state = state or lock_state(target)
                stale = state in ("free", "ours") or (state == "unknown" and not _alive(int(pid)))
            else:
                stale = not _alive(int(pid))
            found.append((path, kind, int(pid), stale))
    return found


def clean_stale(target: str | os.PathLike) -> list:
    """Remove what killed writers left beside `target` (engine.files.leftovers): their temporary
    files and staging folders, and the old folder a swap had moved aside (put back when `target`
    is missing: the kill fell between the two renames). A live writer's work is left alone.
    Returns the paths handled."""
    target = Path(target).absolute()
    handled = []
    for path, kind, _pid, stale in leftovers(target):
        if not stale:
            continue
        if kind == "old" and not os.path.lexists(target):
            with contextlib.suppress(FileNotFoundError):  # another process may restore it first
                os.rename(path, target)
        else:
            remove(path)
        handled.append(str(path))
    return handled


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


# ---------------------------------------------------------------------------------------------
# Reading


def why_not_a_folder(path: str | os.PathLike) -> str:
    """Why `path` cannot be used as a folder, in words: "no such folder", "permission denied"
    (a parent that cannot be entered reads as missing to os.path.isdir), "not a folder"."""
    try:
        status = os.stat(path)
    except PermissionError:
        return "permission denied"
    except (FileNotFoundError, NotADirectoryError):
        return "no such folder"
    except OSError as error:
        return error.strerror or "cannot be opened"
    import stat

    if not stat.S_ISDIR(status.st_mode):
        return "not a folder"
    return "permission denied" if not os.access(path, os.R_OK | os.X_OK) else "unreadable"


def read_json(path: str | os.PathLike, error: type = CVRError):
    """A JSON file's value; `error` (one line naming the file) when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (ValueError, UnicodeDecodeError) as bad:
        raise error(f"{path}: not valid JSON ({getattr(bad, 'msg', bad)})") from None


def read_json_object(path: str | os.PathLike) -> dict | None:
    """A JSON object file's value, or None (missing, unreadable, not JSON, not an object)."""
    try:
        value = read_json(path)
    except (CVRError, OSError):
        return None
    return value if isinstance(value, dict) else None
