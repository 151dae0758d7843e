"""`cvr vision train` and `cvr vision probe`: the built-in ResNet-50 extractor."""
from __future__ import annotations

from engine.cli.common import add_overwrite, require
from engine.outputs import claim


def add(sub) -> None:
    vision = sub.add_parser("vision", help="the ResNet-50 extractor: train the built-in one, probe features")
    vision_sub = vision.add_subparsers(dest="vision_command", required=True)

    train = vision_sub.add_parser("train", help="train the built-in extractor's BatchNorm layers")
    train.add_argument("--out", required=True, help="output .safetensors file")
    train.add_argument("--clips", type=int, default=600)
    train.add_argument("--epochs", type=int, default=4)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--trained-stages", type=int, default=3,
                       help="train the stem and stages below this (0: BatchNorm only; 5: everything)")
    train.add_argument("--seed", type=int, default=0, help="seed of the random convolutions")
    train.add_argument("--threads", type=int, default=1)
    add_overwrite(train, "--out")
    train.set_defaults(func=_cmd_vision_train)

    probe = vision_sub.add_parser("probe", help="linear probe: do the features tell colour, shape, motion?")
    probe.add_argument("--vision-weights", default=None, help="as for `cvr data synth` (default: built-in)")
    probe.add_argument("--clips", type=int, default=240)
    probe.add_argument("--size", type=int, default=64)
    probe.add_argument("--json", default=None, help="also write the result to this JSON file")
    probe.set_defaults(func=_cmd_vision_probe)


def _cmd_vision_train(args) -> int:
    from training.vision import ExtractorTrainConfig, train_extractor

    claim(args.out, "vision weights", "cvr vision train", args.overwrite)
    config = ExtractorTrainConfig(clips=args.clips, epochs=args.epochs, lr=args.lr, seed=args.seed,
                                  threads=args.threads, trained_stages=args.trained_stages)
    log = train_extractor(config, args.out)
    for row in log["log"]:
        print(f"epoch {row['epoch']}: loss {row['loss']:.4f} ({row['seconds']} s)")
    print(f"wrote {args.out}")
    return 0


def _cmd_vision_probe(args) -> int:
    require("train", "sklearn")
    import torch

    from engine.vision import RegionExtractor, VisionConfig
    from training.vision import probe_features

    torch.set_num_threads(1)
    extractor = RegionExtractor.from_config(VisionConfig(image_size=args.size, weights=args.vision_weights))
    result = probe_features(extractor, n_clips=args.clips, size=args.size)
    print(result.table())
    if args.json:
        from dataclasses import asdict

        from engine import files

        files.write_json(args.json, asdict(result))
    return 0
