"""`cvr export`: ONNX files, manifest and parity figures, the cache, one-line errors, the pieces the
numpy backend shares, the fp16 variants, TensorRT (skipped without it) and bench/export.py.

Dynamo export takes seconds per module, so one tiny text-only checkpoint is exported once per
test session (`text_only_export`, shared with test_backend_onnxruntime.py)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from msrvtt_fixture import write_msrvtt_fixture
from test_retrieval import TINY

from engine.cli import main

_BUILT: dict = {}


def text_only_export(tmp_path_factory) -> dict:
    """A tiny text-only checkpoint (MiniLM text encoder), its float32 gallery and its export by
    `cvr export` into the default folder CKPT/onnx, with a module cache; built once per session."""
    if "text_only" not in _BUILT:
        root = str(tmp_path_factory.mktemp("export_collection"))
        write_msrvtt_fixture(root)
        work = tmp_path_factory.mktemp("export")
        checkpoint, gallery, cache = str(work / "ckpt"), str(work / "gallery"), str(work / "module_cache")
        common = ["--root", root, "--collection", "msrvtt10k"]
        assert main(["train", *common, "--feature", "resnext101-resnet152", "--out", checkpoint] + TINY) == 0
        assert main(["index", "--checkpoint", checkpoint, *common, "--out", gallery, "--dtype", "float32",
                     "--quiet"]) == 0
        assert main(["export", "--checkpoint", checkpoint, "--format", "onnx", "--module-cache", cache]) == 0
        _BUILT["text_only"] = {"root": root, "checkpoint": checkpoint, "gallery": gallery, "cache": cache,
                               "export": os.path.join(checkpoint, "onnx")}
    return _BUILT["text_only"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return text_only_export(tmp_path_factory)


def _manifest(folder: str) -> dict:
    with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("cvr: error:") and err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------------------------------------
# The export


def test_export_writes_every_module_checked_and_within_tolerance(exported):
    import onnx

    from engine.files import sha256_file

    manifest = _manifest(exported["export"])
    assert set(manifest["modules"]) == {"text_encoder", "query_tower", "video_tower", "scorer"}
    assert manifest["opset"] == 18 and manifest["precisions"] == ["fp32"] and manifest["anchors"] is None
    assert os.path.isfile(os.path.join(exported["export"], manifest["text"]["file"]))
    for name, module in manifest["modules"].items():
        entry = module["files"]["fp32"]
        path = os.path.join(exported["export"], entry["file"])
        assert sha256_file(path) == entry["sha256"]
        onnx.checker.check_model(path)
        parity = module["parity"]["fp32"]
        assert parity["max_abs_diff"] <= 1e-4 and parity["tolerance"] == 1e-4, name
        assert [case["sizes"]["batch"] for case in parity["cases"]] == [1, 6]
        graph = onnx.load(path).graph
        first = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
        assert all(dims[0] in ("batch", "videos") for dims in first.values()), first  # dynamic batch axes
    assert manifest["modules"]["text_encoder"]["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "tokens"}
    assert manifest["modules"]["video_tower"]["dynamic_axes"]["frames"] == {"0": "batch", "1": "frames"}


def test_second_export_reuses_the_cached_files(exported, capsys):
    folder = exported["export"]
    def stamps():  # the exported files, less the verified stamp a load may write (engine.integrity)
        return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)
                if name != ".verified.json"}
    before = stamps()
    assert main(["export", "--checkpoint", exported["checkpoint"], "--format", "onnx", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("reused ")
    assert stamps() == before


def test_exported_video_tower_reproduces_the_gallery(exported):
    """The ONNX video tower, run by the numpy backend on the collection's frames, gives the
    gallery that `cvr index` wrote with PyTorch."""
    from engine.backends.onnxruntime import OnnxRuntimeBackend
    from engine.datasets import Collection, video_frames
    from engine.gallery import Gallery

    gallery = Gallery.load(exported["gallery"])
    bigfile = Collection(exported["root"], "msrvtt10k").features("resnext101-resnet152")
    frames, mask = video_frames(bigfile, gallery.ids, 64)
    lat, con = OnnxRuntimeBackend(exported["export"], threads=1).encode_videos(frames, mask)
    assert np.abs(lat - gallery.lat).max() <= 1e-4
    assert np.abs(con - gallery.con).max() <= 1e-4


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def test_damaged_checkpoint_is_one_line(exported, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(exported["checkpoint"], damaged, ignore=shutil.ignore_patterns("onnx"))
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = _one_line_error(capsys, main(["export", "--checkpoint", str(damaged), "--out", str(tmp_path / "out")]))
    assert "model.safetensors: checksum mismatch" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize("case", ["gallery", "empty", "missing", "no-weights"])
def test_foreign_folder_is_one_line(exported, tmp_path, capsys, case):
    folder = {"gallery": exported["gallery"], "empty": str(tmp_path), "missing": str(tmp_path / "none")}.get(case)
    if case == "no-weights":
        folder = str(tmp_path / "copy")
        shutil.copytree(exported["checkpoint"], folder, ignore=shutil.ignore_patterns("onnx", "model.safetensors"))
    err = _one_line_error(capsys, main(["export", "--checkpoint", folder, "--out", str(tmp_path / "out")]))
    assert "checkpoint" in err or "model.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_out_folder_that_is_not_an_export_is_not_replaced(exported, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    _one_line_error(capsys, main(["export", "--checkpoint", exported["checkpoint"], "--out", str(tmp_path)]))
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_tensorrt_export_without_tensorrt_is_one_line(exported, capsys):
    from engine.backends.tensorrt import tensorrt_unavailable

    if tensorrt_unavailable() is None:
        pytest.skip("TensorRT and a GPU are available here")
    err = _one_line_error(capsys, main(["export", "--checkpoint", exported["checkpoint"], "--format", "tensorrt"]))
    assert "TensorRT" in err


# ---------------------------------------------------------------------------------------------
# Pieces: fp16 variants, the RIVRL text encoder, tokenizers


def test_fp16_variant_of_the_scorer_runs_within_fp16_tolerance(exported, tmp_path):
    import onnx

    from engine.checkpoint import load_checkpoint
    from export.graphs.scorer import scorer_spec
    from export.onnx import export_module
    from export.parity import check_parity, ort_runner, parity_sizes

    spec = scorer_spec(load_checkpoint(exported["checkpoint"]))
    path = str(tmp_path / "scorer.fp16.onnx")
    export_module(spec, path, 18, "fp16")
    inputs = onnx.load(path).graph.input
    assert {i.type.tensor_type.elem_type for i in inputs} == {onnx.TensorProto.FLOAT16}
    shapes = _manifest(exported["export"])["shapes"]
    parity = check_parity(spec, ort_runner(path, list(spec.outputs)), "fp16", parity_sizes(shapes))
    assert parity["max_abs_diff"] <= parity["tolerance"] <= 0.02 * max(1.0, parity["cases"][1]["max_abs_ref"])


def test_rivrl_text_encoder_exports_and_tokenizes_like_torch(tmp_path):
    from engine.backends.onnxruntime import RivrlTokenizer
    from engine.text_rivrl import RivrlTextEncoder, Vocabulary
    from export.graphs.text_encoder import text_encoder_spec
    from export.onnx import export_module, tokenizer_section
    from export.parity import check_parity, ort_runner

    torch.manual_seed(0)
    vocab = Vocabulary(["a", "dog", "runs", "red", "car", "man"])
    encoder = RivrlTextEncoder(vocab, word_dim=8, rnn_size=6, kernel_sizes=(2, 3, 4), kernel_num=5, max_length=9)
    encoder.eval()
    spec = text_encoder_spec(encoder)
    path = str(tmp_path / "rivrl.onnx")
    export_module(spec, path, 18)
    sizes = [{"batch": 1, "tokens": 1}, {"batch": 5, "tokens": 9}]  # one position: the CNN's padded case
    parity = check_parity(spec, ort_runner(path, list(spec.outputs)), "fp32", sizes)
    assert parity["max_abs_diff"] <= 1e-4
    section, files = tokenizer_section(encoder, "tok", "text_encoder")
    (tmp_path / section["file"]).write_text(files[section["file"]])
    ours = RivrlTokenizer(str(tmp_path / section["file"]), section["max_length"])
    texts = ["A dog runs!", "zebra", "a red car, a man and a dog and a dog and a dog"]
    batch = encoder.tokenize(texts)
    ids, mask = ours(texts)
    assert np.array_equal(ids, batch["input_ids"].numpy()) and np.array_equal(mask, batch["attention_mask"].numpy())
    assert ours.n_tokens(texts) == encoder.n_tokens(texts)


def test_exported_tokenizer_matches_transformers(exported):
    from engine.backends.onnxruntime import build_tokenizer
    from engine.text import MiniLMEncoder

    manifest = _manifest(exported["export"])
    ours = build_tokenizer(exported["export"], manifest["text"])
    theirs = MiniLMEncoder(max_length=manifest["text"]["max_length"])
    texts = ["a man and a dog", "Crème brûlée — naïve café", "x", "word " * 100, "don't STOP 1,234.5!"]
    ids, mask = ours(texts)
    batch = theirs.tokenize(texts)
    assert np.array_equal(ids, batch["input_ids"].numpy()) and np.array_equal(mask, batch["attention_mask"].numpy())
    assert ours.n_tokens(texts) == theirs.n_tokens(texts)


# ---------------------------------------------------------------------------------------------
# bench/export.py


def test_bench_export_tiny(exported, tmp_path, capsys):
    from bench.export import main as bench_main

    assert bench_main(["--checkpoint", exported["checkpoint"], "--tiny", "--out", str(tmp_path / "bench")]) == 0
    text = (tmp_path / "bench.md").read_text()
    assert "| module | batch | threads | PyTorch eager ms | ONNX Runtime ms |" in text
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {r["module"] for r in rows} == {"text_encoder", "query_tower", "video_tower", "scorer"}
    assert {r["batch"] for r in rows} == {1, 2} and all(r["onnxruntime_ms"] > 0 for r in rows)


# ---------------------------------------------------------------------------------------------
# TensorRT: only where it is installed and a GPU is present


def _require_tensorrt():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (optional extra `tensorrt`)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engines_build_with_parity_and_reuse(exported, tmp_path, precision):
    _require_tensorrt()
    from export.tensorrt import TensorRTOptions, export_tensorrt

    out = str(tmp_path / "trt")
    shutil.copytree(exported["export"], out)
    options = TensorRTOptions(precision=precision, module_cache=exported["cache"], workspace_gb=1.0)
    result = export_tensorrt(exported["checkpoint"], out, options)
    assert not result.reused and set(result.manifest["modules"]) == set(_manifest(out)["modules"])
    for name, record in result.manifest["modules"].items():
        assert record["parity"]["max_abs_diff"] <= record["parity"]["tolerance"], name
        assert os.path.isfile(os.path.join(result.folder, record["file"]))
    assert os.path.getsize(os.path.join(result.folder, "timing.cache")) > 0
    assert export_tensorrt(exported["checkpoint"], out, options).reused


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_backend_returns_the_torch_top10(exported, tmp_path):
    _require_tensorrt()
    from engine.retriever import Retriever
    from export.tensorrt import TensorRTOptions, export_tensorrt

    out = str(tmp_path / "trt")
    shutil.copytree(exported["export"], out)
    export_tensorrt(exported["checkpoint"], out, TensorRTOptions(precision="fp32"))
    texts = ["a man and a dog in video number 1", "a red car", "a woman singing"]
    ref = Retriever(exported["checkpoint"], exported["gallery"]).search(texts, k=10)
    got = Retriever(exported["checkpoint"], exported["gallery"], backend="tensorrt", export_dir=out).search(texts, k=10)
    for r, g in zip(ref, got, strict=True):
        assert [v for v, _ in r.hits] == [v for v, _ in g.hits]
        assert max(abs(a - b) for (_, a), (_, b) in zip(r.hits, g.hits, strict=True)) <= 1e-4


def test_masked_bigru_operator_runs_eagerly_as_run_gru():
    from engine.model import run_gru
    from export.graphs.gru import MaskedBiGRU

    torch.manual_seed(0)
    gru = torch.nn.GRU(6, 4, batch_first=True, bidirectional=True)
    x = torch.randn(4, 7, 6)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 3, 1, 0])[:, None]  # a row without any valid step too
    with torch.no_grad():
        torch.testing.assert_close(MaskedBiGRU(gru)(x, mask.long()), run_gru(gru, x, mask))


def test_a_tampered_export_is_refused_by_its_digests(exported, tmp_path, capsys):
    """Same-size edits of a graph (mtime kept, new inode) and edited manifest fields are caught."""
    from engine.backends.onnxruntime import ExportedModelError, OnnxRuntimeBackend

    folder = tmp_path / "export"
    shutil.copytree(exported["export"], folder, ignore=shutil.ignore_patterns(".verified.json"))
    manifest = json.loads((folder / "manifest.json").read_text())
    name, module = next(iter(manifest["modules"].items()))
    graph = folder / module["files"]["fp32"]["file"]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.unlink()
    graph.write_bytes(bytes(data))
    backend = OnnxRuntimeBackend(str(folder), threads=1)
    with pytest.raises(ExportedModelError, match=f"{graph.name}: checksum mismatch.*cvr export --force"):
        backend.module_file(name)
    assert main(["doctor", str(folder)]) == 2
    assert "checksum mismatch" in capsys.readouterr().out
    manifest["checkpoint"]["id"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportedModelError, match="manifest.json: edited or damaged"):
        OnnxRuntimeBackend(str(folder), threads=1)
