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

Planning and the cache key are export/onnx_plan.py, exporting and checking one module's graph
export/onnx_module.py; this module loads a plan's modules and writes the export folder, and the
names of both are importable from here too.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from engine import files, paths
from engine.backends.onnxruntime import EXPORT_FORMAT, EXPORT_VERSION, MANIFEST
from engine.checkpoint import load_checkpoint
from engine.integrity import seal
from engine.outputs import claim
from export.graphs.generator_step import generator_step_spec
from export.graphs.glscl import (
    glscl_query_tower_spec,
    glscl_scorer_section,
    glscl_scorer_spec,
    glscl_video_tower_spec,
)
from export.graphs.query_tower import query_tower_spec
from export.graphs.scorer import scorer_spec
from export.graphs.text_encoder import text_encoder_spec
from export.graphs.video_tower import video_tower_spec
from export.graphs.vision import vision_spec
from export.onnx_module import TRACE_SIZES, export_module, export_one  # noqa: F401 (re-exported)
from export.onnx_plan import (  # noqa: F401 (re-exported: export.onnx is the public module)
    ANCHOR_MODULES,
    DEFAULT_OPSET,
    MODULES,
    PRECISIONS,
    SEARCH_MODULES,
    ExportOptions,
    ExportPlan,
    cache_key,
    file_intact,
    plan_export,
    reusable,
    vision_id,
)
from export.parity import PARITY_BATCHES
from export.spec import ExportError

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
        modules = {spec.name: export_one(spec, str(work), plan, options.module_cache, log) for spec in parts.specs}
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
