"""Indexing throughput of video files: `cvr index --videos` cold, with 0, 1 and 2 decode workers,
and what a re-run costs when some files changed or none did.

The clips are the built-in set as mp4 files (`cvr data synth --mp4`: 8 frames at 1 fps, 8 s each,
H.264 at 128 px). Every measurement is one call of `engine.ingest.index_videos` (what `cvr index
--videos FOLDER --out GALLERY` runs) in a fresh child process of one torch thread, so each pays
what a `cvr index` command pays after its imports: reading the checkpoint, loading its video tower
and the ResNet-50, starting the decode workers.
Rows:

1. **Cold full index**: all clips into a new gallery, once per decode worker count (0 = decoded
   inline, one at a time) and repeat, interleaved. Videos/s = videos / wall; per-video ms of each
   stage from the run's `IngestReport.times` (decode summed over the workers, which run beside the
   ResNet-50; the ResNet-50, video tower and writing run in the indexing process).
2. **Model load**, part of each run's wall: the two loaders `index_videos` calls before its first
   batch (the checkpoint's video tower, `load_video_tower`, and the ResNet-50's
   `RegionExtractor.from_config`, first-use imports included) are timed inside each run, so that
   the per-video numbers can also be read without it.
3. **Re-runs** into the gallery of a cold run: after `--changed` clips were re-encoded with other
   content (one frame's colours inverted: new bytes, the same decode cost), and with nothing
   changed (a stat per file; no model is loaded).

    python -m bench.ingest                        # 200 clips, bench/results/<machine>/ingest.*
    python -m bench.ingest --videos 100 --repeats 2
    python -m bench.ingest --checkpoint runs/demo/model
    python -m bench.ingest --tiny --out /tmp/i    # seconds: a smoke run (tests)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench import common
from engine import files, paths

SHIPPED = paths.WEIGHTS / "retrieval" / "builtin"
STAGES = ("decode", "resnet", "tower", "write")
STAGE_LABELS = {"decode": "decode", "resnet": "ResNet-50", "tower": "video tower", "write": "write",
                "other": "other", "load": "model load", "wall": "wall"}
# The smoke run's checkpoint: tiny widths, one epoch on its own clips (tests/conftest.py's TINY_TRAIN).
TINY_TRAIN = ["--epochs", "1", "--batch-size", "16", "--latent-dim", "32", "--attn-dim", "16", "--video-gru-hidden",
              "16", "--video-local-dim", "32", "--quiet"]
CHILD_TIMEOUT_S = 1800
LOADS = ("checkpoint", "resnet")  # the loaders timed inside a run (the video tower; the frame extractor)


@dataclass
class Settings:
    videos: int = 200
    workers: tuple = (0, 1, 2)
    repeats: int = 3  # cold runs per worker count, and runs of each re-run case
    changed: int = 10  # clips re-encoded before the incremental re-run
    rerun_workers: int = 1  # decode workers of the re-runs (cvr index's default)
    checkpoint: str | None = None  # default: the shipped one (with --tiny: one trained here)
    tiny: bool = False


# ---------------------------------------------------------------------------------------------
# The clips and the checkpoint


def make_clips(root: str, n: int) -> dict:
    """The built-in set of n clips with its mp4 files (`cvr data synth --mp4`); returns where the
    clips are and what they are."""
    from engine.cli import main as cvr

    clock = time.perf_counter()
    if cvr(["data", "synth", "--root", root, "--videos", str(n), "--mp4", "--quiet"]) != 0:
        raise RuntimeError("cvr data synth --mp4 failed")
    folder = os.path.join(root, "synth", "videos")
    clips = sorted(p for p in os.listdir(folder) if p.endswith(".mp4"))
    size = sum(os.path.getsize(os.path.join(folder, p)) for p in clips)
    return {"folder": folder, "videos": len(clips), "bytes": size, "frames": 8, "fps": 1.0,
            "make_s": round(time.perf_counter() - clock, 1)}


def tiny_checkpoint(root: str, out: str) -> str:
    """A tiny-width checkpoint trained one epoch on the clips' own collection (the smoke run's)."""
    from engine.cli import main as cvr

    if cvr(["train", "--root", root, "--collection", "synth", "--out", out, *TINY_TRAIN]) != 0:
        raise RuntimeError("cvr train of the tiny checkpoint failed")
    return out


def describe_checkpoint(folder: str) -> dict:
    from engine.checkpoint import checkpoint_id, read_checkpoint_config

    model = read_checkpoint_config(folder)["model"]
    widths = {k: model[k] for k in ("latent_dim", "concept_dim", "attn_dim", "video_gru_hidden", "video_local_dim")
              if k in model}
    shipped = Path(folder).resolve() == SHIPPED.resolve()
    return {"path": paths.reference(folder, str(common.REPO)) if shipped else str(folder), "shipped": shipped,
            "id": checkpoint_id(folder), "model": widths}


def changed_clips(n: int, changed: int, repeat: int) -> list:
    """(clip index, frame to invert) of the clips to change before re-run `repeat`: a fresh set
    each repeat, in a fixed shuffled order; a clip met again gets another frame inverted, so every
    change is content the gallery has not seen."""
    order = np.random.default_rng(0).permutation(n)
    return [(int(order[k % n]), k // n) for k in range(repeat * changed, (repeat + 1) * changed)]


def change_clips(collection: str, changes: list) -> None:
    """Re-encode each clip of `changes` with one frame's colours inverted (new bytes; the same frame
    count, size and decode cost), as `cvr data synth --mp4` encodes them."""
    from engine.video import write_video
    from training.synthetic import VIDEO_CRF, VIDEO_DIR, VIDEO_UPSCALE, read_config, read_scenes, render_clip

    config, scenes = read_config(collection), read_scenes(collection)
    for index, frame in changes:
        clip = render_clip(scenes[index], config.frames, config.size)
        clip[frame % len(clip)] = 255 - clip[frame % len(clip)]
        write_video(os.path.join(collection, VIDEO_DIR, f"{scenes[index].video_id}.mp4"), clip, 1.0, crf=VIDEO_CRF,
                    upscale=VIDEO_UPSCALE, threads=1)


# ---------------------------------------------------------------------------------------------
# The child process: one index_videos call, or the model loads on their own


def child_index(job: dict) -> dict:
    """One index_videos call. The two loaders it calls when it has something to embed (the
    checkpoint's load_video_tower and the ResNet-50's RegionExtractor.from_config; it imports them
    when it needs them) are wrapped to time them, so each run reports its own model load."""
    from engine import checkpoint, vision
    from engine.ingest import IngestOptions, index_videos

    loads = {}

    def timed(name, load):
        def wrapper(*args, **kwargs):
            clock = time.perf_counter()
            try:
                return load(*args, **kwargs)
            finally:
                loads[name] = loads.get(name, 0.0) + time.perf_counter() - clock
        return wrapper

    checkpoint.load_video_tower = timed("checkpoint", checkpoint.load_video_tower)
    from_config = vision.RegionExtractor.from_config  # bound to the class
    vision.RegionExtractor.from_config = classmethod(lambda cls, *a, **k: timed("resnet", from_config)(*a, **k))
    cpu = time.process_time()
    report = index_videos(job["checkpoint"], [job["clips"]], job["gallery"],
                          IngestOptions(workers=job["workers"], progress=False))
    cpu = time.process_time() - cpu
    t = report.times
    return {"workers": job["workers"], "wall_s": t.wall, "videos": t.videos, "counts": dict(report.counts),
            "seconds": {k: getattr(t, k) for k in STAGES}, "live_videos": report.videos,
            "skipped": len(report.skipped), "load_s": {k: loads.get(k, 0.0) for k in LOADS},
            "models_loaded": sorted(loads), "cpu_s": cpu}


def run_child(job: dict) -> dict:
    """`child_index` in a fresh process of one torch thread (`python -m bench.ingest --job`)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    argv = [sys.executable, "-m", "bench.ingest", "--job", json.dumps(job)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT_S, cwd=common.REPO)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"ingest benchmark child ({job['workers']} decode workers) failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Measuring


