"""The formulas the Triton kernels fuse, defined once in plain PyTorch (ARCHITECTURE.md, sections 4
and 7).

The GLSCL peer head's score (`glscl_score`, engine/glscl.py) is defined here too, for the same
reason: training, the torch Scorer and any exported graph compute the one function.

Every other place that computes them calls these: the model (engine/model.py), the training losses
(training/losses.py), the exported ONNX graphs (export/graphs/) and the kernels' ``*_ref`` oracles
(kernels/global_local_score.py, kernels/hybrid_attention.py). Functions here are whole-tensor and
loop-free, so they trace into ONNX as they are; `tiles` is the one helper that bounds the memory of
the pairwise (queries x videos x K) Jaccard intermediate for the callers that need it.

Fused global-local score of query q and video n (branch b: 0 global, 1 local):

    lat_b = <q_lat[q, b], v_lat[n, b]>                  (cosine: the inputs are L2-normalised)
    con_b = sum_k min(x_k, y_k) / sum_k max(x_k, y_k)   (Jaccard of concept vectors; 0 where
                                                          sum_k max == 0)
    norm(s; lo, hi) = (s - lo) / max(hi - lo, SPAN_EPS) (frozen min-max normalisation)
    score = w_lat * (norm(lat_0) + norm(lat_1)) + w_con * (norm(con_0) + norm(con_1))

Text-guided hybrid attention over projected anchor regions R' (R, d), tokens T' (L, d),
sentence t' (d), channel gate beta (d) and mix gamma, for each query:

    alpha = softmax_r(<R'_r, t'> / sqrt(d))   a_s = sum_r alpha_r R'_r          (spatial)
    m = mean_r R'_r                           a_c = beta * m                    (channel)
    a = gamma * a_s + (1 - gamma) * a_c                                          (hybrid)
    A_l = softmax_r(<T'_l, R'_r> / sqrt(d)) R'                                   (token level)

over valid regions only; rows of masked tokens in A are 0, and a query without a valid region gets
zeros everywhere.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

SPAN_EPS = 1e-6  # max(hi - lo, SPAN_EPS) in the normalisation: a degenerate range never divides by 0


# ---------------------------------------------------------------------------------------------
# Fused global-local score


def jaccard(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_k min / sum_k max of every pair: (q, K) x (n, K) -> (q, n); 0 where sum_k max == 0.
    Differentiable (min and max pass the gradient to the smaller / larger entry)."""
    xs, ys = x.unsqueeze(1), y.unsqueeze(0)
    minimum = torch.minimum(xs, ys).sum(-1)
    maximum = torch.maximum(xs, ys).sum(-1)
    positive = maximum > 0
    return torch.where(positive, minimum / torch.where(positive, maximum, torch.ones_like(maximum)),
                       torch.zeros_like(minimum))


def similarities(q_lat, q_con, v_lat, v_con) -> torch.Tensor:
    """The four raw similarity matrices (4, q, n): global and local latent cosines, global and
    local concept Jaccards (the order of the min-max constants everywhere)."""
    return torch.stack([
        q_lat[:, 0] @ v_lat[:, 0].T,
        q_lat[:, 1] @ v_lat[:, 1].T,
        jaccard(q_con[:, 0], v_con[:, 0]),
        jaccard(q_con[:, 1], v_con[:, 1]),
    ])


