"""INT4 weight-only matmul: packing, quantization, GPTQ/AWQ importers, the Triton kernel (through
the interpreter on CPU), autograd, registration, Int4Linear, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

import effkern as ek
from effkern.int4 import AWQ_ORDER, int4_linear_reference

from op_checks import (assert_bad_call_raises, assert_compiles_like_eager, assert_compiles_onto_bf16_tensor_cores,
                       assert_cuda_graph_replays_like_eager, assert_linear_matches_float64, assert_matches_float64,
                       assert_opcheck_passes, autotuned_tiles, needs_backend, parametrize_by_name, record_calls,
                       tile_of)

BACKENDS = ["triton", "reference"]
ODD_M = (1, 3, 17, 100)


def kernels():
    from effkern.kernels import int4

    return int4


def layer_weight(N, K, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    w[:, torch.randperm(K, generator=g)[: max(1, K // 64)]] *= 10  # outlier input features
    return w.to(device)


def quantized(N, K, group_size, dtype=torch.float16, symmetric=False, seed=0, device="cpu"):
    return ek.quantize_int4(layer_weight(N, K, seed, device).to(dtype), group_size, symmetric)


# ---------------------------------------------------------------------------- packing

def test_pack_int4_nibble_order():
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15, 0, 0, 0, 0, 0, 0, 15]], dtype=torch.uint8)
    packed = ek.pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (1, 2)
    assert packed[0, 0].item() == 0x87654321 - 2**32  # q[7] = 8 sets bit 31: a negative int32
    assert packed[0, 1].item() == 0xF000000F - 2**32
    assert torch.equal(ek.unpack_int4(packed), q)


@pytest.mark.parametrize("shape", [(1, 8), (5, 64), (3, 4, 24), (3, 0)])
def test_pack_unpack_round_trip(shape):
    q = torch.randint(0, 16, shape, dtype=torch.uint8)
    assert torch.equal(ek.unpack_int4(ek.pack_int4(q)), q)
    words = torch.randint(-2**31, 2**31, (*shape[:-1], shape[-1] // 8), dtype=torch.int64).to(torch.int32)
    assert torch.equal(ek.pack_int4(ek.unpack_int4(words)), words)  # every bit pattern
    with pytest.raises(TypeError, match="must be int32"):
        ek.unpack_int4(words.long())  # a byte view of int64 words would read twice the nibbles


@pytest.mark.parametrize("value,exc,message", [(16, ValueError, r"values in \[0, 15\], got values in \[0, 16\]"),
                                               (-1, ValueError, r"got values in \[-1, 0\]"),
                                               (1.0, TypeError, "must be uint8, int8, int16, int32 or int64")])
def test_pack_int4_refuses_what_four_bits_cannot_hold(value, exc, message):
    q = torch.zeros(2, 8, dtype=torch.float32 if isinstance(value, float) else torch.int64)
    q[1, 3] = value
    with pytest.raises(exc, match=message):
        ek.pack_int4(q)


def test_quantizing_on_the_meta_device():
    """A model built on the meta device is converted before its weights load: no values to check."""
    layer = ek.nn.Int4Linear.from_linear(torch.nn.Linear(64, 16, device="meta", dtype=torch.float16), group_size=32)
    assert layer.qweight.device.type == "meta" and layer.qweight.shape == (16, 8)


def test_packing_makes_nothing_wider_than_its_unpacked_side():
    """pack_int4 / unpack_int4 run on whole weights (the CUDA layout's shuffle, the backward's
    dequantization): no intermediate may be larger than the uint8 [N, K] side (an int64 copy would
    be 8x that: 2 GB for a 16k x 16k weight). The ops' bodies, with pack's range check (a dispatch
    mode sees a registered op as one call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from effkern.int4 import pack_int4_reference, unpack_int4_reference

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.untyped_storage().nbytes())
            return out

    q = torch.randint(0, 16, (64, 256), dtype=torch.uint8)
    with LargestOutput():
        torch.aminmax(q)  # pack_int4's range check
        words = pack_int4_reference(q)
        unpack_int4_reference(words)
    assert 0 < LargestOutput.largest <= q.numel(), LargestOutput.largest
    assert torch.equal(words, ek.pack_int4(q))


# ---------------------------------------------------------------------------- quantization

