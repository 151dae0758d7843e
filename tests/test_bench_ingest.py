"""bench/ingest.py runs once at a tiny size (6 clips, a tiny checkpoint trained on them, 0 and 2
decode workers), so that it cannot rot. Nothing here asserts a timing: only that the result files
exist and are well formed, that every time and throughput is positive, and that the re-runs
re-indexed what changed and nothing else."""
import json

import pytest

from bench import ingest as ingest_bench

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ingest_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest")
    assert ingest_bench.main(["--tiny", "--out", str(out)]) == 0
    return out


def test_ingest_tiny_writes_cold_rows_per_worker_count(ingest_out):
    result = json.loads((ingest_out / "ingest.json").read_text())
    assert result["format"] == "cvr-sdgm/bench-ingest/1" and result["tiny"] is True
    assert set(result) >= {"checkpoint", "clips", "load", "cold", "reruns", "machine", "settings", "wall_seconds"}
    assert result["clips"]["videos"] == 6 and result["clips"]["bytes"] > 0
    assert not result["checkpoint"]["shipped"] and len(result["checkpoint"]["id"]) == 64
    assert [r["workers"] for r in result["cold"]] == [0, 2]
    for row in result["cold"]:
        assert row["runs"] == 1 and row["videos"] == 6 and row["machine"]["cores"] >= 1
        assert row["wall_s"]["mean"] > 0 and row["videos_per_s"]["mean"] > 0
        assert row["videos_per_s_without_load"]["mean"] >= row["videos_per_s"]["mean"]
        assert row["best_videos_per_s"] >= row["videos_per_s"]["mean"] and row["cpu_s"]["mean"] > 0
        for stage in ("decode", "resnet", "tower", "write", "wall"):
            assert row["per_video_ms"][stage]["mean"] > 0, stage
        run = row["per_run"][0]
        assert run["counts"]["new"] == 6 and run["skipped"] == 0
        assert run["models_loaded"] == ["checkpoint", "resnet"]  # the video tower and the ResNet-50, no text encoder
        assert run["load_s"]["resnet"] > 0 and run["load_s"]["checkpoint"] > 0
        assert 0 < row["load_s"]["mean"] < row["wall_s"]["mean"]
    assert result["load"]["total_s"]["mean"] > 0 and result["load"]["runs"] == 2


def test_ingest_tiny_reruns_reindex_only_what_changed(ingest_out):
    result = json.loads((ingest_out / "ingest.json").read_text())
    changed, nothing = result["reruns"]
    assert changed["changed_files"] == 2 and changed["reindexed"]["mean"] == 2
    run = changed["per_run"][0]
    assert run["counts"]["changed"] == 2 and run["counts"]["unchanged"] == 4 and run["wall_s"] > 0
    assert 0 < changed["load_s"]["mean"] < changed["wall_s"]["mean"]
    assert nothing["reindexed"]["mean"] == 0 and nothing["models_loaded"] == []
    assert nothing["per_run"][0]["counts"]["unchanged"] == 6 and nothing["wall_s"]["mean"] > 0


def test_ingest_tiny_writes_markdown_summary_and_plot(ingest_out):
    table = (ingest_out / "ingest.md").read_text()
    assert table.startswith("**Indexing video files**") and "NOT the shipped" in table
    assert "| decode workers | runs | wall s | videos/s |" in table and "| case |" in table and "Machine:" in table
    assert (ingest_out / "ingest.png").read_bytes()[:8] == PNG_MAGIC
