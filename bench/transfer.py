"""Transfer protocol: does the drawn anchor help where the retrieval training captions fall short?

The anchor generator learns from a still-image corpus that uses every word (`cvr data synth
--corpus`); the retrieval model trains on the transfer collection (`cvr data synth --transfer`,
training/transfer_data.py), in which no training or validation caption uses a held-out word and no
such clip shows a held-out (colour, shape) pair. The test captions are read in two parts: `seen`
(seen words and combinations only) and `held_out` (a held-out word or combination). Four arms, each
trained at every seed: the text-only twin and the full model (fair query protocol: one anchor per
caption from the few-step student), each with RIVRL's bag-of-words encoder (it knows only the
training captions' words: a held-out word is out of its vocabulary) and with MiniLM (which knows
"ruby" from its own pretraining). Reported per arm and part: t2v R@1/R@5/R@10/MedR/mAP and v2t R@1
(mean, sample std over seeds), and per encoder and part the difference full minus text-only: its
mean and a 95% t-interval over the per-seed paired differences. Writes transfer.{md,json,png} and
the split (transfer_split.json: the held-out words and pairs and each test caption's part) under
bench/results/<machine>/.

    python -m bench.transfer                         # make bench-transfer
    python -m bench.transfer --tiny --out /tmp/t     # seconds: a smoke run (tests)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import common
from bench import recall as recall_bench
from engine import files

ENCODERS = {"bow": ("RIVRL bag-of-words + BiGRU + CNN", ["--text-encoder", "rivrl"]), "minilm": ("MiniLM", [])}
MODELS = {"text": "text-only twin", "full": "full model (anchors)"}
METRICS = ["t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "t2v_map", "v2t_r1"]
HEADERS = ["encoder", "model", "part", "t2v R@1", "R@5", "R@10", "MedR", "mAP", "v2t R@1"]
PARTS = ("seen", "held_out")


@dataclass
class Plan:
    work: str
    videos: int
    captions: int
    frames: int
    epochs: int
    seeds: list
    jobs: int
    tiny: bool
    generator: str
    steps: int

    @property
    def root(self) -> str:
        return os.path.join(self.work, "data")

    def collection_dir(self) -> str:
        return os.path.join(self.root, "synth")

    def store(self) -> str:
        return os.path.join(self.work, "anchors", f"student{self.steps}")


def ensure_collection(plan: Plan) -> None:
    """The transfer collection, written once per size (an identical one is reused)."""
    from training.synthetic import SynthConfig
    from training.transfer_data import SPLIT_FILE, write_transfer_collection

    size = 32 if plan.tiny else 64
    config = SynthConfig(videos=plan.videos, captions_per_video=plan.captions, frames=plan.frames, size=size, seed=0)
    split = Path(plan.collection_dir(), "TextData", SPLIT_FILE)
    if split.is_file() and json.loads(split.read_text())["synth"] == json.loads(json.dumps(asdict(config))):
        return
    vision = None
    if plan.tiny:
        from engine.vision import RegionExtractor, VisionConfig

        vision = RegionExtractor.from_config(VisionConfig(image_size=size, weights="random"))
    if os.path.isdir(plan.collection_dir()):
        shutil.rmtree(plan.collection_dir())
    print(f"writing the transfer collection ({plan.videos} clips) to {plan.root}", flush=True)
    write_transfer_collection(plan.root, config, vision=vision, progress=not plan.tiny)


def anchor_task(plan: Plan) -> dict:
    argv = ["anchors", "--generator", plan.generator, "--root", plan.root, "--collection", "synth",
            "--split", "train,val,test", "--prompt", "query", "--steps", str(plan.steps), "--out", plan.store(),
            "--quiet", "--overwrite"]
    return {"kind": "anchors", "name": "anchors", "argv": argv, "log": os.path.join(plan.work, "anchors.log")}


def train_task(plan: Plan, encoder: str, model: str, seed: int) -> dict:
    name = f"{encoder}-{model}"
    checkpoint = os.path.join(plan.work, "checkpoints", f"{name}_s{seed}")
    argv = ["train", "--root", plan.root, "--collection", "synth", "--epochs", str(plan.epochs), "--seed", str(seed),
            "--out", checkpoint, "--overwrite", "--quiet", "--anchors", plan.store() if model == "full" else "none",
            *ENCODERS[encoder][1], *(recall_bench.TINY_DIMS if plan.tiny else [])]
    cost = (2.5 if encoder == "bow" else 1.0) + (0.3 if model == "full" else 0.0)
    return {"kind": "train", "name": name, "seed": seed, "argv": argv, "checkpoint": checkpoint, "cost": cost,
            "root": plan.root, "anchors": plan.store() if model == "full" else None,
            "log": os.path.join(plan.work, "logs", f"{name}_s{seed}.log")}


def run_task(task: dict) -> dict:
    """One task in a worker, its output in its log: `cvr anchors`, or `cvr train` + the evaluation by part."""
    import contextlib

    import torch

    from training.retrieval import evaluate_checkpoint
    from training.transfer_data import read_split

    torch.set_num_threads(1)
    os.makedirs(os.path.dirname(task["log"]), exist_ok=True)
    with open(task["log"], "w", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        recall_bench.run_cli(task)
        if task["kind"] == "anchors":
            return {"kind": "anchors"}
        parts = read_split(os.path.join(task["root"], "synth"))["test_parts"]
        found = evaluate_checkpoint(task["checkpoint"], task["root"], "synth", "test", anchors=task["anchors"],
                                    parts=parts)
    return {"kind": "train", "name": task["name"], "seed": task["seed"], "all": found["metrics"],
            "parts": found["parts"]}


# ---------------------------------------------------------------------------------------------
# Aggregation


def interval95(values: list) -> tuple:
    """(mean, low, high): the 95% t-interval of the mean of `values` (paired per-seed differences)."""
    import statistics

    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def aggregate(results: list, seeds: list) -> dict:
    """{arms: [{encoder, model, part, per_seed, mean, std}], differences: [{encoder, part, metric: ...}]}."""
    found = {(r["name"], r["seed"]): r["parts"] for r in results if r["kind"] == "train"}
    arms, differences = [], []
    for encoder in ENCODERS:
        for part in PARTS:
            for model in MODELS:
                per_seed = {str(s): found[(f"{encoder}-{model}", s)][part] for s in seeds}
                stats = {m: common.mean_std([per_seed[str(s)][m] for s in seeds]) for m in METRICS}
                arms.append({"encoder": encoder, "model": model, "part": part, "per_seed": per_seed,
                             "mean": {m: v[0] for m, v in stats.items()}, "std": {m: v[1] for m, v in stats.items()}})
            diff = {}
            for m in METRICS:
                paired = [found[(f"{encoder}-full", s)][part][m] - found[(f"{encoder}-text", s)][part][m]
                          for s in seeds]
                mean, low, high = interval95(paired)
                diff[m] = {"per_seed": paired, "mean": mean, "low": low, "high": high}
            differences.append({"encoder": encoder, "part": part, "difference": diff})
    return {"arms": arms, "differences": differences}


def _cell(mean: float, std: float | None, metric: str) -> str:
    digits = 3 if metric.endswith("map") else 1
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _interval(d: dict, metric: str) -> str:
    digits = 3 if metric.endswith("map") else 1
    if d["low"] is None:
        return f"{d['mean']:+.{digits}f}"
    return f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def markdown(result: dict) -> str:
    rows = []
    diffs = {(d["encoder"], d["part"]): d["difference"] for d in result["differences"]}
    for arm in result["arms"]:
        rows.append([ENCODERS[arm["encoder"]][0], MODELS[arm["model"]], arm["part"].replace("_", "-")]
                    + [_cell(arm["mean"][m], arm["std"][m], m) for m in METRICS])
        if arm["model"] == "full":
            d = diffs[(arm["encoder"], arm["part"])]
            rows.append(["", "**full − text-only** (95% CI)", arm["part"].replace("_", "-")]
                        + [_interval(d[m], m) for m in METRICS])
    s = result["sizes"]
    held = result["split"]
    words = sorted(w for table in held["held_out_words"].values() for ws in table.values() for w in ws)
    note = (f"Transfer collection: {s['videos']} clips x {s['captions']} captions, {s['frames']} frames; trained on "
            f"{s['train_captions']} captions of {s['train_videos']} clips, {s['epochs']} epochs at most (model "
            f"selected on validation), seeds {', '.join(map(str, result['seeds']))}: mean ± sample std; the "
            f"difference is paired by seed, with its 95% t-interval. Test: {s['test_videos']} clips, "
            f"{s['seen']} seen and {s['held_out']} held-out queries, each ranked against every test clip. Held-out "
            f"words (never in a training or validation caption; the generator's corpus has them): {', '.join(words)}; "
            f"held-out pairs (no training or validation clip shows them): "
            f"{', '.join(f'{c} {sh}' for c, sh in held['held_out_pairs'])}. Anchors: {result['generator']} at "
            f"{result['steps']} steps, one per caption (fair protocol). Machine: "
            f"{common.describe_machine(result['machine'])}. Wall time {result['wall_seconds']:.0f} s with "
            f"{result['jobs']} worker process(es) of one thread.\n")
    return common.markdown_table(HEADERS, rows) + "\n" + note


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(ENCODERS), figsize=(10, 3.6), sharey=True)
    for axis, encoder in zip(axes, ENCODERS, strict=True):
        for i, model in enumerate(MODELS):
            arms = [a for a in result["arms"] if a["encoder"] == encoder and a["model"] == model]
            means = [a["mean"]["t2v_r1"] for a in arms]
            errors = [a["std"]["t2v_r1"] or 0 for a in arms]
            positions = [j + 0.38 * i for j in range(len(arms))]
            axis.bar(positions, means, 0.36, yerr=errors, capsize=3, label=MODELS[model])
        axis.set_xticks([j + 0.19 for j in range(len(PARTS))], [p.replace("_", "-") + " queries" for p in PARTS])
        axis.set_title(ENCODERS[encoder][0], fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test t2v R@1 (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Transfer protocol: mean ± std over seeds {result['seeds']}")
    fig.tight_layout()
    common.save_figure_atomic(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=400, help="clips of the transfer collection (default 400)")
    p.add_argument("--captions", type=int, default=6, help="captions per clip (default 6)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--epochs", type=int, default=8, help="training epochs at most (default 8)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=4, help="the student's sampling steps for the anchors")
    p.add_argument("--generator", default=None, help="generator folder (default: the shipped student at --steps)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--work", default="runs/bench-transfer")
    p.add_argument("--out", default=None, help="result folder (default: bench/results/<machine>/)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tiny collection and model)")
    args = p.parse_args(argv)
    if args.tiny:
        common.apply_tiny(args, videos=24, captions=4, frames=2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from engine.datasets import Collection
    from training.transfer_data import SPLIT_FILE, read_split

    torch.set_num_threads(1)
    start = time.perf_counter()
    generator = args.generator or str(common.student_source(args.steps)[0])
    plan = Plan(args.work, args.videos, args.captions, args.frames, args.epochs,
                [int(s) for s in args.seeds.split(",")], args.jobs, args.tiny, generator, args.steps)
    ensure_collection(plan)
    recall_bench.run_tasks([anchor_task(plan)], 1, "anchors", worker=run_task)
    tasks = [train_task(plan, e, m, s) for e in ENCODERS for m in MODELS for s in plan.seeds]
    tasks.sort(key=lambda t: -t["cost"])
    results = recall_bench.run_tasks(tasks, plan.jobs, "trainings", worker=run_task)
    split = read_split(plan.collection_dir())
    collection = Collection(plan.root, "synth")
    info = common.machine_info()
    result = {"format": "cvr-sdgm/bench-transfer/1", **aggregate(results, plan.seeds), "seeds": plan.seeds,
              "generator": os.path.relpath(generator, common.REPO) if not args.generator else generator,
              "steps": plan.steps, "split": {k: split[k] for k in ("held_out_words", "held_out_pairs")},
              "sizes": {"videos": plan.videos, "captions": plan.captions, "frames": plan.frames, "epochs": plan.epochs,
                        "train_videos": len(collection.split_video_ids("train")),
                        "train_captions": len(collection.captions("train")),
                        "test_videos": len(collection.split_video_ids("test")),
                        **{p: len(split["test_parts"][p]) for p in PARTS}},
              "machine": info, "jobs": plan.jobs, "tiny": plan.tiny,
              "wall_seconds": round(time.perf_counter() - start, 1)}
    out = common.results_dir(args.out or (os.path.join(plan.work, "results") if args.tiny else None), info)
    paths = common.write_results(out, "transfer", result, markdown(result), plot)
    files.atomic_write(out / "transfer_split.json", Path(plan.collection_dir(), "TextData", SPLIT_FILE).read_bytes())
    print(Path(paths["md"]).read_text())
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']} and {out / 'transfer_split.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
