"""2:4 sparse: pruning, compression, the Triton fallback (through the interpreter on CPU),
autograd, registration, auto's backend choice, Sparse24Linear, errors. The mma.sp kernel:
tests/test_sparse24_cuda.py; the C++ CPU format kernels, and the format ops on every backend and
on GPU against them bit for bit: tests/test_sparse24_cpu.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import effkern as ek
from effkern import sparse24
from effkern.int8 import int8_accumulate_reference
from effkern.sparse24 import prune_24_reference, sparse24_linear_reference

from op_checks import (assert_bad_call_raises, assert_compiles_like_eager, assert_compiles_onto_bf16_tensor_cores,
                       assert_cuda_graph_replays_like_eager, assert_dequantized_from, assert_exports_like_eager,
                       assert_fine_tuning_lowers_the_loss, assert_linear_matches_float64, assert_matches_float64,
                       assert_opcheck_passes, autotuned_tiles, needs_backend, parametrize_by_name, record_calls,
                       tile_of)

BACKENDS = ["triton", "reference"]
ODD_M = (1, 3, 17, 130)
FORMAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# the format ops' backends on CPU tensors: the PyTorch reference, effkern._C's C++ kernels
FORMAT_BACKENDS = ["reference", "cuda"]


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


def bits(t):
    """A float tensor's bit patterns (signed zeros, NaN payloads), as integers of its size."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def needs_format_backend(backend):
    if backend == "cuda":
        needs_cpp_format_ops()


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


