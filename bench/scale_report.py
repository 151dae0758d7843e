"""bench/scale.py's verdict, sizing extrapolation, Markdown tables and plot (from its result dict)."""
from __future__ import annotations

import math
import statistics

import numpy as np

from bench import common

MiB, GiB = 1 << 20, 1 << 30
TOTALS = (10_000_000, 100_000_000)  # the collection sizes the sizing table extrapolates to
LABELS = {"single": "single process", "local": "LocalShards (in process)", "ray": "Ray actors"}


def verified(result: dict) -> bool:
    """Whether every exhaustive scatter-gather row returned exactly the single-process ids."""
    return all(row["same_ids_as_single"] for size in result["sizes"] for row in size["rows"]
               if row["search"] != "single" and row["mode"] == "exhaustive")


def _find(size: dict, search: str, mode: str, batch: int, shards: int | None = None) -> dict | None:
    for row in size["rows"]:
        if (row["search"], row["mode"], row["batch"]) == (search, mode, batch) and shards in (None, row["shards"]):
            return row
    return None


def _batch(result: dict) -> int:
    return result["settings"]["queries"]


# ---------------------------------------------------------------------------------------------
# Sizing


def _two_stage_fit(result: dict) -> tuple:
    """(a, b) of ms per batch = a + b sqrt(videos), least squares over the single-process
    two-stage rows: an IVF first stage of sqrt(n) lists and a fixed nprobe scans ~sqrt(n) vectors
    (the coarse quantizer too), and the exact rerank of M candidates costs the same at any size."""
    points = [(math.sqrt(s["videos"]), _find(s, "single", "two-stage", _batch(result))["median_ms"])
              for s in result["sizes"]]
    if len(points) == 1:
        return 0.0, points[0][1] / points[0][0]
    x, y = np.array(points).T
    b, a = np.polyfit(x, y, 1)
    if a < 0:  # a negative intercept extrapolates too low at no real cost: proportional fit instead
        return 0.0, float(np.dot(x, y) / np.dot(x, x))
    return float(a), float(b)


def _shard_runtime(largest: dict) -> float | None:
    """Bytes a shard actor holds beyond its index and ids (Python, torch, the matcher), measured
    on the actors of the largest set of the largest size; None without Ray rows."""
    sets = [s for s in largest["shard_sets"] if s.get("ray_memory")]
    if not sets:
        return None
    ids = largest["ids_ram_bytes_per_video"]
    return statistics.median(m["rss_anon"] - m["index_bytes"] - ids * m["videos"] for m in sets[-1]["ray_memory"])


def _fanout(result: dict, largest: dict) -> tuple:
    """(fan-out overhead ms per call: the median Ray round trip of the widest set of the largest
    size, or None without Ray rows; the Ray one-shard two-stage batch minus the single-process one
    at that size, a cross-check that includes moving the batch; the wire bytes of the widest
    fan-out's two-stage row)."""
    batch = _batch(result)
    trips = [e["ray_roundtrip_ms"] for e in largest["shard_sets"] if "ray_roundtrip_ms" in e]
    single = _find(largest, "single", "two-stage", batch)
    ray = _find(largest, "ray", "two-stage", batch, 1)
    difference = None if ray is None else ray["median_ms"] - single["median_ms"]
    widest = [r for r in largest["rows"] if r["mode"] == "two-stage" and r["batch"] == batch and "wire_bytes" in r]
    wire = max(widest, key=lambda r: r["shards"])["wire_bytes"] if widest else None
    return (trips[-1] if trips else None), difference, wire


