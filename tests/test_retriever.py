"""The engine's front door: `Retriever.search` and `cvr search`, backends and bad input."""
import json
import logging
import os

import numpy as np
import pytest
import torch
from msrvtt_fixture import write_msrvtt_fixture
from test_retrieval import TINY

from engine.cli import main
from engine.model import Embeddings
from engine.retriever import QueryError, Retriever


@pytest.fixture(scope="module")
def engine_files(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("collection"))
    write_msrvtt_fixture(root)
    work = tmp_path_factory.mktemp("engine")
    checkpoint, gallery = str(work / "ckpt"), str(work / "gallery")
    common = ["--root", root, "--collection", "msrvtt10k"]
    assert main(["train", *common, "--feature", "resnext101-resnet152", "--out", checkpoint] + TINY) == 0
    assert main(["index", "--checkpoint", checkpoint, *common, "--out", gallery, "--dtype", "float32", "--quiet"]) == 0
    return root, checkpoint, gallery


@pytest.fixture(scope="module")
def retriever(engine_files):
    _, checkpoint, gallery = engine_files
    return Retriever(checkpoint, gallery)


def test_search_matches_scoring_the_whole_gallery_directly(retriever):
    texts = ["a man and a dog in video number 1", "a red car"]
    results = retriever.search(texts, k=5)
    model = retriever.pipeline.model
    with torch.no_grad():
        query = model.encode_text(texts)
        videos = Embeddings(torch.from_numpy(np.array(retriever.gallery.lat)),
                            torch.from_numpy(np.array(retriever.gallery.con)))
        scores = model.score(query, videos)
    for result, row in zip(results, scores, strict=True):
        order = torch.sort(row, descending=True, stable=True)
        assert [v for v, _ in result.hits] == [retriever.gallery.ids[i] for i in order.indices[:5].tolist()]
        torch.testing.assert_close(torch.tensor([s for _, s in result.hits]), order.values[:5])
    timings = retriever.last_timings.per_query_ms()
    assert set(timings) == {"text", "anchor", "vision", "tower", "search"} and timings["text"] > 0



def test_the_first_search_is_reported_cold_and_the_next_warm(engine_files, capsys):
    _, checkpoint, gallery = engine_files
    fresh = Retriever(checkpoint, gallery)
    fresh.search(["a dog"], k=2)
    assert fresh.last_timings.cold and "cold: the first search" in fresh.last_timings.describe()
    fresh.search(["a dog"], k=2)
    assert not fresh.last_timings.cold and "(ms, warm; exhaustive search)" in fresh.last_timings.describe()


def test_triton_backend_returns_the_torch_ranking(engine_files, retriever):
    _, checkpoint, gallery = engine_files
    fused = Retriever(checkpoint, gallery, backend="triton")
    texts = ["a woman singing", "a blue guitar in a kitchen", "running dog"]
    for ref, got in zip(retriever.search(texts, k=6), fused.search(texts, k=6), strict=True):
        assert [v for v, _ in ref.hits] == [v for v, _ in got.hits]
        torch.testing.assert_close(torch.tensor([s for _, s in got.hits]), torch.tensor([s for _, s in ref.hits]),
                                   atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("texts, k, message", [
    ([""], 3, "empty"), (["   \t "], 3, "whitespace"), (["a dog"], 0, "between 1"), (["a dog"], 10**6, "between 1"),
    ([], 3, "no query"),
])
def test_bad_queries_are_refused(retriever, texts, k, message):
    with pytest.raises(QueryError, match=message):
        retriever.search(texts, k=k)


def test_long_query_is_truncated_with_a_warning(retriever, caplog):
    with caplog.at_level(logging.WARNING):
        results = retriever.search(["dog " * 500], k=2)
    assert len(results[0].hits) == 2 and "truncated" in caplog.text


def test_cli_search_table_json_and_query_file(engine_files, tmp_path, capsys):
    _, checkpoint, gallery = engine_files
    assert main(["search", "--gallery", gallery, "--checkpoint", checkpoint, "a dog runs", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "| rank | video id | score |" in out and "latency per query" in out
    queries = tmp_path / "q.txt"
    queries.write_text("a dog runs\na man cooking\n\n", encoding="utf-8")
    assert main(["search", "--gallery", gallery, "--checkpoint", checkpoint, "--queries", str(queries), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in parsed] == ["a dog runs", "a man cooking"] and len(parsed[0]["results"]) == 10


@pytest.mark.parametrize("case", ["non-utf8", "empty", "k0", "k-large", "no-gallery", "foreign-gallery",
                                  "no-checkpoint"])
def test_cli_search_bad_input_is_one_line(engine_files, tmp_path, capsys, case):
    root, checkpoint, gallery = engine_files
    argv = ["search", "--gallery", gallery, "--checkpoint", checkpoint]
    if case == "non-utf8":
        bad = tmp_path / "bad.txt"
        bad.write_bytes(b"a dog \xff\xfe runs\n")
        argv += ["--queries", str(bad)]
    elif case == "empty":
        argv += ["  "]
    elif case == "k0":
        argv += ["a dog", "-k", "0"]
    elif case == "k-large":
        argv += ["a dog", "-k", "1000"]
    elif case == "no-gallery":
        argv = ["search", "--gallery", str(tmp_path / "none"), "--checkpoint", checkpoint, "a dog"]
    elif case == "foreign-gallery":
        other = str(tmp_path / "other")
        assert main(["train", "--root", root, "--collection", "msrvtt10k", "--feature", "resnext101-resnet152",
                     "--out", other, "--seed", "1"] + TINY) == 0
        capsys.readouterr()
        argv = ["search", "--gallery", gallery, "--checkpoint", other, "a dog"]
    elif case == "no-checkpoint":
        argv = ["search", "--gallery", gallery, "--checkpoint", str(tmp_path / "none"), "a dog"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("cvr: error:") and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "none")


@pytest.mark.parametrize("device", ["cuda", "no-such-device"])
def test_cli_search_bad_device_is_one_line(engine_files, capsys, device):
    _, checkpoint, gallery = engine_files
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    code = main(["search", "--gallery", gallery, "--checkpoint", checkpoint, "--device", device, "a dog"])
    err = capsys.readouterr().err
    assert code == 2 and "device" in err and err.count("\n") == 1
