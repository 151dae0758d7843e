"""`cvr doctor PATH` (engine/doctor.py), `cvr gallery info G`, `cvr gallery rm G ID...` and
`cvr gallery shard G --shards N --out DIR` (engine/cluster/shardset.py)."""
from __future__ import annotations

import json
import os

from engine.cli.common import CLIError, positive

EXIT_PROBLEMS = 2  # a folder with problems is refused, like any bad input


def add(sub) -> None:
    doctor = sub.add_parser("doctor", help="verify a gallery, checkpoint, anchor store or export folder in full")
    doctor.add_argument("path", help="the folder to verify")
    doctor.add_argument("--clean", action="store_true",
                        help="first remove what killed writers left beside it (and put back a folder moved aside)")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.set_defaults(func=_cmd_doctor)

    gallery = sub.add_parser("gallery", help="inspect a gallery folder")
    gallery_sub = gallery.add_subparsers(dest="gallery_command", required=True)
    info = gallery_sub.add_parser("info", help="a gallery's format, model, sizes and sources")
    info.add_argument("gallery")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=_cmd_gallery_info)
    remove = gallery_sub.add_parser("rm", help="delete videos from a gallery by id (atomic; the files stay)")
    remove.add_argument("gallery")
    remove.add_argument("ids", nargs="+", metavar="ID")
    remove.set_defaults(func=_cmd_gallery_rm)
    shard = gallery_sub.add_parser("shard", help="split a gallery into N shards that load on different machines "
                                                 "(each with its own FAISS index; one top manifest)")
    shard.add_argument("gallery")
    shard.add_argument("--shards", type=positive("--shards"), required=True)
    shard.add_argument("--out", required=True, help="the shard set folder to write (replaced atomically)")
    shard.add_argument("--overwrite", action="store_true", help="replace whatever --out holds")
    shard.add_argument("--quiet", action="store_true")
    shard.set_defaults(func=_cmd_gallery_shard)


def _cmd_doctor(args) -> int:
    from engine.doctor import diagnose

    report = diagnose(args.path, clean=args.clean)
    if args.json:
        print(json.dumps({"path": report.path, "kind": report.kind, "healthy": report.healthy,
                          "passed": report.passed, "problems": report.problems, "notes": report.notes}, indent=1))
    else:
        print(f"{report.path}: {report.kind or 'unknown'}")
        for line in report.passed:
            print(f"  ok       {line}")
        for line in report.notes:
            print(f"  note     {line}")
        for line in report.problems:
            print(f"  PROBLEM  {line}")
    if report.healthy:
        return 0
    raise CLIError(f"{report.path}: {len(report.problems)} problem(s); the first: {report.problems[0]}")


def _cmd_gallery_info(args) -> int:
    from engine.gallery_format import read_manifest
    from engine.integrity import is_sealed

    manifest = read_manifest(args.gallery)
    folder = os.path.abspath(args.gallery)
    disk = sum(os.path.getsize(os.path.join(folder, name)) for name in manifest["files"])
    info = {"gallery": folder, "format": f"{manifest['format']} v{manifest['version']}",
            "sealed": is_sealed(manifest), "checkpoint": manifest["checkpoint"], "videos": manifest["count"],
            "dims": manifest["dims"], "dtype": manifest["dtype"], "faiss": manifest.get("faiss"),
            "bytes_on_disk": disk, "created": manifest.get("created"), "sources": manifest.get("sources", []),
            "parts": len(manifest["parts"]), "media": _media_info(folder, manifest)}
    if args.json:
        print(json.dumps(info, indent=1, sort_keys=True))
        return 0
    index = info["faiss"]
    legacy = "" if info["sealed"] else " (no digest of itself: written before digests were recorded)"
    checkpoint = info["checkpoint"]
    rows = [("format", info["format"] + legacy),
            ("model", f"checkpoint {checkpoint['id'][:12]} ({checkpoint.get('path') or 'path unknown'})"),
            ("videos", str(info["videos"])),
            ("dims", f"latent D={info['dims']['latent']}, concept K={info['dims']['concept']}, {info['dtype']}"),
            ("FAISS index", index["factory"] if index else "none (exhaustive search only)"),
            ("on disk", f"{disk / 1e6:.1f} MB"), ("created", str(info["created"]))]
    rows += [(f"source {i + 1}", f"{s.get('collection')} {s.get('split') or 'all'} ({s.get('count')} videos, "
              f"feature {s.get('feature')}, root {s.get('root')})") for i, s in enumerate(info["sources"])
             if "collection" in s]
    rows.append(("parts", str(info["parts"])))
    media = info["media"]
    if media:
        segments = media["segments"]
        rows += [("media root", f"{media['root']} ({media['paths']} paths)"),
                 ("frame sampling", media["sampling"]), ("extractor", media["extractor"]),
                 ("segments", "none" if not segments else
                  f"{segments['window']:g} s every {segments['stride']:g} s: {media['segments_per_video']:.1f} "
                  f"per video, {media['segment_bytes_per_video']:.0f} bytes per video"),
                 ("metadata fields", ", ".join(media["fields"]) or "none")]
    print("| field | value |\n|---|---|")
    for field, value in rows:
        print(f"| {field} | {value} |")
    return 0


def _cmd_gallery_rm(args) -> int:
    from engine.ingest import remove_videos

    manifest = remove_videos(args.gallery, args.ids)
    print(f"{args.gallery}: removed {len(set(args.ids))} video(s), {manifest['count']} left")
    return 0


def _cmd_gallery_shard(args) -> int:
    from engine.cluster.shardset import shard_gallery

    top = shard_gallery(args.gallery, args.shards, args.out, args.overwrite, progress=not args.quiet)
    sizes = ", ".join(str(entry["count"]) for entry in top["shards"])
    print(f"{os.path.abspath(args.out)}: {top['count']} videos in {len(top['shards'])} shards ({sizes})")
    return 0


def _media_info(folder: str, manifest: dict) -> dict | None:
    """What a gallery of video files records: root, sampling, extractor, segments and their cost."""
    from engine.gallery_format import SEGMENTS
    from engine.video_sampling import Sampling
    from engine.vision import describe_extractor

    media = manifest.get("media")
    if not media:
        return None
    segment_files = [name for name in manifest["files"] if name.endswith("/" + SEGMENTS)]
    segment_bytes = sum(os.path.getsize(os.path.join(folder, name)) for name in segment_files)
    count = max(1, manifest["count"])
    segments = 0
    if segment_files:
        from safetensors import safe_open

        for name in segment_files:
            with safe_open(os.path.join(folder, name), framework="numpy") as handle:
                segments += handle.get_slice("row").get_shape()[0]
    fields = sorted({k for values in (manifest.get("fields") or {}).values() for k in values})
    return {"root": os.path.normpath(os.path.join(folder, media["root"])), "paths": len(media["paths"]),
            "sampling": Sampling.from_dict(manifest["sampling"]).describe(),
            "extractor": describe_extractor(manifest.get("extractor")), "segments": manifest.get("segments"),
            "segments_per_video": segments / count, "segment_bytes_per_video": segment_bytes / count,
            "fields": fields}
