"""How an exported module is declared: its dynamic axes' profiles (`ExportShapes`), each input and
output (`IOSpec`: a shape template and how samples are drawn) and the module itself (`ModuleSpec`:
the traced wrapper and the engine code it must agree with). Every graph under export/graphs/ is one
`ModuleSpec`; export/onnx.py exports and checks them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from engine.errors import CVRError


class ExportError(CVRError):
    """An export that cannot be made (one-line message)."""

@dataclass
class ExportShapes:
    """min / opt / max of each dynamic axis: declared in the manifest (and the cache key) and used
    as TensorRT's optimisation profiles. `tokens=None`: (1, half, max) of the text encoders'
    max_length. ONNX Runtime accepts any size; these bound TensorRT engines only."""

    batch: tuple = (1, 32, 256)
    tokens: tuple | None = None
    frames: tuple = (1, 16, 64)
    videos: tuple = (1, 1024, 4096)

    def resolved(self, max_tokens: int) -> dict:
        tokens = self.tokens or (1, max(1, max_tokens // 2), max_tokens)
        out = {"batch": self.batch, "tokens": tokens, "frames": self.frames, "videos": self.videos}
        for name, triple in out.items():
            triple = tuple(int(v) for v in triple)
            if len(triple) != 3 or not 1 <= triple[0] <= triple[1] <= triple[2]:
                raise ExportError(f"shape profile {name} must be min <= opt <= max, all >= 1; got {triple}")
            out[name] = triple
        return out


@dataclass
class IOSpec:
    """One input or output: a shape template (axis names are the dynamic axes, ints are fixed),
    a dtype, and for inputs how random samples are drawn."""

    shape: tuple
    dtype: str = "float32"
    kind: str = "normal"  # normal | unit | prob | uniform | mask | ids | sigma
    high: int = 0  # ids: exclusive upper bound

    def concrete(self, sizes: dict) -> tuple:
        return tuple(sizes[d] if isinstance(d, str) else int(d) for d in self.shape)

    def axes(self) -> dict:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass
class ModuleSpec:
    """One exported module: the wrapper that is traced, the engine code it must agree with, and
    its declared inputs and outputs (dict order = argument order)."""

    name: str
    wrapper: nn.Module
    reference: Callable  # (**inputs) -> tuple of tensors, through the engine's own code
    inputs: dict
    outputs: dict
    # What the graph depends on when that is not the checkpoint (a frozen text encoder, the
    # ResNet, the generator): such graphs may come from a module cache shared by many exports.
    share: dict | None = None

    def sample(self, sizes: dict, generator: torch.Generator) -> dict:
        return {name: _draw(spec, spec.concrete(sizes), generator) for name, spec in self.inputs.items()}

    def axis_names(self) -> list:
        return sorted({d for spec in self.inputs.values() for d in spec.axes().values()})

    def describe(self) -> dict:
        io_ = lambda specs: {n: {"shape": list(s.shape), "dtype": s.dtype} for n, s in specs.items()}
        axes = {n: {str(i): d for i, d in s.axes().items()} for n, s in {**self.inputs, **self.outputs}.items()}
        return {"inputs": io_(self.inputs), "outputs": io_(self.outputs), "dynamic_axes": axes}


def _draw(spec: IOSpec, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    if spec.kind == "mask":  # a valid prefix per row (what tokenizers and frame loaders give), row 0 full
        lengths = torch.randint(1, shape[1] + 1, (shape[0],), generator=generator)
        lengths[0] = shape[1]
        return (torch.arange(shape[1])[None, :] < lengths[:, None]).long()
    if spec.kind == "ids":
        return torch.randint(0, spec.high, shape, generator=generator)
    if spec.kind in ("prob", "uniform"):
        return torch.rand(shape, generator=generator)
    if spec.kind == "sigma":
        return torch.rand(shape, generator=generator) * 0.98 + 0.02
    values = torch.randn(shape, generator=generator)
    return F.normalize(values, dim=-1) if spec.kind == "unit" else values
