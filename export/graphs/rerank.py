"""The generative reranker's denoiser step as one ONNX graph (engine/rerank.py's Denoiser), written
into RERANKER/onnx/ with its own sealed manifest, and checked against PyTorch in ONNX Runtime like
every module of export/onnx.py (same exporter, checker and parity code).

Only the step is a graph: the DDIM loop, the seeded noise and the fusion are engine/reranking.py's
numpy, which the onnxruntime backend runs around it (engine/backends/onnx_rerank.py). The
candidates' axis is named "videos" (they are videos), so the export machinery's trace sizes serve.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from engine import files
from engine.backends.onnx_rerank import (
    GRAPH,
    MANIFEST,
    RERANK_EXPORT_FORMAT,
    RERANK_EXPORT_VERSION,
    read_rerank_export,
    rerank_export_dir,
)
from engine.backends.onnxruntime import ExportedModelError
from engine.integrity import seal
from engine.outputs import check_output, json_format
from engine.rerank import load_denoiser
from export.parity import check_parity, ort_runner
from export.spec import IOSpec, ModuleSpec

# (batch, candidates) of the two parity cases: odd sizes, one with padded candidates in most rows
PARITY_SIZES = ({"batch": 1, "videos": 5}, {"batch": 6, "videos": 13})


class DenoiserGraph(nn.Module):
    """The Denoiser with its mask as int64 0/1 (what every exported mask is)."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x_t, t, query, candidates, scores, mask):
        return self.denoiser(x_t, t, query, candidates, scores, mask.bool())


def rerank_step_spec(denoiser, config) -> ModuleSpec:
    d = config.latent_dim

    def reference(x_t, t, query, candidates, scores, mask):
        return (denoiser(x_t, t, query, candidates, scores, mask.bool()),)

    inputs = {"x_t": IOSpec(("batch", "videos")),
              "t": IOSpec(("batch",), "int64", "ids", high=config.diffusion_steps),
              "query": IOSpec(("batch", d)),
              "candidates": IOSpec(("batch", "videos", d)),
              "scores": IOSpec(("batch", "videos"), kind="uniform"),
              "mask": IOSpec(("batch", "videos"), "int64", "mask")}
    return ModuleSpec("rerank_step", DenoiserGraph(denoiser).eval(), reference, inputs,
                      {"x0": IOSpec(("batch", "videos"))})


@dataclass
class RerankExport:
    folder: str
    manifest: dict
    reused: bool


def export_reranker(reranker: str, opset: int | None = None, force: bool = False,
                    log: Callable | None = None) -> RerankExport:
    """Export (or reuse, when it is this reranker's and intact) RERANKER/onnx/rerank_step.onnx."""
    from export.onnx import DEFAULT_OPSET, export_module

    log = log or (lambda line: None)
    opset = opset or DEFAULT_OPSET
    out = rerank_export_dir(reranker)
    config, denoiser = load_denoiser(reranker)
    if not force:
        try:
            manifest = read_rerank_export(out, config)
            if manifest.get("opset") == opset:
                log(f"reused {out}")
                return RerankExport(out, manifest, True)
        except ExportedModelError:
            pass
    check_output(out, lambda path: json_format(path / MANIFEST) == RERANK_EXPORT_FORMAT, "a reranker export",
                 "cvr export --rerank")
    spec = rerank_step_spec(denoiser, config["reranker"])
    with files.staged_folder(out) as work:
        path = os.path.join(work, GRAPH)
        export_module(spec, path, opset)
        parity = check_parity(spec, ort_runner(path, ["x0"]), "fp32", list(PARITY_SIZES))
        manifest = seal({"format": RERANK_EXPORT_FORMAT, "code_version": RERANK_EXPORT_VERSION, "opset": opset,
                         "reranker": config["digest"], "base": config["base"]["id"], **spec.describe(),
                         "parity": parity, "files": {GRAPH: files.sha256_file(path)}})
        files.write_synced(os.path.join(work, MANIFEST), files.to_json(manifest))
    log(f"rerank_step [fp32]: ONNX Runtime vs PyTorch max |diff| {parity['max_abs_diff']:.1e}; wrote {out}")
    return RerankExport(out, manifest, False)
