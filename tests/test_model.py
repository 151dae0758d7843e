"""The CVR-SDGM towers and matcher: masks, gradients, fusion, and the kernels as a backend."""
import numpy as np
import pytest
import torch

from engine.config import ModelConfig
from engine.model import CVRModel, Embeddings, Matcher, QueryTower, VideoTower, similarities
from engine.portable import topk_stable
from kernels.reference import jaccard, tiles

SMALL = dict(frame_dim=24, region_dim=20, attn_dim=16, latent_dim=12, concept_dim=10, video_gru_hidden=8,
             video_local_dim=14, dropout=0.0)
SENT, TOK = 18, 22


def _config(**overrides):
    return ModelConfig(**{**SMALL, **overrides})


def _text(batch=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 1:] = False
    return torch.randn(batch, SENT, generator=g), torch.randn(batch, length, TOK, generator=g), mask


def _regions(batch=3, count=5, seed=1):
    return torch.randn(batch, count, SMALL["region_dim"], generator=torch.Generator().manual_seed(seed))


def _frames(batch=3, count=9, seed=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, count, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 2:] = False
    return torch.randn(batch, count, SMALL["frame_dim"], generator=g), mask


class _TinyText(torch.nn.Module):
    """A frozen stand-in text encoder: the model's towers only need its widths."""

    dim_sentence, dim_tokens = SENT, TOK

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1), requires_grad=False)


def _eval(module):
    torch.manual_seed(0)
    return module.eval()


def test_video_tower_ignores_padding_frames():
    tower = _eval(VideoTower(_config()))
    frames, mask = _frames()
    out = tower(frames, mask)
    garbage = frames.clone()
    garbage[~mask] = 1e3 * torch.randn_like(garbage[~mask])  # padding content must not matter
    longer = torch.cat([garbage, torch.randn(3, 4, SMALL["frame_dim"])], 1)  # nor its length
    longer_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
    again = tower(longer, longer_mask)
    torch.testing.assert_close(out.lat, again.lat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.con, again.con, atol=1e-5, rtol=1e-5)
    assert out.lat.shape == (3, 2, 12) and out.con.shape == (3, 2, 10)
    torch.testing.assert_close(out.lat.norm(dim=-1), torch.ones(3, 2))
    assert ((out.con > 0) & (out.con < 1)).all()


@pytest.mark.parametrize("frames", [1, 2, 7, 8, 13])
def test_temporal_conv_equals_the_conv1d_it_replaces(frames):
    """VideoTower.temporal_conv computes self.conv as a matrix product: same values and gradients."""
    tower = VideoTower(_config()).double()
    x = torch.randn(3, frames, SMALL["video_local_dim"], dtype=torch.float64, requires_grad=True)
    got = tower.temporal_conv(x)
    want = tower.conv(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, [x, tower.conv.weight, tower.conv.bias], grad)
    want_grads = torch.autograd.grad(want, [x, tower.conv.weight, tower.conv.bias], grad)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("use_anchor", [False, True])
def test_query_tower_ignores_padding_tokens(use_anchor):
    tower = _eval(QueryTower(_config(use_anchor=use_anchor), SENT, TOK))
    sentence, tokens, mask = _text()
    regions = _regions() if use_anchor else None
    out = tower(sentence, tokens, mask, regions)
    noisy = tokens.clone()
    noisy[~mask] = 1e3
    again = tower(sentence, torch.cat([noisy, torch.ones(3, 3, TOK)], 1),
                  torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], 1), regions)
    torch.testing.assert_close(out.lat, again.lat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.con, again.con, atol=1e-5, rtol=1e-5)


def test_anchor_changes_the_query_and_is_required_when_trained_with():
    tower = _eval(QueryTower(_config(use_anchor=True), SENT, TOK))
    sentence, tokens, mask = _text()
    a = tower(sentence, tokens, mask, _regions(seed=1))
    b = tower(sentence, tokens, mask, _regions(seed=5))
    assert (a.lat - b.lat).abs().max() > 1e-4
    with pytest.raises(ValueError, match="anchor regions"):
        tower(sentence, tokens, mask, None)


