"""global_local_score (Triton) against a float64 reference, and the PyTorch oracle against a
float64 loop-free restatement of ARCHITECTURE.md section 7.

On the CPU this runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which
computes fp32 and fp16 correctly and bf16 wrongly, so bf16 is tested on a GPU only. With
CVR_TRITON_GPU=1 on a CUDA machine the same tests run the compiled kernels on the GPU, plus the
large ones marked gpu. The kernel's error is bounded by a multiple of PyTorch's own error in the
inputs' dtype (tests/kernel_helpers.py: the FlashAttention rule). Every output is poisoned (NaN,
or the int64 maximum) before the call, so an element the kernel never writes fails.
"""
import pytest
import torch
from kernel_helpers import assert_close, assert_within_torch_error, error_bound, poison_outputs

import kernels._utils as kutils
from kernels import reference
from kernels.global_local_score import (
    MAX_TOPK,
    ScoreConfig,
    _score_matrix_kernel,
    global_local_score,
    global_local_score_ref,
)

INTERPRETED = kutils.is_interpreted(_score_matrix_kernel)
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                reason="compiled Triton kernels need CUDA (or TRITON_INTERPRET=1)")
NORM = torch.tensor([[-0.3, 0.5], [-0.25, 0.45], [0.15, 0.55], [0.1, 0.6]])

# Small tiles: many programs, several D and K chunks, ragged edges on every axis.
SMALL = ScoreConfig(block_q=4, block_n=16, block_d=16, block_k=4, group_q=2)
# (Q, N, D, K, config): one-element edges; sizes that are not multiples of any block.
SHAPES = [
    (1, 1, 1, 1, None),
    (5, 37, 20, 13, None),
    (17, 130, 33, 9, None),      # two query tiles and two video tiles of the CPU default
    (9, 37, 20, 13, SMALL),      # 3 query tiles in swizzle groups of 2 (one ragged group)
    (3, 1, 16, 4, SMALL),
]


@pytest.fixture
def poison(monkeypatch):
    poison_outputs(monkeypatch)


def make_inputs(Q, N, D, K, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)

    def concepts(*shape):
        c = torch.rand(*shape, generator=g)
        c = torch.where(torch.rand(*shape, generator=g) < 0.2, 0.0, c)  # sparse, like sigmoids
        if shape[0] > 1:
            c[-1, 0] = 0.0   # an all-zero concept vector: Jaccard 0 against an all-zero one
        return c

    q_lat, v_lat = unit(Q, 2, D), unit(N, 2, D)
    q_con, v_con = concepts(Q, 2, K), concepts(N, 2, K)
    if N > 1:
        v_con[0, 0] = 0.0
    return [t.to(device=device, dtype=dtype) for t in (q_lat, q_con, v_lat, v_con)] + [
        NORM.to(device)]


def torch_and_ref64(inputs, weights=(0.6, 0.4)):
    """PyTorch's scores computed in the inputs' dtype, and the float64 truth of the same inputs."""
    q_lat, q_con, v_lat, v_con, norm = inputs
    in_dtype = reference.fused_score(q_lat, q_con, v_lat, v_con, norm.to(q_lat.dtype), weights)
    return in_dtype, global_local_score_ref(*(t.double() for t in inputs), weights=weights)


def assert_topk_matches(values, indices, ref_scores, k, bound, what):
    """Values match the float64 top-k within `bound`; indices match it exactly except between
    scores within `bound` of each other (then either order is a correct answer)."""
    ref_v, ref_i = torch.sort(ref_scores, dim=1, descending=True, stable=True)
    ref_v, ref_i = ref_v[:, :k], ref_i[:, :k]
    assert indices.dtype == torch.int64
    assert_close(values, ref_v, bound, 0.0, f"{what} values")
    assert ((indices >= 0) & (indices < ref_scores.shape[1])).all(), f"{what}: index range"
    assert all(len(set(row.tolist())) == k for row in indices), f"{what}: repeated index"
    differ = indices != ref_i
    if differ.any():
        at_kernel = ref_scores.gather(1, indices.clamp(0, ref_scores.shape[1] - 1))
        gap = (at_kernel - ref_v).abs()[differ]
        assert (gap <= 2 * bound).all(), (
            f"{what}: indices differ beyond ties: kernel {indices[differ].tolist()} vs ref "
            f"{ref_i[differ].tolist()}")


# ----------------------------------------------------------------------------- interpreter

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) +
                         ("-small" if s[4] else ""))
