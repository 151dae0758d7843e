"""Recall over seeds: baselines, both prompt protocols, ablations and anchor sources, as a table and a plot.

Every row is trained with `cvr train` (RIVRL's recipe) and evaluated on the test split with frozen
normalisation, once per seed; the table shows mean +- sample standard deviation over the seeds, the
JSON keeps every seed's metrics. Rows:

- baselines: the text-only twin (MiniLM encoder) and the RIVRL-parity text-only model (BoW + BiGRU +
  CNN encoder);
- prompt protocols: the full model under the fair query protocol (each caption's anchor is drawn
  from that caption alone, by the shipped 4-step student) and under the paper's SSSS protocol (one
  anchor per video, drawn from the super sentence of all its captions, at training *and* test time:
  the test anchor is made from the answer, so that row leaks it);
- ablations of the full model: anchor regions mean-pooled instead of the hybrid attention, spatial
  attention only, channel attention only, no local branch, no concept space;
- anchor sources: the fair-protocol model evaluated with test anchors from the teacher at 28 steps
  and from the student at 4, 2 and 1 steps (a test-time swap: the model is trained once, on the
  student's 4-step anchors, which is what a deployment that changes its step count does);
- peer methods (issue 18): the GLSCL head (`cvr train --head glscl`, text-only, the same flags,
  seeds and epochs), evaluated by the same metric code; and the generative reranker (`cvr
  train-reranker --base`, DiffusionRet's idea) trained on each seed's checkpoint of the full model
  and of GLSCL, evaluated through the search path users run (`cvr index` of the test videos, then
  what `cvr evaluate --gallery --rerank` runs: `search_metrics` over `Retriever.search`), with the
  same path without the reranker recorded beside it as the check that it reproduces the metric
  code's first stage.

Anchor stores are drawn once per (generator, steps, protocol) and shared by every seed and ablation;
the built-in collection is written once per size; both are reused by later runs when unchanged.
`make bench` runs this at a reduced size that fits its time budget (the table says which); `--full`
runs the demo's size. Runs go to `--jobs` worker processes of one torch thread each.

    python -m bench.recall                       # default size, bench/results/<machine>/recall.*
    python -m bench.recall --full --jobs 2       # 600 videos x 10 captions, 10 epochs
    python -m bench.recall --root ~/VisualSearch --collection msrvtt10k --feature resnext101-resnet152
    python -m bench.recall --tiny --out /tmp/r   # seconds: a smoke run (tests)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench import common
from bench.recall_plan import (  # noqa: F401 (re-exported: bench.recall is the public module)
    ANCHORS_PER_QUERY,
    HEADERS,
    METRICS,
    PEERS,
    RERANK_COST,
    TINY_DIMS,
    TINY_GLSCL,
    TINY_RERANK,
    Plan,
    Row,
    Store,
    ensure_collection,
    make_plan,
    rows,
    sizes,
    stores,
    student_store,
)
from bench.recall_report import (  # noqa: F401 (re-exported: tests read first_stage_agreement)
    aggregate,
    concept_note,
    first_stage_agreement,
    markdown,
    notes,
    peer_notes,
    plot,
    variant_notes,
)
from bench.recall_tasks import (  # noqa: F401 (re-exported: bench.transfer runs its tasks with run_tasks and run_cli)
    anchor_task,
    log_path,
    rerank_task,
    run_cli,
    run_task,
    run_tasks,
    search_path,
    search_path_metrics,
    train_task,
)

# ---------------------------------------------------------------------------------------------
# main


def run(plan: Plan) -> dict:
    store = stores(plan.variants)
    all_rows = rows(store)
    ensure_collection(plan)
    store_dir = lambda name: os.path.join(plan.work, "anchors", name)
    anchor_tasks = [t for s in store.values() if (t := anchor_task(plan, s)) is not None]
    run_tasks(anchor_tasks, plan.jobs, "anchor stores")
    tasks = []
    for row in (r for r in all_rows if r.trained_by is None and r.rerank_of is None):
        evaluations = {row.name: store_dir(row.anchors) if row.anchors else None}
        evaluations.update({r.name: store_dir(r.test_anchors) for r in all_rows if r.trained_by == row.name})
        rerankers = [r for r in all_rows if r.rerank_of == row.name]
        tasks += [train_task(plan, row, seed, evaluations, store_dir, rerankers) for seed in plan.seeds]
    tasks.sort(key=lambda t: -t["cost"])  # the longest first, so that the workers finish together
    results = run_tasks(tasks, plan.jobs, "trainings")
    return {"format": "cvr-sdgm/bench-recall/1", "rows": aggregate(all_rows, results, plan.seeds),
            "sizes": sizes(plan), "stores": {k: asdict(v) for k, v in store.items()}}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.recall", description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="a collection in the MSR-VTT layout (default: the built-in set)")
    p.add_argument("--collection", default="msrvtt10k", help="collection name under --root")
    p.add_argument("--feature", default="resnext101-resnet152", help="frame feature folder under --root")
    p.add_argument("--videos", type=int, default=200, help="built-in set: clips (default 200; demo 600)")
    p.add_argument("--captions", type=int, default=5, help="built-in set: captions per clip (default 5; demo 10)")
    p.add_argument("--frames", type=int, default=8, help="built-in set: frames per clip")
    p.add_argument("--epochs", type=int, default=5, help="training epochs at most (default 5; demo 10)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    p.add_argument("--full", action="store_true", help="the demo's size: 600 videos x 10 captions, 10 epochs")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="worker processes of one thread each (default: the cores, at most 4)")
    p.add_argument("--work", default="runs/bench", help="data, anchor stores, checkpoints and logs")
    p.add_argument("--reuse", action="store_true", help="keep checkpoints trained by an identical earlier run")
    p.add_argument("--out", default=None, help="result folder (default: bench/results/<machine>/)")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tiny collection and model)")
    p.add_argument("--variants", action="store_true",
                   help="also the anchor-variant rows (anchors per query N = 2, 4; anchor from generator features, "
                        "tested at 4, 2 and 1 steps): about 10 more minutes; `make bench` passes it")
    args = p.parse_args(argv)
    if args.full:
        args.videos, args.captions, args.epochs = 600, 10, 10
    if args.tiny:  # tiny model; a tiny built-in collection unless --root names one
        common.apply_tiny(args, **({} if args.root else {"videos": 12, "captions": 2, "frames": 2}))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    plan = make_plan(args)
    info = common.machine_info()
    result = run(plan)
    result["rows"] = common.stamp(result["rows"], info)
    result.update(machine=info, machine_slug=common.machine_slug(info), jobs=plan.jobs,
                  wall_seconds=round(time.perf_counter() - start, 1), cpu_seconds=common.cpu_seconds(),
                  tiny=plan.tiny)
    out = common.results_dir(args.out or (os.path.join(plan.work, "results") if args.tiny else None), info)
    paths = common.write_results(out, "recall", result, markdown(result), plot)
    print(Path(paths["md"]).read_text())
    print(f"wrote {paths['md']}, {paths['json']} and {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
