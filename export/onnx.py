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
retrieval model's frozen one). Each module is declared once, as NVIDIA's TensorRT diffusion demo
declares its models: input and output names, shape templates whose named axes are the dynamic
ones, a sample-input generator, and min/opt/max sizes of every named axis (`ExportShapes`, also
TensorRT's optimisation profiles). Every file is checked with `onnx.checker`, then run in ONNX
Runtime against PyTorch (the engine's own code, not the export wrapper) on fresh random inputs at
two batch sizes; fp32 must agree within 1e-4. `manifest.json` records names, axes, opset, sha256
of every file and the parity figures.

Where the engine's code does not export as is, the wrapper computes the same thing differently,
and the parity check against the original proves it: packed-sequence GRUs become ONNX GRUs with
`sequence_lens` (`MaskedBiGRU`), the Jaccard passes are unchunked, and FLUX's float64 rotary
table becomes a precomputed float32 one (TensorRT has no float64).

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

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from engine import files, fingerprints, paths
from engine.backends.onnxruntime import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    MANIFEST,
    ExportedModelError,
    read_export_manifest,
    session_options,
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
from kernels import reference

DEFAULT_OPSET = 18
PRECISIONS = ("fp32", "fp16")
MODULES = ("text_encoder", "generator_step", "vision", "query_tower", "video_tower", "scorer")
ANCHOR_MODULES = ("generator_step", "vision")  # (+ generator_text, which comes with generator_step)
# What a search needs (the gallery was indexed beforehand): the Retriever exports only these.
SEARCH_MODULES = ("text_encoder", "generator_step", "vision", "query_tower", "scorer")
# fp32: absolute, as the issue asks. fp16: relative to the output's scale (x max(1, max |ref|)).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
PARITY_BATCHES = (1, 6)
# Sizes of the dynamic axes while tracing: pairwise different, so the exporter never takes two
# axes for one (it shares a symbol between equal sizes), and none, nor any size derived from one
# (the video tower's stride-2 conv halves frames), is 0 or 1: those are specialised, silently.
TRACE_SIZES = {"batch": 3, "tokens": 6, "frames": 5, "videos": 7}


class ExportError(ValueError):
    """An export that cannot be made (one-line message)."""


# ---------------------------------------------------------------------------------------------
# Declarations


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


# ---------------------------------------------------------------------------------------------
# Export wrappers


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


class MiniLMGraph(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        features = self.encoder.encode_ids(input_ids, attention_mask)
        return features.tokens, features.sentence


class RivrlGraph(nn.Module):
    """RivrlTextEncoder.encode_ids, exportable: MaskedBiGRU for the packed GRU, and a fixed right
    padding of the CNN input (zeros, as the conv's own padding) instead of a length-dependent one."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.gru = MaskedBiGRU(encoder.rnn)

    def forward(self, input_ids, attention_mask):
        enc, mask = self.encoder, attention_mask.bool()
        lengths = mask.sum(1)
        states = self.gru(enc.embed(input_ids), mask)
        gru_mean = states.sum(1) / lengths.clamp_min(1).unsqueeze(-1).to(states.dtype)
        sentence = torch.cat([gru_mean, self._cnn(states, lengths), enc.bag_of_words(input_ids, mask)], 1)
        return states, sentence

    def _cnn(self, states, lengths):
        x, pooled = states.transpose(1, 2), []
        for k, conv in zip(self.encoder.kernel_sizes, self.encoder.convs, strict=True):
            pad = conv.padding[0]
            valid = (lengths + 2 * pad - k + 1).clamp_min(1)
            extra = max(0, k - 2 * pad - 1)  # enough for one output even from a single position
            y = F.relu(conv(F.pad(x, (0, extra)) if extra else x))
            position = torch.arange(y.shape[2], device=y.device)
            y = y.masked_fill(position[None, None, :] >= valid[:, None, None], float("-inf"))
            pooled.append(y.amax(dim=2))
        return torch.cat(pooled, dim=1)


class QueryTowerGraph(nn.Module):
    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, sentence, tokens, token_mask):
        emb = self.tower(sentence, tokens, token_mask)
        return emb.lat, emb.con


class AnchoredQueryTowerGraph(QueryTowerGraph):
    def forward(self, sentence, tokens, token_mask, regions):
        emb = self.tower(sentence, tokens, token_mask, regions)
        return emb.lat, emb.con


class VideoTowerGraph(nn.Module):
    """engine.model.VideoTower.forward with MaskedBiGRU for run_gru (same weights)."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower
        self.gru = MaskedBiGRU(tower.gru)

    def forward(self, frames, frame_mask):
        mask = frame_mask.bool()
        emb = self.tower.from_gru_states(frames, mask, self.gru(frames, mask))
        return emb.lat, emb.con


class ScorerGraph(nn.Module):
    """engine.model.Matcher with frozen constants (stored in the graph), non-transductive."""

    def __init__(self, matcher):
        super().__init__()
        self.register_buffer("norm", matcher.norm.detach().clone())
        self.weights, self.local_branch = matcher.weights, matcher.local_branch

    def forward(self, query_lat, query_con, video_lat, video_con):
        # The one definition, untiled: the backend hands the graph blocks of the gallery.
        return reference.fused_score(query_lat, query_con, video_lat, video_con, self.norm, self.weights,
                                     self.local_branch)


class VisionGraph(nn.Module):
    """engine.vision.RegionExtractor.regions on float images in [0, 1]: resize, ImageNet
    normalisation, ResNet-50, region grid (B, h*w, 2048)."""

    def __init__(self, extractor):
        super().__init__()
        self.model = extractor.model
        self.size = extractor.config.image_size
        self.register_buffer("mean", extractor.mean.detach().clone().cpu())
        self.register_buffer("std", extractor.std.detach().clone().cpu())

    def forward(self, images):
        if images.shape[-1] != self.size:  # the anchor size is fixed, so this is decided at export
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        grid = self.model(pixel_values=(images - self.mean) / self.std).last_hidden_state
        return grid.flatten(2).transpose(1, 2)


class FixedRope(nn.Module):
    """FluxPosEmbed for flux_velocity's ids: text ids are all zero (angle 0: cos 1, sin 0) and the
    image ids are fixed, so the table is computed once by diffusers' own float64 code and stored in
    float32; the graph then has no float64 (TensorRT has none) and is exactly as eager."""

    def __init__(self, pos_embed: nn.Module, img_ids: torch.Tensor):
        super().__init__()
        cos, sin = pos_embed(img_ids)
        self.register_buffer("cos", cos.float())
        self.register_buffer("sin", sin.float())
        self.image_tokens = int(img_ids.shape[0])

    def forward(self, ids):
        text = ids.shape[0] - self.image_tokens
        width = self.cos.shape[1]
        return (torch.cat([self.cos.new_ones(text, width), self.cos]),
                torch.cat([self.sin.new_zeros(text, width), self.sin]))


class FluxStepGraph(nn.Module):
    """One denoising step: engine.anchors.flux_velocity on the built-in FLUX transformer."""

    def __init__(self, transformer, config):
        super().__init__()
        from engine.anchors import image_ids

        self.register_buffer("img_ids", image_ids(config.latent_size, config.latent_size))
        self.transformer = copy.deepcopy(transformer).eval()
        self.transformer.pos_embed = FixedRope(transformer.pos_embed, self.img_ids)

    def forward(self, latents, sigma, text_tokens, text_mask, pooled):
        from engine.anchors import Conditioning, flux_velocity

        cond = Conditioning(text_tokens, text_mask.bool(), pooled)
        return flux_velocity(self.transformer, latents, sigma, cond, self.img_ids)


# ---------------------------------------------------------------------------------------------
# Module specs


def text_encoder_spec(encoder, name: str = "text_encoder") -> ModuleSpec:
    kind = encoder.describe()["kind"]
    high = len(encoder.vocab) if kind == "rivrl" else int(encoder.model.config.vocab_size)
    wrapper = RivrlGraph(encoder) if kind == "rivrl" else MiniLMGraph(encoder)

    def reference(input_ids, attention_mask):
        features = encoder.encode_ids(input_ids, attention_mask)
        return features.tokens, features.sentence

    frozen = not any(p.requires_grad for p in encoder.parameters())
    share = {"module": "text", "kind": kind, "model_id": encoder.describe()["model_id"]} if frozen else None
    return ModuleSpec(name, wrapper.eval(), reference,
                      {"input_ids": IOSpec(("batch", "tokens"), "int64", "ids", high),
                       "attention_mask": IOSpec(("batch", "tokens"), "int64", "mask")},
                      {"tokens": IOSpec(("batch", "tokens", encoder.dim_tokens)),
                       "sentence": IOSpec(("batch", encoder.dim_sentence))}, share)


def query_tower_spec(model, regions: int | None) -> ModuleSpec:
    config, text = model.config, model.text
    inputs = {"sentence": IOSpec(("batch", text.dim_sentence)),
              "tokens": IOSpec(("batch", "tokens", text.dim_tokens)),
              "token_mask": IOSpec(("batch", "tokens"), "int64", "mask")}
    if config.use_anchor:
        inputs["regions"] = IOSpec(("batch", regions, config.region_dim))
    wrapper = AnchoredQueryTowerGraph(model.query) if config.use_anchor else QueryTowerGraph(model.query)

    def reference(sentence, tokens, token_mask, regions=None):
        emb = model.query(sentence, tokens, token_mask, regions)
        return emb.lat, emb.con

    return ModuleSpec("query_tower", wrapper.eval(), reference, inputs, _embedding_outputs(config, "batch"))


def video_tower_spec(model) -> ModuleSpec:
    config = model.config

    def reference(frames, frame_mask):
        emb = model.video(frames, frame_mask)
        return emb.lat, emb.con

    return ModuleSpec("video_tower", VideoTowerGraph(model.video).eval(), reference,
                      {"frames": IOSpec(("batch", "frames", config.frame_dim)),
                       "frame_mask": IOSpec(("batch", "frames"), "int64", "mask")},
                      _embedding_outputs(config, "batch"))


def scorer_spec(model) -> ModuleSpec:
    from engine.model import Embeddings

    config = model.config

    def reference(query_lat, query_con, video_lat, video_con):
        return (model.matcher(Embeddings(query_lat, query_con), Embeddings(video_lat, video_con)),)

    d, k = config.latent_dim, config.concept_dim
    return ModuleSpec("scorer", ScorerGraph(model.matcher).eval(), reference,
                      {"query_lat": IOSpec(("batch", 2, d), kind="unit"),
                       "query_con": IOSpec(("batch", 2, k), kind="prob"),
                       "video_lat": IOSpec(("videos", 2, d), kind="unit"),
                       "video_con": IOSpec(("videos", 2, k), kind="prob")},
                      {"scores": IOSpec(("batch", "videos"))})


def vision_spec(extractor, anchor_size: int, weights_id: str | None = None) -> ModuleSpec:
    regions = extractor.grid_size() ** 2

    def reference(images):
        return (extractor.regions(images),)

    return ModuleSpec("vision", VisionGraph(extractor).eval(), reference,
                      {"images": IOSpec(("batch", 3, anchor_size, anchor_size), kind="uniform")},
                      {"regions": IOSpec(("batch", regions, extractor.feature_dim))},
                      {"module": "vision", "id": weights_id, "image_size": extractor.config.image_size,
                       "anchor_size": anchor_size} if weights_id else None)


def generator_step_spec(transformer, config, generator_id: str | None = None) -> ModuleSpec:
    from engine.anchors import Conditioning, flux_velocity, image_ids

    ids = image_ids(config.latent_size, config.latent_size)

    def reference(latents, sigma, text_tokens, text_mask, pooled):
        cond = Conditioning(text_tokens, text_mask.bool(), pooled)
        return (flux_velocity(transformer, latents, sigma, cond, ids),)

    tokens, channels = config.image_tokens, config.in_channels
    return ModuleSpec("generator_step", FluxStepGraph(transformer, config).eval(), reference,
                      {"latents": IOSpec(("batch", tokens, channels)), "sigma": IOSpec(("batch",), kind="sigma"),
                       "text_tokens": IOSpec(("batch", "tokens", config.joint_attention_dim)),
                       "text_mask": IOSpec(("batch", "tokens"), "int64", "mask"),
                       "pooled": IOSpec(("batch", config.pooled_projection_dim))},
                      {"velocity": IOSpec(("batch", tokens, channels))},
                      {"module": "generator_step", "id": generator_id} if generator_id else None)


def _embedding_outputs(config, axis: str) -> dict:
    return {"lat": IOSpec((axis, 2, config.latent_dim)), "con": IOSpec((axis, 2, config.concept_dim))}


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
    modules = _plan_modules(options.modules, use_anchor)
    anchors = _plan_anchors(checkpoint, config, options) if use_anchor else None
    max_tokens = int(config.get("text_encoder", {}).get("max_length", 32))
    if anchors:
        max_tokens = max(max_tokens, int(anchors["generator_config"]["text_max_length"]))
    plan = ExportPlan(os.path.abspath(checkpoint), checkpoint_id(checkpoint), config, precisions, modules,
                      int(options.opset), options.shapes.resolved(max_tokens), anchors)
    base = {"code_version": EXPORT_VERSION, "checkpoint": plan.checkpoint_id, "opset": plan.opset,
            "shapes": plan.shapes,
            "anchors": {k: anchors[k] for k in ("generator_id", "vision_id", "image_size")} if anchors else None}
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
            "regions": meta.get("regions")}


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
    text, files = tokenizer_section(model.text, "tokenizer", "text_encoder")
    regions = None
    specs = [text_encoder_spec(model.text)]
    anchors = None
    if plan.anchors:
        anchor_specs, anchors, anchor_files = _anchor_parts(plan.anchors, model, text, plan.modules)
        specs += anchor_specs
        files.update(anchor_files)
        regions = anchors["vision"]["regions"]
    specs += [query_tower_spec(model, regions), video_tower_spec(model), scorer_spec(model)]
    wanted = {*plan.modules, *(["generator_text"] if "generator_step" in plan.modules else [])}
    scorer = {"order": ["lat_g", "lat_l", "con_g", "con_l"], "norm": model.matcher.norm.tolist(),
              "weights": list(model.matcher.weights), "local_branch": model.matcher.local_branch}
    return ExportParts([spec for spec in specs if spec.name in wanted], text, files, anchors, scorer)


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


def _anchor_parts(plan_anchors: dict, model, text_section: dict, modules: tuple) -> tuple:
    from engine.anchors import BuiltinConfig, load_builtin_transformer
    from engine.text import MiniLMEncoder
    from engine.vision import RegionExtractor, VisionConfig

    gen_config = BuiltinConfig.from_dict(plan_anchors["generator_config"])
    vision_config = VisionConfig(image_size=plan_anchors["image_size"], weights=plan_anchors["vision_weights"])
    regions = (-(-vision_config.image_size // 32)) ** 2  # RegionExtractor.grid_size() squared
    if plan_anchors.get("regions") not in (None, regions):
        raise ExportError(f"the checkpoint's anchors have {plan_anchors['regions']} regions, but the ResNet at "
                          f"{plan_anchors['image_size']} px gives {regions}")
    specs, files = [], {}
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
        gen_text, files = tokenizer_section(encoder, "generator_tokenizer", "generator_text")
        specs.append(text_encoder_spec(encoder, "generator_text"))
    generator = {"path": plan_anchors["generator"], "id": plan_anchors["generator_id"], "adapter_id": "none",
                 "default_steps": gen_config.default_steps, "image_size": gen_config.image_size,
                 "fold": gen_config.fold, "latent_channels": gen_config.latent_channels,
                 "latent_size": gen_config.latent_size, "module": "generator_step"}
    vision = {"module": "vision", "image_size": plan_anchors["image_size"], "regions": regions,
              "weights": plan_anchors["vision_weights"] or "builtin", "id": plan_anchors["vision_id"]}
    return specs, {"generator": generator, "generator_text": gen_text, "vision": vision}, files


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


def _cast(tensors: dict, precision: str) -> dict:
    dtype = torch.float16 if precision == "fp16" else torch.float32
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def export_module(spec: ModuleSpec, path: str, opset: int, precision: str = "fp32") -> None:
    """Trace the wrapper with dynamo, name the dynamic axes, save one self-contained file, and
    check it with onnx.checker."""
    import onnx

    wrapper = spec.wrapper if precision == "fp32" else copy.deepcopy(spec.wrapper).half()
    sample = _cast(spec.sample(TRACE_SIZES, torch.Generator().manual_seed(0)), precision)
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
        got = run({k: v.numpy() for k, v in _cast(feeds, precision).items()})
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
        entry["parity"][precision] = _ort_parity(spec, path, precision, plan.shapes)
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


def _ort_parity(spec: ModuleSpec, path: str, precision: str, shapes: dict) -> dict:
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
    _check_replaceable(out)
    parts = load_parts(plan)
    with files.staged_folder(out) as work:
        modules = {spec.name: _export_one(spec, str(work), plan, options.module_cache, log) for spec in parts.specs}
        for name, text in parts.files.items():
            files.write_synced(os.path.join(work, name), text)
        manifest = _manifest(plan, parts, modules, out)
        files.write_synced(os.path.join(work, MANIFEST), files.to_json(manifest))  # last: it vouches for the rest
    log(f"wrote {out} ({len(modules)} modules, key {plan.key[:12]})")
    return ExportResult(out, manifest, False)


def _check_replaceable(out: str) -> None:
    """Never replace a folder that is not an export (a typo in --out must not delete data)."""
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, MANIFEST)):
        raise ExportError(f"{out}: exists and is not an export folder; choose another --out")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"{out}: exists and is not a folder")


def _manifest(plan: ExportPlan, parts: ExportParts, modules: dict, out: str) -> dict:
    """The export's manifest; the checkpoint and generator are recorded relative to `out`."""
    import onnx
    import onnxruntime

    anchors = parts.anchors
    if anchors:
        anchors = dict(anchors, generator=dict(anchors["generator"],
                                               path=paths.reference(anchors["generator"]["path"], out)))
    return {
        "format": EXPORT_FORMAT, "code_version": EXPORT_VERSION, "key": plan.key, "base_key": plan.base_key,
        "precisions": list(plan.precisions), "opset": plan.opset, "shapes": plan.shapes,
        "checkpoint": {"path": paths.reference(plan.checkpoint, out), "id": plan.checkpoint_id},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "text": parts.text, "anchors": anchors, "scorer": parts.scorer, "modules": modules,
        "parity_batches": list(PARITY_BATCHES),
    }