def _stats(values: list) -> dict:
    mean, std = common.mean_std(values)
    return {"mean": mean, "std": std}


def _load_s(run: dict) -> float:
    return run["load_s"]["checkpoint"] + run["load_s"]["resnet"]


def cold_rows(runs: list) -> list:
    """One row per worker count: wall, videos/s (with and without the model load) and per-video ms
    of each stage, mean and std over the runs. `other` = wall - model load - the stages that ran in
    the indexing process (ResNet-50, tower, write; and decode when inline): finding and hashing
    the files, starting and waiting on the decode workers, the manifest."""
    rows = []
    for workers in dict.fromkeys(r["workers"] for r in runs):
        mine = [r for r in runs if r["workers"] == workers]
        per_video = {}
        for stage in STAGES:
            per_video[stage] = _stats([1000 * r["seconds"][stage] / r["videos"] for r in mine])
        inline = [s for s in STAGES if s != "decode" or workers == 0]
        per_video["other"] = _stats([1000 * (r["wall_s"] - _load_s(r) - sum(r["seconds"][s] for s in inline))
                                     / r["videos"] for r in mine])
        per_video["load"] = _stats([1000 * _load_s(r) / r["videos"] for r in mine])
        per_video["wall"] = _stats([1000 * r["wall_s"] / r["videos"] for r in mine])
        rows.append({"workers": workers, "runs": len(mine), "videos": mine[0]["videos"],
                     "wall_s": _stats([r["wall_s"] for r in mine]),
                     "videos_per_s": _stats([r["videos"] / r["wall_s"] for r in mine]),
                     "best_videos_per_s": max(r["videos"] / r["wall_s"] for r in mine),
                     "cpu_s": _stats([r["cpu_s"] for r in mine]),
                     "load_s": _stats([_load_s(r) for r in mine]),
                     "videos_per_s_without_load": _stats([r["videos"] / (r["wall_s"] - _load_s(r)) for r in mine]),
                     "per_video_ms": per_video, "per_run": mine})
    return rows


