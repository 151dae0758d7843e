"""Sharded galleries (`cvr gallery shard`) and exact scatter-gather search, in one process: the
shard searchers a Ray actor holds (tests/test_cluster.py runs them on Ray), merged as a server does."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from shard_fixture import BUILTIN, media_folder, queries, random_gallery, scorer

from engine.cli import main
from engine.cluster.scatter import LocalShards, merge
from engine.cluster.shardset import SHARDS, ShardSetError, read_shardset, shard_bounds, shard_gallery
from engine.gallery import Gallery
from engine.search import SearchOptions, search


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("shards"))
    folder = os.path.join(base, "gallery")
    random_gallery(folder, media_folder(base))
    return folder


@pytest.fixture(scope="module")
def shard_sets(source, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("sets"))
    sets = {}
    for n in (1, 2, 3, 4):
        out = os.path.join(base, f"s{n}")
        shard_gallery(source, n, out, progress=False)
        sets[n] = LocalShards.open(out, BUILTIN)
    return sets


def unsharded(gallery, q_lat, q_con, k, mode="exhaustive", where=None, candidates=None):
    from engine import filters

    allowed = filters.allowed_rows(gallery.fields(), len(gallery), filters.parse_all(where)) if where else None
    return search(scorer(), gallery, q_lat, q_con, k, SearchOptions(mode=mode, candidates=candidates), allowed)


def scattered(shards, q_lat, q_con, k, mode="exhaustive", where=None, candidates=None):
    options = {"mode": mode, "candidates": candidates, "nprobe": None, "ef_search": None}
    answers = shards.call("search", q_lat, q_con, k, options, list(where or []))
    return merge(answers, k), answers


def test_bounds_are_contiguous_and_balanced():
    for n, shards in ((35, 4), (7, 7), (10, 3), (1, 1)):
        bounds = shard_bounds(n, shards)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_a_split_holds_every_row_and_what_it_shows(source, shard_sets, tmp_path):
    gallery = Gallery.load(source)
    top = read_shardset(os.path.dirname(shard_sets[4].searchers[0].gallery.folder))
    assert top["count"] == len(gallery) and [e["count"] for e in top["shards"]] == [9, 9, 8, 9]
    assert "tag" in top["fields"] and "duration" in top["fields"]
    shards = [s.gallery for s in shard_sets[4].searchers]
    assert sum((s.ids for s in shards), []) == gallery.ids
    assert np.array_equal(np.concatenate([np.asarray(s.lat[:]) for s in shards]), np.asarray(gallery.lat[:]))
    assert np.array_equal(np.concatenate([np.asarray(s.con[:]) for s in shards]), np.asarray(gallery.con[:]))
    q_lat, _ = queries(1)
    for shard, entry in zip(shards, top["shards"], strict=True):
        assert shard.faiss_index is not None and shard.faiss_index.ntotal == len(shard)
        assert shard.media_root == gallery.media_root
        for row, video_id in enumerate(shard.ids):
            source_row = entry["offset"] + row
            assert shard.paths(video_id) == gallery.paths(video_id)
            assert shard.metadata_of(video_id) == gallery.metadata_of(video_id)
            mine, theirs = dict(shard.record(row)), dict(gallery.record(source_row))
            assert mine.pop("thumbnail", None) is not None or theirs.get("thumbnail") is None
            theirs.pop("thumbnail", None)
            assert mine == theirs
            if gallery.thumbnail(source_row):
                assert open(shard.thumbnail(row), "rb").read() == open(gallery.thumbnail(source_row), "rb").read()
            assert shard.best_segments([row], q_lat[0, 0]) == gallery.best_segments([source_row], q_lat[0, 0])


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [1, 7, 35])
def test_exhaustive_scatter_gather_equals_the_unsharded_search(source, shard_sets, n, k):
    gallery = Gallery.load(source)
    q_lat, q_con = queries(6, seed=n * 100 + k)
    values, rows = unsharded(gallery, q_lat, q_con, k)
    (top, picked, _), _ = scattered(shard_sets[n], q_lat, q_con, k)
    assert np.array_equal(picked, rows)
    np.testing.assert_allclose(top, values, atol=1e-5, rtol=0)


def test_exact_ties_go_to_the_lower_row_across_shards(tmp_path):
    folder = str(tmp_path / "grid")
    random_gallery(folder, media_folder(str(tmp_path)), grid=True)
    gallery = Gallery.load(folder)
    q_lat, q_con = queries(5, seed=5, grid=True)
    values, rows = unsharded(gallery, q_lat, q_con, 35)
    ties = values[:, 1:] == values[:, :-1]
    assert ties.any() and (rows[:, 1:] > rows[:, :-1])[ties].all()
    for n in (2, 4):
        shard_gallery(folder, n, str(tmp_path / f"s{n}"), progress=False)
        (top, picked, _), _ = scattered(LocalShards.open(str(tmp_path / f"s{n}"), BUILTIN), q_lat, q_con, 35)
        assert np.array_equal(picked, rows) and np.array_equal(top, values)


@pytest.mark.parametrize("where", [["tag=red"], ["year>=2012", "duration<9"], ["tag=blue", "codec=h264"],
                                   ["year=2003"], ["tag=green"]])
def test_filters_are_exact_across_shards(source, shard_sets, where):
    gallery = Gallery.load(source)
    q_lat, q_con = queries(3, seed=7)
    for n in (2, 4):
        for k in (3, 20):
            values, rows = unsharded(gallery, q_lat, q_con, k, where=where)
            (top, picked, _), _ = scattered(shard_sets[n], q_lat, q_con, k, where=where)
            assert np.array_equal(picked, rows), (n, k, where)
            finite = rows >= 0
            np.testing.assert_allclose(top[finite], values[finite], atol=1e-5, rtol=0)
            assert np.isneginf(top[~finite]).all()


def test_hits_carry_the_details_the_unsharded_gallery_gives(source, shard_sets):
    from engine.retriever import hit_details

    gallery = Gallery.load(source)
    q_lat, q_con = queries(2, seed=3)
    _, rows = unsharded(gallery, q_lat, q_con, 10)
    (_, picked, where), answers = scattered(shard_sets[3], q_lat, q_con, 10)
    for i in range(2):
        segments = gallery.best_segments(rows[i], q_lat[i, 0])
        expected = [hit_details(gallery, int(r), s) for r, s in zip(rows[i], segments, strict=True)]
        got = [answers[s]["details"][i][j] for s, j in where[i]]
        assert [d["paths"] for d in got] == [d["paths"] for d in expected]
        assert [d["segment"] for d in got] == [d["segment"] for d in expected]
        assert [answers[s]["ids"][i][j] for s, j in where[i]] == [gallery.ids[r] for r in rows[i]]


def test_two_stage_with_every_candidate_equals_exhaustive(source, shard_sets):
    gallery = Gallery.load(source)
    q_lat, q_con = queries(4, seed=11)
    values, rows = unsharded(gallery, q_lat, q_con, 5)
    (top, picked, _), _ = scattered(shard_sets[4], q_lat, q_con, 5, mode="two-stage", candidates=len(gallery))
    assert np.array_equal(picked, rows)
    np.testing.assert_allclose(top, values, atol=1e-5, rtol=0)


def test_cli_shard_and_its_refusals(source, tmp_path, capsys):
    out = str(tmp_path / "set")
    assert main(["gallery", "shard", source, "--shards", "2", "--out", out]) == 0
    assert sorted(os.listdir(out)) == sorted([SHARDS, "shard-000", "shard-001"])
    assert main(["gallery", "shard", source, "--shards", "3", "--out", out]) == 0  # a shard set may be replaced
    assert len(read_shardset(out)["shards"]) == 3
    capsys.readouterr()
    assert main(["gallery", "shard", source, "--shards", "99", "--out", str(tmp_path / "x")]) == 2
    assert "cannot fill 99 shards" in capsys.readouterr().err
    assert main(["gallery", "shard", source, "--shards", "2", "--out", source]) == 2
    assert main(["gallery", "shard", source, "--shards", "2", "--out", os.path.dirname(source), "--overwrite"]) == 2
    assert "a folder holding it" in capsys.readouterr().err and os.path.isdir(source)
    assert not os.path.exists(tmp_path / "x")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    assert main(["gallery", "shard", source, "--shards", "2", "--out", str(precious)]) == 2
    assert (precious / "notes.txt").read_text() == "mine"


def test_a_changed_shard_or_top_manifest_is_refused(source, tmp_path):
    out = str(tmp_path / "set")
    top = shard_gallery(source, 2, out, progress=False)
    manifest_path = os.path.join(out, "shard-001", "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["created"] = "yesterday"
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle)
    with pytest.raises(ShardSetError, match="not the shard"):
        LocalShards.open(out, BUILTIN)
    edited = dict(top, count=top["count"] + 1)
    with open(os.path.join(out, SHARDS), "w") as handle:
        json.dump(edited, handle)
    with pytest.raises(ShardSetError, match="edited or damaged"):
        read_shardset(out)


def test_a_killed_split_leaves_no_shard_set(source, tmp_path):
    import subprocess
    import sys

    out = str(tmp_path / "set")
    env = dict(os.environ, CVR_TEST_KILL_AT="before-swap", CVR_TEST_KILL_AFTER="3")
    code = ("import sys; from engine.cluster.shardset import shard_gallery; "
            "shard_gallery(sys.argv[1], 2, sys.argv[2], progress=False)")
    done = subprocess.run([sys.executable, "-c", code, source, out], env=env, capture_output=True)
    assert done.returncode == -9
    assert not os.path.exists(out)
    shard_gallery(source, 2, out, progress=False)  # what the killed run left does not stop the next
    assert read_shardset(out)["count"] == len(Gallery.load(source))


def test_cvr_serve_over_local_shards_answers_as_the_unsharded_server(tmp_path_factory):
    """`cvr serve --shards DIR` without Ray: the same app over a ShardedRetriever in this process."""
    import serve_fixture

    from engine.cluster.scatter import ShardedRetriever
    from engine.serve.app import create_app

    world = serve_fixture.demo_world(tmp_path_factory)
    folder = str(tmp_path_factory.mktemp("local-set") / "set")
    shard_gallery(world["gallery"], 2, folder, progress=False)
    plain = serve_fixture.retriever(world["gallery"], world["anchor_cache"])
    sharded = ShardedRetriever(plain.pipeline, folder, LocalShards.open(folder, BUILTIN), "torch", plain.anchor_cache)
    config = serve_fixture.config(folder, world["anchor_cache"], read_only=True)
    client, _ = serve_fixture.client(create_app(config, sharded)), None
    reference, _ = serve_fixture.serve(world)
    body = {"queries": ["a red circle moving left", "a small blue square"], "k": 4, "where": ["duration>=1"]}
    with client, reference:
        got, want = client.post("/v1/search", json=body).json(), reference.post("/v1/search", json=body).json()
        for a, b in zip(got["results"], want["results"], strict=True):
            assert [h["id"] for h in a["hits"]] == [h["id"] for h in b["hits"]]
            assert [h["segment"] for h in a["hits"]] == [h["segment"] for h in b["hits"]]
            np.testing.assert_allclose([h["score"] for h in a["hits"]], [h["score"] for h in b["hits"]], atol=1e-5)
        video_id = got["results"][0]["hits"][0]["id"]
        mine, theirs = client.get(f"/v1/videos/{video_id}").json(), reference.get(f"/v1/videos/{video_id}").json()
        for answer in (mine, theirs):  # the thumbnail's file name inside its part differs; its bytes do not
            answer["record"].pop("thumbnail")
        assert mine == theirs
        assert client.get(f"/v1/videos/{video_id}/thumbnail").content == \
            reference.get(f"/v1/videos/{video_id}/thumbnail").content
        assert client.get("/v1/videos/nope").status_code == 404
        assert client.delete(f"/v1/videos/{video_id}").status_code == 403
        assert client.get("/readyz").json()["videos"] == len(world["ids"])
        bad = client.post("/v1/search", json=dict(body, where=["nosuchfield=1"]))
        assert bad.status_code == 400 and "unknown filter field" in bad.json()["detail"]


def test_cli_refuses_what_it_cannot_serve_or_index(source, tmp_path, capsys):
    ckpt = ["--checkpoint", BUILTIN]
    cases = [
        (["serve", *ckpt], "either --gallery G or --shards DIR"),
        (["serve", *ckpt, "--gallery", source, "--shards", source], "either --gallery G or --shards DIR"),
        (["serve", *ckpt, "--gallery", source, "--ray"], "--ray serves a shard set"),
        (["serve", *ckpt, "--gallery", source, "--replicas", "2"], "--replicas and --max-replicas need --ray"),
        (["serve", *ckpt, "--shards", source], "not a shard set"),
        (["index", *ckpt, "--videos", str(tmp_path), "--out", str(tmp_path / "g"), "--shards-out", "x"],
         "--shards-out needs --shards"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
