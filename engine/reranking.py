"""The generative reranker's torch-free half (peers.md section 2, DiffusionRet's idea): its config,
its folder, the cosine noise schedule, DDIM sampling and the fusion with the first stage.

A reranker rescored a query's top-M first-stage candidates: a small denoiser (engine/rerank.py in
PyTorch, or its exported graph through ONNX Runtime) turns a noise vector x_T (M,) into an M-way
relevance vector x0 over T steps of DDIM (eta 0, x0_hat clipped to [-1, 1]), and each candidate's
final score is its first-stage score + weight * softmax(temp * x0)_j. The top M are re-sorted by it
(equal scores: the lower gallery row first); everything below them keeps its place, since the added
term is >= 0 and only lifts the top M further above the rest.

What makes results repeat: x_T is a per-query draw seeded by the query text (engine.portable
.prompt_seed), so a query's result does not depend on its batch; and the loop itself runs here,
once, in numpy, whichever runtime evaluates the denoiser (`Reranker.denoise`), so the PyTorch and
the ONNX Runtime paths take the same steps.

The folder (`cvr train-reranker`): `config.json` (format tag, the base checkpoint's id, M, T and
the widths; sealed, with the sha256 of the weights), `model.safetensors`, `train_log.json`. A
reranker only reranks for the checkpoint it was trained on: `check_base` refuses any other.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

import numpy as np

from engine.errors import CVRError
from engine.integrity import check_seal, verify_files
from engine.portable import initial_noise, prompt_seed

FORMAT = "cvr-sdgm/reranker/1"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
LOG = "train_log.json"
RETRAIN = "train it again with `cvr train-reranker`"
COSINE_OFFSET = 0.008  # s of the cosine schedule (Nichol & Dhariwal), as DiffusionRet's
MAX_BETA = 0.999
RERANK_BACKENDS = ("torch", "triton", "onnxruntime")  # tensorrt: no engine of the denoiser is built


class RerankerError(CVRError):
    """A reranker folder or a rerank request that cannot be used (one-line message)."""


@dataclass
class RerankConfig:
    """What a reranker is: M candidates, T diffusion steps (training), the DDIM steps a search takes
    (None: T), the denoiser's hidden width and the base's slot-0 width D, the fusion (score +
    weight * softmax(temp * x0)), the training target of a negative (the positive's is +1) and the
    seed mixed into each query's noise."""

    candidates: int = 32
    diffusion_steps: int = 50  # DiffusionRet's README trains and samples with 50
    sample_steps: int | None = None
    hidden: int = 256
    latent_dim: int = 0
    temp: float = 1.0
    weight: float = 1.0
    negative: float = 0.0  # DiffusionRet's default (neg=0); -1 is its other option
    seed: int = 0

    def validate(self) -> RerankConfig:
        for name in ("candidates", "diffusion_steps", "hidden", "latent_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RerankerError(f"reranker {name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.candidates < 2:
            raise RerankerError(f"a reranker needs at least 2 candidates, got {self.candidates}")
        steps = self.sample_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or not 1 <= steps <= self.diffusion_steps):
            raise RerankerError(f"sample steps must be between 1 and the {self.diffusion_steps} diffusion steps, "
                                f"got {steps!r}")
        if self.negative not in (0.0, -1.0):
            raise RerankerError(f"the negatives' target must be 0 or -1, got {self.negative!r}")
        for name in ("temp", "weight"):
            if not math.isfinite(getattr(self, name)):
                raise RerankerError(f"reranker {name} must be finite")
        # fuse() adds weight * softmax(temp * x0) >= 0 to the top M only: with a negative weight the
        # reranked candidates could fall below the unreranked ones yet stay ranked above them.
        if self.weight < 0 or self.temp <= 0:
            raise RerankerError(f"reranker weight must be >= 0 and temp > 0, got {self.weight!r} and {self.temp!r}")
        return self

    @property
    def steps(self) -> int:
        return self.sample_steps or self.diffusion_steps

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict, where: str = "reranker") -> RerankConfig:
        known = {f.name for f in fields(cls)}
        if not isinstance(value, dict) or set(value) - known:
            extra = sorted(set(value) - known) if isinstance(value, dict) else ["(not an object)"]
            raise RerankerError(f"{where}: unknown reranker field {extra[0]!r}: {RETRAIN}")
        try:
            return cls(**value).validate()
        except TypeError as error:
            raise RerankerError(f"{where}: bad reranker config ({error}): {RETRAIN}") from None


# ---------------------------------------------------------------------------------------------
# The schedule and DDIM


def cosine_alphas_cumprod(steps: int) -> np.ndarray:
    """alpha_bar_t for t = 0..T-1 (float64) of the cosine schedule: beta_t = min(1 - f(t+1)/f(t),
    0.999) with f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), alpha_bar_t = prod_{i<=t} (1 - beta_i)."""
    t = np.arange(steps + 1, dtype=np.float64) / steps
    f = np.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    betas = np.minimum(1.0 - f[1:] / f[:-1], MAX_BETA)
    return np.cumprod(1.0 - betas)


def ddim_timesteps(diffusion_steps: int, steps: int) -> np.ndarray:
    """The timesteps a DDIM run of `steps` visits, descending from T-1 to 0 (all T when steps = T)."""
    if not 1 <= steps <= diffusion_steps:
        raise RerankerError(f"DDIM steps must be between 1 and {diffusion_steps}, got {steps}")
    if steps == 1:  # one step starts from pure noise too: at T-1, not at t = 0 (almost clean)
        return np.array([diffusion_steps - 1], dtype=np.int64)
    return np.unique(np.round(np.linspace(0, diffusion_steps - 1, steps)).astype(np.int64))[::-1].copy()


def ddim_step(x_t: np.ndarray, x0: np.ndarray, alpha_bar: float, alpha_bar_prev: float) -> np.ndarray:
    """One deterministic DDIM update (eta 0) from a predicted x0: the noise it implies, eps =
    (x_t - sqrt(a) x0) / sqrt(1 - a), carried to the previous timestep's noise level."""
    eps = (x_t - math.sqrt(alpha_bar) * x0) / math.sqrt(1.0 - alpha_bar)
    return (math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1.0 - alpha_bar_prev) * eps).astype(np.float32)


