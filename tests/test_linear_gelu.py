"""linear_gelu: reference, registration, Triton kernels (interpreter on CPU), C++ kernels, errors."""

from __future__ import annotations

import contextlib
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import effkern as ek
from effkern.linear_gelu import linear_gelu_reference
from effkern.testing import assert_within_tolerance, max_error, within_tolerance

from op_checks import (assert_bad_call_raises, assert_compiles_like_eager, assert_cuda_graph_replays_like_eager,
                       assert_opcheck_passes, needs_backend, parametrize_by_name, record_calls)

KERNEL_BACKENDS = ["triton", "cuda"]  # the reference backend is the oracle, tested separately


def make_inputs(M, N, K, dtype, device="cpu", bias=True, lead=()):
    """Random inputs scaled like a real layer (weights ~ 1/sqrt(K)), never zeros."""
    x = torch.randn(*lead, M, K, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device) / math.sqrt(K)).to(dtype)
    b = torch.randn(N, device=device, dtype=dtype) if bias else None
    return x, w, b


def forward_backward(fn, x, w, b, grad, backward_backend=None):
    """Run fn(x, w, b) on fresh leaves (detached, not cloned: a clone of a sliced or expanded
    view is contiguous, and the op would never see the strides), and its backward (under
    ``backward_backend`` if given); return (y, grad_x, grad_w, grad_b)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(*leaves)
    with ek.use_backend(backward_backend) if backward_backend else contextlib.nullcontext():
        y.backward(grad)
    return (y.detach(), *(t.grad if t is not None else None for t in leaves))


def check_against_float64(fn, x, w, b, approximate, factor=2.0, backward_backend=None):
    """fn's output and all three grads vs float64, within `factor` x PyTorch's own error."""
    grad = torch.randn(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)
    ref = forward_backward(lambda *a: linear_gelu_reference(*a, approximate),
                           *(t.double() if t is not None else None for t in (x, w, b)), grad.double())
    torch_same = forward_backward(lambda *a: linear_gelu_reference(*a, approximate), x, w, b, grad)
    ours = forward_backward(fn, x, w, b, grad, backward_backend)
    M, K, N = math.prod(x.shape[:-1]), x.shape[-1], w.shape[0]
    for name, o, r, t, n in zip(("output", "grad_input", "grad_weight", "grad_bias"), ours, ref, torch_same,
                                (K, N, M, M)):
        if r is not None:
            assert o.dtype == x.dtype and o.shape == r.shape, name
            assert_within_tolerance(o.cpu(), r.cpu(), t.cpu(), name, factor, reduction=n)


# ---------------------------------------------------------------------------- reference

@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_reference_matches_the_gelu_formulas(approximate):
    x, w, b = make_inputs(7, 9, 11, torch.float64)
    z = x @ w.t() + b
    if approximate == "none":
        expected = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    else:
        expected = 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    torch.testing.assert_close(linear_gelu_reference(x, w, b, approximate), expected, rtol=1e-12, atol=1e-12)
    with ek.use_backend("reference"):
        torch.testing.assert_close(ek.linear_gelu(x, w, b, approximate), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("recompute", [False, True])
def test_reference_backward_gradcheck(approximate, recompute):
    x, w, b = (t.requires_grad_() for t in make_inputs(4, 5, 6, torch.float64))
    with ek.use_backend("reference"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: ek.linear_gelu(x, w, b, approximate, recompute_preact=recompute), (x, w, b))


# ---------------------------------------------------------------------------- kernels

ODD_SHAPES = [(1, 17, 33), (3, 33, 200), (127, 200, 17)]  # (M, N, K): no multiples of any block size


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("M,N,K", ODD_SHAPES)
def test_kernel_matches_float64(backend, dtype, approximate, M, N, K, poison_empty):
    needs_backend(backend)
    x, w, b = make_inputs(M, N, K, dtype)
    with ek.use_backend(backend):
        check_against_float64(lambda *a: ek.linear_gelu(*a, approximate), x, w, b, approximate)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_without_bias(backend, poison_empty):
    needs_backend(backend)
    x, w, _ = make_inputs(19, 33, 40, torch.float32, bias=False)
    with ek.use_backend(backend):
        check_against_float64(lambda x, w, b: ek.linear_gelu(x, w, None), x, w, None, "none")


def _non_contiguous_cases(dtype=torch.float32, device="cpu"):
    """(name, x, w, b): transposed, strided, sliced and expanded views, 1-D to 4-D inputs; views
    of tensors made on ``device`` (moving a sliced or expanded view would make it contiguous)."""
    torch.manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    w = (randn(29, 24) / 5).t()  # [N=24, K=29] as a transposed view
    b = randn(48)[::2]  # strided bias
    return [
        ("x transposed", randn(29, 21).t(), w, b),
        ("x column slice", randn(21, 58)[:, ::2], w, b),
        ("3-D x, permuted", randn(29, 5, 3).permute(1, 2, 0), w, b),
        ("1-D x", randn(29), w, b),
        ("4-D x", randn(2, 3, 2, 29), w, b),
        ("zero-stride x", randn(1, 29).expand(6, 29), w, b),
    ]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype,approximate", [(torch.float32, "tanh"), (torch.float16, "none")],
                         ids=["fp32-tanh", "fp16-erf"])
@parametrize_by_name(_non_contiguous_cases())
def test_any_strides_and_ranks(backend, dtype, approximate, case, poison_empty):
    needs_backend(backend)
    _, x, w, b = _non_contiguous_cases(dtype)[case]
    with ek.use_backend(backend):
        check_against_float64(lambda *a: ek.linear_gelu(*a, approximate), x, w, b, approximate)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_bias_passed_as_is(backend):
    """A strided bias view reaches the forward without autograd (no pre-activation stored)."""
    needs_backend(backend)
    x, w, _ = make_inputs(5, 24, 29, torch.float32)
    b = torch.randn(48)[::2]
    with ek.use_backend(backend):
        y = ek.linear_gelu(x, w, b)
    torch.testing.assert_close(y, linear_gelu_reference(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_grad_out(backend, poison_empty):
    needs_backend(backend)
    x, w, b = (t.requires_grad_() for t in make_inputs(13, 21, 30, torch.float32))
    with ek.use_backend(backend):
        y = ek.linear_gelu(x, w, b)
        grad = torch.randn(21, 13).t()
        y.backward(grad)
    ref = forward_backward(linear_gelu_reference, x.double(), w.double(), b.double(), grad.double())
    for ours, r in zip((y, x.grad, w.grad, b.grad), ref):
        torch.testing.assert_close(ours.double(), r, rtol=1e-4, atol=1e-5)


def assert_recompute_preact_gives_the_same_results(backend, approximate, x, w, b):
    """recompute_preact=True: the same gradients, bit for bit, as keeping gelu'(z) (the backward
    recomputes it with the very call that stored it). The output may take another kernel variant
    (on a GPU, cuBLASLt's GELU_BIAS epilogue instead of GELU_AUX_BIAS), so it need only be close."""
    grad = torch.randn(*x.shape[:-1], w.shape[0], device=x.device, dtype=x.dtype)
    with ek.use_backend(backend):
        saved = forward_backward(lambda *a: ek.linear_gelu(*a, approximate), x, w, b, grad)
        recomputed = forward_backward(lambda *a: ek.linear_gelu(*a, approximate, recompute_preact=True),
                                      x, w, b, grad)
    torch.testing.assert_close(saved[0], recomputed[0])
    for name, s, r in zip(("grad_input", "grad_weight", "grad_bias"), saved[1:], recomputed[1:]):
        torch.testing.assert_close(s, r, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_recompute_preact_gives_the_same_gradients(backend, approximate):
    needs_backend(backend)
    assert_recompute_preact_gives_the_same_results(backend, approximate, *make_inputs(9, 20, 24, torch.float32))


def test_recompute_preact_drops_the_recomputed_output_before_the_cpp_backward(monkeypatch):
    """recompute_preact on the C++ kernels: effkern_C::linear_gelu_fwd returns the output beside
    gelu'(z) although the backward's recomputation needs only gelu'(z); that [M, N] output must be
    freed before the C++ backward runs (it held M*N more elements at the backward's peak)."""
    import sys
    import weakref

    needs_backend("cuda")
    import effkern._C  # noqa: F401  (registers the effkern_C ops)

    module = sys.modules["effkern.linear_gelu"]
    outputs, alive = [], []
    real_forward, real_backward = module._forward_2d, torch.ops.effkern_C.linear_gelu_bwd

    def forward(*args):
        out, gelu_grad = real_forward(*args)
        if out is not None and not args[5]:  # store_out False: the backward's recomputation
            outputs.append(weakref.ref(out))
        return out, gelu_grad

    def backward(*args):
        alive.extend(ref() is not None for ref in outputs)
        return real_backward(*args)

    monkeypatch.setattr(module, "_forward_2d", forward)
    monkeypatch.setattr(torch.ops.effkern_C, "linear_gelu_bwd", backward)
    x, w, b = (t.requires_grad_() for t in make_inputs(16, 24, 8, torch.float32))
    with ek.use_backend("cuda"):
        ek.linear_gelu(x, w, b, recompute_preact=True).sum().backward()
    assert outputs and alive == [False] * len(outputs), alive


def _saved_bytes(fn, *args) -> int:
    """Bytes of distinct tensors autograd keeps for the backward of fn(*args)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(saved.values())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_saved_activation_memory_is_at_most_eager(backend):
    needs_backend(backend)
    x, w, b = (t.requires_grad_() for t in make_inputs(64, 48, 32, torch.float32))
    eager = _saved_bytes(lambda *a: F.gelu(F.linear(*a)), x, w, b)
    with ek.use_backend(backend):
        ours = _saved_bytes(ek.linear_gelu, x, w, b)
        recomputed = _saved_bytes(lambda *a: ek.linear_gelu(*a, recompute_preact=True), x, w, b)
    z_bytes = 64 * 48 * 4
    assert ours <= eager
    assert recomputed <= eager - z_bytes + b.numel() * 4  # no z; keeps the bias to recompute it


def _saved_activation(fn, x, w, b):
    """The one [M, N] tensor autograd keeps for the backward of fn(x, w, b) (x, w, b leaves)."""
    M, N = math.prod(x.shape[:-1]), w.shape[0]
    kept = []

    def pack(t):
        if t.shape == (M, N):
            kept.append(t.detach().clone())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, w, b)
    assert len(kept) == 1, f"{len(kept)} tensors of shape [M, N] kept"
    return kept[0]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_forward_keeps_gelu_grad(backend, approximate):
    """Every backend keeps gelu'(z) (what the Triton backward's GEMMs read, and the same whatever
    the backend, so that the backend may change before the backward)."""
    needs_backend(backend)
    x, w, b = (t.requires_grad_() for t in make_inputs(9, 20, 24, torch.float64 if backend != "triton"
                                                       else torch.float32))
    with ek.use_backend(backend):
        kept = _saved_activation(lambda *a: ek.linear_gelu(*a, approximate), x, w, b)
    z = F.linear(x, w, b).detach().double()
    expected = torch.ops.aten.gelu_backward(torch.ones_like(z), z, approximate=approximate)
    torch.testing.assert_close(kept.double(), expected, rtol=1e-5, atol=1e-6)


def test_auto_trains_on_the_fwd_bwd_choice(monkeypatch):
    """With gelu'(z) kept for a backward, auto runs the forward on the backend measured fastest
    for forward + backward (mode fwd_bwd), the one the backward takes; inference on mode fwd."""
    module = importlib.import_module("effkern.linear_gelu")  # effkern.linear_gelu is also the function
    modes = []
    monkeypatch.setattr(module, "_auto_backend", lambda mode, *a: modes.append(mode) or "reference")
    x, w, b = (t.requires_grad_() for t in make_inputs(5, 6, 7, torch.float32))
    with ek.use_backend("auto"):
        with torch.no_grad():
            ek.linear_gelu(x, w, b)
        assert modes == ["fwd"]
        modes.clear()
        ek.linear_gelu(x, w, b).sum().backward()
    assert modes == ["fwd_bwd"] * 2  # the forward, the backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_auto_on_cpu_runs_the_reference(monkeypatch, dtype):
    """DESIGN: on CPU tensors auto means reference (not the C++ CPU kernel, which would give
    right results too), forward and backward."""
    module = importlib.import_module("effkern.linear_gelu")
    forwards = record_calls(monkeypatch, module, "_forward_2d", lambda args, _: args[0])
    backwards = record_calls(monkeypatch, module, "_choose_backend", lambda args, result: result)
    x, w, b = (t.requires_grad_() for t in make_inputs(5, 6, 7, dtype))
    with ek.use_backend("auto"):
        ek.linear_gelu(x, w, b).sum().backward()
    assert forwards == ["reference"] and backwards == ["reference"] * 2


BACKENDS_WITH_REFERENCE = KERNEL_BACKENDS + ["reference"]


@pytest.mark.parametrize("forward_backend", BACKENDS_WITH_REFERENCE)
@pytest.mark.parametrize("backward_backend", BACKENDS_WITH_REFERENCE)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_any_backward_backend_takes_what_any_forward_kept(forward_backend, backward_backend, approximate,
                                                          poison_empty):
    """The backend may change between forward and backward (a backward called outside the
    forward's use_backend block): every forward keeps gelu'(z), which every backward reads."""
    needs_backend(forward_backend)
    needs_backend(backward_backend)
    x, w, b = make_inputs(11, 19, 26, torch.float32)

    def forward(*leaves):
        with ek.use_backend(forward_backend):
            return ek.linear_gelu(*leaves, approximate)

    check_against_float64(forward, x, w, b, approximate, backward_backend=backward_backend)


@pytest.mark.parametrize("forward_backend,backward_backend", [("triton", "reference"), ("reference", "triton"),
                                                              ("triton", "cuda"), ("cuda", "triton")])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_across_a_backend_change(forward_backend, backward_backend, use_reentrant):
    """torch.utils.checkpoint recomputes the forward during the backward, under the backend
    selected then: what it keeps must be what the first forward kept, or the gradients are wrong
    without an error (they were, when what was kept followed the backend)."""
    from torch.utils.checkpoint import checkpoint

    needs_backend(forward_backend)
    needs_backend(backward_backend)
    x, w, b = make_inputs(11, 19, 26, torch.float32)

    def forward(*leaves):
        with ek.use_backend(forward_backend):
            return checkpoint(lambda *a: ek.linear_gelu(*a), *leaves, use_reentrant=use_reentrant)

    check_against_float64(forward, x, w, b, "none", backward_backend=backward_backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True), (True, True, True)])
def test_only_requested_gradients(backend, needs):
    needs_backend(backend)
    x, w, b = make_inputs(6, 10, 12, torch.float32)
    leaves = [t.detach().clone().requires_grad_(n) for t, n in zip((x, w, b), needs)]
    with ek.use_backend(backend):
        ek.linear_gelu(*leaves).backward(torch.ones(6, 10))
    ref = forward_backward(linear_gelu_reference, x.double(), w.double(), b.double(), torch.ones(6, 10).double())
    for leaf, r, n in zip(leaves, ref[1:], needs):
        if n:
            torch.testing.assert_close(leaf.grad.double(), r, rtol=1e-4, atol=1e-5)
        else:
            assert leaf.grad is None


def _single_gradient(backend, wrt, x, w, grad):
    """The gradient of linear_gelu(x, w) with respect to x alone (wrt="input") or w alone
    ("weight"): the other requires none, so autograd keeps only z and the operand the gradient
    needs. Checked against float64; returns the bytes the backward allocated at its peak beyond
    what was allocated before it on a GPU (None on a CPU)."""
    index = ("input", "weight").index(wrt)

    def leaves(*tensors):
        out = [t.detach() for t in tensors]
        out[index].requires_grad_()
        return out

    args = leaves(x, w)
    cuda = x.device.type == "cuda"
    with ek.use_backend(backend):
        y = ek.linear_gelu(*args)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        got, = torch.autograd.grad(y, args[index], grad)
        peak = torch.cuda.max_memory_allocated() - before if cuda else None
    exact, torch_same = (torch.autograd.grad(linear_gelu_reference(*a), a[index], g)[0]
                         for a, g in ((leaves(x.double(), w.double()), grad.double()), (leaves(x, w), grad)))
    reduction = w.shape[0] if wrt == "input" else x.shape[0]  # sums over N for grad_input, M for grad_weight
    assert_within_tolerance(got, exact, torch_same, f"grad_{wrt}", reduction=reduction)
    return peak


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("wrt", ["input", "weight"])
def test_single_gradient_without_the_other_operand(backend, wrt, poison_empty):
    needs_backend(backend)
    x, w, _ = make_inputs(7, 10, 12, torch.float32, bias=False)
    assert _single_gradient(backend, wrt, x, w, torch.randn(7, 10)) is None


# (M, N, K) with one of them 0: F.linear gives an empty output, or for K = 0 z = bias
EMPTY_SHAPES = [(0, 8, 5), (3, 4, 0), (3, 0, 5)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("M,N,K", EMPTY_SHAPES)
def test_empty_dimensions(backend, M, N, K, poison_empty):
    """Output and all three gradients (zeros where a sum is empty) against float64."""
    needs_backend(backend)
    x, w, b = make_inputs(M, N, K, torch.float32)
    with ek.use_backend(backend):
        check_against_float64(ek.linear_gelu, x, w, b, "none")


# ---------------------------------------------------------------------------- the TMA forward

# (M, N, K): 16-bit rows 16-byte aligned (N, K multiples of 8), M >= TMA_MIN_ROWS, sizes no
# multiple of the interpreter's 32 x 32 x 32 tiles (K = 8: one K step, mostly zero fill); the
# last two have more tiles (6, 15) than the interpreter's 4 persistent programs, which then
# walk several tiles each
TMA_SHAPES = [(64, 16, 8), (70, 40, 48), (130, 72, 96)]


def _kernels():
    from effkern.kernels import linear_gelu as kernels

    return kernels


@pytest.fixture
def tma_launches(monkeypatch):
    """The input shapes of the TMA forward launches made while the test runs."""
    return record_calls(monkeypatch, _kernels(), "_fwd_tma", lambda args, _: args[0].shape)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M,N,K", TMA_SHAPES)
def test_tma_forward_matches_float64(approximate, bias, M, N, K, tma_launches, poison_empty):
    """Aligned fp16 inputs take the TMA kernel (persistent programs walking several tiles), output
    and gradients within tolerance; the backward reads the gelu'(z) it stored."""
    needs_backend("triton")
    x, w, b = make_inputs(M, N, K, torch.float16, bias=bias)
    with ek.use_backend("triton"):
        check_against_float64(lambda *a: ek.linear_gelu(*a, approximate), x, w, b, approximate)
    assert tma_launches, "the TMA kernel did not run"


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("M,N,K", TMA_SHAPES)
def test_tma_and_plain_forward_agree_bit_for_bit(approximate, M, N, K, monkeypatch, tma_launches):
    """Under the interpreter both kernels do the same fp32 arithmetic in the same order, so any
    difference is a wrong tile, edge or epilogue in one of them; also with only gelu'(z) stored
    (the recomputation in the backward of recompute_preact=True). Both GELU forms: in fp16 the
    float64 checks cannot tell them apart (they differ by ~5e-4, within fp16's rounding), so the
    TMA kernel's form is held here to the plain kernel's, which fp32 tests tell apart."""
    needs_backend("triton")
    kernels = _kernels()
    x, w, b = make_inputs(M, N, K, torch.float16)
    for store_out, store_gelu_grad in ((True, False), (True, True), (False, True)):
        monkeypatch.setenv("EFFKERN_TRITON_TMA", "1")
        tma = kernels.linear_gelu_fwd(x, w, b, approximate, store_out, store_gelu_grad)
        monkeypatch.setenv("EFFKERN_TRITON_TMA", "0")
        plain = kernels.linear_gelu_fwd(x, w, b, approximate, store_out, store_gelu_grad)
        for t, p in zip(tma, plain):
            assert (t is None) == (p is None) and (t is None or torch.equal(t, p))
    assert len(tma_launches) == 3


# (M, N, K) for the TMA backward: both its launches have 64+ output rows (grad_input: M,
# grad_weight: N), sizes no multiple of the interpreter's tiles, several tiles per program
TMA_BWD_SHAPES = [(64, 64, 8), (70, 72, 48), (130, 96, 40)]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M,N,K", TMA_BWD_SHAPES)
def test_tma_backward_matches_float64(approximate, bias, M, N, K, monkeypatch, poison_empty):
    """Aligned fp16 tensors take the TMA backward for grad_input and grad_weight (+ grad_bias)."""
    needs_backend("triton")
    kernels = _kernels()
    calls = record_calls(monkeypatch, kernels, "launch_persistent", lambda args, _: (args[1], args[6].get("TRANS_A")))
    x, w, b = make_inputs(M, N, K, torch.float16, bias=bias)
    with ek.use_backend("triton"):
        check_against_float64(lambda *a: ek.linear_gelu(*a, approximate), x, w, b, approximate)
    assert sorted(t for k, t in calls if k is kernels.linear_gelu_bwd_tma_kernel) == [False, True]


@pytest.mark.parametrize("M,N,K", TMA_BWD_SHAPES)
def test_tma_and_plain_backward_agree_bit_for_bit(M, N, K, monkeypatch):
    """The interpreter runs both backward kernels with the same tiles and the same fp32 arithmetic
    in the same order: any difference is a wrong tile, edge or transpose in one. grad_bias sums
    the same values, but numpy adds a [BLOCK_R, BLOCK_P] tile down its columns (the TMA kernel's
    layout) in another order than a [BLOCK_P, BLOCK_R] tile along its rows (the plain kernel's):
    within an fp16 ulp (seen: up to 1 ulp in 9 of 40 seeds at one shape)."""
    needs_backend("triton")
    kernels = _kernels()
    calls = record_calls(monkeypatch, kernels, "launch_persistent", lambda args, _: args[1])
    x, w, b = make_inputs(M, N, K, torch.float16)
    _, gelu_grad = kernels.linear_gelu_fwd(x, w, b, "tanh", False, True)
    dy = torch.randn(M, N, dtype=torch.float16)
    grads = {}
    for tma in ("1", "0"):
        monkeypatch.setenv("EFFKERN_TRITON_TMA", tma)
        grads[tma] = kernels.linear_gelu_bwd(dy, x, w, gelu_grad, (True, True, True))
    for name, t, p in zip(("grad_input", "grad_weight"), grads["1"], grads["0"]):
        assert torch.equal(t, p), name
    torch.testing.assert_close(grads["1"][2], grads["0"][2], rtol=2**-10, atol=0, msg="grad_bias")
    assert calls.count(kernels.linear_gelu_bwd_tma_kernel) == 2


def test_tma_kernels_take_one_tensor_as_two_arguments(monkeypatch):
    """The launchers given one tensor object as two operands (x that is the weight; dy that is x),
    at tiles whose operands' shapes differ: each argument keeps its own descriptor and tile shape."""
    needs_backend("triton")
    kernels = _kernels()
    monkeypatch.setitem(kernels._FIXED_TMA, "interpreter", ((64, 32, 16, 8), 1, 4))
    monkeypatch.setitem(kernels._FIXED_TMA_BWD, "interpreter", ((64, 32, 16, 8), 1, 4))
    calls = record_calls(monkeypatch, kernels, "launch_persistent", lambda args, _: args[1])
    w = make_inputs(1, 72, 72, torch.float16)[1]
    y, gelu_grad = kernels.linear_gelu_fwd(w, w, None, "none", True, True)
    grad_input, grad_weight, _ = kernels.linear_gelu_bwd(w, w, w, gelu_grad, (True, True, False))
    w64 = w.double()
    z = w64 @ w64.t()
    gz = w64 * torch.ops.aten.gelu_backward(torch.ones_like(z), z)
    for name, ours, exact in (("y", y, F.gelu(z)), ("grad_input", grad_input, gz @ w64),
                              ("grad_weight", grad_weight, gz.t() @ w64)):
        torch.testing.assert_close(ours.double(), exact, rtol=2e-2, atol=2e-2, msg=name)
    assert calls == [kernels.linear_gelu_fwd_tma_kernel] + [kernels.linear_gelu_bwd_tma_kernel] * 2


def test_tma_ready_only_for_what_tma_can_copy(monkeypatch):
    needs_backend("triton")
    kernels = _kernels()
    x = torch.randn(8, 64, dtype=torch.float16)
    assert kernels.tma_ready(x, x[:, :32], x[2:], x.float(), torch.ones(3, 16, dtype=torch.int8))
    for name, bad in [("row stride of 12 bytes", torch.randn(8, 6, dtype=torch.float16)),
                      ("int8 rows of 8 bytes", torch.ones(3, 8, dtype=torch.int8)),
                      ("last stride not 1", x[:, ::2]), ("transposed", x.t()),
                      ("base not 16-byte aligned", x[:, 1:9]), ("overlapping rows", x[:1].expand(8, 64)),
                      ("empty", x[:0])]:
        assert not kernels.tma_ready(x, bad), name
    assert kernels.tma_ready(x.bfloat16())
    monkeypatch.setenv("EFFKERN_TRITON_TMA", "0")
    assert not kernels.tma_ready(x)


def test_tma_ready_refuses_no_columns_partly_overlapping_rows_and_an_8_byte_base():
    needs_backend("triton")
    kernels = _kernels()
    x = torch.randn(8, 64, dtype=torch.float16)
    assert kernels.tma_ready(x, x[:, 8:40])  # base 16 bytes in
    for name, bad in [("no columns", x[:, :0]), ("base 8 bytes in", x[:, 4:36]),
                      ("rows overlapping by half", x.as_strided((8, 64), (32, 1)))]:
        assert not kernels.tma_ready(x, bad), name


@pytest.mark.parametrize("capability,has_tma", [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)])
def test_tma_is_taken_from_sm_90_on(monkeypatch, capability, has_tma):
    """TMA tensor descriptors exist from Hopper (sm_90) on: an A100 or an Ada card keeps the
    plain-load kernels (which the interpreter, always TMA-ready, cannot show)."""
    needs_backend("triton")
    from effkern.kernels import _tma

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    _tma._device_has_tma.cache_clear()
    try:
        assert _tma._device_has_tma(torch.device("cuda", 0)) is has_tma
    finally:
        _tma._device_has_tma.cache_clear()


def test_persistent_grid_counts_row_and_column_tiles_each_by_its_own_block():
    """Fewer output tiles than SMs: one program per tile, every tile run (the kernels stride by
    NUM_PROGRAMS = the SM count, so a grid short of the tile count would skip tiles; the
    interpreter's 4 "SMs" rarely see this)."""
    needs_backend("triton")
    from effkern.kernels._tma import persistent_grid

    grid = persistent_grid(132, 64, 96, "BLOCK_M", "BLOCK_N")
    assert grid({"BLOCK_M": 64, "BLOCK_N": 32}) == (3,) and grid({"BLOCK_M": 32, "BLOCK_N": 64}) == (4,)
    assert persistent_grid(132, 96, 64, "BLOCK_P", "BLOCK_Q")({"BLOCK_P": 32, "BLOCK_Q": 64}) == (3,)
    assert persistent_grid(4, 640, 640, "BLOCK_M", "BLOCK_N")({"BLOCK_M": 64, "BLOCK_N": 32}) == (4,)


def test_small_or_unaligned_calls_keep_the_plain_kernel(tma_launches):
    needs_backend("triton")
    with ek.use_backend("triton"):
        for M, N, K in [(63, 16, 8), (64, 16, 9), (64, 17, 8)]:
            ek.linear_gelu(*make_inputs(M, N, K, torch.float16))
        ek.linear_gelu(*make_inputs(64, 16, 8, torch.float32))
    assert tma_launches == []


def _plain_kernel_requests(cc: int, dtype: str) -> dict:
    """compile_for_gpu requests for the plain forward and backward kernels as aligned, contiguous
    launches specialize them: at the fixed GPU config, and on sm_90 at every autotuning candidate
    (bf16; fp32, exact with the PRECISE libdevice GELU in the forward, at the fixed config only)."""
    from op_checks import aligned_launch

    kernels = _kernels()
    ptr = f"*{dtype}"
    fwd_types = dict(x_ptr=ptr, w_ptr=ptr, b_ptr=ptr, y_ptr=ptr, d_ptr=ptr, M="i32", N="i32", K="i32",
                     **{f"stride_{s}": "i32" for s in ("xm", "xk", "wn", "wk", "ym", "yn", "dm", "dn")})
    bwd_types = dict(dy_ptr=ptr, d_ptr=ptr, b_ptr=ptr, c_ptr=ptr, rowsum_ptr=ptr, P="i32", Q="i32", R="i32",
                     **{f"stride_{s}": "i32" for s in ("dyp", "dyr", "dp", "dr", "br", "bq", "cp", "cq")})
    dot = dict(DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    kinds = {
        # y and gelu'(z): the forward of training, the most epilogue work
        "fwd": ("linear_gelu_fwd_kernel", fwd_types, ("stride_xk", "stride_wk", "stride_yn", "stride_dn"),
                dict(dot, APPROX_TANH=False, PRECISE=dtype == "fp32", HAS_BIAS=True, STORE_Y=True,
                     STORE_GELU_GRAD=True, EVEN_K=True), ("M",), kernels._FWD_NAMES),
        # the grad_weight launch: dy and gelu'(z) read transposed (unit stride along p), B = x
        "bwd": ("linear_gelu_bwd_kernel", bwd_types, ("stride_dyp", "stride_dp", "stride_bq", "stride_cq"),
                dict(dot, ROWSUM=True, EVEN_R=True), ("R",), kernels._BWD_NAMES),
    }
    settings = {"fixed": kernels._FIXED["gpu"]}
    if cc == 90 and dtype == "bf16":
        settings.update({f"{bm}x{bn}x{bk}": ((bm, bn, bk, kernels.GROUP), st, wa)
                         for bm, bn, bk, st, wa in kernels._GEMM_SHAPES})
    requests = {}
    for kind, (kernel, types, unit, constexprs, any_value, names) in kinds.items():
        launch = aligned_launch(types, unit, any_value)
        for label, (blocks, stages, warps) in settings.items():
            requests[f"{kind} {label}"] = dict(
                kernel=f"effkern.kernels.linear_gelu:{kernel}", types=launch["types"], divisible=launch["divisible"],
                constexprs=dict(constexprs, **launch["constexprs"], **dict(zip(names, blocks))), cc=cc,
                num_warps=warps, num_stages=stages)
    return requests


@pytest.mark.parametrize("cc,dtype", [(80, "bf16"), (90, "bf16"), (90, "fp32")])
def test_plain_kernels_compile_for_gpus(compile_for_gpu, cc, dtype):
    """The forward and backward kernels for sm_80/sm_90a: bf16 on the tensor cores (wgmma on
    Hopper at 64+ rows), shared memory within the card (an autotuning candidate that does not
    fit would only be skipped: none may, the list was picked for H100)."""
    needs_backend("triton")
    from op_checks import SHARED_LIMIT

    for name, compiled in compile_for_gpu(_plain_kernel_requests(cc, dtype)).items():
        if dtype == "bf16":
            assert "mma" in compiled["ptx"] and "bf16.bf16" in compiled["ptx"], name
        assert compiled["shared"] <= SHARED_LIMIT[cc], f"{name}: {compiled['shared']} bytes of shared memory"


# Register spill stores the TMA forward may have on sm_90a at any of its configs. Today: none with
# the tanh GELU; with erf, y alone (inference) 56 bytes (Triton 3.8) and 96 (3.6) at the 128x256
# tile, at 255 registers per thread (the plain kernel spilled up to 232 bytes at the same tiles);
# y and gelu'(z) (training), whose exp adds to the epilogue, 268-336 at the 128x256 and 256x128
# tiles (both Tritons). Smaller tiles spill nothing, so where spilling costs, the autotuner has a
# tile without. A 128x128 tile with 4 warps spilled 148 (3.8) and was left out.
TMA_SPILL_LIMIT = {False: 128, True: 384}


@pytest.mark.parametrize("store_gelu_grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_tma_forward_compiles_onto_wgmma_and_tma(compile_for_gpu, approximate, store_gelu_grad):
    """Every config the TMA forward may run with, compiled here for sm_90a as a bf16 launch
    storing y, and gelu'(z) in training (two staging tiles: the most shared memory, and the most
    epilogue arithmetic)."""
    needs_backend("triton")
    from op_checks import assert_tma_gemm_compiles_for_hopper

    tile = ("bf16", "BLOCK_M", "BLOCK_N")
    assert_tma_gemm_compiles_for_hopper(
        compile_for_gpu, "effkern.kernels.linear_gelu:linear_gelu_fwd_tma_kernel", _kernels()._TMA_SHAPES,
        dict(x_desc=("bf16", "BLOCK_M", "BLOCK_K"), w_desc=("bf16", "BLOCK_N", "BLOCK_K"), y_desc=tile,
             d_desc=tile),
        dict(b_ptr="*bf16", M="i32", N="i32", K="i32", NUM_PROGRAMS="i32"),
        dict(HAS_BIAS=True, APPROX_TANH=approximate == "tanh", PRECISE=False, STORE_Y=True,
             STORE_GELU_GRAD=store_gelu_grad, DOT_PRECISION="tf32"),
        r"f32\.bf16\.bf16", TMA_SPILL_LIMIT[store_gelu_grad])


# ---------------------------------------------------------------------------- GPU tiles, in the interpreter

# A GPU runs these kernels at the tiles of their autotuning configs and of the fixed "gpu" config,
# the interpreter at one small tile; a bug that shows only at a GPU's tile (an edge mask, a partial
# last step of the reduction, a TMA box) would wait for a GPU run. So each distinct GPU tile also
# runs here, as the interpreter's tile (stages and warps mean nothing to the interpreter).
def _gpu_tiles() -> list[tuple[str, tuple[int, int, int]]]:
    kernels = _kernels()
    tiles = []
    for path, shapes, fixed in (("plain", kernels._GEMM_SHAPES, kernels._FIXED),
                                ("tma forward", kernels._TMA_SHAPES, kernels._FIXED_TMA),
                                ("tma backward", kernels._TMA_BWD_SHAPES, kernels._FIXED_TMA_BWD)):
        blocks = dict.fromkeys([shape[:3] for shape in shapes] + [fixed["gpu"][0][:3]])
        tiles += [(path, b) for b in blocks]
    return tiles


def _launched_tiles(monkeypatch, kernels, launcher: str, fixed_index: int) -> list:
    """(kernel, block sizes) of each launch through ``launcher``, whose ``fixed_index``-th argument
    holds the fixed configs."""
    def record(args, _):
        return args[1], tuple(v for k, v in args[fixed_index]["interpreter"].items() if k.startswith("BLOCK"))

    return record_calls(monkeypatch, kernels, launcher, record)


@pytest.mark.parametrize("path,tile", _gpu_tiles(), ids=[f"{p}-{'x'.join(map(str, t))}" for p, t in _gpu_tiles()])
def test_every_gpu_tile_matches_float64_in_the_interpreter(path, tile, monkeypatch, poison_empty):
    """Output and all gradients at each GPU tile, on sizes that cross its edges in M, N and K in
    every launch (the backward's grad_weight launch tiles N x K and reduces over M). The TMA
    paths need rows of 16 bytes (N and K multiples of 8); K ends in a partial step."""
    needs_backend("triton")
    kernels = _kernels()
    fixed = {"plain": kernels._FIXED, "tma forward": kernels._FIXED_TMA, "tma backward": kernels._FIXED_TMA_BWD}[path]
    monkeypatch.setitem(fixed, "interpreter", ((*tile, kernels.GROUP), 1, 4))
    monkeypatch.setenv("EFFKERN_TRITON_TMA", "0" if path == "plain" else "1")
    plain = _launched_tiles(monkeypatch, kernels, "launch", 5)
    persistent = _launched_tiles(monkeypatch, kernels, "launch_persistent", 7)
    big = max(tile)
    M, N, K = (big + 3, big + 5, big + 9) if path == "plain" else (big + 3, big + 8, big + 24)
    x, w, b = make_inputs(M, N, K, torch.float16)
    with ek.use_backend("triton"):
        check_against_float64(lambda *a: ek.linear_gelu(*a, "tanh"), x, w, b, "tanh")
    expected = {"plain": (plain, [kernels._fwd, kernels._bwd, kernels._bwd]),
                "tma forward": (persistent, [kernels.linear_gelu_fwd_tma_kernel]),
                "tma backward": (persistent, [kernels.linear_gelu_bwd_tma_kernel] * 2)}
    launches, at_tile = expected[path]
    assert sorted((k for k, t in launches if t == tile), key=id) == sorted(at_tile, key=id)


# ---------------------------------------------------------------------------- the checker itself

def test_checker_rejects_wrong_kernels():
    """The tolerance check must fail for plausible bugs, or the kernel tests prove nothing."""
    x, w, b = make_inputs(33, 40, 50, torch.float32)
    ref = linear_gelu_reference(x.double(), w.double(), b.double())
    torch_same = linear_gelu_reference(x, w, b)
    assert within_tolerance(torch_same, ref, torch_same)[0]
    one_bad = torch_same.clone()
    one_bad[17, 3] += 1e-3
    unwritten = torch_same.clone()
    unwritten[-1, -1] = float("nan")
    wrong = {
        "bias dropped": linear_gelu_reference(x, w, None),
        "tanh instead of erf": linear_gelu_reference(x, w, b, "tanh"),
        "last K column ignored": linear_gelu_reference(x[:, :-1], w[:, :-1], b),
        "fp16 rounding in an fp32 op": linear_gelu_reference(x.half(), w.half(), b.half()).float(),
        "one element off": one_bad,
        "one element unwritten": unwritten,
    }
    for name, out in wrong.items():
        assert not within_tolerance(out, ref, torch_same)[0], name
    with pytest.raises(AssertionError):
        max_error(torch_same[:-1], ref)


@pytest.mark.parametrize("trans_a", [False, True], ids=["grad_input", "grad_weight"])
def test_tma_backward_compiles_onto_wgmma_and_tma(compile_for_gpu, trans_a):
    """Every config the TMA backward may run with, compiled here for sm_90a as a bf16 launch of
    either orientation (grad_weight also sums grad_bias): no register spills at any."""
    needs_backend("triton")
    from op_checks import assert_tma_gemm_compiles_for_hopper

    kernels = _kernels()
    a_tile = ("bf16", "BLOCK_R", "BLOCK_P") if trans_a else ("bf16", "BLOCK_P", "BLOCK_R")
    assert_tma_gemm_compiles_for_hopper(
        compile_for_gpu, "effkern.kernels.linear_gelu:linear_gelu_bwd_tma_kernel", kernels._TMA_BWD_SHAPES,
        dict(dy_desc=a_tile, d_desc=a_tile, b_desc=("bf16", "BLOCK_R", "BLOCK_Q"),
             c_desc=("bf16", "BLOCK_P", "BLOCK_Q")),
        dict(rowsum_ptr="*bf16", P="i32", Q="i32", R="i32", NUM_PROGRAMS="i32"),
        dict(ROWSUM=trans_a, TRANS_A=trans_a, DOT_PRECISION="tf32"),
        r"f32\.bf16\.bf16", 0, names=kernels._BWD_NAMES, aligned_sizes=("Q",))


# ---------------------------------------------------------------------------- registration

def sample_inputs(device="cpu", dtype=torch.float32, requires_grad=False):
    """(x, w, b, approximate) for effkern::linear_gelu: ranks 1-4, with/without bias, both GELUs."""
    torch.manual_seed(0)
    cases = [((), 7, 5), ((3,), 6, 4), ((2, 3), 5, 8), ((2, 1, 3), 3, 3)]
    for (lead, N, K), bias, approximate in zip(cases, [True, False, True, False], ["none", "tanh", "tanh", "none"]):
        x = torch.randn(*lead, K, device=device, dtype=dtype, requires_grad=requires_grad)
        w = torch.randn(N, K, device=device, dtype=dtype, requires_grad=requires_grad)
        b = torch.randn(N, device=device, dtype=dtype, requires_grad=requires_grad) if bias else None
        yield x, w, b, approximate


def op_samples(requires_grad, device="cpu", dtype=torch.float32):
    """(op, args): effkern::linear_gelu, its forward (saving gelu'(z) when the inputs require
    grad) and its backward (given gelu'(z), or recomputing it), on each of sample_inputs."""
    for args in sample_inputs(device, dtype, requires_grad):
        yield torch.ops.effkern.linear_gelu.default, args
        save = requires_grad
        yield torch.ops.effkern.linear_gelu_fwd.default, (*args, save)
        x, w, b, approximate = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        grad = torch.randn(*x.shape[:-1], w.shape[0], device=device, dtype=dtype)
        gelu_grad = torch.sigmoid(x @ w.t()).reshape(-1, w.shape[0]) if save else None  # any [M, N] will do
        mask = [True, True, b is not None]
        yield torch.ops.effkern.linear_gelu_bwd.default, (grad, x, w, b, gelu_grad, approximate, mask)
        if save:  # one gradient: only the operand it needs was kept
            yield torch.ops.effkern.linear_gelu_bwd.default, (grad, x, None, None, gelu_grad, approximate,
                                                              [False, True, False])
            yield torch.ops.effkern.linear_gelu_bwd.default, (grad, None, w, None, gelu_grad, approximate,
                                                              [True, False, False])


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, requires_grad):
    assert_opcheck_passes(backend, op_samples(requires_grad))


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_torch_compile_fullgraph_forward_backward(backend):
    assert_compiles_like_eager(ek.nn.LinearGELU(24, 40), backend)


def test_torch_compile_inductor_has_no_graph_break():
    torch._dynamo.reset()
    x, w, b = make_inputs(6, 10, 12, torch.float32)
    explanation = torch._dynamo.explain(lambda x: ek.linear_gelu(x, w, b, "tanh") * 2)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(lambda x: ek.linear_gelu(x, w, b, "tanh") * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), linear_gelu_reference(x, w, b, "tanh") * 2)


def assert_autocast_like_f_linear(backend, device):
    """Inside torch.autocast(device, dtype) ek.linear_gelu and torch.ops.effkern.linear_gelu take
    float32 tensors, alone or mixed with tensors already in the autocast dtype, and run in that
    dtype, like F.linear; outside it, mixed dtypes are a clear TypeError."""
    x, w, b = make_inputs(4, 6, 8, torch.float32, device)
    for dtype in (torch.bfloat16, torch.float16):
        mixes = {"all float32": (x, w, b), "weight in the autocast dtype": (x, w.to(dtype), b),
                 "input and bias in the autocast dtype": (x.to(dtype), w, b.to(dtype))}
        for mix, args in mixes.items():
            cast = [t.to(dtype) for t in args]
            exact, torch_same = linear_gelu_reference(*(t.double() for t in cast)), linear_gelu_reference(*cast)
            for op in (ek.linear_gelu, torch.ops.effkern.linear_gelu):
                with ek.use_backend(backend), torch.autocast(device, dtype=dtype):
                    y = op(*args)
                    assert y.dtype == F.linear(*args).dtype == dtype, (mix, op)
                assert_within_tolerance(y, exact, torch_same, f"{mix}, {dtype}", reduction=x.shape[-1])
                if mix != "all float32":
                    with ek.use_backend(backend), pytest.raises(TypeError, match="all tensors must share one dtype"):
                        op(*args)


@pytest.mark.parametrize("backend", ["reference", "cuda"])  # the interpreter has no bf16 dot
def test_autocast_like_f_linear(backend):
    needs_backend(backend)
    assert_autocast_like_f_linear(backend, "cpu")


def test_autocast_leaves_float64_alone():
    x, w, b = make_inputs(4, 6, 8, torch.float64)
    with ek.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = ek.linear_gelu(x, w, b)
        assert y.dtype == F.linear(x, w, b).dtype == torch.float64
    torch.testing.assert_close(y, linear_gelu_reference(x, w, b))


# ---------------------------------------------------------------------------- errors

def _bad_calls():
    x, w, b = make_inputs(4, 6, 8, torch.float32)
    return [
        ("K mismatch", (torch.randn(4, 7), w, b, "none"), ValueError, "K=7"),
        ("weight rank", (x, w[0], b, "none"), ValueError, "weight must be 2-D"),
        ("scalar input", (torch.tensor(1.0), w, b, "none"), ValueError, "input must have shape"),
        ("bias length", (x, w, torch.randn(5), "none"), ValueError, "bias must have shape"),
        ("bias rank", (x, w, torch.randn(1, 6), "none"), ValueError, "bias must have shape"),
        ("mixed dtypes", (x, w.half(), b, "none"), TypeError, "weight has dtype torch.float16"),
        ("bias dtype", (x, w, b.half(), "none"), TypeError, "bias has dtype torch.float16"),
        ("bias device", (x, w, b.to("meta"), "none"), RuntimeError, "bias is on meta"),
        ("integer input", (x.int(), w.int(), b.int(), "none"), TypeError, "input has dtype torch.int32"),
        ("approximate", (x, w, b, "sigmoid"), ValueError, "approximate must be one of"),
        ("not a tensor", (x.tolist(), w, b, "none"), TypeError, "input must be a torch.Tensor"),
        ("devices", (x, w.to("meta"), b, "none"), RuntimeError, "weight is on meta"),
    ]


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
@parametrize_by_name(_bad_calls())
def test_bad_inputs_raise_clear_errors(backend, case):
    assert_bad_call_raises(backend, ek.linear_gelu, _bad_calls()[case])


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ek._backend, "triton_interpreter_on", lambda: False)
    x, w, b = make_inputs(2, 3, 4, torch.float32)
    with ek.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ek.linear_gelu(x, w, b)


