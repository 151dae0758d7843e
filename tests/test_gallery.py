"""Galleries: building (`cvr index`), loading and every refusal, crash safety, `--append`, and the
FAISS first stage described by index_factory strings. Searching them is tests/test_search.py."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from msrvtt_fixture import write_msrvtt_fixture

from engine import datasets, files
from engine.checkpoint import CheckpointError
from engine.cli import main
from engine.files import clean_stale
from engine.gallery import EMBEDDINGS, IDS, MANIFEST, Gallery, GalleryError, faiss_factory, faiss_search_parameters
from engine.indexing import build_gallery, write_gallery
from engine.integrity import seal
from engine.outputs import NotOursError

HERE = os.path.dirname(os.path.abspath(__file__))
FEATURE = "resnext101-resnet152"


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def built(msrvtt, ckpt, model, tmp_path_factory):
    """A float16 gallery of every video, with a flat FAISS index (built once, never modified)."""
    out = str(tmp_path_factory.mktemp("galleries") / "all")
    build_gallery(ckpt, msrvtt, "msrvtt10k", out=out, model=model, faiss="flat", progress=False)
    return out


def _direct(model, root, ids):
    """The video tower run directly on frames, in one batch: what the gallery must hold (numpy)."""
    bigfile = datasets.Collection(root, "msrvtt10k").features(FEATURE)
    frames, mask = datasets.video_frames(bigfile, ids, 64)
    with torch.no_grad():
        emb = model.encode_video(torch.from_numpy(frames), torch.from_numpy(mask))
    return emb.lat.numpy(), emb.con.numpy()


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def _index(argv):
    return main(["index"] + argv)


def random_embeddings(n, dim, concepts, seed, clusters=None):
    """L2-normalised latent vectors (clustered when `clusters` is given) and concept probabilities."""
    rng = np.random.default_rng(seed)
    if clusters:
        centres = rng.normal(size=(clusters, 2, dim))
        lat = centres[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, 2, dim))
    else:
        lat = rng.normal(size=(n, 2, dim))
    lat = (lat / np.linalg.norm(lat, axis=-1, keepdims=True)).astype(np.float32)
    return lat, rng.random((n, 2, concepts), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_float16_matches_the_video_tower(built, msrvtt, ckpt, model):
    gallery = Gallery.load(built, checkpoint_id=model.checkpoint_id)
    ids = datasets.Collection(msrvtt, "msrvtt10k").features(FEATURE).video_ids()
    assert gallery.ids == ids and len(gallery) == 12
    assert gallery.lat.dtype == np.float16 and gallery.lat.shape == (12, 2, 32) and gallery.con.shape == (12, 2, 11)
    assert isinstance(gallery.lat, np.memmap) and isinstance(gallery.con, np.memmap)  # never copied whole
    lat, con = _direct(model, msrvtt, ids)
    assert np.array_equal(gallery.lat, lat.astype(np.float16)) and np.array_equal(gallery.con, con.astype(np.float16))
    assert gallery.nbytes == 12 * 2 * (32 + 11) * 2
    manifest = gallery.manifest
    # The checkpoint is recorded relative to the gallery: the two can move together.
    assert manifest["checkpoint"] == {"id": model.checkpoint_id,
                                      "path": os.path.relpath(os.path.abspath(ckpt), os.path.abspath(built))}
    assert manifest["dims"] == {"latent": 32, "concept": 11} and manifest["count"] == 12
    assert manifest["dtype"] == "float16" and set(manifest["files"]) == {IDS, EMBEDDINGS, "faiss.index"}
    assert manifest["norm"]["min_max"] == model.matcher.norm.tolist()
    assert manifest["faiss"]["factory"] == "Flat" and manifest["faiss"]["shorthand"] == "flat"
    assert manifest["created"].endswith("Z") and not os.path.isabs(manifest["sources"][0]["root"])
    assert gallery.faiss_index.ntotal == 12


def test_cli_float32_split_is_exact(msrvtt, ckpt, model, tmp_path, capsys):
    out = str(tmp_path / "test32")
    assert _index(["--checkpoint", ckpt, "--root", msrvtt, "--collection", "msrvtt10k", "--split", "test",
                   "--out", out, "--dtype", "float32", "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    gallery = Gallery.load(out, checkpoint_id=model.checkpoint_id)
    ids = datasets.Collection(msrvtt, "msrvtt10k").split_video_ids("test")
    lat, con = _direct(model, msrvtt, ids)
    assert gallery.ids == ids and gallery.manifest["faiss"] is None and gallery.faiss_index is None
    assert np.array_equal(gallery.lat, lat) and np.array_equal(gallery.con, con)

    # --append: the val split joins with the same checkpoint; the result is a complete gallery.
    build_gallery(ckpt, msrvtt, "msrvtt10k", split="val", out=out, append=True, model=model, progress=False)
    val_ids = datasets.Collection(msrvtt, "msrvtt10k").split_video_ids("val")
    appended = Gallery.load(out, checkpoint_id=model.checkpoint_id)
    assert appended.ids == ids + val_ids and appended.manifest["dtype"] == "float32"
    assert np.array_equal(appended.lat[: len(ids)], lat)
    assert np.array_equal(appended.lat[len(ids):], _direct(model, msrvtt, val_ids)[0])
    assert [s["split"] for s in appended.manifest["sources"]] == ["test", "val"]
    with pytest.raises(GalleryError, match=f"video {val_ids[0]} is already in the gallery"):
        build_gallery(ckpt, msrvtt, "msrvtt10k", split="val", out=out, append=True, model=model, progress=False)
    with pytest.raises(GalleryError, match="cannot append as float16"):
        build_gallery(ckpt, msrvtt, "msrvtt10k", split="train", out=out, append=True, dtype="float16",
                      model=model, progress=False)
    assert Gallery.load(out).ids == ids + val_ids  # refusals left it as it was


def test_append_refuses_a_gallery_of_another_checkpoint(msrvtt, ckpt, model, tmp_path):
    out = str(tmp_path / "foreign")
    lat, con = random_embeddings(3, 32, 11, seed=0)
    write_gallery(out, ["a", "b", "c"], lat, con, {"id": "f" * 64})
    with pytest.raises(GalleryError, match="built with checkpoint ffffffffffff"):
        build_gallery(ckpt, msrvtt, "msrvtt10k", split="val", out=out, append=True, model=model, progress=False)
    with pytest.raises(GalleryError, match="no such gallery folder"):
        build_gallery(ckpt, msrvtt, "msrvtt10k", out=str(tmp_path / "none"), append=True, model=model)


def test_append_keeps_the_faiss_index_unless_told(msrvtt, ckpt, model, tmp_path, capsys):
    out = str(tmp_path / "indexed")
    common = ["--checkpoint", ckpt, "--root", msrvtt, "--collection", "msrvtt10k", "--out", out, "--quiet"]
    assert _index(common + ["--split", "test", "--faiss", "HNSW8"]) == 0
    assert "FAISS HNSW8, efSearch 64" in capsys.readouterr().out
    assert _index(common + ["--split", "val", "--append"]) == 0
    gallery = Gallery.load(out, checkpoint_id=model.checkpoint_id)
    assert gallery.manifest["faiss"]["factory"] == "HNSW8" and "shorthand" not in gallery.manifest["faiss"]
    assert gallery.faiss_index.ntotal == len(gallery) == 6
    # A shorthand is resolved again for the grown gallery: ivf's lists follow sqrt(N).
    assert _index(common + ["--split", "train", "--append", "--faiss", "ivf"]) == 0
    assert Gallery.load(out).manifest["faiss"]["factory"] == "IVF3,SQfp16"  # round(sqrt(12))
    assert _index(common + ["--split", "test", "--faiss", "none"]) == 0
    gallery = Gallery.load(out)
    assert len(gallery) == 3 and gallery.faiss_index is None and "faiss.index" not in os.listdir(out)


def test_refuses_to_replace_a_folder_that_is_not_a_gallery(msrvtt, ckpt, model, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(NotOursError, match="is not a gallery.*--overwrite"):
        build_gallery(ckpt, msrvtt, "msrvtt10k", out=str(precious), model=model, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# Refusals when loading


def _edit_manifest(folder, reseal=True, **changes):
    """Change manifest fields; resealed by default (as if written so), so that the field checks
    behind the manifest's own digest are what is tested."""
    path = os.path.join(folder, MANIFEST)
    manifest = json.load(open(path))
    for key, value in changes.items():
        parent = manifest
        *path_keys, last = key.split("__")
        for name in path_keys:
            parent = parent[name]
        parent[last] = value
    json.dump(seal(manifest) if reseal else manifest, open(path, "w"))


