"""Train the generative reranker on a frozen first stage (`cvr train-reranker`; peers.md 2b, the
"generation" stage of DiffusionRet).

The base checkpoint is loaded and never changes: it encodes the train and val splits once (each
caption's and each video's slot-0 vector, as a gallery holds them) and scores every caption
against every video of its split with the search's own, non-transductive score. Then, per epoch:

- each caption's candidates are its positive video plus the M-1 hardest negatives by that score
  (fewer when the split has fewer videos), shuffled, since the denoiser is permutation-equivariant
  and nothing may mark the positive's place;
- the target x0 is +1 for the positive and `negative` (0, DiffusionRet's default, or -1) for the
  others; t is uniform over the T steps, x_t = q_sample(x0, t);
- the loss is the cross-entropy of 100 x0_hat against the positive's index (DiffusionRet's "KL"
  loss with its d_temp = 100); Adam.

After each epoch the val split is reranked as search does (DDIM from each caption's seeded noise
over its top-M) and the epoch with the best R@1 + R@5 + R@10 is kept.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from engine import datasets, paths
from engine.checkpoint import load_checkpoint, read_checkpoint_config
from engine.errors import InputError
from engine.portable import topk_stable
from engine.rerank import Diffusion, TorchReranker, build_denoiser, save_reranker
from engine.reranking import RerankConfig
from training.retrieval import AnchorStore, checkpoint_anchors, encode_split, load_split

LOSS_SCALE = 100.0  # DiffusionRet's d_temp: x0_hat lives in [-1, 1], the cross-entropy wants logits


@dataclass
class RerankJob:
    base: str
    root: str
    collection: str
    out: str
    feature: str | None = None  # None: the base's training feature
    anchors: str | None = None  # a base trained with anchors needs its store to encode captions
    progress: bool = True


@dataclass
class RerankTrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-4
    seed: int = 0
    threads: int = 1

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")


@dataclass
class FrozenSplit:
    """What the frozen first stage gives for one split."""

    texts: list
    query: torch.Tensor  # (captions, D) slot-0 vectors
    videos: torch.Tensor  # (videos, D) slot-0 vectors
    scores: torch.Tensor  # (captions, videos) first-stage scores
    positive: torch.Tensor  # (captions,) each caption's video


def encode_frozen(model, data, anchors) -> FrozenSplit:
    queries, videos = encode_split(model, data, anchors)
    with torch.no_grad():
        scores = model.score(queries, videos).float()
    # Search normalises whitespace before the noise is seeded by the text (Retriever.clean_queries).
    texts = [" ".join(t.split()) for t in data.captions]
    return FrozenSplit(texts, queries.lat[:, 0].float(), videos.lat[:, 0].float(), scores,
                       torch.from_numpy(np.asarray(data.caption_video, np.int64)))


def hard_candidates(scores: torch.Tensor, positive: torch.Tensor, m: int) -> torch.Tensor:
    """(captions, m) video indices: the positive first, then the m-1 best-scored other videos
    (a stable sort: equal scores keep the lower index first)."""
    masked = scores.clone()
    masked[torch.arange(len(positive)), positive] = -torch.inf
    negatives = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, : m - 1]
    return torch.cat([positive[:, None], negatives], dim=1)


def shuffled(candidates: torch.Tensor, generator: torch.Generator) -> tuple:
    """Candidates permuted per caption, and where the positive (column 0) went."""
    order = torch.argsort(torch.rand(candidates.shape, generator=generator), dim=1)
    return torch.gather(candidates, 1, order), torch.argmax((order == 0).long(), dim=1)


def batch_loss(model, diffusion: Diffusion, split: FrozenSplit, index: torch.Tensor, candidates: torch.Tensor,
               negative: float, generator: torch.Generator) -> torch.Tensor:
    """The generation loss of one batch of captions (module docstring)."""
    chosen, target = shuffled(candidates[index], generator)
    batch, m = chosen.shape
    x0 = torch.full((batch, m), float(negative))
    x0[torch.arange(batch), target] = 1.0
    t = torch.randint(0, diffusion.steps, (batch,), generator=generator)
    x_t = diffusion.q_sample(x0, t, torch.randn((batch, m), generator=generator))
    scores = torch.gather(split.scores[index], 1, chosen)
    x0_hat = model(x_t, t, split.query[index], split.videos[chosen], scores, torch.ones(batch, m, dtype=torch.bool))
    return F.cross_entropy(LOSS_SCALE * x0_hat, target)


@torch.no_grad()
def fixed_loss(model, diffusion: Diffusion, split: FrozenSplit, candidates: torch.Tensor, negative: float,
               seed: int, batch_size: int = 256) -> float:
    """The loss over the whole split with the same shuffles, timesteps and noise every time: a
    figure that only the weights move, so epochs compare (the batch losses are noisy, t is random)."""
    generator = torch.Generator().manual_seed(seed + 7919)
    total, count = 0.0, 0
    for start in range(0, len(split.texts), batch_size):
        index = torch.arange(start, min(start + batch_size, len(split.texts)))
        total += float(batch_loss(model, diffusion, split, index, candidates, negative, generator)) * len(index)
        count += len(index)
    return total / count


def rank_metrics(ranks: np.ndarray) -> dict:
    return {f"r{k}": float(100.0 * np.mean(ranks <= k)) for k in (1, 5, 10)} | {
        "medr": float(np.median(ranks)), "sum": float(sum(100.0 * np.mean(ranks <= k) for k in (1, 5, 10)))}


def reranked_ranks(reranker, split: FrozenSplit, batch_size: int = 256) -> tuple:
    """(first-stage ranks, reranked ranks) of each caption's video among its split's videos, the way
    search ranks: the stable top-k of the scores, the first M reranked."""
    gallery = SimpleNamespace(lat=split.videos.numpy()[:, None])
    scores, positive = split.scores.numpy(), split.positive.numpy()
    before, after = [], []
    for start in range(0, len(scores), batch_size):
        part = slice(start, start + batch_size)
        values, rows = topk_stable(scores[part], scores.shape[1])
        _, new_rows = reranker.rerank(split.texts[part], split.query[part].numpy()[:, None], values, rows, gallery)
        for found, target in ((rows, before), (new_rows, after)):
            target += list(np.argmax(found == positive[part, None], axis=1) + 1)
    return np.asarray(before), np.asarray(after)


def _load_base(job: RerankJob) -> tuple:
    model = load_checkpoint(job.base)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    config = read_checkpoint_config(job.base)
    recorded = config.get("train", {}).get("job", {})
    if model.config.use_anchor and not job.anchors:
        raise InputError(f"{job.base} was trained with anchors: pass --anchors STORE to encode the captions")
    anchors = (AnchorStore(job.anchors, checkpoint_anchors(config)) if (job.anchors and model.config.use_anchor)
               else None)
    if anchors is not None:
        anchors.check_kind(config)
    collection = datasets.Collection(job.root, job.collection)
    feature = job.feature or recorded.get("feature", "resnet50")
    splits = []
    for name in ("train", "val"):
        data = load_split(collection, name, feature, config.get("tag_vocab", []), recorded.get("max_frames", 64))
        if data.frames.shape[2] != model.config.frame_dim:
            raise InputError(f"frame features {feature} are {data.frames.shape[2]}-d but {job.base} expects "
                             f"{model.config.frame_dim}-d")
        if len(data.video_ids) < 2:
            raise InputError(f"the {name} split has {len(data.video_ids)} video: a reranker needs candidates")
        splits.append(encode_frozen(model, data, anchors))
    return model, splits


def train_reranker(job: RerankJob, config: RerankConfig, train_config: RerankTrainConfig) -> dict:
    """Train, keep the best epoch on val, write the reranker folder."""
    from engine.checkpoint import checkpoint_id

    train_config.validate()
    torch.manual_seed(train_config.seed)
    torch.set_num_threads(train_config.threads)
    base_model, (train, val) = _load_base(job)
    config = RerankConfig(**{**config.to_dict(), "latent_dim": int(train.query.shape[1])}).validate()
    model = build_denoiser(config)
    diffusion = Diffusion(config.diffusion_steps)
    candidates = hard_candidates(train.scores, train.positive, min(config.candidates, train.scores.shape[1]))
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config.lr)
    generator = torch.Generator().manual_seed(train_config.seed)
    base_id = checkpoint_id(job.base)
    evaluator = TorchReranker(job.out, config, base_id, model)
    first_stage = None
    best, best_state, start = None, None, time.time()

    def fixed() -> float:
        return fixed_loss(model.eval(), diffusion, train, candidates, config.negative, train_config.seed)

    history = [{"epoch": 0, "fixed_loss": fixed()}]
    for epoch in range(1, train_config.epochs + 1):
        model.train()
        order = torch.randperm(len(train.texts), generator=generator)
        batches = range(0, len(order), train_config.batch_size)
        losses = []
        for offset in tqdm(batches, desc=f"reranker epoch {epoch}", unit="batch", disable=not job.progress,
                           leave=False):
            loss = batch_loss(model, diffusion, train, order[offset : offset + train_config.batch_size], candidates,
                              config.negative, generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        model.eval()
        before, after = reranked_ranks(evaluator, val)
        first_stage = first_stage or rank_metrics(before)
        metrics = rank_metrics(after)
        improved = best is None or metrics["sum"] > best["sum"]
        if improved:
            best = dict(metrics, epoch=epoch)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "fixed_loss": fixed(), "val": metrics,
                        "seconds": round(time.time() - start, 1)})
        print(f"epoch {epoch}: loss {np.mean(losses):.3f}  val t2v R@1/5/10 reranked {metrics['r1']:.1f}/"
              f"{metrics['r5']:.1f}/{metrics['r10']:.1f} (first stage {first_stage['r1']:.1f}/{first_stage['r5']:.1f}/"
              f"{first_stage['r10']:.1f}){'  *' if improved else ''}", flush=True)
    model.load_state_dict(best_state)
    base = {"id": base_id, "path": paths.reference(job.base, job.out), "head": base_model.config.head}
    recorded = {k: v for k, v in asdict(job).items() if k not in ("base", "out", "progress")}
    recorded["root"] = paths.reference(job.root, job.out)
    recorded["anchors"] = job.anchors and paths.reference(job.anchors, job.out)
    extra = {"train": {"job": recorded, "config": asdict(train_config), "best_epoch": best["epoch"],
                       "val": best, "val_first_stage": first_stage}}
    save_reranker(model, config, job.out, base, history, extra)
    return {"reranker": job.out, "history": history, "best": best, "first_stage": first_stage}
