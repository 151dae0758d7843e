"""ONNX graphs -> TensorRT engines, with optimisation profiles, a timing cache and parity checks.

`cvr export --checkpoint CKPT --format tensorrt --out DIR [--precision fp16|fp32]` first makes
(or reuses) the ONNX export of export/onnx.py in DIR, with fp16 variants for fp16 engines:
TensorRT 10+ strongly typed networks (the only kind in TensorRT 11) take their precision from
the graph, so an fp16 engine is built from an fp16 ONNX file, never by a builder flag. Then, per
module, it builds an engine whose one optimisation profile spans the declared min/opt/max of every
dynamic axis (batch, tokens, frames, videos), reusing and updating a timing cache, and saves
`DIR/tensorrt-<precision>/<module>.plan` plus `engines.json` (profiles, versions, GPU, sha256,
parity). Each engine is then loaded and run against PyTorch on fresh random inputs at two batch
sizes, like the ONNX check (fp32 within 1e-4 with TF32 off; fp16 within 2% of the output scale).

The engines are cached like the ONNX files: by a hash of (ONNX export key, precision, TensorRT
version, GPU name and compute capability, workspace); nothing changed means nothing is rebuilt.

TensorRT is the optional extra `tensorrt`; without it (or without a CUDA GPU) the export stops at
once with one line saying so.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine import files, locks
from engine.backends.tensorrt import (
    ENGINES_FILE,
    ENGINES_FORMAT,
    TensorRTRunner,
    engines_folder,
    read_engines,
    tensorrt_unavailable,
)
from engine.files import sha256_file
from engine.integrity import seal
from export.onnx import (
    DEFAULT_OPSET,
    ExportOptions,
    ExportResult,
    cache_key,
    export_onnx,
    file_intact,
    load_parts,
    plan_export,
)
from export.parity import check_parity, parity_sizes
from export.spec import ExportError, ExportShapes

TIMING_CACHE = "timing.cache"


@dataclass
class TensorRTOptions:
    precision: str = "fp16"  # fp16 | fp32
    shapes: ExportShapes = field(default_factory=ExportShapes)
    workspace_gb: float = 4.0
    device: int = 0
    modules: tuple | None = None
    opset: int = DEFAULT_OPSET
    generator: str | None = None
    vision_weights: str | None = None
    module_cache: str | None = None
    force: bool = False  # rebuild the engines (not the ONNX files) even when the cache matches
    overwrite: bool = False  # replace an --out that holds something else than an export
    log: Callable | None = None

    def onnx_options(self) -> ExportOptions:
        return ExportOptions(precisions=(self.precision,), modules=self.modules, opset=self.opset, shapes=self.shapes,
                             generator=self.generator, vision_weights=self.vision_weights,
                             module_cache=self.module_cache, overwrite=self.overwrite, log=self.log)


def export_tensorrt(checkpoint: str, out: str, options: TensorRTOptions | None = None) -> ExportResult:
    """Build (or reuse) the TensorRT engines of a checkpoint in `out/tensorrt-<precision>/`."""
    options = options or TensorRTOptions()
    if options.precision not in ("fp16", "fp32"):
        raise ExportError(f"unknown precision {options.precision!r}: choose fp16 or fp32")
    reason = tensorrt_unavailable()
    if reason:
        raise ExportError(reason)  # before any ONNX work: nothing to do without TensorRT
    import tensorrt as trt
    import torch

    # The engines live inside the export folder, which `cvr export --force` swaps whole: one lock
    # (the export's) covers both, so neither writer swaps the other's work away.
    with locks.lock(out):
        return _export_tensorrt(trt, torch, checkpoint, out, options)


def _export_tensorrt(trt, torch, checkpoint: str, out: str, options: TensorRTOptions) -> ExportResult:
    log = options.log or (lambda line: None)
    onnx_result = export_onnx(checkpoint, out, options.onnx_options())
    manifest, folder = onnx_result.manifest, engines_folder(out, options.precision)
    device = {"name": torch.cuda.get_device_name(options.device),
              "capability": list(torch.cuda.get_device_capability(options.device))}
    plan = plan_export(checkpoint, options.onnx_options())
    names = [m for m in manifest["modules"] if m in plan.modules or m == "generator_text"]
    key = cache_key({"onnx": manifest["key"], "precision": options.precision, "tensorrt": trt.__version__,
                 "device": device, "workspace_gb": options.workspace_gb, "modules": names})
    existing = None if options.force else _reusable(folder, key)
    if existing is not None:
        log(f"reused {folder}: same ONNX export, precision, TensorRT and GPU (key {key[:12]})")
        return ExportResult(folder, existing, True)
    specs = {s.name: s for s in load_parts(plan).specs}
    with files.staged_folder(folder) as work:
        timing = _read_timing_cache(folder)
        modules = {}
        for name in names:
            entry = manifest["modules"][name]
            modules[name], timing = _build_one(trt, out, work, name, entry, specs[name], manifest, timing, options)
            log(_engine_line(name, options.precision, modules[name]))
        files.write_synced(os.path.join(work, TIMING_CACHE), timing)
        meta = {"format": ENGINES_FORMAT, "key": key, "onnx_key": manifest["key"], "precision": options.precision,
                "tensorrt": trt.__version__, "device": device["name"], "capability": device["capability"],
                "workspace_gb": options.workspace_gb, "shapes": manifest["shapes"], "timing_cache": TIMING_CACHE,
                "modules": modules}
        meta = seal(meta)
        files.write_synced(os.path.join(work, ENGINES_FILE), files.to_json(meta))
    log(f"wrote {folder} ({len(modules)} engines, key {key[:12]})")
    return ExportResult(folder, meta, False)


def _reusable(folder: str, key: str) -> dict | None:
    try:
        meta = read_engines(folder)
    except ValueError:
        return None
    if meta.get("key") != key:
        return None
    intact = all(file_intact(os.path.join(folder, e["file"]), e) for e in meta["modules"].values())
    return meta if intact else None


def _read_timing_cache(folder: str) -> bytes:
    """The previous build's timing cache (kernel timings per layer and GPU): later builds skip
    the measurements it holds. Empty when there is none."""
    path = os.path.join(folder, TIMING_CACHE)
    if not os.path.isfile(path):
        return b""
    with open(path, "rb") as handle:
        return handle.read()


def profile_shapes(inputs: dict, shapes: dict) -> dict:
    """input name -> (min, opt, max) concrete shapes from its template and the axis profiles."""
    out = {}
    for name, spec in inputs.items():
        out[name] = tuple(tuple(shapes[d][i] if isinstance(d, str) else int(d) for d in spec["shape"])
                          for i in range(3))
    return out


def build_engine(trt, onnx_path: str, profile: dict, timing: bytes, workspace_gb: float) -> tuple:
    """(serialized engine, updated timing cache) of one ONNX file; ExportError with the parser's
    or builder's first message when it fails."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # TensorRT 10 (11: always strongly typed)
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        first = parser.get_error(0).desc() if parser.num_errors else "unknown error"
        raise ExportError(f"{onnx_path}: TensorRT's ONNX parser refuses it ({first})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 engines must match PyTorch within 1e-4
    cache = config.create_timing_cache(timing)
    config.set_timing_cache(cache, ignore_mismatch=False)
    optimisation = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimisation.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimisation)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def _build_one(trt, out: str, work: str, name: str, entry: dict, spec, manifest: dict, timing: bytes,
               options: TensorRTOptions) -> tuple:
    onnx_path = os.path.join(out, entry["files"][options.precision]["file"])
    profile = profile_shapes(entry["inputs"], manifest["shapes"])
    clock = time.perf_counter()
    plan, timing = build_engine(trt, onnx_path, profile, timing, options.workspace_gb)
    seconds = round(time.perf_counter() - clock, 2)
    file = f"{name}.plan"
    files.write_synced(os.path.join(work, file), plan)
    runner = TensorRTRunner(plan, options.device)
    parity = check_parity(spec, lambda feeds: [runner.run(feeds)[n] for n in spec.outputs], options.precision,
                          parity_sizes(manifest["shapes"]))
    record = {"file": file, "sha256": sha256_file(os.path.join(work, file)), "bytes": len(plan),
              "onnx": entry["files"][options.precision]["file"], "build_seconds": seconds, "parity": parity,
              "profile": {k: [list(s) for s in v] for k, v in profile.items()}}
    return record, timing


def _engine_line(name: str, precision: str, record: dict) -> str:
    batches = ", ".join(str(c["sizes"].get("batch", "-")) for c in record["parity"]["cases"])
    return (f"{name} [TensorRT {precision}]: {record['bytes'] / 1e6:.1f} MB in {record['build_seconds']:.1f} s, "
            f"TensorRT vs PyTorch max |diff| {record['parity']['max_abs_diff']:.1e} at batch {batches}")
