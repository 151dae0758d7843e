"""The engine's query path through TensorRT engines (`cvr export --format tensorrt`), on a CUDA GPU.

The numpy pipeline is engine.backends.onnxruntime.ExportedBackend's; only how a module runs
differs: each module is a serialized engine (`<export>/tensorrt-<precision>/<module>.plan`,
described by `engines.json`), run with `execute_async_v3` on torch-allocated CUDA buffers.

TensorRT is the optional extra `tensorrt` (`pip install 'cvr-sdgm[tensorrt]'`): its libraries
only install where NVIDIA's index is reachable, and it only runs on an NVIDIA GPU. Everything
here imports it lazily; `tensorrt_unavailable()` says in one line why it cannot run.
"""
from __future__ import annotations

import json
import os

import numpy as np

from engine.backends.onnxruntime import ExportedBackend, ExportedModelError
from engine.integrity import check_seal, verify_files

ENGINES_FORMAT = "cvr-sdgm/tensorrt-engines/1"
ENGINES_FILE = "engines.json"
BUILD_AGAIN = "build the engines again with `cvr export --format tensorrt --force`"


def tensorrt_unavailable() -> str | None:
    """None when TensorRT can run here, else the one-line reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed: pip install 'cvr-sdgm[tensorrt]' (needs an NVIDIA GPU and CUDA)"
    import torch

    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU, and torch sees none here"
    return None


def engines_folder(export_dir: str, precision: str) -> str:
    return os.path.join(export_dir, f"tensorrt-{precision}")


def read_engines(folder: str) -> dict:
    path = os.path.join(folder, ENGINES_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, ValueError):
        raise ExportedModelError(f"{folder}: no readable {ENGINES_FILE} (run `cvr export --format tensorrt`)") from None
    if not isinstance(meta, dict) or meta.get("format") != ENGINES_FORMAT:
        raise ExportedModelError(f"{path}: not a CVR-SDGM TensorRT engine list")
    if not check_seal(meta, path, BUILD_AGAIN, ExportedModelError):
        raise ExportedModelError(f"{path}: records no digest of itself: {BUILD_AGAIN}")
    return meta


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


class TensorRTRunner:
    """One deserialized engine with one optimisation profile; `run(feeds) -> {output: float32 or
    integer numpy array}`. Inputs are cast to the engine's own input types (fp16 engines take
    fp16), so callers always pass what the fp32 ONNX graph takes."""

    def __init__(self, plan: str | bytes, device: int = 0):
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        data = plan if isinstance(plan, bytes | bytearray) else open(plan, "rb").read()
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(data)
        if self.engine is None:
            raise ExportedModelError(f"{plan if isinstance(plan, str) else 'engine'}: TensorRT cannot deserialize it "
                                     "(built by another TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = lambda n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if is_input(n)]
        self.outputs = [n for n in names if not is_input(n)]

    def run(self, feeds: dict) -> dict:
        torch, keep = self.torch, []
        for name in self.inputs:
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device, dtype).contiguous()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportedModelError("TensorRT failed to run the engine (see its log above)")
        stream.synchronize()
        return {name: (t.float() if t.is_floating_point() else t).cpu().numpy() for name, t in outputs.items()}


class TensorRTBackend(ExportedBackend):
    """Exported modules through TensorRT engines built by export/tensorrt.py."""

    kind = "tensorrt"

    def __init__(self, folder: str, precision: str | None = None, device: int = 0, steps: int | None = None,
                 seed: int | None = None, anchor_cache=None):
        reason = tensorrt_unavailable()
        if reason:
            raise ExportedModelError(reason)
        super().__init__(folder, steps=steps, seed=seed, anchor_cache=anchor_cache)
        precision = precision or self._built_precision()
        self.engines_dir = engines_folder(self.folder, precision)
        self.engines = read_engines(self.engines_dir)
        self.device_index = device
        self.providers: dict = {}
        # An engine takes nothing outside its optimisation profile: longer batches and galleries
        # go through in pieces.
        self.max_batch = int(self.engines["shapes"]["batch"][2])
        self.max_videos = int(self.engines["shapes"]["videos"][2])

    def _built_precision(self) -> str:
        """fp16 when its engines were built, else fp32."""
        for precision in ("fp16", "fp32"):
            if os.path.isfile(os.path.join(engines_folder(self.folder, precision), ENGINES_FILE)):
                return precision
        raise ExportedModelError(f"{self.folder}: no TensorRT engines (run `cvr export --format tensorrt`)")

    def _open(self, name: str):
        try:
            entry = self.engines["modules"][name]
        except KeyError:
            raise ExportedModelError(f"{self.engines_dir}: no engine for {name}") from None
        verify_files(self.engines_dir, {entry["file"]: entry["sha256"]}, BUILD_AGAIN, ExportedModelError)
        runner = TensorRTRunner(os.path.join(self.engines_dir, entry["file"]), self.device_index)
        self.providers[name] = [f"TensorRT {self.engines['tensorrt']} {self.engines['precision']}"]
        return runner

    def run(self, name: str, feeds: dict) -> dict:
        """Feeds whose first axis is the batch go through in pieces of at most the profile's max."""
        batched = [k for k, spec in self.manifest["modules"][name]["inputs"].items() if spec["shape"][:1] == ["batch"]]
        size = len(feeds[batched[0]]) if batched else 0
        if size <= self.max_batch:
            return super().run(name, feeds)
        parts = []
        for start in range(0, size, self.max_batch):
            piece = {k: v[start : start + self.max_batch] if k in batched else v for k, v in feeds.items()}
            parts.append(super().run(name, piece))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    @property
    def provider(self) -> str:
        return f"TensorRT {self.engines['tensorrt']} ({self.engines['precision']}, {self.engines['device']})"
