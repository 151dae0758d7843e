"""Packed-sequence GRUs do not export: `masked_bigru` is engine.model.run_gru as one opaque operator,
written to ONNX as ONNX's own GRU with `sequence_lens` (`TRANSLATIONS`, which export/onnx.py passes
to the exporter). `MaskedBiGRU` wraps it for the video tower and RIVRL's text encoder.
"""
from __future__ import annotations

import torch
from torch import nn

from export.spec import ExportError


@torch.library.custom_op("cvr_export::masked_bigru", mutates_args=())
def masked_bigru(x: torch.Tensor, lengths: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
                 b_hh: torch.Tensor, w_ih_r: torch.Tensor, w_hh_r: torch.Tensor, b_ih_r: torch.Tensor,
                 b_hh_r: torch.Tensor) -> torch.Tensor:
    """A one-layer bidirectional batch-first GRU over each row's first `lengths` steps (zeros
    after): engine.model.run_gru as one operator. Eager runs it with packed sequences; the export
    writes ONNX's own GRU with `sequence_lens` (`_masked_bigru_onnx`). As an opaque operator it
    is also quick to trace: torch.export otherwise unrolls GRUs in Python for every export."""
    from engine.model import run_gru

    gru = nn.GRU(x.shape[2], w_hh.shape[1], batch_first=True, bidirectional=True).to(x.device, x.dtype)
    values = (w_ih, w_hh, b_ih, b_hh, w_ih_r, w_hh_r, b_ih_r, b_hh_r)
    with torch.no_grad():
        for name, value in zip(_GRU_PARAMETERS, values, strict=True):
            getattr(gru, name).copy_(value)
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        return run_gru(gru, x, mask)


_GRU_PARAMETERS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_ih_l0_reverse",
                   "weight_hh_l0_reverse", "bias_ih_l0_reverse", "bias_hh_l0_reverse")


@masked_bigru.register_fake
def _masked_bigru_fake(x, lengths, w_ih, w_hh, b_ih, b_hh, w_ih_r, w_hh_r, b_ih_r, b_hh_r):
    return x.new_empty(x.shape[0], x.shape[1], 2 * w_hh.shape[1])


def _masked_bigru_onnx(x, lengths, w_ih, w_hh, b_ih, b_hh, w_ih_r, w_hh_r, b_ih_r, b_hh_r):
    """ONNX GRU, bidirectional, with sequence_lens: the reverse direction starts at each row's
    last valid step, as packed sequences do. linear_before_reset=1 is PyTorch's formulation."""
    import onnx
    from onnxscript import opset18 as op

    hidden = w_hh.shape[1]

    def gates(t):  # PyTorch stacks the gates r, z, n; ONNX z, r, h
        pieces = [op.Slice(t, [i * hidden], [(i + 1) * hidden], [0]) for i in range(3)]
        return op.Concat(pieces[1], pieces[0], pieces[2], axis=0)

    both = lambda ahead, back: op.Concat(op.Unsqueeze(ahead, [0]), op.Unsqueeze(back, [0]), axis=0)
    weights = both(gates(w_ih), gates(w_ih_r))
    recurrent = both(gates(w_hh), gates(w_hh_r))
    bias = both(op.Concat(gates(b_ih), gates(b_hh), axis=0), op.Concat(gates(b_ih_r), gates(b_hh_r), axis=0))
    steps = op.Cast(lengths, to=onnx.TensorProto.INT32)
    y, _ = op.GRU(op.Transpose(x, perm=[1, 0, 2]), weights, recurrent, bias, steps, direction="bidirectional",
                  hidden_size=hidden, linear_before_reset=1)
    y = op.Transpose(y, perm=[2, 0, 1, 3])  # (steps, 2, batch, hidden) -> (batch, steps, 2, hidden)
    return op.Reshape(y, op.Constant(value_ints=[0, 0, -1]))


TRANSLATIONS = {torch.ops.cvr_export.masked_bigru.default: _masked_bigru_onnx}


class MaskedBiGRU(nn.Module):
    """engine.model.run_gru for export: packed sequences do not export, so the GRU and its
    lengths become one `masked_bigru` operator (ONNX GRU with sequence_lens). Rows without any
    valid step run one step, as run_gru does, and are zeroed by the mask."""

    def __init__(self, gru: nn.GRU):
        super().__init__()
        if gru.num_layers != 1 or not gru.bidirectional or not gru.batch_first or not gru.bias:
            raise ExportError("exports one-layer, bidirectional, batch-first GRUs with biases only")
        self.gru = gru

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1).clamp_min(1)
        out = masked_bigru(x, lengths, *(getattr(self.gru, name) for name in _GRU_PARAMETERS))
        return out * mask.unsqueeze(-1).to(out.dtype)
