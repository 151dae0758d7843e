"""The CVR-SDGM towers (ARCHITECTURE.md steps 3-7): video tower, query tower, hybrid heads, matcher.

The video side follows RIVRL (previewing BiGRU branch + intensive-reading branch with
previewing-aware attention). The query side adds this project's text-guided hybrid attention over
an anchor image's regions. Both sides map each branch (global, local) into a hybrid space: an
L2-normalised latent vector (D) and concept probabilities (K). The `Matcher` turns two sets of
embeddings into fused scores with frozen min-max constants.

Inputs are plain tensors, so the towers export to ONNX and the matcher has a fused Triton twin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from engine.config import ModelConfig

BRANCHES = ("global", "local")
# Order of the four similarities everywhere (norm constants, kernels): as kernels/global_local_score.
SIMILARITIES = ("lat_g", "lat_l", "con_g", "con_l")


@dataclass
class Embeddings:
    """One side's hybrid-space embeddings: latent (B, 2, D) L2-normalised per branch, and concept
    probabilities (B, 2, K); index 0 is the global branch, 1 the local one."""

    lat: torch.Tensor
    con: torch.Tensor

    def __len__(self) -> int:
        return self.lat.shape[0]


# ---------------------------------------------------------------------------------------------
# Shared pieces


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of (B, L, d) where mask (B, L) is True; all-masked rows give zeros."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over valid positions; a row with no valid position gives all zeros, not NaN."""
    logits = logits.masked_fill(~mask, float("-inf"))
    any_valid = mask.any(dim=dim, keepdim=True)
    logits = torch.where(any_valid, logits, torch.zeros_like(logits))
    return torch.softmax(logits, dim=dim) * any_valid


