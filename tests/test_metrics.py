"""Tests for engine.metrics: hand-worked cases, ties, agreement with independent references."""
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from engine.metrics import (
    METRIC_KEYS,
    _video_id_of,
    evaluate_ids,
    format_metrics_table,
    retrieval_metrics,
    t2v_ranks,
    v2t_ranks,
)

# ---------------------------------------------------------------------------------------------
# Hand-worked cases
# ---------------------------------------------------------------------------------------------
# 4 queries x 4 videos, built to exercise t2v ties.
TIES_SCORES = np.array(
    [
        [0.1, 0.9, 0.3, 0.2],  # video 1 (0.9) is the top score: rank 1
        [0.5, 0.5, 0.5, 0.5],  # all equal: video 2 comes after indices 0 and 1: rank 3
        [0.7, 0.2, 0.7, 0.9],  # video 2 (0.7): 0.9 above it, 0.7 at lower index 0 tied: rank 3
        [0.1, 0.8, 0.3, 0.8],  # video 1 (0.8): tied only with higher index 3: rank 1
    ]
)
TIES_QUERY_VIDEO = [1, 2, 2, 1]

# 6 captions x 4 videos for v2t. Video 0 has captions 0, 1, 2; video 1 has none; video 2 has
# captions 3, 4; video 3 has caption 5.
V2T_SCORES = np.array(
    [
        # v0   v1   v2   v3
        [0.2, 1.0, 0.5, 0.7],  # caption 0 (video 0)
        [0.9, 1.0, 0.5, 0.7],  # caption 1 (video 0)
        [0.1, 1.0, 0.6, 0.7],  # caption 2 (video 0)
        [0.8, 1.0, 0.5, 0.7],  # caption 3 (video 2)
        [0.3, 1.0, 0.1, 0.7],  # caption 4 (video 2)
        [0.4, 1.0, 0.0, 0.7],  # caption 5 (video 3)
    ]
)
V2T_QUERY_VIDEO = [0, 0, 0, 2, 2, 3]


def test_t2v_hand_worked_ties():
    assert t2v_ranks(TIES_SCORES, TIES_QUERY_VIDEO).tolist() == [1, 3, 3, 1]
    m = retrieval_metrics(TIES_SCORES, TIES_QUERY_VIDEO)
    # ranks 1, 3, 3, 1
    assert m["t2v_r1"] == pytest.approx(50.0)  # 2 of 4 at rank 1
    assert m["t2v_r5"] == pytest.approx(100.0)
    assert m["t2v_r10"] == pytest.approx(100.0)
    assert m["t2v_medr"] == pytest.approx(2.0)  # median(1, 1, 3, 3) = 2, not floored to 1
    assert m["t2v_mnr"] == pytest.approx(2.0)  # (1 + 3 + 3 + 1) / 4
    assert m["t2v_map"] == pytest.approx(2 / 3)  # (1 + 1/3 + 1/3 + 1) / 4 = (8/3) / 4
    assert m["sumr"] == pytest.approx(250.0)  # 50 + 100 + 100


def test_all_equal_row_ranks_at_index_plus_one():
    scores = np.full((5, 5), 0.25, dtype=np.float32)
    # Each row's relevant video j sits behind the j lower indices it ties with: rank j + 1.
    assert t2v_ranks(scores, [0, 1, 2, 3, 4]).tolist() == [1, 2, 3, 4, 5]
    # Each column ranks caption i at i + 1 as well (one caption per video here).
    assert v2t_ranks(scores, [0, 1, 2, 3, 4]).tolist() == [1, 2, 3, 4, 5]


def test_tie_with_lower_index_pushes_down_higher_does_not():
    scores = np.array([[0.4, 0.4, 0.4]])
    # Relevant item 1 ties with lower index 0 (counts) and higher index 2 (does not): rank 2.
    assert t2v_ranks(scores, [1]).tolist() == [2]
    # Relevant item 0 ties with 1 and 2, both higher indices: rank 1.
    assert t2v_ranks(scores, [0]).tolist() == [1]


