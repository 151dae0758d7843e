"""The concept-space puzzle (issue 17): what each branch of the hybrid space scores on its own.

For each checkpoint (text-only or full), on one split: t2v R@1 of each of the four similarities
alone (latent global / local, concept global / local), of the fused score (the checkpoint's own
weights and frozen min-max constants: what search runs) and of the same fusion without the concept
space (concept weight 0); plus the range of the concept Jaccards. Checkpoints are grouped
(``NAME=CKPT,CKPT,...``, one per seed) and reported as mean ± sample std.

    python -m training.concept_space --root R --collection synth \\
        --group "RIVRL tags=runs/c/df1_s0,runs/c/df1_s1,runs/c/df1_s2" --out runs/c/concept_space
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from engine import datasets, files
from engine.checkpoint import load_checkpoint, read_checkpoint_config
from engine.metrics import retrieval_metrics
from engine.tables import markdown_table
from kernels import reference

BRANCHES = ("lat_g", "lat_l", "con_g", "con_l")
COLUMNS = ("fused", "no concept", *BRANCHES)


def branch_metrics(checkpoint: str, root: str, collection: str, split: str = "test",
                   anchors: str | None = None) -> dict:
    """{column: t2v R@1} of one checkpoint on one split, and the concept Jaccards' [min, max]."""
    from training.retrieval import AnchorStore, checkpoint_anchors, encode_split, load_split

    model = load_checkpoint(checkpoint)
    config = read_checkpoint_config(checkpoint)
    job = config["train"]["job"]
    data = load_split(datasets.Collection(root, collection), split, job.get("feature", "resnet50"),
                      config.get("tag_vocab", []), job.get("max_frames", 64))
    store = AnchorStore(anchors, checkpoint_anchors(config)) if model.config.use_anchor else None
    queries, videos = encode_split(model, data, store)
    sims = reference.similarities(queries.lat, queries.con, videos.lat, videos.con)  # (4, Q, N)
    norm = model.matcher.norm
    normed = reference.normalise(sims, norm[:, 0], norm[:, 1])
    w_lat, w_con = model.matcher.weights
    scores = {"fused": reference.fuse(normed, (w_lat, w_con)), "no concept": reference.fuse(normed, (w_lat, 0.0)),
              **dict(zip(BRANCHES, sims, strict=True))}
    out = {name: float(retrieval_metrics(s.numpy(), data.caption_video)["t2v_r1"]) for name, s in scores.items()}
    concept = sims[2:].flatten()
    out["concept_range"] = [float(concept.min()), float(concept.max())]
    out["concepts"] = len(config.get("tag_vocab", []))
    return out


def grouped(groups: dict, root: str, collection: str, split: str, anchors: str | None) -> dict:
    """{group: {per_checkpoint: [{checkpoint, column: ...}], mean: {column: ...}, std: {column: ...}}}."""
    out = {}
    for name, checkpoints in groups.items():
        found = [{"checkpoint": c, **branch_metrics(c, root, collection, split, anchors)} for c in checkpoints]
        values = {col: [f[col] for f in found] for col in COLUMNS}
        out[name] = {"per_checkpoint": found, "mean": {k: float(np.mean(v)) for k, v in values.items()},
                     "std": {k: float(np.std(v, ddof=1)) if len(v) > 1 else None for k, v in values.items()}}
    return out


def markdown(result: dict) -> str:
    headers = ["variant", "seeds", *(f"t2v R@1: {c}" for c in COLUMNS)]
    rows = []
    for name, group in result.items():
        cell = lambda c, g=group: f"{g['mean'][c]:.1f}" + ("" if g["std"][c] is None else f" ± {g['std'][c]:.1f}")
        rows.append([name, str(len(group["per_checkpoint"])), *(cell(c) for c in COLUMNS)])
    return markdown_table(headers, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.concept_space", description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--collection", default="synth")
    p.add_argument("--split", default="test")
    p.add_argument("--anchors", default=None, help="anchor store (for full-model checkpoints)")
    p.add_argument("--group", action="append", required=True, metavar="NAME=CKPT[,CKPT...]")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    groups = {}
    for spec in args.group:
        name, sep, checkpoints = spec.partition("=")
        if not sep or not checkpoints:
            p.error(f"--group wants NAME=CKPT[,CKPT...], got {spec!r}")
        groups[name] = checkpoints.split(",")
    result = grouped(groups, args.root, args.collection, args.split, args.anchors)
    text = markdown(result)
    print(text)
    if args.out:
        files.write_json(args.out + ".json", result)
        files.atomic_write(args.out + ".md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