def test_float64_is_reference_only_on_triton():
    x, w, b = make_inputs(2, 3, 4, torch.float64)
    message = "float16, bfloat16 and float32 .* got input of dtype torch.float64"
    with ek.use_backend("triton"), pytest.raises(TypeError, match=message):
        ek.linear_gelu(x, w, b)


# ---------------------------------------------------------------------------- C++ CPU kernel

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_cpp_cpu_kernel_through_the_dispatcher(dtype, approximate):
    """The C++ extension's CPU kernels, called as effkern_C ops and as the 'cuda' backend."""
    needs_backend("cuda")
    x, w, b = make_inputs(11, 13, 17, dtype)
    out, gelu_grad = torch.ops.effkern_C.linear_gelu_fwd(x, w, b, approximate == "tanh", True)
    ref = linear_gelu_reference(x.double(), w.double(), b.double(), approximate)
    assert_within_tolerance(out, ref, linear_gelu_reference(x, w, b, approximate))

    def gelu_grad_of(z):
        return torch.ops.aten.gelu_backward(torch.ones_like(z), z, approximate=approximate)

    assert_within_tolerance(gelu_grad, gelu_grad_of(F.linear(x.double(), w.double(), b.double())),
                            gelu_grad_of(F.linear(x, w, b)), "gelu_grad")
    with ek.use_backend("cuda"):
        check_against_float64(lambda *a: ek.linear_gelu(*a, approximate), x, w, b, approximate)


