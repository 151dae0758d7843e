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
    """The middle frame (frames // 2) of each video: ImageData/<video_id>_<n>.png."""
    image_dir = Path(collection.path) / "ImageData"
    if not image_dir.is_dir():
        raise AnchorError(f"{image_dir} not found: the collection has no frames to train on")
    paths = []
    for vid in video_ids:
        frames = sorted(image_dir.glob(f"{vid}_*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        if not frames:
            raise AnchorError(f"no frames for video {vid} in {image_dir}")
        paths.append(frames[len(frames) // 2])
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
    generator: BuiltinConfig = field(default_factory=BuiltinConfig)

    def validate(self):
        for name in ("iterations", "batch_size", "checkpoint_every", "grid_steps"):
            if getattr(self, name) < 1:
                raise AnchorError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise AnchorError(f"--lr must be > 0, got {self.lr}")


def prepare_data(collection, split, prompt, config: BuiltinConfig, encoder, progress=True):
    """(conditioning of every prompt, video index per prompt, packed key-frame latents per video, prompts, frames)."""
    count = (lambda t: len(encoder.tokenizer(t)["input_ids"])) if hasattr(encoder, "tokenizer") else None
    max_tokens = getattr(encoder, "max_length", config.text_max_length)
    prompts, videos, video_ids = training_pairs(collection, split, prompt, max_tokens, count)
    frames = load_frames(key_frame_paths(collection, video_ids), config.image_size)
    latents = pack_latents(images_to_latents(frames, config.fold))
    cond = encode_texts(encoder, prompts, progress=progress)
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
    """Rows: the real key frames, then one row of samples per step count."""
    s = config.latent_size
    ids = image_ids(s, s)
    seeds = [prompt_seed(str(i), seed) for i in range(len(frames))]
    noise = torch.from_numpy(pack_latents(initial_noise(seeds, (config.latent_channels, s, s))))
    rows = [list(frames)]
    for steps in steps_list:
        x = euler_sample(transformer, noise, cond, steps, ids)
        rows.append(list(latents_to_images(unpack_latents(x, s, s).numpy(), config.fold)))
    return save_grid(path, rows)


def train_teacher(cfg: TeacherConfig, encoder=None, progress: bool = True) -> dict:
    """Train the built-in teacher; returns a summary (loss, time, parameters, paths)."""
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
    cond, videos, latents, prompts, frames = prepare_data(collection, cfg.split, cfg.prompt, gcfg, encoder, progress)
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
    losses, t1 = [], time.time()
    bar = tqdm(range(cfg.iterations), desc="teacher", unit="it", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg.lr, cfg.warmup, cfg.iterations)
        idx = torch.randint(len(videos), (cfg.batch_size,), generator=gen)
        loss = flow_loss(model, latents[videos[idx]], trim(cond.index(idx)), ids, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, step)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.iterations:
            info = {"trained_on": f"{cfg.collection}/{cfg.split}", "prompt": cfg.prompt, "iterations": step + 1,
                    "loss": float(np.mean(losses[-100:])), "train_seconds": round(time.time() - t1, 1),
                    "pairs": len(prompts), "parameters": sum(p.numel() for p in model.parameters()),
                    "recipe": {k: v for k, v in asdict(cfg).items() if k not in ("generator", "root", "out")},
                    "text_encoder": getattr(encoder, "model_id", None)}
            save_builtin(out, ema.model, gcfg, info)
            sample_grid(ema.model, gcfg, grid_cond, grid_frames, (4, gcfg.default_steps),
                        out / "samples" / f"step{step + 1:06d}.png", cfg.seed)
    return {"out": str(out), "loss": float(np.mean(losses[-100:])), "prep_seconds": round(prep_s, 1),
            "train_seconds": round(time.time() - t1, 1), "iterations": cfg.iterations, "pairs": len(prompts),
            "parameters": sum(p.numel() for p in model.parameters())}


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
