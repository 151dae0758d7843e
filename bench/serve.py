"""`cvr serve` under load over HTTP on 127.0.0.1: latency, throughput, micro-batching and overload.

Each configuration is a fresh `python -m engine.cli serve` process (one thread, OPENBLAS_NUM_THREADS=1)
on a free loopback port over the `cvr demo` gallery (the built-in test split's clips as mp4 files,
indexed with the shipped checkpoint), with an anchor cache folder of its own, so no configuration
starts with another's anchors; it is waited for on /readyz, warmed up, loaded, then stopped with
SIGTERM by its pid. Rows:

1. **Closed-loop load**: `--clients` concurrent clients (asyncio + httpx, one connection each), each
   sending its share of distinct built-in captions one query per `POST /v1/search` request (k=10),
   the next when the last is answered; per backend (torch, onnxruntime) at `--max-batch 32` and at
   `--max-batch 1`, so that the gain from micro-batching is a ratio of two runs side by side. The
   queries are split over `--repeats` rounds (2), each a fresh server per configuration in the same
   order, so that the drift of a shared machine meets every configuration alike; the ratio is also
   given per round (two servers run one after the other).
   Errors = anything but a well-formed 200 (must be 0); p50/p95/p99 of the request latency seen by
   the client; queries/s = answered queries / wall of the load; mean batch size from the server's
   /metrics (`cvr_batch_queries` sum / count, the warm-up subtracted); the server's RSS high-water
   (VmHWM of /proc/PID/status) and CPU time per query.
2. **Overload**: `--overload-clients` clients against `--max-queue 8`: every 503 is counted (the
   client sleeps its Retry-After, then sends its next query; a refused query is not retried), and
   any other 5xx or error must be 0; the server's RSS high-water shows the queue bounds memory.

Every query of one configuration is a different caption (the same list for every configuration),
so the anchor cache never answers one: each query pays its anchor (text encoder, 4-step student,
ResNet-50 over the anchor), the bulk of the work. The ONNX Runtime backend serves an export made
beforehand by `cvr export --modules <search modules>` of a copy of the shipped checkpoint (the
shipped folder is never written).

    python -m bench.serve                 # 16 clients x 50 queries: 8-15 min on 2 shared cores
    python -m bench.serve --full          # 16 clients x 200 queries, as the issue asks (~25-45 min there)
    python -m bench.serve --backends torch --queries 20
    python -m bench.serve --tiny --out /tmp/s   # a smoke run (tests): torch only, tiny loads
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench import common, serve_report
from bench.serve_server import Server, _env, _tail, proc_status
from engine import paths

SHIPPED = paths.WEIGHTS / "retrieval" / "builtin"
SEARCH_MODULES = "text_encoder,generator_step,vision,query_tower,scorer"  # export.onnx.SEARCH_MODULES
REQUEST_TIMEOUT_S = 120  # the client's; the server's own deadline (--timeout-s) is 30 s, a 504
MAX_WORDS = 20  # longer captions exceed the text encoder's 32 tokens (a warning per query): skipped


@dataclass
class Settings:
    clients: int = 16
    queries: int = 50  # per client (--full: 200)
    backends: tuple = ("torch", "onnxruntime")
    batches: tuple = (32, 1)  # --max-batch of the closed-loop runs
    max_wait_ms: float = 5.0
    max_queue: int = 256
    overload_clients: int = 64
    overload_queries: int = 10  # per client
    overload_queue: int = 8
    overload_backend: str | None = None  # default: onnxruntime when measured, else the first backend
    videos: int = 600  # clips of the built-in set for `cvr demo` (it indexes the test split: 90)
    k: int = 10
    warmup: int = 2  # warm-up rounds of `clients` concurrent queries, not measured
    repeats: int = 2  # rounds of every closed-loop configuration (fresh servers), queries split over them
    full: bool = False
    tiny: bool = False


# ---------------------------------------------------------------------------------------------
# The gallery, the checkpoint, the queries


def make_gallery(work: str, videos: int) -> dict:
    """`cvr demo --out WORK/demo`: the built-in test split as mp4 files, indexed with the shipped
    checkpoint (its own example searches included). Its printout goes to WORK/demo.log."""
    from engine.cli import main as cvr

    out = os.path.join(work, "demo")
    clock = time.perf_counter()
    with open(os.path.join(work, "demo.log"), "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        code = cvr(["demo", "--out", out, "--videos", str(videos), "--quiet"])
    if code != 0:
        raise RuntimeError(f"cvr demo failed (exit {code}); see {work}/demo.log")
    gallery = os.path.join(out, "gallery")
    clips = sum(1 for p in os.listdir(os.path.join(out, "videos")) if p.endswith(".mp4"))
    return {"folder": gallery, "videos": clips, "demo_videos": videos, "make_s": round(time.perf_counter() - clock, 1)}


def copy_checkpoint(work: str) -> str:
    """The shipped checkpoint copied, so that an export lands in the copy, never in the shipped folder."""
    folder = os.path.join(work, "checkpoint")
    shutil.copytree(SHIPPED, folder)
    return folder


def export_onnx(checkpoint: str, log_path: str) -> dict:
    """`cvr export --format onnx` of the search modules into CHECKPOINT/onnx, in a child process."""
    out = os.path.join(checkpoint, "onnx")
    argv = [sys.executable, "-m", "engine.cli", "export", "--checkpoint", checkpoint, "--format", "onnx", "--out", out,
            "--modules", SEARCH_MODULES, "--quiet"]
    clock = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=common.REPO, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"cvr export failed (exit {done.returncode}): {_tail(log_path)}")
    return {"folder": out, "modules": SEARCH_MODULES.split(","), "export_s": round(time.perf_counter() - clock, 1)}


def captions(n: int) -> list:
    """n distinct built-in captions (training.synthetic.drawn_clips, seed 0) of at most MAX_WORDS
    words, in a fixed shuffled order."""
    from training.synthetic import SynthConfig, drawn_clips

    seen = {}
    for _, _, _, texts, _ in drawn_clips(SynthConfig(), np.random.default_rng(0)):
        for text in texts:
            if len(text.split()) <= MAX_WORDS:
                seen.setdefault(text, None)
    pool = list(seen)
    if n > len(pool):
        raise ValueError(f"{n} distinct queries asked, the built-in set has {len(pool)} short captions")
    order = np.random.default_rng(1).permutation(len(pool))
    return [pool[i] for i in order[:n]]


# ---------------------------------------------------------------------------------------------
# The clients


async def _client(http, url: str, texts: list, k: int, records: list, honour_retry_after: bool) -> None:
    import httpx

    for text in texts:
        clock = time.perf_counter()
        record = {"status": None, "ok": False}
        try:
            answer = await http.post(url, json={"queries": [text], "k": k})
            record["status"] = answer.status_code
            if answer.status_code == 200:
                body = answer.json()
                results = body.get("results") or []
                record["ok"] = len(results) == 1 and len(results[0].get("hits") or []) == k
                record["server_s"] = body.get("seconds")
                record["batch"] = results[0].get("timings_ms", {}).get("batch") if results else None
            retry_after = answer.headers.get("retry-after")
        except (httpx.HTTPError, ValueError) as error:
            record["error"] = type(error).__name__
            retry_after = None
        record["seconds"] = time.perf_counter() - clock
        records.append(record)
        if record["status"] == 503 and honour_retry_after and retry_after:
            await asyncio.sleep(float(retry_after))


async def _load(url: str, shares: list, k: int, honour_retry_after: bool) -> tuple:
    import httpx

    records: list = []
    limits = httpx.Limits(max_connections=len(shares), max_keepalive_connections=len(shares))
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        clock = time.perf_counter()
        await asyncio.gather(*(_client(http, url + "/v1/search", share, k, records, honour_retry_after)
                               for share in shares))
        wall = time.perf_counter() - clock
    return records, wall


def load(url: str, texts: list, clients: int, k: int, honour_retry_after: bool = False) -> tuple:
    """`clients` concurrent clients, client i sending texts[i::clients] one at a time:
    (per-request records, wall seconds from the first send to the last answer)."""
    shares = [texts[i::clients] for i in range(clients)]
    return asyncio.run(_load(url, shares, k, honour_retry_after))


def _batch_stats(before: dict, after: dict) -> dict:
    total = after.get("cvr_batch_queries_sum", 0.0) - before.get("cvr_batch_queries_sum", 0.0)
    count = after.get("cvr_batch_queries_count", 0.0) - before.get("cvr_batch_queries_count", 0.0)
    return {"batches": int(count), "batched_queries": int(total), "mean_batch": total / count if count else None}


def _stage_ms(before: dict, after: dict) -> dict:
    """Mean per-query ms of each search stage over the batches of the load (cvr_stage_seconds)."""
    out = {}
    for name, value in after.items():
        if name.startswith("cvr_stage_seconds_sum{"):
            stage = name.split('stage="', 1)[1].split('"', 1)[0]
            count_name = name.replace("_sum{", "_count{")
            count = after.get(count_name, 0.0) - before.get(count_name, 0.0)
            if count:
                out[stage] = 1000 * (value - before.get(name, 0.0)) / count
    return out


def summarise(records: list, wall: float) -> dict:
    """Counts and latency of one load: errors = anything but a well-formed 200 or a 503."""
    ok = [r for r in records if r["ok"]]
    statuses: dict = {}
    for r in records:
        key = str(r["status"]) if r["status"] is not None else r.get("error", "no answer")
        statuses[key] = statuses.get(key, 0) + 1
    refused = sum(1 for r in records if r["status"] == 503)
    other_5xx = sum(1 for r in records if r["status"] is not None and r["status"] >= 500 and r["status"] != 503)
    seconds = [r["seconds"] for r in ok]
    server = [r["server_s"] for r in ok if r.get("server_s") is not None]
    row = {"requests": len(records), "answered": len(ok), "errors": len(records) - len(ok) - refused,
           "rejected_503": refused, "other_5xx": other_5xx, "statuses": statuses, "wall_s": round(wall, 2),
           "queries_per_second": len(ok) / wall if wall > 0 else 0.0}
    if seconds:
        row.update({f"p{q}_ms": 1000 * common.percentile(seconds, q) for q in (50, 95, 99)},
                   mean_ms=1000 * sum(seconds) / len(seconds), max_ms=1000 * max(seconds))
    if server:
        row["server_p50_ms"] = 1000 * common.percentile(server, 50)
    return row


# ---------------------------------------------------------------------------------------------
# One configuration


def run_server(name: str, backend: str, max_batch: int, max_queue: int, loads: list, warm: list, ctx: dict,
               s: Settings) -> list:
    """Start a server, warm it up, run `loads` one after the other, stop it: one measurement per
    load. A load: {"clients": n, "texts": [...], "overload": bool}."""
    work = ctx["work"]
    cache = os.path.join(work, f"anchors-{name}")  # a fresh anchor cache per server
    argv = ["--gallery", ctx["gallery"]["folder"], "--checkpoint", ctx["checkpoint"], "--backend", backend,
            "--max-batch", str(max_batch), "--max-wait-ms", f"{s.max_wait_ms:g}", "--max-queue", str(max_queue),
            "--anchor-cache", cache, "--read-only"]
    if backend == "onnxruntime":
        argv += ["--export", ctx["export"]["folder"]]
    server = Server(name, argv, os.path.join(work, f"server-{name}.log"))
    parts = []
    try:
        startup_s = server.wait_ready()
        ready_rss = proc_status(server.proc.pid)["VmRSS"]
        for round_ in range(s.warmup):  # first-use costs and a full batch; captions not used below
            load(server.url, warm[round_ * s.clients:(round_ + 1) * s.clients], s.clients, s.k)
        for spec in loads:
            before, loadavg = server.metrics(), os.getloadavg()[0]
            cpu_before = common.process_cpu_seconds(server.proc.pid)
            records, wall = load(server.url, spec["texts"], spec["clients"], s.k, honour_retry_after=spec["overload"])
            cpu_s = common.process_cpu_seconds(server.proc.pid) - cpu_before
            after = server.metrics()
            parts.append({"spec": spec, "records": records, "wall": wall, "cpu_s": cpu_s, "startup_s": startup_s,
                          "ready_rss_mb": ready_rss, "peak_rss_mb": proc_status(server.proc.pid)["VmHWM"],
                          "load_average": loadavg, "shared_server": len(loads) > 1,
                          "rejected_counter": after.get("cvr_rejected_total", 0.0)
                          - before.get("cvr_rejected_total", 0.0),
                          "batches": _batch_stats(before, after), "stage_ms": _stage_ms(before, after)})
    finally:
        stopped = server.stop()
    for part in parts:
        part["server"] = {k: v for k, v in stopped.items() if k not in ("VmHWM", "VmRSS", "cpu_s")}
    return parts


def _per_query(cpu_s: float, answered: int):
    return 1000 * cpu_s / answered if answered else None


def combine(name: str, key: tuple, parts: list, s: Settings) -> dict:
    """One result row from the loads of one configuration (one per round): counts summed, latency
    percentiles over every answered request, queries/s = answered / summed wall; and each round's own."""
    backend, max_batch, max_queue = key
    spec = parts[0]["spec"]
    records = [r for p in parts for r in p["records"]]
    wall = sum(p["wall"] for p in parts)
    cpu_s = sum(p["cpu_s"] for p in parts)
    batches = sum(p["batches"]["batches"] for p in parts)
    batched = sum(p["batches"]["batched_queries"] for p in parts)
    stages = {k: statistics.fmean(p["stage_ms"][k] for p in parts if k in p["stage_ms"])
              for k in dict.fromkeys(k for p in parts for k in p["stage_ms"])}
    row = {"name": name, "backend": backend, "max_batch": max_batch, "max_queue": max_queue,
           "max_wait_ms": s.max_wait_ms, "clients": spec["clients"],
           "queries_per_client": sum(len(p["spec"]["texts"]) for p in parts) // spec["clients"],
           "overload": spec["overload"], "shared_server": any(p["shared_server"] for p in parts),
           "startup_s": round(statistics.fmean(p["startup_s"] for p in parts), 1),
           "ready_rss_mb": round(max(p["ready_rss_mb"] for p in parts), 1),
           "peak_rss_mb": round(max(p["peak_rss_mb"] for p in parts), 1), "server_cpu_s": round(cpu_s, 2),
           "rejected_counter": sum(p["rejected_counter"] for p in parts), "batches": batches,
           "batched_queries": batched, "mean_batch": batched / batches if batches else None,
           "stage_ms_per_query": stages, **summarise(records, wall)}
    row["server_cpu_ms_per_query"] = _per_query(cpu_s, row["answered"])
    row["server_cores_used"] = cpu_s / wall if wall > 0 else None
    row["server"] = {"clean_stop": all(p["server"].get("clean_stop") for p in parts),
                     "tracebacks": sum(p["server"].get("tracebacks", 0) for p in parts),
                     "exit_codes": [p["server"].get("exit_code") for p in parts],
                     "stop_s": [p["server"].get("stop_s") for p in parts],
                     "log_tail": parts[-1]["server"].get("log_tail")}
    row["rounds"] = []
    for p in parts:
        one = summarise(p["records"], p["wall"])
        b = p["batches"]
        row["rounds"].append({"queries_per_second": one["queries_per_second"], "p50_ms": one.get("p50_ms"),
                              "p95_ms": one.get("p95_ms"), "wall_s": one["wall_s"], "answered": one["answered"],
                              "mean_batch": b["mean_batch"], "server_cpu_ms_per_query": _per_query(p["cpu_s"],
                                                                                                   one["answered"]),
                              "server_cores_used": p["cpu_s"] / p["wall"] if p["wall"] > 0 else None,
                              "load_average": p["load_average"], "startup_s": p["startup_s"]})
    return row


