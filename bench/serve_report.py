"""bench/serve.py's report: the README lines, the markdown tables and notes, and the plot of a
`bench.serve` result (serve.json)."""
from __future__ import annotations

from pathlib import Path

from bench import common


def _num(value) -> str:
    """Three significant figures or so: 1234, 31.2, 4.56, 0.037; '' for None."""
    if value is None:
        return ""
    size = abs(value)
    return f"{value:.0f}" if size >= 100 else f"{value:.1f}" if size >= 10 else f"{value:.2f}" if size >= 0.1 \
        else f"{value:.3f}"


def summary(result: dict) -> str:
    """The lines for the README."""
    info, s, rows, over = result["machine"], result["settings"], result["runs"], result["overload"]
    g = result["gallery"]
    what = "as the issue asks" if s["full"] else "fewer than the issue's 200 per client (`--full` runs 200)"
    lines = [f"**Serving over HTTP** (`cvr serve`, 127.0.0.1, shipped checkpoint, {g['videos']} videos; "
             f"{s['clients']} concurrent clients x {s['queries']} distinct queries each, {what}; one query per "
             f"request; {info['cpu']}, {info['cores']} cores, shared and busy: load average "
             f"{result['load_average']['before']:.1f} before, {result['load_average']['after']:.1f} after):", ""]
    for r in rows:
        lines.append(f"- {r['backend']}, `--max-batch {r['max_batch']}`: {_num(r['queries_per_second'])} queries/s, "
                     f"p50 / p95 / p99 {_num(r.get('p50_ms'))} / {_num(r.get('p95_ms'))} / {_num(r.get('p99_ms'))} "
                     f"ms, {r['errors']} errors, {r['rejected_503']} 503s, mean batch {_num(r['mean_batch'])}.")
    for q in result["ratios"]:
        rounds = " / ".join(_num(x) for x in q["qps_ratio_per_round"])
        lines.append(f"- Micro-batching gain ({q['backend']}): {_num(q['qps_ratio'])}x the queries/s of "
                     f"`--max-batch 1` at `--max-batch {q['max_batch']}` (per round: {rounds}), and "
                     f"{_num(q['cpu_ratio'])}x fewer server CPU-seconds per query (the figure a busy shared "
                     "machine disturbs least).")
    if over:
        lines.append(f"- Overload ({over['backend']}, {over['clients']} clients, `--max-queue {over['max_queue']}`): "
                     f"{over['rejected_503']} of {over['requests']} requests refused with 503 + Retry-After, "
                     f"{over['other_5xx']} other 5xx, {over['errors']} errors; {over['answered']} answered at "
                     f"{_num(over['queries_per_second'])} queries/s; server RSS high-water "
                     f"{_num(over['peak_rss_mb'])} MB.")
    return "\n".join(lines) + "\n"


def _row_cells(r: dict) -> list:
    cores = r["server_cpu_s"] / r["wall_s"] if r["wall_s"] else None
    return [r["backend"], r["max_batch"], r["max_queue"], f"{r['clients']} x {r['queries_per_client']}", r["requests"],
            r["answered"], r["errors"], r["rejected_503"], r["other_5xx"], _num(r.get("p50_ms")),
            _num(r.get("p95_ms")), _num(r.get("p99_ms")), _num(r["queries_per_second"]), _num(r["mean_batch"]),
            _num(r["server_cpu_ms_per_query"]), _num(cores), _num(r["ready_rss_mb"]), _num(r["peak_rss_mb"]),
            _num(r["startup_s"])]


HEADERS = ["backend", "max batch", "max queue", "clients x queries", "requests", "200", "errors", "503",
           "other 5xx", "p50 ms", "p95 ms", "p99 ms", "queries/s", "mean batch", "server CPU ms/query", "server cores",
           "RSS at ready MB", "RSS high-water MB", "start s"]


def markdown(result: dict) -> str:
    parts = [summary(result),
             "**Closed-loop load** (each client sends its next query when the last is answered; latency as the "
             "client sees it, percentiles over every answered request of the rounds; queries/s = answered / wall of "
             "the loads, summed over the rounds; mean batch = queries per model batch from "
             "the server's `cvr_batch_queries`; server CPU = the server process's CPU time over the load, per answered "
             "query and per wall second (cores used: below 1 while its one model thread waits for the machine); "
             "RSS high-water = VmHWM of the server process at the end)\n",
             common.markdown_table(HEADERS, [_row_cells(r) for r in result["runs"]])]
    if result["ratios"]:
        parts += ["\n**Micro-batching** (the runs above side by side: the same queries, fresh servers and anchor "
                  "caches; per round = the two servers of one round, run one after the other)\n",
                  common.markdown_table(["backend", "queries/s ratio", "per round", "p95 ratio",
                                         "CPU per query, batch 1 / batched", "per round"],
                                        [[f"{q['backend']}: max batch {q['max_batch']} / max batch 1",
                                          _num(q["qps_ratio"]), " / ".join(_num(x) for x in q["qps_ratio_per_round"]),
                                          _num(q["p95_ratio"]), _num(q["cpu_ratio"]),
                                          " / ".join(_num(x) for x in q["cpu_ratio_per_round"])]
                                         for q in result["ratios"]])]
    if result["overload"]:
        o = result["overload"]
        parts += [f"\n**Overload** ({o['clients']} clients, `--max-queue {o['max_queue']}`; a refused client sleeps "
                  "its Retry-After, then sends its next query; latency of the answered ones. The refused clients "
                  "all sleep the same Retry-After and come back in waves, between which the server idles (its cores "
                  "used), so these queries/s are not its capacity)\n",
                  common.markdown_table(HEADERS, [_row_cells(o)])]
    parts.append(notes(result))
    return "\n".join(parts)


