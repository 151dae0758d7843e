"""Fused dual-branch hybrid-space scoring of Q queries against N videos (ARCHITECTURE.md, section 7).

For query q and video n, with branch b in {global (0), local (1)}:

    lat_b = <q_lat[q, b], v_lat[n, b]>                  (cosine: the inputs are L2-normalised)
    con_b = sum_k min(x_k, y_k) / sum_k max(x_k, y_k)   (Jaccard of concept vectors x, y;
                                                          0 where sum_k max == 0)
    norm(s; lo, hi) = (s - lo) / max(hi - lo, 1e-6)      (frozen min-max normalisation; the
                                                          epsilon guards a degenerate range)
    score = w_lat * (norm(lat_0) + norm(lat_1)) + w_con * (norm(con_0) + norm(con_1))

``norm`` rows are (min, max) of global-latent, local-latent, global-concept, local-concept.

The kernel walks tiles of BLOCK_Q queries x BLOCK_N videos: the latent terms are ``tl.dot``s over
D (tensor cores for fp16/bf16; exact "ieee" fp32 products for fp32 inputs), the Jaccard terms a
broadcast min over K chunks on CUDA cores, everything accumulated in fp32 and nothing of size
Q x N x K ever written. ``sum max`` comes from the identity max(x, y) = x + y - min(x, y):
sum max = sum x + sum y - sum min, which halves the per-element work (concept probabilities are
non-negative, so sum max >= (sum x + sum y) / 2 and the subtraction loses at most one bit).
Query and video latents must share a dtype; the concept tensors may each have any of the three.

With ``k=`` each program keeps a running top-k of its queries over a range of videos (a "split"),
so only Q x splits x k' keys leave the first kernel and a second kernel merges them to Q x k.
A (score, index) pair is packed into one int64 key, order-preserving: the score's fp32 bits mapped
to a signed int that sorts like the float, in the high 32 bits; 2^31 - 1 - index in the low 32
bits, so equal scores sort by lower index first. Sorting keys is exact and needs no payload.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import _utils, reference
from kernels._utils import (
    check_device,
    check_float,
    check_shape,
    device_guard,
    dot_precision,
    input_kind,
    next_pow2,
)

SPAN_EPS = reference.SPAN_EPS  # max(hi - lo, SPAN_EPS) in the normalisation
MAX_TOPK = 128        # largest k the fused top-k keeps in registers
_EMPTY_KEY = -(2 ** 63)  # sorts below every real (score, index) key


# ----------------------------------------------------------------------------- configurations

@dataclass(frozen=True)
class ScoreConfig:
    """Tile sizes and launch options. block_d and block_k are the chunk widths of the D and K loops."""
    block_q: int
    block_n: int
    block_d: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    group_q: int = 8      # tile swizzle: GROUP_Q query tiles sweep the videos together (L2 reuse)


# Shipped GPU configurations by (mode, input kind); the compile gate checks each for sm_80/89/90:
# tensor cores, no spills. The Jaccard broadcast (block_q x block_n x block_k) dominates the
# registers, so block_k stays small; block_q = 64 lets Hopper use wgmma (M = 64 per warpgroup);
# top-k tiles are narrower to leave room for the keys; fp32 tiles (exact "ieee" dots, no tensor
# cores) take twice the registers per element, hence the short block_d.
GPU_CONFIGS = {
    ("matrix", "16-bit"): ScoreConfig(block_q=64, block_n=64, block_d=64, block_k=4, num_warps=8),
    ("topk", "16-bit"): ScoreConfig(block_q=64, block_n=32, block_d=64, block_k=4, num_warps=8),
    ("matrix", "fp32"): ScoreConfig(block_q=64, block_n=32, block_d=16, block_k=4, num_warps=8),
    ("topk", "fp32"): ScoreConfig(block_q=64, block_n=32, block_d=16, block_k=4, num_warps=8),
}
MERGE_BLOCK_Q = 4     # rows per program in the merge kernel
MERGE_CHUNK = 4       # splits merged per step in the merge kernel


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _latent_dot(q_ptr, v_ptr, offs_q, offs_n, Q, N, D, stride_q, stride_v,
                BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    """(BLOCK_Q, BLOCK_N) dot products of query rows with video rows, over D in BLOCK_D chunks."""
    acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + offs_q[:, None].to(tl.int64) * stride_q + offs_d[None, :],
                    mask=(offs_q[:, None] < Q) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_ptr + offs_n[None, :].to(tl.int64) * stride_v + offs_d[:, None],
                    mask=(offs_n[None, :] < N) & (offs_d[:, None] < D), other=0.0)
        acc = tl.dot(q, v, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _jaccard(x_ptr, y_ptr, offs_q, offs_n, Q, N, K, stride_x, stride_y,
             BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_Q, BLOCK_N) Jaccard similarities sum min / sum max over K in BLOCK_K chunks."""
    sum_min = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    sum_x = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    sum_y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        # Padding is 0 in both operands, so padded concepts add min(0, 0) = 0 to every sum.
        x = tl.load(x_ptr + offs_q[:, None].to(tl.int64) * stride_x + offs_k[None, :],
                    mask=(offs_q[:, None] < Q) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs_n[:, None].to(tl.int64) * stride_y + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        sum_min += tl.sum(tl.minimum(x[:, None, :], y[None, :, :]), axis=2)
        sum_x += tl.sum(x, axis=1)
        sum_y += tl.sum(y, axis=1)
    sum_max = sum_x[:, None] + sum_y[None, :] - sum_min
    has_mass = sum_max > 0.0
    return tl.where(has_mass, sum_min / tl.where(has_mass, sum_max, 1.0), 0.0)


@triton.jit
def _normalise(s, norm_ptr, which: tl.constexpr, SPAN_EPS: tl.constexpr):
    lo = tl.load(norm_ptr + 2 * which)
    hi = tl.load(norm_ptr + 2 * which + 1)
    return (s - lo) / tl.maximum(hi - lo, SPAN_EPS)


@triton.jit
def _score_tile(q_lat, q_con, v_lat, v_con, norm_ptr, offs_q, offs_n, Q, N, D, K,
                sq_lat, sv_lat, sq_con, sv_con, w_lat, w_con,
                BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, SPAN_EPS: tl.constexpr):
    """Fused scores of one (BLOCK_Q, BLOCK_N) tile, fp32. Branch 1 sits D (or K) after branch 0."""
    lat_g = _latent_dot(q_lat, v_lat, offs_q, offs_n, Q, N, D, sq_lat, sv_lat,
                        BLOCK_Q, BLOCK_N, BLOCK_D, PRECISION)
    lat_l = _latent_dot(q_lat + D, v_lat + D, offs_q, offs_n, Q, N, D, sq_lat, sv_lat,
                        BLOCK_Q, BLOCK_N, BLOCK_D, PRECISION)
    con_g = _jaccard(q_con, v_con, offs_q, offs_n, Q, N, K, sq_con, sv_con,
                     BLOCK_Q, BLOCK_N, BLOCK_K)
    con_l = _jaccard(q_con + K, v_con + K, offs_q, offs_n, Q, N, K, sq_con, sv_con,
                     BLOCK_Q, BLOCK_N, BLOCK_K)
    lat = _normalise(lat_g, norm_ptr, 0, SPAN_EPS) + _normalise(lat_l, norm_ptr, 1, SPAN_EPS)
    con = _normalise(con_g, norm_ptr, 2, SPAN_EPS) + _normalise(con_l, norm_ptr, 3, SPAN_EPS)
    return w_lat * lat + w_con * con


@triton.jit
def _tile_ids(Q, N, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_Q: tl.constexpr):
    """Grouped ordering: GROUP_Q query tiles share each video tile while it is in L2."""
    pid = tl.program_id(0)
    tiles_q = tl.cdiv(Q, BLOCK_Q)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_Q * tiles_n
    first_q = (pid // per_group) * GROUP_Q
    group_size = tl.minimum(tiles_q - first_q, GROUP_Q)
    pid_q = first_q + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_q, pid_n


@triton.jit
def _score_matrix_kernel(q_lat, q_con, v_lat, v_con, norm_ptr, out_ptr, Q, N, D, K,
                         sq_lat, sv_lat, sq_con, sv_con, s_out, w_lat, w_con,
                         BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_Q: tl.constexpr, PRECISION: tl.constexpr,
                         SPAN_EPS: tl.constexpr):
    pid_q, pid_n = _tile_ids(Q, N, BLOCK_Q, BLOCK_N, GROUP_Q)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    score = _score_tile(q_lat, q_con, v_lat, v_con, norm_ptr, offs_q, offs_n, Q, N, D, K,
                        sq_lat, sv_lat, sq_con, sv_con, w_lat, w_con,
                        BLOCK_Q, BLOCK_N, BLOCK_D, BLOCK_K, PRECISION, SPAN_EPS)
    tl.store(out_ptr + offs_q[:, None].to(tl.int64) * s_out + offs_n[None, :], score,
             mask=(offs_q[:, None] < Q) & (offs_n[None, :] < N))


@triton.jit
def _encode(score, index):
    """(score fp32, index int32) -> int64 key; keys sort like (score, -index)."""
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 and 0.0 must tie
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits
    return (ordered.to(tl.int64) << 32) | (2147483647 - index).to(tl.int64)


@triton.jit
def _decode(key):
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    index = 2147483647 - (key & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), index


@triton.jit
def _merge_topk(best, cand, TOPK: tl.constexpr, EMPTY: tl.constexpr):
    """Top TOPK keys of ``best`` (rows, TOPK) and ``cand`` (rows, C), sorted descending.

    TOPK rounds of "take the row max, blank it out": keys are unique (they hold the index), so
    each round removes exactly one; cheap next to scoring a tile, and the caller skips tiles
    that cannot improve any row.
    """
    cols = tl.arange(0, TOPK)[None, :]
    merged = tl.full(best.shape, EMPTY, dtype=tl.int64)
    for i in range(TOPK):
        top = tl.maximum(tl.max(best, axis=1), tl.max(cand, axis=1))[:, None]
        merged = tl.where(cols == i, top, merged)
        best = tl.where(best == top, EMPTY, best)
        cand = tl.where(cand == top, EMPTY, cand)
    return merged


@triton.jit
def _update_topk(best, cand, TOPK: tl.constexpr, EMPTY: tl.constexpr):
    """Merges ``cand`` into ``best`` unless no candidate beats its row's TOPK-th key."""
    kth = tl.min(best, axis=1)
    if tl.sum((cand > kth[:, None]).to(tl.int32)) > 0:
        best = _merge_topk(best, cand, TOPK, EMPTY)
    return best


@triton.jit
def _score_topk_kernel(q_lat, q_con, v_lat, v_con, norm_ptr, part_ptr, Q, N, D, K,
                       sq_lat, sv_lat, sq_con, sv_con, tiles_per_split, w_lat, w_con,
                       BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_K: tl.constexpr, TOPK: tl.constexpr, PRECISION: tl.constexpr,
                       SPAN_EPS: tl.constexpr, EMPTY: tl.constexpr):
    """Program (query tile, split): running top-TOPK keys over the split's video tiles."""
    pid_q = tl.program_id(0)
    split = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    best = tl.full((BLOCK_Q, TOPK), EMPTY, dtype=tl.int64)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(N, BLOCK_N))
    for tile in range(first, last):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        score = _score_tile(q_lat, q_con, v_lat, v_con, norm_ptr, offs_q, offs_n, Q, N, D, K,
                            sq_lat, sv_lat, sq_con, sv_con, w_lat, w_con,
                            BLOCK_Q, BLOCK_N, BLOCK_D, BLOCK_K, PRECISION, SPAN_EPS)
        keys = tl.where(offs_n[None, :] < N, _encode(score, offs_n[None, :]), EMPTY)
        best = _update_topk(best, keys, TOPK, EMPTY)
    n_splits = tl.num_programs(1)
    row = offs_q[:, None].to(tl.int64) * n_splits + split
    tl.store(part_ptr + row * TOPK + tl.arange(0, TOPK)[None, :], best, mask=offs_q[:, None] < Q)


@triton.jit
def _topk_merge_kernel(part_ptr, val_ptr, idx_ptr, Q, n_splits, k,
                       TOPK: tl.constexpr, BLOCK_Q: tl.constexpr, CHUNK: tl.constexpr,
                       EMPTY: tl.constexpr):
    """Merges each query's per-split top-TOPK keys into its top-k (values fp32, indices int64)."""
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_t = tl.arange(0, TOPK)
    best = tl.full((BLOCK_Q, TOPK), EMPTY, dtype=tl.int64)
    for s0 in range(0, n_splits, CHUNK):
        offs_s = s0 + tl.arange(0, CHUNK)
        ptrs = (part_ptr + (offs_q[:, None, None].to(tl.int64) * n_splits + offs_s[None, :, None])
                * TOPK + offs_t[None, None, :])
        mask = (offs_q[:, None, None] < Q) & (offs_s[None, :, None] < n_splits)
        keys = tl.reshape(tl.load(ptrs, mask=mask, other=EMPTY), (BLOCK_Q, CHUNK * TOPK))
        best = _update_topk(best, keys, TOPK, EMPTY)
    value, index = _decode(best)
    out = offs_q[:, None].to(tl.int64) * k + offs_t[None, :]
    mask = (offs_q[:, None] < Q) & (offs_t[None, :] < k)
    tl.store(val_ptr + out, value, mask=mask)
    tl.store(idx_ptr + out, index.to(tl.int64), mask=mask)


# ----------------------------------------------------------------------------- launcher

def _check_inputs(q_lat, q_con, v_lat, v_con, norm, k):
    what = "global_local_score"
    for name, t in (("q_lat", q_lat), ("q_con", q_con), ("v_lat", v_lat), ("v_con", v_con),
                    ("norm", norm)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_shape(q_lat, (None, 2, None), "q_lat", what)
    Q, _, D = q_lat.shape
    check_shape(q_con, (Q, 2, None), "q_con", what)
    K = q_con.shape[2]
    check_shape(v_lat, (None, 2, D), "v_lat", what)
    N = v_lat.shape[0]
    check_shape(v_con, (N, 2, K), "v_con", what)
    check_shape(norm, (4, 2), "norm", what)
    if min(Q, N, D, K) == 0:
        raise ValueError(f"{what}: empty input (Q={Q}, N={N}, D={D}, K={K})")
    if N >= 2 ** 31 - 1:
        raise ValueError(f"{what}: N={N} does not fit the int32 video index of the top-k keys")
    if k is not None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"{what}: k must be a positive int or None, got {k!r}")
        if k > N:
            raise ValueError(f"{what}: k={k} exceeds the number of videos N={N}")
        if k > MAX_TOPK:
            raise ValueError(f"{what}: k={k} exceeds the fused top-k limit {MAX_TOPK}; "
                             "use k=None and select from the score matrix")
    kernel = _score_matrix_kernel if k is None else _score_topk_kernel
    check_device(kernel, {"q_lat": q_lat, "q_con": q_con, "v_lat": v_lat, "v_con": v_con,
                          "norm": norm}, what)
    for name, t in (("q_lat", q_lat), ("q_con", q_con), ("v_lat", v_lat), ("v_con", v_con),
                    ("norm", norm)):
        check_float(kernel, t, name, what)
    if q_lat.dtype != v_lat.dtype:
        raise ValueError(f"{what}: q_lat ({q_lat.dtype}) and v_lat ({v_lat.dtype}) must share a "
                         "dtype (they meet in one tensor-core dot)")
    return Q, N, D, K


def _default_splits(device, q_tiles, n_tiles):
    """Enough (query tile, split) programs to fill the GPU a few times over."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, triton.cdiv(4 * sms, q_tiles)))


def global_local_score(q_lat, q_con, v_lat, v_con, norm, weights=(0.6, 0.4), k=None, *,
                       config: ScoreConfig | None = None, splits: int | None = None):
    """Fused hybrid-space scores of Q queries against N videos.

    Args:
        q_lat: (Q, 2, D) L2-normalised global/local query latents (fp32, fp16 or bf16).
        q_con: (Q, 2, K) query concept probabilities.
        v_lat: (N, 2, D) L2-normalised video latents, same dtype as q_lat.
        v_con: (N, 2, K) video concept probabilities.
        norm: (4, 2) frozen (min, max) of global-latent, local-latent, global-concept,
            local-concept similarities.
        weights: (w_lat, w_con).
        k: None for the full (Q, N) fp32 score matrix; an int in [1, min(N, 128)] for each
            query's top-k as (values (Q, k) fp32, indices (Q, k) int64), descending, ties broken
            by the lower video index.
        config: tile sizes (default: the shipped GPU config, or a few large tiles on the CPU
            interpreter). splits: video ranges per query tile in top-k mode (default: fill the GPU).
    """
    Q, N, D, K = _check_inputs(q_lat, q_con, v_lat, v_con, norm, k)
    if len(weights) != 2:
        raise ValueError(f"global_local_score: weights must be (w_lat, w_con), got {weights!r}")
    device = q_lat.device
    cfg = config or _default_config(device, q_lat.dtype, Q, N, D, K, k)
    _check_config(cfg)
    inputs = [t.contiguous() for t in (q_lat, q_con, v_lat, v_con)]
    inputs.append(norm.to(torch.float32).contiguous())
    # Runtime arguments shared by both kernels after the output pointer: sizes, row strides
    # (branch b of a row sits b * D, or b * K, further on), weights.
    q_lat, q_con, v_lat, v_con = inputs[:4]
    sizes = (Q, N, D, K, q_lat.stride(0), v_lat.stride(0), q_con.stride(0), v_con.stride(0))
    consts = {"BLOCK_Q": cfg.block_q, "BLOCK_N": cfg.block_n, "BLOCK_D": cfg.block_d,
              "BLOCK_K": cfg.block_k, "PRECISION": dot_precision(q_lat.dtype),
              "SPAN_EPS": SPAN_EPS, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
              "enable_fp_fusion": True}
    w_lat, w_con = (float(w) for w in weights)
    with device_guard(device):
        if k is None:
            return _launch_matrix(inputs, sizes, (w_lat, w_con), consts, cfg, device)
        return _launch_topk(inputs, sizes, (w_lat, w_con), consts, cfg, device, k, splits)


def _launch_matrix(inputs, sizes, weights, consts, cfg, device):
    Q, N = sizes[0], sizes[1]
    out = _utils.empty((Q, N), torch.float32, device)
    grid = (triton.cdiv(Q, cfg.block_q) * triton.cdiv(N, cfg.block_n),)
    _score_matrix_kernel[grid](*inputs, out, *sizes, out.stride(0), *weights,
                               GROUP_Q=cfg.group_q, **consts)
    return out


def _launch_topk(inputs, sizes, weights, consts, cfg, device, k, splits):
    Q, N = sizes[0], sizes[1]
    topk = next_pow2(k)
    q_tiles, n_tiles = triton.cdiv(Q, cfg.block_q), triton.cdiv(N, cfg.block_n)
    # At most one split per video tile, and within CUDA's limit on grid axis 1.
    n_splits = min(splits or _default_splits(device, q_tiles, n_tiles), n_tiles, 65535)
    tiles_per_split = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, tiles_per_split)  # no split without a tile
    partial = _utils.empty((Q, n_splits, topk), torch.int64, device)
    _score_topk_kernel[(q_tiles, n_splits)](*inputs, partial, *sizes, tiles_per_split, *weights,
                                            TOPK=topk, EMPTY=_EMPTY_KEY, **consts)
    values = _utils.empty((Q, k), torch.float32, device)
    indices = _utils.empty((Q, k), torch.int64, device)
    merge_q = MERGE_BLOCK_Q if device.type == "cuda" else next_pow2(min(Q, 16))
    _topk_merge_kernel[(triton.cdiv(Q, merge_q),)](partial, values, indices, Q, n_splits, k,
                                                   TOPK=topk, BLOCK_Q=merge_q, CHUNK=MERGE_CHUNK,
                                                   EMPTY=_EMPTY_KEY, enable_fp_fusion=True)
    return values, indices


def _check_config(cfg):
    blocks = (cfg.block_q, cfg.block_n, cfg.block_d, cfg.block_k)
    if any(b < 1 or b & (b - 1) for b in blocks) or cfg.group_q < 1:
        raise ValueError(f"global_local_score: block sizes must be powers of two, got {cfg}")


def _default_config(device, dtype, Q, N, D, K, k):
    if device.type == "cuda":
        return GPU_CONFIGS["matrix" if k is None else "topk", input_kind(dtype)]
    # Interpreter: its cost is per program and per loop step, nearly independent of tile size,
    # so use few, large tiles (numpy does the work).
    return ScoreConfig(block_q=next_pow2(min(Q, 16)), block_n=next_pow2(min(N, 128)),
                       block_d=next_pow2(min(D, 256)), block_k=next_pow2(min(K, 128)))


# ----------------------------------------------------------------------------- reference

def global_local_score_ref(q_lat, q_con, v_lat, v_con, norm, weights=(0.6, 0.4), k=None, *,
                           chunk_elems: int = 1 << 24, score_block=None):
    """Plain PyTorch oracle of ``global_local_score``: fp32 math (float64 for float64 inputs),
    chunked over queries and videos so that the (q, n, K) Jaccard intermediate holds at most
    ``chunk_elems`` elements. Scores come back in the math dtype.

    Top-k: a running merge per video chunk with a stable descending sort, so equal scores keep
    the lower video index first (the running list precedes the chunk and holds lower indices).
    ``score_block`` replaces the per-chunk scorer (bench/kernels.py passes a torch.compile'd one).
    """
    score_block = score_block or _score_block
    Q, N, K = q_lat.shape[0], v_lat.shape[0], q_con.shape[2]
    if k is not None and not 1 <= k <= N:
        raise ValueError(f"global_local_score_ref: k={k} must be in [1, N={N}]")
    w_lat, w_con = (float(w) for w in weights)
    work = torch.promote_types(q_lat.dtype, torch.float32)
    q_lat, q_con, v_lat, v_con, norm = (t.to(work) for t in (q_lat, q_con, v_lat, v_con, norm))
    out = torch.empty((Q, N), dtype=work, device=q_lat.device) if k is None else None
    values, indices = [], []
    best_v = best_i = None
    for qs, ns in reference.tiles(Q, N, K, chunk_elems):  # row-major: every video chunk of a query chunk in order
        s = score_block(q_lat[qs], q_con[qs], v_lat[ns], v_con[ns], norm, w_lat, w_con)
        if k is None:
            out[qs, ns] = s
            continue
        if ns.start == 0 and best_v is not None:  # a new query chunk
            values.append(best_v)
            indices.append(best_i)
            best_v = best_i = None
        idx = torch.arange(ns.start, ns.start + s.shape[1], device=s.device).expand_as(s)
        if best_v is not None:
            s, idx = torch.cat([best_v, s], 1), torch.cat([best_i, idx], 1)
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
        best_v, best_i = s.gather(1, order), idx.gather(1, order)
    if k is None:
        return out
    values.append(best_v)
    indices.append(best_i)
    return torch.cat(values), torch.cat(indices)


def _score_block(q_lat, q_con, v_lat, v_con, norm, w_lat, w_con):
    return reference.fused_score(q_lat, q_con, v_lat, v_con, norm, (w_lat, w_con))


# ----------------------------------------------------------------------------- compile gate

def gpu_compile_specs(dtype: str = "fp16", k: int = 10):
    """The shipped configurations for ``dtype`` inputs ("fp16", "bf16", "fp32") as CompileSpecs
    (see kernels._utils.compile_for_gpu): full matrix, top-k scan and top-k merge."""
    from kernels._utils import CompileSpec

    inputs = {"q_lat": f"*{dtype}", "q_con": f"*{dtype}", "v_lat": f"*{dtype}",
              "v_con": f"*{dtype}", "norm_ptr": "*fp32"}
    sizes = {n: "i32" for n in ("Q", "N", "D", "K", "sq_lat", "sv_lat", "sq_con", "sv_con")}
    weights = {"w_lat": "fp32", "w_con": "fp32"}
    aligned = ("q_lat", "q_con", "v_lat", "v_con", "norm_ptr", "D", "K",
               "sq_lat", "sv_lat", "sq_con", "sv_con")
    kind = "fp32" if dtype == "fp32" else "16-bit"
    full, scan = GPU_CONFIGS["matrix", kind], GPU_CONFIGS["topk", kind]
    topk = next_pow2(k)

    def blocks(cfg):
        return {"BLOCK_Q": cfg.block_q, "BLOCK_N": cfg.block_n, "BLOCK_D": cfg.block_d,
                "BLOCK_K": cfg.block_k, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                "SPAN_EPS": SPAN_EPS}

    return [
        CompileSpec(name=f"score_matrix[{dtype}]", fn=_score_matrix_kernel,
                    signature={**inputs, "out_ptr": "*fp32", **sizes, "s_out": "i32", **weights},
                    constexprs={**blocks(full), "GROUP_Q": full.group_q},
                    divisible=aligned + ("out_ptr",), num_warps=full.num_warps,
                    num_stages=full.num_stages),
        CompileSpec(name=f"score_topk[{dtype},k={k}]", fn=_score_topk_kernel,
                    signature={**inputs, "part_ptr": "*i64", **sizes, "tiles_per_split": "i32",
                               **weights},
                    constexprs={**blocks(scan), "TOPK": topk, "EMPTY": _EMPTY_KEY},
                    divisible=aligned + ("part_ptr",), num_warps=scan.num_warps,
                    num_stages=scan.num_stages),
        CompileSpec(name=f"topk_merge[k={k}]", fn=_topk_merge_kernel,
                    signature={"part_ptr": "*i64", "val_ptr": "*fp32", "idx_ptr": "*i64",
                               "Q": "i32", "n_splits": "i32", "k": "i32"},
                    constexprs={"TOPK": topk, "BLOCK_Q": MERGE_BLOCK_Q, "CHUNK": MERGE_CHUNK,
                                "EMPTY": _EMPTY_KEY},
                    divisible=("part_ptr", "val_ptr", "idx_ptr"), num_warps=4, num_stages=1,
                    tensor_cores=False),
    ]