def test_score_matrix_matches_ref(shape, dtype, poison):
    Q, N, D, K, cfg = shape
    inputs = make_inputs(Q, N, D, K, dtype, DEVICE, seed=Q * 1000 + N)
    out = global_local_score(*inputs, config=cfg)
    assert out.dtype == torch.float32 and out.shape == (Q, N)
    assert_within_torch_error(out, *torch_and_ref64(inputs), dtype, f"scores {shape} {dtype}")


# (Q, N, D, K, k, config, splits): k = 1, k = N, k not a power of two, several splits (and more
# than the merge kernel's chunk of 4), splits with a ragged last one.
TOPK_CASES = [
    (1, 1, 1, 1, 1, None, None),
    (5, 37, 20, 13, 5, None, None),
    (5, 37, 20, 13, 37, None, None),
    (6, 37, 24, 8, 7, ScoreConfig(block_q=4, block_n=8, block_d=16, block_k=8), 5),
    (3, 37, 24, 8, 3, ScoreConfig(block_q=2, block_n=8, block_d=32, block_k=8), 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: f"Q{c[0]}N{c[1]}k{c[4]}s{c[6]}")
def test_topk_matches_ref(case, dtype, poison):
    Q, N, D, K, k, cfg, splits = case
    inputs = make_inputs(Q, N, D, K, dtype, DEVICE, seed=7 * Q + N + k)
    values, indices = global_local_score(*inputs, k=k, config=cfg, splits=splits)
    in_dtype, ref64 = torch_and_ref64(inputs)
    assert values.shape == indices.shape == (Q, k) and values.dtype == torch.float32
    bound = error_bound(in_dtype, ref64, dtype)
    assert_topk_matches(values, indices, ref64, k, bound, f"top-{k} {case[:4]}")
    ref_v, _ = global_local_score_ref(*inputs, k=k)
    assert_close(ref_v, values, 2 * bound, 0.0, "chunked reference top-k")


@pytest.mark.parametrize("splits", [1, 3])
def test_topk_ties_go_to_the_lower_index(splits, poison):
    """Exact ties (duplicated videos, values on a 1/8 grid: every sum is exact in any order)
    across tiles and splits: the kernel and the reference both keep the lower index."""
    Q, N, D, K = 3, 40, 8, 8
    g = torch.Generator().manual_seed(3)
    grid = lambda *s: (torch.randint(0, 5, s, generator=g).float() / 8).to(DEVICE)
    base_lat, base_con = grid(4, 2, D), grid(4, 2, K)
    pick = torch.randint(0, 4, (N,), generator=g).to(DEVICE)  # 4 distinct videos among 40
    v_lat, v_con = base_lat[pick], base_con[pick]
    q_lat, q_con = grid(Q, 2, D), grid(Q, 2, K)
    norm = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 0.5], [0.0, 1.0]], device=DEVICE)
    cfg = ScoreConfig(block_q=4, block_n=8, block_d=8, block_k=8)
    k = 12
    values, indices = global_local_score(q_lat, q_con, v_lat, v_con, norm, k=k, config=cfg,
                                         splits=splits)
    ref_v, ref_i = global_local_score_ref(q_lat, q_con, v_lat, v_con, norm, k=k,
                                          chunk_elems=5 * K)   # many chunks: running merge
    assert torch.equal(indices, ref_i), f"{indices} vs {ref_i}"
    assert torch.equal(values, ref_v)
    ties = values[:, 1:] == values[:, :-1]
    assert ties.any(), "the test data must contain ties"
    assert (indices[:, 1:] > indices[:, :-1])[ties].all()  # equal scores: ascending indices


def test_degenerate_norm_range_and_weights(poison):
    """hi == lo uses the 1e-6 floor instead of dividing by 0; custom weights are honoured."""
    inputs = make_inputs(4, 9, 16, 8, device=DEVICE)
    inputs[4] = torch.tensor([[0.1, 0.1], [-0.2, 0.4], [0.3, 0.3], [0.0, 0.5]], device=DEVICE)
    out = global_local_score(*inputs, weights=(0.25, 1.5))
    assert torch.isfinite(out).all()
    assert_within_torch_error(out, *torch_and_ref64(inputs, (0.25, 1.5)), torch.float32, "degenerate norm")


def test_non_contiguous_inputs(poison):
    q_lat, q_con, v_lat, v_con, norm = make_inputs(4, 11, 16, 8, device=DEVICE)
    wide = torch.zeros(11, 2, 40, device=DEVICE)
    wide[:, :, 3:19] = v_lat                        # a strided view of v_lat
    out = global_local_score(q_lat, q_con, wide[:, :, 3:19], v_con, norm.T.contiguous().T)
    assert_within_torch_error(out, *torch_and_ref64([q_lat, q_con, v_lat, v_con, norm]), torch.float32,
                              "non-contiguous")


