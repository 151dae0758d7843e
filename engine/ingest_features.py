"""`cvr features`: the frame features of video files, written as a BigFile for training."""
from __future__ import annotations

import json
import sys

from engine.errors import CVRError
from engine.ingest_options import IngestError, IngestOptions, IngestReport
from engine.ingest_sync import report_skip
from engine.video_embed import decoded, frame_features
from engine.video_files import Skipped, feature_ids, find_videos
from engine.video_sampling import Sampling


def extract_features(inputs: list, folder: str, sampling: Sampling, vision, options: IngestOptions,
                     ids_file: str | None = None) -> IngestReport:
    """Write the frame features of video files as a BigFile at `folder` (feature.bin, shape.txt,
    id.txt, video2frames.txt, extractor.json), frame ids `<video id>_<n>`; bad files are skipped
    and reported. `vision`: the VisionConfig of the extractor."""
    from tqdm import tqdm

    from engine.bigfile import BigFileWriter
    from engine.formats import check_token
    from engine.vision import EXTRACTOR_FILE, RegionExtractor

    found, skipped = find_videos(inputs, options.list_file)
    report = IngestReport(gallery=folder)
    ids = feature_ids(found, ids_file)
    owners = {}
    for path in found:
        video_id = ids.get(path)
        problem = None
        if video_id is None:
            problem = f"no id for it in {ids_file}"
        elif video_id in owners:
            problem = f"video id {video_id!r} is also {owners[video_id]}'s: pass --ids FILE to name them apart"
        else:
            try:
                check_token(video_id, "video id")
            except CVRError as error:
                problem = f"{error}: pass --ids FILE to name it"
        if problem:
            skipped.append(Skipped(path, "bad-id", problem))
        else:
            owners[video_id] = path
    for item in skipped:
        report_skip(report, item)
    if not owners:
        raise IngestError("no video file to read features from" + (f" ({skipped[0].reason})" if skipped else ""))
    extractor = RegionExtractor.from_config(vision, options.device)
    record = extractor.record()
    written = 0
    with BigFileWriter(folder, extractor.feature_dim) as writer:
        bar = tqdm(total=len(owners), desc="features", unit="video", disable=not options.progress, file=sys.stderr)
        by_path = {path: video_id for video_id, path in owners.items()}
        for path, video, problem, seconds in decoded(list(by_path), sampling, vision.image_size, options.workers):
            report.times.decode += seconds
            bar.update(1)
            if problem is not None:
                report_skip(report, Skipped(path, *problem))
                continue
            rows = frame_features(extractor, [video], report.times)[0]
            video_id = by_path[path]
            writer.add_video(video_id, [f"{video_id}_{n}" for n in range(len(rows))], rows)
            written += 1
            report.counts["new"] += 1
        bar.close()
        if not written:
            raise IngestError("no video file could be decoded: no feature folder written")
        writer.add_file(EXTRACTOR_FILE, json.dumps(dict(record, sampling=sampling.to_dict()), indent=1,
                                                   sort_keys=True) + "\n")
    report.videos = written
    return report
