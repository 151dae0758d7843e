"""Fused text-guided hybrid attention (ARCHITECTURE.md, section 4), inference only.

For each query b, with projected token states T' (L, d) and their mask, projected anchor regions
R' (R, d) (all valid unless a region mask is given), projected sentence t' (d), channel gate
beta (d) and mix gamma (a scalar, or one per query):

    alpha = softmax_r(<R'_r, t'> / sqrt(d))            over valid regions
    a_s   = sum_r alpha_r R'_r                          spatial
    m     = mean_r R'_r                                 over valid regions
    a_c   = beta * m                                    channel
    a     = gamma * a_s + (1 - gamma) * a_c             hybrid
    A_l   = softmax_r(<T'_l, R'_r> / sqrt(d)) R'        token level, for each valid token l

Rows of masked tokens in A are 0 (so a query with every token masked gets an all-zero A); a query
with no valid region gets a_s = m = a_c = a = 0 and A = 0.

beta = sigmoid(W_c [t'; m]) needs m BEFORE the call: the caller computes it with ``region_mean``
(kernels.reference.masked_mean, in the regions' dtype: upcast 16-bit regions first for an fp32 m),
and the kernel recomputes m in fp32 for a_c and returns it. The
learned projections and the relevance gate sigmoid(w . [t'; a]) stay ordinary PyTorch around it.

One program per query: it computes the spatial and channel vectors, then walks the tokens in
BLOCK_L tiles; per tile the logits T'R'^T are ``tl.dot``s accumulated over d in BLOCK_D chunks,
the masked softmax runs in registers, and a second pass over d chunks multiplies by R' and stores
A. All regions sit in one BLOCK_R tile, so the L x R attention matrix never reaches memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import _utils
from kernels._utils import (
    check_device,
    check_float,
    check_shape,
    device_guard,
    dot_precision,
    input_kind,
    next_pow2,
)

# region_mean is public here too: callers compute beta = sigmoid(W_c [t'; m]) with it first.
from kernels.reference import HybridAttention
from kernels.reference import hybrid_attention as _hybrid_block
from kernels.reference import masked_mean as region_mean  # noqa: F401

MAX_REGIONS = 256     # all regions of a query live in one register tile


@dataclass(frozen=True)
class AttentionConfig:
    block_l: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2


# Shipped GPU configurations by (largest BLOCK_R served, input kind); the compile gate checks each
# at that BLOCK_R for sm_80/89/90. Past 64 regions, 4 warps spill on sm_90; fp32 ("ieee" dots,
# no tensor cores) needs short d chunks.
GPU_CONFIGS = {
    (64, "16-bit"): AttentionConfig(block_l=32, block_d=64, num_warps=4),
    (MAX_REGIONS, "16-bit"): AttentionConfig(block_l=32, block_d=64, num_warps=8),
    (64, "fp32"): AttentionConfig(block_l=32, block_d=16, num_warps=8),
    (MAX_REGIONS, "fp32"): AttentionConfig(block_l=32, block_d=16, num_warps=8),
}


def _block_r(R: int) -> int:
    return max(16, next_pow2(R))  # >= 16: the K of the P @ R' tensor-core dot


# ----------------------------------------------------------------------------- Triton kernel

@triton.jit
def _masked_softmax(logits, valid):
    """Row softmax over ``valid`` entries; a row without any is all 0."""
    # A finite floor, not -inf: a row with nothing valid must not compute inf - inf.
    logits = tl.where(valid, logits, -1.0e30)
    row_max = tl.max(logits, axis=1)
    p = tl.where(valid, tl.exp(logits - row_max[:, None]), 0.0)
    total = tl.sum(p, axis=1)
    return p / tl.where(total > 0.0, total, 1.0)[:, None]


@triton.jit
def _spatial_channel(reg_ptr, sent_ptr, beta_ptr, gamma, vec_ptr, offs_r, valid_r, R, D,
                     s_reg_r, s_vec_kind, scale,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """a, a_s, a_c, m of one query (rows of vec_ptr, s_vec_kind apart), fp32 math."""
    # Pass 1: spatial logits <R'_r, t'> over d chunks (a matrix-vector product: CUDA cores).
    logits = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        reg = tl.load(reg_ptr + offs_r[:, None] * s_reg_r + offs_d[None, :],
                      mask=(offs_r[:, None] < R) & (offs_d[None, :] < D), other=0.0)
        sent = tl.load(sent_ptr + offs_d, mask=offs_d < D, other=0.0)
        logits += tl.sum(reg.to(tl.float32) * sent.to(tl.float32)[None, :], axis=1)
    alpha = tl.reshape(_masked_softmax((logits * scale)[None, :], valid_r[None, :]), (BLOCK_R,))
    n_valid = tl.sum(valid_r.to(tl.float32), axis=0)
    mean_w = tl.where(valid_r, 1.0 / tl.maximum(n_valid, 1.0), 0.0)
    # Pass 2: the weighted sums and the outputs, one d chunk at a time.
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        reg = tl.load(reg_ptr + offs_r[:, None] * s_reg_r + offs_d[None, :],
                      mask=(offs_r[:, None] < R) & in_d[None, :], other=0.0).to(tl.float32)
        a_s = tl.sum(alpha[:, None] * reg, axis=0)
        m = tl.sum(mean_w[:, None] * reg, axis=0)
        a_c = tl.load(beta_ptr + offs_d, mask=in_d, other=0.0).to(tl.float32) * m
        a = gamma * a_s + (1.0 - gamma) * a_c
        out_ty = vec_ptr.dtype.element_ty
        tl.store(vec_ptr + offs_d, a.to(out_ty), mask=in_d)
        tl.store(vec_ptr + s_vec_kind + offs_d, a_s.to(out_ty), mask=in_d)
        tl.store(vec_ptr + 2 * s_vec_kind + offs_d, a_c.to(out_ty), mask=in_d)
        tl.store(vec_ptr + 3 * s_vec_kind + offs_d, m.to(out_ty), mask=in_d)


@triton.jit
def _token_tile(tok_ptr, tmask_ptr, reg_ptr, att_ptr, l0, offs_r, valid_r, L, R, D,
                s_tok_l, s_reg_r, s_att_l, scale,
                BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    """A rows l0 .. l0 + BLOCK_L of one query: softmax(T'R'^T * scale) R', masked."""
    offs_l = l0 + tl.arange(0, BLOCK_L)
    valid_l = (offs_l < L) & (tl.load(tmask_ptr + offs_l, mask=offs_l < L, other=0) != 0)
    logits = tl.zeros((BLOCK_L, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        tok = tl.load(tok_ptr + offs_l[:, None] * s_tok_l + offs_d[None, :],
                      mask=(offs_l[:, None] < L) & (offs_d[None, :] < D), other=0.0)
        reg_t = tl.load(reg_ptr + offs_r[None, :] * s_reg_r + offs_d[:, None],
                        mask=(offs_r[None, :] < R) & (offs_d[:, None] < D), other=0.0)
        logits = tl.dot(tok, reg_t, logits, input_precision=PRECISION)
    # Masked tokens get an all-zero probability row, hence an all-zero A row.
    p = _masked_softmax(logits * scale, valid_l[:, None] & valid_r[None, :])
    p = p.to(reg_ptr.dtype.element_ty)  # tensor-core operand, as in FlashAttention
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        reg = tl.load(reg_ptr + offs_r[:, None] * s_reg_r + offs_d[None, :],
                      mask=(offs_r[:, None] < R) & (offs_d[None, :] < D), other=0.0)
        att = tl.dot(p, reg, input_precision=PRECISION)
        tl.store(att_ptr + offs_l[:, None] * s_att_l + offs_d[None, :],
                 att.to(att_ptr.dtype.element_ty),
                 mask=(offs_l[:, None] < L) & (offs_d[None, :] < D))


@triton.jit
def _hybrid_attention_kernel(tok_ptr, tmask_ptr, reg_ptr, rmask_ptr, sent_ptr, beta_ptr,
                             gamma_ptr, vec_ptr, att_ptr, L, R, D,
                             s_tok_b, s_tok_l, s_reg_b, s_reg_r, s_vec_kind, s_att_b, s_att_l,
                             scale, HAS_REGION_MASK: tl.constexpr, BLOCK_L: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                             PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    reg_ptr += b * s_reg_b
    offs_r = tl.arange(0, BLOCK_R)
    valid_r = offs_r < R
    if HAS_REGION_MASK:
        valid_r = valid_r & (tl.load(rmask_ptr + b * R + offs_r, mask=valid_r, other=0) != 0)
    gamma = tl.load(gamma_ptr + b)
    _spatial_channel(reg_ptr, sent_ptr + b * D, beta_ptr + b * D, gamma, vec_ptr + b * D,
                     offs_r, valid_r, R, D, s_reg_r, s_vec_kind, scale, BLOCK_R, BLOCK_D)
    for l0 in range(0, L, BLOCK_L):
        _token_tile(tok_ptr + b * s_tok_b, tmask_ptr + b * L, reg_ptr, att_ptr + b * s_att_b,
                    l0, offs_r, valid_r, L, R, D, s_tok_l, s_reg_r, s_att_l, scale,
                    BLOCK_L, BLOCK_R, BLOCK_D, PRECISION)


# ----------------------------------------------------------------------------- launcher

def _as_mask(mask, shape, name, device, what):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what}: {name} must be a tensor, got {type(mask).__name__}")
    check_shape(mask, shape, name, what)
    if mask.device != device:
        raise ValueError(f"{what}: {name} is on {mask.device}, the inputs on {device}")
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"{what}: {name} must be bool or integer (nonzero = valid), "
                         f"got {mask.dtype}")
    return (mask != 0).to(torch.int8).contiguous()


def _as_gamma(gamma, B, device, what):
    """gamma as a (B,) fp32 tensor: a float, a 0-d/1-element tensor, or one value per query."""
    if isinstance(gamma, torch.Tensor):
        if gamma.device != device:
            raise ValueError(f"{what}: gamma is on {gamma.device}, the inputs on {device}")
        if gamma.numel() == 1:
            return gamma.reshape(1).to(torch.float32).expand(B).contiguous()
        check_shape(gamma, (B,), "gamma", what)
        return gamma.to(torch.float32).contiguous()
    return torch.full((B,), float(gamma), dtype=torch.float32, device=device)


def _check_inputs(tokens, regions, sentence, beta, what):
    tensors = {"tokens": tokens, "regions": regions, "sentence": sentence, "beta": beta}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_shape(tokens, (None, None, None), "tokens", what)
    B, L, D = tokens.shape
    check_shape(regions, (B, None, D), "regions", what)
    R = regions.shape[1]
    check_shape(sentence, (B, D), "sentence", what)
    check_shape(beta, (B, D), "beta", what)
    if min(B, L, R, D) == 0:
        raise ValueError(f"{what}: empty input (B={B}, L={L}, R={R}, d={D})")
    if R > MAX_REGIONS:
        raise ValueError(f"{what}: R={R} regions exceed the kernel's limit of {MAX_REGIONS}")
    device = check_device(_hybrid_attention_kernel, tensors, what)
    for name, t in tensors.items():
        check_float(_hybrid_attention_kernel, t, name, what)
    if regions.dtype != tokens.dtype or sentence.dtype != tokens.dtype:
        raise ValueError(f"{what}: tokens ({tokens.dtype}), regions ({regions.dtype}) and "
                         f"sentence ({sentence.dtype}) must share a dtype")
    return B, L, R, D, device


def hybrid_attention(tokens, token_mask, regions, sentence, beta, gamma, region_mask=None, *,
                     config: AttentionConfig | None = None) -> HybridAttention:
    """Fused hybrid attention of B queries; returns HybridAttention(a, a_s, a_c, m, A).

    Args:
        tokens: (B, L, d) projected token states T' (fp32, fp16 or bf16).
        token_mask: (B, L) bool/int, nonzero = a real token; None = all real.
        regions: (B, R, d) projected anchor regions R', same dtype as tokens; R <= 256.
        sentence: (B, d) projected sentence t', same dtype.
        beta: (B, d) channel gate (any float dtype; used in fp32).
        gamma: hybrid mix, a float or a tensor of 1 or B elements.
        region_mask: (B, R) bool/int, nonzero = a valid region; None = all valid.
    Outputs are in the dtype of ``tokens``; the math is fp32 (tensor-core dots on 16-bit inputs).
    """
    what = "hybrid_attention"
    B, L, R, D, device = _check_inputs(tokens, regions, sentence, beta, what)
    if token_mask is None:
        token_mask = torch.ones((B, L), dtype=torch.int8, device=device)
    token_mask = _as_mask(token_mask, (B, L), "token_mask", device, what)
    has_region_mask = region_mask is not None
    region_mask = (_as_mask(region_mask, (B, R), "region_mask", device, what)
                   if has_region_mask else token_mask)  # placeholder pointer, never read
    gamma = _as_gamma(gamma, B, device, what)
    tokens, regions, sentence, beta = (t.contiguous() for t in (tokens, regions, sentence, beta))

    vectors = _utils.empty((4, B, D), tokens.dtype, device)   # a, a_s, a_c, m
    att = _utils.empty((B, L, D), tokens.dtype, device)
    block_r = _block_r(R)
    cfg = config or _default_config(device, tokens.dtype, L, D, block_r)
    if any(b < 1 or b & (b - 1) for b in (cfg.block_l, cfg.block_d)):
        raise ValueError(f"{what}: block sizes must be powers of two, got {cfg}")
    with device_guard(device):
        _hybrid_attention_kernel[(B,)](
            tokens, token_mask, regions, region_mask, sentence, beta, gamma, vectors, att,
            L, R, D, tokens.stride(0), tokens.stride(1), regions.stride(0), regions.stride(1),
            vectors.stride(0), att.stride(0), att.stride(1), 1.0 / math.sqrt(D),
            HAS_REGION_MASK=has_region_mask, BLOCK_L=cfg.block_l, BLOCK_R=block_r,
            BLOCK_D=cfg.block_d, PRECISION=dot_precision(tokens.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)
    return HybridAttention(vectors[0], vectors[1], vectors[2], vectors[3], att)


def _default_config(device, dtype, L, D, block_r):
    if device.type == "cuda":
        kind = input_kind(dtype)
        serves = min(r for r, k in GPU_CONFIGS if k == kind and r >= block_r)
        return GPU_CONFIGS[serves, kind]
    # Interpreter: cost grows with loop steps, not tile sizes, so cover L and d in few tiles.
    return AttentionConfig(block_l=next_pow2(min(L, 64)), block_d=next_pow2(min(D, 256)))


# ----------------------------------------------------------------------------- reference

def hybrid_attention_ref(tokens, token_mask, regions, sentence, beta, gamma, region_mask=None,
                         *, chunk: int = 4096, attention_block=None) -> HybridAttention:
    """Plain PyTorch oracle of ``hybrid_attention``: fp32 math (float64 for float64 inputs),
    outputs in the tokens' dtype, chunked over queries so the (chunk, L, R) weights stay small.
    ``attention_block`` replaces the per-chunk function (bench/kernels.py compiles it)."""
    attention_block = attention_block or _hybrid_block
    B, L, _ = tokens.shape
    R = regions.shape[1]
    device = tokens.device
    tmask = (torch.ones((B, L), dtype=torch.bool, device=device) if token_mask is None
             else token_mask != 0)
    rmask = (torch.ones((B, R), dtype=torch.bool, device=device) if region_mask is None
             else region_mask != 0)
    work = torch.promote_types(tokens.dtype, torch.float32)
    gamma = torch.as_tensor(gamma, dtype=work, device=device).reshape(-1).expand(B)
    parts = []
    for b0 in range(0, B, chunk):
        bs = slice(b0, b0 + chunk)
        t, r, sent, b, g = (x[bs].to(work) for x in (tokens, regions, sentence, beta, gamma))
        outs = attention_block(t, tmask[bs], r, sent, b, g, rmask[bs])
        parts.append([x.to(tokens.dtype) for x in outs])
    return HybridAttention(*(torch.cat(xs) for xs in zip(*parts, strict=True)))


# ----------------------------------------------------------------------------- compile gate

def gpu_compile_specs(dtype: str = "fp16"):
    """The shipped configurations for ``dtype`` inputs as CompileSpecs, each at the largest
    BLOCK_R it serves."""
    signature = {"tok_ptr": f"*{dtype}", "tmask_ptr": "*i8", "reg_ptr": f"*{dtype}",
                 "rmask_ptr": "*i8", "sent_ptr": f"*{dtype}", "beta_ptr": f"*{dtype}",
                 "gamma_ptr": "*fp32", "vec_ptr": f"*{dtype}", "att_ptr": f"*{dtype}",
                 **{n: "i32" for n in ("L", "R", "D", "s_tok_b", "s_tok_l", "s_reg_b",
                                       "s_reg_r", "s_vec_kind", "s_att_b", "s_att_l")},
                 "scale": "fp32"}
    aligned = ("tok_ptr", "reg_ptr", "sent_ptr", "beta_ptr", "vec_ptr", "att_ptr", "D",
               "s_tok_b", "s_tok_l", "s_reg_b", "s_reg_r", "s_vec_kind", "s_att_b", "s_att_l")
    kind = "fp32" if dtype == "fp32" else "16-bit"
    return [_utils.CompileSpec(
        name=f"hybrid_attention[{dtype},BLOCK_R={block_r}]", fn=_hybrid_attention_kernel,
        signature=signature,
        constexprs={"HAS_REGION_MASK": True, "BLOCK_L": cfg.block_l, "BLOCK_R": block_r,
                    "BLOCK_D": cfg.block_d, "PRECISION": "ieee" if dtype == "fp32" else "tf32"},
        divisible=aligned, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        for (block_r, k), cfg in GPU_CONFIGS.items() if k == kind]
