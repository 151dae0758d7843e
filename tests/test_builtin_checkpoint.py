"""The shipped built-in retrieval checkpoint (engine/weights/retrieval/builtin/) and float16 weights."""
import json
import os

import pytest
import torch
from conftest import TINY_TRAIN
from safetensors import safe_open

from engine import datasets
from engine.checkpoint import CONFIG, FULL_PRECISION, WEIGHTS, checkpoint_id, load_checkpoint, save_checkpoint
from engine.cli import main
from engine.retriever import Retriever
from training import builtin_checkpoint
from training.retrieval import encode_split, load_split

SHIPPED = str(builtin_checkpoint.SHIPPED)


def _dtypes(folder: str) -> dict:
    with safe_open(os.path.join(folder, WEIGHTS), framework="pt") as handle:
        return {name: handle.get_slice(name).get_dtype() for name in handle.keys()}


def _config(folder: str) -> dict:
    with open(os.path.join(folder, CONFIG), encoding="utf-8") as handle:
        return json.load(handle)


def _assert_float16_on_disk(folder: str) -> None:
    floating = {name: dtype for name, dtype in _dtypes(folder).items() if dtype.startswith(("F", "BF"))}
    assert floating and all(dtype == ("F32" if name in FULL_PRECISION else "F16") for name, dtype in floating.items())
    assert _config(folder)["weights_dtype"] == "float16"


# ---------------------------------------------------------------------------------------------
# The shipped checkpoint


def test_shipped_checkpoint_is_small_float16_and_records_its_recipe():
    assert os.path.getsize(os.path.join(SHIPPED, WEIGHTS)) <= builtin_checkpoint.MAX_BYTES
    _assert_float16_on_disk(SHIPPED)
    config = _config(SHIPPED)
    extractor = config["train"]["job"]["extractor"]
    assert extractor["weights"] == "builtin" and extractor["image_size"] == 64
    widths = {name: config["model"][name.replace("-", "_")] for name in builtin_checkpoint.WIDTHS}
    assert widths == builtin_checkpoint.WIDTHS  # the reproduction script's widths are the shipped ones
    assert config["model"]["use_anchor"] and config["anchors"]["generator"] == "builtin:generator/students/4step"
    assert config["train"]["train_config"]["seed"] == builtin_checkpoint.SEED


def test_shipped_checkpoint_loads_in_float32():
    model = load_checkpoint(SHIPPED)
    assert model.config.use_anchor and model.checkpoint_id == checkpoint_id(SHIPPED)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.fixture(scope="module")
def tiny_gallery(tmp_path_factory):
    """A built-in collection of 12 videos unseen in training (another seed), indexed by the shipped model."""
    work = tmp_path_factory.mktemp("builtin")
    root, gallery = str(work / "data"), str(work / "gallery")
    assert main(["data", "synth", "--root", root, "--videos", "12", "--seed", "12345", "--quiet"]) == 0
    assert main(["index", "--checkpoint", SHIPPED, "--root", root, "--collection", "synth", "--out", gallery,
                 "--quiet"]) == 0
    return root, gallery


def test_shipped_checkpoint_searches_a_tiny_gallery(tiny_gallery):
    root, gallery = tiny_gallery
    captions = datasets.Collection(root, "synth").captions("train")[::5]
    retriever = Retriever(SHIPPED, gallery)
    results = retriever.search([text for _, text in captions], k=3)
    assert all(len(r.hits) == 3 and r.hits[0][1] >= r.hits[-1][1] for r in results)
    top1 = [r.hits[0][0] == datasets.video_id_of(cap_id) for r, (cap_id, _) in zip(results, captions, strict=True)]
    assert sum(top1) / len(top1) > 0.3  # chance: 1 in 12; the model ranks unseen clips, not noise


# ---------------------------------------------------------------------------------------------
# float16 weights


def test_float16_save_round_trips_to_the_rounded_weights_with_a_stable_id(tiny_ckpt, tmp_path):
    model = load_checkpoint(tiny_ckpt)
    original = {name: tensor.clone() for name, tensor in model.trainable_state().items()}
    first = save_checkpoint(model, str(tmp_path / "a"), weights_dtype="float16")
    _assert_float16_on_disk(str(tmp_path / "a"))
    loaded = load_checkpoint(str(tmp_path / "a"))
    for name, tensor in loaded.trainable_state().items():
        expected = original[name]
        if tensor.is_floating_point() and name not in FULL_PRECISION:
            expected = expected.half().to(expected.dtype)
        assert tensor.dtype == original[name].dtype and torch.equal(tensor, expected), name
    # fp16 -> fp32 -> fp16 is exact: saving the loaded model again writes the same checkpoint.
    assert save_checkpoint(loaded, str(tmp_path / "b"), weights_dtype="float16") == first
    assert first == checkpoint_id(str(tmp_path / "a"))


def test_float16_weights_halve_the_file(tiny_ckpt, tmp_path):
    model = load_checkpoint(tiny_ckpt)
    save_checkpoint(model, str(tmp_path / "half"), weights_dtype="float16")
    save_checkpoint(model, str(tmp_path / "full"))
    half, full = (os.path.getsize(os.path.join(tmp_path, name, WEIGHTS)) for name in ("half", "full"))
    assert half < 0.6 * full and set(_dtypes(str(tmp_path / "full")).values()) <= {"F32", "I64"}


def test_an_unknown_weights_dtype_is_one_line(tiny_model, tmp_path):
    from engine.checkpoint import CheckpointError
    from engine.config import ModelConfig, TrainConfig
    from training.retrieval import RetrievalJob, train_retrieval

    with pytest.raises(CheckpointError, match="weights dtype must be one of float32, float16"):
        save_checkpoint(tiny_model, str(tmp_path / "x"), weights_dtype="int8")
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(CheckpointError, match="got 'bfloat16'"):  # refused before training, not after
        train_retrieval(RetrievalJob(root=str(tmp_path), collection="none", out=str(tmp_path / "y")), ModelConfig(),
                        TrainConfig(), weights_dtype="bfloat16")


def test_cli_train_float16_writes_fp16_weights_and_matching_norm(msrvtt, tmp_path):
    out = str(tmp_path / "fp16")
    assert main(["train", "--root", msrvtt, "--collection", "msrvtt10k", "--feature", "resnext101-resnet152",
                 "--out", out, "--weights-dtype", "float16"] + TINY_TRAIN) == 0
    _assert_float16_on_disk(out)
    model = load_checkpoint(out)
    stored = model.matcher.norm.clone()
    assert stored.tolist() == _config(out)["norm"]["min_max"]
    # The constants were fitted on the rounded weights: fitting them again on what loads changes nothing.
    val = load_split(datasets.Collection(msrvtt, "msrvtt10k"), "val", "resnext101-resnet152",
                     _config(out)["tag_vocab"], 64)
    model.matcher.fit_norm(*encode_split(model, val, None))
    assert torch.equal(model.matcher.norm, stored)
