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
engine/anchor_store.py; the built-in model, its sampler and BuiltinFluxPipeline are
engine/anchor_pipeline.py (its names are importable from here too).
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine import files
from engine.anchor_pipeline import (  # noqa: F401 (re-exported: engine.anchors is the public module)
    TEACHER_STEPS,
    BuiltinConfig,
    BuiltinFluxPipeline,
    Conditioning,
    build_transformer,
    drop_conditioning,
    euler_sample,
    flux_velocity,
    guided_velocity,
    image_ids,
    images_to_latents,
    null_conditioning,
    rectified_flow_pair,
)
from engine.fingerprints import (
    GENERATOR_CONFIG,
    TRANSFORMER_DIR,
    adapter_id,
    generator_id,
    generator_kind,
    lora_file,
)
from engine.portable import (  # noqa: F401 (re-exported: callers take AnchorError and these from here)
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