def sizing(result: dict) -> dict:
    """The sizing table's inputs (measured at the largest size) and its rows for TOTALS videos."""
    s = result["settings"]
    largest = max(result["sizes"], key=lambda size: size["videos"])
    n, disk = largest["videos"], largest["gallery_bytes"]
    per_video = {k: disk[k] / n for k in ("embeddings", "ids", "faiss")}
    a, b = _two_stage_fit(result)
    overhead, difference, wire = _fanout(result, largest)
    runtime = _shard_runtime(largest)
    exhaustive_per_video = _find(largest, "single", "exhaustive", _batch(result))["median_ms"] / n
    ram_per_video = per_video["embeddings"] + per_video["faiss"] + largest["ids_ram_bytes_per_video"]
    shard = s["shard_size"]
    memory = shard * ram_per_video + (runtime or 0.0)
    rows = []
    for total in TOTALS:
        shards = math.ceil(total / min(shard, total))
        size = min(shard, total)
        mem = size * ram_per_video + (runtime or 0.0)
        fits = {gib: math.floor(gib * GiB * (1 - s["headroom"]) / mem) for gib in s["machines"]}
        rows.append({"videos": total, "shard_videos": size, "shards": shards, "memory_per_shard_bytes": round(mem),
                     "shards_per_machine": fits,
                     "machines": {g: (math.ceil(shards / f) if f else None) for g, f in fits.items()},
                     "wire_bytes_per_batch": None if wire is None else shards * (wire["out_per_shard"]
                                                                                 + wire["back_per_shard"]),
                     "two_stage_ms_per_batch": round(a + b * math.sqrt(size) + (overhead or 0.0), 1),
                     "exhaustive_ms_per_batch": round(exhaustive_per_video * size + (overhead or 0.0), 1)})
    return {"measured_at": n, "bytes_per_video_disk": per_video, "ids_ram_bytes_per_video":
            largest["ids_ram_bytes_per_video"], "ram_bytes_per_video": ram_per_video, "shard_runtime_bytes": runtime,
            "two_stage_fit_ms": {"a": a, "b_per_sqrt_video": b}, "fanout_overhead_ms": overhead,
            "ray_one_shard_minus_single_ms": difference, "wire": wire,
            "memory_per_shard_bytes": round(memory), "rows": rows}


# ---------------------------------------------------------------------------------------------
# Markdown


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def latency_table(result: dict) -> str:
    rows = []
    for size in result["sizes"]:
        for row in size["rows"]:
            single = _find(size, "single", row["mode"], row["batch"])
            same = row.get("same_ids_as_single")
            rows.append([f"{size['videos']:,}", row["mode"], LABELS[row["search"]],
                         row["shards"], row["batch"], _ms(row["median_ms"]), _ms(row["per_query_ms"]),
                         f"{row['queries_per_s']:.3g}", f"{row['median_ms'] / single['median_ms']:.2f}x",
                         _ms(row["cpu_ms_per_batch"]),
                         "" if "recall_at_10" not in row else f"{row['recall_at_10']:.3f}",
                         "" if same is None else ("yes" if same else "**NO**"), row["runs"], f"{row['load_1min']:.1f}"])
    return common.markdown_table(["videos", "mode", "search", "shards", "batch", "batch ms (median)", "ms/query",
                                  "queries/s", "vs single", "CPU ms/batch", "recall@10", "same ids as single",
                                  "runs", "load"], rows)


def memory_table(result: dict) -> str:
    batch, rows = _batch(result), []
    for size in result["sizes"]:
        n, disk = size["videos"], size["gallery_bytes"]
        per_video = " / ".join(f"{disk[k] / n:.0f}" for k in ("embeddings", "ids", "faiss"))
        for entry in size["shard_sets"]:
            memory = entry.get("ray_memory") or entry.get("local_memory")
            wire = next((r["wire_bytes"] for r in size["rows"] if r["shards"] == entry["shards"]
                         and r["mode"] == "two-stage" and r["batch"] == batch and "wire_bytes" in r), None)
            rss = ("" if not entry.get("ray_memory") else
                   f"{statistics.median(m['rss_anon'] for m in memory) / MiB:.0f} / "
                   f"{statistics.median(m['rss_file'] for m in memory) / MiB:.0f}")
            rows.append([f"{n:,}", entry["shards"], per_video, f"{sum(disk.values()) / n:.0f}",
                         f"{max(m['videos'] for m in memory):,}",
                         f"{max(m['embeddings_bytes'] for m in memory) / MiB:.1f}",
                         f"{max(m['index_bytes'] for m in memory) / MiB:.1f}", rss,
                         "" if wire is None else f"{wire['out_per_shard']:,}",
                         "" if wire is None else f"{wire['back_per_shard']:,}",
                         "" if wire is None else f"{wire['per_batch']:,}"])
    return common.markdown_table(["videos", "shards", "bytes/video: embeddings / ids / index", "bytes/video",
                                  "videos per shard", "embeddings MiB per shard", "index MiB per shard",
                                  "actor RSS MiB: private / file-backed", "bytes out per shard", "bytes back per shard",
                                  f"bytes per batch of {batch}"], rows)


