"""What the generator trainers share: noise levels, the rectified-flow loss, LR schedule, EMA and sample grids."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from engine import files
from engine.anchors import BuiltinConfig, Conditioning, euler_sample, flux_velocity, image_ids, rectified_flow_pair
from engine.portable import initial_noise, latents_to_images, pack_latents, prompt_seed, unpack_latents


def logit_normal(n: int, generator: torch.Generator) -> torch.Tensor:
    """SD3's noise-level distribution: sigmoid of a standard normal (more weight mid-trajectory)."""
    return torch.sigmoid(torch.randn(n, generator=generator))


class EMA:
    def __init__(self, model, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step: int):
        d = min(self.decay, (1 + step) / (10 + step))  # warm start: early averages follow the model
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - d)


def save_grid(path, rows: list[np.ndarray], scale: int = 2) -> Path:
    """PNG grid: each row a list/array of uint8 images (same size), 2 px gaps, nearest upscaling."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    gap = 2
    canvas = np.full((len(rows) * (h + gap), ncol * (w + gap), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            if img.shape[:2] != (h, w):
                img = np.asarray(Image.fromarray(img).resize((w, h), Image.BOX))
            canvas[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = img
    im = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    with files.atomic_path(path) as temporary:
        im.save(temporary)
    return path


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine to 10%


def noisy_batch(x0, gen: torch.Generator) -> tuple:
    """(x_sigma, sigma, velocity target) of a training batch: noise, then logit-normal sigmas, drawn
    from ``gen`` in that order (every flow loss draws through here, so their runs stay comparable)."""
    noise = torch.randn(x0.shape, generator=gen).to(x0)
    sigma = logit_normal(x0.shape[0], gen).to(x0)
    x_sigma, target = rectified_flow_pair(x0, noise, sigma)
    return x_sigma, sigma, target


# A pixel step larger than this (on the [-1, 1] scale, in any channel) is an edge: above the striped and
# checkered backgrounds' steps (50 of 255 = 0.39) and their sensor noise, below an object's against any background.
EDGE_STEP = 0.5


def edge_weights(x0, weight: float) -> torch.Tensor:
    """Per-element loss weights of packed latents ``x0`` (B, tokens, channels): 1 + ``weight`` on
    both pixels of every edge (a step above EDGE_STEP to the right or below), 1 elsewhere, in
    x0's packed layout. Why (issue 17, item 0): an outline is a few pixels at an object's border,
    so the plain MSE barely rewards drawing the named shape rather than a blob of its colour.
    The image size and fold are read off the layout: (S/fold/2)^2 tokens of 4 x 3 fold^2 channels."""
    fold, side = math.isqrt(x0.shape[2] // 12), 2 * math.isqrt(x0.shape[1])  # side: latent pixels per row
    if 12 * fold * fold != x0.shape[2] or (side // 2) ** 2 != x0.shape[1]:
        raise ValueError(f"not packed square RGB latents: shape {tuple(x0.shape)}")
    size = side * fold
    pixels = F.pixel_shuffle(unpack_latents(x0, side, side), fold)  # (B, 3, size, size)
    right = (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().amax(1) > EDGE_STEP  # (B, size, size - 1)
    down = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().amax(1) > EDGE_STEP
    edge = torch.zeros(pixels.shape[0], size, size, dtype=torch.bool, device=x0.device)
    edge[:, :, 1:] |= right
    edge[:, :, :-1] |= right
    edge[:, 1:, :] |= down
    edge[:, :-1, :] |= down
    w = 1.0 + weight * edge.to(x0.dtype)[:, None].expand_as(pixels)
    return pack_latents(F.pixel_unshuffle(w, fold))


def weighted_mse(pred, target, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in float32; ``weights`` (pred's shape, e.g. :func:`edge_weights`) weighs each
    element's squared error. None is F.mse_loss itself, so unweighted runs stay bit for bit."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    return (weights * (pred.float() - target.float()) ** 2).mean()


def flow_loss(transformer, x0, cond: Conditioning, img_ids, gen: torch.Generator, velocity=flux_velocity,
              weights: torch.Tensor | None = None):
    """The rectified-flow loss: || v(x_sigma, sigma) - (noise - x0) ||^2 at logit-normal sigmas,
    weighed per element by ``weights`` when given (:func:`weighted_mse`)."""
    x_sigma, sigma, target = noisy_batch(x0, gen)
    return weighted_mse(velocity(transformer, x_sigma, sigma, cond, img_ids), target, weights)


def sample_grid(transformer, config: BuiltinConfig, cond: Conditioning, frames: np.ndarray, steps_list, path,
                seed: int = 0):
    """Rows: the real key frames, then one row of samples per step count (at the config's guidance)."""
    s = config.latent_size
    ids = image_ids(s, s)
    seeds = [prompt_seed(str(i), seed) for i in range(len(frames))]
    noise = torch.from_numpy(pack_latents(initial_noise(seeds, (config.latent_channels, s, s))))
    rows = [list(frames)]
    for steps in steps_list:
        x = euler_sample(transformer, noise, cond, steps, ids, config.guidance_scale)
        rows.append(list(latents_to_images(unpack_latents(x, s, s).numpy(), config.fold)))
    return save_grid(path, rows)
