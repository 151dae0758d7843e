"""The glscl head (engine/glscl.py, kernels.reference.glscl_score): the score against a plain
re-statement of its formula, the towers, the Scorer through engine.search, a tiny `cvr train --head
glscl` run, a gallery round trip, and the default head left as it was."""
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN

from engine.config import ModelConfig
from kernels import reference

TINY_GLSCL = ["--head", "glscl", "--glscl-heads", "4", "--glscl-frames", "5", "--glscl-queries", "3",
              "--glscl-decoder-layers", "1", "--glscl-temporal-layers", "1"]


def plain_glscl(q_lat, v_lat, v_mask, tau, lam, mode):
    """The formula, pair by pair and frame by frame, in float64 (peers.md section 1a)."""
    q_lat, v_lat, v_mask = (np.asarray(x, np.float64) for x in (q_lat, v_lat, v_mask))
    k, frames = q_lat.shape[1] - 1, v_mask.shape[1]
    out = np.zeros((len(q_lat), len(v_lat)))
    for a in range(len(q_lat)):
        c = q_lat[a, 0]
        for b in range(len(v_lat)):
            logits = [float(c @ v_lat[b, 1 + f]) / tau for f in range(frames)]
            valid = [f for f in range(frames) if v_mask[b, f] > 0.5]
            over = range(frames) if mode == "paper" else valid
            total = sum(math.exp(logits[f]) for f in over)
            pooled = np.zeros_like(c)
            for f in valid:
                pooled += math.exp(logits[f]) / total * v_lat[b, 1 + f]
            norm = np.linalg.norm(c) * np.linalg.norm(pooled)
            s_g = float(c @ pooled) / max(norm, 1e-8)
            s_l = sum(float(q_lat[a, 1 + j] @ v_lat[b, 1 + frames + j]) for j in range(k)) / k
            out[a, b] = s_g + lam * s_l
    return out


def random_rows(rng, queries=3, videos=7, frames=5, k=3, dim=11, padded_zero=True):
    """Query and video rows in the glscl slot layout, unit z vectors, masks of 1..F frames."""
    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q_lat = np.concatenate([rng.normal(size=(queries, 1, dim)) * 2, unit(rng.normal(size=(queries, k, dim)))], 1)
    counts = rng.integers(1, frames + 1, size=videos)
    counts[0], counts[1] = frames, 1  # one full video, one of a single frame
    mask = (np.arange(frames)[None] < counts[:, None]).astype(np.float32)
    v = rng.normal(size=(videos, frames, dim))
    if padded_zero:
        v = v * mask[..., None]
    mean = unit((v * mask[..., None]).sum(1, keepdims=True))
    v_lat = np.concatenate([mean, v, unit(rng.normal(size=(videos, k, dim)))], 1)
    return q_lat.astype(np.float32), v_lat.astype(np.float32), mask


@pytest.mark.parametrize("mode", ["paper", "renormalise"])
@pytest.mark.parametrize("padded_zero", [True, False])
@pytest.mark.parametrize("pool", [False, True])  # Gram matrices, or each pair's pooled video
def test_score_equals_the_formula_pair_by_pair(mode, padded_zero, pool):
    rng = np.random.default_rng(3)
    q_lat, v_lat, mask = random_rows(rng, padded_zero=padded_zero)
    got = reference.glscl_score(torch.from_numpy(q_lat), torch.from_numpy(v_lat), torch.from_numpy(mask), 3.0, 0.5,
                                mode, pool)
    np.testing.assert_allclose(got.numpy(), plain_glscl(q_lat, v_lat, mask, 3.0, 0.5, mode), rtol=1e-5, atol=1e-5)


def test_paper_mask_changes_the_weights_of_padded_videos_but_never_the_score():
    """The paper's mask after the softmax leaves the weights of a padded video summing to r < 1,
    w_paper = r * w_renormalised with one r per pair, and the cosine does not see that scale: the
    two modes differ in the weights and agree (to rounding) in the score."""
    rng = np.random.default_rng(4)
    q_lat, v_lat, mask = (torch.from_numpy(x) for x in random_rows(rng))
    logits = torch.einsum("qd,nfd->qnf", q_lat[:, 0], v_lat[:, 1:6]) / 3.0
    paper = reference.glscl_frame_weights(logits, mask[None] > 0.5, "paper")
    renormalised = reference.glscl_frame_weights(logits, mask[None] > 0.5, "renormalise")
    full = mask.sum(1) == mask.shape[1]
    assert torch.allclose(paper[:, full], renormalised[:, full], atol=1e-6)
    assert (paper.sum(-1)[:, ~full] < 1 - 1e-3).all()
    torch.testing.assert_close(renormalised.sum(-1), torch.ones(3, 7))
    ratio = paper[:, ~full].sum(-1, keepdim=True)
    torch.testing.assert_close(paper[:, ~full], ratio * renormalised[:, ~full])
    scores = [reference.glscl_score(q_lat, v_lat, mask, 3.0, 0.5, mode) for mode in ("paper", "renormalise")]
    torch.testing.assert_close(scores[0], scores[1], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError):
        reference.glscl_score(q_lat, v_lat, mask, 3.0, 0.5, "other")


