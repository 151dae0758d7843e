"""Triton kernels vs PyTorch eager (chunked) vs torch.compile of the reference, on a CUDA GPU.

Cases (fp16 and bf16 inputs):
  score-xu     global_local_score, full Q x N matrix at the MSR-VTT Xu test size
               (59,800 queries x 2,990 videos; D = 1024, K = 512);
  score-topk   global_local_score with k = 10 at 1,000 queries x 1,000,000 videos;
  attention    hybrid_attention for 59,800 queries (L = 32 tokens, R = 49 regions, d = 512).
``--tiny`` shrinks every case (a smoke run, seconds). Prints a table and writes one CSV row per
(case, dtype, implementation) with the GPU name and library versions. Without CUDA it says so
and exits 0.

Roofline. Work is counted as tensor-core FLOPs (the latent dots, the attention dots), CUDA-core
operations (the Jaccard passes: a min and an add per concept, per branch) and bytes (every input
read once, every output written once); the TFLOP/s column counts dot FLOPs plus Jaccard
operations. The bound is max(dot FLOPs / tensor peak, Jaccard ops /
CUDA-core peak, bytes / bandwidth) with the dense peaks in PEAKS below; "roofline" is
bound / measured time. The CUDA-core peak is one fp32 operation per lane per clock: half the
vendor's FMA-counted fp32 TFLOPS.

    python -m bench.kernels                 # all cases, writes bench/results/kernels_<gpu>.csv
    python -m bench.kernels --tiny --csv /tmp/k.csv --cases score-topk --dtypes fp16
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import statistics
import sys
from dataclasses import dataclass

import torch

# Dense peaks by GPU name: fp16/bf16 tensor-core TFLOPS with fp32 accumulation, fp32 (non-tensor,
# FMA = 2 FLOPs) TFLOPS, memory TB/s. Sources: NVIDIA data sheets (H100/H200/A100), the Ada
# whitepaper (RTX 4090: 165.2 with fp32 accumulation, 330.3 with fp16 accumulation).
PEAKS = [  # (name pattern, label, tensor TFLOPS, fp32 TFLOPS, TB/s)
    (r"H200", "H200 SXM", 989.4, 66.9, 4.8),
    (r"H100.*(NVL)", "H100 NVL", 835.0, 60.0, 3.9),
    (r"H100.*(PCIe|PCIE)", "H100 PCIe", 756.0, 51.2, 2.0),
    (r"H100", "H100 SXM", 989.4, 66.9, 3.35),
    (r"A100.*80GB", "A100 80GB", 312.0, 19.5, 2.039),
    (r"A100", "A100 40GB", 312.0, 19.5, 1.555),
    (r"RTX 4090", "RTX 4090", 165.2, 82.6, 1.008),
    (r"L40S", "L40S", 362.1, 91.6, 0.864),
]


@dataclass
class Peaks:
    label: str
    tensor_tflops: float
    fp32_tflops: float
    tbps: float


def device_peaks(name: str) -> Peaks | None:
    for pattern, label, tensor, fp32, tbps in PEAKS:
        if re.search(pattern, name):
            return Peaks(label, tensor, fp32, tbps)
    return None


@dataclass
class Case:
    name: str
    sizes: dict
    dot_flops: float = 0.0
    cuda_ops: float = 0.0
    bytes: float = 0.0


def score_case(name, Q, N, D, K, k, elem):
    out_bytes = Q * N * 4 if k is None else Q * k * 12
    return Case(name, {"Q": Q, "N": N, "D": D, "K": K, "k": k},
                dot_flops=2.0 * Q * N * 2 * D, cuda_ops=2.0 * 2 * Q * N * K,
                bytes=(Q + N) * (2 * D + 2 * K) * elem + out_bytes)


def attention_case(name, B, L, R, d, elem):
    return Case(name, {"B": B, "L": L, "R": R, "d": d},
                dot_flops=4.0 * B * L * R * d + 4.0 * B * R * d,
                bytes=B * ((L + R + 2) * d + (L + 4) * d) * elem + B * (L + 4))


CASE_NAMES = ("score-xu", "score-topk", "attention")


def cases(tiny: bool, elem: int):
    if tiny:
        return {"score-xu": score_case("score-xu", 512, 300, 1024, 512, None, elem),
                "score-topk": score_case("score-topk", 64, 20_000, 1024, 512, 10, elem),
                "attention": attention_case("attention", 256, 32, 49, 512, elem)}
    return {"score-xu": score_case("score-xu", 59_800, 2_990, 1024, 512, None, elem),
            "score-topk": score_case("score-topk", 1_000, 1_000_000, 1024, 512, 10, elem),
            "attention": attention_case("attention", 59_800, 32, 49, 512, elem)}


# ----------------------------------------------------------------------------- inputs and impls

def score_inputs(sz, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def unit(n):  # generated in chunks: a 1M x 2 x 1024 fp32 temporary would be 8 GB
        out = torch.empty((n, 2, sz["D"]), dtype=dtype, device="cuda")
        for i in range(0, n, 65536):
            x = torch.randn((min(n - i, 65536), 2, sz["D"]), generator=g, device="cuda")
            out[i:i + 65536] = torch.nn.functional.normalize(x, dim=-1).to(dtype)
        return out

    def concepts(n):
        return torch.rand((n, 2, sz["K"]), generator=g, device="cuda").to(dtype)

    norm = torch.tensor([[-0.3, 0.5], [-0.25, 0.45], [0.15, 0.55], [0.1, 0.6]], device="cuda")
    return unit(sz["Q"]), concepts(sz["Q"]), unit(sz["N"]), concepts(sz["N"]), norm


def attention_inputs(sz, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, L, R, d = sz["B"], sz["L"], sz["R"], sz["d"]
    rnd = lambda *s: torch.randn(s, generator=g, device="cuda").to(dtype)
    lengths = torch.randint(4, L + 1, (B,), generator=g, device="cuda")
    token_mask = torch.arange(L, device="cuda")[None, :] < lengths[:, None]
    beta = torch.rand((B, d), generator=g, device="cuda").to(dtype)
    gamma = torch.rand((B,), generator=g, device="cuda")
    return rnd(B, L, d), token_mask, rnd(B, R, d), rnd(B, d), beta, gamma


def implementations(case: Case, use_compile: bool, chunk_elems: int):
    """name -> zero-argument callable factory taking the inputs."""
    from kernels import reference
    from kernels.global_local_score import global_local_score, global_local_score_ref
    from kernels.hybrid_attention import hybrid_attention, hybrid_attention_ref

    impls = {}
    if case.name.startswith("score"):
        k = case.sizes["k"]
        impls["triton"] = lambda x: global_local_score(*x, k=k)
        impls["eager"] = lambda x: global_local_score_ref(*x, k=k, chunk_elems=chunk_elems)
        if use_compile:
            fused = torch.compile(reference.fused_score, dynamic=False)
            block = lambda q_lat, q_con, v_lat, v_con, norm, w_lat, w_con: fused(  # noqa: E731
                q_lat, q_con, v_lat, v_con, norm, (w_lat, w_con))
            impls["compile"] = lambda x: global_local_score_ref(
                *x, k=k, chunk_elems=chunk_elems, score_block=block)
    else:
        impls["triton"] = lambda x: hybrid_attention(*x)
        impls["eager"] = lambda x: hybrid_attention_ref(*x, chunk=8192)
        if use_compile:
            block = torch.compile(reference.hybrid_attention, dynamic=False)
            impls["compile"] = lambda x: hybrid_attention_ref(*x, chunk=8192,
                                                              attention_block=block)
    return impls


def time_ms(fn, repeats: int, warmup: int = 1):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times)


def max_error(out, ref):
    if isinstance(out, tuple) and len(out) == 2 and out[1].dtype == torch.int64:  # top-k
        return (out[0].float() - ref[0].float()).abs().max().item()
    if isinstance(out, tuple):
        return max((a.float() - b.float()).abs().max().item() for a, b in zip(out, ref, strict=True))
    return (out.float() - ref.float()).abs().max().item()


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--cases", default="score-xu,score-topk,attention")
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--repeats", type=int, default=10, help="timed runs of the Triton kernel")
    p.add_argument("--slow-repeats", type=int, default=3, help="timed runs of eager/compile")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--chunk-elems", type=int, default=1 << 27,
                   help="largest (q, n, K) intermediate of the chunked reference")
    p.add_argument("--csv", default=None, help="default: bench/results/kernels_<gpu>.csv")
    return p.parse_args(argv)


def versions():
    import triton
    return {"torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda or "", "python": platform.python_version()}


def main(argv=None) -> int:
    args = parse_args(argv)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    unknown = [c for c in args.cases.split(",") if c not in CASE_NAMES]
    unknown += [d for d in args.dtypes.split(",") if d not in dtypes]
    if unknown:
        print(f"bench/kernels.py: unknown case or dtype {unknown}; cases: {CASE_NAMES}, "
              f"dtypes: {sorted(dtypes)}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA GPU on this machine (torch.cuda.is_available() is "
              "False): nothing measured.")
        return 0
    from kernels._utils import is_interpreted
    from kernels.global_local_score import _score_matrix_kernel
    if is_interpreted(_score_matrix_kernel):
        print("bench/kernels.py: TRITON_INTERPRET=1 is set; unset it to time the GPU kernels.",
              file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    peaks = device_peaks(gpu)
    print(f"GPU: {gpu}; " + (f"peaks used ({peaks.label}): {peaks.tensor_tflops} TFLOPS fp16/bf16 "
                             f"tensor (fp32 accumulate), {peaks.fp32_tflops / 2:.1f} T fp32 "
                             f"ops/s on CUDA cores, {peaks.tbps} TB/s"
                             if peaks else "no peak figures known: roofline column empty"))
    print(" ".join(f"{k} {v}" for k, v in versions().items()))
    rows = []
    header = (f"{'case':<11} {'dtype':<5} {'impl':<8} {'median ms':>10} {'min ms':>9} "
              f"{'TFLOP/s':>8} {'GB/s':>8} {'roofline':>9} {'vs eager':>9} {'vs compile':>10} "
              f"{'max err':>9}")
    print(header)
    for dname in args.dtypes.split(","):
        dtype = dtypes[dname]
        elem = torch.finfo(dtype).bits // 8
        for cname in args.cases.split(","):
            case = cases(args.tiny, elem)[cname]
            rows += run_case(case, dname, dtype, args, peaks)
            torch.cuda.empty_cache()
    path = args.csv or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"kernels_{re.sub(r'[^A-Za-z0-9]+', '_', gpu).strip('_')}"
                                    f"{'_tiny' if args.tiny else ''}.csv")
    write_csv(path, rows, gpu, peaks)
    print(f"wrote {path}")
    return 0


def run_case(case, dname, dtype, args, peaks):
    make = score_inputs if case.name.startswith("score") else attention_inputs
    inputs = make(case.sizes, dtype)
    impls = implementations(case, not args.no_compile, args.chunk_elems)
    reference = impls["eager"](inputs)
    rows, ms = [], {}
    for name in ("eager", "compile", "triton"):
        if name not in impls:
            continue
        fn = impls[name]
        out = reference if name == "eager" else fn(inputs)  # warm-up (compiles), and checked
        err = max_error(out, reference)
        del out
        repeats = args.repeats if name == "triton" else args.slow_repeats
        med, best = time_ms(lambda fn=fn: fn(inputs), repeats, warmup=0)
        ms[name] = med
        seconds = med / 1e3
        tflops = (case.dot_flops + case.cuda_ops) / seconds / 1e12
        gbps = case.bytes / seconds / 1e9
        bound = None
        if peaks:
            bound = max(case.dot_flops / (peaks.tensor_tflops * 1e12),
                        case.cuda_ops / (peaks.fp32_tflops / 2 * 1e12),
                        case.bytes / (peaks.tbps * 1e12))
        row = {"case": case.name, "dtype": dname, "impl": name, **case.sizes,
               "median_ms": _sig(med), "min_ms": _sig(best), "tflops": _sig(tflops),
               "gbps": _sig(gbps), "roofline_ms": _sig(bound * 1e3) if bound else "",
               "fraction_of_roofline": _sig(bound / seconds) if bound else "",
               "speedup_vs_eager": round(ms["eager"] / med, 2),
               "speedup_vs_compile": round(ms["compile"] / med, 2) if "compile" in ms else "",
               "max_abs_err_vs_eager": err}
        rows.append(row)
        print(f"{case.name:<11} {dname:<5} {name:<8} {med:>10.3f} {best:>9.3f} {tflops:>8.2f} "
              f"{gbps:>8.1f} {(f'{bound / seconds:.1%}' if bound else '-'):>9} "
              f"{ms['eager'] / med:>8.1f}x {row['speedup_vs_compile']!s:>9} {err:>9.2e}",
              flush=True)
    return rows


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def write_csv(path, rows, gpu, peaks=None):
    from engine import files

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    extra = {"gpu": gpu, "peak_tensor_tflops": peaks.tensor_tflops if peaks else "",
             "peak_fp32_tflops": peaks.fp32_tflops if peaks else "",
             "peak_tbps": peaks.tbps if peaks else "", **versions(), "date_utc": stamp}
    fields = list(dict.fromkeys(k for r in rows for k in r)) + list(extra)
    with files.atomic_path(path) as temporary, open(temporary, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **extra})


if __name__ == "__main__":
    sys.exit(main())
