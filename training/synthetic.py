"""The built-in synthetic video-caption set: real pixel clips, paraphrased captions, MSR-VTT layout.

No real benchmark can be downloaded here, and a new user's first run needs data. Each clip shows
1 to 3 objects (shape, colour, size, motion) over a background, plus unnamed distractor specks and
sensor noise; each clip gets many captions that paraphrase with synonyms, vary the word order and
sometimes describe only part of the scene, as MSR-VTT's crowd-sourced captions do.

The collection is written in the layout that `engine.datasets` reads (the dual-encoding / RIVRL
feature release): frames under ``ImageData/``, per-frame ResNet-50 features as a BigFile, caption
files per split, tags and a tag vocabulary. Everything derives from one seed: same seed, same bytes.

The scenes (attribute tables, sampling, rendering) live in training/synthetic_scenes.py and the
captions (vocabulary, paraphrases, tags) in training/synthetic_captions.py; this module writes the
collection and its video files, and re-exports both modules' names.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from engine.errors import InputError
from training.synthetic_captions import (  # noqa: F401 (re-exported: bench, tests and training import them from here)
    BASE_VOCABULARY,
    JOINERS,
    OPENERS,
    STOPWORDS,
    Vocabulary,
    _describe_object,
    caption_tags,
    describe_scene,
    make_caption,
    make_captions,
)
from training.synthetic_scenes import (  # noqa: F401 (re-exported: bench, tests and training import them from here)
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    _start_position,
    draw_background,
    object_centre,
    render_clip,
    sample_scene,
    shape_mask,
)

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
