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
import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import common
from engine import files

METRICS = ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "t2v_mnr", "t2v_map",
           "v2t_r1", "v2t_r5", "v2t_r10", "v2t_medr", "v2t_mnr", "v2t_map", "sumr")
HEADERS = ["model", "t2v R@1", "R@5", "R@10", "MedR", "MnR", "mAP",
           "v2t R@1", "R@5", "R@10", "MedR", "MnR", "mAP", "SumR"]
# Model widths and batch of the smoke run (--tiny), as tests/test_retrieval.py's TINY flags.
TINY_DIMS = ["--latent-dim", "32", "--attn-dim", "16", "--video-gru-hidden", "16", "--video-local-dim", "32",
             "--batch-size", "16"]
# ... and of the glscl head (tests/test_glscl.py's) and the reranker (a narrow denoiser, T = 8).
TINY_GLSCL = ["--glscl-heads", "4", "--glscl-frames", "5", "--glscl-queries", "3", "--glscl-decoder-layers", "1",
              "--glscl-temporal-layers", "1"]
TINY_RERANK = ["--hidden", "32", "--diffusion-steps", "8", "--batch-size", "16"]
PEERS = "peer methods and the generative reranker (same data, seeds, widths and epochs)"
ANCHORS_PER_QUERY = (2, 4)  # the "anchors per query" rows (N = 1 is the full model's row)
RERANK_COST = 1.5  # a reranker's training and two search-path evaluations, relative to a full-model training


# ---------------------------------------------------------------------------------------------
# What is measured


@dataclass
class Store:
    """One anchor store: which generator draws it, at how many steps, for which prompts and splits."""

    name: str
    generator: str
    steps: int
    protocol: str  # query | ssss
    splits: str
    label: str
    per_query: int = 1  # anchors drawn per caption (`cvr anchors --anchors-per-query`)
    features: str = "pixels"  # what its regions are: ResNet-50 over pixels, or the generator's latent


@dataclass
class Row:
    name: str
    label: str
    group: str
    train_flags: list = field(default_factory=list)  # `cvr train` flags beyond the shared ones
    anchors: str | None = None  # Store name used for training and evaluation; None: text-only
    leaks_answer: bool = False
    trained_by: str | None = None  # an evaluation-only row: the row whose checkpoints it evaluates
    test_anchors: str | None = None  # ... with this store's test anchors
    cost: float = 1.0  # training time relative to the others, to start the longest runs first
    rerank_of: str | None = None  # a reranker row: trained on this row's checkpoints, scored by the search path


def student_store(name: str, steps: int, splits: str, protocol: str = "query", **kind) -> Store:
    folder, label = common.student_source(steps)
    return Store(name, str(folder), steps, protocol, splits, label, **kind)


def stores(variants: bool = False) -> dict:
    every = "train,val,test"
    found = [student_store("student4", 4, every), student_store("ssss", 4, every, "ssss"),
             Store("teacher28", str(common.TEACHER), 28, "query", "test", "teacher at 28 steps"),
             student_store("student2", 2, "test"), student_store("student1", 1, "test")]
    if variants:
        found += [*(student_store(f"student4x{n}", 4, every, per_query=n) for n in ANCHORS_PER_QUERY),
                  student_store("latent4", 4, every, features="latent")]
    return {s.name: s for s in found}


