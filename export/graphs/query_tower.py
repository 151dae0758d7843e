"""The query tower's graph: text features (+ anchor regions) in, query embeddings out.
"""
from __future__ import annotations

from torch import nn

from export.spec import IOSpec, ModuleSpec


class QueryTowerGraph(nn.Module):
    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, sentence, tokens, token_mask):
        emb = self.tower(sentence, tokens, token_mask)
        return emb.lat, emb.con


class AnchoredQueryTowerGraph(QueryTowerGraph):
    def forward(self, sentence, tokens, token_mask, regions):
        emb = self.tower(sentence, tokens, token_mask, regions)
        return emb.lat, emb.con

def query_tower_spec(model, regions: int | None) -> ModuleSpec:
    config, text = model.config, model.text
    inputs = {"sentence": IOSpec(("batch", text.dim_sentence)),
              "tokens": IOSpec(("batch", "tokens", text.dim_tokens)),
              "token_mask": IOSpec(("batch", "tokens"), "int64", "mask")}
    if config.use_anchor:
        inputs["regions"] = IOSpec(("batch", regions, config.region_dim))
    wrapper = AnchoredQueryTowerGraph(model.query) if config.use_anchor else QueryTowerGraph(model.query)

    def reference(sentence, tokens, token_mask, regions=None):
        emb = model.query(sentence, tokens, token_mask, regions)
        return emb.lat, emb.con

    return ModuleSpec("query_tower", wrapper.eval(), reference, inputs, embedding_outputs(config, "batch"))

def embedding_outputs(config, axis: str) -> dict:
    return {"lat": IOSpec((axis, 2, config.latent_dim)), "con": IOSpec((axis, 2, config.concept_dim))}
