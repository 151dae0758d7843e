"""The scorer's graph: the fused score of kernels/reference.py with the checkpoint's frozen constants.
"""
from __future__ import annotations

from torch import nn

from export.spec import IOSpec, ModuleSpec
from kernels import reference


class ScorerGraph(nn.Module):
    """engine.model.Matcher with frozen constants (stored in the graph), non-transductive."""

    def __init__(self, matcher):
        super().__init__()
        self.register_buffer("norm", matcher.norm.detach().clone())
        self.weights, self.local_branch = matcher.weights, matcher.local_branch

    def forward(self, query_lat, query_con, video_lat, video_con):
        # The one definition, untiled: the backend hands the graph blocks of the gallery.
        return reference.fused_score(query_lat, query_con, video_lat, video_con, self.norm, self.weights,
                                     self.local_branch)

def scorer_spec(model) -> ModuleSpec:
    from engine.model import Embeddings

    config = model.config

    def reference(query_lat, query_con, video_lat, video_con):
        return (model.matcher(Embeddings(query_lat, query_con), Embeddings(video_lat, video_con)),)

    d, k = config.latent_dim, config.concept_dim
    return ModuleSpec("scorer", ScorerGraph(model.matcher).eval(), reference,
                      {"query_lat": IOSpec(("batch", 2, d), kind="unit"),
                       "query_con": IOSpec(("batch", 2, k), kind="prob"),
                       "video_lat": IOSpec(("videos", 2, d), kind="unit"),
                       "video_con": IOSpec(("videos", 2, k), kind="prob")},
                      {"scores": IOSpec(("batch", "videos"))})