def notes(result: dict) -> str:
    s, g, e = result["settings"], result["gallery"], result["export"]
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in result["part_seconds"].items())
    export = (f"The ONNX Runtime server ran `cvr export --format onnx --modules {','.join(e['modules'])}` of a copy of "
              f"the shipped checkpoint, made beforehand in {e['export_s']:.0f} s. ") if e else ""
    o = result["overload"]
    shared = (f"The overload load ran on the max-batch-{o['max_batch']} server right after its closed-loop load "
              "(the same settings), so its RSS high-water includes that load. ") if o and o["shared_server"] else ""
    servers = {r["name"].removesuffix("-overload"): r["server"] for r in result["runs"] + ([o] if o else [])}
    stops = "all stopped cleanly" if all(v.get("clean_stop") for v in servers.values()) else \
        "NOT all stopped cleanly: " + ", ".join(f"{k} exits {v.get('exit_codes')}" for k, v in servers.items()
                                                  if not v.get("clean_stop"))
    tracebacks = sum(v.get("tracebacks", 0) for v in servers.values())
    stops += f"; {tracebacks} tracebacks in the server logs"
    stages = "; ".join(f"{r['name']}: " + ", ".join(f"{k} {_num(v)}" for k, v in r["stage_ms_per_query"].items())
                       for r in result["runs"] if r["stage_ms_per_query"])
    per_round = s["queries"] // s["repeats"]
    return (
        f"\nGallery: `cvr demo --videos {g['demo_videos']}` ({g['videos']} test-split clips as mp4 files, indexed "
        f"with the shipped checkpoint {result['checkpoint']['path']}, served from a copy). Each closed-loop "
        f"configuration ran in {s['repeats']} round(s) of {per_round} queries per client, the configurations in "
        "the same order each round; every round of every configuration is a fresh `python -m engine.cli serve` "
        f"process (OPENBLAS_NUM_THREADS=1, `--threads 1`, `--max-wait-ms {s['max_wait_ms']:g}`, `--read-only`) "
        "with an anchor cache folder of its own; every query of one configuration is a distinct built-in caption "
        "(the same list for each configuration; the overload run has others), so no anchor comes from a cache. "
        f"Warm-up: {s['warmup']} round(s) of {s['clients']} concurrent queries (other captions) after each "
        f"server's start, not counted. Servers stop on SIGTERM by pid: {stops}. k = {s['k']}. {export}{shared}"
        "Clients: asyncio + httpx in the benchmark process, on the same cores as the server. With one model "
        f"thread and a {s['max_wait_ms']:g} ms window, {s['clients']} closed-loop clients settle into two cohorts "
        "that alternate (the clients one batch answers re-send while the next batch runs), so a batch holds about "
        "half of them. Server-side ms per query and stage, the mean over batches of each batch's per-query ms "
        "(`cvr_stage_seconds`; wall time of the model thread, small end-of-load batches weigh as much as full "
        f"ones): {stages or 'n/a'}. Machine: {common.describe_machine(result['machine'])}; shared with other "
        f"work (load average {result['load_average']['before']:.1f} before, {result['load_average']['after']:.1f} "
        "after; each round's in serve.json), so absolute numbers are pessimistic and vary from run to run, and "
        "so does the queries/s ratio; the server's CPU time per query varies least. Wall time "
        f"{result['wall_seconds']:.0f} s ({parts}); {result['cpu_seconds']:.0f} CPU-seconds of this process and "
        "its finished children.\n")


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    rows = list(result["runs"]) + ([result["overload"]] if result["overload"] else [])
    labels = [f"{r['backend']}\n--max-batch {r['max_batch']}" + (f"\noverload, queue {r['max_queue']}" if r["overload"]
                                                          else "") for r in rows]
    colours = ["C7" if r["overload"] else "C0" if r["max_batch"] > 1 else "C1" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for axis, key, unit in ((left, "queries_per_second", "queries/s"), (right, "p95_ms", "p95 latency, ms")):
        values = [r.get(key) or 0.0 for r in rows]
        bars = axis.bar(range(len(rows)), values, color=colours)
        for bar, value in zip(bars, values, strict=True):
            axis.annotate(_num(value), (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom",
                          fontsize=8)
        axis.set_xticks(range(len(rows)), labels, fontsize=8)
        axis.set_ylabel(unit)
        axis.grid(axis="y", alpha=0.3)
    left.set_title("Throughput (answered queries / wall)")
    right.set_title("p95 request latency (client side)")
    s = result["settings"]
    fig.suptitle(f"cvr serve over HTTP, {s['clients']} clients x {s['queries']} queries "
                 f"({result['machine']['cores']} cores, 1 server thread)")
    common.save_figure_atomic(fig, path)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> dict:
    return common.write_results(out, "serve", result, markdown(result), plot)