def test_cpp_ops_check_their_arguments():
    """Called directly, bypassing the Python checks, the C++ ops still refuse bad shapes."""
    needs_backend("cuda")
    x, w, b = make_inputs(4, 6, 8, torch.float32)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.effkern_C.linear_gelu_fwd(x, w[:, :5], b, False, False)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.effkern_C.linear_gelu_fwd(x, w, b[:5], False, False)
    with pytest.raises(RuntimeError, match="has dtype"):
        torch.ops.effkern_C.linear_gelu_fwd(x, w.double(), b, False, False)
    with pytest.raises(RuntimeError, match="gelu_grad must be"):
        torch.ops.effkern_C.linear_gelu_bwd(torch.randn(4, 6), x, w, torch.randn(4, 5), [True] * 3)


# ---------------------------------------------------------------------------- nn module

def test_linear_gelu_module_shares_linear_parameters():
    linear = torch.nn.Linear(12, 20)
    layer = ek.nn.LinearGELU.from_linear(linear, approximate="tanh")
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(layer(x), F.gelu(linear(x), approximate="tanh"))
    assert layer.state_dict().keys() == linear.state_dict().keys()
    fresh = ek.nn.LinearGELU(12, 20, bias=True, approximate="tanh")
    fresh.load_state_dict(linear.state_dict())
    torch.testing.assert_close(fresh(x), layer(x))
    assert repr(ek.nn.LinearGELU(4, 4, approximate="tanh")).endswith("approximate='tanh')")
    assert "recompute_preact=True" in repr(ek.nn.LinearGELU(4, 4, recompute_preact=True))
    with pytest.raises(ValueError, match="approximate"):
        ek.nn.LinearGELU(4, 4, approximate="exact")
    with pytest.raises(TypeError, match="nn.Linear"):
        ek.nn.LinearGELU.from_linear(torch.nn.Conv1d(1, 1, 1))


