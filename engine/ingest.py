"""Video files in: `cvr index --videos` keeps a gallery in step with a folder of videos, and
`cvr features` writes their frame features for training.

One run: find the files (folders walked recursively, globs, a list), compare each with what the
gallery recorded (path relative to the media root, size, mtime, content hash), decode the new and
changed ones in worker processes (engine/video.py) while this process runs the ResNet-50 and the
video tower over what they decoded, and commit every batch as an immutable part plus a new
manifest (engine/gallery.py): a kill loses at most the batch in flight, and the next run goes on
where it stopped. Bad files are skipped and reported, never fatal. The same content at two paths
is indexed once and keeps both paths.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import stat
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from engine import files, locks, paths
from engine.errors import CVRError, InputError
from engine.video import Sampling, VideoError

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".gif", ".mpg", ".mpeg", ".wmv", ".flv",
                    ".ts", ".3gp", ".ogv")
DEFAULT_SEGMENTS = "4:2"
BATCH_VIDEOS = 16  # videos per committed part: what a kill can lose, and the tower's batch
REPORT = "index_report.json"
PARTS = "parts"


class IngestError(CVRError):
    """A run that cannot start or cannot index anything (one-line message, exit code 2)."""


# ---------------------------------------------------------------------------------------------
# Segments: overlapping windows of seconds, each embedded by the video tower


@dataclass(frozen=True)
class SegmentWindow:
    window: float
    stride: float

    @classmethod
    def parse(cls, text: str | None):
        """`WINDOW:STRIDE` in seconds ('4:2'), or None for 'none'."""
        if text is None or text == "none":
            return None
        try:
            window, stride = (float(x) for x in str(text).split(":"))
        except ValueError:
            raise InputError(f"--segments must be WINDOW:STRIDE in seconds (e.g. 4:2) or none, got {text!r}") from None
        if not (0 < stride <= window < float("inf")):
            raise InputError(f"--segments {text}: needs 0 < stride <= window")
        return cls(window, stride)

    def to_dict(self) -> dict:
        return {"window": self.window, "stride": self.stride}

    def spans(self, duration: float) -> list:
        """[start, end] windows covering the video: every stride from 0, the last one ending at
        the end; a video no longer than the window is one segment."""
        if duration <= self.window:
            return [(0.0, float(duration))]
        spans, start = [], 0.0
        while start + self.window < duration - 1e-9:
            spans.append((start, start + self.window))
            start += self.stride
        spans.append((max(0.0, duration - self.window), float(duration)))
        return sorted(set(spans))


# ---------------------------------------------------------------------------------------------
# Finding the files


@dataclass
class Skipped:
    path: str
    kind: str
    reason: str


def find_videos(inputs: list, list_file: str | None = None) -> tuple:
    """(video files as absolute paths, in a stable order without repeats; Skipped inputs). A
    folder is walked recursively for files with a video extension (hidden files left out); a
    file named directly, by a glob or in the list is taken whatever its extension."""
    named = list(inputs or [])
    if list_file:
        try:
            with open(list_file, encoding="utf-8") as handle:
                named += [line.strip() for line in handle if line.strip() and not line.startswith("#")]
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or error
            raise IngestError(f"--list {list_file}: cannot read ({reason})") from None
    found, skipped, seen = [], [], set()
    for item in named:
        for path in _expand(item, skipped):
            path = os.path.abspath(path)
            if path not in seen:
                seen.add(path)
                found.append(path)
    return found, skipped


def _expand(item: str, skipped: list) -> list:
    if os.path.isdir(item):
        walked = []

        def unreadable(error: OSError) -> None:  # a folder the walk cannot enter is reported, not skipped silently
            skipped.append(Skipped(error.filename or item, "unreadable", error.strerror or "cannot be read"))
        for folder, subfolders, names in os.walk(item, onerror=unreadable):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            walked += [os.path.join(folder, n) for n in sorted(names)
                       if not n.startswith(".") and n.lower().endswith(VIDEO_EXTENSIONS)]
        return walked
    if glob.has_magic(item):
        matched = sorted(glob.glob(item, recursive=True))
        if not matched:
            skipped.append(Skipped(item, "missing", "the pattern matches no file"))
        return [m for m in matched if os.path.isfile(m)]
    if not os.path.lexists(item):
        skipped.append(Skipped(item, "missing", "no such file or folder"))
        return []
    return [item]


def media_root_for(found: list, inputs: list) -> str:
    """The default media root of a new gallery: the one folder given, or the deepest folder that
    holds every file."""
    folders = [os.path.abspath(i) for i in inputs or [] if os.path.isdir(i)]
    if len(folders) == 1 and all(p.startswith(folders[0] + os.sep) for p in found):
        return folders[0]
    return os.path.commonpath([os.path.dirname(p) for p in found]) if found else os.getcwd()


def video_id_of(rel: str) -> str:
    """A video's id: its path under the media root without the extension ('cooking/pasta'), made
    safe to store one per line: bytes that are not UTF-8 become U+FFFD, control characters '_',
    and spaces at either end go."""
    stem, _ = os.path.splitext(rel)
    text = os.fsencode(stem).decode("utf-8", "replace").replace(os.sep, "/")
    return "".join("_" if ord(c) < 32 or ord(c) == 127 else c for c in text).strip() or "_"


# ---------------------------------------------------------------------------------------------
# Decoding in worker processes


def _decode_one(job: tuple) -> tuple:
    """(path, DecodedVideo or None, (kind, reason) or None, seconds): runs in a worker."""
    from engine.video import decode_video

    path, sampling, size = job
    clock = time.perf_counter()
    try:
        video = decode_video(path, Sampling.from_dict(sampling), size)
        return path, video, None, time.perf_counter() - clock
    except VideoError as error:
        return path, None, (error.kind, getattr(error, "reason", str(error))), time.perf_counter() - clock


def _quiet_worker() -> None:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def decoded(paths_to_decode: list, sampling: Sampling, size: int, workers: int = 1):
    """Yield _decode_one's results in order; `workers` processes decode ahead of the caller (0:
    decode here, one at a time). A forkserver, not fork: the caller holds torch's threads."""
    jobs = [(p, sampling.to_dict(), size) for p in paths_to_decode]
    if workers <= 0 or len(jobs) <= 1:
        yield from map(_decode_one, jobs)
        return
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["engine.video"])
    with context.Pool(min(workers, len(jobs)), initializer=_quiet_worker) as pool:
        yield from pool.imap(_decode_one, jobs, chunksize=1)


