"""The `triton` backend: the PyTorch query path with the fused Triton kernels swapped in at load time
(the Liger-Kernel pattern): the matcher's `FusedScore` becomes kernels.modules.TritonFusedScore and
the hybrid attention's core kernels.modules.TritonHybridAttention. The kernels run compiled on CUDA;
under TRITON_INTERPRET=1 they also run (slowly) on the CPU, which is how the tests check them.
"""
from __future__ import annotations

from engine.errors import CVRError
from engine.model import FusedScore, HybridAttentionCore


class KernelError(CVRError):
    """A model the fused kernels cannot serve as it is (one-line message)."""


def use_triton_kernels(model) -> None:
    """Swap the fused kernels into a loaded CVRModel, in place."""
    from kernels.modules import TritonFusedScore, TritonHybridAttention

    matcher = model.matcher
    if getattr(model.config, "head", "cvr") != "cvr":
        raise KernelError(f"the fused kernels score the cvr head; this checkpoint's head is {model.config.head}: "
                          "use --backend torch or onnxruntime")
    if not matcher.local_branch:
        raise KernelError("the fused scoring kernel scores both branches: use the torch backend for the "
                          "no-local-branch ablation")
    if isinstance(matcher.fused, FusedScore):
        matcher.fused = TritonFusedScore(matcher.weights)
    attention = getattr(model.query, "attention", None)
    if attention is not None and isinstance(attention.core, HybridAttentionCore):
        attention.core = TritonHybridAttention()