def rerun_row(case: str, runs: list, changed: int) -> dict:
    return {"case": case, "workers": runs[0]["workers"], "runs": len(runs), "changed_files": changed,
            "reindexed": _stats([r["videos"] for r in runs]), "wall_s": _stats([r["wall_s"] for r in runs]),
            "load_s": _stats([_load_s(r) for r in runs]),
            "models_loaded": sorted({m for r in runs for m in r["models_loaded"]}), "per_run": runs}


def run(s: Settings, work: str) -> dict:
    from tqdm import tqdm

    root = os.path.join(work, "data")
    clips = make_clips(root, s.videos)
    checkpoint = s.checkpoint or (tiny_checkpoint(root, os.path.join(work, "checkpoint")) if s.tiny else str(SHIPPED))
    before = describe_checkpoint(checkpoint)
    clock = [time.perf_counter()]
    lap = lambda: clock.append(time.perf_counter()) or round(clock[-1] - clock[-2], 1)
    job = {"checkpoint": checkpoint, "clips": clips["folder"]}
    cold, galleries, part_seconds = [], {}, {}
    steps = [(r, w) for r in range(s.repeats) for w in s.workers]  # interleaved: drift hits every row alike
    for repeat, workers in tqdm(steps, desc="cold index runs", disable=s.tiny):
        gallery = os.path.join(work, f"gallery-w{workers}-r{repeat}")
        cold.append(run_child({**job, "workers": workers, "gallery": gallery}))
        galleries.setdefault(workers, []).append(gallery)
    part_seconds["cold index runs"] = lap()
    # Re-runs go into a cold gallery of the re-run worker count (or the last one made); the others are dropped.
    target = (galleries.get(s.rerun_workers) or list(galleries.values())[-1])[-1]
    for folder in (g for gs in galleries.values() for g in gs if g != target):
        files.remove(folder)
    collection = os.path.dirname(clips["folder"])
    changed = min(s.changed, clips["videos"])
    incremental, nothing = [], []
    for repeat in tqdm(range(s.repeats), desc="re-runs", disable=s.tiny):
        change_clips(collection, changed_clips(clips["videos"], changed, repeat))
        incremental.append(run_child({**job, "workers": s.rerun_workers, "gallery": target}))
    for _ in range(s.repeats):
        nothing.append(run_child({**job, "workers": s.rerun_workers, "gallery": target}))
    part_seconds["re-runs"] = lap()
    after = describe_checkpoint(checkpoint)
    if after["id"] != before["id"]:
        raise RuntimeError(f"the checkpoint at {checkpoint} changed during the benchmark: run it again")
    load = {f"{k}_s": _stats([r["load_s"][k] for r in cold]) for k in LOADS}
    load.update(total_s=_stats([_load_s(r) for r in cold]), runs=len(cold))
    return {"format": "cvr-sdgm/bench-ingest/1", "checkpoint": before, "clips": clips, "load": load,
            "cold": cold_rows(cold),
            "reruns": [rerun_row(f"{changed} of {clips['videos']} changed", incremental, changed),
                       rerun_row("nothing changed", nothing, 0)],
            "part_seconds": part_seconds}


