"""One array's rows spread over a gallery's parts, read as if they were one array.

A gallery grows by immutable parts (engine/gallery.py) and drops rows by listing them, so its
live rows are the rows of several memory maps, some with holes. `Rows` reads them as one (N, ...)
array without ever copying them whole: a slice or an index array gathers just the rows asked for,
which is all blocked search and index building do (engine/search.py, faiss training). A gallery of
one part with no dropped rows keeps its plain memory map instead (the fast, common case).
"""
from __future__ import annotations

import numpy as np


class Rows:
    """Live rows of several arrays: pieces [(array (n_i, ...), live local rows or None for all)]."""

    def __init__(self, pieces: list):
        if not pieces:
            raise ValueError("Rows needs at least one piece")
        self.pieces = [(array, None if live is None else np.asarray(live, dtype=np.int64)) for array, live in pieces]
        counts = [len(array) if live is None else len(live) for array, live in self.pieces]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        first = self.pieces[0][0]
        self.shape = (int(self.offsets[-1]),) + tuple(first.shape[1:])
        self.dtype = first.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        whole = self[0 : len(self)]
        return whole if dtype is None else whole.astype(dtype)

    def column(self, index: int) -> Rows:
        """The view `array[:, index]` of every piece (no copy)."""
        return Rows([(array[:, index], live) for array, live in self.pieces])

    def __getitem__(self, key):
        if isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], int):
            return self.column(key[1])
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self.take(np.arange(start, stop, step))
            return self._range(start, max(start, stop))
        if isinstance(key, (int, np.integer)):
            return self.take(np.array([key]))[0]
        return self.take(np.asarray(key))

    def _range(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for p, (array, live) in enumerate(self.pieces):
            lo, hi = max(start, self.offsets[p]), min(stop, self.offsets[p + 1])
            if lo >= hi:
                continue
            local = slice(lo - self.offsets[p], hi - self.offsets[p])
            parts.append(np.asarray(array[local]) if live is None else array[live[local]])
        if not parts:
            return np.empty((0,) + self.shape[1:], dtype=self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at logical positions `rows` (any order), gathered piece by piece."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row out of range 0..{len(self) - 1}")
        out = np.empty((len(rows),) + self.shape[1:], dtype=self.dtype)
        piece_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for p in np.unique(piece_of):
            chosen = piece_of == p
            array, live = self.pieces[p]
            local = rows[chosen] - self.offsets[p]
            out[chosen] = array[local if live is None else live[local]]
        return out

    def locate(self, rows: np.ndarray) -> tuple:
        """(piece, physical row within its piece) of each logical row."""
        rows = np.asarray(rows, dtype=np.int64)
        piece_of = np.searchsorted(self.offsets, rows, side="right") - 1
        local = rows - self.offsets[piece_of]
        physical = local.copy()
        for p in np.unique(piece_of):
            live = self.pieces[p][1]
            if live is not None:
                chosen = piece_of == p
                physical[chosen] = live[local[chosen]]
        return piece_of, physical
