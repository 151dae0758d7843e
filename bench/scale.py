"""Scatter-gather search at scale (issue 16, item 6): per-query latency and throughput of exact
scatter-gather over 1, 2 and 4 shards at 100k and 1M gallery entries, exhaustive and in two stages
(a FAISS `ivf` index per shard), against the single-process search of the unsharded gallery, with
what a shard holds in memory and what a query batch puts on the network.

Only the gallery search of query embeddings is timed (no text encoder, no anchor image): random
unit latent vectors and random concepts in [0, 1], for the gallery (float16, as it is stored) and
the queries (float32, as the query tower gives them), scored by the shipped checkpoint's matcher
(engine/weights/retrieval/builtin: latent 512, concepts 97), one torch thread everywhere. Rows:

- **single**: engine.search.search over the unsharded gallery, in this process.
- **ray**: one Ray actor per shard (engine.cluster.ray_shards.RayShards, what `cvr serve --ray`
  runs) on a local Ray of 2 logical CPUs, answers merged by engine.cluster.scatter.merge.
- **local**: engine.cluster.scatter.LocalShards, the shards one after another in this process:
  sharding without Ray (by default at the largest shard count only: exhaustive search is slow).

Each case runs one untimed warm-up batch, then `--repeats` batches of distinct queries; the median
batch time is reported, per query = batch time / batch size. Exhaustive scatter-gather must return
the single-process ids exactly (checked and recorded; the run fails otherwise); recall@10 of
two-stage rows is measured against the exhaustive ids of the same queries. Building the galleries
and shard sets is timed apart from the search. bench/scale_report.py writes the tables, the sizing
extrapolation and the plot; bench/scale_data.py the random galleries and the byte counts.

    python -m bench.scale                                   # bench/results/<machine>/scale.*
    python -m bench.scale --sizes 100000 --shards 1,2 --repeats 2
    python -m bench.scale --quick --no-ray --out /tmp/s     # seconds: the smoke run (tests)

Ray listens on every network interface outside a private network namespace: unless it runs in one
(or with --no-ray), the benchmark re-runs itself inside `unshare -n` (root, unshare and ip needed)
or refuses (exit 2).
"""
from __future__ import annotations

import os

# Before numpy loads OpenBLAS (and for the Ray workers, which inherit this environment): one BLAS
# and one OpenMP thread, so every shard and the single-process search use one core each.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.scale_data import (  # noqa: E402
    cpu_clock,
    dims,
    folder_bytes,
    ids_ram_per_video,
    process_memory,
    query_batches,
    write_random_gallery,
)

K = 10
RAY_CPUS = 2  # the logical CPUs of the local Ray (this machine's cores)
MODES = ("exhaustive", "two-stage")
ROUND_TRIPS = 20  # fan-out calls of `info` timed per shard set
REEXEC = "CVR_BENCH_SCALE_NETNS"  # set when re-run inside unshare -n: a second re-run would loop
QUICK = {"sizes": (3000,), "shards": (1, 2), "queries": 4, "repeats": 2}
FULL = {"sizes": (100_000, 1_000_000), "shards": (1, 2, 4), "queries": 16, "repeats": 5}


@dataclass
class Settings:
    sizes: tuple
    shards: tuple
    queries: int  # queries per batch
    repeats: int  # timed batches per case, each of distinct queries
    local: tuple  # shard counts also timed with LocalShards
    ray: bool = True
    batch_one: bool = True  # also time single queries
    actor_cpus: float | None = None  # logical CPUs per shard actor (None: RayShards' default)
    shard_size: int = 5_000_000  # videos per shard in the sizing table
    machines: tuple = (64, 256)  # GiB of RAM of the machine types in the sizing table
    headroom: float = 0.25  # fraction of a machine's RAM left to the OS and everything else
    seed: int = 0
    quick: bool = False


# ---------------------------------------------------------------------------------------------
# What is timed: one batch through the single-process search or a fan-out


def single_runner(gallery):
    from engine.backends.pytorch import TorchScorer
    from engine.checkpoint import load_matcher
    from engine.cli.demo import SHIPPED_RETRIEVAL
    from engine.search import SearchOptions, search

    scorer = TorchScorer(load_matcher(SHIPPED_RETRIEVAL), "cpu")
    ids = gallery.ids

    def run(q_lat, q_con, mode):
        values, rows = search(scorer, gallery, q_lat, q_con, K, SearchOptions(mode=mode))
        return [[ids[r] for r in row if r >= 0] for row in rows.tolist()], values

    return run


