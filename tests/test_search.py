"""engine.search, the one gallery search: exhaustive in blocks and two-stage, against the fused score
of every video computed directly; modes, options, ties, padding; through the Retriever and `cvr
search` (its flags)."""
import json

import numpy as np
import pytest
import torch
from test_gallery import random_embeddings

from engine.backends.pytorch import TorchScorer
from engine.cli import main
from engine.gallery import Gallery, faiss_search_parameters
from engine.indexing import write_gallery
from engine.model import Embeddings
from engine.search import AUTO_TWO_STAGE_ABOVE, SearchError, SearchOptions, exhaustive, search, two_stage


class Blocks(TorchScorer):
    """The torch scorer with tiny blocks: many blocks, a ragged last one."""

    def __init__(self, model, rows):
        super().__init__(model, "cpu")
        self.rows, self.calls = rows, []

    def block_rows(self, queries):
        return self.rows

    def scores(self, q_lat, q_con, lat, con):
        self.calls.append(len(lat))
        return super().scores(q_lat, q_con, lat, con)


def direct_scores(model, q_lat, q_con, lat, con):
    """The fused score of every (query, video) in one call, from the stored rows cast to float32."""
    with torch.no_grad():
        query = Embeddings(torch.from_numpy(q_lat), torch.from_numpy(q_con))
        video = Embeddings(torch.from_numpy(np.asarray(lat, np.float32)), torch.from_numpy(np.asarray(con, np.float32)))
        return model.score(query, video).numpy()


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def flat_gallery(model, tmp_path_factory):
    """400 videos in float16 with a flat index; rows 200-209 duplicate rows 0-9 (exact ties)."""
    lat, con = random_embeddings(400, 32, 11, seed=2)
    lat[200:210], con[200:210] = lat[:10], con[:10]
    out = str(tmp_path_factory.mktemp("search") / "flat")
    write_gallery(out, [f"v{i}" for i in range(400)], lat, con, {"id": model.checkpoint_id}, faiss="flat")
    return Gallery.load(out, checkpoint_id=model.checkpoint_id)


@pytest.fixture(scope="module")
def queries(flat_gallery):
    lat, con = random_embeddings(7, 32, 11, seed=1)
    # Three queries equal to stored videos that have a duplicate: their best two scores tie.
    lat[:3] = flat_gallery.lat[:3].astype(np.float32)
    con[:3] = flat_gallery.con[:3].astype(np.float32)
    return lat, con


def assert_top_k_of(values, found, full, atol=1e-5):
    """`found` is a top-k of the score matrix `full` (Q, N): its values are the scores of those rows,
    descending, and no other row scores above the last one (beyond `atol`: blocks of another size
    round their products differently)."""
    k = found.shape[1]
    np.testing.assert_allclose(values, np.take_along_axis(full, found, 1), rtol=0, atol=atol)
    assert (values[:, :-1] >= values[:, 1:] - atol).all()
    for row, kept, last in zip(full, found, values[:, -1], strict=True):
        others = np.delete(row, kept)
        assert len(set(kept)) == k and (others <= last + atol).all()


@pytest.mark.parametrize("rows", [1, 7, 64, 400, 1000])
def test_exhaustive_in_blocks_is_the_top_k_of_every_score(model, flat_gallery, queries, rows):
    q_lat, q_con = queries
    scorer = Blocks(model, rows)
    values, found = exhaustive(scorer, flat_gallery.lat, flat_gallery.con, q_lat, q_con, k=20)
    assert_top_k_of(values, found, direct_scores(model, q_lat, q_con, flat_gallery.lat, flat_gallery.con))
    assert sum(scorer.calls) == 400 and max(scorer.calls) <= rows  # every row once, never all at once


@pytest.mark.parametrize("rows", [3, 16, 40])
def test_exhaustive_ties_go_to_the_lower_row_across_blocks(model, tmp_path, rows):
    """Values on a 1/8 grid make every product and sum exact in any order: duplicated videos then
    score exactly alike in any block, and the lower row must come first."""
    rng = np.random.default_rng(3)
    grid = lambda *shape: rng.integers(0, 5, shape).astype(np.float32) / 8  # noqa: E731
    base_lat, base_con = grid(4, 2, 32), grid(4, 2, 11)
    pick = rng.integers(0, 4, 40)
    lat, con = base_lat[pick], base_con[pick]
    values, found = exhaustive(Blocks(model, rows), lat, con, grid(3, 2, 32), grid(3, 2, 11), k=12)
    ties = values[:, 1:] == values[:, :-1]
    assert ties.any() and (found[:, 1:] > found[:, :-1])[ties].all()


