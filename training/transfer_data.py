"""The transfer protocol's data (issue 17): does an anchor drawn by a generator that knows more than
the retrieval training set help where the training captions fall short?

Two writers, both options of `cvr data synth` (its default output is unchanged):

- the **corpus** (`--corpus`): still images with captions drawn from the whole vocabulary, the
  built-in synonyms plus a set of rarer ones, and every (colour, shape) combination. It stands in
  for the web-scale image-text data a FLUX model is pretrained on; the anchor generator learns from
  it (`cvr generator train --collection corpus`).
- the **transfer collection** (`--transfer`): clips as the built-in collection draws them, except
  that no training or validation caption uses a held-out word (the rarer synonyms) and no training
  or validation clip shows a held-out (colour, shape) pair. Its test split is read in two parts:
  `seen` captions use only seen words and name no held-out pair; `held_out` captions use a held-out
  word or name a held-out pair. `TextData/transfer_split.json` records the held-out vocabulary,
  the pairs and which test caption is in which part, so anyone can rerun the split.

A bag-of-words text encoder trained on the training captions knows none of the held-out words;
MiniLM knows them from its own pretraining; the generator knows them from the corpus.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from engine.errors import InputError
from training import synthetic as syn

SPLIT_FILE = "transfer_split.json"
SPLIT_FORMAT = "cvr-sdgm/transfer-split/1"
PARTS = ("seen", "held_out")

# Rarer synonyms: the corpus uses them beside the built-in ones; no training or validation caption
# of the transfer collection does. One word each, so that a word match finds them.
HELD_OUT_WORDS = {
    "colours": {"red": ["ruby"], "green": ["jade"], "blue": ["sapphire"], "yellow": ["canary"],
                "purple": ["plum"], "orange": ["apricot"], "white": ["ivory"], "cyan": ["aqua"]},
    "shapes": {"circle": ["orb"], "square": ["tile"], "triangle": ["pyramid"], "star": ["pentagram"],
               "cross": ["crosshair"], "diamond": ["kite"]},
    "sizes": {"small": ["miniature"], "large": ["giant"]},
}
# (colour, shape) combinations no training or validation clip shows: each colour and each shape is
# seen in other combinations, so a model that composes attributes can still find them.
HELD_OUT_PAIRS = (("red", "star"), ("blue", "triangle"), ("green", "cross"), ("yellow", "diamond"),
                  ("purple", "circle"), ("orange", "square"))
MAX_TRIES = 200  # draws per caption before a part is given up for a clip (see query_captions)


@dataclass
class TransferSpec:
    """What is held out, and how much of each test clip's captions is drawn as held-out queries."""

    held_out_words: dict = field(default_factory=lambda: json.loads(json.dumps(HELD_OUT_WORDS)))
    held_out_pairs: list = field(default_factory=lambda: [list(p) for p in HELD_OUT_PAIRS])
    held_out_share: float = 0.5

    def validate(self) -> None:
        full = self.vocabulary()  # unknown values raise here
        seen = syn.BASE_VOCABULARY
        for name, table in self.held_out_words.items():
            for value, words in table.items():
                clash = [w for w in words if w in getattr(seen, name)[value] or len(w.split()) != 1]
                if clash:
                    raise InputError(f"held-out {name} words must be new single words, got {clash}")
        for colour, shape in self.pairs():
            if colour not in full.colours or shape not in full.shapes:
                raise InputError(f"unknown held-out pair ({colour}, {shape})")
        if not 0 < self.held_out_share < 1:
            raise InputError(f"held_out_share must be in (0, 1), got {self.held_out_share}")

    def vocabulary(self) -> syn.Vocabulary:
        """Every word: the built-in synonyms and the held-out ones (what the corpus draws from)."""
        return syn.BASE_VOCABULARY.plus(self.held_out_words)

    def pairs(self) -> frozenset:
        return frozenset((str(c), str(s)) for c, s in self.held_out_pairs)

    def words(self) -> set:
        return {w for table in self.held_out_words.values() for words in table.values() for w in words}


def is_held_out(caption: str, named: list, spec: TransferSpec) -> bool:
    """Whether a caption uses a held-out word or names an object of a held-out (colour, shape) pair."""
    pairs = spec.pairs()
    return bool(spec.words() & set(caption.split())) or any((o.colour, o.shape) in pairs for o in named)


def query_captions(scene: syn.Scene, count: int, rng: np.random.Generator, spec: TransferSpec) -> tuple:
    """(captions, parts) of a test clip: about `held_out_share` of `count` held-out captions (drawn
    from every word until one is held out), the others seen (drawn from the built-in words until one
    names no held-out pair). A part a clip cannot give (a seen caption of a clip whose every object
    is a held-out pair) is filled with the other part. Distinct captions where the draws allow."""
    wanted = ["held_out"] * int(round(count * spec.held_out_share))
    wanted += ["seen"] * (count - len(wanted))
    full = spec.vocabulary()
    captions, parts = [], []
    for part in wanted:
        found = _draw_part(scene, rng, spec, full, part, captions)
        if found is None:  # this clip cannot give that part
            part = "held_out" if part == "seen" else "seen"
            found = _draw_part(scene, rng, spec, full, part, captions)
        if found is None:
            raise InputError(f"clip {scene.video_id}: no caption of either part")  # cannot happen: see validate
        captions.append(found)
        parts.append(part)
    return captions, parts


