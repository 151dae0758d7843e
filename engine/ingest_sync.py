"""A gallery kept in step with its files: paths classified, attached, released; decoded batches committed; pruning."""
from __future__ import annotations

import os
import stat
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from engine import files
from engine.ingest_options import IngestError, IngestReport
from engine.video_embed import decoded, embed, frame_features
from engine.video_files import Skipped, video_id_of


@dataclass
class _Pending:
    """A file to decode: its content is new to the gallery."""
    path: str
    rel: str
    stat: os.stat_result
    sha256: str
    status: str  # new or changed
    also: list = field(default_factory=list)  # (rel, stat, status) of other paths with the same content


def classify(found: list, root: str, writer, report: IngestReport, skipped: list) -> list:
    """Compare each file with what the gallery recorded: unchanged files cost a stat; a file whose
    size or mtime moved is hashed; known content at a new path is attached, not decoded."""
    known = writer.manifest["media"]["paths"]
    content = {e["sha256"]: e["id"] for e in known.values() if e["id"] in writer.where}
    pending, released = {}, set()
    for path in found:
        rel = os.path.relpath(path, root)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            skipped.append(Skipped(path, "outside-root", f"not under the media root {root} (see --media-root)"))
            continue
        try:
            status = os.stat(path)
            if not stat.S_ISREG(status.st_mode):  # a FIFO or a device would block the hash forever
                skipped.append(Skipped(path, "not-a-video", "not a regular file"))
                continue
            entry = known.get(rel)
            if entry and entry["size"] == status.st_size and entry["mtime_ns"] == status.st_mtime_ns:
                report.counts["unchanged"] += 1
                continue
            digest = files.sha256_file(path)
        except FileNotFoundError:
            skipped.append(Skipped(path, "missing", "no such file (moved or deleted during the run?)"))
            continue
        except OSError as error:
            skipped.append(Skipped(path, "unreadable", error.strerror or type(error).__name__))
            continue
        if entry and entry["sha256"] == digest:  # touched, not changed
            entry.update(size=status.st_size, mtime_ns=status.st_mtime_ns)
            report.counts["unchanged"] += 1
            continue
        kind = "changed" if entry else "new"
        if digest in content:
            released |= _attach(writer, rel, status, digest, content[digest], report, kind)
        elif digest in pending:
            pending[digest].also.append((rel, status, kind))
        else:
            pending[digest] = _Pending(path, rel, status, digest, kind)
    for video_id in released:  # after every path is classified: two files that swapped names keep both
        _release(writer, video_id)
    return list(pending.values())


def _attach(writer, rel: str, status, digest: str, video_id: str, report: IngestReport, kind: str) -> set:
    """Record `rel` as a path of the indexed video `video_id`; returns the video the path let go
    of (to be dropped if no path refers to it once every file is classified)."""
    known = writer.manifest["media"]["paths"]
    old = known.get(rel)
    known[rel] = {"id": video_id, "size": status.st_size, "mtime_ns": status.st_mtime_ns, "sha256": digest}
    report.counts[kind] += 1
    return {old["id"]} if old and old["id"] != video_id else set()


def _release(writer, video_id: str, forget: bool = False) -> bool:
    """Drop a video no path refers to any more (with `forget`, its metadata too); True if dropped."""
    if any(e["id"] == video_id for e in writer.manifest["media"]["paths"].values()):
        return False
    writer.drop([video_id])
    if forget:
        writer.manifest.get("fields", {}).pop(video_id, None)
    return True


def report_skip(report: IngestReport, item: Skipped) -> None:
    report.skipped.append(item)
    report.counts["skipped"] += 1
    print(f"cvr index: skipped {item.path}: {item.reason}", file=sys.stderr, flush=True)


def index_pending(pending: list, writer, model, extractor, job, sampling, window, options, report) -> None:
    max_frames = int(job.get("max_frames", 64))
    stream = decoded([p.path for p in pending], sampling, extractor.config.image_size, options.workers)
    run_stream(pending, stream, lambda batch: _commit_batch(batch, writer, model, extractor, max_frames, window,
                                                            report), writer, options, report)


def run_stream(pending: list, stream, commit, writer, options, report) -> None:
    """Consume `stream` ((path, payload, problem or None, decode seconds) per pending file, in any
    order): skip the files that failed, and `commit` the others in batches of
    options.batch_videos [(_Pending, payload)]; stops after a batch when options.should_stop says so."""
    from tqdm import tqdm

    batch: list = []
    bar = tqdm(total=len(pending), desc="index videos", unit="video", disable=not options.progress,
               file=sys.stderr)
    by_path = {p.path: p for p in pending}
    try:
        for done, (path, payload, problem, seconds) in enumerate(stream, start=1):
            report.times.decode += seconds
            bar.update(1)
            if options.on_progress:
                options.on_progress(done, len(pending))
            item = by_path[path]
            if problem is not None:
                skip_pending(writer, item, problem, report)
                continue
            batch.append((item, payload))
            if len(batch) >= options.batch_videos:
                commit(batch)
                batch = []
                if options.should_stop and options.should_stop():
                    report.stopped = True
                    return
        if batch:
            commit(batch)
    finally:
        bar.close()