def ddim_sample(denoise, noise: np.ndarray, inputs: tuple, diffusion_steps: int, steps: int) -> np.ndarray:
    """x0 (B, M) from x_T = `noise` by DDIM: at each timestep x0_hat = clip(denoise(x_t, t, *inputs),
    -1, 1), then the update to the next timestep (alpha_bar 1 after the last, so the sample is
    the last x0_hat)."""
    alpha_bar = cosine_alphas_cumprod(diffusion_steps)
    timesteps = ddim_timesteps(diffusion_steps, steps)
    x = np.asarray(noise, np.float32)
    x0 = x
    for i, t in enumerate(timesteps):
        x0 = np.clip(denoise(x, np.full(len(x), t, np.int64), *inputs), -1.0, 1.0).astype(np.float32)
        previous = alpha_bar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        x = ddim_step(x, x0, float(alpha_bar[t]), float(previous))
    return x0


def query_noise(texts: list, candidates: int, seed: int = 0) -> np.ndarray:
    """x_T (Q, M) float32: one draw per query, seeded by its text, whatever batch it is in."""
    return initial_noise([prompt_seed(text, seed) for text in texts], (candidates,))


# ---------------------------------------------------------------------------------------------
# Fusion with the first stage


def masked_softmax(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Softmax over each row's valid entries (0 elsewhere; a row with none is all 0)."""
    z = np.where(valid, x.astype(np.float64), -np.inf)
    top = np.max(z, axis=1, keepdims=True)
    e = np.where(valid, np.exp(z - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = e.sum(axis=1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def fuse(values: np.ndarray, rows: np.ndarray, x0: np.ndarray, temp: float, weight: float) -> tuple:
    """(values, rows) of the top-M re-sorted by first-stage score + weight * softmax(temp * x0);
    ties to the lower gallery row; rows of -1 (no candidate) stay last as (-inf, -1)."""
    valid = rows >= 0
    fused = np.where(valid, values + (weight * masked_softmax(temp * x0, valid)).astype(np.float32), -np.inf)
    fused = fused.astype(np.float32)
    out_v, out_r = np.empty_like(fused), np.empty_like(rows)
    for i in range(len(rows)):
        # lexsort's last key is the primary one: descending score, then ascending row; the invalid
        # entries (-inf, and a row key past every real row) last
        order = np.lexsort((np.where(valid[i], rows[i], np.iinfo(np.int64).max), -fused[i]))
        out_v[i], out_r[i] = fused[i, order], rows[i, order]
    return out_v, out_r


def candidate_vectors(gallery, rows: np.ndarray) -> np.ndarray:
    """The slot-0 vectors lat[:, 0] (what the first stage indexes) of the rows, (Q, M, D) float32;
    zeros where a row is -1."""
    flat = rows.reshape(-1)
    valid = flat >= 0
    column = gallery.lat[:, 0]
    out = np.zeros((flat.size, column.shape[-1]), np.float32)
    if valid.any():
        out[valid] = np.asarray(column[flat[valid]], np.float32)
    return out.reshape(*rows.shape, -1)


# ---------------------------------------------------------------------------------------------
# The runtime's common part


class Reranker:
    """A loaded reranker: `rerank(texts, q_lat, values, rows, gallery)` rescored the first M of each
    query's first-stage (values, rows). A runtime subclass provides `denoise(x_t, t, query,
    candidates, scores, mask) -> x0_hat` over numpy arrays."""

    runtime = ""

    def __init__(self, folder: str, config: RerankConfig, base_id: str):
        self.folder, self.config, self.base_id = folder, config, base_id

    @property
    def candidates(self) -> int:
        return self.config.candidates

    def denoise(self, x_t, t, query, candidates, scores, mask) -> np.ndarray:
        raise NotImplementedError

    def check_base(self, checkpoint_id: str, where: str = "") -> None:
        if checkpoint_id != self.base_id:
            raise RerankerError(f"{self.folder}: a reranker of checkpoint {self.base_id[:12]}, not of "
                                f"{where or 'this checkpoint'} ({checkpoint_id[:12]}): train one on it")

    def relevance(self, texts: list, query: np.ndarray, candidates: np.ndarray, scores: np.ndarray,
                  mask: np.ndarray, noise: np.ndarray | None = None, steps: int | None = None) -> np.ndarray:
        """x0 (Q, m) by DDIM from each query's seeded noise (or `noise`, (Q, >= m)); entries where
        `mask` is False are 0 throughout and mean nothing."""
        m = mask.shape[1]
        if noise is None:
            noise = query_noise(texts, max(self.candidates, m), self.config.seed)
        noise = np.where(mask, np.asarray(noise, np.float32)[:, :m], 0.0).astype(np.float32)
        inputs = (np.ascontiguousarray(query, np.float32), np.ascontiguousarray(candidates, np.float32),
                  np.where(mask, scores, 0.0).astype(np.float32), mask)
        return ddim_sample(self.denoise, noise, inputs, self.config.diffusion_steps, steps or self.config.steps)

    def rerank(self, texts: list, q_lat: np.ndarray, values: np.ndarray, rows: np.ndarray, gallery,
               noise: np.ndarray | None = None, steps: int | None = None) -> tuple:
        """(values, rows) with the first min(M, columns) of each query re-sorted by the fused score."""
        m = min(self.candidates, rows.shape[1])
        head_v, head_r = values[:, :m], rows[:, :m]
        mask = head_r >= 0
        x0 = self.relevance(texts, np.asarray(q_lat)[:, 0], candidate_vectors(gallery, head_r), head_v, mask,
                            noise, steps)
        new_v, new_r = fuse(head_v, head_r, x0, self.config.temp, self.config.weight)
        values, rows = values.copy(), rows.copy()
        values[:, :m], rows[:, :m] = new_v, new_r
        return values, rows


def read_reranker_config(folder: str) -> dict:
    """config.json of a reranker folder, its format and seal checked, its weights' digest verified;
    "reranker" comes back as a RerankConfig."""
    from engine.config import read_format_json

    config = read_format_json(folder, CONFIG, FORMAT, RerankerError, "reranker")
    path = os.path.join(folder, CONFIG)
    check_seal(config, path, RETRAIN, RerankerError)
    base = config.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("id"), str):
        raise RerankerError(f"{path}: records no base checkpoint id: {RETRAIN}")
    verify_files(folder, config.get("files", {}), RETRAIN, RerankerError)
    return dict(config, reranker=RerankConfig.from_dict(config.get("reranker"), path))


def open_reranker(folder: str, backend: str, device: str = "cpu", threads: int = 1) -> Reranker:
    """The reranker runtime for a backend: PyTorch for torch and triton, the exported denoiser graph
    (RERANKER/onnx, `cvr export --rerank`) through ONNX Runtime for onnxruntime; TensorRT has none."""
    check_rerank_backend(backend)
    if backend in ("torch", "triton"):
        from engine.rerank import load_reranker

        return load_reranker(folder, device)
    from engine.backends.onnx_rerank import OnnxReranker

    return OnnxReranker(folder, device, threads)


def check_rerank_backend(backend: str) -> None:
    """Refuse (one line) a backend that cannot run a reranker, before anything loads."""
    if backend not in RERANK_BACKENDS:
        raise RerankerError(f"--rerank runs on the {', '.join(RERANK_BACKENDS)} backends, not {backend}")