# ---------------------------------------------------------------------------- GPU

GPU_BACKENDS = ["triton", "cuda", "reference"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("M,N,K", ODD_SHAPES + [(256, 384, 512), (2048, 1024, 768)])
def test_gpu_kernel_matches_float64(backend, dtype, approximate, M, N, K, poison_empty):
    needs_backend(backend, "cuda")
    x, w, b = make_inputs(M, N, K, dtype, device="cuda")
    with ek.use_backend(backend):
        check_against_float64(lambda *a: ek.linear_gelu(*a, approximate), x, w, b, approximate)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype,approximate", [(torch.float32, "none"), (torch.bfloat16, "tanh")],
                         ids=["fp32-erf", "bf16-tanh"])
@parametrize_by_name(_non_contiguous_cases())
def test_gpu_any_strides_and_ranks(backend, dtype, approximate, case, poison_empty):
    needs_backend(backend, "cuda")
    _, x, w, b = _non_contiguous_cases(dtype, "cuda")[case]
    with ek.use_backend(backend):
        check_against_float64(lambda *a: ek.linear_gelu(*a, approximate), x, w, b, approximate)


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_opcheck_compile_and_autocast(backend):
    needs_backend(backend, "cuda")
    with ek.use_backend(backend):
        for requires_grad in (False, True):
            for op, args in op_samples(requires_grad, "cuda", torch.bfloat16):
                torch.library.opcheck(op, args)
    # compiled == eager: the graph calls the same ops on the same tensors
    torch._dynamo.reset()
    x, w, b = make_inputs(64, 512, 256, torch.bfloat16, device="cuda")
    grad = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(lambda *a: ek.linear_gelu(*a, "tanh"), fullgraph=True)
    with ek.use_backend(backend):
        eager = forward_backward(lambda *a: ek.linear_gelu(*a, "tanh"), x, w, b, grad)
        ours = forward_backward(compiled, x, w, b, grad)
    for name, o, e in zip(("output", "grad_input", "grad_weight", "grad_bias"), ours, eager):
        torch.testing.assert_close(o, e, msg=name)
    assert_autocast_like_f_linear(backend, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("M,N,K", EMPTY_SHAPES)
def test_gpu_empty_dimensions(backend, M, N, K, poison_empty):
    needs_backend(backend, "cuda")
    x, w, b = make_inputs(M, N, K, torch.bfloat16, device="cuda")
    with ek.use_backend(backend):
        check_against_float64(ek.linear_gelu, x, w, b, "none")


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["weight", "bias", "input"])
def test_gpu_mixed_devices_raise(which):
    """One tensor on the CPU, the others on the GPU: a RuntimeError naming it (or, for the input,
    the weight that is not on the input's device), before any kernel."""
    x, w, b = make_inputs(4, 6, 8, torch.float32, device="cuda")
    args = dict(input=x, weight=w, bias=b)
    args[which] = args[which].cpu()
    message = ("weight is on cuda:0 but input is on cpu" if which == "input"
               else f"{which} is on cpu but input is on cuda")
    for backend in GPU_BACKENDS:
        assert_bad_call_raises(backend, ek.linear_gelu, (which, (*args.values(), "none"), RuntimeError, message))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gpu_recompute_preact_keeps_less_and_gives_the_same_gradients(backend, approximate):
    """recompute_preact=True: bit-identical gradients, and M*N elements (z) less kept between the
    forward and the backward, measured as the memory the forward leaves allocated."""
    needs_backend(backend, "cuda")
    M, N, K = 1024, 2048, 512
    x, w, b = (t.requires_grad_() for t in make_inputs(M, N, K, torch.bfloat16, device="cuda"))
    assert_recompute_preact_gives_the_same_results(backend, approximate, x, w, b)

    def kept_bytes(recompute_preact):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        y = ek.linear_gelu(x, w, b, approximate, recompute_preact=recompute_preact)
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() - before - y.nbytes  # saved for backward, beyond y itself

    with ek.use_backend(backend):
        saved, recomputed = kept_bytes(False), kept_bytes(True)
    z_bytes = M * N * x.element_size()
    assert saved == pytest.approx(z_bytes, rel=0.02) and recomputed < 0.02 * z_bytes, (saved, recomputed)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("wrt", ["input", "weight"])
