"""What an ONNX export makes and its cache key: options, plan, reuse of an existing export (no model is loaded)."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from engine import fingerprints
from engine.backends.onnxruntime import EXPORT_VERSION, ExportedModelError, read_export_manifest
from engine.checkpoint import WEIGHTS, CheckpointError, anchor_generator, checkpoint_id, read_checkpoint_config
from engine.files import sha256_file
from export.spec import ExportError, ExportShapes

DEFAULT_OPSET = 18
PRECISIONS = ("fp32", "fp16")
MODULES = ("text_encoder", "generator_step", "vision", "query_tower", "video_tower", "scorer")
ANCHOR_MODULES = ("generator_step", "vision")  # (+ generator_text, which comes with generator_step)
# What a search needs (the gallery was indexed beforehand): the Retriever exports only these.
SEARCH_MODULES = ("text_encoder", "generator_step", "vision", "query_tower", "scorer")


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
