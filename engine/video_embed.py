"""From decoded video files to embeddings: decoding in worker processes, the ResNet-50 over each
batch's frames, the video tower over each whole video and each segment window (engine/ingest.py
commits what these make)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from engine.errors import InputError
from engine.video import VideoError
from engine.video_sampling import Sampling

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