# ---------------------------------------------------------------------------------------------
# Features and embeddings


@dataclass
class StageTimes:
    decode: float = 0.0  # summed over the workers (they run beside the other stages)
    resnet: float = 0.0
    tower: float = 0.0
    write: float = 0.0
    wall: float = 0.0
    videos: int = 0

    def per_video(self) -> dict:
        n = max(self.videos, 1)
        return {k: getattr(self, k) / n for k in ("decode", "resnet", "tower", "write")}


def frame_features(extractor, videos: list, times: StageTimes) -> list:
    """Pooled ResNet-50 features (n_i, 2048) of each decoded video, batched across videos."""
    clock = time.perf_counter()
    pooled = extractor.pooled(np.concatenate([v.frames for v in videos]))
    times.resnet += time.perf_counter() - clock
    bounds = np.cumsum([0] + [len(v.frames) for v in videos])
    return [pooled[bounds[i] : bounds[i + 1]] for i in range(len(videos))]


def thin(rows: np.ndarray, max_frames: int) -> np.ndarray:
    """At most max_frames rows, evenly spread (as engine.datasets.video_frames does)."""
    if len(rows) <= max_frames:
        return rows
    return rows[np.linspace(0, len(rows) - 1, max_frames).round().astype(int)]


def embed(model, features: list, videos: list, window: SegmentWindow | None, max_frames: int,
          times: StageTimes, batch: int = 256) -> tuple:
    """The video tower over each whole video and each of its segments: (lat (n, 2, D), con
    (n, 2, K), segment lat (s, D), segment row (s,), segment span (s, 2)), float32."""
    import torch

    sequences = [thin(rows, max_frames) for rows in features]  # whole videos first, then segments
    owners, spans = [], []
    for row, (rows, video) in enumerate(zip(features, videos, strict=True)):
        if window is None:
            continue
        stamps = np.asarray(video.timestamps)
        for start, end in window.spans(video.duration):
            inside = (stamps >= start) & ((stamps < end) | (end >= video.duration))
            if inside.any():
                sequences.append(thin(rows[inside], max_frames))
                owners.append(row)
                spans.append((start, end))
    clock = time.perf_counter()
    lats, cons = [], []
    with torch.no_grad():
        for first in range(0, len(sequences), batch):
            chunk = sequences[first : first + batch]
            length = max(len(s) for s in chunk)
            frames = np.zeros((len(chunk), length, chunk[0].shape[1]), np.float32)
            mask = np.zeros((len(chunk), length), bool)
            for i, s in enumerate(chunk):
                frames[i, : len(s)], mask[i, : len(s)] = s, True
            device = _device(model)
            out = model.encode_video(torch.from_numpy(frames).to(device), torch.from_numpy(mask).to(device))
            lats.append(out.lat.float().cpu().numpy())
            cons.append(out.con.float().cpu().numpy())
    times.tower += time.perf_counter() - clock
    lat, con = np.concatenate(lats), np.concatenate(cons)
    n = len(videos)
    segment_lat = lat[n:, 0] if window is not None else np.zeros((0, lat.shape[2]), np.float32)
    return (lat[:n], con[:n], segment_lat, np.asarray(owners, np.int32),
            np.asarray(spans, np.float32).reshape(-1, 2))