class HybridHead(nn.Module):
    """RIVRL's hybrid mapping of one branch: latent = l2norm(BN(FC(x))), concept = sigmoid(BN(FC(x)))."""

    def __init__(self, in_dim: int, latent_dim: int, concept_dim: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.latent = nn.Sequential(nn.Linear(in_dim, latent_dim), nn.BatchNorm1d(latent_dim))
        self.concept = nn.Sequential(nn.Linear(in_dim, concept_dim), nn.BatchNorm1d(concept_dim))

    def forward(self, x: torch.Tensor) -> tuple:
        x = self.dropout(x)
        return F.normalize(self.latent(x), dim=-1), torch.sigmoid(self.concept(x))


def _stack(heads: nn.ModuleList, global_x: torch.Tensor, local_x: torch.Tensor) -> Embeddings:
    (lat_g, con_g), (lat_l, con_l) = heads[0](global_x), heads[1](local_x)
    return Embeddings(lat=torch.stack([lat_g, lat_l], 1), con=torch.stack([con_g, con_l], 1))


def run_gru(gru: nn.GRU, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A (bi)GRU over the valid prefix of each sequence; padded positions give zeros and never
    influence valid ones (packed sequences), so padding changes nothing."""
    lengths = mask.sum(1).clamp_min(1).cpu()
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, _ = gru(packed)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out * mask.unsqueeze(-1).to(out.dtype)


# ---------------------------------------------------------------------------------------------
# Video tower


class PreviewAwareAttention(nn.Module):
    """RIVRL's previewing-aware attention: the previewing (global) vector queries a sequence."""

    def __init__(self, query_dim: int, seq_dim: int, attn_dim: int):
        super().__init__()
        self.query = nn.Linear(query_dim, attn_dim)
        self.key = nn.Linear(seq_dim, attn_dim)
        self.scale = 1.0 / math.sqrt(attn_dim)

    def forward(self, preview: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = torch.einsum("bd,bld->bl", self.query(preview), self.key(seq)) * self.scale
        weights = masked_softmax(logits, mask)
        # RIVRL adds the max-pooled sequence to the attended one (a residual that keeps salient
        # frames even when attention is flat).
        pooled_max = seq.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        pooled_max = torch.where(mask.any(1, keepdim=True), pooled_max, torch.zeros_like(pooled_max))
        return torch.einsum("bl,bld->bd", weights, seq) + pooled_max


class VideoTower(nn.Module):
    """Frame features (B, F, d_v) + mask (B, F) -> video Embeddings (global and local branch)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, local = config.video_gru_hidden, config.video_local_dim
        self.gru = nn.GRU(config.frame_dim, hidden, batch_first=True, bidirectional=True)
        self.frame_fc = nn.Linear(config.frame_dim, local)
        # Intensive reading: a temporal convolution, kernel 3, stride 2 (RIVRL: one conv layer).
        self.conv = nn.Conv1d(local, local, kernel_size=3, stride=2, padding=1)
        self.attend_frames = PreviewAwareAttention(2 * hidden, local, config.attn_dim)
        self.attend_conv = PreviewAwareAttention(2 * hidden, local, config.attn_dim)
        heads = [HybridHead(2 * hidden, config.latent_dim, config.concept_dim, config.dropout),
                 HybridHead(2 * local, config.latent_dim, config.concept_dim, config.dropout)]
        self.heads = nn.ModuleList(heads)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> Embeddings:
        mask = mask.bool()
        return self.from_gru_states(frames, mask, run_gru(self.gru, frames, mask))

    def from_gru_states(self, frames: torch.Tensor, mask: torch.Tensor, states: torch.Tensor) -> Embeddings:
        """Everything after the BiGRU (the ONNX export swaps in its own GRU graph, then calls this)."""
        preview = masked_mean(states, mask)  # (B, 2h): previewing branch
        x = torch.relu(self.frame_fc(frames)) * mask.unsqueeze(-1).to(frames.dtype)
        conv = torch.relu(self.temporal_conv(x))
        # An output position of the stride-2 conv is valid when its centre frame is.
        conv_mask = mask[:, ::2][:, : conv.shape[1]]
        local = torch.cat([self.attend_frames(preview, x, mask), self.attend_conv(preview, conv, conv_mask)], -1)
        return _stack(self.heads, preview, local)

    def temporal_conv(self, x: torch.Tensor) -> torch.Tensor:
        """`self.conv` (kernel 3, stride 2, padding 1) on (B, F, C) frames, as one matrix product over
        the three taps of each output position: the same weights and result, and on a CPU about half
        the cost of Conv1d's backward pass, the largest single cost of a training step."""
        n = x.shape[1]
        padded = F.pad(x, (0, 0, 1, 1))
        taps = torch.cat([padded[:, k : k + n : 2] for k in range(3)], dim=-1)  # (B, ceil(F/2), 3C)
        weight = self.conv.weight.permute(0, 2, 1).reshape(self.conv.out_channels, -1)  # [o, k*C + c]
        return F.linear(taps, weight, self.conv.bias)


# ---------------------------------------------------------------------------------------------
# Query tower


class HybridAttention(nn.Module):
    """Text-guided hybrid attention over anchor regions (ARCHITECTURE.md step 4), plain PyTorch:
    the reference that kernels/hybrid_attention.py matches."""

    def __init__(self, config: ModelConfig, sentence_dim: int, token_dim: int):
        super().__init__()
        d = config.attn_dim
        self.regions = nn.Linear(config.region_dim, d)
        self.sentence = nn.Linear(sentence_dim, d)
        self.tokens = nn.Linear(token_dim, d)
        self.channel = nn.Linear(2 * d, d)  # beta = sigmoid(W_c [t'; mean_r R'])
        self.gamma_logit = nn.Parameter(torch.zeros(()))  # gamma = sigmoid(.) in (0, 1), starts at 0.5
        self.relevance = nn.Linear(2 * d, 1)  # sigmoid(w . [t'; a]): can shut a bad anchor off
        self.mode = config.attention
        self.scale = 1.0 / math.sqrt(d)

    def forward(self, sentence, tokens, token_mask, regions, backend: str = "torch") -> tuple:
        """-> (a (B, d) gated anchor vector, A (B, L, d) each token's view of the anchor)."""
        r = self.regions(regions)
        t = self.sentence(sentence)
        tok = self.tokens(tokens)
        m = r.mean(1)
        beta = torch.sigmoid(self.channel(torch.cat([t, m], -1)))
        gamma = torch.sigmoid(self.gamma_logit)
        if backend == "triton":
            from kernels.hybrid_attention import hybrid_attention

            out = hybrid_attention(tok, token_mask, r, t, beta, gamma)
            a_s, a_c, token_view = out.a_s, out.a_c, out.A
        else:
            alpha = torch.softmax(torch.einsum("brd,bd->br", r, t) * self.scale, -1)
            a_s = torch.einsum("br,brd->bd", alpha, r)
            a_c = beta * m
            logits = torch.einsum("bld,brd->blr", tok, r) * self.scale
            token_view = torch.einsum("blr,brd->bld", torch.softmax(logits, -1), r)
            token_view = token_view * token_mask.unsqueeze(-1).to(token_view.dtype)
        a = {"hybrid": gamma * a_s + (1 - gamma) * a_c, "spatial": a_s, "channel": a_c, "meanpool": m}[self.mode]
        if self.mode == "meanpool":
            token_view = m.unsqueeze(1) * token_mask.unsqueeze(-1).to(m.dtype)
        relevance = torch.sigmoid(self.relevance(torch.cat([t, a], -1)))
        return relevance * a, relevance.unsqueeze(1) * token_view


class QueryTower(nn.Module):
    """Text features (+ anchor regions when `use_anchor`) -> query Embeddings.

    Global branch: [t ; a]. Local branch: each token's state fused with its own view of the anchor,
    pooled by attention over tokens. With `use_anchor=False` the same class is the text-only
    baseline: a and A are absent and the branches see the text alone."""

    def __init__(self, config: ModelConfig, sentence_dim: int, token_dim: int):
        super().__init__()
        self.use_anchor = config.use_anchor
        d = config.attn_dim
        global_in, local_in = sentence_dim, token_dim
        if self.use_anchor:
            self.attention = HybridAttention(config, sentence_dim, token_dim)
            global_in, local_in = sentence_dim + d, token_dim + d
        self.local_proj = nn.Linear(local_in, d)
        self.local_score = nn.Linear(d, 1)  # attention pooling over tokens
        heads = [HybridHead(global_in, config.latent_dim, config.concept_dim, config.dropout),
                 HybridHead(d, config.latent_dim, config.concept_dim, config.dropout)]
        self.heads = nn.ModuleList(heads)

    def forward(self, sentence, tokens, token_mask, regions=None, backend: str = "torch") -> Embeddings:
        token_mask = token_mask.bool()
        global_x, local_x = sentence, tokens
        if self.use_anchor:
            if regions is None:
                raise ValueError("this query tower was trained with anchors: pass anchor regions")
            a, token_view = self.attention(sentence, tokens, token_mask, regions, backend)
            global_x = torch.cat([sentence, a], -1)
            local_x = torch.cat([tokens, token_view], -1)
        hidden = torch.tanh(self.local_proj(local_x))
        weights = masked_softmax(self.local_score(hidden).squeeze(-1), token_mask)
        local = torch.einsum("bl,bld->bd", weights, hidden)
        return _stack(self.heads, global_x, local)


# ---------------------------------------------------------------------------------------------
# Matching


def jaccard(x: torch.Tensor, y: torch.Tensor, budget: int = 1 << 24) -> torch.Tensor:
    """sum_k min(x_k, y_k) / sum_k max(x_k, y_k) for every pair: (Q, K) x (N, K) -> (Q, N).

    Tiled over queries and videos so that no temporary holds more than `budget` elements (the
    whole Q x N x K broadcast would be 52 GB for 256 queries against 100k videos); a pair whose
    sum of maxima is 0 (both all-zero) scores 0."""
    n, k = y.shape
    video_tile = max(1, min(n, budget // max(1, k)))
    query_tile = max(1, budget // (video_tile * max(1, k)))
    rows = []
    for q in range(0, x.shape[0], query_tile):
        xs = x[q : q + query_tile].unsqueeze(1)
        tiles = []
        for v in range(0, n, video_tile):
            ys = y[v : v + video_tile].unsqueeze(0)
            minimum = torch.minimum(xs, ys).sum(-1)
            maximum = torch.maximum(xs, ys).sum(-1)
            tiles.append(torch.where(maximum > 0, minimum / maximum.clamp_min(1e-12), torch.zeros_like(minimum)))
        rows.append(torch.cat(tiles, 1))
    return torch.cat(rows)


def similarities(query: Embeddings, video: Embeddings) -> torch.Tensor:
    """The four raw similarity matrices, (4, Q, N), in SIMILARITIES order."""
    return torch.stack([
        query.lat[:, 0] @ video.lat[:, 0].T,
        query.lat[:, 1] @ video.lat[:, 1].T,
        jaccard(query.con[:, 0], video.con[:, 0]),
        jaccard(query.con[:, 1], video.con[:, 1]),
    ])


class Matcher(nn.Module):
    """Dual-branch hybrid-space matching: each similarity is min-max normalised with constants
    frozen from the validation set (stored in the checkpoint), then fused:
    score = w_lat * (lat_g + lat_l) + w_con * (con_g + con_l).

    RIVRL normalises over the whole test matrix, which an online engine cannot do; `transductive`
    reproduces that for parity (the constants then come from the matrix being scored)."""

    def __init__(self, weights=(0.6, 0.4), concept_space: bool = True, local_branch: bool = True):
        super().__init__()
        self.register_buffer("norm", torch.tensor([[0.0, 1.0]] * 4))  # (4, 2): (min, max) per similarity
        # Ablations switch parts of the fusion off: no concept space, or the global branch only.
        self.weights = (float(weights[0]), float(weights[1]) if concept_space else 0.0)
        self.local_branch = local_branch

    def fit_norm(self, query: Embeddings, video: Embeddings) -> None:
        """Freeze the min-max constants from a (validation) query x video matrix."""
        sims = similarities(query, video)
        self.norm.copy_(torch.stack([sims.flatten(1).amin(1), sims.flatten(1).amax(1)], 1))

    def forward(self, query: Embeddings, video: Embeddings, transductive: bool = False,
                backend: str = "torch", k: int | None = None):
        if backend == "triton":
            from kernels.global_local_score import global_local_score

            if not self.local_branch or transductive:
                raise ValueError("the triton backend scores both branches with frozen constants: use the torch "
                                 "backend for the no-local-branch ablation or transductive parity")
            from kernels.global_local_score import MAX_TOPK

            if k is not None and k > MAX_TOPK:  # beyond the in-kernel top-k: fused matrix, then sort
                scores = global_local_score(query.lat, query.con, video.lat, video.con, self.norm, self.weights)
                return topk_stable(scores, k)
            return global_local_score(query.lat, query.con, video.lat, video.con, self.norm, self.weights, k=k)
        sims = similarities(query, video)
        if transductive:
            lo, hi = sims.flatten(1).amin(1), sims.flatten(1).amax(1)
        else:
            lo, hi = self.norm[:, 0], self.norm[:, 1]
        normed = (sims - lo.view(4, 1, 1)) / (hi - lo).clamp_min(1e-6).view(4, 1, 1)
        w_lat, w_con = self.weights
        if not self.local_branch:
            normed = normed[[0, 0, 2, 2]]
        scores = w_lat * (normed[0] + normed[1]) + w_con * (normed[2] + normed[3])
        if k is None:
            return scores
        return topk_stable(scores, k)


def topk_stable(scores: torch.Tensor, k: int) -> tuple:
    """Top-k per row, descending, ties broken by the lower column index (as the kernels do)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    return order.values[:, :k], order.indices[:, :k]
