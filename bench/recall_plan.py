"""What bench/recall.py measures and at what size: its rows, anchor stores, plan and collection."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import common

METRICS = ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "t2v_mnr", "t2v_map",
           "v2t_r1", "v2t_r5", "v2t_r10", "v2t_medr", "v2t_mnr", "v2t_map", "sumr")
HEADERS = ["model", "t2v R@1", "R@5", "R@10", "MedR", "MnR", "mAP",
           "v2t R@1", "R@5", "R@10", "MedR", "MnR", "mAP", "SumR"]
# Model widths and batch of the smoke run (--tiny), as tests/test_retrieval.py's TINY flags.
TINY_DIMS = ["--latent-dim", "32", "--attn-dim", "16", "--video-gru-hidden", "16", "--video-local-dim", "32",
             "--batch-size", "16"]
# ... and of the glscl head (tests/test_glscl.py's) and the reranker (a narrow denoiser, T = 8).
TINY_GLSCL = ["--glscl-heads", "4", "--glscl-frames", "5", "--glscl-queries", "3", "--glscl-decoder-layers", "1",
              "--glscl-temporal-layers", "1"]
TINY_RERANK = ["--hidden", "32", "--diffusion-steps", "8", "--batch-size", "16"]
PEERS = "peer methods and the generative reranker (same data, seeds, widths and epochs)"
ANCHORS_PER_QUERY = (2, 4)  # the "anchors per query" rows (N = 1 is the full model's row)
LATENT_SWAP_STEPS = (2, 1)  # test-time step counts of the generator-features row (it trains on 4)
RERANK_COST = 1.5  # a reranker's training and two search-path evaluations, relative to a full-model training


# ---------------------------------------------------------------------------------------------
# What is measured


@dataclass
class Store:
    """One anchor store: which generator draws it, at how many steps, for which prompts and splits."""

    name: str
    generator: str
    steps: int
    protocol: str  # query | ssss
    splits: str
    label: str
    per_query: int = 1  # anchors drawn per caption (`cvr anchors --anchors-per-query`)
    features: str = "pixels"  # what its regions are: ResNet-50 over pixels, or the generator's latent


@dataclass
class Row:
    name: str
    label: str
    group: str
    train_flags: list = field(default_factory=list)  # `cvr train` flags beyond the shared ones
    anchors: str | None = None  # Store name used for training and evaluation; None: text-only
    leaks_answer: bool = False
    trained_by: str | None = None  # an evaluation-only row: the row whose checkpoints it evaluates
    test_anchors: str | None = None  # ... with this store's test anchors
    cost: float = 1.0  # training time relative to the others, to start the longest runs first
    rerank_of: str | None = None  # a reranker row: trained on this row's checkpoints, scored by the search path


def student_store(name: str, steps: int, splits: str, protocol: str = "query", **kind) -> Store:
    folder, label = common.student_source(steps)
    return Store(name, str(folder), steps, protocol, splits, label, **kind)


def stores(variants: bool = False) -> dict:
    every = "train,val,test"
    found = [student_store("student4", 4, every), student_store("ssss", 4, every, "ssss"),
             Store("teacher28", str(common.TEACHER), 28, "query", "test", "teacher at 28 steps"),
             student_store("student2", 2, "test"), student_store("student1", 1, "test")]
    if variants:
        found += [*(student_store(f"student4x{n}", 4, every, per_query=n) for n in ANCHORS_PER_QUERY),
                  student_store("latent4", 4, every, features="latent"),
                  *(student_store(f"latent{n}", n, "test", features="latent") for n in LATENT_SWAP_STEPS)]
    return {s.name: s for s in found}


def rows(store: dict) -> list:
    """Every row whose anchor stores `store` holds (the variant rows only with `stores(variants=True)`)."""
    s4 = store["student4"].label
    ablation = "ablation of the full model (fair protocol)"
    variants = f"anchor variants (fair protocol, {s4})"
    source = "anchor source at test time (full model trained on the 4-step student's anchors)"
    return [
        Row("text-minilm", "text-only twin (MiniLM encoder)", "baselines"),
        Row("text-rivrl", "text-only, RIVRL parity (BoW + BiGRU + CNN encoder)", "baselines",
            ["--text-encoder", "rivrl"], cost=2.5),  # its text encoder trains: no cached MiniLM features
        Row("full", f"full model, fair query protocol ({s4})", "prompt protocol", anchors="student4"),
        Row("full-ssss", "full model, SSSS protocol (anchor from all of a video's captions: LEAKS THE ANSWER)",
            "prompt protocol", anchors="ssss", leaks_answer=True),
        Row("meanpool", "anchor regions mean-pooled instead of the hybrid attention", ablation,
            ["--attention", "meanpool"], anchors="student4"),
        Row("spatial", "spatial attention only", ablation, ["--attention", "spatial"], anchors="student4"),
        Row("channel", "channel attention only", ablation, ["--attention", "channel"], anchors="student4"),
        Row("no-local", "no local branch", ablation, ["--no-local-branch"], anchors="student4"),
        Row("no-concept", "no concept space", ablation, ["--no-concept-space"], anchors="student4"),
    ] + [Row(f"anchors-{name}", f"test anchors: {store[name].label}", source, trained_by="full",
             test_anchors=name) for name in ("teacher28", "student4", "student2", "student1")] + [
        # The regions of N anchors (seeds s..s+N-1) read jointly: N times the anchor work per query.
        *(Row(f"per-query-{n}", f"anchors per query: N = {n}", variants, ["--anchors-per-query", str(n)],
              anchors=f"student4x{n}", cost=1.0 + 0.3 * n) for n in ANCHORS_PER_QUERY if f"student4x{n}" in store),
        *([Row("latent", "anchor from generator features (final latent tokens: no decode, no ResNet-50)", variants,
               anchors="latent4")] if "latent4" in store else []),
        # The latent row's model read with the student's latents at fewer steps (as the pixel route's swaps).
        *(Row(f"latent-student{n}", f"anchor from generator features, test latents at {n} step{'s' * (n > 1)}",
              variants, trained_by="latent", test_anchors=f"latent{n}") for n in LATENT_SWAP_STEPS
          if f"latent{n}" in store),
    ] + [
        # GLSCL's temporal transformer and query decoder at D = 1024 train ~6x slower than the full model.
        Row("glscl", "GLSCL head (`--head glscl`: global + local interaction, text-only)", PEERS,
            ["--head", "glscl"], cost=6.5),
        Row("full-rerank", "CVR-SDGM (full model, fair protocol) + generative reranker", PEERS,
            anchors="student4", rerank_of="full"),
        Row("glscl-rerank", "GLSCL + generative reranker", PEERS, rerank_of="glscl"),
    ]


# ---------------------------------------------------------------------------------------------
# Sizes and folders


@dataclass
class Plan:
    root: str
    collection: str
    feature: str
    work: str
    seeds: list
    epochs: int
    tiny: bool
    synth: dict | None  # SynthConfig fields of the built-in collection, None for --root
    jobs: int
    reuse: bool
    variants: bool = False  # issue 17's anchor-variant rows (--variants)

    def train_flags(self) -> list:
        dims = TINY_DIMS if self.tiny else []
        return ["--root", self.root, "--collection", self.collection, "--feature", self.feature,
                "--epochs", str(self.epochs), "--quiet", *dims]


def make_plan(args) -> Plan:
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.root:
        tag = f"{args.collection}-{hashlib.sha256(os.path.abspath(args.root).encode()).hexdigest()[:8]}"
        work = os.path.join(args.work, tag)
        return Plan(args.root, args.collection, args.feature, work, seeds, args.epochs, args.tiny, None,
                    args.jobs, args.reuse, args.variants)
    synth = {"videos": args.videos, "captions_per_video": args.captions, "frames": args.frames, "seed": 0}
    work = os.path.join(args.work, f"synth-v{args.videos}-c{args.captions}-f{args.frames}")
    return Plan(os.path.join(work, "data"), "synth", "resnet50", work, seeds, args.epochs, args.tiny, synth,
                args.jobs, args.reuse, args.variants)


def ensure_collection(plan: Plan) -> None:
    """Write the built-in collection once per size (same configuration: reused)."""
    if plan.synth is None:
        return
    from training.synthetic import SynthConfig, write_collection

    config = SynthConfig(**plan.synth)
    stored = Path(plan.root, config.collection, "synth_config.json")
    if stored.is_file() and json.loads(stored.read_text()) == json.loads(json.dumps(asdict(config))):
        return
    print(f"writing the built-in collection ({config.videos} videos) to {plan.root}", flush=True)
    write_collection(plan.root, config, progress=not plan.tiny)


def sizes(plan: Plan) -> dict:
    from engine.datasets import Collection

    collection = Collection(plan.root, plan.collection)
    split = {s: {"videos": len(collection.split_video_ids(s)), "captions": len(collection.captions(s))}
             for s in ("train", "val", "test")}
    batch = 16 if plan.tiny else 128
    return {"collection": plan.collection, "builtin": plan.synth, "splits": split, "epochs": plan.epochs,
            "seeds": plan.seeds, "batch_size": batch,
            "max_steps": plan.epochs * -(-split["train"]["captions"] // batch),  # early stopping may stop sooner
            "model": "tiny widths (smoke run)" if plan.tiny else "the `cvr train` default widths",
            "chance_t2v_r1": round(100 / split["test"]["videos"], 2)}
