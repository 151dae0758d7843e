"""The engine's query path and scoring from an export folder, through ONNX Runtime, without PyTorch.

`cvr export --format onnx` (export/onnx.py) writes a folder of ONNX graphs (text encoder, query
tower, video tower, scorer, and for a checkpoint with anchors the generator's denoising step and
the ResNet-50 region extractor), the tokenizer, and a `manifest.json`. This module runs them:

    engine = OnnxRuntimeBackend("runs/demo/full/onnx")   # device="auto": CUDA when a GPU is present
    lat, con = engine.encode_queries(["a red circle moves left"])  # numpy (Q, 2, D), (Q, 2, K)
    values, indices = engine.topk(lat, con, video_lat, video_con, k=10)

Everything here is numpy + onnxruntime + tokenizers: no torch import, so a deployment needs
neither PyTorch nor the checkpoint. What the torch path draws with torch's random generator (the
anchor's starting noise) is reproduced in numpy (`torch_randn`), to within one float32 rounding.

`ExportedBackend` holds the numpy pipeline; a subclass only says how a module is opened and run
(`OnnxRuntimeBackend` here, `engine.backends.tensorrt.TensorRTBackend` for TensorRT engines).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

EXPORT_FORMAT = "cvr-sdgm/export/1"
EXPORT_VERSION = 2  # bump when graphs or the manifest change: every cached export is then redone
MANIFEST = "manifest.json"
# Scoring materialises (queries x videos x K) twice for the Jaccard passes; galleries are scored in
# chunks of videos so that this stays near 64 M floats whatever the gallery size.
SCORE_BUDGET = 1 << 26


class ExportedModelError(ValueError):
    """An export folder that cannot be used (one-line message)."""


def read_export_manifest(folder: str) -> dict:
    """The manifest of an export folder, checked for format and code version (one-line errors)."""
    from engine.config import read_format_json  # standard library only: this module stays torch-free

    if not os.path.isdir(folder):
        raise ExportedModelError(f"{folder}: no such export folder (run `cvr export`)")
    manifest = read_format_json(folder, MANIFEST, EXPORT_FORMAT, ExportedModelError, "export")
    if manifest.get("code_version") != EXPORT_VERSION:
        raise ExportedModelError(f"{folder}: exported by another version of the export code: export again")
    return manifest


# ---------------------------------------------------------------------------------------------
# Tokenizers (what engine.text does with transformers / the RIVRL vocabulary, without torch)


class HFTokenizer:
    """A Hugging Face fast tokenizer from its `tokenizer.json`, padded and truncated exactly as
    engine.text.MiniLMEncoder.tokenize asks transformers to (right padding to the longest text,
    truncation to max_length special tokens included)."""

    def __init__(self, path: str, max_length: int, pad_id: int, padding_side: str = "right"):
        from tokenizers import Tokenizer

        self.max_length, self.pad_id, self.padding_side = int(max_length), int(pad_id), padding_side
        self._full = Tokenizer.from_file(path)
        self._full.no_padding()
        self._full.no_truncation()
        self._cut = Tokenizer.from_file(path)
        self._cut.no_padding()
        self._cut.enable_truncation(self.max_length)

    def __call__(self, texts: list) -> tuple:
        """(input_ids, attention_mask), both int64 (B, L)."""
        return _pad([e.ids for e in self._cut.encode_batch(list(texts))], self.pad_id, self.padding_side)

    def n_tokens(self, texts: list) -> list:
        """Untruncated token counts, special tokens included."""
        return [len(e.ids) for e in self._full.encode_batch(list(texts))]


class RivrlTokenizer:
    """engine.text.Vocabulary.encode + RivrlTextEncoder.tokenize: `<start> words <end>`, padded
    with <pad>; every non-ASCII-alphanumeric character separates words, lowercase."""

    _NON_ALNUM = re.compile(r"[^A-Za-z0-9]")

    def __init__(self, path: str, max_length: int):
        with open(path, encoding="utf-8") as handle:
            vocab = json.load(handle)
        itos = list(vocab["specials"]) + list(vocab["words"])
        self.stoi = {w: i for i, w in enumerate(itos)}
        self.pad, self.unk = self.stoi["<pad>"], self.stoi["<unk>"]
        self.start, self.end = self.stoi["<start>"], self.stoi["<end>"]
        self.max_length = int(max_length)

    def _encode(self, text: str, limit: int | None) -> list:
        ids = [self.stoi.get(w, self.unk) for w in self._NON_ALNUM.sub(" ", text).lower().split()]
        if limit is not None:
            ids = ids[: max(0, limit - 2)]
        return [self.start, *ids, self.end]

    def __call__(self, texts: list) -> tuple:
        ids, _ = _pad([self._encode(t, self.max_length) for t in texts], self.pad, "right")
        return ids, (ids != self.pad).astype(np.int64)  # as RivrlTextEncoder: mask = ids != <pad>

    def n_tokens(self, texts: list) -> list:
        return [len(self._encode(t, None)) for t in texts]


def _pad(rows: list, pad_id: int, side: str) -> tuple:
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


def build_tokenizer(folder: str, spec: dict):
    path = os.path.join(folder, spec["file"])
    if spec["kind"] == "rivrl":
        return RivrlTokenizer(path, spec["max_length"])
    return HFTokenizer(path, spec["max_length"], spec["pad_id"], spec.get("padding_side", "right"))


# ---------------------------------------------------------------------------------------------
# What the anchor generator does with torch, in numpy


def prompt_seed(prompt: str, seed: int = 0) -> int:
    """engine.anchors.prompt_seed: a fixed seed per (prompt, seed)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def torch_randn(seed: int, shape: tuple) -> np.ndarray:
    """`torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))` in numpy (float32).

    torch seeds a standard MT19937 with the seed's low 32 bits, draws one 24-bit uniform per value
    and turns each block of 16 into normals by Box-Muller (values j and j+8 of a block share a
    pair); a size that is not a multiple of 16 redraws its last 16. Equal to torch's draw within
    about 2 float32 ulps (torch's vectorised log/sin/cos round differently from numpy's)."""
    n = int(np.prod(shape))
    if n < 16:
        raise ValueError("torch_randn reproduces torch's vectorised path only: at least 16 values")
    bits = np.random.MT19937()
    bits.state = {"bit_generator": "MT19937", "state": {"key": _init_genrand(int(seed) & 0xFFFFFFFF), "pos": 624}}

    def uniform(count: int) -> np.ndarray:
        return ((bits.random_raw(count) & 0xFFFFFF).astype(np.float64) / float(1 << 24)).astype(np.float32)

    def box_muller(block: np.ndarray) -> np.ndarray:  # (m, 2, 8) uniforms -> (m, 16) normals
        radius = np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - block[:, 0]))
        theta = np.float32(2.0 * np.pi) * block[:, 1]
        return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1)

    out = uniform(n)
    whole = n - n % 16
    out[:whole] = box_muller(out[:whole].reshape(-1, 2, 8)).reshape(-1)
    if n % 16:
        out[n - 16 :] = box_muller(uniform(16).reshape(1, 2, 8)).reshape(-1)
    return out.reshape(shape)


