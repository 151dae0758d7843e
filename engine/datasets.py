"""The caption, tag and collection formats of the MSR-VTT feature release of the dual-encoding /
RIVRL line, and the frame batches the video tower reads.

Every reader here accepts the files exactly as that release ships them, and every writer produces
files the original RIVRL code reads, so each command runs unchanged on the real data.

Layout of one collection (``<root>/<collection>/``)::

    FeatureData/<feature>/...                              a BigFile (engine/bigfile.py)
    TextData/<collection>{train,val,test}.caption.txt      "<cap_id> <caption>" per line
    TextData/tags/video_label_th_1.txt                     "<video_id>\\t<tag>:<count> ..."
    TextData/tags/video_label_th_1/tag_vocab_<size>.json   JSON list of tag strings

Every problem with a file's contents is a :class:`DataFormatError` naming ``path:line`` (one
line). Bad arguments to a writer are plain ``ValueError``/``TypeError``: they are the caller's
mistake, not a file's. Writers are atomic (engine/files.py).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from engine import files
from engine.bigfile import (
    FEATURE_DTYPE,
    FEATURE_FILE,
    ID_FILE,
    SHAPE_FILE,
    VIDEO2FRAMES_FILE,
    BigFile,
    BigFileWriter,
    write_bigfile,
)
from engine.errors import InputError, MissingEntryError
from engine.formats import COUNT, DataFormatError, check_token, has_space, read_text, show, text_lines

__all__ = [
    "FEATURE_DTYPE",
    "FEATURE_FILE",
    "ID_FILE",
    "SHAPE_FILE",
    "SPLITS",
    "VIDEO2FRAMES_FILE",
    "BigFile",
    "BigFileWriter",
    "Collection",
    "DataFormatError",
    "read_captions",
    "read_tag_vocab",
    "read_tags",
    "tag_targets",
    "video_frames",
    "video_id_of",
    "write_bigfile",
    "write_captions",
    "write_tag_vocab",
    "write_tags",
    "common_tags",
]

SPLITS = ("train", "val", "test")
# Suffixes the release sometimes leaves on video ids inside caption ids (RIVRL's getVideoId).
_VIDEO_SUFFIXES = (".mp4", ".jpg")


# --------------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------------


def video_id_of(cap_id: str) -> str:
    """The video id of a caption id, as RIVRL's ``getVideoId`` computes it.

    The video id is what precedes the first ``#``; a trailing ``.mp4``/``.jpg`` is dropped
    (once): ``video7010#enc#3`` -> ``video7010``, ``v1.mp4#0`` -> ``v1``.
    """
    video_id = cap_id.split("#", 1)[0]
    for suffix in _VIDEO_SUFFIXES:
        if video_id.endswith(suffix):
            return video_id[: -len(suffix)]
    return video_id


# --------------------------------------------------------------------------------------------
# Captions: "<cap_id> <caption>" per line
# --------------------------------------------------------------------------------------------


def read_captions(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(cap_id, caption)`` pairs in file order.

    Each line is split on its first run of whitespace; blank lines are skipped. A line with no
    caption text, an empty cap_id (a line starting with whitespace, or one whose video id part
    before ``#`` is empty) or a repeated cap_id is a DataFormatError naming ``path:line``.
    """
    path = Path(path)
    pairs: list[tuple[str, str]] = []
    first_line: dict[str, int] = {}
    for line_no, raw in enumerate(text_lines(read_text(path)), 1):
        line = raw.rstrip()
        if not line:
            continue
        if line[0].isspace():
            raise DataFormatError(path, "empty cap_id (line starts with whitespace)", line_no)
        fields = line.split(None, 1)
        cap_id = fields[0]
        if len(fields) < 2:
            raise DataFormatError(path, f"cap_id {show(cap_id)} has no caption text", line_no)
        if not video_id_of(cap_id):
            raise DataFormatError(path, f"cap_id {show(cap_id)} has an empty video id", line_no)
        if cap_id in first_line:
            raise DataFormatError(
                path, f"duplicate cap_id {show(cap_id)} (first on line {first_line[cap_id]})", line_no
            )
        first_line[cap_id] = line_no
        pairs.append((cap_id, fields[1]))
    return pairs


