"""The built-in data set: real pixels, paraphrased captions, the MSR-VTT layout, determinism."""
import hashlib
import os

import numpy as np
import pytest

from engine import datasets
from engine.cli import main
from engine.vision import RegionExtractor, VisionConfig, seeded_resnet50
from training import synthetic as syn


@pytest.fixture(scope="module")
def tiny_vision():
    # Random-init weights keep this fast; the shipped extractor is tested in test_vision.py.
    return RegionExtractor(seeded_resnet50(0), VisionConfig(image_size=32, batch_size=16))


def _tree_digest(folder: str) -> str:
    digest = hashlib.sha256()
    for base, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(base, name)
            digest.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


def test_vocabulary_is_as_rich_as_promised():
    assert len(syn.SHAPES) >= 6 and len(syn.COLOURS) >= 8 and len(syn.SIZES) >= 2
    assert len(syn.MOTIONS) >= 6 and "still" in syn.MOTIONS
    assert len(syn.BACKGROUNDS) >= 4


def test_every_shape_draws_a_distinct_nonempty_mask():
    yy, xx = np.mgrid[-20:21, -20:21].astype(np.float32)
    masks = {shape: syn.shape_mask(shape, xx, yy, 15.0) for shape in syn.SHAPES}
    for shape, mask in masks.items():
        assert 20 < mask.sum() < mask.size, shape
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (masks[a] != masks[b]).sum() > 10, (a, b)


def test_motion_moves_the_object_the_way_its_name_says():
    rng = np.random.default_rng(0)
    for motion in syn.MOTIONS:
        obj = syn.SceneObject("circle", "red", "large", motion, syn._start_position(rng, motion), (220, 40, 40))
        (x0, y0), (x1, y1) = syn.object_centre(obj, 0.0), syn.object_centre(obj, 1.0)
        xm, ym = syn.object_centre(obj, 0.25)
        expected = {
            "left": x1 < x0 - 0.3, "right": x1 > x0 + 0.3, "up": y1 < y0 - 0.3, "down": y1 > y0 + 0.3,
            "still": (x0, y0) == (x1, y1) == (xm, ym), "circles": abs(xm - x0) + abs(ym - y0) > 0.1,
            "bounces": ym < y0 - 0.1 and xm == x0,
        }[motion]
        assert expected, motion
        for t in np.linspace(0, 1, 9):  # the path stays inside the frame
            x, y = syn.object_centre(obj, t)
            assert 0.0 <= x <= 1.0 and 0.0 <= y <= 1.0, (motion, t)


def test_rendered_clip_shows_the_object_in_its_colour():
    scene = syn.Scene("v", "black", [syn.SceneObject("square", "green", "large", "right", (0.3, 0.5), (40, 200, 60))])
    clip = syn.render_clip(scene, frames=4, size=48)
    assert clip.shape == (4, 48, 48, 3) and clip.dtype == np.uint8
    green = (clip[..., 1] > 150) & (clip[..., 0] < 100)
    columns = [np.nonzero(green[f].any(axis=0))[0].mean() for f in range(4)]
    assert all(b > a for a, b in zip(columns, columns[1:], strict=False)), columns  # it moves right


def test_captions_paraphrase_and_name_the_scene():
    rng = np.random.default_rng(3)
    scene = syn.sample_scene(rng, "video0")
    captions = syn.make_captions(scene, 12, rng)
    assert len(set(captions)) == 12
    for caption in captions:  # every caption names at least one object's shape by some synonym
        assert any(word in caption for obj in scene.objects for word in syn.SHAPES[obj.shape])
    counts = syn.caption_tags(captions)
    assert "a" not in counts and sum(counts.values()) > 12


def test_write_collection_layout_determinism_and_summary(tmp_path, tiny_vision):
    config = syn.SynthConfig(videos=7, frames=3, size=32, seed=5, captions_per_video=10)
    summary = syn.write_collection(str(tmp_path / "a"), config, vision=tiny_vision, progress=False)
    collection = datasets.Collection(str(tmp_path / "a"), "synth")
    features = collection.features("resnet50")
    assert (features.n, features.dim) == (7 * 3, 2048)
    assert features.frames_of("video2").shape == (3, 2048)
    assert np.isfinite(features.vectors).all()
    split_counts = {s: len(collection.captions(s)) for s in datasets.SPLITS}
    assert sum(split_counts.values()) == 70 and all(n > 0 for n in split_counts.values())
    assert set(collection.split_video_ids("train")).isdisjoint(collection.split_video_ids("test"))
    vocab = collection.tag_vocab(512)
    targets = datasets.tag_targets(collection.tags(), vocab)
    assert targets.shape == (7, len(vocab)) and targets.max() == 1.0
    assert os.path.exists(tmp_path / "a" / "synth" / "ImageData" / "video0_0.png")
    assert summary["dim"] == 2048
    # Same seed, same bytes; another seed, other bytes.
    syn.write_collection(str(tmp_path / "b"), config, vision=tiny_vision, progress=False)
    assert _tree_digest(str(tmp_path / "a" / "synth")) == _tree_digest(str(tmp_path / "b" / "synth"))
    other = syn.SynthConfig(videos=7, frames=3, size=32, seed=6, captions_per_video=10)
    syn.write_collection(str(tmp_path / "c"), other, vision=tiny_vision, progress=False)
    assert _tree_digest(str(tmp_path / "a" / "synth")) != _tree_digest(str(tmp_path / "c" / "synth"))
    scenes = syn.read_scenes(str(tmp_path / "a" / "synth"))
    assert [s.video_id for s in scenes] == [f"video{i}" for i in range(7)]


