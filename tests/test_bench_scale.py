"""bench/scale.py runs once at a tiny size (3000 random videos, shards 1 and 2, in-process
LocalShards only: no Ray, no network namespace), so that it cannot rot. Nothing here asserts a
timing: only that every row is there and well formed, that exhaustive scatter-gather returned the
single-process ids (the bench checks it itself), that recall values are fractions, and that the
sizing section and the plot are written. The Ray path runs in tests/cluster_cases_bench.py."""
import json

import pytest

from bench import scale as scale_bench

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def scale_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    assert scale_bench.main(["--quick", "--no-ray", "--out", str(out)]) == 0
    return out


def test_scale_quick_has_every_row_and_exact_scatter_gather(scale_out):
    result = json.loads((scale_out / "scale.json").read_text())
    assert result["format"] == "cvr-sdgm/bench-scale/1" and result["verified"] is True
    assert result["settings"]["quick"] and not result["settings"]["ray"] and result["k"] == 10
    (size,) = result["sizes"]
    assert size["videos"] == 3000 and size["faiss"].startswith("IVF")
    cases = {(r["search"], r["shards"], r["mode"], r["batch"]) for r in size["rows"]}
    expected = {(search, shards, mode, batch) for search, shards in (("single", 1), ("local", 1), ("local", 2))
                for mode in ("exhaustive", "two-stage") for batch in (4, 1)}
    assert cases == expected
    for row in size["rows"]:
        assert row["runs"] == 2 and len(row["seconds"]) == 2 and row["median_ms"] > 0 and row["queries_per_s"] > 0
        assert row["cpu_ms_per_batch"] >= 0 and row["load_1min"] >= 0
        if row["mode"] == "two-stage":
            assert 0.0 <= row["recall_at_10"] <= 1.0
        elif row["search"] != "single":
            assert row["same_ids_as_single"] is True and row["max_score_diff"] < 1e-5
        if row["search"] == "local":
            wire = row["wire_bytes"]
            assert wire["out_per_shard"] > 0 and wire["back_per_shard"] > 0
            assert wire["per_batch"] > row["shards"] * wire["out_per_shard"]  # plus every shard's answer


def test_scale_quick_counts_bytes_and_build_times(scale_out):
    result = json.loads((scale_out / "scale.json").read_text())
    (size,) = result["sizes"]
    disk = size["gallery_bytes"]
    assert 0 < disk["embeddings"] - 3000 * 2 * (512 + 97) * 2 < 4096  # float16, plus the safetensors header
    assert disk["ids"] > 0 and disk["faiss"] > 0
    assert [s["shards"] for s in size["shard_sets"]] == [1, 2]
    for entry in size["shard_sets"]:
        assert entry["shard_s"] >= 0 and "ray_memory" not in entry and entry["local_roundtrip_ms"] > 0
        memory = entry["local_memory"]
        assert sum(m["videos"] for m in memory) == 3000 and all(m["index_bytes"] > 0 for m in memory)
    plan = result["sizing"]
    assert [r["videos"] for r in plan["rows"]] == [10_000_000, 100_000_000]
    assert all(r["two_stage_ms_per_batch"] > 0 and r["memory_per_shard_bytes"] > 0 for r in plan["rows"])


def test_scale_quick_writes_tables_sizing_and_plot(scale_out):
    table = (scale_out / "scale.md").read_text()
    assert table.startswith("**Scatter-gather search at scale** on `") and "query embeddings only" in table
    assert "| videos | mode | search | shards | batch |" in table and "LocalShards (in process)" in table
    assert "## Sizing: 10M, 100M videos (extrapolated)" in table and "Machine:" in table and "**NO**" not in table
    assert (scale_out / "scale.png").read_bytes()[:8] == PNG_MAGIC


def test_scale_with_ray_refuses_outside_a_private_network_it_cannot_make(monkeypatch, capsys, tmp_path):
    from engine.cluster import ray_shards

    monkeypatch.setattr(ray_shards, "in_private_network", lambda: False)
    monkeypatch.setattr(scale_bench.os, "geteuid", lambda: 1000)  # not root: no unshare -n
    assert scale_bench.main(["--quick", "--out", str(tmp_path)]) == 2
    assert "every network interface" in capsys.readouterr().err
    monkeypatch.setattr(scale_bench.os, "geteuid", lambda: 0)
    monkeypatch.setenv(scale_bench.REEXEC, "1")  # already re-run once: no second unshare
    assert scale_bench.main(["--quick", "--out", str(tmp_path)]) == 2
    assert "still not in a private network namespace" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing was measured or written
