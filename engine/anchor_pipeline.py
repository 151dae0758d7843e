"""The built-in generator's model and sampler: its config, image space, flow matching and BuiltinFluxPipeline."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch.nn import functional as F

from engine.config import check_types
from engine.portable import (
    AnchorError,
    flow_sigmas,
    initial_noise,
    latents_to_images,
    pack_latents,
    unpack_latents,
)

TEACHER_STEPS = 28  # FLUX.1-dev's default step count; the teacher's reference in the benchmark


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class BuiltinConfig:
    """The built-in generator: transformer shape, image space and text conditioning.

    Image space: **pixels folded into channels**, not a learned autoencoder. The anchor is
    ``image_size`` pixels square in [-1, 1]; ``pixel_unshuffle(fold)`` turns it into a
    (3*fold^2, S/fold, S/fold) "latent", which FLUX packs 2x2 into tokens exactly as it packs its
    VAE latents. Why: (1) decoding is free (a reshape), so the step count is the whole cost and
    few-step distillation pays off in full; (2) there is no autoencoder to train, ship or blame
    for blur; (3) the built-in frames are flat-coloured shapes, for which 32 pixels keep colour,
    shape and position, and the ResNet resizes anchors to its own input size anyway. The default
    32 px with fold 2 gives 8x8 = 64 image tokens of 48 channels: less than the transformer width
    (4 x 32 = 128), which keeps velocity prediction well posed (a token wider than the model,
    e.g. 8x8-pixel patches = 192 channels, is where pixel-space DiTs start to fail).
    """

    image_size: int = 32
    fold: int = 2
    num_layers: int = 2
    num_single_layers: int = 4
    attention_head_dim: int = 32
    num_attention_heads: int = 4
    joint_attention_dim: int = 384
    pooled_projection_dim: int = 384
    axes_dims_rope: tuple[int, ...] = (8, 12, 12)
    text_encoder: str | None = None  # None: the packaged MiniLM; else a local HF encoder folder
    text_max_length: int = 32
    default_steps: int = TEACHER_STEPS
    # Classifier-free guidance scale the folder samples at: v_u + g (v_c - v_u), with v_u the
    # velocity under the null conditioning (:func:`null_conditioning`). 1 = plain conditional
    # sampling, one transformer pass per step (every folder written before guidance existed, and
    # every distilled student, which has the guidance baked into its weights). Not written to
    # config.json when it is 1, so such folders' configs (and export cache keys) stay as they were.
    guidance_scale: float = 1.0

    def __post_init__(self):
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(a % 2 for a in self.axes_dims_rope):
            raise AnchorError(
                f"axes_dims_rope {self.axes_dims_rope} must be even and sum to "
                f"attention_head_dim {self.attention_head_dim}"
            )
        if self.fold < 1 or self.image_size % (2 * self.fold):
            raise AnchorError(f"image_size {self.image_size} must be divisible by 2*fold ({2 * self.fold})")
        if self.default_steps < 1:
            raise AnchorError(f"default_steps must be >= 1, got {self.default_steps}")
        self.guidance_scale = float(self.guidance_scale)
        if not self.guidance_scale >= 0:
            raise AnchorError(f"guidance_scale must be >= 0, got {self.guidance_scale}")

    @property
    def latent_channels(self) -> int:
        return 3 * self.fold * self.fold

    @property
    def in_channels(self) -> int:
        return 4 * self.latent_channels  # FLUX packs 2x2 latent pixels into one token

    @property
    def latent_size(self) -> int:
        return self.image_size // self.fold

    @property
    def image_tokens(self) -> int:
        return (self.latent_size // 2) ** 2

    def transformer_kwargs(self) -> dict:
        return dict(
            patch_size=1, in_channels=self.in_channels, num_layers=self.num_layers,
            num_single_layers=self.num_single_layers, attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads, joint_attention_dim=self.joint_attention_dim,
            pooled_projection_dim=self.pooled_projection_dim, guidance_embeds=False,
            axes_dims_rope=self.axes_dims_rope,
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        if out["guidance_scale"] == 1.0:
            del out["guidance_scale"]  # absent = 1: the configs of unguided folders read as before
        return out

    @classmethod
    def from_dict(cls, data: dict) -> BuiltinConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("guidance_scale"), int) and not isinstance(values["guidance_scale"], bool):
            values["guidance_scale"] = float(values["guidance_scale"])  # "guidance_scale": 4 in a hand-edited file
        check_types(cls, values, "generator config", AnchorError)
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# Image space: pixels <-> folded latents <-> FLUX tokens


def images_to_latents(images, fold: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1] -> (B, 3*fold^2, H/fold, W/fold) in [-1, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2).float() / 255.0
    return F.pixel_unshuffle(images.float() * 2.0 - 1.0, fold)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE positions (0, row, col) of the packed tokens, as FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def build_transformer(config: BuiltinConfig):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**config.transformer_kwargs())


# ---------------------------------------------------------------------------------------------
# Flow matching


def rectified_flow_pair(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
    """(x_sigma, velocity target): x_sigma = (1 - sigma) x0 + sigma noise, v = noise - x0.

    FLUX's convention: sigma = 1 is pure noise, and an Euler step is x += (sigma_next - sigma) v."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - s) * x0 + s * noise, noise - x0


