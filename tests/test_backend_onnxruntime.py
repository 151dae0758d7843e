"""The `onnxruntime` search backend: the torch backend's top-10 (same ids, scores within 1e-4) for a
text-only checkpoint and for a checkpoint with anchors (tiny FLUX generator + ResNet-50), numpy
only, providers reported, one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_export import text_only_export
from test_retrieval import TINY

from engine.cli import main
from engine.retriever import QueryError, Retriever

QUERIES = ["a man and a dog in video number 1", "a red car", "a woman singing in a kitchen", "running dog",
           "a blue guitar and a man cooking"]


@pytest.fixture(scope="module")
def text_only(tmp_path_factory):
    return text_only_export(tmp_path_factory)


@pytest.fixture(scope="module")
def anchored(tmp_path_factory, text_only):
    """A full model: a tiny built-in generator conditioned on MiniLM (so it shares the text encoder
    graph), its anchor store, a checkpoint trained on it, a gallery, and an export of the search
    modules made with the text-only export's module cache."""
    from engine import anchors as A
    from export.onnx import SEARCH_MODULES, ExportOptions, export_onnx

    work = tmp_path_factory.mktemp("anchored")
    common = ["--root", text_only["root"], "--collection", "msrvtt10k"]
    torch.manual_seed(0)
    config = A.BuiltinConfig(image_size=8, fold=2, num_layers=1, num_single_layers=1, attention_head_dim=8,
                             num_attention_heads=2, joint_attention_dim=384, pooled_projection_dim=384,
                             axes_dims_rope=(2, 2, 4), default_steps=2)
    generator = str(A.save_builtin(work / "generator", A.build_transformer(config), config))
    store, checkpoint, gallery = str(work / "store"), str(work / "full"), str(work / "gallery")
    assert main(["anchors", "--generator", generator, *common, "--split", "train,val,test", "--out", store,
                 "--image-size", "64", "--device", "cpu", "--quiet"]) == 0
    assert main(["train", *common, "--feature", "resnext101-resnet152", "--out", checkpoint, "--anchors", store]
                + TINY) == 0
    assert main(["index", "--checkpoint", checkpoint, *common, "--out", gallery, "--dtype", "float32", "--quiet"]) == 0
    export = str(work / "export")
    options = ExportOptions(modules=SEARCH_MODULES, module_cache=text_only["cache"])
    export_onnx(checkpoint, export, options)
    return {"checkpoint": checkpoint, "gallery": gallery, "export": export, "generator": generator}


def _same_top10(reference: list, results: list) -> None:
    for ref, got in zip(reference, results, strict=True):
        assert [v for v, _ in got.hits] == [v for v, _ in ref.hits], ref.query
        diff = max(abs(a - b) for (_, a), (_, b) in zip(ref.hits, got.hits, strict=True))
        assert diff <= 1e-4, (ref.query, diff)


def test_text_only_top10_equals_torch(text_only):
    ort = Retriever(text_only["checkpoint"], text_only["gallery"], backend="onnxruntime",
                    export_dir=text_only["export"])
    reference = Retriever(text_only["checkpoint"], text_only["gallery"]).search(QUERIES, k=10)
    _same_top10(reference, ort.search(QUERIES, k=10))
    assert all(p == ["CPUExecutionProvider"] for p in ort.pipeline.providers.values())
    assert ort.last_timings.per_query_ms()["text"] > 0


def test_the_retriever_runs_an_export_folder_and_never_exports(text_only):
    with pytest.raises(QueryError, match="make one with `cvr export --checkpoint"):
        Retriever(text_only["checkpoint"], text_only["gallery"], backend="onnxruntime")


def test_cli_search_reuses_the_default_export(text_only, capsys):
    """Without --export, `cvr search` makes (or, here, reuses) the export in CHECKPOINT/onnx."""
    manifest = os.path.join(text_only["export"], "manifest.json")
    stamp = os.stat(manifest).st_mtime_ns
    assert main(["search", "--gallery", text_only["gallery"], "--checkpoint", text_only["checkpoint"], "-k", "3",
                 "--backend", "onnxruntime", "a red car"]) == 0
    captured = capsys.readouterr()
    assert os.stat(manifest).st_mtime_ns == stamp and captured.err == ""
    assert "onnxruntime: CPUExecutionProvider" in captured.out


def test_anchored_top10_equals_torch(anchored):
    reference = Retriever(anchored["checkpoint"], anchored["gallery"])
    ort = Retriever(anchored["checkpoint"], anchored["gallery"], backend="onnxruntime",
                    export_dir=anchored["export"])
    assert ort.pipeline.anchors is not None and "vision" in ort.pipeline.providers
    _same_top10(reference.search(QUERIES, k=10), ort.search(QUERIES, k=10))
    timings = ort.last_timings.per_query_ms()
    assert timings["anchor"] > 0 and timings["vision"] > 0
    # The anchors themselves: the same numpy noise + ONNX FLUX steps give torch's pixels (rounding aside).
    torch_images = reference.pipeline.generator.generate(QUERIES)
    assert np.abs(ort.pipeline.generate(QUERIES).astype(int) - torch_images.astype(int)).max() <= 1


