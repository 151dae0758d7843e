"""Super Sentence Synthesis (SSSS): a video's many captions merged into one comprehensive prompt.

CVR-SDGM finetunes its text-to-image generator on (super sentence, key frame) pairs; its SSSS code
is not public, so this is our definition, built to be deterministic and to fit the generator's
text encoder budget:

1. Normalise every caption (lowercase, words only) and drop duplicates.
2. Split captions into clauses (at punctuation and clause joiners: "while", "as", "then",
   "meanwhile", "whereas", and "and" when a new subject follows: "and a", "and the"...), and
   clauses into chunks before prepositions ("on stage", "in front of a crowd"). The candidates
   are every run of consecutive chunks inside a clause, so a whole clause is a candidate and so
   is each part of it.
3. Score content words (non-stopwords, lightly stemmed so "plays"/"playing" match) by how many
   captions mention them. Greedily keep the candidate whose NEW content words have the highest
   total score; a candidate whose content words are all covered already adds nothing and is
   dropped, and among equal gains the shortest run wins, which trims already-said words off the
   phrase. Candidates that would push the sentence over the token budget are skipped.
4. Join the kept phrases with ", " in the order they were chosen: consensus content first.

Same captions in any order give the same sentence (ties are broken by the text itself).
At query time the SSSS protocol draws anchors from all of a video's captions, which leaks the
answer; benchmarks report it next to the fair per-query protocol (ARCHITECTURE.md section 9).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from engine.errors import InputError

__all__ = ["super_sentence", "super_sentences", "whitespace_tokens"]

SEPARATOR = ", "

# Function words and words about the video itself ("the video shows", "in this clip"): they carry
# no scene content, so they neither earn a phrase its place nor make it redundant.
STOPWORDS = frozenset(
    """a an the this that these those there here it its is are was were be been being am
    and or but of to in on at by for with from into onto over under as while then than
    he she they them his her their him we you i me my our your someone somebody something
    some any one two three several many other another each all both very too also just
    has have had do does did doing not no up out off so if when where which who whom what
    video videos clip clips shows show showing shown see seen seeing scene footage""".split()
)
# Clause joiners; "and" only splits when a new subject follows, so "black and white" stays whole.
_CLAUSE = re.compile(
    r"[,;:.!?()\[\]\"]+|\s(?:while|whereas|meanwhile|as|then|and then)\s"
    r"|\sand\s(?=(?:a|an|the|another|two|three|some|he|she|they|his|her|their|someone|people)\s)"
)
# Chunks start at a preposition, unless the previous word is one too ("out of", "in front of").
PREPOSITIONS = frozenset(
    """on in at with under over near behind into onto inside outside beside across along around
    through toward towards from during above below beneath between against""".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def whitespace_tokens(text: str) -> int:
    """The default token counter: whitespace-separated words."""
    return len(text.split())


def _stem(word: str) -> str:
    """A tiny suffix stripper: plays/playing/played -> play, dance/dances/dancing -> danc,
    runs/running -> run.

    Only a matching key between captions, never shown, so crude is fine as long as it is
    consistent; words of up to three letters are left alone."""
    word = word.split("'")[0]
    if len(word) <= 3:
        return word
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiou":
        word = word[:-1]  # runn(ing) -> run, ball -> bal (and balls -> bal)
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    return word


def _content(words: Iterable[str]) -> frozenset[str]:
    return frozenset(_stem(w) for w in words if w not in STOPWORDS)


def _clauses(caption: str) -> list[list[str]]:
    text = f" {caption.lower()} "
    out = []
    for part in _CLAUSE.split(text):
        words = _WORD.findall(part)
        if words:
            out.append(words)
    return out


def _chunks(words: list[str]) -> list[list[str]]:
    chunks: list[list[str]] = [[]]
    for i, w in enumerate(words):
        if w in PREPOSITIONS and chunks[-1] and words[i - 1] not in PREPOSITIONS:
            chunks.append([])
        chunks[-1].append(w)
    return chunks


def _candidates(captions: Iterable[str]) -> dict[str, frozenset[str]]:
    """Every run of consecutive chunks of every clause -> its content stems."""
    cands: dict[str, frozenset[str]] = {}
    for caption in captions:
        for clause in _clauses(caption):
            chunks = _chunks(clause)
            for i in range(len(chunks)):
                for j in range(i + 1, len(chunks) + 1):
                    words = [w for c in chunks[i:j] for w in c]
                    cands[" ".join(words)] = _content(words)
    return cands


def _normalise(caption: str) -> str:
    return " ".join(_WORD.findall(caption.lower()))


def super_sentence(
    captions: Iterable[str], max_tokens: int, count_tokens: Callable[[str], int] | None = None
) -> str:
    """One comprehensive sentence from a video's captions, at most ``max_tokens`` long.

    count_tokens: text -> its length in the generator's text encoder (e.g.
    ``lambda t: len(tokenizer(t)["input_ids"])``, special tokens included, with max_tokens the
    encoder's max_length); default: whitespace word count. It is assumed not to shrink when
    text is appended (true of word counts and subword tokenizers). If not even one phrase fits, the
    best phrase is cut word by word to fit ("" when not even one word fits).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    count = count_tokens or whitespace_tokens
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, not one string")
    unique = sorted({c for c in (_normalise(c) for c in captions) if c})
    if not unique:
        raise ValueError("no captions with words to merge")

    # Document frequency: in how many (distinct) captions each content stem appears.
    df = Counter(stem for c in unique for stem in _content(c.split()))
    every = _candidates(unique)
    cands = {t: c for t, c in every.items() if c}  # phrases of stopwords only never count
    kept: list[str] = []
    covered: set[str] = set()

    def key(text: str) -> tuple:
        new = cands[text] - covered
        return (-sum(df[s] for s in new), len(text.split()), text)

    while cands:
        # Best first: highest new-content score, then the shortest phrase, then alphabetical.
        chosen = None
        for text in sorted(cands, key=key):
            if count(SEPARATOR.join([*kept, text])) <= max_tokens:
                chosen = text
                break
            # The sentence only grows, so a phrase that does not fit now never will.
            del cands[text]
        if chosen is None:
            break
        kept.append(chosen)
        covered |= cands[chosen]
        # Phrases whose content is now all covered would add nothing: drop them.
        cands = {t: c for t, c in cands.items() if c - covered}

    if not kept:
        best = min(every, key=lambda t: (-sum(df[s] for s in every[t]), len(t.split()), t))
        words = best.split()
        while words and count(" ".join(words)) > max_tokens:
            words.pop()
        return " ".join(words)
    return SEPARATOR.join(kept)


def super_sentences(
    captions_by_video: Mapping[str, Iterable[str]],
    max_tokens: int,
    count_tokens: Callable[[str], int] | None = None,
) -> dict[str, str]:
    """:func:`super_sentence` for every video, in the mapping's order."""
    out = {}
    for video_id, captions in captions_by_video.items():
        try:
            out[video_id] = super_sentence(captions, max_tokens, count_tokens)
        except ValueError as exc:
            raise InputError(f"video {video_id}: {exc}") from None
    return out
