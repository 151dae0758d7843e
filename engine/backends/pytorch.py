"""The query path in PyTorch: the checkpoint's own modules (the reference every other backend is
checked against), on any torch device; with `kernels=True` the Triton kernels are swapped in
(engine/backends/triton.py), which is the `triton` backend.

`TorchPipeline` is what engine.retriever.Retriever drives: text -> anchor -> regions -> query
embeddings (numpy, float32), and a `TorchScorer` for engine.search.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from engine.checkpoint import anchor_generator, load_checkpoint, read_checkpoint_config, warn_on_other_noise
from engine.errors import CVRError
from engine.model import Embeddings
from engine.search import BLOCK_ELEMENTS, block_rows

GPU_BLOCK_ELEMENTS = 1 << 26  # not measured yet: no GPU has run this path (see the README)


class DeviceError(CVRError):
    """A torch device that does not exist or is not available (one-line message)."""


def check_device(device: str) -> str:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} asked for, but no CUDA GPU is available")
    return device


class TorchScorer:
    """engine.search.Scorer over a model's matcher: float32 blocks on the model's device."""

    def __init__(self, model, device: str):
        self.matcher, self.device = model.matcher, torch.device(device)
        self.latent_dim, self.concept_dim = model.config.latent_dim, model.config.concept_dim

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        """A float32 copy on the device. torch casts float16 blocks ~6x faster than numpy; a block may
        be a read-only view of the memory-mapped gallery, which torch warns about but the cast
        never writes to."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(array)
        return tensor.to(self.device, torch.float32, copy=True)

    @torch.no_grad()
    def scores(self, q_lat, q_con, lat, con) -> np.ndarray:
        query = Embeddings(self._tensor(q_lat), self._tensor(q_con))
        video = Embeddings(self._tensor(lat), self._tensor(con))
        return self.matcher(query, video).float().cpu().numpy()

    def block_rows(self, queries: int) -> int:
        # A GPU wants far larger blocks than a CPU's caches: each block is one host-to-device copy.
        budget = GPU_BLOCK_ELEMENTS if self.device.type == "cuda" else BLOCK_ELEMENTS
        return block_rows(queries, self.latent_dim, self.concept_dim, budget)


class GLSCLScorer(TorchScorer):
    """engine.search.Scorer of a glscl checkpoint (engine/glscl.py): the same float32 blocks through
    its matcher (kernels.reference.glscl_score), fewer rows per block since each row holds
    1+F+K vectors of width D."""

    def __init__(self, model, device: str):
        super().__init__(model, device)
        self.config = model.config

    def block_rows(self, queries: int) -> int:
        from engine.glscl import block_rows as glscl_block_rows

        budget = GPU_BLOCK_ELEMENTS if self.device.type == "cuda" else BLOCK_ELEMENTS
        return glscl_block_rows(queries, self.config, budget)


def scorer_for(model, device: str) -> TorchScorer:
    """The Scorer of a loaded model (or load_matcher's namespace) for its head."""
    return GLSCLScorer(model, device) if model.config.head == "glscl" else TorchScorer(model, device)


class TorchPipeline:
    """The checkpoint's text encoder, generator, ResNet-50 and query tower, loaded once."""

    def __init__(self, checkpoint: str, device: str = "cpu", generator: str | None = None, steps: int | None = None,
                 anchor_cache: str | None = None, vision_weights: str | None = None, kernels: bool = False):
        self.device = check_device(device)
        self.model = load_checkpoint(checkpoint, device=device)
        if kernels:
            from engine.backends.triton import use_triton_kernels

            use_triton_kernels(self.model)
        self.checkpoint_id = self.model.checkpoint_id
        self.anchors = bool(self.model.config.use_anchor)
        self.anchors_per_query = 1  # the checkpoint's (config "anchors"), read with the anchor path
        self.anchor_features = "pixels"  # or "latent": the generator's final latent, no ResNet
        self.generator = self.extractor = None
        self.provider = None
        if self.anchors:
            self._load_anchor_path(checkpoint, generator, steps, anchor_cache, vision_weights)
        self.scorer = scorer_for(self.model, device)

    def _load_anchor_path(self, checkpoint, generator, steps, anchor_cache, vision_weights) -> None:
        from engine.anchors import AnchorGenerator, GeneratorOptions
        from engine.vision import RegionExtractor, VisionConfig

        config = read_checkpoint_config(checkpoint)
        meta = config.get("anchors") or {}
        from engine.anchor_store import LATENT, anchor_features, anchors_per_query

        self.anchors_per_query = anchors_per_query(meta)
        self.anchor_features = anchor_features(meta)
        warn_on_other_noise(checkpoint, config)
        folder = anchor_generator(checkpoint, config, generator)
        steps = steps if steps is not None else meta.get("steps")
        options = GeneratorOptions(steps=steps, seed=int(meta.get("seed", 0)))
        # The generator loads its own copy of the text encoder it was trained with: the retrieval
        # model's may be finetuned or truncated differently, and anchors must match the store's.
        self.generator = AnchorGenerator.load(folder, options, device=self.device, cache_dir=anchor_cache)
        if self.anchor_features == LATENT:  # regions straight from the sampler: no ResNet to load
            return
        image_size = int(meta.get("image_size", self.generator.image_size))
        self.extractor = RegionExtractor.from_config(VisionConfig(image_size=image_size, weights=vision_weights),
                                                     device=self.device)

    @property
    def max_length(self) -> int | None:
        return getattr(self.model.text, "max_length", None)

    def token_counts(self, texts: list) -> list:
        return self.model.text.n_tokens(texts)

    @torch.no_grad()
    def encode_text(self, texts: list):
        return self.model.text(texts)

    def generate(self, texts: list, draw: int = 0) -> np.ndarray:
        """Anchor `draw` of each text (seed = the checkpoint's seed + draw, as the store drew it)."""
        return self.generator.generate(texts, seed=self.generator.options.seed + draw)

    def latents(self, texts: list, draw: int = 0) -> np.ndarray:
        """Anchor `draw`'s final latent tokens (B, L, C) of each text: a latent checkpoint's regions."""
        return self.generator.generate_latents(texts, seed=self.generator.options.seed + draw)

    @torch.no_grad()
    def regions(self, images: np.ndarray) -> torch.Tensor:
        return self.extractor.regions(images).to(self.device)

    @torch.no_grad()
    def encode_queries(self, text, regions=None) -> tuple:
        if isinstance(regions, np.ndarray):  # latent regions come from the sampler as numpy
            regions = torch.from_numpy(regions).to(self.device)
        emb = self.model.encode_text_features(text, regions)
        return emb.lat.float().cpu().numpy(), emb.con.float().cpu().numpy()