def test_anchored_export_shares_the_text_encoder_and_skips_the_video_tower(anchored, text_only):
    with open(os.path.join(anchored["export"], "manifest.json"), encoding="utf-8") as handle:
        manifest = json.load(handle)
    assert set(manifest["modules"]) == {"text_encoder", "generator_step", "vision", "query_tower", "scorer"}
    assert manifest["anchors"]["generator_text"]["module"] == "text_encoder"  # the same frozen MiniLM
    for module in manifest["modules"].values():
        assert module["parity"]["fp32"]["max_abs_diff"] <= 1e-4
    shared = json.load(open(os.path.join(text_only["export"], "manifest.json"), encoding="utf-8"))
    assert manifest["modules"]["text_encoder"]["files"]["fp32"]["sha256"] == \
        shared["modules"]["text_encoder"]["files"]["fp32"]["sha256"]


def test_cli_search_with_the_onnxruntime_backend(anchored, capsys):
    argv = ["search", "--gallery", anchored["gallery"], "--checkpoint", anchored["checkpoint"], "-k", "3",
            "--backend", "onnxruntime", "--export", anchored["export"]]
    assert main(argv + ["a red car"]) == 0
    out = capsys.readouterr().out
    assert "| rank | video id | score |" in out and "onnxruntime: CPUExecutionProvider" in out
    assert main(argv + ["--json", "a red car", "a dog"]) == 0
    assert [len(r["results"]) for r in json.loads(capsys.readouterr().out)] == [3, 3]


TORCH_BLOCKED = """
import sys
sys.modules["torch"] = None  # any `import torch` now fails
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cvr_search_with_onnxruntime_runs_without_torch(anchored, tmp_path):
    """The whole query path (text, anchors, ResNet-50, tower, search) through `cvr search --backend
    onnxruntime` in a process where importing torch fails: the same ranking as in this process."""
    argv = ["search", "--gallery", anchored["gallery"], "--checkpoint", anchored["checkpoint"], "-k", "4",
            "--backend", "onnxruntime", "--export", anchored["export"], "--json", *QUERIES[:2]]
    done = subprocess.run([sys.executable, "-c", TORCH_BLOCKED, *argv], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    ours = Retriever(anchored["checkpoint"], anchored["gallery"], backend="onnxruntime",
                     export_dir=anchored["export"]).search(QUERIES[:2], k=4)
    assert [[r["video_id"] for r in q["results"]] for q in json.loads(done.stdout)] == \
        [[v for v, _ in r.hits] for r in ours]


def test_export_of_another_checkpoint_is_refused(anchored, text_only):
    with pytest.raises(QueryError, match="exported from checkpoint"):
        Retriever(anchored["checkpoint"], anchored["gallery"], backend="onnxruntime", export_dir=text_only["export"])


def test_missing_export_folder_is_one_line(text_only, tmp_path, capsys):
    code = main(["search", "--gallery", text_only["gallery"], "--checkpoint", text_only["checkpoint"],
                 "--backend", "onnxruntime", "--export", str(tmp_path / "none"), "a dog"])
    err = capsys.readouterr().err
    assert code == 2 and "no such export folder" in err and err.count("\n") == 1


def test_tensorrt_backend_without_tensorrt_is_one_line(text_only):
    from engine.backends.tensorrt import tensorrt_unavailable

    if tensorrt_unavailable() is None:
        pytest.skip("TensorRT and a GPU are available here")
    with pytest.raises(QueryError, match="TensorRT") as error:
        Retriever(text_only["checkpoint"], text_only["gallery"], backend="tensorrt", export_dir=text_only["export"])
    assert "\n" not in str(error.value)


def test_cuda_request_without_a_gpu_reports_the_cpu_provider(text_only, caplog):
    from engine.backends.onnxruntime import OnnxRuntimeBackend, gpu_present

    if gpu_present():
        pytest.skip("a GPU is present: CUDA would really run")
    engine = OnnxRuntimeBackend(text_only["export"], device="cuda", threads=1)
    engine.run("scorer", {"query_lat": np.zeros((1, 2, 32), np.float32), "query_con": np.zeros((1, 2, 11), np.float32),
                          "video_lat": np.zeros((2, 2, 32), np.float32), "video_con": np.zeros((2, 2, 11), np.float32)})
    assert engine.providers["scorer"] == ["CPUExecutionProvider"] and engine.provider == "CPUExecutionProvider"
    assert "CUDAExecutionProvider was asked for" in caplog.text