class FanOut:
    """A batch through a fan-out (LocalShards or RayShards) and the merge, as ShardedRetriever
    ranks; keeps the last call's arguments and answers to measure what crosses the network."""

    def __init__(self, shards):
        self.shards, self.last = shards, None

    def __call__(self, q_lat, q_con, mode):
        from engine.cluster.scatter import merge

        options = {"mode": mode, "candidates": None, "nprobe": None, "ef_search": None}
        answers = self.shards.call("search", q_lat, q_con, K, options, [])
        values, _, where = merge(answers, K)
        self.last = ((q_lat, q_con, K, options, []), answers)
        return [[answers[s]["ids"][i][j] for s, j in hits] for i, hits in enumerate(where)], values

    def wire_bytes(self) -> dict:
        """Pickled bytes of the last call: the arguments each shard is sent, each shard's answer."""
        sent, answers = self.last
        out = len(pickle.dumps(sent, protocol=5))
        back = [len(pickle.dumps(a, protocol=5)) for a in answers]
        return {"out_per_shard": out, "back_per_shard": round(statistics.fmean(back)),
                "per_batch": out * len(back) + sum(back)}


def timed(run, batches: list, mode: str, pids: list) -> tuple:
    """(seconds of each timed batch, CPU seconds per batch of this process and of `pids` (the
    shard actors), ids found, values) after one untimed warm-up batch."""
    (warm_lat, warm_con), *rest = batches
    run(warm_lat, warm_con, mode)
    seconds, found, values = [], [], []
    cpu = cpu_clock(pids)
    for q_lat, q_con in rest:
        clock = time.perf_counter()
        ids, vals = run(q_lat, q_con, mode)
        seconds.append(time.perf_counter() - clock)
        found.append(ids)
        values.append(vals)
    return seconds, (cpu_clock(pids) - cpu) / len(rest), found, values


def recall_at_k(found: list, exact: list) -> float:
    pairs = [(f, e) for batch_f, batch_e in zip(found, exact, strict=True)
             for f, e in zip(batch_f, batch_e, strict=True)]
    return round(float(np.mean([len(set(f) & set(e)) / len(e) for f, e in pairs])), 4)


def measure_all(run, batches: list, settings: Settings, base: dict, reference: dict | None = None,
                pids: list = ()) -> tuple:
    """Rows of every mode and batch size for one runner; `reference` maps batch size to the single
    process's exhaustive (ids, values), None when this runner is the single process; `pids`: the
    runner's other processes (its shard actors), whose CPU time counts too."""
    sizes = [settings.queries] + ([1] if settings.batch_one and settings.queries > 1 else [])
    rows, exact = [], dict(reference or {})
    for mode in MODES:
        for batch in sizes:
            chosen = [(lat[:batch], con[:batch]) for lat, con in batches]
            seconds, cpu, found, values = timed(run, chosen, mode, list(pids))
            median = statistics.median(seconds)
            row = dict(base, mode=mode, batch=batch, runs=len(seconds), seconds=[round(s, 6) for s in seconds],
                       median_ms=round(median * 1000, 3), per_query_ms=round(median * 1000 / batch, 3),
                       queries_per_s=round(batch / median, 2), cpu_ms_per_batch=round(cpu * 1000, 1),
                       load_1min=round(os.getloadavg()[0], 2))
            if mode == "exhaustive" and reference is None:
                exact[batch] = (found, values)
            elif mode == "exhaustive":
                row.update(same_ids_as_single=found == exact[batch][0],
                           max_score_diff=float(max(np.max(np.abs(v - w)) for v, w in
                                                    zip(values, exact[batch][1], strict=True))))
            else:
                row["recall_at_10"] = recall_at_k(found, exact[batch][0])
            if isinstance(run, FanOut):
                row["wire_bytes"] = run.wire_bytes()
            rows.append(row)
            _progress(row)
    return rows, exact