def rows(store: dict) -> list:
    """Every row whose anchor stores `store` holds (the variant rows only with `stores(variants=True)`)."""
    s4 = store["student4"].label
    ablation = "ablation of the full model (fair protocol)"
    variants = f"anchor variants (fair protocol, {s4})"
    source = "anchor source at test time (full model trained on the 4-step student's anchors)"
    return [
        Row("text-minilm", "text-only twin (MiniLM encoder)", "baselines"),
        Row("text-rivrl", "text-only, RIVRL parity (BoW + BiGRU + CNN encoder)", "baselines",
            ["--text-encoder", "rivrl"], cost=2.5),  # its text encoder trains: no cached MiniLM features
        Row("full", f"full model, fair query protocol ({s4})", "prompt protocol", anchors="student4"),
        Row("full-ssss", "full model, SSSS protocol (anchor from all of a video's captions: LEAKS THE ANSWER)",
            "prompt protocol", anchors="ssss", leaks_answer=True),
        Row("meanpool", "anchor regions mean-pooled instead of the hybrid attention", ablation,
            ["--attention", "meanpool"], anchors="student4"),
        Row("spatial", "spatial attention only", ablation, ["--attention", "spatial"], anchors="student4"),
        Row("channel", "channel attention only", ablation, ["--attention", "channel"], anchors="student4"),
        Row("no-local", "no local branch", ablation, ["--no-local-branch"], anchors="student4"),
        Row("no-concept", "no concept space", ablation, ["--no-concept-space"], anchors="student4"),
    ] + [Row(f"anchors-{name}", f"test anchors: {store[name].label}", source, trained_by="full",
             test_anchors=name) for name in ("teacher28", "student4", "student2", "student1")] + [
        # The regions of N anchors (seeds s..s+N-1) read jointly: N times the anchor work per query.
        *(Row(f"per-query-{n}", f"anchors per query: N = {n}", variants, ["--anchors-per-query", str(n)],
              anchors=f"student4x{n}", cost=1.0 + 0.3 * n) for n in ANCHORS_PER_QUERY if f"student4x{n}" in store),
        *([Row("latent", "anchor from generator features (final latent tokens: no decode, no ResNet-50)", variants,
               anchors="latent4")] if "latent4" in store else []),
    ] + [
        # GLSCL's temporal transformer and query decoder at D = 1024 train ~6x slower than the full model.
        Row("glscl", "GLSCL head (`--head glscl`: global + local interaction, text-only)", PEERS,
            ["--head", "glscl"], cost=6.5),
        Row("full-rerank", "CVR-SDGM (full model, fair protocol) + generative reranker", PEERS,
            anchors="student4", rerank_of="full"),
        Row("glscl-rerank", "GLSCL + generative reranker", PEERS, rerank_of="glscl"),
    ]


# ---------------------------------------------------------------------------------------------
# Sizes and folders


@dataclass
class Plan:
    root: str
    collection: str
    feature: str
    work: str
    seeds: list
    epochs: int
    tiny: bool
    synth: dict | None  # SynthConfig fields of the built-in collection, None for --root
    jobs: int
    reuse: bool
    variants: bool = False  # issue 17's anchor-variant rows (--variants)

    def train_flags(self) -> list:
        dims = TINY_DIMS if self.tiny else []
        return ["--root", self.root, "--collection", self.collection, "--feature", self.feature,
                "--epochs", str(self.epochs), "--quiet", *dims]


def make_plan(args) -> Plan:
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.root:
        tag = f"{args.collection}-{hashlib.sha256(os.path.abspath(args.root).encode()).hexdigest()[:8]}"
        work = os.path.join(args.work, tag)
        return Plan(args.root, args.collection, args.feature, work, seeds, args.epochs, args.tiny, None,
                    args.jobs, args.reuse, args.variants)
    synth = {"videos": args.videos, "captions_per_video": args.captions, "frames": args.frames, "seed": 0}
    work = os.path.join(args.work, f"synth-v{args.videos}-c{args.captions}-f{args.frames}")
    return Plan(os.path.join(work, "data"), "synth", "resnet50", work, seeds, args.epochs, args.tiny, synth,
                args.jobs, args.reuse, args.variants)


def ensure_collection(plan: Plan) -> None:
    """Write the built-in collection once per size (same configuration: reused)."""
    if plan.synth is None:
        return
    from training.synthetic import SynthConfig, write_collection

    config = SynthConfig(**plan.synth)
    stored = Path(plan.root, config.collection, "synth_config.json")
    if stored.is_file() and json.loads(stored.read_text()) == json.loads(json.dumps(asdict(config))):
        return
    print(f"writing the built-in collection ({config.videos} videos) to {plan.root}", flush=True)
    write_collection(plan.root, config, progress=not plan.tiny)


