"""The generative reranker through ONNX Runtime, without PyTorch: the exported denoiser step
(export/graphs/rerank.py, in RERANKER/onnx/) run inside engine.reranking's numpy DDIM loop, so the
steps, the seeded noise and the fusion are the very ones of the PyTorch runtime."""
from __future__ import annotations

import os

import numpy as np

from engine.backends.onnxruntime import ExportedModelError, providers_for, session_options
from engine.config import read_format_json
from engine.integrity import check_seal, verify_files
from engine.reranking import Reranker, read_reranker_config

RERANK_EXPORT_FORMAT = "cvr-sdgm/reranker-export/1"
RERANK_EXPORT_VERSION = 1  # bump when the graph or this manifest change: every cached export is redone
MANIFEST = "manifest.json"
GRAPH = "rerank_step.onnx"
EXPORT_AGAIN = "export it again (`cvr export --rerank RERANKER --force`)"
INPUTS = ("x_t", "t", "query", "candidates", "scores", "mask")


def rerank_export_dir(folder: str) -> str:
    """Where a reranker's graph lives: RERANKER/onnx, as a checkpoint's export is CHECKPOINT/onnx."""
    return os.path.join(folder, "onnx")


def read_rerank_export(out: str, reranker_config: dict) -> dict:
    """The export's manifest, checked: format, version, seal, the graph's sha256, and that it was
    exported from this very reranker (its config's digest)."""
    if not os.path.isdir(out):
        raise ExportedModelError(f"{out}: no exported reranker (run `cvr export --rerank RERANKER`)")
    manifest = read_format_json(out, MANIFEST, RERANK_EXPORT_FORMAT, ExportedModelError, "reranker export")
    path = os.path.join(out, MANIFEST)
    if manifest.get("code_version") != RERANK_EXPORT_VERSION or not check_seal(manifest, path, EXPORT_AGAIN,
                                                                                 ExportedModelError):
        raise ExportedModelError(f"{path}: another version of the export code, or unsealed: {EXPORT_AGAIN}")
    if manifest.get("reranker") != reranker_config.get("digest"):
        raise ExportedModelError(f"{out}: exported from another reranker than the one beside it: {EXPORT_AGAIN}")
    verify_files(out, manifest.get("files", {}), EXPORT_AGAIN, ExportedModelError)
    return manifest


class OnnxReranker(Reranker):
    """engine.reranking.Reranker with the denoiser step run by ONNX Runtime."""

    runtime = "onnxruntime"

    def __init__(self, folder: str, device: str = "cpu", threads: int = 1):
        import onnxruntime as ort

        config = read_reranker_config(folder)
        super().__init__(folder, config["reranker"], config["base"]["id"])
        out = rerank_export_dir(folder)
        self.manifest = read_rerank_export(out, config)
        path = os.path.join(out, GRAPH)
        try:
            self.session = ort.InferenceSession(path, sess_options=session_options(threads),
                                                providers=providers_for(device))
        except Exception as error:  # noqa: BLE001 - ORT raises its own exception types for bad files
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ExportedModelError(f"{path}: ONNX Runtime cannot load it ({first})") from None

    def denoise(self, x_t, t, query, candidates, scores, mask) -> np.ndarray:
        values = (x_t, t.astype(np.int64), query, candidates, scores, np.asarray(mask).astype(np.int64))
        feeds = {name: np.ascontiguousarray(v) for name, v in zip(INPUTS, values, strict=True)}
        return self.session.run(["x0"], feeds)[0]
