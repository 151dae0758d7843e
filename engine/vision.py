"""ResNet-50 region grids and pooled vectors, through transformers' `ResNetModel` (no torchvision).

Three ways to get weights, all offline:
- a local Hugging Face folder (`config.json` + weights, e.g. `microsoft/resnet-50` saved to disk);
- a torchvision-format ResNet-50 state dict (`.pth` or `.safetensors`), through a key mapping;
- the built-in extractor: a ResNet-50 whose deep convolutions are a seeded random init and whose
  BatchNorm layers, stem and first two stages were trained on the built-in set's frames
  (`training/vision.py`). Random-init features hardly tell shapes apart and no pretrained weights
  can be downloaded here; training only the early convolutions and the BatchNorm affine parameters
  (which steer the frozen random deep stages, after Frankle et al., "Training BatchNorm and only
  BatchNorm", ICLR 2021) is enough, and the shipped file stays small because the frozen
  convolutions are regenerated from the seed on load (and checked against a stored hash).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from engine.errors import CVRError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_DIM = 2048
BUILTIN_WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "resnet50_synth_bn.safetensors")


class VisionWeightsError(CVRError):
    """Weights that cannot be loaded as a ResNet-50 (one-line message)."""


def resnet50_config():
    from transformers import ResNetConfig

    # transformers' defaults are ResNet-50 v1.5: bottleneck stages (3, 4, 6, 3), stride in the 3x3.
    return ResNetConfig(
        depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck", embedding_size=64
    )


# ---------------------------------------------------------------------------------------------
# Deterministic random init


def seeded_resnet50(seed: int = 0):
    """A ResNet-50 with Kaiming-normal (fan-out) convolutions drawn by numpy from `seed` and
    zero-initialised residual branches.

    numpy's PCG64 generator is used instead of torch's so that the same seed gives the same weights
    across torch versions and platforms: the shipped trained tensors depend on them."""
    from transformers import ResNetModel

    model = ResNetModel(resnet50_config()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 4:
                param.copy_(_seeded_convolutions(seed)[name])
            elif name.endswith("layer.2.normalization.weight"):
                # Zero-init the last BatchNorm of every residual branch (Goyal et al. 2017,
                # torchvision's zero_init_residual): each block starts as the identity, so the
                # untrained deep stack does not scramble what the early layers see.
                param.zero_()
            elif name.endswith("normalization.weight"):
                param.fill_(1.0)
            elif name.endswith("normalization.bias"):
                param.zero_()
    return model


@functools.lru_cache(maxsize=2)
def _seeded_convolutions(seed: int) -> dict:
    """name -> conv weight, std = sqrt(2 / fan_out) as torchvision's init (cached: 94 MB a seed,
    and drawing them is the slow part of building the model)."""
    from transformers import ResNetModel

    shapes = {n: p.shape for n, p in ResNetModel(resnet50_config()).named_parameters() if p.ndim == 4}
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in shapes.items():  # named_parameters order is fixed: the stream is too
        fan_out = shape[0] * shape[2] * shape[3]
        values = rng.standard_normal(tuple(shape), dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_out))
        weights[name] = torch.from_numpy(values)
    return weights


def conv_weights_hash(model, skip=()) -> str:
    """sha256 over the convolution weights that come from the seed (those not in `skip`)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        if param.ndim == 4 and name not in skip:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def is_batchnorm_key(name: str) -> bool:
    return ".normalization." in name


def is_trained_key(name: str, trained_stages: int) -> bool:
    """Tensors the built-in extractor trains: every BatchNorm, plus the convolutions of the stem
    and of the first `trained_stages - 1` stages (`trained_stages=0`: BatchNorm only)."""
    if is_batchnorm_key(name):
        return True
    if trained_stages <= 0:
        return False
    if name.startswith("embedder."):
        return True
    match = re.match(r"encoder\.stages\.(\d+)\.", name)
    return bool(match) and int(match[1]) < trained_stages - 1


# ---------------------------------------------------------------------------------------------
# torchvision -> transformers key mapping


def torchvision_to_hf(state: dict) -> dict:
    """Rename a torchvision ResNet-50 state dict to transformers' `ResNetModel` names (fc dropped)."""
    mapped = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("fc."):
            continue  # the classifier: we use the features, not ImageNet logits
        new = _map_torchvision_key(key)
        if new is None:
            raise VisionWeightsError(f"unexpected key {key!r} in a torchvision ResNet-50 state dict")
        mapped[new] = value
    return mapped