def run(s: Settings, work: str) -> dict:
    from tqdm import tqdm

    clock = [time.perf_counter()]
    lap = lambda: clock.append(time.perf_counter()) or round(clock[-1] - clock[-2], 1)
    part_seconds = {}
    gallery = make_gallery(work, s.videos)
    part_seconds["gallery (cvr demo)"] = lap()
    if s.k > gallery["videos"]:
        raise ValueError(f"k {s.k} is more than the gallery's {gallery['videos']} videos")
    checkpoint = copy_checkpoint(work)
    export = export_onnx(checkpoint, os.path.join(work, "export.log")) if "onnxruntime" in s.backends else None
    if export:
        part_seconds["ONNX export"] = lap()
    measured = s.clients * s.queries
    overload_n = s.overload_clients * s.overload_queries
    texts = captions(s.warmup * s.clients + measured + overload_n)
    warm = texts[:s.warmup * s.clients]
    main_texts = texts[len(warm):len(warm) + measured]
    over_texts = texts[len(warm) + measured:]
    per_round = measured // s.repeats
    ctx = {"work": work, "gallery": gallery, "checkpoint": checkpoint, "export": export}
    # Round r: a fresh server per (backend, --max-batch, --max-queue), in the same order each round, so
    # that the configurations compared meet the same drift of a shared machine. The overload run comes
    # last; it shares a closed-loop configuration's server only when its settings are the same (--tiny:
    # a queue that no closed loop fills).
    keys = [(b, n, s.max_queue) for b in s.backends for n in s.batches]
    over_key = None
    if s.overload_clients > 0:
        over_backend = s.overload_backend or ("onnxruntime" if "onnxruntime" in s.backends else s.backends[0])
        over_key = (over_backend, max(s.batches), s.overload_queue)
    plan = []  # (round, key, loads)
    for round_ in range(s.repeats):
        for key in keys:
            plan.append((round_, key, [{"clients": s.clients, "overload": False,
                                        "texts": main_texts[round_ * per_round:(round_ + 1) * per_round]}]))
    overload_load = {"clients": s.overload_clients, "texts": over_texts, "overload": True}
    if over_key in keys:
        plan[-len(keys) + keys.index(over_key)][2].append(overload_load)
    elif over_key:
        plan.append((s.repeats - 1, over_key, [overload_load]))
    name_of = lambda key: f"{key[0]}-batch{key[1]}" + (f"-queue{key[2]}" if key[2] != s.max_queue else "")
    parts: dict = {}
    for round_, key, loads in tqdm(plan, desc="servers", disable=s.tiny):
        name = name_of(key) + (f"-r{round_ + 1}" if s.repeats > 1 and key in keys else "")
        for load_, part in zip(loads, run_server(name, *key, loads, warm, ctx, s), strict=True):
            parts.setdefault((key, load_["overload"]), []).append(part)
        part_seconds[name] = lap()
    closed = [combine(name_of(key), key, parts[(key, False)], s) for key in keys]
    overload = combine(name_of(over_key) + "-overload", over_key, parts[(over_key, True)], s) if over_key else None
    return {"format": "cvr-sdgm/bench-serve/1", "gallery": {k: v for k, v in gallery.items() if k != "folder"},
            "checkpoint": {"path": paths.reference(SHIPPED, str(common.REPO)), "copied": True},
            "export": export and {k: v for k, v in export.items() if k != "folder"}, "runs": closed,
            "overload": overload, "ratios": ratios(closed), "part_seconds": part_seconds}


