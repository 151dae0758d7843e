"""Checkpoints -> ONNX graphs, checked against PyTorch, with a cache keyed by what went in.

`cvr export --checkpoint CKPT --format onnx --out DIR` writes, per module, one ONNX file with
dynamic batch (and token / frame / video) axes, exported by `torch.onnx.export(..., dynamo=True)`:

| module         | inputs                                              | outputs                 |
|----------------|-----------------------------------------------------|-------------------------|
| text_encoder   | input_ids, attention_mask (batch, tokens) int64     | tokens, sentence        |
| query_tower    | sentence, tokens, token_mask (+ regions)            | lat (B,2,D), con (B,2,K)|
| video_tower    | frames (batch, frames, d), frame_mask               | lat, con                |
| scorer         | query_lat, query_con, video_lat, video_con          | scores (batch, videos)  |
| vision         | images (batch, 3, S, S) in [0, 1] (anchors only)    | regions (batch, R, 2048)|
| generator_step | latents, sigma, text_tokens, text_mask, pooled      | velocity (anchors only) |

(the generator's own text encoder is a seventh, `generator_text`, only when it is not the
retrieval model's frozen one). Each module is declared once in its own file under export/graphs/
(export/spec.py: input and output names, shape templates whose named axes are the dynamic ones, a
sample-input generator), as NVIDIA's TensorRT diffusion demo declares its models; `ExportShapes`
gives min/opt/max sizes of every named axis (also TensorRT's optimisation profiles). Every file is
checked with `onnx.checker`, then run in ONNX Runtime against PyTorch (the engine's own code, not
the export wrapper) on fresh random inputs at two batch sizes (export/parity.py); fp32 must agree
within 1e-4. `manifest.json` records names, axes, opset, sha256 of every file and the parity
figures.

Where the engine's code does not export as is, the wrapper computes the same thing differently,
and the parity check against the original proves it: packed-sequence GRUs become ONNX GRUs with
`sequence_lens` (export/graphs/gru.py), the fused score is scored untiled (the backend hands it
blocks of the gallery), and FLUX's float64 rotary table becomes a precomputed float32 one (TensorRT
has no float64).

The cache: the key is a hash of (checkpoint id, generator id, vision weights id, opset, declared
shapes, export code version, precisions); an existing folder whose manifest has that key and
whose files match their sha256 is reused. Writes go to a temporary sibling folder, renamed into
place (engine.files.staged_folder).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine import files, fingerprints, paths
from engine.backends.onnxruntime import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    MANIFEST,
    ExportedModelError,
    read_export_manifest,
)
from engine.checkpoint import (
    WEIGHTS,
    CheckpointError,
    anchor_generator,
    checkpoint_id,
    load_checkpoint,
    read_checkpoint_config,
)
from engine.files import sha256_file
from engine.integrity import seal
from engine.outputs import claim
from export.graphs.generator_step import generator_step_spec
from export.graphs.glscl import (
    glscl_query_tower_spec,
    glscl_scorer_section,
    glscl_scorer_spec,
    glscl_video_tower_spec,
)
from export.graphs.gru import TRANSLATIONS
from export.graphs.query_tower import query_tower_spec
from export.graphs.scorer import scorer_spec
from export.graphs.text_encoder import text_encoder_spec
from export.graphs.video_tower import video_tower_spec
from export.graphs.vision import vision_spec
from export.parity import PARITY_BATCHES, cast, ort_parity
from export.spec import ExportError, ExportShapes, ModuleSpec

DEFAULT_OPSET = 18
PRECISIONS = ("fp32", "fp16")
MODULES = ("text_encoder", "generator_step", "vision", "query_tower", "video_tower", "scorer")
ANCHOR_MODULES = ("generator_step", "vision")  # (+ generator_text, which comes with generator_step)
# What a search needs (the gallery was indexed beforehand): the Retriever exports only these.
SEARCH_MODULES = ("text_encoder", "generator_step", "vision", "query_tower", "scorer")
# Sizes of the dynamic axes while tracing: pairwise different, so the exporter never takes two
# axes for one (it shares a symbol between equal sizes), and none, nor any size derived from one
# (the video tower's stride-2 conv halves frames), is 0 or 1: those are specialised, silently.
TRACE_SIZES = {"batch": 3, "tokens": 6, "frames": 5, "videos": 7}


# ---------------------------------------------------------------------------------------------
# Planning: what is exported, and its cache key (no model is loaded for this)


@dataclass
class ExportOptions:
    """What `export_onnx` makes. fp32 is always exported (ONNX Runtime runs it, and it is the
    reference); "fp16" in `precisions` adds fp16 variants (`<module>.fp16.onnx`) for TensorRT."""

    precisions: tuple = ("fp32",)
    modules: tuple | None = None  # None: all of MODULES (those without anchors are left out)
    opset: int = DEFAULT_OPSET
    shapes: ExportShapes = field(default_factory=ExportShapes)
    generator: str | None = None  # None: the generator recorded in the checkpoint (anchors only)
    vision_weights: str | None = None  # as engine.vision.VisionConfig.weights (None: built-in)
    # A folder of graphs shared between exports: the frozen text encoder, the ResNet and the
    # generator step do not change with the checkpoint, and are the slow ones to export.
    module_cache: str | None = None
    force: bool = False  # export again even when the cached files match
    overwrite: bool = False  # replace an --out that holds something else than an export
    log: Callable | None = None  # called with one line per step (the CLI passes print)


@dataclass
class ExportPlan:
    checkpoint: str
    checkpoint_id: str
    config: dict
    precisions: tuple
    modules: tuple
    opset: int
    shapes: dict
    anchors: dict | None  # generator path/id/config, vision weights/id/size (checkpoints with anchors)
    base_key: str = ""
    key: str = ""


def plan_export(checkpoint: str, options: ExportOptions) -> ExportPlan:
    """Read the checkpoint's config and ids and compute the cache key; one-line errors for a
    foreign folder, a missing weights file or a missing generator."""
    config = read_checkpoint_config(checkpoint)
    if not os.path.isfile(os.path.join(checkpoint, WEIGHTS)):
        raise CheckpointError(f"{checkpoint}: no {WEIGHTS}")
    unknown = set(options.precisions) - set(PRECISIONS)
    if unknown:
        raise ExportError(f"unknown precision {sorted(unknown)[0]!r}: choose fp32 or fp16")
    precisions = tuple(sorted({"fp32", *options.precisions}, key=PRECISIONS.index))
    if not 17 <= int(options.opset) <= 23:
        raise ExportError(f"opset must be between 17 and 23, got {options.opset}")
    use_anchor = bool(config.get("model", {}).get("use_anchor"))
    anchors = _plan_anchors(checkpoint, config, options) if use_anchor else None
    modules = _plan_modules(options.modules, use_anchor)
    if anchors and anchors["features"] == "latent":  # the query tower reads the latent: no ResNet graph
        modules = tuple(m for m in modules if m != "vision")
    max_tokens = int(config.get("text_encoder", {}).get("max_length", 32))
    if anchors:
        max_tokens = max(max_tokens, int(anchors["generator_config"]["text_max_length"]))
    plan = ExportPlan(os.path.abspath(checkpoint), checkpoint_id(checkpoint), config, precisions, modules,
                      int(options.opset), options.shapes.resolved(max_tokens), anchors)
    base = {"code_version": EXPORT_VERSION, "checkpoint": plan.checkpoint_id, "opset": plan.opset,
            "shapes": plan.shapes,
            "anchors": {k: anchors[k] for k in ("generator_id", "vision_id", "image_size")} if anchors else None}
    if anchors and anchors["features"] == "latent":  # pixel exports keep the key they always had
        base["anchors"]["features"] = "latent"
    plan.base_key = cache_key(base)
    plan.key = cache_key({"base": plan.base_key, "precisions": list(precisions), "modules": list(modules)})
    return plan


def _plan_modules(requested, use_anchor: bool) -> tuple:
    available = [m for m in MODULES if use_anchor or m not in ANCHOR_MODULES]
    if requested is None:
        return tuple(available)
    unknown = sorted(set(requested) - set(MODULES))
    if unknown:
        raise ExportError(f"unknown module {unknown[0]!r}: choose from {', '.join(MODULES)}")
    if "generator_step" in requested:  # the generator's prompts go through a text encoder too
        requested = {*requested, "text_encoder"}
    return tuple(m for m in available if m in requested)


def _plan_anchors(checkpoint: str, config: dict, options: ExportOptions) -> dict:
    from engine.anchor_store import anchor_features
    from engine.anchors import generator_id, generator_kind, read_builtin_config

    meta = config.get("anchors") or {}
    folder = anchor_generator(checkpoint, config, options.generator)
    if generator_kind(folder) != "builtin":
        raise ExportError(f"{folder}: only the built-in generator exports (a FLUX.1 pipeline folder has T5, CLIP "
                          "and a VAE besides the transformer)")
    gen_config, _ = read_builtin_config(folder)
    image_size = int(meta.get("image_size", gen_config.image_size))
    return {"generator": os.path.abspath(folder), "generator_id": generator_id(folder),
            "generator_config": gen_config.to_dict(), "vision_weights": options.vision_weights,
            "vision_id": vision_id(options.vision_weights), "image_size": image_size,
            "regions": meta.get("regions"), "anchors_per_query": int(meta.get("anchors_per_query", 1)),
            "features": anchor_features(meta)}


def vision_id(weights: str | None) -> str:
    """engine.fingerprints.vision_id, with ExportError for missing weights."""
    try:
        return fingerprints.vision_id(weights)
    except ValueError as error:
        raise ExportError(str(error)) from None


def cache_key(value) -> str:
    """sha256 of a JSON-able value (sorted keys): the cache keys of exports and engines."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()