def _progress(row: dict) -> None:
    """One line per case on stderr: a long run shows where it is."""
    print(f"bench/scale.py: {row['videos']:,} videos, {row['search']} x{row['shards']}, {row['mode']}, batch "
          f"{row['batch']}: {row['median_ms']:.1f} ms (CPU {row['cpu_ms_per_batch']:.0f} ms, load "
          f"{row['load_1min']:.1f})", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# One size: the gallery, the single-process rows, then a shard set per shard count


def shard_memory(set_folder: str, infos: list, separate: bool) -> list:
    """Per shard: videos, embedding bytes, index bytes; the actor's resident memory when it is a
    process of its own (`separate`)."""
    shards = []
    for info in infos:
        entry = {"name": info["name"], "videos": info["count"], "embeddings_bytes": info["nbytes"],
                 "index_bytes": folder_bytes(os.path.join(set_folder, info["name"]))["faiss"]}
        shards.append(dict(entry, **process_memory(info["pid"])) if separate else entry)
    return shards


def fanout_rows(kind: str, open_shards, set_folder: str, batches: list, settings: Settings, base: dict,
                reference: dict) -> tuple:
    """(rows, {start_s, memory, roundtrip_ms}) of one fan-out over one shard set. The round trip
    is a call of `info` on every shard (no search, a few hundred bytes each way): what the fan-out
    itself costs per call."""
    clock = time.perf_counter()
    shards = open_shards()
    started = time.perf_counter() - clock
    try:
        pids = [info["pid"] for info in shards.call("info") if info["pid"] != os.getpid()]
        rows, _ = measure_all(FanOut(shards), batches, settings, dict(base, search=kind), reference, pids)
        trips = []
        for _ in range(ROUND_TRIPS):
            clock = time.perf_counter()
            shards.call("info")
            trips.append(time.perf_counter() - clock)
        facts = {"start_s": round(started, 2), "roundtrip_ms": round(1000 * statistics.median(trips), 3),
                 "memory": shard_memory(set_folder, shards.call("info"), separate=kind == "ray")}
    finally:
        shards.close()
    return rows, facts


def open_local(set_folder: str):
    from engine.cli.demo import SHIPPED_RETRIEVAL
    from engine.cluster.scatter import LocalShards

    return LocalShards.open(set_folder, SHIPPED_RETRIEVAL)


def open_ray(set_folder: str, settings: Settings, prefix: str):
    from engine.cli.demo import SHIPPED_RETRIEVAL
    from engine.cluster.ray_shards import RayShards

    return RayShards.start(set_folder, SHIPPED_RETRIEVAL, cpus=settings.actor_cpus, threads=1, prefix=prefix)


def run_size(n: int, settings: Settings, work: str) -> dict:
    """Every row of one gallery size: the single-process rows, then per shard count its set's."""
    from engine.cluster.shardset import shard_gallery
    from engine.gallery import Gallery

    folder = os.path.join(work, f"gallery-{n}")
    batches = query_batches(settings.repeats + 1, settings.queries, settings.seed + n + 1)
    build = {"gallery": write_random_gallery(folder, n, settings.seed + n, batches)}
    gallery = Gallery.load(folder)
    single = {"videos": n, "search": "single", "shards": 1}
    rows, reference = measure_all(single_runner(gallery), batches, settings, single)
    size = {"videos": n, "gallery_bytes": folder_bytes(folder), "faiss": build["gallery"]["factory"],
            "nprobe": build["gallery"]["nprobe"], "ids_ram_bytes_per_video": ids_ram_per_video(gallery.ids),
            "shard_sets": []}
    del gallery
    for count in settings.shards:
        set_folder = os.path.join(work, f"set-{n}-{count}")
        clock = time.perf_counter()
        shard_gallery(folder, count, set_folder, progress=False)
        entry = {"shards": count, "shard_s": round(time.perf_counter() - clock, 2)}
        base = {"videos": n, "shards": count}
        kinds = (["local"] if count in settings.local else []) + (["ray"] if settings.ray else [])
        for kind in kinds:
            opener = (lambda f=set_folder: open_local(f)) if kind == "local" else (
                lambda f=set_folder, c=count: open_ray(f, settings, f"bench-scale-{n}x{c}"))
            found, facts = fanout_rows(kind, opener, set_folder, batches, settings, base, reference)
            rows += found
            entry.update({f"{kind}_{key}": value for key, value in facts.items()})
        size["shard_sets"].append(entry)
        shutil.rmtree(set_folder)  # a 1M set is ~3.5 GB: one on disk at a time
    shutil.rmtree(folder)
    size.update(rows=rows, build_s=build)
    return size


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv) -> Settings:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    ints = lambda text: tuple(int(x) for x in text.split(",") if x)
    p.add_argument("--sizes", type=ints, help="gallery sizes, comma-separated (default 100000,1000000)")
    p.add_argument("--shards", type=ints, help="shard counts, comma-separated (default 1,2,4)")
    p.add_argument("--queries", type=int, help="queries per batch (default 16)")
    p.add_argument("--repeats", type=int, help="timed batches per case, distinct queries each (default 5)")
    p.add_argument("--local", default=None, help="shard counts also timed with in-process LocalShards "
                   "(default: the largest; with --no-ray: all; 'none': no LocalShards rows)")
    p.add_argument("--no-ray", action="store_true", help="no Ray rows (LocalShards only; no network namespace needed)")
    p.add_argument("--no-batch-one", action="store_true", help="do not time single queries")
    p.add_argument("--actor-cpus", type=float, default=None, help="logical CPUs per shard actor (default RayShards')")
    p.add_argument("--shard-size", type=int, default=5_000_000, help="videos per shard in the sizing table")
    p.add_argument("--machines", type=ints, default=(64, 256), help="GiB of RAM of the sizing table's machines")
    p.add_argument("--headroom", type=float, default=0.25, help="fraction of RAM the sizing table leaves free")
    p.add_argument("--work", default=None, help="folder for the galleries (default: a temporary one)")
    p.add_argument("--out", default=None, help="result folder (default: bench/results/<machine>/)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 3000 videos, shards 1,2, batches of 4, twice")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    sizes, shards, queries, repeats = (getattr(args, k) or preset[k] for k in ("sizes", "shards", "queries", "repeats"))
    if args.local == "none":
        local = ()
    else:
        local = ints(args.local) if args.local else (tuple(shards) if args.no_ray else (max(shards),))
    if min(sizes) < 1 or min(shards) < 1 or max(shards) > min(sizes) or queries < 1 or repeats < 1:
        p.error("needs sizes >= 1, 1 <= shards <= the smallest size, --queries >= 1 and --repeats >= 1")
    if args.no_ray and not local:
        p.error("--no-ray with --local none leaves nothing but the single-process rows to compare with")
    return Settings(sizes=sizes, shards=shards, queries=queries, repeats=repeats, local=local, ray=not args.no_ray,
                    batch_one=not args.no_batch_one, actor_cpus=args.actor_cpus, shard_size=args.shard_size,
                    machines=args.machines, headroom=args.headroom, quick=args.quick), args