# ---------------------------------------------------------------------------------------------
# Output


def _num(value: float) -> str:
    """Three significant figures or so: 1234, 31.2, 4.56, 0.037."""
    size = abs(value)
    return f"{value:.0f}" if size >= 100 else f"{value:.1f}" if size >= 10 else f"{value:.2f}" if size >= 0.1 \
        else f"{value:.3f}"


def _pm(stat: dict) -> str:
    return _num(stat["mean"]) + ("" if stat["std"] is None else f" ± {_num(stat['std'])}")


def _count(stat: dict) -> str:
    """A count over runs: the number when every run had the same, else mean ± std."""
    return f"{stat['mean']:g}" if not stat["std"] and float(stat["mean"]).is_integer() else _pm(stat)


def _workers(w: int) -> str:
    return "0 (inline)" if w == 0 else str(w)


def _loaded(row: dict) -> str:
    names = {"checkpoint": "the checkpoint", "resnet": "the ResNet-50"}
    loaded = [names[m] for m in row["models_loaded"] if m in names]
    return " and ".join(loaded) + " loaded" if loaded else "no model loaded"


def _per(row: dict, key: str = "videos_per_s") -> str:
    return _num(row[key]["mean"] if isinstance(row[key], dict) else row[key])


def summary(result: dict) -> str:
    """The lines for the README: throughput, where the time goes, what re-runs cost."""
    cold = {r["workers"]: r for r in result["cold"]}
    n, info, load = result["clips"]["videos"], result["machine"], result["load"]
    base = cold.get(1) or result["cold"][0]
    ms = {k: v["mean"] for k, v in base["per_video_ms"].items()}
    stage_ms = sum(ms[s] for s in STAGES)
    how = lambda w: "inline" if w == 0 else "with " + _plural(w)
    best = ", ".join(f"{_per(r, 'best_videos_per_s')} {how(r['workers'])}" for r in result["cold"])
    means = " / ".join(_per(r) for r in result["cold"])
    walls = [x["wall_s"] for r in result["cold"] for x in r["per_run"]]
    inc, none = result["reruns"]
    ckpt = "the shipped checkpoint" if result["checkpoint"]["shipped"] else \
        f"a checkpoint that is NOT the shipped one ({result['checkpoint']['path']})"
    lines = [
        f"**Indexing video files** (`cvr index --videos`, {ckpt}; {n} built-in mp4 clips of 8 s at 1 fps; "
        f"{info['cpu']}, {info['cores']} cores, one torch thread):",
        "",
        f"- Cold full index, videos/s (videos / wall), best of {base['runs']} runs: {best} "
        f"(means {means}; the slowest run took {max(walls) / min(walls):.1f}x the fastest). Wall includes "
        f"{_num(load['total_s']['mean'])} s of model loading (the video tower "
        f"{_num(load['checkpoint_s']['mean'])} s, the ResNet-50 {_num(load['resnet_s']['mean'])} s).",
        f"- Per video with {_plural(base['workers'])}: "
        + ", ".join(f"{STAGE_LABELS[k]} {_num(ms[k])} ms ({100 * ms[k] / stage_ms:.0f}%)"
                    for k in sorted(STAGES, key=lambda k: -ms[k]))
        + f" of the stages; {_num(ms['other'])} ms/video outside them (finding and hashing the files, worker "
        "start-up, waiting on decodes).",
    ]
    if 1 in cold and 2 in cold:
        gain = lambda key: 100 * (_value(cold[2][key]) / _value(cold[1][key]) - 1)
        lines.append(f"- 2 decode workers instead of 1 on {info['cores']} cores: {gain('best_videos_per_s'):+.0f}% "
                     f"videos/s (best runs), {gain('videos_per_s'):+.0f}% (means).")
    lines.append(f"- Re-run after {inc['case']}: {_num(inc['wall_s']['mean'])} s, {_num(inc['load_s']['mean'])} s "
                 f"of it model loading ({_count(inc['reindexed'])} re-indexed; cold: {_num(base['wall_s']['mean'])} "
                 f"s); with nothing changed: {_num(none['wall_s']['mean'])} s ({_loaded(none)}).")
    return "\n".join(lines) + "\n"


def _value(stat) -> float:
    return stat["mean"] if isinstance(stat, dict) else stat


def _plural(workers: int) -> str:
    return f"{workers} decode worker{'' if workers == 1 else 's'}"