def test_v2t_hand_worked_several_captions_and_empty_video():
    # Column 0, video 0, relevant captions {0, 1, 2}: order q1 .9, q3 .8, q5 .4, q4 .3, q0 .2,
    #   q2 .1 -> caption ranks q0: 5, q1: 1, q2: 6. First = 1.
    #   AP = (1/1 + 2/5 + 3/6) / 3 = 1.9 / 3 = 19/30.
    # Column 1, video 1: no captions -> left out (even though its scores are all tied).
    # Column 2, video 2, relevant {3, 4}: q3 = 0.5 has q2 (0.6) above and ties q0, q1 at lower
    #   indices -> rank 4; q4 = 0.1 has q0..q3 above -> rank 5. First = 4.
    #   AP = (1/4 + 2/5) / 2 = 13/40.
    # Column 3, video 3, relevant {5}: all six scores equal 0.7 -> rank 5 + 1 = 6. AP = 1/6.
    assert v2t_ranks(V2T_SCORES, V2T_QUERY_VIDEO).tolist() == [5, 1, 6, 4, 5, 6]
    m = retrieval_metrics(V2T_SCORES, V2T_QUERY_VIDEO)
    # First ranks over videos 0, 2, 3: [1, 4, 6]
    assert m["v2t_r1"] == pytest.approx(100 / 3)
    assert m["v2t_r5"] == pytest.approx(200 / 3)
    assert m["v2t_r10"] == pytest.approx(100.0)
    assert m["v2t_medr"] == pytest.approx(4.0)
    assert m["v2t_mnr"] == pytest.approx(11 / 3)
    # (19/30 + 13/40 + 1/6) / 3 = (76 + 39 + 20) / 120 / 3 = 1.125 / 3
    assert m["v2t_map"] == pytest.approx(0.375)


def test_t2v_on_v2t_matrix():
    # Row 0 (video 0, 0.2): 1.0, 0.5, 0.7 above -> 4.  Row 1 (0.9): 1.0 above -> 2.
    # Row 2 (0.1): 1.0, 0.6, 0.7 above -> 4.            Row 3 (video 2, 0.5): 0.8, 1.0, 0.7 -> 4.
    # Row 4 (video 2, 0.1): 0.3, 1.0, 0.7 above -> 4.   Row 5 (video 3, 0.7): 1.0 above -> 2.
    assert t2v_ranks(V2T_SCORES, V2T_QUERY_VIDEO).tolist() == [4, 2, 4, 4, 4, 2]
    m = retrieval_metrics(V2T_SCORES, V2T_QUERY_VIDEO)
    assert m["t2v_r1"] == 0.0
    assert m["t2v_r5"] == pytest.approx(100.0)
    assert m["t2v_medr"] == pytest.approx(4.0)
    assert m["t2v_mnr"] == pytest.approx(20 / 6)
    assert m["t2v_map"] == pytest.approx((4 / 4 + 2 / 2) / 6)  # four 1/4s and two 1/2s


def test_keys_and_plain_floats():
    m = retrieval_metrics(V2T_SCORES, V2T_QUERY_VIDEO)
    assert tuple(m) == METRIC_KEYS
    assert all(type(v) is float for v in m.values())


def test_float64_precision_keeps_near_ties_apart():
    # 1 + 2**-40 > 1 in float64 but not in float32: computing in float64 must keep them apart.
    scores = np.array([[1.0, 1.0 + 2.0**-40]])
    assert t2v_ranks(scores, [0]).tolist() == [2]
    assert t2v_ranks(scores.astype(np.float32), [0]).tolist() == [1]  # a real tie in float32


def test_dtypes_and_torch_give_the_same_result():
    rng = np.random.default_rng(1)
    scores = rng.integers(-8, 8, size=(37, 11)).astype(np.float64)  # exact in every float dtype
    qv = rng.integers(0, 11, size=37)
    expected = retrieval_metrics(scores, qv)
    for variant in (
        scores.astype(np.float32),
        scores.astype(np.float16),
        scores.astype(np.int16),
        scores.astype(np.int64),
        torch.from_numpy(scores),
        torch.from_numpy(scores).to(torch.bfloat16),
        torch.from_numpy(scores).float().requires_grad_(),
    ):
        assert retrieval_metrics(variant, torch.from_numpy(qv)) == expected


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------
def reference_t2v_ranks(scores, qv):
    """Rank by a full stable sort of each row: descending score, then ascending index."""
    s = np.asarray(scores, dtype=np.float64)
    ranks = []
    for i, row in enumerate(s):
        order = np.lexsort((np.arange(row.size), -row))  # last key (-row) is the primary one
        ranks.append(int(np.flatnonzero(order == qv[i])[0]) + 1)
    return np.array(ranks)


