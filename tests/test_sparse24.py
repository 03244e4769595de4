"""2:4 sparse: pruning, compression, the Triton fallback (through the interpreter on CPU),
autograd, registration, Sparse24Linear, errors. The mma.sp kernel: tests/test_sparse24_cuda.py;
the C++ CPU format kernels: tests/test_sparse24_cpu.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import effkern as ek
from effkern.sparse24 import (compress_24_reference, decompress_24_reference, prune_24_reference,
                              sparse24_linear_reference)

from op_checks import (assert_bad_call_raises, assert_compiles_like_eager, assert_compiles_onto_bf16_tensor_cores,
                       assert_cuda_graph_replays_like_eager, assert_fine_tuning_lowers_the_loss,
                       assert_linear_matches_float64, assert_opcheck_passes, needs_backend, parametrize_by_name)

BACKENDS = ["triton", "reference"]
ODD_M = (1, 3, 17, 130)
FORMAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def needs_cpp_format_ops():
    needs_backend("cuda")
    if not hasattr(torch.ops.effkern_C, "compress_24"):
        pytest.skip("effkern._C was built without the 2:4 CPU kernels")


def sparse_weight(N, K, dtype=torch.float32, device="cpu"):
    """A layer-like 2:4 sparse weight: random, pruned."""
    return prune_24_reference((torch.randn(N, K) / math.sqrt(K)).to(dtype)).to(device)


def compressed_sparse_weight(N, K, dtype=torch.float32, device="cpu"):
    """A sparse_weight and its compressed form: (w, values, meta)."""
    w = sparse_weight(N, K, dtype, device)
    return (w, *ek.compress_24(w))


# ---------------------------------------------------------------------------- pruning

@pytest.mark.parametrize("dtype", FORMAT_DTYPES)
def test_prune_keeps_the_two_largest_of_every_four(dtype):
    w = torch.randn(6, 40).to(dtype)
    pruned = ek.prune_24(w)
    groups, kept = w.view(6, 10, 4), pruned.view(6, 10, 4)
    assert ((kept != 0).sum(-1) <= 2).all()
    for n, g in itertools.product(range(6), range(10)):
        order = sorted(range(4), key=lambda p: (-abs(groups[n, g, p].item()), p))
        expected = torch.zeros(4, dtype=dtype)
        expected[order[:2]] = groups[n, g, order[:2]]
        assert torch.equal(kept[n, g], expected), (n, g)


def test_prune_ties_and_nan():
    """Equal magnitudes: the lower positions are kept. NaN counts as the largest."""
    w = torch.tensor([[1.0, -1.0, 1.0, 0.5, 2.0, 2.0, 2.0, 2.0],
                      [0.1, float("nan"), 3.0, 0.2, 0.0, 0.0, 0.0, 0.0]])
    pruned = ek.prune_24(w)
    assert torch.equal(pruned[0], torch.tensor([1.0, -1.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0]))
    assert pruned[1, 1].isnan() and pruned[1, 2] == 3.0 and (pruned[1, [0, 3]] == 0).all()
    assert (pruned[1, 4:] == 0).all()


# ---------------------------------------------------------------------------- compression

@pytest.mark.parametrize("dtype", FORMAT_DTYPES)
@pytest.mark.parametrize("N,K", [(1, 8), (5, 36), (16, 128), (3, 100)])
def test_compress_decompress_round_trip(dtype, N, K):
    w = sparse_weight(N, K, dtype)
    w[0, :4] = torch.tensor([0.0, 0.0, 0.0, 0.0])  # a group with no nonzero
    w[-1, -4:] = torch.tensor([0.0, 0.0, 0.5, 0.0])  # and one with a single nonzero
    values, meta = ek.compress_24(w)
    assert values.shape == (N, K // 2) and values.dtype == dtype
    assert meta.shape == (N, math.ceil(K / 8)) and meta.dtype == torch.uint8
    assert torch.equal(ek.decompress_24(values, meta), w)


def test_compressed_format_layout():
    """The documented layout, on one row: values in position order, codes i0 | i1 << 2, two
    groups per byte (low nibble first), the zeros of sparse groups at the lowest free positions."""
    w = torch.tensor([[0.0, 5.0, 0.0, 6.0,   7.0, 8.0, 0.0, 0.0,   0.0, 0.0, 0.0, 9.0]])
    values, meta = ek.compress_24(w)
    assert values.tolist() == [[5.0, 6.0, 7.0, 8.0, 0.0, 9.0]]
    codes = [1 | 3 << 2, 0 | 1 << 2, 0 | 3 << 2]
    assert meta.tolist() == [[codes[0] | codes[1] << 4, codes[2]]]


def test_compress_refuses_a_weight_that_is_not_2_4():
    w = sparse_weight(4, 16)
    w[2, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match=r"row 2, group 2 \(k = 8\.\.11\) has 3 nonzeros"):
        ek.compress_24(w)


@pytest.mark.parametrize("op", ["compress_24", "prune_24", "decompress_24"])
def test_format_ops_agree_across_backends(op):
    """The C++ CPU kernels (auto on CPU) and the PyTorch reference, bit for bit."""
    needs_cpp_format_ops()
    w = sparse_weight(33, 200, torch.bfloat16)
    args = {"compress_24": (w,), "prune_24": (torch.randn(33, 200),), "decompress_24": ek.compress_24(w)}[op]
    with ek.use_backend("cuda"):
        ours = getattr(ek, op)(*args)
    with ek.use_backend("reference"):
        reference = getattr(ek, op)(*args)
    for a, b in zip(ours if isinstance(ours, tuple) else (ours,), reference if isinstance(reference, tuple) else (reference,)):
        assert a.dtype == b.dtype and torch.equal(a, b)


# ---------------------------------------------------------------------------- the Triton fallback

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", ODD_M)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("K", [128, 100])
def test_sparse24_linear_matches_float64(backend, M, dtype, K, poison_empty):
    """Against float64 on the dense weight: within 2x PyTorch's error in the same precision."""
    needs_backend(backend)
    N = 40
    w, values, meta = compressed_sparse_weight(N, K, dtype)
    x, b = torch.randn(M, K).to(dtype), torch.randn(N).to(dtype)
    with ek.use_backend(backend):
        y = ek.sparse24_linear(x, values, meta, b)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_linear_matches_float64(y, x, w.double(), w, b)


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k(split_k, poison_empty):
    needs_backend("triton")
    from effkern.kernels import sparse24 as kernels

    w, values, meta = compressed_sparse_weight(24, 320)
    x, b = torch.randn(2, 320), torch.randn(24)
    out = kernels.sparse24_matmul(x, values, meta, b, split_k=split_k)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_strides(backend):
    needs_backend(backend)
    w, values, meta = compressed_sparse_weight(16, 64)
    values_t = values.t().contiguous().t()  # a non-contiguous values tensor
    b = torch.randn(32)[::2]
    for x in (torch.randn(2, 3, 64), torch.randn(64, 5).t(), torch.randn(64)):
        with ek.use_backend(backend):
            y = ek.sparse24_linear(x, values_t, meta, b)
        assert y.shape == (*x.shape[:-1], 16)
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- autograd

