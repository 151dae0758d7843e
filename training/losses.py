"""Training losses of the hybrid space: triplet ranking (cosine and Jaccard) + concept BCE.

These follow RIVRL (loss.py::TripletLoss, jaccard_sim; model.py::forward_loss), which CVR-SDGM's
public code inherits:

- VSE++ max-violation triplet loss, both directions, margin 0.2, SUMMED over the batch
  (RIVRL's cost_style 'sum'; the loss therefore grows with the batch size, and the learning rate
  1e-4 was tuned for that scale at batch 128);
- per branch (global = RIVRL's previewing, local = intensive reading) a triplet on the latent
  cosine and one on the concept Jaccard similarity;
- BCE of each modality's concept probabilities against the video's tag scores, as
  ``nn.BCELoss()`` (mean over every element), multiplied by the batch size in the total, which puts
  it on the same per-sample scale as the summed triplets.

The glscl head's losses (peers.md section 1b, from GLSCL's modeling.py) follow `hybrid_loss`:
symmetric InfoNCE with a learnable logit scale, the inter-consistency and the intra-diversity
losses, summed by `glscl_loss`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from kernels import reference

__all__ = ["concept_bce", "cosine_sim", "glscl_consistency", "glscl_diversity", "glscl_loss", "hybrid_loss",
           "info_nce", "jaccard_sim", "triplet_loss"]


def cosine_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B1, D) x (B2, D) -> (B1, B2). Inputs must already be L2-normalised (the towers do it)."""
    return a @ b.T


def jaccard_sim(x: torch.Tensor, y: torch.Tensor, max_elements: int = 1 << 22) -> torch.Tensor:
    """Soft Jaccard similarity of every pair: ``sum_k min(x_k, y_k) / sum_k max(x_k, y_k)``
    (kernels.reference.jaccard: 0 where both vectors are all zeros, where RIVRL had NaN).

    x: (B1, K), y: (B2, K), non-negative (concept probabilities). Returns (B1, B2); differentiable
    (min/max pass the gradient to the smaller/larger entry). The pairwise (rows, cols, K)
    intermediate is built in tiles of at most ``max_elements`` numbers (kernels.reference.tiles),
    so a 128 x 128 x 512 batch runs in two tiles of 4M floats instead of one 8M tensor.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"jaccard_sim needs (B1, K) and (B2, K), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        return x.new_zeros(x.shape[0], y.shape[0])
    by_rows: dict = {}  # row-tile start -> that row tile's blocks, in column order (differentiable cat)
    for rows, cols in reference.tiles(x.shape[0], y.shape[0], x.shape[1], max_elements):
        by_rows.setdefault(rows.start, []).append(reference.jaccard(x[rows], y[cols]))
    return torch.cat([torch.cat(blocks, dim=1) for blocks in by_rows.values()], dim=0)


def triplet_loss(sim: torch.Tensor, margin: float = 0.2, hardest: bool = True) -> torch.Tensor:
    """VSE++ triplet ranking loss over an in-batch similarity matrix, both directions, summed.

    sim: (B, B); row i = text i, column j = video j; the diagonal holds the positive pairs.
    Text->video: for anchor text i, violations ``[margin + sim[i, j] - sim[i, i]]_+`` over the
    videos j != i of its row. Video->text: for anchor video j, ``[margin + sim[i, j] - sim[j, j]]_+``
    over the texts i != j of its column. Only the diagonal is excluded: another caption of the same
    video in the batch counts as a negative, as in RIVRL.

    hardest=True keeps each anchor's largest violation (the hardest in-batch negative, VSE++'s
    max_violation); hardest=False sums over all negatives. The result is the SUM over anchors of
    both directions, not the mean (RIVRL/VSE++ cost_style 'sum').
    """
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"triplet_loss needs a square (B, B) similarity matrix, got {tuple(sim.shape)}")
    pos = sim.diagonal()
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    cost_t2v = (margin + sim - pos[:, None]).clamp_min(0).masked_fill(eye, 0)  # row i vs its positive
    cost_v2t = (margin + sim - pos[None, :]).clamp_min(0).masked_fill(eye, 0)  # column j vs its positive
    if hardest:
        # Violations are >= 0 and the diagonal is 0, so the max over a row/column is the hardest
        # negative's violation (0 when B = 1 or nothing violates).
        return cost_t2v.amax(dim=1).sum() + cost_v2t.amax(dim=0).sum()
    return cost_t2v.sum() + cost_v2t.sum()


def concept_bce(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Binary cross-entropy of concept probabilities against soft tag targets, MEAN over elements.

    probs: (B, K) already sigmoid'ed; targets: (B, K) in [0, 1] (tag counts / the video's max
    count). The mean over all B*K elements is ``nn.BCELoss()``'s default, which RIVRL uses (and
    then multiplies by the batch size: see hybrid_loss). Probabilities are clamped to
    [eps, 1 - eps] so a saturated sigmoid (exactly 0 or 1 in float32) gives a finite loss;
    nn.BCELoss clamps the log at -100 instead, which differs only for saturated entries.
    """
    if probs.shape != targets.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and targets {tuple(targets.shape)} differ in shape")
    p = probs.clamp(eps, 1 - eps)
    t = targets.to(p.dtype)
    return -(t * torch.log(p) + (1 - t) * torch.log1p(-p)).mean()


def _get(out, name: str) -> torch.Tensor:
    return out[name] if isinstance(out, Mapping) else getattr(out, name)


