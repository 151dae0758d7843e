"""Shared helpers for the Triton kernels: launch checks and the ahead-of-time GPU compile gate.

Launch checks. A kernel runs on CUDA tensors, or on CPU tensors when Triton's interpreter is on
(``TRITON_INTERPRET=1`` set before the kernel modules were imported: Triton reads it when
``@triton.jit`` decorates the function, so we look at the decorated object, not at the variable).
There is no PyTorch fallback: anything else is a ``ValueError`` that says what to do.

Compile gate. ``compile_for_gpu`` cross-compiles a kernel for a CUDA architecture on a machine
without a GPU (the triton wheel ships ``ptxas`` and ``cuobjdump``) and reports the tensor-core
instructions in its PTX and the registers and stack (spills) of its cubin. It needs the kernels
imported WITHOUT the interpreter, so the test runs it in a subprocess.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here, so tests can poison outputs (monkeypatch this)
    and an element the kernel never writes shows up."""
    return torch.empty(shape, dtype=dtype, device=device)


def device_guard(device: torch.device):
    """Launch on the tensors' GPU, not on whichever one is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated while TRITON_INTERPRET=1 (it then runs on the CPU)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(kernel, tensors: dict, what: str) -> torch.device:
    """All tensors on one device, and one that ``kernel`` can run on; returns that device."""
    devices = {name: t.device for name, t in tensors.items()}
    first_name, device = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != device:
            raise ValueError(f"{what}: {name} is on {dev} but {first_name} is on {device}; "
                             "all inputs must be on one device")
    if device.type == "cuda":
        if is_interpreted(kernel):
            # Works (the interpreter copies to the host and back) but is far too slow to be wanted.
            raise ValueError(f"{what}: CUDA tensors given while TRITON_INTERPRET=1 is set; unset it "
                             "to run the compiled kernel on the GPU")
        return device
    if device.type == "cpu" and is_interpreted(kernel):
        return device
    raise ValueError(f"{what}: the Triton kernel needs CUDA tensors (got {device.type}); to run it "
                     "on the CPU set TRITON_INTERPRET=1 before importing the kernels module "
                     "(tests/conftest.py does); use the *_ref function for a plain PyTorch path")


def check_float(kernel, t: torch.Tensor, name: str, what: str) -> None:
    """fp32/fp16/bf16; bf16 is refused under the interpreter, which computes bf16 arithmetic
    (dots, sums, max) on the raw bit patterns: silently wrong (ARCHITECTURE.md section 14)."""
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dtype == torch.bfloat16 and is_interpreted(kernel):
        raise ValueError(f"{what}: {name} is bfloat16, which Triton's interpreter computes wrongly "
                         "(it does arithmetic on the raw bits); use float16/float32 on the CPU")


def check_shape(t: torch.Tensor, shape: tuple, name: str, what: str) -> None:
    """``shape`` holds ints or None (any size); the rank must match."""
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape, strict=True))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{what}: {name} must have shape {want}, got {tuple(t.shape)}")


def input_kind(dtype: torch.dtype) -> str:
    """Key of the shipped GPU configurations: fp32 tiles need other sizes than 16-bit ones."""
    return "fp32" if dtype == torch.float32 else "16-bit"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact fp32 products ("ieee"): Triton's GPU default (TF32) would cost ~1e-3."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ------------------------------------------------------------------------ ahead-of-time compile

ARCHS = {"sm_80": 80, "sm_89": 89, "sm_90": 90}

# Tensor-core instructions in PTX: mma.sync (Ampere/Ada) and wgmma (Hopper).
_MMA_RE = re.compile(r"\b(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)")
_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass
class CompileReport:
    kernel: str
    arch: str
    registers: int
    stack: int          # bytes of per-thread stack: > 0 means registers spilled
    local: int
    shared: int         # bytes of shared memory, from Triton's metadata
    mma: list           # distinct tensor-core instructions in the PTX
    seconds: float


def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack, shared and local bytes of the (single) kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = _RES_RE.search(out)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{out}")
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "shared": shared, "local": local}


@dataclass
class CompileSpec:
    """One kernel configuration to cross-compile: argument types as in Triton's signatures
    ("*fp16", "i32", "fp32"), constexpr values, the arguments that a real launch sees divisible by
    16 (Triton specialises on it: aligned, vectorised loads), and the launch options."""
    name: str
    fn: object
    signature: dict
    constexprs: dict
    divisible: tuple
    num_warps: int
    num_stages: int
    tensor_cores: bool = True   # the kernel has a tl.dot, so its PTX must show mma / wgmma


def compile_for_gpu(spec: CompileSpec, arch: str) -> CompileReport:
    """Cross-compile ``spec.fn`` (a JITFunction, not interpreted) for ``arch`` without a GPU."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec.fn
    if is_interpreted(fn):
        raise RuntimeError("compile_for_gpu needs the kernels imported without TRITON_INTERPRET")
    start = time.perf_counter()
    types = {**spec.signature, **{k: "constexpr" for k in spec.constexprs}}
    missing = set(fn.arg_names) ^ set(types)
    if missing:
        raise ValueError(f"{spec.name}: signature and kernel arguments differ: {sorted(missing)}")
    sig = {name: types[name] for name in fn.arg_names}  # in the kernel's argument order
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible}
    src = ASTSource(fn, sig, constexprs=spec.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch], 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                       "enable_fp_fusion": True})
    seconds = time.perf_counter() - start
    res = resource_usage(compiled.asm["cubin"])
    mma = sorted(set(_MMA_RE.findall(compiled.asm["ptx"])))
    return CompileReport(kernel=spec.name, arch=arch, registers=res["registers"],
                         stack=res["stack"], local=res["local"],
                         shared=int(compiled.metadata.shared), mma=mma, seconds=seconds)