def ratios(rows: list) -> list:
    """Per backend: queries/s at the largest --max-batch over queries/s at --max-batch 1 (over all
    rounds, and in each round: two servers run one after the other), the p95 ratio, and server CPU
    per query at --max-batch 1 over that at the largest."""
    out = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = {r["max_batch"]: r for r in rows if r["backend"] == backend}
        if 1 in mine and len(mine) > 1:
            top, base = mine[max(mine)], mine[1]
            div = lambda a, b: a / b if a is not None and b else None
            out.append({"backend": backend, "max_batch": top["max_batch"],
                        "qps_ratio": div(top["queries_per_second"], base["queries_per_second"]),
                        "qps_ratio_per_round": [div(t["queries_per_second"], b["queries_per_second"])
                                                for t, b in zip(top["rounds"], base["rounds"], strict=True)],
                        "p95_ratio": div(top.get("p95_ms"), base.get("p95_ms")),
                        "cpu_ratio": div(base["server_cpu_ms_per_query"], top["server_cpu_ms_per_query"]),
                        "cpu_ratio_per_round": [div(b["server_cpu_ms_per_query"], t["server_cpu_ms_per_query"])
                                                for t, b in zip(top["rounds"], base["rounds"], strict=True)]})
    return out


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv) -> tuple:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16, help="concurrent clients of the closed-loop runs")
    p.add_argument("--queries", type=int, default=None, help="queries per client (default 50; --full: 200)")
    p.add_argument("--backends", default="torch,onnxruntime", help="server backends, comma-separated")
    p.add_argument("--batches", default="32,1", help="--max-batch values of the closed-loop runs")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's --max-wait-ms")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds of every closed-loop configuration, fresh servers each, the queries split over "
                        "them (default 2)")
    p.add_argument("--max-queue", type=int, default=256, help="the server's --max-queue in the closed-loop runs")
    p.add_argument("--overload-clients", type=int, default=64, help="clients of the overload run (0: none)")
    p.add_argument("--overload-queries", type=int, default=10, help="queries per client in the overload run")
    p.add_argument("--overload-queue", type=int, default=8, help="--max-queue of the overload run")
    p.add_argument("--overload-backend", default=None, help="default: onnxruntime when measured, else the first")
    p.add_argument("--videos", type=int, default=600, help="clips of the built-in set for cvr demo (test split: 15%%)")
    p.add_argument("--full", action="store_true",
                   help="16 clients x 200 queries (the issue's size; 25-45 min on 2 shared cores)")
    p.add_argument("--out", default=None, help="result folder (default: bench/results/<machine>/)")
    p.add_argument("--tiny", action="store_true",
                   help="a smoke run: 40 clips, torch only, 4 clients x 3 queries, 12 overload clients on a queue of 4 "
                        "(on the max-batch-32 server)")
    args = p.parse_args(argv)
    queries = args.queries or (200 if args.full else Settings.queries)
    s = Settings(clients=args.clients, queries=queries, backends=tuple(args.backends.split(",")),
                 batches=tuple(int(b) for b in args.batches.split(",")), max_wait_ms=args.max_wait_ms,
                 max_queue=args.max_queue, repeats=args.repeats,
                 overload_clients=args.overload_clients, overload_queries=args.overload_queries,
                 overload_queue=args.overload_queue, overload_backend=args.overload_backend, videos=args.videos,
                 full=args.full)
    if args.tiny:
        # Two servers: the overload load follows the max-batch-32 load on its server, whose queue of
        # 4 the 4 closed-loop clients (one request in flight each) can never fill.
        s = Settings(clients=4, queries=3, backends=("torch",), batches=(32, 1), max_queue=4, overload_clients=12,
                     overload_queries=2, overload_queue=4, videos=40, k=5, warmup=1, repeats=1, tiny=True)
    if min(s.clients, s.queries, *s.batches, s.max_queue, s.overload_queue, s.repeats) < 1 or s.overload_clients < 0:
        p.error("needs --clients, --queries, --batches, --max-queue, --overload-queue and --repeats >= 1, "
                "--overload-clients >= 0")
    if s.queries % s.repeats:
        p.error(f"--queries {s.queries} must be a multiple of --repeats {s.repeats}")
    from engine.retriever import BACKENDS

    if unknown := [b for b in s.backends if b not in BACKENDS]:
        p.error(f"unknown backends {unknown}; known: {', '.join(BACKENDS)}")
    return s, args.out


def main(argv=None) -> int:
    settings, out = parse_args(argv)
    if not (SHIPPED / "model.safetensors").is_file():
        print(f"bench/serve.py: no shipped checkpoint at {SHIPPED}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    info = common.machine_info()
    loadavg = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as work:
        result = run(settings, work)
    result.update(machine=info, machine_slug=common.machine_slug(info), settings=asdict(settings),
                  wall_seconds=round(time.perf_counter() - start, 1), cpu_seconds=common.cpu_seconds(),
                  load_average={"before": loadavg, "after": os.getloadavg()[0]}, tiny=settings.tiny)
    result["runs"] = common.stamp(result["runs"], info)
    if result["overload"]:
        result["overload"] = common.stamp([result["overload"]], info)[0]
    folder = common.results_dir(out or (tempfile.mkdtemp(prefix="bench-serve-out-") if settings.tiny else None), info)
    written = serve_report.write_outputs(result, folder)
    print(Path(written["md"]).read_text())
    print("wrote " + ", ".join(written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