def sizes(plan: Plan) -> dict:
    from engine.datasets import Collection

    collection = Collection(plan.root, plan.collection)
    split = {s: {"videos": len(collection.split_video_ids(s)), "captions": len(collection.captions(s))}
             for s in ("train", "val", "test")}
    batch = 16 if plan.tiny else 128
    return {"collection": plan.collection, "builtin": plan.synth, "splits": split, "epochs": plan.epochs,
            "seeds": plan.seeds, "batch_size": batch,
            "max_steps": plan.epochs * -(-split["train"]["captions"] // batch),  # early stopping may stop sooner
            "model": "tiny widths (smoke run)" if plan.tiny else "the `cvr train` default widths",
            "chance_t2v_r1": round(100 / split["test"]["videos"], 2)}


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
            _cli(task)
            return {"kind": "anchors", "name": task["name"]}
        return _train_and_evaluate(task)


def _cli(task: dict, argv: list | None = None) -> None:
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
        _cli(task)
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
        _cli(task, spec["train"])
        files.write_json(marker, wanted)
        print(f"reranker trained in {time.perf_counter() - start:.1f} s", flush=True)
    _cli(task, spec["index"])
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


# ---------------------------------------------------------------------------------------------
# Aggregation and output


def aggregate(all_rows: list, results: list, seeds: list) -> list:
    """One dict per row: per-seed metrics and their mean and sample standard deviation (None for a
    metric a row does not have: a reranker row's v2t columns). A reranker row also keeps, per
    seed, its first stage through the same search path and the reranker's config."""
    per_seed, first_stage, rerankers = {}, {}, {}
    for result in results:
        seed = str(result["seed"])
        for name, metrics in result.get("metrics", {}).items():
            per_seed.setdefault(name, {})[seed] = metrics
        for name, metrics in result.get("first_stage", {}).items():
            first_stage.setdefault(name, {})[seed] = metrics
        for name, about in result.get("rerankers", {}).items():
            rerankers.setdefault(name, {})[seed] = about
    out = []
    for row in all_rows:
        found = per_seed.get(row.name, {})
        missing = [s for s in seeds if str(s) not in found]
        if missing:
            raise RuntimeError(f"row {row.name}: no result for seeds {missing}")
        values = {m: [found[str(s)][m] for s in seeds] for m in METRICS}
        stats = {m: (None, None) if None in v else common.mean_std(v) for m, v in values.items()}
        extra = {"first_stage_per_seed": first_stage[row.name], "reranker": rerankers[row.name]} \
            if row.rerank_of else {}
        out.append({**asdict(row), "per_seed": found, **extra,
                    "mean": {m: s[0] for m, s in stats.items()}, "std": {m: s[1] for m, s in stats.items()}})
    return out


def first_stage_agreement(rows: list) -> dict:
    """Per reranker row: the largest difference, over seeds and t2v metrics, between its first stage
    through the search path and the metric code's numbers of the row it reranks (0: the same)."""
    by_name = {r["name"]: r for r in rows}
    out = {}
    for row in (r for r in rows if r.get("rerank_of")):
        base = by_name[row["rerank_of"]]["per_seed"]
        out[row["name"]] = max(abs(metrics[m] - base[seed][m]) for seed, metrics in row["first_stage_per_seed"].items()
                               for m in ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "t2v_mnr", "t2v_map"))
    return out


def _cell(row: dict, metric: str) -> str:
    digits = 3 if metric.endswith("map") else 1
    mean, std = row["mean"][metric], row["std"][metric]
    if mean is None:
        return "–"
    text = f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")
    return f"**{text}**" if row["leaks_answer"] else text


def markdown(result: dict) -> str:
    """The table, a heading row per group of rows, then the notes that say what was measured."""
    table_rows, group = [], None
    for row in result["rows"]:
        if row["group"] != group:
            group = row["group"]
            table_rows.append([f"*{group}*"] + [""] * (len(HEADERS) - 1))
        table_rows.append([row["label"]] + [_cell(row, m) for m in METRICS])
    return common.markdown_table(HEADERS, table_rows) + "\n" + notes(result)


def notes(result: dict) -> str:
    s = result["sizes"]
    test, train = s["splits"]["test"], s["splits"]["train"]
    built = s["builtin"]
    data = (f"the built-in collection at {built['videos']} videos x {built['captions_per_video']} captions, "
            f"{built['frames']} frames" if built else f"collection {s['collection']} (--root)")
    seeds = ", ".join(str(x) for x in s["seeds"])
    return (f"Test split: {test['captions']} queries x {test['videos']} videos (chance t2v R@1 "
            f"{s['chance_t2v_r1']}%); trained on {train['captions']} captions of {train['videos']} videos "
            f"of {data}; {s['epochs']} epochs at most ({s['max_steps']} steps of batch {s['batch_size']}, "
            f"{s['model']}), model selected on the validation split, so models are far from converged at "
            f"small sizes; seeds {seeds}: mean ± sample standard deviation. R@K in %, mAP in [0, 1], SumR = "
            f"t2v R@1 + R@5 + R@10. The SSSS row (bold) draws each test anchor from all captions of the "
            f"answer video: it leaks the answer and is not comparable with the others. Anchor-source rows "
            f"evaluate the fair-protocol checkpoints with other test anchors (no retraining). {concept_note(result)}"
            f"{variant_notes(result)}"
            f"{peer_notes(result)}"
            f"Machine: {common.describe_machine(result['machine'])}. Wall time {result['wall_seconds']:.0f} s "
            f"with {result['jobs']} worker process(es) of one thread, {result['cpu_seconds']:.0f} CPU-seconds.\n")


