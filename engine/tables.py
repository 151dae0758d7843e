"""Markdown tables: the one helper that benchmarks, training reports and the README share."""
from __future__ import annotations


def markdown_table(headers: list, rows: list) -> str:
    """A GitHub markdown table; cells are str()-ed, None is an empty cell."""
    cell = lambda c: "" if c is None else str(c)
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
