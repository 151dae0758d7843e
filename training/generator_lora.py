"""LoRA finetuning of a FLUX transformer (built-in or real FLUX.1): ``cvr generator lora``."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine import files
from engine.anchors import (
    LORA_TARGETS,
    AnchorError,
    Conditioning,
    generator_kind,
    image_ids,
    load_builtin_transformer,
    read_builtin_config,
)
from engine.fingerprints import LORA_FILE
from engine.portable import pack_latents
from training.generator_data import key_frame_paths, load_frames, prepare_data, training_pairs, trim
from training.generator_shared import flow_loss, lr_at


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
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.iterations)
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