def _map_torchvision_key(key: str):
    bn = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
    if key == "conv1.weight":
        return "embedder.embedder.convolution.weight"
    if match := re.fullmatch(rf"bn1\.{bn}", key):
        return f"embedder.embedder.normalization.{match[1]}"
    if match := re.fullmatch(r"layer(\d)\.(\d+)\.conv(\d)\.weight", key):
        return f"encoder.stages.{int(match[1]) - 1}.layers.{match[2]}.layer.{int(match[3]) - 1}.convolution.weight"
    if match := re.fullmatch(rf"layer(\d)\.(\d+)\.bn(\d)\.{bn}", key):
        stage, block, conv = int(match[1]) - 1, match[2], int(match[3]) - 1
        return f"encoder.stages.{stage}.layers.{block}.layer.{conv}.normalization.{match[4]}"
    if match := re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.0\.weight", key):
        return f"encoder.stages.{int(match[1]) - 1}.layers.{match[2]}.shortcut.convolution.weight"
    if match := re.fullmatch(rf"layer(\d)\.(\d+)\.downsample\.1\.{bn}", key):
        return f"encoder.stages.{int(match[1]) - 1}.layers.{match[2]}.shortcut.normalization.{match[3]}"
    return None


# ---------------------------------------------------------------------------------------------
# Loading