@dataclass
class Conditioning:
    """Text conditioning of a batch: token states, mask (True = real token) and pooled vector."""

    tokens: torch.Tensor  # (B, L, joint_attention_dim)
    mask: torch.Tensor  # (B, L) bool
    pooled: torch.Tensor  # (B, pooled_projection_dim)

    def index(self, idx) -> Conditioning:
        return Conditioning(self.tokens[idx], self.mask[idx], self.pooled[idx])

    def to(self, device, dtype=None) -> Conditioning:
        dt = dtype or self.tokens.dtype
        return Conditioning(self.tokens.to(device, dt), self.mask.to(device), self.pooled.to(device, dt))


def flux_velocity(transformer, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, img_ids, txt_ids=None,
                  guidance: float | None = None):
    """One FLUX transformer call: packed tokens x (B, S, C) at noise level sigma (B,) -> velocity.

    Padded text tokens are masked out of the joint attention (bool mask over [text, image]), so a
    prompt's anchor does not depend on how long the other prompts in its batch are."""
    b, length = cond.mask.shape
    if txt_ids is None:
        txt_ids = torch.zeros(length, 3, device=x.device, dtype=x.dtype)
    full = torch.cat([cond.mask, torch.ones(b, x.shape[1], dtype=torch.bool, device=x.device)], dim=1)
    extra = {}
    if getattr(transformer.config, "guidance_embeds", False):  # FLUX.1-dev: guidance-distilled
        extra["guidance"] = torch.full((b,), 3.5 if guidance is None else guidance, device=x.device, dtype=x.dtype)
    return transformer(**extra,
        hidden_states=x, encoder_hidden_states=cond.tokens, pooled_projections=cond.pooled,
        timestep=sigma.to(x.dtype), img_ids=img_ids, txt_ids=txt_ids,
        joint_attention_kwargs={"attention_mask": full[:, None, None, :]}, return_dict=False,
    )[0]


def null_conditioning(cond: Conditioning) -> Conditioning:
    """The unconditional input of classifier-free guidance, shaped like ``cond``: zero token states,
    every text token masked out, zero pooled vector.

    Why zeros and not the text encoder's encoding of the empty prompt: with every text key masked,
    the image tokens attend to image tokens only, so no text state reaches them and the null input
    carries no information by construction; it needs no encoder call at sampling time (nor in an
    exported graph), is the same for every text encoder and every padded length, and is exactly what
    training's caption dropout (:func:`drop_conditioning`) feeds. MiniLM's "" is not empty: its
    [CLS]/[SEP] states and normalised pooled vector are a point among the real prompts'."""
    return Conditioning(torch.zeros_like(cond.tokens), torch.zeros_like(cond.mask), torch.zeros_like(cond.pooled))


def drop_conditioning(cond: Conditioning, p: float, generator: torch.Generator) -> Conditioning:
    """Caption dropout for classifier-free guidance (Ho & Salimans 2022): each row is replaced by the
    null conditioning with probability p. At p = 0 the batch is returned as it is and no random
    number is drawn, so a run without dropout is the run of before (same draws, same weights)."""
    if p <= 0:
        return cond
    drop = torch.rand(cond.tokens.shape[0], generator=generator) < p
    keep = (~drop).to(cond.tokens.device)
    return Conditioning(cond.tokens * keep[:, None, None].to(cond.tokens.dtype), cond.mask & keep[:, None],
                        cond.pooled * keep[:, None].to(cond.pooled.dtype))


