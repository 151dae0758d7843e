"""The generator trainers' data: (prompt, key frame) pairs of a collection, key frames and (cached) prompt encodings."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from engine import files
from engine.anchors import AnchorError, BuiltinConfig, Conditioning, images_to_latents
from engine.portable import pack_latents

PROMPT_KINDS = ("caption", "ssss", "both")


# ---------------------------------------------------------------------------------------------
# Data: (prompt, key frame) pairs


def key_frame_paths(collection, video_ids) -> list[Path]:
    """The middle frame (frames // 2) of each video: ImageData/<video_id>_<n>.png.

    The folder is listed once and grouped by video id (the name up to its last '_'): a glob per
    video made this quadratic in the number of images (a 20k-image corpus)."""
    import os

    image_dir = Path(collection.path) / "ImageData"
    if not image_dir.is_dir():
        raise AnchorError(f"{image_dir} not found: the collection has no frames to train on")
    wanted = set(video_ids)
    by_video: dict[str, list[tuple[int, str]]] = {}
    with os.scandir(image_dir) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            vid, _, number = stem.rpartition("_")
            if not dot or ext != "png" or vid not in wanted or not number.isdigit():
                continue
            by_video.setdefault(vid, []).append((int(number), entry.name))
    paths = []
    for vid in video_ids:
        frames = sorted(by_video.get(vid, ()))
        if not frames:
            raise AnchorError(f"no frames for video {vid} in {image_dir}")
        paths.append(image_dir / frames[len(frames) // 2][1])
    return paths


def load_frames(paths, size: int) -> np.ndarray:
    """uint8 (N, size, size, 3); box filter = area average, which keeps flat colours exact."""
    from PIL import Image

    out = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BOX)
        out.append(np.asarray(img))
    return np.stack(out)


def training_pairs(collection, split: str, prompt: str, max_tokens: int, count_tokens=None):
    """(prompts, video index per prompt, video ids) for the split.

    caption: every caption with its video's key frame; ssss: one super sentence per video
    (training.ssss, capped at the text encoder's token budget); both: the union."""
    from engine.datasets import video_id_of
    from training.ssss import super_sentences

    if prompt not in PROMPT_KINDS:
        raise AnchorError(f"--prompt must be one of {PROMPT_KINDS}, got {prompt!r}")
    captions = collection.captions(split)
    if not captions:
        raise AnchorError(f"split {split!r} of {collection.name} has no captions")
    video_ids = list(dict.fromkeys(video_id_of(c) for c, _ in captions))
    index = {v: i for i, v in enumerate(video_ids)}
    prompts, videos = [], []
    if prompt in ("caption", "both"):
        for cap_id, text in captions:
            prompts.append(text)
            videos.append(index[video_id_of(cap_id)])
    if prompt in ("ssss", "both"):
        by_video: dict[str, list[str]] = {v: [] for v in video_ids}
        for cap_id, text in captions:
            by_video[video_id_of(cap_id)].append(text)
        for vid, sentence in super_sentences(by_video, max_tokens, count_tokens).items():
            prompts.append(sentence)
            videos.append(index[vid])
    return prompts, np.asarray(videos), video_ids


def _text_cache_key(encoder, prompts) -> str:
    import hashlib

    h = hashlib.sha256(f"{getattr(encoder, 'model_id', type(encoder).__name__)}\n".encode())
    for text in prompts:
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()


def cached_encode_texts(encoder, prompts, cache: str | None, progress: bool = True) -> Conditioning:
    """:func:`encode_texts`, read from / written to a safetensors file when ``cache`` is given (keyed
    by the encoder id and every prompt: any change re-encodes). Encoding a 60k-caption corpus takes
    one CPU thread most of an hour, which a resumed run should not pay again."""
    if cache is None:
        return encode_texts(encoder, prompts, progress=progress)
    from safetensors import safe_open
    from safetensors.torch import save_file

    key = _text_cache_key(encoder, prompts)
    path = Path(cache)
    if path.is_file():
        with safe_open(str(path), "pt") as handle:
            if (handle.metadata() or {}).get("key") == key:
                return Conditioning(handle.get_tensor("tokens"), handle.get_tensor("mask"), handle.get_tensor("pooled"))
    cond = encode_texts(encoder, prompts, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(path) as temporary:
        tensors = {"tokens": cond.tokens.contiguous(), "mask": cond.mask.contiguous(),
                   "pooled": cond.pooled.contiguous()}
        save_file(tensors, str(temporary), metadata={"key": key, "prompts": str(len(prompts))})
    return cond


@torch.no_grad()
def encode_texts(encoder, prompts, batch_size: int = 128, progress: bool = True) -> Conditioning:
    """MiniLM conditioning of every prompt, padded to the longest (masked), fp16 to save memory."""
    from tqdm import tqdm

    parts = []
    for s in tqdm(range(0, len(prompts), batch_size), desc="encode prompts", disable=not progress):
        f = encoder(prompts[s:s + batch_size])
        parts.append(Conditioning(f.tokens, f.mask, f.sentence))
    cond = stack_conditioning(parts)
    return Conditioning(cond.tokens.half(), cond.mask, cond.pooled.half())


def stack_conditioning(parts: list) -> Conditioning:
    """The rows of every part, in order, padded (masked) to the longest token length."""
    length = max(p.tokens.shape[1] for p in parts)
    tokens = torch.cat([F.pad(p.tokens, (0, 0, 0, length - p.tokens.shape[1])) for p in parts])
    mask = torch.cat([F.pad(p.mask, (0, length - p.mask.shape[1])) for p in parts])
    return Conditioning(tokens, mask, torch.cat([p.pooled for p in parts]))


def trim(cond: Conditioning) -> Conditioning:
    """Drop the padded positions no prompt in the batch uses (less attention work, same output)."""
    length = int(cond.mask.sum(1).max())
    return Conditioning(cond.tokens[:, :length].float(), cond.mask[:, :length], cond.pooled.float())


def key_frame_latents(collection, video_ids, config: BuiltinConfig) -> tuple:
    """(uint8 key frames at the generator's size, their packed latents: the x0 a flow loss reads)."""
    frames = load_frames(key_frame_paths(collection, video_ids), config.image_size)
    return frames, pack_latents(images_to_latents(frames, config.fold))


def prepare_data(collection, split, prompt, config: BuiltinConfig, encoder, progress=True, text_cache=None):
    """(conditioning of every prompt, video index per prompt, packed key-frame latents per video, prompts, frames)."""
    count = (lambda t: len(encoder.tokenizer(t)["input_ids"])) if hasattr(encoder, "tokenizer") else None
    max_tokens = getattr(encoder, "max_length", config.text_max_length)
    prompts, videos, video_ids = training_pairs(collection, split, prompt, max_tokens, count)
    frames, latents = key_frame_latents(collection, video_ids, config)
    cond = cached_encode_texts(encoder, prompts, text_cache, progress=progress)
    return cond, torch.from_numpy(videos), latents, prompts, frames