def test_two_stage_with_every_candidate_is_exhaustive(model, flat_gallery, queries):
    q_lat, q_con = queries
    scorer = TorchScorer(model, "cpu")
    expected = exhaustive(scorer, flat_gallery.lat, flat_gallery.con, q_lat, q_con, k=20)
    got = two_stage(scorer, flat_gallery, q_lat, q_con, k=20, m=400)
    assert_top_k_of(got[0], got[1], direct_scores(model, q_lat, q_con, flat_gallery.lat, flat_gallery.con))
    # Both scored all 400 rows in one call per query, in gallery order: the same numbers exactly.
    one = Blocks(model, 400)
    one_block = [exhaustive(one, flat_gallery.lat, flat_gallery.con, q_lat[i : i + 1], q_con[i : i + 1], k=20)
                 for i in range(len(q_lat))]
    assert np.array_equal(got[1], np.concatenate([f for _, f in one_block]))
    assert np.array_equal(got[0], np.concatenate([v for v, _ in one_block]))
    assert (got[1][:3, 0] < got[1][:3, 1]).all() and (got[0][:3, 0] == got[0][:3, 1]).all()  # ties: lower row
    del expected


def test_two_stage_scores_each_query_against_its_own_candidates(model, flat_gallery, queries):
    q_lat, q_con = queries
    scorer = Blocks(model, 10_000)
    m = 30
    values, found = two_stage(scorer, flat_gallery, q_lat, q_con, k=5, m=m)
    assert scorer.calls == [m] * len(q_lat)  # one call per query with its m candidates, never the union
    _, proposed = flat_gallery.faiss_index.search(np.ascontiguousarray(q_lat[:, 0]), m)
    full = direct_scores(model, q_lat, q_con, flat_gallery.lat, flat_gallery.con)
    for i in range(len(q_lat)):
        candidates = np.sort(proposed[i])
        assert set(found[i]) <= set(candidates)
        assert_top_k_of(values[i : i + 1], np.searchsorted(candidates, found[i])[None], full[i : i + 1, candidates])


def test_two_stage_pads_when_the_first_stage_finds_fewer_than_k(model, tmp_path):
    """An IVF index probing one of its lists may find fewer than k videos: the tail is (-inf, -1),
    and the Retriever reports only the real hits."""
    lat, con = random_embeddings(60, 32, 11, seed=7, clusters=6)
    out = str(tmp_path / "ivf")
    write_gallery(out, [f"v{i}" for i in range(60)], lat, con, {"id": model.checkpoint_id}, faiss="IVF30,Flat")
    gallery = Gallery.load(out)
    params = faiss_search_parameters(gallery.faiss_index, nprobe=1)
    values, found = two_stage(TorchScorer(model, "cpu"), gallery, lat[:4], con[:4], k=50, m=50, params=params)
    short = (found < 0).any(axis=1)
    assert short.any(), "the test needs a query whose probed list holds fewer than 50 videos"
    assert np.isneginf(values[found < 0]).all() and (values[found >= 0] > -np.inf).all()
    for row in found:  # the real hits come first, then only padding
        real = row >= 0
        assert not (~real[:-1] & real[1:]).any() and len(set(row[real])) == real.sum()


def test_modes_and_options(model, flat_gallery, queries):
    q_lat, q_con = queries
    scorer = TorchScorer(model, "cpu")
    assert SearchOptions().resolved_mode(flat_gallery) == "exhaustive"  # 400 <= AUTO_TWO_STAGE_ABOVE
    assert len(flat_gallery) <= AUTO_TWO_STAGE_ABOVE
    assert SearchOptions(mode="two-stage").resolved_mode(flat_gallery) == "two-stage"
    full = direct_scores(model, q_lat, q_con, flat_gallery.lat, flat_gallery.con)
    assert_top_k_of(*search(scorer, flat_gallery, q_lat, q_con, 10), full)
    assert_top_k_of(*search(scorer, flat_gallery, q_lat, q_con, 10, SearchOptions(mode="two-stage", candidates=400)),
                    full)
    # Two-stage parameters in auto mode ask for two stages, whatever the gallery's size.
    assert SearchOptions(candidates=50).resolved_mode(flat_gallery) == "two-stage"
    for bad, message in ((SearchOptions(mode="fast"), "search mode must be one of"),
                         (SearchOptions(candidates=0), "--candidates must be a positive integer"),
                         (SearchOptions(mode="two-stage", nprobe=2), "--nprobe is a parameter of IVF"),
                         (SearchOptions(mode="exhaustive", candidates=50), "apply to two-stage search only")):
        with pytest.raises(ValueError, match=message):
            search(scorer, flat_gallery, q_lat, q_con, 10, bad)
    with pytest.raises(SearchError, match="k must be between 1 and the gallery size 400"):
        search(scorer, flat_gallery, q_lat, q_con, 401)


