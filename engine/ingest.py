"""Video files in: `cvr index --videos` keeps a gallery in step with a folder of videos, and
`cvr features` writes their frame features for training.

One run (files found and metadata read by engine/video_files.py, decoded and embedded by
engine/video_embed.py): find the files (folders walked recursively, globs, a list), compare each with what the
gallery recorded (path relative to the media root, size, mtime, content hash), decode the new and
changed ones in worker processes (engine/video.py) while this process runs the ResNet-50 and the
video tower over what they decoded, and commit every batch as an immutable part plus a new
manifest (engine/gallery.py): a kill loses at most the batch in flight, and the next run goes on
where it stopped. Bad files are skipped and reported, never fatal. The same content at two paths
is indexed once and keeps both paths.
"""
from __future__ import annotations

import json
import os
import stat
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from engine import files, locks, paths
from engine.errors import CVRError
from engine.video import Sampling
from engine.video_embed import SegmentWindow, StageTimes, decoded, embed, frame_features
from engine.video_files import (
    Skipped,
    feature_ids,
    find_videos,
    media_root_for,
    read_metadata,
    video_id_of,
)

DEFAULT_SEGMENTS = "4:2"
BATCH_VIDEOS = 16  # videos per committed part: what a kill can lose, and the tower's batch
REPORT = "index_report.json"
PARTS = "parts"


class IngestError(CVRError):
    """A run that cannot start or cannot index anything (one-line message, exit code 2)."""


# ---------------------------------------------------------------------------------------------
# One indexing run


@dataclass
class IngestOptions:
    """How `cvr index --videos` runs. None means: the gallery's own (a re-run keeps what it was
    indexed with), or the default for a new gallery."""

    sampling: Sampling | None = None
    segments: str | None = None  # WINDOW:STRIDE or none; default DEFAULT_SEGMENTS
    media_root: str | None = None
    metadata: str | None = None
    prune: bool = False
    faiss: str | None = None
    dtype: str | None = None
    device: str = "cpu"
    workers: int = 1
    batch_videos: int = BATCH_VIDEOS
    vision_weights: str | None = None
    list_file: str | None = None
    progress: bool = True
    overwrite: bool = False
    ray: str | None = None  # run decoding and embedding as a Ray Data job: "local", "auto" or an address
    should_stop: object = None  # a callable: True asks the run to stop after the batch in flight
    on_progress: object = None  # a callable (videos decoded, videos to decode)