def _init_genrand(seed: int) -> np.ndarray:
    """MT19937's standard 32-bit seeding (init_genrand), which torch's mt19937 engine uses."""
    key = [seed]
    for i in range(1, 624):
        key.append((1812433253 * (key[-1] ^ (key[-1] >> 30)) + i) & 0xFFFFFFFF)
    return np.array(key, dtype=np.uint32)


def pack_latents(latents: np.ndarray) -> np.ndarray:
    """(B, C, h, w) -> (B, h/2*w/2, 4C): engine.anchors.pack_latents."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def latents_to_images(tokens: np.ndarray, size: int, fold: int) -> np.ndarray:
    """Packed tokens -> uint8 (B, S, S, 3): engine.anchors.unpack_latents + latents_to_images."""
    b, _, c4 = tokens.shape
    c, h = c4 // 4, size // fold
    x = tokens.reshape(b, h // 2, h // 2, c, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(b, c, h, h)
    x = x.reshape(b, 3, fold, fold, h, h).transpose(0, 1, 4, 2, 5, 3).reshape(b, 3, size, size)  # pixel_shuffle
    pixels = ((np.clip(x, -1, 1) + np.float32(1.0)) * np.float32(127.5)).round()
    return pixels.astype(np.uint8).transpose(0, 2, 3, 1)


def flow_sigmas(steps: int) -> np.ndarray:
    """engine.anchors.flow_sigmas: linspace(1, 0, steps + 1) in float32."""
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return np.linspace(1.0, 0.0, int(steps) + 1).astype(np.float32)


def anchor_cache_key(prompt: str, generator: str, adapter: str, steps: int, size: int, seed: int) -> str:
    """engine.anchors.AnchorCache.key, so that both backends share one on-disk anchor cache."""
    payload = json.dumps([prompt, generator, adapter, int(steps), int(size), int(seed)])
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class GeneratorInfo:
    """The exported generator, with the attributes the Retriever reads of an AnchorGenerator."""

    generator_id: str
    adapter_id: str
    default_steps: int
    image_size: int
    options: object  # .steps and .seed, as engine.anchors.GeneratorOptions


@dataclass
class _Options:
    steps: int | None = None
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Top-k


def topk_stable(scores: np.ndarray, k: int) -> tuple:
    """Top-k per row, descending, ties broken by the lower column index (engine.model.topk_stable).

    argpartition finds the k-th value; every column at least as large (ties included) is then
    sorted by (-score, column), so the result equals a full stable sort's first k."""
    q, n = scores.shape
    k = min(int(k), n)
    values = np.empty((q, k), dtype=scores.dtype)
    indices = np.empty((q, k), dtype=np.int64)
    for i, row in enumerate(scores):
        if k < n:
            kth = np.partition(row, n - k)[n - k]
            candidates = np.flatnonzero(row >= kth)
        else:
            candidates = np.arange(n)
        order = candidates[np.lexsort((candidates, -row[candidates]))][:k]
        values[i], indices[i] = row[order], order
    return values, indices


