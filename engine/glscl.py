"""The GLSCL head (peers.md section 1; `cvr train --head glscl`) as drop-in towers and matcher.

GLSCL (Text-Video Retrieval with Global-Local Semantic Consistent Learning, TIP 2025) scores a
(text, video) pair by a parameter-free global interaction (the sentence vector weights the frames
by a temperature softmax, cosine with the pooled video) plus a local one (K shared learnable
queries through one shared transformer decoder over the text tokens and over the frames; mean of
the per-query cosines). Here it runs on this engine's inputs: the text encoder's sentence vector
and token states, and the frame features of the collection (through GLSCL's small temporal
transformer), all projected to D = `latent_dim`.

Both towers return engine.model.Embeddings, so training, checkpoints, galleries, search and
evaluation take them as they take the CVR-SDGM towers. Slots of dim 1 (kernels.reference.glscl_score
reads them):

- video lat (N, 1+F+K, D): [L2-normalised mean of the valid frame vectors (what the FAISS first
  stage indexes: engine/search.py reads lat[:, 0]), v_1..v_F (zeros past the video's frames),
  z^v_1..z^v_K (L2-normalised)]; con (N, 1, F): the frame mask as 0/1;
- query lat (Q, 1+K, D): [c, z^t_1..z^t_K]; con (Q, 1, F): zeros (only its shape matters).

So the decoder never runs over videos at search time: their z^v are in the gallery.

Differences from the paper's code, each on purpose: the temporal transformer and the decoder are
random-initialised (no CLIP here) and smaller by default; the decoder gets key-padding masks on
both sides (the paper attends padded tokens and frames: here a query's or a video's embedding
would then depend on what else was in its batch). The mask mode (`glscl_mask`) therefore only
concerns the global interaction's frame weights, which is where the paper's code and the
corrected variant differ; and they differ there by one positive factor per pair, which the cosine
does not see, so the two modes score alike (kernels.reference.glscl_score).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from engine.config import ModelConfig
from engine.errors import InputError
from kernels import reference


def _attendable(mask: torch.Tensor) -> torch.Tensor:
    """Positions attention may read: the valid ones, or all of a row with none (a key-padding mask
    masking a whole row gives NaN; that row's outputs are zeroed or unused anyway)."""
    return mask | ~mask.any(1, keepdim=True)


def fit_frames(frames: torch.Tensor, mask: torch.Tensor, count: int) -> tuple:
    """Frames (B, L, d) and mask (B, L) as exactly `count` slots: valid frames first, more than
    `count` subsampled evenly (engine.datasets.video_frames' rule, so training data already fits),
    zeros after."""
    batch, length, dim = frames.shape
    valid = mask.sum(1)
    prefix = bool((mask == (torch.arange(length, device=mask.device) < valid[:, None])).all())
    if prefix and (batch == 0 or int(valid.max()) <= count):
        # the common case: valid frames first and no more than `count` of them
        frames, mask = frames[:, :count], mask[:, :count]
        pad = count - frames.shape[1]
        return F.pad(frames, (0, 0, 0, pad)), F.pad(mask, (0, pad))
    out = frames.new_zeros((batch, count, dim))
    out_mask = torch.zeros((batch, count), dtype=torch.bool)
    for b in range(batch):
        rows = torch.nonzero(mask[b]).flatten()
        if len(rows) > count:
            rows = rows[torch.from_numpy(np.linspace(0, len(rows) - 1, count).round().astype(np.int64))]
        out[b, : len(rows)] = frames[b, rows]
        out_mask[b, : len(rows)] = True
    return out, out_mask.to(mask.device)


class TemporalTransformer(nn.Module):
    """GLSCL's `seqTransf` over frame features: project to D, add frame position embeddings, a
    transformer encoder over the valid frames, plus the projected input (a residual). Padded slots
    come out as zeros."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.latent_dim
        self.project = nn.Linear(config.frame_dim, d)
        self.position = nn.Parameter(torch.randn(config.glscl_frames, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, config.glscl_heads, 4 * d, config.dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.glscl_temporal_layers, enable_nested_tensor=False)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.project(frames)
        h = self.encoder(x + self.position[: x.shape[1]], src_key_padding_mask=~_attendable(mask))
        return (h + x) * mask.unsqueeze(-1).to(x.dtype)


class QueryDecoder(nn.Module):
    """K shared learnable queries through one transformer decoder over a memory sequence (text
    token states or frame vectors): (B, L, D) + mask (B, L) -> (B, K, D) L2-normalised."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.latent_dim
        self.queries = nn.Parameter(torch.rand(config.glscl_queries, d))  # the paper: uniform in [0, 1)
        layer = nn.TransformerDecoderLayer(d, config.glscl_heads, 4 * d, config.dropout, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, config.glscl_decoder_layers)

    def forward(self, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.queries.unsqueeze(0).expand(memory.shape[0], -1, -1)
        out = self.decoder(target, memory, memory_key_padding_mask=~_attendable(mask))
        return F.normalize(out, dim=-1)


class GLSCLVideoTower(nn.Module):
    """Frame features (B, L, d_v) + mask (B, L) -> video Embeddings (module docstring). Owns the
    shared decoder, so a checkpoint's `video.` tensors are all indexing needs."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.frames = config.glscl_frames
        self.temporal = TemporalTransformer(config)
        self.decoder = QueryDecoder(config)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor):
        return encode_fitted(self, *fit_frames(frames, mask.bool(), self.frames))


def encode_fitted(tower: GLSCLVideoTower, frames: torch.Tensor, mask: torch.Tensor):
    """The video tower on frames already fitted to its F slots (`fit_frames`): what the exported
    graph runs (export/graphs/glscl.py), since fitting branches on the data."""
    from engine.model import Embeddings

    v = tower.temporal(frames, mask)
    z_v = tower.decoder(v, mask)
    mean = F.normalize(reference.masked_mean(v, mask), dim=-1)
    lat = torch.cat([mean.unsqueeze(1), v, z_v], 1)
    return Embeddings(lat=lat, con=mask.to(lat.dtype).unsqueeze(1))


class GLSCLQueryTower(nn.Module):
    """Text features -> query Embeddings (module docstring). The decoder is the video tower's,
    held as a plain reference (not a submodule): registered twice, its tensors would be saved
    twice, and safetensors refuses tensors that share memory."""

    def __init__(self, config: ModelConfig, sentence_dim: int, token_dim: int, decoder: QueryDecoder):
        super().__init__()
        self.frames = config.glscl_frames
        self.sentence = nn.Linear(sentence_dim, config.latent_dim)
        self.tokens = nn.Linear(token_dim, config.latent_dim)
        self._decoder = (decoder,)  # a tuple: nn.Module registers a module attribute, not a tuple

    @property
    def decoder(self) -> QueryDecoder:
        return self._decoder[0]

    def forward(self, sentence, tokens, token_mask, regions=None):
        from engine.model import Embeddings

        if regions is not None:
            raise InputError("the glscl head is text-only: it takes no anchor regions")
        c = self.sentence(sentence)
        z_t = self.decoder(self.tokens(tokens), token_mask.bool())
        lat = torch.cat([c.unsqueeze(1), z_t], 1)
        return Embeddings(lat=lat, con=lat.new_zeros((lat.shape[0], 1, self.frames)))


class GLSCLMatcher(nn.Module):
    """S = S_g + lambda S_l (kernels.reference.glscl_score), in tiles of at most `budget` numbers
    of the (queries x videos x F) temporaries. Holds the InfoNCE logit scale (CLIP's init, 1/0.07)
    so that it is saved with the checkpoint. No frozen constants: scores are already comparable
    across queries, so `fit_norm` does nothing and `transductive` changes nothing."""

    def __init__(self, config: ModelConfig, budget: int = 1 << 24):
        super().__init__()
        self.tau, self.lam, self.mode = config.glscl_tau, config.glscl_lambda, config.glscl_mask
        self.frames, self.budget = config.glscl_frames, budget
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, query, video, transductive: bool = False) -> torch.Tensor:
        return self.scores(query.lat, video.lat, video.con[:, 0])

    def scores(self, q_lat: torch.Tensor, v_lat: torch.Tensor, v_mask: torch.Tensor) -> torch.Tensor:
        # Fewer queries than frames (search): pool each pair's video, q n F D flops, instead of the
        # n F^2 D of the Gram matrices; the temporaries are then q x n x D.
        pool = q_lat.shape[0] < self.frames
        width = q_lat.shape[-1] if pool else self.frames
        if q_lat.shape[0] * v_lat.shape[0] * width <= self.budget:  # training batches: one tile, autograd
            return reference.glscl_score(q_lat, v_lat, v_mask, self.tau, self.lam, self.mode, pool)
        out = q_lat.new_empty((q_lat.shape[0], v_lat.shape[0]))
        for qs, ns in reference.tiles(q_lat.shape[0], v_lat.shape[0], width, self.budget):
            out[qs, ns] = reference.glscl_score(q_lat[qs], v_lat[ns], v_mask[ns], self.tau, self.lam, self.mode, pool)
        return out

    def fit_norm(self, query, video) -> None:
        """Nothing to freeze (the CVR matcher's min-max constants have no GLSCL counterpart)."""


def split_slots(emb, config: ModelConfig) -> tuple:
    """(c (B, D), z^t (B, K, D)) of query Embeddings or (mean, V (B, F, D), z^v (B, K, D)) of video
    Embeddings, by their slot count."""
    lat, frames = emb.lat, config.glscl_frames
    if lat.shape[1] == 1 + config.glscl_queries:
        return lat[:, 0], lat[:, 1:]
    return lat[:, 0], lat[:, 1 : 1 + frames], lat[:, 1 + frames :]


def video_slots(config: ModelConfig) -> tuple:
    """(lat slots, con slots, con width) of a GLSCL video row: what a gallery records."""
    return 1 + config.glscl_frames + config.glscl_queries, 1, config.glscl_frames


def block_rows(queries: int, config: ModelConfig, budget: int) -> int:
    """Gallery rows per scored block: the float32 copy of a block is rows x (1+F+K) x D numbers
    (the wide rows) and the frame logits queries x rows x F; each near `budget`."""
    lat_slots, _, frames = video_slots(config)
    return max(16, budget // max(queries * frames, lat_slots * config.latent_dim))
