"""Dataclass configurations; one `config.json` beside every checkpoint holds them all.

open_clip style: plain dataclasses, `to_dict()` / `from_dict()` that reject unknown keys, and the
factory functions live next to the modules they build.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from engine.errors import CVRError


class ConfigError(CVRError):
    """A configuration that cannot be used (one-line message)."""


def _from_dict(cls, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown {cls.__name__} keys {unknown}")
    check_types(cls, values, where, ConfigError)
    return cls(**values)


# JSON types each annotation accepts (bool is an int in Python, never in a config); a value of
# another type is refused, never coerced: "512" is not 512, and 0.5 is not a dimension.
_JSON_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict, "list": list,
               "tuple": (list, tuple)}


def check_types(cls, values: dict, where: str, error: type = None) -> None:
    """Refuse (one line, `error`) a field of dataclass `cls` whose JSON value has the wrong type for
    its annotation (`int`, `float`, `str | None`, `tuple[int, ...]`, ...), or a non-finite float."""
    annotations = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in values.items():
        annotation = annotations.get(name)
        if isinstance(annotation, str) and not _fits(value, annotation):
            raise (error or ConfigError)(f"{where}: {cls.__name__} field {name!r} must be {annotation}, "
                                         f"got {json.dumps(value)[:60]}")


def _fits(value, annotation: str) -> bool:
    for option in (part.strip() for part in annotation.split("|")):
        if option == "None":
            if value is None:
                return True
            continue
        base, _, inner = option.partition("[")
        types = _JSON_TYPES.get(base)
        if types is None:
            return True  # an annotation this check does not know is left to the class
        if isinstance(value, bool) != (base == "bool") or not isinstance(value, types):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        if inner and base in ("tuple", "list"):
            element = inner.rstrip("]").split(",")[0].strip()
            if not all(_fits(item, element) for item in value):
                continue
        return True
    return False


HEADS = ("cvr", "glscl")
GLSCL_MASKS = ("paper", "renormalise")


@dataclass
class ModelConfig:
    """Every dimension of the CVR-SDGM towers (ARCHITECTURE.md sections 3-7)."""

    # engine.text.TextEncoderConfig as a dict (kind minilm|rivrl, path, max_length, finetune, ...;
    # the RIVRL vocabulary is filled in at training time), so the checkpoint's JSON holds it whole.
    text: dict = field(default_factory=lambda: {"kind": "minilm"})
    use_anchor: bool = False  # False: the text-only baseline (same classes, this flag)
    frame_dim: int = 2048  # video frame features (4096 in the MSR-VTT release)
    region_dim: int = 2048  # ResNet-50 anchor regions
    attn_dim: int = 512  # width d of the text-guided hybrid attention
    latent_dim: int = 1024  # D
    concept_dim: int = 512  # K, the tag vocabulary size
    video_gru_hidden: int = 512  # per direction: the previewing branch is 2x this wide
    video_local_dim: int = 1024  # per-frame FC width of the intensive-reading branch
    dropout: float = 0.2
    # which parts of the hybrid attention are on (ablations); "hybrid" is the full model
    attention: str = "hybrid"  # hybrid | spatial | channel | meanpool
    local_branch: bool = True
    concept_space: bool = True
    # Which scoring head: "cvr" (this engine's model, sections 4-7) or "glscl" (the GLSCL peer,
    # engine/glscl.py; peers.md section 1). The glscl_* fields are used by that head only.
    head: str = "cvr"
    glscl_queries: int = 8  # K shared learnable queries
    glscl_decoder_layers: int = 2  # the shared query decoder (the paper: 3; small to train on a CPU)
    glscl_temporal_layers: int = 2  # the temporal transformer over frames (the paper: 4)
    glscl_heads: int = 8  # attention heads of both (must divide latent_dim)
    glscl_frames: int = 12  # F: frames per video (the paper's 12 at 1 fps); more are subsampled evenly
    glscl_tau: float = 3.0  # temperature of the frame weights (the paper's scripts)
    glscl_lambda: float = 0.5  # S = S_g + lambda S_l
    # paper: mask after the softmax, no renormalisation; renormalise: softmax over the valid frames. The
    # weights differ by one factor per pair, which the cosine does not see: the scores are the same.
    glscl_mask: str = "paper"
    glscl_alpha: float = 1e-4  # intra-diversity loss weight
    glscl_beta: float = 0.005  # weight of the diagonal term of the inter-consistency loss
    glscl_target: float = 0.75  # its target for the diagonal

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        if self.head == "cvr":
            # The default head's config.json stays exactly what it was before heads existed (its
            # checkpoint id too); a config without these fields loads as the cvr head.
            values = {k: v for k, v in values.items() if k != "head" and not k.startswith("glscl_")}
        return values

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> ModelConfig:
        config = _from_dict(cls, dict(values), where)
        try:
            config.validate()
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        return config

    def validate(self) -> None:
        if self.attention not in ("hybrid", "spatial", "channel", "meanpool"):
            raise ConfigError(f"attention must be hybrid, spatial, channel or meanpool, got {self.attention!r}")
        for name in ("frame_dim", "region_dim", "attn_dim", "latent_dim", "concept_dim", "video_gru_hidden",
                     "video_local_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.head not in HEADS:
            raise ConfigError(f"head must be {' or '.join(HEADS)}, got {self.head!r}")
        if self.head == "glscl":
            self._validate_glscl()

    def _validate_glscl(self) -> None:
        for name in ("glscl_queries", "glscl_decoder_layers", "glscl_temporal_layers", "glscl_heads",
                     "glscl_frames"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.latent_dim % self.glscl_heads:
            raise ConfigError(f"glscl_heads ({self.glscl_heads}) must divide latent_dim ({self.latent_dim})")
        if self.glscl_mask not in GLSCL_MASKS:
            raise ConfigError(f"glscl_mask must be {' or '.join(GLSCL_MASKS)}, got {self.glscl_mask!r}")
        if not self.glscl_tau > 0:
            raise ConfigError(f"glscl_tau must be positive, got {self.glscl_tau}")
        if self.use_anchor:
            raise ConfigError("the glscl head is text-only: it takes no anchors")


@dataclass
class TrainConfig:
    """ARCHITECTURE.md section 8: RIVRL's recipe."""

    epochs: int = 50  # an upper bound: early stopping usually ends training before
    batch_size: int = 128
    lr: float = 1e-4
    grad_clip: float = 2.0
    lr_decay: float = 0.99  # per epoch
    plateau_patience: int = 2  # halve the lr after this many epochs without validation gain
    early_stop: int = 5  # stop after this many epochs without validation gain
    margin: float = 0.2
    bce_weight: float = 1.0
    seed: int = 0
    threads: int = 1


def read_format_json(folder: str, name: str, fmt: str, error: type, kind: str) -> dict:
    """Read `folder/name`, a JSON object whose "format" is `fmt`; anything else raises `error`
    with one line (missing folder, missing file, bad JSON, another format)."""
    if not os.path.isdir(folder):
        from engine.files import recover

        recover(folder)  # a writer killed mid-swap may have left it aside
    if not os.path.isdir(folder):
        from engine.files import why_not_a_folder

        reason = why_not_a_folder(folder)
        raise error(f"{folder}: no such {kind} folder" if reason == "no such folder" else f"{folder}: {reason}")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise error(f"{folder}: not a {kind} (no {name})")
    from engine.files import read_json

    value = read_json(path, error)
    found = value.get("format") if isinstance(value, dict) else None
    if found != fmt:
        raise error(f"{path}: not a CVR-SDGM {kind} file (format {found!r})")
    return value
