"""`cvr index`: embed video files (engine/ingest.py) or a collection's frame features
(engine/indexing.py) into a gallery folder."""
from __future__ import annotations

import argparse
import os
import sys

from engine.cli.common import CLIError, add_overwrite, positive
from engine.errors import CVRError
from engine.gallery_faiss import FAISS_SHORTHANDS
from engine.gallery_format import DTYPES


def add(sub) -> None:
    index = sub.add_parser("index", help="embed video files, or a collection's frame features, into a gallery folder")
    index.add_argument("--checkpoint", required=True, help="checkpoint folder whose video tower embeds the videos")
    videos = index.add_argument_group("video files (keeps the gallery in step with them: re-runs add new files, "
                                      "re-index changed ones, leave the rest)")
    videos.add_argument("--videos", nargs="+", default=None, metavar="PATH",
                        help="video files, folders (walked recursively) or glob patterns")
    videos.add_argument("--list", default=None, metavar="FILE", help="a file naming one video path per line")
    videos.add_argument("--media-root", default=None,
                        help="folder the recorded paths are relative to (default: the folder given, or the one "
                             "holding every file; pass it again when the videos moved)")
    add_sampling(videos)
    videos.add_argument("--segments", default=None, metavar="WINDOW:STRIDE",
                        help="embed overlapping segments of WINDOW seconds every STRIDE seconds, to answer with the "
                             "matching moment, or none (default 4:2; a re-run keeps the gallery's)")
    videos.add_argument("--metadata", default=None, metavar="FILE",
                        help="JSON lines or CSV of fields keyed by video id or path (tags, dates, numbers, text), "
                             "for `cvr search --where`")
    videos.add_argument("--prune", action="store_true", help="drop the videos whose files are gone")
    videos.add_argument("--workers", type=int, default=1,
                        help="decoding processes beside the feature extraction (default 1; 0 decodes inline)")
    videos.add_argument("--device", default="cpu", help="device of the ResNet-50 and the video tower")
    videos.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="decode and embed as a Ray Data job (GPU actors where the cluster has GPUs): a local "
                             "Ray (no ADDRESS), 'auto' (the cluster of `ray start`) or a cluster address")
    videos.add_argument("--shards", type=positive("--shards"), default=None, metavar="N",
                        help="then split the gallery into N shards (`cvr gallery shard`) at --shards-out")
    videos.add_argument("--shards-out", default=None, metavar="DIR", help="the shard set folder (default OUT-shards)")
    videos.add_argument("--vision-weights", default=None,
                        help="where the ResNet-50 the checkpoint recorded is now (checked by its digest)")
    features = index.add_argument_group("frame features of a collection (MSR-VTT layout)")
    features.add_argument("--root", default=None, help="data root holding the collection")
    features.add_argument("--collection", default=None)
    index.add_argument("--split", default=None, choices=["train", "val", "test"],
                       help="only this split's videos (default: every video of the feature folder)")
    index.add_argument("--out", required=True, help="gallery folder to write (replaced atomically)")
    index.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                       help="stored precision (default: float16; when appending, the gallery's)")
    index.add_argument("--append", action="store_true",
                       help="add these videos to the existing gallery at --out (same checkpoint, no duplicate ids)")
    index.add_argument("--faiss", default=None, metavar="FACTORY",
                       help=f"first-stage index over the global latent vectors: {', '.join(FAISS_SHORTHANDS)} "
                            "(ivf = IVF<sqrt N>,SQfp16), any faiss index_factory string (e.g. IVF1024,SQfp16), or "
                            "none (default: none; when appending, the gallery's)")
    index.add_argument("--feature", default=None, help="frame feature folder (default: the checkpoint's)")
    index.add_argument("--batch-size", type=int, default=None,
                       help="videos per batch (default 256 for features; 16 per committed part for video files)")
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite(index, "--out")
    index.set_defaults(func=handler)


def add_sampling(group) -> None:
    """--fps / --frames / --max-frames: which frames of a video file are read."""
    group.add_argument("--fps", type=_positive_float, default=None,
                       help="frames read per second of video (default 1, as the MSR-VTT features)")
    group.add_argument("--frames", type=positive("--frames"), default=None,
                       help="or this many frames spread uniformly over each video")
    group.add_argument("--max-frames", type=positive("--max-frames"), default=None,
                       help="at most this many frames per video, spread uniformly (default 64)")


