"""The one gallery search every caller uses (engine.retriever.Retriever for every backend, the
benchmarks, the tests): exhaustive in blocks, or in two stages (numpy and faiss only, no torch).

- **exhaustive**: the fused score of every video, read block by block straight from the stored
  (float16) embeddings, each block cast to float32 and scored by the backend, then merged into a
  running top-k; the gallery is never copied whole.
- **two-stage**: the gallery's FAISS index proposes M candidates per query from the global latent
  vector alone; each query's own candidates are then scored exactly with the fused score (never
  the union of a batch's candidates, which costs a batch of 16 about 2x per query).

Both return the top-k rows in descending score, ties to the lower gallery row (the project's stable
rule), so a two-stage search whose first stage returns every video equals the exhaustive one.
Where fewer than k videos could be ranked (a first stage that found fewer candidates) the tail of
a row is (-inf, -1).

A backend plugs in as a `Scorer`: `scores(q_lat, q_con, lat, con) -> (q, n) float32` over numpy
arrays (query embeddings float32, gallery rows in their stored dtype) and `block_rows(q)`, how many
gallery rows to score per call for q queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engine.errors import CVRError
from engine.gallery import Gallery
from engine.gallery_faiss import faiss_search_parameters
from engine.gallery_format import GalleryError
from engine.portable import merge_topk, topk_stable

MODES = ("auto", "exhaustive", "two-stage")
# `auto` searches in two stages above this many videos when the gallery has a FAISS index. Measured
# on one CPU thread (README, gallery-size table): at 10k videos exhaustive search costs ~47 ms per
# query against ~2 ms in two stages (recall@10 1.00 on the synthetic gallery); below it, exact
# search is a few ms and needs no index.
AUTO_TWO_STAGE_ABOVE = 10_000
# Elements of the largest temporary of one block: the Jaccard passes hold (queries x rows x K) and
# the float32 copy of the rows rows x (2D + 2K). A few MB stays in the allocator's reused memory;
# at 256 MB every block pays fresh page faults (5-10x slower on this machine).
BLOCK_ELEMENTS = 1 << 21
# A filter passing fewer than this fraction of the videos is searched exhaustively over the rows it
# passes: a first stage restricted to so few of them would return fewer than k candidates.
SELECTIVE = 0.05


class SearchError(CVRError):
    """A search that cannot run as asked (one-line message)."""


class Scorer(Protocol):
    def scores(self, q_lat: np.ndarray, q_con: np.ndarray, lat: np.ndarray, con: np.ndarray) -> np.ndarray: ...

    def block_rows(self, queries: int) -> int: ...


@dataclass
class SearchOptions:
    """How to search: `mode` auto | exhaustive | two-stage; `candidates` M per query in two stages
    (default max(10 k, 100)); FAISS `nprobe` (IVF) or `ef_search` (HNSW), default the gallery's."""

    mode: str = "auto"
    candidates: int | None = None
    nprobe: int | None = None
    ef_search: int | None = None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise SearchError(f"search mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("candidates", "nprobe", "ef_search"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SearchError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")

    @property
    def staged(self) -> bool:
        """Whether a parameter of the two-stage search was given."""
        return any(v is not None for v in (self.candidates, self.nprobe, self.ef_search))

    def resolved_mode(self, gallery: Gallery) -> str:
        """The mode that runs: `auto` is two-stage above AUTO_TWO_STAGE_ABOVE videos, or when a
        two-stage parameter is given, if the gallery has an index; exhaustive otherwise."""
        self.validate()
        wants_index = self.mode == "two-stage" or (self.mode == "auto" and self.staged)
        if wants_index and gallery.faiss_index is None:
            raise SearchError(f"{gallery.folder}: two-stage search needs a FAISS index: rebuild the gallery with "
                              "`cvr index ... --faiss ivf` (or flat, hnsw, or a faiss index_factory string)")
        if self.mode == "exhaustive" and self.staged:
            raise SearchError("--candidates, --nprobe and --ef-search apply to two-stage search only")
        if self.mode != "auto":
            return self.mode
        indexed = gallery.faiss_index is not None
        return "two-stage" if indexed and (self.staged or len(gallery) > AUTO_TWO_STAGE_ABOVE) else "exhaustive"