def _device(model):
    return next(model.parameters()).device


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
    if pending:
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

    from engine.gallery import faiss_factory

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
    from tqdm import tqdm

    size = extractor.config.image_size
    max_frames = int(job.get("max_frames", 64))
    batch: list = []
    bar = tqdm(total=len(pending), desc="index videos", unit="video", disable=not options.progress,
               file=sys.stderr)
    by_path = {p.path: p for p in pending}
    try:
        for done, (path, video, problem, seconds) in enumerate(
                decoded([p.path for p in pending], sampling, size, options.workers), start=1):
            report.times.decode += seconds
            bar.update(1)
            if options.on_progress:
                options.on_progress(done, len(pending))
            item = by_path[path]
            if problem is not None:
                _skip_pending(writer, item, problem, report)
                continue
            batch.append((item, video))
            if len(batch) >= options.batch_videos:
                _commit_batch(batch, writer, model, extractor, max_frames, window, report)
                batch = []
                if options.should_stop and options.should_stop():
                    report.stopped = True
                    return
        if batch:
            _commit_batch(batch, writer, model, extractor, max_frames, window, report)
    finally:
        bar.close()


def _skip_pending(writer, item: _Pending, problem: tuple, report: IngestReport) -> None:
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
    lat, con, seg_lat, seg_row, seg_span = embed(model, features, videos, window, max_frames, report.times)
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
    writer.add_part(ids, lat, con, segments, records, [v.thumbnail for v in videos])
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


# ---------------------------------------------------------------------------------------------
# Metadata


def read_metadata(path: str) -> dict:
    """{key: {field: value}} from JSON lines or CSV; the key is the record's `id` or `path`.
    CSV cells that read as numbers become numbers; a cell with ';' becomes a list (tags)."""
    text = _read_text(path)
    rows = _csv_rows(text, path) if path.lower().endswith(".csv") else _jsonl_rows(text, path)
    table = {}
    for line, row in rows:
        key = row.pop("id", None) or row.pop("path", None)
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)  # a JSON id 7 names the video "7"
        if not isinstance(key, str) or not key:
            raise InputError(f"{path}:{line}: a metadata record needs an 'id' or a 'path'")
        row.pop("path", None)
        for field_name, value in row.items():
            if not _plain_value(value):
                raise InputError(f"{path}:{line}: field {field_name!r} must be text, a finite number, true/false or "
                                 "a list of those")
        table[key] = row
    return table


def _plain_value(value) -> bool:
    import math

    if isinstance(value, list):
        return all(_plain_value(v) and not isinstance(v, list) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (str, int, bool))


def _jsonl_rows(text: str, path: str) -> list:
    rows = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except ValueError as error:
            raise InputError(f"{path}:{line}: not a JSON object ({getattr(error, 'msg', error)})") from None
        if not isinstance(value, dict):
            raise InputError(f"{path}:{line}: not a JSON object")
        rows.append((line, value))
    return rows


def _csv_rows(text: str, path: str) -> list:
    reader = csv.DictReader(text.splitlines())
    rows = []
    for line, row in enumerate(reader, 2):
        if None in row:
            raise InputError(f"{path}:{line}: more cells than the header names")
        # ids and paths stay text ('0007' is not 7); other cells that read as numbers are numbers
        rows.append((line, {k: (v if k in ("id", "path") else _cell(v)) for k, v in row.items()
                            if k and v is not None and v != ""}))
    return rows


def _cell(text: str):
    if ";" in text:
        return [_cell(part.strip()) for part in text.split(";") if part.strip()]
    import math

    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        return value if math.isfinite(value) else text  # 'nan', 'inf', '1e400' stay text
    return text


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
    from engine.gallery import GalleryError

    try:
        writer.rebuild_index(spec)
    except GalleryError as error:
        writer.rebuild_index(None)
        warnings.append((writer.folder, f"no FAISS index ({error}); searches are exhaustive until "
                                         "`cvr index --faiss ...` builds one"))


# ---------------------------------------------------------------------------------------------
# Frame features for training: `cvr features`


def feature_ids(found: list, ids_file: str | None) -> dict:
    """path -> video id: the file name without its extension, or the `path,id` CSV's mapping."""
    if not ids_file:
        return {p: os.path.splitext(os.path.basename(p))[0] for p in found}
    mapping = {}
    for line, row in _csv_rows(_read_text(ids_file), ids_file):
        if not isinstance(row.get("path"), str) or "id" not in row:
            raise InputError(f"{ids_file}:{line}: needs the columns path and id")
        mapping[os.path.abspath(row["path"])] = str(row["id"])
    return {p: mapping[p] for p in found if p in mapping}


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:  # -sig: a spreadsheet's BOM
            return handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read ({getattr(error, 'strerror', None) or error})") from None


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
