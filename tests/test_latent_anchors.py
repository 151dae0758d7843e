"""Anchor features without the pixels (issue 17 item 4, "anchor from generator features"): a store
of the generator's final latent tokens, training on it, the query path reading the same tokens
(torch and ONNX Runtime), and the refusal of a store of the other kind."""
import numpy as np
import pytest
from test_multi_anchor import _captured_regions, _tiny_generator
from test_retrieval import TINY


@pytest.fixture(scope="module")
def latent(msrvtt, tmp_path_factory):
    """A tiny generator, a latent store and a pixel store over every split, and a checkpoint
    trained on the latent store with its gallery."""
    from engine.cli import main

    work = tmp_path_factory.mktemp("latent_anchors")
    generator = _tiny_generator(work / "generator")
    common = ["anchors", "--generator", generator, "--root", msrvtt, "--collection", "msrvtt10k", "--split",
              "train,val,test", "--device", "cpu", "--quiet"]
    assert main([*common, "--features", "latent", "--out", str(work / "latent")]) == 0
    assert main([*common, "--image-size", "64", "--out", str(work / "pixels")]) == 0
    data = ["--root", msrvtt, "--collection", "msrvtt10k"]
    checkpoint, gallery = str(work / "ckpt"), str(work / "gallery")
    assert main(["train", *data, "--feature", "resnext101-resnet152", "--out", checkpoint, "--anchors",
                 str(work / "latent")] + TINY) == 0
    assert main(["index", "--checkpoint", checkpoint, *data, "--out", gallery, "--dtype", "float32", "--quiet"]) == 0
    return {"work": work, "generator": generator, "root": msrvtt, "data": data, "latent": str(work / "latent"),
            "pixels": str(work / "pixels"), "checkpoint": checkpoint, "gallery": gallery}


def test_a_latent_store_holds_the_generators_final_tokens(latent):
    from engine import anchor_store as S
    from engine.anchors import AnchorGenerator, GeneratorOptions, read_builtin_config
    from engine.datasets import Collection
    from engine.portable import latents_to_images, unpack_latents

    ids, regions, meta = S.read_anchor_store(latent["latent"])
    config, _ = read_builtin_config(latent["generator"])
    assert S.anchor_features(meta) == "latent" and "vision_weights" not in meta
    assert (meta["regions"], meta["dim"]) == (config.image_tokens, config.in_channels) == (4, 48)
    assert regions.shape == (len(ids), 4, 48)
    assert S.anchor_features(S.read_anchor_store(latent["pixels"])[2]) == "pixels"  # pixel stores as before
    # The rows are the sampler's latent for that prompt and seed: decoded, they are its anchor image.
    cap_id, text = Collection(latent["root"], "msrvtt10k").captions("test")[0]
    generator = AnchorGenerator.load(latent["generator"], GeneratorOptions(), device="cpu")
    row = np.asarray(regions[ids.index(cap_id)])
    np.testing.assert_allclose(generator.generate_latents([text])[0], row, atol=1e-5)
    s = config.latent_size
    assert np.array_equal(latents_to_images(unpack_latents(row[None], s, s), config.fold), generator.generate([text]))


def test_training_on_a_latent_store_records_the_kind_and_width(latent):
    from engine.checkpoint import load_checkpoint, read_checkpoint_config

    anchors = read_checkpoint_config(latent["checkpoint"])["anchors"]
    assert anchors["features"] == "latent" and anchors["dim"] == 48
    model = load_checkpoint(latent["checkpoint"])
    assert model.config.region_dim == 48 and model.query.attention.regions.in_features == 48


def test_a_store_of_the_other_kind_is_refused(latent, tmp_path, capsys):
    from engine.cli import main

    argv = ["evaluate", "--checkpoint", latent["checkpoint"], *latent["data"], "--out", str(tmp_path / "e")]
    assert main([*argv, "--anchors", latent["latent"]]) == 0
    assert main([*argv, "--anchors", latent["pixels"]]) == 2
    assert "holds pixels anchor features, the checkpoint was trained on latent" in capsys.readouterr().err


def test_the_query_path_reads_the_stores_tokens_without_a_resnet(latent):
    from engine import anchor_store as S
    from engine.datasets import Collection
    from engine.retriever import Retriever

    retriever = Retriever(latent["checkpoint"], latent["gallery"])
    assert retriever.pipeline.anchor_features == "latent" and retriever.pipeline.extractor is None
    ids, stored, _ = S.read_anchor_store(latent["latent"])
    captions = Collection(latent["root"], "msrvtt10k").captions("test")[:3]
    texts = [t for _, t in captions]
    want = np.stack([stored[ids.index(c)] for c, _ in captions])
    np.testing.assert_allclose(_captured_regions(retriever, texts), want, atol=1e-5)
    assert retriever.search(texts, k=3)[0].hits and retriever.last_timings.vision == 0.0


def test_onnxruntime_reads_the_same_latent_regions_and_ranks_as_torch(latent):
    """The export has no vision graph; its query tower takes (L, C) latent regions; ONNX Runtime
    samples the same latent and returns torch's top 10."""
    pytest.importorskip("onnxruntime")
    from engine.retriever import Retriever
    from export.onnx import SEARCH_MODULES, ExportOptions, export_onnx

    export = str(latent["work"] / "export")
    result = export_onnx(latent["checkpoint"], export, ExportOptions(modules=SEARCH_MODULES))
    assert "vision" not in result.manifest["modules"] and result.manifest["anchors"]["features"] == "latent"
    assert result.manifest["modules"]["query_tower"]["inputs"]["regions"]["shape"][1:] == [4, 48]
    ort = Retriever(latent["checkpoint"], latent["gallery"], backend="onnxruntime", export_dir=export)
    torch_retriever = Retriever(latent["checkpoint"], latent["gallery"])
    texts = ["a red car", "a man and a dog in video number 1", "running dog"]
    np.testing.assert_allclose(_captured_regions(ort, texts), _captured_regions(torch_retriever, texts), atol=1e-4)
    for ref, got in zip(torch_retriever.search(texts, k=10), ort.search(texts, k=10), strict=True):
        assert [v for v, _ in got.hits] == [v for v, _ in ref.hits]
        assert max(abs(a - b) for (_, a), (_, b) in zip(ref.hits, got.hits, strict=True)) <= 1e-4


def test_the_route_comparison_trains_measures_and_writes_its_table(latent):
    """python -m training.latent_anchors: a row per (route, steps), recall and latency, from the stores it finds."""
    import json
    import shutil

    from training.latent_anchors import LABELS, main

    work = latent["work"]  # beside the generator, which the stores name by a relative path
    for features in ("pixels", "latent"):  # the stores it would draw at 2 steps: not drawn again
        shutil.copytree(latent[features], work / f"{features}_s2_anchors")
    assert main(["--root", latent["root"], "--collection", "msrvtt10k", "--work", str(work), "--generator",
                 latent["generator"], "--steps", "2", "--feature", "resnext101-resnet152", "--epochs", "1"]) == 0
    rows = json.loads((work / "latent_anchors.json").read_text())["rows"]
    assert [(r["features"], r["steps"], r["generator"]) for r in rows] == [("pixels", 2, latent["generator"]),
                                                                          ("latent", 2, latent["generator"])]
    for row in rows:
        assert row["label"] == LABELS[row["features"]] and 0 <= row["t2v_r1"] <= row["t2v_r5"] <= row["t2v_r10"] <= 100
        assert row["latency_ms"]["total"] > 0
    # The latent route skips the ResNet-50: no vision time per query.
    assert rows[1]["latency_ms"]["vision"] < rows[0]["latency_ms"]["vision"]
