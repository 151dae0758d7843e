"""Batched text -> top-k videos over a persisted gallery, through a chosen backend.

One `search` call runs the whole query path in batches: text encoder, anchor generation (with its
on-disk cache), ResNet-50 regions, query tower, scoring and top-k. Backends:
- `torch`: the plain PyTorch reference (any device);
- `triton`: the fused Triton kernels for hybrid attention and scoring (CUDA; under
  TRITON_INTERPRET=1 they also run on the CPU, which is how the tests check them);
- `onnxruntime`: the exported graphs (`cvr export`) through ONNX Runtime, numpy only
  (engine/backends/onnxruntime.py); `tensorrt`: the same through TensorRT engines (CUDA).
  Without `export_dir`, the export is made (or reused) in `<checkpoint>/onnx/`.
The stages' wall times of the last call are kept in `last_timings` (seconds).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from engine.checkpoint import load_checkpoint, read_checkpoint_config
from engine.gallery import Gallery

log = logging.getLogger(__name__)
BACKENDS = ("torch", "triton", "onnxruntime", "tensorrt")
EXPORTED = ("onnxruntime", "tensorrt")  # backends that run `cvr export`'s files, not the checkpoint's modules


class QueryError(ValueError):
    """A query the engine cannot answer (one-line message)."""


@dataclass
class SearchResult:
    query: str
    hits: list  # [(video_id, score)], best first
    anchor: str | None = None  # path of the anchor image, when anchors are cached on disk


@dataclass
class Timings:
    text: float = 0.0
    anchor: float = 0.0
    vision: float = 0.0
    tower: float = 0.0
    scoring: float = 0.0
    queries: int = 0
    extra: dict = field(default_factory=dict)

    def per_query_ms(self) -> dict:
        n = max(self.queries, 1)
        return {k: 1000.0 * getattr(self, k) / n for k in ("text", "anchor", "vision", "tower", "scoring")}


def _check_device(device: str) -> str:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise QueryError(f"unknown device {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise QueryError(f"device {device!r} asked for, but no CUDA GPU is available")
    return device


class Retriever:
    """`Retriever(checkpoint, gallery, backend=..., generator=..., device=...)`; `search(texts, k)`."""

    def __init__(self, checkpoint: str, gallery: str, backend: str = "torch", generator: str | None = None,
                 device: str = "cpu", steps: int | None = None, anchor_cache: str | None = None,
                 vision_weights: str | None = None, export_dir: str | None = None):
        if backend not in BACKENDS:
            raise QueryError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        self.engine = None  # the exported backend's pipeline, for EXPORTED backends
        if backend in EXPORTED:
            self.backend, self.device, self.steps = backend, device, steps
            self._init_exported(checkpoint, gallery, generator, anchor_cache, vision_weights, export_dir)
            self.last_timings = Timings()
            return
        self.backend, self.device = backend, _check_device(device)
        self.model = load_checkpoint(checkpoint, device=device)
        self.config = read_checkpoint_config(checkpoint)
        self.gallery = Gallery.load(gallery, checkpoint_id=self.model.checkpoint_id)
        self.videos = self.gallery.embeddings(torch.float32)
        self.videos.lat, self.videos.con = self.videos.lat.to(device), self.videos.con.to(device)
        self.generator = self.extractor = None
        self.steps = steps
        if self.model.config.use_anchor:
            self._load_anchor_path(generator, anchor_cache, vision_weights)
        self.last_timings = Timings()

    def _load_anchor_path(self, generator, anchor_cache, vision_weights) -> None:
        from engine.anchors import AnchorGenerator, GeneratorOptions
        from engine.vision import RegionExtractor, VisionConfig

        meta = self.config.get("anchors") or {}
        generator = generator or meta.get("generator")
        if not generator:
            raise QueryError("this checkpoint uses anchors: pass the generator folder (--generator DIR)")
        steps = self.steps if self.steps is not None else meta.get("steps")
        options = GeneratorOptions(steps=steps, seed=int(meta.get("seed", 0)))
        # The generator loads its own copy of the text encoder it was trained with: the retrieval
        # model's may be finetuned or truncated differently, and anchors must match the store's.
        self.generator = AnchorGenerator.load(generator, options, device=self.device, cache_dir=anchor_cache)
        image_size = int(meta.get("image_size", self.generator.image_size))
        self.extractor = RegionExtractor.from_config(VisionConfig(image_size=image_size, weights=vision_weights),
                                                     device=self.device)
        self.anchor_cache = anchor_cache

    def _init_exported(self, checkpoint, gallery, generator, anchor_cache, vision_weights, export_dir) -> None:
        """The query path through exported graphs: no torch module is loaded (the gallery is read
        with torch, then held as numpy arrays)."""
        from engine.checkpoint import WEIGHTS, CheckpointError, checkpoint_id

        if self.backend == "tensorrt":
            from engine.backends.tensorrt import tensorrt_unavailable

            if reason := tensorrt_unavailable():
                raise QueryError(reason)
        self.config = read_checkpoint_config(checkpoint)
        if not os.path.isfile(os.path.join(checkpoint, WEIGHTS)):
            raise CheckpointError(f"{checkpoint}: no {WEIGHTS}")
        ckpt_id = checkpoint_id(checkpoint)
        self.gallery = Gallery.load(gallery, checkpoint_id=ckpt_id)
        videos = self.gallery.embeddings(torch.float32)
        self.video_arrays = (videos.lat.numpy(), videos.con.numpy())
        self.model = self.videos = self.extractor = None
        folder = export_dir or self._export(checkpoint, generator, vision_weights)
        meta = self.config.get("anchors") or {}
        steps = self.steps if self.steps is not None else meta.get("steps")
        cache = None
        if anchor_cache and meta:
            from engine.anchors import AnchorCache

            cache = AnchorCache(anchor_cache)
        self.engine = self._open_backend(folder, steps, int(meta.get("seed", 0)), cache)
        self._check_export(checkpoint, ckpt_id, generator if export_dir else None,
                           vision_weights if export_dir else None)
        self.engine.open_search_modules()
        self.generator, self.anchor_cache = self.engine.generator, anchor_cache

    def _export(self, checkpoint: str, generator, vision_weights) -> str:
        """Export (or reuse) the search modules in `<checkpoint>/onnx/`. export/ builds on engine/;
        imported here, lazily, because only this path needs it."""
        from export.onnx import SEARCH_MODULES, ExportOptions, export_onnx

        out = os.path.join(checkpoint, "onnx")
        if self.backend == "tensorrt":
            from export.tensorrt import TensorRTOptions, export_tensorrt

            options = TensorRTOptions(modules=SEARCH_MODULES, generator=generator, vision_weights=vision_weights,
                                      log=log.info)
            export_tensorrt(checkpoint, out, options)
            return out
        options = ExportOptions(modules=SEARCH_MODULES, generator=generator, vision_weights=vision_weights,
                                log=log.info)
        return export_onnx(checkpoint, out, options).folder

    def _open_backend(self, folder: str, steps, seed: int, cache):
        from engine.backends.onnxruntime import ExportedModelError

        try:
            if self.backend == "tensorrt":
                from engine.backends.tensorrt import TensorRTBackend

                return TensorRTBackend(folder, steps=steps, seed=seed, anchor_cache=cache)
            from engine.backends.onnxruntime import OnnxRuntimeBackend

            return OnnxRuntimeBackend(folder, device=self.device, threads=torch.get_num_threads(), steps=steps,
                                      seed=seed, anchor_cache=cache)
        except ExportedModelError as error:
            raise QueryError(str(error)) from None

    def _check_export(self, checkpoint: str, ckpt_id: str, generator: str | None, vision: str | None) -> None:
        """An explicit export folder must come from this checkpoint (and generator, and vision weights)."""
        manifest = self.engine.manifest
        if manifest["checkpoint"]["id"] != ckpt_id:
            raise QueryError(f"{self.engine.folder}: exported from checkpoint {manifest['checkpoint']['id'][:12]}, "
                             f"not {ckpt_id[:12]}: run `cvr export --checkpoint {checkpoint}` again")
        anchors = manifest.get("anchors")
        if anchors and generator:
            from engine.anchors import generator_id

            if generator_id(generator) != anchors["generator"]["id"]:
                raise QueryError(f"{self.engine.folder}: exported with generator {anchors['generator']['id']}, "
                                 f"not {generator}")
        if anchors and vision:
            from export.onnx import vision_id

            if vision_id(vision) != anchors["vision"]["id"]:
                raise QueryError(f"{self.engine.folder}: exported with other vision weights than {vision}")

    @staticmethod
    def clean_queries(texts) -> list:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise QueryError("no query given")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise QueryError(f"query {i + 1} is empty or whitespace only")
        return [" ".join(t.split()) for t in texts]

    def _warn_long(self, texts: list) -> None:
        text = self.engine.text if self.engine is not None else self.model.text
        limit = getattr(text, "max_length", None)
        counter = getattr(text, "n_tokens", None)
        if not (limit and counter):
            return
        for i, n in enumerate(counter(texts)):
            if n > limit:
                log.warning("query %d has %d tokens: truncated to the text encoder's %d", i + 1, n, limit)

    @torch.no_grad()
    def search(self, texts, k: int = 10, batch_size: int = 64) -> list:
        """Top-k videos for every text: a list of SearchResult, in the order of `texts`."""
        texts = self.clean_queries(texts)
        n_videos = len(self.gallery)
        if not 1 <= int(k) <= n_videos:
            raise QueryError(f"k must be between 1 and the gallery size {n_videos}, got {k}")
        self._warn_long(texts)
        timings = Timings(queries=len(texts))
        results = []
        for start in range(0, len(texts), batch_size):
            results += self._search_batch(texts[start : start + batch_size], int(k), timings)
        self.last_timings = timings
        return results

    def _search_batch(self, texts: list, k: int, timings: Timings) -> list:
        if self.engine is not None:
            return self._search_batch_exported(texts, k, timings)
        clock = time.perf_counter()
        features = self.model.text(texts)
        timings.text += time.perf_counter() - clock
        regions, anchor_paths = None, [None] * len(texts)
        if self.generator is not None:
            clock = time.perf_counter()
            images = self.generator.generate(texts)
            timings.anchor += time.perf_counter() - clock
            anchor_paths = self._save_anchor_pngs(texts, images)
            clock = time.perf_counter()
            regions = self.extractor.regions(images).to(self.device)
            timings.vision += time.perf_counter() - clock
        clock = time.perf_counter()
        query = self.model.encode_text_features(features, regions, backend=self.backend)
        timings.tower += time.perf_counter() - clock
        clock = time.perf_counter()
        values, indices = self.model.score(query, self.videos, backend=self.backend, k=k)
        timings.scoring += time.perf_counter() - clock
        return self._results(texts, values, indices, anchor_paths)

    def _search_batch_exported(self, texts: list, k: int, timings: Timings) -> list:
        """The same stages as _search_batch, through the exported backend (numpy arrays)."""
        engine = self.engine
        clock = time.perf_counter()
        text = engine.encode_text(texts)
        timings.text += time.perf_counter() - clock
        regions, anchor_paths = None, [None] * len(texts)
        if engine.anchors:
            clock = time.perf_counter()
            images = engine.generate(texts)
            timings.anchor += time.perf_counter() - clock
            anchor_paths = self._save_anchor_pngs(texts, images)
            clock = time.perf_counter()
            regions = engine.regions(images)
            timings.vision += time.perf_counter() - clock
        clock = time.perf_counter()
        lat, con = engine.encode_queries(text, regions)
        timings.tower += time.perf_counter() - clock
        clock = time.perf_counter()
        values, indices = engine.topk(lat, con, *self.video_arrays, k)
        timings.scoring += time.perf_counter() - clock
        return self._results(texts, values, indices, anchor_paths)

    def _results(self, texts: list, values, indices, anchor_paths: list) -> list:
        ids = self.gallery.ids
        return [
            SearchResult(text, [(ids[j], float(v)) for v, j in zip(row_v.tolist(), row_i.tolist(), strict=True)],
                         anchor=path)
            for text, row_v, row_i, path in zip(texts, values, indices, anchor_paths, strict=True)
        ]

    def _save_anchor_pngs(self, texts: list, images) -> list:
        """With an anchor cache, each query's anchor is also kept as a PNG a person can open."""
        if not self.anchor_cache:
            return [None] * len(texts)
        import hashlib
        import os

        from PIL import Image

        folder = os.path.join(self.anchor_cache, "png")
        os.makedirs(folder, exist_ok=True)
        paths = []
        for text, image in zip(texts, images, strict=True):
            steps = self.generator.options.steps or self.generator.default_steps  # the steps actually used
            key = f"{self.generator.generator_id}|{self.generator.adapter_id}|{steps}|{text}"
            name = hashlib.sha256(key.encode()).hexdigest()[:16]
            path = os.path.join(folder, f"{name}.png")
            if not os.path.exists(path):
                Image.fromarray(image).save(path + ".tmp.png")
                os.replace(path + ".tmp.png", path)
            paths.append(path)
        return paths
