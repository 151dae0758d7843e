"""Anchor from generator features (issue 17 item 4): pixel anchors (decoded, ResNet-50 regions)
beside the generator's final latent tokens as regions, each trained and evaluated at 1, 2 and 4
sampling steps, with the query path's latency per query beside t2v R@1. A bench-ready function
(`compare`) and a small command line (`python -m training.latent_anchors`); like
training/anchors_per_query.py it drives the `cvr` commands, so what it measures is what users run.

Each (features, steps) row draws its own store (`cvr anchors --features F --steps S`), trains on it
(same seed and widths for every row), is evaluated on the test split's anchors, indexed, and timed
through the Retriever at batch 1 (warm: the first query is dropped). The generator of S steps is
`students/<S>step` when it is shipped, else the default student sampled with S steps (recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field

from training.anchors_per_query import TINY, latency_ms, run_cli

STUDENTS = "engine/weights/generator/students"
FEATURES = ("pixels", "latent")
LABELS = {"pixels": "anchor pixels (ResNet-50 regions)", "latent": "anchor from generator features"}


@dataclass
class CompareConfig:
    root: str
    collection: str
    work: str  # folder for the stores, checkpoints and galleries
    generator: str = f"{STUDENTS}/4step"  # used at the steps that have no student of their own
    steps: tuple = (1, 2, 4)
    features: tuple = FEATURES
    feature: str = "resnet50"
    epochs: int = 2
    batch_size: int = 32
    seed: int = 0
    tiny: bool = True  # tiny widths: a smoke-sized comparison on a CPU
    timed_queries: int = 8
    extra_train: list = field(default_factory=list)


def generator_for(config: CompareConfig, steps: int) -> str:
    own = os.path.join(STUDENTS, f"{steps}step")
    return own if os.path.isdir(own) else config.generator


def run_row(config: CompareConfig, features: str, steps: int, texts: list) -> dict:
    from training.retrieval import evaluate_checkpoint

    name = f"{features}_s{steps}"
    store, checkpoint = os.path.join(config.work, name + "_anchors"), os.path.join(config.work, name)
    gallery, generator = checkpoint + "_gallery", generator_for(config, steps)
    common = ["--root", config.root, "--collection", config.collection]
    if not os.path.isdir(store):
        run_cli(["anchors", "--generator", generator, *common, "--split", "train,val,test", "--features", features,
              "--steps", str(steps), "--out", store, "--quiet"])
    clock = time.perf_counter()
    run_cli(["train", *common, "--feature", config.feature, "--out", checkpoint, "--anchors", store,
          "--epochs", str(config.epochs), "--batch-size", str(config.batch_size), "--seed", str(config.seed),
          "--quiet", "--overwrite", *(TINY if config.tiny else []), *config.extra_train])
    train_s = time.perf_counter() - clock
    metrics = evaluate_checkpoint(checkpoint, config.root, config.collection, "test", anchors=store)["metrics"]
    run_cli(["index", "--checkpoint", checkpoint, *common, "--out", gallery, "--quiet", "--overwrite"])
    return {"features": features, "label": LABELS[features], "steps": steps, "generator": generator,
            "t2v_r1": round(metrics["t2v_r1"], 2), "t2v_r5": round(metrics["t2v_r5"], 2),
            "t2v_r10": round(metrics["t2v_r10"], 2), "v2t_r1": round(metrics["v2t_r1"], 2),
            "train_s": round(train_s, 1), "latency_ms": latency_ms(checkpoint, gallery, texts)}


def compare(config: CompareConfig) -> dict:
    """One row per (features, steps): recall on the test split and the query path's latency."""
    from engine.datasets import Collection

    os.makedirs(config.work, exist_ok=True)
    texts = [t for _, t in Collection(config.root, config.collection).captions("test")[: config.timed_queries]]
    rows = [run_row(config, f, s, texts) for s in config.steps for f in config.features]
    return {"config": asdict(config), "rows": rows}


def markdown(result: dict) -> str:
    lines = ["| variant | steps | t2v R@1 | R@5 | R@10 | v2t R@1 | anchor ms | vision ms | total ms/query |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ms = row["latency_ms"]
        lines.append(f"| {row['label']} | {row['steps']} | {row['t2v_r1']:.1f} | {row['t2v_r5']:.1f} | "
                     f"{row['t2v_r10']:.1f} | {row['v2t_r1']:.1f} | {ms['anchor']:.1f} | {ms['vision']:.1f} | "
                     f"{ms['total']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--collection", default="synth")
    parser.add_argument("--work", required=True)
    parser.add_argument("--generator", default=CompareConfig.generator)
    parser.add_argument("--steps", default="1,2,4")
    parser.add_argument("--features", default=",".join(FEATURES))
    parser.add_argument("--feature", default="resnet50")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-widths", action="store_true", help="the `cvr train` default widths")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    config = CompareConfig(args.root, args.collection, args.work, args.generator,
                           tuple(int(s) for s in args.steps.split(",")), tuple(args.features.split(",")),
                           args.feature, args.epochs, seed=args.seed, tiny=not args.full_widths)
    result = compare(config)
    with open(os.path.join(args.work, "latent_anchors.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