def skip_pending(writer, item: _Pending, problem: tuple, report: IngestReport) -> None:
    """A file that cannot be indexed; a changed file's old content is no longer its content."""
    kind, reason = problem
    for rel in [item.rel] + [rel for rel, _, _ in item.also]:
        old = writer.manifest["media"]["paths"].pop(rel, None)
        if old and _release(writer, old["id"], forget=True):
            report.warnings.append((item.path, f"its earlier version (video {old['id']}) was dropped"))
    report_skip(report, Skipped(item.path, kind, reason))
    for rel, _, _ in item.also:  # the same bytes at other paths: just as unreadable
        report_skip(report, Skipped(rel, kind, reason))


def _commit_batch(batch: list, writer, model, extractor, max_frames, window, report) -> None:
    """Embed a batch of decoded videos and commit it as one part."""
    videos = [video for _, video in batch]
    features = frame_features(extractor, videos, report.times)
    commit_embedded(batch, embed(model, features, videos, window, max_frames, report.times), writer, window, report)


def commit_embedded(batch: list, embedded: tuple, writer, window, report) -> None:
    """Commit a batch [(_Pending, DecodedVideo)] as one part, given its embeddings (engine.
    video_embed.embed's tuple; the frames of the videos are no longer needed). Distributed
    indexing (engine/cluster/ray_ingest.py) embeds elsewhere and commits here too."""
    lat, con, seg_lat, seg_row, seg_span = embedded
    if not (np.isfinite(lat).all() and np.isfinite(con).all()):
        raise IngestError("the video tower produced NaN or infinite embeddings: the checkpoint holds damaged weights")
    clock = time.perf_counter()
    ids, records = [], []
    known = writer.manifest["media"]["paths"]
    for item, video in batch:
        rels = [(item.rel, item.stat, item.status)] + item.also
        for rel, _, _ in rels:  # a changed path lets go of its old content first: its id is free again
            old = known.pop(rel, None)
            if old:
                _release(writer, old["id"])
        video_id = _free_id(video_id_of(item.rel), writer, ids)
        ids.append(video_id)
        for rel, status, kind in rels:
            known[rel] = {"id": video_id, "size": status.st_size, "mtime_ns": status.st_mtime_ns,
                          "sha256": item.sha256}
            report.counts[kind] += 1
        records.append({"id": video_id, "sha256": item.sha256, "size": item.stat.st_size,
                        "duration": round(video.duration, 3), "fps": round(video.fps, 3), "width": video.width,
                        "height": video.height, "codec": video.codec, "frames": len(video.timestamps),
                        "timestamps": [round(t, 3) for t in video.timestamps], "warnings": list(video.warnings)})
        for warning in video.warnings:
            report.warnings.append((item.path, warning))
            print(f"cvr index: warning: {item.path}: {warning}", file=sys.stderr, flush=True)
    segments = (seg_lat, seg_row, seg_span) if window is not None else None
    writer.add_part(ids, lat, con, segments, records, [v.thumbnail for _, v in batch])
    files.fault_point("after-part")  # the part is written, the manifest does not list it yet
    writer.commit()
    files.fault_point("after-batch")
    report.times.write += time.perf_counter() - clock
    report.times.videos += len(batch)


def _free_id(preferred: str, writer, taken_now: list) -> str:
    """`preferred`, or `preferred~2`, `~3`, ... where another video already has it."""
    candidate, n = preferred, 1
    while candidate in writer.where or candidate in taken_now:
        n += 1
        candidate = f"{preferred}~{n}"
    return candidate


def prune_missing(writer, root: str, report: IngestReport) -> None:
    """Drop the paths whose file is gone, and the videos left with no path."""
    known = writer.manifest["media"]["paths"]
    gone = [rel for rel in known if not os.path.exists(os.path.join(root, rel))]
    for rel in gone:
        _release(writer, known.pop(rel)["id"], forget=True)
        report.counts["removed"] += 1


def attach_metadata(writer, metadata: dict, path: str, root: str, report: IngestReport) -> None:
    """Merge the metadata file's fields into the gallery's, keyed by video id or by path (relative
    to the media root, or absolute); a key matching no video is a warning in the report."""
    known = writer.manifest["media"]["paths"]
    fields = writer.manifest.setdefault("fields", {})
    for key, values in metadata.items():
        rel = os.path.relpath(key, root) if os.path.isabs(key) else key
        video_id = key if key in writer.where else known.get(rel, {}).get("id")
        if video_id is None or video_id not in writer.where:
            report.warnings.append((path, f"metadata for {key!r}, which is no video of the gallery"))
            continue
        fields.setdefault(video_id, {}).update(values)
