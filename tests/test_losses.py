"""Losses checked against values worked out by hand in the comments."""
import math
from dataclasses import dataclass

import pytest
import torch

from training.losses import concept_bce, cosine_sim, hybrid_loss, jaccard_sim, triplet_loss

# Rows = texts t0..t2, columns = videos v0..v2, diagonal = positives.
SIM = torch.tensor(
    [
        [0.9, 0.8, 0.75],
        [0.3, 0.8, 0.70],
        [0.2, 0.5, 0.60],
    ]
)
# margin 0.2, violation of negative n for an anchor with positive p: max(0, 0.2 + n - p).
# text -> video (rows):
#   t0 (p 0.9): v1 0.2+0.8-0.9 = 0.10, v2 0.2+0.75-0.9 = 0.05  -> hardest 0.10, all 0.15
#   t1 (p 0.8): v0 0.2+0.3-0.8 < 0,    v2 0.2+0.7-0.8 = 0.10   -> hardest 0.10, all 0.10
#   t2 (p 0.6): v0 0.2+0.2-0.6 < 0,    v1 0.2+0.5-0.6 = 0.10   -> hardest 0.10, all 0.10
# video -> text (columns):
#   v0 (p 0.9): t1 0.2+0.3-0.9 < 0,    t2 0.2+0.2-0.9 < 0      -> 0
#   v1 (p 0.8): t0 0.2+0.8-0.8 = 0.20, t2 0.2+0.5-0.8 < 0      -> hardest 0.20, all 0.20
#   v2 (p 0.6): t0 0.2+0.75-0.6 = 0.35, t1 0.2+0.7-0.6 = 0.30  -> hardest 0.35, all 0.65
HARDEST = 0.30 + 0.55  # 0.85
ALL = 0.35 + 0.85  # 1.20


def test_triplet_hardest_by_hand():
    assert triplet_loss(SIM, margin=0.2) == pytest.approx(HARDEST, abs=1e-6)


def test_triplet_all_negatives_by_hand():
    assert triplet_loss(SIM, margin=0.2, hardest=False) == pytest.approx(ALL, abs=1e-6)


def test_triplet_margin_zero_by_hand():
    # margin 0: only v2's column violates: t0 0.75-0.6 = 0.15 (hardest), t1 0.70-0.6 = 0.10.
    assert triplet_loss(SIM, margin=0.0) == pytest.approx(0.15, abs=1e-6)
    assert triplet_loss(SIM, margin=0.0, hardest=False) == pytest.approx(0.25, abs=1e-6)


def test_triplet_both_directions():
    asym = torch.tensor([[1.0, 0.9], [0.0, 0.5]])
    # text -> video: t0 (p 1.0): v1 0.2+0.9-1.0 = 0.1;  t1 (p 0.5): v0 0.2+0.0-0.5 < 0  -> 0.1
    # video -> text: v0 (p 1.0): t1 0.2+0.0-1.0 < 0;   v1 (p 0.5): t0 0.2+0.9-0.5 = 0.6 -> 0.6
    # One direction alone would give 0.1 or 0.6.
    assert triplet_loss(asym) == pytest.approx(0.7, abs=1e-6)
    # Transposing swaps the roles of texts and videos; the two-sided total is unchanged.
    assert triplet_loss(asym.T) == pytest.approx(0.7, abs=1e-6)


def test_triplet_picks_hardest_negative():
    sim = SIM.clone().requires_grad_(True)
    triplet_loss(sim).backward()
    # d loss / d sim: +1 at each anchor's hardest negative, -1 at that anchor's positive.
    # t2v: t0->v1, t1->v2, t2->v1; v2t: v1->t0, v2->t0; v0 has no violation.
    expected = torch.tensor([[-1.0, 2.0, 1.0], [0.0, -2.0, 1.0], [0.0, 1.0, -2.0]])
    torch.testing.assert_close(sim.grad, expected)


def test_triplet_diagonal_excluded_same_video_negatives_counted():
    # Perfectly separated: the positives alone would violate (0.2 + p - p = 0.2) if not masked.
    sim = torch.full((4, 4), -1.0).fill_diagonal_(1.0)
    assert triplet_loss(sim) == 0.0
    assert triplet_loss(sim, hardest=False) == 0.0
    # Two captions of the same video: identical scores, so each is the other's violating
    # negative by exactly the margin (RIVRL masks only the diagonal): 2 anchors x 2 directions x 0.2.
    same = torch.ones(2, 2)
    assert triplet_loss(same) == pytest.approx(0.8, abs=1e-6)
    # One pair, no negatives.
    assert triplet_loss(torch.tensor([[0.3]])) == 0.0
    with pytest.raises(ValueError):
        triplet_loss(torch.zeros(2, 3))


def test_cosine_sim():
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    b = torch.tensor([[0.0, 1.0], [0.8, 0.6]])
    # [1,0].[0,1]=0, [1,0].[.8,.6]=.8, [.6,.8].[0,1]=.8, [.6,.8].[.8,.6]=.96
    torch.testing.assert_close(cosine_sim(a, b), torch.tensor([[0.0, 0.8], [0.8, 0.96]]))


