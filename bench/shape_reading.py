"""Does a generator read the caption's shape word? Its velocity error under the true caption, under the
caption with one shape swapped, and under the null caption, at fixed noise levels.

    python -m bench.shape_reading --generator engine/weights/generator/teacher \
        --root runs/generator_corpus/data --collection corpus [--pairs 256] [--out DIR]

A probe of seconds for what prompt fidelity (bench/fidelity.py) measures in minutes. A model that
draws the named shape predicts the velocity of a (caption, image) pair better with the true caption
than with one naming a shape the image lacks; a gap of zero means the shape word is ignored (issue
17: the first corpus teacher's gap was 0.0003 at sigma 0.5, while the null caption cost 0.02).
Pairs are drawn from the collection's split with one seed; every condition sees the same images,
noise and sigma. Writes shape_reading.{json,md,png} under bench/results/<machine>/ (or --out).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from bench import common

SIGMAS = (0.3, 0.5, 0.7, 0.9)
CONDITIONS = ("true caption", "shape swapped", "null caption")


def probe_pairs(collection, split: str, count: int, seed: int, vocab) -> tuple:
    """(true captions, shape-swapped captions, video ids): the first `count` captions, in a seeded
    order, that name a shape after a colour word and leave some shape unnamed."""
    from engine.datasets import video_id_of
    from training.shape_negatives import swap_shape

    captions = collection.captions(split)
    rng = np.random.default_rng(seed)
    true, swapped, videos = [], [], []
    for i in rng.permutation(len(captions)):
        cap_id, text = captions[i]
        other = swap_shape(text, vocab, lambda n: int(rng.integers(n)))
        if other is not None:
            true.append(text)
            swapped.append(other)
            videos.append(video_id_of(cap_id))
        if len(true) == count:
            break
    if not true:
        raise SystemExit(f"no caption of {collection.name}/{split} names a shape after a colour word")
    return true, swapped, videos


@torch.no_grad()
def measure(folder, collection, split: str = "train", pairs: int = 256, seed: int = 0, encoder=None) -> dict:
    """Mean velocity MSE per (sigma, condition) on the same pairs, images, noise and sigma."""
    from engine.anchors import (
        flux_velocity,
        image_ids,
        load_builtin_transformer,
        null_conditioning,
        read_builtin_config,
        rectified_flow_pair,
    )
    from training.generator_data import encode_texts, key_frame_latents, trim
    from training.transfer_data import TransferSpec

    config, _ = read_builtin_config(folder)
    model = load_builtin_transformer(folder).eval()
    if encoder is None:
        from engine.text import MiniLMEncoder

        encoder = MiniLMEncoder(config.text_encoder, max_length=config.text_max_length)
    true, swapped, videos = probe_pairs(collection, split, pairs, seed, TransferSpec().vocabulary())
    _, x0 = key_frame_latents(collection, videos, config)
    cond_true = trim(encode_texts(encoder, true, progress=False))
    conds = {CONDITIONS[0]: cond_true, CONDITIONS[1]: trim(encode_texts(encoder, swapped, progress=False)),
             CONDITIONS[2]: null_conditioning(cond_true)}
    ids = image_ids(config.latent_size, config.latent_size)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for sigma in SIGMAS:
        s = torch.full((len(true),), sigma)
        x_sigma, target = rectified_flow_pair(x0, noise, s)
        err = {name: float((flux_velocity(model, x_sigma, s, c, ids) - target).pow(2).mean())
               for name, c in conds.items()}
        rows.append({"sigma": sigma, **err, "shape gap": err[CONDITIONS[1]] - err[CONDITIONS[0]],
                     "null gap": err[CONDITIONS[2]] - err[CONDITIONS[0]]})
    return {"generator": str(folder), "collection": f"{collection.name}/{split}", "pairs": len(true), "seed": seed,
            "rows": rows, "examples": [[t, o] for t, o in zip(true[:3], swapped[:3], strict=True)]}


def markdown(result: dict) -> str:
    headers = ["sigma", *CONDITIONS, "shape gap", "null gap"]
    table = [[r["sigma"], *(f"{r[h]:.4f}" for h in CONDITIONS), f"{r['shape gap']:+.4f}", f"{r['null gap']:+.4f}"]
             for r in result["rows"]]
    return (f"# Does the generator read the shape word?\n\n`{result['generator']}`, {result['pairs']} pairs of "
            f"{result['collection']} (seed {result['seed']}); velocity MSE:\n\n"
            + common.markdown_table(headers, table)
            + "\nShape gap: error with one shape swapped to an absent one minus error with the true caption (0 = the "
              "shape word is ignored); null gap: the same for the null caption (how much the caption matters at "
              f"all). Example swap: \"{result['examples'][0][0]}\" -> \"{result['examples'][0][1]}\".\n")


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.2))
    sigmas = [r["sigma"] for r in result["rows"]]
    for key in ("shape gap", "null gap"):
        axis.plot(sigmas, [r[key] for r in result["rows"]], marker="o", label=key)
    axis.axhline(0, color="grey", lw=0.5)
    axis.set_xlabel("sigma (noise level)")
    axis.set_ylabel("velocity MSE minus true caption's")
    axis.legend()
    figure.tight_layout()
    common.save_figure_atomic(figure, path)
    plt.close(figure)


def main(argv=None) -> int:
    from engine.datasets import Collection

    parser = argparse.ArgumentParser(prog="python -m bench.shape_reading", description=__doc__.split("\n")[0])
    parser.add_argument("--generator", required=True, help="built-in generator folder")
    parser.add_argument("--root", required=True)
    parser.add_argument("--collection", default="corpus")
    parser.add_argument("--split", default="train")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="output folder (default bench/results/<machine>/)")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be >= 1")
    torch.set_num_threads(args.threads)
    info = common.machine_info()
    start = time.time()
    result = measure(args.generator, Collection(args.root, args.collection), args.split, args.pairs, args.seed)
    result.update(machine=info, seconds=round(time.time() - start, 1))
    text = markdown(result)
    common.write_results(common.results_dir(args.out, info), "shape_reading", result, text, plot)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
