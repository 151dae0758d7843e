"""The text encoder's graph (MiniLM or RIVRL's encoder), token ids in, token states and sentence out.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from export.graphs.gru import MaskedBiGRU
from export.spec import IOSpec, ModuleSpec


class MiniLMGraph(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        features = self.encoder.encode_ids(input_ids, attention_mask)
        return features.tokens, features.sentence


class RivrlGraph(nn.Module):
    """RivrlTextEncoder.encode_ids, exportable: MaskedBiGRU for the packed GRU, and a fixed right
    padding of the CNN input (zeros, as the conv's own padding) instead of a length-dependent one."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.gru = MaskedBiGRU(encoder.rnn)

    def forward(self, input_ids, attention_mask):
        enc, mask = self.encoder, attention_mask.bool()
        lengths = mask.sum(1)
        states = self.gru(enc.embed(input_ids), mask)
        gru_mean = states.sum(1) / lengths.clamp_min(1).unsqueeze(-1).to(states.dtype)
        sentence = torch.cat([gru_mean, self._cnn(states, lengths), enc.bag_of_words(input_ids, mask)], 1)
        return states, sentence

    def _cnn(self, states, lengths):
        x, pooled = states.transpose(1, 2), []
        for k, conv in zip(self.encoder.kernel_sizes, self.encoder.convs, strict=True):
            pad = conv.padding[0]
            valid = (lengths + 2 * pad - k + 1).clamp_min(1)
            extra = max(0, k - 2 * pad - 1)  # enough for one output even from a single position
            y = F.relu(conv(F.pad(x, (0, extra)) if extra else x))
            position = torch.arange(y.shape[2], device=y.device)
            y = y.masked_fill(position[None, None, :] >= valid[:, None, None], float("-inf"))
            pooled.append(y.amax(dim=2))
        return torch.cat(pooled, dim=1)

def text_encoder_spec(encoder, name: str = "text_encoder") -> ModuleSpec:
    kind = encoder.describe()["kind"]
    high = len(encoder.vocab) if kind == "rivrl" else int(encoder.model.config.vocab_size)
    wrapper = RivrlGraph(encoder) if kind == "rivrl" else MiniLMGraph(encoder)

    def reference(input_ids, attention_mask):
        features = encoder.encode_ids(input_ids, attention_mask)
        return features.tokens, features.sentence

    frozen = not any(p.requires_grad for p in encoder.parameters())
    share = {"module": "text", "kind": kind, "model_id": encoder.describe()["model_id"]} if frozen else None
    return ModuleSpec(name, wrapper.eval(), reference,
                      {"input_ids": IOSpec(("batch", "tokens"), "int64", "ids", high),
                       "attention_mask": IOSpec(("batch", "tokens"), "int64", "mask")},
                      {"tokens": IOSpec(("batch", "tokens", encoder.dim_tokens)),
                       "sentence": IOSpec(("batch", encoder.dim_sentence))}, share)