def sampling_of(args):
    """The Sampling the flags ask for, or None where none was given (a re-run keeps the gallery's)."""
    from engine.video_sampling import Sampling

    if args.fps is None and args.frames is None and args.max_frames is None:
        return None
    if args.fps is not None and args.frames is not None:
        raise CLIError("give --fps or --frames, not both")
    sampling = Sampling(fps=None if args.frames else (args.fps or 1.0), frames=args.frames,
                        max_frames=args.max_frames or 64)
    sampling.validate()
    return sampling


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def handler(args) -> int:
    """Build (or extend) a gallery and print one summary line."""
    if args.videos or args.list:
        if args.root or args.collection or args.split or args.append or args.feature:
            raise CLIError("--videos indexes video files; --root/--collection/--split/--feature/--append are for "
                           "frame features: give one or the other")
        return _videos(args)
    if not (args.root and args.collection):
        raise CLIError("give --videos PATH... (video files) or --root and --collection (frame features)")
    from engine.indexing import build_gallery

    manifest = build_gallery(args.checkpoint, args.root, args.collection, split=args.split, out=args.out,
                             feature=args.feature, dtype=args.dtype, batch_size=args.batch_size or 256,
                             append=args.append, progress=not args.quiet, faiss=args.faiss,
                             overwrite=args.overwrite)
    index = manifest["faiss"]
    described = "no FAISS index" if not index else f"FAISS {index['factory']}" + "".join(
        f", {k} {index[k]}" for k in ("nprobe", "efSearch") if k in index)
    print(f"wrote {args.out}: {manifest['count']} videos, D={manifest['dims']['latent']}, "
          f"K={manifest['dims']['concept']}, {manifest['dtype']}, {described}")
    return 0


def _videos(args) -> int:
    from engine.cli.common import set_threads
    from engine.ingest import IngestOptions, index_videos

    options = IngestOptions(sampling=sampling_of(args), segments=args.segments, media_root=args.media_root,
                            metadata=args.metadata, prune=args.prune, faiss=args.faiss, dtype=args.dtype,
                            device=args.device, workers=args.workers, batch_videos=args.batch_size or 16,
                            vision_weights=args.vision_weights, list_file=args.list, progress=not args.quiet,
                            overwrite=args.overwrite, ray=args.ray)
    if args.workers < 0:
        raise CLIError(f"--workers must be >= 0, got {args.workers}")
    if args.shards_out and not args.shards:
        raise CLIError("--shards-out needs --shards N")
    shards_out = (args.shards_out or args.out.rstrip("/") + "-shards") if args.shards else None
    if shards_out:
        out, there = os.path.abspath(args.out), os.path.abspath(shards_out)
        if there == out or there.startswith(out + os.sep) or out.startswith(there + os.sep):
            raise CLIError(f"--shards-out {shards_out}: must not be the gallery {args.out}, inside it or hold it")
    if args.ray is not None:
        from engine.cli.common import require

        require("cluster", "ray")
    set_threads(1)
    report = index_videos(args.checkpoint, args.videos or [], args.out, options)
    times = report.times
    if times.videos:
        per = times.per_video()
        print(f"indexed {times.videos} videos in {times.wall:.1f} s ({times.videos / max(times.wall, 1e-9):.1f} "
              f"videos/s; per video: decode {1000 * per['decode']:.0f} ms, ResNet-50 {1000 * per['resnet']:.0f} ms, "
              f"video tower {1000 * per['tower']:.0f} ms, writing {1000 * per['write']:.0f} ms)")
    if report.skipped:
        print(f"{len(report.skipped)} file(s) skipped, each with its reason above and in "
              f"{args.out}/index_report.json")
    if report.videos == 0:
        print(f"cvr index: nothing could be indexed{'' if os.path.isdir(args.out) else ': no gallery written'}",
              file=sys.stderr)
    else:
        print(f"{args.out}: {report.videos} videos")
    print(report.summary())  # N new, N changed, N unchanged, N removed, N skipped
    if shards_out and report.videos:
        from engine.cluster.shardset import shard_gallery

        # The gallery is committed whatever happens here: a refusal says so.
        try:
            top = shard_gallery(args.out, args.shards, shards_out, progress=not args.quiet)
        except CVRError as error:
            raise CLIError(f"{args.out} is indexed, but not split: {error}") from None
        print(f"{shards_out}: {top['count']} videos in {len(top['shards'])} shards")
    elif shards_out:
        print(f"cvr index: no videos, so no shard set at {shards_out}", file=sys.stderr)
    return report.exit_code
