"""Real FLUX.1 as an anchor generator: a diffusers pipeline folder (``model_index.json``), loaded with
``FluxPipeline.from_pretrained(DIR, local_files_only=True)``, bf16 on a GPU, with its own text
encoders, or without them when prompt embeddings are given. Its starting latents come from the
engine's one noise source (engine.portable.initial_noise), passed in as diffusers allows.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.anchors import TEACHER_STEPS, AnchorError, lora_file
from engine.portable import initial_noise, pack_latents


class RealFluxBackend:
    """FluxPipeline from a local folder: bf16 on a GPU (fp32 on a CPU, where bf16 matmuls are slow),
    its own CLIP + T5 encoders, or none when called with prompt embeddings (skip_text_encoders)."""

    def __init__(self, path, device="cpu", skip_text_encoders=False, dtype=None):
        from diffusers import FluxPipeline

        self.device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        skip = {}
        if skip_text_encoders:
            skip = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
        try:
            self.pipe = FluxPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True, **skip)
        except (OSError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AnchorError(f"{path}: not a loadable FLUX pipeline folder: {first}") from exc
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(self.device)
        # schnell (no guidance embedder) samples in 4 steps; dev in 28.
        self.default_steps = TEACHER_STEPS if self.pipe.transformer.config.guidance_embeds else 4

    def fuse(self, adapters: Sequence[tuple[str, float]]) -> None:
        for i, (path, scale) in enumerate(adapters):
            name = f"adapter{i}"
            file = lora_file(path)
            self.pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
            self.pipe.fuse_lora(components=["transformer"], lora_scale=float(scale), adapter_names=[name])
            self.pipe.unload_lora_weights()

    def noise(self, seeds, size: int) -> torch.Tensor:
        """Packed starting latents of each seed (engine.portable.initial_noise), in the shape
        FluxPipeline.prepare_latents draws: (in_channels / 4, 2 * (size // 16), 2 * (size // 16))."""
        channels = self.pipe.transformer.config.in_channels // 4
        side = 2 * (int(size) // (self.pipe.vae_scale_factor * 2))
        noise = pack_latents(initial_noise(seeds, (channels, side, side)))
        return torch.from_numpy(noise).to(self.device, self.pipe.transformer.dtype)

    @torch.no_grad()
    def __call__(self, prompts=None, steps=4, seeds=(), size=512, guidance_scale=0.0, max_sequence_length=256,
                 prompt_embeds=None, pooled_prompt_embeds=None) -> np.ndarray:
        if prompt_embeds is not None:
            kwargs = dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds)
        else:
            kwargs = dict(prompt=list(prompts), max_sequence_length=max_sequence_length)
        images = self.pipe(num_inference_steps=int(steps), height=size, width=size, guidance_scale=guidance_scale,
                           latents=self.noise(seeds, size), output_type="np", **kwargs).images
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
