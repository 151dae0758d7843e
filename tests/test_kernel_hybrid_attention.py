"""hybrid_attention (Triton) against a float64 reference, and the PyTorch oracle against ARCHITECTURE.md
section 4 written out per query and token in float64.

On the CPU this runs in Triton's interpreter (fp32 and fp16; bf16 on a GPU only); with
CVR_TRITON_GPU=1 on a CUDA machine the same tests run the compiled kernel, plus the gpu ones. Each
output's error is bounded by a multiple of PyTorch's own error in the inputs' dtype
(tests/kernel_helpers.py: the FlashAttention rule; in fp16 the kernel feeds the probabilities to the
tensor cores in fp16, as FlashAttention does). Outputs are poisoned (NaN) before the call, so an
element the kernel never writes fails.
"""
import math

import pytest
import torch
from kernel_helpers import assert_close, assert_within_torch_error, poison_outputs

import kernels._utils as kutils
from kernels import reference
from kernels.hybrid_attention import (
    MAX_REGIONS,
    AttentionConfig,
    HybridAttention,
    _hybrid_attention_kernel,
    hybrid_attention,
    hybrid_attention_ref,
    region_mean,
)

INTERPRETED = kutils.is_interpreted(_hybrid_attention_kernel)
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                reason="compiled Triton kernels need CUDA (or TRITON_INTERPRET=1)")
FIELDS = HybridAttention._fields


@pytest.fixture
def poison(monkeypatch):
    poison_outputs(monkeypatch)