def search(scorer: Scorer, gallery: Gallery, q_lat: np.ndarray, q_con: np.ndarray, k: int,
           options: SearchOptions | None = None, allowed: np.ndarray | None = None) -> tuple:
    """Top-k of every query over the gallery: (values (Q, k) float32, rows (Q, k) int64).

    `allowed` (N,) bool: only those rows rank (metadata filters, engine/filters.py), exactly in
    exhaustive mode; in two stages through a FAISS id selector, or exhaustively over the allowed
    rows when they are fewer than SELECTIVE of the gallery (the first stage would find too few of
    them). Fewer allowed rows than k leave the tail of each row (-inf, -1)."""
    options = options or SearchOptions()
    mode = options.resolved_mode(gallery)
    if not 1 <= k <= len(gallery):
        raise SearchError(f"k must be between 1 and the gallery size {len(gallery)}, got {k}")
    q_lat, q_con = np.ascontiguousarray(q_lat, np.float32), np.ascontiguousarray(q_con, np.float32)
    rows = None if allowed is None else np.flatnonzero(allowed)
    if rows is not None and (rows.size == 0 or mode == "exhaustive" or rows.size < SELECTIVE * len(gallery)):
        return _padded(exhaustive(scorer, gallery.lat, gallery.con, q_lat, q_con, min(k, rows.size), rows=rows)
                       if rows.size else None, len(q_lat), k)
    if mode == "exhaustive":
        return exhaustive(scorer, gallery.lat, gallery.con, q_lat, q_con, k)
    params = faiss_search_parameters(gallery.faiss_index, options.nprobe, options.ef_search, rows)
    return two_stage(scorer, gallery, q_lat, q_con, k, options.candidates or max(10 * k, 100), params)


def _padded(found, queries: int, k: int) -> tuple:
    """(values, rows) widened to k columns with (-inf, -1): no hit."""
    values = np.full((queries, k), -np.inf, dtype=np.float32)
    rows = np.full((queries, k), -1, dtype=np.int64)
    if found is not None:
        values[:, : found[0].shape[1]], rows[:, : found[1].shape[1]] = found
    return values, rows


def exhaustive(scorer: Scorer, lat: np.ndarray, con: np.ndarray, q_lat: np.ndarray, q_con: np.ndarray,
               k: int, rows: np.ndarray | None = None) -> tuple:
    """Exact top-k over every row (or over `rows`, ascending), scoring `scorer.block_rows` rows at a
    time and merging each block's top-k into the running one (earlier rows first, so ties keep the
    lower row). Returns gallery rows."""
    total = lat.shape[0] if rows is None else len(rows)
    block = max(1, int(scorer.block_rows(q_lat.shape[0])))
    best = None
    for start in range(0, total, block):
        part = None if rows is None else rows[start : start + block]
        lat_block = lat[start : start + block] if part is None else lat[part]
        con_block = con[start : start + block] if part is None else con[part]
        values, picked = topk_stable(scorer.scores(q_lat, q_con, lat_block, con_block), k)
        best = merge_topk(best, (values, picked + start if part is None else part[picked]), k)
    return best


def two_stage(scorer: Scorer, gallery: Gallery, q_lat: np.ndarray, q_con: np.ndarray, k: int, m: int,
              params=None) -> tuple:
    """FAISS proposes m candidates per query (global latent inner product); each query's own
    candidates, in gallery order, are scored exactly and the top k kept."""
    if gallery.faiss_index is None:
        raise GalleryError(f"{gallery.folder}: gallery has no FAISS index")
    m = min(max(m, k), len(gallery))
    try:
        _, candidates = gallery.faiss_index.search(np.ascontiguousarray(q_lat[:, 0]), m, params=params)
    except RuntimeError as error:
        raise SearchError(f"{gallery.folder}: the FAISS first stage failed ({_last_line(error)})") from None
    values = np.full((q_lat.shape[0], k), -np.inf, dtype=np.float32)
    rows = np.full((q_lat.shape[0], k), -1, dtype=np.int64)
    for i, found in enumerate(candidates):
        found = np.unique(found[found >= 0])  # gallery order: the stable top-k then breaks ties by row
        if found.size == 0:
            continue
        top, picked = exhaustive(scorer, gallery.lat, gallery.con, q_lat[i : i + 1], q_con[i : i + 1],
                                 min(k, found.size), rows=found)
        values[i, : top.shape[1]], rows[i, : top.shape[1]] = top[0], picked[0]
    return values, rows


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse rather than hand it back to the OS at once.

    A blocked search frees a few MB of temporaries every block; by default glibc serves such sizes
    with fresh mmap'd chunks or trims them off the heap, so every block page-faults its memory back:
    measured here, 1.7M minor faults and 3-4x slower exhaustive searches, varying from run to run
    (ARCHITECTURE.md section 14). Chunks under 32 MB (glibc's largest mmap threshold) then come
    from the heap, and up to 256 MB of free heap is kept. Process-wide and idempotent; returns
    False where glibc's mallopt is not there (another C library) and nothing changed."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))


def block_rows(queries: int, latent_dim: int, concept_dim: int, budget: int = BLOCK_ELEMENTS,
               lat_slots: int = 2, con_slots: int = 2) -> int:
    """Gallery rows per block so that the block's largest temporary holds about `budget` numbers:
    the pairwise (queries x rows x concept_dim) pass or the float32 copy of the rows (lat_slots x
    latent_dim + con_slots x concept_dim each; 2 and 2 for the cvr head, wider for glscl's)."""
    return max(64, budget // max(queries * concept_dim, lat_slots * latent_dim + con_slots * concept_dim))
