"""Exact retrieval metrics for text-to-video (t2v) and video-to-text (v2t) retrieval.

Input is a score matrix ``scores[i, j]`` (n_queries x n_videos, higher is better) and
``query_video[i]``, the 0-based index of the one video that query (caption) ``i`` describes.

Definitions used throughout:

* A ranking sorts items by descending score and breaks ties by ascending index, i.e. it is the
  order of a *stable* sort of ``-score``. Ranks are 1-based. The rank of item ``j`` among the
  values ``s`` is therefore ``1 + #(s > s[j]) + #(s == s[j] and index < j)``; this counting form
  is exact, tie-correct, and needs no full sort of a row.
* t2v: row ``i`` ranks all videos; its one relevant video is ``query_video[i]``.
* v2t: column ``v`` ranks all queries; every caption of video ``v`` is relevant. The rank used
  for R@K, MedR and MnR is the rank of the first (best-ranked) relevant caption. Videos that no
  query belongs to are left out of all v2t figures.
* R@K: percentage (0-100) of queries (t2v) or videos (v2t) whose first relevant item has rank
  <= K. MedR: ``numpy.median`` of those ranks (not floored). MnR: their mean.
* mAP: mean over queries/videos of average precision,
  ``AP = (1/#relevant) * sum over relevant items r of (#relevant items ranked <= r) / rank(r)``.
  With one relevant item (t2v) this is ``1 / rank``.
* SumR: t2v R@1 + R@5 + R@10.

Everything runs in blocks (rows for t2v, columns for v2t), so the MSR-VTT test matrix
(59,800 x 2,990 float32) needs a few hundred MB beyond the input and a few seconds on one core.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "evaluate_ids",
    "format_metrics_table",
    "retrieval_metrics",
    "t2v_ranks",
    "v2t_ranks",
]

METRIC_KEYS = (
    "t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "t2v_mnr", "t2v_map",
    "v2t_r1", "v2t_r5", "v2t_r10", "v2t_medr", "v2t_mnr", "v2t_map",
    "sumr",
)

# Elements per t2v row block: big enough that numpy's per-call overhead vanishes, small enough
# that the block and its boolean temporaries stay in cache-sized memory (a few MB).
_T2V_BLOCK_ELEMS = 1 << 21
# Videos (columns) per v2t block: the block is copied transposed (n_queries x 256 values, 61 MB
# for MSR-VTT float32) so that every column becomes a contiguous row that numpy can sort fast.
_V2T_COL_BLOCK = 256
# Elements per tile of that transposed copy: copying column slices of a wide row-major matrix in
# tiles that fit in cache is several times faster than one big strided transpose.
_TRANSPOSE_TILE_ELEMS = 1 << 18
# Bound on the boolean temporaries used to resolve ties.
_TIE_CHUNK_ELEMS = 1 << 22


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _to_numpy(x) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and moved to the CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def _as_score_array(scores) -> np.ndarray:
    """Validate a score matrix and return it in a dtype numpy compares and sorts natively.

    float16 becomes float32 and bool becomes uint8: both conversions are exact, so no order or
    tie changes. Other real dtypes are used as they are.
    """
    s = _to_numpy(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be a 2-D (n_queries x n_videos) array, got shape {s.shape}")
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"scores is empty (shape {s.shape})")
    if s.dtype == np.float16:
        s = s.astype(np.float32)
    elif s.dtype == np.bool_:
        s = s.astype(np.uint8)
    elif s.dtype.kind not in "fiu":
        raise ValueError(f"scores must hold real numbers, got dtype {s.dtype}")
    # min() propagates NaN and never makes one from +-inf, so this is an exact NaN test in one
    # pass without a full-size boolean temporary.
    if s.dtype.kind == "f" and np.isnan(s.min()):
        raise ValueError("scores contain NaN")
    return s


def _as_query_video(query_video, n_queries: int, n_videos: int) -> np.ndarray:
    """Validate ``query_video`` against the score shape; return it as an int64 array."""
    q = _to_numpy(query_video)
    if q.ndim != 1 or q.shape[0] != n_queries:
        raise ValueError(
            f"query_video must have shape ({n_queries},) to match scores, got {q.shape}"
        )
    if q.dtype.kind not in "iu":
        raise ValueError(f"query_video must hold integer video indices, got dtype {q.dtype}")
    q = q.astype(np.int64)
    if q.min() < 0 or q.max() >= n_videos:
        bad = int(q[(q < 0) | (q >= n_videos)][0])
        raise ValueError(f"query_video holds {bad}, outside [0, {n_videos}) (the score columns)")
    return q


def _prepare(scores, query_video) -> tuple[np.ndarray, np.ndarray]:
    s = _as_score_array(scores)
    return s, _as_query_video(query_video, *s.shape)


# --------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------
def _lower_index_ties(values: np.ndarray, targets: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """For each k: ``#(values[k, j] == targets[k] for j < limits[k])``.

    ``values`` is (m, n), or (n,) shared by every k. Chunked so the boolean temporary stays small.
    """
    m = targets.shape[0]
    n = values.shape[-1]
    idx = np.arange(n)
    out = np.empty(m, dtype=np.int64)
    step = max(1, _TIE_CHUNK_ELEMS // n)
    for a in range(0, m, step):
        b = min(a + step, m)
        vals = values if values.ndim == 1 else values[a:b]
        hit = (vals == targets[a:b, None]) & (idx < limits[a:b, None])
        out[a:b] = np.count_nonzero(hit, axis=1)
    return out


def _t2v_ranks(s: np.ndarray, qv: np.ndarray, row_block: int | None = None) -> np.ndarray:
    """Rank of each query's video in its row, by the counting formula, block of rows at a time."""
    n_q, n_v = s.shape
    if row_block is None:
        row_block = max(1, _T2V_BLOCK_ELEMS // n_v)
    ranks = np.empty(n_q, dtype=np.int64)
    for r0 in range(0, n_q, row_block):
        r1 = min(r0 + row_block, n_q)
        block, target = s[r0:r1], qv[r0:r1]
        rel = block[np.arange(r1 - r0), target][:, None]
        above = np.count_nonzero(block > rel, axis=1)
        # Every row ties with itself; only rows with another equal score need the index test,
        # which is the rare case for float scores, so it is done for those rows alone.
        tied = np.flatnonzero(np.count_nonzero(block == rel, axis=1) > 1)
        if tied.size:
            above[tied] += _lower_index_ties(block[tied], rel[tied, 0], target[tied])
        ranks[r0:r1] = 1 + above
    return ranks


def _transposed_columns(s: np.ndarray, c0: int, c1: int) -> np.ndarray:
    """Contiguous copy of ``s[:, c0:c1].T``, made in cache-sized tiles."""
    n_q = s.shape[0]
    out = np.empty((c1 - c0, n_q), dtype=s.dtype)
    tile = max(1, _TRANSPOSE_TILE_ELEMS // (c1 - c0))
    for r0 in range(0, n_q, tile):
        r1 = min(r0 + tile, n_q)
        out[:, r0:r1] = s[r0:r1, c0:c1].T
    return out


def _v2t_ranks(s: np.ndarray, qv: np.ndarray, col_block: int | None = None) -> np.ndarray:
    """Rank of each caption in the ranking of its own video's column (all queries ranked).

    The counting formula, per column: ``#(col > t)`` is read off a sorted copy of the column with
    a binary search, so each column costs one sort (numpy's vectorised sort) no matter how many
    captions the video has; ``searchsorted`` left/right also gives the number of scores equal to
    ``t``, and only a caption that ties with another query needs the index test.
    """
    n_q, n_v = s.shape
    if col_block is None:
        col_block = _V2T_COL_BLOCK
    rel = s[np.arange(n_q), qv]  # each caption's score for its own video
    # Captions grouped by video, ascending caption index within a video.
    order = np.argsort(qv, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(np.bincount(qv, minlength=n_v))))
    ranks = np.empty(n_q, dtype=np.int64)
    for c0 in range(0, n_v, col_block):
        c1 = min(c0 + col_block, n_v)
        if bounds[c1] == bounds[c0]:  # no captions for any video in this block
            continue
        sorted_cols = _transposed_columns(s, c0, c1)
        sorted_cols.sort(axis=1)
        for v in range(c0, c1):
            caps = order[bounds[v]:bounds[v + 1]]
            if caps.size == 0:
                continue
            col, t = sorted_cols[v - c0], rel[caps]
            right = np.searchsorted(col, t, side="right")
            above = n_q - right
            tied = np.flatnonzero(right - np.searchsorted(col, t, side="left") > 1)
            if tied.size:
                above[tied] += _lower_index_ties(s[:, v], t[tied], caps[tied])
            ranks[caps] = 1 + above
    return ranks


def t2v_ranks(scores, query_video, *, row_block: int | None = None) -> np.ndarray:
    """Rank (1-based) of query ``i``'s video in row ``i``, as an int64 array of n_queries.

    Ties are broken by ascending video index. ``row_block`` (rows per block) only changes memory
    use and speed, never the result.
    """
    s, qv = _prepare(scores, query_video)
    return _t2v_ranks(s, qv, row_block)


def v2t_ranks(scores, query_video, *, col_block: int | None = None) -> np.ndarray:
    """Rank (1-based) of caption ``i`` in the ranking of all queries by column ``query_video[i]``.

    Ties are broken by ascending query index. Returned as an int64 array of n_queries (one entry
    per caption, not per video). ``col_block`` only changes memory use and speed.
    """
    s, qv = _prepare(scores, query_video)
    return _v2t_ranks(s, qv, col_block)


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------
def _summary(first_ranks: np.ndarray, average_precision: np.ndarray, prefix: str) -> dict:
    """R@1/5/10 (percent), MedR, MnR and mAP from first-relevant ranks and per-item AP."""
    out = {f"{prefix}_r{k}": float(100.0 * np.mean(first_ranks <= k)) for k in (1, 5, 10)}
    out[f"{prefix}_medr"] = float(np.median(first_ranks))
    out[f"{prefix}_mnr"] = float(np.mean(first_ranks))
    out[f"{prefix}_map"] = float(np.mean(average_precision))
    return out


def _v2t_per_video(caption_ranks: np.ndarray, qv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First-relevant rank and average precision of every video that has captions.

    Sorting captions by (video, rank) puts each video's relevant items in ranking order; the
    k-th of them (1-based) at rank r contributes precision k / r to that video's AP.
    """
    order = np.lexsort((caption_ranks, qv))
    vid, r = qv[order], caption_ranks[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, vid[1:] != vid[:-1]])  # first entry of each video
    counts = np.diff(np.r_[starts, vid.size])
    k = np.arange(vid.size) - np.repeat(starts, counts) + 1  # position within the video
    ap = np.add.reduceat(k / r, starts) / counts
    return r[starts], ap


def retrieval_metrics(
    scores, query_video, *, row_block: int | None = None, col_block: int | None = None
) -> dict:
    """Exact t2v and v2t retrieval metrics of a score matrix.

    ``scores``: n_queries x n_videos, numpy array or torch tensor (float16/32/64), higher is
    better. ``query_video[i]``: 0-based column of query ``i``'s video. Returns plain floats under
    ``t2v_r1 t2v_r5 t2v_r10 t2v_medr t2v_mnr t2v_map v2t_r1 v2t_r5 v2t_r10 v2t_medr v2t_mnr
    v2t_map sumr`` (see the module docstring for the definitions). ``row_block`` and
    ``col_block`` set the block sizes; they never change the result.

    Raises ValueError for NaN scores, a non-2-D or empty matrix, a ``query_video`` whose length
    does not match the rows, or an index outside the columns.
    """
    s, qv = _prepare(scores, query_video)
    t2v = _t2v_ranks(s, qv, row_block)
    metrics = _summary(t2v, 1.0 / t2v, "t2v")
    metrics.update(_summary(*_v2t_per_video(_v2t_ranks(s, qv, col_block), qv), "v2t"))
    metrics["sumr"] = metrics["t2v_r1"] + metrics["t2v_r5"] + metrics["t2v_r10"]
    return {key: metrics[key] for key in METRIC_KEYS}


# --------------------------------------------------------------------------------------------
# Ids and reporting
# --------------------------------------------------------------------------------------------
def _video_id_of(cap_id: str) -> str:
    """Video id of a caption id: the part before the first '#', less a trailing .mp4 or .jpg.

    ``video7010#enc#3`` -> ``video7010``; ``video7010.mp4#0`` -> ``video7010``.
    """
    base = cap_id.split("#", 1)[0]
    for suffix in (".mp4", ".jpg"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def evaluate_ids(scores, caption_ids: Sequence[str], video_ids: Sequence[str]) -> dict:
    """``retrieval_metrics`` for a matrix whose rows are ``caption_ids`` and columns ``video_ids``.

    Each caption belongs to the video named by ``_video_id_of(caption_id)``, which must be one of
    ``video_ids`` (compared exactly as given). Raises ValueError naming the offending id for a
    caption whose video is not a column, or for a duplicate video id, and for counts that do not
    match the score shape.
    """
    s = _as_score_array(scores)
    caption_ids, video_ids = list(caption_ids), list(video_ids)
    if len(caption_ids) != s.shape[0] or len(video_ids) != s.shape[1]:
        raise ValueError(
            f"{len(caption_ids)} caption ids x {len(video_ids)} video ids do not match "
            f"scores of shape {s.shape}"
        )
    column_of: dict[str, int] = {}
    for j, vid in enumerate(video_ids):
        if vid in column_of:
            raise ValueError(f"duplicate video id {vid!r} (columns {column_of[vid]} and {j})")
        column_of[vid] = j
    query_video = np.empty(len(caption_ids), dtype=np.int64)
    for i, cap in enumerate(caption_ids):
        vid = _video_id_of(cap)
        if vid not in column_of:
            raise ValueError(f"caption id {cap!r}: its video {vid!r} is not among the video ids")
        query_video[i] = column_of[vid]
    return retrieval_metrics(s, query_video)


def format_metrics_table(metrics: dict) -> str:
    """Markdown table of t2v and v2t R@1 R@5 R@10 MedR MnR mAP, followed by a SumR line.

    R@K, MedR and MnR are shown with 1 decimal, mAP with 3.
    """
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"metrics lack {', '.join(missing)}")
    lines = [
        "|     | R@1 | R@5 | R@10 | MedR | MnR | mAP |",
        "|-----|----:|----:|-----:|-----:|----:|----:|",
    ]
    for d in ("t2v", "v2t"):
        m = {k: float(metrics[f"{d}_{k}"]) for k in ("r1", "r5", "r10", "medr", "mnr", "map")}
        lines.append(
            f"| {d} | {m['r1']:.1f} | {m['r5']:.1f} | {m['r10']:.1f} | "
            f"{m['medr']:.1f} | {m['mnr']:.1f} | {m['map']:.3f} |"
        )
    lines += ["", f"SumR: {float(metrics['sumr']):.1f}"]
    return "\n".join(lines)
