"""The checkpoint folder: the whole retrieval model (text encoder + towers + matcher) on disk.

A checkpoint is a folder: `model.safetensors` (every trainable tensor and the frozen min-max
constants), `config.json` (every dimension, the text encoder's id and vocabulary, the constants in
readable form, how the anchors were made) and `train_log.json`. The weights are float32, or
float16 (`cvr train --weights-dtype float16`: half the size; the min-max constants stay float32)
and cast back to float32 at load. Loading never unpickles anything,
and a checkpoint with missing or mis-shaped tensors fails with one line naming the tensor.

It holds no absolute path: folders it refers to (a local text encoder, the anchor generator, the
anchor store it was trained on) are recorded as engine.paths references, so a checkpoint copied
to another folder or machine still loads. This module reaches torch only inside the functions that
write, round or load weights: the torch-free ONNX Runtime path reads a checkpoint's config and id.
"""
from __future__ import annotations

import hashlib
import logging
import os

from engine import files, paths
from engine.config import ModelConfig, read_format_json
from engine.errors import CVRError
from engine.integrity import check_seal, seal, verify_files

FORMAT = "cvr-sdgm/checkpoint/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
LOG = "train_log.json"
RETRAIN = "restore it or train it again with `cvr train`"
WEIGHTS_DTYPES = ("float32", "float16")
# Kept in float32 whatever the weights' dtype: the min-max constants, which config.json also
# records in readable form (8 numbers), so that the file and the readable copy agree exactly.
FULL_PRECISION = ("matcher.norm",)
log = logging.getLogger(__name__)


class CheckpointError(CVRError):
    """A checkpoint folder that cannot be loaded (one-line message)."""


