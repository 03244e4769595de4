"""W8A8 on a 2:4 sparse int8 weight. The Triton kernel: kernels/sparse24.py's
sparse24_int8_matmul (the Triton fallback's kernel with A_INT8, through the interpreter on CPU)
against the int8 family's reference on the dense weight; its exact int32 accumulation and K
slices; the kernel compiled for GPUs onto int8 tensor cores. The op: effkern.sparse24_int8_linear
is int8_linear on the decompressed weight (forward, backward, registration, compile, autocast,
errors, Sparse24Int8Linear); GPU (-m gpu): both kernels, the CUDA one on the sparse tensor cores
(mma.sp m16n8k64 .s8), against the exact sums."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

import effkern as ek
from effkern.int8 import dequantize_int8, int8_accumulate_reference, int8_linear_reference, quantize_rows_reference
from effkern.sparse24 import compress_24_reference, decompress_24_reference

from op_checks import (SHARED_LIMIT, aligned_launch, assert_bad_call_raises, assert_compiles_like_eager,
                       assert_cuda_graph_replays_like_eager, assert_dequantized_from, assert_exports_like_eager,
                       assert_opcheck_passes, needs_backend, parametrize_by_name, record_calls, rounded_from)

ODD_M = (1, 3, 17, 130)
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def kernels():
    needs_backend("triton")
    from effkern.kernels import sparse24

    return sparse24


def sparse_int8_weight(N, K, kept=None):
    """A random 2:4 sparse int8 weight [N, K], two random positions of every group of 4 kept, and
    its compressed form: (w, values, meta). The kept entries are random over the whole int8 range
    (zeros among them: groups with fewer nonzeros), or drawn from ``kept`` (a list of values)."""
    keep = torch.rand(N, K // 4, 4).argsort(-1)[..., :2]
    mask = torch.zeros(N, K // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).view(N, K)
    if kept is None:
        entries = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    else:
        entries = torch.tensor(kept, dtype=torch.int8)[torch.randint(len(kept), (N, K))]
    w = torch.where(mask, entries, torch.zeros_like(entries))
    return (w, *compress_24_reference(w))


def int8_activations(M, K, values=None):
    """a_q int8 [M, K], random over the whole range (-128 included) or drawn from ``values``."""
    if values is None:
        return torch.randint(-128, 128, (M, K), dtype=torch.int8)
    return torch.tensor(values, dtype=torch.int8)[torch.randint(len(values), (M, K))]


def scales_and_bias(M, N, bias_dtype):
    """Per-token and per-channel scales as quantization gives them (one token's 0, as for an
    all-zero row), and a bias in ``bias_dtype`` (None: no bias)."""
    a_scale, w_scale = torch.rand(M) / 100, torch.rand(N) / 100
    a_scale[0] = 0
    return a_scale, w_scale, None if bias_dtype is None else torch.randn(N).to(bias_dtype)


def assert_matches_reference(out, a_q, w, a_scale, w_scale, bias):
    """out is int8_matmul's definition on the dense int8 w (op_checks.assert_dequantized_from)."""
    assert out.shape == (a_q.shape[0], w.shape[0])
    assert_dequantized_from(out, int8_accumulate_reference(a_q, w), a_scale, w_scale, bias)


# ---------------------------------------------------------------------------- the Triton kernel

def test_the_format_holds_int8_weights_exactly():
    """compress_24_reference / decompress_24_reference, on which these tests' reference rests."""
    w, values, meta = sparse_int8_weight(6, 40, kept=[-128, 127, 0, 1])
    assert values.dtype == torch.int8 and values.shape == (6, 20) and meta.shape == (6, 5)
    assert torch.equal(decompress_24_reference(values, meta), w)


