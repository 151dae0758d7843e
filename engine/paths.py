"""Paths recorded inside the engine's files, so that a checkpoint, gallery, anchor store or export
folder can be copied to another folder or machine and still load (standard library only).

A recorded reference is never an absolute path of the machine that wrote it:

- weights shipped with the package are named by id: ``builtin:<path under engine/weights>``
  (``builtin:generator/students/4step``);
- any other folder is recorded relative to the folder of the file that records it (a checkpoint's
  generator relative to the checkpoint folder), in POSIX form.

`resolve` turns a reference back into a path; absolute paths written by older versions still
resolve to themselves, and a caller may always pass a folder explicitly instead (``--generator``).
"""
from __future__ import annotations

import os
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
BUILTIN = "builtin:"


def reference(path: str | os.PathLike, base: str | os.PathLike) -> str:
    """How to record `path` in a file kept in the folder `base`."""
    target = Path(path).resolve()
    if target == WEIGHTS or WEIGHTS in target.parents:
        return BUILTIN + target.relative_to(WEIGHTS).as_posix()
    return Path(os.path.relpath(target, Path(base).resolve())).as_posix()


def resolve(ref: str, base: str | os.PathLike) -> str:
    """The path a reference recorded in a file of folder `base` points to."""
    if ref.startswith(BUILTIN):
        return str(WEIGHTS / ref[len(BUILTIN):])
    if os.path.isabs(ref):
        return ref  # written before references were relative
    # `reference` measured from the resolved base, so resolve it here too (a symlinked base with
    # `..` in the reference would otherwise land elsewhere).
    return os.path.normpath(os.path.join(Path(base).resolve(), ref))


def weights_reference(weights: str | None, base: str | os.PathLike) -> str:
    """How to record a `--vision-weights` value: 'builtin' (None), 'random', or a reference."""
    if weights is None or weights in ("builtin", "random"):
        return weights or "builtin"
    return reference(weights, base)


def rebase(ref: str, old_base: str | os.PathLike, new_base: str | os.PathLike) -> str:
    """A reference recorded relative to `old_base`, recorded again relative to `new_base`."""
    return ref if ref.startswith(BUILTIN) else reference(resolve(ref, old_base), new_base)
