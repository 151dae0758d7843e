"""Batched text -> top-k videos over a persisted gallery, through a chosen backend.

One `search` call runs the whole query path in batches: text encoder, anchor generation (with its
on-disk cache), ResNet-50 regions, query tower, then the gallery search of engine/search.py
(exhaustive in blocks, or FAISS + exact rerank). Backends (each a pipeline object with the same
methods, engine/backends/):
- `torch`: the checkpoint's PyTorch modules, the reference (any device);
- `triton`: the same with the fused Triton kernels swapped in (CUDA; under TRITON_INTERPRET=1 they
  also run on the CPU, which is how the tests check them);
- `onnxruntime`: the graphs of an export folder (`cvr export`) through ONNX Runtime, numpy only:
  this module and that backend import no torch; `tensorrt`: the same through TensorRT engines.
  Both take the export folder (`export_dir`); the Retriever never exports anything itself.
The stages' wall times of the last call are kept in `last_timings` (seconds), with whether it was
the first (cold) search of this Retriever.

An optional generative reranker (engine/reranking.py, `cvr train-reranker`; `reranker=` a folder or
a loaded one) rescored each query's top M: the first stage then searches max(k, M) candidates (any
mode, filters included), the reranker re-sorts the first M and the top k are returned; its time is
the "rerank" stage.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from engine import files
from engine.errors import CVRError
from engine.gallery import Gallery
from engine.search import SearchOptions, keep_freed_memory
from engine.search import search as gallery_search

log = logging.getLogger(__name__)
BACKENDS = ("torch", "triton", "onnxruntime", "tensorrt")
EXPORTED = ("onnxruntime", "tensorrt")  # backends that run `cvr export`'s files, not the checkpoint's modules
STAGES = ("text", "anchor", "vision", "tower", "search")
RERANK = "rerank"  # the reranker's stage: in the timings only of a Retriever that has one


class QueryError(CVRError):
    """A query the engine cannot answer (one-line message)."""


@dataclass
class SearchResult:
    query: str
    hits: list  # [(video_id, score)], best first
    anchor: str | None = None  # path of the anchor image, when anchors are cached on disk
    # Per hit, in the order of `hits`: path, segment [start, end] (s), segment_score, thumbnail;
    # None values for a gallery built from feature files.
    details: list = field(default_factory=list)


@dataclass
class Timings:
    text: float = 0.0
    anchor: float = 0.0
    vision: float = 0.0
    tower: float = 0.0
    search: float = 0.0
    rerank: float = 0.0  # the generative reranker, when there is one (0 otherwise)
    queries: int = 0
    cold: bool = False  # the first search of its Retriever: includes one-time start-up (lazy loads, caches)
    mode: str = ""  # the gallery search that ran: exhaustive or two-stage
    reranked: int = 0  # M, the candidates a reranker rescored per query (0: none)
    extra: dict = field(default_factory=dict)

    def per_query_ms(self) -> dict:
        n = max(self.queries, 1)
        stages = (*STAGES, RERANK) if self.reranked else STAGES
        return {stage: 1000.0 * getattr(self, stage) / n for stage in stages}

    def describe(self) -> str:
        """The per-stage latency line `cvr search` prints."""
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.per_query_ms().items())
        when = "cold: the first search of this process, with one-time start-up" if self.cold else "warm"
        search = f"{self.mode} search" + (f", top {self.reranked} reranked" if self.reranked else "")
        return f"latency per query (ms, {when}; {search}): {parts}"


def check_backend(backend: str, device: str = "cpu") -> None:
    """Refuse (one line) a backend or device this machine cannot run, before any model loads."""
    from importlib.util import find_spec

    if backend not in BACKENDS:
        raise QueryError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "triton":
        if find_spec("triton") is None:
            raise QueryError("--backend triton needs the triton package (pip install triton)")
        if not str(device).startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
            raise QueryError("--backend triton runs its kernels on a CUDA GPU (--device cuda); on the CPU only "
                             "under TRITON_INTERPRET=1, which is for tests")
    if backend == "onnxruntime" and find_spec("onnxruntime") is None:
        raise QueryError("--backend onnxruntime needs onnxruntime: pip install 'cvr-sdgm[export]'")
    if backend == "tensorrt":
        from engine.backends.tensorrt import tensorrt_unavailable

        if reason := tensorrt_unavailable():
            raise QueryError(reason)
    if backend in ("torch", "triton"):
        from engine.backends.pytorch import check_device

        check_device(device)


def open_pipeline(backend: str, checkpoint: str, device: str = "cpu", generator: str | None = None,
                  steps: int | None = None, anchor_cache: str | None = None, vision_weights: str | None = None,
                  export_dir: str | None = None, threads: int = 1):
    """The query pipeline of one backend (engine/backends/), loaded once."""
    check_backend(backend, device)
    if backend in EXPORTED:
        from engine.backends.exported import open_exported

        return open_exported(backend, checkpoint, export_dir, device, generator, steps, anchor_cache,
                             vision_weights, threads)
    from engine.backends.pytorch import TorchPipeline

    return TorchPipeline(checkpoint, device, generator, steps, anchor_cache, vision_weights,
                         kernels=backend == "triton")


class Retriever:
    """`Retriever(checkpoint, gallery, backend=..., ..., reranker=None)`; `search(texts, k, options)`."""

    reranker = None  # an engine.reranking.Reranker, or None: the first stage's ranking as it is
    _rerank_seconds = 0.0

    def __init__(self, checkpoint: str, gallery: str, backend: str = "torch", generator: str | None = None,
                 device: str = "cpu", steps: int | None = None, anchor_cache: str | None = None,
                 vision_weights: str | None = None, export_dir: str | None = None, threads: int = 1,
                 reranker=None):
        if isinstance(reranker, str):  # a folder: refuse a backend that cannot run it before any load
            from engine.reranking import check_rerank_backend

            check_rerank_backend(backend)
        self.backend = backend
        self.pipeline = open_pipeline(backend, checkpoint, device, generator, steps, anchor_cache, vision_weights,
                                      export_dir, threads)
        self.gallery = Gallery.load(gallery, checkpoint_id=self.pipeline.checkpoint_id)
        self.anchor_cache = anchor_cache
        self.last_timings = Timings()
        self._searched = False
        self._fields = None  # the gallery's filter fields, read at the first filtered search
        if reranker is not None:
            self.set_reranker(reranker, device, threads)
        keep_freed_memory()

    def set_reranker(self, reranker, device: str = "cpu", threads: int = 1) -> None:
        """Rerank every later search with `reranker` (a folder, opened for this backend, or a loaded
        engine.reranking.Reranker); None stops reranking. Refuses (one line) a reranker trained on
        another checkpoint than this Retriever's."""
        if isinstance(reranker, str):
            from engine.reranking import open_reranker, read_reranker_config

            base = read_reranker_config(reranker)["base"]["id"]  # refuse a foreign one before loading it
            if base != self.pipeline.checkpoint_id:
                raise QueryError(f"{reranker}: a reranker of checkpoint {base[:12]}, not of this Retriever's "
                                 f"({self.pipeline.checkpoint_id[:12]}): train one with `cvr train-reranker --base`")
            reranker = open_reranker(reranker, self.backend, device, threads)
        if reranker is not None and reranker.base_id != self.pipeline.checkpoint_id:
            raise QueryError(f"{reranker.folder}: a reranker of checkpoint {reranker.base_id[:12]}, not of this "
                             f"Retriever's ({self.pipeline.checkpoint_id[:12]})")
        self.reranker = reranker

    @classmethod
    def from_parts(cls, pipeline, gallery: Gallery, backend: str, anchor_cache: str | None = None,
                   reranker=None) -> Retriever:
        """A Retriever over a pipeline and a gallery loaded separately (the benchmarks measure the
        memory each one takes); `reranker` a loaded engine.reranking.Reranker or None."""
        retriever = cls.__new__(cls)
        retriever.backend, retriever.pipeline, retriever.gallery = backend, pipeline, gallery
        retriever.anchor_cache, retriever.last_timings, retriever._searched = anchor_cache, Timings(), False
        retriever._fields = None
        if gallery.checkpoint_id != pipeline.checkpoint_id:
            raise QueryError(f"{gallery.folder}: built with another checkpoint than the pipeline's")
        if reranker is not None:
            retriever.set_reranker(reranker)
        keep_freed_memory()
        return retriever

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
        limit = self.pipeline.max_length
        if not limit:
            return
        for i, n in enumerate(self.pipeline.token_counts(texts)):
            if n > limit:
                log.warning("query %d has %d tokens: truncated to the text encoder's %d", i + 1, n, limit)

    def search(self, texts, k: int = 10, batch_size: int = 64, options: SearchOptions | None = None,
               where=None) -> list:
        """Top-k videos for every text: a list of SearchResult, in the order of `texts`. `where`:
        metadata filters ('duration>=10', engine/filters.py) every hit must pass."""
        texts = self.clean_queries(texts)
        n_videos = len(self.gallery)
        if n_videos == 0:
            raise QueryError(f"{self.gallery.folder}: the gallery holds no videos")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= int(k) <= n_videos:
            raise QueryError(f"k must be between 1 and the gallery size {n_videos}, got {k}")
        options = options or SearchOptions()
        allowed = self.allowed(where)
        timings = Timings(queries=len(texts), cold=not self._searched, mode=options.resolved_mode(self.gallery))
        timings.reranked = self.reranker.candidates if self.reranker is not None else 0
        self._warn_long(texts)
        results = []
        for start in range(0, len(texts), batch_size):
            results += self._search_batch(texts[start : start + batch_size], int(k), options, timings, allowed)
        self.last_timings, self._searched = timings, True
        return results

    def allowed(self, where) -> np.ndarray | None:
        """The rows metadata filters pass (None: no filter); FilterError for a bad one."""
        from engine import filters

        conditions = filters.parse_all(where)
        if not conditions:
            return None
        if self._fields is None:
            self._fields = self.gallery.fields()
        return filters.allowed_rows(self._fields, len(self.gallery), conditions)

    def _search_batch(self, texts: list, k: int, options: SearchOptions, timings: Timings,
                      allowed=None) -> list:
        q_lat, q_con, anchor_paths = self._encode(texts, timings)
        clock, self._rerank_seconds = time.perf_counter(), 0.0
        results = self._rank(texts, q_lat, q_con, k, options, allowed, anchor_paths)
        timings.search += time.perf_counter() - clock - self._rerank_seconds
        timings.rerank += self._rerank_seconds
        return results

    def _encode(self, texts: list, timings: Timings) -> tuple:
        """The query path up to the query embeddings: (q_lat, q_con, anchor PNG paths)."""
        pipeline = self.pipeline
        clock = time.perf_counter()
        text = pipeline.encode_text(texts)
        timings.text += time.perf_counter() - clock
        regions, anchor_paths = None, [None] * len(texts)
        if pipeline.anchors and getattr(pipeline, "anchor_features", "pixels") == "latent":
            regions = self._latent_regions(texts, timings)
        elif pipeline.anchors:
            clock = time.perf_counter()
            count = getattr(pipeline, "anchors_per_query", 1)
            # N anchors per query, draw j with seed + j (as `cvr anchors --anchors-per-query` drew them)
            draws = [pipeline.generate(texts, draw=j) if j else pipeline.generate(texts) for j in range(count)]
            timings.anchor += time.perf_counter() - clock
            anchor_paths = self._save_anchor_pngs(texts, draws[0])
            clock = time.perf_counter()
            regions = joint_regions(pipeline.regions(np.concatenate(draws)), count)  # one ResNet batch
            timings.vision += time.perf_counter() - clock
        clock = time.perf_counter()
        q_lat, q_con = pipeline.encode_queries(text, regions)
        timings.tower += time.perf_counter() - clock
        return q_lat, q_con, anchor_paths

    def _latent_regions(self, texts: list, timings: Timings) -> np.ndarray:
        """A latent checkpoint's regions: each draw's final latent tokens side by side, as the
        store keeps them. Nothing is decoded and no ResNet runs, so the vision stage stays 0 (and
        no anchor PNG is written: there is no image)."""
        pipeline, clock = self.pipeline, time.perf_counter()
        count = getattr(pipeline, "anchors_per_query", 1)
        draws = [pipeline.latents(texts, draw=j) for j in range(count)]
        timings.anchor += time.perf_counter() - clock
        return joint_regions(np.concatenate(draws), count)

    def _rank(self, texts: list, q_lat: np.ndarray, q_con: np.ndarray, k: int, options: SearchOptions,
              allowed, anchor_paths: list) -> list:
        """The gallery search of a batch of query embeddings, as SearchResults; with a reranker, the
        first stage's max(k, M) candidates reranked, then the top k."""
        reranker = self.reranker
        wanted = k if reranker is None else min(max(k, reranker.candidates), len(self.gallery))
        values, rows = gallery_search(self.pipeline.scorer, self.gallery, q_lat, q_con, wanted, options, allowed)
        check_scores(values[rows >= 0], self.gallery.folder)
        if reranker is not None:
            clock = time.perf_counter()
            values, rows = reranker.rerank(texts, q_lat, values, rows, self.gallery)
            values, rows = values[:, :k], rows[:, :k]
            check_scores(values[rows >= 0], reranker.folder)
            self._rerank_seconds += time.perf_counter() - clock
        return self._results(texts, values, rows, anchor_paths, q_lat)

    def _results(self, texts: list, values: np.ndarray, rows: np.ndarray, anchor_paths: list,
                 q_lat: np.ndarray) -> list:
        """SearchResults; a row of -1 (fewer candidates than k in two stages) is no hit. Each hit
        gets its path, thumbnail and best segment (the matching moment) where the gallery has them."""
        ids, results = self.gallery.ids, []
        for text, row_v, row_i, path, query in zip(texts, values, rows, anchor_paths, q_lat, strict=True):
            kept = row_i >= 0
            hit_rows, hit_values = row_i[kept], row_v[kept]
            segments = self.gallery.best_segments(hit_rows, query[0])
            details = [hit_details(self.gallery, int(j), segment)
                       for j, segment in zip(hit_rows, segments, strict=True)]
            results.append(SearchResult(text, [(ids[j], float(v)) for v, j in zip(hit_values.tolist(),
                                                                                 hit_rows.tolist(), strict=True)],
                                        anchor=path, details=details))
        return results

    def _save_anchor_pngs(self, texts: list, images) -> list:
        """With an anchor cache, each query's anchor is also kept as a PNG a person can open."""
        if not self.anchor_cache:
            return [None] * len(texts)
        from PIL import Image

        from engine.portable import png_name

        generator = self.pipeline.generator
        steps = generator.options.steps or generator.default_steps  # the steps actually used
        folder = os.path.join(self.anchor_cache, "png")
        paths = []
        for text, image in zip(texts, images, strict=True):
            path = os.path.join(folder, png_name(generator.generator_id, generator.adapter_id, steps, text))
            if not os.path.exists(path):
                with files.atomic_path(path) as temporary:
                    Image.fromarray(image).save(temporary)
            paths.append(path)
        return paths


