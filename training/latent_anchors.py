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
import os
from dataclasses import asdict, dataclass, field

from engine.files import write_json
from training.anchors_per_query import markdown_cells, run_cli, train_and_measure

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
    name = f"{features}_s{steps}"
    store, checkpoint = os.path.join(config.work, name + "_anchors"), os.path.join(config.work, name)
    generator = generator_for(config, steps)
    if not os.path.isdir(store):
        run_cli(["anchors", "--generator", generator, "--root", config.root, "--collection", config.collection,
              "--split", "train,val,test", "--features", features, "--steps", str(steps), "--out", store, "--quiet"])
    measured = train_and_measure(config, store, checkpoint, [], texts)
    return {"features": features, "label": LABELS[features], "steps": steps, "generator": generator, **measured}


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
        lines.append(f"| {row['label']} | {row['steps']} | {markdown_cells(row)}")
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
    write_json(os.path.join(args.work, "latent_anchors.json"), result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