def build_table(result: dict) -> str:
    rows = []
    for size in result["sizes"]:
        g = size["build_s"]["gallery"]
        sets = "; ".join(f"{e['shards']}: {e['shard_s']:.1f}" for e in size["shard_sets"])
        starts = "; ".join(f"{e['shards']}: {e['ray_start_s']:.1f}" for e in size["shard_sets"] if "ray_start_s" in e)
        opens = "; ".join(f"{e['shards']}: {e['local_start_s']:.1f}" for e in size["shard_sets"]
                          if "local_start_s" in e)
        trips = "; ".join(f"{e['shards']}: {e['ray_roundtrip_ms']:.2f}" for e in size["shard_sets"]
                          if "ray_roundtrip_ms" in e)
        rows.append([f"{size['videos']:,}", size["faiss"], f"{g['generate_s']:.1f}", f"{g['write_s']:.1f}", sets,
                     starts, opens, trips])
    return common.markdown_table(["videos", "FAISS index", "generate s", "write + index s",
                                  "shard set s (per shard count)", "Ray actors start s", "LocalShards open s",
                                  "Ray round trip ms (`info` on every shard)"], rows)


def _machines(count: int | None) -> str:
    return "too small" if not count else f"{count} machine{'' if count == 1 else 's'}"


def sizing_table(result: dict) -> str:
    plan, s = result["sizing"], result["settings"]
    rows = []
    for r in plan["rows"]:
        fits = "; ".join(f"{g} GiB: {r['shards_per_machine'][g]} per machine, {_machines(r['machines'][g])}"
                         for g in r["shards_per_machine"])
        wire = r["wire_bytes_per_batch"]
        rows.append([f"{r['videos']:,}", f"{plan['ram_bytes_per_video']:.0f}", f"{r['shard_videos']:,}",
                     r["shards"], f"{r['memory_per_shard_bytes'] / GiB:.1f}", fits,
                     "" if wire is None else f"{wire / 1024:.0f}", _ms(r["two_stage_ms_per_batch"]),
                     _ms(r["exhaustive_ms_per_batch"])])
    return common.markdown_table(["videos", "RAM bytes/video", "videos per shard", "shards", "GiB per shard",
                                  f"shards per machine ({100 * s['headroom']:.0f}% RAM left free)",
                                  f"KiB on the network per batch of {_batch(result)}",
                                  "two-stage ms per batch (expected)", "exhaustive ms per batch (for scale)"], rows)


def sizing_notes(result: dict) -> str:
    plan = result["sizing"]
    disk, fit = plan["bytes_per_video_disk"], plan["two_stage_fit_ms"]
    runtime = plan["shard_runtime_bytes"]
    overhead = plan["fanout_overhead_ms"]
    return (
        f"Extrapolated from the {plan['measured_at']:,}-video measurements. RAM per video = embeddings "
        f"{disk['embeddings']:.0f} B (float16, memory-mapped: kept resident) + FAISS index {disk['faiss']:.0f} B + "
        f"ids as Python strings {plan['ids_ram_bytes_per_video']:.0f} B; each shard adds "
        + ("its process's own memory, " + f"{runtime / MiB:.0f} MiB measured on the Ray actors. " if runtime is not None
           else "its process (not measured in this run: no Ray rows). ")
        + f"Two-stage time per shard batch = {fit['a']:.2f} + {fit['b_per_sqrt_video']:.4f} x sqrt(videos per shard) "
        "ms, fitted on the single-process two-stage rows (an `ivf` index of sqrt(n) lists with a fixed nprobe scans "
        "~sqrt(n) vectors; the rerank of M candidates does not grow), "
        + (f"plus {overhead:.2f} ms of fan-out overhead (the median Ray round trip of a call on every shard of the "
           f"widest set; the Ray one-shard two-stage batch took {plan['ray_one_shard_minus_single_ms']:.1f} ms more "
           "than the single process's, moving the batch and the answers included). "
           if overhead is not None else "with no fan-out overhead (no Ray rows in this run). ")
        + "It assumes every shard has a core of its own (the shards of a machine search in parallel), a fast "
        "network, and the median shard: the slowest of many shards, the round trip between machines and the query "
        "encoder are not in it. Network bytes count the query batch sent to every shard and every shard's top-k "
        "back (Ray sends the query arrays once per machine, so this is an upper bound). Exhaustive time is linear "
        "in the shard's videos.\n")


