"""The CVR-SDGM model (ARCHITECTURE.md sections 3-7): video tower, query tower, hybrid heads, matcher.

The video side follows RIVRL (previewing BiGRU branch + intensive-reading branch with
previewing-aware attention). The query side adds this project's text-guided hybrid attention over
an anchor image's regions. Both sides map each branch (global, local) into a hybrid space: an
L2-normalised latent vector (D) and concept probabilities (K). The `Matcher` turns two sets of
embeddings into fused scores with frozen min-max constants.

Inputs are plain tensors, so the towers export to ONNX. The fused score and the hybrid attention
are defined once in kernels/reference.py; they run here inside small modules (`FusedScore`,
`HybridAttentionCore`) that engine/backends/triton.py swaps for the Triton kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from engine.config import ModelConfig
from engine.errors import InputError
from kernels import reference

BRANCHES = ("global", "local")
# Order of the four similarities everywhere (norm constants, kernels): as kernels/global_local_score.
SIMILARITIES = ("lat_g", "lat_l", "con_g", "con_l")


@dataclass
class Embeddings:
    """One side's embeddings. For the cvr head: latent (B, 2, D) L2-normalised per branch, and
    concept probabilities (B, 2, K); index 0 is the global branch, 1 the local one. Other heads
    keep other slots in dim 1 (the glscl head's: engine/glscl.py); slot 0 of `lat` is always the
    vector a FAISS first stage searches with."""

    lat: torch.Tensor
    con: torch.Tensor

    def __len__(self) -> int:
        return self.lat.shape[0]


# ---------------------------------------------------------------------------------------------
# Shared pieces


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
        weights = reference.masked_softmax(logits, mask)
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
        preview = reference.masked_mean(states, mask)  # (B, 2h): previewing branch
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


class HybridAttentionCore(nn.Module):
    """The attention itself, on projected inputs (kernels.reference.hybrid_attention). A module so
    that engine/backends/triton.py can swap in the fused kernel (kernels.modules)."""

    def forward(self, tokens, token_mask, regions, sentence, beta, gamma, region_mask=None):
        return reference.hybrid_attention(tokens, token_mask, regions, sentence, beta, gamma, region_mask)


class HybridAttention(nn.Module):
    """Text-guided hybrid attention over anchor regions (ARCHITECTURE.md section 4): learned
    projections, the channel gate, the attention (`core`), the ablation modes and the relevance
    gate that can shut a bad anchor off."""

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
        self.core = HybridAttentionCore()

    def forward(self, sentence, tokens, token_mask, regions, region_mask=None) -> tuple:
        """-> (a (B, d) gated anchor vector, A (B, L, d) each token's view of the anchor).

        `regions` (B, R, region_dim) may hold several anchors' grids concatenated along the region
        axis (B, N*R, .); `region_mask` (B, R) marks the real ones (None: all). Everything that
        pools over regions (the channel gate's mean included) reads only the masked-in ones, so
        padding changes nothing and N copies of one anchor read as that anchor."""
        r = self.regions(regions)
        t = self.sentence(sentence)
        if region_mask is not None:
            region_mask = region_mask.bool()
        beta = torch.sigmoid(self.channel(torch.cat([t, reference.masked_mean(r, region_mask)], -1)))
        out = self.core(self.tokens(tokens), token_mask, r, t, beta, torch.sigmoid(self.gamma_logit), region_mask)
        a = {"hybrid": out.a, "spatial": out.a_s, "channel": out.a_c, "meanpool": out.m}[self.mode]
        token_view = out.A
        if self.mode == "meanpool":
            token_view = out.m.unsqueeze(1) * token_mask.unsqueeze(-1).to(out.m.dtype)
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

    def forward(self, sentence, tokens, token_mask, regions=None, region_mask=None) -> Embeddings:
        """`regions` (B, N*R, region_dim): the grids of N anchors per query, concatenated along the
        region axis, with `region_mask` (B, N*R) (None: all real), as HybridAttention reads them."""
        token_mask = token_mask.bool()
        global_x, local_x = sentence, tokens
        if self.use_anchor:
            if regions is None:
                raise InputError("this query tower was trained with anchors: pass anchor regions")
            a, token_view = self.attention(sentence, tokens, token_mask, regions, region_mask)
            global_x = torch.cat([sentence, a], -1)
            local_x = torch.cat([tokens, token_view], -1)
        hidden = torch.tanh(self.local_proj(local_x))
        weights = reference.masked_softmax(self.local_score(hidden).squeeze(-1), token_mask)
        local = torch.einsum("bl,bld->bd", weights, hidden)
        return _stack(self.heads, global_x, local)


# ---------------------------------------------------------------------------------------------
# Matching


def similarities(query: Embeddings, video: Embeddings, budget: int = 1 << 24) -> torch.Tensor:
    """The four raw similarity matrices (4, Q, N) in SIMILARITIES order, computed in tiles so that
    no Jaccard intermediate holds more than `budget` numbers (the whole Q x N x K broadcast would
    be 52 GB for 256 queries against 100k videos)."""
    out = query.lat.new_empty((4, len(query), len(video)))
    for qs, ns in reference.tiles(len(query), len(video), query.con.shape[2], budget):
        out[:, qs, ns] = reference.similarities(query.lat[qs], query.con[qs], video.lat[ns], video.con[ns])
    return out


class FusedScore(nn.Module):
    """Fused scores (Q, N) with frozen constants (kernels.reference.fused_score), in tiles of at
    most `budget` Jaccard numbers. A module so that engine/backends/triton.py can swap in the fused
    kernel (kernels.modules.TritonFusedScore), which takes the same arguments."""

    def __init__(self, weights=(0.6, 0.4), local_branch: bool = True, budget: int = 1 << 24):
        super().__init__()
        self.weights, self.local_branch, self.budget = tuple(weights), local_branch, budget

    def forward(self, q_lat, q_con, v_lat, v_con, norm) -> torch.Tensor:
        out = q_lat.new_empty((q_lat.shape[0], v_lat.shape[0]))
        for qs, ns in reference.tiles(q_lat.shape[0], v_lat.shape[0], q_con.shape[2], self.budget):
            out[qs, ns] = reference.fused_score(q_lat[qs], q_con[qs], v_lat[ns], v_con[ns], norm, self.weights,
                                                self.local_branch)
        return out


class Matcher(nn.Module):
    """Dual-branch hybrid-space matching: each similarity is min-max normalised with constants
    frozen from the validation set (stored in the checkpoint), then fused:
    score = w_lat * (lat_g + lat_l) + w_con * (con_g + con_l)  (ARCHITECTURE.md section 7).

    RIVRL normalises over the whole test matrix, which an online engine cannot do; `transductive`
    reproduces that for parity (the constants then come from the matrix being scored)."""

    def __init__(self, weights=(0.6, 0.4), concept_space: bool = True, local_branch: bool = True):
        super().__init__()
        self.register_buffer("norm", torch.tensor([[0.0, 1.0]] * 4))  # (4, 2): (min, max) per similarity
        # Ablations switch parts of the fusion off: no concept space, or the global branch only.
        self.weights = (float(weights[0]), float(weights[1]) if concept_space else 0.0)
        self.local_branch = local_branch
        self.fused = FusedScore(self.weights, local_branch)

    def fit_norm(self, query: Embeddings, video: Embeddings) -> None:
        """Freeze the min-max constants from a (validation) query x video matrix."""
        sims = similarities(query, video)
        self.norm.copy_(torch.stack([sims.flatten(1).amin(1), sims.flatten(1).amax(1)], 1))

    def forward(self, query: Embeddings, video: Embeddings, transductive: bool = False) -> torch.Tensor:
        if not transductive:
            return self.fused(query.lat, query.con, video.lat, video.con, self.norm)
        if not isinstance(self.fused, FusedScore):
            raise InputError("transductive normalisation (RIVRL parity) runs in PyTorch only: use the torch backend")
        sims = similarities(query, video)
        lo, hi = sims.flatten(1).amin(1), sims.flatten(1).amax(1)
        return reference.fuse(reference.normalise(sims, lo, hi), self.weights, self.local_branch)


# ---------------------------------------------------------------------------------------------
# The whole model


def build_video_tower(config: ModelConfig) -> nn.Module:
    """The video tower of the config's head (what indexing loads alone)."""
    if config.head == "glscl":
        from engine.glscl import GLSCLVideoTower

        return GLSCLVideoTower(config)
    return VideoTower(config)


def build_matcher(config: ModelConfig) -> nn.Module:
    """The matcher of the config's head: `forward(query, video, transductive)` -> (Q, N) scores."""
    if config.head == "glscl":
        from engine.glscl import GLSCLMatcher

        return GLSCLMatcher(config)
    return Matcher(concept_space=config.concept_space, local_branch=config.local_branch)


class CVRModel(nn.Module):
    """Text encoder, query tower, video tower and matcher of one retrieval model, of the config's
    head: CVR-SDGM's (cvr) or GLSCL's (glscl, engine/glscl.py)."""

    def __init__(self, config: ModelConfig, text_encoder: nn.Module | None = None):
        super().__init__()
        from engine.text import build_text_encoder

        config.validate()
        self.config = config
        self.text = text_encoder if text_encoder is not None else build_text_encoder(config.text)
        if config.head == "glscl":
            from engine.glscl import GLSCLQueryTower

            self.video = build_video_tower(config)  # first: it owns the decoder both towers share
            self.query = GLSCLQueryTower(config, self.text.dim_sentence, self.text.dim_tokens, self.video.decoder)
        else:  # the default head: modules built in this order, so seeded initialisation is unchanged
            self.query = QueryTower(config, self.text.dim_sentence, self.text.dim_tokens)
            self.video = build_video_tower(config)
        self.matcher = build_matcher(config)

    def encode_text(self, texts: list, regions: torch.Tensor | None = None, region_mask=None) -> Embeddings:
        return self.encode_text_features(self.text(texts), regions, region_mask)

    def encode_text_features(self, features, regions=None, region_mask=None) -> Embeddings:
        if region_mask is None:  # the glscl query tower (text-only) takes no mask
            return self.query(features.sentence, features.tokens, features.mask, regions)
        return self.query(features.sentence, features.tokens, features.mask, regions, region_mask)

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor) -> Embeddings:
        return self.video(frames, mask)

    def score(self, query: Embeddings, video: Embeddings, transductive: bool = False) -> torch.Tensor:
        return self.matcher(query, video, transductive=transductive)

    def trainable_state(self) -> dict:
        """Tensors saved in a checkpoint: all but a frozen pretrained text encoder's (those load
        from the encoder's own folder or package, recorded by id in config.json)."""
        frozen_text = not any(p.requires_grad for p in self.text.parameters())
        return {k: v for k, v in self.state_dict().items() if not (frozen_text and k.startswith("text."))}