def test_load_refuses_missing_damaged_and_foreign_galleries(built, model, tmp_path):
    def refused(folder, match, **kwargs):
        with pytest.raises(GalleryError, match=match) as info:
            Gallery.load(folder, **kwargs)
        assert "\n" not in str(info.value)

    refused(str(tmp_path / "nowhere"), "no such gallery folder")
    refused(str(tmp_path), "not a gallery")
    refused(built, "built with checkpoint", checkpoint_id="0" * 64)

    g = _copy(built, tmp_path / "missing")
    os.remove(os.path.join(g, EMBEDDINGS))
    refused(g, f"missing file {EMBEDDINGS}")

    g = _copy(built, tmp_path / "truncated")
    path = os.path.join(g, EMBEDDINGS)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 40])
    refused(g, "truncated or unreadable")

    g = _copy(built, tmp_path / "flipped")
    path = os.path.join(g, EMBEDDINGS)
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x01  # inside the con array: still a well-formed file, different numbers
    open(path, "wb").write(bytes(data))
    refused(g, f"{EMBEDDINGS}: checksum mismatch")

    g = _copy(built, tmp_path / "ids_dropped")
    path = os.path.join(g, IDS)
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(lines[:-1]) + "\n")
    refused(g, "11 ids but the manifest says 12")

    g = _copy(built, tmp_path / "ids_swapped")
    path = os.path.join(g, IDS)
    open(path, "w").write("\n".join([lines[1], lines[0]] + lines[2:]) + "\n")
    refused(g, f"{IDS}: checksum mismatch")

    g = _copy(built, tmp_path / "edited_checkpoint")
    _edit_manifest(g, checkpoint__id="1" * 64)
    refused(g, "built with checkpoint 111111111111", checkpoint_id=model.checkpoint_id)
    _edit_manifest(g, reseal=False, checkpoint__id="2" * 64)  # edited by hand: its digest tells
    refused(g, "manifest.json: edited or damaged")

    g = _copy(built, tmp_path / "dims")
    _edit_manifest(g, dims__latent=64)
    refused(g, r"lat has shape \(12, 2, 32\), the manifest says \(12, 2, 64\)")

    g = _copy(built, tmp_path / "format")
    _edit_manifest(g, format="someone-else/gallery")
    refused(g, "not a CVR-SDGM gallery file")

    g = _copy(built, tmp_path / "version")
    _edit_manifest(g, version=1)
    refused(g, "version 1, this engine reads 2 and 3: rebuild it with `cvr index`")

    g = _copy(built, tmp_path / "faiss")
    os.remove(os.path.join(g, "faiss.index"))
    refused(g, "missing file faiss.index")

    g = _copy(built, tmp_path / "faiss_field")
    _edit_manifest(g, faiss="ivf")  # a string where the index's record belongs
    refused(g, "missing or invalid field 'faiss'")