def test_cli_synth_and_summary(tmp_path, capsys):
    argv = ["data", "synth", "--root", str(tmp_path), "--videos", "4", "--frames", "2", "--size", "32",
            "--vision-weights", "random", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| dim | 2048 |" in out
    assert main(["data", "summary", "--root", str(tmp_path), "--collection", "synth", "--json"]) == 0
    assert '"dim": 2048' in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [(["--videos", "2"], "--videos"), (["--frames", "1"], "--frames"), (["--size", "8"], "--size")],
)
def test_cli_synth_rejects_bad_sizes_with_one_line(tmp_path, capsys, flags, message):
    code = main(["data", "synth", "--root", str(tmp_path), "--vision-weights", "random", "--quiet"] + flags)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "synth")


def test_cli_summary_of_missing_collection_is_one_line(tmp_path, capsys):
    assert main(["data", "summary", "--root", str(tmp_path), "--collection", "nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# The clips as mp4 files


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_mp4_clips_decode_to_the_frames_the_features_came_from(tmp_path):
    """H.264 (yuv420p, at twice the side) keeps the clips close enough that the built-in extractor
    sees the same frames: cosine >= 0.98 against the collection's own features, frame by frame."""
    import json

    from engine.video import Sampling, decode_video

    vision = RegionExtractor.default()
    config = syn.SynthConfig(videos=6, frames=8, size=64, seed=3, captions_per_video=2)
    syn.write_collection(str(tmp_path / "a"), config, vision=vision, progress=False, mp4_fps=1.0)
    collection_dir = tmp_path / "a" / "synth"
    features = datasets.Collection(str(tmp_path / "a"), "synth").features("resnet50")
    lowest = 1.0
    for index in range(6):
        path = str(collection_dir / "videos" / f"video{index}.mp4")
        decoded = decode_video(path, Sampling(frames=8), size=64)
        assert decoded.timestamps == [float(t) for t in range(8)] and decoded.duration == 8.0
        assert decoded.codec == "h264" and decoded.fps == 1.0 and decoded.frames.shape == (8, 64, 64, 3)
        by_fps = decode_video(path, Sampling(fps=1.0), size=64)  # the same 8 frames
        assert by_fps.timestamps == decoded.timestamps and np.array_equal(by_fps.frames, decoded.frames)
        stored = features.read([syn.frame_id(f"video{index}", f) for f in range(8)])
        lowest = min(lowest, float(_cosines(vision.pooled(decoded.frames), stored).min()))
    print(f"lowest cosine, mp4 frames against the collection's features: {lowest:.4f}")
    assert lowest >= 0.98
    lines = (collection_dir / "videos" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    scenes = syn.read_scenes(str(collection_dir))
    assert [r["id"] for r in records] == [f"video{i}" for i in range(6)]
    for record, scene in zip(records, scenes, strict=True):
        assert record["objects"] == len(scene.objects) and record["background"] == scene.background
        assert record["colour"] == [o.colour for o in scene.objects] and set(record["shape"]) <= set(record["tag"])
    assert {r["split"] for r in records} == {"train", "val", "test"}
    assert sorted(os.listdir(collection_dir / "videos")) == ["metadata.jsonl"] + [f"video{i}.mp4" for i in range(6)]
    # For an existing collection, write_videos gives the same bytes (x264 runs on one thread).
    before = _tree_digest(str(collection_dir / "videos"))
    summary = syn.write_videos(str(collection_dir), fps=1.0, progress=False)
    assert summary["videos"] == 6 and _tree_digest(str(collection_dir / "videos")) == before
    # The demo's route: only the test split's files, without the collection, the same bytes.
    only_test = syn.write_split_videos(str(tmp_path / "test_only"), config, ("test",), progress=False)
    test_ids = [r["id"] for r in records if r["split"] == "test"]
    assert sorted(os.listdir(tmp_path / "test_only")) == sorted(["metadata.jsonl"] + [f"{v}.mp4" for v in test_ids])
    for video_id in test_ids:
        assert (tmp_path / "test_only" / f"{video_id}.mp4").read_bytes() == \
            (collection_dir / "videos" / f"{video_id}.mp4").read_bytes()
    assert {v for v, _ in only_test["captions"]} == set(test_ids) and len(only_test["captions"]) == 2 * len(test_ids)


def test_cli_synth_mp4_flags(tmp_path, capsys):
    base = ["data", "synth", "--videos", "3", "--frames", "2", "--size", "32", "--vision-weights", "random",
            "--quiet"]
    assert main(base + ["--root", str(tmp_path / "plain")]) == 0
    assert not os.path.exists(tmp_path / "plain" / "synth" / "videos")  # without --mp4: as before
    assert main(base + ["--root", str(tmp_path / "mp4"), "--mp4", "--mp4-fps", "2"]) == 0
    assert "mp4: 3 clips at 2 fps" in capsys.readouterr().out
    videos = tmp_path / "mp4" / "synth" / "videos"
    assert sorted(os.listdir(videos)) == ["metadata.jsonl", "video0.mp4", "video1.mp4", "video2.mp4"]
    code = main(base + ["--root", str(tmp_path / "bad"), "--mp4", "--mp4-fps", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--mp4-fps" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "bad" / "synth")
