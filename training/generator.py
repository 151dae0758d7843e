"""Training the anchor generator: the built-in FLUX teacher (rectified flow) and LoRA finetunes.

- :func:`train_teacher` (``cvr generator train``): a small FluxTransformer2DModel from scratch on
  (caption or SSSS prompt, key frame) pairs of a collection's train split, with the rectified-flow
  loss (Liu et al. 2022; SD3's logit-normal noise levels), AdamW, an EMA of the weights (what is
  saved: EMA samples are much cleaner for diffusion models at no cost), tqdm progress, a
  safetensors checkpoint and a PNG grid of samples every ``checkpoint_every`` steps.
- :func:`train_lora` (``cvr generator lora``): LoRA with peft on a pretrained FLUX transformer,
  built-in or real FLUX.1 (then the key frames go through its VAE and the prompts through its CLIP +
  T5), on (SSSS prompt, key frame) pairs; saved as a standard ``pytorch_lora_weights.safetensors``
  (``FluxPipeline.save_lora_weights``), which ``load_lora_weights`` reads.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from engine import files
from engine.anchors import (
    LORA_TARGETS,
    AnchorError,
    BuiltinConfig,
    Conditioning,
    build_transformer,
    drop_conditioning,
    euler_sample,
    flux_velocity,
    generator_kind,
    image_ids,
    images_to_latents,
    load_builtin_transformer,
    read_builtin_config,
    rectified_flow_pair,
    save_builtin,
)
from engine.fingerprints import LORA_FILE
from engine.portable import initial_noise, latents_to_images, pack_latents, prompt_seed, unpack_latents

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
        parts.append(f)
    length = max(p.tokens.shape[1] for p in parts)
    tokens = torch.cat([F.pad(p.tokens, (0, 0, 0, length - p.tokens.shape[1])) for p in parts]).half()
    mask = torch.cat([F.pad(p.mask, (0, length - p.mask.shape[1])) for p in parts])
    pooled = torch.cat([p.sentence for p in parts]).half()
    return Conditioning(tokens, mask, pooled)


def trim(cond: Conditioning) -> Conditioning:
    """Drop the padded positions no prompt in the batch uses (less attention work, same output)."""
    length = int(cond.mask.sum(1).max())
    return Conditioning(cond.tokens[:, :length].float(), cond.mask[:, :length], cond.pooled.float())


# ---------------------------------------------------------------------------------------------
# Shared training pieces


def logit_normal(n: int, generator: torch.Generator) -> torch.Tensor:
    """SD3's noise-level distribution: sigmoid of a standard normal (more weight mid-trajectory)."""
    return torch.sigmoid(torch.randn(n, generator=generator))


class EMA:
    def __init__(self, model, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step: int):
        d = min(self.decay, (1 + step) / (10 + step))  # warm start: early averages follow the model
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - d)


