"""What both query paths need, written once with numpy and the standard library only.

The PyTorch path (engine/anchors.py, engine/text.py, engine/backends/pytorch.py) and the torch-free
exported path (engine/backends/onnxruntime.py) must draw the same anchors, tokenise the same way and
rank the same way, so the pieces they share live here and nowhere else:

- prompt seeds and the generator's starting noise (`prompt_seed`, `initial_noise`): one numpy
  draw per prompt, passed into the sampler as diffusers lets callers pass ``latents`` in;
- the flow-matching sigmas, FLUX's latent packing and the decoding of folded-pixel latents;
- the anchor cache (its keys, and the noise scheme it was drawn with);
- RIVRL's tokenizer (words, special tokens, padding);
- the stable top-k and its running merge (ties go to the lower index everywhere).

`pack_latents` and `unpack_latents` take numpy arrays or torch tensors alike (reshape and permute
only), so training code keeps its tensors on their device.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.errors import CVRError

log = logging.getLogger(__name__)


class AnchorError(CVRError):
    """Bad input for the anchor generator, or an anchor cache or store that cannot be used
    (one-line message)."""


# ---------------------------------------------------------------------------------------------
# Seeds and noise

# The generator's starting noise: numpy's default bit generator (PCG64) seeded with the prompt's
# seed, standard normal float32. Recorded in anchor caches, anchor stores and checkpoints: anchors
# drawn with another scheme are not the anchors this engine would draw.
NOISE_SCHEME = "numpy-pcg64-standard-normal-float32/1"


def prompt_seed(prompt: str, seed: int = 0) -> int:
    """A fixed seed per (prompt, seed): the same prompt always gets the same noise, whatever batch
    it is drawn in."""
    digest = hashlib.sha256(f"{int(seed)}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def initial_noise(seeds: Sequence[int], shape: tuple) -> np.ndarray:
    """(len(seeds), *shape) float32 standard normal noise, one independent draw per seed."""
    return np.stack([np.random.default_rng(int(s)).standard_normal(shape, dtype=np.float32) for s in seeds])


# ---------------------------------------------------------------------------------------------
# Flow matching and FLUX's latent layout


def flow_sigmas(steps: int) -> np.ndarray:
    """The Euler sigmas FluxPipeline uses with schnell's scheduler (shift 1, no dynamic shift):
    ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/N, N))`` + the final 0,
    i.e. linspace(1, 0, N+1), float32. A test checks the two agree."""
    if int(steps) < 1:
        raise AnchorError(f"steps must be >= 1, got {steps}")
    return np.linspace(1.0, 0.0, int(steps) + 1).astype(np.float32)


def _permute(x, axes: tuple):
    """Axis permutation of a numpy array or a torch tensor (which spells it `permute`)."""
    return x.permute(*axes) if hasattr(x, "permute") else np.transpose(x, axes)


def pack_latents(latents):
    """(B, C, h, w) -> (B, h/2*w/2, 4C): FluxPipeline._pack_latents (2x2 latent pixels per token)."""
    b, c, h, w = latents.shape
    x = _permute(latents.reshape(b, c, h // 2, 2, w // 2, 2), (0, 2, 4, 1, 3, 5))
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens, h: int, w: int):
    """(B, h/2*w/2, 4C) -> (B, C, h, w): the inverse of :func:`pack_latents`."""
    b, _, c4 = tokens.shape
    x = _permute(tokens.reshape(b, h // 2, w // 2, c4 // 4, 2, 2), (0, 3, 1, 4, 2, 5))
    return x.reshape(b, c4 // 4, h, w)


def latents_to_images(latents: np.ndarray, fold: int) -> np.ndarray:
    """Folded-pixel latents (B, 3*fold^2, S/fold, S/fold) in [-1, 1] -> uint8 images (B, S, S, 3):
    pixel_shuffle(fold), clamp, round to the nearest of 256 levels."""
    b, c, h, w = latents.shape
    x = np.asarray(latents, dtype=np.float32).reshape(b, c // (fold * fold), fold, fold, h, w)
    pixels = x.transpose(0, 1, 4, 2, 5, 3).reshape(b, c // (fold * fold), h * fold, w * fold)
    pixels = ((np.clip(pixels, -1, 1) + np.float32(1.0)) * np.float32(127.5)).round()
    return pixels.astype(np.uint8).transpose(0, 2, 3, 1)


# ---------------------------------------------------------------------------------------------
# The anchor cache

CACHE_FORMAT = "cvr-sdgm/anchor-cache/2"  # 2: each entry carries its key and the sha256 of its pixels
OLD_CACHE_FORMATS = ("cvr-sdgm/anchor-cache/1",)
CACHE_META = "cache.json"


def anchor_cache_key(prompt: str, generator: str, adapter: str, steps: int, size: int, seed: int) -> str:
    """The cache key of one anchor: (prompt, generator id, adapter id, steps, size, seed)."""
    payload = json.dumps([prompt, generator, adapter, int(steps), int(size), int(seed)])
    return hashlib.sha256(payload.encode()).hexdigest()


class AnchorCache:
    """Anchors on disk, one .npz per key (uint8 H x W x 3 pixels, the key, their sha256), written
    atomically and read with allow_pickle=False. The folder's cache.json records the noise scheme
    its anchors were drawn with; a folder drawn with another scheme (or holding something else) is
    refused."""

    def __init__(self, folder):
        from engine import files

        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0
        if self.folder.exists() and not self.folder.is_dir():
            raise AnchorError(f"anchor cache {self.folder} exists and is not a folder")
        meta_path = self.folder / CACHE_META
        files.clean_stale(meta_path)  # a dead writer's temporary cache.json
        if meta_path.is_file():
            self._check(meta_path)
        elif self.folder.is_dir() and any(not p.name.startswith(".") for p in self.folder.iterdir()):
            raise AnchorError(f"anchor cache {self.folder}: holds files but no {CACHE_META} (made before the "
                              f"noise scheme was recorded, or not a cache): delete it or use another folder")
        else:  # a new cache (two processes starting one at once write the same file)
            files.write_json(meta_path, {"format": CACHE_FORMAT, "noise": NOISE_SCHEME})

    @staticmethod
    def _check(meta_path: Path) -> None:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and meta.get("format") in OLD_CACHE_FORMATS:
            raise AnchorError(f"anchor cache {meta_path.parent} was written by an older engine (entries without "
                              "digests): delete it (it is only a cache) or use another folder")
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            raise AnchorError(f"{meta_path}: not an anchor cache")
        if meta.get("noise") != NOISE_SCHEME:
            raise AnchorError(f"anchor cache {meta_path.parent} was drawn with noise {meta.get('noise')!r}, "
                                   f"this engine draws {NOISE_SCHEME!r}: delete it or use another folder")

    key = staticmethod(anchor_cache_key)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npz"

    def get(self, key: str) -> np.ndarray | None:
        """The cached anchor of `key`, or None. An entry is used only when it names this key and
        its pixels match its digest; a damaged or misplaced one is reported and drawn again."""
        path = self._path(key)
        image = self._read(path, key) if path.is_file() else None
        if image is None:
            self.misses += 1
            return None
        self.hits += 1
        return image

    @staticmethod
    def _read(path: Path, key: str) -> np.ndarray | None:
        try:
            with np.load(path, allow_pickle=False) as entry:
                image, stored_key, digest = entry["image"], str(entry["key"]), str(entry["sha256"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            image = stored_key = digest = None
        if image is None or stored_key != key or digest != _pixels_digest(image):
            log.warning("anchor cache entry %s is damaged or not this prompt's: drawing it again", path)
            return None
        return image

    def put(self, key: str, image: np.ndarray) -> None:
        from engine import files

        image = np.ascontiguousarray(image, dtype=np.uint8)
        with files.atomic_path(self._path(key)) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, image=image, key=np.str_(key), sha256=np.str_(_pixels_digest(image)))


def _pixels_digest(image: np.ndarray) -> str:
    """sha256 of an anchor's shape and uint8 pixels."""
    return hashlib.sha256(repr(image.shape).encode() + np.ascontiguousarray(image).tobytes()).hexdigest()