@pytest.mark.parametrize("use_anchor", [False, True])
def test_gradients_reach_every_parameter(use_anchor):
    torch.manual_seed(0)
    config = _config(use_anchor=use_anchor)
    query, video = QueryTower(config, SENT, TOK).train(), VideoTower(config).train()
    sentence, tokens, mask = _text()
    frames, frame_mask = _frames()
    q = query(sentence, tokens, mask, _regions() if use_anchor else None)
    v = video(frames, frame_mask)
    loss = similarities(q, v).sum() + q.con.sum() + v.con.sum()
    loss.backward()
    for name, param in list(query.named_parameters()) + list(video.named_parameters()):
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_jaccard_matches_its_definition_and_guards_zero():
    x = torch.tensor([[0.2, 0.5, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([[0.4, 0.1, 0.3], [0.0, 0.0, 0.0]])
    # (min: 0.2 + 0.1 + 0) / (max: 0.4 + 0.5 + 0.3) = 0.3 / 1.2 = 0.25; all-zero pairs score 0.
    expected = torch.tensor([[0.25, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(jaccard(x, y), expected)
    x, y = torch.rand(7, 5, dtype=torch.float64), torch.rand(4, 5, dtype=torch.float64)
    by_definition = torch.minimum(x[:, None], y[None]).sum(-1) / torch.maximum(x[:, None], y[None]).sum(-1)
    torch.testing.assert_close(jaccard(x, y), by_definition)


@pytest.mark.parametrize("budget", [1, 7, 15, 10**9])
def test_tiled_similarities_and_scores_cover_every_pair_once(budget):
    """Every tiling, down to one (query, video) pair per tile, gives the untiled matrices."""
    query, video = _embeddings(7, k=5), _embeddings(4, k=5, seed=1)
    query = Embeddings(query.lat.double(), query.con.double())
    video = Embeddings(video.lat.double(), video.con.double())
    full = similarities(query, video, budget=10**9)
    torch.testing.assert_close(similarities(query, video, budget=budget), full, rtol=0, atol=1e-12)
    covered = torch.zeros(7, 4, dtype=torch.int64)
    for rows, cols in tiles(7, 4, 5, budget):
        assert len(range(7)[rows]) * len(range(4)[cols]) * 5 <= max(budget, 5)
        covered[rows, cols] += 1
    assert (covered == 1).all()
    matcher = Matcher().double()
    matcher.fused.budget = budget
    torch.testing.assert_close(matcher(query, video), Matcher().double()(query, video), rtol=0, atol=1e-12)


def _embeddings(n, d=6, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.nn.functional.normalize(torch.randn(n, 2, d, generator=g), dim=-1)
    return Embeddings(lat=lat, con=torch.rand(n, 2, k, generator=g))


def test_matcher_fusion_by_hand():
    query, video = _embeddings(4), _embeddings(6, seed=1)
    matcher = Matcher()
    matcher.norm.copy_(torch.tensor([[-1.0, 1.0], [-0.5, 0.5], [0.0, 1.0], [0.1, 0.6]]))
    sims = similarities(query, video)
    expected = (0.6 * ((sims[0] + 1) / 2 + (sims[1] + 0.5) / 1.0)
                + 0.4 * (sims[2] + (sims[3] - 0.1) / 0.5))
    torch.testing.assert_close(matcher(query, video), expected)
    # transductive: the constants come from the matrix itself, so each normalised term spans [0, 1]
    scores = matcher(query, video, transductive=True)
    lo, hi = sims.flatten(1).amin(1), sims.flatten(1).amax(1)
    normed = (sims - lo.view(4, 1, 1)) / (hi - lo).view(4, 1, 1)
    torch.testing.assert_close(scores, 0.6 * (normed[0] + normed[1]) + 0.4 * (normed[2] + normed[3]))
    # fit_norm freezes exactly those constants
    matcher.fit_norm(query, video)
    torch.testing.assert_close(matcher(query, video), scores)


def test_topk_stable_breaks_ties_by_lower_index():
    scores = np.array([[0.5, 0.75, 0.5, 0.75, 0.25]], dtype=np.float32)
    values, indices = topk_stable(scores, 3)
    assert indices.tolist() == [[1, 3, 0]] and values.tolist() == [[0.75, 0.75, 0.5]]
    rng = np.random.default_rng(0)
    for _ in range(20):  # the first k of a full stable sort, ties included
        scores = rng.integers(0, 4, (3, 17)).astype(np.float32)
        k = int(rng.integers(1, 18))
        values, indices = topk_stable(scores, k)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        assert np.array_equal(indices, order) and np.array_equal(values, np.take_along_axis(scores, order, 1))


def test_triton_kernels_swap_in_as_modules_and_match_torch():
    """The triton backend is the same model with kernels.modules swapped in (interpreter on the CPU)."""
    from engine.backends.triton import KernelError, use_triton_kernels
    from kernels.modules import TritonFusedScore, TritonHybridAttention

    config = _config(use_anchor=True)
    model = _eval(CVRModel(config, text_encoder=_TinyText()))
    query, video = _embeddings(5, d=config.latent_dim, k=config.concept_dim), \
        _embeddings(11, d=config.latent_dim, k=config.concept_dim, seed=3)
    model.matcher.fit_norm(query, video)
    sentence, tokens, mask = _text()
    regions = _regions()
    with torch.no_grad():
        reference_query = model.query(sentence, tokens, mask, regions)
        reference_scores = model.score(query, video)
        use_triton_kernels(model)
        assert isinstance(model.matcher.fused, TritonFusedScore)
        assert isinstance(model.query.attention.core, TritonHybridAttention)
        fused_query = model.query(sentence, tokens, mask, regions)
        torch.testing.assert_close(model.score(query, video), reference_scores, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(fused_query.lat, reference_query.lat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_query.con, reference_query.con, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="transductive normalisation .* runs in PyTorch only"):
        model.score(query, video, transductive=True)
    ablation = CVRModel(_config(use_anchor=False, local_branch=False), text_encoder=_TinyText())
    with pytest.raises(KernelError, match="no-local-branch ablation"):
        use_triton_kernels(ablation)