# ---------------------------------------------------------------------------------------------
# Refusals when building


def test_build_refuses_bad_checkpoints_and_inputs(msrvtt, ckpt, model, tmp_path):
    out = str(tmp_path / "g")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        build_gallery(str(tmp_path / "nope"), msrvtt, "msrvtt10k", out=out)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(CheckpointError, match="not a CVR-SDGM checkpoint"):
        build_gallery(str(foreign), msrvtt, "msrvtt10k", out=out)

    # An empty split.
    root = str(tmp_path / "empty")
    write_msrvtt_fixture(root, n_videos=4)
    datasets.write_captions(os.path.join(root, "msrvtt10k", "TextData", "msrvtt10ktest.caption.txt"), [])
    with pytest.raises(GalleryError, match="no videos to index"):
        build_gallery(ckpt, root, "msrvtt10k", split="test", out=out, model=model, progress=False)

    # NaN frame features: engine.datasets.video_frames' error names the video.
    root = str(tmp_path / "nan")
    write_msrvtt_fixture(root, n_videos=4)
    feature_bin = os.path.join(root, "msrvtt10k", "FeatureData", FEATURE, "feature.bin")
    rows = np.memmap(feature_bin, dtype="<f4", mode="r+", shape=(12, 4096))
    rows[4, 7] = np.nan  # frame 1 of the second video
    rows.flush()
    del rows
    with pytest.raises(ValueError, match="video video7011 has NaN or infinite frame features"):
        build_gallery(ckpt, root, "msrvtt10k", out=out, model=model, progress=False)

    # Frame features of the wrong width.
    root = str(tmp_path / "narrow")
    write_msrvtt_fixture(root, n_videos=4, dim=64)
    with pytest.raises(GalleryError, match="frame features are 64-d but checkpoint .* expects 4096-d"):
        build_gallery(ckpt, root, "msrvtt10k", out=out, model=model, progress=False)
    assert not os.path.exists(out)