def concept_note(result: dict) -> str:
    """Why the no-concept-space row can beat the full model at small sizes (issue 17's puzzle)."""
    if result["sizes"]["epochs"] >= 10 or not any(r["name"] == "no-concept" for r in result["rows"]):
        return ""
    return ("At this size the concept branches are barely trained (the text-only twin's score near chance on "
            "their own: they learn later than the latent branches), so the no-concept-space row measures training "
            "length, not the concept space: with 3x the epochs, or at the demo's size, the concept space helps or "
            "is neutral (README, \"The concept space at two sizes\"). ")


def variant_notes(result: dict) -> str:
    """What the anchor-variant rows are (issue 17's "anchors per query" and latent rows)."""
    names = {r["name"] for r in result["rows"]}
    counts = [n for n in ANCHORS_PER_QUERY if f"per-query-{n}" in names]
    text = ""
    if counts:
        text += (f"The anchors-per-query rows train and evaluate on N = {', '.join(map(str, counts))} anchors per "
                 f"caption (seeds 0..N-1, the first the full model's anchor), whose regions the hybrid attention "
                 f"reads jointly (`cvr anchors/train --anchors-per-query N`). ")
    if "latent" in names:
        text += ("The generator-features row stores the 4-step student's final packed latent tokens as the "
                 "anchor's regions (`cvr anchors --features latent`): no decoding, no ResNet-50 at search. ")
    return text


def peer_notes(result: dict) -> str:
    """What the peer rows are and which path scored them."""
    rows = [r for r in result["rows"] if r.get("rerank_of")]
    if not rows:
        return ""
    about = next(iter(rows[0]["reranker"].values()))["config"]
    epochs = sorted({a["best_epoch"] for r in rows for a in r["reranker"].values()})
    test_videos = result["sizes"]["splits"]["test"]["videos"]
    whole = (f" (M >= the {test_videos} test videos: each query's whole test gallery is reranked)"
             if about["candidates"] >= test_videos else "")
    worst = max(first_stage_agreement(result["rows"]).values())
    agree = ("reproduces the metric code's t2v numbers of the row it reranks exactly, for every seed" if worst == 0
             else f"differs from the metric code's t2v numbers of the row it reranks by at most {worst:.3g}")
    return (f"GLSCL (`cvr train --head glscl`, text-only: no anchors) is trained with the same flags, seeds and "
            f"epochs as the rows above and scored by the same metric code (`training.retrieval.evaluate_checkpoint`). "
            f"The reranker rows train `cvr train-reranker --base` on each seed's checkpoint of the full model "
            f"(fair protocol) and of GLSCL (that seed, {result['sizes']['epochs']} epochs at most, otherwise "
            f"`cvr train-reranker`'s defaults: M = {about['candidates']} candidates{whole}, T = "
            f"{about['diffusion_steps']} diffusion steps, {about['sample_steps'] or about['diffusion_steps']} DDIM "
            f"steps at search, hidden {about['hidden']}, fused score = first-stage score + {about['weight']:g} x "
            f"softmax({about['temp']:g} x0); "
            f"best validation epoch {', '.join(str(e) for e in epochs)}) and are scored through the search path "
            f"(`cvr index --split test --dtype float32`, then what `cvr evaluate --gallery --mode exhaustive "
            f"--rerank` runs: `engine.search_eval.search_metrics` over `Retriever.search` with k = the whole gallery, "
            f"anchors drawn at query time by the checkpoint's generator, one Retriever for both passes), so they "
            f"have t2v columns only (the reranker reorders a query's videos) and SumR is t2v's; "
            f"that path without `--rerank` {agree}. ")


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    data = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.42 * len(data) + 1.5), sharey=True)
    colours = {g: f"C{i}" for i, g in enumerate(dict.fromkeys(r["group"] for r in data))}
    positions = list(range(len(data)))[::-1]
    for axis, metric, title in zip(axes, ("t2v_r1", "sumr"), ("t2v R@1 (%)", "SumR (t2v R@1+5+10)"), strict=True):
        means = [r["mean"][metric] for r in data]
        errors = [r["std"][metric] or 0.0 for r in data]
        bars = axis.barh(positions, means, xerr=errors, color=[colours[r["group"]] for r in data], capsize=3)
        for bar, r in zip(bars, data, strict=True):
            if r["leaks_answer"]:
                bar.set_hatch("//")
        axis.set_title(title)
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(positions, [r["name"] + (" (leaks)" if r["leaks_answer"] else "") for r in data])
    fig.suptitle(f"Test recall, mean ± std over seeds {result['sizes']['seeds']} "
                 f"({result['sizes']['splits']['test']['videos']} test videos)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, list(colours), loc="lower center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, -0.08))
    common.save_figure_atomic(fig, path)
    plt.close(fig)


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
                   help="also the anchor-variant rows (anchors per query N = 2, 4; anchor from generator features): "
                        "about 10 more minutes; `make bench` gains them with issue 17")
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