def reference_v2t_ranks(scores, qv):
    """Rank of caption c in column qv[c], from a stable argsort of each negated column."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, axis=0, kind="stable")
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(s.shape[0])[:, None], axis=0)
    return position[np.arange(s.shape[0]), qv] + 1


def reference_metrics(scores, qv):
    """All metrics straight from the definitions, using the reference ranks."""
    qv = np.asarray(qv)
    t2v = reference_t2v_ranks(scores, qv)
    caption_ranks = reference_v2t_ranks(scores, qv)
    first, ap = [], []
    for v in np.unique(qv):  # videos without captions never appear here
        r = caption_ranks[qv == v]
        first.append(r.min())
        # AP by definition: for each relevant item, (#relevant at rank <= its rank) / its rank.
        ap.append(np.mean([np.sum(r <= x) / x for x in r]))
    first = np.array(first)
    m = {}
    for prefix, ranks, aps in (("t2v", t2v, 1.0 / t2v), ("v2t", first, np.array(ap))):
        for k in (1, 5, 10):
            m[f"{prefix}_r{k}"] = 100.0 * np.mean(ranks <= k)
        m[f"{prefix}_medr"] = np.median(ranks)
        m[f"{prefix}_mnr"] = np.mean(ranks)
        m[f"{prefix}_map"] = np.mean(aps)
    m["sumr"] = m["t2v_r1"] + m["t2v_r5"] + m["t2v_r10"]
    return m


def assert_metrics_close(got, want):
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key


SIZES = [(1, 1), (1, 7), (13, 1), (23, 7), (97, 31), (51, 50), (200, 9)]


@pytest.mark.parametrize("n_queries,n_videos", SIZES)
@pytest.mark.parametrize("kind", ["continuous", "integer"])
def test_agrees_with_reference(n_queries, n_videos, kind):
    rng = np.random.default_rng(n_queries * 1000 + n_videos)
    if kind == "continuous":
        scores = rng.standard_normal((n_queries, n_videos)).astype(np.float32)
    else:  # few distinct values: ties everywhere
        scores = rng.integers(0, 4, size=(n_queries, n_videos)).astype(np.float32)
    qv = rng.integers(0, n_videos, size=n_queries)  # leaves some videos without captions
    np.testing.assert_array_equal(t2v_ranks(scores, qv), reference_t2v_ranks(scores, qv))
    np.testing.assert_array_equal(v2t_ranks(scores, qv), reference_v2t_ranks(scores, qv))
    want = reference_metrics(scores, qv)
    assert_metrics_close(retrieval_metrics(scores, qv), want)
    # Tiny blocks (ragged last block) must not change anything.
    assert_metrics_close(retrieval_metrics(scores, qv, row_block=4, col_block=3), want)


@pytest.mark.parametrize("n_queries,n_videos", [(40, 8), (123, 17), (300, 61)])
def test_v2t_map_matches_sklearn(n_queries, n_videos):
    # sklearn's average_precision_score groups tied scores, so compare on tie-free floats.
    rng = np.random.default_rng(n_queries)
    scores = rng.random((n_queries, n_videos))
    qv = rng.integers(0, n_videos, size=n_queries)
    aps = [average_precision_score(qv == v, scores[:, v]) for v in np.unique(qv)]
    assert retrieval_metrics(scores, qv)["v2t_map"] == pytest.approx(np.mean(aps), rel=1e-12)


@pytest.mark.parametrize("kind", ["continuous", "integer"])
def test_blocked_large_matches_reference(kind):
    # 6,000 captions x 300 videos, 20 captions per video, shuffled; blocks smaller than the
    # matrix and not dividing it, so every blocking path runs (and, with integer scores, the
    # tie paths inside the blocks).
    rng = np.random.default_rng(7)
    n_videos, per_video = 300, 20
    qv = rng.permutation(np.repeat(np.arange(n_videos), per_video))
    if kind == "continuous":
        scores = rng.standard_normal((qv.size, n_videos)).astype(np.float32)
        scores[np.arange(qv.size), qv] += 1.5  # a plausible, non-trivial retrieval
    else:
        scores = rng.integers(0, 50, size=(qv.size, n_videos)).astype(np.float32)
    t2v_ref = np.argsort(-scores.astype(np.float64), axis=1, kind="stable")
    t2v_ref = np.argmax(t2v_ref == qv[:, None], axis=1) + 1
    np.testing.assert_array_equal(t2v_ranks(scores, qv, row_block=512), t2v_ref)
    v2t_ref = reference_v2t_ranks(scores, qv)
    np.testing.assert_array_equal(v2t_ranks(scores, qv, col_block=64), v2t_ref)
    got = retrieval_metrics(scores, qv, row_block=512, col_block=64)
    assert_metrics_close(got, retrieval_metrics(scores, qv))
    if kind == "continuous":
        aps = [average_precision_score(qv == v, scores[:, v]) for v in range(n_videos)]
        assert got["v2t_map"] == pytest.approx(np.mean(aps), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def _raises_one_line(fn, *args, match=None):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nan_rejected(dtype):
    scores = np.ones((3, 2), dtype=dtype)
    scores[2, 1] = np.nan
    _raises_one_line(retrieval_metrics, scores, [0, 1, 0], match="NaN")
    _raises_one_line(retrieval_metrics, torch.from_numpy(scores), [0, 1, 0], match="NaN")


def test_infinities_are_fine():
    scores = np.array([[np.inf, 0.0], [-np.inf, 0.0]])
    assert t2v_ranks(scores, [0, 0]).tolist() == [1, 2]


@pytest.mark.parametrize(
    "scores,qv",
    [
        (np.ones(4), [0, 1, 0, 1]),  # 1-D scores
        (np.ones((2, 2, 2)), [0, 1]),  # 3-D scores
        (np.ones((3, 2)), [0, 1]),  # too few query_video entries
        (np.ones((3, 2)), [0, 1, 0, 1]),  # too many
        (np.ones((3, 2)), [[0, 1, 0]]),  # 2-D query_video
    ],
)
def test_shape_mismatch_rejected(scores, qv):
    _raises_one_line(retrieval_metrics, scores, qv)


@pytest.mark.parametrize("qv", [[0, 2, 1], [-1, 0, 1], [0, 1, 99]])
def test_out_of_range_rejected(qv):
    _raises_one_line(retrieval_metrics, np.ones((3, 2)), qv, match="outside")


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 0)])
def test_empty_rejected(shape):
    _raises_one_line(retrieval_metrics, np.ones(shape), [0] * shape[0], match="empty")


def test_bad_dtypes_rejected():
    _raises_one_line(retrieval_metrics, np.ones((2, 2)), [0.0, 1.0], match="integer")
    _raises_one_line(retrieval_metrics, np.ones((2, 2), dtype=complex), [0, 1], match="real")


# ---------------------------------------------------------------------------------------------
# Ids and table
# ---------------------------------------------------------------------------------------------
def test_video_id_of():
    assert _video_id_of("video7010#enc#3") == "video7010"
    assert _video_id_of("video7010#0") == "video7010"
    assert _video_id_of("video7010.mp4#enc#0") == "video7010"
    assert _video_id_of("video7010.jpg#2") == "video7010"
    assert _video_id_of("video7010") == "video7010"
    assert _video_id_of("clip.mp4.avi#1") == "clip.mp4.avi"  # only a trailing suffix is dropped


def test_evaluate_ids_matches_retrieval_metrics():
    video_ids = ["video7010", "video7011", "video9", "video12"]  # video12 has no caption
    caption_ids = [
        "video9#enc#0",
        "video7010#enc#0",
        "video7010.mp4#enc#1",
        "video7011#0",
        "video9.jpg#enc#1",
        "video7011.mp4#1",
    ]
    query_video = [2, 0, 0, 1, 2, 1]
    scores = np.random.default_rng(3).standard_normal((6, 4))
    assert evaluate_ids(scores, caption_ids, video_ids) == retrieval_metrics(scores, query_video)


def test_evaluate_ids_errors():
    scores = np.zeros((2, 2))
    _raises_one_line(
        evaluate_ids, scores, ["video1#0", "video3#enc#0"], ["video1", "video2"],
        match="video3#enc#0",
    )
    _raises_one_line(
        evaluate_ids, scores, ["video1#0", "video1#1"], ["video1", "video1"], match="duplicate"
    )
    _raises_one_line(evaluate_ids, scores, ["video1#0"], ["video1", "video2"])  # too few rows
    _raises_one_line(evaluate_ids, scores, ["video1#0", "video1#1"], ["video1"])  # too few cols


def test_format_metrics_table():
    table = format_metrics_table(retrieval_metrics(V2T_SCORES, V2T_QUERY_VIDEO))
    # t2v: ranks 4, 2, 4, 4, 4, 2 -> R@1 0, R@5 100, R@10 100, MedR 4, MnR 3.33, mAP 1/3.
    # v2t: from test_v2t_hand_worked_several_captions_and_empty_video.
    assert table == (
        "|     | R@1 | R@5 | R@10 | MedR | MnR | mAP |\n"
        "|-----|----:|----:|-----:|-----:|----:|----:|\n"
        "| t2v | 0.0 | 100.0 | 100.0 | 4.0 | 3.3 | 0.333 |\n"
        "| v2t | 33.3 | 66.7 | 100.0 | 4.0 | 3.7 | 0.375 |\n"
        "\n"
        "SumR: 200.0"
    )
    with pytest.raises(ValueError, match="sumr"):
        format_metrics_table({k: 0.0 for k in METRIC_KEYS if k != "sumr"})
