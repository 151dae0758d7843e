"""The ResNet-50 region extractor's graph: anchor images in [0, 1] in, region grids out.
"""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from export.spec import IOSpec, ModuleSpec


class VisionGraph(nn.Module):
    """engine.vision.RegionExtractor.regions on float images in [0, 1]: resize, ImageNet
    normalisation, ResNet-50, region grid (B, h*w, 2048)."""

    def __init__(self, extractor):
        super().__init__()
        self.model = extractor.model
        self.size = extractor.config.image_size
        self.register_buffer("mean", extractor.mean.detach().clone().cpu())
        self.register_buffer("std", extractor.std.detach().clone().cpu())

    def forward(self, images):
        if images.shape[-1] != self.size:  # the anchor size is fixed, so this is decided at export
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        grid = self.model(pixel_values=(images - self.mean) / self.std).last_hidden_state
        return grid.flatten(2).transpose(1, 2)

def vision_spec(extractor, anchor_size: int, weights_id: str | None = None) -> ModuleSpec:
    regions = extractor.grid_size() ** 2

    def reference(images):
        return (extractor.regions(images),)

    return ModuleSpec("vision", VisionGraph(extractor).eval(), reference,
                      {"images": IOSpec(("batch", 3, anchor_size, anchor_size), kind="uniform")},
                      {"regions": IOSpec(("batch", regions, extractor.feature_dim))},
                      {"module": "vision", "id": weights_id, "image_size": extractor.config.image_size,
                       "anchor_size": anchor_size} if weights_id else None)
