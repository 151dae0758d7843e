"""`cvr export`: a checkpoint to ONNX graphs (ONNX Runtime) or TensorRT engines (export/).
Nothing heavy is imported until the command runs, so `cvr --help` stays fast.
"""
from __future__ import annotations

import argparse
import os

from engine.cli.common import CLIError, add_overwrite, require


def _profile(text: str) -> tuple:
    """'MIN,OPT,MAX' -> (min, opt, max)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX integers, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX (three integers), got {text!r}")
    return values


def add(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="export a checkpoint to ONNX (ONNX Runtime) or to TensorRT engines")
    p.add_argument("--checkpoint", default=None, help="the checkpoint to export (or --rerank)")
    p.add_argument("--rerank", default=None, metavar="RERANKER",
                   help="export a reranker's denoiser step instead (into RERANKER/onnx, checked in ONNX Runtime)")
    p.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx")
    p.add_argument("--out", default=None,
                   help="export folder (default: CHECKPOINT/onnx, the cache `cvr search --backend onnxruntime` uses)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default=None,
                   help="onnx: fp32, plus fp16 variants with fp16; tensorrt: the engines' precision (default fp16)")
    p.add_argument("--generator", default=None, help="generator folder (default: the one the checkpoint records)")
    p.add_argument("--vision-weights", default=None, help="ResNet-50 weights, as for `cvr anchors` (default: built-in)")
    p.add_argument("--modules", default=None,
                   help="comma-separated subset of text_encoder, generator_step, vision, query_tower, video_tower, "
                        "scorer (default: all)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    for axis, default in (("batch", "1,32,256"), ("tokens", None), ("frames", "1,16,64"), ("videos", "1,1024,4096")):
        p.add_argument(f"--{axis}", type=_profile, default=None,
                       help=f"MIN,OPT,MAX of the {axis} axis (TensorRT profile; default "
                            f"{default or 'from the text encoders max_length'})")
    p.add_argument("--module-cache", default=None,
                   help="folder of graphs shared between exports (frozen text encoder, ResNet, generator step)")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace (default 4)")
    p.add_argument("--force", action="store_true", help="export again even when the cached files match")
    add_overwrite(p, "--out")
    p.add_argument("--threads", type=int, default=1, help="torch threads while exporting (default 1)")
    p.add_argument("--quiet", action="store_true", help="only the final line")
    p.set_defaults(func=_cmd_export)
    return p


def _shapes(args):
    from export.spec import ExportShapes

    defaults = ExportShapes()
    return ExportShapes(batch=args.batch or defaults.batch, tokens=args.tokens, frames=args.frames or defaults.frames,
                        videos=args.videos or defaults.videos)


def _cmd_export(args) -> int:
    if args.format == "tensorrt":  # say so at once, before any slow work
        from engine.backends.tensorrt import tensorrt_unavailable

        reason = tensorrt_unavailable()
        if reason:
            raise CLIError(reason)
    require("export", "onnx", "onnxscript")
    import torch

    if args.rerank:
        return _export_reranker(args)
    if not args.checkpoint:
        raise CLIError("give --checkpoint CKPT (or --rerank RERANKER)")
    from export.onnx import DEFAULT_OPSET, ExportOptions, export_onnx

    if args.threads < 1:
        raise CLIError(f"--threads must be positive, got {args.threads}")
    torch.set_num_threads(args.threads)
    out = args.out or os.path.join(args.checkpoint, "onnx")
    common = dict(generator=args.generator, vision_weights=args.vision_weights, shapes=_shapes(args),
                  opset=args.opset or DEFAULT_OPSET, module_cache=args.module_cache, force=args.force,
                  overwrite=args.overwrite,
                  modules=tuple(m.strip() for m in args.modules.split(",")) if args.modules else None,
                  log=None if args.quiet else print)
    if args.format == "tensorrt":
        from export.tensorrt import TensorRTOptions, export_tensorrt

        result = export_tensorrt(args.checkpoint, out, TensorRTOptions(precision=args.precision or "fp16",
                                                                       workspace_gb=args.workspace_gb, **common))
    else:
        precisions = ("fp32", "fp16") if args.precision == "fp16" else ("fp32",)
        result = export_onnx(args.checkpoint, out, ExportOptions(precisions=precisions, **common))
    if args.quiet:
        print(f"{'reused' if result.reused else 'wrote'} {result.folder}")
    return 0


def _export_reranker(args) -> int:
    import torch

    from export.graphs.rerank import export_reranker

    if args.format != "onnx":
        raise CLIError("--rerank exports to ONNX only (the onnxruntime backend runs it; TensorRT does not)")
    if args.checkpoint or args.out:
        raise CLIError("--rerank writes RERANKER/onnx: drop --checkpoint and --out")
    torch.set_num_threads(max(1, args.threads))
    result = export_reranker(args.rerank, opset=args.opset, force=args.force, log=None if args.quiet else print)
    if args.quiet:
        print(f"{'reused' if result.reused else 'wrote'} {result.folder}")
    return 0
