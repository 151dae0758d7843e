"""One way to write files: atomic files and folders, JSON, fsync and sha256 (standard library only).

Every writer in the project goes through this module, so that all of them share one behaviour:

- a file is written under a hidden temporary name beside its target, flushed and fsynced, then
  renamed over the target (`atomic_write`, `write_json`, or `atomic_path` for libraries that
  want a path to write to: matplotlib, PIL, faiss, safetensors);
- a folder is built in a hidden staging sibling (`staged_folder`) and swapped into place
  (`move_into_place`): an existing target is moved aside first and deleted only once the new one
  is in place;
- temporary names carry the writer's pid and a random part (`.NAME.tmp-PID-XXXX`,
  `.NAME.old-PID-XXXX`), so two writers never collide, and `clean_stale` can tell the leftovers
  of a dead writer from a live writer's work: it removes them, and puts an old folder back where a
  kill fell between the two renames of a swap.

Files get mode 0644 and folders 0755 (mkstemp and mkdtemp make owner-only ones).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

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
    try:
        yield temporary
        os.chmod(temporary, FILE_MODE)
        fsync_file(temporary)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
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
    work = Path(tempfile.mkdtemp(prefix=_temporary_name(target, "tmp"), dir=target.parent))
    os.chmod(work, FOLDER_MODE)
    return work


def move_into_place(work: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the finished folder `work` onto `target`. An existing target is first moved aside
    under a hidden `.old-` name, the new folder renamed in, and only then the old one deleted; if
    the second rename fails, the old folder is moved back (and `clean_stale` restores it if the
    process died in between)."""
    work, target = Path(work), Path(target).absolute()
    fsync_dir(work)
    if not os.path.lexists(target):
        os.rename(work, target)
        fsync_dir(target.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=_temporary_name(target, "old"), dir=target.parent))
    os.rmdir(old)  # rename needs the name free; the random part keeps it ours
    os.rename(target, old)
    try:
        os.rename(work, target)
    except BaseException:
        os.rename(old, target)
        raise
    fsync_dir(target.parent)
    remove(old)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike):
    """Build a folder atomically: yields a staging folder; when the block ends without an
    exception it replaces `target` (move_into_place), else it is removed and `target` is left as
    it was."""
    work = make_staging(target)
    try:
        yield work
        move_into_place(work, target)
    except BaseException:
        remove(work)
        raise


def remove(path: str | os.PathLike) -> None:
    """Delete a file or folder tree; a missing path is fine."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale(target: str | os.PathLike) -> list:
    """Remove what dead writers left beside `target`: their temporary files and staging folders,
    and the old folder a swap had moved aside (put back when `target` is missing: the kill fell
    between the two renames). Leftovers of live processes are left alone. Returns the paths handled."""
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return []
    handled = []
    for entry in sorted(os.listdir(target.parent)):
        for kind in _KINDS:
            prefix = f".{target.name}.{kind}-"
            if not entry.startswith(prefix):
                continue
            pid = entry[len(prefix):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            path = target.parent / entry
            if kind == "old" and not os.path.lexists(target):
                os.rename(path, target)
            else:
                remove(path)
            handled.append(str(path))
    return handled


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
