"""The built-in synthetic video-caption set: real pixel clips, paraphrased captions, MSR-VTT layout.

No real benchmark can be downloaded here, and a new user's first run needs data. Each clip shows
1 to 3 objects (shape, colour, size, motion) over a background, plus unnamed distractor specks and
sensor noise; each clip gets many captions that paraphrase with synonyms, vary the word order and
sometimes describe only part of the scene, as MSR-VTT's crowd-sourced captions do.

The collection is written in the layout that `engine.datasets` reads (the dual-encoding / RIVRL
feature release): frames under ``ImageData/``, per-frame ResNet-50 features as a BigFile, caption
files per split, tags and a tag vocabulary. Everything derives from one seed: same seed, same bytes.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from engine.errors import InputError

# ---------------------------------------------------------------------------------------------
# The scene vocabulary. Each attribute value has synonyms; captions pick among them at random.

SHAPES = {
    "circle": ["circle", "ball", "disc", "round dot"],
    "square": ["square", "box", "block", "cube"],
    "triangle": ["triangle", "wedge", "triangular shape"],
    "star": ["star", "star shape", "starlet"],
    "cross": ["cross", "plus sign", "x shape"],
    "diamond": ["diamond", "rhombus", "lozenge"],
}
COLOURS = {  # name -> (RGB, synonyms)
    "red": ((220, 40, 40), ["red", "crimson", "scarlet"]),
    "green": ((40, 200, 60), ["green", "emerald", "lime"]),
    "blue": ((50, 90, 235), ["blue", "azure", "cobalt"]),
    "yellow": ((235, 220, 50), ["yellow", "golden", "lemon"]),
    "purple": ((160, 60, 210), ["purple", "violet", "lilac"]),
    "orange": ((245, 140, 30), ["orange", "amber", "tangerine"]),
    "white": ((240, 240, 240), ["white", "snowy", "pale"]),
    "cyan": ((40, 215, 220), ["cyan", "turquoise", "teal"]),
}
SIZES = {
    "small": (0.12, ["small", "tiny", "little"]),
    "large": (0.2, ["large", "big", "huge"]),
}
MOTIONS = {
    "still": ["stands still", "stays in place", "is not moving", "rests"],
    "left": ["moves to the left", "slides left", "drifts leftward", "travels to the left"],
    "right": ["moves to the right", "slides right", "drifts rightward", "travels to the right"],
    "up": ["moves up", "rises", "floats upward", "climbs up"],
    "down": ["moves down", "falls", "drops", "sinks downward"],
    "circles": ["moves in a circle", "circles around", "goes round in a loop", "orbits"],
    "bounces": ["bounces", "bounces up and down", "hops", "jumps up and down"],
}
BACKGROUNDS = {
    "black": ["a black background", "a dark background", "a plain black backdrop"],
    "grey": ["a grey background", "a gray backdrop", "a dull grey background"],
    "striped": ["a striped background", "stripes", "a background of stripes"],
    "checkered": ["a checkered background", "a checkerboard", "a chequered backdrop"],
    "gradient": ["a gradient background", "a fading backdrop", "a shaded background"],
}
OPENERS = ["", "", "", "there is ", "we see ", "the video shows ", "in this clip "]
JOINERS = [" while ", " and ", " as "]


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    motion: str
    start: tuple  # (x, y) centre at the first frame, in [0, 1] of the frame
    rgb: tuple  # the drawn colour: the named colour with a small per-clip jitter


@dataclass
class Scene:
    video_id: str
    background: str
    objects: list = field(default_factory=list)
    distractors: int = 0
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Sampling scenes


def sample_scene(rng: np.random.Generator, video_id: str, forbidden: frozenset = frozenset()) -> Scene:
    """One clip's description: 1-3 objects with distinct (colour, shape), a background, specks;
    no object is a (colour, shape) pair of `forbidden` (the transfer split's held-out pairs)."""
    n_objects = int(rng.choice([1, 1, 2, 2, 3]))
    objects, seen = [], set()
    while len(objects) < n_objects:
        shape = str(rng.choice(list(SHAPES)))
        colour = str(rng.choice(list(COLOURS)))
        if (shape, colour) in seen or (colour, shape) in forbidden:
            continue
        seen.add((shape, colour))
        motion = str(rng.choice(list(MOTIONS)))
        rgb = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour][0])
        objects.append(
            SceneObject(
                shape=shape,
                colour=colour,
                size=str(rng.choice(list(SIZES))),
                motion=motion,
                start=_start_position(rng, motion),
                rgb=rgb,
            )
        )
    return Scene(
        video_id=video_id,
        background=str(rng.choice(list(BACKGROUNDS))),
        objects=objects,
        distractors=int(rng.integers(0, 4)),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def _start_position(rng: np.random.Generator, motion: str) -> tuple:
    # Start where the whole path stays inside the frame: a leftward object starts on the right.
    x, y = rng.uniform(0.3, 0.7, size=2)
    if motion == "left":
        x = rng.uniform(0.65, 0.8)
    elif motion == "right":
        x = rng.uniform(0.2, 0.35)
    elif motion == "up":
        y = rng.uniform(0.65, 0.8)
    elif motion == "down":
        y = rng.uniform(0.2, 0.35)
    return (round(float(x), 4), round(float(y), 4))


def object_centre(obj: SceneObject, t: float) -> tuple:
    """Centre of an object at time t in [0, 1] (first to last frame), in frame units."""
    x, y = obj.start
    travel = 0.45
    if obj.motion == "left":
        x -= travel * t
    elif obj.motion == "right":
        x += travel * t
    elif obj.motion == "up":
        y -= travel * t
    elif obj.motion == "down":
        y += travel * t
    elif obj.motion == "circles":
        angle = 2 * np.pi * t
        x, y = x + 0.18 * np.cos(angle) - 0.18, y + 0.18 * np.sin(angle)
    elif obj.motion == "bounces":
        y -= 0.25 * abs(np.sin(2 * np.pi * t))
    return x, y


# ---------------------------------------------------------------------------------------------
# Rendering


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of a shape centred at the origin; dx, dy are pixel offsets from the centre."""
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= radius * 0.85
    if shape == "diamond":
        return abs(dx) + abs(dy) <= radius * 1.15
    if shape == "cross":
        arm = radius / 3
        return ((abs(dx) <= arm) & (abs(dy) <= radius)) | ((abs(dy) <= arm) & (abs(dx) <= radius))
    if shape == "triangle":  # pointing up: the half-width grows linearly from apex to base
        top, bottom = -radius, radius * 0.8
        inside_rows = (dy >= top) & (dy <= bottom)
        half_width = (dy - top) / (bottom - top) * radius
        return inside_rows & (abs(dx) <= half_width)
    if shape == "star":  # five points: the boundary radius oscillates with the angle
        rho = np.sqrt(dx**2 + dy**2)
        theta = np.arctan2(dy, dx) + np.pi / 2
        boundary = radius * (0.45 + 0.55 * ((np.cos(5 * theta) + 1) / 2) ** 2)
        return rho <= boundary
    raise ValueError(f"unknown shape {shape!r}")


def draw_background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A dark or muted background (colours must stay visible on it), float32 HxWx3 in 0..255."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    tint = rng.uniform(-8, 8, size=3).astype(np.float32)
    if kind == "black":
        image = np.full((size, size, 3), 12.0, np.float32)
    elif kind == "grey":
        image = np.full((size, size, 3), 95.0, np.float32)
    elif kind == "striped":
        period = max(4, size // 8)
        band = ((yy // (period / 2)) % 2)[..., None]
        image = band * np.array([70, 70, 95], np.float32) + (1 - band) * np.array([25, 25, 40], np.float32)
    elif kind == "checkered":
        period = max(4, size // 6)
        cell = (((yy // period) + (xx // period)) % 2)[..., None]
        image = cell * np.array([85, 60, 45], np.float32) + (1 - cell) * np.array([35, 30, 25], np.float32)
    elif kind == "gradient":
        ramp = (yy / max(size - 1, 1))[..., None]
        image = (1 - ramp) * np.array([20, 30, 80], np.float32) + ramp * np.array([90, 80, 60], np.float32)
    else:
        raise ValueError(f"unknown background {kind!r}")
    return image + tint


def render_clip(scene: Scene, frames: int, size: int) -> np.ndarray:
    """The clip's frames as uint8, (frames, size, size, 3)."""
    rng = np.random.default_rng(scene.seed)
    background = draw_background(scene.background, size, rng)
    speck_start = rng.uniform(0.05, 0.95, size=(scene.distractors, 2))
    speck_step = rng.normal(0, 0.03, size=(frames, scene.distractors, 2)).cumsum(axis=0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    clip = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        t = f / max(frames - 1, 1)
        image = background.copy()
        for obj in scene.objects:
            cx, cy = object_centre(obj, t)
            mask = shape_mask(obj.shape, xx - cx * size, yy - cy * size, SIZES[obj.size][0] * size)
            image[mask] = obj.rgb
        for (sx, sy) in np.clip(speck_start + speck_step[f], 0.02, 0.98):
            px, py = int(sx * size), int(sy * size)
            image[py : py + 2, px : px + 2] = 150.0  # unnamed grey specks: distractors
        image += rng.normal(0, 4.0, size=image.shape).astype(np.float32)  # sensor noise
        clip[f] = np.clip(image, 0, 255).round().astype(np.uint8)
    return clip


# ---------------------------------------------------------------------------------------------
# Captions


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


# The built-in captions' words (the tables above, without the RGB values and scales).
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


# ---------------------------------------------------------------------------------------------
# The collection


@dataclass
class SynthConfig:
    videos: int = 600
    frames: int = 8
    size: int = 64
    seed: int = 0
    captions_per_video: int = 10
    collection: str = "synth"
    feature: str = "resnet50"
    split_fractions: tuple = (0.7, 0.15, 0.15)  # train, val, test
    tag_vocab_size: int = 512

    def validate(self) -> None:
        if self.videos < 3:
            raise InputError(f"--videos must be at least 3 (one per split), got {self.videos}")
        if self.frames < 2:
            raise InputError(f"--frames must be at least 2 (motion needs two), got {self.frames}")
        if self.size < 16:
            raise InputError(f"--size must be at least 16 pixels, got {self.size}")
        if self.captions_per_video < 1:
            raise InputError(f"--captions must be at least 1, got {self.captions_per_video}")


def split_of(index: int, n_videos: int, fractions: tuple) -> str:
    n_train = max(1, int(round(n_videos * fractions[0])))
    n_val = max(1, int(round(n_videos * fractions[1])))
    n_train = min(n_train, n_videos - 2)
    if index < n_train:
        return "train"
    if index < n_train + n_val:
        return "val"
    return "test"


def frame_id(video_id: str, frame_no: int) -> str:
    # RIVRL's frame ids: "<video_id>_<frame_no>"; the video id is what precedes the last '_'.
    return f"{video_id}_{frame_no}"


def write_collection(root: str, config: SynthConfig, vision=None, progress: bool = True,
                     mp4_fps: float | None = None, draw=None, after=None) -> dict:
    """Draw the clips, write frames, captions, tags, splits and ResNet-50 features under
    ``root/config.collection``; returns the collection's summary. Atomic: built in a staging
    folder beside the target and swapped into place. `mp4_fps`: also write the clips as mp4
    files at that frame rate (`write_videos`), inside the same swap. `draw(config, rng, indexes)`
    replaces `drawn_clips` (another split, training/transfer_data.py) and `after(folder)` writes
    its own files into the staging folder before the swap."""
    from engine import datasets, files

    config.validate()
    if mp4_fps is not None:
        check_mp4_fps(mp4_fps)
    target = os.path.join(root, config.collection)
    with files.staged_folder(target) as work:
        _write_collection(str(work), config, vision, progress, draw or drawn_clips)
        if after is not None:
            after(str(work))
        if mp4_fps is not None:
            _write_videos(str(work), os.path.join(str(work), VIDEO_DIR), mp4_fps, progress)
    return datasets.Collection(root, config.collection).summary(config.feature)


def drawn_clips(config: SynthConfig, rng: np.random.Generator, indexes=None):
    """(index, video id, scene, captions, split) of every clip, in the order the collection draws
    them from `rng`: the one definition of what seed S gives (the collection and its video files)."""
    for index in indexes if indexes is not None else range(config.videos):
        video_id = f"video{index}"
        scene = sample_scene(rng, video_id)
        captions = make_captions(scene, config.captions_per_video, rng)
        yield index, video_id, scene, captions, split_of(index, config.videos, config.split_fractions)


def _write_collection(work: str, config: SynthConfig, vision, progress: bool, draw=drawn_clips) -> None:
    """Everything of the collection into the (staging) folder `work`."""
    from PIL import Image
    from tqdm import tqdm

    from engine import datasets
    from engine.vision import EXTRACTOR_FILE, RegionExtractor

    text_dir = os.path.join(work, "TextData")
    image_dir = os.path.join(work, "ImageData")
    os.makedirs(os.path.join(text_dir, "tags", "video_label_th_1"))
    os.makedirs(image_dir)

    extractor = vision if vision is not None else RegionExtractor.default()
    rng = np.random.default_rng(config.seed)
    scenes, split_captions = [], {"train": [], "val": [], "test": []}
    video_tags, video2frames = {}, {}
    feature_dir = os.path.join(work, "FeatureData", config.feature)
    with datasets.BigFileWriter(feature_dir, extractor.feature_dim) as features:
        bar = tqdm(range(config.videos), desc="synth clips", unit="clip", disable=not progress)
        for _, video_id, scene, captions, split in draw(config, rng, bar):
            split_captions[split] += [(f"{video_id}#enc#{i}", c) for i, c in enumerate(captions)]
            video_tags[video_id] = dict(sorted(caption_tags(captions).items()))
            clip = render_clip(scene, config.frames, config.size)
            ids = [frame_id(video_id, f) for f in range(config.frames)]
            for fid, frame in zip(ids, clip, strict=True):
                Image.fromarray(frame).save(os.path.join(image_dir, fid + ".png"), optimize=False)
            features.add(ids, extractor.pooled(clip))
            video2frames[video_id] = ids
            scenes.append(scene)
        features.set_video2frames(video2frames)
        features.add_file(EXTRACTOR_FILE, json.dumps(extractor.record(), indent=1, sort_keys=True) + "\n")

    for split, pairs in split_captions.items():
        datasets.write_captions(os.path.join(text_dir, f"{config.collection}{split}.caption.txt"), pairs)
    datasets.write_tags(os.path.join(text_dir, "tags", "video_label_th_1.txt"), video_tags)
    vocab = _tag_vocab(video_tags, split_captions["train"], config.tag_vocab_size)
    vocab_name = f"tag_vocab_{config.tag_vocab_size}.json"
    datasets.write_tag_vocab(os.path.join(text_dir, "tags", "video_label_th_1", vocab_name), vocab)
    _write_json(os.path.join(work, "synth_scenes.json"), [asdict(s) for s in scenes])
    _write_json(os.path.join(work, "synth_config.json"), asdict(config))


def _tag_vocab(video_tags: dict, train_pairs: list, size: int) -> list:
    """The `size` most frequent tags over the training videos (ties by name: deterministic)."""
    train_videos = {datasets_video_id(cap_id) for cap_id, _ in train_pairs}
    totals: Counter = Counter()
    for video_id in sorted(train_videos):
        totals.update(video_tags[video_id])
    ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
    return [tag for tag, _ in ranked[:size]]


def datasets_video_id(cap_id: str) -> str:
    from engine.datasets import video_id_of

    return video_id_of(cap_id)


def _write_json(path: str, value) -> None:
    from engine import files

    files.write_synced(path, files.to_json(value))


def read_scenes(collection_dir: str) -> list:
    """The ground-truth scene descriptions written beside a synthetic collection."""
    with open(os.path.join(collection_dir, "synth_scenes.json"), encoding="utf-8") as handle:
        raw = json.load(handle)
    scenes = []
    for item in raw:
        objects = [SceneObject(**{**o, "start": tuple(o["start"]), "rgb": tuple(o["rgb"])}) for o in item["objects"]]
        scenes.append(Scene(**{**item, "objects": objects}))
    return scenes


def read_config(collection_dir: str) -> SynthConfig:
    """The SynthConfig a synthetic collection was written with (synth_config.json)."""
    with open(os.path.join(collection_dir, "synth_config.json"), encoding="utf-8") as handle:
        raw = json.load(handle)
    return SynthConfig(**{**raw, "split_fractions": tuple(raw["split_fractions"])})


# ---------------------------------------------------------------------------------------------
# The clips as video files: what `cvr index` of a folder of videos sees, and a browser plays.

VIDEO_DIR = "videos"
VIDEO_METADATA = "metadata.jsonl"
# H.264 in yuv420p (what browsers play) halves colour resolution, which at 64 px cost some frames'
# features 0.07 cosine. Stored at twice the side, 4:2:0 keeps every pixel's colour and decoding
# shrinks it back: min cosine 0.995 against the frames' own features (0.98 is the test's bar), and
# at crf 20 a clip of 8 frames is ~35 KB.
VIDEO_UPSCALE = 2
VIDEO_CRF = 20


def check_mp4_fps(fps: float) -> None:
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not 0 < fps < float("inf"):
        raise InputError(f"--mp4-fps must be a number > 0, got {fps!r}")


def write_videos(collection_dir: str, fps: float = 1.0, progress: bool = True) -> dict:
    """Write every clip of a written synthetic collection as ``videos/<video_id>.mp4`` (H.264,
    yuv420p, `fps` frames a second: the default 1 makes 8 frames 8 s) plus
    ``videos/metadata.jsonl`` (one JSON object a line: id, split, background, objects, and the
    tag, colour, shape and motion lists). The clips are rendered again from the stored scenes:
    the same frames as ImageData/. Atomic: the folder is built beside and swapped in."""
    from engine import files

    check_mp4_fps(fps)
    with files.staged_folder(os.path.join(collection_dir, VIDEO_DIR)) as work:
        summary = _write_videos(collection_dir, str(work), fps, progress)
    summary["folder"] = os.path.join(collection_dir, VIDEO_DIR)
    return summary


def _write_videos(collection_dir: str, out_dir: str, fps: float, progress: bool) -> dict:
    from tqdm import tqdm

    from engine import files
    from engine.video import write_video

    config = read_config(collection_dir)
    scenes = read_scenes(collection_dir)
    os.makedirs(out_dir, exist_ok=True)
    lines = []
    for index, scene in enumerate(tqdm(scenes, desc="synth mp4", unit="clip", disable=not progress)):
        clip = render_clip(scene, config.frames, config.size)
        # threads=1: x264's bytes depend on its thread count; one thread keeps same seed, same bytes.
        write_video(os.path.join(out_dir, f"{scene.video_id}.mp4"), clip, fps, crf=VIDEO_CRF,
                    upscale=VIDEO_UPSCALE, threads=1)
        lines.append(files.to_json(video_metadata(scene, split_of(index, len(scenes), config.split_fractions)),
                                   indent=None))
    files.write_synced(os.path.join(out_dir, VIDEO_METADATA), "".join(lines))  # last: the folder is complete
    return {"videos": len(scenes), "fps": float(fps), "frames": config.frames, "crf": VIDEO_CRF,
            "side": config.size * VIDEO_UPSCALE}


def video_metadata(scene: Scene, split: str) -> dict:
    """One clip's line of metadata.jsonl: the fields a search can filter on."""
    tags = []
    for obj in scene.objects:
        tags += [name for name in (obj.colour, obj.shape) if name not in tags]
    return {"id": scene.video_id, "split": split, "background": scene.background, "objects": len(scene.objects),
            "tag": tags, "colour": [o.colour for o in scene.objects], "shape": [o.shape for o in scene.objects],
            "motion": [o.motion for o in scene.objects]}


def write_split_videos(folder: str, config: SynthConfig, splits=("test",), fps: float = 1.0,
                       progress: bool = True) -> dict:
    """Only the clips of `splits` as video files (what `cvr demo` indexes), without writing the
    collection: the scenes and captions are drawn exactly as `write_collection` draws them, so the
    files equal that collection's `videos/` ones. Writes `folder/<video id>.mp4` and
    metadata.jsonl, atomically; returns {"videos": n, "captions": [(video id, caption)]}."""
    from tqdm import tqdm

    from engine import files
    from engine.video import write_video

    config.validate()
    check_mp4_fps(fps)
    captions, lines = [], []
    with files.staged_folder(folder) as work:
        drawn = drawn_clips(config, np.random.default_rng(config.seed))
        for _, video_id, scene, texts, split in tqdm(drawn, total=config.videos, desc="synth mp4", unit="clip",
                                                     disable=not progress):
            if split not in splits:
                continue
            write_video(os.path.join(work, f"{video_id}.mp4"), render_clip(scene, config.frames, config.size), fps,
                        crf=VIDEO_CRF, upscale=VIDEO_UPSCALE, threads=1)
            lines.append(files.to_json(video_metadata(scene, split), indent=None))
            captions += [(video_id, text) for text in texts]
        files.write_synced(os.path.join(work, VIDEO_METADATA), "".join(lines))
    return {"videos": len(lines), "captions": captions}