def tiny_config(**values) -> ModelConfig:
    base = dict(frame_dim=6, latent_dim=16, concept_dim=4, head="glscl", glscl_heads=4, glscl_frames=5,
                glscl_queries=3, glscl_decoder_layers=1, glscl_temporal_layers=1, glscl_mask="renormalise")
    return ModelConfig(**dict(base, **values))


class _Text(torch.nn.Module):
    dim_sentence, dim_tokens = 7, 9


def tiny_model(**values):
    from engine.model import CVRModel

    torch.manual_seed(0)
    return CVRModel(tiny_config(**values), _Text()).eval()


def test_towers_shapes_and_padding_changes_no_embedding():
    model = tiny_model()
    frames = torch.randn(3, 8, 6)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, :3], mask[1, :5], mask[2, :8] = True, True, True  # the last has more than F = 5 frames
    with torch.no_grad():
        video = model.encode_video(frames, mask)
        alone = model.encode_video(frames[:1, :3], mask[:1, :3])
        query = model.query(torch.randn(2, 7), torch.randn(2, 4, 9), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
        short = model.query(query_sentence := torch.randn(1, 7), tokens := torch.randn(1, 2, 9), torch.ones(1, 2))
        longer = model.query(query_sentence, torch.cat([tokens, torch.randn(1, 3, 9)], 1),
                             torch.tensor([[1, 1, 0, 0, 0]]))
    assert video.lat.shape == (3, 1 + 5 + 3, 16) and video.con.shape == (3, 1, 5)
    assert video.con[:, 0].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert torch.equal(video.lat[0, 4:6], torch.zeros(2, 16))  # padded frame slots are zeros
    assert torch.allclose(video.lat[:, 0].norm(dim=-1), torch.ones(3))
    assert torch.allclose(video.lat[:, 6:].norm(dim=-1), torch.ones(3, 3))
    assert query.lat.shape == (2, 1 + 3, 16) and query.con.shape == (2, 1, 5) and not query.con.any()
    torch.testing.assert_close(alone.lat[0], video.lat[0], atol=1e-5, rtol=1e-5)  # padding a batch changes nothing
    torch.testing.assert_close(short.lat, longer.lat, atol=1e-5, rtol=1e-5)
    # More frames than F: subsampled evenly by the loader's rule (engine.datasets.video_frames)
    picked = np.linspace(0, 7, 5).round().astype(int)
    with torch.no_grad():
        subsampled = model.encode_video(frames[2:, picked], mask[2:, :5])
    torch.testing.assert_close(subsampled.lat, video.lat[2:], atol=1e-5, rtol=1e-5)


def test_glscl_config_is_checked():
    from engine.config import ConfigError

    for bad in ({"glscl_heads": 5}, {"glscl_mask": "both"}, {"glscl_queries": 0}, {"use_anchor": True}):
        with pytest.raises(ConfigError):
            tiny_config(**bad).validate()


def test_scorer_through_exhaustive_search_equals_the_score_matrix():
    from engine.backends.pytorch import GLSCLScorer, scorer_for
    from engine.search import exhaustive

    model = tiny_model(glscl_mask="paper")
    scorer = scorer_for(model, "cpu")
    assert isinstance(scorer, GLSCLScorer) and scorer.block_rows(4) >= 16
    rng = np.random.default_rng(5)
    q_lat, v_lat, mask = random_rows(rng, queries=4, videos=41, frames=5, k=3, dim=16)
    v_con = mask[:, None, :]
    q_con = np.zeros((4, 1, 5), np.float32)
    direct = reference.glscl_score(torch.from_numpy(q_lat), torch.from_numpy(v_lat), torch.from_numpy(mask)).numpy()
    scorer.block_rows = lambda queries: 9  # several blocks, the last one short
    values, rows = exhaustive(scorer, v_lat.astype(np.float16), v_con.astype(np.float16), q_lat, q_con, k=41)
    expected = reference.glscl_score(torch.from_numpy(q_lat), torch.from_numpy(v_lat.astype(np.float16).astype(
        np.float32)), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(np.take_along_axis(expected, rows, 1), values, rtol=1e-6, atol=1e-6)
    assert (np.diff(values, axis=1) <= 0).all()
    np.testing.assert_allclose(expected, direct, atol=5e-3)  # float16 storage moves scores a little


# ---------------------------------------------------------------------------------------------
# End to end: cvr train --head glscl, cvr index, search, evaluate


@pytest.fixture(scope="module")
def glscl_ckpt(msrvtt, tmp_path_factory):
    from engine.cli import main

    out = str(tmp_path_factory.mktemp("glscl") / "model")
    argv = ["train", "--root", msrvtt, "--collection", "msrvtt10k", "--feature", "resnext101-resnet152", "--out", out]
    assert main(argv + TINY_TRAIN + TINY_GLSCL + ["--epochs", "3", "--lr", "1e-3"]) == 0
    return out


def test_tiny_glscl_training_lowers_the_loss_and_its_checkpoint_loads(glscl_ckpt):
    from engine.checkpoint import load_checkpoint, load_matcher, load_video_tower, read_checkpoint_config
    from engine.glscl import GLSCLMatcher, GLSCLVideoTower

    with open(os.path.join(glscl_ckpt, "train_log.json")) as handle:
        losses = [row["loss"] for row in json.load(handle)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    config = read_checkpoint_config(glscl_ckpt)
    assert config["model"]["head"] == "glscl" and config["model"]["glscl_frames"] == 5
    assert config["norm"] is None and config["train"]["job"]["max_frames"] == 5
    model = load_checkpoint(glscl_ckpt)
    assert isinstance(model.video, GLSCLVideoTower) and model.query.decoder is model.video.decoder
    assert isinstance(load_video_tower(glscl_ckpt), GLSCLVideoTower)
    matcher = load_matcher(glscl_ckpt).matcher
    assert isinstance(matcher, GLSCLMatcher) and torch.equal(matcher.logit_scale, model.matcher.logit_scale)


def test_glscl_gallery_round_trip_search_equals_the_direct_scores(glscl_ckpt, msrvtt, tmp_path, capsys):
    from engine.checkpoint import load_checkpoint
    from engine.cli import main
    from engine.gallery import Gallery
    from engine.model import Embeddings
    from engine.retriever import Retriever
    from engine.search import SearchOptions

    gallery_dir = str(tmp_path / "gallery")
    assert main(["index", "--checkpoint", glscl_ckpt, "--root", msrvtt, "--collection", "msrvtt10k", "--out",
                 gallery_dir, "--faiss", "flat", "--quiet"]) == 0
    gallery = Gallery.load(gallery_dir)
    assert gallery.manifest["dims"] == {"latent": 32, "concept": 5, "lat_slots": 1 + 5 + 3, "con_slots": 1}
    assert gallery.lat.shape == (12, 9, 32) and gallery.con.shape == (12, 1, 5)
    assert gallery.con[:, 0].astype(int).sum(1).tolist() == [3] * 12  # the fixture's 3 frames each

    texts = ["a man and a dog in video number 1", "a red car", "singing in the kitchen"]
    model = load_checkpoint(glscl_ckpt)
    with torch.no_grad():
        query = model.encode_text(texts)
        videos = Embeddings(torch.from_numpy(np.asarray(gallery.lat, np.float32)),
                            torch.from_numpy(np.asarray(gallery.con, np.float32)))
        direct = model.score(query, videos).numpy()
    retriever = Retriever(glscl_ckpt, gallery_dir)
    for mode in ("exhaustive", "two-stage"):
        options = SearchOptions(mode=mode, candidates=12 if mode == "two-stage" else None)
        results = retriever.search(texts, k=12, options=options)
        for row, result in zip(direct, results, strict=True):
            order = np.argsort(-row, kind="stable")
            assert [v for v, _ in result.hits] == [gallery.ids[j] for j in order]
            np.testing.assert_allclose([s for _, s in result.hits], row[order], rtol=1e-5, atol=1e-5)

    capsys.readouterr()
    out = str(tmp_path / "eval")
    assert main(["evaluate", "--checkpoint", glscl_ckpt, "--root", msrvtt, "--collection", "msrvtt10k", "--out",
                 out]) == 0
    with open(out + ".json") as handle:
        assert 0 <= json.load(handle)["metrics"]["t2v_r1"] <= 100


def test_default_head_config_is_as_before(tiny_ckpt):
    """The cvr head's config.json holds no head or glscl field, and a config without them loads as cvr."""
    from engine.checkpoint import read_checkpoint_config

    model = read_checkpoint_config(tiny_ckpt)["model"]
    assert "head" not in model and not any(k.startswith("glscl_") for k in model)
    assert ModelConfig.from_dict(model).head == "cvr"
    assert set(ModelConfig().to_dict()) == set(model)


def test_losses_equal_their_formulas():
    from training.losses import glscl_consistency, glscl_diversity, glscl_loss, info_nce

    rng = np.random.default_rng(6)
    z_v, z_t = (torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(5, 3, 4))), dim=-1)
                for _ in range(2))
    b, k = 5, 3
    c = sum(z_v[i] @ z_t[i].T for i in range(b)) / k
    mse = float(((z_v.mean(0) - z_t.mean(0)) ** 2).mean())
    expected = mse + 0.005 * sum((float(c[j, j]) - 0.75) ** 2 for j in range(k))
    assert float(glscl_consistency(z_v, z_t, 0.005, 0.75)) == pytest.approx(expected, rel=1e-9)
    m = sum(z_v[i] @ z_v[i].T for i in range(b)) / b
    hinge = sum(max(0.0, 0.1 + float(m[i, j] - m[i, i])) + max(0.0, 0.1 + float(m[i, j] - m[j, j]))
                for i in range(k) for j in range(k) if i != j) / (k * (k - 1))
    assert float(glscl_diversity(z_v)) == pytest.approx(hinge, rel=1e-9)
    scores = torch.from_numpy(rng.normal(size=(b, b)))
    scale = torch.tensor(2.0, dtype=torch.float64)
    logits = scores.numpy() * math.exp(2.0)
    rows = -np.mean([logits[i, i] - np.log(np.exp(logits[i]).sum()) for i in range(b)])
    cols = -np.mean([logits[i, i] - np.log(np.exp(logits[:, i]).sum()) for i in range(b)])
    assert float(info_nce(scores, scale)) == pytest.approx((rows + cols) / 2, rel=1e-9)
    total, parts = glscl_loss(scores, scale, z_t, z_v, alpha=1e-4)
    assert parts["total"] == pytest.approx(parts["nce"] + parts["diversity"] + parts["consistency"])
    assert parts["diversity"] == pytest.approx(1e-4 * hinge)