def test_reference_matches_float64_definition():
    """The chunked oracle (tiny chunks: many query and video chunks) against section 7 written out
    directly in float64."""
    q_lat, q_con, v_lat, v_con, norm = (t.double() for t in make_inputs(6, 23, 12, 10))
    lo, hi = norm[:, 0], norm[:, 1]
    span = (hi - lo).clamp(min=1e-6)
    sims = []
    for b in (0, 1):
        sims.append(q_lat[:, b] @ v_lat[:, b].T)
    for b in (0, 1):
        x, y = q_con[:, b, None, :], v_con[None, :, b, :]
        smax = torch.maximum(x, y).sum(-1)
        sims.append(torch.where(smax > 0, torch.minimum(x, y).sum(-1) / smax.clamp(min=1e-300),
                                0.0))
    n = [(s - lo[i]) / span[i] for i, s in enumerate(sims)]
    expected = 0.6 * (n[0] + n[1]) + 0.4 * (n[2] + n[3])
    got = global_local_score_ref(q_lat, q_con, v_lat, v_con, norm, chunk_elems=3 * 10)
    assert_close(got, expected, 1e-12, 1e-12, "reference vs float64")
    v, i = global_local_score_ref(q_lat, q_con, v_lat, v_con, norm, k=23, chunk_elems=3 * 10)
    assert_topk_matches(v, i, expected, 23, 1e-12, "reference top-k vs float64")


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: a.update(k=0), "positive int"),
    (lambda a: a.update(k=10), "exceeds the number of videos"),
    (lambda a: a.update(k=2.0), "positive int"),
    (lambda a: a.update(q_con=a["q_con"][:, :1]), "q_con must have shape"),
    (lambda a: a.update(v_lat=a["v_lat"][..., :3]), "v_lat must have shape"),
    (lambda a: a.update(v_con=a["v_con"][:4]), "v_con must have shape"),
    (lambda a: a.update(norm=a["norm"][:3]), "norm must have shape"),
    (lambda a: a.update(q_lat=a["q_lat"].half()), "must share a dtype"),
    (lambda a: a.update(q_con=a["q_con"].to(torch.int32)), "float32, float16 or bfloat16"),
    (lambda a: a.update(q_lat=a["q_lat"][:0], q_con=a["q_con"][:0]), "empty input"),
])
def test_input_validation(change, message):
    q_lat, q_con, v_lat, v_con, norm = make_inputs(3, 9, 16, 8, device=DEVICE)
    args = {"q_lat": q_lat, "q_con": q_con, "v_lat": v_lat, "v_con": v_con, "norm": norm}
    change(args)
    with pytest.raises(ValueError, match=message):
        global_local_score(**args)


def test_rejects_large_k_and_bf16_in_interpreter():
    args = make_inputs(2, MAX_TOPK + 5, 8, 4, device=DEVICE)
    with pytest.raises(ValueError, match="fused top-k limit"):
        global_local_score(*args, k=MAX_TOPK + 1)
    if INTERPRETED:
        bf16 = [t.bfloat16() for t in args]
        with pytest.raises(ValueError, match="interpreter computes wrongly"):
            global_local_score(*bf16)
    with pytest.raises(TypeError, match="torch.Tensor"):
        global_local_score(args[0].tolist(), *args[1:])


# ----------------------------------------------------------------------------- GPU

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                               reason="needs CUDA and the compiled kernels (CVR_TRITON_GPU=1)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (300, 1000, 1024, 512), (257, 4099, 1000, 500)])
def test_gpu_score_matrix(shape, dtype, poison):
    inputs = make_inputs(*shape, dtype=dtype, device="cuda", seed=sum(shape))
    out = global_local_score(*inputs)
    assert_within_torch_error(out, *torch_and_ref64(inputs), dtype, f"GPU {shape} {dtype}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("k", [1, 10, 100, 128])
def test_gpu_topk(k, dtype, poison):
    inputs = make_inputs(200, 50_001, 1024, 512, dtype=dtype, device="cuda", seed=k)
    values, indices = global_local_score(*inputs, k=k)
    in_dtype, ref64 = torch_and_ref64(inputs)
    assert_topk_matches(values, indices, ref64, k, error_bound(in_dtype, ref64, dtype), f"GPU top-{k} {dtype}")