def make_inputs(B, L, R, D, dtype=torch.float32, device="cpu", seed=0, region_mask=False):
    """Random inputs; with B > 1 the second query has every token masked, and with a region mask
    the last query has no valid region."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, L, D, generator=g)
    regions = torch.randn(B, R, D, generator=g)
    sentence = torch.randn(B, D, generator=g) * 2.0    # sharper spatial softmax
    beta = torch.rand(B, D, generator=g)
    token_mask = torch.rand(B, L, generator=g) < 0.7
    token_mask[0, 0] = True
    if B > 1:
        token_mask[1] = False
    rmask = None
    if region_mask:
        rmask = torch.rand(B, R, generator=g) < 0.6
        rmask[0, 0] = True
        if B > 1:
            rmask[-1] = False
        rmask = rmask.to(device)
    gamma = torch.rand(B, generator=g)
    to = lambda t: t.to(device=device, dtype=dtype)
    return (to(tokens), token_mask.to(device), to(regions), to(sentence), beta.to(device),
            gamma.to(device), rmask)


def assert_matches(out, inputs, what):
    """Every output of the kernel within the error rule: PyTorch in the inputs' dtype and the float64
    truth of the same inputs (kernels.reference.hybrid_attention both times)."""
    tokens, tmask, regions, sentence, beta, gamma, rmask = inputs
    dtype = tokens.dtype
    tmask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if tmask is None else tmask != 0
    rmask = None if rmask is None else rmask != 0
    gamma = torch.as_tensor(gamma, device=tokens.device)
    in_dtype = reference.hybrid_attention(tokens, tmask, regions, sentence, beta.to(dtype), gamma.to(dtype), rmask)
    ref64 = reference.hybrid_attention(tokens.double(), tmask, regions.double(), sentence.double(), beta.double(),
                                       gamma.double(), rmask)
    for name, got, torch_out, want in zip(FIELDS, out, in_dtype, ref64, strict=True):
        assert got.dtype == dtype, f"{what} {name}: dtype {got.dtype} != {dtype}"
        assert_within_torch_error(got, torch_out, want, dtype, f"{what} {name}")


# ----------------------------------------------------------------------------- interpreter

SMALL = AttentionConfig(block_l=4, block_d=16)
# (B, L, R, D, config): one-element edges; L, R, d off every block size; R = 49 (a 7 x 7 grid)
# and R = 4 (a 2 x 2 grid); small tiles for several token tiles and d chunks.
SHAPES = [
    (1, 1, 1, 1, None),
    (3, 7, 5, 20, None),
    (2, 33, 49, 48, None),
    (3, 13, 49, 40, SMALL),
    (2, 5, 4, 17, SMALL),
]


@pytest.mark.parametrize("region_mask", [False, True], ids=["all-regions", "region-mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) +
                         ("-small" if s[4] else ""))
def test_matches_ref(shape, dtype, region_mask, poison):
    B, L, R, D, cfg = shape
    tokens, tmask, regions, sentence, beta, gamma, rmask = make_inputs(
        B, L, R, D, dtype, DEVICE, seed=B * 100 + L + R, region_mask=region_mask)
    out = hybrid_attention(tokens, tmask, regions, sentence, beta, gamma, rmask, config=cfg)
    assert_matches(out, (tokens, tmask, regions, sentence, beta, gamma, rmask), f"{shape} {dtype}")
    # Masked tokens (the whole of query 1) give exactly-zero rows.
    assert (out.A[~tmask] == 0).all()


@pytest.mark.parametrize("gamma", [0.25, "0-d", "per-query", 1.0, 0.0])
def test_gamma_forms(gamma, poison):
    tokens, tmask, regions, sentence, beta, per_query, _ = make_inputs(3, 6, 9, 24, device=DEVICE,
                                                                       seed=5)
    g = {"0-d": torch.tensor(0.7, device=DEVICE), "per-query": per_query}.get(gamma, gamma)
    out = hybrid_attention(tokens, tmask, regions, sentence, beta, g)
    assert_matches(out, (tokens, tmask, regions, sentence, beta, g, None), f"gamma={gamma}")


def test_defaults_and_no_valid_region(poison):
    """token_mask=None means every token is real; a query without a valid region gets zeros."""
    tokens, _, regions, sentence, beta, gamma, _ = make_inputs(2, 5, 6, 16, device=DEVICE, seed=2)
    rmask = torch.ones(2, 6, dtype=torch.int32, device=DEVICE)
    rmask[1] = 0
    out = hybrid_attention(tokens, None, regions, sentence, beta, gamma, rmask)
    assert_matches(out, (tokens, None, regions, sentence, beta, gamma, rmask), "defaults")
    ref = hybrid_attention_ref(tokens, None, regions, sentence, beta, gamma, rmask)
    assert_close(out.a, ref.a, 1e-5, 1e-5, "the oracle's wrapper")
    assert all((t[1] == 0).all() for t in out)
    assert_close(out.m, region_mean(regions, rmask), 1e-6, 1e-6, "region_mean helper")


def test_non_contiguous_inputs(poison):
    tokens, tmask, regions, sentence, beta, gamma, _ = make_inputs(2, 5, 7, 16, device=DEVICE, seed=4)
    t_view = tokens.transpose(1, 2).contiguous().transpose(1, 2)   # same values, other strides
    out = hybrid_attention(t_view, tmask, regions[:, :, :], sentence, beta.T.contiguous().T, gamma)
    assert_matches(out, (tokens, tmask, regions, sentence, beta, gamma, None), "non-contiguous")


def test_reference_matches_float64_definition():
    """The oracle (tiny chunks) against section 4 with explicit loops in float64."""
    tokens, tmask, regions, sentence, beta, gamma, rmask = make_inputs(
        3, 4, 5, 8, torch.float64, seed=9, region_mask=True)
    ref = hybrid_attention_ref(tokens, tmask, regions, sentence, beta, gamma, rmask, chunk=2)
    D = tokens.shape[2]
    for b in range(3):
        valid = [r for r in range(5) if rmask[b, r]]
        R = regions[b, valid]                                    # (R_valid, d)
        zero = torch.zeros(D, dtype=torch.float64)
        if valid:
            alpha = torch.softmax(R @ sentence[b] / math.sqrt(D), 0)
            a_s, m = alpha @ R, R.mean(0)
        else:
            a_s, m = zero, zero
        a_c = beta[b].double() * m
        a = gamma[b] * a_s + (1 - gamma[b]) * a_c
        for name, want in (("a", a), ("a_s", a_s), ("a_c", a_c), ("m", m)):
            assert_close(getattr(ref, name)[b], want, 1e-12, 1e-12, f"ref {name}[{b}]")
        for tok in range(4):
            if tmask[b, tok] and valid:
                want = torch.softmax(R @ tokens[b, tok] / math.sqrt(D), 0) @ R
            else:
                want = zero
            assert_close(ref.A[b, tok], want, 1e-12, 1e-12, f"ref A[{b},{tok}]")


@pytest.mark.parametrize(("change", "error", "message"), [
    (lambda a: a.update(regions=a["regions"][:1]), ValueError, "regions must have shape"),
    (lambda a: a.update(sentence=a["sentence"][:, :3]), ValueError, "sentence must have shape"),
    (lambda a: a.update(beta=a["beta"][:, None]), ValueError, "beta must have shape"),
    (lambda a: a.update(token_mask=a["token_mask"][:, :2]), ValueError, "token_mask must have"),
    (lambda a: a.update(token_mask=a["token_mask"].float()), ValueError, "bool or integer"),
    (lambda a: a.update(region_mask=torch.ones(2, 3, device=DEVICE)), ValueError,
     "region_mask must have"),
    (lambda a: a.update(gamma=torch.ones(5, device=DEVICE)), ValueError, "gamma must have shape"),
    (lambda a: a.update(regions=a["regions"].half()), ValueError, "must share a dtype"),
    (lambda a: a.update(tokens=a["tokens"].to(torch.int64)), ValueError, "float32, float16"),
    (lambda a: a.update(tokens=a["tokens"][:, :0], token_mask=a["token_mask"][:, :0]),
     ValueError, "empty input"),
    (lambda a: a.update(regions=torch.zeros(2, MAX_REGIONS + 1, 16, device=DEVICE)), ValueError,
     "exceed the kernel's limit"),
    (lambda a: a.update(sentence=a["sentence"].tolist()), TypeError, "torch.Tensor"),
])
def test_input_validation(change, error, message):
    tokens, tmask, regions, sentence, beta, gamma, _ = make_inputs(2, 5, 7, 16, device=DEVICE)
    args = {"tokens": tokens, "token_mask": tmask, "regions": regions, "sentence": sentence,
            "beta": beta, "gamma": gamma}
    change(args)
    with pytest.raises(error, match=message):
        hybrid_attention(**args)


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's bf16 refusal")
def test_bf16_refused_in_interpreter():
    tokens, tmask, regions, sentence, beta, gamma, _ = make_inputs(2, 5, 7, 16,
                                                                   dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="interpreter computes wrongly"):
        hybrid_attention(tokens, tmask, regions, sentence, beta, gamma)


# ----------------------------------------------------------------------------- GPU

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                               reason="needs CUDA and the compiled kernels (CVR_TRITON_GPU=1)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (64, 32, 49, 512), (33, 77, 200, 1000),
                                   (7, 40, 256, 96)])
@pytest.mark.parametrize("region_mask", [False, True], ids=["all-regions", "region-mask"])
def test_gpu_matches_ref(shape, dtype, region_mask, poison):
    args = make_inputs(*shape, dtype=dtype, device="cuda", seed=sum(shape),
                       region_mask=region_mask)
    out = hybrid_attention(*args)
    assert_matches(out, args, f"GPU {shape} {dtype}")
