"""Per-module latency of the exported graphs: PyTorch eager vs ONNX Runtime (vs TensorRT where present).

For every module of a checkpoint's export (text encoder, generator step, vision, query tower,
video tower, scorer), at batch 1, 32 and 256, with one thread and with all threads: the engine's
own PyTorch code (eager, `torch.set_num_threads`) against the exported graph in ONNX Runtime
(`intra_op_num_threads`, spinning off), and the TensorRT engine when `cvr export --format tensorrt`
built one and a GPU is here. Inputs are the export's random samples at the profile's opt sizes
for the other axes (tokens, frames; the scorer scores `videos`-opt videos per query batch).
Prints a Markdown table and writes it with a JSON copy.

    python -m bench.export --checkpoint runs/demo/full              # exports (or reuses) CKPT/onnx
    python -m bench.export --checkpoint CKPT --tiny --out /tmp/e    # batch 1 and 2, 1 thread, 1 run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch


def _time(fn, repeats: int, warmup: int) -> float:
    """Median wall time of `fn()` in ms over `repeats` runs after `warmup` unmeasured ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        clock = time.perf_counter()
        fn()
        times.append(1000.0 * (time.perf_counter() - clock))
    return statistics.median(times)


def _sizes(batch: int, shapes: dict) -> dict:
    return {"batch": batch, "tokens": shapes["tokens"][1], "frames": shapes["frames"][1],
            "videos": shapes["videos"][1]}


def _trt_runners(export_dir: str) -> tuple:
    """({module: TensorRTRunner}, note) for the engines built in `export_dir`, if any can run."""
    from engine.backends.tensorrt import ENGINES_FILE, TensorRTRunner, engines_folder, tensorrt_unavailable

    reason = tensorrt_unavailable()
    if reason:
        return {}, reason
    for precision in ("fp16", "fp32"):
        folder = engines_folder(export_dir, precision)
        if os.path.isfile(os.path.join(folder, ENGINES_FILE)):
            meta = json.load(open(os.path.join(folder, ENGINES_FILE), encoding="utf-8"))
            runners = {name: TensorRTRunner(os.path.join(folder, e["file"])) for name, e in meta["modules"].items()}
            return runners, f"TensorRT {meta['tensorrt']} {precision} on {meta['device']}"
    return {}, "no TensorRT engines in the export (cvr export --format tensorrt)"


def measure(spec, path: str, trt_runner, batch: int, threads: int, shapes: dict, repeats: int, warmup: int) -> dict:
    """One row: eager, ONNX Runtime and TensorRT medians for one module, batch and thread count."""
    import onnxruntime as ort

    from engine.backends.onnxruntime import session_options

    feeds = spec.sample(_sizes(batch, shapes), torch.Generator().manual_seed(batch))
    arrays = {k: v.numpy() for k, v in feeds.items()}
    torch.set_num_threads(threads)
    with torch.no_grad():
        eager = _time(lambda: spec.reference(**feeds), repeats, warmup)
    session = ort.InferenceSession(path, sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    onnx_ms = _time(lambda: session.run(names, arrays), repeats, warmup)
    trt_ms = _time(lambda: trt_runner.run(arrays), repeats, warmup) if trt_runner is not None else None
    return {"module": spec.name, "batch": batch, "threads": threads, "eager_ms": eager, "onnxruntime_ms": onnx_ms,
            "tensorrt_ms": trt_ms}


def table(rows: list) -> str:
    lines = ["| module | batch | threads | PyTorch eager ms | ONNX Runtime ms | TensorRT ms | ORT speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        trt = f"{r['tensorrt_ms']:.2f}" if r["tensorrt_ms"] is not None else "-"
        lines.append(f"| {r['module']} | {r['batch']} | {r['threads']} | {r['eager_ms']:.2f} | "
                     f"{r['onnxruntime_ms']:.2f} | {trt} | {r['eager_ms'] / r['onnxruntime_ms']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--export", default=None, help="export folder (default: CHECKPOINT/onnx, made or reused)")
    p.add_argument("--generator", default=None, help="generator folder (default: the checkpoint's)")
    p.add_argument("--batches", default="1,32,256")
    p.add_argument("--threads", default="1,all", help="thread counts; 'all' is every core")
    p.add_argument("--modules", default=None, help="comma-separated subset (default: every exported module)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="bench/results/export", help="writes OUT.md and OUT.json")
    p.add_argument("--tiny", action="store_true", help="batch 1 and 2, one thread, one run: a smoke test")
    args = p.parse_args(argv)
    from export.onnx import ExportOptions, export_onnx, load_parts, plan_export

    torch.set_num_threads(1)
    if args.tiny:
        args.batches, args.threads, args.repeats, args.warmup = "1,2", "1", 1, 0
    batches = [int(b) for b in args.batches.split(",")]
    threads = [(os.cpu_count() or 1) if t == "all" else int(t) for t in args.threads.split(",")]
    folder = args.export or os.path.join(args.checkpoint, "onnx")
    options = ExportOptions(generator=args.generator)
    manifest = export_onnx(args.checkpoint, folder, options).manifest
    wanted = set(args.modules.split(",")) if args.modules else set(manifest["modules"])
    specs = [s for s in load_parts(plan_export(args.checkpoint, options)).specs if s.name in wanted]
    runners, trt_note = _trt_runners(folder)
    rows = []
    for spec in specs:
        path = os.path.join(folder, manifest["modules"][spec.name]["files"]["fp32"]["file"])
        for batch in batches:
            for count in dict.fromkeys(threads):
                rows.append(measure(spec, path, runners.get(spec.name), batch, count, manifest["shapes"],
                                    args.repeats, args.warmup))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    torch.set_num_threads(1)
    header = (f"Exported modules of {args.checkpoint}: median of {args.repeats} runs in ms, on "
              f"{platform.processor() or platform.machine()} with {os.cpu_count()} cores; TensorRT: {trt_note}. "
              f"Other axes at the profile's opt sizes: "
              f"{ {k: v for k, v in _sizes(0, manifest['shapes']).items() if k != 'batch'} }.")
    text = header + "\n\n" + table(rows) + "\n"
    print("\n" + text)
    from engine import files

    files.atomic_write(args.out + ".md", text)
    files.write_json(args.out + ".json", {"checkpoint": os.path.abspath(args.checkpoint),
                                          "export": os.path.abspath(folder), "tensorrt": trt_note,
                                          "versions": manifest["versions"], "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