def guided_velocity(transformer, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, img_ids,
                    guidance: float = 1.0) -> torch.Tensor:
    """Classifier-free guided velocity v_u + g (v_c - v_u). At g = 1 this is :func:`flux_velocity`
    itself (one pass, the same call); otherwise the conditional and null rows go through the
    transformer as one batch of 2B (one call per step, twice the work)."""
    if guidance == 1.0:
        return flux_velocity(transformer, x, sigma, cond, img_ids)
    null = null_conditioning(cond)
    both = Conditioning(torch.cat([cond.tokens, null.tokens]), torch.cat([cond.mask, null.mask]),
                        torch.cat([cond.pooled, null.pooled]))
    v = flux_velocity(transformer, torch.cat([x, x]), torch.cat([sigma, sigma]), both, img_ids)
    v_c, v_u = v.chunk(2)
    return v_u + guidance * (v_c - v_u)


@torch.no_grad()
def euler_sample(transformer, noise: torch.Tensor, cond: Conditioning, steps: int, img_ids,
                 guidance: float = 1.0) -> torch.Tensor:
    """The flow-matching Euler sampler over :func:`flow_sigmas` (what FlowMatchEulerDiscreteScheduler.step does),
    with classifier-free guidance when ``guidance`` is not 1."""
    sigmas = flow_sigmas(steps).tolist()
    x = noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        v = guided_velocity(transformer, x, torch.full((x.shape[0],), s, device=x.device), cond, img_ids, guidance)
        x = x + (s_next - s) * v
    return x


# ---------------------------------------------------------------------------------------------
# The built-in pipeline


class BuiltinFluxPipeline:
    """Thin diffusers-style pipeline: text encoder + FluxTransformer2DModel + flow-matching Euler.

    ``text_encoder`` is anything whose ``forward(texts)`` returns token states, a mask and a
    sentence vector (engine.text.TextFeatures); by default the MiniLM named in the config, loaded on
    first use (tests pass a tiny stand-in).
    """

    def __init__(self, transformer, config: BuiltinConfig, text_encoder=None, device="cpu",
                 guidance_scale: float | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer = transformer.to(device).eval()
        self.config = config
        # The CFG scale sampled at: the folder's own (config guidance_scale, absent = 1) unless overridden.
        self.guidance_scale = float(config.guidance_scale if guidance_scale is None else guidance_scale)
        self.device = torch.device(device)
        self._text_encoder = text_encoder
        # Kept for the diffusers contract (and checked against flow_sigmas in the tests); sampling
        # uses the equivalent explicit loop so that batching and ONNX sessions stay simple.
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from engine.text import MiniLMEncoder

            self._text_encoder = MiniLMEncoder(self.config.text_encoder, max_length=self.config.text_max_length)
        return self._text_encoder

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> Conditioning:
        feats = self.text_encoder(list(prompts))
        dtype = next(self.transformer.parameters()).dtype
        return Conditioning(feats.tokens, feats.mask, feats.sentence).to(self.device, dtype)

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """The packed starting noise of each seed (engine.portable.initial_noise: the same draw on
        every device and in every backend)."""
        c, s = self.config.latent_channels, self.config.latent_size
        dtype = next(self.transformer.parameters()).dtype
        return torch.from_numpy(pack_latents(initial_noise(seeds, (c, s, s)))).to(self.device, dtype)

    @torch.no_grad()
    def latents(self, prompts=None, steps: int | None = None, seeds: Sequence[int] | None = None,
                cond: Conditioning | None = None) -> torch.Tensor:
        """The sampler's final packed latent tokens (B, image_tokens, in_channels), before decoding."""
        if cond is None:
            cond = self.encode_prompt(prompts)
        steps = self.config.default_steps if steps is None else steps
        n = cond.tokens.shape[0]
        seeds = list(range(n)) if seeds is None else list(seeds)
        s = self.config.latent_size
        ids = image_ids(s, s, self.device, cond.tokens.dtype)
        return euler_sample(self.transformer, self.noise(seeds), cond, steps, ids, self.guidance_scale)

    @torch.no_grad()
    def __call__(self, prompts=None, steps: int | None = None, seeds: Sequence[int] | None = None,
                 cond: Conditioning | None = None) -> np.ndarray:
        """uint8 anchors (B, S, S, 3) for prompts (or precomputed conditioning) and per-image seeds."""
        x = self.latents(prompts, steps, seeds, cond)
        s = self.config.latent_size
        return latents_to_images(unpack_latents(x, s, s).float().cpu().numpy(), self.config.fold)
