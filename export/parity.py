"""Parity of an exported graph with the engine's own PyTorch code: fresh random inputs at two batch
sizes (every axis inside its declared profile), max |diff| against a tolerance, run through ONNX
Runtime here and through TensorRT by export/tensorrt.py.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from engine.backends.onnxruntime import session_options
from export.spec import ExportError, ModuleSpec

# fp32: absolute, as the issue asks. fp16: relative to the output's scale (x max(1, max |ref|)).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
PARITY_BATCHES = (1, 6)


def cast(tensors: dict, precision: str) -> dict:
    dtype = torch.float16 if precision == "fp16" else torch.float32
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def parity_sizes(shapes: dict) -> list:
    """Two cases, at the two parity batch sizes, with the other axes varied too; every size kept
    inside its declared profile (TensorRT engines accept nothing else)."""
    small = {"batch": PARITY_BATCHES[0], "tokens": 5, "frames": 4, "videos": 7}
    large = {"batch": PARITY_BATCHES[1], "tokens": shapes["tokens"][2], "frames": 13, "videos": 13}
    return [{axis: max(shapes[axis][0], min(size, shapes[axis][2])) for axis, size in case.items()}
            for case in (small, large)]


def check_parity(spec: ModuleSpec, run: Callable, precision: str, sizes_list: list, seed: int = 1) -> dict:
    """Run `run(feeds) -> list of arrays` against the PyTorch reference on fresh random inputs;
    returns the figures, raises ExportError beyond the tolerance."""
    cases = []
    for i, sizes in enumerate(sizes_list):
        feeds = spec.sample(sizes, torch.Generator().manual_seed(seed * 1000 + i))
        with torch.no_grad():
            expected = [t.float().numpy() for t in spec.reference(**feeds)]
        got = run({k: v.numpy() for k, v in cast(feeds, precision).items()})
        diff = max(float(np.abs(g.astype(np.float64) - e).max()) for g, e in zip(got, expected, strict=True))
        scale = max(float(np.abs(e).max()) for e in expected)
        cases.append({"sizes": {k: sizes[k] for k in spec.axis_names()}, "max_abs_diff": diff, "max_abs_ref": scale})
    worst = max(cases, key=lambda c: c["max_abs_diff"])
    tolerance = TOLERANCE[precision] * (max(1.0, worst["max_abs_ref"]) if precision == "fp16" else 1.0)
    if not worst["max_abs_diff"] <= tolerance:  # also catches NaN
        raise ExportError(f"{spec.name}: {precision} output differs from PyTorch by {worst['max_abs_diff']:.3g} "
                          f"> {tolerance:.3g} at {worst['sizes']}")
    return {"tolerance": tolerance, "max_abs_diff": worst["max_abs_diff"], "cases": cases}


def ort_runner(path: str, outputs: list, threads: int = 1) -> Callable:
    import onnxruntime as ort

    session = ort.InferenceSession(path, sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return lambda feeds: session.run(outputs, {k: v for k, v in feeds.items() if k in names})


def ort_parity(spec: ModuleSpec, path: str, precision: str, shapes: dict) -> dict:
    try:
        run = ort_runner(path, list(spec.outputs))
        return check_parity(spec, run, precision, parity_sizes(shapes))
    except ExportError:
        raise
    except Exception as error:  # noqa: BLE001 - ORT's CPU provider lacks some fp16 kernels (GRU)
        if precision == "fp32":
            raise ExportError(f"{spec.name}: ONNX Runtime cannot run the exported graph "
                              f"({str(error).strip().splitlines()[0]})") from None
        return {"skipped": f"ONNX Runtime (CPU) cannot run it: {str(error).strip().splitlines()[0][:160]}"}
