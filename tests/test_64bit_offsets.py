"""Offsets past 2^31 elements, in every family's Triton kernels.

Triton passes an int argument below 2^31 as an int32, and program ids and aranges are int32, so
``index * stride`` wraps unless one side is cast to int64 first; the small shapes of the other
tests never reach 2^31. Here one operand is a view whose rows (or batches) lie 2^31 - 16 elements
apart in a storage of 2^32 + a few elements: address space that a CPU allocates lazily, so only the
pages the view covers are touched (well under 1 GB in all; on a GPU it is real memory, up to 40 GiB
at once, and a test that cannot have it skips). Its row 2 starts 2^32 - 32 elements in,
an offset that int32 arithmetic makes -32: the 32 elements before the view hold a sentinel, so a
wrapped offset reads it and the result is wrong, where a right one matches the same call on a
compact copy bit for bit (the kernels see the same values in the same order).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from op_checks import needs_backend

WIDE = 2**31 - 16  # (3 - 1) * WIDE = 2^32 - 32, which is -32 in int32
SENTINEL = 100

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def triton_kernels(device):
    needs_backend("triton", device)
    from effkern.kernels import _launch
    if device == "cpu" and not _launch.interpreted():
        pytest.skip("the CPU variant runs the kernels in Triton's interpreter")
    yield
    if device == "cuda":  # on a GPU the views' storages are real: 4 to 16 GiB each
        torch.cuda.empty_cache()


def wide_view(values: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    """``values`` copied into a view of strides ``strides`` that starts 64 elements into its own
    storage, the 32 elements before it holding SENTINEL."""
    span = sum((n - 1) * s for n, s in zip(values.shape, strides)) + 1
    try:
        storage = torch.empty(64 + span, dtype=values.dtype, device=values.device)
    except (RuntimeError, MemoryError):  # e.g. strict overcommit
        pytest.skip(f"cannot reserve {span * values.element_size() / 2**30:.0f} GiB of address space")
    storage[32:64] = SENTINEL
    view = storage.as_strided(values.shape, strides, 64)
    view.copy_(values)
    return view


def rows_apart(t: torch.Tensor) -> torch.Tensor:
    """t [3, ...] with its rows WIDE elements apart."""
    assert t.shape[0] == 3
    return wide_view(t, (WIDE,) + t.stride()[1:])


@pytest.mark.parametrize("device", DEVICES)
def test_linear_gelu(device):
    """The weight row offset (forward, rn * stride_wn) and the B column offset (backward,
    rq * stride_bq: a transposed weight for grad_input, a column-major x for grad_weight)."""
    from effkern.kernels import linear_gelu as kernels

    torch.manual_seed(0)
    M, N, K = 4, 16, 3
    x = torch.randn(M, K, dtype=torch.float16, device=device)
    g = torch.randn(M, N, dtype=torch.float16, device=device)
    d = torch.rand(M, N, dtype=torch.float16, device=device)
    w = (torch.randn(N, K, device=device) / math.sqrt(K)).half()

    # forward gelu(g @ w^T) with w^T [3, 16] as the weight: M < 64 takes the plain kernel, not TMA
    y, _ = kernels.linear_gelu_fwd(g, rows_apart(w.t().contiguous()), None, "none")
    assert torch.equal(y, kernels.linear_gelu_fwd(g, w.t().contiguous(), None, "none")[0])
    torch.testing.assert_close(y.float(), F.gelu(g.float() @ w.float()), atol=2e-3, rtol=2e-3)

    # grad_input = (g * d) @ w, w [N, K] column-major; grad_weight = (g * d)^T @ x, x column-major
    w_cols = rows_apart(w.t().contiguous()).t()
    x_cols = rows_apart(x.t().contiguous()).t()
    got = kernels.linear_gelu_bwd(g, x_cols, w_cols, d, (True, True, False))
    want = kernels.linear_gelu_bwd(g, x, w, d, (True, True, False))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Sq", [3, 20], ids=["decoding", "prefill"])
def test_attention(device, Sq):
    """q, k, v and dout with their batches WIDE elements apart (b * stride_b), forward and backward."""
    from effkern.kernels import attention as kernels

    torch.manual_seed(0)
    B, H, Skv, D = 3, 1, 7, 16
    q, dout = (torch.randn(B, H, Sq, D, dtype=torch.float16, device=device) for _ in range(2))
    k, v = (torch.randn(B, H, Skv, D, dtype=torch.float16, device=device) for _ in range(2))
    args = (False, 1 / math.sqrt(D), -1, -1, 0.0)
    out, lse = kernels.flash_attn_fwd(q, k, v, *args)
    got_out, got_lse = kernels.flash_attn_fwd(rows_apart(q), rows_apart(k), rows_apart(v), *args)
    assert torch.equal(got_out, out) and torch.equal(got_lse, lse)
    want = kernels.flash_attn_bwd(dout, None, q, k, v, out, lse, *args)
    got = kernels.flash_attn_bwd(rows_apart(dout), None, rows_apart(q), rows_apart(k), rows_apart(v),
                                 rows_apart(out), lse, *args)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split_k", [1, 2])
def test_int8(device, split_k):
    """An int8 weight [N, K] with its rows WIDE elements apart (rn * stride_bn), W8A16, W8A8 and
    the exact accumulator, whole K and split."""
    from effkern.kernels import int8 as kernels

    torch.manual_seed(0)
    M, N, K = 4, 3, 64
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
    w_scale = torch.rand(N, device=device)
    x = torch.randn(M, K, dtype=torch.float16, device=device)
    xq = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=device)
    wide = rows_apart(w)
    for a, out_dtype, quantize in ((x, torch.float16, False), (x, torch.float16, True), (xq, torch.int32, False)):
        b_scale = None if out_dtype == torch.int32 else w_scale
        got = kernels.int8_matmul(a, wide.t(), None, b_scale, None, out_dtype, split_k=split_k, quantize_a=quantize)
        want = kernels.int8_matmul(a, w.t(), None, b_scale, None, out_dtype, split_k=split_k, quantize_a=quantize)
        assert torch.equal(got, want), (out_dtype, quantize)
    # the per-token quantization pass, x [3, K] with its rows apart
    got, want = kernels.quantize_rows_int8(rows_apart(x[:3])), kernels.quantize_rows_int8(x[:3])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split_k", [1, 2])
def test_int4(device, split_k):
    """The packed int4 weight [N, K / 8] (int32) with its rows WIDE elements apart (the first 3
    rows of a quantized [8, K]: the kernel takes any N, the public op multiples of 8)."""
    import effkern as ek
    from effkern.kernels import int4 as kernels

    torch.manual_seed(0)
    M, N, K, group = 4, 3, 64, 32
    qweight, scales, zeros = (t[:N] for t in ek.quantize_int4(torch.randn(8, K, device=device).half(), group))
    x = torch.randn(M, K, dtype=torch.float16, device=device)
    got = kernels.int4_matmul(x, rows_apart(qweight), scales, zeros, group, None, split_k=split_k)
    assert torch.equal(got, kernels.int4_matmul(x, qweight, scales, zeros, group, None, split_k=split_k))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split_k", [1, 2])
def test_sparse24(device, split_k):
    """The 2:4 values [N, K / 2] and metadata with their rows WIDE elements apart, in the forward
    and in grad_input = grad_out @ W (where the rows are the reduction's steps)."""
    import effkern as ek
    from effkern.kernels import sparse24 as kernels

    torch.manual_seed(0)
    M, N, K = 4, 3, 64
    values, meta = ek.compress_24(ek.prune_24(torch.randn(N, K, device=device).half()))
    x = torch.randn(M, K, dtype=torch.float16, device=device)
    want = kernels.sparse24_matmul(x, values, meta, None, split_k=split_k)
    assert torch.equal(kernels.sparse24_matmul(x, rows_apart(values), meta, None, split_k=split_k), want)
    assert torch.equal(kernels.sparse24_matmul(x, values, rows_apart(meta), None, split_k=split_k), want)
    grad_out = torch.randn(M, N, dtype=torch.float16, device=device)
    want = kernels.sparse24_dgrad(grad_out, values, meta, split_k=split_k)
    assert torch.equal(kernels.sparse24_dgrad(grad_out, rows_apart(values), meta, split_k=split_k), want)
    assert torch.equal(kernels.sparse24_dgrad(grad_out, values, rows_apart(meta), split_k=split_k), want)
