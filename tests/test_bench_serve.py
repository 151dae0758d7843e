"""bench/serve.py runs once at a tiny size (the demo gallery of 40 clips, torch only: a
max-batch-32 and a max-batch-1 server, 4 clients x 3 queries, then 12 overload clients on a queue
of 4), so that it cannot rot. Nothing here asserts a timing: only that the result files exist and
are well formed, that every request was answered (or refused with 503 under overload) without an
error, and that every latency, throughput and memory figure is positive."""
import json

import pytest

from bench import serve as serve_bench

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def serve_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve")
    assert serve_bench.main(["--tiny", "--out", str(out)]) == 0
    return out


def _positive_row(row):
    assert row["errors"] == 0 and row["other_5xx"] == 0, row["statuses"]
    assert row["answered"] > 0 and row["queries_per_second"] > 0 and row["wall_s"] > 0
    assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert row["startup_s"] > 0 and 0 < row["ready_rss_mb"] <= row["peak_rss_mb"]
    assert row["batches"] > 0 and 1 <= row["mean_batch"] <= row["max_batch"]
    assert row["server_cpu_ms_per_query"] > 0 and row["machine"]["cores"] >= 1
    assert set(row["stage_ms_per_query"]) >= {"text", "anchor", "vision", "tower", "search"}
    assert row["server"]["clean_stop"] and row["server"]["tracebacks"] == 0
    (one,) = row["rounds"]  # --tiny: one round
    assert one["answered"] == row["answered"] and one["queries_per_second"] > 0


def test_serve_tiny_closed_loop_rows(serve_out):
    result = json.loads((serve_out / "serve.json").read_text())
    assert result["format"] == "cvr-sdgm/bench-serve/1" and result["tiny"] is True
    assert set(result) >= {"gallery", "checkpoint", "runs", "overload", "ratios", "machine", "settings",
                           "wall_seconds", "load_average"}
    assert result["gallery"]["videos"] == 6 and result["export"] is None  # torch only: no ONNX export
    assert [(r["backend"], r["max_batch"]) for r in result["runs"]] == [("torch", 32), ("torch", 1)]
    for row in result["runs"]:
        _positive_row(row)
        assert row["requests"] == row["answered"] == 12 and row["rejected_503"] == 0
        assert row["statuses"] == {"200": 12} and not row["overload"]
    assert result["runs"][1]["mean_batch"] == 1  # --max-batch 1: never more
    (ratio,) = result["ratios"]
    assert ratio["backend"] == "torch" and ratio["max_batch"] == 32 and ratio["qps_ratio"] > 0
    assert ratio["qps_ratio_per_round"] == [pytest.approx(ratio["qps_ratio"])] and ratio["cpu_ratio"] > 0


def test_serve_tiny_overload_counts_503s(serve_out):
    over = json.loads((serve_out / "serve.json").read_text())["overload"]
    _positive_row(over)
    assert over["overload"] and over["clients"] == 12 and over["max_queue"] == 4 and over["requests"] == 24
    assert over["answered"] + over["rejected_503"] == over["requests"]
    assert over["rejected_503"] == over["rejected_counter"]  # the client's count is the server's


def test_serve_tiny_writes_markdown_summary_and_plot(serve_out):
    table = (serve_out / "serve.md").read_text()
    assert table.startswith("**Serving over HTTP**") and "Micro-batching gain (torch)" in table
    assert "| backend | max batch | max queue | clients x queries |" in table and "**Overload**" in table
    assert "Machine:" in table and "all stopped cleanly" in table
    assert (serve_out / "serve.png").read_bytes()[:8] == PNG_MAGIC