@pytest.mark.parametrize("split_k", [None, 1, 2, 3])
@pytest.mark.parametrize("M", ODD_M)
@pytest.mark.parametrize("K", [72, 200])
def test_matches_the_int8_reference(K, M, split_k, poison_empty):
    """N = 40 and K = 72, 200 cross the interpreter's 32-wide tiles (K a multiple of 8, not of
    the tile); split_k None lets the launcher choose (a split for few rows), 1 forces one pass."""
    k = kernels()
    w, values, meta = sparse_int8_weight(40, K)
    a_q = int8_activations(M, K)
    a_scale, w_scale, bias = scales_and_bias(M, 40, torch.float32)
    out = k.sparse24_int8_matmul(a_q, a_scale, values, meta, w_scale, bias, torch.float32, split_k=split_k)
    assert out.dtype == torch.float32
    assert_matches_reference(out, a_q, w, a_scale, w_scale, bias)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("split_k", [1, 2])
def test_output_dtypes_with_and_without_bias(out_dtype, with_bias, split_k, poison_empty):
    """The bias in the output's dtype; added by the kernel (one pass) or by the reduction (split)."""
    k = kernels()
    w, values, meta = sparse_int8_weight(40, 200)
    a_q = int8_activations(17, 200)
    a_scale, w_scale, bias = scales_and_bias(17, 40, out_dtype if with_bias else None)
    out = k.sparse24_int8_matmul(a_q, a_scale, values, meta, w_scale, bias, out_dtype, split_k=split_k)
    assert out.dtype == out_dtype
    assert_matches_reference(out, a_q, w, a_scale, w_scale, bias)


@pytest.mark.parametrize("split_k", [1, 3])
def test_extreme_values_accumulate_exactly(split_k):
    """-128 and 127 everywhere a value is kept, K = 512: the sums, up to 256 * 128^2 = 2^22, come
    out exactly with unit scales (exact in fp32 too)."""
    k = kernels()
    extremes = [-128, 127]
    w, values, meta = sparse_int8_weight(40, 512, kept=extremes)
    a_q = int8_activations(3, 512, extremes)
    out = k.sparse24_int8_matmul(a_q, torch.ones(3), values, meta, torch.ones(40), None, torch.float32,
                                 split_k=split_k)
    assert torch.equal(out, int8_accumulate_reference(a_q, w).float())


def test_slices_of_at_most_max_exact_k(monkeypatch):
    """K slices are cut at MAX_EXACT_K_24 even where no split is asked for (split_k=1) or chosen
    (130 rows), and their int32 partials summed (in int64) to the same result."""
    k = kernels()
    from effkern.kernels import _splitk

    monkeypatch.setattr(k, "MAX_EXACT_K_24", 64)
    splits = record_calls(monkeypatch, _splitk, "run_split_k", lambda args, _: args[4])
    w, values, meta = sparse_int8_weight(40, 200)
    for M, split_k in ((130, None), (3, 1), (3, 2)):
        a_q = int8_activations(M, 200)
        a_scale, w_scale, bias = scales_and_bias(M, 40, torch.float16)
        out = k.sparse24_int8_matmul(a_q, a_scale, values, meta, w_scale, bias, torch.float16, split_k=split_k)
        assert_matches_reference(out, a_q, w, a_scale, w_scale, bias)
    assert splits == [4, 4, 4]  # ceil(200 / 64) slices each time


@pytest.mark.parametrize("max_exact_k", ["as defined", 2**18])
def test_sums_past_the_int32_range_are_sliced(max_exact_k, monkeypatch):
    """K = 2^18 and every kept product (-128)^2 (row 0): the sum, 2^17 * 2^14 = 2^31, is one past
    int32's range. Asked for one pass, the launcher still cuts K into slices whose int32 sums are
    exact; with MAX_EXACT_K_24 = 2^18 it would not, and the accumulator wraps to -2^31: the
    check sees that. Row 1, 127s: -2^31 + 2^24, within range either way."""
    k = kernels()
    if max_exact_k != "as defined":
        monkeypatch.setattr(k, "MAX_EXACT_K_24", max_exact_k)
    # 256 deep K steps instead of the interpreter's 32: 8x fewer interpreted loop iterations
    for place in (k._FIXED, k._SPLIT):
        monkeypatch.setitem(place, "interpreter", ((16, 32, 256, 1), 1, 4))
    K = 2**18
    w, values, meta = (torch.cat(rows) for rows in zip(*(sparse_int8_weight(1, K, kept=[v]) for v in (-128, 127))))
    a_q = torch.full((1, K), -128, dtype=torch.int8)
    out = k.sparse24_int8_matmul(a_q, torch.ones(1), values, meta, torch.ones(2), None, torch.float32, split_k=1)
    exact = int8_accumulate_reference(a_q, w)
    assert exact.tolist() == [[2.0**31, -(2.0**31) + 2**24]]
    if max_exact_k == "as defined":
        assert torch.equal(out, exact.float())
    else:
        assert out.tolist() == [[-(2.0**31), -(2.0**31) + 2**24]]