def _draw_part(scene, rng, spec: TransferSpec, full: syn.Vocabulary, part: str, taken: list) -> str | None:
    vocab = full if part == "held_out" else syn.BASE_VOCABULARY
    fallback = None
    for _ in range(MAX_TRIES):
        caption, named = syn.describe_scene(scene, rng, vocab)
        if is_held_out(caption, named, spec) == (part == "held_out"):
            if caption not in taken:
                return caption
            fallback = caption  # a repeat, as make_captions allows as a last resort
    return fallback


def transfer_clips(config: syn.SynthConfig, rng: np.random.Generator, indexes=None, *, spec: TransferSpec,
                   parts: dict):
    """`drawn_clips` for the transfer collection; fills `parts` with {cap_id: part} of the test split."""
    forbidden = spec.pairs()
    for index in indexes if indexes is not None else range(config.videos):
        video_id = f"video{index}"
        split = syn.split_of(index, config.videos, config.split_fractions)
        if split == "test":
            scene = syn.sample_scene(rng, video_id)
            captions, caption_parts = query_captions(scene, config.captions_per_video, rng, spec)
            parts.update({f"{video_id}#enc#{i}": p for i, p in enumerate(caption_parts)})
        else:
            scene = syn.sample_scene(rng, video_id, forbidden)
            captions = syn.make_captions(scene, config.captions_per_video, rng)
        yield index, video_id, scene, captions, split


def write_transfer_collection(root: str, config: syn.SynthConfig, spec: TransferSpec | None = None, vision=None,
                              progress: bool = True, mp4_fps: float | None = None) -> dict:
    """The transfer collection under root/config.collection, with TextData/transfer_split.json
    (written inside the same atomic swap); returns the collection's summary."""
    from functools import partial

    from engine import files

    spec = spec or TransferSpec()
    spec.validate()
    parts: dict = {}

    def write_split(folder: str) -> None:
        record = {"format": SPLIT_FORMAT, **asdict(spec), "synth": asdict(config),
                  "test_parts": {p: sorted(c for c, q in parts.items() if q == p) for p in PARTS}}
        files.write_json(os.path.join(folder, "TextData", SPLIT_FILE), record)

    return syn.write_collection(root, config, vision=vision, progress=progress, mp4_fps=mp4_fps,
                                draw=partial(transfer_clips, spec=spec, parts=parts), after=write_split)


def read_split(collection_dir: str) -> dict:
    """transfer_split.json of a transfer collection, checked: {format, held_out_words, held_out_pairs,
    held_out_share, synth, test_parts: {seen: [cap_id], held_out: [cap_id]}}."""
    path = os.path.join(collection_dir, "TextData", SPLIT_FILE)
    if not os.path.isfile(path):
        raise InputError(f"{path}: not found: write the collection with `cvr data synth --transfer`")
    with open(path, encoding="utf-8") as handle:
        record = json.load(handle)
    if record.get("format") != SPLIT_FORMAT or set(record.get("test_parts", {})) != set(PARTS):
        raise InputError(f"{path}: not a {SPLIT_FORMAT} file")
    return record


# ---------------------------------------------------------------------------------------------
# The corpus


def corpus_pairs(config: syn.SynthConfig, spec: TransferSpec, rng: np.random.Generator):
    """(image id, scene, captions) of each still: any combination, captions from every word, each
    naming every object of its image (a caption that leaves objects out teaches a generator that
    the prompt does not say what is drawn)."""
    full = spec.vocabulary()
    for index in range(config.videos):
        scene = syn.sample_scene(rng, f"image{index}")
        captions, taken = [], set()
        for _ in range(config.captions_per_video):
            for _retry in range(20):  # distinct where the scene allows
                caption = syn.describe_scene(scene, rng, full, every_object=True)[0]
                if caption not in taken:
                    break
            taken.add(caption)
            captions.append(caption)
        yield scene.video_id, scene, captions


def write_corpus(root: str, config: syn.SynthConfig, spec: TransferSpec | None = None, progress: bool = True) -> dict:
    """The still-image corpus under root/config.collection: ImageData/<image id>_0.png (each scene
    at the middle of its motion), every caption in the train split's caption file (what `cvr
    generator train` reads), the scenes and the vocabulary. No frame features: nothing retrieves
    over it. Atomic: built beside the target and swapped in. Returns {images, captions, folder}."""
    from PIL import Image
    from tqdm import tqdm

    from engine import datasets, files

    spec = spec or TransferSpec()
    spec.validate()
    config.validate()
    target = os.path.join(root, config.collection)
    rng = np.random.default_rng(config.seed)
    pairs, scenes = [], []
    with files.staged_folder(target) as work:
        image_dir = os.path.join(str(work), "ImageData")
        os.makedirs(image_dir)
        os.makedirs(os.path.join(str(work), "TextData"))
        drawn = corpus_pairs(config, spec, rng)
        for image_id, scene, captions in tqdm(drawn, total=config.videos, desc="corpus", unit="image",
                                              disable=not progress):
            still = syn.render_clip(scene, 3, config.size)[1]  # the middle of a 3-frame clip
            Image.fromarray(still).save(os.path.join(image_dir, f"{image_id}_0.png"), optimize=False)
            pairs += [(f"{image_id}#enc#{i}", c) for i, c in enumerate(captions)]
            scenes.append(asdict(scene))
        datasets.write_captions(os.path.join(str(work), "TextData", f"{config.collection}train.caption.txt"), pairs)
        files.write_json(os.path.join(str(work), "corpus.json"),
                         {"format": "cvr-sdgm/corpus/1", "synth": asdict(config), **asdict(spec), "scenes": scenes})
    return {"images": config.videos, "captions": len(pairs), "folder": target}
