"""Exporting one module's ONNX graph: dynamo trace, named axes, onnx.checker, parity run and the shared module cache."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable

import torch

from engine import files
from engine.backends.onnxruntime import EXPORT_VERSION
from engine.files import sha256_file
from export.graphs.gru import TRANSLATIONS
from export.onnx_plan import ExportPlan, cache_key
from export.parity import cast, ort_parity
from export.spec import ExportError, ModuleSpec

# Sizes of the dynamic axes while tracing: pairwise different, so the exporter never takes two
# axes for one (it shares a symbol between equal sizes), and none, nor any size derived from one
# (the video tower's stride-2 conv halves frames), is 0 or 1: those are specialised, silently.
TRACE_SIZES = {"batch": 3, "tokens": 6, "frames": 5, "videos": 7}


# ---------------------------------------------------------------------------------------------
# Export, check, parity


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress lines, warnings and (here) 'torchvision is not
    installed' log lines; a CLI wants one line per module instead."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "torch._subclasses", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_module(spec: ModuleSpec, path: str, opset: int, precision: str = "fp32") -> None:
    """Trace the wrapper with dynamo, name the dynamic axes, save one self-contained file, and
    check it with onnx.checker."""
    import onnx

    wrapper = spec.wrapper if precision == "fp32" else copy.deepcopy(spec.wrapper).half()
    sample = cast(spec.sample(TRACE_SIZES, torch.Generator().manual_seed(0)), precision)
    dims = {name: torch.export.Dim(name) for name in spec.axis_names()}
    dynamic = {name: {i: dims[a] for i, a in io_spec.axes().items()} for name, io_spec in spec.inputs.items()}
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(wrapper, tuple(sample.values()), dynamo=True, dynamic_shapes=dynamic,
                                        output_names=list(spec.outputs), opset_version=opset, verbose=False,
                                        custom_translation_table=TRANSLATIONS)
            program.save(path, external_data=False)
    except Exception as error:  # noqa: BLE001 - the exporter raises many types; one line says which module
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportError(f"{spec.name}: ONNX export failed ({type(error).__name__}: {first})") from None
    model = onnx.load(path)
    _name_output_axes(model, spec)
    onnx.save(model, path)
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"{spec.name}: onnx.checker rejects the graph ({str(error).splitlines()[0]})") from None


def _name_output_axes(model, spec: ModuleSpec) -> None:
    """The exporter sometimes records a traced size for a dynamic output axis (the GRU's); name
    the declared axes so the file describes itself and ONNX Runtime does not warn each run."""
    declared = {**spec.inputs, **spec.outputs}
    for value in [*model.graph.input, *model.graph.output]:
        io_spec = declared.get(value.name)
        if io_spec is None:
            continue
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            axis = io_spec.shape[i]
            if isinstance(axis, str):
                dim.dim_param = axis
    del model.graph.value_info[:]  # intermediate shapes traced at one size: ONNX Runtime re-infers them


def export_one(spec: ModuleSpec, work: str, plan: ExportPlan, cache: str | None, log: Callable) -> dict:
    entry = {**spec.describe(), "files": {}, "parity": {}, "export_seconds": {}}
    for precision in plan.precisions:
        name = f"{spec.name}.onnx" if precision == "fp32" else f"{spec.name}.{precision}.onnx"
        path = os.path.join(work, name)
        clock = time.perf_counter()
        cached = _module_cache_path(cache, spec, plan, precision)
        from_cache = bool(cached) and _copy_cached(cached, path)
        if not from_cache:
            export_module(spec, path, plan.opset, precision)
        entry["export_seconds"][precision] = round(time.perf_counter() - clock, 2)
        entry["files"][precision] = {"file": name, "sha256": sha256_file(path), "bytes": os.path.getsize(path)}
        # The parity check runs on every file, a cached one included: it is cheap and proves the
        # graph is the one these weights give.
        entry["parity"][precision] = ort_parity(spec, path, precision, plan.shapes)
        if cached and not from_cache:
            _store_cached(path, cached, entry["files"][precision])
        log(_module_line(spec.name, precision, entry) + (" (from the module cache)" if from_cache else ""))
    return entry


def _module_cache_path(cache: str | None, spec: ModuleSpec, plan: ExportPlan, precision: str) -> str | None:
    if not cache or spec.share is None:
        return None
    key = cache_key({**spec.share, "name": spec.name, "code_version": EXPORT_VERSION, "opset": plan.opset,
                 "precision": precision, "inputs": spec.describe()})
    return os.path.join(cache, f"{spec.name}-{key[:24]}.onnx")


def _copy_cached(cached: str, path: str) -> bool:
    """Copy a cached graph whose sha256 matches its sidecar; False (export it) otherwise."""
    try:
        with open(cached + ".json", encoding="utf-8") as handle:
            expected = json.load(handle)["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not os.path.isfile(cached) or sha256_file(cached) != expected:
        return False
    shutil.copyfile(cached, path)
    return True


def _store_cached(path: str, cached: str, entry: dict) -> None:
    files.copy_atomic(path, cached)
    files.write_json(cached + ".json", entry)  # the sidecar last: it vouches for the graph


def _module_line(name: str, precision: str, entry: dict) -> str:
    parity, megabytes = entry["parity"][precision], entry["files"][precision]["bytes"] / 1e6
    check = ("parity not run (" + parity["skipped"] + ")" if "skipped" in parity else
             f"ONNX Runtime vs PyTorch max |diff| {parity['max_abs_diff']:.1e} at batch "
             + ", ".join(str(c["sizes"].get("batch", "-")) for c in parity["cases"]))
    return f"{name} [{precision}]: {megabytes:.1f} MB in {entry['export_seconds'][precision]:.1f} s, {check}"
