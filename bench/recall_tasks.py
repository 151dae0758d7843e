"""bench/recall.py's runs as tasks (`cvr` commands in worker processes: plain dicts in, plain dicts out)."""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from bench.recall_plan import METRICS, RERANK_COST, TINY_GLSCL, TINY_RERANK, Plan, Row, Store
from engine import files

# ---------------------------------------------------------------------------------------------
# Tasks (run in worker processes: plain dicts in, plain dicts out)


def anchor_task(plan: Plan, store: Store) -> dict | None:
    """The `cvr anchors` run for a store, or None when an identical store is already there."""
    from engine.anchors import generator_id

    folder = os.path.join(plan.work, "anchors", store.name)
    meta_path = Path(folder, "anchor_meta.json")
    wanted = {"generator_id": generator_id(store.generator), "steps": store.steps, "protocol": store.protocol,
              "split": store.splits, "collection": plan.collection, "anchors_per_query": store.per_query,
              "features": store.features}
    defaults = {"anchors_per_query": 1, "features": "pixels"}  # what a store's meta leaves out
    if meta_path.is_file():
        meta = {**defaults, **json.loads(meta_path.read_text())}
        if {k: meta.get(k) for k in wanted} == wanted:
            return None
    argv = ["anchors", "--generator", store.generator, "--root", plan.root, "--collection", plan.collection,
            "--split", store.splits, "--prompt", store.protocol, "--steps", str(store.steps), "--out", folder,
            "--anchors-per-query", str(store.per_query), "--features", store.features, "--quiet"]
    return {"kind": "anchors", "name": store.name, "argv": argv, "log": log_path(plan, f"anchors_{store.name}")}


def train_task(plan: Plan, row: Row, seed: int, evaluations: dict, store_dir, rerankers: tuple = ()) -> dict:
    """Train one row at one seed, then evaluate it with each {row name: anchor store or None}, then
    train and evaluate each reranker row of `rerankers` on that checkpoint."""
    checkpoint = os.path.join(plan.work, "checkpoints", f"{row.name}_s{seed}")
    anchors = ["--anchors", store_dir(row.anchors) if row.anchors else "none"]
    tiny_head = TINY_GLSCL if plan.tiny and "glscl" in row.train_flags else []
    # --overwrite: a run retrains into the folders of an earlier run (unless --reuse keeps them).
    argv = ["train", *plan.train_flags(), "--seed", str(seed), "--out", checkpoint, "--overwrite", *anchors,
            *row.train_flags, *tiny_head]
    reranks = [rerank_task(plan, r, seed, checkpoint, store_dir) for r in rerankers]
    return {"kind": "train", "name": row.name, "seed": seed, "argv": argv, "checkpoint": checkpoint,
            "reuse": plan.reuse, "evaluations": evaluations, "root": plan.root, "collection": plan.collection,
            "rerankers": reranks, "log": log_path(plan, f"{row.name}_s{seed}"),
            "cost": row.cost + 0.05 * len(evaluations) + RERANK_COST * len(reranks)}


def rerank_task(plan: Plan, row: Row, seed: int, checkpoint: str, store_dir) -> dict:
    """One reranker row at one seed, on the base row's checkpoint: the `cvr train-reranker` and
    `cvr index` commands (the test videos, float32, so that the search path scores what the metric
    code scores), and the gallery the evaluation searches."""
    name = f"{row.name}_s{seed}"
    reranker = os.path.join(plan.work, "rerankers", name)
    gallery = os.path.join(plan.work, "galleries", f"{row.rerank_of}_s{seed}_test")
    data = ["--root", plan.root, "--collection", plan.collection]
    anchors = ["--anchors", store_dir(row.anchors)] if row.anchors else []
    train = ["train-reranker", "--base", checkpoint, *data, "--epochs", str(plan.epochs), "--seed", str(seed),
             "--out", reranker, "--quiet", "--overwrite", *anchors, *(TINY_RERANK if plan.tiny else [])]
    index = ["index", "--checkpoint", checkpoint, *data, "--split", "test", "--dtype", "float32", "--out", gallery,
             "--quiet", "--overwrite"]
    return {"name": row.name, "reranker": reranker, "train": train, "index": index, "gallery": gallery,
            "anchor_cache": os.path.join(plan.work, "anchor_cache", name)}


def log_path(plan: Plan, name: str) -> str:
    os.makedirs(os.path.join(plan.work, "logs"), exist_ok=True)
    return os.path.join(plan.work, "logs", f"{name}.log")