@pytest.mark.parametrize("backend", FORMAT_BACKENDS)
def test_prune_ties_and_nan(backend):
    """Equal magnitudes: the lower positions are kept. NaN counts as the largest, above inf."""
    needs_format_backend(backend)
    nan, inf = math.nan, math.inf
    w = torch.tensor([[1.0, -1.0, 1.0, 0.5, 2.0, 2.0, 2.0, 2.0],
                      [0.1, nan, 3.0, 0.2, 0.0, 0.0, 0.0, 0.0],
                      [-inf, inf, 1.0, nan, -0.0, 0.0, -0.0, -0.0]])
    expected = torch.tensor([[1.0, -1.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0],
                             [0.0, nan, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                             [-inf, 0.0, 0.0, nan, -0.0, 0.0, 0.0, 0.0]])
    with ek.use_backend(backend):
        assert torch.equal(bits(ek.prune_24(w)), bits(expected))


@pytest.mark.parametrize("backend", FORMAT_BACKENDS)
@pytest.mark.parametrize("dtype", FORMAT_DTYPES)
def test_prune_compares_magnitudes_exactly(backend, dtype):
    """|1 + eps| < |1 + 2 eps| in every dtype: no tie, whatever precision a comparison might use."""
    needs_format_backend(backend)
    eps = torch.finfo(dtype).eps
    w = torch.tensor([[1.0, -(1 + eps), 1 + 2 * eps, 0.5]], dtype=torch.float64).to(dtype)
    with ek.use_backend(backend):
        assert torch.equal(bits(ek.prune_24(w)), bits(w * torch.tensor([0, 1, 1, 0], dtype=dtype)))


# ---------------------------------------------------------------------------- compression

@pytest.mark.parametrize("dtype", FORMAT_DTYPES)
@pytest.mark.parametrize("N,K", [(1, 12), (5, 36), (16, 128), (3, 100)])
def test_compress_decompress_round_trip(dtype, N, K):
    """Bit for bit; a kept -0.0 stays negative (only dropped zeros come back as +0.0)."""
    w = sparse_weight(N, K, dtype)
    w[0, :4] = torch.tensor([-0.0, -0.0, 0.0, 0.0])  # no nonzero: its two lowest zeros are kept
    w[0, 4:8] = torch.tensor([0.0, -math.inf, 0.0, math.nan])
    w[-1, -4:] = torch.tensor([-0.0, 0.0, 0.5, 0.0])  # one nonzero, completed by the lowest zero
    values, meta = ek.compress_24(w)
    assert values.shape == (N, K // 2) and values.dtype == dtype
    assert meta.shape == (N, math.ceil(K / 8)) and meta.dtype == torch.uint8
    assert torch.equal(bits(ek.decompress_24(values, meta)), bits(w))


def test_compressed_format_layout():
    """The documented layout, on one row: values in position order, codes i0 | i1 << 2, two
    groups per byte (low nibble first), the zeros of sparse groups at the lowest free positions."""
    w = torch.tensor([[0.0, 5.0, 0.0, 6.0,   7.0, 8.0, 0.0, 0.0,   0.0, 0.0, 0.0, 9.0]])
    values, meta = ek.compress_24(w)
    assert values.tolist() == [[5.0, 6.0, 7.0, 8.0, 0.0, 9.0]]
    codes = [1 | 3 << 2, 0 | 1 << 2, 0 | 3 << 2]
    assert meta.tolist() == [[codes[0] | codes[1] << 4, codes[2]]]


@pytest.mark.parametrize("backend", FORMAT_BACKENDS)
def test_compress_refuses_a_weight_that_is_not_2_4(backend):
    """On both implementations: the C++ kernels (CPU tensors) and the PyTorch ops (``reference``,
    and every GPU tensor under any backend)."""
    needs_format_backend(backend)
    w = sparse_weight(4, 16)
    w[1, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # row != group: the message names each
    with ek.use_backend(backend), pytest.raises(ValueError, match=r"row 1, group 2 \(k = 8\.\.11\) has 3 nonzeros"):
        ek.compress_24(w)


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", [n for n in itertools.product([False, True], repeat=3) if any(n)])
def test_backward_gives_just_the_gradients_asked_for(backend, needs):
    """Every subset of (input, values, bias) requiring grad, e.g. a frozen layer that passes the
    gradient on (input alone) or a bias-free layer fine-tuned on data (values alone)."""
    needs_backend(backend)
    w, values, meta = compressed_sparse_weight(24, 64)
    leaves = [t.requires_grad_(need) for t, need in zip((torch.randn(3, 64), values, torch.randn(24)), needs)]
    grad = torch.randn(3, 24)
    with ek.use_backend(backend):
        ek.sparse24_linear(leaves[0], leaves[1], meta, leaves[2]).backward(grad)
    mask = w != 0
    expected = (grad @ w, (grad.t() @ leaves[0].detach())[mask].view(24, 32), grad.sum(0))
    for leaf, need, want in zip(leaves, needs, expected, strict=True):
        if need:
            torch.testing.assert_close(leaf.grad, want, rtol=1e-5, atol=1e-5)
        else:
            assert leaf.grad is None


def check_backward_against_float64(backend, N, K, lead, dtype, device):
    """sparse24_linear's grad_input, grad_values and grad_bias against F.linear's on the dense
    weight in float64 (the weight gradient taken at W's nonzeros, in row order: the values'
    layout), each within 2x the error of F.linear's backward in ``dtype``."""
    w, values, meta = compressed_sparse_weight(N, K, dtype, device)
    kept = w != 0
    assert int(kept.sum()) == N * K // 2  # a random pruned weight: two nonzeros in every group
    x, b, grad = (torch.randn(*shape, device=device).to(dtype) for shape in ((*lead, K), (N,), (*lead, N)))
    ours = [t.clone().requires_grad_() for t in (x, values, b)]
    with ek.use_backend(backend):
        ek.sparse24_linear(ours[0], ours[1], meta, ours[2]).backward(grad)

    def dense_grads(x, w, b, grad):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        F.linear(*leaves).backward(grad)
        grad_x, grad_w, grad_b = (t.grad for t in leaves)
        return grad_x, grad_w[kept].view(N, K // 2), grad_b

    exact = dense_grads(x.double(), w.double(), b.double(), grad.double())
    M = grad.numel() // N
    for name, t, e, same, reduction in zip(("grad_input", "grad_values", "grad_bias"), ours, exact,
                                           dense_grads(x, w, b, grad), (N, M, M), strict=True):
        assert t.grad.dtype == dtype, name
        assert_matches_float64(t.grad, e, same, reduction, what=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(M,) for M in ODD_M] + [(2, 65)])
def test_backward_matches_float64_in_float16(backend, lead, monkeypatch):
    """grad_input through the Triton dgrad kernel (backend triton) or the dense expansion
    (reference); K = 100 ends in half a meta byte and crosses the interpreter's 32-column tiles."""
    needs_backend(backend)
    from effkern.kernels import sparse24 as kernels

    launches = record_calls(monkeypatch, kernels, "sparse24_dgrad", lambda args, result: args[0].shape)
    check_backward_against_float64(backend, 40, 100, lead, torch.float16, "cpu")
    assert launches == ([(math.prod(lead), 40)] if backend == "triton" else [])


# grad_out [M, N] @ W [N, K]: (M, N, K, forced split of the reduction over N). N = 70 and 130 are no
# multiple of the interpreter's 32-row reduction step, K = 36 and 100 end in half a meta byte and
# cross its 32-column tiles; N = 0 (an empty layer) gives zeros.
DGRAD_SHAPES = [(1, 40, 64, None), (17, 70, 36, None), (130, 24, 100, None), (3, 130, 200, 3), (2, 96, 64, 2),
                (4, 0, 16, None)]


def check_every_tile(monkeypatch, place: str, dtype, device: str, shapes):
    """Both Triton 2:4 kernels, the forward and the dgrad, at each tile config their autotuners
    may pick, forced as the fixed config of ``place`` ("interpreter" or "gpu"), against float64
    on (M, N, K) ``shapes`` (one program per output tile: no split)."""
    needs_backend("triton", device)
    from effkern.kernels import sparse24 as kernels

    monkeypatch.setenv("EFFKERN_TRITON_AUTOTUNE", "0")  # the forced tile, not the autotuner's pick
    for bm, bn, bk, stages, warps in kernels._GEMM_SHAPES:
        monkeypatch.setitem(kernels._FIXED, place, ((bm, bn, bk, 8), stages, warps))
        for M, N, K in shapes:
            tile = f"tile {bm}x{bn}x{bk}, M={M}, N={N}, K={K}"
            w, values, meta = compressed_sparse_weight(N, K, dtype, device)
            x, grad, b = (torch.randn(*shape, device=device).to(dtype) for shape in ((M, K), (M, N), (N,)))
            assert_linear_matches_float64(kernels.sparse24_matmul(x, values, meta, b, split_k=1), x, w.double(), w,
                                          b, what=f"forward, {tile}")
            assert_matches_float64(kernels.sparse24_dgrad(grad, values, meta, split_k=1),
                                   grad.double() @ w.double(), grad @ w, N, what=f"dgrad, {tile}")


def check_forward(kernels, M, N, K, split_k, what):
    w, values, meta = compressed_sparse_weight(N, K, torch.float16)
    x, b = torch.randn(M, K).half(), torch.randn(N).half()
    assert_linear_matches_float64(kernels.sparse24_matmul(x, values, meta, b, split_k=split_k), x, w.double(), w, b,
                                  what=what)


def check_int8_forward(kernels, M, N, K, split_k, what):
    """Exact int32 sums, dequantized as the int8 family does (op_checks.assert_dequantized_from)."""
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8) * (sparse_weight(N, K) != 0)
    values, meta = ek.compress_24(w)
    a_q = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    a_scale, w_scale, b = torch.rand(M) / 100, torch.rand(N) / 100, torch.randn(N).half()
    out = kernels.sparse24_int8_matmul(a_q, a_scale, values, meta, w_scale, b, torch.float16, split_k=split_k)
    assert_dequantized_from(out, int8_accumulate_reference(a_q, w), a_scale, w_scale, b, what=what)


def check_dgrad(kernels, M, N, K, split_k, what):
    w, values, meta = compressed_sparse_weight(N, K, torch.float16)
    grad = torch.randn(M, N).half()
    assert_matches_float64(kernels.sparse24_dgrad(grad, values, meta, split_k=split_k), grad.double() @ w.double(),
                           grad @ w, N, what=what)


KERNEL_CHECKS = {"forward": check_forward, "int8 forward": check_int8_forward, "dgrad": check_dgrad}
# (N, K) of the layer (the dgrad's reduction is N, its output columns K): 300 crosses every tile's
# edges, K = 300 ends in half a meta byte; N = 256 and K = 512 are whole tiles (the unmasked loads:
# EVEN_K, EVEN_N)
GPU_TILE_SHAPES = [(300, 300), (256, 512)]


@pytest.mark.parametrize("split", [False, True], ids=["one pass", "split-K"])
@pytest.mark.parametrize("kernel", list(KERNEL_CHECKS))
def test_every_gpu_tile_matches_float64(kernel, split, monkeypatch, poison_empty):
    """Each Triton 2:4 kernel at each tile it runs at on a GPU, forced as the interpreter's config
    (GPU runs are rare): one pass at the autotuned tiles and the fixed config, split-K at its
    config in 2 slices (whole K steps: over 300, 2 steps and a partial one). M: a tile and a half
    of rows (the split config's: a decoding batch)."""
    needs_backend("triton")
    from effkern.kernels import _splitk
    from effkern.kernels import sparse24 as kernels

    plain, tuned = (kernels._dgrad, kernels._dgrad_tuned) if kernel == "dgrad" else (kernels._gemm, kernels._gemm_tuned)
    fixed = tile_of(_splitk.tile_kwargs(kernels._SPLIT["gpu"] if split else kernels._FIXED["gpu"]))
    tiles = [fixed] if split else list(dict.fromkeys(autotuned_tiles(tuned) + [fixed]))
    place, split_k = (kernels._SPLIT, 2) if split else (kernels._FIXED, 1)
    one_pass = record_calls(monkeypatch, _splitk, "launch", lambda args, _: (args[1], tile_of(args[5]["interpreter"])))
    sliced = record_calls(monkeypatch, _splitk, "run_split_k", lambda args, _: (args[0], tile_of(args[3])))
    for blocks in tiles:
        monkeypatch.setitem(place, "interpreter", (blocks, 1, 4))  # stages and warps: the interpreter ignores them
        M = 3 * blocks[0] // 2 + 1
        for N, K in GPU_TILE_SHAPES:
            KERNEL_CHECKS[kernel](kernels, M, N, K, split_k, f"{kernel}, tile {blocks}, M={M}, N={N}, K={K}")
    ran = [(plain, blocks) for blocks in tiles for _ in GPU_TILE_SHAPES]
    assert (sliced, one_pass) == ((ran, []) if split else ([], ran))


@pytest.mark.parametrize("M, N, K, split_k", DGRAD_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dgrad_kernel_matches_float64(M, N, K, split_k, dtype, poison_empty):
    needs_backend("triton")
    from effkern.kernels import sparse24 as kernels

    w, values, meta = compressed_sparse_weight(N, K, dtype)
    grad = torch.randn(N, M).to(dtype).t()  # any strides: a transposed grad_out
    got = kernels.sparse24_dgrad(grad, values.t().contiguous().t(), meta, split_k=split_k)
    assert got.dtype == dtype and got.shape == (M, K)
    assert_matches_float64(got, grad.double() @ w.double(), grad @ w, N, what="grad_input")


def test_reference_gradcheck():
    values, meta = ek.compress_24(sparse_weight(6, 16, torch.float64))
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    values.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, v, b: ek.sparse24_linear(x, v, meta, b), (x, values, b))


def test_fine_tuning_trains_the_kept_values():
    """The 2:4 pattern is kept by construction (meta is a buffer; values holds two entries per
    group): what can fail is the training of the kept values, here the only trainable parameter
    (a trained bias alone would lower the loss). grad_values' exact value:
    test_backward_gives_the_masked_weight_gradient."""
    torch.manual_seed(0)
    layer = ek.nn.Sparse24Linear.from_linear(torch.nn.Linear(32, 16), prune=True)
    layer.bias.requires_grad_(False)
    values = layer.values.detach().clone()
    assert_fine_tuning_lowers_the_loss(layer, torch.randn(64, 32), torch.randn(64, 16), steps=10)
    assert (layer.values.detach() != values).float().mean() > 0.9


# ---------------------------------------------------------------------------- registration

SAMPLE_SHAPES = [((), 8, 16, True), ((3,), 4, 12, False), ((2, 3), 8, 32, True)]  # (leading dims, N, K, bias)
GPU_SAMPLE_SHAPES = [((), 64, 128, True), ((3,), 32, 64, False), ((2, 3), 64, 256, True)]  # mma.sp's too


def linear_samples(requires_grad, shapes=SAMPLE_SHAPES, dtype=torch.float32, device="cpu"):
    """(op, args) of sparse24_linear and, without grad, its backward op; the weight compressed on the CPU."""
    for lead, N, K, bias in shapes:
        values, meta = (t.to(device) for t in ek.compress_24(sparse_weight(N, K, dtype)))
        x, b, grad = (torch.randn(*shape, device=device).to(dtype) for shape in ((*lead, K), (N,), (*lead, N)))
        for t in (values, x, b):
            t.requires_grad_(requires_grad)
        yield torch.ops.effkern.sparse24_linear.default, (x, values, meta, b if bias else None)
        if not requires_grad:
            yield torch.ops.effkern.sparse24_linear_bwd.default, (grad, x, values, meta, [True, True, bias])


def sample_inputs(requires_grad=False):
    yield from linear_samples(requires_grad)
    if not requires_grad:
        for _, N, K, _ in SAMPLE_SHAPES:
            values, meta = ek.compress_24(sparse_weight(N, K))
            yield torch.ops.effkern.prune_24.default, (torch.randn(N, K),)
            yield torch.ops.effkern.compress_24.default, (sparse_weight(N, K),)
            yield torch.ops.effkern.decompress_24.default, (values, meta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, requires_grad):
    assert_opcheck_passes(backend, sample_inputs(requires_grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_forward_backward(backend):
    assert_compiles_like_eager(ek.nn.Sparse24Linear.from_linear(torch.nn.Linear(64, 32)), backend)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_format_ops_compile_fullgraph(backend):
    """prune_24 -> compress_24 -> decompress_24 in one graph (auto: the C++ CPU kernels where built)."""
    torch._dynamo.reset()

    def round_trip(w):
        values, meta = ek.compress_24(ek.prune_24(w))
        return ek.decompress_24(values, meta), values, meta

    w = torch.randn(16, 40)
    with ek.use_backend(backend):
        got = torch.compile(round_trip, backend="aot_eager", fullgraph=True)(w)
        for g, want in zip(got, round_trip(w), strict=True):
            assert torch.equal(g, want)
    assert torch.equal(got[0], prune_24_reference(w))


def test_autocast_casts_input_values_and_bias():
    """float32 tensors, alone or mixed with values already in bf16 (as F.linear takes such a mix),
    run in bf16 under torch.autocast; outside it, the mix is a TypeError."""
    values, meta = ek.compress_24(sparse_weight(8, 32))
    x, b = torch.randn(4, 32), torch.randn(8)
    want = sparse24_linear_reference(x.bfloat16(), values.bfloat16(), meta, b.bfloat16())
    for v in (values, values.bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ek.sparse24_linear(x, v, meta, b)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, want)
    with pytest.raises(TypeError, match="values has dtype torch.bfloat16 but input has torch.float32"):
        ek.sparse24_linear(x, values.bfloat16(), meta, b)


# ---------------------------------------------------------------------------- auto's choice on CUDA

@pytest.fixture
def fresh_auto_choices():
    """auto's choices are cached per (device, dtype, M, N, K): cleared around a test that changes what they read."""
    for cached in (sparse24._auto_backend, sparse24._auto_dgrad_path):
        cached.cache_clear()
    yield
    for cached in (sparse24._auto_backend, sparse24._auto_dgrad_path):
        cached.cache_clear()


def policy_answering(monkeypatch, winner) -> list:
    """auto's policy lookups on a GPU named "GPU X", each answered ``winner``; returns the list of
    questions asked ((op, mode, gpu), shape), filled as they come."""
    asked = []

    def choose(*args, **shape):
        asked.append((args, shape))
        return winner

    monkeypatch.setattr(sparse24._policy, "choose", choose)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    return asked


BF16 = torch.bfloat16
AUTO_CASES = [  # (name, recorded winner, extension with the CUDA kernel, dtype, M, N, K, auto's choice)
    ("measured cuda", "cuda", True, BF16, 16, 64, 256, "cuda"),
    ("measured cuda, fp16", "cuda", True, torch.float16, 4096, 4096, 4096, "cuda"),
    ("measured cuda, K % 64 != 0", "cuda", True, BF16, 16, 64, 100, "triton"),
    ("measured cuda, N % 16 != 0", "cuda", True, BF16, 16, 40, 256, "triton"),
    ("measured cuda, M over the grid", "cuda", True, BF16, sparse24._cuda_layout().MAX_M + 1, 64, 256, "triton"),
    ("measured cuda, float32", "cuda", True, torch.float32, 16, 64, 256, "triton"),
    ("measured cuda, extension without CUDA", "cuda", False, BF16, 16, 64, 256, "triton"),
    ("measured triton", "triton", True, BF16, 16, 64, 256, "triton"),
    ("nothing measured", None, True, BF16, 16, 64, 256, "triton"),
    ("float64", "cuda", True, torch.float64, 16, 64, 256, "reference"),
]


@pytest.mark.parametrize("op, policy", [("sparse24_linear", "sparse24"), ("sparse24_int8_linear", "sparse24_int8")])
@parametrize_by_name(AUTO_CASES)
def test_auto_takes_cuda_where_measured_and_the_kernel_runs(case, op, policy, monkeypatch, fresh_auto_choices):
    """auto on a CUDA device, decided here (no GPU, no launch): the policy's winner for the GPU and
    shape, and the Triton fallback where it says cuda but the mma.sp kernel cannot run the problem
    (for both ops: the 16-bit one and W8A8, each with its own policy)."""
    _, winner, cuda_built, dtype, M, N, K, expected = AUTO_CASES[case]
    asked = policy_answering(monkeypatch, winner)
    monkeypatch.setattr(sparse24, "backend_available", lambda name, device: (name != "cuda" or cuda_built, ""))
    if cuda_built:  # what a CUDA build registers; the choice only looks it up
        monkeypatch.setattr(torch.ops.effkern_C, op, object(), raising=False)
    assert sparse24._auto_backend(op, torch.device("cuda", 0), dtype, M, N, K) == expected
    shape = dict(dtype=str(dtype).removeprefix("torch."), M=M, N=N, K=K)
    assert asked == ([] if dtype == torch.float64 else [((policy, "fwd", "GPU X"), shape)])


def test_auto_keeps_w8a8_within_the_int8_kernels_k_limit(monkeypatch, fresh_auto_choices):
    """The int8 mma.sp kernel takes K <= 2**17 (an exact int32 sum of 2**16 int8 products);
    beyond, auto takes the Triton kernel even where the policy says cuda."""
    policy_answering(monkeypatch, "cuda")
    monkeypatch.setattr(sparse24, "backend_available", lambda name, device: (True, ""))
    monkeypatch.setattr(torch.ops.effkern_C, "sparse24_int8_linear", object(), raising=False)
    device = torch.device("cuda", 0)
    assert sparse24._auto_backend("sparse24_int8_linear", device, BF16, 16, 64, 2**17) == "cuda"
    assert sparse24._auto_backend("sparse24_int8_linear", device, BF16, 16, 64, 2**17 + 64) == "triton"


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
        ("bias as a column", (x, values, meta, torch.randn(8, 1)), ValueError, r"bias must have shape \[N\] = \[8\]"),
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


@pytest.mark.parametrize("backend", FORMAT_BACKENDS)
def test_a_nonzero_nibble_past_the_last_group_is_refused(backend):
    """K = 12: three groups, so the high nibble of meta's last byte is unused and must be 0."""
    needs_format_backend(backend)
    values, meta = ek.compress_24(sparse_weight(3, 12))
    bad = meta.clone()
    bad[0, 1] |= 0x40
    with ek.use_backend(backend), pytest.raises(ValueError, match="meta"):
        ek.decompress_24(values, bad)


def assert_invalid_codes_raise(backend, device):
    """A code that is no two ascending positions is refused by the linear ops on ``backend``: the
    Triton kernels would expand it into a wrong weight without a word. The check runs once per
    meta tensor, and again after meta is changed in place."""
    needs_backend(backend, device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    # N = 16, K = 64: the smallest layer the cuda backend's mma.sp kernel takes (N % 16, K % 64;
    # other shapes are a RuntimeError there, before any metadata is looked at)
    N, K = 16, 64
    w = sparse_weight(N, K, dtype, device)
    values, meta = ek.compress_24(w)
    qvalues, qmeta = ek.compress_24(w.sign().to(torch.int8))
    x, scale = torch.randn(3, K, device=device).to(dtype), torch.ones(N, device=device)
    calls = {"sparse24_linear": lambda m: ek.sparse24_linear(x, values, m),
             "sparse24_int8_linear": lambda m: ek.sparse24_int8_linear(x, qvalues, m, scale)}
    for name, call in calls.items():
        good = (meta if name == "sparse24_linear" else qmeta).clone()
        with ek.use_backend(backend):
            call(good)
            good[1, 1] = 0x33  # group 2 of row 1 becomes code 0b0011: positions 3 and 0
            with pytest.raises(ValueError, match="row 1, group 2"):
                call(good)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_metadata_codes_raise(backend):
    assert_invalid_codes_raise(backend, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checked_meta_is_checked_again_for_more_groups(backend):
    """meta [N, 2] serves K = 12 (3 groups, the 4th nibble 0) and K = 16 (4 groups): passing for
    the first says nothing of the 4th nibble as a code of the second."""
    needs_backend(backend)
    values, meta = ek.compress_24(sparse_weight(4, 12))
    with ek.use_backend(backend):
        ek.sparse24_linear(torch.randn(2, 12), values, meta)
        with pytest.raises(ValueError, match="row 0, group 3 holds the code 0b0000"):
            ek.sparse24_linear(torch.randn(2, 16), torch.randn(4, 8), meta)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_made_under_inference_mode(backend):
    """Inference tensors keep no version counter, which the once-per-weight caches read."""
    needs_backend(backend)
    w, x = sparse_weight(8, 32), torch.randn(3, 32)
    with torch.inference_mode(), ek.use_backend(backend):
        values, meta = ek.compress_24(w)
        y = ek.sparse24_linear(x, values, meta)
    torch.testing.assert_close(y, F.linear(x, w))


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
    assert set(state) == {"values", "metadata", "bias"} and torch.equal(state["metadata"], layer.meta)
    fresh = ek.nn.Sparse24Linear(64, 24)
    torch.testing.assert_close(fresh(x), fresh.bias.expand(2, 5, 24))  # the initial weight is zero
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), y)
    older = ek.nn.Sparse24Linear(64, 24)  # a state_dict saved when the buffer was named "meta"
    older.load_state_dict({("meta" if k == "metadata" else k): v for k, v in state.items()})
    assert torch.equal(older(x), y)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        ek.nn.Sparse24Linear.from_linear(torch.nn.Linear(64, 24), prune=False)
    with pytest.raises(ValueError, match="multiple of 4"):
        ek.nn.Sparse24Linear(30, 8)
    assert not ek.nn.Sparse24Linear.from_linear(torch.nn.Linear(64, 24).requires_grad_(False)).values.requires_grad


@pytest.mark.parametrize("cls", [ek.nn.Sparse24Linear, ek.nn.Sparse24Int8Linear])
def test_a_fresh_module_with_an_odd_number_of_groups_runs(cls):
    """in_features = 12: three groups, so the initial metadata's last high nibble is unused and
    must be 0 (the ops refuse a nonzero one): a fresh layer computes its zero weight's output."""
    layer = cls(12, 4)
    assert layer.meta.tolist() == [[0x44, 0x04]] * 4
    torch.testing.assert_close(layer(torch.randn(3, 12)), layer.bias.detach().expand(3, 4))


@pytest.fixture
def swap_module_params():
    """torch.__future__'s swap_tensors conversions: load_state_dict and module.to() swap each
    tensor with torch.utils.swap_tensors, which refuses a tensor that has a weakref."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(before)


@pytest.mark.parametrize("cls", [ek.nn.Sparse24Linear, ek.nn.Sparse24Int8Linear])
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_loads_a_state_dict_after_a_call_with_swapped_tensors(cls, backend, swap_module_params):
    """The Triton path's once-per-meta check (a DerivedCache) must not pin the module's tensors:
    a weakref to the meta buffer made load_state_dict fail under swap_tensors after one call."""
    needs_backend(backend)
    layer, other = (cls.from_linear(torch.nn.Linear(32, 16), prune=True) for _ in range(2))
    x = torch.randn(3, 32)
    with ek.use_backend(backend):
        layer(x)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), other(x))


def test_sparse24_linear_module_exports():
    """A layer exported alone, and one inside a model torch.export.unflatten takes apart, run as
    the layer does (its metadata buffer once collided with their modules' ``meta`` attribute)."""
    assert_exports_like_eager(ek.nn.Sparse24Linear.from_linear(torch.nn.Linear(32, 24)), torch.randn(3, 32))


AUTO_DGRAD_CASES = [  # (name, recorded bwd winner, Triton runs, dtype, path)
    ("measured triton", "triton", True, BF16, "triton"),
    ("measured triton, fp16", "triton", True, torch.float16, "triton"),
    ("measured cuda", "cuda", True, BF16, "dense"),
    ("nothing measured", None, True, BF16, "dense"),
    ("measured triton, no Triton", "triton", False, BF16, "dense"),
    ("float64", "triton", True, torch.float64, "dense"),
]


@parametrize_by_name(AUTO_DGRAD_CASES)
def test_auto_dgrad_path_follows_the_bwd_measurements(case, monkeypatch, fresh_auto_choices):
    """grad_input's path under auto on a CUDA device, decided here (no GPU, no launch): the Triton
    dgrad kernel where the bwd benchmark recorded effkern-triton faster, else W expanded and one
    dense GEMM (cuBLAS)."""
    _, winner, triton_runs, dtype, expected = AUTO_DGRAD_CASES[case]
    asked = policy_answering(monkeypatch, winner)
    monkeypatch.setattr(sparse24, "backend_available", lambda name, device: (name != "triton" or triton_runs, ""))
    assert sparse24._auto_dgrad_path(torch.device("cuda", 0), dtype, 6, 64, 256) == expected
    shape = dict(dtype=str(dtype).removeprefix("torch."), M=6, N=64, K=256)
    asks = triton_runs and dtype != torch.float64
    assert asked == ([(("sparse24", "bwd", "GPU X"), shape)] if asks else [])


@pytest.mark.parametrize("measured", [False, True])
def test_info_describes_auto_on_a_gpu_with_its_grad_input_path(measured, monkeypatch):
    monkeypatch.setattr(sparse24, "backend_available", lambda name, device: (True, ""))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    monkeypatch.setattr(sparse24._policy, "_entries", lambda op, gpu: ({"M": 1},) if measured else ())
    text = sparse24._describe_auto(torch.device("cuda", 0))
    if measured:
        assert "measured on GPU X" in text and "grad_input: the dgrad kernel where measured faster" in text
    else:
        assert "no measurements recorded for GPU X" in text and "grad_input: W expanded and cuBLAS" in text


@pytest.mark.parametrize("backend, path", [("triton", "triton"), ("cuda", "dense"), ("reference", "dense")])
def test_dgrad_path_of_an_explicit_backend(backend, path, monkeypatch):
    monkeypatch.setattr(sparse24, "require", lambda *args, **kwargs: None)
    monkeypatch.setattr(sparse24._policy, "choose",
                        lambda *args, **shape: pytest.fail("an explicit backend reads no measurements"))
    with ek.use_backend(backend):
        assert sparse24.dgrad_path(torch.empty(2, 3, 64, dtype=BF16, device="meta"), 256) == path


def test_float64_backward_under_triton_is_a_clear_error():
    """A float64 forward (auto on CPU: the reference) whose backward runs inside use_backend("triton")."""
    needs_backend("triton")
    _, values, meta = compressed_sparse_weight(8, 32, torch.float64)
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    y = ek.sparse24_linear(x, values, meta)
    with ek.use_backend("triton"), pytest.raises(TypeError, match="got a torch.float64 gradient"):
        y.sum().backward()


# ---------------------------------------------------------------------------- GPU code, compiled here

SPARSE_TYPES = dict(a_ptr="*bf16", v_ptr="*bf16", meta_ptr="*u8", a_scale_ptr="*fp32", w_scale_ptr="*fp32",
                    bias_ptr="*bf16", c_ptr="*bf16",
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
                                           SPARSE_TYPES, dict(A_INT8=False, DEQUANT=False, HAS_BIAS=True,
                                                              DOT_PRECISION="tf32", EVEN_K=True),
                                           configs, cc,
                                           unit_strides=("stride_ak", "stride_vk", "stride_metak", "stride_cn"))


DGRAD_TYPES = {k: v for k, v in SPARSE_TYPES.items() if k not in ("a_scale_ptr", "w_scale_ptr", "bias_ptr")}


@pytest.mark.parametrize("cc", [80, 90])
def test_dgrad_kernel_compiles_for_gpus(compile_for_gpu, cc):
    """The dgrad kernel at its fixed and split-K configs, and on sm_90 at every autotuned one
    (its tiles expand W along the output columns and transpose them: layouts the forward lacks),
    with whole and with partial (masked) tiles."""
    needs_backend("triton")
    from effkern.kernels import sparse24 as kernels
    from effkern.kernels._splitk import tile_kwargs

    configs = {"fixed": tile_kwargs(kernels._FIXED["gpu"]), "split-k": tile_kwargs(kernels._SPLIT["gpu"])}
    if cc == 90:
        configs.update({f"{bm}x{bn}x{bk}": tile_kwargs(((bm, bn, bk, 8), stages, warps))
                        for bm, bn, bk, stages, warps in kernels._GEMM_SHAPES})
    for even in (True, False):  # whole tiles, and the masked loads of partial ones
        assert_compiles_onto_bf16_tensor_cores(compile_for_gpu, "effkern.kernels.sparse24:sparse24_dgrad_kernel",
                                               DGRAD_TYPES, dict(DOT_PRECISION="tf32", EVEN_K=even, EVEN_N=even),
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
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_invalid_metadata_codes_raise(backend):
    assert_invalid_codes_raise(backend, "cuda")

@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("lead", [(1,), (17,), (2, 65)])
def test_gpu_backward_matches_float64(backend, lead, poison_empty):
    """grad_input through the dgrad kernel (triton) or the dense expansion and cuBLAS (cuda)."""
    needs_backend(backend, "cuda")
    check_backward_against_float64(backend, 512, 1024, lead, torch.bfloat16, "cuda")


@pytest.mark.smoke
@pytest.mark.gpu
def test_gpu_every_tuned_tile_matches_float64(monkeypatch):
    """The tiles users get (the GPU tests otherwise run the fixed one): whole tiles, and partial
    ones with K ending in half a meta byte."""
    check_every_tile(monkeypatch, "gpu", torch.bfloat16, "cuda", [(256, 512, 1024), (300, 520, 1004)])


@pytest.mark.gpu
def test_gpu_autotuned_triton_matches_float64(monkeypatch, poison_empty):
    """The default GPU path, autotuning (the tests above force one tile each): the forward and
    the dgrad kernel on 200 rows, through the op's backward."""
    needs_backend("triton", "cuda")
    monkeypatch.setenv("EFFKERN_TRITON_AUTOTUNE", "1")
    w, values, meta = compressed_sparse_weight(520, 1004, torch.bfloat16, "cuda")
    x, b = torch.randn(200, 1004, device="cuda").bfloat16(), torch.randn(520, device="cuda").bfloat16()
    with ek.use_backend("triton"):
        y = ek.sparse24_linear(x, values, meta, b)
    assert_linear_matches_float64(y, x, w.double(), w, b)
    check_backward_against_float64("triton", 520, 1004, (200,), torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("N, K", [(512, 1024), (520, 1004)])
@pytest.mark.parametrize("M", ODD_M + (1024,))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_dgrad_kernel_matches_float64(N, K, M, dtype, poison_empty):
    """grad_out @ W from the compressed W: on whole tiles, and with a reduction (N) and output
    columns (K, ending in half a meta byte) that are no multiple of the GPU's tiles; few rows
    take the split over N."""
    needs_backend("triton", "cuda")
    from effkern.kernels import sparse24 as kernels

    w, values, meta = compressed_sparse_weight(N, K, dtype, device="cuda")
    grad = torch.randn(M, N, device="cuda").to(dtype)
    got = kernels.sparse24_dgrad(grad, values, meta)
    assert_matches_float64(got, grad.double() @ w.double(), grad @ w, N, what="grad_input")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_opcheck_compile_and_autocast(backend):
    """On CUDA tensors (cuda: the op's cached reordered weight and effkern_C.sparse24_linear):
    opcheck, a torch.compile(fullgraph=True) training step against eager mode, autocast."""
    needs_backend(backend, "cuda")
    # built under auto: the cuda backend runs no format ops on GPU tensors
    layer = ek.nn.Sparse24Linear.from_linear(torch.nn.Linear(256, 128, device="cuda", dtype=BF16))
    w = layer.dense_weight()
    x = torch.randn(64, 256, device="cuda", dtype=BF16)
    r = torch.randn(64, 128, device="cuda")  # the loss's weights: dL/dy = r in bf16, eager and compiled

    def step(x):
        return (layer(x).float() * r).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    with ek.use_backend(backend):
        for requires_grad in (False, True):
            for op, args in linear_samples(requires_grad, GPU_SAMPLE_SHAPES, BF16, "cuda"):
                torch.library.opcheck(op, args)
        results = []
        for fn in (compiled, step):
            x_leaf = x.clone().requires_grad_()
            loss = fn(x_leaf)
            loss.backward()
            results.append([loss, x_leaf.grad, layer.values.grad, layer.bias.grad])
            layer.zero_grad(set_to_none=True)
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
        with torch.autocast("cuda", dtype=BF16):
            y = ek.sparse24_linear(x.float(), layer.values.detach().float(), layer.meta, layer.bias.detach().float())
    assert y.dtype == BF16
    assert_linear_matches_float64(y, x, w.double(), w, layer.bias.detach())


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("winner, N, path", [(None, 512, "triton"), ("cuda", 512, "cuda"), ("cuda", 520, "triton")])
def test_gpu_auto_backend_runs(winner, N, path, monkeypatch, fresh_auto_choices, poison_empty):
    """auto on a GPU: nothing measured -> the Triton fallback; the policy says cuda -> the mma.sp
    kernel (the op reorders the new weight for it), except on an N it does not take."""
    if path == "cuda":
        needs_backend("cuda", "cuda")
    monkeypatch.setattr(sparse24._policy, "choose", lambda *args, **shape: winner)
    reorders = record_calls(monkeypatch, sparse24._cuda_layout(), "reorder_for_mma_sp", lambda args, result: args[0])
    w, values, meta = compressed_sparse_weight(N, 1024, BF16, device="cuda")
    x, b = (torch.randn(*shape, device="cuda", dtype=BF16) for shape in ((130, 1024), (N,)))
    y = ek.sparse24_linear(x, values, meta, b)
    assert_linear_matches_float64(y, x, w.double(), w, b)
    assert len(reorders) == (path == "cuda")


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
