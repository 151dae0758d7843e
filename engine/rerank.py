"""The generative reranker in PyTorch: its denoiser, training's forward noising, the folder's
weights (engine/reranking.py holds the config, the schedule, DDIM and the fusion, torch-free).

The denoiser follows DiffusionRet's (peers.md section 2a), reading what a gallery already holds:
the query's and the M candidates' slot-0 vectors (lat[:, 0], width D; L2-normalised here, since
a glscl query's slot 0 is not) and the candidates' first-stage scores. One call, for a noisy
relevance vector x_t (M,) at timestep t:

    e_t = MLP(sinusoid(t))
    c = P_q(query);  v_j = P_v(candidate_j) + w_s (s_j - max_i s_i)
    q = W_q(c + e_t);  k_j = W_k(v_j + e_t);  u_j = W_v(v_j + e_t)
    a = softmax_j(<q, k_j> / sqrt(H) + x_t[j])        x_t as an unscaled logit bias
    h = W_o sum_j a_j u_j
    x0_hat[j] = MLP([h; v_j]) + a_j                   x0 predicted directly

No position enters, so permuting the candidates permutes x0_hat. Two choices differ from
DiffusionRet on purpose: the dot product is scaled by 1/sqrt(H) (random-initialised projections
of width H would otherwise saturate the softmax that x_t biases), and each candidate carries its
first-stage score, relative to the query's best, so the denoiser sees what it reranks.
Candidates may be fewer than M (a small gallery, a filter): `mask` marks the real ones; the others
get no attention and an x0_hat of 0.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from engine import files
from engine.integrity import seal
from engine.reranking import (
    CONFIG,
    FORMAT,
    LOG,
    RETRAIN,
    WEIGHTS,
    RerankConfig,
    Reranker,
    RerankerError,
    cosine_alphas_cumprod,
    read_reranker_config,
)

MASKED = -1e9  # a finite "minus infinity": a query with no candidate at all gives 0s, not NaN


def timestep_embedding(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) sinusoids of integer timesteps: cos then sin of t / 10000^(i / half)."""
    half = width // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    out = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(out, (0, width - 2 * half))


class Denoiser(nn.Module):
    """x0_hat (B, M) = f(x_t (B, M), t (B,), query (B, D), candidates (B, M, D), scores (B, M),
    mask (B, M)): the module docstring's formula."""

    def __init__(self, latent_dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.query_in = nn.Linear(latent_dim, hidden)
        self.candidate_in = nn.Linear(latent_dim, hidden)
        self.score_in = nn.Linear(1, hidden, bias=False)
        self.time = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.w_q, self.w_k = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.w_v, self.w_o = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, 1))

    def forward(self, x_t, t, query, candidates, scores, mask):
        mask = mask.bool()
        e = self.time(timestep_embedding(t, self.hidden))
        best = torch.where(mask, scores, torch.full_like(scores, MASKED)).amax(dim=1, keepdim=True)
        relative = torch.where(mask, scores - best, torch.zeros_like(scores))
        c = self.query_in(F.normalize(query, dim=-1))
        v = self.candidate_in(F.normalize(candidates, dim=-1)) + self.score_in(relative[..., None])
        q = self.w_q(c + e)
        k, u = self.w_k(v + e[:, None]), self.w_v(v + e[:, None])
        logits = (k @ q[..., None]).squeeze(-1) / math.sqrt(self.hidden) + x_t
        a = torch.softmax(torch.where(mask, logits, torch.full_like(logits, MASKED)), dim=-1)
        h = self.w_o((a[..., None] * u).sum(dim=1))
        x0 = self.out(torch.cat([h[:, None].expand_as(v), v], dim=-1)).squeeze(-1) + a
        return torch.where(mask, x0, torch.zeros_like(x0))


class Diffusion:
    """The forward process of training: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""

    def __init__(self, steps: int):
        self.steps = steps
        self.alpha_bar = torch.from_numpy(cosine_alphas_cumprod(steps)).float()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar.to(x0.device)[t][:, None]
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def build_denoiser(config: RerankConfig) -> Denoiser:
    return Denoiser(config.latent_dim, config.hidden)


class TorchReranker(Reranker):
    """engine.reranking.Reranker with the denoiser run by PyTorch."""

    runtime = "torch"

    def __init__(self, folder: str, config: RerankConfig, base_id: str, model: Denoiser, device: str = "cpu"):
        super().__init__(folder, config, base_id)
        self.model, self.device = model.to(device).eval(), torch.device(device)

    @torch.no_grad()
    def denoise(self, x_t, t, query, candidates, scores, mask) -> np.ndarray:
        tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
                   for a in (x_t, t, query, candidates, scores, mask)]
        return self.model(*tensors).float().cpu().numpy()


def save_reranker(model: Denoiser, config: RerankConfig, folder: str, base: dict, log: list | None = None,
                  extra: dict | None = None) -> None:
    """Write a reranker folder atomically (staged, then swapped into place)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}
    with files.staged_folder(folder) as work:
        with files.safetensors_errors(os.path.join(folder, WEIGHTS)):
            save_file(tensors, os.path.join(work, WEIGHTS), metadata={"format": FORMAT})
        files.fsync_file(os.path.join(work, WEIGHTS))
        body = {"format": FORMAT, "base": base, "reranker": config.to_dict(), **(extra or {}),
                "files": {WEIGHTS: files.sha256_file(os.path.join(work, WEIGHTS))}}
        files.write_synced(os.path.join(work, CONFIG), files.to_json(seal(body)))
        files.write_synced(os.path.join(work, LOG), files.to_json(log or []))


def load_denoiser(folder: str) -> tuple:
    """(config.json, the Denoiser with its weights) of a reranker folder; no pickle, strict shapes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_reranker_config(folder)
    model = build_denoiser(config["reranker"])
    weights = os.path.join(folder, WEIGHTS)
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise RerankerError(f"{weights}: unreadable ({str(error).splitlines()[0]})") from None
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != tuple(tensor.shape):
            raise RerankerError(f"{weights}: tensor {name} missing or mis-shaped: {RETRAIN}")
        if not tensors[name].isfinite().all():
            raise RerankerError(f"{weights}: tensor {name} holds NaN or infinite values: {RETRAIN}")
    if set(tensors) - set(expected):
        raise RerankerError(f"{weights}: unexpected tensor {sorted(set(tensors) - set(expected))[0]}")
    model.load_state_dict(tensors)
    return config, model.eval()


def load_reranker(folder: str, device: str = "cpu") -> TorchReranker:
    config, model = load_denoiser(folder)
    return TorchReranker(folder, config["reranker"], config["base"]["id"], model, device)
