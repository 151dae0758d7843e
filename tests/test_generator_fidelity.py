"""Prompt fidelity of the anchor generator (bench/fidelity.py): the classifier, the scoring, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import fidelity as fid
from bench import fidelity_classifier as fc
from bench.fidelity import PromptObject, PromptSpec
from bench.fidelity_classifier import (
    BG_NAMES,
    COLOUR_NAMES,
    SHAPE_NAMES,
    SIZE_NAMES,
    Classifier,
    ClassifierConfig,
    FrameConfig,
    Reading,
)

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
SHIPPED = sorted(RESULTS.glob("*/generator_fidelity.classifier.safetensors"))


def _reading(objects, background, n_extra=()):
    """A confident hand-made reading: `objects` = [(colour, shape, size)] present."""
    nc, ns = len(COLOUR_NAMES), len(SHAPE_NAMES)
    colour = np.full((1, nc), 0.01, np.float32)
    shape = np.full((1, ns), 0.01, np.float32)
    bshape = np.full((1, nc, ns), 0.01, np.float32)
    bsize = np.full((1, nc, 2), 0.01, np.float32)
    for c, s, z in list(objects) + list(n_extra):
        ci, si = COLOUR_NAMES.index(c), SHAPE_NAMES.index(s)
        colour[0, ci], shape[0, si] = 0.99, 0.99
        bshape[0, ci, si] = 0.99
        bsize[0, ci, SIZE_NAMES.index(z)] = 0.99
    bg = np.full((1, len(BG_NAMES)), 0.01, np.float32)
    bg[0, BG_NAMES.index(background)] = 0.99
    return Reading(bg, colour, shape, bshape, bsize)


def _spec(objects, background="black"):
    objs = tuple(PromptObject(c, s, z, "still") for c, s, z in objects)
    return PromptSpec(fid.prompt_text(background, objs), background, objs)


def test_scoring_exact_on_hand_made_readings():
    spec = _spec([("red", "circle", "large")])
    match = fid.score(_reading([("red", "circle", "large")], "black"), [spec])
    assert all(match[a] == 1.0 for a in fid.ATTRIBUTES) and match["extra_colours"] == 0
    # Colour swapped: a blue circle drawn for a red circle.
    swap = fid.score(_reading([("blue", "circle", "large")], "black"), [spec])
    assert swap["colour"] == 0 and swap["colour+shape"] == 0 and swap["all"] == 0
    assert swap["shape"] == 1 and swap["size"] == 1 and swap["background"] == 1 and swap["extra_colours"] == 1
    # Wrong shape, size and background.
    wrong = fid.score(_reading([("red", "star", "small")], "striped"), [spec])
    assert wrong["colour"] == 1 and wrong["shape"] == 0 and wrong["size"] == 0 and wrong["background"] == 0
    # Two objects, colours and shapes right but bound the wrong way round: multi-label 1, binding 0.
    two = _spec([("red", "circle", "small"), ("blue", "square", "large")], "grey")
    crossed = fid.score(_reading([("red", "square", "small"), ("blue", "circle", "large")], "grey"), [two])
    assert crossed["colour"] == 1 and crossed["shape"] == 1 and crossed["colour+shape"] == 0 and crossed["all"] == 1
    half = fid.score(_reading([("red", "circle", "small")], "grey"), [two])
    assert half["colour"] == 0.5 and half["shape"] == 0.5 and half["colour+shape"] == 0.5 and half["all"] == 0


def test_prompt_set_is_fixed_and_worded_like_captions():
    single, double = fid.prompt_set()
    again = fid.prompt_set()
    assert [s.text for s in single + double] == [s.text for s in again[0] + again[1]]
    assert len(single) == len(SHAPE_NAMES) * len(COLOUR_NAMES) * 2 and len(double) == 48
    assert {(s.objects[0].shape, s.objects[0].colour, s.objects[0].size) for s in single} == {
        (s, c, z) for s in SHAPE_NAMES for c in COLOUR_NAMES for z in SIZE_NAMES}
    for s in double:
        a, b = s.objects
        assert a.colour != b.colour and a.shape != b.shape
        assert a.colour in s.text and b.shape in s.text and " and " in s.text
    assert single[0].text.startswith("a small red circle ") and " on a " in single[0].text
    synonyms = fid.prompt_set(wording="synonyms")[0]
    assert all(" red " not in s.text for s in synonyms if s.objects[0].colour == "red")


def test_visibility_marks_occluded_objects():
    cfg = FrameConfig()
    big = fid.SceneObject("square", "red", "large", "still", (0.5, 0.5), (220, 40, 40))
    small = fid.SceneObject("circle", "blue", "small", "still", (0.5, 0.5), (50, 90, 235))
    hidden = fid.Scene("v", "black", [small, big], 0, 1)  # the large square painted over the small circle
    assert fc.visible_fractions(hidden, cfg) == [0.0, 1.0]
    labels = fc.labels_of(hidden, cfg)
    assert np.isnan(labels["colour"][COLOUR_NAMES.index("blue")]) and labels["colour"][0] == 1
    assert labels["bound_shape"][COLOUR_NAMES.index("blue")] == -1


def test_tiny_training_learns_and_round_trips(tmp_path):
    torch.manual_seed(0)
    cfg = ClassifierConfig(train_frames=320, val_frames=80, epochs=5, width=8, lr=1e-2)
    clf = fc.train_classifier(cfg, progress=False)
    assert clf.info["held_out"]["background"] >= 0.9  # the easiest attribute, learnt in seconds
    clf.save(tmp_path / "c.safetensors")
    again = Classifier.load(tmp_path / "c.safetensors")
    images, _ = fc.real_frames(8, 99, cfg.frame)
    np.testing.assert_allclose(again.read(images).colour, clf.read(images).colour, atol=1e-6)
    assert again.info["held_out"] == clf.info["held_out"]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parent.name for p in SHIPPED])
def test_shipped_classifier_reads_held_out_real_frames(path):
    clf = Classifier.load(path)
    images, labels = fc.real_frames(300, 4242, clf.config.frame)  # neither the training nor the val seed
    acc = fc.accuracy(clf.read(images), labels)
    assert acc["background"] >= 0.99 and acc["colour_presence"] >= 0.97 and acc["shape_presence"] >= 0.93
    assert acc["bound_shape"] >= 0.9 and acc["bound_size"] >= 0.95
    # A real render of a prompt scores 1 against itself and 0 on colour against its colour swap.
    spec = _spec([("red", "circle", "large")], "striped")
    frames = np.stack([fid.render_prompt(spec, s, clf.config.frame) for s in range(4)])
    reading = clf.read(frames)
    assert fid.score(reading, [spec])["all"] == 1.0
    swapped = fid.score(reading, [_spec([("blue", "circle", "large")], "striped")])
    assert swapped["colour"] == 0 and swapped["shape"] == 1 and swapped["background"] == 1
    shape_swapped = fid.score(reading, [_spec([("red", "cross", "large")], "striped")])
    assert shape_swapped["shape"] == 0 and shape_swapped["colour"] == 1


def test_shipped_classifier_exists():
    assert SHIPPED, "bench/results/<machine>/generator_fidelity.classifier.safetensors is missing"


def test_fidelity_tiny_cli(tmp_path):
    from bench.generator import main

    assert main(["--fidelity", "--tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "generator_fidelity.json").read_text())
    models = [(r["model"], r["steps"], r["wording"]) for r in result["rows"]]
    assert models[0] == ("real frames", None, "canonical") and ("teacher", 2, "canonical") in models
    assert ("student-4step", 1, "synonyms") in models
    for row in result["rows"]:
        assert set(fid.ATTRIBUTES) <= set(row["single"]) and 0 <= row["two"]["colour"] <= 1
    assert result["prompts"]["single"] and result["prompts"]["two"][0]["objects"]
    table = (tmp_path / "generator_fidelity.md").read_text()
    assert "| teacher | 2 | canonical |" in table and "Two-object prompts" in table
    assert (tmp_path / "generator_fidelity.png").stat().st_size > 1000
    assert (tmp_path / "generator_fidelity.classifier.safetensors").is_file()