@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_gives_the_masked_weight_gradient(backend):
    needs_backend(backend)
    w, values, meta = compressed_sparse_weight(24, 64)
    values.requires_grad_()
    x = torch.randn(2, 5, 64, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    grad = torch.randn(2, 5, 24)
    with ek.use_backend(backend):
        ek.sparse24_linear(x, values, meta, b).backward(grad)
    dense = w.clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, dense, b.detach()).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    # d/dvalues = dL/dW at the kept positions: compress the dense gradient with W's pattern
    mask = ek.decompress_24(torch.ones_like(values), meta).bool()
    expected = dense.grad[mask].view(24, 32)
    torch.testing.assert_close(values.grad, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, grad.sum((0, 1)))


def test_reference_gradcheck():
    values, meta = ek.compress_24(sparse_weight(6, 16, torch.float64))
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    values.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v, b: ek.sparse24_linear(x, v, meta, b), (x, values, b))


def test_fine_tuning_keeps_the_pattern():
    torch.manual_seed(0)
    layer = ek.nn.Sparse24Linear.from_linear(torch.nn.Linear(32, 16), prune=True)
    meta = layer.meta.clone()
    assert_fine_tuning_lowers_the_loss(layer, torch.randn(64, 32), torch.randn(64, 16), steps=10)
    assert torch.equal(layer.meta, meta)
    dense = layer.dense_weight()
    assert ((dense.view(16, 8, 4) != 0).sum(-1) <= 2).all()