def hybrid_loss(
    text_out,
    video_out,
    tag_targets: torch.Tensor,
    margin: float = 0.2,
    concept_margin: float = 0.2,
    bce_weight: float | None = None,
    hardest: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """RIVRL's hybrid-space loss for a batch of B (text, video) pairs, over both branches.

    text_out, video_out: mappings or objects with ``lat_g, lat_l`` (B, D) L2-normalised latent
    vectors and ``con_g, con_l`` (B, K) concept probabilities; row i of each is pair i.
    tag_targets: (B, K), the tags of pair i's video (counts / max count).

        total = sum_b [ triplet(cos(text_b, video_b), margin) + triplet(jaccard(...), concept_margin) ]
              + bce_weight * sum_b [ bce(video con_b, tags) + bce(text con_b, tags) ]

    bce_weight None means the batch size B, as RIVRL (``loss_1 + loss_2 + batch_size * (loss_3 +
    loss_4)``). RIVRL's margin_2 is ``concept_margin``. Returns the total and its parts as floats
    for logging (keys: tri_cos_g, tri_cos_l, tri_jac_g, tri_jac_l, bce_video_g, bce_video_l,
    bce_text_g, bce_text_l, total).
    """
    batch = tag_targets.shape[0]
    weight = float(batch if bce_weight is None else bce_weight)
    parts: dict[str, torch.Tensor] = {}
    for b in ("g", "l"):
        lat_t, lat_v = _get(text_out, f"lat_{b}"), _get(video_out, f"lat_{b}")
        con_t, con_v = _get(text_out, f"con_{b}"), _get(video_out, f"con_{b}")
        parts[f"tri_cos_{b}"] = triplet_loss(cosine_sim(lat_t, lat_v), margin, hardest)
        parts[f"tri_jac_{b}"] = triplet_loss(jaccard_sim(con_t, con_v), concept_margin, hardest)
        parts[f"bce_video_{b}"] = concept_bce(con_v, tag_targets)
        parts[f"bce_text_{b}"] = concept_bce(con_t, tag_targets)
    triplets = sum(v for k, v in parts.items() if k.startswith("tri_"))
    bces = sum(v for k, v in parts.items() if k.startswith("bce_"))
    total = triplets + weight * bces
    logged = {k: float(v.detach()) for k, v in parts.items()}
    logged["total"] = float(total.detach())
    return total, logged


# ---------------------------------------------------------------------------------------------
# The glscl head (engine/glscl.py)

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) here, so the softmax cannot saturate without bound


def info_nce(scores: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a (B, B) text x video score matrix whose diagonal holds the pairs:
    the mean of -log softmax(diagonal) over rows and over columns of exp(logit_scale) * scores,
    averaged over the two directions (GLSCL's CrossEn on S and S^T)."""
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"info_nce needs a square (B, B) score matrix, got {tuple(scores.shape)}")
    logits = scores * logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    target = torch.arange(scores.shape[0], device=scores.device)
    return (torch.nn.functional.cross_entropy(logits, target)
            + torch.nn.functional.cross_entropy(logits.T, target)) / 2


def glscl_consistency(z_v: torch.Tensor, z_t: torch.Tensor, beta: float = 0.005, target: float = 0.75) -> torch.Tensor:
    """Inter-consistency of the decoded vectors z_v, z_t (B, K, D), pair b in row b:

        MSE(mean_b z^v_b, mean_b z^t_b) + beta * sum_k (C_kk - target)^2,  C = (1/K) sum_b z^v_b z^t_b^T

    (GLSCL's code names it Intra_Consistency; C is summed over the batch and divided by K, as there)."""
    k = z_v.shape[1]
    diagonal = torch.einsum("bkd,bkd->k", z_v, z_t) / k  # C_kk without forming C
    mse = ((z_v.mean(0) - z_t.mean(0)) ** 2).mean()
    return mse + beta * ((diagonal - target) ** 2).sum()


def glscl_diversity(z_v: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Intra-diversity of the video side's K decoded vectors (B, K, D): M = mean_b z^v_b z^v_b^T (K, K)
    and a hinge in both directions with the diagonal as the positive,

        sum_{i != j} [margin + M_ij - M_ii]_+ / (K(K-1)) + sum_{i != j} [margin + M_ij - M_jj]_+ / (K(K-1))

    (GLSCL's Inter_Diversity), so each query decodes something the others do not."""
    k = z_v.shape[1]
    if k < 2:
        return z_v.new_zeros(())
    m = torch.einsum("bid,bjd->ij", z_v, z_v) / z_v.shape[0]
    diagonal = m.diagonal()
    off = ~torch.eye(k, dtype=torch.bool, device=m.device)
    rows = (margin + m - diagonal[:, None]).clamp_min(0)[off].sum()
    cols = (margin + m - diagonal[None, :]).clamp_min(0)[off].sum()
    return (rows + cols) / (k * (k - 1))


def glscl_loss(scores: torch.Tensor, logit_scale: torch.Tensor, z_t: torch.Tensor, z_v: torch.Tensor,
               alpha: float = 1e-4, beta: float = 0.005, target: float = 0.75) -> tuple[torch.Tensor, dict]:
    """GLSCL's total for a batch of B pairs: InfoNCE on the (B, B) scores S = S_g + lambda S_l,
    + alpha * intra-diversity(z^v) + inter-consistency(z^v, z^t). Returns the total and its parts
    as floats (nce, diversity, consistency, total)."""
    parts = {"nce": info_nce(scores, logit_scale), "diversity": alpha * glscl_diversity(z_v),
             "consistency": glscl_consistency(z_v, z_t, beta, target)}
    total = parts["nce"] + parts["diversity"] + parts["consistency"]
    logged = {k: float(v.detach()) for k, v in parts.items()}
    logged["total"] = float(total.detach())
    return total, logged