def load_resnet50(weights: str | None = None, seed: int = 0):
    """A ResNet-50 in eval mode from `weights` (see the module docstring), or the built-in one.

    `weights=None` takes the shipped built-in extractor; `weights="random"` the seeded random init."""
    if weights is None:
        weights = BUILTIN_WEIGHTS
    if weights == "random":
        return seeded_resnet50(seed)
    if not os.path.exists(weights):
        raise VisionWeightsError(f"vision weights not found: {weights}")
    if os.path.isdir(weights):
        return _load_hf_folder(weights)
    if weights.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(weights, framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") == "cvr-resnet50-bn":
            return _load_builtin(weights, metadata)
    return _load_torchvision_file(weights)


def _load_hf_folder(folder: str):
    from transformers import AutoConfig, ResNetModel

    if not os.path.exists(os.path.join(folder, "config.json")):
        raise VisionWeightsError(f"{folder}: no config.json, not a Hugging Face model folder")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if getattr(config, "model_type", None) != "resnet" or list(config.hidden_sizes)[-1] != FEATURE_DIM:
        raise VisionWeightsError(f"{folder}: not a ResNet-50 (model_type={config.model_type!r})")
    # A ResNetForImageClassification folder stores the backbone under "resnet."; ResNetModel's
    # from_pretrained strips that prefix itself.
    return ResNetModel.from_pretrained(folder, local_files_only=True).eval()


def _load_torchvision_file(path: str):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        # torchvision ships .pth pickles; weights_only=True refuses anything but tensors.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one line
            raise VisionWeightsError(f"{path}: not a readable state dict ({type(error).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    mapped = torchvision_to_hf(state)
    model = seeded_resnet50(0)
    _load_strict(model, mapped, path)
    return model


def _load_builtin(path: str, metadata: dict):
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = seeded_resnet50(int(metadata["seed"]))
    with safe_open(path, framework="pt") as handle:
        stored = set(handle.keys())
    if conv_weights_hash(model, skip=stored) != metadata["conv_sha256"]:
        raise VisionWeightsError(
            f"{path}: the seeded convolution weights differ from the ones the BatchNorm layers were "
            "trained with (numpy's random stream changed?); retrain with `cvr vision train`"
        )
    state = model.state_dict()
    state.update(load_file(path))
    _load_strict(model, state, path)
    return model


def _load_strict(model, state: dict, source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise VisionWeightsError(f"{source}: not a ResNet-50 state dict ({what})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise VisionWeightsError(
                f"{source}: tensor {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state)
    model.eval()


def save_builtin(model, path: str, seed: int, trained_stages: int = 0, extra: dict | None = None) -> None:
    """Write the trained tensors of a seeded ResNet-50 (the built-in extractor's format); the
    others are regenerated from `seed` on load and checked against the stored hash."""
    from safetensors.torch import save_file

    tensors = {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if is_trained_key(k, trained_stages)
    }
    metadata = {
        "format": "cvr-resnet50-bn",
        "seed": str(seed),
        "trained_stages": str(trained_stages),
        "conv_sha256": conv_weights_hash(model, skip=set(tensors)),
    }
    metadata.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in (extra or {}).items()})
    from engine import files

    with files.atomic_path(path) as temporary, files.safetensors_errors(path):
        save_file(tensors, temporary, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Feature extraction


@dataclass
class VisionConfig:
    image_size: int = 64  # frames are resized to this square; 224 gives the classic 7x7 grid
    batch_size: int = 64
    weights: str | None = None  # None: the built-in extractor; "random"; a folder or a file
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Which extractor made a set of frame features


EXTRACTOR_FILE = "extractor.json"  # beside a BigFile's files, and in a gallery's manifest
EXTRACTOR_FORMAT = "cvr-sdgm/extractor/1"


def weights_digest(weights: str | None, seed: int = 0) -> str:
    """What identifies an extractor's weights: the sha256 of the file (of every weight file of a
    Hugging Face folder), or `random:<seed>` for the seeded random init."""
    from engine import files

    if weights == "random":
        return f"random:{seed}"
    path = BUILTIN_WEIGHTS if weights is None else weights
    if os.path.isdir(path):
        digest = hashlib.sha256()
        for name in sorted(os.listdir(path)):
            if name.endswith((".safetensors", ".bin", ".json")):
                digest.update(name.encode() + bytes.fromhex(files.sha256_file(os.path.join(path, name))))
        return digest.hexdigest()
    if not os.path.isfile(path):
        raise VisionWeightsError(f"vision weights not found: {path}")
    return files.sha256_file(path)


def extractor_record(config: VisionConfig) -> dict:
    """The record a feature folder and a gallery keep of the extractor that made their frame
    features: weights (builtin, random or where they were), their digest, input size, pooling."""
    weights = config.weights
    shown = "builtin" if weights is None else weights if weights == "random" else os.path.abspath(weights)
    return {"format": EXTRACTOR_FORMAT, "weights": shown, "weights_sha256": weights_digest(weights, config.seed),
            "image_size": int(config.image_size), "seed": int(config.seed), "pooling": "mean"}


def same_extractor(a: dict | None, b: dict | None) -> bool:
    """Whether two records name the same weights at the same input size."""
    keys = ("weights_sha256", "image_size", "pooling")
    return bool(a) and bool(b) and all(a.get(k) == b.get(k) for k in keys)


def describe_extractor(record: dict | None) -> str:
    if not record:
        return "an unrecorded extractor"
    name = record.get("weights")
    name = os.path.basename(str(name)) if name not in ("builtin", "random") else name
    return f"ResNet-50 {name} at {record.get('image_size')} px"


def read_extractor(feature_dir: str) -> dict | None:
    """The extractor record of a feature folder, or None where it keeps none (e.g. the MSR-VTT
    release's folders). A damaged record is a one-line error."""
    from engine.files import read_json

    path = os.path.join(feature_dir, EXTRACTOR_FILE)
    if not os.path.exists(path):
        return None
    record = read_json(path, VisionWeightsError)
    found = record.get("format") if isinstance(record, dict) else None
    if found != EXTRACTOR_FORMAT or not isinstance(record.get("image_size"), int):
        raise VisionWeightsError(f"{path}: not an extractor record (format {found!r})")
    return record


def vision_config_of(record: dict, weights: str | None = None) -> VisionConfig:
    """The VisionConfig that rebuilds a recorded extractor: `weights` (a path) overrides where the
    recorded weights were, and must have the recorded digest."""
    recorded = record.get("weights")
    if weights is None:
        weights = None if recorded == "builtin" else recorded
    config = VisionConfig(image_size=int(record["image_size"]), weights=weights, seed=int(record.get("seed", 0)))
    found = weights_digest(config.weights, config.seed)
    if found != record.get("weights_sha256"):
        raise VisionWeightsError(f"vision weights {weights or 'builtin'} are not the ones recorded "
                                 f"({describe_extractor(record)}, sha256 {str(record.get('weights_sha256'))[:12]})")
    return config


class RegionExtractor:
    """Batched ResNet-50 features: region grids (B, h*w, 2048) and pooled vectors (B, 2048)."""

    feature_dim = FEATURE_DIM

    def __init__(self, model, config: VisionConfig | None = None, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.config = config or VisionConfig()
        self.device = device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @classmethod
    def from_config(cls, config: VisionConfig, device: str = "cpu") -> RegionExtractor:
        return cls(load_resnet50(config.weights, config.seed), config, device)

    @classmethod
    def default(cls, device: str = "cpu") -> RegionExtractor:
        return cls.from_config(VisionConfig(), device)

    def record(self) -> dict:
        """This extractor's record (extractor_record)."""
        return extractor_record(self.config)

    def grid_size(self) -> int:
        """Side of the region grid: the ResNet downsamples by 32 (rounding up)."""
        return -(-self.config.image_size // 32)

    def preprocess(self, images) -> torch.Tensor:
        """uint8 (B, H, W, 3) array/tensor or float (B, 3, H, W) in [0, 1] -> normalised batch."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if images.ndim != 4:
            raise ValueError(f"images must be a 4-d batch, got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            if images.shape[-1] != 3:
                raise ValueError(f"uint8 images must be (B, H, W, 3), got {tuple(images.shape)}")
            images = images.permute(0, 3, 1, 2).float() / 255.0
        elif images.shape[1] != 3:
            raise ValueError(f"float images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        images = images.to(self.device, torch.float32)
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return (images - self.mean) / self.std

    @torch.no_grad()
    def features(self, images) -> tuple:
        """(regions (B, R, 2048), pooled (B, 2048)) as float32 tensors on the CPU."""
        regions, pooled = [], []
        for start in range(0, len(images), self.config.batch_size):
            batch = self.preprocess(images[start : start + self.config.batch_size])
            grid = self.model(pixel_values=batch).last_hidden_state  # (B, 2048, h, w)
            regions.append(grid.flatten(2).transpose(1, 2).float().cpu())
            pooled.append(grid.mean(dim=(2, 3)).float().cpu())
        return torch.cat(regions), torch.cat(pooled)

    def regions(self, images) -> torch.Tensor:
        return self.features(images)[0]

    def pooled(self, images) -> np.ndarray:
        """Pooled 2048-d vectors as a float32 numpy array (the per-frame feature of a BigFile)."""
        return self.features(images)[1].numpy()