@dataclass
class IngestReport:
    gallery: str
    counts: dict = field(default_factory=lambda: dict.fromkeys(("new", "changed", "unchanged", "removed",
                                                                  "skipped"), 0))
    skipped: list = field(default_factory=list)  # Skipped
    warnings: list = field(default_factory=list)  # (path, warning)
    times: StageTimes = field(default_factory=StageTimes)
    videos: int = 0  # live videos after the run
    stopped: bool = False  # asked to stop: what was committed stays, the rest waits for the next run

    def summary(self) -> str:
        return ", ".join(f"{n} {name}" for name, n in self.counts.items())

    @property
    def exit_code(self) -> int:
        """0: every file indexed or up to date; 3: some skipped; 2: nothing could be indexed."""
        if self.videos == 0:
            return 2
        return 3 if self.counts["skipped"] else 0

    def to_dict(self) -> dict:
        return {"format": "cvr-sdgm/index-report/1", "gallery": self.gallery, "counts": self.counts,
                "videos": self.videos, "exit_code": self.exit_code,
                "skipped": [vars(s) for s in self.skipped],
                "warnings": [{"path": p, "warning": w} for p, w in self.warnings],
                "seconds": {"wall": self.times.wall, "decode": self.times.decode, "resnet": self.times.resnet,
                            "tower": self.times.tower, "write": self.times.write},
                "indexed_videos": self.times.videos,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


@dataclass
class _Pending:
    """A file to decode: its content is new to the gallery."""
    path: str
    rel: str
    stat: os.stat_result
    sha256: str
    status: str  # new or changed
    also: list = field(default_factory=list)  # (rel, stat, status) of other paths with the same content


def index_videos(checkpoint: str, inputs: list, out: str, options: IngestOptions | None = None,
                 model=None) -> IngestReport:
    """Bring the gallery `out` in step with the video files `inputs` (see the module docstring)."""
    options = options or IngestOptions()
    out = os.path.abspath(out)
    found, skipped = find_videos(inputs, options.list_file)
    if not found and not options.prune:
        first = skipped[0].reason if skipped else "no video files"
        raise IngestError(f"no video files to index in {', '.join(map(str, inputs or [options.list_file]))} ({first})")
    with locks.lock(out):
        return _index_locked(checkpoint, found, skipped, inputs, out, options, model)


def _index_locked(checkpoint, found, skipped, inputs, out, options, model) -> IngestReport:
    from engine.outputs import claim
    from engine.parts import GalleryWriter

    clock = time.perf_counter()
    report = IngestReport(gallery=out)
    existing = os.path.isfile(os.path.join(out, "manifest.json"))
    claim(out, "gallery", "cvr index", options.overwrite)
    models = _Models(checkpoint, model, options)
    extractor, job = models.record, models.job
    writer = GalleryWriter.open(out) if existing else None
    if writer is not None:
        try:
            _check_same_run(writer.manifest, models.checkpoint_id, extractor, options, out)
        except IngestError:
            if not options.overwrite:
                raise
            writer = None  # --overwrite: a new gallery replaces this one at its first commit
        if writer is not None and options.faiss is not None:
            writer.manifest["faiss_spec"] = options.faiss
    if writer is None:
        writer = GalleryWriter.new(out, _new_manifest(checkpoint, out, models, options, found, inputs))
    media = writer.manifest["media"]
    root = os.path.abspath(options.media_root) if options.media_root else os.path.normpath(
        os.path.join(out, media["root"]))
    if options.media_root:
        media["root"] = paths.reference(root, out)
    sampling = Sampling.from_dict(writer.manifest["sampling"])
    window = SegmentWindow.parse("none" if writer.manifest["segments"] is None else
                                 f"{writer.manifest['segments']['window']}:{writer.manifest['segments']['stride']}")
    metadata = read_metadata(options.metadata) if options.metadata else None  # bad files refused up front
    spec = options.faiss if options.faiss is not None else writer.manifest.get("faiss_spec")
    _check_faiss_spec(spec, writer.manifest["dims"]["latent"])
    if options.prune and not os.path.isdir(root):
        raise IngestError(f"--prune: the media root {root} is not there (unmounted?): nothing was pruned")
    pending = _classify(found, root, writer, report, skipped)
    for item in skipped:
        _report_skip(report, item)
    if pending and options.ray is not None:
        from engine.cluster.ray_ingest import index_pending_on_ray

        index_pending_on_ray(pending, writer, models, sampling, window, options, report)
    elif pending:
        _index_pending(pending, writer, models.model(), models.extractor(), job, sampling, window, options, report)
    if options.prune:
        _prune(writer, root, report)
    if metadata is not None:
        _attach_metadata(writer, metadata, options.metadata, root, report)
    if _index_stale(writer, spec):
        _rebuild_or_drop_index(writer, spec, report.warnings)
    report.videos = writer.manifest["count"]
    if report.videos or writer.exists:
        writer.commit()
        report.times.wall = time.perf_counter() - clock
        files.write_json(os.path.join(out, REPORT), report.to_dict())
    report.times.wall = time.perf_counter() - clock
    return report


def _check_faiss_spec(spec, dim: int) -> None:
    """A FAISS spec faiss cannot build is refused before any work (not after the last commit)."""
    if spec in (None, "none"):
        return
    import faiss

    from engine.gallery_faiss import faiss_factory

    try:
        faiss.index_factory(dim, faiss_factory(spec, 1 << 16), faiss.METRIC_INNER_PRODUCT)
    except (RuntimeError, CVRError) as error:
        raise IngestError(f"--faiss {spec!r}: FAISS cannot build it ({str(error).strip().splitlines()[-1]})") from None


def _index_stale(writer, spec) -> bool:
    record = writer.manifest.get("faiss")
    if spec in (None, "none"):
        return record is not None
    return record is None or record.get("shorthand", record["factory"]) != spec


class _Models:
    """The checkpoint's video tower and the frame extractor that made its training features,
    loaded only when there is something to embed (a re-run with nothing new loads neither)."""

    def __init__(self, checkpoint: str, model, options: IngestOptions):
        from engine.checkpoint import checkpoint_id, read_checkpoint_config

        self.checkpoint, self.options, self._model, self._extractor = checkpoint, options, model, None
        self.config = read_checkpoint_config(checkpoint)
        self.job = self.config.get("train", {}).get("job", {})
        self.record = self.job.get("extractor")
        if not self.record:
            raise IngestError(f"{checkpoint}: the checkpoint does not record which ResNet-50 made its training "
                              "features (trained on features from elsewhere), so video files cannot be embedded "
                              "the same way: retrain it on features written by `cvr features` or `cvr data synth`")
        self.checkpoint_id = checkpoint_id(checkpoint)
        if model is not None and getattr(model, "checkpoint_id", None) != self.checkpoint_id:
            raise IngestError(f"the model passed in is not the checkpoint at {checkpoint}")
        model_config = self.config["model"]
        self.latent_dim, self.concept_dim = model_config["latent_dim"], model_config["concept_dim"]

    def model(self):
        """The video tower alone: indexing never runs the text encoder, the slow part of a load."""
        from engine.checkpoint import load_video_tower

        if self._model is None:
            self._model = load_video_tower(self.checkpoint, self.options.device)
        return self._model.eval()

    def extractor(self):
        from engine.vision import RegionExtractor, vision_config_of

        if self._extractor is None:
            vision = vision_config_of(self.record, self.options.vision_weights)
            self._extractor = RegionExtractor.from_config(vision, self.options.device)
        return self._extractor


def _new_manifest(checkpoint, out, models: _Models, options, found, inputs) -> dict:
    from engine.indexing import manifest_base

    dtype = options.dtype or "float16"
    root = os.path.abspath(options.media_root) if options.media_root else media_root_for(found, inputs)
    sampling = options.sampling or Sampling()
    sampling.validate()
    window = SegmentWindow.parse(options.segments or DEFAULT_SEGMENTS)
    base = manifest_base({"id": models.checkpoint_id, "path": checkpoint, "norm": models.config.get("norm")}, out,
                         models.latent_dim, models.concept_dim, dtype)
    return dict(base, media={"root": paths.reference(root, out), "paths": {}}, extractor=models.record,
                sampling=sampling.to_dict(), segments=window and window.to_dict(),
                faiss_spec=options.faiss, sources=[{"videos": "cvr index --videos"}])


def _check_same_run(manifest: dict, checkpoint_id: str, extractor: dict, options: IngestOptions, out: str) -> None:
    """A re-run adds to what is there: same checkpoint, extractor, sampling and segments, or a
    one-line refusal (mixing them would rank videos on different footings)."""
    from engine.vision import describe_extractor, same_extractor

    if manifest.get("media") is None:
        raise IngestError(f"{out}: this gallery was built from feature files; index video files into a new gallery")
    if manifest["checkpoint"]["id"] != checkpoint_id:
        raise IngestError(f"{out}: gallery was built with checkpoint {manifest['checkpoint']['id'][:12]}, not "
                          f"{checkpoint_id[:12]}: index into a new gallery")
    if not same_extractor(manifest.get("extractor"), extractor):
        raise IngestError(f"{out}: frames were read by {describe_extractor(manifest.get('extractor'))}, the "
                          f"checkpoint's are {describe_extractor(extractor)}")
    if options.sampling is not None and options.sampling.to_dict() != manifest["sampling"]:
        raise IngestError(f"{out}: gallery was sampled at {Sampling.from_dict(manifest['sampling']).describe()}, "
                          f"not {options.sampling.describe()}: pass the same sampling or index into a new gallery")
    stored = manifest.get("segments")
    if options.segments is not None:
        asked = SegmentWindow.parse(options.segments)
        if (asked and asked.to_dict()) != stored:
            raise IngestError(f"{out}: gallery keeps segments {stored or 'none'}, not {options.segments}: pass the "
                              "same --segments or index into a new gallery")
    if options.dtype is not None and options.dtype != manifest["dtype"]:
        raise IngestError(f"{out}: gallery is {manifest['dtype']}, cannot add {options.dtype}")


def _classify(found: list, root: str, writer, report: IngestReport, skipped: list) -> list:
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


def _report_skip(report: IngestReport, item: Skipped) -> None:
    report.skipped.append(item)
    report.counts["skipped"] += 1
    print(f"cvr index: skipped {item.path}: {item.reason}", file=sys.stderr, flush=True)


def _index_pending(pending: list, writer, model, extractor, job, sampling, window, options, report) -> None:
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
    _report_skip(report, Skipped(item.path, kind, reason))
    for rel, _, _ in item.also:  # the same bytes at other paths: just as unreadable
        _report_skip(report, Skipped(rel, kind, reason))


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


def _prune(writer, root: str, report: IngestReport) -> None:
    """Drop the paths whose file is gone, and the videos left with no path."""
    known = writer.manifest["media"]["paths"]
    gone = [rel for rel in known if not os.path.exists(os.path.join(root, rel))]
    for rel in gone:
        _release(writer, known.pop(rel)["id"], forget=True)
        report.counts["removed"] += 1


def _attach_metadata(writer, metadata: dict, path: str, root: str, report: IngestReport) -> None:
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


def remove_videos(gallery: str, video_ids: list) -> dict:
    """`cvr gallery rm`: drop videos by id (with their paths and metadata) in one atomic commit;
    an unknown id refuses the whole call. Returns the new manifest."""
    from engine.parts import GalleryWriter

    gallery = os.path.abspath(gallery)
    with locks.lock(gallery):
        writer = GalleryWriter.open(gallery)
        unknown = [v for v in video_ids if v not in writer.where]
        if unknown:
            raise IngestError(f"{gallery}: no video {unknown[0]!r} in the gallery (nothing was removed)")
        spec = (writer.manifest.get("faiss") or {}).get("shorthand") or (writer.manifest.get("faiss") or {}).get(
            "factory") or writer.manifest.get("faiss_spec")
        writer.drop(video_ids)
        media = writer.manifest.get("media")
        if media:
            media["paths"] = {rel: e for rel, e in media["paths"].items() if e["id"] not in set(video_ids)}
        for video_id in video_ids:
            writer.manifest.get("fields", {}).pop(video_id, None)
        warnings = []
        _rebuild_or_drop_index(writer, spec, warnings)
        for _, warning in warnings:
            print(f"cvr gallery rm: warning: {warning}", file=sys.stderr)
        return writer.commit()


def _rebuild_or_drop_index(writer, spec, warnings: list) -> None:
    """The FAISS index rebuilt over the live rows; where faiss cannot build it for them (an IVF
    index with more lists than videos left, say), the gallery goes on without one, with a warning."""
    from engine.gallery_format import GalleryError

    try:
        writer.rebuild_index(spec)
    except GalleryError as error:
        writer.rebuild_index(None)
        warnings.append((writer.folder, f"no FAISS index ({error}); searches are exhaustive until "
                                         "`cvr index --faiss ...` builds one"))


# ---------------------------------------------------------------------------------------------
# Frame features for training: `cvr features`


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
        _report_skip(report, item)
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
                _report_skip(report, Skipped(path, *problem))
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