def test_two_stage_needs_an_index(model, tmp_path):
    lat, con = random_embeddings(20, 32, 11, seed=8)
    out = str(tmp_path / "plain")
    write_gallery(out, [f"v{i}" for i in range(20)], lat, con, {"id": model.checkpoint_id})
    with pytest.raises(SearchError, match="two-stage search needs a FAISS index"):
        search(TorchScorer(model, "cpu"), Gallery.load(out), lat[:2], con[:2], 3, SearchOptions(mode="two-stage"))


def test_cli_search_modes(tiny_ckpt, tmp_path, capsys, msrvtt):
    gallery = str(tmp_path / "g")
    common = ["--root", msrvtt, "--collection", "msrvtt10k"]
    assert main(["index", "--checkpoint", tiny_ckpt, *common, "--out", gallery, "--faiss", "IVF2,Flat", "--quiet"]) == 0
    capsys.readouterr()
    base = ["search", "--gallery", gallery, "--checkpoint", tiny_ckpt, "a dog runs", "-k", "4"]
    assert main(base + ["--mode", "two-stage", "--nprobe", "2", "--candidates", "12", "--json"]) == 0
    staged = json.loads(capsys.readouterr().out)
    assert main(base + ["--mode", "exhaustive", "--json"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert [r["video_id"] for r in staged[0]["results"]] == [r["video_id"] for r in exact[0]["results"]]
    assert main(base) == 0
    assert "latency per query (ms, cold: the first search" in capsys.readouterr().out
    for flags, message in ((["--mode", "fast"], "invalid choice"), (["--nprobe", "0"], "--nprobe must be >= 1"),
                           (["-k", "0"], "-k must be >= 1")):
        assert main(base + flags) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("cvr: error:") and err.count("\n") == 1


def test_two_stage_scores_many_candidates_in_blocks(model, flat_gallery, queries):
    """M candidates go through the scorer's blocks, like an exhaustive scan: never one float32 copy
    of all of them, and the same answer."""
    q_lat, q_con = queries
    scorer = Blocks(model, 37)
    values, found = two_stage(scorer, flat_gallery, q_lat, q_con, k=20, m=400)
    assert max(scorer.calls) <= 37 and sum(scorer.calls) == 400 * len(q_lat)
    assert_top_k_of(values, found, direct_scores(model, q_lat, q_con, flat_gallery.lat, flat_gallery.con))


@pytest.mark.parametrize("factory, options", [
    ("IVF8,Flat,RFlat", SearchOptions(mode="two-stage", nprobe=8)),
    ("HNSW8,Flat,RFlat", SearchOptions(mode="two-stage", ef_search=32)),
    ("IVF4,PQ4,RFlat", SearchOptions(mode="two-stage", nprobe=4, candidates=400)),
])
def test_refining_and_quantised_indexes_take_their_search_parameters(model, tmp_path, factory, options):
    lat, con = random_embeddings(400, 32, 11, seed=9, clusters=8)
    out = str(tmp_path / "g")
    write_gallery(out, [f"v{i}" for i in range(400)], lat, con, {"id": model.checkpoint_id}, faiss=factory)
    gallery = Gallery.load(out)
    scorer = TorchScorer(model, "cpu")
    values, found = search(scorer, gallery, lat[:5], con[:5], 10, options)
    assert (found >= 0).all() and (values[:, :-1] >= values[:, 1:]).all()
    assert (found[:, 0] == np.arange(5)).mean() >= 0.8  # a stored video is (nearly always) its own best match
