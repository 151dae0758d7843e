"""The built-in synthetic set's captions: the vocabulary, paraphrased captions of a scene, and caption tags."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from engine.errors import InputError
from training.synthetic_scenes import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, SIZES, Scene, SceneObject

# ---------------------------------------------------------------------------------------------
# Captions

OPENERS = ["", "", "", "there is ", "we see ", "the video shows ", "in this clip "]
JOINERS = [" while ", " and ", " as "]


@dataclass(frozen=True)
class Vocabulary:
    """The words captions choose from: per attribute value, its synonyms (a phrase each)."""

    shapes: dict
    colours: dict
    sizes: dict
    motions: dict
    backgrounds: dict

    FIELDS = ("shapes", "colours", "sizes", "motions", "backgrounds")

    def plus(self, extra: dict) -> Vocabulary:
        """This vocabulary with more synonyms: ``extra`` maps a field to {value: [synonyms]}."""
        tables = {}
        for name in self.FIELDS:
            table = {value: list(words) for value, words in getattr(self, name).items()}
            for value, words in extra.get(name, {}).items():
                if value not in table:
                    raise InputError(f"{name}: unknown value {value!r}")
                table[value] += [w for w in words if w not in table[value]]
            tables[name] = table
        return Vocabulary(**tables)


# The built-in captions' words (the tables of training/synthetic_scenes.py, without the RGB values and scales).
BASE_VOCABULARY = Vocabulary(
    shapes=SHAPES, colours={name: words for name, (_, words) in COLOURS.items()},
    sizes={name: words for name, (_, words) in SIZES.items()}, motions=MOTIONS, backgrounds=BACKGROUNDS,
)


def _describe_object(obj: SceneObject, rng: np.random.Generator, with_size: bool, with_motion: bool,
                     vocab: Vocabulary = BASE_VOCABULARY) -> str:
    words = []
    if with_size:
        words.append(str(rng.choice(vocab.sizes[obj.size])))
    words.append(str(rng.choice(vocab.colours[obj.colour])))
    words.append(str(rng.choice(vocab.shapes[obj.shape])))
    noun = " ".join(words)
    article = "an" if noun[0] in "aeiou" else "a"
    phrase = f"{article} {noun}"
    if with_motion:
        phrase += " " + str(rng.choice(vocab.motions[obj.motion]))
    return phrase


def make_caption(scene: Scene, rng: np.random.Generator, vocab: Vocabulary = BASE_VOCABULARY) -> str:
    """One caption: a random subset of the objects, optional size and background, varied order."""
    return describe_scene(scene, rng, vocab)[0]


def describe_scene(scene: Scene, rng: np.random.Generator, vocab: Vocabulary = BASE_VOCABULARY,
                   every_object: bool = False) -> tuple:
    """(caption, the objects it names): `make_caption`'s draw, telling which objects it chose;
    `every_object` names them all (the same draws, so the rest of the caption is the same)."""
    n_named = int(rng.integers(1, len(scene.objects) + 1))
    named = [scene.objects[i] for i in sorted(rng.permutation(len(scene.objects))[:n_named])]
    if every_object:
        named = list(scene.objects)
    with_size = bool(rng.random() < 0.6)
    with_motion = bool(rng.random() < 0.85)
    parts = [_describe_object(o, rng, with_size, with_motion, vocab) for o in named]
    body = parts[0]
    for part in parts[1:]:
        body += str(rng.choice(JOINERS)) + part
    background = str(rng.choice(vocab.backgrounds[scene.background]))
    style = rng.random()
    if style < 0.35:
        caption = f"{rng.choice(OPENERS)}{body} on {background}"
    elif style < 0.6:
        caption = f"on {background} {body}"
    elif style < 0.75:
        caption = f"{background} with {body}"
    else:  # part of the scene only: no background
        caption = f"{rng.choice(OPENERS)}{body}"
    return " ".join(caption.split()), named


def make_captions(scene: Scene, count: int, rng: np.random.Generator) -> list:
    """`count` distinct captions (distinct where the scene allows; repeats only as a last resort)."""
    captions, tries = [], 0
    while len(captions) < count:
        caption = make_caption(scene, rng)
        tries += 1
        if caption not in captions or tries > 50 * count:
            captions.append(caption)
    return captions


# ---------------------------------------------------------------------------------------------
# Tags: MSR-VTT's tags are content words mined from the captions, with counts.

STOPWORDS = set(
    "a an the on in of with and while as is are to there we see video shows this clip not "
    "up down around into its it at by".split()
)


def caption_tags(captions: list) -> Counter:
    counts: Counter = Counter()
    for caption in captions:
        counts.update(w for w in caption.split() if w not in STOPWORDS)
    return counts

