"""Super Sentence Synthesis: determinism, deduplication, budget, coverage."""
import random
import re

import pytest

from training.ssss import super_sentence, super_sentences

GUITAR = [
    "a man is playing a guitar",
    "a man plays guitar on stage",
    "A man is playing guitar.",
    "a guy is playing the guitar",
    "someone performs a song on a guitar in front of a crowd",
    "a man playing guitar while people watch",
    "a musician plays an acoustic guitar",
    "man playing the guitar and singing",
]
SHAPES = [
    "a small red circle moves to the left on a black background",
    "a tiny red ball slides left while a big blue square rises",
    "a red circle moves left and a blue square moves up",
    "there is a blue square moving up",
    "the video shows a red circle moving to the left",
    "a black and white striped backdrop",
]


def _words(text):
    return set(re.findall(r"[a-z]+", text))


@pytest.fixture(scope="module")
def count_minilm():
    from transformers import AutoTokenizer

    from engine.text import packaged_model_path

    tok = AutoTokenizer.from_pretrained(packaged_model_path(), local_files_only=True)
    return lambda text: len(tok(text)["input_ids"])


@pytest.mark.parametrize("captions", [GUITAR, SHAPES])
def test_deterministic_under_permutation(captions):
    expected = super_sentence(captions, max_tokens=30)
    rng = random.Random(0)
    for _ in range(5):
        shuffled = captions[:]
        rng.shuffle(shuffled)
        assert super_sentence(shuffled, max_tokens=30) == expected
    # Duplicates and case/punctuation variants change nothing.
    assert super_sentence(captions + [c.upper() + "!" for c in captions], max_tokens=30) == expected


def test_deduplicated():
    out = super_sentence(["a man is playing a guitar", "a man plays the guitar", "the man plays a guitar."], 50)
    # All three say the same content words (man, play, guitar): one phrase survives.
    assert "," not in out and out.count("guitar") == 1
    # Each kept phrase adds content the earlier ones did not have.
    phrases = super_sentence(GUITAR, 100).split(", ")
    assert len(phrases) == len(set(phrases)) > 1
    stop = {"a", "the", "is", "on", "in", "of", "an", "and", "while", "someone"}
    seen: set[str] = set()
    for phrase in phrases:
        new = _words(phrase) - seen - stop
        assert new, f"phrase {phrase!r} adds nothing"
        seen |= _words(phrase)


def test_budget_with_minilm_tokenizer(count_minilm):
    for budget in (6, 10, 16, 24, 32, 77):
        for captions in (GUITAR, SHAPES):
            out = super_sentence(captions, budget, count_tokens=count_minilm)
            assert out and count_minilm(out) <= budget, (budget, out)
    # A larger budget keeps more content.
    small, large = (super_sentence(SHAPES, b, count_minilm) for b in (10, 40))
    assert len(_words(large)) > len(_words(small))


def test_budget_whitespace_default_and_truncation_fallback():
    out = super_sentence(GUITAR, 7)
    assert 0 < len(out.split()) <= 7
    # No phrase fits: the best phrase is cut word by word.
    assert super_sentence(["a man plays an old guitar loudly"], 3) == "a man plays"
    assert super_sentence(["guitar"], 1) == "guitar"
    with pytest.raises(ValueError):
        super_sentence(GUITAR, 0)
    with pytest.raises(ValueError):
        super_sentence(["", "  ,. "], 10)


def test_coverage_of_consensus_words(count_minilm):
    # The words most captions share come first, even under a tight budget.
    out = super_sentence(GUITAR, 12, count_minilm)
    assert {"man", "guitar"} <= _words(out) and ("playing" in out or "plays" in out)
    shapes = super_sentence(SHAPES, 24, count_minilm)
    assert {"red", "circle", "blue", "square"} <= _words(shapes)
    # Clause splitting keeps "black and white" together but splits "and a blue square moves up".
    assert "black and white" in super_sentence(SHAPES, 100)


def test_super_sentences_mapping():
    out = super_sentences({"video2": SHAPES, "video1": GUITAR}, 20)
    assert list(out) == ["video2", "video1"]
    assert out["video1"] == super_sentence(GUITAR, 20)
    with pytest.raises(ValueError, match="video9"):
        super_sentences({"video9": []}, 20)