def test_empty_outputs():
    k = kernels()
    _, values, meta = sparse_int8_weight(40, 72)
    a_q = int8_activations(0, 72)
    out = k.sparse24_int8_matmul(a_q, torch.ones(0), values, meta, torch.ones(40), None, torch.bfloat16)
    assert out.shape == (0, 40) and out.dtype == torch.bfloat16
    a_q = int8_activations(3, 72)
    out = k.sparse24_int8_matmul(a_q, torch.ones(3), values[:0], meta[:0], torch.ones(0), None, torch.float16)
    assert out.shape == (3, 0) and out.dtype == torch.float16


@pytest.mark.parametrize("with_bias", [True, False])
def test_k_zero_gives_the_bias(with_bias, poison_empty):
    k = kernels()
    a_scale, w_scale, bias = scales_and_bias(3, 40, torch.float16 if with_bias else None)
    out = k.sparse24_int8_matmul(int8_activations(3, 0), a_scale, torch.zeros(40, 0, dtype=torch.int8),
                                 torch.zeros(40, 0, dtype=torch.uint8), w_scale, bias, torch.float16)
    assert torch.equal(out, (bias if with_bias else torch.zeros(40, dtype=torch.float16)).expand(3, 40))


@pytest.mark.parametrize("split_k", [1, 2])
def test_any_strides(split_k, poison_empty):
    """a_q a transposed view; values, meta, the scales and the bias non-contiguous."""
    k = kernels()
    w, values, meta = sparse_int8_weight(40, 200)
    a_q = int8_activations(200, 5).t()
    a_scale, w_scale, bias = (torch.stack((t, t), 1)[:, 0] for t in scales_and_bias(5, 40, torch.float32))
    out = k.sparse24_int8_matmul(a_q, a_scale, values.t().contiguous().t(), meta.t().contiguous().t(), w_scale,
                                 bias, torch.float32, split_k=split_k)
    assert_matches_reference(out, a_q, w, a_scale, w_scale, bias)


def test_a_wrong_metadata_reading_is_caught():
    """The check above fails for a kernel reading meta's two nibbles the other way round."""
    k = kernels()
    w, values, meta = sparse_int8_weight(40, 72)
    a_q = int8_activations(3, 72)
    a_scale, w_scale, bias = scales_and_bias(3, 40, torch.float32)
    swapped = (meta >> 4) | (meta << 4)
    out = k.sparse24_int8_matmul(a_q, a_scale, values, swapped, w_scale, bias, torch.float32)
    with pytest.raises(AssertionError, match="elements off"):
        assert_matches_reference(out, a_q, w, a_scale, w_scale, bias)


INT8_TYPES = dict(a_ptr="*i8", v_ptr="*i8", meta_ptr="*u8", a_scale_ptr="*fp32", w_scale_ptr="*fp32",
                  bias_ptr="*bf16", c_ptr="*bf16", M="i32", N="i32", K="i32", K_PER_SPLIT="i32", stride_am="i32",
                  stride_ak="i32", stride_vn="i32", stride_vk="i32", stride_metan="i32", stride_metak="i32",
                  stride_cs="i32", stride_cm="i32", stride_cn="i32")


