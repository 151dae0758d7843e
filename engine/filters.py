"""Metadata filters: `cvr search --where 'duration>=10' --where 'tag=cooking'`.

A filter is `FIELD OP VALUE` with OP one of = != < <= > >=; every filter must hold (AND). VALUE
is a number when it reads as one, else text (quotes around it are dropped); dates compare as text,
so ISO dates (2026-12-01) order correctly. A field holding a list (tags) matches `=` when one of
its items equals VALUE and `!=` when none does; an order comparison holds when one item does. A
video without the field never matches, whatever the operator. Filters select rows before top-k
(engine/search.py), so they cost one pass over the gallery's field table.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import numpy as np

from engine.errors import CVRError

OPERATORS = {"<=": operator.le, ">=": operator.ge, "!=": operator.ne, "=": operator.eq, "<": operator.lt,
             ">": operator.gt}
# Two-character operators first, so that `a<=3` is not read as `a<` `=3`.
_SYNTAX = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.\-]*)\s*(<=|>=|!=|==|=|<|>)\s*(.*?)\s*$")


class FilterError(CVRError):
    """A filter that cannot be read or applied (one-line message)."""


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: object

    def holds(self, stored) -> bool:
        if stored is None:
            return False
        if isinstance(stored, list):
            hits = [self._compare(item) for item in stored]
            return not any(self._compare_eq(item) for item in stored) if self.op == "!=" else any(hits)
        return self._compare(stored)

    def _compare_eq(self, item) -> bool:
        return _comparable(item, self.value) and item == self.value

    def _compare(self, stored) -> bool:
        if not _comparable(stored, self.value):
            return self.op == "!="
        return bool(OPERATORS[self.op](stored, self.value))


def _comparable(stored, value) -> bool:
    numeric = isinstance(stored, (int, float)) and not isinstance(stored, bool)
    return numeric == isinstance(value, float) and not isinstance(stored, (dict, list))


def parse(text: str) -> Condition:
    """One filter; FilterError (one line) for bad syntax."""
    if not isinstance(text, str):
        raise FilterError(f"a filter must be text like 'duration>=10', got {type(text).__name__}")
    match = _SYNTAX.match(text)
    if not match or not match[3] or match[3][0] in "<>=!":
        raise FilterError(f"bad filter {text!r}: expected FIELD OP VALUE, OP one of = != < <= > >= "
                          "(e.g. 'duration>=10' or 'tag=cooking')")
    field, op, raw = match[1], "=" if match[2] == "==" else match[2], match[3]
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        value: object = raw[1:-1]
    else:
        try:
            value = float(raw)
        except ValueError:
            value = raw
        if isinstance(value, float) and not np.isfinite(value):
            value = raw
    if op not in ("=", "!=") and not isinstance(value, float) and not isinstance(value, str):
        raise FilterError(f"bad filter {text!r}")
    return Condition(field, op, value)


def parse_all(texts) -> list:
    if isinstance(texts, str):  # one filter given as a string, not as a list of one
        texts = [texts]
    return [parse(text) for text in (texts or [])]


def allowed_rows(table: dict, n: int, conditions: list) -> np.ndarray | None:
    """Boolean mask (n,) of the rows every condition holds for; None without conditions.
    `table`: {field: [value per row]} (engine.gallery.Gallery.fields)."""
    if not conditions:
        return None
    mask = np.ones(n, dtype=bool)
    for condition in conditions:
        column = table.get(condition.field)
        if column is None:
            known = ", ".join(sorted(table)) if table else "none (no video files and no --metadata were indexed)"
            raise FilterError(f"unknown filter field {condition.field!r}: this gallery's fields are {known}")
        mask &= np.fromiter((condition.holds(value) for value in column), dtype=bool, count=n)
    return mask