def test_jaccard_by_hand():
    x = torch.tensor([[1.0, 0.0, 0.5]])
    y = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 0.5], [0.0, 0.0, 0.0]])
    # vs y0: min = .5+0+.5 = 1.0, max = 1+.5+.5 = 2.0 -> 0.5; vs y1: identical -> 1.0;
    # vs y2: min = 0, max = 1.5 -> 0.
    torch.testing.assert_close(jaccard_sim(x, y), torch.tensor([[0.5, 1.0, 0.0]]))
    # Both all-zero: 0 / eps = 0 rather than NaN.
    assert jaccard_sim(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0.0


def _jaccard_direct(x, y):
    out = torch.empty(x.shape[0], y.shape[0], dtype=x.dtype)
    for i in range(x.shape[0]):
        for j in range(y.shape[0]):
            pairs = list(zip(x[i].tolist(), y[j].tolist(), strict=True))
            out[i, j] = sum(min(a, b) for a, b in pairs) / sum(max(a, b) for a, b in pairs)
    return out


@pytest.mark.parametrize("max_elements", [1, 11, 30, 77, 1 << 22])
def test_jaccard_direct_formula_and_chunking(max_elements):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(5, 11, generator=g, dtype=torch.float64), torch.rand(7, 11, generator=g, dtype=torch.float64)
    torch.testing.assert_close(jaccard_sim(x, y, max_elements=max_elements), _jaccard_direct(x, y))


def test_jaccard_gradients():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.rand(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: jaccard_sim(a, b, max_elements=13), (x, y))


def test_concept_bce_by_hand():
    probs = torch.tensor([[0.8, 0.1]])
    targets = torch.tensor([[1.0, 0.5]])
    # -(1*log .8 + [.5 log .1 + .5 log .9]) / 2 elements
    expected = -(math.log(0.8) + 0.5 * math.log(0.1) + 0.5 * math.log(0.9)) / 2
    assert concept_bce(probs, targets).item() == pytest.approx(expected, rel=1e-6)
    # Same as nn.BCELoss (mean) away from saturation, as RIVRL uses.
    g = torch.Generator().manual_seed(2)
    p, t = torch.rand(4, 9, generator=g) * 0.98 + 0.01, torch.rand(4, 9, generator=g)
    torch.testing.assert_close(concept_bce(p, t), torch.nn.BCELoss()(p, t))
    # Saturated sigmoid outputs stay finite: -log(1e-6) = 13.8 per wrong element.
    sat = concept_bce(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert math.isfinite(sat.item()) and sat.item() == pytest.approx(-math.log(1e-6), rel=1e-3)
    with pytest.raises(ValueError):
        concept_bce(torch.rand(2, 3), torch.rand(3, 2))


@dataclass
class Out:
    lat_g: torch.Tensor
    lat_l: torch.Tensor
    con_g: torch.Tensor
    con_l: torch.Tensor


def _outs(b=4, d=5, k=6, seed=3):
    g = torch.Generator().manual_seed(seed)

    def side():
        lat = [torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_() for _ in "gl"]
        con = [torch.rand(b, k, generator=g).mul(0.9).add(0.05).requires_grad_() for _ in "gl"]
        return Out(lat[0], lat[1], con[0], con[1])

    return side(), side(), (torch.rand(b, k, generator=g) > 0.5).float()


def test_hybrid_loss_composition():
    text, video, tags = _outs()
    total, parts = hybrid_loss(text, video, tags)
    b = tags.shape[0]
    # RIVRL: sum of the four triplets + batch_size * sum of the four BCEs.
    tri = sum(
        triplet_loss(cosine_sim(getattr(text, f"lat_{x}"), getattr(video, f"lat_{x}")))
        + triplet_loss(jaccard_sim(getattr(text, f"con_{x}"), getattr(video, f"con_{x}")))
        for x in "gl"
    )
    bce = sum(concept_bce(getattr(m, f"con_{x}"), tags) for m in (text, video) for x in "gl")
    assert total.item() == pytest.approx((tri + b * bce).item(), rel=1e-6)
    assert set(parts) == {
        "tri_cos_g", "tri_cos_l", "tri_jac_g", "tri_jac_l",
        "bce_video_g", "bce_video_l", "bce_text_g", "bce_text_l", "total",
    }
    assert all(isinstance(v, float) for v in parts.values())
    assert parts["total"] == pytest.approx(total.item())
    assert parts["bce_text_l"] == pytest.approx(concept_bce(text.con_l, tags).item())
    # An explicit weight replaces the batch size; a dict works like the dataclass.
    total2, _ = hybrid_loss(vars(text), vars(video), tags, bce_weight=0.0)
    assert total2.item() == pytest.approx(tri.item(), rel=1e-6)
    total.backward()
    for tensor in (*vars(text).values(), *vars(video).values()):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
    assert any(t.grad.abs().sum() > 0 for t in vars(text).values())
