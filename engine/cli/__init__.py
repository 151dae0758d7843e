"""`cvr`: the engine's one entry point. `main(argv)` returns an exit code, so tests can call it.

One module per command group registers its sub-commands (`add(subparsers)`) and imports what they
run lazily, so `cvr --help` stays fast and a command pays only for what it uses. This package is the
only part of engine/ allowed to import training/ and export/ (tests/test_layering.py checks it).
"""
from __future__ import annotations

import argparse
import sys

from engine.cli import data, demo, export, generator, index, search, train, vision
from engine.cli.common import CLIError

__all__ = ["CLIError", "build_parser", "main"]
GROUPS = (data, vision, train, index, search, export, generator, demo)


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
    except (CLIError, ValueError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"cvr: error: {message}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cvr: interrupted", file=sys.stderr)
        return 130