def checkpoint_id(folder: str) -> str:
    """sha256 of the weights file and config: what a gallery records to refuse foreign models."""
    digest = hashlib.sha256()
    for name in (WEIGHTS, CONFIG):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder}: no {name}")
        with open(path, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_checkpoint_config(folder: str) -> dict:
    """config.json, checked against its own digest (an edited field is refused like a damaged file)."""
    config = read_format_json(folder, CONFIG, FORMAT, CheckpointError, "checkpoint")
    check_seal(config, os.path.join(folder, CONFIG), RETRAIN, CheckpointError)
    files_field = config.get("files", {})
    if not isinstance(files_field, dict) or not all(isinstance(v, str) for v in files_field.values()):
        raise CheckpointError(f"{os.path.join(folder, CONFIG)}: invalid field 'files'")
    return config


def anchor_generator(folder: str, config: dict, override: str | None = None) -> str:
    """The generator folder a checkpoint's anchors come from: `override` when given, else the one
    its config records (a built-in id, or a path relative to the checkpoint)."""
    if override:
        return override
    ref = (config.get("anchors") or {}).get("generator")
    if not ref:
        raise CheckpointError(f"{folder}: this checkpoint uses anchors but records no generator: pass --generator DIR")
    generator = paths.resolve(ref, folder)
    if not os.path.isdir(generator):
        raise CheckpointError(f"{folder}: its generator {ref} is not at {generator}: pass --generator DIR")
    return generator


def warn_on_other_noise(folder: str, config: dict) -> bool:
    """A model trained on anchors drawn with another noise scheme (engine.portable.NOISE_SCHEME)
    still searches, since its queries' anchors come from the same generator and distribution, but
    not with the very anchors it was trained on: say so (once per load). Returns whether it did."""
    from engine.portable import NOISE_SCHEME

    anchors = config.get("anchors")
    if not anchors or anchors.get("noise") == NOISE_SCHEME:
        return False
    log.warning("%s: trained on anchors drawn with noise %r; this engine draws %r: retrain on a store drawn now "
                "(`cvr anchors`) for the same anchors at search time", folder, anchors.get("noise"), NOISE_SCHEME)
    return True


def _text_config(text: dict, folder: str, to_file: bool) -> dict:
    """The text encoder's config with its local folder (if any) as a reference (`to_file`) or as a
    path again."""
    text = dict(text)
    if text.get("path"):
        text["path"] = paths.reference(text["path"], folder) if to_file else paths.resolve(text["path"], folder)
    if isinstance(text.get("word_vectors"), dict) and to_file:
        source = text["word_vectors"].get("source")
        text["word_vectors"] = dict(text["word_vectors"], source=source and paths.reference(source, folder))
    return text


def same_encoder(saved_id: str, found_id: str | None) -> bool:
    """Whether a frozen text encoder is the one a checkpoint was trained with. A local folder's id
    is `hf:<name>@<fingerprint>`; checkpoints written before it was portable recorded
    `<absolute path>@<fingerprint>`, which still matches on the fingerprint."""
    if found_id == saved_id:
        return True
    old_local = os.path.isabs(saved_id.rpartition("@")[0])
    return bool(found_id) and old_local and found_id.startswith("hf:") and \
        saved_id.rpartition("@")[2] == found_id.rpartition("@")[2]


def check_weights_dtype(weights_dtype: str) -> None:
    if weights_dtype not in WEIGHTS_DTYPES:
        raise CheckpointError(f"weights dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {weights_dtype!r}")


def _cast(weights_dtype: str):
    """tensor -> the tensor in `weights_dtype`, by the tensor's own method (this module stays
    torch-free at import, tests/test_layering.py)."""
    check_weights_dtype(weights_dtype)
    method = {"float32": "float", "float16": "half"}[weights_dtype]
    return lambda tensor: getattr(tensor, method)()


def _stored(name: str, tensor) -> bool:
    """Whether a tensor of the trainable state is stored in the weights' dtype (else as it is)."""
    return tensor.is_floating_point() and name not in FULL_PRECISION


def round_to_storage(model, weights_dtype: str) -> None:
    """Round the model's stored tensors through `weights_dtype`, in place: the model then computes
    what a load of its checkpoint will (fit the min-max constants after this, not before)."""
    cast = _cast(weights_dtype)
    for name, tensor in model.trainable_state().items():  # detached, sharing the parameters' storage
        if _stored(name, tensor):
            tensor.copy_(cast(tensor))


def _weights_to_store(model, weights_dtype: str) -> dict:
    cast = _cast(weights_dtype)
    tensors = {}
    for name, tensor in model.trainable_state().items():
        tensor = tensor.detach().cpu()
        if _stored(name, tensor):
            rounded = cast(tensor)
            if tensor.isfinite().all() and not rounded.isfinite().all():
                raise CheckpointError(f"tensor {name} has values beyond the {weights_dtype} range: store float32")
            tensor = rounded
        tensors[name] = tensor.contiguous()
    return tensors


def save_checkpoint(model, folder: str, log: list | None = None, extra: dict | None = None,
                    weights_dtype: str = "float32") -> str:
    """Write a checkpoint folder atomically (staged, then swapped into place); returns its id.
    `weights_dtype` float16 halves the file: floating tensors are stored rounded to fp16 (all but
    the min-max constants) and cast back to the model's dtype at load."""
    from safetensors.torch import save_file

    tensors = _weights_to_store(model, weights_dtype)  # before staging: a refusal leaves nothing behind
    with files.staged_folder(folder) as work:
        with files.safetensors_errors(os.path.join(folder, WEIGHTS)):
            save_file(tensors, os.path.join(work, WEIGHTS), metadata={"format": FORMAT})
        files.fsync_file(os.path.join(work, WEIGHTS))
        config = {
            "format": FORMAT,
            "model": model.config.to_dict(),
            "text_encoder": _text_config(model.text.describe(), folder, to_file=True),
            # the CVR matcher's frozen min-max constants (the glscl head has none)
            "norm": {"order": ["lat_g", "lat_l", "con_g", "con_l"], "min_max": model.matcher.norm.tolist()}
            if hasattr(model.matcher, "norm") else None,
            "weights_dtype": weights_dtype,
            **(extra or {}),
        }
        config["model"]["text"] = _text_config(config["model"]["text"], folder, to_file=True)
        config["files"] = {WEIGHTS: files.sha256_file(os.path.join(work, WEIGHTS))}
        files.write_synced(os.path.join(work, CONFIG), files.to_json(seal(config)))
        files.write_synced(os.path.join(work, LOG), files.to_json(log or []))
    return checkpoint_id(folder)


def load_checkpoint(folder: str, device: str = "cpu"):
    """Rebuild the model (engine.model.CVRModel) from config.json and load model.safetensors
    strictly (no pickle)."""

    from engine.model import CVRModel
    from engine.text import build_text_encoder

    config = read_checkpoint_config(folder)
    model_config = ModelConfig.from_dict(config["model"], where=os.path.join(folder, CONFIG))
    model_config.text = _text_config(model_config.text, folder, to_file=False)
    text = build_text_encoder(_text_config(config["text_encoder"], folder, to_file=False))
    saved_id, found_id = config["text_encoder"].get("model_id"), text.describe().get("model_id")
    frozen = not any(p.requires_grad for p in text.parameters())
    if frozen and saved_id and not same_encoder(saved_id, found_id):
        # A frozen encoder's weights are not in the checkpoint: a different one would silently
        # change every query's features.
        raise CheckpointError(f"{folder}: trained with text encoder {saved_id}, but {found_id} is installed")
    model = CVRModel(model_config, text)
    tensors = _checked_weights(folder, config, model.trainable_state())
    # load_state_dict copies into the model's own tensors, so fp16-stored weights come back in the
    # model's dtype (float32), exactly the rounded values training scored with.
    model.load_state_dict(tensors, strict=False)
    model.checkpoint_id = checkpoint_id(folder)
    return model.to(device).eval()


def load_video_tower(folder: str, device: str = "cpu"):
    """Only the checkpoint's video tower (engine.model.build_video_tower: its head's), what indexing runs: the text
    encoder, which is most of a checkpoint's load time, is not built. Same checks as
    load_checkpoint on the tensors it loads; `.checkpoint_id` set, `encode_video` as the model's."""
    from engine.model import build_video_tower

    tower, model_config = _load_part(folder, "video", build_video_tower)
    tower.encode_video = tower.forward
    tower.config, tower.checkpoint_id = model_config, checkpoint_id(folder)
    return tower.to(device).eval()


def load_matcher(folder: str, device: str = "cpu"):
    """Only the checkpoint's matcher (engine.model.build_matcher: its head's, with its frozen constants):
    what a shard that scores its gallery for queries encoded elsewhere needs (engine/cluster/).
    Returns an object with `.matcher`, `.config` and `.checkpoint_id`, which
    engine.backends.pytorch.TorchScorer takes as a model."""
    from types import SimpleNamespace

    from engine.model import build_matcher

    matcher, model_config = _load_part(folder, "matcher", build_matcher)
    return SimpleNamespace(matcher=matcher.to(device).eval(), config=model_config, checkpoint_id=checkpoint_id(folder))


def _load_part(folder: str, prefix: str, build) -> tuple:
    """(module, ModelConfig): the one module `build(model_config)` makes, loaded from the
    checkpoint's tensors under `prefix.` alone, with load_checkpoint's checks on them."""
    config = read_checkpoint_config(folder)
    model_config = ModelConfig.from_dict(config["model"], where=os.path.join(folder, CONFIG))
    module = build(model_config)
    expected = {f"{prefix}.{k}": v for k, v in module.state_dict().items()}
    tensors = _checked_weights(folder, config, expected, only=f"{prefix}.")
    module.load_state_dict({k.removeprefix(f"{prefix}."): v for k, v in tensors.items()})
    return module, model_config


def _checked_weights(folder: str, config: dict, expected: dict, only: str | None = None) -> dict:
    """model.safetensors verified against its digest and read; every expected tensor there with its
    shape and finite values, and (unless `only` names a prefix to read) nothing unexpected."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = os.path.join(folder, WEIGHTS)
    if not os.path.exists(weights):
        raise CheckpointError(f"{folder}: no {WEIGHTS}")
    # Written before digests were recorded: no "files" (the weights' shapes are still checked).
    verify_files(folder, config.get("files", {}), RETRAIN, CheckpointError)
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights}: unreadable ({str(error).splitlines()[0]})") from None
    if only is not None:
        tensors = {k: v for k, v in tensors.items() if k.startswith(only)}
    for name, tensor in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{weights}: missing tensor {name}")
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{weights}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {tuple(tensor.shape)}"
            )
        if tensors[name].is_floating_point() and not tensors[name].isfinite().all():
            # NaN or infinite weights would rank every video by NaN scores, i.e. in file order.
            raise CheckpointError(f"{weights}: tensor {name} holds NaN or infinite values: retrain or restore it")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{weights}: unexpected tensor {unexpected[0]}")
    return tensors
