"""INT8 matmul: quantization, exact int32 accumulation, W8A8 and W8A16 linear layers, autograd,
registration, Int8Linear, errors. Triton kernels run through the interpreter on CPU."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import effkern as ek
from effkern.int8 import (dequantize_int8, int8_accumulate_reference, int8_linear_reference,
                          int8_weight_only_linear_reference, quantize_rows_reference)

from op_checks import (SHARED_LIMIT, aligned_launch, assert_bad_call_raises, assert_compiles_like_eager,
                       assert_cuda_graph_replays_like_eager, assert_dequantized_from, assert_fine_tuning_lowers_the_loss,
                       assert_linear_matches_float64, assert_matches_float64, assert_opcheck_passes, needs_backend,
                       parametrize_by_name, record_calls, rounded_from, tile_of)

BACKENDS = ["triton", "reference"]
LINEAR_OPS = {"w8a8": ek.int8_linear, "w8a16": ek.int8_weight_only_linear}
ODD_M = (1, 5, 17, 129)
ODD_K = (24, 100, 4100)


def kernels():
    from effkern.kernels import int8

    return int8


def record_gemm_launches(monkeypatch) -> list:
    """The shape of A in each launch of the int8 GEMM (kernels.int8_matmul, which every int8 op
    but the quantization goes through, forward and backward) from now until the test ends."""
    return record_calls(monkeypatch, kernels(), "int8_matmul", lambda args, _: tuple(args[0].shape))


def outlier_weight(N, K, device="cpu", seed=0):
    """A layer-like weight [N, K] (~1/sqrt(K)) with outliers: a few input channels 20x larger
    (they stretch every row's scale) and one output channel, N // 2, 50x larger (its own scale;
    float64 checks hold its output column apart from the others)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    w[:, torch.randperm(K, generator=g)[: max(1, K // 50)]] *= 20
    w[N // 2] *= 50
    return w.to(device)


def int8_pair(M, N, K, device="cpu", seed=0):
    """Random int8 operands over the whole range, -128 included."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8).to(device),
            torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8).to(device))


def assert_rounded_from(out, exact32):
    assert rounded_from(out, exact32).all()


# ---------------------------------------------------------------------------- quantization

def test_reference_quantization_rounds_half_to_even_and_handles_zero_rows():
    # absmax 127 makes the scale exactly 1, so x / scale = x: ties show directly.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49],
                      [0.0] * 8,
                      [-254.0, 1.0, 3.0, -5.0, 0.0, 254.0, 2.9, -1.0]])
    q, scale = quantize_rows_reference(x)
    assert scale.tolist() == [1.0, 0.0, 2.0]
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 3], [0] * 8, [-127, 0, 2, -2, 0, 127, 1, 0]]
    assert q.dtype == torch.int8 and scale.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 24), (5, 100), (17, 4100), (3, 7, 33), (129, 1)])
def test_quantize_per_token_is_bit_exact(backend, dtype, shape):
    needs_backend(backend)
    torch.manual_seed(0)
    x = (torch.randn(*shape) * torch.rand(*shape[:-1], 1) * 10).to(dtype)
    x.view(-1, shape[-1])[0] = 0  # an all-zero token
    with ek.use_backend(backend):
        q, scale = ek.quantize_per_token_int8(x)
    # independent formulation: divide by absmax/127, round half to even, clamp
    xf = x.float()
    s = xf.abs().amax(-1) / 127
    expected = torch.where(s[..., None] > 0, torch.round(xf / s[..., None]), torch.zeros_like(xf))
    assert q.shape == x.shape and scale.shape == x.shape[:-1]
    assert torch.equal(scale, s)
    assert torch.equal(q, expected.clamp(-127, 127).to(torch.int8))
    assert not torch.isnan(scale).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_int8_weight_per_channel(backend):
    needs_backend(backend)
    w = outlier_weight(40, 100)
    w[3] = 0
    with ek.use_backend(backend):
        qw, scale = ek.quantize_int8(w.t().contiguous().t())  # non-contiguous weight
    assert qw.shape == (40, 100) and qw.dtype == torch.int8 and scale.shape == (40,)
    assert scale[3] == 0 and (qw[3] == 0).all()
    assert qw.abs().amax(1)[scale > 0].eq(127).all()  # every nonzero row uses the full range
    err = (dequantize_int8(qw, scale, torch.float64) - w.double()).abs()
    assert (err <= scale.double()[:, None] / 2 + 1e-12).all()  # within half a step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quantization", ["separate", "fused"])
def test_a_nan_in_a_row_makes_its_scale_and_output_row_nan(backend, quantization, monkeypatch):
    """As torch's amax (the reference): a NaN's row gets a NaN scale and a NaN output row, the
    other rows none. Triton's tl.maximum/tl.max default to maxNum, which drops a NaN (PTX max.f32;
    np.fmax in Triton 3.8's interpreter): the scale came out finite and the NaN quantized to -127."""
    needs_backend(backend)
    monkeypatch.setenv("EFFKERN_INT8_QUANTIZATION", quantization)
    torch.manual_seed(0)
    x, w = torch.randn(4, 64), torch.randn(32, 64)
    x[1, 5] = w[2, 7] = float("nan")
    others = [0, 2, 3]
    with ek.use_backend(backend):
        _, x_scale = ek.quantize_per_token_int8(x)
        _, w_scale = ek.quantize_int8(w)
        y = ek.int8_linear(x, *ek.quantize_int8(torch.randn(32, 64)))
    assert torch.isnan(x_scale[1]) and not torch.isnan(x_scale[others]).any()
    assert torch.isnan(w_scale[2]) and not torch.isnan(w_scale[[i for i in range(32) if i != 2]]).any()
    assert torch.isnan(y[1]).all() and not torch.isnan(y[others]).any()


def test_quantize_does_not_take_gradients():
    w = torch.randn(8, 16, requires_grad=True)
    qw, scale = ek.quantize_int8(w)
    assert not qw.requires_grad and not scale.requires_grad


# ---------------------------------------------------------------------------- int32 accumulation

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", ODD_M)
@pytest.mark.parametrize("K", ODD_K)
def test_int8_mm_is_exact(backend, M, K):
    needs_backend(backend)
    a, b = int8_pair(M, 40, K)
    with ek.use_backend(backend):
        c = ek.int8_mm(a, b)
    assert c.dtype == torch.int32
    assert torch.equal(c, a.int() @ b.int().t())


@pytest.mark.parametrize("split_k", [1, 2, 3, 7])
def test_int8_mm_split_k_is_exact(split_k):
    needs_backend("triton")
    a, b = int8_pair(3, 33, 1000, seed=split_k)
    assert torch.equal(kernels().int8_matmul(a, b.t(), None, None, None, torch.int32, split_k=split_k),
                       a.int() @ b.int().t())


def test_split_k_is_chosen_for_few_rows_only():
    needs_backend("triton")
    from effkern.kernels import _splitk

    block, cpu = (16, 32, 64), torch.device("cpu")
    assert _splitk.choose_split_k(1, 40, 4100, cpu, block) > 1
    assert _splitk.choose_split_k(_splitk.SPLIT_MAX_ROWS + 1, 40, 4100, cpu, block) == 1
    assert _splitk.choose_split_k(1, 40, 64, cpu, block) == 1  # too short to split


def assert_accumulates_past_the_int32_range(M, device):
    """K = 140,000 products 127 * 127 sum to 2.26e9 > 2^31: int8_matmul's dequantized result on
    the triton backend stays exact (int32 slices added in int64) instead of wrapping."""
    K = 140_000
    a = torch.full((M, K), 127, dtype=torch.int8, device=device)
    b = torch.full((16, K), 127, dtype=torch.int8, device=device)
    b[1] = -127
    ones = torch.ones(M, device=device), torch.ones(16, device=device)
    with ek.use_backend("triton"):
        out = ek.int8_matmul(a, b, *ones, out_dtype=torch.float32)
    expected = torch.full((M, 16), 127.0 * 127 * K, dtype=torch.float64)
    expected[:, 1] *= -1
    assert torch.equal(out.cpu(), expected.float())


def test_int8_matmul_accumulates_past_the_int32_range():
    needs_backend("triton")
    assert_accumulates_past_the_int32_range(1, "cpu")


@pytest.mark.parametrize("max_exact_k", ["as defined", 2**17])
def test_int8_matmul_slices_a_sum_of_exactly_2_to_the_31(max_exact_k, monkeypatch):
    """K = 2^17 products (-128)^2 sum to 2^31, one past int32's range: the dequantizing launch cuts
    K into slices whose int32 sums are exact. With MAX_EXACT_K = 2^17 (its value until
    2026-11-28) one slice took it all and wrapped to -2^31: the check sees that."""
    needs_backend("triton")
    k = kernels()
    if max_exact_k != "as defined":
        monkeypatch.setattr(k, "MAX_EXACT_K", max_exact_k)
    for place in (k._FIXED, k._SPLIT):  # 256-deep K steps: 4x fewer interpreted iterations
        monkeypatch.setitem(place, "interpreter", ((16, 32, 256, 1), 1, 4))
    K = 2**17
    a = torch.full((1, K), -128, dtype=torch.int8)
    b = torch.full((16, K), -128, dtype=torch.int8)
    out = k.int8_matmul(a, b.t(), torch.ones(1), torch.ones(16), None, torch.float32, split_k=1)
    want = 2.0**31 if max_exact_k == "as defined" else -(2.0**31)
    assert out.unique().tolist() == [want]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 40, 100), (17, 33, 24), (129, 20, 4100)])
def test_int8_matmul_dequantizes_in_fp32(backend, out_dtype, M, N, K, poison_empty):
    needs_backend(backend)
    a, b = int8_pair(M, N, K)
    a_scale, b_scale = torch.rand(M) / 100, torch.rand(N) / 100
    a_scale[0] = 0  # a zero row scale, as quantization gives for an all-zero token
    bias = torch.randn(N, dtype=torch.float16)
    with ek.use_backend(backend):
        out = ek.int8_matmul(a, b, a_scale, b_scale, bias, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    assert_dequantized_from(out, a.int() @ b.int().t(), a_scale, b_scale, bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_matmul_leading_dims_and_default_dtype(backend, poison_empty):
    needs_backend(backend)
    a, b = int8_pair(6, 10, 24)
    a_scale = torch.rand(2, 3)
    b_scale = torch.rand(10)
    with ek.use_backend(backend):
        out = ek.int8_matmul(a.view(2, 3, 24), b, a_scale, b_scale)
    assert out.shape == (2, 3, 10) and out.dtype == torch.bfloat16
    assert_rounded_from(out.view(6, 10), (a.int() @ b.int().t()).float() * a_scale.view(6, 1) * b_scale)


# ---------------------------------------------------------------------------- the TMA GEMM

# (M, N, K): int8 rows 16-byte aligned (K a multiple of 16, N of 8), more rows than
# SPLIT_MAX_ROWS, sizes no multiple of the interpreter's 32 x 32 x 64 tiles; the second has more
# output tiles (10) than the interpreter's 4 persistent programs, which then walk several each
TMA_SHAPES = [(65, 48, 64), (130, 72, 160)]


@pytest.fixture
def tma_launches(monkeypatch):
    """The shapes of A in the TMA GEMM launches made while the test runs."""
    return record_calls(monkeypatch, kernels(), "_int8_matmul_tma", lambda args, _: args[0].shape)


def _scales_and_bias(M, N):
    a_scale, b_scale = torch.rand(M) / 100, torch.rand(N) / 100
    a_scale[0] = 0  # an all-zero token's scale
    return a_scale, b_scale, torch.randn(N, dtype=torch.float16)


@pytest.mark.parametrize("out_dtype", [torch.int32, torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K", TMA_SHAPES)
def test_tma_gemm_is_exact_and_gives_the_plain_kernels_bits(out_dtype, M, N, K, monkeypatch, tma_launches,
                                                            poison_empty):
    needs_backend("triton")
    a, b = int8_pair(M, N, K)
    scales = (None, None, None) if out_dtype == torch.int32 else _scales_and_bias(M, N)
    tma = kernels().int8_matmul(a, b.t(), *scales, out_dtype)
    monkeypatch.setenv("EFFKERN_TRITON_TMA", "0")
    plain = kernels().int8_matmul(a, b.t(), *scales, out_dtype)
    assert tma_launches == [(M, K)]
    assert torch.equal(tma, plain)
    acc = a.int() @ b.int().t()
    if out_dtype == torch.int32:
        assert torch.equal(tma, acc)
    else:
        assert_dequantized_from(tma, acc, *scales)


def test_w8a8_linear_with_the_separate_quantization_runs_the_tma_gemm(monkeypatch, tma_launches):
    needs_backend("triton")
    monkeypatch.setenv("EFFKERN_INT8_QUANTIZATION", "separate")
    qw, scale = ek.quantize_int8(outlier_weight(48, 64))
    x, b = torch.randn(70, 64, dtype=torch.float16), torch.randn(48, dtype=torch.float16)
    with ek.use_backend("triton"):
        y = ek.int8_linear(x, qw, scale, b)
    assert tma_launches == [(70, 64)]
    assert torch.equal(y, int8_linear_reference(x, qw, scale, b))


def test_calls_tma_cannot_take_keep_the_plain_kernels(tma_launches):
    """Few rows (split-K), rows not 16-byte aligned, a float A (W8A16), the backward's B = W."""
    needs_backend("triton")
    k = kernels()
    a, b = int8_pair(64, 48, 64)
    k.int8_matmul(a, b.t(), None, None, None, torch.int32)
    a, b = int8_pair(65, 48, 72)
    k.int8_matmul(a, b.t(), None, None, None, torch.int32)
    k.int8_matmul(torch.randn(65, 64), int8_pair(1, 48, 64)[1].t(), None, torch.rand(48), None, torch.float32)
    k.int8_matmul(torch.randn(65, 48), int8_pair(1, 48, 64)[1], None, torch.rand(48), None, torch.float32,
                  scale_k=True)
    assert tma_launches == []


@pytest.mark.parametrize("out", ["bf16", "fp32", "i32"])
def test_tma_gemm_compiles_onto_wgmma_and_tma(compile_for_gpu, out):
    """Every config the TMA GEMM may run with, compiled here for sm_90a: int8 wgmma, TMA copies,
    no spills. With a 32-bit output the staging tile is twice as big: float32 (int8_matmul's
    out_dtype) at the tiles up to 128 x 128, which fit, the int32 of int8_mm at the fixed one;
    the autotuner skips the bigger ones (and OUT_BYTES keys its choice by the output size)."""
    needs_backend("triton")
    from op_checks import assert_tma_gemm_compiles_for_hopper

    k = kernels()
    (bm, bn, bk, _), stages, warps = k._FIXED_TMA["gpu"]
    dequant = out != "i32"
    shapes = {"bf16": k._TMA_SHAPES, "fp32": [s for s in k._TMA_SHAPES if s[0] * s[1] <= 128 * 128],
              "i32": [(bm, bn, bk, stages, warps)]}[out]
    assert_tma_gemm_compiles_for_hopper(
        compile_for_gpu, "effkern.kernels.int8:int8_matmul_tma_kernel", shapes,
        dict(a_desc=("i8", "BLOCK_M", "BLOCK_K"), w_desc=("i8", "BLOCK_N", "BLOCK_K"),
             c_desc=(out, "BLOCK_M", "BLOCK_N")),
        dict(a_scale_ptr="*fp32", b_scale_ptr="*fp32", bias_ptr="*bf16", M="i32", N="i32", K="i32",
             NUM_PROGRAMS="i32"),
        dict(DEQUANT=dequant, SCALE_ROWS=dequant, SCALE_COLS=dequant, HAS_BIAS=dequant,
             OUT_BYTES={"bf16": 2, "fp32": 4, "i32": 4}[out]), r"s32\.s8\.s8", 0)


# ---------------------------------------------------------------------------- linear layers

def plain_quantize(t):
    """Per-row quantization as a PyTorch user writes it: (integer values in fp32 [..., K], fp32
    scales absmax / 127 [...]). Rows of zeros are not handled (the inputs here are random)."""
    scale = t.float().abs().amax(-1) / 127
    return torch.round(t.float() / scale[..., None]).clamp(-127, 127), scale


def plain_pytorch_w8a8(x, w, b):
    """What a PyTorch user writes for the same quantization: per-channel weight and per-token
    activation scales, fp32 matmul of the integer values, dequantize, add bias."""
    qw, ws = plain_quantize(w)
    qx, xs = plain_quantize(x)
    return ((qx @ qw.t()) * xs[..., None] * ws + b.float()).to(x.dtype)


def plain_pytorch_w8a16(x, w, b):
    qw, ws = plain_quantize(w)
    return F.linear(x, (qw * ws[:, None]).to(x.dtype), b)


PLAIN = {"w8a8": plain_pytorch_w8a8, "w8a16": plain_pytorch_w8a16}


def quantized_linear_float64(mode, x, w, b):
    """The quantized layer's exact output: plain_quantize's integers and scales, dequantized
    (exactly: 8-bit times 24-bit products) and multiplied in float64. W8A8 quantizes x too."""
    qw, ws = (t.double() for t in plain_quantize(w))
    if mode == "w8a8":
        qx, xs = (t.double() for t in plain_quantize(x))
        x = qx * xs[..., None]
    return F.linear(x.double(), qw * ws[:, None], b.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", ODD_M)
@pytest.mark.parametrize("K", ODD_K)
def test_linear_error_is_that_of_the_quantization(backend, mode, dtype, M, K, poison_empty):
    """Against the float linear (float64) on outlier weights, effkern's error exceeds that of
    a plain PyTorch implementation of the same quantization by at most rounding."""
    needs_backend(backend)
    N = 40
    torch.manual_seed(M + K)
    w = outlier_weight(N, K).to(dtype)  # the layer's weight, in the activations' dtype
    x = torch.randn(M, K).to(dtype)
    b = torch.randn(N).to(dtype)
    qw, scale = ek.quantize_int8(w)
    with ek.use_backend(backend):
        y = LINEAR_OPS[mode](x, qw, scale, b)
    assert y.dtype == dtype and y.shape == (M, N)
    exact = F.linear(x.double(), w.double(), b.double())
    assert_matches_float64(y, exact, PLAIN[mode](x, w, b), reduction=K, factor=1.0,  # no worse than plain PyTorch
                           apart=(N // 2,))


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("M,K", [(1, 100), (17, 4100)])
def test_the_quantization_check_rejects_wrong_results(mode, M, K):
    """The check above, against wrong results: with the outlier weight row's column held apart
    (without it, its 50x size was every column's slack, and all three of these passed)."""
    N = 40
    torch.manual_seed(M + K)
    w, x, b = outlier_weight(N, K).half(), torch.randn(M, K).half(), torch.randn(N).half()
    qw, scale = ek.quantize_int8(w)
    with ek.use_backend("reference"):
        y = LINEAR_OPS[mode](x, qw, scale, b)
    exact, plain = F.linear(x.double(), w.double(), b.double()), PLAIN[mode](x, w, b)
    check = functools.partial(assert_matches_float64, exact=exact, torch_same=plain, reduction=K, factor=1.0,
                              apart=(N // 2,))
    check(y)
    for wrong in (y - b, y.index_fill(1, torch.tensor([3]), 0), F.linear(x, w)):  # no bias, a column lost, no quantization
        with pytest.raises(AssertionError):
            check(wrong)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K", [(1, 4100), (17, 100), (129, 24)])
def test_w8a16_matches_float64_on_the_dequantized_weight(backend, M, K, poison_empty):
    """W8A16 computes x @ (q * s)^T + b: within 2x PyTorch's error in the same precision."""
    needs_backend(backend)
    N = 33
    qw, scale = ek.quantize_int8(outlier_weight(N, K))
    x, b = torch.randn(M, K).half(), torch.randn(N).half()
    with ek.use_backend(backend):
        y = ek.int8_weight_only_linear(x, qw, scale, b)
    assert_linear_matches_float64(y, x, dequantize_int8(qw, scale, torch.float64),
                                  dequantize_int8(qw, scale, torch.float16), b, apart=(N // 2,))


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("M", ODD_M)
@pytest.mark.parametrize("K", ODD_K)
def test_reference_in_bfloat16_matches_the_quantization_in_float64(mode, M, K):
    """bf16 activations on the reference backend (the interpreter cannot run bf16 tl.dot, so the
    triton backend in bf16 is tested on a GPU): against the same quantization in float64, within
    2x the error of plain PyTorch in bf16."""
    N = 40
    torch.manual_seed(M + K)
    w = outlier_weight(N, K).bfloat16()
    x, b = torch.randn(M, K).bfloat16(), torch.randn(N).bfloat16()
    qw, scale = ek.quantize_int8(w)
    with ek.use_backend("reference"):
        y = LINEAR_OPS[mode](x, qw, scale, b)
    assert y.dtype == torch.bfloat16
    assert_matches_float64(y, quantized_linear_float64(mode, x, w, b), PLAIN[mode](x, w, b), reduction=K,
                           apart=(N // 2,))


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_triton_matches_reference_backend(mode):
    """Same quantization and accumulation: the two backends agree to fp32 rounding."""
    needs_backend("triton")
    torch.manual_seed(3)
    qw, scale = ek.quantize_int8(outlier_weight(24, 56))
    x, b = torch.randn(2, 9, 56), torch.randn(24)
    with ek.use_backend("triton"):
        y = LINEAR_OPS[mode](x, qw, scale, b)
    with ek.use_backend("reference"):
        expected = LINEAR_OPS[mode](x, qw, scale, b)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    if mode == "w8a8":
        assert torch.equal(y, int8_linear_reference(x, qw, scale, b))


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_in_16_bits_is_the_float32_result_rounded_once(mode, dtype):
    """The reference computes in float32 whatever the activations' dtype (the float32 scales
    included, not rounded to 16 bits first) and rounds once to the output's dtype."""
    torch.manual_seed(4)
    qw, scale = ek.quantize_int8(outlier_weight(40, 100))
    x, b = torch.randn(17, 100).to(dtype), torch.randn(40).to(dtype)
    with ek.use_backend("reference"):
        y = LINEAR_OPS[mode](x, qw, scale, b)
        assert torch.equal(y, LINEAR_OPS[mode](x.float(), qw, scale, b.float()).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize_rounds_the_float32_product_once(dtype):
    qw, scale = ek.quantize_int8(outlier_weight(40, 100))
    assert torch.equal(dequantize_int8(qw, scale, dtype), (qw.float() * scale[:, None]).to(dtype))


def test_w8a8_in_bfloat16_through_the_interpreter():
    """bf16 activations on the int8 path (no bf16 tl.dot involved, so the interpreter runs it)."""
    needs_backend("triton")
    qw, scale = ek.quantize_int8(outlier_weight(20, 48))
    x, b = torch.randn(7, 48).bfloat16(), torch.randn(20).bfloat16()
    with ek.use_backend("triton"):
        y = ek.int8_linear(x, qw, scale, b)
    assert y.dtype == torch.bfloat16
    xq, xs = quantize_rows_reference(x)
    exact32 = (xq.int() @ qw.int().t()).float() * xs[:, None] * scale + b.float()
    assert_rounded_from(y, exact32)


def _strided_inputs(device="cpu"):
    """(name, x [..., 30]): views made on ``device`` (copying a view to another device may make it
    contiguous)."""
    torch.manual_seed(5)
    return [
        ("x transposed", torch.randn(30, 7, device=device).t()),
        ("x column slice", torch.randn(7, 60, device=device)[:, ::2]),
        ("3-D x, permuted", torch.randn(30, 2, 3, device=device).permute(1, 2, 0)),
        ("1-D x", torch.randn(30, device=device)),
        ("zero-stride x", torch.randn(1, 30, device=device).expand(4, 30)),
        ("empty batch", torch.randn(0, 30, device=device)),
    ]


def assert_fused_quantization_gives_the_same_bits(x, qweight, weight_scale, bias, monkeypatch):
    """int8_linear on the triton backend gives the same bits with the activations quantized inside
    the GEMM as with the separate quantization pass."""
    outs = {}
    for quantization in ("separate", "fused"):
        monkeypatch.setenv("EFFKERN_INT8_QUANTIZATION", quantization)
        with ek.use_backend("triton"):
            outs[quantization] = ek.int8_linear(x, qweight, weight_scale, bias)
    assert torch.equal(outs["fused"], outs["separate"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", ODD_M)
@pytest.mark.parametrize("K", ODD_K)
def test_fused_quantization_gives_the_same_bits(dtype, M, K, monkeypatch, poison_empty):
    """W8A8 with the activations quantized inside the GEMM equals the separate quantization pass
    bit for bit: outlier weights, a row of zeros (scale 0), split-K included (M <= 64)."""
    N = 40
    qw, scale = ek.quantize_int8(outlier_weight(N, K))
    x = torch.randn(M, K).to(dtype)
    x[M // 2] = 0
    assert_fused_quantization_gives_the_same_bits(x, qw, scale, torch.randn(N).to(dtype), monkeypatch)


@pytest.mark.parametrize("split_k", [2, 5])
def test_fused_quantization_split_k_and_empty_k(split_k):
    k = kernels()
    qw, scale = ek.quantize_int8(outlier_weight(24, 300))
    x = torch.randn(7, 300)
    xq, xs = k.quantize_rows_int8(x)
    separate = k.int8_matmul(xq, qw.t(), xs, scale, None, torch.float32, split_k=split_k)
    assert torch.equal(k.int8_matmul(x, qw.t(), None, scale, None, torch.float32, split_k=split_k, quantize_a=True),
                       separate)
    b = torch.randn(24)
    assert torch.equal(k.int8_matmul(torch.randn(3, 0), qw[:, :0].t(), None, scale, b, torch.float32,
                                     quantize_a=True), b.expand(3, 24))


def test_quantization_choice(monkeypatch):
    from effkern import _policy
    from effkern import int8 as int8_module

    monkeypatch.setenv("EFFKERN_INT8_QUANTIZATION", "sometimes")
    with pytest.raises(ValueError, match="EFFKERN_INT8_QUANTIZATION.*'sometimes'"):
        int8_module.w8a8_quantization()
    monkeypatch.delenv("EFFKERN_INT8_QUANTIZATION")
    assert int8_module.w8a8_quantization() == "auto"
    # auto: the measured winner of the nearest W8A8 shape on this GPU model, else separate
    entries = ({"dtype": "bfloat16", "quant": "w8a8", "M": 1, "N": 4096, "K": 4096, "fwd": "fused"},
               {"dtype": "bfloat16", "quant": "w8a8", "M": 4096, "N": 4096, "K": 4096, "fwd": "separate"},
               {"dtype": "bfloat16", "quant": "w8a16", "M": 8, "N": 4096, "K": 4096, "fwd": "separate"})
    monkeypatch.setattr(_policy, "_entries", lambda op, gpu: entries if (op, gpu) == ("int8", "GPU X") else ())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    measured = int8_module._measured_quantization.__wrapped__
    cuda = torch.device("cuda", 0)
    assert measured(cuda, torch.bfloat16, 8, 4096, 4096) == "fused"
    assert measured(cuda, torch.bfloat16, 2048, 4096, 4096) == "separate"
    assert measured(cuda, torch.float16, 8, 4096, 4096) == "separate"  # nothing measured in fp16
    assert measured(torch.device("cpu"), torch.bfloat16, 8, 4096, 4096) == "separate"


def assert_any_strides_and_ranks(backend, mode, x):
    """The linear op on x (any view), a non-contiguous int8 weight and a strided bias equals the
    reference on contiguous copies."""
    qw, scale = ek.quantize_int8(outlier_weight(12, 30, device=x.device))
    qw_t = qw.t().contiguous().t()  # a non-contiguous int8 weight too
    b = torch.randn(24, device=x.device)[::2]
    with ek.use_backend(backend):
        y = LINEAR_OPS[mode](x, qw_t, scale, b)
    reference = int8_linear_reference if mode == "w8a8" else int8_weight_only_linear_reference
    assert y.shape == (*x.shape[:-1], 12)
    torch.testing.assert_close(y, reference(x.contiguous(), qw, scale, b.contiguous()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@parametrize_by_name(_strided_inputs())
def test_any_strides_and_ranks(backend, mode, case, poison_empty):
    needs_backend(backend)
    assert_any_strides_and_ranks(backend, mode, _strided_inputs()[case][1])


def assert_empty_dimensions_like_f_linear(backend, mode, M, N, K, device):
    """Sizes F.linear accepts: no tokens, no outputs, or K = 0 (the output is the bias); forward
    and backward."""
    qw, scale = ek.quantize_int8(torch.randn(N, K, device=device))
    x = torch.randn(M, K, device=device, requires_grad=True)
    b = torch.randn(N, device=device, requires_grad=True)
    with ek.use_backend(backend):
        y = LINEAR_OPS[mode](x, qw, scale, b)
        y.sum().backward()
    assert torch.equal(y, b.detach().expand(M, N)) if K == 0 else y.shape == (M, N)
    assert torch.equal(x.grad, torch.zeros(M, K, device=device)) if N == 0 else x.grad.shape == (M, K)
    assert torch.equal(b.grad, torch.full((N,), float(M), device=device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("M,N,K", [(0, 4, 5), (3, 0, 5), (3, 4, 0)])
def test_empty_dimensions_like_f_linear(backend, mode, M, N, K, poison_empty):
    needs_backend(backend)
    assert_empty_dimensions_like_f_linear(backend, mode, M, N, K, "cpu")


# ---------------------------------------------------------------------------- autograd

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_goes_through_the_dequantized_weight(backend, mode, dtype, poison_empty):
    needs_backend(backend)
    K, N = 100, 40
    qw, scale = ek.quantize_int8(outlier_weight(N, K))
    x = torch.randn(3, 5, K).to(dtype).requires_grad_()
    b = torch.randn(N).to(dtype).requires_grad_()
    grad = torch.randn(3, 5, N).to(dtype)
    with ek.use_backend(backend):
        LINEAR_OPS[mode](x, qw, scale, b).backward(grad)
    assert x.grad.dtype == dtype
    assert_matches_float64(x.grad, grad.double() @ dequantize_int8(qw, scale, torch.float64),
                           grad @ dequantize_int8(qw, scale, dtype), reduction=N)
    torch.testing.assert_close(b.grad.double(), grad.double().sum((0, 1)), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("M,K", [(1, 24), (1, 100), (17, 24), (17, 100)])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_backward_kernel_on_odd_shapes_and_strides(mode, M, K, strided, monkeypatch, poison_empty):
    """The triton backward (through the interpreter) on sizes no multiple of a tile (M = 1 takes
    the split-K launch), also with a column-sliced input and a transposed grad_out: grad_input
    and grad_bias against float64 through the dequantized weight."""
    needs_backend("triton")
    N = 12
    qw, scale = ek.quantize_int8(outlier_weight(N, K, seed=M + K))
    x = (torch.randn(M, 2 * K)[:, ::2] if strided else torch.randn(M, K)).requires_grad_()
    grad = torch.randn(N, M).t() if strided else torch.randn(M, N)
    b = torch.randn(N, requires_grad=True)
    launches = record_gemm_launches(monkeypatch)
    with ek.use_backend("triton"):
        LINEAR_OPS[mode](x, qw, scale, b).backward(grad)
    assert launches[-1] == (M, N)  # the backward GEMM ran, on grad_out
    assert_matches_float64(x.grad, grad.double() @ dequantize_int8(qw, scale, torch.float64),
                           grad @ dequantize_int8(qw, scale, torch.float32), reduction=N, what="grad_input")
    assert_matches_float64(b.grad, grad.double().sum(0), grad.sum(0), reduction=M, what="grad_bias")


def test_w8a16_reference_gradcheck():
    qw, scale = ek.quantize_int8(torch.randn(5, 7))
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    with ek.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda x, b: ek.int8_weight_only_linear(x, qw, scale, b), (x, b))


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_float64_on_the_reference_backend_is_the_quantization_in_float64(mode):
    """float64 activations (the reference backend's own path, for gradcheck): the same
    quantization, dequantized and multiplied in float64, bias included; its gradient as in
    the other dtypes."""
    torch.manual_seed(0)
    w = outlier_weight(6, 24).double()
    x = torch.randn(2, 3, 24, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    qw, scale = ek.quantize_int8(w)
    grad = torch.randn(2, 3, 6, dtype=torch.float64)
    with ek.use_backend("reference"):
        y = LINEAR_OPS[mode](x, qw, scale, b)
        y.backward(grad)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, quantized_linear_float64(mode, x.detach(), w, b.detach()))
    torch.testing.assert_close(x.grad, grad @ dequantize_int8(qw, scale, torch.float64))
    torch.testing.assert_close(b.grad, grad.sum((0, 1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients(backend):
    needs_backend(backend)
    qw, scale = ek.quantize_int8(torch.randn(6, 8))
    x, b = torch.randn(4, 8), torch.randn(6, requires_grad=True)
    with ek.use_backend(backend):
        ek.int8_linear(x, qw, scale, b).sum().backward()
    assert x.grad is None and torch.equal(b.grad, torch.full((6,), 4.0))


def test_weight_gradient_is_a_clear_error():
    qw, scale = ek.quantize_int8(torch.randn(6, 8))
    x = torch.randn(4, 8, requires_grad=True)
    for op in LINEAR_OPS.values():
        with pytest.raises(RuntimeError, match="quantized weight is frozen"):
            op(x, qw, scale.clone().requires_grad_())
    with pytest.raises(RuntimeError, match="only Tensors of floating point"):
        qw.float().to(torch.int8).requires_grad_()  # an int8 weight cannot ask for a gradient at all


@pytest.mark.parametrize("split_k", [1, 3])
def test_backward_kernel_split_k(split_k):
    """grad_input = g @ (q * s): the kernel with scales along the reduction, split or not."""
    needs_backend("triton")
    qw, scale = ek.quantize_int8(outlier_weight(70, 30))
    g = torch.randn(2, 70)
    out = kernels().int8_matmul(g, qw, None, scale, None, torch.float32, scale_k=True, split_k=split_k)
    torch.testing.assert_close(out, g @ dequantize_int8(qw, scale, torch.float32), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- GPU tiles, in the interpreter

# A GPU runs the GEMMs at the tiles of their autotuning configs and of the fixed and split-K "gpu"
# configs, the interpreter at small ones; a bug that shows only at a GPU's tile (an edge mask, a
# partial last K step, a slice boundary, a TMA box) would wait for a GPU run. So each distinct GPU
# tile also runs here, as the interpreter's (stages and warps mean nothing to the interpreter).
def _gpu_tiles() -> list[tuple[str, tuple[int, int, int]]]:
    k = kernels()
    tiles = []
    for path, shapes, fixed in (("per tile", k._GEMM_SHAPES, k._FIXED), ("tma", k._TMA_SHAPES, k._FIXED_TMA)):
        blocks = dict.fromkeys([shape[:3] for shape in shapes] + [fixed["gpu"][0][:3]])
        tiles += [(path, b) for b in blocks]
    return tiles + [("split-k", k._SPLIT["gpu"][0][:3])]


@pytest.mark.parametrize("path,tile", _gpu_tiles(), ids=[f"{p}-{'x'.join(map(str, t))}" for p, t in _gpu_tiles()])
def test_every_gpu_tile_is_exact_in_the_interpreter(path, tile, monkeypatch, poison_empty):
    """At each GPU tile, on sizes that cross its edges and end K in a partial step: int8_mm's
    exact sums, the dequantized output rounded from them and, where the tile serves them (not
    TMA: int8 A only), the fused quantization's bits, W8A16 within 2x PyTorch's error and the
    backward's GEMM (scales along the reduction). Split-K: few rows, K over two slices."""
    needs_backend("triton")
    from effkern.kernels import _splitk

    k = kernels()
    bm, bn, bk = tile
    place = {"per tile": k._FIXED, "tma": k._FIXED_TMA, "split-k": k._SPLIT}[path]
    blocks = (*tile, 1 if path == "split-k" else 8)
    monkeypatch.setitem(place, "interpreter", (blocks, 1, 4))
    monkeypatch.setenv("EFFKERN_TRITON_TMA", "1" if path == "tma" else "0")
    launches = {"per tile": record_calls(monkeypatch, _splitk, "launch", lambda a, _: tile_of(a[5]["interpreter"])),
                "tma": record_calls(monkeypatch, k, "launch_persistent", lambda a, _: tile_of(a[7]["interpreter"])),
                "split-k": record_calls(monkeypatch, _splitk, "run_split_k", lambda a, _: (*tile_of(a[3]), a[4] > 1))}
    M, N, K = {"per tile": (max(bm, _splitk.SPLIT_MAX_ROWS) + 3, bn + 5, 2 * bk + 20),
               "tma": (bm + 3, bn + 8, 2 * bk + 16),  # int8 rows of 16-byte multiples
               "split-k": (5, 2 * bn + 5, 3 * bk + 40)}[path]
    split_k = 3 if path == "split-k" else None
    a, b = int8_pair(M, N, K)
    acc = a.int() @ b.int().t()
    assert torch.equal(k.int8_matmul(a, b.t(), None, None, None, torch.int32, split_k=split_k), acc)
    a_scale, b_scale, bias = _scales_and_bias(M, N)
    out = k.int8_matmul(a, b.t(), a_scale, b_scale, bias, torch.float16, split_k=split_k)
    assert_dequantized_from(out, acc, a_scale, b_scale, bias)
    calls = 2
    if path != "tma":
        w = outlier_weight(N, K)
        qw, scale = ek.quantize_int8(w)
        x = torch.randn(M, K)
        xq, xs = k.quantize_rows_int8(x)
        assert torch.equal(
            k.int8_matmul(x, qw.t(), None, scale, bias, torch.float32, split_k=split_k, quantize_a=True),
            k.int8_matmul(xq, qw.t(), xs, scale, bias, torch.float32, split_k=split_k))
        w16, w64 = dequantize_int8(qw, scale, torch.float16), dequantize_int8(qw, scale, torch.float64)
        x16 = x.half()
        assert_linear_matches_float64(k.int8_matmul(x16, qw.t(), None, scale, bias, torch.float16, split_k=split_k),
                                      x16, w64, w16, bias, apart=(N // 2,))
        g = torch.randn(M, N)
        assert_matches_float64(k.int8_matmul(g, qw, None, scale, None, torch.float32, scale_k=True, split_k=split_k),
                               g.double() @ w64, g @ dequantize_int8(qw, scale, torch.float32), reduction=N)
        calls = 6
    assert launches[path] == [(*blocks, True) if path == "split-k" else blocks] * calls


# ---------------------------------------------------------------------------- registration

def sample_inputs(requires_grad=False, device="cpu", dtype=torch.float32):
    """(op, args) for every int8 op: ranks 1-3, with and without bias, activations in ``dtype``."""
    torch.manual_seed(0)
    for lead, N, K, bias in [((), 5, 7, True), ((3,), 6, 4, False), ((2, 3), 5, 9, True)]:
        x = torch.randn(*lead, K, device=device, dtype=dtype, requires_grad=requires_grad)
        qw, scale = ek.quantize_int8(torch.randn(N, K, device=device))
        b = torch.randn(N, device=device, dtype=dtype, requires_grad=requires_grad) if bias else None
        yield torch.ops.effkern.int8_linear.default, (x, qw, scale, b)
        yield torch.ops.effkern.int8_weight_only_linear.default, (x, qw, scale, b)
        if not requires_grad:
            xq, xs = ek.quantize_per_token_int8(x)
            yield torch.ops.effkern.quantize_per_token_int8.default, (x,)
            yield torch.ops.effkern.int8_matmul.default, (xq, qw, xs, scale, b, torch.float16)
            yield torch.ops.effkern.int8_mm.default, (xq.reshape(-1, K), qw)
            grad = torch.randn(*lead, N, device=device, dtype=dtype)
            yield torch.ops.effkern.int8_linear_bwd.default, (grad, qw, scale, [True, bias])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, requires_grad):
    assert_opcheck_passes(backend, sample_inputs(requires_grad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_torch_compile_fullgraph_forward_backward(backend, mode):
    assert_compiles_like_eager(ek.nn.Int8Linear.from_linear(torch.nn.Linear(24, 40), mode=mode), backend)


def assert_quantize_and_matmul_compile_in_one_graph(backend, device):
    """quantize_per_token_int8 then int8_matmul under ``backend``: one graph, no break, and the
    torch.compile(fullgraph=True) result equals eager mode's."""
    torch._dynamo.reset()
    qw, scale = ek.quantize_int8(torch.randn(10, 12, device=device))

    def fn(x):
        xq, xs = ek.quantize_per_token_int8(x)
        return ek.int8_matmul(xq, qw, xs, scale, out_dtype=torch.float32) * 2

    x = torch.randn(6, 12, device=device)
    with ek.use_backend(backend):
        explanation = torch._dynamo.explain(fn)(x)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), fn(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_quantize_and_matmul_have_no_graph_break(backend, monkeypatch):
    needs_backend(backend)
    launches = record_gemm_launches(monkeypatch) if backend == "triton" else None
    assert_quantize_and_matmul_compile_in_one_graph(backend, "cpu")
    assert launches is None or launches, "the triton kernels did not run"


def assert_autocast_casts_input_and_bias_not_the_scales(device):
    """Under torch.autocast(bf16), the linear ops on float32 input and bias (also with the bias
    already in bf16, as F.linear takes such a mix) give the bits of the same op called on bf16
    copies of them (a cast float32 scale would be an error); outside it, the mix is a TypeError."""
    qw, scale = ek.quantize_int8(torch.randn(6, 8, device=device))
    x, b = torch.randn(4, 8, device=device), torch.randn(6, device=device)
    for op in LINEAR_OPS.values():
        want = op(x.bfloat16(), qw, scale, b.bfloat16())
        for bias in (b, b.bfloat16()):
            with torch.autocast(device, dtype=torch.bfloat16):
                y = op(x, qw, scale, bias)
            assert y.dtype == torch.bfloat16
            assert torch.equal(y, want)
        with pytest.raises(TypeError, match="bias has dtype torch.bfloat16 but input has torch.float32"):
            op(x, qw, scale, b.bfloat16())


def test_autocast_casts_input_and_bias_not_the_scales():
    assert_autocast_casts_input_and_bias_not_the_scales("cpu")


# ---------------------------------------------------------------------------- errors

def _bad_calls():
    qw, scale = ek.quantize_int8(torch.randn(6, 8))
    x = torch.randn(4, 8)
    return [
        ("scale shape", (x, qw, scale[:5], None), ValueError, r"weight_scale must have shape \[N\] = \[6\]"),
        ("scale as a column", (x, qw, scale[:, None], None), ValueError, r"weight_scale must have shape \[N\] = \[6\]"),
        ("scale dtype", (x, qw, scale.half(), None), TypeError, "weight_scale must be float32"),
        ("float weight as qweight", (x, torch.randn(6, 8), scale, None), TypeError, "must be int8 .*quantize_int8"),
        ("K mismatch", (torch.randn(4, 9), qw, scale, None), ValueError, "K=9 does not match qweight's K=8"),
        ("qweight rank", (x, qw[0], scale, None), ValueError, r"qweight must be 2-D"),
        ("bias shape", (x, qw, scale, torch.randn(5)), ValueError, r"bias must have shape \[N\] = \[6\]"),
        ("bias dtype", (x, qw, scale, torch.randn(6).half()), TypeError, "bias has dtype torch.float16"),
        ("int input", (x.int(), qw, scale, None), TypeError, "input must be float16, bfloat16 or float32"),
        ("scalar input", (torch.tensor(1.0), qw, scale, None), ValueError, "input must have shape"),
        ("devices", (x, qw.to("meta"), scale, None), RuntimeError, "qweight is on meta"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@parametrize_by_name(_bad_calls())
def test_bad_inputs_raise_clear_errors(backend, mode, case):
    assert_bad_call_raises(backend, LINEAR_OPS[mode], _bad_calls()[case])


def _device_mismatch_calls(device="cpu", other="meta"):
    """(name, op, args, message): calls with one tensor on ``other`` and the rest on ``device``."""
    qw, scale = quantize_rows_reference(torch.randn(6, 8, device=device))
    x, b = torch.randn(4, 8, device=device), torch.randn(6, device=device)
    xq, xs = quantize_rows_reference(x)
    return [
        ("w8a8 weight_scale", ek.int8_linear, (x, qw, scale.to(other), b),
         f"weight_scale is on {other} but input is on {device}"),
        ("w8a16 bias", ek.int8_weight_only_linear, (x, qw, scale, b.to(other)), f"bias is on {other} but input"),
        ("int8_matmul b_q", ek.int8_matmul, (xq, qw.to(other), xs, scale), f"b_q is on {other} but a_q is on {device}"),
        ("int8_matmul a_scale", ek.int8_matmul, (xq, qw, xs.to(other), scale), f"a_scale is on {other} but a_q"),
        ("int8_mm b", ek.int8_mm, (xq, qw.to(other)), f"b is on {other} but a is on {device}"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@parametrize_by_name(_device_mismatch_calls())
def test_device_mismatch_is_a_clear_error(backend, case):
    name, op, args, message = _device_mismatch_calls()[case]
    assert_bad_call_raises(backend, op, (name, args, RuntimeError, message))


def _bad_matmul_calls():
    a, b = int8_pair(4, 6, 8)
    a_scale, b_scale = torch.rand(4), torch.rand(6)
    return [
        ("b_scale shape", (a, b, a_scale, b_scale[:5]), ValueError, r"b_scale must have shape \[N\] = \[6\]"),
        ("b_scale dtype", (a, b, a_scale, b_scale.double()), TypeError, "b_scale must be float32"),
        ("float b_q", (a, b.float(), a_scale, b_scale), TypeError, "b_q must be int8 .*quantize_int8"),
        ("K mismatch", (a, b[:, :7], a_scale, b_scale), ValueError,
         "a_q's last dimension K=8 does not match b_q's K=7"),
        ("float a_q", (a.float(), b, a_scale, b_scale), TypeError, "a_q must be int8"),
        ("a_scale shape", (a, b, a_scale[:3], b_scale), ValueError, r"a_scale must have shape \(4,\)"),
        ("a_scale as a column", (a, b, a_scale[:, None], b_scale), ValueError, r"a_scale must have shape \(4,\)"),
        ("bias shape", (a, b, a_scale, b_scale, torch.randn(5)), ValueError, r"bias must have shape \[N\] = \[6\]"),
        ("out_dtype", (a, b, a_scale, b_scale, None, torch.int32), TypeError, "out_dtype must be"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [ek.int8_matmul, torch.ops.effkern.int8_matmul], ids=["function", "registered op"])
@parametrize_by_name(_bad_matmul_calls())
def test_bad_int8_matmul_inputs_raise_clear_errors(backend, op, case):
    assert_bad_call_raises(backend, op, _bad_matmul_calls()[case])


def test_bad_mm_and_quantize_inputs():
    a, b = int8_pair(4, 6, 8)
    with pytest.raises(ValueError, match="K must match"):
        ek.int8_mm(a, b[:, :7])
    with pytest.raises(TypeError, match="b must be int8"):
        ek.int8_mm(a, b.float())
    with pytest.raises(ValueError, match=r"2-D \[N, K\] weight"):
        ek.quantize_int8(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="input must be float16"):
        ek.quantize_per_token_int8(a)


def test_backends_without_int8_kernels_are_clear_errors():
    qw, scale = ek.quantize_int8(torch.randn(6, 8))
    with ek.use_backend("cuda"), pytest.raises(RuntimeError, match="no C\\+\\+ ones"):
        ek.int8_linear(torch.randn(2, 8), qw, scale)
    needs_backend("triton")
    with ek.use_backend("triton"), pytest.raises(TypeError, match="float64 runs on the reference"):
        ek.int8_weight_only_linear(torch.randn(2, 8, dtype=torch.float64), qw, scale)


# ---------------------------------------------------------------------------- nn module

def assert_module_round_trips(mode, device):
    """Int8Linear.from_linear on ``device`` computes the linear op on the quantized weight; a
    fresh layer loaded from its state_dict computes the same bits. Runs on the backend in use."""
    linear = torch.nn.Linear(32, 24, device=device)
    layer = ek.nn.Int8Linear.from_linear(linear, mode=mode)
    assert layer.bias is linear.bias and layer.qweight.dtype == torch.int8
    assert layer.qweight.device == layer.weight_scale.device == linear.weight.device
    x = torch.randn(2, 5, 32, device=device)
    y = layer(x)
    assert torch.equal(y, LINEAR_OPS[mode](x, *ek.quantize_int8(linear.weight), linear.bias))
    state = layer.state_dict()
    assert set(state) == {"qweight", "weight_scale", "bias"}
    fresh = ek.nn.Int8Linear(32, 24, mode=mode, device=device)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), y)
    assert torch.equal(fresh.dequantized_weight(torch.float64),
                       layer.qweight.double() * layer.weight_scale.double()[:, None])
    no_bias = ek.nn.Int8Linear.from_linear(torch.nn.Linear(32, 24, bias=False, device=device), mode=mode)
    assert no_bias.bias is None and no_bias(x).shape == (2, 5, 24)


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_int8_linear_module_and_state_dict_round_trip(mode):
    assert_module_round_trips(mode, "cpu")
    assert mode in repr(ek.nn.Int8Linear(32, 24, mode=mode))
    with pytest.raises(ValueError, match="mode"):
        ek.nn.Int8Linear(4, 4, mode="w4a16")
    with pytest.raises(TypeError, match="nn.Linear"):
        ek.nn.Int8Linear.from_linear(torch.nn.Conv1d(1, 1, 1))


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_linear_module_cast_to_a_16_bit_model_keeps_its_float32_scale(mode, dtype):
    """model.half() / model.to(bf16) on a quantized model: the bias follows, the scale stays the
    exact float32 the ops take (a cast scale was a TypeError at the next call), the layer then
    computes the op in that dtype, and a float32 checkpoint loads into it."""
    layer = ek.nn.Int8Linear.from_linear(torch.nn.Linear(32, 24), mode=mode)
    qweight, scale = layer.qweight.clone(), layer.weight_scale.clone()
    for cast in (lambda m: m.to(dtype), lambda m: m.half().to(dtype) if dtype == torch.bfloat16 else m.half()):
        model = cast(copy.deepcopy(layer))
        assert model.bias.dtype == dtype
        assert torch.equal(model.weight_scale, scale) and model.weight_scale.dtype == torch.float32
        assert torch.equal(model.qweight, qweight)
        assert torch.equal(model.dequantized_weight(), dequantize_int8(qweight, scale, dtype))  # the bias's dtype
        x = torch.randn(3, 32).to(dtype)
        assert torch.equal(model(x), LINEAR_OPS[mode](x, qweight, scale, model.bias.detach()))
        model.load_state_dict(layer.state_dict())
        assert model.weight_scale.dtype == torch.float32 and model.bias.dtype == dtype
    assert copy.deepcopy(layer).to("meta").weight_scale.device.type == "meta"  # device moves apply


def test_int8_linear_module_fine_tunes_the_bias_only():
    torch.manual_seed(0)
    layer = ek.nn.Int8Linear.from_linear(torch.nn.Linear(16, 8), mode="w8a16")
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["bias"]
    assert_fine_tuning_lowers_the_loss(layer, torch.randn(32, 16), torch.randn(32, 8), steps=20)


# ---------------------------------------------------------------------------- GPU code, compiled here
# The interpreter runs the kernels' logic; these compile them for sm_80 and sm_90 without a GPU
# and check what the GPU would run: tensor-core instructions of the right type, rounding that
# the compiler kept, tiles that fit in shared memory.

GEMM_TYPES = dict(M="i32", N="i32", K="i32", K_PER_SPLIT="i32", stride_am="i32", stride_ak="i32",
                  stride_bk="i32", stride_bn="i32", stride_cs="i32", stride_cm="i32", stride_cn="i32",
                  b_ptr="*i8", a_scale_ptr="*fp32", b_scale_ptr="*fp32")


def _gemm_variant(a, out, bias="*bf16", **flags):
    types = dict(GEMM_TYPES, a_ptr=a, c_ptr=out, bias_ptr=bias)
    constexprs = dict(A_INT8=a == "*i8", QUANT_A=False, SCALE_K=False, DEQUANT=True, SCALE_ROWS=a == "*i8",
                      SCALE_COLS=True, HAS_BIAS=True, DOT_PRECISION="tf32", EVEN_K=False, GROUP_M=8)
    constexprs.update(flags)
    return types, constexprs


GEMM_VARIANTS = {
    # name: (types, constexprs, PTX tensor-core instruction expected on sm_80 / sm_90)
    "w8a8 bf16": (*_gemm_variant("*i8", "*bf16"), r"mma.*s32\.s8\.s8"),
    "w8a8 fused bf16": (*_gemm_variant("*bf16", "*bf16", QUANT_A=True), r"mma.*s32\.s8\.s8"),
    "int8_mm int32": (*_gemm_variant("*i8", "*i32", DEQUANT=False, SCALE_ROWS=False, SCALE_COLS=False,
                                     HAS_BIAS=False), r"mma.*s32\.s8\.s8"),
    "w8a16 bf16": (*_gemm_variant("*bf16", "*bf16"), r"mma.*f32\.bf16\.bf16"),
    "w8a16 fp16": (*_gemm_variant("*fp16", "*fp16", bias="*fp16"), r"mma.*f32\.f16\.f16"),
    "backward bf16": (*_gemm_variant("*bf16", "*bf16", SCALE_K=True, SCALE_COLS=False, HAS_BIAS=False),
                      r"mma.*f32\.bf16\.bf16"),
}


def _launch_configs():
    """The tile configs the launcher uses on a GPU: the fixed one, the split-K one, and the
    largest autotuning candidate."""
    from effkern.kernels._splitk import tile_kwargs

    k = kernels()
    return {"fixed": tile_kwargs(k._FIXED["gpu"]), "split-k": tile_kwargs(k._SPLIT["gpu"]),
            "autotune 128x256": tile_kwargs(((128, 256, 128, 8), 3, 8))}


def _request(kernel, types, constexprs, cc=90, num_warps=4, num_stages=3, module="int8", unit_strides=(),
             any_value=("M",)):
    """A compile request for the kernel as a contiguous, aligned launch specializes it (aligned_launch)."""
    launch = aligned_launch(types, unit_strides, any_value)
    return dict(kernel=f"effkern.kernels.{module}:{kernel}", types=launch["types"], divisible=launch["divisible"],
                constexprs={**constexprs, **launch["constexprs"]}, cc=cc, num_warps=num_warps, num_stages=num_stages)


def _gemm_requests():
    """(variant, cc, config name) -> request: every variant on both GPUs at the fixed config,
    and W8A8 on sm_90 at every config the launcher uses."""
    configs = _launch_configs()
    out = {}
    for variant, (types, constexprs, _) in GEMM_VARIANTS.items():
        for cc in (80, 90):
            for name, cfg in configs.items():
                if name == "fixed" or (cc, variant) == (90, "w8a8 bf16"):
                    blocks = {key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
                    # B = W^T (unit stride along K) forward, W itself (along N) in the backward
                    unit_b = "stride_bn" if constexprs["SCALE_K"] else "stride_bk"
                    out[f"{variant}|{cc}|{name}"] = _request("int8_matmul_kernel", types, {**constexprs, **blocks},
                                                             cc, cfg["num_warps"], cfg["num_stages"],
                                                             unit_strides=("stride_ak", unit_b, "stride_cn"))
    return out


QUANTIZE_TYPES = dict(q_ptr="*i8", scale_ptr="*fp32", R="i32", K="i32",
                      stride_xr="i32", stride_xk="i32", stride_qr="i32", stride_qk="i32")
REDUCE_TYPES = dict(part_ptr="*i32", a_scale_ptr="*fp32", b_scale_ptr="*fp32", bias_ptr="*bf16", c_ptr="*bf16",
                    M="i32", N="i32", SPLITS="i32", stride_ps="i32", stride_pm="i32", stride_cm="i32", stride_cn="i32")


@pytest.fixture(scope="module")
def compiled_for_gpus(compile_for_gpu):
    needs_backend("triton")
    requests = _gemm_requests()
    for dtype in ("*bf16", "*fp32"):
        requests[f"quantize {dtype}"] = _request("quantize_rows_int8_kernel", dict(QUANTIZE_TYPES, x_ptr=dtype),
                                                 dict(BLOCK_R=4, BLOCK_K=1024), unit_strides=("stride_xk", "stride_qk"),
                                                 any_value=("R",))
    requests["reduce"] = _request("splitk_reduce_kernel", REDUCE_TYPES,
                                  dict(WIDE=True, DEQUANT=True, SCALE_ROWS=True, SCALE_COLS=True, HAS_BIAS=True,
                                       BLOCK_M=16, BLOCK_N=64), module="_splitk", unit_strides=("stride_cn",))
    return compile_for_gpu(requests)


@pytest.mark.parametrize("key", list(_gemm_requests()) if ek.backend_available("triton", "cpu")[0] else [])
def test_gemm_compiles_for_gpus_onto_tensor_cores(compiled_for_gpus, key):
    import re

    variant, cc, config_name = key.split("|")
    compiled = compiled_for_gpus[key]
    mma = GEMM_VARIANTS[variant][2]
    assert re.search(mma, compiled["ptx"]), f"{key}: no {mma} in the PTX"
    if cc == "90" and _launch_configs()[config_name]["BLOCK_M"] >= 64:
        assert "wgmma" in compiled["ptx"], f"{key}: Hopper's wgmma not used"
    assert compiled["shared"] <= SHARED_LIMIT[int(cc)], (key, compiled["shared"])


def test_splitk_reduce_adds_in_int64_on_a_gpu(compiled_for_gpus):
    assert "add.s64" in compiled_for_gpus["reduce"]["ptx"]


@pytest.mark.parametrize("kernel", ["quantize *bf16", "quantize *fp32", "w8a8 fused bf16|80|fixed",
                                    "w8a8 fused bf16|90|fixed"])
def test_quantization_keeps_its_rounding_on_a_gpu(compiled_for_gpus, kernel):
    """The GPU code (the quantization kernel, and the GEMM that quantizes its tiles) divides
    correctly rounded (div.rn, not the approximate division) and keeps both halves of the
    round-half-even trick (v + 1.5 * 2^23) - 1.5 * 2^23."""
    lines = compiled_for_gpus[kernel]["ptx"].upper().splitlines()
    assert any("DIV.RN.F32" in line for line in lines)
    assert not any("DIV.APPROX" in line or "DIV.FULL" in line for line in lines)
    added = sum("ADD.F32" in line and "0F4B400000" in line for line in lines)
    subtracted = sum(("ADD.F32" in line and "0FCB400000" in line) or ("SUB.F32" in line and "0F4B400000" in line)
                     for line in lines)
    assert added and added == subtracted, (added, subtracted)


# ---------------------------------------------------------------------------- GPU

@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 4096), (5, 100), (129, 4100), (4096, 1024)])
def test_gpu_quantize_per_token_matches_reference(dtype, shape):
    x = torch.randn(*shape, device="cuda").to(dtype)
    x[1:2] = 0  # an all-zero token (scale 0, q 0), where there is more than one
    with ek.use_backend("triton"):
        q, scale = ek.quantize_per_token_int8(x)
    # the rule, computed on the CPU (correctly rounded division), and the reference backend on CUDA
    q_rule, scale_rule = quantize_rows_reference(x.cpu())
    assert torch.equal(scale.cpu(), scale_rule) and torch.equal(q.cpu(), q_rule)
    q_ref, scale_ref = quantize_rows_reference(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref), "the reference on CUDA rounds differently"


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("M", ODD_M + (256,))
@pytest.mark.parametrize("K", ODD_K)
def test_gpu_int8_mm_is_exact(M, K):
    a, b = int8_pair(M, 520, K, device="cuda")
    with ek.use_backend("triton"):
        c = ek.int8_mm(a, b)
    assert torch.equal(c.cpu(), a.cpu().int() @ b.cpu().int().t())


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M", ODD_M + (2048,))
@pytest.mark.parametrize("K", ODD_K)
def test_gpu_linear_error_is_that_of_the_quantization(mode, dtype, M, K, poison_empty):
    N = 264
    w = outlier_weight(N, K, device="cuda").to(dtype)
    x = torch.randn(M, K, device="cuda").to(dtype)
    b = torch.randn(N, device="cuda").to(dtype)
    qw, scale = ek.quantize_int8(w)
    with ek.use_backend("triton"):
        y = LINEAR_OPS[mode](x, qw, scale, b)
    exact = F.linear(x.double(), w.double(), b.double())
    assert_matches_float64(y, exact, PLAIN[mode](x, w, b), reduction=K, factor=1.0,  # no worse than plain PyTorch
                           apart=(N // 2,))


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("M", (1, 16, 100, 2048))
@pytest.mark.parametrize("autotune", ["0", "1"])
def test_gpu_fused_quantization_gives_the_same_bits(M, autotune, monkeypatch):
    monkeypatch.setenv("EFFKERN_TRITON_AUTOTUNE", autotune)
    K, N = 4100, 520
    qw, scale = ek.quantize_int8(outlier_weight(N, K, device="cuda"))
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    x[M // 2] = 0
    assert_fused_quantization_gives_the_same_bits(
        x, qw, scale, torch.randn(N, device="cuda", dtype=torch.bfloat16), monkeypatch)


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("index", range(5))
def test_gpu_every_tma_config_is_exact(index, monkeypatch, tma_launches):
    """Each config the TMA GEMM's autotuner may pick, run as the fixed config, on sizes no
    multiple of any tile: int8_mm exact, and the dequantized bf16 output rounded from the exact
    sums (int32 outputs at the biggest tiles do not fit shared memory: the autotuner skips them,
    so they are tried with bf16 only)."""
    k = kernels()
    bm, bn, bk, stages, warps = k._TMA_SHAPES[index]
    monkeypatch.setenv("EFFKERN_TRITON_AUTOTUNE", "0")
    monkeypatch.setitem(k._FIXED_TMA, "gpu", ((bm, bn, bk, 8), stages, warps))
    M, N, K = 1000, 520, 4112
    a, b = int8_pair(M, N, K, device="cuda")
    acc = a.cpu().int() @ b.cpu().int().t()
    if bm * bn <= 128 * 128:
        assert torch.equal(k.int8_matmul(a, b.t(), None, None, None, torch.int32).cpu(), acc)
    a_scale, b_scale, bias = (t.cuda() for t in _scales_and_bias(M, N))
    out = k.int8_matmul(a, b.t(), a_scale, b_scale, bias.bfloat16(), torch.bfloat16)
    assert_dequantized_from(out.cpu(), acc, a_scale.cpu(), b_scale.cpu(), bias.bfloat16().cpu())
    assert len(tma_launches) == (2 if bm * bn <= 128 * 128 else 1)


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_gpu_backward_and_autotuned_configs(mode, monkeypatch):
    monkeypatch.setenv("EFFKERN_TRITON_AUTOTUNE", "1")
    K, N = 1024, 768
    qw, scale = ek.quantize_int8(outlier_weight(N, K, device="cuda"))
    for M in (1, 16, 512):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        with ek.use_backend("triton"):
            y = LINEAR_OPS[mode](x, qw, scale)
            y.backward(grad)
        if mode == "w8a8":  # exact int32 sums of the per-token quantized rows, then the scales
            xq, xs = ek.quantize_per_token_int8(x.detach())
            assert_dequantized_from(y, int8_accumulate_reference(xq, qw), xs, scale)
        else:
            assert_linear_matches_float64(y, x.detach(), dequantize_int8(qw, scale, torch.float64),
                                          dequantize_int8(qw, scale, torch.bfloat16), apart=(N // 2,))
        assert_matches_float64(x.grad, grad.double() @ dequantize_int8(qw, scale, torch.float64),
                               grad @ dequantize_int8(qw, scale, torch.bfloat16), reduction=N)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("M", [1, 100])  # split-K (two kernels, a partial buffer), one program per tile
def test_gpu_cuda_graph_replays_like_eager(mode, M):
    K, N = 4096, 768  # K >= 2048 for M = 1 to split (choose_split_k: 4 slices on 114-132 SMs; 1024 gave 1)
    qw, scale = ek.quantize_int8(outlier_weight(N, K, device="cuda"))
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)

    def inputs(seed):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed))
        return [x.to("cuda", torch.bfloat16).requires_grad_()]

    assert_cuda_graph_replays_like_eager("triton", lambda x: LINEAR_OPS[mode](x, qw, scale, b), inputs)


@pytest.mark.gpu
def test_gpu_opcheck_compile_and_autocast(monkeypatch):
    """On CUDA tensors, with the Triton kernels: torch.library.opcheck of every int8 op in bf16,
    quantize_per_token_int8 then int8_matmul compiled in one graph, and autocast (auto backend)."""
    with ek.use_backend("triton"):
        for requires_grad in (False, True):
            for op, args in sample_inputs(requires_grad, "cuda", torch.bfloat16):
                torch.library.opcheck(op, args)
    launches = record_gemm_launches(monkeypatch)
    assert_quantize_and_matmul_compile_in_one_graph("triton", "cuda")
    assert_autocast_casts_input_and_bias_not_the_scales("cuda")
    assert launches, "the triton kernels did not run"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_gpu_compiled_training_step_like_eager(mode):
    """Int8Linear under torch.compile(fullgraph=True) on CUDA in bf16: the output and the input
    and bias gradients of eager mode."""
    torch._dynamo.reset()
    layer = ek.nn.Int8Linear.from_linear(torch.nn.Linear(256, 512, device="cuda", dtype=torch.bfloat16), mode=mode)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    results = []
    with ek.use_backend("triton"):
        for fn in (torch.compile(layer, fullgraph=True), layer):
            x_grad = x.clone().requires_grad_()
            y = fn(x_grad)
            y.float().square().mean().backward()
            results.append((y, x_grad.grad, layer.bias.grad))
            layer.zero_grad(set_to_none=True)
    (y, x_grad, b_grad), (y_eager, x_grad_eager, b_grad_eager) = results
    assert torch.equal(y, y_eager)
    torch.testing.assert_close(x_grad, x_grad_eager)
    torch.testing.assert_close(b_grad, b_grad_eager)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@parametrize_by_name(_strided_inputs())
def test_gpu_any_strides_and_ranks(mode, case, poison_empty):
    assert_any_strides_and_ranks("triton", mode, _strided_inputs("cuda")[case][1])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("M,N,K", [(0, 4, 5), (3, 0, 5), (3, 4, 0)])
def test_gpu_empty_dimensions_like_f_linear(mode, M, N, K, poison_empty):
    assert_empty_dimensions_like_f_linear("triton", mode, M, N, K, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
def test_gpu_int8_linear_module_round_trip_on_the_auto_backend(mode, monkeypatch):
    launches = record_gemm_launches(monkeypatch)
    assert_module_round_trips(mode, "cuda")
    assert launches, "auto did not run the triton kernels on CUDA"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@parametrize_by_name(_device_mismatch_calls())
def test_gpu_device_mismatch_is_a_clear_error(backend, case):
    name, op, args, message = _device_mismatch_calls("cuda", "cpu")[case]
    assert_bad_call_raises(backend, op, (name, args, RuntimeError, message))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 80])  # split-K for few rows; more rows: K split only to stay exact
def test_gpu_int8_matmul_accumulates_past_the_int32_range(M):
    assert_accumulates_past_the_int32_range(M, "cuda")
