"""The Ray path of bench/scale.py at a tiny size (not collected on its own: tests/test_cluster.py
runs every tests/cluster_cases*.py in one child pytest inside a private network namespace). The
session may already hold a Ray (tests/cluster_cases.py's `ray_cluster`): connect() then returns it,
and neither this fixture nor the benchmark shuts down a Ray it did not start."""
from __future__ import annotations

import json

import pytest

from engine.cluster.ray_shards import in_private_network

pytestmark = pytest.mark.skipif(not in_private_network(), reason="Ray runs only inside a private network namespace")


@pytest.fixture(scope="session")
def bench_ray():
    from engine.cluster.ray_shards import connect, require_ray

    started = not require_ray().is_initialized()
    ray = connect(None, num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


def test_bench_scale_ray_rows_equal_the_single_process_search(bench_ray, tmp_path):
    from bench import scale as scale_bench

    out = tmp_path / "out"
    argv = ["--quick", "--sizes", "2000", "--shards", "1,2", "--queries", "3", "--local", "none",
            "--actor-cpus", "0.2", "--out", str(out)]
    assert scale_bench.main(argv) == 0
    assert bench_ray.is_initialized()  # the benchmark left the session's Ray running
    result = json.loads((out / "scale.json").read_text())
    assert result["verified"] is True and result["settings"]["ray"] and result["ray_cpus"] == 2
    (size,) = result["sizes"]
    ray_rows = [r for r in size["rows"] if r["search"] == "ray"]
    assert {(r["shards"], r["mode"], r["batch"]) for r in ray_rows} == {
        (s, m, b) for s in (1, 2) for m in ("exhaustive", "two-stage") for b in (3, 1)}
    for row in ray_rows:
        assert row["median_ms"] > 0 and row["wire_bytes"]["per_batch"] > 0 and row["cpu_ms_per_batch"] >= 0
        if row["mode"] == "exhaustive":
            assert row["same_ids_as_single"] is True
        else:
            assert 0 <= row["recall_at_10"] <= 1
    for entry in size["shard_sets"]:
        assert entry["ray_start_s"] > 0 and entry["ray_roundtrip_ms"] > 0
        assert len(entry["ray_memory"]) == entry["shards"]
        assert all(m["rss_anon"] > 0 and m["rss_file"] > 0 for m in entry["ray_memory"])
    plan = result["sizing"]
    assert plan["fanout_overhead_ms"] is not None and plan["shard_runtime_bytes"] > 0
    assert "Ray actors" in (out / "scale.md").read_text()