def reusable(out: str, plan: ExportPlan) -> dict | None:
    """The manifest of `out` when it already holds this export (same base key, every requested
    precision, every file intact); else None."""
    try:
        manifest = read_export_manifest(out)
    except ExportedModelError:
        return None
    if manifest.get("base_key") != plan.base_key or not set(plan.precisions) <= set(manifest.get("precisions", [])):
        return None
    if not set(plan.modules) <= set(manifest["modules"]):
        return None
    for module in manifest["modules"].values():
        for entry in module["files"].values():
            if not file_intact(os.path.join(out, entry["file"]), entry):
                return None
    return manifest


def file_intact(path: str, entry: dict) -> bool:
    """Whether `path` still has the size and sha256 its manifest entry records."""
    return os.path.isfile(path) and os.path.getsize(path) == entry["bytes"] and sha256_file(path) == entry["sha256"]


# ---------------------------------------------------------------------------------------------
# Loading what is exported


@dataclass
class ExportParts:
    """The loaded modules of a plan, and the tokenizer files that go beside them."""

    specs: list
    text: dict  # the manifest's "text" section
    files: dict  # extra file name -> text content (tokenizers)
    anchors: dict | None = None  # the manifest's "anchors" section
    scorer: dict = field(default_factory=dict)


def load_parts(plan: ExportPlan) -> ExportParts:
    """Load the checkpoint (CheckpointError, one line, for damaged weights) and whatever the
    anchors need, and declare every module."""
    model = load_checkpoint(plan.checkpoint)
    text, extra_files = tokenizer_section(model.text, "tokenizer", "text_encoder")
    regions = None
    specs = [text_encoder_spec(model.text)]
    anchors = None
    if plan.anchors:
        anchor_specs, anchors, anchor_files = _anchor_parts(plan.anchors, model, text, plan.modules)
        specs += anchor_specs
        extra_files.update(anchor_files)
        # N anchors per query: the query tower reads their grids side by side (N*R regions)
        regions = _regions_per_anchor(anchors) * plan.anchors["anchors_per_query"]
    if model.config.head == "glscl":  # its own graphs (export/graphs/glscl.py); text-only, so no anchors
        specs += [glscl_query_tower_spec(model), glscl_video_tower_spec(model), glscl_scorer_spec(model)]
        scorer = glscl_scorer_section(model)
    else:
        specs += [query_tower_spec(model, regions), video_tower_spec(model), scorer_spec(model)]
        scorer = {"order": ["lat_g", "lat_l", "con_g", "con_l"], "norm": model.matcher.norm.tolist(),
                  "weights": list(model.matcher.weights), "local_branch": model.matcher.local_branch}
    wanted = {*plan.modules, *(["generator_text"] if "generator_step" in plan.modules else [])}
    return ExportParts([spec for spec in specs if spec.name in wanted], text, extra_files, anchors, scorer)


