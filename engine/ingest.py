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

The run's options and report are engine/ingest_options.py, the bookkeeping of paths and batches
engine/ingest_sync.py, `cvr features` engine/ingest_features.py.
"""
from __future__ import annotations

import os
import sys
import time

from engine import files, locks, paths
from engine.errors import CVRError
from engine.ingest_options import IngestError, IngestOptions, IngestReport
from engine.ingest_sync import attach_metadata, classify, index_pending, prune_missing, report_skip
from engine.video_embed import SegmentWindow
from engine.video_files import find_videos, media_root_for, read_metadata
from engine.video_sampling import Sampling

DEFAULT_SEGMENTS = "4:2"
REPORT = "index_report.json"
PARTS = "parts"


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
    pending = classify(found, root, writer, report, skipped)
    for item in skipped:
        report_skip(report, item)
    if pending and options.ray is not None:
        from engine.cluster.ray_ingest import index_pending_on_ray

        index_pending_on_ray(pending, writer, models, sampling, window, options, report)
    elif pending:
        index_pending(pending, writer, models.model(), models.extractor(), job, sampling, window, options, report)
    if options.prune:
        prune_missing(writer, root, report)
    if metadata is not None:
        attach_metadata(writer, metadata, options.metadata, root, report)
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