@pytest.mark.parametrize("cc", [80, 90])
def test_int8_kernel_compiles_onto_int8_tensor_cores(compile_for_gpu, cc):
    """The kernel with A_INT8 at its fixed config (dequantizing, masked partial K tiles) and its
    split-K one (raw int32 partials into an int32 buffer), compiled for sm_<cc>: s8 x s8 -> s32
    mma instructions in the PTX, shared memory within the card."""
    from effkern.kernels._splitk import tile_kwargs

    k = kernels()
    launch = aligned_launch(INT8_TYPES, ("stride_ak", "stride_vk", "stride_metak", "stride_cn"))
    requests = {}
    for name, setting, flags, c_type in (("fixed", k._FIXED["gpu"], dict(DEQUANT=True, HAS_BIAS=True, EVEN_K=False),
                                          "*bf16"),
                                         ("split-k", k._SPLIT["gpu"], dict(DEQUANT=False, HAS_BIAS=False, EVEN_K=True),
                                          "*i32")):
        cfg = tile_kwargs(setting)
        blocks = {key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        requests[name] = dict(kernel="effkern.kernels.sparse24:sparse24_matmul_kernel",
                              types=dict(launch["types"], c_ptr=c_type), divisible=launch["divisible"],
                              constexprs=dict(A_INT8=True, DOT_PRECISION="tf32", **flags, **launch["constexprs"],
                                              **blocks),
                              cc=cc, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    for name, compiled in compile_for_gpu(requests).items():
        assert re.search(r"mma\S*\.s32\.s8\.s8", compiled["ptx"]), name
        assert compiled["shared"] <= SHARED_LIMIT[cc], name


# ---------------------------------------------------------------------------- the op (effkern.sparse24_int8_linear)

OP_BACKENDS = ["triton", "reference"]


def w8a8_24_layer(N, K, dtype=torch.float32, device="cpu", seed=0):
    """(float weight [N, K] pruned to 2:4, qweight int8, scale, values, meta): a layer-like weight
    pruned, quantized per output channel and compressed, as Sparse24Int8Linear.from_linear does."""
    g = torch.Generator().manual_seed(seed)
    w = ek.prune_24((torch.randn(N, K, generator=g) / K ** 0.5).to(device=device, dtype=dtype))
    qweight, scale = ek.quantize_int8(w)
    return (w, qweight, scale, *ek.compress_24(qweight))


def test_compress_keeps_a_quantized_2_4_weight_and_decompress_restores_it():
    """A pruned weight's zeros quantize to 0, so its int8 copy is still 2:4: compress_24 takes it
    (the C++ CPU kernel and the PyTorch reference give the same bits) and decompress_24 is exact."""
    _, qweight, _, values, meta = w8a8_24_layer(24, 72)
    assert values.dtype == torch.int8 and values.shape == (24, 36) and meta.shape == (24, 9)
    for backend in ("cuda", "reference"):
        needs_backend(backend)
        with ek.use_backend(backend):
            got = ek.compress_24(qweight)
            assert torch.equal(got[0], values) and torch.equal(got[1], meta)
            assert torch.equal(ek.decompress_24(values, meta), qweight)
    with pytest.raises(TypeError, match="weight must be a float tensor"):
        ek.prune_24(qweight)  # pruning is by float magnitudes: prune, then quantize


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 17, 130])
def test_op_is_int8_linear_on_the_decompressed_weight(backend, dtype, M, monkeypatch, poison_empty):
    """The definition: int8_linear on the dense int8 weight (the same per-token quantization, an
    exact int32 sum, the same fp32 dequantization), equal to within a rounding of the output
    dtype (fp32 only where the GPU fuses the last multiply and the add)."""
    needs_backend(backend)
    launches = (record_calls(monkeypatch, kernels(), "sparse24_int8_matmul", lambda args, _: tuple(args[0].shape))
                if backend == "triton" else [])
    N, K = 40, 72
    _, qweight, scale, values, meta = w8a8_24_layer(N, K, dtype, seed=M)
    x, b = torch.randn(M, K).to(dtype), torch.randn(N).to(dtype)
    with ek.use_backend(backend):
        y = ek.sparse24_int8_linear(x, values, meta, scale, b)
    assert launches == ([(M, K)] if backend == "triton" else [])  # the Triton kernel ran
    assert y.dtype == dtype and y.shape == (M, N)
    xq, xs = quantize_rows_reference(x)
    exact32 = (xq.int() @ qweight.int().t()).float() * xs[:, None] * scale + b.float()
    assert rounded_from(y, exact32).all()
    assert torch.equal(y, int8_linear_reference(x, qweight, scale, b)) or dtype == torch.bfloat16


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_error_against_the_float_layer_is_that_of_the_quantization(backend, poison_empty):
    """Against the float 2:4 layer in float64, the error is that of dense W8A8 on the same pruned
    weight (plain PyTorch quantization), no more."""
    needs_backend(backend)
    N, K, M = 48, 128, 9
    w, qweight, scale, values, meta = w8a8_24_layer(N, K, seed=1)
    x, b = torch.randn(M, K), torch.randn(N)
    with ek.use_backend(backend):
        y = ek.sparse24_int8_linear(x, values, meta, scale, b)
    exact = F.linear(x.double(), w.double(), b.double())
    plain = int8_linear_reference(x, qweight, scale, b)
    assert (y.double() - exact).abs().max() <= (plain.double() - exact).abs().max() * 1.0001 + 1e-6


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_leading_dims_and_strides(backend):
    needs_backend(backend)
    _, qweight, scale, values, meta = w8a8_24_layer(24, 64, seed=2)
    x = torch.randn(64, 2, 5).permute(1, 2, 0)  # [2, 5, 64], not contiguous
    with ek.use_backend(backend):
        y = ek.sparse24_int8_linear(x, values, meta, scale)
    assert y.shape == (2, 5, 24)
    assert torch.equal(y, int8_linear_reference(x, qweight, scale))


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_backward_is_int8_linears(backend):
    """Differentiable in input and bias, straight-through the activation quantization, as
    int8_linear (whose backward it runs on the dense int8 weight); the weight is frozen."""
    needs_backend(backend)
    _, qweight, scale, values, meta = w8a8_24_layer(24, 64, seed=3)
    x = torch.randn(2, 5, 64, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    grad = torch.randn(2, 5, 24)
    with ek.use_backend(backend):
        ek.sparse24_int8_linear(x, values, meta, scale, b).backward(grad)
        x2, b2 = x.detach().requires_grad_(), b.detach().requires_grad_()
        ek.int8_linear(x2, qweight, scale, b2).backward(grad)
    assert torch.equal(x.grad, x2.grad) and torch.equal(b.grad, b2.grad)
    with pytest.raises(RuntimeError, match="weight_scale requires grad"):
        ek.sparse24_int8_linear(x, values, meta, scale.requires_grad_(), b)


def op_samples(requires_grad: bool):
    for dtype, lead in ((torch.float32, (3,)), (torch.float16, (2, 3))):
        _, _, scale, values, meta = w8a8_24_layer(16, 64, dtype)
        x = torch.randn(*lead, 64, dtype=dtype, requires_grad=requires_grad)
        for bias in (None, torch.randn(16, dtype=dtype, requires_grad=requires_grad)):
            yield torch.ops.effkern.sparse24_int8_linear.default, (x, values, meta, scale, bias)
    # the format ops on an int8 weight (triton: the C++ CPU kernels; reference: PyTorch ops)
    yield torch.ops.effkern.compress_24.default, (decompress_24_reference(values, meta),)
    yield torch.ops.effkern.decompress_24.default, (values, meta)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, requires_grad):
    assert_opcheck_passes(backend, op_samples(requires_grad))


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_torch_compile_fullgraph_forward_backward(backend):
    assert_compiles_like_eager(ek.nn.Sparse24Int8Linear.from_linear(torch.nn.Linear(32, 40)), backend)