def tokenizer_section(encoder, stem: str, module: str) -> tuple:
    info = encoder.describe()
    if info["kind"] == "rivrl":
        name = f"{stem}_vocabulary.json"
        return ({"kind": "rivrl", "file": name, "max_length": encoder.max_length, "module": module},
                {name: json.dumps(encoder.vocab.to_json())})
    tokenizer, name = encoder.tokenizer, f"{stem}.json"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{info.get('model_id')}: the tokenizer has no fast (tokenizers) version to export")
    return ({"kind": "hf", "file": name, "max_length": encoder.max_length, "pad_id": int(tokenizer.pad_token_id),
             "padding_side": tokenizer.padding_side, "module": module}, {name: backend.to_str()})


def _regions_per_anchor(section: dict) -> int:
    """Regions of one anchor in an export's anchors section: the ResNet grid's, or (latent
    features) the generator's latent tokens."""
    if section.get("features") == "latent":
        return int(section["latent"]["regions"])
    return int(section["vision"]["regions"])


def _anchor_parts(plan_anchors: dict, model, text_section: dict, modules: tuple) -> tuple:
    from engine.anchors import BuiltinConfig, load_builtin_transformer
    from engine.text import MiniLMEncoder
    from engine.vision import RegionExtractor, VisionConfig

    gen_config = BuiltinConfig.from_dict(plan_anchors["generator_config"])
    vision_config = VisionConfig(image_size=plan_anchors["image_size"], weights=plan_anchors["vision_weights"])
    latent = plan_anchors["features"] == "latent"
    regions = gen_config.image_tokens if latent else (-(-vision_config.image_size // 32)) ** 2  # grid_size()^2
    if latent and plan_anchors.get("regions") not in (None, regions):
        raise ExportError(f"the checkpoint's anchors have {plan_anchors['regions']} latent tokens, but the "
                          f"generator gives {regions}")
    if plan_anchors.get("regions") not in (None, regions):
        raise ExportError(f"the checkpoint's anchors have {plan_anchors['regions']} regions, but the ResNet at "
                          f"{plan_anchors['image_size']} px gives {regions}")
    specs, extra_files = [], {}
    if "generator_step" in modules:
        transformer = load_builtin_transformer(plan_anchors["generator"]).eval()
        specs.append(generator_step_spec(transformer, gen_config, plan_anchors["generator_id"]))
    if "vision" in modules:
        extractor = RegionExtractor.from_config(vision_config)
        specs.append(vision_spec(extractor, gen_config.image_size, plan_anchors["vision_id"]))
    # The generator's text encoder is the retrieval model's when both are the same frozen MiniLM:
    # one graph then serves both (only the tokenizer's max_length differs).
    info = model.text.describe()
    wanted = gen_config.text_encoder and os.path.abspath(os.path.expanduser(gen_config.text_encoder))
    if info["kind"] == "minilm" and not info["finetune"] and info["path"] == wanted:
        gen_text = dict(text_section, max_length=gen_config.text_max_length)
    else:
        encoder = MiniLMEncoder(gen_config.text_encoder, max_length=gen_config.text_max_length)
        gen_text, extra_files = tokenizer_section(encoder, "generator_tokenizer", "generator_text")
        specs.append(text_encoder_spec(encoder, "generator_text"))
    generator = {"path": plan_anchors["generator"], "id": plan_anchors["generator_id"], "adapter_id": "none",
                 "default_steps": gen_config.default_steps, "image_size": gen_config.image_size,
                 "fold": gen_config.fold, "latent_channels": gen_config.latent_channels,
                 "latent_size": gen_config.latent_size, "module": "generator_step"}
    vision = {"module": "vision", "image_size": plan_anchors["image_size"], "regions": regions,
              "weights": plan_anchors["vision_weights"] or "builtin", "id": plan_anchors["vision_id"]}
    section = {"generator": generator, "generator_text": gen_text, "vision": vision}
    if latent:  # no vision graph: the regions are the sampler's final latent tokens (L, C)
        section = {"generator": generator, "generator_text": gen_text, "features": "latent",
                   "latent": {"regions": regions, "dim": gen_config.in_channels}}
    if plan_anchors["anchors_per_query"] > 1:  # absent for one: such a manifest is written as before
        section["anchors_per_query"] = plan_anchors["anchors_per_query"]
    return specs, section, extra_files


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


def _export_one(spec: ModuleSpec, work: str, plan: ExportPlan, cache: str | None, log: Callable) -> dict:
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


# ---------------------------------------------------------------------------------------------
# The entry point


@dataclass
class ExportResult:
    folder: str
    manifest: dict
    reused: bool


def export_onnx(checkpoint: str, out: str, options: ExportOptions | None = None) -> ExportResult:
    """Export a checkpoint's modules into `out` (or reuse what is there when nothing changed)."""
    options = options or ExportOptions()
    log = options.log or (lambda line: None)
    plan = plan_export(checkpoint, options)
    existing = None if options.force else reusable(out, plan)
    if existing is not None:
        log(f"reused {out}: same checkpoint, generator, shapes and export code (key {plan.key[:12]})")
        return ExportResult(out, existing, True)
    claim(out, "export", "cvr export", options.overwrite)  # never replace a folder that is not an export
    parts = load_parts(plan)
    with files.staged_folder(out) as work:
        modules = {spec.name: _export_one(spec, str(work), plan, options.module_cache, log) for spec in parts.specs}
        written = {}
        for name, text in parts.files.items():
            written[name] = files.sha256_file(files.write_synced(os.path.join(work, name), text))
        manifest = _manifest(plan, parts, modules, out, written)
        files.write_synced(os.path.join(work, MANIFEST), files.to_json(manifest))  # last: it vouches for the rest
    log(f"wrote {out} ({len(modules)} modules, key {plan.key[:12]})")
    return ExportResult(out, manifest, False)


def _manifest(plan: ExportPlan, parts: ExportParts, modules: dict, out: str, written: dict) -> dict:
    """The export's manifest; the checkpoint and generator are recorded relative to `out`, and
    `written` holds the sha256 of the tokenizer files beside the graphs."""
    import onnx
    import onnxruntime

    anchors = parts.anchors
    if anchors:
        anchors = dict(anchors, generator=dict(anchors["generator"],
                                               path=paths.reference(anchors["generator"]["path"], out)))
        if "vision" in anchors:
            anchors["vision"] = dict(anchors["vision"], weights=paths.weights_reference(anchors["vision"]["weights"],
                                                                                         out))
    return seal({
        "format": EXPORT_FORMAT, "code_version": EXPORT_VERSION, "key": plan.key, "base_key": plan.base_key,
        "precisions": list(plan.precisions), "opset": plan.opset, "shapes": plan.shapes,
        "checkpoint": {"path": paths.reference(plan.checkpoint, out), "id": plan.checkpoint_id},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "text": parts.text, "anchors": anchors, "scorer": parts.scorer, "modules": modules,
        "parity_batches": list(PARITY_BATCHES),
        "files": written,
    })  # sealed: loading checks it and every file it names