def markdown(result: dict) -> str:
    batch, s = _batch(result), result["settings"]
    run = "bench/scale.py" + (" --quick" if s["quick"] else "")
    verdict = ("Exhaustive scatter-gather returned exactly the single-process ids in every row."
               if result["verified"] else "**Exhaustive scatter-gather did NOT return the single-process ids in "
               "every row: see `same ids as single`.**")
    return "\n".join([
        f"**Scatter-gather search at scale** on `{result['machine_slug']}` ({run}): "
        f"the gallery search of query embeddings only (random unit query vectors and concepts in [0, 1]; a "
        "clustered synthetic gallery with videos aimed at each query, as bench/gallery_sizes.py makes it; no text "
        "encoder, no anchor image), top-10, one torch thread per process, median over "
        f"{s['repeats']} batches of distinct queries after a warm-up batch. {verdict}\n",
        latency_table(result),
        "\n**Bytes**: the gallery on disk per video, what each shard holds, and the pickled bytes of one two-stage "
        f"batch of {batch} queries through `RayShards.call` (query embeddings out to each shard, each shard's "
        "top-k values, rows, ids and details back); actor RSS from /proc after the searches: private (Python, "
        "torch, the FAISS index, the ids) and file-backed (its libraries and the embedding pages it read)\n",
        memory_table(result),
        "\n**Building** (not part of the latency table)\n",
        build_table(result),
        notes(result),
        f"\n## Sizing: {', '.join(f'{t // 1_000_000}M' for t in TOTALS)} videos (extrapolated)\n",
        sizing_table(result),
        "\n" + sizing_notes(result),
    ])


def notes(result: dict) -> str:
    s, loadavg, d = result["settings"], result["load_average"], result["dims"]
    loads = [row["load_1min"] for size in result["sizes"] for row in size["rows"]]
    low, high = min(loads), max(loads)
    cpus = s["actor_cpus"] or "the default, min(1, CPUs / (2 x shards)),"
    ray = (f"Ray rows: one actor per shard (`RayShards.start`, {cpus} logical CPUs each) on "
           f"a local Ray of {result['ray_cpus']} logical CPUs in a private network namespace. " if s["ray"] else
           "No Ray rows in this run (--no-ray). ")
    return (
        f"\nGallery: float16 embeddings of the shipped checkpoint's dims (latent {d['latent']} x 2 branches, concepts "
        f"{d['concept']} x 2), ids `video0000000`, a FAISS `ivf` index (IVF sqrt(n) lists, SQfp16, nprobe "
        f"{result['sizes'][0]['nprobe']}) per gallery and per shard; "
        "two-stage search takes M = 100 candidates per query. Recall@10 is that of the FAISS first stage (global "
        "latent vector alone) plus the exact rerank against the exhaustive top-10, on a stand-in built to make it "
        "measurable (a clustered background plus videos aimed at each query at growing distances, each of the "
        "four score parts at its own distance: bench/gallery_sizes.aimed_gallery); real embeddings differ. " + ray
        + "LocalShards rows search the shards one after another in this process. Per query = batch time / batch "
        "size. CPU ms/batch = CPU time of this process and of the shard actors over the timed batches, per batch: "
        "what a batch costs whatever else the cores run (wall time far above it on 2 cores means waiting for a "
        f"core); load = the 1-minute load average at the end of the row ({low:.1f}-{high:.1f}: above 2, other "
        "work shared the cores). Machine: "
        f"{common.describe_machine(result['machine'])}; load average {loadavg['before']:.1f} before, "
        f"{loadavg['after']:.1f} after (the cores may be shared with other work). "
        f"Wall time {result['wall_seconds']:.0f} s, "
        f"{result['cpu_seconds']:.0f} CPU-seconds in this process.\n")


# ---------------------------------------------------------------------------------------------
# Plot


def _minor_label(value: float, _) -> str:
    """Minor ticks of a log axis labelled at 2 and 5 only (a plain number, not 2x10^0)."""
    if value <= 0:
        return ""
    lead = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:g}" if lead in (2, 5) else ""


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    from matplotlib.ticker import FuncFormatter

    batch = _batch(result)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for axis, mode in zip(axes, ("exhaustive", "two-stage"), strict=True):
        for colour, size in enumerate(result["sizes"]):
            c, label = f"C{colour}", f"{size['videos']:,}"
            rows = [r for r in size["rows"] if r["mode"] == mode and r["batch"] == batch]
            for search, style in (("ray", "o-"), ("local", "x:")):
                mine = sorted((r["shards"], r["per_query_ms"]) for r in rows if r["search"] == search)
                if mine:
                    axis.plot(*zip(*mine, strict=True), style, color=c, label=f"{label}, {LABELS[search]}")
            single = _find(size, "single", mode, batch)
            axis.axhline(single["per_query_ms"], color=c, linestyle="--", linewidth=1,
                         label=f"{label}, single process")
        axis.set_title(mode)
        axis.set_xticks(result["settings"]["shards"])
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
        axis.set_xlabel("shards")
    axes[0].set_ylabel(f"ms per query (batch of {batch}, median)")
    for axis in axes:
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7)
    fig.suptitle(f"Scatter-gather search vs shards ({result['machine_slug']}, query embeddings only)")
    common.save_figure_atomic(fig, path)
    plt.close(fig)
