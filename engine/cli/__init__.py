"""`cvr`: the engine's one entry point. `main(argv)` returns an exit code, so tests can call it.

One module per command group registers its sub-commands (`add(subparsers)`) and imports what they
run lazily, so `cvr --help` stays fast and a command pays only for what it uses. This package is the
only part of engine/ allowed to import training/ and export/ (tests/test_layering.py checks it).
"""
from __future__ import annotations

import argparse
import errno
import sys

from engine.cli import data, demo, doctor, export, features, generator, index, rerank, search, serve, train, vision
from engine.cli.common import CLIError
from engine.errors import CVRError

__all__ = ["CLIError", "EXIT_OK", "EXIT_PARTIAL", "EXIT_REFUSED", "build_parser", "main"]
# Exit codes of every command: done; refused (bad input, arguments or files: one line on stderr);
# partly done (some inputs skipped, each reported on its own line). 1 is Python's own (a bug's
# traceback) and 130 an interrupt.
EXIT_OK, EXIT_REFUSED, EXIT_PARTIAL = 0, 2, 3
GROUPS = (data, vision, features, train, rerank, index, search, serve, export, generator, demo, doctor)


class Parser(argparse.ArgumentParser):
    """argparse, with bad arguments reported as every other error is: one line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"cvr: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cvr", description="CVR-SDGM text-to-video retrieval engine")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in GROUPS:
        group.add(sub)
    return parser


def main(argv=None) -> int:
    """Run one `cvr` command; bad input gets one line on stderr and a non-zero exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or bad arguments (2, one line already printed)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return args.func(args)
    except CVRError as error:
        return fail(str(error))
    except OSError as error:
        return fail(describe_os_error(error))
    except KeyboardInterrupt:
        print("cvr: interrupted", file=sys.stderr)
        return 130
    except Exception:
        # Not bad input but a bug: keep the traceback, and say where it goes.
        print("cvr: internal error: please report it with the traceback below", file=sys.stderr)
        raise


def fail(message: str) -> int:
    """One line on stderr, exit code 2."""
    print(f"cvr: error: {message}".splitlines()[0], file=sys.stderr)
    return EXIT_REFUSED


def describe_os_error(error: OSError) -> str:
    """An operating-system error as one line naming the file: disk full, permission denied, ..."""
    where = error.filename or ""
    if error.filename2:
        where = f"{where} -> {error.filename2}"
    if error.errno == errno.ENOSPC:
        return f"disk full while writing{' ' + where if where else ''}: free some space and run the command again"
    reason = error.strerror or type(error).__name__
    return f"{where}: {reason}" if where else reason
