"""What the kernel tests share: poisoned outputs, comparisons, and the error rule.

The error rule (FlashAttention's): a kernel's error against a float64 reference must stay within a
small multiple of the error PyTorch itself makes computing the same thing in the same dtype,

    max |kernel - ref64| <= FACTOR * max |torch_in_dtype - ref64| + FLOOR_ULPS * eps(dtype) * max |ref64|,

so the tolerance follows the dtype and the sizes instead of a table of constants. The floor covers
outputs PyTorch happens to compute exactly (an error of 0 would allow none).
"""
from __future__ import annotations

import math

import torch

import kernels._utils as kutils

FACTOR = 2.0
FLOOR_ULPS = 4.0


def poison_outputs(monkeypatch) -> None:
    """Kernel outputs start as NaN (floats) or the int64 maximum (ints): an element the kernel never
    writes then fails every comparison."""
    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(kutils, "empty", poisoned)


def _worst(err: torch.Tensor) -> tuple:
    worst = torch.where(torch.isnan(err), math.inf, err).argmax()
    return tuple(int(i) for i in torch.unravel_index(worst, err.shape))


def assert_close(actual, expected, atol: float, rtol: float, what: str) -> None:
    """|actual - expected| <= atol + rtol |expected| everywhere (NaN fails), naming the worst element."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual - expected).abs()
    bad = ~(err <= atol + rtol * expected.abs())
    if bad.any():
        pos = _worst(err)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements off (atol={atol}, rtol={rtol});"
            f" worst at {pos}: got {actual[pos].item()!r} vs {expected[pos].item()!r}")


def error_bound(torch_out, ref64, dtype: torch.dtype) -> float:
    """The largest error the rule allows a kernel computing `ref64` from `dtype` inputs."""
    ref64 = ref64.double()
    torch_error = (torch_out.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    return FACTOR * torch_error + FLOOR_ULPS * torch.finfo(dtype).eps * max(scale, 1.0)


def assert_within_torch_error(kernel_out, torch_out, ref64, dtype: torch.dtype, what: str) -> float:
    """The error rule above; returns the bound."""
    assert kernel_out.shape == ref64.shape, f"{what}: shape {kernel_out.shape} != {ref64.shape}"
    bound = error_bound(torch_out, ref64, dtype)
    err = (kernel_out.double() - ref64.double()).abs()
    if not (err <= bound).all():  # NaN (poison) counts as out of bounds
        pos = _worst(err)
        torch_error = (torch_out.double() - ref64.double()).abs().max().item()
        raise AssertionError(
            f"{what}: kernel error {err[pos].item():.3g} at {pos} exceeds {bound:.3g} = {FACTOR} x PyTorch's own "
            f"{dtype} error {torch_error:.3g} + {FLOOR_ULPS} ulps of the output scale")
    return bound