# ---------------------------------------------------------------------------------------------
# Crash safety


def _leftovers(folder):
    parent, name = os.path.split(folder)
    return [e for e in os.listdir(parent) if e.startswith(f".{name}.")]


def test_a_failed_write_keeps_the_previous_gallery(built, msrvtt, ckpt, model, tmp_path, monkeypatch):
    import engine.indexing as indexing

    out = _copy(built, tmp_path / "good")
    before = Gallery.load(out)

    def failing_write(work, lat, con):
        with open(os.path.join(work, EMBEDDINGS), "wb") as handle:
            handle.write(b"half a file")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(indexing, "_write_embeddings", failing_write)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_gallery(ckpt, msrvtt, "msrvtt10k", split="test", out=out, model=model, progress=False)
    monkeypatch.undo()
    after = Gallery.load(out, checkpoint_id=model.checkpoint_id)
    assert after.ids == before.ids and np.array_equal(after.lat, before.lat)
    assert _leftovers(out) == []

    # The second rename fails (where the filesystem cannot exchange two folders in one step):
    # the old gallery is put back.
    monkeypatch.setenv("CVR_RENAME_EXCHANGE", "0")
    real_rename = os.rename

    def failing_rename(src, dst):
        if os.path.basename(str(src)).startswith(".good.tmp-"):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(files.os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        build_gallery(ckpt, msrvtt, "msrvtt10k", split="test", out=out, model=model, progress=False)
    monkeypatch.undo()
    assert Gallery.load(out).ids == before.ids and _leftovers(out) == []


KILLED_WRITER = """
import os, sys, time
import torch
torch.set_num_threads(1)
import engine.indexing as g
real = g._write_embeddings
def slow(work, lat, con):
    digest = real(work, lat, con)
    open(sys.argv[1], "w").close()  # tell the test we are midway
    time.sleep(120)
    return digest
g._write_embeddings = slow
g.build_gallery(sys.argv[2], sys.argv[3], "msrvtt10k", split="test", out=sys.argv[4], progress=False)
"""


def test_a_killed_indexer_leaves_the_previous_gallery(built, msrvtt, ckpt, model, tmp_path):
    out = _copy(built, tmp_path / "live")
    marker = str(tmp_path / "midway")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    process = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, marker, ckpt, msrvtt, out], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not os.path.exists(marker):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the indexer never got midway"
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert Gallery.load(out, checkpoint_id=model.checkpoint_id).ids == Gallery.load(built).ids
    leftover = _leftovers(out)
    assert len(leftover) == 1 and ".live.tmp-" in leftover[0]  # the dead writer's work folder
    # The next writer (or clean_stale) clears what a dead writer left; a live one's is kept.
    assert clean_stale(out) == [os.path.join(str(tmp_path), leftover[0])]
    assert _leftovers(out) == []


HOLDER = """
import os, sys, time
from engine import locks
with locks.lock(sys.argv[1]):
    os.mkdir(os.path.join(os.path.dirname(sys.argv[1]), f".g.tmp-{os.getpid()}-y"))
    print("held", flush=True)
    time.sleep(600)
"""


