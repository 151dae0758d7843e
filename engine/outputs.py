"""What each command writes, and how it recognises its own output (by format tag) before it replaces
anything: `claim(path, kind, command, overwrite)` refuses with one line when `path` holds something
else (`check_output`). The README's table "What a command may replace" lists these.
"""
from __future__ import annotations

import os
from pathlib import Path

from engine.errors import CVRError
from engine.files import read_json_object

PNG_MARKER = "anchor_pngs.json"
PNG_FORMAT = "cvr-sdgm/anchor-pngs/1"
EVALUATION_FORMAT = "cvr-sdgm/evaluation/1"


class NotOursError(CVRError):
    """An output path holds something the command did not write."""


def json_format(path: str | os.PathLike) -> str | None:
    """The "format" tag of a JSON object file, or None (missing, unreadable, another shape)."""
    value = read_json_object(path) or {}
    return value["format"] if isinstance(value.get("format"), str) else None


def check_output(path: str | os.PathLike, is_ours, what: str, command: str, overwrite: bool = False) -> None:
    """Refuse (one line) to write `path` when it holds something that `is_ours(path)` does not
    recognise as `what` (a format tag): an empty folder, a missing path, or an output of the same
    kind may be written; anything else only with `overwrite` (`--overwrite`)."""
    path = Path(path)
    if not os.path.lexists(path) or overwrite:
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    if not is_ours(path):
        raise NotOursError(f"{path}: holds something that is not {what}, which `{command}` would replace: "
                           "refusing (choose another path, or pass --overwrite to replace it)")


def is_checkpoint(path: Path) -> bool:
    from engine.checkpoint import CONFIG, FORMAT

    return json_format(path / CONFIG) == FORMAT


def is_bare_checkpoint(path: Path) -> bool:
    """A checkpoint holding only what `cvr train` writes: replacing one that also holds an export
    (`CKPT/onnx`) or evaluations would delete them."""
    from engine.checkpoint import CONFIG, LOG, WEIGHTS
    from engine.integrity import STAMP

    own = {CONFIG, LOG, WEIGHTS, STAMP}
    return is_checkpoint(path) and all(e.name in own or e.name.startswith(".") or e.name.endswith(".lock")
                                       for e in path.iterdir())


def is_gallery(path: Path) -> bool:
    from engine.gallery_format import FORMAT, MANIFEST

    return json_format(path / MANIFEST) == FORMAT


def is_reranker(path: Path) -> bool:
    from engine.reranking import CONFIG, FORMAT

    return json_format(path / CONFIG) == FORMAT


def is_export(path: Path) -> bool:
    from engine.backends.onnxruntime import EXPORT_FORMAT, MANIFEST

    return json_format(path / MANIFEST) == EXPORT_FORMAT


def is_anchor_store(path: Path) -> bool:
    from engine.anchor_store import META_FILE, STORE_FORMAT

    return json_format(path / META_FILE) == STORE_FORMAT


def is_generator(path: Path) -> bool:
    from engine.anchors import CONFIG_FILE, FORMAT

    return json_format(path / CONFIG_FILE) == FORMAT


def is_students(path: Path) -> bool:
    """`cvr generator distill --out`: a folder of `<N>step` generator folders."""
    entries = [e for e in path.iterdir() if not e.name.startswith(".") and not e.name.endswith(".lock")] \
        if path.is_dir() else []
    return bool(entries) and all(e.name.endswith("step") and is_generator(e) for e in entries)


def is_lora(path: Path) -> bool:
    from engine.fingerprints import LORA_FILE

    return path.is_dir() and (path / LORA_FILE).is_file()


def is_collection(path: Path) -> bool:
    """A collection `cvr data synth` wrote (its configuration and scenes beside the data)."""
    return (path / "synth_config.json").is_file() and (path / "synth_scenes.json").is_file()


def is_anchor_pngs(path: Path) -> bool:
    return json_format(path / PNG_MARKER) == PNG_FORMAT


def is_vision_weights(path: Path) -> bool:
    """A built-in extractor file (`cvr vision train`): safetensors with its format in the metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return (handle.metadata() or {}).get("format") == "cvr-resnet50-bn"
    except (SafetensorError, OSError, ValueError):
        return False


def is_feature_folder(path: Path) -> bool:
    """A BigFile feature folder (`cvr features` writes one): feature.bin beside shape.txt."""
    return (path / "feature.bin").is_file() and (path / "shape.txt").is_file()


def is_shardset(path: Path) -> bool:
    from engine.cluster.shardset import FORMAT, SHARDS

    return json_format(path / SHARDS) == FORMAT


def is_evaluation(prefix: Path) -> bool:
    """`cvr evaluate --out PREFIX` writes PREFIX.json (tagged; untagged before this format, but
    holding its checkpoint and metrics) and PREFIX.md."""
    value = read_json_object(f"{prefix}.json") or {}
    if value.get("format") == EVALUATION_FORMAT:
        return True
    return "format" not in value and {"checkpoint", "metrics"} <= set(value)


KINDS = {
    "checkpoint": (is_checkpoint, "a checkpoint"),
    "bare checkpoint": (is_bare_checkpoint, "a checkpoint holding only what `cvr train` writes"),
    "gallery": (is_gallery, "a gallery"),
    "shard set": (is_shardset, "a shard set written by `cvr gallery shard`"),
    "export": (is_export, "an export folder"),
    "reranker": (is_reranker, "a reranker folder written by `cvr train-reranker`"),
    "anchor store": (is_anchor_store, "an anchor store"),
    "generator": (is_generator, "a built-in generator folder"),
    "students": (is_students, "a folder of distilled students"),
    "lora": (is_lora, "a LoRA folder"),
    "collection": (is_collection, "a collection written by `cvr data synth`"),
    "anchor pngs": (is_anchor_pngs, "a folder of anchor PNGs written by `cvr anchors`"),
    "vision weights": (is_vision_weights, "built-in extractor weights"),
    "feature folder": (is_feature_folder, "a feature folder"),
}


def claim(path: str | os.PathLike, kind: str, command: str, overwrite: bool = False) -> None:
    """Refuse (one line) to let `command` write `path` when it holds something other than a `kind`."""
    is_ours, what = KINDS[kind]
    check_output(path, is_ours, what, command, overwrite)


def claim_evaluation(prefix: str, overwrite: bool = False) -> None:
    """`cvr evaluate --out PREFIX`: PREFIX.json and PREFIX.md may replace an earlier evaluation only."""
    for suffix in (".json", ".md"):
        check_output(f"{prefix}{suffix}", lambda _path: is_evaluation(Path(prefix)), "an evaluation",
                     "cvr evaluate", overwrite)


def mark_anchor_pngs(folder: str | os.PathLike) -> None:
    """Tag a PNG folder as `cvr anchors`' own (so a later run may write into it again)."""
    from engine.files import write_json

    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json(Path(folder) / PNG_MARKER, {"format": PNG_FORMAT})