def test_autocast_casts_input_and_bias_not_the_scale():
    _, _, scale, values, meta = w8a8_24_layer(8, 16)
    x, b = torch.randn(4, 16), torch.randn(8)
    want = ek.sparse24_int8_linear(x.bfloat16(), values, meta, scale, b.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ek.sparse24_int8_linear(x, values, meta, scale, b)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    with pytest.raises(TypeError, match="bias has dtype torch.bfloat16 but input has torch.float32"):
        ek.sparse24_int8_linear(x, values, meta, scale, b.bfloat16())


def _bad_op_calls():
    _, _, scale, values, meta = w8a8_24_layer(8, 16)
    x = torch.randn(4, 16)
    return [
        ("float values", (x, values.float(), meta, scale, None), TypeError, "values must be int8"),
        ("meta shape", (x, values, meta[:, :1], scale, None), ValueError, r"meta must have shape \[N, ceil\(K / 8\)\]"),
        ("K mismatch", (torch.randn(4, 12), values, meta, scale, None), ValueError, "K=12 does not match"),
        ("scale shape", (x, values, meta, scale[:7], None), ValueError, r"weight_scale must have shape \[N\] = \[8\]"),
        ("scale as a column", (x, values, meta, scale[:, None], None), ValueError,
         r"weight_scale must have shape \[N\] = \[8\]"),
        ("scale dtype", (x, values, meta, scale.half(), None), TypeError, "weight_scale must be float32"),
        ("bias shape", (x, values, meta, scale, torch.randn(7)), ValueError, r"bias must have shape \[N\] = \[8\]"),
        ("int input", (x.int(), values, meta, scale, None), TypeError, "input must be float16, bfloat16 or float32"),
        ("devices", (x, values, meta, scale.to("meta"), None), RuntimeError, "weight_scale is on meta"),
    ]


@pytest.mark.parametrize("backend", OP_BACKENDS)
@parametrize_by_name(_bad_op_calls())
def test_bad_inputs_raise_clear_errors(backend, case):
    assert_bad_call_raises(backend, ek.sparse24_int8_linear, _bad_op_calls()[case])


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    needs_backend("cuda")
    _, _, scale, values, meta = w8a8_24_layer(16, 64)
    with ek.use_backend("cuda"), pytest.raises(RuntimeError, match="mma.sp CUDA kernel runs on CUDA tensors"):
        ek.sparse24_int8_linear(torch.randn(2, 64, dtype=torch.float16), values, meta, scale)


def test_module_from_linear_and_state_dict_round_trip():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 24)
    layer = ek.nn.Sparse24Int8Linear.from_linear(linear)
    assert layer.bias is linear.bias  # shared, not copied
    qweight, scale = ek.quantize_int8(ek.prune_24(linear.weight))
    x = torch.randn(2, 5, 32)
    y = layer(x)
    assert torch.equal(y, ek.int8_linear(x, qweight, scale, linear.bias))
    fresh = ek.nn.Sparse24Int8Linear(32, 24)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), y)
    assert set(layer.state_dict()) == {"values", "metadata", "weight_scale", "bias"}
    assert torch.equal(layer.dequantized_weight(torch.float64), qweight.double() * scale.double()[:, None])
    half = copy.deepcopy(layer).half()
    assert half.bias.dtype == torch.float16 and half.weight_scale.dtype == torch.float32
    assert torch.equal(half.dequantized_weight(), dequantize_int8(qweight, scale, torch.float16))  # the bias's dtype
    with pytest.raises(ValueError, match="2:4 sparse"):  # prune=False: the weight must be 2:4 already
        ek.nn.Sparse24Int8Linear.from_linear(torch.nn.Linear(8, 4), prune=False)
    with pytest.raises(ValueError, match="multiple of 4"):
        ek.nn.Sparse24Int8Linear(30, 4)


