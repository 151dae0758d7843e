"""The video tower's graph: frame features in, video embeddings out (engine.model.VideoTower with
export/graphs/gru.py's MaskedBiGRU for its packed GRU).
"""
from __future__ import annotations

from torch import nn

from export.graphs.gru import MaskedBiGRU
from export.graphs.query_tower import embedding_outputs
from export.spec import IOSpec, ModuleSpec


class VideoTowerGraph(nn.Module):
    """engine.model.VideoTower.forward with MaskedBiGRU for run_gru (same weights)."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower
        self.gru = MaskedBiGRU(tower.gru)

    def forward(self, frames, frame_mask):
        mask = frame_mask.bool()
        emb = self.tower.from_gru_states(frames, mask, self.gru(frames, mask))
        return emb.lat, emb.con

def video_tower_spec(model) -> ModuleSpec:
    config = model.config

    def reference(frames, frame_mask):
        emb = model.video(frames, frame_mask)
        return emb.lat, emb.con

    return ModuleSpec("video_tower", VideoTowerGraph(model.video).eval(), reference,
                      {"frames": IOSpec(("batch", "frames", config.frame_dim)),
                       "frame_mask": IOSpec(("batch", "frames"), "int64", "mask")},
                      embedding_outputs(config, "batch"))
