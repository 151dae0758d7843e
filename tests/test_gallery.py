"""Galleries: building (`cvr index`), loading and every refusal, crash safety, `--append`, and the
FAISS first stage with two-stage reranking."""
import argparse
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

from engine import datasets
from engine.checkpoint import CheckpointError, load_checkpoint
from engine.cli import main
from engine.gallery import (
    EMBEDDINGS,
    IDS,
    MANIFEST,
    FaissSpec,
    Gallery,
    GalleryError,
    add_index_command,
    build_gallery,
    clean_stale,
    search,
    two_stage_search,
    write_gallery,
)
from engine.model import Embeddings
from training.retrieval import video_frames

HERE = os.path.dirname(os.path.abspath(__file__))
FEATURE = "resnext101-resnet152"
TINY = ["--epochs", "1", "--batch-size", "16", "--latent-dim", "32", "--attn-dim", "16", "--video-gru-hidden", "16",
        "--video-local-dim", "32", "--quiet"]




@pytest.fixture(scope="module")
def ckpt(msrvtt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "model")
    argv = ["train", "--root", msrvtt, "--collection", "msrvtt10k", "--feature", FEATURE, "--out", out] + TINY
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def model(ckpt):
    return load_checkpoint(ckpt)


@pytest.fixture(scope="module")
def built(msrvtt, ckpt, model, tmp_path_factory):
    """A float16 gallery of every video, with a flat FAISS index (built once, never modified)."""
    out = str(tmp_path_factory.mktemp("galleries") / "all")
    build_gallery(ckpt, msrvtt, "msrvtt10k", out=out, model=model, faiss="flat", progress=False)
    return out


def _direct(model, root, ids):
    """The video tower run directly on frames, in one batch: what the gallery must hold."""
    bigfile = datasets.Collection(root, "msrvtt10k").features(FEATURE)
    frames, mask = video_frames(bigfile, ids, 64)
    with torch.no_grad():
        return model.encode_video(frames, mask)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_index_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["index"] + argv)
    return args.func(args)


def _random_embeddings(n, dim, concepts, seed, clusters=None):
    """L2-normalised latent vectors (clustered when `clusters` is given) and concept probabilities."""
    g = torch.Generator().manual_seed(seed)
    if clusters:
        centres = torch.randn(clusters, 2, dim, generator=g)
        lat = centres[torch.randint(0, clusters, (n,), generator=g)] + 0.5 * torch.randn(n, 2, dim, generator=g)
    else:
        lat = torch.randn(n, 2, dim, generator=g)
    lat = torch.nn.functional.normalize(lat, dim=-1)
    return Embeddings(lat=lat, con=torch.rand(n, 2, concepts, generator=g))