# ---------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_gpu_format_ops_on_an_int8_weight_give_the_cpu_bits():
    """compress_24 / decompress_24 of a CUDA int8 weight (PyTorch ops there) give the CPU
    reference's bits (which the C++ CPU kernels match: test_sparse24_cpu.py), -128 included."""
    w, values, meta = sparse_int8_weight(64, 200)
    got = ek.compress_24(w.cuda())
    assert torch.equal(got[0].cpu(), values) and torch.equal(got[1].cpu(), meta)
    assert torch.equal(ek.decompress_24(values.cuda(), meta.cuda()).cpu(), w)


GPU_SHAPES = [  # (M, N, K): the CUDA kernel's four tile configurations, split K, partial tiles
    (1, 4096, 4096), (8, 64, 1024), (13, 208, 320), (16, 1024, 2048), (40, 144, 128), (64, 256, 4096),
    (130, 128, 64), (1000, 512, 1536), (4096, 1024, 1024),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M, N, K", GPU_SHAPES)
def test_gpu_op_is_int8_linear_on_the_decompressed_weight(backend, dtype, M, N, K, poison_empty):
    """On the GPU, both kernels (the cuda backend: mma.sp m16n8k64 on the sparse tensor cores)
    against the definition: the exact sum (with split K too), dequantized in fp32 (GPU: the last
    multiply and the bias add may be one fma), rounded once to the output dtype. The shapes
    cover the CUDA kernel's four tile configurations, split K, partial tiles and K % 128 == 64."""
    needs_backend(backend, "cuda")
    _, qweight, scale, values, meta = w8a8_24_layer(N, K, dtype, "cuda", seed=M + N + K)
    x, b = torch.randn(M, K, device="cuda").to(dtype), torch.randn(N, device="cuda").to(dtype)
    with ek.use_backend(backend):
        y = ek.sparse24_int8_linear(x, values, meta, scale, b)
    xq, xs = quantize_rows_reference(x)
    # split K too: its exact slices are added in int64
    assert_dequantized_from(y, int8_accumulate_reference(xq, qweight), xs, scale, b)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [5, 70])  # the decode (split-K) and medium tiles
