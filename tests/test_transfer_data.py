"""The transfer protocol's data (training/transfer_data.py): the held-out split and the corpus."""
import hashlib
import json
import os
from dataclasses import asdict

import numpy as np
import pytest

from engine.cli import main as cli_main
from engine.datasets import Collection, video_id_of
from training import synthetic as syn
from training import transfer_data as td


def _named_pairs(caption: str, vocab: syn.Vocabulary) -> set:
    """(colour, shape) pairs a caption names, read from its words alone ("... <colour> <shape> ...")."""
    padded = f" {caption} "
    return {(c, s) for c, cw in vocab.colours.items() for s, sw in vocab.shapes.items()
            if any(f" {a} {b} " in padded for a in cw for b in sw)}


def test_default_captions_are_unchanged():
    # `cvr data synth`'s default output stays byte-identical: the scenes and captions seed 0 draws
    # (the collection's files derive from them) hash to what they did before the transfer options.
    digest = hashlib.sha256()
    for _, video_id, scene, captions, split in syn.drawn_clips(syn.SynthConfig(videos=120), np.random.default_rng(0)):
        digest.update(json.dumps([video_id, asdict(scene), captions, split]).encode())
    assert digest.hexdigest() == "794bd7efd0fd0e7d50cb2a00bf470ce0df44291da5770f08b1df77491ea54a54"


def test_every_object_names_all_and_keeps_the_rest_of_the_draw():
    scene = syn.sample_scene(np.random.default_rng(3), "v")
    while len(scene.objects) < 3:
        scene = syn.sample_scene(np.random.default_rng(len(scene.objects) + 7), "v")
    caption, named = syn.describe_scene(scene, np.random.default_rng(5), every_object=True)
    assert named == scene.objects
    assert _named_pairs(caption, syn.BASE_VOCABULARY) == {(o.colour, o.shape) for o in scene.objects}


def test_spec_validation():
    with pytest.raises(ValueError, match="new single words"):
        td.TransferSpec(held_out_words={"colours": {"red": ["crimson"]}}).validate()
    with pytest.raises(ValueError, match="unknown value"):
        td.TransferSpec(held_out_words={"colours": {"pink": ["rose"]}}).validate()
    with pytest.raises(ValueError, match="pair"):
        td.TransferSpec(held_out_pairs=[["red", "hexagon"]]).validate()
    with pytest.raises(ValueError, match="share"):
        td.TransferSpec(held_out_share=1.0).validate()


def test_query_captions_parts_are_what_they_say():
    spec = td.TransferSpec()
    rng = np.random.default_rng(11)
    full = spec.vocabulary()
    for i in range(40):
        scene = syn.sample_scene(rng, f"t{i}")
        captions, parts = td.query_captions(scene, 6, rng, spec)
        assert len(captions) == len(parts) == 6
        shown = spec.pairs() & {(o.colour, o.shape) for o in scene.objects}
        if len(shown) < len(scene.objects):  # a seen caption is possible: half of each part
            assert parts.count("held_out") == 3
        for caption, part in zip(captions, parts, strict=True):
            held = bool(spec.words() & set(caption.split())) or bool(_named_pairs(caption, full) & spec.pairs())
            assert held == (part == "held_out"), caption


@pytest.fixture(scope="module")
def transfer_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    argv = ["data", "synth", "--root", str(root), "--videos", "40", "--captions", "4", "--frames", "2",
            "--size", "32", "--vision-weights", "random", "--transfer", "--quiet"]
    assert cli_main(argv) == 0
    return root


def test_transfer_collection_holds_out_words_and_pairs(transfer_root):
    spec = td.TransferSpec()
    collection = Collection(transfer_root, "synth")
    scenes = {s.video_id: s for s in syn.read_scenes(str(collection.path))}
    for split in ("train", "val"):
        for cap_id, caption in collection.captions(split):
            assert not spec.words() & set(caption.split()), caption
            objects = {(o.colour, o.shape) for o in scenes[video_id_of(cap_id)].objects}
            assert not objects & spec.pairs()
    record = td.read_split(str(collection.path))
    test_ids = [c for c, _ in collection.captions("test")]
    parts = record["test_parts"]
    assert sorted(parts["seen"] + parts["held_out"]) == sorted(test_ids) and parts["seen"] and parts["held_out"]
    assert record["held_out_pairs"] == [list(p) for p in td.HELD_OUT_PAIRS]
    # the words no training caption uses are not in the tag vocabulary either
    assert not spec.words() & set(collection.tag_vocab(512))


def test_transfer_split_repeats_byte_for_byte(transfer_root, tmp_path):
    again = tmp_path / "again"
    argv = ["data", "synth", "--root", str(again), "--videos", "40", "--captions", "4", "--frames", "2",
            "--size", "32", "--vision-weights", "random", "--transfer", "--quiet"]
    assert cli_main(argv) == 0
    split_file = os.path.join("synth", "TextData", td.SPLIT_FILE)
    assert (again / split_file).read_bytes() == (transfer_root / split_file).read_bytes()


def test_corpus_uses_every_word_and_names_every_object(tmp_path):
    argv = ["data", "synth", "--root", str(tmp_path), "--collection", "corpus", "--videos", "300", "--captions", "3",
            "--size", "32", "--corpus", "--quiet"]
    assert cli_main(argv) == 0
    corpus = Collection(tmp_path, "corpus")
    captions = corpus.captions("train")
    assert len(captions) == 900
    assert len(os.listdir(corpus.path / "ImageData")) == 300
    spec = td.TransferSpec()
    words = set(" ".join(c for _, c in captions).split())
    assert spec.words() <= words  # the held-out words are all there
    scenes = json.loads((corpus.path / "corpus.json").read_text())["scenes"]
    by_id = {s["video_id"]: s for s in scenes}
    full = spec.vocabulary()
    for cap_id, caption in captions:
        objects = {(o["colour"], o["shape"]) for o in by_id[video_id_of(cap_id)]["objects"]}
        assert _named_pairs(caption, full) == objects, caption
    from training.generator import key_frame_paths

    assert len(key_frame_paths(corpus, [video_id_of(c) for c, _ in captions[:6:3]])) == 2


def test_corpus_refuses_mp4(tmp_path, capsys):
    argv = ["data", "synth", "--root", str(tmp_path), "--corpus", "--mp4", "--quiet"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--corpus" in err[0]
