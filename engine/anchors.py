"""The anchor generator: text -> anchor image, through a FLUX transformer and a flow-matching sampler.

Two kinds of generator folder run through the same :class:`AnchorGenerator` API:

- **built-in** (``config.json`` with ``"kind": "builtin"`` + ``transformer/`` in diffusers' layout):
  a small :class:`diffusers.FluxTransformer2DModel` (the real architecture: double- and
  single-stream blocks, 3-axis RoPE, AdaLN, QK-RMSNorm) trained by this project on the built-in
  set (``cvr generator train``), conditioned on the retrieval text encoder (MiniLM token states as
  ``encoder_hidden_states`` with padded tokens masked, the pooled sentence vector as
  ``pooled_projections``). Sampled by :class:`BuiltinFluxPipeline`, a thin pipeline over the
  transformer and a ``FlowMatchEulerDiscreteScheduler``.
- **real FLUX.1** (a diffusers pipeline folder with ``model_index.json``): loaded with
  ``FluxPipeline.from_pretrained(DIR, local_files_only=True)``, bf16 on a GPU, with its own text
  encoders, or without them when prompt embeddings are given.

LoRA adapters (standard ``pytorch_lora_weights.safetensors`` files, as ``cvr generator lora``
writes them) are loaded and fused into the transformer for inference: an unfused LoRA costs about
+24% per step for nothing at inference time.

Every prompt gets its own fixed seed (``prompt_seed``), so the same prompt gives the same anchor
whatever batch it is in, and an optional :class:`AnchorCache` on disk, keyed by (prompt, generator
id, adapter id, steps, size, seed), makes repeated queries free.

Real FLUX.1 folders are run by engine/flux_real.py; the anchor store (``cvr anchors``) is
engine/anchor_store.py.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from engine import files
from engine.config import check_types
from engine.fingerprints import (
    GENERATOR_CONFIG,
    TRANSFORMER_DIR,
    adapter_id,
    generator_id,
    generator_kind,
    lora_file,
)
from engine.portable import (
    AnchorCache,
    AnchorError,
    flow_sigmas,
    initial_noise,
    latents_to_images,
    pack_latents,
    prompt_seed,
    unpack_latents,
)

log = logging.getLogger(__name__)

CONFIG_FILE = GENERATOR_CONFIG
FORMAT = "cvr-sdgm/generator/1"
PROTOCOLS = ("query", "ssss")
TEACHER_STEPS = 28  # FLUX.1-dev's default step count; the teacher's reference in the benchmark

# peft target modules for LoRA on a FLUX transformer: diffusers' train_dreambooth_lora_flux.py
# defaults (attention q/k/v/out, the context projections, both feed-forwards) plus the single-stream
# blocks' MLP (proj_mlp), which that list misses.
LORA_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp",
)


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


# ---------------------------------------------------------------------------------------------
# Folders: save / load / ids


def save_builtin(folder, transformer, config: BuiltinConfig, info: dict | None = None, extra=None) -> Path:
    """Write a built-in generator folder atomically: config.json + transformer/ (safetensors).

    Built in a temporary sibling and renamed into place, so a crash never leaves half a model.
    ``extra(tmp)``, when given, writes more into the staging folder before the swap (the teacher's
    resumable training state: it lands together with the weights it belongs to, or not at all)."""
    folder = Path(folder)
    with files.staged_folder(folder) as tmp:
        transformer.save_pretrained(tmp / TRANSFORMER_DIR, safe_serialization=True)
        files.write_json(tmp / CONFIG_FILE, {"format": FORMAT, "kind": "builtin", "generator": config.to_dict(),
                                             "info": info or {}})
        if extra is not None:
            extra(tmp)
        if (folder / "samples").is_dir():  # keep the sample grids of earlier checkpoints (copied: a
            shutil.copytree(folder / "samples", tmp / "samples")  # kill before the swap keeps them)
    return folder


def read_builtin_config(path) -> tuple[BuiltinConfig, dict]:
    data = json.loads((Path(path) / CONFIG_FILE).read_text())
    return BuiltinConfig.from_dict(data["generator"]), data.get("info", {})


def load_builtin_transformer(path, dtype=torch.float32):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(Path(path) / TRANSFORMER_DIR, local_files_only=True)
    return model if dtype == torch.float32 else model.to(dtype)


def fuse_lora_into(transformer, adapters: Sequence[tuple[str, float]]):
    """Load each LoRA file into the transformer and fuse it (scaled), then drop the LoRA layers."""
    for i, (path, scale) in enumerate(adapters):
        name = f"adapter{i}"
        transformer.load_lora_adapter(str(lora_file(path)), adapter_name=name, prefix="transformer")
        transformer.fuse_lora(lora_scale=float(scale), adapter_names=[name])
        transformer.unload_lora()
    return transformer


# ---------------------------------------------------------------------------------------------
# The generator: one API over both kinds


@dataclass
class GeneratorOptions:
    steps: int | None = None  # None: the folder's default (28 for a teacher, N for an N-step student)
    seed: int = 0
    batch_size: int = 32
    size: int | None = None  # real FLUX only (the built-in size is fixed by its training)
    adapters: list = field(default_factory=list)  # [(lora path, scale)], fused at load
    # real FLUX: None = 0 for schnell, 3.5 for dev (guidance-distilled). Built-in: the classifier-free
    # guidance scale, None = the folder's own (config guidance_scale; absent = 1, one pass per step).
    guidance_scale: float | None = None
    max_sequence_length: int = 256


class AnchorGenerator:
    """Text -> anchor images (uint8 B x S x S x 3), batched, seeded per prompt, optionally cached.

    >>> gen = AnchorGenerator.load("engine/weights/generator/student-4step")
    >>> images = gen.generate(["a red circle moves left"])         # (1, 32, 32, 3) uint8
    """

    def __init__(self, backend, kind: str, gen_id: str, options: GeneratorOptions, default_steps: int,
                 image_size: int, cache: AnchorCache | None = None):
        self.backend = backend
        self.kind = kind
        self.generator_id = gen_id
        self.options = options
        self.default_steps = int(default_steps)
        self.image_size = int(image_size)
        self.adapter_id = adapter_id(options.adapters)
        self.cache = cache

    @classmethod
    def load(cls, path, options: GeneratorOptions | None = None, device: str | None = None,
             cache_dir=None, text_encoder=None) -> AnchorGenerator:
        options = options or GeneratorOptions()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        kind = generator_kind(path)
        cache = AnchorCache(cache_dir) if cache_dir else None
        if kind == "builtin":
            config, _ = read_builtin_config(path)
            transformer = load_builtin_transformer(path)
            fuse_lora_into(transformer, options.adapters)
            backend = BuiltinFluxPipeline(transformer, config, text_encoder=text_encoder, device=device,
                                          guidance_scale=options.guidance_scale)
            gen_id = generator_id(path, backend.guidance_scale)  # the weights and the guidance sampled at
            return cls(backend, kind, gen_id, options, config.default_steps, config.image_size, cache)
        from engine.flux_real import RealFluxBackend

        # text_encoder="skip": no CLIP / T5 in memory; call backend(prompt_embeds=..., pooled_prompt_embeds=...).
        backend = RealFluxBackend(path, device=device, skip_text_encoders=text_encoder == "skip")
        backend.fuse(options.adapters)
        size = options.size or 512
        return cls(backend, kind, generator_id(path), options, backend.default_steps, size, cache)

    def _seeds(self, prompts: Sequence[str], seed: int) -> list[int]:
        return [prompt_seed(p, seed) for p in prompts]

    def _render(self, prompts: list[str], steps: int, seeds: list[int]) -> np.ndarray:
        if self.kind == "builtin":
            return self.backend(prompts, steps=steps, seeds=seeds)
        guidance = self.options.guidance_scale
        if guidance is None:
            guidance = 3.5 if self.backend.pipe.transformer.config.guidance_embeds else 0.0
        return self.backend(prompts, steps=steps, seeds=seeds, size=self.image_size, guidance_scale=guidance,
                            max_sequence_length=self.options.max_sequence_length)

    def _checked(self, prompts, steps, seed) -> tuple:
        """(prompts, steps, seed) with the options' defaults filled in; AnchorError for bad ones."""
        if isinstance(prompts, str):
            raise AnchorError("prompts must be a list of strings, not one string")
        prompts = list(prompts)
        if not prompts:
            raise AnchorError("no prompts given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise AnchorError(f"prompt {i} is empty")
        steps = self.options.steps if steps is None else steps
        steps = self.default_steps if steps is None else int(steps)
        if steps < 1:
            raise AnchorError(f"steps must be >= 1, got {steps}")
        return prompts, steps, self.options.seed if seed is None else int(seed)

    def generate_latents(self, prompts: Sequence[str], steps: int | None = None,
                         seed: int | None = None) -> np.ndarray:
        """The final packed latent of each prompt's anchor, float32 (B, L, C): the tokens the
        transformer denoised, before any decoding to pixels ("anchor from generator features").
        Drawn from the same noise as `generate` (same prompt seeds), so decoding them gives the
        same image. Not cached: the anchor cache keeps pixels. Built-in generators only."""
        if self.kind != "builtin":
            raise AnchorError("anchor features from the generator's latent need a built-in generator (a FLUX.1 "
                              "latent is the VAE's, not what the built-in models are trained on)")
        prompts, steps, seed = self._checked(prompts, steps, seed)
        seeds = self._seeds(prompts, seed)
        bs = max(1, int(self.options.batch_size))
        parts = [self.backend.latents(prompts[i:i + bs], steps=steps, seeds=seeds[i:i + bs]).float().cpu().numpy()
                 for i in range(0, len(prompts), bs)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def generate(self, prompts: Sequence[str], steps: int | None = None, seed: int | None = None,
                 progress: bool = False) -> np.ndarray:
        """One anchor per prompt, in order; cached anchors are read, the rest generated in batches."""
        prompts, steps, seed = self._checked(prompts, steps, seed)
        seeds = self._seeds(prompts, seed)
        out: list[np.ndarray | None] = [None] * len(prompts)
        keys = [AnchorCache.key(p, self.generator_id, self.adapter_id, steps, self.image_size, seed) for p in prompts]
        if self.cache is not None:
            for i, k in enumerate(keys):
                out[i] = self.cache.get(k)
        todo = [i for i, img in enumerate(out) if img is None]
        bs = max(1, int(self.options.batch_size))
        from tqdm import tqdm

        for start in tqdm(range(0, len(todo), bs), desc="anchors", unit="batch", disable=not progress):
            idx = todo[start:start + bs]
            images = self._render([prompts[i] for i in idx], steps, [seeds[i] for i in idx])
            for i, img in zip(idx, images, strict=True):
                out[i] = img
                if self.cache is not None:
                    self.cache.put(keys[i], img)
        return np.stack(out)