def test_gpu_cuda_kernel_sums_extreme_values_exactly(M, poison_empty):
    """+-127 at every kept position of W, x all 127 (quantized: 127, scale 1): sums up to
    1024 * 127^2, exact in the int32 accumulator and in its fp32 conversion (< 2^24), so y is
    the float64 sum rounded once to bf16."""
    needs_backend("cuda", "cuda")
    N, K = 64, 2048
    g = torch.Generator().manual_seed(M)
    sign = torch.randint(0, 2, (N, K), generator=g) * 2 - 1
    W = (ek.prune_24(torch.randn(N, K, generator=g)).ne(0) * sign * 127).to(torch.int8)
    values, meta = ek.compress_24(W.cuda())
    x = torch.full((M, K), 127.0, device="cuda", dtype=torch.bfloat16)
    with ek.use_backend("cuda"):
        y = ek.sparse24_int8_linear(x, values, meta, torch.ones(N, device="cuda"))
    exact = torch.full((M, K), 127.0, dtype=torch.float64) @ W.double().t()
    assert torch.equal(y.cpu(), exact.bfloat16())


@pytest.mark.gpu
@pytest.mark.parametrize("backend,M", [("triton", 1), ("triton", 100), ("cuda", 1), ("cuda", 100)])
def test_gpu_cuda_graph_replays_like_eager(backend, M):
    """The activation quantization, the GEMM and the backward (grad_input through the dequantized
    weight) captured; the CUDA backend's reordered weight is made by the warm-up."""
    N, K = 512, 1024
    _, _, scale, values, meta = w8a8_24_layer(N, K, torch.bfloat16, "cuda")
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)

    def inputs(seed):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed))
        return [x.to("cuda", torch.bfloat16).requires_grad_()]

    assert_cuda_graph_replays_like_eager(backend, lambda x: ek.sparse24_int8_linear(x, values, meta, scale, b),
                                         inputs)


def test_module_exports():
    """As Sparse24Linear's: exported alone, and inside a model torch.export.unflatten takes apart."""
    assert_exports_like_eager(ek.nn.Sparse24Int8Linear.from_linear(torch.nn.Linear(32, 24)), torch.randn(3, 32))


@pytest.mark.gpu
def test_gpu_auto_module_and_compile():
    needs_backend("triton", "cuda")
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, device="cuda", dtype=torch.bfloat16)
    layer = ek.nn.Sparse24Int8Linear.from_linear(linear)
    x = torch.randn(4, 7, 256, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    # the reference backend's bf16 output rounds the last multiply and the bias add apart; the GPU
    # compiler may fuse them into one fma: either rounding per element (assert_dequantized_from)
    xq, xs = quantize_rows_reference(x.reshape(-1, 256))
    acc = int8_accumulate_reference(xq, decompress_24_reference(layer.values, layer.meta))
    assert_dequantized_from(y.reshape(-1, 128), acc, xs, layer.weight_scale, layer.bias.detach())
    torch._dynamo.reset()
    assert torch.equal(torch.compile(layer, fullgraph=True)(x), y)
