"""bench/transfer.py: the per-part metrics, the paired interval, and a tiny end-to-end run."""
import json
import statistics

import numpy as np
import pytest

from bench import transfer as transfer_bench
from engine.errors import InputError
from engine.metrics import retrieval_metrics
from training.retrieval import SplitData, part_metrics


def _split(cap_ids, caption_video):
    n = max(caption_video) + 1
    return SplitData(cap_ids=cap_ids, captions=list(cap_ids), video_ids=[f"v{i}" for i in range(n)],
                     caption_video=np.array(caption_video), frames=None, frame_mask=None, tags=None)


def test_part_metrics_rank_a_part_against_every_video():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((7, 5)).astype(np.float32)
    data = _split([f"c{i}" for i in range(7)], [0, 0, 1, 2, 3, 4, 4])
    got = part_metrics(scores, data, {"a": ["c0", "c3", "c6"], "b": ["c1", "c2"]})
    assert got["a"] == retrieval_metrics(scores[[0, 3, 6]], np.array([0, 2, 4]))
    assert got["b"] == retrieval_metrics(scores[[1, 2]], np.array([0, 1]))
    # hand-worked t2v R@1 of part a: a query is a hit where its video has the row's highest score
    hits = [scores[r].argmax() == v for r, v in ((0, 0), (3, 2), (6, 4))]
    assert got["a"]["t2v_r1"] == pytest.approx(100 * np.mean(hits))
    with pytest.raises(InputError, match="not in the split"):
        part_metrics(scores, data, {"a": ["c9"]})
    with pytest.raises(InputError, match="no captions"):
        part_metrics(scores, data, {"a": []})


def test_interval95_is_the_t_interval_of_paired_differences():
    mean, low, high = transfer_bench.interval95([1.0, 2.0, 6.0])
    half = 4.302652729911275 * statistics.stdev([1.0, 2.0, 6.0]) / 3 ** 0.5  # t(0.975, 2 degrees of freedom)
    assert mean == pytest.approx(3.0) and low == pytest.approx(3.0 - half) and high == pytest.approx(3.0 + half)
    assert transfer_bench.interval95([2.0]) == (2.0, None, None)


def test_transfer_tiny_writes_every_arm_part_and_difference(tmp_path):
    assert transfer_bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "transfer.json").read_text())
    arms = {(a["encoder"], a["model"], a["part"]) for a in result["arms"]}
    assert arms == {(e, m, p) for e in ("bow", "minilm") for m in ("text", "full") for p in ("seen", "held_out")}
    by_arm = {(a["encoder"], a["model"], a["part"]): a for a in result["arms"]}
    for d in result["differences"]:
        for metric, diff in d["difference"].items():
            full = by_arm[(d["encoder"], "full", d["part"])]["per_seed"]
            text = by_arm[(d["encoder"], "text", d["part"])]["per_seed"]
            assert diff["per_seed"] == [full[s][metric] - text[s][metric] for s in ("0", "1")]
            assert diff["low"] <= diff["mean"] <= diff["high"]
    split = json.loads((tmp_path / "transfer_split.json").read_text())
    assert split["held_out_pairs"] == result["split"]["held_out_pairs"]
    assert result["sizes"]["seen"] == len(split["test_parts"]["seen"]) > 0
    table = (tmp_path / "transfer.md").read_text()
    assert table.splitlines()[0] == "| " + " | ".join(transfer_bench.HEADERS) + " |" and "95% CI" in table
    assert (tmp_path / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