def normalise(sims: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation of (4, q, n) similarities with per-similarity constants lo, hi (4,)."""
    return (sims - lo.view(4, 1, 1)) / (hi - lo).clamp_min(SPAN_EPS).view(4, 1, 1)


def fuse(normed: torch.Tensor, weights=(0.6, 0.4), local_branch: bool = True) -> torch.Tensor:
    """w_lat (lat_g + lat_l) + w_con (con_g + con_l) of normalised (4, q, n) similarities; without
    the local branch (an ablation) the global one counts twice."""
    w_lat, w_con = (float(w) for w in weights)
    if not local_branch:
        normed = normed[[0, 0, 2, 2]]
    return w_lat * (normed[0] + normed[1]) + w_con * (normed[2] + normed[3])


def fused_score(q_lat, q_con, v_lat, v_con, norm, weights=(0.6, 0.4), local_branch: bool = True) -> torch.Tensor:
    """Fused scores (q, n) with frozen constants norm (4, 2) of (min, max)."""
    sims = similarities(q_lat, q_con, v_lat, v_con)
    return fuse(normalise(sims, norm[:, 0], norm[:, 1]), weights, local_branch)


def tiles(rows: int, cols: int, width: int, budget: int = 1 << 24):
    """(row slice, column slice) tiles covering a rows x cols pairwise computation whose
    intermediate is rows x cols x width numbers, each tile holding at most `budget` of them (at
    least one row and one column), row-major: as many columns as fit beside one row, then as many
    rows as fit beside those columns."""
    width = max(1, width)
    col_tile = max(1, min(cols, budget // width))
    row_tile = max(1, budget // (col_tile * width))
    for r in range(0, rows, row_tile):
        for c in range(0, cols, col_tile):
            yield slice(r, r + row_tile), slice(c, c + col_tile)


# ---------------------------------------------------------------------------------------------
# Text-guided hybrid attention


class HybridAttention(NamedTuple):
    a: torch.Tensor     # (B, d) hybrid vector
    a_s: torch.Tensor   # (B, d) spatial attended vector
    a_c: torch.Tensor   # (B, d) channel-gated vector
    m: torch.Tensor     # (B, d) mean of the valid regions
    A: torch.Tensor     # (B, L, d) token-level views of the anchor


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over the valid positions; a slice with no valid position gives zeros, not NaN (no
    NaN is ever formed, so the function exports to ONNX and TensorRT as it is)."""
    logits = logits.masked_fill(~mask, float("-inf"))
    any_valid = mask.any(dim=dim, keepdim=True)
    logits = torch.where(any_valid, logits, torch.zeros_like(logits))
    return torch.softmax(logits, dim=dim) * any_valid


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over dim 1 of (B, n, d) where mask (B, n) is True (all of it without a mask); a row
    with no valid position gives zeros. The hybrid attention's m = mean_r R'_r, and the video
    tower's mean over frames."""
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (weights * x).sum(1) / weights.sum(1).clamp_min(1.0)


def hybrid_attention(tokens, token_mask, regions, sentence, beta, gamma, region_mask=None) -> HybridAttention:
    """The hybrid attention of B queries in the inputs' dtype. tokens (B, L, d), token_mask (B, L)
    bool, regions (B, R, d), sentence (B, d), beta (B, d), gamma a scalar or (B,) tensor,
    region_mask (B, R) bool or None (all valid)."""
    batch, _, width = tokens.shape
    scale = 1.0 / math.sqrt(width)
    if region_mask is None:
        region_mask = torch.ones(regions.shape[:2], dtype=torch.bool, device=regions.device)
    gamma = torch.as_tensor(gamma, dtype=tokens.dtype, device=tokens.device).reshape(-1).expand(batch)[:, None]
    alpha = masked_softmax(torch.einsum("brd,bd->br", regions, sentence) * scale, region_mask)
    a_s = torch.einsum("br,brd->bd", alpha, regions)
    m = masked_mean(regions, region_mask)
    a_c = beta * m
    valid = token_mask[:, :, None] & region_mask[:, None, :]
    weights = masked_softmax(torch.einsum("bld,brd->blr", tokens, regions) * scale, valid)
    return HybridAttention(gamma * a_s + (1 - gamma) * a_c, a_s, a_c, m,
                           torch.einsum("blr,brd->bld", weights, regions))


# ---------------------------------------------------------------------------------------------
# GLSCL score (the peer head, engine/glscl.py; peers.md section 1a)

GLSCL_MASKS = ("paper", "renormalise")
GLSCL_EPS = 1e-8  # cos(x, y) = <x, y> / max(|x| |y|, GLSCL_EPS), as torch.cosine_similarity


def glscl_frame_weights(logits: torch.Tensor, mask: torch.Tensor, mode: str = "paper") -> torch.Tensor:
    """Frame weights w from logits (..., F) and a bool mask broadcastable to them: "paper" is the
    GLSCL code's softmax over all F slots then times the mask (no renormalisation: padded slots
    keep their share of the denominator); "renormalise" a softmax over the valid frames only."""
    if mode == "paper":
        return torch.softmax(logits, dim=-1) * mask.to(logits.dtype)
    if mode == "renormalise":
        return masked_softmax(logits, mask.expand_as(logits))
    raise ValueError(f"GLSCL mask mode must be one of {GLSCL_MASKS}, got {mode!r}")


def glscl_score(q_lat, v_lat, v_mask, tau: float = 3.0, lam: float = 0.5, mode: str = "paper",
                pool: bool = False) -> torch.Tensor:
    """GLSCL scores (q, n) of queries q_lat (q, 1+K, D) against videos v_lat (n, 1+F+K, D) whose
    frame mask is v_mask (n, F) (bool or 0/1). Slots: query [c, z^t_1..K]; video [mean, v_1..F,
    z^v_1..K] (engine/glscl.py writes them; padded frames are zeros).

        w_f = softmax_f(<c, v_f> / tau) * m_f             ("paper"; "renormalise": softmax over
                                                            the valid frames only)
        S_g = cos(c, sum_f w_f v_f)
        S_l = (1/K) sum_k <z^t_k, z^v_k>                   (the z are L2-normalised)
        S   = S_g + lam * S_l

    The two mask modes give the same S_g: the paper's weights are the renormalised ones times one
    positive r = (sum over valid frames) / (sum over all F) per pair, and the cosine does not see
    a scale. They differ in the weights only (`glscl_frame_weights`); both are kept, as the issue
    asks, and tests/test_glscl.py shows it.

    The pooled video is never formed (it would be q x n x D): <c, sum_f w_f v_f> = sum_f w_f <c, v_f>
    and |sum_f w_f v_f|^2 = w^T G w with G = V V^T the video's F x F Gram matrix, so the largest
    temporary is q x n x F. The Gram matrices cost n F^2 D, the pooled videos q n F D: with fewer
    queries than frames (search at small batches) `pool=True` forms the pooled videos instead
    (q x n x D temporaries; the same value up to float rounding)."""
    k = q_lat.shape[1] - 1
    frames = v_mask.shape[1]
    c, z_t = q_lat[:, 0], q_lat[:, 1:]
    v, z_v = v_lat[:, 1 : 1 + frames], v_lat[:, 1 + frames : 1 + frames + k]
    mask = (v_mask > 0.5).unsqueeze(0)  # (1, n, F)
    dots = torch.einsum("qd,nfd->qnf", c, v)
    w = glscl_frame_weights(dots / tau, mask, mode)
    numerator = (w * dots).sum(-1)
    if pool:
        pooled = torch.einsum("qnf,nfd->qnd", w, v)
        squared = (pooled * pooled).sum(-1)
    else:
        gram = torch.einsum("nfd,ngd->nfg", v, v)
        squared = (torch.einsum("qnf,nfg->qng", w, gram) * w).sum(-1)
    # max(., eps^2) before the root: its gradient stays finite where nothing is pooled
    norms = c.norm(dim=-1, keepdim=True) * squared.clamp_min(GLSCL_EPS * GLSCL_EPS).sqrt()
    s_g = numerator / norms.clamp_min(GLSCL_EPS)
    s_l = z_t.reshape(z_t.shape[0], -1) @ z_v.reshape(z_v.shape[0], -1).T / k
    return s_g + lam * s_l
