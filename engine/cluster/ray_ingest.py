"""`cvr index --videos ... --ray [ADDRESS]`: decoding and embedding as a Ray Data job.

The run itself is engine/ingest.py's: the same files found and compared with the gallery, the same
bad-file report, the same commits (one immutable part plus a new manifest per batch), so a killed
run loses at most the batch in flight and the next run goes on where it stopped. Only the work
between moves to Ray: the files to index become a dataset; a pool of CPU actors decodes them
(PyAV, engine/video.py); a pool of actors runs the ResNet-50 and the video tower over each batch
of decoded videos (GPU actors, one per GPU, where the cluster has GPUs; CPU actors otherwise),
the very functions of engine/video_embed.py. The dataset keeps the files' order, and each video's
embeddings come back to this process, which commits them: ids and rows come out as a
single-process run makes them, embeddings equal up to float rounding (a video's features do not
depend on the batch it is computed in, up to the BLAS's rounding).

Every node reads the video files, the checkpoint and its extractor weights at the same absolute
paths (shared storage, or a copy per node).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from engine.cluster.ray_shards import cluster_error, cluster_gpus, connect


class Decoder:
    """Ray Data actor: decodes each file of a batch (engine.video.decode_video)."""

    def __init__(self, sampling: dict, size: int):
        from engine.video_embed import _quiet_worker

        _quiet_worker()
        self.sampling, self.size = sampling, size

    def __call__(self, batch: dict) -> dict:
        from engine.video_embed import _decode_one

        out = {"path": [], "video": [], "kind": [], "reason": [], "decode_s": []}
        for path in batch["path"]:
            path, video, problem, seconds = _decode_one((str(path), self.sampling, self.size))
            out["path"].append(path)
            out["video"].append(video)
            out["kind"].append(problem[0] if problem else "")
            out["reason"].append(problem[1] if problem else "")
            out["decode_s"].append(seconds)
        return _columns(out)


class Embedder:
    """Ray Data actor: the checkpoint's ResNet-50 and video tower over a batch of decoded videos."""

    def __init__(self, checkpoint: str, extractor: dict, vision_weights: str | None, device: str, max_frames: int,
                 window: dict | None):
        import torch

        from engine.checkpoint import load_video_tower
        from engine.video_embed import SegmentWindow
        from engine.vision import RegionExtractor, vision_config_of

        torch.set_num_threads(1)
        self.tower = load_video_tower(checkpoint, device)
        self.extractor = RegionExtractor.from_config(vision_config_of(extractor, vision_weights), device)
        self.max_frames = max_frames
        self.window = SegmentWindow(**window) if window else None

    def __call__(self, batch: dict) -> dict:
        from engine.video_embed import StageTimes, embed, frame_features

        # Not `video is not None`: Ray Data hands a batch of only failed files its Nones as NaN.
        ok = [i for i, kind in enumerate(batch["kind"]) if not kind]
        videos = [batch["video"][i] for i in ok]
        times = StageTimes()
        pieces = [None] * len(batch["path"])
        if videos:
            features = frame_features(self.extractor, videos, times)
            lat, con, seg_lat, seg_row, seg_span = embed(self.tower, features, videos, self.window, self.max_frames,
                                                         times)
            for n, i in enumerate(ok):
                mine = seg_row == n
                pieces[i] = (lat[n], con[n], seg_lat[mine], seg_span[mine])
        # The frames stay here: the driver needs the record and the thumbnail, not the pixels.
        metas = [dataclasses.replace(batch["video"][i], frames=np.zeros((0,), np.uint8)) if i in ok else None
                 for i in range(len(batch["path"]))]
        share = (times.resnet + times.tower) / max(1, len(videos))
        return _columns({"path": list(batch["path"]), "video": metas, "piece": pieces, "kind": list(batch["kind"]),
                         "reason": list(batch["reason"]), "decode_s": list(batch["decode_s"]),
                         "embed_s": [share if i in ok else 0.0 for i in range(len(batch["path"]))]})


def _columns(values: dict) -> dict:
    """Ray Data batch columns: Python objects (decoded videos, embeddings of any length) as object arrays."""
    out = {}
    for name, column in values.items():
        array = np.empty(len(column), dtype=object)
        array[:] = column
        out[name] = array
    return out


def _dataset(paths: list, sampling: dict, size: int, models, window, options):
    """The Ray Data pipeline over `paths`: decode (CPU actors), then embed (GPU or CPU actors)."""
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # commits, and so ids and rows, in the files' order
    context.enable_progress_bars = False
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    gpus = int(cluster_gpus())  # where the cluster has GPUs the embedding actors take one each
    on_gpu = gpus > 0
    device = "cuda" if on_gpu else "cpu"
    decoders = max(1, int(options.workers))
    max_frames = int(models.job.get("max_frames", 64))
    # A few blocks per decoder keep them all busy; one block per file would be a million tasks.
    blocks = max(1, min(len(paths), 8 * decoders))
    dataset = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
    dataset = dataset.map_batches(Decoder, fn_constructor_args=(sampling, size), batch_size=1, batch_format="numpy",
                                  compute=ray.data.ActorPoolStrategy(size=decoders),
                                  num_cpus=max(0.1, min(1.0, cpus / (2 * decoders))))
    embed_options = {"num_gpus": 1} if on_gpu else {"num_cpus": max(0.1, min(1.0, cpus / 2))}
    # Actors run in Ray's working directory, not the caller's: every path they get is absolute.
    weights = options.vision_weights
    if weights not in (None, "builtin", "random"):
        weights = os.path.abspath(weights)
    return dataset.map_batches(Embedder, fn_constructor_args=(os.path.abspath(models.checkpoint), models.record,
                                                              weights, device, max_frames,
                                                              window and window.to_dict()),
                               batch_size=options.batch_videos, batch_format="numpy",
                               compute=ray.data.ActorPoolStrategy(size=max(1, gpus) if on_gpu else 1),
                               **embed_options)


def index_pending_on_ray(pending: list, writer, models, sampling, window, options, report) -> None:
    """engine.ingest's run over the files `pending`, decoded and embedded on Ray (`options.ray`)."""
    import ray as ray_module

    from engine.ingest_sync import commit_embedded, run_stream
    from engine.vision import vision_config_of

    started_here = not ray_module.is_initialized()
    ray = connect(options.ray)
    size = vision_config_of(models.record, options.vision_weights).image_size
    dataset = _dataset([p.path for p in pending], sampling.to_dict(), size, models, window, options)

    def stream():
        for row in dataset.iter_rows():
            report.times.resnet += float(row["embed_s"])  # ResNet-50 and tower, summed over the actors
            problem = (row["kind"], row["reason"]) if row["kind"] else None
            yield row["path"], (row["video"], row["piece"]), problem, float(row["decode_s"])

    def commit(batch: list) -> None:
        pieces = [piece for _, (_, piece) in batch]
        owners = np.concatenate([np.full(len(p[2]), n, np.int32) for n, p in enumerate(pieces)])
        embedded = (np.stack([p[0] for p in pieces]), np.stack([p[1] for p in pieces]),
                    np.concatenate([p[2] for p in pieces]), owners,
                    np.concatenate([p[3] for p in pieces]).reshape(-1, 2))
        commit_embedded([(item, video) for item, (video, _) in batch], embedded, writer, window, report)

    try:
        run_stream(pending, stream(), commit, writer, options, report)
    except ray.exceptions.RayError as error:
        raise cluster_error(error, "the Ray Data job failed") from None
    finally:
        if started_here:
            ray.shutdown()
