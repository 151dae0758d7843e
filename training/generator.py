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

The training data is training/generator_data.py, the pieces both trainers share (loss, schedule,
EMA, sample grids) training/generator_shared.py, and the LoRA trainer training/generator_lora.py;
their names are importable from here too.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine import files
from engine.anchors import (
    AnchorError,
    BuiltinConfig,
    build_transformer,
    drop_conditioning,
    image_ids,
    save_builtin,
)
from training.generator_data import (  # noqa: F401 (re-exported: training.generator is the public module)
    PROMPT_KINDS,
    cached_encode_texts,
    encode_texts,
    key_frame_paths,
    load_frames,
    prepare_data,
    training_pairs,
    trim,
)
from training.generator_lora import LoraTrainConfig, add_lora, save_lora, train_lora  # noqa: F401 (re-exported)
from training.generator_shared import EMA, edge_weights, flow_loss, logit_normal, lr_at, sample_grid, save_grid  # noqa: F401
from training.shape_negatives import flow_loss_with_negatives, negative_source
from training.transfer_data import TransferSpec

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
    # Weight of the shape hard-negative hinge (training/shape_negatives.py); 0 = the plain flow loss.
    shape_negatives: float = 0.0
    # Extra loss weight on edge pixels of the target image (generator_shared.edge_weights); 0 = plain MSE.
    edge_weight: float = 0.0
    # A generator folder whose weights start the run (a continuation of a trained teacher); its
    # architecture must be this config's. None = fresh initialisation.
    init: str | None = None
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
        if self.shape_negatives < 0:
            raise AnchorError(f"--shape-negatives must be >= 0, got {self.shape_negatives}")
        if self.edge_weight < 0:
            raise AnchorError(f"--edge-weight must be >= 0, got {self.edge_weight}")
        if self.edge_weight and self.shape_negatives:
            raise AnchorError("--edge-weight and --shape-negatives cannot be combined (the hinge's loss is unweighted)")
        if self.stop_after is not None and self.stop_after < 1:
            raise AnchorError(f"--stop-after must be >= 1, got {self.stop_after}")

    def recipe(self) -> dict:
        """What defines the run (a resume must match it); cond_dropout, shape_negatives, edge_weight and init only
        when used, so that a recipe without them reads as before."""
        skip = ("generator", "root", "out", "resume", "stop_after", "text_cache")
        out = {k: v for k, v in asdict(self).items() if k not in skip}
        for name in ("cond_dropout", "shape_negatives", "edge_weight", "init"):
            if not out[name]:
                del out[name]
        return out


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


def start_from(model, folder: str, config: BuiltinConfig) -> dict:
    """Load a generator folder's weights into ``model`` (``--init``); its architecture must be ``config``'s
    (the guidance scale it samples at may differ). Returns the folder's info (its training record)."""
    from engine.anchors import load_builtin_transformer, read_builtin_config

    if not (Path(folder) / "config.json").is_file():
        raise AnchorError(f"--init {folder}: not a generator folder (no config.json)")
    theirs, info = read_builtin_config(folder)
    ours = config.to_dict()
    changed = sorted(k for k, v in theirs.to_dict().items() if k != "guidance_scale" and ours.get(k) != v)
    if changed:
        raise AnchorError(f"--init {folder}: another architecture ({', '.join(changed)} differ)")
    model.load_state_dict(load_builtin_transformer(folder).state_dict(), strict=True)
    return info


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
    init_info = start_from(model, cfg.init, gcfg) if cfg.init else None
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
    vocab = TransferSpec().vocabulary()  # every synonym the corpus uses (a superset of the built-in set's)
    stop = cfg.iterations if cfg.stop_after is None else min(cfg.iterations, cfg.stop_after)
    n_params = sum(p.numel() for p in model.parameters())
    t1 = time.time()
    bar = tqdm(range(start, stop), desc="teacher", unit="it", disable=not progress, initial=start, total=stop)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.iterations)
        idx = torch.randint(len(videos), (cfg.batch_size,), generator=gen)
        c = drop_conditioning(trim(cond.index(idx)), cfg.cond_dropout, gen)
        if cfg.shape_negatives:
            negatives = negative_source([prompts[i] for i in idx.tolist()], vocab, encoder, gen)
            loss, _ = flow_loss_with_negatives(model, latents[videos[idx]], c, ids, gen, negatives,
                                               cfg.shape_negatives)
        else:
            x0 = latents[videos[idx]]
            weights = edge_weights(x0, cfg.edge_weight) if cfg.edge_weight else None
            loss = flow_loss(model, x0, c, ids, gen, weights=weights)
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
            if cfg.init:  # what the run continued (the --init folder may be overwritten by its result)
                info["init_info"] = init_info

            def state(tmp, step=step, seconds=seconds, losses=losses):
                save_train_state(tmp / STATE_DIR, step + 1, model, ema, opt, gen, losses, seconds, recipe)

            save_builtin(out, ema.model, gcfg, info, extra=state)
            sample_grid(ema.model, gcfg, grid_cond, grid_frames, (4, gcfg.default_steps),
                        out / "samples" / f"step{step + 1:06d}.png", cfg.seed)
    return {"out": str(out), "loss": float(np.mean(losses[-100:])) if losses else None,
            "prep_seconds": round(prep_s, 1), "train_seconds": round(done_s + time.time() - t1, 1),
            "iterations": max(start, stop), "pairs": len(prompts), "parameters": n_params,
            "resumed_from": start if cfg.resume else None}
