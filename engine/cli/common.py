"""What the command modules share: the one-line error type and small argument helpers."""
from __future__ import annotations

import argparse
import os

from engine.errors import CVRError


class CLIError(CVRError):
    """A user-facing error: printed as one line, exit code 2."""


def positive(name: str):
    """An argparse type: an integer >= 1 (the message names the flag)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value

    return parse


def existing_dir(path: str, what: str) -> str:
    if not os.path.isdir(path) or not os.access(path, os.R_OK | os.X_OK):
        from engine.files import why_not_a_folder

        reason = why_not_a_folder(path)
        raise CLIError(f"{what} folder not found: {path}" if reason == "no such folder" else
                       f"{what} folder {path}: {reason}")
    return path


def add_overwrite(parser, what: str) -> None:
    """The `--overwrite` flag of a command that writes `what`."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} even when it holds something this command did not write")


def require(extra: str, *modules: str) -> None:
    """A command that needs an optional extra says so in one line when it is not installed."""
    from importlib.util import find_spec

    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        raise CLIError(f"this command needs {', '.join(missing)}: pip install 'cvr-sdgm[{extra}]'")


def set_threads(threads: int) -> None:
    """One torch thread by default: on a shared 2-core machine more threads are slower and noisier."""
    import torch

    torch.set_num_threads(threads)