def markdown(result: dict) -> str:
    cold_table = [[_workers(r["workers"]), r["runs"], _pm(r["wall_s"]), _pm(r["videos_per_s"]),
                   _num(r["best_videos_per_s"]), _pm(r["videos_per_s_without_load"]), _pm(r["load_s"])]
                  + [_pm(r["per_video_ms"][k]) for k in (*STAGES, "other")] + [_pm(r["cpu_s"])]
                  for r in result["cold"]]
    load = result["load"]
    load_table = [["checkpoint: the video tower alone (`load_video_tower`)", _pm(load["checkpoint_s"])],
                  ["ResNet-50 frame extractor (`RegionExtractor.from_config`)", _pm(load["resnet_s"])],
                  ["total", _pm(load["total_s"])]]
    rerun_table = [[r["case"], r["workers"], r["runs"], _count(r["reindexed"]), _pm(r["wall_s"]), _pm(r["load_s"]),
                    _loaded(r)] for r in result["reruns"]]
    return "\n".join([
        summary(result),
        f"**Cold full index** of {result['clips']['videos']} clips into a new gallery (mean ± std over runs; "
        "wall = the whole `index_videos` call: model loading, finding and hashing the files, decoding, ResNet-50, "
        "tower, writing; ms are per video; decode is summed over the workers, which run beside the rest; CPU s = "
        "the indexing process's own CPU time, decode workers not included)\n",
        common.markdown_table(["decode workers", "runs", "wall s", "videos/s", "best videos/s",
                               "videos/s without model load", "model load s", "decode ms", "ResNet-50 ms", "tower ms",
                               "write ms", "other ms", "CPU s"], cold_table),
        f"\n**Model load** inside the cold runs (the loaders `index_videos` calls before its first batch, "
        f"first-use imports included; part of wall above; {load['runs']} runs)\n",
        common.markdown_table(["part", "seconds"], load_table),
        "\n**Re-runs** into a cold run's gallery (wall s of the `index_videos` call; changed clips re-encoded "
        "with one frame's colours inverted before each run)\n",
        common.markdown_table(["case", "decode workers", "runs", "re-indexed", "wall s", "model load s", "models"],
                              rerun_table),
        notes(result),
    ])


def notes(result: dict) -> str:
    c, ckpt = result["clips"], result["checkpoint"]
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in result["part_seconds"].items())
    which = "the shipped built-in checkpoint" if ckpt["shipped"] else "NOT the shipped checkpoint"
    loadavg = result["load_average"]
    return (
        f"\nClips: `cvr data synth --videos {c['videos']} --mp4` ({c['frames']} frames at {c['fps']:g} fps, H.264 "
        f"at 128 px, {c['bytes'] / 1e6:.1f} MB in all; made in {c['make_s']:.0f} s, not counted). Checkpoint: "
        f"{ckpt['path']} ({which}; id {ckpt['id'][:12]}; {', '.join(f'{k} {v}' for k, v in ckpt['model'].items())}). "
        "Every run is one `engine.ingest.index_videos` call (`cvr index --videos`: default sampling 1 fps, "
        "segments 4:2, batches of 16 videos, no FAISS index) in a fresh process of one torch thread; decode "
        "workers are one-thread processes. Other ms = wall - model load - the stages run in the indexing "
        "process. "
        f"Machine: {common.describe_machine(result['machine'])}; load average {loadavg['before']:.1f} before, "
        f"{loadavg['after']:.1f} after (the cores may be shared). Wall time {result['wall_seconds']:.0f} s "
        f"({parts}), {result['total_seconds']:.0f} s with the set-up; {result['cpu_seconds']:.0f} CPU-seconds.\n")