def test_gpu_single_gradient_allocates_no_copy_of_the_unsaved_operand(backend, wrt):
    """Only grad_input or only grad_weight: autograd keeps w, resp. x, and the backward gets a
    zero-stride stand-in for the other, which has the gradient's shape. The backward may allocate
    the gradient plus scratch (cuBLASLt's 32 MiB workspace, gz [M, N] of 1 MiB); a dense copy of
    the stand-in would add as much again as the gradient (128 MiB here)."""
    needs_backend(backend, "cuda")
    big, small = 8192, 64
    M, N = (big, small) if wrt == "input" else (small, big)
    x, w, _ = make_inputs(M, N, big, torch.bfloat16, device="cuda", bias=False)
    gradient_bytes = big * big * 2
    peak = _single_gradient(backend, wrt, x, w, torch.randn(M, N, device="cuda", dtype=torch.bfloat16))
    assert peak < 1.5 * gradient_bytes, f"the backward allocated {peak / 2**20:.0f} MiB at its peak"


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(16, 1000, 1536), (300, 500, 700), (1024, 2048, 1024)])
def test_gpu_autotuned_triton_configs_match_float64(M, N, K, monkeypatch):
    monkeypatch.setenv("EFFKERN_TRITON_AUTOTUNE", "1")
    x, w, b = make_inputs(M, N, K, torch.bfloat16, device="cuda")
    with ek.use_backend("triton"):
        check_against_float64(lambda *a: ek.linear_gelu(*a, "tanh"), x, w, b, "tanh")


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("index", range(5))
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gpu_every_tma_config_matches_float64(index, approximate, monkeypatch, tma_launches):
    """Each config the TMA forward's autotuner may pick, run as the fixed config, on sizes that
    are no multiple of any tile (K = 520: a partial last K step that the copy engine zero-fills)."""
    needs_backend("triton", "cuda")
    kernels = _kernels()
    bm, bn, bk, stages, warps = kernels._TMA_SHAPES[index]
    monkeypatch.setenv("EFFKERN_TRITON_AUTOTUNE", "0")
    monkeypatch.setitem(kernels._FIXED_TMA, "gpu", ((bm, bn, bk, kernels.GROUP), stages, warps))
    x, w, b = make_inputs(1000, 392, 520, torch.bfloat16, device="cuda")
    with ek.use_backend("triton"):
        check_against_float64(lambda *a: ek.linear_gelu(*a, approximate), x, w, b, approximate)
    assert tma_launches, "the TMA kernel did not run"


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gpu_every_tma_backward_config_matches_float64(index, approximate, monkeypatch):
    """Each config the TMA backward's autotuners may pick, as the fixed config, in both launches
    (grad_input over M = 1000 rows, grad_weight + grad_bias over N = 392), with N a partial last
    reduction step for grad_input and M one for grad_weight."""
    needs_backend("triton", "cuda")
    kernels = _kernels()
    bp, bq, br, stages, warps = kernels._TMA_BWD_SHAPES[index]
    monkeypatch.setenv("EFFKERN_TRITON_AUTOTUNE", "0")
    monkeypatch.setitem(kernels._FIXED_TMA_BWD, "gpu", ((bp, bq, br, kernels.GROUP), stages, warps))
    calls = record_calls(monkeypatch, kernels, "launch_persistent", lambda args, _: (args[1], args[6].get("TRANS_A")))
    x, w, b = make_inputs(1000, 392, 520, torch.bfloat16, device="cuda")
    with ek.use_backend("triton"):
        check_against_float64(lambda *a: ek.linear_gelu(*a, approximate), x, w, b, approximate)
    assert sorted(t for k, t in calls if k is kernels.linear_gelu_bwd_tma_kernel) == [False, True]


