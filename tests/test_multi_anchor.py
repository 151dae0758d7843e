"""Several anchors per query (issue 17 item 3): the query tower reads N anchors' region grids
concatenated along the region axis, with a region mask; the store, training and the query path
draw N anchors per query with seeds base..base+N-1."""
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from engine.config import ModelConfig
from engine.model import QueryTower

SMALL = dict(frame_dim=24, region_dim=20, attn_dim=16, latent_dim=12, concept_dim=10, video_gru_hidden=8,
             video_local_dim=14, dropout=0.0)
SENT, TOK = 18, 22
MODES = ("hybrid", "spatial", "channel", "meanpool")


def _tower(mode="hybrid", seed=0):
    torch.manual_seed(seed)
    tower = QueryTower(ModelConfig(**SMALL, use_anchor=True, attention=mode), SENT, TOK).eval()
    # BatchNorm in eval mode with its initial statistics is the identity: give it some so that a
    # difference anywhere would show.
    for module in tower.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return tower


def _text(batch=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 1:] = False
    return torch.randn(batch, SENT, generator=g), torch.randn(batch, length, TOK, generator=g), mask


def _regions(batch=3, count=5, seed=1):
    return torch.randn(batch, count, SMALL["region_dim"], generator=torch.Generator().manual_seed(seed))


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a.lat, b.lat, atol=tol, rtol=0)
    torch.testing.assert_close(a.con, b.con, atol=tol, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_one_anchor_with_a_full_mask_is_the_single_anchor_model(mode):
    tower, text, regions = _tower(mode), _text(), _regions()
    plain = tower(*text, regions)
    masked = tower(*text, regions, torch.ones(regions.shape[:2], dtype=torch.bool))
    assert torch.equal(plain.lat, masked.lat) and torch.equal(plain.con, masked.con)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("copies", [2, 4])
def test_copies_of_one_anchor_read_as_that_anchor(mode, copies):
    """Every pooling over regions is a softmax or a mean, and both give N copies of a set the
    weights of the set itself (each copy gets 1/N of it): N copies are exactly one anchor."""
    tower, text, regions = _tower(mode), _text(), _regions()
    _close(tower(*text, regions.repeat(1, copies, 1)), tower(*text, regions))


@pytest.mark.parametrize("mode", MODES)
def test_masked_out_regions_change_nothing(mode):
    tower, text = _tower(mode), _text()
    real = _regions(count=8)  # two anchors of 4 regions
    padded = torch.cat([real, 1e3 * _regions(count=4, seed=5)], 1)  # a third anchor slot, padding
    mask = torch.ones(padded.shape[:2], dtype=torch.bool)
    mask[:, 8:] = False
    mask[1, 4:] = False  # query 1 has one real anchor only
    out = tower(*text, padded, mask)
    whole = tower(*text, real)
    for q in (0, 2):
        torch.testing.assert_close(out.lat[q], whole.lat[q], atol=1e-5, rtol=0)
    one = tower(*[t[1:2] for t in text], real[1:2, :4])
    torch.testing.assert_close(out.lat[1:2], one.lat, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.con[1:2], one.con, atol=1e-5, rtol=0)


def _plain_attention(att, sentence, tokens, token_mask, regions, region_mask):
    """The hybrid attention of ARCHITECTURE.md section 4 re-stated query by query, in loops, over
    the valid regions only (no masked softmax: the invalid ones are dropped)."""
    d = att.sentence.out_features
    gamma = torch.sigmoid(att.gamma_logit)
    a_out, view_out = [], []
    for b in range(sentence.shape[0]):
        r = att.regions(regions[b][region_mask[b]])  # (R_valid, d)
        t = att.sentence(sentence[b])
        m = r.mean(0)
        beta = torch.sigmoid(att.channel(torch.cat([t, m])))
        alpha = torch.softmax(r @ t / math.sqrt(d), 0)
        a_s = (alpha[:, None] * r).sum(0)
        a_c = beta * m
        a = {"hybrid": gamma * a_s + (1 - gamma) * a_c, "spatial": a_s, "channel": a_c, "meanpool": m}[att.mode]
        views = []
        for ell in range(tokens.shape[1]):
            if not token_mask[b, ell]:
                views.append(torch.zeros(d))
                continue
            if att.mode == "meanpool":
                views.append(m)
                continue
            w = torch.softmax(r @ att.tokens(tokens[b, ell]) / math.sqrt(d), 0)
            views.append((w[:, None] * r).sum(0))
        rel = torch.sigmoid(att.relevance(torch.cat([t, a])))
        a_out.append(rel * a)
        view_out.append(rel * torch.stack(views))
    return torch.stack(a_out), torch.stack(view_out)


@pytest.mark.parametrize("mode", MODES)
def test_attention_matches_a_plain_restatement(mode):
    """Odd sizes (5 queries, 3 anchors of 7 regions, 9 tokens) and ragged masks."""
    tower = _tower(mode, seed=3)
    g = torch.Generator().manual_seed(7)
    sentence, tokens = torch.randn(5, SENT, generator=g), torch.randn(5, 9, TOK, generator=g)
    token_mask = torch.arange(9)[None, :] < torch.tensor([9, 1, 5, 3, 8])[:, None]
    regions = torch.randn(5, 21, SMALL["region_dim"], generator=g)
    region_mask = torch.ones(5, 21, dtype=torch.bool)
    region_mask[1, 7:] = False  # one anchor
    region_mask[3, 14:] = False  # two anchors
    region_mask[4, 3] = False  # a single masked region inside an anchor
    with torch.no_grad():
        a, view = tower.attention(sentence, tokens, token_mask, regions, region_mask)
        a_ref, view_ref = _plain_attention(tower.attention, sentence, tokens, token_mask, regions, region_mask)
    torch.testing.assert_close(a, a_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(view, view_ref, atol=1e-5, rtol=1e-5)


def test_gradients_skip_masked_regions():
    tower = _tower()
    tower.train()
    regions = _regions(count=8).requires_grad_()
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[:, 4:] = False
    out = tower(*_text(), regions, mask)
    (out.lat.sum() + out.con.sum()).backward()
    assert regions.grad[:, 4:].abs().max() == 0
    assert regions.grad[:, :4].abs().max() > 0
    assert not F.normalize(out.lat, dim=-1).isnan().any()


# ---------------------------------------------------------------------------------------------
# The store and training


def _tiny_generator(folder):
    """A tiny built-in generator conditioned on MiniLM (so `cvr anchors` needs no stub)."""
    from engine import anchors as A

    torch.manual_seed(0)
    config = A.BuiltinConfig(image_size=8, fold=2, num_layers=1, num_single_layers=1, attention_head_dim=8,
                             num_attention_heads=2, joint_attention_dim=384, pooled_projection_dim=384,
                             axes_dims_rope=(2, 2, 4), default_steps=2)
    return str(A.save_builtin(folder, A.build_transformer(config), config))


@pytest.fixture(scope="module")
def drawn(msrvtt, tmp_path_factory):
    """A generator and two stores over every split of `msrvtt`: one anchor and two per caption."""
    from engine.cli import main

    work = tmp_path_factory.mktemp("multi_anchor")
    generator = _tiny_generator(work / "generator")
    common = ["anchors", "--generator", generator, "--root", msrvtt, "--collection", "msrvtt10k", "--split",
              "train,val,test", "--image-size", "64", "--device", "cpu", "--quiet"]
    assert main([*common, "--out", str(work / "one")]) == 0
    assert main([*common, "--anchors-per-query", "2", "--out", str(work / "two")]) == 0
    return {"work": work, "generator": generator, "root": msrvtt, "one": str(work / "one"),
            "two": str(work / "two")}


def test_a_store_of_two_anchors_holds_seed_0_then_seed_1(drawn):
    from engine import anchor_store as S
    from engine.anchors import AnchorGenerator, GeneratorOptions
    from engine.datasets import Collection
    from engine.vision import RegionExtractor, VisionConfig

    ids_one, one, meta_one = S.read_anchor_store(drawn["one"])
    ids_two, two, meta_two = S.read_anchor_store(drawn["two"])
    assert ids_two == ids_one and "anchors_per_query" not in meta_one and meta_two["anchors_per_query"] == 2
    r = meta_one["regions"]
    assert one.shape == (len(ids_one), r, 2048) and two.shape == (len(ids_one), 2 * r, 2048)
    np.testing.assert_allclose(two[:, :r], one, atol=1e-4)  # anchor 0 is the one-anchor store's
    # Anchor 1 is the prompt drawn with seed 1 (engine.portable.prompt_seed(prompt, 1)).
    captions = dict(Collection(drawn["root"], "msrvtt10k").captions("test"))
    cap_id = next(i for i in ids_one if i in captions)
    generator = AnchorGenerator.load(drawn["generator"], GeneratorOptions(), device="cpu")
    extractor = RegionExtractor.from_config(VisionConfig(image_size=64))
    second = extractor.regions(generator.generate([captions[cap_id]], seed=1))[0].numpy()
    row = ids_one.index(cap_id)
    np.testing.assert_allclose(two[row, r:], second, atol=1e-4)
    assert np.abs(two[row, r:] - two[row, :r]).max() > 1e-3  # another seed, another anchor


def test_training_records_the_anchors_it_read(drawn, tmp_path):
    from test_retrieval import TINY

    from engine.checkpoint import read_checkpoint_config
    from engine.cli import main
    from training.retrieval import AnchorStore, checkpoint_anchors

    common = ["--root", drawn["root"], "--collection", "msrvtt10k", "--feature", "resnext101-resnet152"]
    assert main(["train", *common, "--out", str(tmp_path / "two"), "--anchors", drawn["two"]] + TINY) == 0
    assert checkpoint_anchors(read_checkpoint_config(str(tmp_path / "two"))) == 2
    assert main(["train", *common, "--out", str(tmp_path / "first"), "--anchors", drawn["two"],
                 "--anchors-per-query", "1"] + TINY) == 0
    assert checkpoint_anchors(read_checkpoint_config(str(tmp_path / "first"))) == 1
    assert main(["evaluate", "--checkpoint", str(tmp_path / "two"), *common[:4], "--anchors", drawn["two"],
                 "--out", str(tmp_path / "e")]) == 0
    # A checkpoint of two anchors cannot be evaluated on a store of one; a store cannot give more than it holds.
    assert main(["evaluate", "--checkpoint", str(tmp_path / "two"), *common[:4], "--anchors", drawn["one"],
                 "--out", str(tmp_path / "e1")]) == 2
    with pytest.raises(Exception, match="holds 2 per id"):
        AnchorStore(drawn["two"], 3)
    store = AnchorStore(drawn["two"], 1)
    assert store.lookup([next(iter(store.row))]).shape[1] == store.regions_per_anchor


def test_the_anchors_per_query_comparison_trains_measures_and_writes_its_table(drawn, capsys):
    """python -m training.anchors_per_query: one row per N from the store it finds, recall and latency."""
    import json
    import shutil

    from training.anchors_per_query import main

    work = drawn["work"]  # beside the generator, which the store names by a relative path
    shutil.copytree(drawn["two"], work / "anchors_x2")  # the store it would draw: not drawn again
    assert main(["--root", drawn["root"], "--collection", "msrvtt10k", "--work", str(work),
                 "--generator", drawn["generator"], "--counts", "1,2", "--feature", "resnext101-resnet152",
                 "--epochs", "1"]) == 0
    result = json.loads((work / "anchors_per_query.json").read_text())
    rows = result["rows"]
    assert [r["anchors_per_query"] for r in rows] == [1, 2]
    for row in rows:
        assert all(0 <= row[k] <= 100 for k in ("t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1"))
        assert row["t2v_r1"] <= row["t2v_r5"] <= row["t2v_r10"]
        assert row["latency_ms"]["total"] > 0 and row["latency_ms"]["anchor"] > 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split(" | ")[:2] for line in lines] == [["| 1", f"{rows[0]['t2v_r1']:.1f}"],
                                                         ["| 2", f"{rows[1]['t2v_r1']:.1f}"]]


# ---------------------------------------------------------------------------------------------
# The query path


@pytest.fixture(scope="module")
def searchable(drawn):
    """A checkpoint trained on the two-anchor store, and its gallery."""
    from test_retrieval import TINY

    from engine.cli import main

    work, common = drawn["work"], ["--root", drawn["root"], "--collection", "msrvtt10k"]
    checkpoint, gallery = str(work / "ckpt_two"), str(work / "gallery_two")
    assert main(["train", *common, "--feature", "resnext101-resnet152", "--out", checkpoint, "--anchors",
                 drawn["two"]] + TINY) == 0
    assert main(["index", "--checkpoint", checkpoint, *common, "--out", gallery, "--dtype", "float32", "--quiet"]) == 0
    return {**drawn, "checkpoint": checkpoint, "gallery": gallery}


def _captured_regions(retriever, texts):
    """The regions the Retriever's query path feeds the query tower for `texts`."""
    from engine.retriever import Timings

    seen = []
    encode = retriever.pipeline.encode_queries
    retriever.pipeline.encode_queries = lambda text, regions=None: seen.append(regions) or encode(text, regions)
    try:
        retriever._encode(texts, Timings())
    finally:
        retriever.pipeline.encode_queries = encode
    return np.asarray(seen[0])


def test_search_draws_the_anchors_the_model_was_trained_on(searchable):
    """The torch query path draws N = 2 anchors per query (seeds 0 and 1) and feeds the very grids
    the store holds for that caption, side by side."""
    from engine import anchor_store as S
    from engine.datasets import Collection
    from engine.retriever import Retriever, joint_regions

    retriever = Retriever(searchable["checkpoint"], searchable["gallery"])
    assert retriever.pipeline.anchors_per_query == 2
    ids, stored, _ = S.read_anchor_store(searchable["two"])
    captions = Collection(searchable["root"], "msrvtt10k").captions("test")[:3]
    got = _captured_regions(retriever, [t for _, t in captions])
    want = np.stack([stored[ids.index(c)] for c, _ in captions])
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert retriever.search([t for _, t in captions], k=3)[0].hits
    # joint_regions lays out draw-major stacks as the store does, for numpy and torch alike.
    stack = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2 * 3, 4, 5)
    joined = joint_regions(stack, 2)
    assert joined.shape == (3, 8, 5) and np.array_equal(joined[1, 4:], stack[3 + 1])
    assert np.array_equal(joint_regions(torch.from_numpy(stack), 2).numpy(), joined)


