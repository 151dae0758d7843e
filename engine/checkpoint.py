"""The whole retrieval model (text encoder + towers + matcher) and its checkpoint folder.

A checkpoint is a folder: `model.safetensors` (every trainable tensor and the frozen min-max
constants), `config.json` (every dimension, the text encoder's id and vocabulary, the constants in
readable form) and `train_log.json`. Loading never unpickles anything, and a checkpoint with missing
or mis-shaped tensors fails with one line naming the tensor.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

import torch
from torch import nn

from engine.config import ModelConfig, read_format_json, write_json_atomic
from engine.datasets import move_into_place
from engine.model import Embeddings, Matcher, QueryTower, VideoTower

FORMAT = "cvr-sdgm/checkpoint/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
LOG = "train_log.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded (one-line message)."""


class CVRModel(nn.Module):
    """Text encoder, query tower, video tower and matcher of one CVR-SDGM model."""

    def __init__(self, config: ModelConfig, text_encoder: nn.Module | None = None):
        super().__init__()
        from engine.text import build_text_encoder

        config.validate()
        self.config = config
        self.text = text_encoder if text_encoder is not None else build_text_encoder(config.text)
        self.query = QueryTower(config, self.text.dim_sentence, self.text.dim_tokens)
        self.video = VideoTower(config)
        self.matcher = Matcher(concept_space=config.concept_space, local_branch=config.local_branch)

    def encode_text(self, texts: list, regions: torch.Tensor | None = None, backend: str = "torch") -> Embeddings:
        features = self.text(texts)
        return self.encode_text_features(features, regions, backend)

    def encode_text_features(self, features, regions=None, backend: str = "torch") -> Embeddings:
        return self.query(features.sentence, features.tokens, features.mask, regions, backend)

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor) -> Embeddings:
        return self.video(frames, mask)

    def score(self, query: Embeddings, video: Embeddings, transductive: bool = False, backend: str = "torch",
              k: int | None = None):
        return self.matcher(query, video, transductive=transductive, backend=backend, k=k)

    def trainable_state(self) -> dict:
        """Tensors saved in a checkpoint: all but a frozen pretrained text encoder's (those load
        from the encoder's own folder or package, recorded by id in config.json)."""
        frozen_text = not any(p.requires_grad for p in self.text.parameters())
        return {k: v for k, v in self.state_dict().items() if not (frozen_text and k.startswith("text."))}


def save_checkpoint(model: CVRModel, folder: str, log: list | None = None, extra: dict | None = None) -> str:
    """Write a checkpoint folder atomically (temporary sibling, then rename); returns its id."""
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".ckpt-", dir=parent)
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state().items()}
        save_file(tensors, os.path.join(work, WEIGHTS), metadata={"format": FORMAT})
        config = {
            "format": FORMAT,
            "model": model.config.to_dict(),
            "text_encoder": model.text.describe(),
            "norm": {"order": ["lat_g", "lat_l", "con_g", "con_l"], "min_max": model.matcher.norm.tolist()},
            **(extra or {}),
        }
        write_json_atomic(os.path.join(work, CONFIG), config)
        write_json_atomic(os.path.join(work, LOG), log or [])
        move_into_place(work, folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return checkpoint_id(folder)


def checkpoint_id(folder: str) -> str:
    """sha256 of the weights file and config: what a gallery records to refuse foreign models."""
    digest = hashlib.sha256()
    for name in (WEIGHTS, CONFIG):
        with open(os.path.join(folder, name), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_checkpoint_config(folder: str) -> dict:
    return read_format_json(folder, CONFIG, FORMAT, CheckpointError, "checkpoint")


def load_checkpoint(folder: str, device: str = "cpu") -> CVRModel:
    """Rebuild the model from config.json and load model.safetensors strictly (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from engine.text import build_text_encoder

    config = read_checkpoint_config(folder)
    model_config = ModelConfig.from_dict(config["model"], where=os.path.join(folder, CONFIG))
    text = build_text_encoder(config["text_encoder"])
    saved_id, found_id = config["text_encoder"].get("model_id"), text.describe().get("model_id")
    frozen = not any(p.requires_grad for p in text.parameters())
    if frozen and saved_id and found_id != saved_id:
        # A frozen encoder's weights are not in the checkpoint: a different one would silently
        # change every query's features.
        raise CheckpointError(f"{folder}: trained with text encoder {saved_id}, but {found_id} is installed")
    model = CVRModel(model_config, text)
    weights = os.path.join(folder, WEIGHTS)
    if not os.path.exists(weights):
        raise CheckpointError(f"{folder}: no {WEIGHTS}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights}: unreadable ({str(error).splitlines()[0]})") from None
    expected = model.trainable_state()
    for name, tensor in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{weights}: missing tensor {name}")
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{weights}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {tuple(tensor.shape)}"
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{weights}: unexpected tensor {unexpected[0]}")
    model.load_state_dict(tensors, strict=False)
    model.checkpoint_id = checkpoint_id(folder)
    return model.to(device).eval()