@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_dequantize(group_size, symmetric, dtype):
    N, K = 24, 512
    w = layer_weight(N, K).to(dtype)
    w[3] = 0  # an all-zero row
    w[5, :K // 2] = 0  # zeros inside groups
    w[7] = w[7].abs() + 0.01  # all positive: every group's range still reaches down to 0
    qw, scales, zeros = ek.quantize_int4(w, group_size, symmetric)
    G = K if group_size == -1 else group_size
    assert qw.shape == (N, K // 8) and scales.shape == zeros.shape == (N, K // G)
    assert scales.dtype == zeros.dtype == dtype
    assert torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 15
    if symmetric:
        assert (zeros == 8).all()
    # the README's scales, rounded up to the weight's dtype: 2 * absmax / 15 or (max - min) / 15
    groups = w.float().view(N, K // G, G)
    if symmetric:
        formula = groups.abs().amax(-1) * (2 / 15)
    else:
        formula = (groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)) / 15
    used = formula > 0
    below = torch.nextafter(scales, torch.zeros_like(scales)).float()
    assert (scales.float()[used] >= formula[used]).all() and (below[used] < formula[used]).all()
    back = ek.dequantize_int4(qw, scales, zeros, group_size, torch.float64)
    step = scales.double().repeat_interleave(G, dim=1)
    assert ((back - w.double()).abs() <= step / 2 * (1 + 1e-6)).all()  # within half a step
    assert (back[3] == 0).all() and (back[5, :K // 2] == 0).all()  # zero is exactly representable


def test_dequantize_with_float64_scales_computes_in_float64():
    """Float64 scales make the formula run in float64 whatever the output dtype, rounded once to
    it: not in float32 on scales rounded to float32 first."""
    torch.manual_seed(0)
    N, K, G = 16, 256, 32
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    scales = torch.rand(N, K // G, dtype=torch.float64) + 0.5
    zeros = torch.randint(0, 16, (N, K // G)).double()
    exact = (q.double() - zeros.repeat_interleave(G, 1)) * scales.repeat_interleave(G, 1)
    got = ek.dequantize_int4(ek.pack_int4(q), scales, zeros, G, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, exact.float())


@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_round_trips_a_representable_weight_bit_exactly(group_size, dtype):
    """W = (q - z) * s with power-of-two scales and each group spanning q = 0..15: quantize_int4
    gives back exactly q, s and z, and dequantize_int4 exactly W."""
    N, K = 16, 256
    G = K if group_size == -1 else group_size
    g = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (N, K // G, G), generator=g)
    q[..., 0], q[..., -1] = 0, 15
    z = torch.randint(0, 16, (N, K // G), generator=g).double()
    s = 2.0 ** -torch.randint(2, 8, (N, K // G), generator=g).double()
    w = ((q - z[..., None]) * s[..., None]).view(N, K).to(dtype)
    qw, scales, zeros = ek.quantize_int4(w, group_size)
    assert torch.equal(ek.unpack_int4(qw), q.view(N, K).to(torch.uint8))
    assert torch.equal(scales, s.to(dtype)) and torch.equal(zeros, z.to(dtype))
    assert torch.equal(ek.dequantize_int4(qw, scales, zeros, group_size), w)


def test_dequantize_is_the_formula():
    qw, scales, zeros = quantized(16, 64, 32)
    q = ek.unpack_int4(qw).double()
    expected = (q - zeros.double().repeat_interleave(32, 1)) * scales.double().repeat_interleave(32, 1)
    assert torch.equal(ek.dequantize_int4(qw, scales, zeros, 32, torch.float64), expected)
    assert torch.equal(ek.dequantize_int4(qw, scales, zeros, 32), expected.to(torch.float16))


# ---------------------------------------------------------------------------- GPTQ / AWQ

def _pack_words(values: torch.Tensor, order=range(8)) -> torch.Tensor:
    """Test-side packer: eight values along the last dim per int32 word, value order[j] in nibble j."""
    v = values.to(torch.int64).unflatten(-1, (-1, 8))[..., list(order)]
    words = sum(v[..., j] << (4 * j) for j in range(8))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_checkpoint(N, K, group_size, act_order: bool, seed=0):
    """Synthetic GPTQ tensors (classic format: zeros stored minus one, every stored nibble 0..15)
    and the weight the format's published dequantization (AutoGPTQ's PyTorch path) gives:
    W^T[k, n] = scales[g_idx[k], n] * (q[k, n] - ((qzeros[g_idx[k], n] + 1) & 15)), a stored 15
    being the quantizer's zero of 0."""
    G = K if group_size == -1 else group_size
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=g)
    stored = torch.randint(0, 16, (K // G, N), generator=g)
    stored[0, 0] = 15  # z = 0 at least once
    scales = (torch.rand(K // G, N, generator=g) / 10 + 0.01).half()
    g_idx = torch.arange(K) // G
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    qweight = _pack_words(q.t()).t().contiguous()  # [K / 8, N], packed along K
    qzeros = _pack_words(stored)  # [K / G, N / 8], packed along N
    weight_t = scales.double()[g_idx] * (q.double() - ((stored + 1) & 15).double()[g_idx])
    return (qweight, qzeros, scales, g_idx), weight_t.t()


def awq_checkpoint(N, K, group_size, seed=1):
    """Synthetic AWQ (GEMM format) tensors and the weight AutoAWQ's dequantization gives: unpack
    the nibbles in order, undo the interleave, (q - z) * s per group."""
    G = K if group_size == -1 else group_size
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=g)
    z = torch.randint(0, 16, (K // G, N), generator=g)
    scales = (torch.rand(K // G, N, generator=g) / 10 + 0.01).half()
    qweight, qzeros = _pack_words(q, AWQ_ORDER), _pack_words(z, AWQ_ORDER)  # [K, N / 8], [K / G, N / 8]
    reverse = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    unshuffled = ek.unpack_int4(qweight).long().unflatten(-1, (-1, 8))[..., reverse].flatten(-2)
    assert torch.equal(unshuffled, q)  # the test's packer matches the published order
    weight = ((q - z.repeat_interleave(G, 0)).double() * scales.double().repeat_interleave(G, 0)).t()
    return (qweight, qzeros, scales), weight


def imported_layer(fmt: str, N: int, K: int, group_size: int, with_bias: bool, device="cpu"):
    """(Int4Linear from a synthetic checkpoint, its published float64 weight [N, K], bias or None)."""
    if fmt == "awq":
        tensors, weight = awq_checkpoint(N, K, group_size)
    else:
        tensors, weight = gptq_checkpoint(N, K, group_size, act_order=fmt == "gptq-act-order")
        if fmt == "gptq":
            tensors = tensors[:3]  # no g_idx
    bias = torch.randn(N, generator=torch.Generator().manual_seed(3)).half().to(device) if with_bias else None
    from_checkpoint = ek.nn.Int4Linear.from_awq if fmt == "awq" else ek.nn.Int4Linear.from_gptq
    return from_checkpoint(*(t.to(device) for t in tensors), bias=bias), weight.to(device), bias


def check_imported_layer(fmt, N, K, group_size, with_bias, backend, M, device="cpu"):
    """The layer's weight is the published one exactly, and its output within 2x PyTorch's
    error of F.linear in float64 on it."""
    layer, weight, bias = imported_layer(fmt, N, K, group_size, with_bias, device)
    assert layer.group_size == (-1 if group_size in (-1, K) else group_size)
    assert (layer.perm is not None) == (fmt == "gptq-act-order")
    assert torch.equal(layer.dequantized_weight(torch.float64), weight)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).half().to(device)
    with ek.use_backend(backend):
        y = layer(x)
    assert_linear_matches_float64(y, x, weight, weight.to(x.dtype), bias)


# (format, group size, bias): K = 512, so 256 is a group size and not the whole row
IMPORT_CASES = [("gptq", 32, False), ("gptq-act-order", 32, True), ("gptq-act-order", 64, False),
                ("gptq", 128, True), ("gptq-act-order", 256, True), ("gptq", -1, False),
                ("awq", 64, True), ("awq", -1, False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt,group_size,with_bias", IMPORT_CASES)
def test_import_is_exact(fmt, group_size, with_bias, backend):
    needs_backend(backend)
    check_imported_layer(fmt, 24, 512, group_size, with_bias, backend, M=5)


def test_gptq_reads_a_stored_15_as_zero_0_and_finds_plain_order():
    (qweight, qzeros, scales, g_idx), weight = gptq_checkpoint(16, 64, 32, act_order=False)
    qw, s, z, G, perm = ek.gptq_to_int4(qweight, qzeros, scales, g_idx)
    assert z[0, 0] == 0 and z.max() == 15 and G == 32
    assert perm is None  # g_idx equal to k // G is not act-order
    assert torch.equal(ek.dequantize_int4(qw, s, z, G, torch.float64), weight)


def test_gptq_v2_zero_offset():
    """gptq_v2 stores z itself: the same nibbles read one lower than in the classic format (modulo
    16: a stored 15 is 0 there, 15 here)."""
    (qweight, qzeros, scales, _), _ = gptq_checkpoint(16, 64, 32, False)
    qw, _, z, G, _ = ek.gptq_to_int4(qweight, qzeros, scales, zero_offset=1)
    qw2, _, z2, G2, _ = ek.gptq_to_int4(qweight, qzeros, scales, zero_offset=0)
    assert torch.equal(qw, qw2) and torch.equal(z2, (z - 1) % 16) and G == G2 == 32


def _bad_checkpoints():
    """(name, call, exception, message): N = 16, K = 64, G = 32, one argument wrong."""
    (qw, qz, s, g_idx), _ = gptq_checkpoint(16, 64, 32, act_order=True)
    (aqw, aqz, a_s), _ = awq_checkpoint(16, 64, 32)
    gptq, awq = ek.gptq_to_int4, ek.awq_to_int4
    uneven = g_idx.clone()
    uneven[g_idx == 0] = torch.tensor([0] * 31 + [1])  # 31 features in group 0, 33 in group 1
    return [
        ("gptq qzeros shape", lambda: ek.nn.Int4Linear.from_gptq(qw, qz[:, :1], s), ValueError,
         r"gptq_to_int4: qzeros must have shape \[K / G, N / 8\] = \[2, 2\], got \[2, 1\]"),
        ("gptq qzeros dtype", lambda: gptq(qw, qz.long(), s), TypeError, "qzeros must be int32"),
        ("gptq group size 16", lambda: gptq(qw, qz.repeat(2, 1), s.repeat(2, 1)), ValueError,
         r"K=64 in 4 groups .* group size of 16; effkern takes \(32, 64, 128, 256\) or one group per row"),
        ("gptq odd N", lambda: gptq(qw[:, :12], qz, s[:, :12]), ValueError, "N=12 .* must be multiples of 8"),
        ("gptq scales of another N", lambda: gptq(qw, qz, s[:, :8]), ValueError,
         r"scales must have shape \[K / G, N\] with N=16 .* got \[2, 8\]"),
        ("gptq K not in whole groups", lambda: gptq(qw, qz.repeat(2, 1)[:3], s.repeat(2, 1)[:3]), ValueError,
         r"K=64 a multiple of K / G .* got \[3, 16\]"),
        ("gptq float qweight", lambda: gptq(qw.float(), qz, s), TypeError, r"qweight must be int32 \[K / 8, N\]"),
        ("gptq float scales", lambda: gptq(qw, qz, s.int()), TypeError, "scales must be a float tensor"),
        ("gptq g_idx length", lambda: gptq(qw, qz, s, g_idx[:32]), ValueError, r"g_idx must have shape \[K\] = \[64\]"),
        ("gptq g_idx float", lambda: gptq(qw, qz, s, g_idx.float()), TypeError, "g_idx must be an integer tensor"),
        ("gptq g_idx out of range", lambda: gptq(qw, qz, s, torch.where(g_idx == 1, 2, g_idx)), ValueError,
         r"g_idx must hold group indices in \[0, 2\) .* got 2"),
        ("gptq g_idx uneven groups", lambda: gptq(qw, qz, s, uneven), ValueError,
         "g_idx must put exactly 32 input features in each group .* from 31 to 33"),
        ("gptq zero_offset", lambda: gptq(qw, qz, s, zero_offset=2), ValueError, "zero_offset must be 1 .* or 0"),
        ("awq qzeros shape", lambda: ek.nn.Int4Linear.from_awq(aqw, _pack_words(torch.zeros(2, 24)), a_s),
         ValueError, r"awq_to_int4: qzeros must have shape \[K / G, N / 8\] = \[2, 2\], got \[2, 3\]"),
        ("awq group size 16", lambda: awq(aqw, aqz.repeat(2, 1), a_s.repeat(2, 1)), ValueError, "group size of 16"),
        ("awq K not a multiple of 8", lambda: awq(aqw[:60], aqz, a_s), ValueError, "K=60 and N=16"),
        ("awq scales shape", lambda: awq(aqw, aqz, a_s.t()), ValueError, r"scales must have shape .* got \[16, 2\]"),
        ("awq 3-D qweight", lambda: awq(aqw[None], aqz, a_s), ValueError,
         r"qweight must have shape \[K, N / 8\], got \[1, 64, 2\]"),
    ]


@parametrize_by_name(_bad_checkpoints())
def test_bad_checkpoints_raise_clear_errors(case):
    _, call, exc, message = _bad_checkpoints()[case]
    with pytest.raises(exc, match=message):
        call()


# ---------------------------------------------------------------------------- the kernel

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("M", ODD_M)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int4_linear_matches_float64(backend, group_size, M, dtype, poison_empty):
    """Against float64 on the dequantized weight: within 2x PyTorch's error in the same precision."""
    needs_backend(backend)
    N, K = 40, 512
    qw, scales, zeros = quantized(N, K, group_size, dtype, seed=M)
    x, b = torch.randn(M, K).to(dtype), torch.randn(N).to(dtype)
    with ek.use_backend(backend):
        y = ek.int4_linear(x, qw, scales, zeros, group_size, b)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_linear_matches_float64(y, x, ek.dequantize_int4(qw, scales, zeros, group_size, torch.float64),
                                  ek.dequantize_int4(qw, scales, zeros, group_size, dtype), b)


@pytest.mark.parametrize("split_k", [2, 5])
@pytest.mark.parametrize("group_size", [32, -1])
def test_split_k(split_k, group_size, poison_empty):
    needs_backend("triton")
    N, K = 24, 640
    qw, scales, zeros = quantized(N, K, group_size, torch.float32)
    x, b = torch.randn(2, K), torch.randn(N)
    out = kernels().int4_matmul(x, qw, scales, zeros, K if group_size == -1 else group_size, b, split_k=split_k)
    torch.testing.assert_close(out, int4_linear_reference(x, qw, scales, zeros, group_size, b), rtol=1e-5, atol=1e-5)


# (group size, K): K steps of the tiles' depths that fit the group (32 to 256) run 1 to 8 to a
# group over 2 to 7 groups; one group per row with a K that is no multiple of any depth (masked steps)
GPU_TILE_GROUPS = [(32, 224), (64, 320), (128, 384), (256, 512), (-1, 328)]


@pytest.mark.parametrize("split", [False, True], ids=["one pass", "split-K"])
@pytest.mark.parametrize("group_size, K", GPU_TILE_GROUPS)
def test_every_gpu_tile_matches_float64(group_size, K, split, monkeypatch, poison_empty):
    """The kernel at each tile it runs at on a GPU, forced as the interpreter's config (GPU runs are
    rare): one pass at the autotuned tiles whose depth fits the group and at the fixed config,
    split-K at its config, both fitted to the group as the launcher fits them. M: a tile and a half
    of rows (the split config's: a decoding batch); N = 264 crosses every tile's columns; split-K
    in 2 slices (whole K steps: a first of 2 to 4, a last of 1 to 3, partial for K = 328)."""
    needs_backend("triton")
    from effkern.kernels import _splitk

    k = kernels()
    G = K if group_size == -1 else group_size
    fitted = tile_of(k._fit_depth(_splitk.tile_kwargs(k._SPLIT["gpu"] if split else k._FIXED["gpu"]), G, K))
    tiles = [fitted] if split else list(dict.fromkeys(autotuned_tiles(k._gemm_tuned, dict(K=K), GROUP=G) + [fitted]))
    place, split_k = (k._SPLIT, 2) if split else (k._FIXED, 1)
    one_pass = record_calls(monkeypatch, _splitk, "launch", lambda args, _: tile_of(args[5]["interpreter"]))
    sliced = record_calls(monkeypatch, _splitk, "run_split_k", lambda args, _: tile_of(args[3]))
    N = 264
    qw, scales, zeros = quantized(N, K, group_size)
    b = torch.randn(N).half()
    weight64, weight16 = (ek.dequantize_int4(qw, scales, zeros, group_size, dtype)
                          for dtype in (torch.float64, torch.float16))
    for blocks in tiles:
        monkeypatch.setitem(place, "interpreter", (blocks, 1, 4))  # stages and warps: the interpreter ignores them
        x = torch.randn(3 * blocks[0] // 2 + 1, K).half()
        y = k.int4_matmul(x, qw, scales, zeros, G, b, split_k=split_k)
        assert_linear_matches_float64(y, x, weight64, weight16, b, what=f"tile {blocks}, M={x.shape[0]}")
    assert (sliced, one_pass) == ((tiles, []) if split else ([], tiles))


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_strides_and_scale_dtype(backend):
    """3-D and transposed inputs; scales/zeros kept in float32 with float16 activations."""
    needs_backend(backend)
    qw, scales, zeros = quantized(16, 64, 32, torch.float32)
    b = torch.randn(32).half()[::2]
    for x in (torch.randn(2, 3, 64).half(), torch.randn(64, 5).half().t()):
        with ek.use_backend(backend):
            y = ek.int4_linear(x, qw, scales, zeros, 32, b)
        expected = int4_linear_reference(x.contiguous(), qw, scales, zeros, 32, b.contiguous())
        assert y.shape == (*x.shape[:-1], 16)
        torch.testing.assert_close(y, expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["scales", "zeros"])
def test_scales_or_zeros_with_their_own_strides(backend, which):
    """Scales and zeros each read through their own strides: one of them column-major (the same
    values, from a transposed checkpoint layout, say) while the other stays row-major."""
    needs_backend(backend)
    qw, scales, zeros = quantized(24, 128, 32, torch.float32)
    x, b = torch.randn(5, 128), torch.randn(24)
    expected = int4_linear_reference(x, qw, scales, zeros, 32, b)
    given = dict(scales=scales, zeros=zeros)
    given[which] = given[which].t().contiguous().t()
    assert given[which].stride() != (scales if which == "zeros" else zeros).stride()
    with ek.use_backend(backend):
        y = ek.int4_linear(x, qw, given["scales"], given["zeros"], 32, b)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_one_group_per_row_keeps_each_tiles_depth():
    """With one group per row (group = K) no K step can cross a group, so the launcher keeps each
    tile's power-of-two depth; fitted to a K such as 328 instead, the depth would not compile for
    a GPU, which the interpreted launches of the other tests do not show."""
    needs_backend("triton")
    from effkern.kernels._splitk import tile_kwargs

    k = kernels()
    for setting in (*k._FIXED.values(), *k._SPLIT.values()):
        depth = tile_kwargs(setting)["BLOCK_K"]
        assert k._fit_depth(tile_kwargs(setting), 328, 328)["BLOCK_K"] == depth


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    needs_backend(backend)
    qw, scales, zeros = quantized(16, 64, 32)
    x = torch.randn(0, 64).half().requires_grad_()
    with ek.use_backend(backend):
        y = ek.int4_linear(x, qw, scales, zeros, 32)
        y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 64)


@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_k_zero_gives_the_bias(backend, group_size):
    """K = 0 (as F.linear takes it), one group per row included: rows without groups."""
    needs_backend(backend)
    qw, scales, zeros = ek.quantize_int4(torch.randn(16, 0).half(), group_size)
    assert qw.shape == scales.shape == zeros.shape == (16, 0)
    x, b = torch.randn(3, 0).half().requires_grad_(), torch.randn(16).half()
    with ek.use_backend(backend):
        y = ek.int4_linear(x, qw, scales, zeros, group_size, b)
        y.sum().backward()
    assert torch.equal(y, b.expand(3, 16)) and x.grad.shape == (3, 0)


# ---------------------------------------------------------------------------- autograd

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_through_the_dequantized_weight(backend, dtype):
    needs_backend(backend)
    N, K = 32, 128
    qw, scales, zeros = quantized(N, K, 64, dtype)
    x = torch.randn(2, 3, K).to(dtype).requires_grad_()
    b = torch.randn(N).to(dtype).requires_grad_()
    grad = torch.randn(2, 3, N).to(dtype)
    with ek.use_backend(backend):
        ek.int4_linear(x, qw, scales, zeros, 64, b).backward(grad)
    assert_matches_float64(x.grad, grad.double() @ ek.dequantize_int4(qw, scales, zeros, 64, torch.float64),
                           grad @ ek.dequantize_int4(qw, scales, zeros, 64, dtype), reduction=N)
    torch.testing.assert_close(b.grad.double(), grad.double().sum((0, 1)), rtol=1e-3, atol=1e-3)


def test_reference_gradcheck():
    qw, scales, zeros = quantized(8, 32, 32, torch.float64)
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: ek.int4_linear(x, qw, scales, zeros, 32, b), (x, b))


def test_weight_gradient_is_a_clear_error():
    qw, scales, zeros = quantized(8, 32, 32, torch.float32)
    with pytest.raises(RuntimeError, match="quantized weight is frozen"):
        ek.int4_linear(torch.randn(2, 32), qw, scales.requires_grad_(), zeros, 32)
    with pytest.raises(RuntimeError, match="quantized weight is frozen"):
        ek.int4_linear(torch.randn(2, 32), qw, scales.detach(), zeros.requires_grad_(), 32)


# ---------------------------------------------------------------------------- registration

def sample_inputs(requires_grad=False):
    torch.manual_seed(0)
    for lead, N, K, G, bias in [((), 8, 64, 32, True), ((3,), 16, 32, -1, False), ((2, 3), 8, 128, 64, True)]:
        qw, scales, zeros = quantized(N, K, G, torch.float32)
        x = torch.randn(*lead, K, requires_grad=requires_grad)
        b = torch.randn(N, requires_grad=requires_grad) if bias else None
        yield torch.ops.effkern.int4_linear.default, (x, qw, scales, zeros, G, b)
        if not requires_grad:
            grad = torch.randn(*lead, N)
            yield torch.ops.effkern.int4_linear_bwd.default, (grad, qw, scales, zeros, G, [True, bias])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, requires_grad):
    assert_opcheck_passes(backend, sample_inputs(requires_grad))


# (N, K, group size, symmetric, dtype): K = 40 and 24 are no multiple of 16 (one group per row),
# K = 0 has no groups
QUANTIZE_SAMPLES = [(8, 64, 32, False, torch.float32), (24, 40, -1, True, torch.bfloat16),
                    (16, 256, 128, True, torch.float16), (8, 512, 256, False, torch.bfloat16),
                    (8, 24, -1, False, torch.float16), (16, 64, 64, True, torch.float64),
                    (8, 0, -1, False, torch.float32)]


def quantization_samples(requires_grad=False):
    """(op, args) for quantize_int4, dequantize_int4 (``requires_grad``: its scales and zeros,
    the only differentiable arguments of the four ops) and its backward op, pack_int4 and
    unpack_int4."""
    torch.manual_seed(0)
    for N, K, G, symmetric, dtype in QUANTIZE_SAMPLES:
        w = layer_weight(N, K).to(dtype)
        qw, scales, zeros = ek.quantize_int4(w, G, symmetric)
        if requires_grad:
            if dtype == torch.float64 or K == 0:
                continue  # (the autograd checks: float32 and 16-bit, elements to differentiate)
            scales, zeros = scales.requires_grad_(), zeros.requires_grad_()
        else:
            yield torch.ops.effkern.quantize_int4.default, (w, G, symmetric)
        out_dtype = {torch.float32: None, torch.bfloat16: torch.float32, torch.float16: torch.float16,
                     torch.float64: torch.float32}[dtype]
        yield torch.ops.effkern.dequantize_int4.default, (qw, scales, zeros, G, out_dtype)
        if not requires_grad:  # its backward op, for each pair of gradients asked for
            grad = torch.randn(N, K).to(out_dtype or dtype)
            for mask in ([True, True], [True, False], [False, True]):
                yield torch.ops.effkern.dequantize_int4_bwd.default, (grad, qw, scales, zeros, G, mask)
    if requires_grad:
        return
    for shape, dtype in [((1, 8), torch.uint8), ((3, 4, 24), torch.int64), ((5, 16), torch.int8),
                         ((40,), torch.int16), ((0, 8), torch.int32), ((3, 0), torch.uint8)]:
        q = torch.randint(0, 16, shape, dtype=dtype)
        yield torch.ops.effkern.pack_int4.default, (q,)
    for shape in [(1, 1), (3, 5), (2, 3, 7), (4,), (0, 3)]:
        words = torch.randint(-2**31, 2**31, shape, dtype=torch.int64).to(torch.int32)
        yield torch.ops.effkern.unpack_int4.default, (words,)
    yield torch.ops.effkern.unpack_int4.default, (torch.randint(-2**31, 2**31, (6, 4)).to(torch.int32).t(),)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_quantization_ops_opcheck(requires_grad):
    """quantize_int4, dequantize_int4, pack_int4, unpack_int4: torch.library.opcheck (schema, fake,
    autograd registration, aot dispatch with static and dynamic shapes). They run the same PyTorch
    code on every backend."""
    assert_opcheck_passes("reference", quantization_samples(requires_grad))


@pytest.mark.gpu
@pytest.mark.parametrize("requires_grad", [False, True])
def test_gpu_quantization_ops_opcheck(requires_grad):
    """The same samples on CUDA tensors (the ops' one implementation runs on any device)."""
    needs_backend("reference", "cuda")

    def on_gpu(t):
        return t.detach().cuda().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t

    assert_opcheck_passes("reference", ((op, tuple(on_gpu(a) for a in args))
                                        for op, args in quantization_samples(requires_grad)))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_quantization_ops_fakes_give_the_real_outputs_metadata(dynamic):
    """Each op on fake tensors (of symbolic sizes too), and on the meta device: the shape, dtype,
    strides and device of its real outputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    for op, args in quantization_samples():
        real = op(*args)
        real = real if isinstance(real, tuple) else (real,)
        mode = FakeTensorMode(shape_env=ShapeEnv() if dynamic else None)
        with mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = op(*fake_args)
        meta = op(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args))
        for outputs in (fake, meta):
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            assert len(outputs) == len(real)
            for o, r in zip(outputs, real):
                where = f"{op} on {[tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]}"
                assert o.dtype == r.dtype, where
                assert [int(d) for d in o.shape] == list(r.shape), where
                assert [int(d) for d in o.stride()] == list(r.stride()), where
        assert all(o.device.type == "meta" for o in (meta if isinstance(meta, tuple) else (meta,)))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
def test_quantize_and_dequantize_compile_in_one_graph(group_size, symmetric):
    """quantize_int4 -> dequantize_int4 (and unpack -> pack) under torch.compile(fullgraph=True):
    one graph, no break, the eager bits; a second weight shape reuses the dynamic graph. pack's
    range check still runs in a compiled graph (in the op)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()

    def fn(w):
        qw, scales, zeros = ek.quantize_int4(w, group_size, symmetric)
        back = ek.dequantize_int4(qw, scales, zeros, group_size, torch.float32)
        return back * 2, ek.pack_int4(ek.unpack_int4(qw)), scales, zeros

    w = layer_weight(16, 128).half()
    explanation = torch._dynamo.explain(fn)(w)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for weight in (w, layer_weight(24, 256, seed=1).half()):
        for got, want in zip(compiled(weight), fn(weight), strict=True):
            assert torch.equal(got, want)
    assert counter.frame_count == 1
    packed = torch.compile(ek.pack_int4, backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match=r"got values in \[0, 16\]"):  # the range check runs in the op
        packed(torch.tensor([[0] * 7 + [16]]))


def test_dequantize_gradients_are_the_formulas():
    """dequantize_int4 stays differentiable in scales and zeros, as the plain PyTorch formula it
    was (gradcheck in float64; in float32 and float16 the gradients autograd takes through the
    reference), also compiled; the weight itself (int32) takes none."""
    from effkern.int4 import dequantize_int4_reference

    qw, scales, zeros = quantized(8, 64, 32, torch.float64)
    assert torch.autograd.gradcheck(lambda s, z: ek.dequantize_int4(qw, s, z, 32),
                                    (scales.requires_grad_(), zeros.requires_grad_()))
    for dtype, out_dtype in [(torch.float32, None), (torch.float16, torch.float32), (torch.bfloat16, torch.float16)]:
        qw, scales, zeros = quantized(16, 128, -1, dtype)
        grad = torch.randn(16, 128).to(out_dtype or dtype)
        ours, theirs = ([t.clone().requires_grad_() for t in (scales, zeros)] for _ in range(2))
        ek.dequantize_int4(qw, *ours, -1, out_dtype).backward(grad)
        dequantize_int4_reference(qw, *theirs, -1, out_dtype).backward(grad)
        for a, b in zip(ours, theirs):
            assert a.grad.dtype == dtype
            torch.testing.assert_close(a.grad, b.grad)
    torch._dynamo.reset()
    only_scales = scales.clone().requires_grad_()
    compiled = torch.compile(lambda s: ek.dequantize_int4(qw, s, zeros, -1).float().square().sum(), fullgraph=True)
    compiled(only_scales).backward()
    expected = scales.clone().requires_grad_()
    dequantize_int4_reference(qw, expected, zeros, -1).float().square().sum().backward()
    torch.testing.assert_close(only_scales.grad, expected.grad)


def test_quantize_does_not_take_gradients():
    """As quantize_int8 and prune_24: the weight is detached."""
    w = torch.randn(16, 64, requires_grad=True)
    qw, scales, zeros = ek.quantize_int4(w, 32)
    assert not any(t.requires_grad for t in (qw, scales, zeros))
    assert all(torch.equal(a, b) for a, b in zip((qw, scales, zeros), ek.quantize_int4(w.detach(), 32)))


def test_ops_called_directly_raise_the_public_errors():
    """The checks run in the ops (and their fakes) too, with the public functions' messages;
    pack's range check in the op only (it reads the values)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    qw, scales, zeros = quantized(16, 64, 32)
    ops = torch.ops.effkern
    cases = [(ops.quantize_int4, (torch.randn(8, 192), 128), ValueError, "not divisible by group_size=128"),
             (ops.quantize_int4, (torch.randn(12, 64), 32), ValueError, "multiples of 8"),
             (ops.quantize_int4, (torch.randn(64), 32), ValueError, "2-D"),
             (ops.quantize_int4, (torch.randn(8, 64).int(), 32), TypeError, "weight must be a float tensor"),
             (ops.dequantize_int4, (qw, scales[:, :1], zeros, 32), ValueError,
              r"scales must have shape \[N, K / group_size\]"),
             (ops.dequantize_int4, (qw.float(), scales, zeros, 32), TypeError, "packed int32 tensor"),
             (ops.dequantize_int4, (qw, scales, zeros, 48), ValueError, "group_size must be one of"),
             (ops.pack_int4, (torch.zeros(2, 12, dtype=torch.uint8),), ValueError, "a multiple of 8, got 12"),
             (ops.pack_int4, (torch.zeros(2, 8),), TypeError, "must be uint8, int8, int16, int32 or int64"),
             (ops.unpack_int4, (qw.long(),), TypeError, "must be int32")]
    for op, args, exc, message in cases:
        with pytest.raises(exc, match=message):
            op(*args)
        mode = FakeTensorMode()
        with mode, pytest.raises(exc, match=message):
            op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    with pytest.raises(ValueError, match=r"values in \[0, 15\], got values in \[0, 16\]"):
        ops.pack_int4(torch.tensor([[0] * 7 + [16]]))
    for fn in (ek.pack_int4, ek.unpack_int4):
        with pytest.raises(ValueError, match="got a scalar"):
            fn(torch.tensor(3, dtype=torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_forward_backward(backend):
    assert_compiles_like_eager(ek.nn.Int4Linear.from_linear(torch.nn.Linear(64, 32), group_size=32), backend)


def test_autocast_casts_input_and_bias_only():
    """float32 input and bias, or float32 input with a bias already in bf16 (a mix F.linear takes
    under autocast), run in bf16 under torch.autocast; outside it the mix is a TypeError."""
    qw, scales, zeros = quantized(16, 64, 32, torch.float32)
    x, b = torch.randn(4, 64), torch.randn(16)
    want = int4_linear_reference(x.bfloat16(), qw, scales, zeros, 32, b.bfloat16())
    for bias in (b, b.bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ek.int4_linear(x, qw, scales, zeros, 32, bias)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, want)
    with pytest.raises(TypeError, match="bias has dtype torch.bfloat16 but input has torch.float32"):
        ek.int4_linear(x, qw, scales, zeros, 32, b.bfloat16())


# ---------------------------------------------------------------------------- errors

def _bad_calls():
    qw, scales, zeros = quantized(16, 64, 32, torch.float32)
    x = torch.randn(3, 64)
    return [
        ("K not divisible by group", (torch.randn(3, 96), *quantized(16, 96, -1, torch.float32), 64),
         ValueError, "K=96 is not divisible by group_size=64"),
        ("wrong scale shape", (x, qw, scales[:, :1], zeros, 32), ValueError, r"scales must have shape \[N, K / group_size\]"),
        ("wrong zero shape", (x, qw, scales, zeros.t(), 32), ValueError, r"zeros must have shape"),
        ("odd N", (x, qw[:12], scales[:12], zeros[:12], 32), ValueError, "N=12 and K=64 must be multiples of 8"),
        ("float weight", (x, torch.randn(16, 64), scales, zeros, 32), TypeError, "packed int32 tensor"),
        ("K mismatch", (torch.randn(3, 72), qw, scales, zeros, 32), ValueError, "K=72 does not match the weight's K=64"),
        ("group size", (x, qw, scales, zeros, 48), ValueError, "group_size must be one of"),
        ("int input", (x.int(), qw, scales, zeros, 32), TypeError, "input must be float16, bfloat16 or float32"),
        ("zeros device", (x, qw, scales, zeros.to("meta"), 32), RuntimeError, "zeros is on meta but qweight"),
        ("bias device", (x, qw, scales, zeros, 32, torch.randn(16, device="meta")), RuntimeError, "bias is on meta"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@parametrize_by_name(_bad_calls())
def test_bad_inputs_raise_clear_errors(backend, case):
    assert_bad_call_raises(backend, ek.int4_linear, _bad_calls()[case])


def test_bad_quantize_inputs():
    with pytest.raises(ValueError, match="not divisible by group_size=128"):
        ek.quantize_int4(torch.randn(8, 192), 128)
    with pytest.raises(ValueError, match="multiples of 8"):
        ek.quantize_int4(torch.randn(12, 64), 32)
    with pytest.raises(ValueError, match="2-D"):
        ek.quantize_int4(torch.randn(64), 32)


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    qw, scales, zeros = quantized(16, 64, 32)
    with ek.use_backend("cuda"), pytest.raises(RuntimeError, match="CUDA int4 kernel runs on CUDA tensors"):
        ek.int4_linear(torch.randn(2, 64).half(), qw, scales, zeros, 32)
    with ek.use_backend("cuda"), pytest.raises(TypeError, match="float64 runs on the reference backend"):
        ek.int4_linear(torch.randn(2, 64, dtype=torch.float64), *quantized(16, 64, 32, torch.float64), 32)


@pytest.fixture
def recorded_int4_policy(tmp_path, monkeypatch):
    """record(gpu, entries): ``auto`` reads these measurements in place of effkern/policies/int4.json."""
    from effkern import _policy
    from effkern import int4 as int4_module

    def forget():  # the policy file and auto's picks are cached
        _policy._entries.cache_clear()
        int4_module._auto_backend.cache_clear()

    def record(gpu: str, entries: list):
        policy = {"version": 1, "op": "int4", "devices": {gpu: {"entries": entries}}}
        (tmp_path / "int4.json").write_text(json.dumps(policy))
        forget()

    monkeypatch.setattr(_policy, "POLICY_DIR", tmp_path)
    yield record
    forget()


def measured(backend, M, N, K, dtype="bfloat16", group_size=128):
    return {"dtype": dtype, "group_size": group_size, "M": M, "N": N, "K": K, "fwd": backend}


def test_auto_takes_the_recorded_pick_where_the_cuda_kernel_runs(recorded_int4_policy, monkeypatch):
    """auto on a GPU (its name, triton and effkern._C faked here): the measured winner of the
    nearest shape of the same dtype and group size; "cuda" only where the CUDA kernel takes the
    call, triton where it does not or nothing was measured; reference on CPU and for float64."""
    from effkern import int4 as int4_module

    needs_backend("cuda")  # effkern._C built: the kernel's op is registered
    recorded_int4_policy("GPU X", [measured("cuda", 1, 4096, 4096), measured("triton", 4096, 4096, 4096)])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    monkeypatch.setattr(int4_module, "backend_available", lambda name, device: (True, ""))
    gpu, bf16 = torch.device("cuda", 0), torch.bfloat16

    def auto(M, N=4096, K=4096, group_size=128, dtype=bf16, scales_dtype=bf16, device=gpu):
        return int4_module._auto_backend(device, dtype, scales_dtype, M, N, K, group_size)

    assert auto(1) == "cuda" and auto(8, K=11008) == "cuda"  # nearest measured shape: M = 1
    assert auto(2048) == "triton"
    assert auto(1, N=4000) == "triton"  # measured "cuda", but the kernel needs N % 64 == 0
    assert auto(1, group_size=-1) == "triton"  # nothing measured for one group per row
    assert auto(1, scales_dtype=torch.float32) == "triton"  # the kernel takes scales in the activation dtype
    assert auto(1, dtype=torch.float16, scales_dtype=torch.float16) == "triton"  # nothing measured in fp16
    assert auto(1, dtype=torch.float64, scales_dtype=torch.float64) == "reference"
    assert auto(1, device=torch.device("cpu")) == "reference"
    int4_module._auto_backend.cache_clear()
    monkeypatch.setattr(int4_module, "backend_available", lambda name, device: (name != "cuda", "no effkern._C"))
    assert auto(1) == "triton"


def test_derived_values_are_made_once_per_weight():
    """The CUDA backend's pre-shuffled weight (effkern._cache.DerivedCache) is made once per
    weight, again after an in-place change, and dropped with the weight."""
    from effkern._cache import DerivedCache
    from effkern.int4_cuda_layout import shuffle_for_cuda

    cache = DerivedCache()
    qw, scales, zeros = quantized(64, 256, 128)
    calls = []

    def make():
        calls.append(1)
        return shuffle_for_cuda(qw, scales, zeros, 128)

    first = cache.get((qw, scales, zeros), make)
    assert cache.get((qw, scales, zeros), make) is first and len(calls) == 1
    scales.mul_(2)
    again = cache.get((qw, scales, zeros), make)
    assert len(calls) == 2 and torch.equal(again[1], first[1] * 2)
    del qw, make, first, again
    assert not cache.entries


# ---------------------------------------------------------------------------- nn module

@pytest.mark.parametrize("group_size", [32, -1])
def test_int4_linear_module_and_state_dict(group_size):
    linear = torch.nn.Linear(64, 24)
    layer = ek.nn.Int4Linear.from_linear(linear, group_size=group_size)
    assert layer.bias is linear.bias
    x = torch.randn(2, 5, 64)
    y = layer(x)
    err = (layer.dequantized_weight() - linear.weight).abs().max()
    assert err <= layer.scales.max() / 2 + 1e-6
    state = layer.state_dict()
    assert set(state) == {"qweight", "scales", "zeros", "bias"}
    fresh = ek.nn.Int4Linear(64, 24, group_size=group_size)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), y) and f"group_size={group_size}" in repr(fresh)
    with pytest.raises(ValueError, match="group_size"):
        ek.nn.Int4Linear(64, 24, group_size=100)
    with pytest.raises(TypeError, match="nn.Linear"):
        ek.nn.Int4Linear.from_linear(torch.nn.Conv1d(1, 1, 1))


def test_act_order_layer_state_dict_round_trip():
    (qweight, qzeros, scales, g_idx), weight = gptq_checkpoint(16, 128, 32, act_order=True)
    layer = ek.nn.Int4Linear.from_gptq(qweight, qzeros, scales, g_idx)
    fresh = ek.nn.Int4Linear(128, 16, bias=False, group_size=32, dtype=torch.float16, act_order=True)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 128).half()
    assert torch.equal(fresh(x), layer(x)) and "perm" in layer.state_dict() and "act_order=True" in repr(layer)


# ---------------------------------------------------------------------------- GPU code, compiled here

INT4_TYPES = dict(q_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16", bias_ptr="*bf16", c_ptr="*bf16", a_ptr="*bf16",
                  M="i32", N="i32", K="i32", K_PER_SPLIT="i32", stride_am="i32", stride_ak="i32", stride_qn="i32",
                  stride_qw="i32", stride_sn="i32", stride_sg="i32", stride_zn="i32", stride_zg="i32",
                  stride_cs="i32", stride_cm="i32", stride_cn="i32")


@pytest.mark.parametrize("cc", [80, 90])
def test_kernel_compiles_for_gpus_onto_tensor_cores(compile_for_gpu, cc):
    needs_backend("triton")
    from effkern.kernels._splitk import tile_kwargs

    k = kernels()
    configs = {name: k._fit_depth(tile_kwargs(setting), 128, 4096)
               for name, setting in (("fixed", k._FIXED["gpu"]), ("split-k", k._SPLIT["gpu"]))}
    runs = [(128, configs)]
    if cc == 90:  # and every autotuning candidate, at groups of 256 (which every candidate's depth divides)
        runs.append((256, {f"{bm}x{bn}x{bk}": tile_kwargs(((bm, bn, bk, 8), stages, warps))
                           for bm, bn, bk, stages, warps in k._GEMM_SHAPES}))
    for group, launch_configs in runs:
        assert_compiles_onto_bf16_tensor_cores(compile_for_gpu, "effkern.kernels.int4:int4_matmul_kernel", INT4_TYPES,
                                               dict(GROUP=group, HAS_BIAS=True, DOT_PRECISION="tf32", EVEN_K=True),
                                               launch_configs, cc, unit_strides=("stride_ak", "stride_qw", "stride_sg",
                                                                                 "stride_zg", "stride_cn"))


# ---------------------------------------------------------------------------- GPU

# (backend, M, group_size): the CUDA kernel is a decoding kernel, it takes M <= 64 (and every
# group size: tests/test_int4_cuda.py); group sizes 64 and 256 through Triton at a split-K size
# and an autotuned one
GPU_CASES = ([(backend, M, G) for backend, Ms in (("triton", ODD_M + (64, 1024)),
                                                  ("cuda", tuple(M for M in ODD_M + (64,) if M <= 64)))
              for M in Ms for G in (32, 128, -1)]
             + [("triton", M, G) for M in (1, 100) for G in (64, 256)])


@pytest.mark.gpu
@pytest.mark.parametrize("backend,M,group_size", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_float64(backend, M, group_size, dtype, poison_empty):
    """Through the op: Triton on an N that is no multiple of a tile; the Marlin-style CUDA kernel
    (pre-shuffled weight; the kernel alone: tests/test_int4_cuda.py) on the decoding sizes it takes."""
    needs_backend(backend, "cuda")
    N, K = (520 if backend == "triton" else 512), 4096
    qw, scales, zeros = quantized(N, K, group_size, dtype, device="cuda")
    x, b = torch.randn(M, K, device="cuda").to(dtype), torch.randn(N, device="cuda").to(dtype)
    with ek.use_backend(backend):
        y = ek.int4_linear(x, qw, scales, zeros, group_size, b)
    assert_linear_matches_float64(y, x, ek.dequantize_int4(qw, scales, zeros, group_size, torch.float64),
                                  ek.dequantize_int4(qw, scales, zeros, group_size, dtype), b)


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_gpu_autotuned_triton_matches_float64(group_size, monkeypatch, poison_empty):
    """The default GPU path, autotuning (the tests above run one fixed tile), over the tiles whose
    depth fits the group: 200 rows, an N that is no multiple of a tile."""
    needs_backend("triton", "cuda")
    monkeypatch.setenv("EFFKERN_TRITON_AUTOTUNE", "1")
    N, K, dtype = 520, 1024, torch.bfloat16
    qw, scales, zeros = quantized(N, K, group_size, dtype, device="cuda")
    x, b = torch.randn(200, K, device="cuda").to(dtype), torch.randn(N, device="cuda").to(dtype)
    with ek.use_backend("triton"):
        y = ek.int4_linear(x, qw, scales, zeros, group_size, b)
    assert_linear_matches_float64(y, x, ek.dequantize_int4(qw, scales, zeros, group_size, torch.float64),
                                  ek.dequantize_int4(qw, scales, zeros, group_size, dtype), b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,M", [("triton", 1), ("triton", 100), ("cuda", 1), ("cuda", 16)])
def test_gpu_cuda_graph_replays_like_eager(backend, M):
    """The CUDA backend's pre-shuffled weight is made by the warm-up, before the capture."""
    N, K, G = 512, 1024, 128
    qw, scales, zeros = quantized(N, K, G, torch.bfloat16, device="cuda")
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)

    def inputs(seed):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed))
        return [x.to("cuda", torch.bfloat16).requires_grad_()]

    assert_cuda_graph_replays_like_eager(backend, lambda x: ek.int4_linear(x, qw, scales, zeros, G, b), inputs)


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,expected", [(1, 512, "cuda"), (3, 520, "triton"), (100, 512, "triton")])
def test_gpu_auto_backend_runs(M, N, expected, recorded_int4_policy, monkeypatch, poison_empty):
    """auto with a measurement for this GPU that says "cuda": the CUDA kernel where it takes the
    call, Triton where it does not (N % 64, M > 64); right either way."""
    from effkern import int4 as int4_module

    needs_backend("cuda", "cuda")
    K, G, dtype = 1024, 128, torch.bfloat16
    recorded_int4_policy(torch.cuda.get_device_name(), [measured("cuda", 1, 512, K)])
    picks = record_calls(monkeypatch, int4_module, "choose_backend", lambda args, backend: backend)
    qw, scales, zeros = quantized(N, K, G, dtype, device="cuda")
    x, b = torch.randn(M, K, device="cuda").to(dtype), torch.randn(N, device="cuda").to(dtype)
    with ek.use_backend("auto"):
        y = ek.int4_linear(x, qw, scales, zeros, G, b)
    assert picks == [expected]
    assert_linear_matches_float64(y, x, ek.dequantize_int4(qw, scales, zeros, G, torch.float64),
                                  ek.dequantize_int4(qw, scales, zeros, G, dtype), b)


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("backend,M", [("triton", 3), ("triton", 100), ("cuda", 3)])
@pytest.mark.parametrize("fmt", ["gptq-act-order", "awq"])
def test_gpu_imported_layers_match_float64(fmt, backend, M, poison_empty):
    """GPTQ (act-order, zeros up to 16) and AWQ layers against their formats' own dequantization."""
    needs_backend(backend, "cuda")
    check_imported_layer(fmt, 256, 1024, 128, True, backend, M, device="cuda")


def test_int4_linear_module_arguments_reach_the_layer():
    """from_linear's symmetric, the constructor's dtype and its N % 8 check."""
    linear = torch.nn.Linear(64, 16)
    layer = ek.nn.Int4Linear.from_linear(linear, group_size=32, symmetric=True)
    for got, want in zip((layer.qweight, layer.scales, layer.zeros), ek.quantize_int4(linear.weight, 32, True)):
        assert torch.equal(got, want)
    fresh = ek.nn.Int4Linear(64, 16, group_size=32, dtype=torch.float16)
    assert fresh.scales.dtype == fresh.zeros.dtype == fresh.bias.dtype == torch.float16
    with pytest.raises(ValueError, match="out_features=12"):
        ek.nn.Int4Linear(64, 12, group_size=32)
