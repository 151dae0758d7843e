"""ResNet-50 loading (HF folder, torchvision state dict, built-in BatchNorm file) and extraction."""
import numpy as np
import pytest
import torch

from engine import vision


@pytest.fixture(scope="module")
def model():
    return vision.seeded_resnet50(0)


def _torchvision_keys():
    """Every tensor name of torchvision's resnet50() (fc included), written out from its layout."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{b}" for b in bn]
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            for conv in (1, 2, 3):
                keys += [f"{prefix}.conv{conv}.weight"] + [f"{prefix}.bn{conv}.{b}" for b in bn]
            if block == 0:
                keys += [f"{prefix}.downsample.0.weight"] + [f"{prefix}.downsample.1.{b}" for b in bn]
    return keys + ["fc.weight", "fc.bias"]


def _perturbed(model):
    """A copy whose BatchNorm statistics are not the identity, so a wrong mapping shows."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    for key, value in state.items():
        if key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=generator)
        elif key.endswith("running_mean") or key.endswith("normalization.bias"):
            state[key] = 0.1 * torch.randn(value.shape, generator=generator)
    return state


def _images(n=3, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_torchvision_state_dict_loads_through_the_key_mapping(tmp_path, model):
    from safetensors.torch import save_file

    hf_state = _perturbed(model)
    tv_state = {}
    for key in _torchvision_keys():
        if key.startswith("fc."):
            tv_state[key] = torch.zeros((1000, 2048) if key == "fc.weight" else (1000,))
        else:
            tv_state[key] = hf_state[vision._map_torchvision_key(key)]
    assert len(tv_state) == len(hf_state) + 2  # every HF tensor is hit exactly once (plus fc)
    path = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in tv_state.items()}, str(path))
    loaded = vision.load_resnet50(str(path))
    for key, value in hf_state.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # The .pth route (torchvision's usual file) goes through torch.load(weights_only=True).
    torch.save(tv_state, tmp_path / "resnet50.pth")
    loaded_pth = vision.load_resnet50(str(tmp_path / "resnet50.pth"))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(pixel_values=x).pooler_output, loaded_pth(pixel_values=x).pooler_output)


def test_hf_folder_round_trip(tmp_path, model):
    model.save_pretrained(tmp_path / "hf")
    loaded = vision.load_resnet50(str(tmp_path / "hf"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).last_hidden_state, loaded(pixel_values=x).last_hidden_state)


def test_builtin_format_round_trip_and_hash_check(tmp_path, model):
    trained = vision.seeded_resnet50(0)
    trained.load_state_dict(_perturbed(model))
    path = str(tmp_path / "bn.safetensors")
    vision.save_builtin(trained, path, seed=0)
    loaded = vision.load_resnet50(path)
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # A file claiming another conv seed must fail loudly, never load mismatched convolutions.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = dict(handle.metadata())
    metadata["seed"] = "1"
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(vision.VisionWeightsError, match="seeded convolution weights differ"):
        vision.load_resnet50(str(tmp_path / "bad.safetensors"))


def test_seeded_init_is_reproducible(model):
    assert vision.conv_weights_hash(model) == vision.conv_weights_hash(vision.seeded_resnet50(0))
    assert vision.conv_weights_hash(model) != vision.conv_weights_hash(vision.seeded_resnet50(1))


@pytest.mark.parametrize("content, match", [(b"not a tensor file", "not a readable state dict")])
def test_bad_weight_files_fail_with_one_line(tmp_path, content, match):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(vision.VisionWeightsError, match=match) as info:
        vision.load_resnet50(str(path))
    assert "\n" not in str(info.value)
    with pytest.raises(vision.VisionWeightsError, match="not found"):
        vision.load_resnet50(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(vision.VisionWeightsError, match="no config.json"):
        vision.load_resnet50(str(tmp_path / "empty"))


def test_wrong_shaped_state_dict_is_refused(tmp_path, model):
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in model.state_dict().items()}
    tv = {key: state[vision._map_torchvision_key(key)] for key in _torchvision_keys() if not key.startswith("fc.")}
    tv["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    save_file(tv, str(tmp_path / "bad.safetensors"))
    with pytest.raises(vision.VisionWeightsError, match="conv.*shape"):
        vision.load_resnet50(str(tmp_path / "bad.safetensors"))


@pytest.mark.parametrize("image_size, regions", [(64, 4), (96, 9), (224, 49)])
def test_region_grid_shapes_and_pooling(model, image_size, regions):
    extractor = vision.RegionExtractor(model, vision.VisionConfig(image_size=image_size, batch_size=2))
    grid, pooled = extractor.features(_images(3, size=48))
    assert grid.shape == (3, regions, 2048) and pooled.shape == (3, 2048)
    assert torch.allclose(grid.mean(dim=1), pooled, atol=1e-5, rtol=1e-5)
    assert extractor.grid_size() ** 2 == regions


def test_batching_does_not_change_features(model):
    images = _images(5)
    one = vision.RegionExtractor(model, vision.VisionConfig(batch_size=1)).pooled(images)
    all_at_once = vision.RegionExtractor(model, vision.VisionConfig(batch_size=5)).pooled(images)
    np.testing.assert_allclose(one, all_at_once, rtol=1e-4, atol=1e-4)


def test_preprocess_rejects_bad_batches(model):
    extractor = vision.RegionExtractor(model)
    with pytest.raises(ValueError, match="4-d"):
        extractor.preprocess(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        extractor.preprocess(np.zeros((1, 64, 64, 4), np.uint8))


def test_extractor_training_writes_only_trained_tensors_and_reloads(tmp_path):
    from training.vision import ExtractorTrainConfig, train_extractor

    path = str(tmp_path / "ext.safetensors")
    config = ExtractorTrainConfig(clips=4, frames=2, size=32, epochs=1, batch_size=8, trained_stages=2)
    result = train_extractor(config, path, progress=False)
    assert len(result["log"]) == 1 and result["log"][0]["loss"] > 0
    loaded = vision.load_resnet50(path)
    seeded = vision.seeded_resnet50(0).state_dict()
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        stored = set(handle.keys())
    assert "embedder.embedder.convolution.weight" in stored  # the stem is trained
    assert "encoder.stages.3.layers.0.layer.1.convolution.weight" not in stored  # deep convs are not
    changed = [k for k in stored if not torch.equal(loaded.state_dict()[k], seeded[k])]
    assert "embedder.embedder.convolution.weight" in changed
    for key, value in loaded.state_dict().items():
        if key not in stored:
            assert torch.equal(value, seeded[key]), key


def test_probe_reports_accuracies_and_chance():
    from training.vision import probe_features

    extractor = vision.RegionExtractor(vision.seeded_resnet50(0), vision.VisionConfig(image_size=32))
    result = probe_features(extractor, n_clips=12, n_frames=15, frames=3, size=32)
    for name in ("colour", "shape", "motion"):
        assert 0.0 <= getattr(result, name) <= 1.0
        assert 0.0 < getattr(result, f"chance_{name}") <= 1.0
    assert "| colour |" in result.table()