def write_captions(path: str | os.PathLike, pairs: Iterable[tuple[str, str]]) -> Path:
    """Write ``(cap_id, caption)`` pairs atomically, one ``"<cap_id> <caption>"`` per line.

    Captions must be one line without surrounding whitespace, so that :func:`read_captions`
    gives back exactly the same pairs.
    """
    lines: list[str] = []
    seen: set[str] = set()
    for cap_id, caption in pairs:
        check_token(cap_id, "cap_id")
        if cap_id in seen:
            raise InputError(f"duplicate cap_id {show(cap_id)}")
        seen.add(cap_id)
        if not isinstance(caption, str):
            raise TypeError(f"caption of {show(cap_id)} must be str, got {type(caption).__name__}")
        if not caption or caption != caption.strip() or len(caption.splitlines()) != 1:
            raise InputError(
                f"caption of {show(cap_id)} must be one non-empty line without surrounding "
                f"whitespace: {show(caption)}"
            )
        lines.append(f"{cap_id} {caption}\n")
    return files.atomic_write(path, "".join(lines))


# --------------------------------------------------------------------------------------------
# Tags: "<video_id>\t<tag>:<count> ..." and the JSON tag vocabulary
# --------------------------------------------------------------------------------------------


def _parse_tag_counts(path: Path, line_no: int, text: str) -> dict[str, int]:
    """The part after the tab: ``tag:count`` tokens; a tag may contain ':' (split on the last)."""
    counts: dict[str, int] = {}
    for token in text.split():
        tag, colon, count = token.rpartition(":")
        if not colon or not tag:
            raise DataFormatError(path, f"malformed tag:count {show(token)}", line_no)
        if not COUNT.fullmatch(count):
            raise DataFormatError(
                path, f"count of tag {show(tag)} is not a non-negative integer: {show(count)}", line_no
            )
        if tag in counts:
            raise DataFormatError(path, f"tag {show(tag)} appears twice", line_no)
        counts[tag] = int(count)
    return counts


