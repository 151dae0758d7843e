"""The glscl head's graphs (engine/glscl.py): query tower, video tower and scorer.

The video tower's graph takes exactly F frame slots (a fixed axis): `fit_frames`, which pads or
subsamples a batch to F, branches on the data and stays outside the graph (a caller pads to F, as
the gallery's rows are). The scorer is kernels.reference.glscl_score untiled (the backend hands it
blocks of the gallery), like the cvr scorer.
"""
from __future__ import annotations

from torch import nn

from export.spec import IOSpec, ModuleSpec
from kernels import reference


class GLSCLQueryTowerGraph(nn.Module):
    def __init__(self, tower):
        super().__init__()
        self.tower = tower
        self.decoder = tower.decoder  # registered here, so the graph holds its weights

    def forward(self, sentence, tokens, token_mask):
        emb = self.tower(sentence, tokens, token_mask)
        return emb.lat, emb.con


class GLSCLVideoTowerGraph(nn.Module):
    """engine.glscl.GLSCLVideoTower.forward on frames already fitted to F slots."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, frames, frame_mask):
        from engine.glscl import encode_fitted

        emb = encode_fitted(self.tower, frames, frame_mask.bool())
        return emb.lat, emb.con


class GLSCLScorerGraph(nn.Module):
    def __init__(self, matcher):
        super().__init__()
        self.tau, self.lam, self.mode = matcher.tau, matcher.lam, matcher.mode

    def forward(self, query_lat, query_con, video_lat, video_con):
        return reference.glscl_score(query_lat, video_lat, video_con[:, 0], self.tau, self.lam, self.mode)


def _slots(config) -> tuple:
    return 1 + config.glscl_queries, 1 + config.glscl_frames + config.glscl_queries, config.glscl_frames


def glscl_query_tower_spec(model) -> ModuleSpec:
    config, text = model.config, model.text
    q_slots, _, frames = _slots(config)

    def reference_fn(sentence, tokens, token_mask):
        emb = model.query(sentence, tokens, token_mask)
        return emb.lat, emb.con

    inputs = {"sentence": IOSpec(("batch", text.dim_sentence)),
              "tokens": IOSpec(("batch", "tokens", text.dim_tokens)),
              "token_mask": IOSpec(("batch", "tokens"), "int64", "mask")}
    outputs = {"lat": IOSpec(("batch", q_slots, config.latent_dim)), "con": IOSpec(("batch", 1, frames))}
    return ModuleSpec("query_tower", GLSCLQueryTowerGraph(model.query).eval(), reference_fn, inputs, outputs)


def glscl_video_tower_spec(model) -> ModuleSpec:
    config = model.config
    _, v_slots, count = _slots(config)

    def reference_fn(frames, frame_mask):
        emb = model.video(frames, frame_mask)  # the engine's own path, fit_frames included
        return emb.lat, emb.con

    inputs = {"frames": IOSpec(("batch", count, config.frame_dim)),
              "frame_mask": IOSpec(("batch", count), "int64", "mask")}
    outputs = {"lat": IOSpec(("batch", v_slots, config.latent_dim)), "con": IOSpec(("batch", 1, count))}
    return ModuleSpec("video_tower", GLSCLVideoTowerGraph(model.video).eval(), reference_fn, inputs, outputs)


def glscl_scorer_spec(model) -> ModuleSpec:
    from engine.model import Embeddings

    config = model.config
    q_slots, v_slots, frames = _slots(config)

    def reference_fn(query_lat, query_con, video_lat, video_con):
        return (model.matcher(Embeddings(query_lat, query_con), Embeddings(video_lat, video_con)),)

    inputs = {"query_lat": IOSpec(("batch", q_slots, config.latent_dim), kind="unit"),
              "query_con": IOSpec(("batch", 1, frames), kind="prob"),
              "video_lat": IOSpec(("videos", v_slots, config.latent_dim), kind="unit"),
              # uniform in [0, 1): glscl_score reads > 0.5 as a valid frame, so masks vary per row
              "video_con": IOSpec(("videos", 1, frames), kind="prob")}
    return ModuleSpec("scorer", GLSCLScorerGraph(model.matcher).eval(), reference_fn, inputs,
                      {"scores": IOSpec(("batch", "videos"))})


def glscl_scorer_section(model) -> dict:
    """The export manifest's "scorer" section for a glscl checkpoint."""
    config = model.config
    return {"head": "glscl", "tau": config.glscl_tau, "lambda": config.glscl_lambda, "mask": config.glscl_mask,
            "frames": config.glscl_frames, "queries": config.glscl_queries}