def private_network(argv: list) -> str | None:
    """None where a local Ray may start (a private network namespace). Elsewhere, as root with
    unshare and ip, this process is replaced by the same run inside `unshare -n` (never returns);
    otherwise the one-line refusal."""
    from engine.cluster.ray_shards import in_private_network

    if in_private_network():
        return None
    if os.environ.get(REEXEC):
        return "bench/scale.py: still not in a private network namespace after unshare -n; not starting Ray"
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return ("bench/scale.py: a local Ray listens on every network interface: run it as root with unshare and ip "
                "(it re-runs itself in `unshare -n`), inside a private network namespace, or with --no-ray")
    path = os.pathsep.join(p for p in (str(common.REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, **{REEXEC: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe("unshare", ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable,
                           "-m", "bench.scale", *argv], env)
    return "bench/scale.py: exec of unshare failed"  # not reached: execvpe raises OSError instead


def start_ray():
    """(ray, whether this process started it): a Ray already initialised here is left running."""
    from engine.cluster.ray_shards import connect, require_ray

    started = not require_ray().is_initialized()
    return connect(None, num_cpus=RAY_CPUS), started


def measure(settings: Settings, work: str) -> dict:
    import faiss
    import torch

    from engine.search import keep_freed_memory

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    keep_freed_memory()  # as the Retriever and every ShardSearcher do
    ray, started = start_ray() if settings.ray else (None, False)
    try:
        return {"sizes": [run_size(n, settings, work) for n in settings.sizes], "threads": torch.get_num_threads()}
    finally:
        if started:
            ray.shutdown()


def main(argv=None) -> int:
    from bench import scale_report

    argv = list(sys.argv[1:] if argv is None else argv)
    settings, args = parse_args(argv)
    if settings.ray:
        refusal = private_network(argv)
        if refusal:
            print(refusal, file=sys.stderr)
            return 2
    clock, info, loadavg = time.perf_counter(), common.machine_info(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.work) as work:
        result = measure(settings, work)
    result.update(format="cvr-sdgm/bench-scale/1", machine=info, machine_slug=common.machine_slug(info),
                  settings=asdict(settings), k=K,
                  dims=dict(zip(("latent", "concept"), dims(), strict=True)),
                  ray_cpus=RAY_CPUS if settings.ray else None,
                  wall_seconds=round(time.perf_counter() - clock, 1), cpu_seconds=common.cpu_seconds(),
                  load_average={"before": loadavg, "after": os.getloadavg()[0]})
    for size in result["sizes"]:
        size["rows"] = common.stamp(size["rows"], info)
    result["verified"] = scale_report.verified(result)
    result["sizing"] = scale_report.sizing(result)
    folder = common.results_dir(args.out or (tempfile.mkdtemp(prefix="bench-scale-out-") if settings.quick else None),
                                info)
    written = common.write_results(folder, "scale", result, scale_report.markdown(result), scale_report.plot)
    print(Path(written["md"]).read_text())
    print("wrote " + ", ".join(written.values()))
    if not result["verified"]:
        print("bench/scale.py: exhaustive scatter-gather did not return the single-process ids (see "
              "same_ids_as_single in scale.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
