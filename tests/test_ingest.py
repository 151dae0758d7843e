"""Video files in (engine/ingest.py, engine/parts.py): `cvr index --videos` keeps a gallery in step
with a folder, skips and reports bad files, survives SIGKILL, answers with the matching moment and
filters by metadata; `cvr features` writes training features from video files."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import videofiles
from conftest import TINY_TRAIN

from engine.cli import main
from engine.gallery import Gallery
from engine.ingest import IngestOptions, index_videos
from engine.video_embed import SegmentWindow
from engine.video_files import read_metadata

CLIPS = 8


@pytest.fixture(scope="module")
def world():
    """A small built-in collection with its clips as mp4 files (`cvr data synth --mp4`: 1 fps, the
    8 BigFile frames are 8 s of video) and a tiny checkpoint trained on it, in a folder any user
    can read (the unreadable-file test runs as `nobody`)."""
    base = tempfile.mkdtemp(prefix="cvr-ingest-", dir="/tmp")
    os.chmod(base, 0o777)
    data = os.path.join(base, "data")
    assert main(["data", "synth", "--root", data, "--videos", "16", "--captions", "3", "--mp4", "--quiet"]) == 0
    ckpt = os.path.join(base, "ckpt")
    assert main(["train", "--root", data, "--collection", "synth", "--out", ckpt, *TINY_TRAIN]) == 0
    clips = os.path.join(data, "synth", "videos")
    for folder, _, names in os.walk(base):
        for name in names + ["."]:
            os.chmod(os.path.join(folder, name), 0o777 if name == "." else 0o666)
    yield {"base": base, "data": data, "ckpt": ckpt, "clips": clips}
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def model(world):
    from engine.checkpoint import load_checkpoint

    return load_checkpoint(world["ckpt"])


def _folder(world, name: str, clips: int = CLIPS) -> str:
    parent = tempfile.mkdtemp(dir=world["base"])
    os.chmod(parent, 0o777)  # the unreadable-file test runs as another user
    folder = os.path.join(parent, name)
    os.makedirs(folder)
    os.chmod(folder, 0o777)
    for i in range(clips):
        shutil.copy2(os.path.join(world["clips"], f"video{i}.mp4"), folder)
    return folder


def _index(world, model, inputs, out, **options) -> object:
    options.setdefault("workers", 0)
    options.setdefault("progress", False)
    return index_videos(world["ckpt"], inputs, out, IngestOptions(**options), model=model)


def test_a_folder_is_indexed_then_kept_in_step(world, model, capsys):
    folder = _folder(world, "videos")
    out = os.path.join(os.path.dirname(folder), "gallery")
    report = _index(world, model, [folder], out, batch_videos=3)
    assert report.counts == {"new": CLIPS, "changed": 0, "unchanged": 0, "removed": 0, "skipped": 0}
    assert report.exit_code == 0
    gallery = Gallery.load(out)
    assert sorted(gallery.ids) == sorted(f"video{i}" for i in range(CLIPS)) and len(gallery.parts) == 3
    record = gallery.record(gallery.ids.index("video0"))
    assert record["duration"] == 8.0 and record["timestamps"] == [float(t) for t in range(8)]
    assert gallery.paths("video0") == [os.path.join(folder, "video0.mp4")]
    assert os.path.isfile(gallery.thumbnail(0))

    # Nothing changed: nothing decoded, through the command line (whose last line is the counts).
    assert main(["index", "--checkpoint", world["ckpt"], "--videos", folder, "--out", out, "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        f"0 new, 0 changed, {CLIPS} unchanged, 0 removed, 0 skipped"

    # One file changed, one only touched, one copied under a second name, one deleted (then pruned).
    shutil.copyfile(os.path.join(world["clips"], "video0.mp4"), os.path.join(folder, "video1.mp4"))
    os.utime(os.path.join(folder, "video2.mp4"), ns=(1, 1))
    shutil.copy2(os.path.join(folder, "video3.mp4"), os.path.join(folder, "copy_of_3.mp4"))
    os.remove(os.path.join(folder, "video4.mp4"))
    report = _index(world, model, [folder], out, prune=True)
    assert report.counts == {"new": 1, "changed": 1, "unchanged": CLIPS - 2, "removed": 1, "skipped": 0}
    gallery = Gallery.load(out)
    assert "video4" not in gallery.ids and "copy_of_3" not in gallery.ids  # same content: indexed once
    assert sorted(gallery.paths("video3")) == sorted(os.path.join(folder, n) for n in ("video3.mp4", "copy_of_3.mp4"))
    # video1 now holds video0's bytes: one video with two paths, not two copies
    assert "video1" not in gallery.ids and len(gallery.paths("video0")) == 2
    assert len(gallery) == CLIPS - 2

    # The folder moves: --media-root finds it again, nothing is re-indexed.
    moved = folder + "_moved"
    os.rename(folder, moved)
    report = _index(world, model, [moved], out, media_root=moved)
    assert report.counts["unchanged"] == CLIPS and report.counts["new"] == 0  # 7 files and the copy
    assert Gallery.load(out).paths("video5") == [os.path.join(moved, "video5.mp4")]

    assert main(["gallery", "rm", out, "video5"]) == 0
    assert "video5" not in Gallery.load(out).ids
    assert main(["gallery", "rm", out, "no-such-video"]) == 2
    assert "no video 'no-such-video'" in capsys.readouterr().err


def test_bad_files_are_skipped_with_their_reason_and_exit_3(world, capsys):
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.geteuid() == 0 and not videofiles.others_can_enter(checkout):
        pytest.skip(f"{checkout} is closed to other users, so the `nobody` child that makes a mode-000 file "
                    "unreadable could not import the engine either")
    folder = _folder(world, "mixed", clips=2)
    makers = [videofiles.zero_bytes, videofiles.truncated_mp4, videofiles.text_as_mp4, videofiles.audio_m4a,
              videofiles.unknown_codec_avi, videofiles.too_large_avi, videofiles.unreadable_mp4,
              videofiles.corrupt_mp4, videofiles.one_frame_mp4]
    made = {maker.__name__: maker(folder) for maker in makers}
    audio_only = os.path.join(folder, "audio_only.mp4")  # a folder walk takes video extensions only
    os.rename(made["audio_m4a"], audio_only)
    made["audio_m4a"] = audio_only
    listing = os.path.join(os.path.dirname(folder), "list.txt")
    with open(listing, "w") as handle:  # a listed path that is gone by the time it is read
        handle.write(os.path.join(folder, "vanished.mp4") + "\n")
    out = os.path.join(os.path.dirname(folder), "gallery")
    argv = ["index", "--checkpoint", world["ckpt"], "--videos", folder, "--list", listing, "--out", out,
            "--quiet", "--workers", "0"]

    code = videofiles.as_unprivileged(main, argv)
    err = capsys.readouterr().err if os.geteuid() != 0 else ""
    assert code == 3
    report = json.loads(open(os.path.join(out, "index_report.json")).read())
    reasons = {os.path.basename(s["path"]): (s["kind"], s["reason"]) for s in report["skipped"]}
    kinds = {"zero_bytes": "empty", "text_as_mp4": "not-a-video", "audio_m4a": "no-video-stream",
             "unknown_codec_avi": "unsupported-codec", "too_large_avi": "too-large", "unreadable_mp4": "unreadable"}
    expected = {os.path.basename(made[maker]): kind for maker, kind in kinds.items()}
    expected["vanished.mp4"] = "missing"
    for name, kind in expected.items():
        assert name in reasons and reasons[name][0] == kind, (name, reasons)
        assert reasons[name][1] and "\n" not in reasons[name][1]
    if err:
        assert all(f"skipped {os.path.join(folder, n)}" in err for n in expected if n != "vanished.mp4")
    # indexed: the two good clips, the one-frame video, the truncated and the corrupt ones (from the
    # frames that decode, with a warning)
    gallery = Gallery.load(out)
    names = {os.path.basename(p) for v in gallery.ids for p in gallery.paths(v)}
    for maker in ("one_frame_mp4", "truncated_mp4", "corrupt_mp4"):
        assert os.path.basename(made[maker]) in names, maker
    assert {"video0.mp4", "video1.mp4"} <= names
    warned = {os.path.basename(w["path"]) for w in report["warnings"]}
    assert os.path.basename(made["truncated_mp4"]) in warned  # (corrupt.mp4's damage misses 1 fps sampling)
    one_frame = gallery.ids.index(os.path.splitext(os.path.basename(made["one_frame_mp4"]))[0])
    assert gallery.record(one_frame)["frames"] == 1

    # Nothing changed: nothing is re-indexed (the bad files are reported again).
    again = videofiles.as_unprivileged(main, argv)
    report = json.loads(open(os.path.join(out, "index_report.json")).read())
    assert again == 3 and report["counts"]["new"] == 0 and report["counts"]["changed"] == 0
    assert report["counts"]["unchanged"] == len(gallery) and report["indexed_videos"] == 0


def test_nothing_indexable_is_exit_2_and_writes_no_gallery(world, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    videofiles.text_as_mp4(str(folder))
    out = tmp_path / "gallery"
    assert main(["index", "--checkpoint", world["ckpt"], "--videos", str(folder), "--out", str(out), "--quiet"]) == 2
    assert not out.exists() and "nothing could be indexed" in capsys.readouterr().err
    assert main(["index", "--checkpoint", world["ckpt"], "--videos", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("step", ["after-part", "after-batch"])
def test_a_killed_run_loses_at_most_the_batch_in_flight(world, step):
    """SIGKILL between writing a part and replacing the manifest, and just after a commit: the
    gallery loads with what was committed, and the next run goes on from there."""
    folder = _folder(world, "videos")
    out = os.path.join(os.path.dirname(folder), "gallery")
    argv = [sys.executable, "-m", "engine.cli", "index", "--checkpoint", world["ckpt"], "--videos", folder,
            "--out", out, "--quiet", "--batch-size", "3", "--workers", "0"]
    env = dict(os.environ, CVR_TEST_KILL_AT=step, CVR_TEST_KILL_AFTER="2")
    killed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    committed = 2 * 3 if step == "after-batch" else 3  # kill after the 2nd commit, or before it
    gallery = Gallery.load(out)
    assert len(gallery) == committed
    resumed = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == \
        f"{CLIPS - committed} new, 0 changed, {committed} unchanged, 0 removed, 0 skipped"
    assert len(Gallery.load(out)) == CLIPS
    assert sorted(os.listdir(os.path.join(out, "parts"))) == [e["name"].split("/")[1]
                                                              for e in Gallery.load(out).manifest["parts"]]


def test_segments_locate_the_moment_and_cost_what_they_say(world, model, capsys):
    window = SegmentWindow.parse("4:2")
    assert window.spans(8.0) == [(0.0, 4.0), (2.0, 6.0), (4.0, 8.0)]
    assert window.spans(3.0) == [(0.0, 3.0)] and len(window.spans(60.0)) == 29
    assert SegmentWindow.parse("none") is None
    for bad in ("4", "2:4", "0:0", "a:b"):
        with pytest.raises(Exception, match="--segments"):
            SegmentWindow.parse(bad)
    folder = _folder(world, "videos", clips=3)
    out = os.path.join(os.path.dirname(folder), "gallery")
    _index(world, model, [folder], out)
    gallery = Gallery.load(out)
    segments = gallery.parts[0].segments
    assert len(segments["lat"]) == 3 * 3 and np.all(np.diff(segments["bounds"]) == 3)
    query = np.asarray(segments["lat"][4], np.float32)  # video row 1's middle segment, as a query
    (span, score), = gallery.best_segments([1], query)
    assert span == [2.0, 6.0] and score == pytest.approx(float(query @ query), rel=1e-3)
    plain = os.path.join(os.path.dirname(folder), "no_segments")
    _index(world, model, [folder], plain, segments="none")
    assert Gallery.load(plain).best_segments([0], query) == [None]
    # what the segments cost is reported: 3 vectors of D float16 values per video, plus the file header
    infos = []
    for gallery_dir in (out, plain):
        assert main(["gallery", "info", gallery_dir, "--json"]) == 0
        infos.append(json.loads(capsys.readouterr().out)["media"])
    dim = gallery.lat.shape[2]
    assert infos[0]["segments_per_video"] == 3 and 3 * dim * 2 < infos[0]["segment_bytes_per_video"] < 3 * dim * 2 + 400
    assert infos[1]["segments"] is None and infos[1]["segment_bytes_per_video"] == 0


def test_search_prints_paths_segments_thumbnails_and_filters(world, model, capsys):
    folder = _folder(world, "videos")
    out = os.path.join(os.path.dirname(folder), "gallery")
    metadata = os.path.join(os.path.dirname(folder), "meta.csv")
    with open(metadata, "w") as handle:  # keyed by id, or by path
        handle.write("id,tag,year\nvideo0,cooking;outdoor,2020\nvideo1,cooking,2024\n"
                     f"{os.path.join(folder, 'video2.mp4')},outdoor,2022\n")
    assert main(["index", "--checkpoint", world["ckpt"], "--videos", folder, "--out", out, "--quiet",
                 "--metadata", metadata, "--faiss", "flat", "--workers", "1"]) == 0
    capsys.readouterr()
    base = ["search", "--gallery", out, "--checkpoint", world["ckpt"], "-k", "3"]
    assert main(base + ["a red circle"]) == 0
    text = capsys.readouterr().out
    assert "| path | segment (s) | thumbnail |" in text and os.path.join(folder, "video") in text and ".jpg" in text
    assert main(base + ["--json", "a red circle", "--where", "tag=cooking"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["results"]
    assert sorted(h["video_id"] for h in hits) == ["video0", "video1"]
    for hit in hits:
        assert hit["path"].endswith(hit["video_id"] + ".mp4") and os.path.isfile(hit["thumbnail"])
        assert 0 <= hit["segment"][0] < hit["segment"][1] <= 8 and isinstance(hit["segment_score"], float)
    assert main(base + ["--json", "x", "--where", "year>=2022", "--where", "tag=outdoor"]) == 0
    assert [h["video_id"] for h in json.loads(capsys.readouterr().out)[0]["results"]] == ["video2"]
    assert main(base + ["--json", "x", "--where", "duration>100"]) == 0  # matches nothing: no hits, no error
    assert json.loads(capsys.readouterr().out)[0]["results"] == []
    for bad, message in (("duration>>3", "bad filter"), ("colour=red", "unknown filter field 'colour'"),
                         ("=3", "bad filter")):
        assert main(base + ["x", "--where", bad]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_filters_are_exact_in_both_modes(world, model):
    """A filtered search equals the unfiltered ranking with the filtered-out rows removed, exactly
    (exhaustive and two-stage with a FAISS flat first stage), and a selective filter still fills k."""
    from engine.backends.pytorch import TorchPipeline
    from engine.filters import allowed_rows, parse_all
    from engine.search import SearchOptions, search

    folder = _folder(world, "videos")
    out = os.path.join(os.path.dirname(folder), "gallery")
    _index(world, model, [folder], out, faiss="flat")
    gallery = Gallery.load(out)
    pipeline = TorchPipeline(world["ckpt"])
    rng = np.random.default_rng(0)
    q_lat = rng.standard_normal((3, 2, gallery.lat.shape[2])).astype(np.float32)
    q_lat /= np.linalg.norm(q_lat, axis=2, keepdims=True)
    q_con = rng.random((3, 2, gallery.con.shape[2])).astype(np.float32)
    full_values, full_rows = search(pipeline.scorer, gallery, q_lat, q_con, len(gallery),
                                    SearchOptions(mode="exhaustive"))
    allowed = allowed_rows(gallery.fields(), len(gallery), parse_all(["path!=video3.mp4", "frames>=8"]))
    assert allowed.sum() == len(gallery) - 1
    for mode in ("exhaustive", "two-stage"):
        values, rows = search(pipeline.scorer, gallery, q_lat, q_con, 4, SearchOptions(mode=mode), allowed)
        for q in range(3):
            expected = [r for r in full_rows[q] if allowed[r]][:4]
            assert rows[q].tolist() == expected
            np.testing.assert_allclose(values[q], full_values[q][np.isin(full_rows[q], expected)], atol=1e-5)
    only_one = np.zeros(len(gallery), bool)
    only_one[5] = True
    values, rows = search(pipeline.scorer, gallery, q_lat, q_con, 3, SearchOptions(mode="two-stage"), only_one)
    assert rows[:, 0].tolist() == [5, 5, 5] and (rows[:, 1:] == -1).all() and np.isinf(values[:, 1:]).all()


def test_a_rerun_refuses_another_sampling_or_an_unrecorded_extractor(world, model, tiny_ckpt, tmp_path, capsys):
    folder = _folder(world, "videos", clips=2)
    out = os.path.join(os.path.dirname(folder), "gallery")
    _index(world, model, [folder], out)
    assert main(["index", "--checkpoint", world["ckpt"], "--videos", folder, "--out", out, "--frames", "4"]) == 2
    assert "pass the same sampling" in capsys.readouterr().err
    assert main(["index", "--checkpoint", tiny_ckpt, "--videos", folder, "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "does not record which ResNet-50" in err and err.count("\n") == 1


def test_metadata_files_are_read_as_jsonl_or_csv(tmp_path):
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"id": "a", "tag": ["x", "y"], "n": 3}\n\n{"path": "b.mp4", "date": "2026-01-02"}\n')
    assert read_metadata(str(jsonl)) == {"a": {"tag": ["x", "y"], "n": 3}, "b.mp4": {"date": "2026-01-02"}}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tag": 1}\n')
    with pytest.raises(Exception, match="bad.jsonl:1: a metadata record needs an 'id' or a 'path'"):
        read_metadata(str(bad))


def test_features_from_video_files_train_a_model_that_indexes_them(world, tmp_path, capsys):
    """`cvr features` on video files writes the BigFile layout `cvr train` reads, with the
    extractor recorded; a model trained on it records that extractor and indexes the same files."""
    from engine.datasets import Collection

    root = tmp_path / "root"
    shutil.copytree(world["data"], root)
    collection = root / "synth"
    shutil.rmtree(collection / "FeatureData")
    videos = collection / "videos"  # every clip of the collection as a file
    (videos / "broken.mp4").write_bytes(b"")
    code = main(["features", "--videos", str(videos), "--root", str(root), "--collection", "synth",
                 "--feature", "resnet50", "--frames", "8", "--quiet"])
    assert code == 3 and "broken.mp4: empty" in capsys.readouterr().err
    features = Collection(str(root), "synth").features("resnet50")
    assert features.video2frames()["video0"] == [f"video0_{i}" for i in range(8)] and len(features) == 16 * 8
    record = json.loads((collection / "FeatureData" / "resnet50" / "extractor.json").read_text())
    assert record["weights"] == "builtin" and record["image_size"] == 64
    ckpt = str(tmp_path / "ckpt")
    assert main(["train", "--root", str(root), "--collection", "synth", "--out", ckpt, *TINY_TRAIN]) == 0
    config = json.loads(open(os.path.join(ckpt, "config.json")).read())
    assert config["train"]["job"]["extractor"]["weights_sha256"] == record["weights_sha256"]
    out = str(tmp_path / "gallery")
    assert main(["index", "--checkpoint", ckpt, "--videos", world["clips"], "--out", out, "--quiet"]) == 0
    assert len(Gallery.load(out)) == 16


def test_the_built_in_mp4s_reproduce_the_bigfile_route(world, model):
    """Indexing the built-in clips as files with the BigFile's sampling (--frames 8) gives the
    embeddings the feature route gives: per-frame features within cosine 0.98 (tests/test_synthetic.py)
    carry through the video tower."""
    out = os.path.join(tempfile.mkdtemp(dir=world["base"]), "gallery")
    from engine.video import Sampling

    _index(world, model, [world["clips"]], out, sampling=Sampling(fps=None, frames=8), segments="none")
    from_files = Gallery.load(out)
    features = os.path.join(os.path.dirname(out), "features")
    assert main(["index", "--checkpoint", world["ckpt"], "--root", world["data"], "--collection", "synth",
                 "--out", features, "--dtype", "float32", "--quiet"]) == 0
    from_bigfile = Gallery.load(features)
    rows = [from_bigfile.ids.index(v) for v in from_files.ids]
    a = np.asarray(from_files.lat, np.float32)
    b = np.asarray(from_bigfile.lat, np.float32)[rows]
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    print(f"min cosine of the video embeddings, files vs BigFile: {cosine.min():.4f}")
    assert len(from_files) == 16 and cosine.min() >= 0.98
    # A gallery of feature files answers with nulls where video files would give paths and moments.
    hits = [r.details for r in _retriever(world, features).search(["a red circle"], k=2)][0]
    assert hits == [{"path": None, "paths": [], "relative_path": None, "segment": None, "segment_score": None,
                     "thumbnail": None}] * 2


def _retriever(world, gallery):
    from engine.retriever import Retriever

    return Retriever(world["ckpt"], gallery)


def test_features_of_another_extractor_are_refused(world, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(world["data"], root)
    record_path = root / "synth" / "FeatureData" / "resnet50" / "extractor.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps(dict(record, image_size=224)))
    assert main(["index", "--checkpoint", world["ckpt"], "--root", str(root), "--collection", "synth",
                 "--out", str(tmp_path / "g"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "made by ResNet-50 builtin at 224 px" in err and "at 64 px" in err and err.count("\n") == 1


def test_review_edge_cases_keep_the_gallery_loadable(world, model, capsys):
    """Found in review: a removal with a FAISS index, removing every video, swapped file names,
    odd file names, metadata with NaN or numeric-looking ids."""
    from engine.ingest import remove_videos

    folder = _folder(world, "videos", clips=4)
    out = os.path.join(os.path.dirname(folder), "gallery")
    _index(world, model, [folder], out, faiss="flat")
    remove_videos(out, ["video0"])
    os.remove(os.path.join(folder, "video0.mp4"))  # else the next run indexes it again: it is a file there
    gallery = Gallery.load(out)  # the rebuilt index is there and covers the live rows
    assert gallery.faiss_index is not None and gallery.faiss_index.ntotal == len(gallery) == 3

    # Two files swap names: both videos stay, each under the other path.
    a, b = os.path.join(folder, "video1.mp4"), os.path.join(folder, "video2.mp4")
    os.rename(a, a + ".tmp")
    os.rename(b, a)
    os.rename(a + ".tmp", b)
    report = _index(world, model, [folder], out)
    assert report.counts["changed"] == 2 and report.counts["new"] == 0
    gallery = Gallery.load(out)
    assert sorted(gallery.ids) == ["video1", "video2", "video3"]
    assert gallery.paths("video1") == [b] and gallery.paths("video2") == [a]

    # Odd names become safe ids; the gallery loads.
    odd = os.path.join(folder, " spaced name .mp4")
    shutil.copyfile(os.path.join(world["clips"], "video9.mp4"), odd)
    _index(world, model, [folder], out)
    assert "spaced name" in Gallery.load(out).ids

    # Metadata: a NaN is refused up front, a numeric-looking id stays text.
    bad = os.path.join(os.path.dirname(folder), "bad.jsonl")
    with open(bad, "w") as handle:
        handle.write('{"id": "video3", "score": NaN}\n')
    with pytest.raises(Exception, match="bad.jsonl:1: field 'score' must be"):
        _index(world, model, [folder], out, metadata=bad)
    assert read_metadata_csv_ids(os.path.dirname(folder)) == {"0007": {"n": 7}}

    # Every video removed: the gallery still loads (empty), searches say so, a re-run refills it.
    remove_videos(out, list(Gallery.load(out).ids))
    assert len(Gallery.load(out)) == 0
    assert main(["search", "--gallery", out, "--checkpoint", world["ckpt"], "x"]) == 2
    assert "more than the gallery's 0 videos" in capsys.readouterr().err
    assert _index(world, model, [folder], out).counts["new"] == 4  # video1-3 and the odd name
    assert len(Gallery.load(out)) == 4


def read_metadata_csv_ids(folder: str) -> dict:
    path = os.path.join(folder, "ids.csv")
    with open(path, "w", encoding="utf-8-sig") as handle:  # as a spreadsheet writes it, with a BOM
        handle.write("id,n\n0007,7\n")
    return read_metadata(path)


def test_removing_every_row_of_a_feature_gallery_keeps_the_folder(world, tmp_path):
    from engine.ingest import remove_videos

    out = str(tmp_path / "features")
    assert main(["index", "--checkpoint", world["ckpt"], "--root", world["data"], "--collection", "synth",
                 "--out", out, "--quiet"]) == 0
    (tmp_path / "features" / "NOTES.txt").write_text("mine")
    remove_videos(out, list(Gallery.load(out).ids))
    assert (tmp_path / "features" / "NOTES.txt").exists() and len(Gallery.load(out)) == 0


def test_evaluate_through_the_search_path_matches_the_score_matrix(world, tmp_path, capsys):
    """`cvr evaluate --gallery` ranks each caption's video among what search returns; exhaustive,
    it agrees with the matrix evaluation of the same checkpoint and split."""
    gallery = str(tmp_path / "test_gallery")
    assert main(["index", "--checkpoint", world["ckpt"], "--root", world["data"], "--collection", "synth",
                 "--split", "test", "--out", gallery, "--quiet", "--dtype", "float32"]) == 0
    assert main(["evaluate", "--checkpoint", world["ckpt"], "--root", world["data"], "--collection", "synth",
                 "--split", "test", "--out", str(tmp_path / "matrix")]) == 0
    assert main(["evaluate", "--checkpoint", world["ckpt"], "--gallery", gallery, "--split", "test",
                 "--mode", "exhaustive", "--out", str(tmp_path / "served")]) == 0
    capsys.readouterr()
    matrix = json.loads((tmp_path / "matrix.json").read_text())["metrics"]
    served = json.loads((tmp_path / "served.json").read_text())["metrics"]
    for key in ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr"):
        assert served[key] == pytest.approx(matrix[key]), key
    assert served["found"] == 1.0 and served["queries"] == 9
    # A filter that hides every video: every caption misses, nothing crashes.
    assert main(["evaluate", "--checkpoint", world["ckpt"], "--gallery", gallery, "--split", "test",
                 "--out", str(tmp_path / "none"), "--where", "nothing=1"]) == 2
    assert "unknown filter field" in capsys.readouterr().err


def test_indexing_loads_only_the_video_tower(world, model):
    """The video tower alone gives the whole model's video embeddings (indexing never builds the
    text encoder), with the same refusals of damaged weights."""
    import torch
    from safetensors.torch import load_file, save_file

    from engine.checkpoint import CheckpointError, load_video_tower

    tower = load_video_tower(world["ckpt"])
    frames, mask = torch.randn(3, 5, 2048), torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] + [0] * 4]).bool()
    with torch.no_grad():
        ours, theirs = tower.encode_video(frames, mask), model.encode_video(frames, mask)
    assert torch.equal(ours.lat, theirs.lat) and torch.equal(ours.con, theirs.con)
    assert tower.checkpoint_id == model.checkpoint_id
    damaged = os.path.join(tempfile.mkdtemp(dir=world["base"]), "ckpt")
    shutil.copytree(world["ckpt"], damaged)
    weights = os.path.join(damaged, "model.safetensors")
    tensors = load_file(weights)
    name = next(k for k in tensors if k.startswith("video.") and tensors[k].is_floating_point())
    tensors[name][0] = float("nan")
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_video_tower(damaged)


def test_a_fifo_named_like_a_video_is_skipped_not_waited_on(world, model):
    folder = _folder(world, "videos", clips=1)
    os.mkfifo(os.path.join(folder, "pipe.mp4"))  # reading it would block for ever
    report = _index(world, model, [folder], os.path.join(os.path.dirname(folder), "gallery"))
    assert report.counts["new"] == 1 and [(os.path.basename(s.path), s.kind) for s in report.skipped] == \
        [("pipe.mp4", "not-a-video")]
