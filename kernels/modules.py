"""The Triton kernels as modules (the Liger-Kernel pattern): small `nn.Module`s whose forward calls
the kernel, with the same call signature as the plain PyTorch modules they replace in the model
(engine/model.py `FusedScore`, `HybridAttentionCore`). engine/backends/triton.py swaps them in at
load time; nothing else in the model changes.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.global_local_score import global_local_score
from kernels.hybrid_attention import hybrid_attention
from kernels.reference import HybridAttention


class TritonFusedScore(nn.Module):
    """Fused global-local scores (q, n) of both branches with frozen constants, in one kernel."""

    def __init__(self, weights=(0.6, 0.4)):
        super().__init__()
        self.weights = tuple(float(w) for w in weights)

    def forward(self, q_lat, q_con, v_lat, v_con, norm) -> torch.Tensor:
        return global_local_score(q_lat, q_con, v_lat, v_con, norm, self.weights)


class TritonHybridAttention(nn.Module):
    """The text-guided hybrid attention of projected inputs, in one kernel per batch."""

    def forward(self, tokens, token_mask, regions, sentence, beta, gamma, region_mask=None) -> HybridAttention:
        return hybrid_attention(tokens, token_mask, regions, sentence, beta, gamma, region_mask)