# ---------------------------------------------------------------------------- registration

def sample_inputs(requires_grad=False):
    for lead, N, K, bias in [((), 8, 16, True), ((3,), 4, 12, False), ((2, 3), 8, 32, True)]:
        values, meta = ek.compress_24(sparse_weight(N, K))
        values.requires_grad_(requires_grad)
        x = torch.randn(*lead, K, requires_grad=requires_grad)
        b = torch.randn(N, requires_grad=requires_grad) if bias else None
        yield torch.ops.effkern.sparse24_linear.default, (x, values, meta, b)
        if not requires_grad:
            w = sparse_weight(N, K)
            yield torch.ops.effkern.prune_24.default, (torch.randn(N, K),)
            yield torch.ops.effkern.compress_24.default, (w,)
            yield torch.ops.effkern.decompress_24.default, (values, meta)
            grad = torch.randn(*lead, N)
            yield torch.ops.effkern.sparse24_linear_bwd.default, (grad, x, values, meta, [True, True, bias])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, requires_grad):
    assert_opcheck_passes(backend, sample_inputs(requires_grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_forward_backward(backend):
    assert_compiles_like_eager(ek.nn.Sparse24Linear.from_linear(torch.nn.Linear(64, 32)), backend)


def test_autocast_casts_input_values_and_bias():
    values, meta = ek.compress_24(sparse_weight(8, 32))
    x, b = torch.randn(4, 32), torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ek.sparse24_linear(x, values, meta, b)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, sparse24_linear_reference(x.bfloat16(), values.bfloat16(), meta, b.bfloat16()))


# ---------------------------------------------------------------------------- errors

def _bad_calls():
    values, meta = ek.compress_24(sparse_weight(8, 32))
    x = torch.randn(3, 32)
    return [
        ("meta shape", (x, values, meta[:, :3]), ValueError, r"meta must have shape \[N, ceil\(K / 8\)\] = \[8, 4\]"),
        ("meta dtype", (x, values, meta.int()), TypeError, "meta must be uint8"),
        ("K mismatch", (torch.randn(3, 36), values, meta), ValueError, "K=36 does not match the weight's K=32"),
        ("dtype mismatch", (x.half(), values, meta), TypeError, "values has dtype torch.float32 but input has"),
        ("bias shape", (x, values, meta, torch.randn(7)), ValueError, r"bias must have shape \[N\] = \[8\]"),
        ("odd values", (x, values[:, :15], meta), ValueError, "values must be 2-D"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@parametrize_by_name(_bad_calls())
def test_bad_inputs_raise_clear_errors(backend, case):
    assert_bad_call_raises(backend, ek.sparse24_linear, _bad_calls()[case])


def test_bad_format_inputs():
    with pytest.raises(ValueError, match="K=30 must be a multiple of 4"):
        ek.prune_24(torch.randn(4, 30))
    with pytest.raises(ValueError, match="2-D"):
        ek.compress_24(torch.randn(16))
    values, meta = ek.compress_24(sparse_weight(2, 16))
    bad = meta.clone()
    bad[1, 1] = 0x33  # code 0b0011: positions 3 and 0, not ascending
    with ek.use_backend("reference"), pytest.raises(ValueError, match="meta row 1, group 2"):
        ek.decompress_24(values, bad)
    with ek.use_backend("cuda"), pytest.raises(RuntimeError, match="mma.sp CUDA kernel runs on CUDA tensors"):
        ek.sparse24_linear(torch.randn(2, 16), values, meta)


# ---------------------------------------------------------------------------- nn module

def test_sparse24_linear_module_and_state_dict():
    linear = torch.nn.Linear(64, 24)
    layer = ek.nn.Sparse24Linear.from_linear(linear, prune=True)
    assert layer.bias is linear.bias
    assert torch.equal(layer.dense_weight(), ek.prune_24(linear.weight))
    x = torch.randn(2, 5, 64)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, ek.prune_24(linear.weight), linear.bias))
    state = layer.state_dict()
    assert set(state) == {"values", "meta", "bias"}
    fresh = ek.nn.Sparse24Linear(64, 24)
    torch.testing.assert_close(fresh(x), fresh.bias.expand(2, 5, 24))  # the initial weight is zero
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), y)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        ek.nn.Sparse24Linear.from_linear(torch.nn.Linear(64, 24), prune=False)
    with pytest.raises(ValueError, match="multiple of 4"):
        ek.nn.Sparse24Linear(30, 8)


