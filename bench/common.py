"""What every benchmark script shares: the machine it ran on, result folders, tables, atomic writes,
warm-run timing and mean +- std over seeds.

Results go to ``bench/results/<machine>/`` where ``<machine>`` is a slug of the GPU name (or the CPU
model when there is no GPU) and the core count, so runs on different machines never overwrite each
other and ``bench/report.py`` can show each one under its own heading.
"""
from __future__ import annotations

import datetime
import importlib
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

from engine.tables import markdown_table  # noqa: F401 (re-exported: the benchmarks call common.markdown_table)

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
GENERATORS = REPO / "engine" / "weights" / "generator"
TEACHER = GENERATORS / "teacher"
STUDENTS = GENERATORS / "students"
# Libraries whose version changes what is measured; a missing one is recorded as absent.
LIBRARIES = ("torch", "numpy", "transformers", "diffusers", "faiss", "onnxruntime", "triton", "matplotlib")


# ---------------------------------------------------------------------------------------------
# The machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception:  # absent, or broken on this machine: either way not measured with it
            versions[name] = None
    return versions


def git_commit() -> str:
    """HEAD's hash, with '+dirty' when the working tree differs from it (the numbers then come
    from uncommitted code); 'unknown' outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        # Benchmark results themselves do not make the code dirty.
        changed = [line for line in git("status", "--porcelain").stdout.splitlines()
                   if not line[3:].startswith("bench/results")]
        return head.stdout.strip()[:12] + ("+dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu_name(), "platform": platform.platform(),
            "versions": library_versions(), "commit": git_commit(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def stamp(rows: list, info: dict) -> list:
    """Each result row with the machine, library versions and commit it was measured with, so a
    row copied out of its file still says where it comes from."""
    where = {"cpu": info["cpu"], "cores": info["cores"], "gpu": info["gpu"], "versions": info["versions"],
             "commit": info["commit"]}
    return [{**row, "machine": where} for row in rows]


def machine_slug(info: dict) -> str:
    """'intel-xeon-2c', 'nvidia-h200-16c': the GPU (else the CPU) without trademarks and clock."""
    name = info.get("gpu") or info.get("cpu") or "unknown"
    name = re.sub(r"\((r|tm)\)|\b(cpu|processor|with|radeon graphics)\b|@.*$", " ", name, flags=re.IGNORECASE)
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{words or 'unknown'}-{info.get('cores') or 0}c"


def describe_machine(info: dict) -> str:
    """One line for table notes: CPU, cores, GPU, the main library versions, the commit."""
    v = info["versions"]
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "faiss", "onnxruntime") if v.get(k))
    gpu = info["gpu"] or "no GPU"
    return f"{info['cpu']}, {info['cores']} cores, {gpu}; python {v['python']}, {libs}; commit {info['commit']}"


def results_dir(out: str | None, info: dict) -> Path:
    """`out` when given, else bench/results/<machine slug>/; created."""
    folder = Path(out) if out else RESULTS / machine_slug(info)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def apply_tiny(args, **sizes) -> None:
    """A smoke run's settings (--tiny), one definition for every training benchmark: one epoch, one
    in-process job, the first two seeds (a standard deviation needs two), the work folder beside
    --out, and the given collection sizes (attribute -> value) set on `args`."""
    args.epochs, args.jobs = 1, 1
    args.seeds = ",".join(args.seeds.split(",")[:2])
    args.work = os.path.join(args.out or args.work, "work")
    for name, value in sizes.items():
        setattr(args, name, value)


def student_source(steps: int) -> tuple:
    """(folder, label) of the student at `steps` sampling steps: a distilled N-step student when
    one ships, otherwise the shipped 4-step student sampled at fewer steps, labelled so."""
    own = STUDENTS / f"{steps}step"
    if own.is_dir():
        return own, f"{steps}-step student"
    plural = "s" if steps > 1 else ""
    return STUDENTS / "4step", "4-step student" if steps == 4 else f"4-step student sampled at {steps} step{plural}"


# ---------------------------------------------------------------------------------------------
# Writing results


def save_figure_atomic(figure, path) -> None:
    from engine import files

    with files.atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, bbox_inches="tight")


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display on a benchmark machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------
# Numbers


def timed_runs(fn, repeats: int, warmup: int = 1) -> list:
    """Wall seconds of `repeats` calls of fn() after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def percentile(values: list, q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, as numpy's default."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def p50_p95_ms(seconds: list) -> tuple:
    return round(percentile(seconds, 50) * 1000, 3), round(percentile(seconds, 95) * 1000, 3)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children so far: on a machine
    shared with other work, CPU time / cores bounds what the wall time would be on an idle one."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 1)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process so far, its threads included (/proc/PID/stat;
    clock ticks, 10 ms apart on Linux)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mean_std(values: list) -> tuple:
    """(mean, sample standard deviation); the deviation is None for fewer than two values."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def write_results(out: Path, name: str, result: dict, markdown_text: str, plot) -> dict:
    """A benchmark's three outputs under `out`: NAME.json (the result), NAME.md (its tables) and
    NAME.png (`plot(result, path)`), each written atomically; returns their paths."""
    from engine import files

    written = {"md": out / f"{name}.md", "json": out / f"{name}.json", "png": out / f"{name}.png"}
    files.write_json(written["json"], result)
    files.atomic_write(written["md"], markdown_text)
    plot(result, written["png"])
    return {k: str(v) for k, v in written.items()}