def save_grid(path, rows: list[np.ndarray], scale: int = 2) -> Path:
    """PNG grid: each row a list/array of uint8 images (same size), 2 px gaps, nearest upscaling."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    gap = 2
    canvas = np.full((len(rows) * (h + gap), ncol * (w + gap), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            if img.shape[:2] != (h, w):
                img = np.asarray(Image.fromarray(img).resize((w, h), Image.BOX))
            canvas[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = img
    im = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    with files.atomic_path(path) as temporary:
        im.save(temporary)
    return path


def _lr_at(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine to 10%


# ---------------------------------------------------------------------------------------------
# The teacher


@dataclass
class TeacherConfig:
    root: str
    out: str
    collection: str = "synth"
    split: str = "train"
    prompt: str = "both"
    iterations: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema: float = 0.999
    seed: int = 0
    checkpoint_every: int = 500
    grid_prompts: int = 8
    grid_steps: int = 28
    # Classifier-free guidance: each training row's conditioning is replaced by the null one
    # (engine.anchors.null_conditioning) with this probability; 0 = today's recipe, bit for bit.
    cond_dropout: float = 0.0
    generator: BuiltinConfig = field(default_factory=BuiltinConfig)  # .guidance_scale: the scale it samples at
    # Not part of the recipe (a resumed run may change them):
    resume: bool = False  # continue from <out>/train_state when there is one (else start afresh)
    stop_after: int | None = None  # stop (after a checkpoint) at this iteration; the schedule stays `iterations`'
    text_cache: str | None = None  # safetensors file of the encoded prompts (see cached_encode_texts)

    def validate(self):
        for name in ("iterations", "batch_size", "checkpoint_every", "grid_steps"):
            if getattr(self, name) < 1:
                raise AnchorError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise AnchorError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.cond_dropout < 1:
            raise AnchorError(f"--cond-dropout must be in [0, 1), got {self.cond_dropout}")
        if self.generator.guidance_scale != 1 and self.cond_dropout == 0:
            raise AnchorError("--guidance other than 1 needs --cond-dropout > 0: without caption dropout the "
                              "model never learns the unconditional velocity that guidance extrapolates from")
        if self.stop_after is not None and self.stop_after < 1:
            raise AnchorError(f"--stop-after must be >= 1, got {self.stop_after}")

    def recipe(self) -> dict:
        """What defines the run (a resume must match it); cond_dropout only when used, so that a
        recipe without it reads as before."""
        skip = ("generator", "root", "out", "resume", "stop_after", "text_cache")
        out = {k: v for k, v in asdict(self).items() if k not in skip}
        if not out["cond_dropout"]:
            del out["cond_dropout"]
        return out


def prepare_data(collection, split, prompt, config: BuiltinConfig, encoder, progress=True, text_cache=None):
    """(conditioning of every prompt, video index per prompt, packed key-frame latents per video, prompts, frames)."""
    count = (lambda t: len(encoder.tokenizer(t)["input_ids"])) if hasattr(encoder, "tokenizer") else None
    max_tokens = getattr(encoder, "max_length", config.text_max_length)
    prompts, videos, video_ids = training_pairs(collection, split, prompt, max_tokens, count)
    frames = load_frames(key_frame_paths(collection, video_ids), config.image_size)
    latents = pack_latents(images_to_latents(frames, config.fold))
    cond = cached_encode_texts(encoder, prompts, text_cache, progress=progress)
    return cond, torch.from_numpy(videos), latents, prompts, frames


def flow_loss(transformer, x0, cond: Conditioning, img_ids, gen: torch.Generator, velocity=flux_velocity):
    """The rectified-flow loss: || v(x_sigma, sigma) - (noise - x0) ||^2 at logit-normal sigmas."""
    noise = torch.randn(x0.shape, generator=gen).to(x0)
    sigma = logit_normal(x0.shape[0], gen).to(x0)
    x_sigma, target = rectified_flow_pair(x0, noise, sigma)
    pred = velocity(transformer, x_sigma, sigma, cond, img_ids)
    return F.mse_loss(pred.float(), target.float())


def sample_grid(transformer, config: BuiltinConfig, cond: Conditioning, frames: np.ndarray, steps_list, path,
                seed: int = 0):
    """Rows: the real key frames, then one row of samples per step count (at the config's guidance)."""
    s = config.latent_size
    ids = image_ids(s, s)
    seeds = [prompt_seed(str(i), seed) for i in range(len(frames))]
    noise = torch.from_numpy(pack_latents(initial_noise(seeds, (config.latent_channels, s, s))))
    rows = [list(frames)]
    for steps in steps_list:
        x = euler_sample(transformer, noise, cond, steps, ids, config.guidance_scale)
        rows.append(list(latents_to_images(unpack_latents(x, s, s).numpy(), config.fold)))
    return save_grid(path, rows)


STATE_DIR = "train_state"  # inside the teacher folder: what --resume continues from
STATE_FORMAT = "cvr-sdgm/generator-train-state/1"


def save_train_state(folder: Path, step: int, model, ema: EMA, opt, gen: torch.Generator, losses: list,
                     seconds: float, recipe: dict) -> None:
    """The resumable state of a teacher run, as safetensors + JSON (no pickle): model and EMA weights,
    AdamW's moments and step counts, the data/noise generator's and torch's RNG states; the step, the
    last 100 losses, the training seconds so far and the recipe in state.json."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().clone().contiguous() for k, v in ema.model.state_dict().items()})
    state = opt.state_dict()
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"opt.{index}.{name}"] = value.detach().clone().contiguous()
    tensors["rng.data"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    save_file(tensors, str(folder / "state.safetensors"), metadata={"format": STATE_FORMAT})
    (folder / "state.safetensors").chmod(files.FILE_MODE)  # as every other file the folder's writer makes
    files.write_json(folder / "state.json", {"format": STATE_FORMAT, "step": step, "losses": losses[-100:],
                                             "train_seconds": seconds, "recipe": recipe, "param_groups": groups})


def load_train_state(folder: Path, model, ema: EMA, opt, gen: torch.Generator, recipe: dict) -> tuple:
    """Restore what :func:`save_train_state` wrote; (step, losses, seconds). Refuses another recipe."""
    import json

    from safetensors.torch import load_file

    meta = json.loads((folder / "state.json").read_text())
    if meta.get("format") != STATE_FORMAT:
        raise AnchorError(f"{folder}: not a teacher training state ({meta.get('format')!r})")
    saved = meta["recipe"]
    changed = sorted(k for k in set(saved) | set(recipe) if saved.get(k) != recipe.get(k) and k != "checkpoint_every")
    if changed:
        raise AnchorError(f"--resume: the run in {folder.parent} has another recipe ({', '.join(changed)}: "
                          f"{[saved.get(k) for k in changed]} there, {[recipe.get(k) for k in changed]} now)")
    tensors = load_file(str(folder / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    ema.model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, strict=True)
    slots: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, index, name = k.split(".", 2)
            slots.setdefault(int(index), {})[name] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": slots, "param_groups": groups})
    gen.set_state(tensors["rng.data"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"]), list(meta["losses"]), float(meta["train_seconds"])


def train_teacher(cfg: TeacherConfig, encoder=None, progress: bool = True) -> dict:
    """Train the built-in teacher; returns a summary (loss, time, parameters, paths).

    Every ``checkpoint_every`` iterations the EMA weights are saved as a generator folder in
    ``cfg.out`` together with the training state (``train_state/``, in the same atomic swap); with
    ``cfg.resume`` a run continues from that state, and N iterations in one go give bit for bit the
    weights of N/2, a stop, and N/2 more (tests/test_generator.py)."""
    from tqdm import tqdm

    from engine.datasets import Collection

    cfg.validate()
    torch.manual_seed(cfg.seed)
    gcfg = cfg.generator
    if encoder is None:
        from engine.text import MiniLMEncoder

        encoder = MiniLMEncoder(gcfg.text_encoder, max_length=gcfg.text_max_length)
    collection = Collection(cfg.root, cfg.collection)
    t0 = time.time()
    cond, videos, latents, prompts, frames = prepare_data(collection, cfg.split, cfg.prompt, gcfg, encoder, progress,
                                                          cfg.text_cache)
    # Grid: the SSSS / caption prompt of the first few videos, with their real key frames.
    first = [int(np.nonzero(videos.numpy() == v)[0][0]) for v in range(min(cfg.grid_prompts, len(frames)))]
    grid_cond, grid_frames = trim(cond.index(torch.tensor(first))), frames[: len(first)]
    prep_s = time.time() - t0

    model = build_transformer(gcfg).train()
    ema = EMA(model, cfg.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    s = gcfg.latent_size
    ids = image_ids(s, s)
    out = Path(cfg.out)
    recipe = cfg.recipe()
    start, losses, done_s = 0, [], 0.0
    if cfg.resume and (out / STATE_DIR / "state.json").is_file():
        start, losses, done_s = load_train_state(out / STATE_DIR, model, ema, opt, gen, recipe)
    stop = cfg.iterations if cfg.stop_after is None else min(cfg.iterations, cfg.stop_after)
    n_params = sum(p.numel() for p in model.parameters())
    t1 = time.time()
    bar = tqdm(range(start, stop), desc="teacher", unit="it", disable=not progress, initial=start, total=stop)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg.lr, cfg.warmup, cfg.iterations)
        idx = torch.randint(len(videos), (cfg.batch_size,), generator=gen)
        c = drop_conditioning(trim(cond.index(idx)), cfg.cond_dropout, gen)
        loss = flow_loss(model, latents[videos[idx]], c, ids, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, step)
        losses.append(loss.item())
        losses = losses[-100:]
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 in (cfg.iterations, stop):
            seconds = round(done_s + time.time() - t1, 1)
            info = {"trained_on": f"{cfg.collection}/{cfg.split}", "prompt": cfg.prompt, "iterations": step + 1,
                    "loss": float(np.mean(losses[-100:])), "train_seconds": seconds,
                    "pairs": len(prompts), "parameters": n_params, "recipe": recipe,
                    "text_encoder": getattr(encoder, "model_id", None)}

            def state(tmp, step=step, seconds=seconds, losses=losses):
                save_train_state(tmp / STATE_DIR, step + 1, model, ema, opt, gen, losses, seconds, recipe)

            save_builtin(out, ema.model, gcfg, info, extra=state)
            sample_grid(ema.model, gcfg, grid_cond, grid_frames, (4, gcfg.default_steps),
                        out / "samples" / f"step{step + 1:06d}.png", cfg.seed)
    return {"out": str(out), "loss": float(np.mean(losses[-100:])) if losses else None,
            "prep_seconds": round(prep_s, 1), "train_seconds": round(done_s + time.time() - t1, 1),
            "iterations": max(start, stop), "pairs": len(prompts), "parameters": n_params,
            "resumed_from": start if cfg.resume else None}


# ---------------------------------------------------------------------------------------------
# LoRA finetuning (built-in or real FLUX.1)


@dataclass
class LoraTrainConfig:
    base: str
    root: str
    out: str
    collection: str = "synth"
    split: str = "train"
    prompt: str = "ssss"
    rank: int = 8
    alpha: float | None = None  # None: = rank (scale 1)
    iterations: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 20
    seed: int = 0
    image_size: int | None = None  # real FLUX only (default 512)
    targets: tuple = LORA_TARGETS


def add_lora(transformer, rank: int, alpha: float | None = None, targets=LORA_TARGETS, adapter_name="default"):
    """peft LoRA on the attention q/k/v/out, context projections, feed-forwards and single-block MLPs.

    Gaussian init of A with B = 0 (peft's 'gaussian', as diffusers' Flux DreamBooth script): the
    output is unchanged until training moves B."""
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(targets))
    transformer.add_adapter(cfg, adapter_name=adapter_name)
    return transformer


def save_lora(folder, transformer, meta: dict | None = None) -> Path:
    """The standard diffusers LoRA file (pytorch_lora_weights.safetensors, keys 'transformer.*') and
    an optional lora_config.json, written to a temporary sibling folder and renamed into place."""
    from diffusers import FluxPipeline
    from peft import get_peft_model_state_dict

    folder = Path(folder)
    with files.staged_folder(folder) as tmp:
        state = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
        FluxPipeline.save_lora_weights(str(tmp), transformer_lora_layers=state, safe_serialization=True)
        if meta is not None:
            files.write_synced(tmp / "lora_config.json", files.to_json(meta))
    return folder / LORA_FILE


def _real_flux_data(pipe, prompts, frames, size, progress=True):
    """Real FLUX.1: prompts through CLIP + T5, key frames through the VAE (shift, scale, pack)."""
    from PIL import Image

    device = pipe.transformer.device
    dtype = pipe.transformer.dtype
    tokens, pooled = [], []
    with torch.no_grad():
        for s in range(0, len(prompts), 8):
            emb, pool, _ = pipe.encode_prompt(prompts[s:s + 8], prompt_2=None, device=device, max_sequence_length=256)
            tokens.append(emb.cpu())
            pooled.append(pool.cpu())
        big = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in frames])
        lat = []
        for s in range(0, len(big), 8):
            px = torch.from_numpy(big[s:s + 8]).permute(0, 3, 1, 2).to(device, dtype) / 127.5 - 1
            z = pipe.vae.encode(px).latent_dist.sample()
            z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
            lat.append(pack_latents(z).cpu())
    tokens = torch.cat(tokens)
    cond = Conditioning(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool), torch.cat(pooled))
    h = size // pipe.vae_scale_factor
    return cond, torch.cat(lat), h


def train_lora(cfg: LoraTrainConfig, encoder=None, progress: bool = True) -> dict:
    """LoRA-finetune the base's transformer on (prompt, key frame) pairs; write the LoRA file."""
    from tqdm import tqdm

    from engine.datasets import Collection

    if cfg.rank < 1 or cfg.iterations < 1 or cfg.batch_size < 1:
        raise AnchorError("--rank, --iterations and --batch-size must be >= 1")
    kind = generator_kind(cfg.base)
    collection = Collection(cfg.root, cfg.collection)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if kind == "builtin":
        gcfg, _ = read_builtin_config(cfg.base)
        if encoder is None:
            from engine.text import MiniLMEncoder

            encoder = MiniLMEncoder(gcfg.text_encoder, max_length=gcfg.text_max_length)
        cond, videos, latents, prompts, _ = prepare_data(collection, cfg.split, cfg.prompt, gcfg, encoder, progress)
        transformer = load_builtin_transformer(cfg.base)
        s = gcfg.latent_size
        device = torch.device("cpu")
    else:
        from diffusers import FluxPipeline

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        pipe = FluxPipeline.from_pretrained(cfg.base, dtype=dtype, local_files_only=True).to(device)
        prompts, videos_np, video_ids = training_pairs(collection, cfg.split, cfg.prompt, 77)
        frames = load_frames(key_frame_paths(collection, video_ids), 64)
        cond, latents, s = _real_flux_data(pipe, prompts, frames, cfg.image_size or 512, progress)
        videos = torch.from_numpy(videos_np)
        transformer = pipe.transformer
    transformer.requires_grad_(False)
    add_lora(transformer, cfg.rank, cfg.alpha, cfg.targets)
    from diffusers.training_utils import cast_training_params

    cast_training_params(transformer, dtype=torch.float32)  # LoRA weights train in fp32 under a bf16 base
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    ids = image_ids(s, s, device, next(transformer.parameters()).dtype)
    wdtype = next(p for p in transformer.parameters() if not p.requires_grad).dtype
    transformer.train()
    losses, t0 = [], time.time()
    bar = tqdm(range(cfg.iterations), desc="lora", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.lr, cfg.warmup, cfg.iterations)
        idx = torch.randint(len(videos), (cfg.batch_size,), generator=gen)
        c = trim(cond.index(idx)).to(device, wdtype)
        with torch.autocast(device.type, dtype=wdtype, enabled=wdtype != torch.float32):
            loss = flow_loss(transformer, latents[videos[idx]].to(device, wdtype), c, ids, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    meta = {"base": str(cfg.base), "kind": kind, "rank": cfg.rank, "alpha": cfg.alpha or cfg.rank,
            "targets": list(cfg.targets), "iterations": cfg.iterations, "prompt": cfg.prompt,
            "loss": float(np.mean(losses[-50:])), "train_seconds": round(time.time() - t0, 1), "pairs": len(prompts),
            "trainable_parameters": sum(p.numel() for p in params)}
    path = save_lora(cfg.out, transformer, meta)
    return {"out": str(path), **meta}