def read_tags(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """video id -> {tag: count}, in file order; blank lines are skipped.

    The part after the tab may be empty (a video with no tags). A line without a tab, a bad
    ``tag:count``, a non-integer count or a repeated video id is a DataFormatError with
    ``path:line``.
    """
    path = Path(path)
    tags: dict[str, dict[str, int]] = {}
    first_line: dict[str, int] = {}
    for line_no, raw in enumerate(text_lines(read_text(path)), 1):
        if not raw.strip():
            continue
        # No strip before splitting: the tab itself must survive when nothing follows it.
        video_id, tab, rest = raw.partition("\t")
        if not tab:
            raise DataFormatError(path, "no tab between video id and tags", line_no)
        if not video_id or has_space(video_id):
            raise DataFormatError(
                path, f"video id must be non-empty without whitespace: {show(video_id)}", line_no
            )
        if video_id in first_line:
            raise DataFormatError(
                path, f"duplicate video id {show(video_id)} (first on line {first_line[video_id]})", line_no
            )
        first_line[video_id] = line_no
        tags[video_id] = _parse_tag_counts(path, line_no, rest)
    return tags


def write_tags(path: str | os.PathLike, video_tags: Mapping[str, Mapping[str, int]]) -> Path:
    """Write video id -> {tag: count} atomically in the ``video_label_th_1.txt`` format."""
    lines: list[str] = []
    for video_id, counts in video_tags.items():
        check_token(video_id, "video id")
        tokens: list[str] = []
        for tag, count in counts.items():
            check_token(tag, "tag")
            if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
                raise InputError(f"count of tag {show(tag)} must be a non-negative int, got {count!r}")
            tokens.append(f"{tag}:{int(count)}")
        lines.append(f"{video_id}\t{' '.join(tokens)}\n")
    return files.atomic_write(path, "".join(lines))


def read_tag_vocab(path: str | os.PathLike) -> list[str]:
    """The tag vocabulary: a JSON list of unique strings (whatever its size)."""
    path = Path(path)
    try:
        vocab = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataFormatError(path, f"invalid JSON: {e.msg} (column {e.colno})", e.lineno) from None
    if not isinstance(vocab, list):
        raise DataFormatError(path, f"expected a JSON list of tags, found {type(vocab).__name__}")
    seen: set[str] = set()
    for i, tag in enumerate(vocab):
        if not isinstance(tag, str):
            raise DataFormatError(path, f"entry {i} is not a string: {show(tag)}")
        if tag in seen:
            raise DataFormatError(path, f"duplicate tag {show(tag)} at entry {i}")
        seen.add(tag)
    return vocab


def write_tag_vocab(path: str | os.PathLike, tags: Sequence[str]) -> Path:
    """Write a tag vocabulary atomically as a JSON list of unique strings."""
    tags = list(tags)
    if any(not isinstance(t, str) for t in tags):
        raise TypeError("tags must all be str")
    if len(set(tags)) != len(tags):
        raise InputError("tags must be unique")
    return files.atomic_write(path, json.dumps(tags, ensure_ascii=False))


def tag_targets(
    video_tags: Mapping[str, Mapping[str, int]],
    vocab: Sequence[str],
    video_ids: Sequence[str] | None = None,
) -> np.ndarray:
    """Soft tag targets, RIVRL-style: ``(n_videos, len(vocab))`` float32.

    Row ``i`` holds each in-vocabulary tag's count divided by the largest count among that
    video's in-vocabulary tags (tags outside the vocabulary neither appear nor set the scale);
    a video with no in-vocabulary tag gets a row of zeros. Rows follow ``video_ids`` when given,
    else ``video_tags``' order.
    """
    column = {tag: j for j, tag in enumerate(vocab)}
    if len(column) != len(vocab):
        raise InputError("vocab has duplicate tags")
    order = list(video_tags) if video_ids is None else list(video_ids)
    out = np.zeros((len(order), len(vocab)), dtype=np.float32)
    for i, video_id in enumerate(order):
        if video_id not in video_tags:
            raise MissingEntryError(f"video {show(video_id)} has no tag entry")
        in_vocab = [(column[t], c) for t, c in video_tags[video_id].items() if t in column]
        top = max((c for _, c in in_vocab), default=0)
        if top <= 0:
            continue  # no in-vocabulary tag (or only zero counts): nothing to normalise by
        for j, count in in_vocab:
            out[i, j] = count / top
    return out


def common_tags(video_tags: Mapping[str, Mapping[str, int]], video_ids: Sequence[str], max_df: float) -> set:
    """The tags that more than a fraction ``max_df`` of ``video_ids`` carry (document frequency).

    A tag (nearly) every video carries ("background", "moves" in the built-in captions) tells no
    video from another, yet as a soft target it holds most of each video's concept mass, so every
    pair's concept Jaccard is high and the concept space's range is squeezed; a concept
    vocabulary drops such tags. ``max_df >= 1`` drops nothing (RIVRL's recipe).
    """
    if not 0 < max_df <= 1:
        raise InputError(f"max_df must be in (0, 1], got {max_df}")
    counts: Counter = Counter()
    for video_id in video_ids:
        if video_id not in video_tags:
            raise MissingEntryError(f"video {show(video_id)} has no tag entry")
        counts.update(t for t, c in video_tags[video_id].items() if c > 0)
    return {tag for tag, n in counts.items() if n > max_df * len(video_ids)}


# --------------------------------------------------------------------------------------------
# A collection folder
# --------------------------------------------------------------------------------------------


class Collection:
    """One collection under a data root, e.g. ``Collection("~/VisualSearch", "msrvtt10k")``.

    Gives the release's paths and loads its files; a missing folder or file is a
    DataFormatError naming the path.
    """

    def __init__(self, root: str | os.PathLike, name: str):
        self.root = Path(root).expanduser()
        self.name = name
        self.path = self.root / name
        if not self.path.is_dir():
            reason = files.why_not_a_folder(self.path)
            raise DataFormatError(self.path, "collection folder not found" if reason == "no such folder" else reason)
        self._features: dict[str, BigFile] = {}

    def __repr__(self) -> str:
        return f"Collection({str(self.root)!r}, {self.name!r})"

    # -- features -----------------------------------------------------------------------------

    def feature_dir(self, feature: str) -> Path:
        return self.path / "FeatureData" / feature

    def features(self, feature: str) -> BigFile:
        """The feature folder as a BigFile (opened once, then cached)."""
        if feature not in self._features:
            self._features[feature] = BigFile(self.feature_dir(feature))
        return self._features[feature]

    # -- captions -----------------------------------------------------------------------------

    def caption_path(self, split: str) -> Path:
        if split not in SPLITS:
            raise InputError(f"split must be one of {SPLITS}, got {split!r}")
        return self.path / "TextData" / f"{self.name}{split}.caption.txt"

    def captions(self, split: str) -> list[tuple[str, str]]:
        return read_captions(self.caption_path(split))

    def split_video_ids(self, split: str) -> list[str]:
        """Video ids of a split's captions in order of first appearance (RIVRL's read_video_ids)."""
        return list(dict.fromkeys(video_id_of(cap_id) for cap_id, _ in self.captions(split)))

    # -- tags ---------------------------------------------------------------------------------

    def tags_path(self) -> Path:
        return self.path / "TextData" / "tags" / "video_label_th_1.txt"

    def tag_vocab_path(self, size: int = 512) -> Path:
        return self.path / "TextData" / "tags" / "video_label_th_1" / f"tag_vocab_{size}.json"

    def tags(self) -> dict[str, dict[str, int]]:
        return read_tags(self.tags_path())

    def tag_vocab(self, size: int = 512) -> list[str]:
        return read_tag_vocab(self.tag_vocab_path(size))

    # -- overview -----------------------------------------------------------------------------

    def summary(self, feature: str, tag_vocab_size: int = 512) -> dict:
        """A JSON-ready overview: per split (None where its caption file is absent) the videos,
        captions and videos without features; the feature shape; frames per video (None without
        video2frames.txt); the tag vocabulary size (None without the vocabulary file).
        """
        big = self.features(feature)
        has_frames = big.has_video2frames
        with_features = set(big.video2frames()) if has_frames else set(big.ids)
        splits: dict[str, dict | None] = {}
        for split in SPLITS:
            if not self.caption_path(split).is_file():
                splits[split] = None
                continue
            captions = self.captions(split)
            videos = list(dict.fromkeys(video_id_of(cap_id) for cap_id, _ in captions))
            splits[split] = {
                "videos": len(videos),
                "captions": len(captions),
                "videos_without_features": sum(v not in with_features for v in videos),
            }
        frames = None
        if has_frames:
            counts = [len(f) for f in big.video2frames().values()]
            frames = {
                "videos": len(counts),
                "min": min(counts, default=0),
                "mean": float(np.mean(counts)) if counts else 0.0,
                "max": max(counts, default=0),
            }
        vocab_path = self.tag_vocab_path(tag_vocab_size)
        problems = self._problems(big, splits, feature)
        vocab_size = None
        if vocab_path.is_file():
            try:
                vocab_size = len(read_tag_vocab(vocab_path))
            except (DataFormatError, ValueError) as error:
                problems.append(str(error).splitlines()[0])
        return {
            "collection": self.name,
            "root": str(self.root),
            "feature": feature,
            "vectors": big.n,
            "dim": big.dim,
            "splits": splits,
            "frames_per_video": frames,
            "tag_vocab_size": vocab_size,
            "problems": problems,
        }

    def _problems(self, big: BigFile, splits: dict, feature: str) -> list:
        """What `cvr train` and `cvr index` would refuse in this collection, one line each."""
        problems = []
        for split, counts in splits.items():
            if counts and counts["videos_without_features"]:
                problems.append(f"{counts['videos_without_features']} videos of the {split} split have captions but "
                                f"no features in {self.feature_dir(feature)}")
        vectors = big.vectors
        bad_rows = sum(int((~np.isfinite(vectors[start : start + 4096]).all(axis=1)).sum())
                       for start in range(0, big.n, 4096))
        if bad_rows:
            problems.append(f"{big.folder}: {bad_rows} feature rows hold NaN or infinite values")
        if self.tags_path().is_file():
            try:
                self.tags()
            except DataFormatError as error:
                problems.append(str(error).splitlines()[0])
        return problems


# --------------------------------------------------------------------------------------------
# Frame batches for the video tower
# --------------------------------------------------------------------------------------------


def video_frames(features: BigFile, video_ids: Sequence[str], max_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(frames (B, F, dim) float32 zero-padded, mask (B, F) bool) of each video, evenly subsampled
    to at most ``max_frames`` frames.

    Frames come from video2frames.txt when present (the MSR-VTT release); otherwise each id in the
    BigFile is taken to be one video-level feature (a one-frame video). A video without frames or
    with NaN/inf features is a ValueError naming it."""
    per_video = []
    for video_id in video_ids:
        rows = features.frames_of(video_id) if features.has_video2frames else features.read([video_id])
        if len(rows) == 0:
            raise DataFormatError(features.folder, f"video {video_id} has no frames")
        if len(rows) > max_frames:
            rows = rows[np.linspace(0, len(rows) - 1, max_frames).round().astype(int)]
        if not np.isfinite(rows).all():
            raise DataFormatError(features.folder, f"video {video_id} has NaN or infinite frame features")
        per_video.append(rows)
    length = max(len(r) for r in per_video)
    frames = np.zeros((len(per_video), length, features.dim), np.float32)
    mask = np.zeros((len(per_video), length), bool)
    for i, rows in enumerate(per_video):
        frames[i, : len(rows)] = rows
        mask[i, : len(rows)] = True
    return frames, mask
