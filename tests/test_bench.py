"""The benchmark scripts run once each at a tiny size, so that they cannot rot. Nothing here asserts a
timing: only that the outputs exist and are well formed (tables, JSON keys, PNGs, mean and standard
deviation computed from the per-seed values) and that the README section is regenerated from them."""
import json
import shutil
import statistics

import pytest

from bench import anchor_variants as variants_bench
from bench import common
from bench import latency as latency_bench
from bench import recall as recall_bench
from bench import report as report_bench

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def recall_out(msrvtt, tmp_path_factory):
    out = tmp_path_factory.mktemp("recall")
    argv = ["--tiny", "--root", msrvtt, "--collection", "msrvtt10k", "--feature", "resnext101-resnet152",
            "--out", str(out), "--variants"]
    assert recall_bench.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def latency_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("latency")
    assert latency_bench.main(["--tiny", "--out", str(out)]) == 0
    return out


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_recall_tiny_writes_every_row_with_mean_and_std_over_seeds(recall_out):
    result = json.loads((recall_out / "recall.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["text-minilm", "text-rivrl", "full", "full-ssss", "meanpool", "spatial", "channel", "no-local",
                     "no-concept", "anchors-teacher28", "anchors-student4", "anchors-student2", "anchors-student1",
                     "per-query-2", "per-query-4", "latent", "latent-student2", "latent-student1", "glscl",
                     "full-rerank", "glscl-rerank"]
    assert [r["name"] for r in result["rows"] if r["leaks_answer"]] == ["full-ssss"]
    assert result["sizes"]["seeds"] == [0, 1] and result["machine"]["cores"] >= 1
    t2v = [m for m in recall_bench.METRICS if m.startswith("t2v")] + ["sumr"]
    for row in result["rows"]:
        assert sorted(row["per_seed"]) == ["0", "1"]
        # The reranker rows come from the search path, which ranks videos for a query: t2v only.
        for metric in recall_bench.METRICS:
            values = [row["per_seed"][s][metric] for s in ("0", "1")]
            if row["rerank_of"] and metric not in t2v:
                assert values == [None, None] and row["mean"][metric] is None
                continue
            assert row["mean"][metric] == pytest.approx(statistics.fmean(values))
            assert row["std"][metric] == pytest.approx(statistics.stdev(values))
    by_name = {r["name"]: r for r in result["rows"]}
    # The student-4 anchor row is the fair-protocol model on its own anchors: the same numbers.
    assert by_name["anchors-student4"]["per_seed"] == by_name["full"]["per_seed"]
    # Each reranker row trained one reranker per seed on its base row's checkpoint, and the search
    # path without it gives the base row's t2v numbers (the same scores, the same tie rule).
    for name, base in (("full-rerank", "full"), ("glscl-rerank", "glscl")):
        row = by_name[name]
        assert row["rerank_of"] == base and sorted(row["reranker"]) == ["0", "1"]
        for seed, first in row["first_stage_per_seed"].items():
            assert first["t2v_r1"] == pytest.approx(by_name[base]["per_seed"][seed]["t2v_r1"])
            assert first["t2v_mnr"] == pytest.approx(by_name[base]["per_seed"][seed]["t2v_mnr"])
    agreement = recall_bench.first_stage_agreement(result["rows"])
    assert sorted(agreement) == ["full-rerank", "glscl-rerank"] and all(v == 0 for v in agreement.values())
    table = (recall_out / "recall.md").read_text()
    assert table.splitlines()[0] == "| " + " | ".join(recall_bench.HEADERS) + " |"
    assert "LEAKS THE ANSWER" in table and "±" in table and "Machine:" in table
    assert "| GLSCL + generative reranker |" in table and "`cvr evaluate --gallery" in table
    assert _is_png(recall_out / "recall.png")


def test_anchor_variants_tiny_joins_recall_rows_and_times_each_route(recall_out, tmp_path):
    assert variants_bench.main(["--tiny", "--recall", str(recall_out / "recall.json"), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "anchor_variants.json").read_text())
    recall = {r["name"]: r for r in json.loads((recall_out / "recall.json").read_text())["rows"]}
    rows = result["rows"]
    assert [r["row"] for r in rows] == [v[0] for v in variants_bench.VARIANTS]
    for row in rows:  # R@1 is the recall row's, the latency is measured here
        assert row["t2v_r1"] == recall[row["row"]]["mean"]["t2v_r1"] and row["seeds"] == ["0", "1"]
        assert row["p50_ms"] > 0 and (row["anchor_p50_ms"] > 0) == (row["route"] is not None)
        # The latent route skips decoding and the ResNet-50: no vision stage runs on it.
        assert (row["vision_p50_ms"] > 0) == (row["route"] == "pixels")
    table = (tmp_path / "anchor_variants.md").read_text()
    assert table.splitlines()[0] == "| " + " | ".join(variants_bench.HEADERS) + " |" and "`latent-student1`" in table
    assert _is_png(tmp_path / "anchor_variants.png")
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"rows": [r for r in recall.values() if r["name"] != "latent"], "machine": {}}))
    with pytest.raises(SystemExit, match="no row latent"):
        variants_bench.main(["--tiny", "--recall", str(bare), "--out", str(tmp_path / "x")])