def plot(result: dict, path) -> None:
    plt = common.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    keys = (*STAGES, "other", "load", "wall")
    width = 0.8 / len(result["cold"])
    for i, row in enumerate(result["cold"]):
        x = [j + (i - (len(result["cold"]) - 1) / 2) * width for j in range(len(keys))]
        means = [row["per_video_ms"][k]["mean"] for k in keys]
        errors = [row["per_video_ms"][k]["std"] or 0.0 for k in keys]
        label = "inline decode" if row["workers"] == 0 else _plural(row["workers"])
        left.bar(x, means, width, yerr=errors, capsize=2, label=label)
    left.set_xticks(range(len(keys)), [STAGE_LABELS[k].replace(" ", "\n") for k in keys], fontsize=9)
    left.set_ylabel("ms per video (mean over runs)")
    left.set_title(f"Cold full index of {result['clips']['videos']} clips, per video")
    left.legend(fontsize=8)
    left.grid(axis="y", alpha=0.3)
    cold = {r["workers"]: r for r in result["cold"]}
    base = cold.get(1) or result["cold"][0]
    short = "inline" if base["workers"] == 0 else f"{base['workers']} worker{'' if base['workers'] == 1 else 's'}"
    bars = [(f"cold full\n{short}", base["wall_s"]),
            ("model load\n(in cold runs)", result["load"]["total_s"])]
    bars += [(r["case"].replace(" changed", "\nchanged"), r["wall_s"]) for r in result["reruns"]]
    values, errors = [b[1]["mean"] for b in bars], [b[1]["std"] or 0.0 for b in bars]
    drawn = right.bar(range(len(bars)), values, yerr=errors, capsize=3, color=["C0", "C7", "C1", "C2"])
    for bar, value, error in zip(drawn, values, errors, strict=True):
        right.annotate(f"{_num(value)} s", (bar.get_x() + bar.get_width() / 2, value + error), ha="center",
                       va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    right.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("wall seconds of the index_videos call")
    right.set_title("Re-run costs")
    right.grid(axis="y", alpha=0.3, which="both")
    fig.suptitle(f"cvr index --videos ({result['machine']['cores']} cores, one torch thread)")
    common.save_figure_atomic(fig, path)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> dict:
    return common.write_results(out, "ingest", result, markdown(result), plot)


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv) -> tuple:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=200, help="built-in clips to index (default 200)")
    p.add_argument("--workers", default="0,1,2", help="decode worker counts of the cold runs, comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="cold runs per worker count, and runs per re-run case")
    p.add_argument("--changed", type=int, default=10, help="clips changed before the incremental re-run")
    p.add_argument("--rerun-workers", type=int, default=1, help="decode workers of the re-runs (default 1)")
    p.add_argument("--checkpoint", default=None,
                   help=f"the checkpoint to index with (default: the shipped one, {paths.reference(SHIPPED, '.')})")
    p.add_argument("--out", default=None, help="result folder (default: bench/results/<machine>/)")
    p.add_argument("--tiny", action="store_true",
                   help="a smoke run: 6 clips, a tiny checkpoint trained here, 0 and 2 decode workers, once")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # a child process's measurement (JSON)
    args = p.parse_args(argv)
    s = Settings(videos=args.videos, workers=tuple(int(w) for w in args.workers.split(",")), repeats=args.repeats,
                 changed=args.changed, rerun_workers=args.rerun_workers, checkpoint=args.checkpoint, tiny=args.tiny)
    if args.tiny:
        s = Settings(videos=6, workers=(0, 2), repeats=1, changed=2, rerun_workers=1, checkpoint=args.checkpoint,
                     tiny=True)
    if min(s.workers) < 0 or s.repeats < 1 or s.videos < 3 or s.changed < 1:
        p.error("needs --workers >= 0, --repeats >= 1, --videos >= 3 and --changed >= 1")
    return s, args.out, args.job


def main(argv=None) -> int:
    import torch

    settings, out, job = parse_args(argv)
    torch.set_num_threads(1)
    if job is not None:
        job = json.loads(job)
        print(json.dumps(child_index(job)))
        return 0
    if settings.checkpoint is None and not settings.tiny and not (SHIPPED / "model.safetensors").is_file():
        print(f"bench/ingest.py: no shipped checkpoint at {SHIPPED}: pass --checkpoint DIR", file=sys.stderr)
        return 2
    start = time.perf_counter()
    info = common.machine_info()
    loadavg = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as work:
        result = run(settings, work)
        wall = sum(result["part_seconds"].values())
    result.update(machine=info, machine_slug=common.machine_slug(info), settings=asdict(settings),
                  threads=torch.get_num_threads(), wall_seconds=round(wall, 1),
                  total_seconds=round(time.perf_counter() - start, 1), cpu_seconds=common.cpu_seconds(),
                  load_average={"before": loadavg, "after": os.getloadavg()[0]}, tiny=settings.tiny)
    result["cold"] = common.stamp(result["cold"], info)
    result["reruns"] = common.stamp(result["reruns"], info)
    folder = common.results_dir(out or (tempfile.mkdtemp(prefix="bench-ingest-out-") if settings.tiny else None), info)
    written = write_outputs(result, folder)
    print(Path(written["md"]).read_text())
    print("wrote " + ", ".join(written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
