"""The generative reranker (engine/rerank.py, engine/reranking.py, training/rerank.py): the denoiser's
symmetry, the schedule and DDIM against their formulas, seeded noise, a tiny training run, and
`cvr search --rerank` / `cvr evaluate --rerank` end to end."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN
from test_glscl import TINY_GLSCL

from engine import files
from engine.cli import main
from engine.integrity import seal
from engine.rerank import Denoiser, Diffusion, TorchReranker, load_reranker
from engine.reranking import (
    RerankConfig,
    RerankerError,
    cosine_alphas_cumprod,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    fuse,
    query_noise,
    read_reranker_config,
)
from engine.retriever import QueryError, Retriever

D, H = 8, 12
# 6 steps an epoch on the fixture's 24 train captions: the loss needs some 50 steps to fall clearly
TINY_RERANK = ["--hidden", "32", "--diffusion-steps", "8", "--epochs", "12", "--lr", "3e-3", "--batch-size", "4",
               "--quiet"]


def _inputs(batch: int, m: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, m, generator=g), torch.randint(0, 10, (batch,), generator=g),
            torch.randn(batch, D, generator=g), torch.randn(batch, m, D, generator=g),
            torch.rand(batch, m, generator=g) * 2, torch.ones(batch, m, dtype=torch.bool))


def _reranker(m: int = 5, steps: int = 6, seed: int = 0) -> TorchReranker:
    torch.manual_seed(seed)
    config = RerankConfig(candidates=m, diffusion_steps=steps, hidden=H, latent_dim=D).validate()
    return TorchReranker("mem", config, "base-id", Denoiser(D, H))


# ---------------------------------------------------------------------------------------------
# The denoiser


@pytest.mark.parametrize("m", [1, 7])
def test_permuting_candidates_permutes_the_prediction(m):
    torch.manual_seed(0)
    model = Denoiser(D, H).eval()
    x_t, t, query, cands, scores, mask = _inputs(3, m)
    perm = torch.randperm(m)
    with torch.no_grad():
        out = model(x_t, t, query, cands, scores, mask)
        permuted = model(x_t[:, perm], t, query, cands[:, perm], scores[:, perm], mask[:, perm])
    torch.testing.assert_close(permuted, out[:, perm], atol=1e-6, rtol=1e-5)


def test_padded_candidates_change_nothing_and_predict_zero():
    """A query with fewer than M candidates: what fills the padded places is never read."""
    torch.manual_seed(1)
    model = Denoiser(D, H).eval()
    x_t, t, query, cands, scores, mask = _inputs(2, 7)
    mask[:, 4:] = False
    noisy = [v.clone() for v in (x_t, cands, scores)]
    for v in noisy:
        v[:, 4:] = torch.randn_like(v[:, 4:]) * 100
    with torch.no_grad():
        full = model(x_t, t, query, cands, scores, mask)
        other = model(noisy[0], t, query, noisy[1], noisy[2], mask)
        short = model(x_t[:, :4], t, query, cands[:, :4], scores[:, :4], mask[:, :4])
    torch.testing.assert_close(full, other)
    torch.testing.assert_close(full[:, :4], short, atol=1e-6, rtol=1e-5)
    assert (full[:, 4:] == 0).all()


# ---------------------------------------------------------------------------------------------
# Schedule and DDIM, restated


def test_cosine_schedule_is_the_formula():
    steps, s = 13, 0.008

    def f(t):
        return math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2

    expected, product = [], 1.0
    for t in range(steps):
        product *= 1 - min(1 - f(t + 1) / f(t), 0.999)
        expected.append(product)
    np.testing.assert_allclose(cosine_alphas_cumprod(steps), expected, rtol=1e-12)
    assert list(ddim_timesteps(steps, steps)) == list(range(steps - 1, -1, -1))
    assert list(ddim_timesteps(10, 4)) == [9, 6, 3, 0]
    assert list(ddim_timesteps(50, 1)) == [49]  # one step starts from the noise level of pure noise


def test_one_ddim_step_and_q_sample_are_the_formulas():
    rng = np.random.default_rng(0)
    x_t, x0 = rng.normal(size=(3, 5)).astype(np.float32), rng.uniform(-1, 1, (3, 5)).astype(np.float32)
    a, prev = 0.3, 0.7
    eps = (x_t - np.sqrt(a) * x0) / np.sqrt(1 - a)
    np.testing.assert_allclose(ddim_step(x_t, x0, a, prev), np.sqrt(prev) * x0 + np.sqrt(1 - prev) * eps, rtol=1e-5)
    diffusion = Diffusion(9)
    t, noise = torch.tensor([0, 4, 8]), torch.from_numpy(x_t)
    alpha = cosine_alphas_cumprod(9)[[0, 4, 8]][:, None]
    expected = np.sqrt(alpha) * x0 + np.sqrt(1 - alpha) * x_t
    np.testing.assert_allclose(diffusion.q_sample(torch.from_numpy(x0), t, noise).numpy(), expected, rtol=1e-5)


def test_ddim_sample_clips_and_follows_the_timesteps():
    """A stand-in denoiser that records its timesteps and returns out-of-range x0: each step is the
    formula on the clipped x0, and the sample is the last clipped x0."""
    seen, rng = [], np.random.default_rng(1)
    outputs = [rng.normal(size=(2, 3)).astype(np.float32) * 3 for _ in range(4)]

    def denoise(x, t, *_):
        seen.append(int(t[0]))
        return outputs[len(seen) - 1]

    noise = rng.normal(size=(2, 3)).astype(np.float32)
    got = ddim_sample(denoise, noise, (), 10, 4)
    assert seen == [9, 6, 3, 0]
    alpha, x = cosine_alphas_cumprod(10), noise
    for i, t in enumerate(seen):
        x0 = np.clip(outputs[i], -1, 1)
        prev = alpha[seen[i + 1]] if i + 1 < len(seen) else 1.0
        x = np.sqrt(prev) * x0 + np.sqrt(1 - prev) * (x - np.sqrt(alpha[t]) * x0) / np.sqrt(1 - alpha[t])
    np.testing.assert_allclose(got, x, atol=1e-6)
    np.testing.assert_allclose(got, np.clip(outputs[-1], -1, 1))


def test_fuse_adds_the_softmax_and_breaks_ties_by_lower_row():
    values = np.array([[2.0, 1.0, 1.0, -np.inf]], np.float32)
    rows = np.array([[5, 9, 3, -1]])
    x0 = np.array([[0.0, 0.5, 0.5, 0.9]], np.float32)
    new_v, new_r = fuse(values, rows, x0, temp=1.0, weight=1.0)
    p = np.exp(x0[0, :3]) / np.exp(x0[0, :3]).sum()
    assert new_r.tolist() == [[5, 3, 9, -1]]  # 9 and 3 tie: the lower row first; no candidate stays last
    np.testing.assert_allclose(new_v[0, :3], [2 + p[0], 1 + p[2], 1 + p[1]], rtol=1e-6)
    assert new_v[0, 3] == -np.inf


# ---------------------------------------------------------------------------------------------
# Reranking: seeded noise, fewer candidates


class _Gallery:
    def __init__(self, n: int, seed: int = 0):
        self.lat = np.random.default_rng(seed).normal(size=(n, 2, D)).astype(np.float16)


def _first_stage(q: int, m: int, n: int, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.permutation(n)[:m] for _ in range(q)])
    values = -np.sort(-rng.uniform(0, 2, (q, m)), axis=1).astype(np.float32)
    return values, rows, rng.normal(size=(q, 2, D)).astype(np.float32)


def test_same_query_same_result_in_any_batch():
    reranker, gallery = _reranker(m=5), _Gallery(20)
    values, rows, q_lat = _first_stage(4, 9, 20)
    texts = ["a dog", "a cat", "a red car", "two men"]
    together = reranker.rerank(texts, q_lat, values, rows, gallery)
    for i in (2, 0):
        alone = reranker.rerank(texts[i : i + 1], q_lat[i : i + 1], values[i : i + 1], rows[i : i + 1], gallery)
        np.testing.assert_array_equal(alone[1][0], together[1][i])
        np.testing.assert_allclose(alone[0][0], together[0][i], rtol=1e-6)
    # the noise is the query's own: the same text twice in one batch, the same answer
    twice = reranker.rerank(["a dog", "a dog"], q_lat[[0, 0]], values[[0, 0]], rows[[0, 0]], gallery)
    np.testing.assert_array_equal(twice[1][0], twice[1][1])
    np.testing.assert_array_equal(query_noise(["a dog"], 5)[0], query_noise(["x", "a dog"], 5)[1])


def test_only_the_top_m_move_and_fewer_candidates_than_m_work():
    reranker, gallery = _reranker(m=5), _Gallery(20)
    values, rows, q_lat = _first_stage(2, 9, 20)
    new_v, new_r = reranker.rerank(["a", "b"], q_lat, values, rows, gallery)
    for i in range(2):
        assert sorted(new_r[i, :5]) == sorted(rows[i, :5])
    np.testing.assert_array_equal(new_r[:, 5:], rows[:, 5:])
    np.testing.assert_array_equal(new_v[:, 5:], values[:, 5:])
    # three real candidates and a hole (a filter passed only three videos), M = 5
    short_v, short_r = values[:, :4].copy(), rows[:, :4].copy()
    short_v[:, 3], short_r[:, 3] = -np.inf, -1
    got_v, got_r = reranker.rerank(["a", "b"], q_lat, short_v, short_r, gallery)
    assert (got_r[:, 3] == -1).all() and np.isneginf(got_v[:, 3]).all()
    for i in range(2):
        assert sorted(got_r[i, :3]) == sorted(short_r[i, :3])
    assert np.all(np.diff(got_v[:, :3], axis=1) <= 0)
    # passing the noise in, as diffusers pipelines let callers do, is the seeded draw's twin
    given = reranker.rerank(["a", "b"], q_lat, values, rows, gallery, noise=query_noise(["a", "b"], 5))
    np.testing.assert_array_equal(given[1], new_r)


# ---------------------------------------------------------------------------------------------
# Training and the command line


@pytest.fixture(scope="module")
def reranker_files(tiny_ckpt, msrvtt, tmp_path_factory):
    work = tmp_path_factory.mktemp("rerank")
    out, gallery = str(work / "reranker"), str(work / "gallery")
    argv = ["train-reranker", "--base", tiny_ckpt, "--root", msrvtt, "--collection", "msrvtt10k", "--out", out,
            "--candidates", "4"]
    assert main(argv + TINY_RERANK) == 0
    assert main(["index", "--checkpoint", tiny_ckpt, "--root", msrvtt, "--collection", "msrvtt10k", "--out",
                 gallery, "--quiet"]) == 0
    return tiny_ckpt, out, gallery


def test_tiny_training_lowers_the_loss_and_its_folder_loads(reranker_files):
    _, out, _ = reranker_files
    with open(os.path.join(out, "train_log.json")) as handle:
        log = json.load(handle)
    fixed = [row["fixed_loss"] for row in log]
    assert len(fixed) == 13 and fixed[-1] < 0.7 * fixed[0]
    config = read_reranker_config(out)
    assert config["reranker"].candidates == 4 and config["reranker"].diffusion_steps == 8
    assert config["base"]["head"] == "cvr" and config["reranker"].latent_dim == 32
    reranker = load_reranker(out)
    assert reranker.candidates == 4 and reranker.base_id == config["base"]["id"]


def _hits(result) -> list:
    return [video for video, _ in result.hits]


def test_search_rerank_reorders_only_the_first_stages_top_m(reranker_files, capsys):
    checkpoint, out, gallery = reranker_files
    plain = Retriever(checkpoint, gallery)
    reranked = Retriever(checkpoint, gallery, reranker=out)
    texts = ["a dog and a car", "a man singing in a kitchen", "blue guitar"]
    before, after = plain.search(texts, k=6), reranked.search(texts, k=6)
    for b, a in zip(before, after, strict=True):
        assert sorted(_hits(a)[:4]) == sorted(_hits(b)[:4]) and _hits(a)[4:] == _hits(b)[4:]
        assert all(x >= y for (_, x), (_, y) in zip(a.hits, a.hits[1:], strict=False))
    timings = reranked.last_timings
    assert timings.per_query_ms()["rerank"] > 0 and "top 4 reranked" in timings.describe()
    # k below M: the top k of the reranked top M
    assert [_hits(r) for r in reranked.search(texts, k=2)] == [_hits(r)[:2] for r in after]
    assert main(["search", "--gallery", gallery, "--checkpoint", checkpoint, "--rerank", out, "--json", "-k", "6",
                 *texts]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [[row["video_id"] for row in r["results"]] for r in printed] == [_hits(r) for r in after]


def test_a_foreign_or_unusable_reranker_is_refused_in_one_line(reranker_files, tmp_path, capsys):
    checkpoint, out, gallery = reranker_files
    foreign = str(tmp_path / "foreign")
    shutil.copytree(out, foreign)
    config = json.load(open(os.path.join(foreign, "config.json")))
    config["base"]["id"] = "0" * 64
    files.write_json(os.path.join(foreign, "config.json"), seal(config))
    argv = ["search", "--gallery", gallery, "--checkpoint", checkpoint, "a dog"]
    for extra, message in ((["--rerank", foreign], "trained on another checkpoint"),
                           (["--rerank", out, "--backend", "tensorrt"], "tensorrt"),
                           (["--rerank", str(tmp_path / "none")], "no such reranker folder"),
                           (["--rerank", gallery], "not a reranker")):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert message.lower() in err.lower() and len(err.strip().splitlines()) == 1, err
    with pytest.raises(QueryError, match="not of this Retriever"):
        Retriever(checkpoint, gallery, reranker=foreign)
    # an edited field breaks the seal
    config = json.load(open(os.path.join(foreign, "config.json")))
    config["reranker"]["candidates"] = 8
    files.write_json(os.path.join(foreign, "config.json"), config)
    with pytest.raises(RerankerError, match="edited or damaged"):
        read_reranker_config(foreign)


def test_evaluate_gallery_with_rerank(reranker_files, msrvtt, tmp_path, capsys):
    checkpoint, out, gallery = reranker_files
    prefix = str(tmp_path / "eval")
    assert main(["evaluate", "--checkpoint", checkpoint, "--gallery", gallery, "--root", msrvtt, "--collection",
                 "msrvtt10k", "--rerank", out, "--out", prefix]) == 0
    assert "reranked by" in capsys.readouterr().out
    with open(prefix + ".json") as handle:
        result = json.load(handle)
    assert result["rerank"] == out and result["metrics"]["found"] == 1.0


def test_a_glscl_base_trains_and_reranks(msrvtt, tmp_path):
    base, out, gallery = str(tmp_path / "glscl"), str(tmp_path / "reranker"), str(tmp_path / "gallery")
    common = ["--root", msrvtt, "--collection", "msrvtt10k"]
    assert main(["train", *common, "--feature", "resnext101-resnet152", "--out", base, *TINY_TRAIN, *TINY_GLSCL]) == 0
    assert main(["train-reranker", "--base", base, *common, "--out", out, "--candidates", "3", "--hidden", "16",
                 "--diffusion-steps", "8", "--epochs", "1", "--quiet"]) == 0
    assert read_reranker_config(out)["base"]["head"] == "glscl"
    assert main(["index", "--checkpoint", base, *common, "--out", gallery, "--quiet"]) == 0
    plain, reranked = Retriever(base, gallery), Retriever(base, gallery, reranker=out)
    before, after = plain.search(["a dog"], k=5)[0], reranked.search(["a dog"], k=5)[0]
    assert sorted(_hits(after)[:3]) == sorted(_hits(before)[:3]) and _hits(after)[3:] == _hits(before)[3:]


# ---------------------------------------------------------------------------------------------
# ONNX: the denoiser step exported, parity, and the torch-free runtime

TORCH_BLOCKED = """
import sys, json
import numpy as np
sys.modules["torch"] = None  # any `import torch` now fails
from engine.backends.onnx_rerank import OnnxReranker
reranker = OnnxReranker(sys.argv[1])
data = np.load(sys.argv[2])
gallery = type("G", (), {"lat": data["lat"]})()
values, rows = reranker.rerank(["a dog", "a red car"], data["q_lat"], data["values"], data["rows"], gallery)
print(json.dumps({"rows": rows.tolist(), "values": values.tolist()}))
"""


def test_onnx_step_matches_pytorch_and_reranks_alike_without_torch(reranker_files, tmp_path, capsys):
    import subprocess
    import sys

    from engine.backends.onnx_rerank import OnnxReranker

    _, out, gallery = reranker_files
    assert main(["export", "--rerank", out]) == 0
    assert "max |diff|" in capsys.readouterr().out
    with open(os.path.join(out, "onnx", "manifest.json")) as handle:
        manifest = json.load(handle)
    assert manifest["parity"]["max_abs_diff"] <= 1e-4 and len(manifest["parity"]["cases"]) == 2
    assert main(["export", "--rerank", out]) == 0 and "reused" in capsys.readouterr().out
    torch_side, onnx_side = load_reranker(out), OnnxReranker(out)
    # the step on odd sizes with padded candidates
    x_t, t, query, cands, scores, mask = (v.numpy() for v in _inputs(3, 7, seed=4))
    d = torch_side.config.latent_dim
    query, cands = np.random.default_rng(0).normal(size=(3, d)), np.random.default_rng(1).normal(size=(3, 7, d))
    query, cands, mask = query.astype(np.float32), cands.astype(np.float32), mask.copy()
    mask[1, 3:] = False
    np.testing.assert_allclose(onnx_side.denoise(x_t, t % 8, query, cands, scores, mask),
                               torch_side.denoise(x_t, t % 8, query, cands, scores, mask), atol=1e-4)
    # the whole rerank: same ranking, scores within float rounding, here and in a torch-free process
    from engine.gallery import Gallery

    lat = np.asarray(Gallery.load(gallery).lat, np.float32)
    values, rows, _ = _first_stage(2, 6, len(lat), seed=3)
    q_lat = np.random.default_rng(5).normal(size=(2, 2, d)).astype(np.float32)
    texts = ["a dog", "a red car"]
    expected = torch_side.rerank(texts, q_lat, values, rows, SimpleGallery(lat))
    got = onnx_side.rerank(texts, q_lat, values, rows, SimpleGallery(lat))
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], atol=1e-5)
    np.savez(tmp_path / "inputs.npz", lat=lat, q_lat=q_lat, values=values, rows=rows)
    done = subprocess.run([sys.executable, "-c", TORCH_BLOCKED, out, str(tmp_path / "inputs.npz")],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["rows"] == expected[1].tolist()


class SimpleGallery:
    def __init__(self, lat):
        self.lat = lat


def test_a_negative_weight_or_a_non_positive_temperature_is_refused():
    from engine.reranking import RerankConfig, RerankerError

    for change in ({"weight": -1.0}, {"temp": 0.0}):
        with pytest.raises(RerankerError, match="weight must be >= 0 and temp > 0"):
            RerankConfig(latent_dim=8, **change).validate()


def test_the_fused_kernels_refuse_a_glscl_checkpoint_in_one_line():
    from types import SimpleNamespace

    from engine.backends.triton import KernelError, use_triton_kernels

    with pytest.raises(KernelError, match="fused kernels score the cvr head"):
        use_triton_kernels(SimpleNamespace(config=SimpleNamespace(head="glscl"), matcher=object()))
