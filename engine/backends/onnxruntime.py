"""The engine's query path and scoring from an export folder, through ONNX Runtime, without PyTorch.

`cvr export --format onnx` (export/onnx.py) writes a folder of ONNX graphs (text encoder, query
tower, video tower, scorer, and for a checkpoint with anchors the generator's denoising step and
the ResNet-50 region extractor), the tokenizer, and a `manifest.json`. This module runs them:

    engine = OnnxRuntimeBackend("runs/demo/full/onnx")   # device="auto": CUDA when a GPU is present
    text = engine.encode_text(["a red circle moves left"])
    lat, con = engine.encode_queries(text, engine.regions(engine.generate(["a red circle moves left"])))
    scores = engine.scorer.scores(lat, con, video_lat, video_con)  # what engine.search ranks

Everything here is numpy + onnxruntime + tokenizers: no torch import, so a deployment needs
neither PyTorch nor the checkpoint's modules. What this path shares with the PyTorch one (prompt
seeds and the starting noise, sigmas, latent packing, the anchor cache, RIVRL's tokenizer) is
engine/portable.py, written once for both; ranking is engine/search.py's, the same for every
backend.

`ExportedBackend` holds the numpy pipeline; a subclass only says how a module is opened and run
(`OnnxRuntimeBackend` here, `engine.backends.tensorrt.TensorRTBackend` for TensorRT engines).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from engine.errors import CVRError
from engine.integrity import check_seal, verify_files
from engine.portable import (
    PAD,
    SPECIALS,
    AnchorCache,
    anchor_cache_key,
    flow_sigmas,
    initial_noise,
    latents_to_images,
    pack_latents,
    pad_rows,
    prompt_seed,
    rivrl_encode,
    unpack_latents,
)
from engine.search import block_rows

log = logging.getLogger(__name__)

EXPORT_FORMAT = "cvr-sdgm/export/1"
EXPORT_VERSION = 4  # bump when graphs or the manifest change: every cached export is then redone
EXPORT_AGAIN = "export again with `cvr export --force`"
MANIFEST = "manifest.json"
# Scoring materialises (queries x videos x K) twice for the Jaccard passes; galleries are scored in
# chunks of videos so that this stays near 64 M floats whatever the gallery size.
SCORE_BUDGET = 1 << 26


class ExportedModelError(CVRError):
    """An export folder that cannot be used (one-line message)."""


def read_export_manifest(folder: str) -> dict:
    """The manifest of an export folder, checked for format and code version (one-line errors)."""
    from engine.config import read_format_json  # standard library only: this module stays torch-free

    if not os.path.isdir(folder):
        raise ExportedModelError(f"{folder}: no such export folder (run `cvr export`)")
    manifest = read_format_json(folder, MANIFEST, EXPORT_FORMAT, ExportedModelError, "export")
    if manifest.get("code_version") != EXPORT_VERSION:
        raise ExportedModelError(f"{folder}: exported by another version of the export code: {EXPORT_AGAIN}")
    path = os.path.join(folder, MANIFEST)
    if not check_seal(manifest, path, EXPORT_AGAIN, ExportedModelError):
        raise ExportedModelError(f"{path}: records no digest of itself: {EXPORT_AGAIN}")
    # The small files (tokenizer, vocabulary) are checked now; each graph when it is first opened.
    verify_files(folder, manifest.get("files", {}), EXPORT_AGAIN, ExportedModelError)
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
        return pad_rows([e.ids for e in self._cut.encode_batch(list(texts))], self.pad_id, self.padding_side)

    def n_tokens(self, texts: list) -> list:
        """Untruncated token counts, special tokens included."""
        return [len(e.ids) for e in self._full.encode_batch(list(texts))]


class RivrlTokenizer:
    """engine.text.RivrlTextEncoder.tokenize without torch: `<start> words <end>` padded with <pad>
    (engine.portable's RIVRL tokenizer, from the exported vocabulary)."""

    def __init__(self, path: str, max_length: int):
        with open(path, encoding="utf-8") as handle:
            vocab = json.load(handle)
        itos = list(vocab["specials"]) + list(vocab["words"])
        if itos[: len(SPECIALS)] != list(SPECIALS):
            raise ExportedModelError(f"{path}: vocabulary specials {vocab['specials']} differ from {list(SPECIALS)}")
        self.stoi = {w: i for i, w in enumerate(itos)}
        self.max_length = int(max_length)

    def __call__(self, texts: list) -> tuple:
        return pad_rows([rivrl_encode(self.stoi, t, self.max_length) for t in texts], PAD)

    def n_tokens(self, texts: list) -> list:
        return [len(rivrl_encode(self.stoi, t)) for t in texts]


def build_tokenizer(folder: str, spec: dict):
    path = os.path.join(folder, spec["file"])
    if spec["kind"] == "rivrl":
        return RivrlTokenizer(path, spec["max_length"])
    return HFTokenizer(path, spec["max_length"], spec["pad_id"], spec.get("padding_side", "right"))


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
# The pipeline


class ExportedBackend:
    """The query path over exported modules, in numpy; subclasses implement `_open(name)`, which
    returns an object whose `run(feeds) -> {output: array}` runs one module."""

    kind = "exported"
    max_videos: int | None = None  # videos per scorer call beyond the memory budget (TensorRT: its profile)

    def __init__(self, folder: str, steps: int | None = None, seed: int | None = None,
                 anchor_cache: str | None = None):
        self.folder = os.path.abspath(folder)
        self.manifest = read_export_manifest(folder)
        self._runners: dict = {}
        self.text = build_tokenizer(folder, self.manifest["text"])
        self.anchors = self.manifest.get("anchors")
        # N anchors per query: the query tower graph's region axis is N*R (fixed at export).
        self.anchors_per_query = int((self.anchors or {}).get("anchors_per_query", 1))
        # "latent": the query tower reads the generator's final latent tokens (no vision graph).
        self.anchor_features = (self.anchors or {}).get("features", "pixels")
        self.generator = None
        self.anchor_cache = AnchorCache(anchor_cache) if anchor_cache else None
        self.scorer = ExportedScorer(self)
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
        verify_files(self.folder, {entry["file"]: entry["sha256"]}, EXPORT_AGAIN, ExportedModelError)
        return os.path.join(self.folder, entry["file"])

    def run(self, name: str, feeds: dict) -> dict:
        if name not in self._runners:
            self._runners[name] = self._open(name)
        return self._runners[name].run(feeds)

    def search_modules(self) -> list:
        """The modules a search runs (the video tower only indexes)."""
        names = [self.manifest["text"]["module"], "query_tower", "scorer"]
        if self.anchors:
            names += [self.anchors["generator_text"]["module"], self.anchors["generator"]["module"]]
            if self.anchors.get("vision"):  # a latent export has none
                names.append(self.anchors["vision"]["module"])
        return list(dict.fromkeys(names))

    def open_search_modules(self) -> None:
        """Open every module a search needs now, so the first query does not pay for it."""
        for name in self.search_modules():
            if name not in self._runners:
                self._runners[name] = self._open(name)

    # -- query path (what engine.retriever.Retriever drives) -------------------------------------
    @property
    def checkpoint_id(self) -> str:
        return self.manifest["checkpoint"]["id"]

    @property
    def max_length(self) -> int:
        return self.text.max_length

    def token_counts(self, texts: list) -> list:
        return self.text.n_tokens(texts)

    def encode_text(self, texts: list, module: str | None = None, tokenizer=None) -> tuple:
        """(tokens (B, L, d), mask int64 (B, L), sentence (B, d)) of the text encoder."""
        tokenizer = tokenizer or self.text
        ids, mask = tokenizer(texts)
        out = self.run(module or self.manifest["text"]["module"], {"input_ids": ids, "attention_mask": mask})
        return out["tokens"], mask, out["sentence"]

    def generate(self, texts: list, draw: int = 0) -> np.ndarray:
        """uint8 anchors (B, S, S, 3) for the texts, as engine.anchors.AnchorGenerator.generate;
        anchor `draw` of each (seed + draw)."""
        gen, info = self.anchors["generator"], self.generator
        steps = int(info.options.steps if info.options.steps is not None else info.default_steps)
        seed = int(info.options.seed) + int(draw)
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

    def latents(self, texts: list, draw: int = 0) -> np.ndarray:
        """Anchor `draw`'s final packed latent tokens (B, L, C), float32, as
        engine.anchors.AnchorGenerator.generate_latents: a latent export's regions (not cached)."""
        info = self.generator
        steps = int(info.options.steps if info.options.steps is not None else info.default_steps)
        return self._sample(texts, steps, int(info.options.seed) + int(draw), self.anchors["generator"])

    def _render(self, texts: list, steps: int, seed: int, gen: dict) -> np.ndarray:
        s = int(gen["latent_size"])
        return latents_to_images(unpack_latents(self._sample(texts, steps, seed, gen), s, s), int(gen["fold"]))

    def _sample(self, texts: list, steps: int, seed: int, gen: dict) -> np.ndarray:
        """The Euler loop over the exported generator step: packed latent tokens (B, L, C)."""
        spec = self.anchors["generator_text"]
        tokens, mask, pooled = self.encode_text(texts, spec["module"], self.generator_text)
        c, s = int(gen["latent_channels"]), int(gen["latent_size"])
        x = pack_latents(initial_noise([prompt_seed(t, seed) for t in texts], (c, s, s)))
        sigmas = flow_sigmas(steps)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            feeds = {"latents": x, "sigma": np.full((len(texts),), sigma, dtype=np.float32),
                     "text_tokens": tokens, "text_mask": mask, "pooled": pooled}
            velocity = self.run(gen["module"], feeds)["velocity"]
            x = (x + np.float32(float(sigma_next) - float(sigma)) * velocity).astype(np.float32)
        return x

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
        """Video embeddings (lat (N, 2, D), con (N, 2, K); a glscl export's slots, engine/glscl.py)
        of frame features (N, F, d) + mask."""
        scorer = self.manifest.get("scorer") or {}
        if scorer.get("head") == "glscl":  # its graph takes exactly F frame slots
            frames, mask = fit_frames(frames, mask, int(scorer["frames"]))
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



def fit_frames(frames: np.ndarray, mask: np.ndarray, count: int) -> tuple:
    """engine.glscl.fit_frames in numpy: each video's valid frames first, more than `count`
    subsampled evenly (engine.datasets.video_frames' rule), zeros after; exactly `count` slots."""
    out = np.zeros((frames.shape[0], count, frames.shape[2]), np.float32)
    out_mask = np.zeros((frames.shape[0], count), np.int64)
    for b in range(frames.shape[0]):
        rows = np.flatnonzero(mask[b])
        if len(rows) > count:
            rows = rows[np.linspace(0, len(rows) - 1, count).round().astype(np.int64)]
        out[b, : len(rows)] = frames[b, rows]
        out_mask[b, : len(rows)] = 1
    return out, out_mask


class ExportedScorer:
    """engine.search.Scorer over an export's scorer graph (gallery rows cast to float32 per block)."""

    def __init__(self, backend: ExportedBackend):
        self.backend = backend

    def scores(self, q_lat, q_con, lat, con) -> np.ndarray:
        return self.backend.score(q_lat, q_con, np.asarray(lat, np.float32), np.asarray(con, np.float32))

    def block_rows(self, queries: int) -> int:
        dims = self.backend.manifest["modules"]["scorer"]["inputs"]
        lat, con = dims["video_lat"]["shape"], dims["video_con"]["shape"]
        # A glscl row is 1+F+K slots wide, not 2: size its blocks by what a row really holds.
        slots = [n if isinstance(n, int) else 2 for n in (lat[1], con[1])]
        rows = block_rows(queries, lat[2], con[2], lat_slots=slots[0], con_slots=slots[1])
        return min(rows, self.backend.max_videos or rows)


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