@pytest.mark.smoke
@pytest.mark.gpu
def test_gpu_backward_runs_on_the_selected_backend(monkeypatch):
    """The autograd engine runs CUDA backward ops on its own thread: the choice must reach it."""
    from effkern.kernels import linear_gelu as kernels

    calls = []
    real = kernels.linear_gelu_bwd
    monkeypatch.setattr(kernels, "linear_gelu_bwd", lambda *a: calls.append(1) or real(*a))
    x, w, b = (t.requires_grad_() for t in make_inputs(64, 128, 96, torch.bfloat16, device="cuda"))
    with ek.use_backend("triton"):
        ek.linear_gelu(x, w, b).sum().backward()
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("api", ["legacy", "new"])
def test_gpu_fp32_follows_torchs_tf32_switch(backend, api, poison_empty):
    """fp32 with TF32 switched on through either of torch's APIs (the cuda backend's compute type
    CUBLAS_COMPUTE_32F_FAST_TF32): runs, and within the error of F.linear under the same switch.
    Reading the legacy allow_tf32 after the new API switched TF32 on raises in torch >= 2.9."""
    needs_backend(backend, "cuda")
    matmul = torch.backends.cuda.matmul
    if api == "new" and getattr(matmul, "fp32_precision", None) is None:
        pytest.skip("this torch has no fp32_precision API")
    before = matmul.fp32_precision if api == "new" else matmul.allow_tf32
    try:
        if api == "new":
            matmul.fp32_precision = "tf32"
        else:
            matmul.allow_tf32 = True
        x, w, b = make_inputs(256, 384, 512, torch.float32, device="cuda")
        with ek.use_backend(backend):
            for approximate in ("none", "tanh"):
                check_against_float64(lambda *a: ek.linear_gelu(*a, approximate), x, w, b, approximate)
    finally:
        if api == "new":
            matmul.fp32_precision = before
        else:
            matmul.allow_tf32 = before