# ---------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_float16_matches_the_video_tower(built, msrvtt, ckpt, model):
    gallery = Gallery.load(built, checkpoint_id=model.checkpoint_id)
    ids = datasets.Collection(msrvtt, "msrvtt10k").features(FEATURE).video_ids()
    assert gallery.ids == ids and len(gallery) == 12
    assert gallery.lat.dtype == torch.float16 and gallery.lat.shape == (12, 2, 32) and gallery.con.shape == (12, 2, 11)
    direct = _direct(model, msrvtt, ids)
    assert torch.equal(gallery.lat, direct.lat.half()) and torch.equal(gallery.con, direct.con.half())
    emb = gallery.embeddings()
    assert emb.lat.dtype == torch.float32
    torch.testing.assert_close(emb.lat, direct.lat, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(emb.con, direct.con, atol=1e-3, rtol=1e-3)
    manifest = gallery.manifest
    assert manifest["checkpoint"] == {"id": model.checkpoint_id, "path": os.path.abspath(ckpt)}
    assert manifest["dims"] == {"latent": 32, "concept": 11} and manifest["count"] == 12
    assert manifest["dtype"] == "float16" and set(manifest["files"]) == {IDS, EMBEDDINGS, "faiss.index"}
    assert manifest["norm"]["min_max"] == model.matcher.norm.tolist()
    assert manifest["faiss"]["kind"] == "flat" and manifest["created"].endswith("Z")
    assert gallery.faiss_index.ntotal == 12


def test_cli_float32_split_is_exact(msrvtt, ckpt, model, tmp_path, capsys):
    out = str(tmp_path / "test32")
    assert _cli(["--checkpoint", ckpt, "--root", msrvtt, "--collection", "msrvtt10k", "--split", "test",
                 "--out", out, "--dtype", "float32", "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    gallery = Gallery.load(out, checkpoint_id=model.checkpoint_id)
    ids = datasets.Collection(msrvtt, "msrvtt10k").split_video_ids("test")
    direct = _direct(model, msrvtt, ids)
    assert gallery.ids == ids and gallery.manifest["faiss"] is None and gallery.faiss_index is None
    assert torch.equal(gallery.lat, direct.lat) and torch.equal(gallery.con, direct.con)

    # --append: the val split joins with the same checkpoint; the result is a complete gallery.
    build_gallery(ckpt, msrvtt, "msrvtt10k", split="val", out=out, append=True, model=model, progress=False)
    val_ids = datasets.Collection(msrvtt, "msrvtt10k").split_video_ids("val")
    appended = Gallery.load(out, checkpoint_id=model.checkpoint_id)
    assert appended.ids == ids + val_ids and appended.manifest["dtype"] == "float32"
    assert torch.equal(appended.lat[: len(ids)], direct.lat)
    assert torch.equal(appended.lat[len(ids):], _direct(model, msrvtt, val_ids).lat)
    assert [s["split"] for s in appended.manifest["sources"]] == ["test", "val"]
    with pytest.raises(GalleryError, match=f"video {val_ids[0]} is already in the gallery"):
        build_gallery(ckpt, msrvtt, "msrvtt10k", split="val", out=out, append=True, model=model, progress=False)
    with pytest.raises(GalleryError, match="cannot append as float16"):
        build_gallery(ckpt, msrvtt, "msrvtt10k", split="train", out=out, append=True, dtype="float16",
                      model=model, progress=False)
    assert Gallery.load(out).ids == ids + val_ids  # refusals left it as it was


def test_append_refuses_a_gallery_of_another_checkpoint(msrvtt, ckpt, model, tmp_path):
    out = str(tmp_path / "foreign")
    emb = _random_embeddings(3, 32, 11, seed=0)
    write_gallery(out, ["a", "b", "c"], emb.lat, emb.con, {"id": "f" * 64})
    with pytest.raises(GalleryError, match="built with checkpoint ffffffffffff"):
        build_gallery(ckpt, msrvtt, "msrvtt10k", split="val", out=out, append=True, model=model, progress=False)
    with pytest.raises(GalleryError, match="no such gallery folder"):
        build_gallery(ckpt, msrvtt, "msrvtt10k", out=str(tmp_path / "none"), append=True, model=model)


def test_append_keeps_the_faiss_index_unless_told(msrvtt, ckpt, model, tmp_path, capsys):
    out = str(tmp_path / "indexed")
    common = ["--checkpoint", ckpt, "--root", msrvtt, "--collection", "msrvtt10k", "--out", out, "--quiet"]
    assert _cli(common + ["--split", "test", "--faiss", "hnsw", "--hnsw-m", "8", "--ef-search", "16"]) == 0
    assert "FAISS kind=hnsw, M=8, efConstruction=40, efSearch=16" in capsys.readouterr().out
    assert _cli(common + ["--split", "val", "--append"]) == 0
    gallery = Gallery.load(out, checkpoint_id=model.checkpoint_id)
    assert gallery.manifest["faiss"]["M"] == 8 and gallery.manifest["faiss"]["efSearch"] == 16
    assert gallery.faiss_index.ntotal == len(gallery) == 6 and gallery.faiss_index.hnsw.efSearch == 16
    with pytest.raises(GalleryError, match="--nlist is a parameter of --faiss ivf"):
        _cli(common + ["--split", "train", "--append", "--nlist", "4"])
    assert _cli(common + ["--split", "train", "--append", "--faiss", "none"]) == 0
    gallery = Gallery.load(out)
    assert len(gallery) == 12 and gallery.faiss_index is None and "faiss.index" not in os.listdir(out)


def test_refuses_to_replace_a_folder_that_is_not_a_gallery(msrvtt, ckpt, model, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(GalleryError, match="exists and is not a gallery"):
        build_gallery(ckpt, msrvtt, "msrvtt10k", out=str(precious), model=model, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# Refusals when loading


def _edit_manifest(folder, **changes):
    path = os.path.join(folder, MANIFEST)
    manifest = json.load(open(path))
    for key, value in changes.items():
        parent = manifest
        *path_keys, last = key.split("__")
        for name in path_keys:
            parent = parent[name]
        parent[last] = value
    json.dump(manifest, open(path, "w"))


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

    g = _copy(built, tmp_path / "dims")
    _edit_manifest(g, dims__latent=64)
    refused(g, r"lat has shape \(12, 2, 32\), the manifest says \(12, 2, 64\)")

    g = _copy(built, tmp_path / "format")
    _edit_manifest(g, format="someone-else/gallery")
    refused(g, "not a CVR-SDGM gallery file")

    g = _copy(built, tmp_path / "version")
    _edit_manifest(g, version=2)
    refused(g, "version 2, this engine reads 1")

    g = _copy(built, tmp_path / "faiss")
    os.remove(os.path.join(g, "faiss.index"))
    refused(g, "missing file faiss.index")


# ---------------------------------------------------------------------------------------------
# Refusals when building


def test_build_refuses_bad_checkpoints_and_inputs(msrvtt, ckpt, model, tmp_path):
    out = str(tmp_path / "g")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        _cli(["--checkpoint", str(tmp_path / "nope"), "--root", msrvtt, "--collection", "msrvtt10k", "--out", out])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(CheckpointError, match="not a CVR-SDGM checkpoint"):
        _cli(["--checkpoint", str(foreign), "--root", msrvtt, "--collection", "msrvtt10k", "--out", out])

    # An empty split.
    root = str(tmp_path / "empty")
    write_msrvtt_fixture(root, n_videos=4)
    datasets.write_captions(os.path.join(root, "msrvtt10k", "TextData", "msrvtt10ktest.caption.txt"), [])
    with pytest.raises(GalleryError, match="no videos to index"):
        build_gallery(ckpt, root, "msrvtt10k", split="test", out=out, model=model, progress=False)

    # NaN frame features: video_frames' error names the video.
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
    import engine.gallery as gallery_module

    out = _copy(built, tmp_path / "good")
    before = Gallery.load(out)

    def failing_write(work, lat, con):
        with open(os.path.join(work, EMBEDDINGS), "wb") as handle:
            handle.write(b"half a file")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(gallery_module, "_write_embeddings", failing_write)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_gallery(ckpt, msrvtt, "msrvtt10k", split="test", out=out, model=model, progress=False)
    monkeypatch.undo()
    after = Gallery.load(out, checkpoint_id=model.checkpoint_id)
    assert after.ids == before.ids and torch.equal(after.lat, before.lat)
    assert _leftovers(out) == []

    # The second rename fails: the old gallery is put back.
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.path.basename(str(src)).startswith(".good.tmp-"):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(gallery_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        build_gallery(ckpt, msrvtt, "msrvtt10k", split="test", out=out, model=model, progress=False)
    monkeypatch.undo()
    assert Gallery.load(out).ids == before.ids and _leftovers(out) == []


KILLED_WRITER = """
import os, sys, time
import torch
torch.set_num_threads(1)
import engine.gallery as g
real = g._write_embeddings
def slow(work, lat, con):
    real(work, lat, con)
    open(sys.argv[1], "w").close()  # tell the test we are midway
    time.sleep(120)
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


def test_clean_stale_restores_a_gallery_moved_aside(built, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".g.old-{dead.pid}-x"
    _copy(built, aside)
    live = tmp_path / f".g.tmp-{os.getpid()}-y"
    live.mkdir()
    target = str(tmp_path / "g")
    assert clean_stale(target) == [str(aside)]
    assert len(Gallery.load(target)) == 12 and live.exists()


# ---------------------------------------------------------------------------------------------
# FAISS first stage and two-stage search


def test_flat_two_stage_with_m_equal_n_is_exhaustive(built, model, tmp_path):
    queries = _random_embeddings(7, 32, 11, seed=1)
    gallery = Gallery.load(built, checkpoint_id=model.checkpoint_id)
    exhaustive = model.score(queries, gallery.embeddings(), k=5)
    values, indices = two_stage_search(model, gallery, queries, k=5, m=len(gallery))
    assert torch.equal(values, exhaustive[0]) and torch.equal(indices, exhaustive[1])

    # A larger random gallery, with ties forced by duplicated rows (ties go to the lower row).
    emb = _random_embeddings(400, 32, 11, seed=2)
    emb.lat[200:210], emb.con[200:210] = emb.lat[:10], emb.con[:10]
    out = str(tmp_path / "flat")
    write_gallery(out, [f"v{i}" for i in range(400)], emb.lat, emb.con, {"id": model.checkpoint_id},
                  faiss=FaissSpec("flat"))
    gallery = Gallery.load(out, checkpoint_id=model.checkpoint_id)
    queries = Embeddings(lat=torch.cat([emb.lat[:10], queries.lat]), con=torch.cat([emb.con[:10], queries.con]))
    exhaustive = model.score(queries, gallery.embeddings(), k=20)
    values, indices = two_stage_search(model, gallery, queries, k=20, m=400)
    assert torch.equal(values, exhaustive[0]) and torch.equal(indices, exhaustive[1])
    assert gallery.default_search_mode() == "exhaustive"
    assert gallery.default_search_mode(threshold=100) == "two_stage"
    mode_values, _ = search(model, gallery, queries, k=20, mode="two_stage", m=400)
    assert torch.equal(mode_values, values)


@pytest.mark.parametrize("spec, recorded", [
    (FaissSpec("ivf", nlist=16, nprobe=8), {"nlist": 16, "nprobe": 8}),
    (FaissSpec("hnsw", hnsw_m=16, ef_construction=80, ef_search=128), {"M": 16, "efConstruction": 80, "efSearch": 128}),
])
def test_approximate_first_stage_recall(spec, recorded, model, tmp_path):
    n, k = 3000, 10
    emb = _random_embeddings(n, 32, 11, seed=3, clusters=40)
    out = str(tmp_path / spec.kind)
    write_gallery(out, [f"v{i}" for i in range(n)], emb.lat, emb.con, {"id": model.checkpoint_id}, faiss=spec)
    gallery = Gallery.load(out, checkpoint_id=model.checkpoint_id)
    assert {key: gallery.manifest["faiss"][key] for key in recorded} == recorded
    assert gallery.manifest["faiss"]["kind"] == spec.kind and gallery.manifest["faiss"]["metric"] == "inner_product"
    queries = _random_embeddings(100, 32, 11, seed=4, clusters=40)
    q = queries.lat[:, 0].numpy()
    truth = torch.topk(queries.lat[:, 0] @ gallery.embeddings().lat[:, 0].T, k).indices.numpy()
    found = gallery.candidates(q, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)])
    assert recall > 0.9, recall
    # Reranking scores its candidates exactly as the exhaustive scorer does.
    values, indices = two_stage_search(model, gallery, queries, k=5, m=50)
    full = model.score(queries, gallery.embeddings())
    assert (indices >= 0).all() and torch.equal(values, full.gather(1, indices))
    assert (values[:, :-1] >= values[:, 1:]).all()


def test_ivf_nlist_is_capped_by_the_gallery_size(model, tmp_path):
    emb = _random_embeddings(6, 32, 11, seed=5)
    out = str(tmp_path / "tiny_ivf")
    write_gallery(out, [f"v{i}" for i in range(6)], emb.lat, emb.con, {"id": model.checkpoint_id},
                  faiss=FaissSpec("ivf", nlist=100, nprobe=100))
    gallery = Gallery.load(out)
    assert gallery.manifest["faiss"]["nlist"] == 6 and gallery.manifest["faiss"]["nprobe"] == 6
    assert gallery.candidates(emb.lat[:, 0].numpy(), 50).shape == (6, 6)
    with pytest.raises(GalleryError, match=r"expected \(Q, 32\)"):
        gallery.candidates(np.zeros((2, 8), np.float32), 3)
