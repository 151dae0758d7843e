"""GPU readiness on a machine without a GPU.

Triton compiles for a CUDA target without a device (the wheel ships ptxas and cuobjdump). Each
shipped 16-bit block configuration of both kernels is compiled in fp16 for sm_80 (A100), sm_89
(RTX 4090) and sm_90 (H100), and each fp32 configuration in fp32 for sm_80 and sm_90 (sm_89
generates the same code as sm_80 here). Every one must spill nothing (cuobjdump -res-usage:
STACK 0) and, where an fp16 kernel has a tl.dot, its PTX must show fp16 tensor-core instructions
(mma.sync / wgmma; fp32 uses exact "ieee" dots, on CUDA cores by design).

Compiling needs the kernels decorated WITHOUT TRITON_INTERPRET (which conftest.py sets), so it
runs in fresh subprocesses, one per architecture, in parallel. A cold run compiles 24 kernels
(about 25 s on two idle cores); Triton's on-disk cache makes reruns take seconds. The same
subprocess checks that a launcher given CPU tensors without the interpreter raises a clear error
instead of falling back to PyTorch.

Also here: bench/kernels.py without CUDA says so and exits 0.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from kernels import global_local_score as gls
from kernels import hybrid_attention as ha
from kernels._utils import is_interpreted

ARCHS = ("sm_80", "sm_89", "sm_90")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FP32_ARCHS = ("sm_80", "sm_90")


def shipped_specs(arch):
    """Both kernels' shipped configurations; top-k at k = 10 and at the largest k (128, most
    registers); the merge kernel (no dot, few registers) at k = 128 only."""
    matrix, topk_10, _ = gls.gpu_compile_specs("fp16", k=10)
    _, topk_128, merge_128 = gls.gpu_compile_specs("fp16", k=128)
    specs = [matrix, topk_10, topk_128, merge_128] + ha.gpu_compile_specs("fp16")
    if arch in FP32_ARCHS:
        specs += gls.gpu_compile_specs("fp32", k=10)[:2] + ha.gpu_compile_specs("fp32")
    return specs


CASES = [(arch, spec.name) for arch in ARCHS for spec in shipped_specs(arch)]

SCRIPT = r"""
import dataclasses, json, sys
import torch
from kernels import _utils
from kernels import global_local_score as gls, hybrid_attention as ha
sys.path.insert(0, sys.argv[2])
from test_kernel_gpu_compile import shipped_specs

out = {"interpreted": _utils.is_interpreted(gls._score_matrix_kernel)}
if sys.argv[3] == "1":  # launchers refuse CPU tensors when the kernels are compiled for GPUs
    errors = {}
    x = torch.rand(2, 2, 16)
    calls = {"global_local_score": lambda: gls.global_local_score(x, x, x, x, torch.rand(4, 2)),
             "hybrid_attention": lambda: ha.hybrid_attention(
                 x, None, x, torch.rand(2, 16), torch.rand(2, 16), 0.5)}
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    out["cpu_errors"] = errors
reports = []
for spec in shipped_specs(sys.argv[1]):
    r = dataclasses.asdict(_utils.compile_for_gpu(spec, sys.argv[1]))
    reports.append({**r, "tensor_cores": spec.tensor_cores})
out["reports"] = reports
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    """{arch: subprocess result}, compiled in parallel (one process per architecture)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    procs = {arch: subprocess.Popen(
        [sys.executable, "-c", SCRIPT, arch, os.path.join(ROOT, "tests"),
         "1" if i == 0 else "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i, arch in enumerate(ARCHS)}
    results = {}
    for arch, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT")]
        assert proc.returncode == 0 and lines, f"{arch} compile failed:\n{stderr[-4000:]}"
        results[arch] = json.loads(lines[-1][len("RESULT"):])
    print_table(results)
    return results


def print_table(results):
    print(f"\n{'arch':<6} {'kernel':<36} {'regs':>4} {'stack':>5} {'shared':>7} {'s':>5}  mma")
    for arch, res in results.items():
        for r in res["reports"]:
            print(f"{arch:<6} {r['kernel']:<36} {r['registers']:>4} {r['stack']:>5} "
                  f"{r['shared']:>7} {r['seconds']:>5.1f}  {', '.join(r['mma']) or '-'}")


def report(compiled, arch, name):
    res = compiled[arch]
    assert not res["interpreted"], "the subprocess still ran the interpreter"
    (r,) = [r for r in res["reports"] if r["kernel"] == name]
    return r


@pytest.mark.parametrize(("arch", "name"), CASES, ids=[f"{a}-{n}" for a, n in CASES])
def test_compiles_with_tensor_cores_and_no_spills(compiled, arch, name):
    r = report(compiled, arch, name)
    assert r["stack"] == 0 and r["local"] == 0, f"{arch} {name} spills: {r}"
    assert r["registers"] <= 255
    if r["tensor_cores"] and "fp32" not in name:
        want = "wgmma" if arch == "sm_90" and name.startswith("score") else "mma"
        assert any(want in m for m in r["mma"]), f"{arch} {name}: no {want} in PTX: {r['mma']}"
        assert all(".f16.f16" in m for m in r["mma"]), f"{arch} {name}: not fp16 MMA: {r['mma']}"


def test_cpu_tensors_without_interpreter_raise(compiled):
    errors = compiled[ARCHS[0]]["cpu_errors"]
    for name, message in errors.items():
        assert message is not None, f"{name} ran on CPU tensors without the interpreter"
        assert "CUDA" in message and "TRITON_INTERPRET=1" in message, message


def test_bench_without_cuda_says_so_and_exits_0(capsys):
    from bench.kernels import main
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["--tiny"]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert main(["--cases", "nonsense"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or is_interpreted(gls._score_matrix_kernel),
                    reason="needs CUDA and the compiled kernels (CVR_TRITON_GPU=1)")
def test_bench_tiny_on_gpu(tmp_path):
    from bench.kernels import main
    path = tmp_path / "k.csv"
    assert main(["--tiny", "--csv", str(path), "--repeats", "2", "--slow-repeats", "1"]) == 0
    text = path.read_text()
    assert text.count("\n") == 1 + 2 * 3 * 3   # header + 2 dtypes x 3 cases x 3 impls