def joint_regions(regions, count: int):
    """Region grids of `count` draws stacked draw-major ((count*B, R, d): draw j's batch at rows
    [j*B, (j+1)*B)) -> (B, count*R, d), each query's draws side by side along the region axis, as
    the query tower reads them and the anchor store keeps them. Numpy arrays or torch tensors."""
    if count == 1:
        return regions
    rows, r, d = regions.shape
    return regions.reshape(count, rows // count, r, d).swapaxes(0, 1).reshape(rows // count, count * r, d)


def check_scores(values: np.ndarray, where: str) -> None:
    """NaN would rank videos in file order and print as NaN: never silently wrong."""
    if not np.isfinite(values).all():
        raise QueryError(f"scores that are NaN or infinite: the checkpoint or the gallery {where} "
                         "holds damaged values (`cvr doctor` says which)")


def hit_details(gallery, row: int, segment) -> dict:
    """What a hit shows beside its id: its paths, thumbnail and best segment (None values for a
    gallery built from feature files)."""
    paths = gallery.paths(gallery.ids[row]) if gallery.has_media else []
    return {"path": paths[0] if paths else None, "paths": paths,
            "relative_path": os.path.relpath(paths[0], gallery.media_root) if paths else None,
            "segment": segment[0] if segment else None, "segment_score": segment[1] if segment else None,
            "thumbnail": gallery.thumbnail(row) if gallery.has_media else None}
