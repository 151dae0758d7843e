"""`cvr data synth` and `cvr data summary`: the built-in data set and collections in the MSR-VTT layout."""
from __future__ import annotations

import json
import os

from engine.cli.common import CLIError, add_overwrite
from engine.outputs import claim


def add(sub) -> None:
    data = sub.add_parser("data", help="the built-in data set and collections in the MSR-VTT layout")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    synth = data_sub.add_parser("synth", help="write the built-in synthetic video-caption collection")
    synth.add_argument("--root", required=True, help="folder that will hold the collection")
    synth.add_argument("--collection", default="synth", help="collection name (default: synth)")
    synth.add_argument("--videos", type=int, default=600, help="number of clips (default: 600)")
    synth.add_argument("--frames", type=int, default=8, help="frames per clip (default: 8)")
    synth.add_argument("--size", type=int, default=64, help="frame side in pixels (default: 64)")
    synth.add_argument("--captions", type=int, default=10, help="captions per clip (default: 10)")
    synth.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes")
    synth.add_argument("--vision-weights", default=None,
                       help="ResNet-50 weights: a local HF folder, a torchvision state dict, or 'random' "
                            "(default: the shipped built-in extractor)")
    synth.add_argument("--threads", type=int, default=1,
                       help="torch threads for feature extraction (default 1: on a small shared machine more "
                            "threads are slower and far noisier)")
    synth.add_argument("--mp4", action="store_true",
                       help="also write every clip as an H.264 mp4 file under ROOT/COLLECTION/videos/ plus "
                            "metadata.jsonl")
    synth.add_argument("--mp4-fps", type=float, default=1.0,
                       help="frame rate of the mp4 files (default 1.0: a clip's 8 frames play for 8 s)")
    kind = synth.add_mutually_exclusive_group()
    kind.add_argument("--transfer", action="store_true",
                      help="the transfer protocol's collection: no training or validation caption uses a held-out "
                           "word and no such clip shows a held-out (colour, shape) pair; the test split's captions "
                           "are read in two parts (TextData/transfer_split.json; training/transfer_data.py)")
    kind.add_argument("--corpus", action="store_true",
                      help="a still-image corpus instead of clips (--videos images, --captions each) whose captions "
                           "use every word, held-out ones included, for `cvr generator train`; no frame features")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite(synth, "ROOT/COLLECTION")
    synth.set_defaults(func=_cmd_data_synth)

    summary = data_sub.add_parser("summary", help="summarise a collection in the MSR-VTT layout")
    summary.add_argument("--root", required=True)
    summary.add_argument("--collection", required=True)
    summary.add_argument("--feature", default="resnet50", help="feature folder under FeatureData/")
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    summary.set_defaults(func=_cmd_data_summary)


def _cmd_data_synth(args) -> int:
    import torch

    from engine.vision import RegionExtractor, VisionConfig
    from training.synthetic import SynthConfig, check_mp4_fps, write_collection

    config = SynthConfig(videos=args.videos, frames=args.frames, size=args.size, seed=args.seed,
                         captions_per_video=args.captions, collection=args.collection)
    config.validate()
    mp4_fps = args.mp4_fps if args.mp4 else None
    if mp4_fps is not None:
        check_mp4_fps(mp4_fps)
    if args.corpus and (mp4_fps is not None or args.vision_weights):
        raise CLIError("--corpus writes still images without features: drop --mp4 and --vision-weights")
    claim(os.path.join(args.root, args.collection), "collection", "cvr data synth", args.overwrite)
    if args.corpus:
        from training.transfer_data import write_corpus

        written = write_corpus(args.root, config, progress=not args.quiet)
        print(f"corpus: {written['images']} images, {written['captions']} captions in {written['folder']}")
        return 0
    torch.set_num_threads(args.threads)
    vision = RegionExtractor.from_config(VisionConfig(image_size=args.size, weights=args.vision_weights))
    if args.transfer:
        from training.transfer_data import write_transfer_collection

        summary = write_transfer_collection(args.root, config, vision=vision, progress=not args.quiet,
                                            mp4_fps=mp4_fps)
    else:
        summary = write_collection(args.root, config, vision=vision, progress=not args.quiet, mp4_fps=mp4_fps)
    print(format_summary(summary, os.path.join(args.root, args.collection)))
    if mp4_fps is not None:
        print(f"mp4: {config.videos} clips at {mp4_fps:g} fps in "
              f"{os.path.join(args.root, args.collection, 'videos')} (with metadata.jsonl)")
    return 0


def _cmd_data_summary(args) -> int:
    from engine.datasets import Collection

    summary = Collection(args.root, args.collection).summary(args.feature)
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
    else:
        print(format_summary(summary, os.path.join(args.root, args.collection)))
    problems = summary["problems"]
    if problems:  # what train and index would refuse: said here too, with a non-zero exit
        raise CLIError(f"{len(problems)} problem(s) that `cvr train` and `cvr index` would refuse; the first: "
                       f"{problems[0]}")
    return 0


def format_summary(summary: dict, where: str) -> str:
    """A collection summary as a Markdown table: one row per field, one per split."""
    lines = [f"collection: {where}", "", "| field | value |", "|---|---|"]
    for key, value in summary.items():
        if key == "problems":
            lines += [f"| problem | {problem} |" for problem in value]
        elif key == "splits" and isinstance(value, dict):
            for split, counts in value.items():
                text = "missing" if counts is None else ", ".join(f"{v} {k}" for k, v in counts.items() if v)
                lines.append(f"| {split} split | {text} |")
        elif isinstance(value, dict):
            lines.append(f"| {key} | " + ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) + " |")
        else:
            lines.append(f"| {key} | {_fmt(value)} |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)