def run_task(task: dict) -> dict:
    """Run one task with its output in its log file (workers run side by side)."""
    import torch

    torch.set_num_threads(1)  # one thread per worker: the workers share the machine's cores
    with open(task["log"], "w", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        if task["kind"] == "anchors":
            run_cli(task)
            return {"kind": "anchors", "name": task["name"]}
        return _train_and_evaluate(task)


def run_cli(task: dict, argv: list | None = None) -> None:
    from engine.cli import main

    argv = argv or task["argv"]
    if main(argv) != 0:
        raise RuntimeError(f"`cvr {' '.join(argv)}` failed: see {task['log']}")


def _train_and_evaluate(task: dict) -> dict:
    from training.retrieval import evaluate_checkpoint

    # Beside the folder, not in it: `cvr train` refuses to replace a checkpoint that holds files it did not write.
    marker = Path(task["checkpoint"] + ".bench_task.json")
    if not (task["reuse"] and marker.is_file() and json.loads(marker.read_text()) == task["argv"]):
        start = time.perf_counter()
        run_cli(task)
        files.write_json(marker, task["argv"])
        print(f"trained in {time.perf_counter() - start:.1f} s", flush=True)
    metrics, first_stage, rerankers = {}, {}, {}
    for name, store in task["evaluations"].items():
        result = evaluate_checkpoint(task["checkpoint"], task["root"], task["collection"], "test", anchors=store)
        metrics[name] = result["metrics"]
    for spec in task["rerankers"]:
        metrics[spec["name"]], first_stage[spec["name"]], rerankers[spec["name"]] = _rerank_and_evaluate(task, spec)
    return {"kind": "train", "name": task["name"], "seed": task["seed"], "metrics": metrics,
            "first_stage": first_stage, "rerankers": rerankers}


def _rerank_and_evaluate(task: dict, spec: dict) -> tuple:
    """(reranked metrics, first-stage metrics through the same search path, the reranker's
    config and best epoch): the commands of `rerank_task`, run as `cvr` runs them, then `search_path`."""
    from engine.reranking import read_reranker_config

    marker = Path(spec["reranker"] + ".bench_task.json")  # beside the folder: a reranker folder is sealed
    wanted = {"argv": spec["train"], "base": _checkpoint_digest(task["checkpoint"])}
    if not (task["reuse"] and marker.is_file() and json.loads(marker.read_text()) == wanted):
        start = time.perf_counter()
        run_cli(task, spec["train"])
        files.write_json(marker, wanted)
        print(f"reranker trained in {time.perf_counter() - start:.1f} s", flush=True)
    run_cli(task, spec["index"])
    found = search_path(task, spec)
    config = read_reranker_config(spec["reranker"])
    about = {"config": config["reranker"].to_dict(), "best_epoch": config["train"]["best_epoch"]}
    return found[1], found[0], about


def search_path(task: dict, spec: dict) -> list:
    """[first-stage metrics, reranked metrics] of the test captions searched through one Retriever
    (the path `cvr evaluate --gallery [--rerank]` runs: engine.search_eval.search_metrics, exhaustive,
    k = the whole gallery), without and then with the reranker; the query anchors drawn for the
    first pass are cached on disk for the second (`--anchor-cache`), as `cvr search` caches them."""
    from engine.datasets import Collection
    from engine.retriever import Retriever
    from engine.search import SearchOptions
    from engine.search_eval import search_metrics

    captions = Collection(task["root"], task["collection"]).captions("test")
    retriever = Retriever(task["checkpoint"], spec["gallery"], anchor_cache=spec["anchor_cache"])
    found = []
    for reranker in (None, spec["reranker"]):
        start = time.perf_counter()
        retriever.set_reranker(reranker)
        found.append(search_path_metrics(search_metrics(retriever, captions, options=SearchOptions("exhaustive"))))
        print(f"evaluated through the search path ({'reranked' if reranker else 'first stage'}) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    return found


def _checkpoint_digest(checkpoint: str) -> str:
    from engine.checkpoint import checkpoint_id

    return checkpoint_id(checkpoint)


def search_path_metrics(found: dict) -> dict:
    """`cvr evaluate --gallery` metrics (engine/search_eval.py) in this table's columns: t2v only
    (the reranker reorders a query's videos; it has no video-to-text side), MnR over the found,
    which is every caption (k = the whole gallery, exhaustive), SumR of t2v."""
    if found["found"] != 1.0 or found["videos_not_in_gallery"]:
        raise RuntimeError(f"the search path missed captions: found {found['found']}")
    out = {m: None for m in METRICS}
    out.update({m: found[m] for m in ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "t2v_map")})
    out["t2v_mnr"] = found["t2v_mnr_found"]
    out["sumr"] = found["t2v_r1"] + found["t2v_r5"] + found["t2v_r10"]
    return out


def run_tasks(tasks: list, jobs: int, desc: str, worker=None) -> list:
    """Every task through `worker` (default `run_task`), in `jobs` spawned worker processes (in
    this process when jobs is 1)."""
    from tqdm import tqdm

    worker = worker or run_task
    if not tasks:
        return []
    if jobs <= 1:
        return [worker(t) for t in tqdm(tasks, desc=desc, unit="run")]
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # fork after torch has started threads can hang
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(worker, t) for t in tasks]
        done = concurrent.futures.as_completed(futures)
        return [f.result() for f in tqdm(done, total=len(futures), desc=desc, unit="run")]
