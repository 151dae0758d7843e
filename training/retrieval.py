"""Train and evaluate the retrieval model on any collection in the MSR-VTT feature layout.

Recipe (ARCHITECTURE.md section 8, RIVRL's): Adam at 1e-4, batch 128, gradient clip 2, the learning
rate x0.99 per epoch and x0.5 after `plateau_patience` epochs without validation gain, early stop
after `early_stop` such epochs; the validation criterion is the sum of R@1/5/10 in both directions.
After training, the matcher's min-max constants are frozen from the validation set with the best
weights, so that test scores never depend on other test items.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from engine import datasets, files, paths
from engine.checkpoint import (
    check_weights_dtype,
    load_checkpoint,
    read_checkpoint_config,
    round_to_storage,
    save_checkpoint,
)
from engine.config import ModelConfig, TrainConfig
from engine.errors import InputError
from engine.metrics import format_metrics_table, retrieval_metrics
from engine.model import CVRModel, Embeddings
from engine.outputs import EVALUATION_FORMAT
from engine.vision import read_extractor
from training.losses import glscl_loss, hybrid_loss

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class SplitData:
    """One split: its captions, its videos (frames padded to a common length) and their tags."""

    cap_ids: list
    captions: list
    video_ids: list
    caption_video: np.ndarray  # (n_captions,) index into video_ids
    frames: torch.Tensor  # (n_videos, F, d)
    frame_mask: torch.Tensor  # (n_videos, F) bool
    tags: torch.Tensor  # (n_videos, K) counts / max count


def load_split(collection: datasets.Collection, split: str, feature: str, vocab: list, max_frames: int) -> SplitData:
    pairs = collection.captions(split)
    if not pairs:
        raise InputError(f"{collection.caption_path(split)}: no captions in the {split} split")
    features = collection.features(feature)
    video_ids = collection.split_video_ids(split)
    index = {v: i for i, v in enumerate(video_ids)}
    frames, mask = (torch.from_numpy(a) for a in datasets.video_frames(features, video_ids, max_frames))
    tags = datasets.tag_targets(collection.tags(), vocab, video_ids) if vocab else np.zeros((len(video_ids), 0))
    return SplitData(
        cap_ids=[c for c, _ in pairs],
        captions=[t for _, t in pairs],
        video_ids=video_ids,
        caption_video=np.array([index[datasets.video_id_of(c)] for c, _ in pairs]),
        frames=frames,
        frame_mask=mask,
        tags=torch.from_numpy(np.asarray(tags, np.float32)),
    )


class AnchorStore:
    """Anchor region grids keyed by caption id (query protocol) or video id (SSSS protocol).

    A store may hold several anchors per id (`cvr anchors --anchors-per-query`); `count` (None:
    all of them) is how many of them each lookup returns, the first ones (seeds seed..seed+count-1),
    concatenated along the region axis as the query tower reads them."""

    def __init__(self, folder: str, count: int | None = None):
        from engine.anchor_store import anchors_per_query, read_anchor_store

        self.folder = folder
        ids, self.regions, self.meta = read_anchor_store(folder)
        self.row = {key: i for i, key in enumerate(ids)}
        stored = anchors_per_query(self.meta)
        self.count = stored if count is None else int(count)
        if not 1 <= self.count <= stored:
            raise InputError(f"{folder}: {self.count} anchors per query asked for, the store holds {stored} per id "
                             "(draw more with `cvr anchors --anchors-per-query`)")

    @property
    def region_dim(self) -> int:
        return self.regions.shape[2]

    @property
    def regions_per_anchor(self) -> int:
        return int(self.meta["regions"])

    def check_kind(self, checkpoint_config: dict) -> None:
        """Refuse (one line) a store of other features (pixels / latent) than the checkpoint's."""
        from engine.anchor_store import check_same_features

        check_same_features(self.meta, checkpoint_config.get("anchors") or {}, self.folder)

    def lookup(self, cap_ids: list) -> torch.Tensor:
        """Region grids (B, count*R, d) for these captions: by caption id, else by the caption's video."""
        rows = []
        for cap_id in cap_ids:
            row = self.row.get(cap_id, self.row.get(datasets.video_id_of(cap_id)))
            if row is None:
                raise InputError(f"{self.folder}: no anchor for caption {cap_id} (nor for its video)")
            rows.append(row)
        width = self.count * self.regions_per_anchor
        return torch.from_numpy(np.ascontiguousarray(self.regions[rows, :width], dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Encoding


class TextCache:
    """Text features of a frozen encoder, computed once per caption (the encoder does not change
    during training, so re-running it every epoch would only cost time)."""

    def __init__(self, model: CVRModel, batch_size: int = 256):
        self.model, self.batch_size, self.store = model, batch_size, {}
        self.frozen = not any(p.requires_grad for p in model.text.parameters())

    def features(self, cap_ids: list, captions: list):
        from engine.text import TextFeatures

        if not self.frozen:
            return self.model.text(captions)
        missing = [i for i, c in enumerate(cap_ids) if c not in self.store]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            with torch.no_grad():
                out = self.model.text([captions[i] for i in chunk])
            for j, i in enumerate(chunk):
                length = int(out.mask[j].sum())
                self.store[cap_ids[i]] = (out.tokens[j, :length].clone(), out.sentence[j].clone())
        items = [self.store[c] for c in cap_ids]
        length = max(t.shape[0] for t, _ in items)
        tokens = torch.zeros(len(items), length, items[0][0].shape[1])
        mask = torch.zeros(len(items), length, dtype=torch.bool)
        for i, (t, _) in enumerate(items):
            tokens[i, : t.shape[0]] = t
            mask[i, : t.shape[0]] = True
        return TextFeatures(tokens=tokens, mask=mask, sentence=torch.stack([s for _, s in items]))


@torch.no_grad()
def encode_split(model: CVRModel, data: SplitData, anchors: AnchorStore | None, cache: TextCache | None = None,
                 batch_size: int = 256) -> tuple:
    """(query Embeddings for every caption, video Embeddings for every video), eval mode."""
    model.eval()
    cache = cache or TextCache(model)
    queries = []
    for start in range(0, len(data.cap_ids), batch_size):
        ids = data.cap_ids[start : start + batch_size]
        features = cache.features(ids, data.captions[start : start + batch_size])
        regions = anchors.lookup(ids) if anchors is not None else None
        queries.append(model.encode_text_features(features, regions))
    videos = [model.encode_video(data.frames[s : s + batch_size], data.frame_mask[s : s + batch_size])
              for s in range(0, len(data.video_ids), batch_size)]
    return _cat(queries), _cat(videos)


def _cat(parts: list) -> Embeddings:
    return Embeddings(lat=torch.cat([p.lat for p in parts]), con=torch.cat([p.con for p in parts]))


def evaluate_split(model: CVRModel, data: SplitData, anchors: AnchorStore | None, transductive: bool = False,
                   cache: TextCache | None = None) -> dict:
    return retrieval_metrics(split_scores(model, data, anchors, transductive, cache), data.caption_video)


def split_scores(model: CVRModel, data: SplitData, anchors: AnchorStore | None, transductive: bool = False,
                 cache: TextCache | None = None) -> np.ndarray:
    """(captions, videos) float32 scores of a split: every caption against every video."""
    queries, videos = encode_split(model, data, anchors, cache)
    return model.score(queries, videos, transductive=transductive).float().cpu().numpy()


def part_metrics(scores: np.ndarray, data: SplitData, parts: dict) -> dict:
    """Metrics of each part ({name: caption ids}) of a split: its captions as queries against every
    video of the split (t2v), and each video that has captions in the part against them (v2t)."""
    row = {cap_id: i for i, cap_id in enumerate(data.cap_ids)}
    out = {}
    for name, cap_ids in parts.items():
        missing = [c for c in cap_ids if c not in row]
        if missing or not cap_ids:
            raise InputError(f"part {name!r}: " + (f"{len(missing)} caption id(s) not in the split, e.g. "
                                                   f"{missing[0]!r}" if missing else "no captions"))
        rows = np.array([row[c] for c in cap_ids])
        out[name] = retrieval_metrics(scores[rows], data.caption_video[rows])
    return out


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class RetrievalJob:
    root: str
    collection: str
    feature: str = "resnet50"
    out: str = "runs/checkpoint"
    anchors: str | None = None  # None: text-only; else an anchor store folder
    anchors_per_query: int | None = None  # how many of the store's anchors per caption (None: all)
    tag_vocab_size: int = 512
    # Drop vocabulary tags carried by more than this fraction of the training videos (1: keep
    # every tag, RIVRL's recipe): see datasets.common_tags.
    tag_max_df: float = 1.0
    max_frames: int = 64
    progress: bool = True


def train_retrieval(job: RetrievalJob, model_config: ModelConfig, train_config: TrainConfig,
                    weights_dtype: str = "float32") -> dict:
    """Train on the train split, select on val, freeze the normalisation on val, save the best
    (its weights stored in `weights_dtype`: float32 or float16)."""
    check_weights_dtype(weights_dtype)  # before minutes of training, not after
    torch.manual_seed(train_config.seed)
    torch.set_num_threads(train_config.threads)
    collection = datasets.Collection(job.root, job.collection)
    vocab = concept_vocab(collection, job)
    if model_config.head == "glscl":
        # The glscl towers take F frames (more are subsampled evenly, the loader's rule): load F,
        # and record it, so that indexing reads videos as training did.
        job = replace(job, max_frames=model_config.glscl_frames)
        if job.anchors:
            raise InputError("the glscl head is text-only: train it without --anchors")
    train = load_split(collection, "train", job.feature, vocab, job.max_frames)
    val = load_split(collection, "val", job.feature, vocab, job.max_frames)
    anchors = AnchorStore(job.anchors, job.anchors_per_query) if job.anchors else None
    word2vec = model_config.text.get("word2vec")
    model_config = _fit_dimensions(model_config, train, vocab, anchors, train.captions)
    model = CVRModel(model_config)
    if word2vec:
        found = model.text.init_word_vectors(word2vec)
        print(f"word2vec: {found} of {len(model.text.vocab)} words initialised from {word2vec}")
    cache = TextCache(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=train_config.lr)
    rng = np.random.default_rng(train_config.seed)
    _check_train_config(train_config)
    best, best_state, stale, since_halving, history = -1.0, None, 0, 0, []
    start = time.time()
    for epoch in range(1, train_config.epochs + 1):
        model.train()
        losses = _train_epoch(model, train, anchors, cache, optimizer, train_config, rng, job.progress, epoch)
        metrics = evaluate_split(model, val, anchors, transductive=True, cache=cache)
        criterion = metrics["sumr"] + metrics["v2t_r1"] + metrics["v2t_r5"] + metrics["v2t_r10"]
        improved = criterion > best
        halve, since_halving = plateau_step(since_halving, improved, train_config.plateau_patience)
        if improved:
            best, stale = criterion, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        row = {"epoch": epoch, "loss": losses, "val_criterion": round(criterion, 3),
               "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - start, 1),
               **{k: round(v, 3) for k, v in metrics.items()}}
        history.append(row)
        print(f"epoch {epoch}: loss {losses:.3f}  val t2v R@1/5/10 {metrics['t2v_r1']:.1f}/{metrics['t2v_r5']:.1f}/"
              f"{metrics['t2v_r10']:.1f}  v2t R@1 {metrics['v2t_r1']:.1f}  criterion {criterion:.1f}"
              f"{'  *' if improved else ''}  ({row['seconds']} s)", flush=True)
        if stale >= train_config.early_stop:
            break
        for group in optimizer.param_groups:  # RIVRL: decay every epoch, halve on a plateau
            group["lr"] *= train_config.lr_decay * (0.5 if halve else 1.0)
    if best_state is None:
        raise InputError("the validation criterion was never finite: no model to keep")
    model.load_state_dict(best_state)
    # The weights as the checkpoint will store them, so that the min-max constants are fitted on
    # the very embeddings a load computes (float16 storage moves them slightly).
    round_to_storage(model, weights_dtype)
    model.eval()
    val_queries, val_videos = encode_split(model, val, anchors, cache)
    model.matcher.fit_norm(val_queries, val_videos)
    extra = {"train": {"job": _recorded_job(job), "train_config": asdict(train_config), "best_criterion": best},
             "tag_vocab": vocab,
             # How the anchors were made, so that search draws its anchors the same way.
             "anchors": _recorded_anchors(anchors, job.out) if anchors is not None else None}
    save_checkpoint(model, job.out, history, extra, weights_dtype=weights_dtype)
    return {"history": history, "best_criterion": best, "checkpoint": job.out}


def concept_vocab(collection: datasets.Collection, job: RetrievalJob) -> list:
    """The concept vocabulary a model trains on: the collection's tag vocabulary without the tags
    that more than `job.tag_max_df` of the training videos carry (the checkpoint records it)."""
    vocab = collection.tag_vocab(job.tag_vocab_size)
    common = datasets.common_tags(collection.tags(), collection.split_video_ids("train"), job.tag_max_df)
    kept = [tag for tag in vocab if tag not in common]
    if not kept:
        raise InputError(f"{collection.tag_vocab_path(job.tag_vocab_size)}: empty tag vocabulary"
                         + (f" after dropping the tags of more than {job.tag_max_df:g} of the training videos"
                            if vocab else ""))
    return kept


def _recorded_job(job: RetrievalJob) -> dict:
    """The job as the checkpoint records it: folders relative to the checkpoint (engine.paths)."""
    recorded = asdict(job)
    del recorded["out"]  # the checkpoint itself
    recorded["root"] = paths.reference(job.root, job.out)
    recorded["anchors"] = job.anchors and paths.reference(job.anchors, job.out)
    # Which ResNet-50 made the training features (None where the folder does not say): indexing
    # video files runs the same one (engine/ingest.py).
    feature_dir = datasets.Collection(job.root, job.collection).feature_dir(job.feature)
    recorded["extractor"] = read_extractor(str(feature_dir))
    return recorded


def _recorded_anchors(store: AnchorStore, checkpoint: str) -> dict:
    """The anchor store's metadata with its generator and the store itself recorded relative to
    the checkpoint, and how many anchors per query the model read (search draws as many)."""
    meta = dict(store.meta, store=paths.reference(store.folder, checkpoint))
    if store.count > 1 or "anchors_per_query" in meta:  # absent for one anchor: config.json as before
        meta["anchors_per_query"] = store.count
    for name in ("generator", "vision_weights"):
        if meta.get(name) and meta[name] not in ("builtin", "random"):
            meta[name] = paths.rebase(meta[name], store.folder, checkpoint)
    return meta


def checkpoint_anchors(config: dict) -> int:
    """Anchors per query a checkpoint was trained on (its config's anchors section; 1 when unsaid)."""
    from engine.anchor_store import anchors_per_query

    return anchors_per_query(config.get("anchors") or {})


def plateau_step(since_halving: int, improved: bool, patience: int) -> tuple:
    """(halve the lr now?, the new count): halve after `patience` epochs without validation gain,
    counting again from each halving and from each gain, as RIVRL's lr_counter."""
    since_halving = 0 if improved else since_halving + 1
    if since_halving >= patience:
        return True, 0
    return False, since_halving


def _check_train_config(config: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "plateau_patience", "early_stop"):
        if getattr(config, name) < 1:
            raise InputError(f"{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if not config.lr > 0:
        raise InputError(f"lr must be positive, got {config.lr}")


def _fit_dimensions(config: ModelConfig, train: SplitData, vocab: list, anchors, captions: list) -> ModelConfig:
    """Dimensions that come from the data: frame width, concept count, region width, and the
    RIVRL encoder's vocabulary (built from the training captions)."""
    from engine.text_rivrl import Vocabulary

    values = config.to_dict()
    values.update(frame_dim=int(train.frames.shape[2]), concept_dim=len(vocab), use_anchor=anchors is not None)
    if anchors is not None:
        values["region_dim"] = anchors.region_dim
    text = dict(values["text"])
    if text.get("kind") == "rivrl" and not text.get("vocabulary"):
        vocab_words = Vocabulary.build(captions, min_count=text.pop("vocab_min_count", 5))
        text["vocabulary"] = vocab_words.to_json()
    text.pop("vocab_min_count", None)
    text.pop("word2vec", None)  # used once, at initialisation (train_retrieval)
    values["text"] = text
    return ModelConfig.from_dict(values)


def _train_epoch(model, data: SplitData, anchors, cache, optimizer, config: TrainConfig, rng, progress, epoch) -> float:
    order = rng.permutation(len(data.cap_ids))
    batches = range(0, len(order), config.batch_size)
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=not progress, leave=False)
    losses = []
    for start in bar:
        index = order[start : start + config.batch_size]
        if len(index) < 2:
            continue  # a triplet needs a negative; BatchNorm needs two samples
        cap_ids = [data.cap_ids[i] for i in index]
        features = cache.features(cap_ids, [data.captions[i] for i in index])
        regions = anchors.lookup(cap_ids) if anchors is not None else None
        videos = torch.from_numpy(data.caption_video[index])
        query = model.encode_text_features(features, regions)
        video = model.encode_video(data.frames[videos], data.frame_mask[videos])
        loss, parts = batch_loss(model, query, video, data.tags[videos], config)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
        optimizer.step()
        losses.append(parts["total"])
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    return float(np.mean(losses)) if losses else float("nan")


def batch_loss(model, query: Embeddings, video: Embeddings, tags: torch.Tensor, config: TrainConfig) -> tuple:
    """(loss, parts) of one batch of pairs (row i of each side is pair i), by the model's head:
    RIVRL's hybrid loss for cvr, GLSCL's for glscl."""
    if model.config.head == "glscl":
        from engine.glscl import split_slots

        mc = model.config
        _, z_t = split_slots(query, mc)
        _, _, z_v = split_slots(video, mc)
        return glscl_loss(model.matcher(query, video), model.matcher.logit_scale, z_t, z_v,
                          alpha=mc.glscl_alpha, beta=mc.glscl_beta, target=mc.glscl_target)
    return hybrid_loss(_as_branches(query), _as_branches(video), tags, margin=config.margin,
                       concept_margin=config.margin, bce_weight=config.bce_weight * len(tags))


def _as_branches(emb: Embeddings) -> dict:
    return {"lat_g": emb.lat[:, 0], "lat_l": emb.lat[:, 1], "con_g": emb.con[:, 0], "con_l": emb.con[:, 1]}


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_checkpoint(checkpoint: str, root: str, collection: str, split: str = "test",
                        anchors: str | None = None, feature: str | None = None, transductive: bool = False,
                        out: str | None = None, backend: str = "torch", parts: dict | None = None) -> dict:
    """Metrics of a checkpoint on one split; writes `<out>.json` and `<out>.md` when `out` is given.
    `backend="triton"` scores with the fused kernels swapped in. `parts` ({name: caption ids}):
    also each part's metrics, under "parts" (see part_metrics)."""
    model = load_checkpoint(checkpoint)
    if backend == "triton":
        from engine.backends.triton import use_triton_kernels

        use_triton_kernels(model)
    config = read_checkpoint_config(checkpoint)
    job = config.get("train", {}).get("job", {})
    coll = datasets.Collection(root, collection)
    vocab = config.get("tag_vocab", [])
    data = load_split(coll, split, feature or job.get("feature", "resnet50"), vocab, job.get("max_frames", 64))
    if data.frames.shape[2] != model.config.frame_dim:
        raise InputError(f"frame features are {data.frames.shape[2]}-d but the checkpoint expects "
                         f"{model.config.frame_dim}-d")
    if model.config.use_anchor and not anchors:
        raise InputError("this checkpoint uses anchors: pass --anchors STORE")
    store = AnchorStore(anchors, checkpoint_anchors(config)) if (anchors and model.config.use_anchor) else None
    if store is not None:
        store.check_kind(config)
    scores = split_scores(model, data, store, transductive=transductive)
    metrics = retrieval_metrics(scores, data.caption_video)
    by_part = part_metrics(scores, data, parts) if parts else None
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        files.write_json(out + ".json", {"format": EVALUATION_FORMAT, "checkpoint": checkpoint, "split": split,
                                          "collection": collection, "anchors": anchors, "transductive": transductive,
                                          "metrics": metrics, "queries": len(data.cap_ids),
                                          "videos": len(data.video_ids)})
        files.atomic_write(out + ".md", format_metrics_table(metrics) + "\n")
    found = {"metrics": metrics, "queries": len(data.cap_ids), "videos": len(data.video_ids)}
    return {**found, "parts": by_part} if parts else found
