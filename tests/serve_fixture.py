"""Builders shared by the `cvr serve` tests (tests/test_serve.py, tests/test_serve_fuzz.py); not
collected. Everything slow is built once per process and cached here, so the two modules share it
when they run in one pytest process:

- the demo world: the built-in set's test-split clips as mp4 files (what `cvr demo --videos 30`
  writes: 5 clips with metadata.jsonl), indexed with the shipped checkpoint (segments, thumbnails,
  metadata fields), next to an anchor cache, in the layout `cvr demo` leaves (D/videos, D/gallery,
  D/anchor_cache; the demo's own search step is left out: it only prints);
- a few more clips (the built-in set's val split) for the tests that index new files;
- the query pipeline of the shipped checkpoint, loaded once; each app gets its own Retriever over
  it (`Retriever.from_parts`), so one app's gallery reloads never reach another's;
- a gallery built from feature files (no media): random BigFile frame features of the shipped
  checkpoint's width, indexed with `cvr index --root --collection`.
"""
from __future__ import annotations

import os
import shutil
import threading
import time

from engine.cli.demo import SHIPPED_RETRIEVAL as BUILTIN

API_KEY = "serve-tests-key-0123456789abcdef"  # >= 16 characters, like read_api_key demands
DEMO_VIDEOS = 30  # clips of the built-in set; its test split (5 clips) is indexed, as `cvr demo` does

_cache: dict = {}
_lock = threading.Lock()


def _once(name: str, build):
    with _lock:
        if name not in _cache:
            _cache[name] = build()
        return _cache[name]


def demo_world(tmp_path_factory) -> dict:
    """{"base", "videos", "gallery", "anchor_cache", "ids"}: read-only, shared by every test."""

    def build() -> dict:
        from engine.cli import main
        from training.synthetic import SynthConfig, write_split_videos

        base = str(tmp_path_factory.mktemp("serve-demo"))
        videos, gallery = os.path.join(base, "videos"), os.path.join(base, "gallery")
        write_split_videos(videos, SynthConfig(videos=DEMO_VIDEOS, seed=0), ("test",), progress=False)
        assert main(["index", "--checkpoint", BUILTIN, "--videos", videos, "--out", gallery,
                     "--metadata", os.path.join(videos, "metadata.jsonl"), "--workers", "0", "--quiet"]) == 0
        anchor_cache = os.path.join(base, "anchor_cache")
        os.makedirs(anchor_cache)
        ids = sorted(os.path.splitext(n)[0] for n in os.listdir(videos) if n.endswith(".mp4"))
        return {"base": base, "videos": videos, "gallery": gallery, "anchor_cache": anchor_cache, "ids": ids}

    return _once("demo", build)


def extra_clips(tmp_path_factory) -> list:
    """Absolute paths of clips that are in no gallery (the built-in set's val split), read-only."""

    def build() -> list:
        from training.synthetic import SynthConfig, write_split_videos

        folder = os.path.join(str(tmp_path_factory.mktemp("serve-extra")), "clips")
        write_split_videos(folder, SynthConfig(videos=DEMO_VIDEOS, seed=0), ("val",), progress=False)
        return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".mp4"))

    return _once("extra", build)


def copy_world(world: dict, dest: str) -> dict:
    """A writable copy of the demo world (videos next to the gallery: its media root is ../videos)."""
    os.makedirs(dest)
    shutil.copytree(world["videos"], os.path.join(dest, "videos"))
    shutil.copytree(world["gallery"], os.path.join(dest, "gallery"))
    return dict(world, base=dest, videos=os.path.join(dest, "videos"), gallery=os.path.join(dest, "gallery"))


def feature_gallery(tmp_path_factory) -> str:
    """A gallery built from feature files: 8 videos feat0..feat7, no media (read-only)."""

    def build() -> str:
        import numpy as np

        from engine import datasets
        from engine.cli import main

        base = str(tmp_path_factory.mktemp("serve-features"))
        rng = np.random.default_rng(0)
        video2frames = {f"feat{i}": [f"feat{i}_{f}" for f in range(4)] for i in range(8)}
        frames = [f for ids in video2frames.values() for f in ids]
        features = np.abs(rng.normal(size=(len(frames), 2048))).astype(np.float32)  # the checkpoint's frame_dim
        datasets.write_bigfile(os.path.join(base, "root", "fake", "FeatureData", "resnet50"), frames, features,
                               video2frames=video2frames)
        out = os.path.join(base, "gallery")
        assert main(["index", "--root", os.path.join(base, "root"), "--collection", "fake", "--feature", "resnet50",
                     "--checkpoint", BUILTIN, "--out", out, "--quiet"]) == 0
        return out

    return _once("features", build)


def retriever(gallery: str, anchor_cache: str):
    """A Retriever over `gallery` sharing the one loaded pipeline of the shipped checkpoint (its
    anchor cache is the first caller's)."""
    from engine.gallery import Gallery
    from engine.retriever import Retriever

    first = _once("retriever", lambda: Retriever(BUILTIN, gallery, anchor_cache=anchor_cache))
    pipeline = first.pipeline
    return Retriever.from_parts(pipeline, Gallery.load(gallery, checkpoint_id=pipeline.checkpoint_id), "torch",
                                first.anchor_cache)


def config(gallery: str, anchor_cache: str | None = None, **overrides):
    from engine.serve.state import ServeConfig

    return ServeConfig(gallery=os.path.abspath(gallery), checkpoint=BUILTIN, anchor_cache=anchor_cache, **overrides)


def client(app):
    """A TestClient that answers a server error with its 500 (the tests assert there is none)."""
    from fastapi.testclient import TestClient

    return TestClient(app, raise_server_exceptions=False)


def serve(world: dict, gallery: str | None = None, **overrides):
    """(TestClient context, app) over `gallery` (default: the world's) with ServeConfig overrides."""
    from engine.serve.app import create_app

    gallery = gallery or world["gallery"]
    app = create_app(config(gallery, world["anchor_cache"], **overrides), retriever(gallery, world["anchor_cache"]))
    return client(app), app


def metrics(client) -> dict:
    """{(sample name, frozenset of label items): value} of the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def wait_job(client, url: str, timeout: float = 60.0) -> dict:
    """Poll GET /v1/jobs/{id} until the job is no longer queued or running."""
    give_up = time.monotonic() + timeout
    while True:
        response = client.get(url)
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] not in ("queued", "running"):
            return job
        assert time.monotonic() < give_up, f"job still {job['status']} after {timeout} s: {job}"
        time.sleep(0.1)