# The cuBLASLt backend's paths that the GPU tests above do not reach: every one of them runs with
# autograd (gelu'(z) kept) and a bias. Parametrized over the CPU too, where the "cuda" backend runs
# the C++ CPU kernels through the same Python and binding code (which checks the tests themselves).
CPP_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _inference_matches_float64(x, w, b, approximate):
    """Under no_grad (no gelu'(z) kept: cuBLASLt's GELU / GELU_BIAS epilogues, or our kernel writing
    gelu(z) in place over z): the output against float64."""
    with torch.no_grad(), ek.use_backend("cuda"):
        y = ek.linear_gelu(x, w, b, approximate)
    exact = linear_gelu_reference(*(t.double() if t is not None else None for t in (x, w, b)), approximate)
    assert y.dtype == x.dtype and y.shape == exact.shape
    assert_within_tolerance(y.cpu(), exact.cpu(), linear_gelu_reference(x, w, b, approximate).cpu(),
                            "inference output", reduction=x.shape[-1])


@pytest.mark.parametrize("device", CPP_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("M,N,K", [(1, 384, 512), (3, 33, 200), (127, 200, 17), (5, 1, 7), (6, 8, 1)])
def test_cuda_backend_every_epilogue_against_float64(device, dtype, approximate, bias, M, N, K, poison_empty):
    """Inference and training, with and without bias: GELU, GELU_BIAS, GELU_AUX, GELU_AUX_BIAS
    (16-bit tanh; AUX when N % 8 == 0), DEFAULT and BIAS + our kernel (erf, float32, N % 8 != 0),
    at M = 1 too; the backward without a bias runs no BGRADB. N = 1 and K = 1: torch keeps such
    GEMMs off cuBLASLt ("if mat2 has only 1 row or column, we get CUBLAS_STATUS_INVALID_VALUE error
    from cublasLtMatmulAlgoGetHeuristic", aten/src/ATen/native/cuda/Blas.cpp), and the cuda backend
    has no other GEMM to fall back to."""
    needs_backend("cuda", device)
    x, w, b = make_inputs(M, N, K, dtype, device=device, bias=bias)
    _inference_matches_float64(x, w, b, approximate)
    with ek.use_backend("cuda"):
        check_against_float64(lambda *a: ek.linear_gelu(*a, approximate), x, w, b, approximate)


@pytest.mark.parametrize("device", CPP_DEVICES)
@pytest.mark.parametrize("dtype,approximate", [(torch.float16, "tanh"), (torch.bfloat16, "none"),
                                               (torch.float32, "none")])
def test_cuda_backend_takes_operands_at_unaligned_addresses(device, dtype, approximate, poison_empty):
    """Views one element past an aligned address (x: odd ld too; W: K odd, so its rows start 2 or 4
    bytes off; bias: copied to an aligned buffer by the binding): cuBLASLt gets them as they are,
    with MIN_ALIGNMENT preferences of 2 (4) bytes, in the GELU_AUX_BIAS epilogue too (N % 8 == 0)."""
    needs_backend("cuda", device)
    M, N, K = 40, 64, 33
    x = torch.randn(M, K + 1, device=device, dtype=dtype)[:, 1:]
    w = (torch.randn(N + 1, K, device=device) / math.sqrt(K)).to(dtype)[1:]
    b = torch.randn(N + 1, device=device, dtype=dtype)[1:]
    element = x.element_size()
    assert all(t.data_ptr() % (2 * element) == element for t in (x, w, b))
    _inference_matches_float64(x, w, b, approximate)
    with ek.use_backend("cuda"):
        check_against_float64(lambda *a: ek.linear_gelu(*a, approximate), x, w, b, approximate)


@pytest.mark.parametrize("device", CPP_DEVICES)
@pytest.mark.parametrize("needs", [(False, False, True), (False, True, True), (True, False, False),
                                   (False, True, False)], ids=["b", "w+b", "x", "w"])
def test_cuda_backend_only_requested_gradients_from_a_transposed_grad_out(device, needs, poison_empty):
    """grad_bias alone (no wgrad GEMM: the binding's float32 sum), grad_weight with grad_bias
    (BGRADB), without it (DEFAULT), grad_input alone; grad_out a transposed view (the binding's
    dense copy)."""
    needs_backend("cuda", device)
    M, N, K = 96, 256, 136
    x, w, b = make_inputs(M, N, K, torch.bfloat16, device=device)
    grad = torch.randn(N, M, device=device, dtype=torch.bfloat16).t()

    def gradients(x, w, b, grad):
        leaves = [t.detach().requires_grad_(n) for t, n in zip((x, w, b), needs)]
        y = ek.linear_gelu(*leaves)
        return torch.autograd.grad(y, [t for t, n in zip(leaves, needs) if n], grad)

    with ek.use_backend("cuda"):
        got = gradients(x, w, b, grad)
    with ek.use_backend("reference"):
        exact = gradients(x.double(), w.double(), b.double(), grad.double())
        torch_same = gradients(x, w, b, grad)
    names = [name for name, n in zip(("grad_input", "grad_weight", "grad_bias"), needs) if n]
    for name, g, e, t in zip(names, got, exact, torch_same):
        assert_within_tolerance(g.cpu(), e.cpu(), t.cpu(), name, reduction=N if name == "grad_input" else M)


@pytest.mark.parametrize("device", CPP_DEVICES)
@pytest.mark.parametrize("dtype,approximate", [(torch.bfloat16, "tanh"), (torch.bfloat16, "none"),
                                               (torch.float32, "tanh")])
@pytest.mark.parametrize("training", [False, True])
def test_cuda_backend_nan_and_inf_like_eager(device, dtype, approximate, training):
    """NaN and +-inf in x give NaN and inf exactly where F.gelu(F.linear(...)) on the same device
    gives them, through cuBLASLt's tanh GELU epilogues (its ReLU epilogue is reported to turn NaN
    into 0: forums.developer.nvidia.com/t/329783) and our erf kernel. On the CPU NaN only: torch's
    own CPU F.gelu(+inf) is inf one element at a time but NaN in its vectorized loop."""
    needs_backend("cuda", device)
    x, w, b = make_inputs(8, 64, 32, dtype, device=device)
    x[1, 3] = float("nan")
    if device != "cpu":
        x[2, 5], x[3, 7] = float("inf"), -float("inf")
    leaves = [t.detach().requires_grad_(training) for t in (x, w, b)]
    with ek.use_backend("cuda"):
        y = ek.linear_gelu(*leaves, approximate).detach().float().cpu()
    eager = linear_gelu_reference(x, w, b, approximate).float().cpu()
    assert torch.equal(y.isnan(), eager.isnan()) and torch.equal(y.isinf(), eager.isinf())
    assert torch.equal(y[y.isinf()], eager[eager.isinf()])
    assert y.isnan().any() and (device == "cpu" or y.isinf().any())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gpu_cuda_backend_on_the_second_device_while_the_first_is_current(approximate, poison_empty):
    """Tensors on cuda:1, cuda:0 current: the binding's device guard, cuda:1's current stream, its
    own cuBLASLt handle and algorithm cache entries (keyed by device)."""
    needs_backend("cuda", "cuda:1")
    torch.cuda.set_device(0)
    x, w, b = make_inputs(64, 256, 128, torch.bfloat16, device="cuda:1")
    with ek.use_backend("cuda"):
        check_against_float64(lambda *a: ek.linear_gelu(*a, approximate), x, w, b, approximate)
    assert torch.cuda.current_device() == 0


@pytest.mark.gpu
def test_gpu_auto_backend_runs():
    x, w, b = make_inputs(300, 500, 700, torch.bfloat16, device="cuda")
    check_against_float64(lambda *a: ek.linear_gelu(*a), x, w, b, "none")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("M", [1, 100])
def test_gpu_cuda_graph_replays_like_eager(backend, M):
    def inputs(seed):
        torch.manual_seed(seed)
        return [t.requires_grad_() for t in make_inputs(M, 384, 512, torch.bfloat16, device="cuda")]

    assert_cuda_graph_replays_like_eager(backend, lambda x, w, b: ek.linear_gelu(x, w, b, "tanh"), inputs)

# ---------------------------------------------------------------------------- rounded once

def _within_half_a_unit(out, exact, noise):
    """Where out (float16 / bfloat16) is within half a unit in its last place of ``exact``
    (float64), plus ``noise``: the float32 rounding allowed before the one rounding to out's dtype."""
    info = torch.finfo(out.dtype)
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(info.tiny)))) * info.eps
    ulp = ulp.clamp_min(info.tiny * info.eps)  # subnormals: the smallest spacing
    return (out.double() - exact).abs() <= 0.5 * ulp + noise


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_cpp_cpu_kernel_rounds_its_16_bit_results_once(dtype, approximate):
    """float16 / bfloat16: the C++ CPU kernels keep x @ W^T + b and grad_out * gelu'(z) in float32
    (csrc/cpu/linear_gelu.cpp) and round each result once, so every output element is within half
    a unit in the last place of the exact result of those float32 intermediates (plus float32 noise).
    A kernel that rounds an intermediate to the 16-bit dtype first makes the error PyTorch itself
    makes in that dtype, which the float64 tests allow; here it lands up to a whole unit off."""
    needs_backend("cuda")
    torch.manual_seed(0)
    M, N, K = 32, 48, 64
    x, w, b = make_inputs(M, N, K, dtype)
    eps32 = torch.finfo(torch.float32).eps
    out, gelu_grad = torch.ops.effkern_C.linear_gelu_fwd(x, w, b, approximate == "tanh", True)
    z32 = x.float().mm(w.float().t()) + b.float()  # what the kernel computes, in the same way
    exact = F.gelu(z32.double(), approximate=approximate)
    ok = _within_half_a_unit(out, exact, 8 * eps32 * (exact.abs() + z32.double().abs()))
    assert ok.all(), f"output: {int((~ok).sum())} of {ok.numel()} elements more than half a unit off"

    grad_out = torch.randn(M, N, dtype=dtype)
    grad_input, grad_weight, _ = torch.ops.effkern_C.linear_gelu_bwd(grad_out, x, w, gelu_grad, [True, True, False])
    gz = grad_out.double() * gelu_grad.double()  # exact in float32 too: two 16-bit significands
    for name, got, a, bmat, n in (("grad_input", grad_input, gz, w.double(), N),
                                  ("grad_weight", grad_weight, gz.t(), x.double(), M)):
        exact = a @ bmat
        ok = _within_half_a_unit(got, exact, 2 * n * eps32 * (a.abs() @ bmat.abs()))
        assert ok.all(), f"{name}: {int((~ok).sum())} of {ok.numel()} elements more than half a unit off"