def test_clean_stale_restores_a_gallery_moved_aside(built, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".g.old-{dead.pid}-x"
    _copy(built, aside)
    target = str(tmp_path / "g")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    writer = subprocess.Popen([sys.executable, "-c", HOLDER, target], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "held"
        live = tmp_path / f".g.tmp-{writer.pid}-y"
        # While a writer holds the lock, everything beside the folder may be its work in flight.
        assert clean_stale(target) == [] and live.exists() and aside.exists()
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()
    # Once it is gone, its staging folder is a leftover and the folder moved aside goes back.
    assert sorted(clean_stale(target)) == sorted([str(aside), str(live)])
    assert len(Gallery.load(target)) == 12 and not live.exists()


# ---------------------------------------------------------------------------------------------
# The FAISS first stage: factory strings, shorthands, search parameters


@pytest.mark.parametrize("spec, n, factory", [
    ("flat", 5, "Flat"), ("ivf", 100_000, "IVF316,SQfp16"), ("ivf", 6, "IVF2,SQfp16"), ("ivf", 1, "IVF1,SQfp16"),
    ("hnsw", 10, "HNSW32"), ("IVF64,Flat", 10, "IVF64,Flat"),
])
def test_faiss_factory_strings(spec, n, factory):
    assert faiss_factory(spec, n) == factory


@pytest.mark.parametrize("factory, params", [("IVF16,SQfp16", {"nprobe": 16}), ("IVF16,Flat", {"nprobe": 16}),
                                             ("HNSW16", {"efSearch": 64}), ("Flat", {})])
def test_approximate_first_stage_recall(factory, params, model, tmp_path):
    n, k = 3000, 10
    lat, con = random_embeddings(n, 32, 11, seed=3, clusters=40)
    out = str(tmp_path / "g")
    write_gallery(out, [f"v{i}" for i in range(n)], lat, con, {"id": model.checkpoint_id}, faiss=factory)
    gallery = Gallery.load(out, checkpoint_id=model.checkpoint_id)
    record = gallery.manifest["faiss"]
    assert record["factory"] == factory and record["metric"] == "inner_product"
    assert {key: record[key] for key in params} == params
    queries, _ = random_embeddings(100, 32, 11, seed=4, clusters=40)
    stored = gallery.lat[:, 0].astype(np.float32)
    truth = np.argsort(-(queries[:, 0] @ stored.T), axis=1, kind="stable")[:, :k]
    _, found = gallery.faiss_index.search(np.ascontiguousarray(queries[:, 0]), k,
                                          params=faiss_search_parameters(gallery.faiss_index))
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)])
    assert recall > 0.9, recall


def test_search_parameters_are_checked_against_the_index(model, tmp_path):
    lat, con = random_embeddings(40, 32, 11, seed=5)
    ivf = str(tmp_path / "ivf")
    write_gallery(ivf, [f"v{i}" for i in range(40)], lat, con, {"id": model.checkpoint_id}, faiss="IVF4,Flat")
    index = Gallery.load(ivf).faiss_index
    assert faiss_search_parameters(index, nprobe=3).nprobe == 3
    assert faiss_search_parameters(index, nprobe=99).nprobe == 4  # capped by the lists there are
    with pytest.raises(GalleryError, match="--ef-search is a parameter of HNSW"):
        faiss_search_parameters(index, ef_search=8)
    flat = str(tmp_path / "flat")
    write_gallery(flat, [f"v{i}" for i in range(40)], lat, con, {"id": model.checkpoint_id}, faiss="flat")
    with pytest.raises(GalleryError, match="--nprobe is a parameter of IVF"):
        faiss_search_parameters(Gallery.load(flat).faiss_index, nprobe=3)
    with pytest.raises(GalleryError, match="FAISS cannot build 'NotAnIndex'"):
        write_gallery(str(tmp_path / "bad"), ["a"], lat[:1], con[:1], {"id": "x"}, faiss="NotAnIndex")
    with pytest.raises(GalleryError, match="FAISS cannot fill 'IDMap,Flat'"):
        write_gallery(str(tmp_path / "bad"), ["a"], lat[:1], con[:1], {"id": "x"}, faiss="IDMap,Flat")
    assert not os.path.exists(tmp_path / "bad")