def png_name(generator_id: str, adapter_id: str, steps: int, prompt: str) -> str:
    """File name of a query's anchor PNG (kept beside the anchor cache for people to open)."""
    return hashlib.sha256(f"{generator_id}|{adapter_id}|{steps}|{prompt}".encode()).hexdigest()[:16] + ".png"


# ---------------------------------------------------------------------------------------------
# RIVRL's tokenizer

# RIVRL's rnn vocabulary starts with <pad>, <start>, <end>, <unk>. All four are kept (word
# sequences are wrapped in <start> ... <end> as RIVRL's data provider does, which also gives an
# empty caption two real positions), numbered <pad>=0, <unk>=1, <start>=2, <end>=3.
SPECIALS = ("<pad>", "<unk>", "<start>", "<end>")
PAD, UNK, START, END = range(4)
_NON_ALNUM = re.compile(r"[^A-Za-z0-9]")


def rivrl_words(text: str) -> list[str]:
    """RIVRL's ``clean_str``: every non-ASCII-alphanumeric character is a separator, lowercase."""
    return _NON_ALNUM.sub(" ", text).lower().split()


def rivrl_encode(stoi: dict, text: str, max_length: int | None = None) -> list[int]:
    """``<start> words... <end>`` as indices (unknown words: <unk>); at most ``max_length`` of them
    (<end> is kept)."""
    ids = [stoi.get(w, UNK) for w in rivrl_words(text)]
    if max_length is not None:
        ids = ids[: max(0, max_length - 2)]
    return [START, *ids, END]


def pad_rows(rows: list, pad_id: int, side: str = "right") -> tuple:
    """(ids, mask), both int64 (B, L): token rows padded to the longest one."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Stable top-k


def topk_stable(scores: np.ndarray, k: int) -> tuple:
    """Top-k per row of (Q, N) scores, descending, ties broken by the lower column index: the first
    k of a full stable sort. argpartition finds the k-th value; every column at least as large
    (ties included) is then sorted by (-score, column)."""
    q, n = scores.shape
    k = min(int(k), n)
    values = np.empty((q, k), dtype=scores.dtype)
    indices = np.empty((q, k), dtype=np.int64)
    for i, row in enumerate(scores):
        # NaN ranks last (as -inf) rather than breaking the selection; callers refuse it afterwards.
        nan = np.isnan(row)
        key = np.where(nan, -np.inf, row) if nan.any() else row
        if k < n:
            kth = np.partition(key, n - k)[n - k]
            candidates = np.flatnonzero(key >= kth)
        else:
            candidates = np.arange(n)
        order = candidates[np.lexsort((candidates, -key[candidates]))][:k]
        values[i], indices[i] = row[order], order
    return values, indices


def merge_topk(best: tuple | None, block: tuple, k: int) -> tuple:
    """Merge a running top-k (values, indices) with a later block's: the running one holds lower
    indices and comes first, so ties keep the lower index."""
    if best is None:
        return block
    values = np.concatenate([best[0], block[0]], axis=1)
    indices = np.concatenate([best[1], block[1]], axis=1)
    top, order = topk_stable(values, k)
    return top, np.take_along_axis(indices, order, axis=1)

