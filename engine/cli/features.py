"""`cvr features`: frame features of video files in the BigFile layout that `cvr train` reads
(engine/ingest.py), made by the same extractor that `cvr index --videos` runs."""
from __future__ import annotations

import os

from engine.cli.common import CLIError, add_overwrite
from engine.cli.index import add_sampling, sampling_of
from engine.outputs import claim


def add(sub) -> None:
    features = sub.add_parser("features", help="frame features of video files, for training (BigFile layout)")
    features.add_argument("--videos", nargs="+", default=None, metavar="PATH",
                          help="video files, folders (walked recursively) or glob patterns")
    features.add_argument("--list", default=None, metavar="FILE", help="a file naming one video path per line")
    features.add_argument("--root", required=True, help="data root holding the collection")
    features.add_argument("--collection", required=True)
    features.add_argument("--feature", required=True, help="feature folder name, written to FeatureData/NAME")
    features.add_argument("--ids", default=None, metavar="CSV",
                          help="a CSV with columns path,id naming each video (default: the file name without "
                               "its extension)")
    add_sampling(features)
    features.add_argument("--vision-weights", default=None,
                          help="ResNet-50 weights: a local HF folder, a torchvision state dict, or 'random' "
                               "(default: the shipped built-in extractor)")
    features.add_argument("--image-size", type=int, default=64,
                          help="frames are resized to this square (default 64, the built-in extractor's; 224 for "
                               "an ImageNet ResNet-50)")
    features.add_argument("--workers", type=int, default=1, help="decoding processes (default 1; 0 inline)")
    features.add_argument("--device", default="cpu")
    features.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite(features, "the feature folder")
    features.set_defaults(func=handler)


def handler(args) -> int:
    from engine.cli.common import set_threads
    from engine.ingest_features import extract_features
    from engine.ingest_options import IngestOptions
    from engine.video_sampling import Sampling
    from engine.vision import VisionConfig

    if not (args.videos or args.list):
        raise CLIError("give --videos PATH... or --list FILE")
    if args.image_size < 16:
        raise CLIError(f"--image-size must be at least 16, got {args.image_size}")
    if args.workers < 0:
        raise CLIError(f"--workers must be >= 0, got {args.workers}")
    sampling = sampling_of(args) or Sampling()
    folder = os.path.join(args.root, args.collection, "FeatureData", args.feature)
    claim(folder, "feature folder", "cvr features", args.overwrite)
    set_threads(1)
    options = IngestOptions(device=args.device, workers=args.workers, list_file=args.list, progress=not args.quiet)
    vision = VisionConfig(image_size=args.image_size, weights=args.vision_weights)
    report = extract_features(args.videos or [], folder, sampling, vision, options, ids_file=args.ids)
    print(f"wrote {folder}: {report.videos} videos ({sampling.describe()}), "
          f"{report.counts['skipped']} skipped")
    return 3 if report.counts["skipped"] else 0