def test_latency_tiny_writes_stages_end_to_end_and_gallery_sizes(latency_out):
    result = json.loads((latency_out / "latency.json").read_text())
    assert set(result) >= {"stages", "end_to_end", "gallery_size", "backends", "machine", "settings"}
    anchors = {(r["variant"], r["batch"]) for r in result["stages"] if r["stage"] == "anchor generation"}
    assert len(anchors) == 8 and {b for _, b in anchors} == {1, 4}  # 4 step counts x 2 batch sizes
    timed = {r["backend"] for r in result["stages"] if r["stage"].startswith("gallery search")}
    assert "torch" in timed and timed == {r["backend"] for r in result["end_to_end"]}
    # --tiny times torch only; every other backend is listed with the reason it was not timed.
    assert result["backends"]["torch"] is None
    assert all(isinstance(why, str) and why for name, why in result["backends"].items() if name != "torch")
    for row in result["stages"] + result["end_to_end"] + result["gallery_size"]:
        assert 0 < row["p50_ms"] <= row["p95_ms"] and row["threads"] == 1
    recalls = [r["recall_at_10"] for r in result["gallery_size"] if "recall_at_10" in r]
    assert len(recalls) == 4 and all(0.0 <= r <= 1.0 for r in recalls)  # two sizes x two batches, one M
    assert {r["stage"] for r in result["gallery_size"]} == {"exhaustive", "two-stage"}
    # Memory of the process that searched, over its memory with the models loaded.
    assert all(r["peak_over_models_gb"] >= 0 and r["peak_over_gallery"] >= 0 for r in result["gallery_size"])
    # Heads: each head at each size, exhaustive and two-stage; the reranker per step count over each head.
    heads = result["heads"]
    plain = {(r["head"], r["gallery"], r["search"].split()[0]) for r in heads if not r["reranker"]}
    sizes = result["settings"]["head_sizes"]
    assert plain == {(h, n, m) for h in ("cvr", "glscl") for n in sizes for m in ("exhaustive", "two-stage")}
    reranked = {(r["head"], r["reranker"].split()[0]) for r in heads if r["reranker"]}
    assert reranked == {(h, str(n)) for h in ("cvr", "glscl") for n in result["settings"]["rerank_steps"]}
    for row in heads:
        assert 0 < row["p50_ms"] <= row["p95_ms"] and row["threads"] == 1 and row["stages_p50_ms"]["search"] > 0
        assert (row["stages_p50_ms"]["rerank"] > 0) == bool(row["reranker"])
        assert (row["stages_p50_ms"]["anchor"] > 0) == (row["head"] == "cvr")  # GLSCL is text-only
    table = (latency_out / "latency.md").read_text()
    assert "| stage | variant | backend | batch | p50 ms | p95 ms |" in table and "queries/s" in table
    assert "**Heads and reranker**" in table and "| GLSCL (text-only) | 5 DDIM steps, M = 32 |" in table
    assert _is_png(latency_out / "latency_stages.png") and _is_png(latency_out / "latency_sizes.png")
    assert _is_png(latency_out / "latency_heads.png")


def test_report_embeds_tables_and_plots_between_the_markers(recall_out, latency_out, tmp_path):
    machine = tmp_path / "results" / "some-cpu-2c"
    machine.mkdir(parents=True)
    for source, names in ((recall_out, ("recall.md", "recall.png")),
                          (latency_out, ("latency.md", "latency_stages.png", "latency_sizes.png",
                                         "latency_heads.png"))):
        for name in names:
            shutil.copy(source / name, machine / name)
        stem = names[0].split(".")[0]
        result = json.loads((source / f"{stem}.json").read_text())
        result["tiny"] = False  # smoke runs are never reported: pretend these are real
        (machine / f"{stem}.json").write_text(json.dumps(result))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nintro\n\n{report_bench.BEGIN}\nSTALE SECTION\n{report_bench.END}\n\n## Layout\n")
    assert report_bench.main(["--readme", str(readme), "--results", str(tmp_path / "results")]) == 0
    text = readme.read_text()
    assert "STALE SECTION" not in text and text.startswith("# x\n\nintro\n") and text.endswith("## Layout\n")
    assert "### some-cpu-2c:" in text and "| t2v R@1 |" in text and "queries/s" in text
    assert "](results/some-cpu-2c/recall.png)" in text and "](results/some-cpu-2c/latency_sizes.png)" in text
    assert "](results/some-cpu-2c/latency_heads.png)" in text and "Time budget: about" in text
    once = text
    assert report_bench.main(["--readme", str(readme), "--results", str(tmp_path / "results")]) == 0
    assert readme.read_text() == once  # idempotent


def test_report_refuses_a_readme_without_markers(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert report_bench.main(["--readme", str(readme), "--results", str(tmp_path)]) == 2
    assert "bench:begin" in capsys.readouterr().err and readme.read_text() == "# no markers\n"


def test_machine_slug_names_the_gpu_else_the_cpu():
    assert common.machine_slug({"cpu": "Intel(R) Xeon(R) Processor", "cores": 2, "gpu": None}) == "intel-xeon-2c"
    assert common.machine_slug({"cpu": "AMD EPYC 7B13 64-Core Processor", "cores": 16,
                                "gpu": "NVIDIA H200"}) == "nvidia-h200-16c"
    assert common.machine_slug({"cpu": "Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz", "cores": 12,
                                "gpu": None}) == "intel-core-i7-8700-12c"
