"""RIVRL's text encoder (Dong et al., TCSVT 2022, inherited from dual encoding): bag of words + BiGRU
over learned word embeddings + 1-D CNN (kernels 2, 3, 4) over the BiGRU outputs, with a
:class:`Vocabulary` built from the training captions. The text side of the RIVRL-parity baseline;
engine/text.py has the shared types and the factory. Word splitting, the special tokens and padding
are engine/portable.py's, which the exported (torch-free) path uses too.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from engine.portable import PAD, SPECIALS, UNK, pad_rows, rivrl_encode, rivrl_words
from engine.text import TextEncoderConfig, TextEncoderError, TextFeatures, _check_texts, _short_hash

log = logging.getLogger(__name__)


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
            raise TextEncoderError(f"no word occurs at least {min_count} times in {n} captions: lower min_count")
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