# ---------------------------------------------------------------------------------------------
# The pipeline


class ExportedBackend:
    """The query path over exported modules, in numpy; subclasses implement `_open(name)`, which
    returns an object whose `run(feeds) -> {output: array}` runs one module."""

    kind = "exported"
    max_videos: int | None = None  # videos per scorer call beyond the memory budget (TensorRT: its profile)

    def __init__(self, folder: str, steps: int | None = None, seed: int | None = None, anchor_cache=None):
        self.folder = os.path.abspath(folder)
        self.manifest = read_export_manifest(folder)
        self._runners: dict = {}
        self.text = build_tokenizer(folder, self.manifest["text"])
        self.anchors = self.manifest.get("anchors")
        self.generator = None
        self.anchor_cache = anchor_cache
        if self.anchors:
            gen = self.anchors["generator"]
            self.generator_text = build_tokenizer(folder, self.anchors["generator_text"])
            self.generator = GeneratorInfo(gen["id"], gen.get("adapter_id", "none"), int(gen["default_steps"]),
                                           int(gen["image_size"]), _Options(steps, int(seed or 0)))

    # -- modules ---------------------------------------------------------------------------
    def _open(self, name: str):
        raise NotImplementedError

    def module_file(self, name: str, precision: str = "fp32") -> str:
        try:
            entry = self.manifest["modules"][name]["files"][precision]
        except KeyError:
            raise ExportedModelError(f"{self.folder}: the export has no {precision} {name} module") from None
        path = os.path.join(self.folder, entry["file"])
        if not os.path.isfile(path) or os.path.getsize(path) != entry["bytes"]:
            raise ExportedModelError(f"{path}: missing or damaged (size differs from the manifest): export again")
        return path

    def run(self, name: str, feeds: dict) -> dict:
        if name not in self._runners:
            self._runners[name] = self._open(name)
        return self._runners[name].run(feeds)

    def search_modules(self) -> list:
        """The modules a search runs (the video tower only indexes)."""
        names = [self.manifest["text"]["module"], "query_tower", "scorer"]
        if self.anchors:
            names += [self.anchors["generator_text"]["module"], self.anchors["generator"]["module"],
                      self.anchors["vision"]["module"]]
        return list(dict.fromkeys(names))

    def open_search_modules(self) -> None:
        """Open every module a search needs now, so the first query does not pay for it."""
        for name in self.search_modules():
            if name not in self._runners:
                self._runners[name] = self._open(name)

    # -- query path --------------------------------------------------------------------------
    def encode_text(self, texts: list, module: str | None = None, tokenizer=None) -> tuple:
        """(tokens (B, L, d), mask int64 (B, L), sentence (B, d)) of the text encoder."""
        tokenizer = tokenizer or self.text
        ids, mask = tokenizer(texts)
        out = self.run(module or self.manifest["text"]["module"], {"input_ids": ids, "attention_mask": mask})
        return out["tokens"], mask, out["sentence"]

    def generate(self, texts: list) -> np.ndarray:
        """uint8 anchors (B, S, S, 3) for the texts, as engine.anchors.AnchorGenerator.generate."""
        gen, info = self.anchors["generator"], self.generator
        steps = int(info.options.steps if info.options.steps is not None else info.default_steps)
        seed = int(info.options.seed)
        keys = [anchor_cache_key(t, info.generator_id, info.adapter_id, steps, info.image_size, seed) for t in texts]
        out = [self.anchor_cache.get(key) if self.anchor_cache is not None else None for key in keys]
        todo = [i for i, image in enumerate(out) if image is None]
        if todo:
            images = self._render([texts[i] for i in todo], steps, seed, gen)
            for i, image in zip(todo, images, strict=True):
                out[i] = image
                if self.anchor_cache is not None:
                    self.anchor_cache.put(keys[i], image)
        return np.stack(out)

    def _render(self, texts: list, steps: int, seed: int, gen: dict) -> np.ndarray:
        spec = self.anchors["generator_text"]
        tokens, mask, pooled = self.encode_text(texts, spec["module"], self.generator_text)
        c, s = int(gen["latent_channels"]), int(gen["latent_size"])
        x = pack_latents(np.stack([torch_randn(prompt_seed(t, seed), (c, s, s)) for t in texts]))
        sigmas = flow_sigmas(steps)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            feeds = {"latents": x, "sigma": np.full((len(texts),), sigma, dtype=np.float32),
                     "text_tokens": tokens, "text_mask": mask, "pooled": pooled}
            velocity = self.run(gen["module"], feeds)["velocity"]
            x = (x + np.float32(float(sigma_next) - float(sigma)) * velocity).astype(np.float32)
        return latents_to_images(x, int(gen["image_size"]), int(gen["fold"]))

    def regions(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) anchors -> ResNet-50 region grids (B, R, 2048)."""
        pixels = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        return self.run(self.anchors["vision"]["module"], {"images": pixels})["regions"]

    def encode_queries(self, text: tuple, regions: np.ndarray | None = None) -> tuple:
        """Query embeddings (lat (Q, 2, D), con (Q, 2, K)) from encode_text's output (+ regions)."""
        tokens, mask, sentence = text
        feeds = {"sentence": sentence, "tokens": tokens, "token_mask": mask}
        if self.anchors:
            if regions is None:
                raise ExportedModelError("this model was exported with anchors: pass anchor regions")
            feeds["regions"] = regions
        out = self.run("query_tower", feeds)
        return out["lat"], out["con"]

    def encode_videos(self, frames: np.ndarray, mask: np.ndarray) -> tuple:
        """Video embeddings (lat (N, 2, D), con (N, 2, K)) of frame features (N, F, d) + mask."""
        out = self.run("video_tower", {"frames": frames.astype(np.float32), "frame_mask": mask.astype(np.int64)})
        return out["lat"], out["con"]

    def score(self, query_lat, query_con, video_lat, video_con) -> np.ndarray:
        """Fused scores (Q, N) with the checkpoint's frozen constants, in chunks of videos."""
        q, k_dim = query_con.shape[0], query_con.shape[2]
        chunk = max(1, SCORE_BUDGET // max(1, q * k_dim))
        chunk = min(chunk, self.max_videos or chunk)
        parts = []
        for start in range(0, video_lat.shape[0], chunk):
            feeds = {"query_lat": query_lat, "query_con": query_con,
                     "video_lat": video_lat[start : start + chunk], "video_con": video_con[start : start + chunk]}
            parts.append(self.run("scorer", feeds)["scores"])
        return np.concatenate(parts, axis=1)

    def topk(self, query_lat, query_con, video_lat, video_con, k: int) -> tuple:
        return topk_stable(self.score(query_lat, query_con, video_lat, video_con), k)

    def search(self, texts: list, video_lat, video_con, k: int) -> tuple:
        """The whole query path: (values (Q, k), indices (Q, k), anchors or None)."""
        text = self.encode_text(texts)
        images = regions = None
        if self.anchors:
            images = self.generate(texts)
            regions = self.regions(images)
        lat, con = self.encode_queries(text, regions)
        values, indices = self.topk(lat, con, video_lat, video_con, k)
        return values, indices, images


# ---------------------------------------------------------------------------------------------
# ONNX Runtime


def gpu_present() -> bool:
    """Whether an NVIDIA driver is loaded. onnxruntime-gpu lists the CUDA provider even without a
    GPU, so that list says nothing; the driver's /proc entry does."""
    return os.path.exists("/proc/driver/nvidia/version")


def session_options(threads: int | None = None):
    """Explicit threads, spinning off: a spinning ORT pool next to torch's threads (or any other
    load) made torch 10-40x slower on a small machine."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # warnings about symbolic output shapes are noise
    return options


def providers_for(device: str) -> list:
    """ORT providers for a device: 'cpu'; 'cuda' / 'cuda:N'; 'auto' (CUDA when a GPU is present)."""
    if device == "auto":
        device = "cuda" if gpu_present() else "cpu"
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise ExportedModelError(f"unknown device {device!r} for onnxruntime: cpu, cuda, cuda:N or auto")


class _OrtRunner:
    def __init__(self, session):
        self.session = session
        self.outputs = [o.name for o in session.get_outputs()]
        self.inputs = {i.name for i in session.get_inputs()}

    def run(self, feeds: dict) -> dict:
        feeds = {name: np.ascontiguousarray(value) for name, value in feeds.items() if name in self.inputs}
        return dict(zip(self.outputs, self.session.run(self.outputs, feeds), strict=True))


class OnnxRuntimeBackend(ExportedBackend):
    """Exported modules through ONNX Runtime sessions (fp32 graphs).

    `providers` maps each opened module to the providers its session actually runs with:
    onnxruntime-gpu falls back to the CPU silently when CUDA cannot start."""

    kind = "onnxruntime"

    def __init__(self, folder: str, device: str = "auto", threads: int | None = None, steps: int | None = None,
                 seed: int | None = None, anchor_cache=None):
        self.requested = providers_for(device)
        self.threads = threads
        self.providers: dict = {}
        super().__init__(folder, steps=steps, seed=seed, anchor_cache=anchor_cache)

    def _open(self, name: str):
        import onnxruntime as ort

        path = self.module_file(name)
        try:
            session = ort.InferenceSession(path, sess_options=session_options(self.threads),
                                           providers=self.requested)
        except Exception as error:  # noqa: BLE001 - ORT raises its own exception types for bad files
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ExportedModelError(f"{path}: ONNX Runtime cannot load it ({first})") from None
        self.providers[name] = session.get_providers()
        wanted = self.requested[0][0] if isinstance(self.requested[0], tuple) else self.requested[0]
        if self.providers[name][0] != wanted:
            log.warning("%s: %s was asked for but %s runs", name, wanted, self.providers[name][0])
        return _OrtRunner(session)

    @property
    def provider(self) -> str:
        """The provider that actually runs the modules opened so far (the first of each session)."""
        running = sorted({names[0] for names in self.providers.values()})
        return ", ".join(running) if running else "not opened yet"