# ---------------------------------------------------------------------------- GPU code, compiled here

SPARSE_TYPES = dict(a_ptr="*bf16", v_ptr="*bf16", meta_ptr="*u8", bias_ptr="*bf16", c_ptr="*bf16",
                    M="i32", N="i32", K="i32", K_PER_SPLIT="i32", stride_am="i32", stride_ak="i32", stride_vn="i32",
                    stride_vk="i32", stride_metan="i32", stride_metak="i32", stride_cs="i32", stride_cm="i32",
                    stride_cn="i32")


@pytest.mark.parametrize("cc", [80, 90])
def test_triton_fallback_compiles_for_gpus(compile_for_gpu, cc):
    needs_backend("triton")
    from effkern.kernels import sparse24 as kernels
    from effkern.kernels._splitk import tile_kwargs

    configs = {"fixed": tile_kwargs(kernels._FIXED["gpu"]), "split-k": tile_kwargs(kernels._SPLIT["gpu"])}
    assert_compiles_onto_bf16_tensor_cores(compile_for_gpu, "effkern.kernels.sparse24:sparse24_matmul_kernel",
                                           SPARSE_TYPES, dict(HAS_BIAS=True, DOT_PRECISION="tf32", EVEN_K=True),
                                           configs, cc,
                                           unit_strides=("stride_ak", "stride_vk", "stride_metak", "stride_cn"))


# ---------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("M", ODD_M + (1024,))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_float64(backend, M, dtype, poison_empty):
    """Through the op: the Triton fallback on an N that is no multiple of a tile, and the mma.sp
    kernel (reordered metadata; the kernel alone: tests/test_sparse24_cuda.py)."""
    needs_backend(backend, "cuda")
    N, K = (520 if backend == "triton" else 512), 4096
    w, values, meta = compressed_sparse_weight(N, K, dtype, device="cuda")
    x, b = torch.randn(M, K, device="cuda").to(dtype), torch.randn(N, device="cuda").to(dtype)
    with ek.use_backend(backend):
        y = ek.sparse24_linear(x, values, meta, b)
    assert_linear_matches_float64(y, x, w.double(), w, b)


@pytest.mark.gpu
def test_gpu_format_ops_match_the_reference():
    w = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    pruned = ek.prune_24(w)
    assert torch.equal(pruned.cpu(), prune_24_reference(w.cpu()))
    values, meta = ek.compress_24(pruned)
    expected = compress_24_reference(pruned.cpu())
    assert torch.equal(values.cpu(), expected[0]) and torch.equal(meta.cpu(), expected[1])
    assert torch.equal(ek.decompress_24(values, meta).cpu(), decompress_24_reference(*expected))


@pytest.mark.gpu
@pytest.mark.parametrize("backend,M", [("triton", 1), ("triton", 100), ("cuda", 1), ("cuda", 100)])
def test_gpu_cuda_graph_replays_like_eager(backend, M):
    """The CUDA backend's reordered weight is made by the warm-up, before the capture."""
    N, K = 512, 1024
    _, values, meta = compressed_sparse_weight(N, K, torch.bfloat16, device="cuda")
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)

    def inputs(seed):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed))
        return [x.to("cuda", torch.bfloat16).requires_grad_()]

    assert_cuda_graph_replays_like_eager(backend, lambda x: ek.sparse24_linear(x, values, meta, b), inputs)