def test_onnxruntime_draws_as_many_anchors_and_ranks_as_torch(searchable):
    """The export's query tower takes N*R regions (fixed at export, from the checkpoint's N); ONNX
    Runtime draws the same two anchors and returns torch's top 10."""
    pytest.importorskip("onnxruntime")
    from engine.retriever import Retriever
    from export.onnx import SEARCH_MODULES, ExportOptions, export_onnx

    export = str(searchable["work"] / "export_two")
    export_onnx(searchable["checkpoint"], export, ExportOptions(modules=SEARCH_MODULES))
    ort = Retriever(searchable["checkpoint"], searchable["gallery"], backend="onnxruntime", export_dir=export)
    torch_retriever = Retriever(searchable["checkpoint"], searchable["gallery"])
    assert ort.pipeline.anchors_per_query == 2
    assert ort.pipeline.manifest["modules"]["query_tower"]["inputs"]["regions"]["shape"][1] == 2 * 4
    texts = ["a red car", "a man and a dog in video number 1", "running dog"]
    np.testing.assert_allclose(_captured_regions(ort, texts), _captured_regions(torch_retriever, texts), atol=1e-3)
    for ref, got in zip(torch_retriever.search(texts, k=10), ort.search(texts, k=10), strict=True):
        assert [v for v, _ in got.hits] == [v for v, _ in ref.hits]
        assert max(abs(a - b) for (_, a), (_, b) in zip(ref.hits, got.hits, strict=True)) <= 1e-4
