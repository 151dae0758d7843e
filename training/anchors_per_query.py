"""Anchors per query (issue 17 item 3): train and evaluate N = 1, 2, 4 on one collection, with the
query path's latency per query beside t2v R@1. A bench-ready function (`compare`) and a small
command line (`python -m training.anchors_per_query`); it drives the `cvr` commands, so what it
measures is what users run.

One store of max(N) anchors per caption is drawn once (anchor j with seed j); each row trains on
its first N (`cvr train --anchors-per-query N`), is evaluated on the test split's anchors, indexed,
and timed through the Retriever at batch 1 (warm: the first query is dropped).
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, field

from engine.files import write_json

RECALL_KEYS = ("t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1")
TINY = ["--latent-dim", "32", "--attn-dim", "16", "--video-gru-hidden", "16", "--video-local-dim", "32"]


@dataclass
class CompareConfig:
    root: str
    collection: str
    work: str  # folder for the store, checkpoints and galleries
    generator: str = "engine/weights/generator/students/4step"
    counts: tuple = (1, 2, 4)
    feature: str = "resnet50"
    epochs: int = 2
    batch_size: int = 32
    seed: int = 0
    tiny: bool = True  # tiny widths: a smoke-sized comparison on a CPU
    timed_queries: int = 8
    extra_train: list = field(default_factory=list)


def run_cli(argv: list) -> None:
    from engine.cli import main

    code = main(argv)
    if code:
        raise RuntimeError(f"cvr {' '.join(argv[:1])} failed with exit code {code}")


def draw_store(config: CompareConfig) -> str:
    store = os.path.join(config.work, f"anchors_x{max(config.counts)}")
    if not os.path.isdir(store):
        run_cli(["anchors", "--generator", config.generator, "--root", config.root, "--collection", config.collection,
              "--split", "train,val,test", "--anchors-per-query", str(max(config.counts)), "--out", store, "--quiet"])
    return store


def latency_ms(checkpoint: str, gallery: str, texts: list) -> dict:
    """Per-stage ms per query at batch 1, warm (the first query pays one-time start-up)."""
    from engine.retriever import Retriever

    retriever = Retriever(checkpoint, gallery)
    retriever.search(texts[:1], k=1)
    totals: dict = {}
    for text in texts:
        retriever.search([text], k=1)
        for stage, ms in retriever.last_timings.per_query_ms().items():
            totals[stage] = totals.get(stage, 0.0) + ms
    per_query = {stage: round(ms / len(texts), 2) for stage, ms in totals.items()}
    per_query["total"] = round(sum(totals.values()) / len(texts), 2)
    return per_query


def train_and_measure(config, store: str, checkpoint: str, train_args: list, texts: list) -> dict:
    """`cvr train` on a store (the config's widths, epochs and seed, plus ``train_args``), test-split
    recall with the store's anchors, a gallery, and the query path's latency: the measured part of a
    row, shared by this module and training/latent_anchors.py."""
    from training.retrieval import evaluate_checkpoint

    gallery = checkpoint + "_gallery"
    common = ["--root", config.root, "--collection", config.collection]
    clock = time.perf_counter()
    run_cli(["train", *common, "--feature", config.feature, "--out", checkpoint, "--anchors", store, *train_args,
          "--epochs", str(config.epochs), "--batch-size", str(config.batch_size), "--seed", str(config.seed),
          "--quiet", "--overwrite", *(TINY if config.tiny else []), *config.extra_train])
    train_s = time.perf_counter() - clock
    metrics = evaluate_checkpoint(checkpoint, config.root, config.collection, "test", anchors=store)["metrics"]
    run_cli(["index", "--checkpoint", checkpoint, *common, "--out", gallery, "--quiet", "--overwrite"])
    return {**{key: round(metrics[key], 2) for key in RECALL_KEYS}, "train_s": round(train_s, 1),
            "latency_ms": latency_ms(checkpoint, gallery, texts)}


def markdown_cells(row: dict) -> str:
    """A row's recall and latency cells, as both modules' tables end."""
    ms = row["latency_ms"]
    return (f"{row['t2v_r1']:.1f} | {row['t2v_r5']:.1f} | {row['t2v_r10']:.1f} | {row['v2t_r1']:.1f} | "
            f"{ms['anchor']:.1f} | {ms['vision']:.1f} | {ms['total']:.1f} |")


def run_count(config: CompareConfig, store: str, count: int, texts: list) -> dict:
    checkpoint = os.path.join(config.work, f"n{count}")
    measured = train_and_measure(config, store, checkpoint, ["--anchors-per-query", str(count)], texts)
    return {"anchors_per_query": count, **measured}


def compare(config: CompareConfig) -> dict:
    """One row per N: recall on the test split and the query path's latency per query."""
    from engine.datasets import Collection

    os.makedirs(config.work, exist_ok=True)
    store = draw_store(config)
    texts = [t for _, t in Collection(config.root, config.collection).captions("test")[: config.timed_queries]]
    rows = [run_count(config, store, n, texts) for n in config.counts]
    return {"config": asdict(config), "rows": rows}


def markdown(result: dict) -> str:
    lines = ["| anchors per query | t2v R@1 | R@5 | R@10 | v2t R@1 | anchor ms | vision ms | total ms/query |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['anchors_per_query']} | {markdown_cells(row)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--collection", default="synth")
    parser.add_argument("--work", required=True)
    parser.add_argument("--generator", default=CompareConfig.generator)
    parser.add_argument("--counts", default="1,2,4")
    parser.add_argument("--feature", default="resnet50")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-widths", action="store_true", help="the `cvr train` default widths")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    config = CompareConfig(args.root, args.collection, args.work, args.generator,
                           tuple(int(c) for c in args.counts.split(",")), args.feature, args.epochs, seed=args.seed,
                           tiny=not args.full_widths)
    result = compare(config)
    write_json(os.path.join(args.work, "anchors_per_query.json"), result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