def test_glscl_export_has_parity_and_the_onnxruntime_backend_searches_as_torch(glscl_ckpt, msrvtt, tmp_path):
    """`cvr export` of a glscl checkpoint: its query tower, video tower and scorer graphs within the
    fp32 parity tolerance; the exported video tower reproduces the gallery; search through ONNX
    Runtime returns torch's ranking."""
    from engine.backends.onnxruntime import OnnxRuntimeBackend
    from engine.cli import main
    from engine.datasets import Collection, video_frames
    from engine.gallery import Gallery
    from engine.retriever import Retriever

    export_dir, gallery_dir = str(tmp_path / "onnx"), str(tmp_path / "gallery")
    assert main(["export", "--checkpoint", glscl_ckpt, "--format", "onnx", "--out", export_dir]) == 0
    with open(os.path.join(export_dir, "manifest.json")) as handle:
        manifest = json.load(handle)
    assert manifest["scorer"]["head"] == "glscl" and manifest["scorer"]["frames"] == 5
    for name in ("query_tower", "video_tower", "scorer"):
        assert manifest["modules"][name]["parity"]["fp32"]["max_abs_diff"] <= 1e-4, name
    assert main(["index", "--checkpoint", glscl_ckpt, "--root", msrvtt, "--collection", "msrvtt10k", "--out",
                 gallery_dir, "--dtype", "float32", "--quiet"]) == 0
    gallery = Gallery.load(gallery_dir)
    backend = OnnxRuntimeBackend(export_dir, threads=1)
    frames, mask = video_frames(Collection(msrvtt, "msrvtt10k").features("resnext101-resnet152"), gallery.ids, 64)
    lat, con = backend.encode_videos(frames, mask)
    np.testing.assert_allclose(lat, gallery.lat, atol=1e-4)
    np.testing.assert_array_equal(con, gallery.con)
    texts = ["a man and a dog", "a red car in the kitchen"]
    torch_hits = Retriever(glscl_ckpt, gallery_dir).search(texts, k=12)
    ort_hits = Retriever(glscl_ckpt, gallery_dir, backend="onnxruntime", export_dir=export_dir).search(texts, k=12)
    for a, b in zip(torch_hits, ort_hits, strict=True):
        assert [v for v, _ in a.hits] == [v for v, _ in b.hits]
        np.testing.assert_allclose([s for _, s in a.hits], [s for _, s in b.hits], atol=1e-5)
