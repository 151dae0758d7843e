"""The Ray cases (not collected on their own): tests/test_cluster.py runs this file in a child
pytest inside a private network namespace (`unshare -n`, loopback up), where every listener Ray
starts stays on 127.0.0.1. One local Ray (2 logical CPUs) serves the whole session and is shut
down at its end. Outside such a namespace every case skips: Ray would listen on every interface."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from shard_fixture import BUILTIN, media_folder, queries, random_gallery

from engine.cluster.ray_shards import in_private_network

pytestmark = pytest.mark.skipif(not in_private_network(), reason="Ray runs only inside a private network namespace")
PORT = 18080  # the namespace is private: no other server can hold it


@pytest.fixture(scope="session")
def ray_cluster():
    from engine.cluster import ray_serve
    from engine.cluster.ray_shards import connect

    ray = connect(None, num_cpus=2)
    yield ray
    ray_serve.undeploy()
    ray.shutdown()


def test_ray_shard_actors_equal_the_unsharded_search(ray_cluster, tmp_path):
    from test_shards import unsharded

    from engine.cluster.ray_shards import RayShards
    from engine.cluster.scatter import merge
    from engine.cluster.shardset import shard_gallery
    from engine.gallery import Gallery

    source = str(tmp_path / "gallery")
    random_gallery(source, media_folder(str(tmp_path)))
    shard_gallery(source, 4, str(tmp_path / "set"), progress=False)
    shards = RayShards.start(str(tmp_path / "set"), BUILTIN, cpus=0.25, prefix="case-shards")
    try:
        pids = {info["pid"] for info in shards.call("info")}
        assert len(pids) == 4 and os.getpid() not in pids  # one actor process per shard
        gallery = Gallery.load(source)
        q_lat, q_con = queries(8, seed=21)
        for where in ([], ["tag=red"], ["year>=2012", "duration<9"]):
            for k in (1, 10, 35):
                values, rows = unsharded(gallery, q_lat, q_con, k, where=where)
                options = {"mode": "exhaustive", "candidates": None, "nprobe": None, "ef_search": None}
                top, picked, _ = merge(shards.call("search", q_lat, q_con, k, options, where), k)
                assert np.array_equal(picked, rows), (where, k)
                finite = rows >= 0
                np.testing.assert_allclose(top[finite], values[finite], atol=1e-5, rtol=0)
        from engine.cluster.ray_shards import ClusterError

        with pytest.raises(ClusterError, match="--shard-cpus 5: must be between 0"):  # never a wait forever
            RayShards.start(str(tmp_path / "set"), BUILTIN, cpus=5)
        from engine.filters import FilterError

        with pytest.raises(FilterError, match="unknown filter field"):  # a shard's error comes back as itself
            shards.call("search", q_lat, q_con, 3, options, ["colour=red"])
    finally:
        shards.close()


def _get(path: str, timeout: float = 60.0):
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", timeout=timeout) as answer:
        return answer.status, answer.headers, answer.read()


def _post(path: str, body: dict, timeout: float = 120.0):
    request = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_ray_serve_answers_the_api_as_the_unsharded_server(ray_cluster, tmp_path_factory):
    import serve_fixture

    from engine.cluster import ray_serve
    from engine.cluster.ray_shards import RayShards
    from engine.cluster.shardset import shard_gallery

    world = serve_fixture.demo_world(tmp_path_factory)
    folder = str(tmp_path_factory.mktemp("served") / "set")
    shard_gallery(world["gallery"], 3, folder, progress=False)
    config = serve_fixture.config(folder, world["anchor_cache"], port=PORT, read_only=True, max_batch=8)
    shards = RayShards.start(folder, BUILTIN, cpus=0.2, prefix="served")
    try:
        ray_serve.deploy(config, folder, shards.names, replicas=1, max_replicas=2, replica_cpus=0.5)
        status, _, body = _get("/readyz")
        assert status == 200 and json.loads(body)["videos"] == len(world["ids"])
        queries_ = ["a red circle moving left", "a small blue square", "green triangle"]
        status, served = _post("/v1/search", {"queries": queries_, "k": 4, "where": ["duration>=0"]})
        assert status == 200, served
        expected = serve_fixture.retriever(world["gallery"], world["anchor_cache"]).search(queries_, k=4)
        for got, want in zip(served["results"], expected, strict=True):
            assert [h["id"] for h in got["hits"]] == [v for v, _ in want.hits]
            np.testing.assert_allclose([h["score"] for h in got["hits"]], [s for _, s in want.hits], atol=1e-5)
            assert [h["segment"] for h in got["hits"]] == [d["segment"] for d in want.details]
        hit = served["results"][0]["hits"][0]
        status, _, body = _get(f"/v1/videos/{hit['id']}")
        assert status == 200 and json.loads(body)["id"] == hit["id"]
        status, headers, _ = _get(hit["thumbnail"])
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        status, _, page = _get("/")
        assert status == 200 and b"<form" in page
        status, answer = _post("/v1/search", {"queries": ["x"], "k": 2, "where": ["nosuchfield=1"]})
        assert status == 400 and "unknown filter field" in answer["detail"]
        status, answer = _post("/v1/videos", {"paths": ["a.mp4"]})
        assert status == 403
        # Concurrent requests coalesce into @serve.batch batches: the metric counts batches of > 1.
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: _post("/v1/search", {"queries": [f"a red circle {i}"], "k": 2}),
                                    range(16)))
        assert all(status == 200 for status, _ in answers)
        status, _, text = _get("/metrics")
        assert status == 200
        samples = {line.split()[0]: float(line.split()[1]) for line in text.decode().splitlines()
                   if line.startswith("cvr_batch_queries_")}
        assert samples["cvr_batch_queries_sum"] > samples["cvr_batch_queries_count"] > 0
    finally:
        ray_serve.undeploy()
        shards.close()
        time.sleep(0.5)


def _index(args: list) -> int:
    from engine.cli import main

    return main(["index", "--checkpoint", BUILTIN, "--workers", "0", "--quiet", "--batch-size", "2", *args])


def _same_gallery(ray_built: str, local_built: str) -> None:
    """Same ids in the same rows, the same records, segments and paths; embeddings equal up to float
    rounding (stored float16: a last-bit difference of the float32 features can round either way)."""
    from engine.gallery import Gallery

    got, want = Gallery.load(ray_built), Gallery.load(local_built)
    assert got.ids == want.ids and len(got) > 0
    np.testing.assert_allclose(np.asarray(got.lat[:], np.float32), np.asarray(want.lat[:], np.float32), atol=2e-3)
    np.testing.assert_allclose(np.asarray(got.con[:], np.float32), np.asarray(want.con[:], np.float32), atol=2e-3)
    for row, video_id in enumerate(want.ids):
        assert got.paths(video_id) == want.paths(video_id)
        mine, theirs = dict(got.record(row)), dict(want.record(row))
        assert mine == theirs
        assert open(got.thumbnail(row), "rb").read() == open(want.thumbnail(row), "rb").read()
    for a, b in zip(got.best_segments(range(len(got)), np.ones(512, np.float32)),
                    want.best_segments(range(len(want)), np.ones(512, np.float32)), strict=True):
        assert a[0] == b[0]


def test_ray_indexing_equals_the_single_process_run_and_resumes_after_a_kill(ray_cluster, tmp_path_factory):
    import shutil
    import subprocess
    import sys

    import serve_fixture
    from videofiles import text_as_mp4, zero_bytes

    base = tmp_path_factory.mktemp("ray-index")
    videos = base / "videos"
    videos.mkdir()
    for clip in serve_fixture.extra_clips(tmp_path_factory):
        shutil.copy(clip, videos)
    bad = {os.path.basename(zero_bytes(videos)), os.path.basename(text_as_mp4(videos))}
    local, distributed = str(base / "local"), str(base / "ray")
    address = ray_cluster.get_runtime_context().gcs_address
    assert _index(["--videos", str(videos), "--out", local, "--shards", "2"]) == 3  # some skipped
    from engine.cluster.shardset import read_shardset

    assert read_shardset(local + "-shards")["count"] == len(os.listdir(videos)) - len(bad)
    # Killed after its first committed batch (the real SIGKILL), then run again: it goes on.
    command = [sys.executable, "-m", "engine.cli", "index", "--checkpoint", BUILTIN, "--workers", "0", "--quiet",
               "--batch-size", "2", "--videos", str(videos), "--out", distributed, "--ray", address]
    killed = subprocess.run(command, env=dict(os.environ, CVR_TEST_KILL_AT="after-batch", CVR_TEST_KILL_AFTER="1"),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    from engine.gallery import Gallery

    assert len(Gallery.load(distributed)) == 2
    assert _index(["--videos", str(videos), "--out", distributed, "--ray", address]) == 3
    _same_gallery(distributed, local)
    reports = [json.load(open(os.path.join(g, "index_report.json"))) for g in (distributed, local)]
    assert {os.path.basename(s["path"]) for s in reports[0]["skipped"]} == bad
    assert [(s["kind"], s["reason"]) for s in reports[0]["skipped"]] == [(s["kind"], s["reason"])
                                                                         for s in reports[1]["skipped"]]
    assert reports[0]["counts"]["new"] == len(Gallery.load(local)) - 2  # the resumed run did only the rest


def test_ray_indexing_of_only_bad_files_is_one_line(ray_cluster, tmp_path, capsys):
    from videofiles import text_as_mp4, zero_bytes

    videos = tmp_path / "bad"
    videos.mkdir()
    zero_bytes(videos), text_as_mp4(videos)
    address = ray_cluster.get_runtime_context().gcs_address
    assert _index(["--videos", str(videos), "--out", str(tmp_path / "g"), "--ray", address, "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("skipped") >= 2
