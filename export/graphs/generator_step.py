"""One denoising step of the built-in FLUX transformer, with a precomputed float32 rotary table.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from export.spec import IOSpec, ModuleSpec


class FixedRope(nn.Module):
    """FluxPosEmbed for flux_velocity's ids: text ids are all zero (angle 0: cos 1, sin 0) and the
    image ids are fixed, so the table is computed once by diffusers' own float64 code and stored in
    float32; the graph then has no float64 (TensorRT has none) and is exactly as eager."""

    def __init__(self, pos_embed: nn.Module, img_ids: torch.Tensor):
        super().__init__()
        cos, sin = pos_embed(img_ids)
        self.register_buffer("cos", cos.float())
        self.register_buffer("sin", sin.float())
        self.image_tokens = int(img_ids.shape[0])

    def forward(self, ids):
        text = ids.shape[0] - self.image_tokens
        width = self.cos.shape[1]
        return (torch.cat([self.cos.new_ones(text, width), self.cos]),
                torch.cat([self.sin.new_zeros(text, width), self.sin]))


class FluxStepGraph(nn.Module):
    """One denoising step: engine.anchors.flux_velocity on the built-in FLUX transformer."""

    def __init__(self, transformer, config):
        super().__init__()
        from engine.anchors import image_ids

        self.register_buffer("img_ids", image_ids(config.latent_size, config.latent_size))
        self.transformer = copy.deepcopy(transformer).eval()
        self.transformer.pos_embed = FixedRope(transformer.pos_embed, self.img_ids)

    def forward(self, latents, sigma, text_tokens, text_mask, pooled):
        from engine.anchors import Conditioning, flux_velocity

        cond = Conditioning(text_tokens, text_mask.bool(), pooled)
        return flux_velocity(self.transformer, latents, sigma, cond, self.img_ids)

def generator_step_spec(transformer, config, generator_id: str | None = None) -> ModuleSpec:
    from engine.anchors import Conditioning, flux_velocity, image_ids
    from export.spec import ExportError

    guidance = float(getattr(config, "guidance_scale", 1.0))
    if guidance != 1.0:  # the graph is one conditional pass, and the exported sampler calls it once per step
        raise ExportError(f"this generator samples with classifier-free guidance {guidance:g} (two passes per "
                          "step, conditional and null): the generator_step graph is one conditional pass, so it "
                          "would sample without guidance. Export a distilled student (`cvr generator distill` "
                          "bakes the guidance in; its config records 1)")

    ids = image_ids(config.latent_size, config.latent_size)

    def reference(latents, sigma, text_tokens, text_mask, pooled):
        cond = Conditioning(text_tokens, text_mask.bool(), pooled)
        return (flux_velocity(transformer, latents, sigma, cond, ids),)

    tokens, channels = config.image_tokens, config.in_channels
    return ModuleSpec("generator_step", FluxStepGraph(transformer, config).eval(), reference,
                      {"latents": IOSpec(("batch", tokens, channels)), "sigma": IOSpec(("batch",), kind="sigma"),
                       "text_tokens": IOSpec(("batch", "tokens", config.joint_attention_dim)),
                       "text_mask": IOSpec(("batch", "tokens"), "int64", "mask"),
                       "pooled": IOSpec(("batch", config.pooled_projection_dim))},
                      {"velocity": IOSpec(("batch", tokens, channels))},
                      {"module": "generator_step", "id": generator_id} if generator_id else None)
