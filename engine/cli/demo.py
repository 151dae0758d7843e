"""`cvr demo` (what `make demo` runs): the built-in clips as video files, indexed with the shipped
checkpoint and searched, in a few minutes; `cvr demo --train` (`make reproduce`): the whole
training pipeline on the built-in data set."""
from __future__ import annotations

import json
import os
import sys

from engine import paths
from engine.cli.common import CLIError
from engine.cli.data import format_summary


def add(sub) -> None:
    demo = sub.add_parser("demo", help="the built-in clips as video files, indexed with the shipped checkpoint and "
                                       "searched (what `make demo` runs); --train: the whole training pipeline")
    demo.add_argument("--out", default="runs/demo", help="working folder (default: runs/demo)")
    demo.add_argument("--train", action="store_true",
                      help="run the whole pipeline instead: data set, anchors, text-only and full models, metrics, "
                           "index, search (what `make reproduce` runs; tens of minutes on 2 cores)")
    demo.add_argument("--videos", type=int, default=600, help="clips of the built-in set (default 600, the shipped "
                                                                "checkpoint's; the demo indexes its test split)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--checkpoint", default=SHIPPED_RETRIEVAL,
                      help="checkpoint to index and search with (default: the shipped built-in one)")
    demo.add_argument("--epochs", type=int, default=10,
                      help="--train: training epochs (default 10: most of the gain on the built-in set, in minutes)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)


SHIPPED_STUDENT = str(paths.WEIGHTS / "generator" / "students" / "4step")
SHIPPED_RETRIEVAL = str(paths.WEIGHTS / "retrieval" / "builtin")


def _cmd_demo(args) -> int:
    return _train_demo(args) if args.train else _video_demo(args)


def _video_demo(args) -> int:
    """The product in a few minutes: the built-in test split's clips written as mp4 files, indexed
    with the shipped checkpoint (segments, thumbnails, metadata), then example queries searched:
    paths, matching moments, thumbnails and per-stage latency."""
    import torch

    from engine.cli import main
    from training.synthetic import SynthConfig, write_split_videos

    torch.set_num_threads(1)
    clock = _StageClock()
    quiet = ["--quiet"] if args.quiet else []
    config = SynthConfig(videos=args.videos, seed=args.seed)
    videos = os.path.join(args.out, "videos")
    print(f"== 1. the built-in test split's clips as H.264 mp4 files (1 fps, 8 s each) in {videos} ==", flush=True)
    clips = write_split_videos(videos, config, ("test",), progress=not args.quiet)
    print(f"{clips['videos']} clips, metadata in {os.path.join(videos, 'metadata.jsonl')}")
    clock.lap("write mp4")

    print(f"\n== 2. index the video files with the shipped checkpoint {args.checkpoint} ==", flush=True)
    gallery = os.path.join(args.out, "gallery")
    if code := main(["index", "--checkpoint", args.checkpoint, "--videos", videos, "--out", gallery,
                     "--metadata", os.path.join(videos, "metadata.jsonl"), *quiet]):
        return code
    clock.lap("index")

    print("\n== 3. search: each hit with its file, the matching moment (seconds) and a thumbnail ==", flush=True)
    captions = clips["captions"]
    examples = [caption for _, caption in captions[:: max(1, len(captions) // 3)]][:3]
    search = ["search", "--gallery", gallery, "--checkpoint", args.checkpoint, "-k", str(min(5, clips["videos"])),
              "--anchor-cache", os.path.join(args.out, "anchor_cache")]
    if code := main([*search, *examples]):
        return code
    print("\nthe same gallery, filtered by metadata (--where tag=red --where objects>=2):", flush=True)
    code = main([*search, "--where", "tag=red", "--where", "objects>=2", examples[0]])
    clock.lap("search")
    print("\n" + clock.summary(), flush=True)
    print("The whole training pipeline that made such a checkpoint: `make reproduce` (cvr demo --train).")
    return code


def _train_demo(args) -> int:
    """Built-in data set -> text-only model and full model (anchors from the shipped 4-step student)
    -> test metrics of both -> gallery -> search with per-stage latency.

    Every process runs one torch thread, and the work is spread over two: the anchors are drawn by
    two worker processes, then the text-only model trains in a second process while this one trains
    the full model, so a 2-core machine is kept busy without oversubscribing it."""
    import time

    import torch

    from engine.cli import main

    torch.set_num_threads(1)  # one thread: on a small shared machine more threads are slower and noisier
    clock = _StageClock()
    print("== 1. the built-in data set ==", flush=True)
    root, collection = _demo_data(args)
    clock.lap("data")
    quiet = ["--quiet"] if args.quiet else []
    common = ["--root", root, "--collection", collection]
    train = ["train", *common, "--epochs", str(args.epochs), "--seed", str(args.seed), *quiet]

    print("\n== 2. anchors from the shipped 4-step student (fair query protocol), two worker processes ==",
          flush=True)
    anchors = os.path.join(args.out, "anchors_student4")
    if code := main(["anchors", "--generator", SHIPPED_STUDENT, *common, "--split", "train,val,test",
                     "--prompt", "query", "--out", anchors, "--cache", os.path.join(args.out, "anchor_cache"),
                     "--workers", "2", *quiet]):
        return code
    clock.lap("anchors")

    print("\n== 3. the text-only model (MiniLM text encoder, RIVRL video tower) in a second process, "
          "and the full model ==", flush=True)
    text_only = os.path.join(args.out, "text_only")
    background = _start_background([*train, "--quiet", "--out", text_only], text_only + ".log")
    print(f"text-only model: training in the background; its log: {text_only}.log", flush=True)
    try:
        full = os.path.join(args.out, "full")
        if code := main([*train, "--out", full, "--anchors", anchors]):
            return code
        clock.lap("full model")
        waited = time.perf_counter()
        code = background.wait()
    finally:
        if background.poll() is None:  # an error or ^C above: do not leave an orphan training
            background.kill()
            background.wait()
    print(f"\ntext-only model (waited {time.perf_counter() - waited:.0f} s for it); the end of its log:")
    print(_tail(text_only + ".log", 3))
    if code:
        raise CLIError(f"training the text-only model failed (exit {code}); see {text_only}.log")
    clock.lap("text-only model (wait)")

    print("\n== 4. test metrics ==", flush=True)
    rows = _demo_metrics(args.out, root, collection, [("text-only", text_only, None), ("full", full, anchors)])
    print(rows)
    clock.lap("metrics")

    print("\n== 5. index the test split, then search with the full model ==", flush=True)
    gallery = os.path.join(args.out, "gallery_full")
    if code := main(["index", "--checkpoint", full, *common, "--split", "test", "--out", gallery, "--quiet"]):
        return code
    test_captions = _collection(root, collection).captions("test")
    examples = [caption for _, caption in test_captions[:: max(1, len(test_captions) // 3)]][:3]
    k = str(min(5, len(_collection(root, collection).split_video_ids("test"))))
    code = main(["search", "--gallery", gallery, "--checkpoint", full, "-k", k,
                 "--anchor-cache", os.path.join(args.out, "anchor_cache"), *examples])
    clock.lap("index + search")
    print("\n" + clock.summary(), flush=True)
    return code


class _StageClock:
    """Wall time per demo stage, printed at the end so a user sees where the minutes go."""

    def __init__(self):
        import time

        self._now = time.perf_counter
        self.start = self.last = self._now()
        self.stages = []

    def lap(self, name: str) -> None:
        now = self._now()
        self.stages.append((name, now - self.last))
        self.last = now

    def summary(self) -> str:
        parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.stages)
        return f"demo wall time: {self._now() - self.start:.0f} s ({parts})"


def _start_background(argv: list, log_path: str):
    """`cvr <argv>` in a child process (its own interpreter and one torch thread), output to a log."""
    import subprocess

    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.Popen([sys.executable, "-m", "engine.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _tail(path: str, lines: int) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return "".join(handle.readlines()[-lines:]).rstrip()


def _collection(root: str, name: str):
    from engine.datasets import Collection

    return Collection(root, name)


def _demo_data(args) -> tuple:
    from training.synthetic import SynthConfig, write_collection

    config = SynthConfig(videos=args.videos, seed=args.seed)
    root = os.path.join(args.out, "data")
    collection_dir = os.path.join(root, config.collection)
    if _same_synth_config(collection_dir, config):
        print(f"reusing {collection_dir} (same configuration)")
        summary = _collection(root, config.collection).summary(config.feature)
    else:
        summary = write_collection(root, config, progress=not args.quiet)
    print(format_summary(summary, collection_dir))
    return root, config.collection


def _demo_metrics(out: str, root: str, collection: str, models: list) -> str:
    """One Markdown table, a row per model, with the chance level of the split."""
    from training.retrieval import evaluate_checkpoint

    lines = ["| model | t2v R@1 | R@5 | R@10 | MedR | mAP | v2t R@1 | R@5 | R@10 | SumR |", "|---" * 10 + "|"]
    for name, checkpoint, anchors in models:
        result = evaluate_checkpoint(checkpoint, root, collection, "test", anchors=anchors,
                                     out=os.path.join(out, f"{os.path.basename(checkpoint)}_test"))
        m = result["metrics"]
        lines.append(f"| {name} | {m['t2v_r1']:.1f} | {m['t2v_r5']:.1f} | {m['t2v_r10']:.1f} | {m['t2v_medr']:.1f} "
                     f"| {m['t2v_map']:.3f} | {m['v2t_r1']:.1f} | {m['v2t_r5']:.1f} | {m['v2t_r10']:.1f} "
                     f"| {m['sumr']:.1f} |")
    chance = 100.0 / result["videos"]
    lines.append(f"| chance | {chance:.1f} | {min(100, 5 * chance):.1f} | {min(100, 10 * chance):.1f} | | | | | | |")
    header = f"built-in test split: {result['queries']} queries, {result['videos']} videos"
    return header + "\n" + "\n".join(lines)


def _same_synth_config(collection_dir: str, config) -> bool:
    from dataclasses import asdict

    path = os.path.join(collection_dir, "synth_config.json")
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as handle:
        stored = json.load(handle)
    return stored == json.loads(json.dumps(asdict(config)))
