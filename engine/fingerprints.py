"""Ids of weight folders and files: what caches, anchor stores, exports and their checks compare
(standard library only, so the torch-free ONNX Runtime path computes the same ids).

A generator id is its folder's name plus a hash of its transformer weights; an adapter id the hash
of each LoRA file with its scale; a vision id the sha256 of a ResNet-50 weights file or the
fingerprint (file names and sizes) of a Hugging Face folder.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from engine.errors import InputError
from engine.files import sha256_file, sha256_text
from engine.paths import WEIGHTS
from engine.portable import AnchorError

GENERATOR_CONFIG = "config.json"
TRANSFORMER_DIR = "transformer"
LORA_FILE = "pytorch_lora_weights.safetensors"
BUILTIN_VISION = WEIGHTS / "resnet50_synth_bn.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


def short_hash(text: str, n: int = 12) -> str:
    return sha256_text(text)[:n]


def folder_fingerprint(folder: str | Path) -> str:
    """Short hash of config.json and the weight files' names and sizes.

    Names and sizes, not contents: hashing hundreds of MB at every start is too slow, and a
    retrained model almost never keeps every file size."""
    folder = Path(folder)
    entries = sorted(
        (p.name, p.stat().st_size)
        for p in folder.iterdir()
        if p.is_file() and (p.name == "config.json" or p.name.endswith(_WEIGHT_SUFFIXES))
    )
    return short_hash(json.dumps(entries))


def generator_kind(path) -> str:
    """'builtin' or 'flux' for a generator folder; AnchorError for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise AnchorError(f"generator folder not found: {path}")
    if (path / "model_index.json").is_file():
        return "flux"
    if (path / GENERATOR_CONFIG).is_file() and (path / TRANSFORMER_DIR).is_dir():
        try:
            kind = json.loads((path / GENERATOR_CONFIG).read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind == "builtin":
            return "builtin"
    raise AnchorError(f"{path} is not a generator folder (no model_index.json, nor config.json + transformer/)")


def generator_id(path, guidance: float | None = None) -> str:
    """A short id of a generator (name + hash of its weights), for caches, anchor stores and
    exports. A built-in generator sampled with classifier-free guidance other than 1 (`guidance`,
    default the folder's config `guidance_scale`, absent = 1) draws other anchors from the same
    weights: its id says so ("+cfgG"); unguided ids are what they always were."""
    path = Path(path)
    if generator_kind(path) == "builtin":
        weights = sorted((path / TRANSFORMER_DIR).glob("*.safetensors"))
        if guidance is None:
            guidance = float(json.loads((path / "config.json").read_text())["generator"].get("guidance_scale", 1.0))
        scale = "" if guidance == 1.0 else f"+cfg{guidance:g}"
        return f"builtin:{path.name}@{short_hash(''.join(sha256_file(w)[:12] for w in weights))}{scale}"
    return f"flux:{path.name}@{folder_fingerprint(path / TRANSFORMER_DIR)}"


def lora_file(path) -> Path:
    """The LoRA weights file of a path (a file, or a folder holding pytorch_lora_weights.safetensors)."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise AnchorError(f"LoRA weights not found: {path}")
    return path


def adapter_id(adapters: Sequence[tuple[str, float]] = ()) -> str:
    if not adapters:
        return "none"
    return "+".join(f"{sha256_file(lora_file(p))[:12]}x{float(w):g}" for p, w in adapters)


def vision_id(weights: str | None) -> str:
    """What the ResNet-50's weights are: 'random:0', a file's sha256, a folder's fingerprint.
    ValueError when the path does not exist."""
    if weights == "random":
        return "random:0"
    path = weights or str(BUILTIN_VISION)
    if os.path.isdir(path):
        return f"folder:{folder_fingerprint(path)}"
    if not os.path.isfile(path):
        raise InputError(f"vision weights not found: {path}")
    return f"file:{sha256_file(path)[:16]}"