def test_linear_gelu_module_recompute_preact_keeps_no_gelu_grad():
    """recompute_preact=True, given to the constructor or to from_linear, reaches the op: no
    [M, N] tensor is kept for the backward."""
    x = torch.randn(9, 12, requires_grad=True)
    for layer in (ek.nn.LinearGELU(12, 20, recompute_preact=True),
                  ek.nn.LinearGELU.from_linear(torch.nn.Linear(12, 20), recompute_preact=True)):
        shapes = []
        with ek.use_backend("reference"), torch.autograd.graph.saved_tensors_hooks(
                lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            layer(x)
        assert shapes and (9, 20) not in shapes, shapes


def test_bias_only_training_keeps_gelu_grad():
    """Only the bias requires grad (BitFit): gelu'(z) is kept like any other training call, not
    recomputed by one more GEMM in the backward."""
    x, w, b = make_inputs(9, 20, 24, torch.float64)
    with ek.use_backend("reference"):
        kept = _saved_activation(ek.linear_gelu, x, w, b.requires_grad_())
    z = F.linear(x, w, b).detach()
    torch.testing.assert_close(kept, torch.ops.aten.gelu_backward(torch.ones_like(z), z))
    z = F.linear(x, w, b).detach()
    torch.testing.assert_close(kept, torch.ops.aten.gelu_backward(torch.ones_like(z), z))


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_recompute_preact_with_one_gradient(needs):
    """recompute_preact=True with one operand requiring grad (a frozen layer's input, say): the
    backward still has input, weight and bias to recompute gelu'(z) from."""
    x, w, b = make_inputs(6, 10, 12, torch.float64)
    grads = []
    for recompute in (False, True):
        leaves = [t.detach().clone().requires_grad_(n) for t, n in zip((x, w, b), needs)]
        with ek.use_backend("reference"):
            ek.linear_gelu(*leaves, recompute_preact=recompute).backward(torch.ones(6, 10, dtype=torch.float64))
        grads.append([t.grad for t in leaves])
    for kept, recomputed, n in zip(*grads, needs):
        assert (recomputed is not None) == n and (not n or torch.equal(kept, recomputed))
