"""Flash attention: the Triton kernels (through the interpreter on CPU) and the reference against
float64, masks (bottom-right causal, window), softcap, GQA/MQA, strides, the SDPA drop-in,
registration (opcheck, torch.compile), autocast and errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import effkern as ek
from effkern._backend import backend_available
from effkern.attention import (_sdpa_fast_path, flash_attention, flash_attention_reference,
                               scaled_dot_product_attention, visible)

from op_checks import (aligned_launch, assert_bad_call_raises, assert_cuda_graph_replays_like_eager,
                       assert_matches_float64, assert_opcheck_passes, needs_backend, parametrize_by_name,
                       record_calls)

BACKENDS = ["triton", "reference"]

# (name, B, Hq, Hkv, Sq, Skv, D, causal, window, softcap, transposed): a covering subset of the
# issue's matrix, (Sq, Skv) x D x heads x masks x layout, not its full cross product.
CASES = [
    ("mha_1x147_d32", 1, 2, 2, 1, 147, 32, False, (-1, -1), 0.0, False),
    ("mqa_1x147_d111_causal_t", 2, 3, 1, 1, 147, 111, True, (-1, -1), 0.0, True),
    ("gqa_1x147_d64_window", 1, 6, 2, 1, 147, 64, False, (20, -1), 0.0, False),
    ("gqa_113x203_d40_causal_t", 1, 6, 2, 113, 203, 40, True, (-1, -1), 0.0, True),
    ("mha_113x203_d59", 1, 2, 2, 113, 203, 59, False, (-1, -1), 0.0, False),
    ("mqa_113x203_d64_window", 1, 3, 1, 113, 203, 64, False, (32, 8), 0.0, False),
    ("mha_113x203_d32_causal_softcap", 1, 1, 1, 113, 203, 32, True, (-1, -1), 5.0, False),
    ("gqa_113x203_d111_causal_window_t", 1, 6, 2, 113, 203, 111, True, (50, 10), 0.0, True),
    ("mha_64x128_d64_causal", 2, 2, 2, 64, 128, 64, True, (-1, -1), 0.0, False),
    ("mha_64x128_d111_softcap_t", 1, 2, 2, 64, 128, 111, False, (-1, -1), 8.0, True),
    ("gqa_64x128_d32_window_left", 1, 6, 2, 64, 128, 32, False, (16, -1), 0.0, False),
    ("mqa_64x128_d40_window_00", 1, 2, 1, 64, 128, 40, False, (0, 0), 0.0, True),
    ("mqa_3x79_d59_causal", 2, 3, 1, 3, 79, 59, True, (-1, -1), 0.0, False),
    ("gqa_3x79_d40_window_right_softcap", 1, 6, 2, 3, 79, 40, False, (-1, 5), 3.0, False),
    ("mha_37x61_d8_causal", 1, 2, 2, 37, 61, 8, True, (-1, -1), 0.0, False),  # D below the 16-wide block
    ("gqa_37x61_d5_t", 1, 4, 2, 37, 61, 5, False, (-1, -1), 0.0, True),
    ("mha_3x79_d64_t", 1, 2, 2, 3, 79, 64, False, (-1, -1), 0.0, True),
    ("mha_37x1_d32_causal", 1, 2, 2, 37, 1, 32, True, (-1, -1), 0.0, False),  # rows with no visible key
    ("gqa_57x23_d59_causal_softcap_t", 1, 6, 2, 57, 23, 59, True, (-1, -1), 2.0, True),  # Sq > Skv
    ("mha_40x40_d16_window_both", 1, 2, 2, 40, 40, 16, False, (3, 4), 0.0, False),
    # the head dims of two-step blocks: 128 (the d128 class's widest), 160 (padded to a 256 block), 256
    ("mha_128x217_d160_causal", 1, 2, 2, 128, 217, 160, True, (-1, -1), 0.0, False),
    ("mqa_128x217_d128_window_softcap_t", 1, 2, 1, 128, 217, 128, False, (40, 20), 4.0, True),
    ("mqa_239x1_d128_causal", 1, 3, 1, 239, 1, 128, True, (-1, -1), 0.0, False),  # only the last row sees a key
    ("mha_239x1_d256_t", 1, 2, 2, 239, 1, 256, False, (-1, -1), 0.0, True),
    # (3, 799): the split-KV forward (decode_splits > 1 here), its gradients by the backward kernels
    ("mha_3x799_d32", 1, 2, 2, 3, 799, 32, False, (-1, -1), 0.0, False),
    ("mqa_3x799_d256_causal_window_softcap_t", 1, 2, 1, 3, 799, 256, True, (300, -1), 3.0, True),
    ("gqa_64x128_d160_window_left_t", 1, 4, 2, 64, 128, 160, False, (24, -1), 0.0, True),
    # the other head dims: 80 and 96 (padded to 128-wide blocks), 192 and 224 (to 256)
    ("gqa_17x33_d80_causal", 1, 4, 2, 17, 33, 80, True, (-1, -1), 0.0, False),
    ("mha_5x70_d96_window_t", 1, 2, 2, 5, 70, 96, False, (30, 2), 0.0, True),
    ("mha_16x40_d192_softcap_t", 1, 2, 2, 16, 40, 192, False, (-1, -1), 4.0, True),
    ("mqa_33x17_d224_causal", 1, 2, 1, 33, 17, 224, True, (-1, -1), 0.0, False),  # Sq > Skv
    # the last key a query tile sees starting a key block: Skv - Sq = 1 (mod 16) for the forward's,
    # dQ's and dK/dV's interpreter tiles; packed GQA rows (group 3, not dividing the 16-row decoding
    # tile) whose last position's last key, 91 + 5, starts a key block
    ("mha_47x48_d32_causal", 1, 2, 2, 47, 48, 32, True, (-1, -1), 0.0, False),
    ("gqa_7x98_d32_causal", 1, 6, 2, 7, 98, 32, True, (-1, -1), 0.0, False),
]


def make(B, Hq, Hkv, Sq, Skv, D, transposed, dtype=torch.float16, device="cpu"):
    """q, k, v (leaf tensors that require grad): [B, H, S, D], or views of [B, S, H, D] tensors."""
    def one(H, S):
        if transposed:
            return torch.randn(B, S, H, D, device=device).to(dtype).transpose(1, 2)
        return torch.randn(B, H, S, D, device=device).to(dtype)

    q, k, v = one(Hq, Sq), one(Hkv, Skv), one(Hkv, Skv)
    return [t.requires_grad_() for t in (q, k, v)]


def attention_in(dtype, q, k, v, causal, window, softcap, scale=None):
    """PyTorch's own attention computed in ``dtype`` (an independent formulation: an explicit mask,
    softmax, repeat_interleave for GQA): (out, lse), lse float64 for float64, else float32; rows
    with no visible key give 0 and -inf."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    Hq, Sq, Skv, D = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    scale = 1 / math.sqrt(D) if scale is None else scale
    k, v = (t.repeat_interleave(Hq // t.shape[1], dim=1) for t in (k, v))
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    keep = visible(Sq, Skv, causal, *window, q.device)
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s if dtype == torch.float64 else s.float(), -1)
    p = torch.softmax(s, -1).masked_fill(~keep.any(-1)[:, None], 0.0)
    return p @ v, lse


def grads(outs, grad_outs, inputs):
    return torch.autograd.grad(outs, inputs, grad_outs)


def assert_forward_matches_float64(out, lse, q, k, v, causal, window, softcap):
    """out and lse (16-bit inputs q, k, v) against float64, within twice PyTorch's error in q's
    dtype; rows with no visible key exactly 0 and -inf. Returns (the float64 leaves, their (out,
    lse), PyTorch's in q's dtype)."""
    B, Hq, Sq, _ = q.shape
    Skv = k.shape[2]
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = attention_in(torch.float64, *x64, causal, window, softcap)
    same, lse_same = attention_in(q.dtype, q, k, v, causal, window, softcap)
    assert_matches_float64(out, out64, same, Skv, what="out")
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite) and bool((lse[~finite] == float("-inf")).all())
    assert_matches_float64(lse[finite], lse64[finite], lse_same[finite].float(), Skv, what="lse")
    assert bool((out[~finite] == 0).all())
    return x64, (out64, lse64), (same, lse_same)


# ---------------------------------------------------------------------------- against float64

def check_forward_lse_and_gradients(case, backend, dtype=torch.float16, device="cpu"):
    """A case of CASES (or GPU_CASES) under ``backend``: out, lse and the gradients of q, k
    and v from a loss on both out and lse (the backward's dlse term) against float64."""
    _, B, Hq, Hkv, Sq, Skv, D, causal, window, softcap, transposed = case
    q, k, v = make(B, Hq, Hkv, Sq, Skv, D, transposed, dtype, device)
    with ek.use_backend(backend):
        out, lse = flash_attention(q, k, v, causal=causal, window=window, softcap=softcap, return_lse=True)
    x64, (out64, lse64), (same, lse_same) = assert_forward_matches_float64(out, lse, q, k, v, causal, window, softcap)
    finite = torch.isfinite(lse64)

    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse).masked_fill(~finite, 0.0)
    with ek.use_backend(backend):
        got = grads((out, lse), (dout, dlse), (q, k, v))
    want = grads((out64, lse64), (dout.double(), dlse.double()), x64)
    base = grads((same, lse_same), (dout, dlse), (q, k, v))
    group = Hq // Hkv
    for name, g, w, b, n in zip("qkv", got, want, base, (Skv, Sq * group, Sq * group)):
        assert g.shape == w.shape and g.dtype == dtype
        assert_matches_float64(g, w, b, n, what=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@parametrize_by_name(CASES)
def test_forward_lse_and_gradients_match_float64(backend, case, poison_empty):
    needs_backend(backend)
    check_forward_lse_and_gradients(CASES[case], backend)


def assert_backward_is_deterministic(B, Hq, Hkv, Sq, Skv, D, dtype, device):
    """GQA, causal, [B, S, H, D] views: two backward passes give dq, dk and dv bit for bit (no atomics)."""
    x = [t.detach() for t in make(B, Hq, Hkv, Sq, Skv, D, True, dtype, device)]
    dout = torch.randn(B, Hq, Sq, D, device=device).to(dtype)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in x]
        with ek.use_backend("triton"):
            flash_attention(*leaves, causal=True).backward(dout)
        runs.append([t.grad for t in leaves])
    for name, first, second in zip("qkv", *runs):
        assert torch.equal(first, second), f"d{name}"


def test_backward_is_deterministic(poison_empty):
    needs_backend("triton")
    assert_backward_is_deterministic(1, 6, 2, 45, 70, 32, torch.float16, "cpu")


def test_reference_matches_torch_sdpa_with_a_mask():
    """The reference's masks and GQA against F.scaled_dot_product_attention with the same bool mask."""
    q, k, v = (t.detach().double() for t in make(2, 6, 2, 13, 29, 24, False, torch.float64))
    for causal, window, in [(True, (-1, -1)), (False, (4, 2)), (True, (7, -1)), (False, (-1, 0))]:
        out, _ = flash_attention_reference(q, k, v, causal, 0.3, window)
        mask = visible(13, 29, causal, *window)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
        torch.testing.assert_close(out, expected)


def test_reference_gradcheck():
    # lse is float32 even for float64 inputs, too coarse for finite differences: its gradient is
    # checked against float64 autograd in test_forward_lse_and_gradients_match_float64
    q, k, v = (t.detach().double().requires_grad_() for t in make(1, 4, 2, 5, 9, 8, True, torch.float64))

    def f(q, k, v):
        return flash_attention(q, k, v, causal=True, window=(2, -1), softcap=1.5, scale=0.7)

    with ek.use_backend("reference"):
        assert torch.autograd.gradcheck(f, (q, k, v))


def test_bottom_right_causal_and_window_rule():
    keep = visible(2, 5, True, -1, -1)  # query i sees keys j <= i + 3
    assert keep.tolist() == [[True] * 4 + [False], [True] * 5]
    keep = visible(3, 3, False, 1, 0)
    assert keep.tolist() == [[True, False, False], [True, True, False], [False, True, True]]


def test_fully_masked_rows_and_empty_inputs(poison_empty):
    needs_backend("triton")
    q, k, v = make(1, 2, 2, 6, 3, 16, False)
    with ek.use_backend("triton"):
        out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
        (out.float().sum() + 0 * lse[torch.isfinite(lse)].sum()).backward()
    assert bool((out[:, :, :3] == 0).all()) and bool((lse[:, :, :3] == float("-inf")).all())
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    for backend in BACKENDS:
        with ek.use_backend(backend):
            o = flash_attention(*(t.detach() for t in make(1, 2, 1, 0, 5, 16, False)))
            assert o.shape == (1, 2, 0, 16)
            o, l = flash_attention(*(t.detach() for t in make(1, 2, 1, 4, 0, 16, False)), return_lse=True)
            assert bool((o == 0).all()) and bool((l == float("-inf")).all())


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # e^{2x} = inf: on purpose
@pytest.mark.parametrize("Sq,Skv,causal,window,softcap,scale", [
    (40, 50, False, (-1, -1), 0.5, 30.0),     # |s / softcap| up to ~300: tanh saturated, exp(2x) = inf
    (40, 20, False, (2, 0), 0.0, None),       # rows 0..19 see no key
    (40, 20, False, (2, 0), 0.5, 30.0),       # both
])
def test_saturated_softcap_and_keyless_rows_with_an_lse_gradient(Sq, Skv, causal, window, softcap, scale,
                                                                 poison_empty):
    """Where a GPU's approximate exp2/exp and div.full could differ from the interpreter: tanh
    saturated (e^{2x} = inf gives exactly 1), rows with no visible key (l_i = 0 exactly: out 0, lse
    -inf, finite gradients) under a loss on lse too."""
    needs_backend("triton")
    q, k, v = make(1, 4, 2, Sq, Skv, 24, False)
    with ek.use_backend("triton"):
        out, lse = flash_attention(q, k, v, causal=causal, window=window, softcap=softcap, scale=scale,
                                   return_lse=True)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = attention_in(torch.float64, *x64, causal, window, softcap, scale)
    same, lse_same = attention_in(torch.float16, q, k, v, causal, window, softcap, scale)
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite) and bool((lse[~finite] == float("-inf")).all())
    assert bool((out[~finite] == 0).all())
    assert_matches_float64(out, out64, same, Skv, what="out")
    assert_matches_float64(lse[finite], lse64[finite], lse_same[finite].float(), Skv, what="lse")
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse).masked_fill(~finite, 0.0)
    with ek.use_backend("triton"):
        got = grads((out, lse), (dout, dlse), (q, k, v))
    want = grads((out64, lse64), (dout.double(), dlse.double()), x64)
    base = grads((same, lse_same), (dout, dlse), (q, k, v))
    for name, g, w, b in zip("qkv", got, want, base):
        assert torch.isfinite(g).all(), name
        assert_matches_float64(g, w, b, Skv, what=f"d{name}")
    assert bool((got[0][~finite] == 0).all())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("Sq,splits", [(20, None), (3, 1), (3, 3)])
def test_nan_scores_give_nan_lse_not_minus_inf(Sq, splits):
    """A NaN among a row's visible scores makes its out and lse NaN, as the reference (torch's
    logsumexp) has them; lse -inf is the mark of a row that sees no key."""
    needs_backend("triton")
    from effkern.kernels import attention as kernels

    q, k, v = (t.detach() for t in make(1, 2, 1, Sq, 200, 16, False))
    q[0, 0, 1] = float("nan")    # every score of row 1 of head 0
    k[0, 0, 150, 0] = float("nan")  # one key that every row sees
    if splits is None:
        with ek.use_backend("triton"):
            out, lse = flash_attention(q, k, v, return_lse=True)
    else:
        out, lse = kernels.flash_attn_fwd(q, k, v, False, 0.25, -1, -1, 0.0, splits=splits)
    assert bool(out.isnan().any(-1).all())
    assert bool(lse.isnan().all()), lse


# ---------------------------------------------------------------------------- skipped blocks

def _rows(*spans) -> list[int]:
    return [i for lo, hi in spans for i in range(lo, hi)]


# (name, Sq, Skv, causal, window, keys poisoned, query rows checked, query rows poisoned, keys
# checked): poisoning (NaN) the keys and values of key blocks that no query tile holding a
# checked row may visit leaves those rows' out, lse and dq bit for bit as they were; poisoning
# the q and dO rows of query blocks that no key block holding a checked key may visit leaves
# those keys' dk and dv so. A kernel that visited such a block, even fully masked, would
# multiply the poison by a zero probability: NaN. The spans leave a margin of a whole tile
# over the interpreter's (forward and dQ 32 x 16, dK/dV 16 x 32, decoding 16 x 16), so they
# hold for tiles up to 64 x 32 too.
SKIP_CASES = [
    # causal: the key blocks right of a tile's diagonal; the query blocks above a key block's
    ("causal", 160, 160, True, (-1, -1), [(64, 160)], [(0, 32)], [(0, 64)], [(96, 160)]),
    # causal with a left window: both sides of the band
    ("causal_window", 160, 160, True, (16, -1), [(0, 32), (128, 160)], [(64, 96)], [(0, 48), (128, 160)],
     [(64, 96)]),
    # decoding (the split-KV forward divides only the window's key blocks among its splits): all
    # rows checked, and every key's dk and dv (the poisoned ones' 0: their blocks see no query)
    ("decode_window", 2, 799, True, (300, -1), [(0, 400)], [(0, 2)], [], [(0, 799)]),
]


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the rows that see poison
@parametrize_by_name(SKIP_CASES)
def test_fully_masked_blocks_are_skipped(case, poison_empty):
    """Key blocks (query blocks, in the dK/dV kernel) that the causal or window band masks in full
    are skipped, not visited: poison in them changes nothing (SKIP_CASES)."""
    needs_backend("triton")
    _, Sq, Skv, causal, window, bad_keys, rows, bad_rows, keys = SKIP_CASES[case]
    x = [t.detach() for t in make(1, 2, 1, Sq, Skv, 16, False)]  # GQA: the dK/dV kernel's head loop too
    dout = torch.randn(1, 2, Sq, 16).half()
    if Sq <= 16:
        assert _kernels().decode_splits(1, 2, 1, Sq, Skv, 16, causal, *window, x[0].device) > 1  # the split path

    def run(q, k, v, do):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with ek.use_backend("triton"):
            out, lse = flash_attention(*leaves, causal=causal, window=window, return_lse=True)
            out.backward(do)
        return out, lse, *(t.grad for t in leaves)

    def poisoned(t, index):
        t = t.clone()
        t[:, :, index] = float("nan")
        return t

    clean = run(*x, dout)
    rows, keys, bad_keys, bad_rows = _rows(*rows), _rows(*keys), _rows(*bad_keys), _rows(*bad_rows)
    q, k, v = x
    out, lse, dq, dk, dv = run(q, poisoned(k, bad_keys), poisoned(v, bad_keys), dout)
    for name, got, want in zip(("out", "lse", "dq"), (out, lse, dq), clean[:3]):
        assert torch.equal(got[:, :, rows], want[:, :, rows]), f"{name}: a skipped key block was computed"
    if bad_rows:
        *_, dk, dv = run(poisoned(q, bad_rows), k, v, poisoned(dout, bad_rows))
    for name, got, want in zip(("dk", "dv"), (dk, dv), clean[3:]):
        assert torch.equal(got[:, :, keys], want[:, :, keys]), f"{name}: a skipped query block was computed"


# ---------------------------------------------------------------------------- split-KV (decoding)

# (name, B, Hq, Hkv, Sq, Skv, D, causal, window, softcap): few query rows, many keys
DECODE_CASES = [
    ("mha_1x147_d40", 1, 2, 2, 1, 147, 40, False, (-1, -1), 0.0),
    ("gqa_3x799_d64_causal", 1, 6, 2, 3, 799, 64, True, (-1, -1), 0.0),
    ("gqa_1x799_d40_window_softcap", 1, 6, 2, 1, 799, 40, False, (300, -1), 5.0),
    ("mha_3x147_d64_causal_window", 1, 2, 2, 3, 147, 64, True, (130, -1), 0.0),
    # GQA packed: 7 positions x 3 query heads = 21 rows, two row blocks of the interpreter's 16
    ("gqa_7x800_d40_causal_window", 1, 6, 2, 7, 800, 40, True, (300, -1), 0.0),
    ("mqa_5x200_d64_b2", 2, 4, 1, 5, 200, 64, False, (-1, -1), 0.0),
]


def _kernels():
    from effkern.kernels import attention as kernels

    return kernels


# ---------------------------------------------------------------------------- TMA loads (forward)

@pytest.fixture
def tma_launches(monkeypatch):
    """Per forward or dQ launch while the test runs, whether its unmasked blocks read their K and V
    tiles by TMA descriptors."""
    return record_calls(monkeypatch, _kernels(), "_kv_descriptors", lambda _, descs: descs is not None)


# (B, Hq, Hkv, Sq, Skv, D, causal, window, softcap): several unmasked key blocks per tile (the
# interpreter's 32 x 16 forward and dQ tiles), GQA, D below its
# 16-multiple block (40: columns past D zero-filled by the copy), a sliding window, a softcap
TMA_CASES = [(2, 4, 2, 70, 90, 32, False, (-1, -1), 0.0), (1, 6, 2, 50, 100, 40, True, (-1, -1), 0.0),
             (2, 2, 1, 64, 64, 64, False, (40, 30), 5.0)]


@pytest.mark.parametrize("case", range(len(TMA_CASES)))
def test_tma_loads_give_the_pointer_loads_bits(case, monkeypatch, tma_launches):
    """Contiguous fp16 k/v take the TMA loads in the unmasked blocks of the forward and dQ
    kernels; under the interpreter they compute exactly what the pointer loads do: output, lse
    and the three gradients bit for bit."""
    needs_backend("triton")
    B, Hq, Hkv, Sq, Skv, D, causal, window, softcap = TMA_CASES[case]
    x = [t.detach() for t in make(B, Hq, Hkv, Sq, Skv, D, False)]
    dout = torch.randn(B, Hq, Sq, D).half()
    results = []
    for tma in ("1", "0"):
        monkeypatch.setenv("EFFKERN_TRITON_TMA", tma)
        leaves = [t.clone().requires_grad_() for t in x]
        with ek.use_backend("triton"):
            out, lse = flash_attention(*leaves, causal=causal, window=window, softcap=softcap, return_lse=True)
            out.backward(dout)
        results.append([out, lse, *(t.grad for t in leaves)])
    assert tma_launches == [True, True, False, False]  # forward, dQ; with TMA, then without
    for name, with_tma, without in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert torch.equal(with_tma, without), name


def test_head_rows_only_for_evenly_spaced_heads():
    kernels = _kernels()
    t = torch.randn(2, 3, 5, 8)
    assert torch.equal(kernels._head_rows(t), t.reshape(30, 8))
    sliced = torch.randn(2, 3, 5, 16)[..., :8]  # rows 16 apart
    assert torch.equal(kernels._head_rows(sliced), sliced.reshape(30, 8))
    assert kernels._head_rows(torch.randn(2, 5, 3, 8).transpose(1, 2)) is None  # [B, S, H, D] layout
    assert kernels._head_rows(torch.randn(2, 3, 8, 5).transpose(2, 3)) is None  # D not contiguous
    assert kernels._head_rows(torch.randn(2, 3, 5, 8)[:, :2]) is None  # heads sliced: batches not evenly spaced


def test_transposed_views_keep_the_pointer_loads(tma_launches):
    """[B, S, H, D] views do not flatten into rows: forward and dQ keep their pointer loads."""
    needs_backend("triton")
    q, k, v = make(1, 2, 2, 40, 70, 32, True)
    with ek.use_backend("triton"):
        flash_attention(q, k, v).sum().backward()
    assert tma_launches == [False, False]


@pytest.mark.parametrize("causal", [False, True])
def test_split_kv_decoding_with_tma_gives_the_pointer_loads_bits(causal, monkeypatch, tma_launches):
    """The split-KV (decoding) forward reads its splits' unmasked key blocks by TMA too."""
    needs_backend("triton")
    q, k, v = (t.detach() for t in make(1, 2, 1, 3, 700, 32, False))
    assert _kernels().decode_splits(1, 2, 1, 3, 700, 32, causal, -1, -1, q.device) > 1
    outs = []
    for tma in ("1", "0"):
        monkeypatch.setenv("EFFKERN_TRITON_TMA", tma)
        outs.append(_kernels().flash_attn_fwd(q, k, v, causal, 0.125, -1, -1, 0.0))
    assert tma_launches == [True, False]
    for with_tma, without in zip(*outs):
        assert torch.equal(with_tma, without)


@pytest.mark.parametrize("splits", ["auto", 1, 3, 7])
@parametrize_by_name(DECODE_CASES)
def test_split_kv_forward_matches_float64(case, splits, poison_empty):
    """The split-KV forward, chosen by the launcher for these shapes (auto: through
    ek.flash_attention, its gradients too) or forced to 1, 3 or 7 splits."""
    needs_backend("triton")
    kernels = _kernels()
    _, B, Hq, Hkv, Sq, Skv, D, causal, window, softcap = DECODE_CASES[case]
    q, k, v = make(B, Hq, Hkv, Sq, Skv, D, False)
    if splits == "auto":
        assert kernels.decode_splits(B, Hq, Hkv, Sq, Skv, D, causal, *window, q.device) > 1  # the split path
        with ek.use_backend("triton"):
            out, lse = flash_attention(q, k, v, causal=causal, window=window, softcap=softcap, return_lse=True)
    else:
        with torch.no_grad():
            out, lse = kernels.flash_attn_fwd(q, k, v, causal, 1 / math.sqrt(D), *window, softcap, splits=splits)
    x64, (out64, lse64), (same, lse_same) = assert_forward_matches_float64(out, lse, q, k, v, causal, window,
                                                                           softcap)
    if splits == "auto" and case == 0:  # autograd on the split path's outputs (backward unchanged)
        dout = torch.randn_like(out)
        with ek.use_backend("triton"):
            got = grads((out, lse), (dout, torch.ones_like(lse)), (q, k, v))
        want = grads((out64, lse64), (dout.double(), torch.ones_like(lse64)), x64)
        base = grads((same, lse_same), (dout, torch.ones_like(lse)), (q, k, v))
        for name, g, w, b_ in zip("qkv", got, want, base):
            assert_matches_float64(g, w, b_, Skv, what=f"d{name}")


def test_split_kv_merge_with_empty_splits_and_rows(poison_empty):
    """Splits that see no key (a narrow window: 7 splits of a few visible keys leave the last ones
    empty) and rows that see no key at all (Sq > Skv, causal) merge to the right out and lse."""
    needs_backend("triton")
    kernels = _kernels()
    for Sq, Skv, causal, window in [(3, 799, False, (2, 1)), (5, 2, True, (-1, -1))]:
        q, k, v = (t.detach() for t in make(1, 6, 2, Sq, Skv, 40, False))
        for splits in (3, 7):
            out, lse = kernels.flash_attn_fwd(q, k, v, causal, 1 / math.sqrt(40), *window, 0.0, splits=splits)
            assert_forward_matches_float64(out, lse, q, k, v, causal, window, 0.0)
    assert kernels.decode_splits(1, 6, 2, 3, 799, 40, False, 2, 1, q.device) == 1  # too few keys to split
    assert kernels.decode_splits(1, 6, 2, 17, 799, 40, False, -1, -1, q.device) == 1  # too many rows
    assert kernels.decode_splits(64, 6, 2, 1, 799, 40, False, -1, -1, q.device) == 1  # programs fill the GPU


class _RecordedKernel:
    """A Triton kernel whose launches (``kernel[grid](...)``) first append ``record(its name, grid,
    keyword arguments)`` to ``launches``."""

    def __init__(self, kernel, launches: list, record):
        self.kernel, self.launches, self.record = kernel, launches, record

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append(self.record(self.kernel.__name__, grid, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return run


@pytest.mark.parametrize("Hq,Hkv,switch,pack", [(6, 2, "1", True), (4, 1, "1", True), (4, 4, "1", False),
                                               (6, 2, "0", False)], ids=["gqa", "mqa", "mha", "gqa switched off"])
def test_decoding_takes_one_program_per_gqa_group(Hq, Hkv, switch, pack, monkeypatch, poison_empty):
    """With GQA, a decoding program takes a kv head and the rows of all its query heads (PACK_GQA),
    so K and V are read once per kv head: B * Hkv programs per row block, not B * Hq (unless
    EFFKERN_TRITON_PACK_GQA=0). Here with as many programs as two per (the interpreter's pretend)
    SM, so without a split: the kernel writes out and lse itself."""
    needs_backend("triton")
    kernels = _kernels()
    monkeypatch.setenv("EFFKERN_TRITON_PACK_GQA", switch)
    launches = []
    monkeypatch.setattr(kernels, "flash_attn_fwd_kernel", _RecordedKernel(
        kernels.flash_attn_fwd_kernel, launches, lambda name, grid, kwargs: (grid, kwargs["PACK_GQA"])))
    B, Sq, Skv, D = 4, 5, 150, 32
    q, k, v = (t.detach() for t in make(B, Hq, Hkv, Sq, Skv, D, False))
    assert kernels.decode_splits(B, Hq, Hkv, Sq, Skv, D, True, -1, -1, q.device) == 1
    out, lse = kernels.flash_attn_fwd(q, k, v, True, 1 / math.sqrt(D), -1, -1, 0.0)
    assert_forward_matches_float64(out, lse, q, k, v, True, (-1, -1), 0.0)
    rows = Sq * Hq // Hkv if pack else Sq
    assert launches == [((-(-rows // 16), B * (Hkv if pack else Hq), 1), pack)]


@pytest.mark.parametrize("Sq", [20, 3], ids=["forward", "decoding"])
def test_batch_x_heads_past_the_grid_limit_runs_in_batch_slices(Sq, monkeypatch):
    """CUDA caps a grid's second axis (batch x heads here) at 65535 programs: with the cap lowered
    to 5, a batch of 3 x 4 heads runs as 3 calls of one sequence, forward and backward, and gives
    each sequence's own results: the same bits as alone (the split-KV decoding path forced to
    the same 3 splits)."""
    needs_backend("triton")
    kernels = _kernels()
    q, k, v = (t.detach() for t in make(3, 4, 2, Sq, 40, 32, False))
    dout, dlse = torch.randn(3, 4, Sq, 32).half(), torch.randn(3, 4, Sq)
    args = (True, 1 / math.sqrt(32), 10, -1, 0.0)

    def both(q, k, v, dout, dlse):
        out, lse = kernels.flash_attn_fwd(q, k, v, *args, splits=3 if Sq <= 16 else None)
        return out, lse, *kernels.flash_attn_bwd(dout, dlse, q, k, v, out, lse, *args)

    alone = [both(q[i:i + 1], k[i:i + 1], v[i:i + 1], dout[i:i + 1], dlse[i:i + 1]) for i in range(3)]
    monkeypatch.setattr(kernels, "MAX_GRID_Y", 5)
    calls = record_calls(monkeypatch, kernels, "flash_attn_fwd", lambda args, _: args[0].shape[0])
    sliced = both(q, k, v, dout, dlse)
    assert calls == [1, 1, 1, 3]  # the three slices, then the whole call that made them
    for name, got, *want in zip(("out", "lse", "dq", "dk", "dv"), sliced, *alone):
        assert torch.equal(got, torch.cat(want)), name


# ---------------------------------------------------------------------------- GPU tiles, interpreted

ATTENTION_KERNELS = ("flash_attn_fwd_kernel", "flash_attn_decode_merge_kernel", "flash_attn_bwd_preprocess_kernel",
                     "flash_attn_bwd_dkdv_kernel", "flash_attn_bwd_dq_kernel")


@pytest.fixture
def gpu_tile_launches(monkeypatch):
    """The attention launchers run a GPU's tiles under the interpreter: launch()'s "interpreter"
    config becomes the block sizes of the "gpu" one (num_warps and num_stages mean nothing to the
    interpreter), and the launchers' own choices between the two (the decoding tiles, the backward
    preprocess's rows) take the GPU's. Returns each kernel launch while the test runs: (its name,
    BLOCK_M, BLOCK_N, TMA), None for those it does not take."""
    kernels = _kernels()
    real_fixed = kernels._fixed
    monkeypatch.setattr(kernels, "_fixed", lambda config, _: real_fixed(config, dict(config.kwargs)))
    monkeypatch.setattr(kernels, "interpreted", lambda: False)
    launches = []
    for name in ATTENTION_KERNELS:
        monkeypatch.setattr(kernels, name, _RecordedKernel(getattr(kernels, name), launches, lambda name, grid, kwargs: (
            name, *(kwargs.get(k) for k in ("BLOCK_M", "BLOCK_N", "TMA")))))
    return launches


def _distinct_tiles(configs: list) -> list:
    """configs less those whose block sizes an earlier one has: to the interpreter they are the same."""
    first = {}
    for config in configs:
        first.setdefault((config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]), config)
    return list(first.values())


# The most distinct tiles (_distinct_tiles) any kernel has in a head-dim class's tuned configs: run r
# takes each kernel's r-th (its last where it has fewer). The test fails if a kernel gets more.
GPU_TILE_RUNS = 3

# A head dim below its power-of-two block per head-dim class (96: d128, 200: d256), GQA, sizes no
# multiple of any tile and two tiles or more along each sequence at the largest (128):
# - causal with Sq < Skv, contiguous: unmasked key blocks (read by TMA in the forward and dQ) left
#   of the masked ones on the diagonal, and the Skv edge;
# - a window narrower than the tiles with Sq > Skv, [B, S, H, D] views (pointer loads): blocks
#   skipped on both sides of the band, and rows that see no key.
GPU_TILE_CASES = [
    ("gqa_140x270_d96_causal", 1, 4, 2, 140, 270, 96, True, (-1, -1), 0.0, False),
    ("gqa_260x230_d96_window_t", 1, 4, 2, 260, 230, 96, False, (60, 20), 0.0, True),
    ("gqa_140x270_d200_causal", 1, 4, 2, 140, 270, 200, True, (-1, -1), 0.0, False),
    ("gqa_260x230_d200_window_t", 1, 4, 2, 260, 230, 200, False, (60, 20), 0.0, True),
]


@pytest.mark.parametrize("run", range(GPU_TILE_RUNS))
@parametrize_by_name(GPU_TILE_CASES)
def test_every_gpu_tile_matches_float64(case, run, monkeypatch, gpu_tile_launches, poison_empty):
    """The forward, dK/dV and dQ kernels at every tile a GPU may run them at (each of their
    head-dim class's tuned configs forced as the fixed one, as in
    test_gpu_every_tuned_config_matches_float64), here through the interpreter: out, lse and the
    gradients against float64, as check_forward_lse_and_gradients checks CASES."""
    needs_backend("triton")
    kernels = _kernels()
    D, transposed = GPU_TILE_CASES[case][6], GPU_TILE_CASES[case][-1]
    d_class = kernels._d_class(D)
    tiles = []
    for table in (kernels.FWD_CONFIGS, kernels.DKDV_CONFIGS, kernels.DQ_CONFIGS):
        configs = _distinct_tiles(table[d_class])
        assert len(configs) <= GPU_TILE_RUNS, "a tile no run takes: raise GPU_TILE_RUNS"
        config = configs[min(run, len(configs) - 1)]
        monkeypatch.setitem(table, d_class, [config])
        tiles.append((config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]))
    check_forward_lse_and_gradients(GPU_TILE_CASES[case], "triton")
    fwd, dkdv, dq = tiles
    tma = not transposed
    assert gpu_tile_launches == [("flash_attn_fwd_kernel", *fwd, tma),
                                 ("flash_attn_bwd_preprocess_kernel", 64, None, None),  # a GPU's 64 rows
                                 ("flash_attn_bwd_dkdv_kernel", *dkdv, None),
                                 ("flash_attn_bwd_dq_kernel", *dq, tma)]


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous (TMA)", "[B, S, H, D] views"])
@pytest.mark.parametrize("Sq,block_m", [(3, 16), (7, 32), (16, 64)])
@pytest.mark.parametrize("D", [96, 200])
def test_split_kv_decoding_at_gpu_tiles_matches_float64(D, Sq, block_m, transposed, gpu_tile_launches, poison_empty):
    """The split-KV forward and its merge at a GPU's decoding tiles for D's head-dim class, GQA 8/2:
    Sq rows of 4 query heads packed into 12, 28 or 64 rows, a tile of 16, 32 or 64; causal with a
    window of 300 over 450 keys in 3 splits: the first and the last with masked and unmasked key
    blocks, the last ending in a partial one."""
    needs_backend("triton")
    kernels = _kernels()
    window = (300, -1)
    q, k, v = (t.detach() for t in make(1, 8, 2, Sq, 450, D, transposed))
    out, lse = kernels.flash_attn_fwd(q, k, v, True, 1 / math.sqrt(D), *window, 0.0, splits=3)
    assert_forward_matches_float64(out, lse, q, k, v, True, window, 0.0)
    tile = kernels._decode_config_gpu(D, Sq * 4)
    assert tile["BLOCK_M"] == block_m
    assert gpu_tile_launches == [("flash_attn_fwd_kernel", block_m, tile["BLOCK_N"], not transposed),
                                 ("flash_attn_decode_merge_kernel", kernels.MERGE_BLOCK_M, None, None)]


# ---------------------------------------------------------------------------- SDPA drop-in

SDPA_CASES = [
    # (name, B, Hq, Hkv, Sq, Skv, D, is_causal, scale, enable_gqa)
    ("causal_square", 1, 2, 2, 19, 19, 32, True, None, False),
    ("causal_sq_lt_skv", 1, 2, 2, 7, 37, 40, True, None, False),
    ("causal_sq_gt_skv", 1, 2, 2, 37, 9, 32, True, None, False),
    ("gqa_causal_scale", 2, 6, 2, 11, 30, 24, True, 0.2, True),
    ("mqa_noncausal", 1, 4, 1, 21, 13, 64, False, 0.5, True),
]


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "bshd_views"])
@pytest.mark.parametrize("backend", BACKENDS)
@parametrize_by_name(SDPA_CASES)
def test_sdpa_matches_torch(backend, case, transposed):
    needs_backend(backend)
    _, B, Hq, Hkv, Sq, Skv, D, is_causal, scale, gqa = SDPA_CASES[case]
    dtype = torch.float16 if backend == "triton" else torch.float64
    q, k, v = make(B, Hq, Hkv, Sq, Skv, D, transposed, dtype)
    with ek.use_backend(backend):
        assert _sdpa_fast_path(q, k, v, None, 0.0, scale, gqa)  # effkern's op, not torch's SDPA
        out = scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa)
        dq, dk, dv = grads(out, torch.ones_like(out), (q, k, v))
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = F.scaled_dot_product_attention(*x64, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    want = grads(exact, torch.ones_like(exact), x64)
    if dtype == torch.float64:
        torch.testing.assert_close(out, exact)
        for g, w in zip((dq, dk, dv), want):
            torch.testing.assert_close(g, w)
    else:
        same = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa)
        assert_matches_float64(out, exact, same, Skv)
        for g, w, b in zip((dq, dk, dv), want, grads(same, torch.ones_like(same), (q, k, v))):
            assert_matches_float64(g, w, b, Sq * Skv)


@pytest.mark.parametrize("is_causal,D", [(False, 32), (True, 32), (True, 40), (False, 59), (True, 111)])
def test_sdpa_passes_transposed_views_to_the_kernels_without_a_copy(is_causal, D, monkeypatch):
    """q, k, v as [B, S, H, D]-transposed views (Sq < Skv; causal slices k and v, itself a view):
    the forward and backward launchers get their storage and strides as they are, no copy; a head
    dim below its tile's power of two is padded inside the kernels, not by a padded copy."""
    needs_backend("triton")
    kernels = _kernels()
    q, k, v = make(1, 4, 2, 9, 23, D, True)
    keys = 9 if is_causal else 23  # causal: keys past Sq are seen by no query (top-left alignment)
    expected = [(t.data_ptr(), t[:, :, :n].shape, t.stride()) for t, n in ((q, 9), (k, keys), (v, keys))]

    def layouts(tensors):
        return [(t.data_ptr(), t.shape, t.stride()) for t in tensors]

    fwd = record_calls(monkeypatch, kernels, "flash_attn_fwd", lambda args, _: layouts(args[:3]))
    bwd = record_calls(monkeypatch, kernels, "flash_attn_bwd", lambda args, _: layouts(args[2:5]))
    with ek.use_backend("triton"):
        assert _sdpa_fast_path(q, k, v, None, 0.0, None, True)
        scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True).sum().backward()
    assert fwd == [expected] and bwd == [expected]
    assert q.stride()[1] == D and q.stride()[2] == 4 * D  # really [B, S, H, D] underneath


def test_only_operands_whose_offsets_could_pass_32_bits_are_copied():
    """The kernels' offsets along S and D are 32-bit: a [B, S, H, D] view with S H D = 2^31 (on the
    meta device: no memory) is copied into the contiguous layout, where they stay small; a view
    of a usual size is not."""
    needs_backend("triton")
    kernels = _kernels()
    huge = torch.empty(1, 2**17, 128, 128, device="meta").transpose(1, 2)
    assert kernels.with_32bit_offsets(huge).is_contiguous()
    usual = torch.empty(2, 4096, 32, 128, device="meta").transpose(1, 2)
    assert kernels.with_32bit_offsets(usual) is usual


def test_copies_for_32_bit_offsets_keep_the_results(monkeypatch):
    """With the 2^31 limit lowered to 64 elements, the forward and backward launchers copy the
    [B, S, H, D] views they get (q, k, v; dout, out) and give the same bits as without copies."""
    needs_backend("triton")
    kernels = _kernels()
    from effkern.kernels import _launch

    q, k, v = (t.detach() for t in make(1, 4, 2, 9, 23, 32, True))
    dout = torch.randn(1, 9, 4, 32).half().transpose(1, 2)
    args = (True, 0.125, -1, -1, 0.0)
    out, lse = kernels.flash_attn_fwd(q, k, v, *args)
    want = [out, lse, *kernels.flash_attn_bwd(dout, None, q, k, v, out, lse, *args)]
    monkeypatch.setattr(_launch, "MAX_32BIT_OFFSET", 64)
    copied = record_calls(monkeypatch, kernels, "with_32bit_offsets", lambda call, result: result is not call[0])
    out, lse = kernels.flash_attn_fwd(q, k, v, *args)
    got = [out, lse, *kernels.flash_attn_bwd(dout, None, q, k, v, out, lse, *args)]
    assert copied == [True] * 3 + [True, True, True, True, False]  # out is already contiguous
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_sdpa_bool_scale_is_torchs():
    """torch's SDPA takes scale=True as 1.0 (and False as 0.0); a bool goes to torch's own SDPA."""
    q, k, v = (t.detach() for t in make(1, 2, 2, 5, 9, 16, False, torch.float32))
    for backend in ("reference", "auto"):
        with ek.use_backend(backend):
            for flag in (True, False):
                assert not _sdpa_fast_path(q, k, v, None, 0.0, flag, False)
                # bit for bit, NaN included: torch's CPU SDPA gives NaN for scale 0 with is_causal
                torch.testing.assert_close(scaled_dot_product_attention(q, k, v, scale=flag, is_causal=True),
                                           F.scaled_dot_product_attention(q, k, v, scale=flag, is_causal=True),
                                           rtol=0, atol=0, equal_nan=True)
    with ek.use_backend("reference"):  # the number True stands for, on effkern's path
        torch.testing.assert_close(scaled_dot_product_attention(q, k, v, scale=1.0),
                                   F.scaled_dot_product_attention(q, k, v, scale=True))


def test_sdpa_falls_back_to_torch():
    q, k, v = (t.detach() for t in make(2, 2, 2, 9, 12, 16, False, torch.float32))
    mask = torch.rand(9, 12) > 0.3
    for backend in ("reference", "auto"):
        with ek.use_backend(backend):
            assert torch.equal(scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
            torch.manual_seed(1)
            got = scaled_dot_product_attention(q, k, v, dropout_p=0.5)
            torch.manual_seed(1)
            assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, dropout_p=0.5))
            # 3-D inputs, fewer kv heads without enable_gqa (torch broadcasts): torch's own semantics
            assert torch.equal(scaled_dot_product_attention(q[0], k[0], v[0], is_causal=True),
                               F.scaled_dot_product_attention(q[0], k[0], v[0], is_causal=True))
            assert torch.equal(scaled_dot_product_attention(q, k[:, :1], v[:, :1]),
                               F.scaled_dot_product_attention(q, k[:, :1], v[:, :1]))
    with ek.use_backend("auto"):  # auto on CPU is torch's SDPA, bit for bit
        assert torch.equal(scaled_dot_product_attention(q, k, v, is_causal=True),
                           F.scaled_dot_product_attention(q, k, v, is_causal=True))
    if backend_available("triton", "cpu")[0]:  # bf16, which the interpreter cannot multiply: torch's
        qb, kb, vb = (t.bfloat16() for t in (q, k, v))
        with ek.use_backend("triton"):
            assert torch.equal(scaled_dot_product_attention(qb, kb, vb, is_causal=True),
                               F.scaled_dot_product_attention(qb, kb, vb, is_causal=True))


# ---------------------------------------------------------------------------- registration

def sample_inputs(dtype):
    torch.manual_seed(0)
    for B, Hq, Hkv, Sq, Skv, D, causal, window, softcap, t in [
        (1, 2, 2, 5, 9, 16, True, (-1, -1), 0.0, False),
        (2, 4, 2, 7, 3, 24, False, (2, 1), 1.5, True),
    ]:
        q, k, v = make(B, Hq, Hkv, Sq, Skv, D, t, dtype)
        args = (causal, 0.3, *window, softcap)
        yield torch.ops.effkern.flash_attention_fwd.default, (q, k, v, *args)
        out, lse = flash_attention_reference(q.detach(), k.detach(), v.detach(), causal, 0.3, window, softcap)
        yield torch.ops.effkern.flash_attention_bwd.default, (
            torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(), out, lse, *args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    assert_opcheck_passes(backend, sample_inputs(torch.float16 if backend == "triton" else torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_dynamic(backend):
    """One graph for two sequence lengths (no recompile), forward and backward equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    needs_backend(backend)
    torch._dynamo.reset()
    dtype = torch.float16 if backend == "triton" else torch.float32

    def step(q, k, v):
        return flash_attention(q, k, v, causal=True, window=(9, -1)).float().square().mean()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    with ek.use_backend(backend):
        for Sq, Skv in ((5, 17), (11, 29)):
            q, k, v = make(1, 4, 2, Sq, Skv, 16, True, dtype)
            loss = compiled(q, k, v)
            got = grads(loss, None, (q, k, v))
            expected = step(q, k, v)
            torch.testing.assert_close(loss, expected)
            for g, w in zip(got, grads(expected, None, (q, k, v))):
                torch.testing.assert_close(g, w)
            if Sq == 5:
                frames_after_first_length = counter.frame_count
    assert counter.frame_count == frames_after_first_length > 0  # the second length reused the first graph


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_dynamic_windows_from_shapes(backend):
    """Windows that are symbolic under dynamic shapes compile without a graph break: SDPA's causal
    mask with more queries than keys (window (-1, Sq - Skv)) and a window computed from Skv."""
    needs_backend(backend)
    torch._dynamo.reset()
    dtype = torch.float16 if backend == "triton" else torch.float32
    calls = {"sdpa": lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
             "window": lambda q, k, v: flash_attention(q, k, v, window=(k.shape[2] // 2, 0))}
    with ek.use_backend(backend):
        for name, call in calls.items():
            compiled = torch.compile(call, backend="aot_eager", fullgraph=True, dynamic=True)
            for Sq, Skv in ((9, 5), (13, 7)):
                q, k, v = (t.detach() for t in make(1, 4, 2, Sq, Skv, 16, False, dtype))
                torch.testing.assert_close(compiled(q, k, v), call(q, k, v), msg=lambda m: f"{name}: {m}")


def test_torch_compile_inductor_reference():
    torch._dynamo.reset()
    q, k, v = (t.detach() for t in make(1, 2, 1, 6, 10, 16, False, torch.float32))
    compiled = torch.compile(lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                             fullgraph=True)
    with ek.use_backend("reference"):
        torch.testing.assert_close(compiled(q, k, v),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def test_autocast_runs_in_the_autocast_dtype():
    q, k, v = (t.detach() for t in make(1, 2, 2, 5, 7, 16, False, torch.float32))
    with ek.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = flash_attention(q, k, v)
    assert out.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- errors

def _bad_cases():
    q, k, v = (t.detach() for t in make(1, 4, 2, 5, 7, 16, False, torch.float16))
    big = torch.randn(1, 1, 3, 264, dtype=torch.float16)
    return [
        ("head_dim_over_256", (big, big, big), ValueError, r"head dim D must be in 1..256, got 264"),
        ("heads_not_a_multiple", (q, k[:, :1].expand(1, 3, 7, 16), v[:, :1].expand(1, 3, 7, 16)), ValueError,
         r"Hq=4 must be a multiple of .* Hkv=3"),
        ("dtype_mismatch", (q, k.float(), v), TypeError, r"k has dtype torch.float32 but q has torch.float16"),
        ("v_dtype_mismatch", (q, k, v.float()), TypeError, r"v has dtype torch.float32 but q has torch.float16"),
        ("int_dtype", (q.to(torch.int32), k, v), TypeError, r"q must be float16, bfloat16, float32 or float64"),
        ("rank_3", (q[0], k, v), ValueError, r"q must be 4-D \[B, H, S, D\], got shape \(4, 5, 16\)"),
        ("k_v_shapes", (q, k, v[:, :, :3]), ValueError, r"k and v must have the same shape"),
        ("head_dim_mismatch", (q, k[..., :8], v[..., :8]), ValueError, r"must be \[B=1, Hkv, Skv, D=16\]"),
        ("window_below_minus_one", (q, k, v, False, None, (-2, 0)), ValueError, r"window values must be >= 0, or -1"),
        ("window_not_a_pair", (q, k, v, False, None, (3,)), TypeError, r"window must be a pair of ints"),
        ("negative_softcap", (q, k, v, False, None, (-1, -1), -1.0), ValueError,
         r"softcap must be a finite number >= 0"),
        ("infinite_softcap", (q, k, v, False, None, (-1, -1), math.inf), ValueError,
         r"softcap must be a finite number >= 0"),  # inf * tanh(s / inf) would be NaN
        ("not_a_tensor", ([1.0], k, v), TypeError, r"q must be a torch.Tensor, got list"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@parametrize_by_name(_bad_cases())
def test_bad_inputs_raise_clear_errors(backend, case):
    assert_bad_call_raises(backend, flash_attention, _bad_cases()[case])


def _bad_backward_cases():
    """Calls of the backward op itself (as torch.ops.effkern.flash_attention_bwd) with tensors that
    do not belong to its q, k, v: the kernels would read past them."""
    q, k, v = (t.detach() for t in make(1, 4, 2, 5, 7, 16, False, torch.float16))
    out, lse = torch.randn_like(q), torch.randn(1, 4, 5)
    args = dict(grad_out=out, grad_lse=None, q=q, k=k, v=v, out=out, lse=lse)
    return [(name, {**args, **changed}, exc, message) for name, changed, exc, message in [
        ("grad_out_shape", dict(grad_out=out[:, :, :3]), ValueError, r"grad_out must have shape \[1, 4, 5, 16\]"),
        ("out_dtype", dict(out=out.float()), TypeError, r"out must be torch.float16, got torch.float32"),
        ("lse_length", dict(lse=lse[..., :2]), ValueError, r"lse must have shape \[1, 4, 5\]"),
        ("lse_dtype", dict(lse=lse.half()), TypeError, r"lse must be torch.float32, got torch.float16"),
        ("grad_lse_shape", dict(grad_lse=lse[:, :2]), ValueError, r"grad_lse must have shape \[1, 4, 5\]"),
        ("grad_lse_int", dict(grad_lse=lse.int()), TypeError, r"grad_lse must be a float tensor"),
        ("k_v_keys", dict(v=torch.randn(1, 2, 50, 16).half()), ValueError, r"k and v must have the same shape"),
    ]]


@pytest.mark.parametrize("backend", BACKENDS)
@parametrize_by_name(_bad_backward_cases())
def test_bad_backward_inputs_raise_clear_errors(backend, case):
    _, args, exc, message = _bad_backward_cases()[case]
    with ek.use_backend(backend), pytest.raises(exc, match=message):
        torch.ops.effkern.flash_attention_bwd(*args.values(), False, 0.25, -1, -1, 0.0)


def test_backend_errors():
    q, k, v = (t.detach() for t in make(1, 2, 2, 3, 4, 16, False, torch.float32))
    with ek.use_backend("cuda"), pytest.raises(RuntimeError, match="no C\\+\\+ attention kernels"):
        flash_attention(q, k, v)
    needs_backend("triton")
    with ek.use_backend("triton"), pytest.raises(TypeError, match="triton backend takes float16 or bfloat16"):
        flash_attention(q, k, v)


def test_family_is_reported():
    assert "attention" in ek.info(print_report=False)["auto"]


# ---------------------------------------------------------------------------- GPU

GPU_CASES = [
    ("gqa_1x4099_d128_causal", 2, 8, 2, 1, 4099, 128, True, (-1, -1), 0.0, False),
    ("mha_517x1031_d256_causal_t", 1, 4, 4, 517, 1031, 256, True, (-1, -1), 0.0, True),
    ("mqa_1000x1000_d160_window_softcap", 1, 4, 1, 1000, 1000, 160, False, (128, 0), 30.0, False),
    ("mha_777x513_d96", 2, 4, 4, 777, 513, 96, False, (-1, -1), 0.0, True),
    ("gqa_128x217_d224_causal", 1, 6, 2, 128, 217, 224, True, (-1, -1), 0.0, False),
    ("gqa_300x700_d64_causal", 2, 6, 2, 300, 700, 64, True, (-1, -1), 0.0, False),
    ("mha_257x513_d40_window_t", 1, 4, 4, 257, 513, 40, False, (100, 30), 0.0, True),
    ("mqa_129x1025_d59_causal_softcap", 1, 4, 1, 129, 1025, 59, True, (-1, -1), 20.0, False),
    # the narrowest head tiles (BLOCK_D 32 and 16)
    ("gqa_333x259_d32_causal", 2, 4, 2, 333, 259, 32, True, (-1, -1), 0.0, False),
    ("mha_200x519_d16_window_t", 1, 4, 4, 200, 519, 16, False, (64, 16), 0.0, True),
]


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@parametrize_by_name(GPU_CASES)
def test_gpu_forward_lse_and_gradients_match_float64(case, dtype):
    """out, lse and the gradients from a loss on out and lse (the backward's dlse term)."""
    needs_backend("triton", "cuda")
    check_forward_lse_and_gradients(GPU_CASES[case], "triton", dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous (TMA)", "[B, S, H, D] views"])
@pytest.mark.parametrize("D,index", [(D, i) for D in (128, 160) for i in range(4)])
def test_gpu_every_tuned_config_matches_float64(D, index, transposed, monkeypatch, tma_launches):
    """Each tile config the autotuner may pick (forward, dK/dV, dQ), run as the fixed config, on a
    causal GQA case whose sizes are no multiple of any tile; contiguous inputs take the forward's
    and dQ's TMA loads on Hopper, the transposed views their pointer loads."""
    needs_backend("triton", "cuda")
    kernels = _kernels()
    monkeypatch.setenv("EFFKERN_TRITON_AUTOTUNE", "0")  # the tables below reach the fixed-config launch only
    d_class = kernels._d_class(D)
    for table in (kernels.FWD_CONFIGS, kernels.DKDV_CONFIGS, kernels.DQ_CONFIGS):
        monkeypatch.setitem(table, d_class, [table[d_class][index]])
    B, Hq, Hkv, Sq, Skv = 2, 6, 2, 333, 517
    q, k, v = make(B, Hq, Hkv, Sq, Skv, D, transposed, torch.bfloat16, "cuda")
    with ek.use_backend("triton"):
        out = flash_attention(q, k, v, causal=True)
        dout = torch.randn_like(out)
        got = grads(out, dout, (q, k, v))
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, _ = attention_in(torch.float64, *x64, True, (-1, -1), 0.0)
    same, _ = attention_in(torch.bfloat16, q, k, v, True, (-1, -1), 0.0)
    assert_matches_float64(out, out64, same, Skv, what="out")
    for name, g, w, b in zip("qkv", got, grads(out64, dout.double(), x64), grads(same, dout, (q, k, v))):
        assert_matches_float64(g, w, b, Sq * Skv, what=f"d{name}")
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    assert tma_launches == [hopper and not transposed] * 2  # forward, dQ


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("Sq,window,softcap", [(1, (-1, -1), 0.0), (4, (3000, -1), 30.0)],
                         ids=["causal", "causal_window_softcap"])
def test_gpu_split_kv_decoding_matches_float64(Sq, window, softcap):
    """Query rows over 32768 keys, GQA 32/8, D = 128, bf16, causal (and a window of 3000 keys
    with a softcap): the split-KV path."""
    needs_backend("triton", "cuda")
    B, Hq, Hkv, Skv, D = 1, 32, 8, 32768, 128
    assert _kernels().decode_splits(B, Hq, Hkv, Sq, Skv, D, True, *window, torch.device("cuda")) > 1
    q, k, v = (t.detach() for t in make(B, Hq, Hkv, Sq, Skv, D, False, torch.bfloat16, "cuda"))
    with ek.use_backend("triton"):
        out, lse = flash_attention(q, k, v, causal=True, window=window, softcap=softcap, return_lse=True)
    out64, lse64 = attention_in(torch.float64, q, k, v, True, window, softcap)
    same, lse_same = attention_in(torch.bfloat16, q, k, v, True, window, softcap)
    assert_matches_float64(out, out64, same, Skv, what="out")
    assert_matches_float64(lse, lse64, lse_same.float(), Skv, what="lse")  # every row sees keys: all finite


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("Sq", [1, 16])
def test_gpu_batched_decoding_matches_float64(Sq):
    """64 sequences, GQA 32/8, D = 128, bf16, causal over 1024 keys: the packed programs fill the
    GPU without a split (the kernel writes out and lse itself); at Sq = 16 a group's 128 packed
    rows span 8 row blocks."""
    needs_backend("triton", "cuda")
    B, Hq, Hkv, Skv, D = 64, 32, 8, 1024, 128
    assert _kernels().decode_splits(B, Hq, Hkv, Sq, Skv, D, True, -1, -1, torch.device("cuda")) == 1
    q, k, v = (t.detach() for t in make(B, Hq, Hkv, Sq, Skv, D, False, torch.bfloat16, "cuda"))
    with ek.use_backend("triton"):
        out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    assert_forward_matches_float64(out, lse, q, k, v, True, (-1, -1), 0.0)


@pytest.mark.smoke
@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    needs_backend("triton", "cuda")
    assert_backward_is_deterministic(2, 8, 2, 1000, 1000, 128, torch.bfloat16, "cuda")


# (name, B, Hq, Hkv, Sq, Skv, D, is_causal, scale, enable_gqa, transposed)
GPU_SDPA_CASES = [
    ("causal_sq_lt_skv", 2, 8, 8, 300, 1000, 128, True, None, False, False),
    ("causal_sq_gt_skv_t", 1, 8, 8, 700, 200, 64, True, None, False, True),
    ("gqa_causal_scale", 2, 16, 4, 513, 513, 128, True, 0.1, True, False),
]


@pytest.mark.smoke
@pytest.mark.gpu
@parametrize_by_name(GPU_SDPA_CASES)
def test_gpu_sdpa_takes_the_kernels_and_matches_torch(case, monkeypatch):
    """On CUDA the auto backend runs effkern's kernels for an SDPA call (forward and backward),
    within the float64 rule of torch's own SDPA."""
    needs_backend("triton", "cuda")
    kernels = _kernels()
    _, B, Hq, Hkv, Sq, Skv, D, is_causal, scale, gqa, transposed = GPU_SDPA_CASES[case]
    q, k, v = make(B, Hq, Hkv, Sq, Skv, D, transposed, torch.bfloat16, "cuda")
    fwd = record_calls(monkeypatch, kernels, "flash_attn_fwd", lambda *_: True)
    bwd = record_calls(monkeypatch, kernels, "flash_attn_bwd", lambda *_: True)
    with ek.use_backend("auto"):
        assert _sdpa_fast_path(q, k, v, None, 0.0, scale, gqa)
        out = scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa)
        dout = torch.randn_like(out)
        got = grads(out, dout, (q, k, v))
    assert fwd == [True] and bwd == [True]  # effkern's kernels, not torch's SDPA
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = F.scaled_dot_product_attention(*x64, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    same = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    assert_matches_float64(out, exact, same, Skv, what="out")
    for name, g, w, b in zip("qkv", got, grads(exact, dout.double(), x64), grads(same, dout, (q, k, v))):
        assert_matches_float64(g, w, b, Sq * Skv, what=f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Skv,causal", [(2, 6, 2, 200, 200, True),  # forward and backward
                                                    (2, 32, 8, 1, 8192, False)])  # split-KV decoding
def test_gpu_cuda_graph_replays_like_eager(B, Hq, Hkv, Sq, Skv, causal):
    def inputs(seed):
        torch.manual_seed(seed)
        return make(B, Hq, Hkv, Sq, Skv, 128, False, torch.bfloat16, "cuda")

    assert_cuda_graph_replays_like_eager("triton", lambda q, k, v: flash_attention(q, k, v, causal=causal), inputs)


# ---------------------------------------------------------------------------- GPU code, compiled here

def _launch_request(kernel, constexprs: dict) -> dict:
    """compile_for_gpu's types, constexprs and divisible for a kernel of kernels/attention.py as a
    launch on contiguous (or [B, S, H, D]-transposed), aligned bf16 tensors specializes it:
    head-dim strides 1, every other stride, D and the pointers multiples of 16."""
    types = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            continue
        if arg.endswith("_desc"):  # K/V descriptors with TMA (forward, dQ), else unused tensors
            tile = f"{constexprs['BLOCK_N']},{constexprs['BLOCK_D']}"
            types[arg] = f"tensordesc<bf16[{tile}]>" if constexprs["TMA"] else "*bf16"
        elif arg.endswith("_ptr"):
            types[arg] = "*fp32" if arg in ("lse_ptr", "dlse_ptr", "delta_ptr", "part_ptr", "part_lse_ptr") else "*bf16"
        elif arg in ("qk_scale", "softcap"):
            types[arg] = "fp32"
        else:
            types[arg] = "i32"
    launch = aligned_launch(types, unit_strides=[a for a in types if a.startswith("stride_") and a.endswith("d")],
                            any_value=[a for a, t in types.items() if t == "i32" and not a.startswith("stride_")
                                       and a != "D"])
    launch["divisible"] = [a for a in launch["divisible"] if not types[a].startswith("tensordesc")]
    return dict(launch, constexprs=dict(constexprs, **launch["constexprs"]))


TMA_KERNELS = ("flash_attn_fwd_kernel", "flash_attn_bwd_dq_kernel")  # K/V by TMA on Hopper

# Register spill stores per kernel that every config stays within (ptxas -v, sm_90a: at most 20
# bytes with Triton 3.8; 72 with Triton 3.6, the GPU machines', at dK/dV config 3 of d128;
# candidates left out spilled hundreds to thousands)
SPILL_LIMIT = 80


@pytest.mark.parametrize("cc", [80, 90])
def test_kernels_compile_for_gpus_onto_tensor_cores(compile_for_gpu, cc):
    """Each kernel at every config it may run with on a GPU (the autotuned sets of both head-dim
    classes, the decoding tiles with and without GQA packing; the merge and backward-preprocess
    kernels; the first config of each at the narrow head tiles, D 16 and 32), compiled here without
    a GPU: bf16 mma instructions in the PTX, no atomic (atom/red: the backward is deterministic,
    which the interpreter, running programs one by one, cannot show), shared memory within the
    card's limit, and on sm_90 at most SPILL_LIMIT bytes of register spills (the configs were
    chosen for that)."""
    needs_backend("triton")
    from effkern.kernels import attention as kernels
    from op_checks import SHARED_LIMIT

    requests = {}

    def add(name, D, label, config: dict, num_warps, num_stages, pack_gqa=False):
        # as a launch on that GPU runs them: TMA on Hopper; the forward with GQA groups packed or not
        tma = {"TMA": cc == 90} if name in TMA_KERNELS else {}
        pack = {"PACK_GQA": pack_gqa} if name == "flash_attn_fwd_kernel" else {}
        requests[f"{name}_{label}_d{D}"] = dict(
            kernel=f"effkern.kernels.attention:{name}", cc=cc, num_warps=num_warps, num_stages=num_stages,
            spills=cc == 90, **_launch_request(getattr(kernels, name), dict(
                config, SOFTCAP=False, BLOCK_D=kernels._block_d(D), EVEN_D=True, **tma, **pack)))

    for D, d_class in ((16, "d128"), (32, "d128"), (64, "d128"), (128, "d128"), (256, "d256")):
        for name, configs in (("flash_attn_fwd_kernel", kernels.FWD_CONFIGS), ("flash_attn_bwd_dkdv_kernel",
                              kernels.DKDV_CONFIGS), ("flash_attn_bwd_dq_kernel", kernels.DQ_CONFIGS)):
            for i, c in enumerate(configs[d_class][:1] if D < 128 else configs[d_class]):
                add(name, D, f"config{i}", c.kwargs, c.num_warps, c.num_stages)
        # the decoding tiles: 16 rows per head (Sq <= 16), and 16, 32 or 64 packed rows per GQA group
        for rows, pack_gqa in ((16, False), (16, True), (32, True), (64, True)):
            decode = dict(kernels._decode_config_gpu(D, rows))
            warps, stages = decode.pop("num_warps"), decode.pop("num_stages")
            add("flash_attn_fwd_kernel", D, f"decode{'_packed' if pack_gqa else ''}{rows}", decode, warps, stages,
                pack_gqa)
        requests[f"merge_d{D}"] = dict(
            kernel="effkern.kernels.attention:flash_attn_decode_merge_kernel", cc=cc, num_warps=4, num_stages=1,
            **_launch_request(kernels.flash_attn_decode_merge_kernel,
                              dict(BLOCK_M=kernels.MERGE_BLOCK_M, BLOCK_D=kernels._block_d(D))))
        requests[f"preprocess_d{D}"] = dict(
            kernel="effkern.kernels.attention:flash_attn_bwd_preprocess_kernel", cc=cc, num_warps=4, num_stages=3,
            **_launch_request(kernels.flash_attn_bwd_preprocess_kernel,
                              dict(HAS_DLSE=True, BLOCK_M=64, BLOCK_D=kernels._block_d(D))))
    for name, compiled in compile_for_gpu(requests).items():
        elementwise = name.startswith(("merge", "preprocess"))
        assert elementwise or ("mma" in compiled["ptx"] and "bf16" in compiled["ptx"]), name
        assert not re.search(r"(?<![\w.])(atom|red)\.", compiled["ptx"]), f"{name}: an atomic in the PTX"
        tma = cc == 90 and name.startswith(TMA_KERNELS)
        assert tma == ("cp.async.bulk.tensor" in compiled["ptx"]), f"{name}: TMA copies {'missing' if tma else 'seen'}"
        assert compiled["shared"] <= SHARED_LIMIT[cc], f"{name}: {compiled['shared']} bytes of shared memory"
        assert compiled.get("spill_bytes", 0) <= SPILL_LIMIT, f"{name}: {compiled['spill_bytes']} bytes of spills"


def test_flash_attention_defaults():
    """The issue's signature: causal=False, scale=None (1/sqrt(D)), window=(-1, -1), softcap=0.0,
    return_lse=False; the defaults computed, against torch's SDPA (full attention, GQA)."""
    import inspect

    params = inspect.signature(flash_attention).parameters
    assert list(params) == ["q", "k", "v", "causal", "scale", "window", "softcap", "return_lse"]
    assert [p.default for p in list(params.values())[3:]] == [False, None, (-1, -1), 0.0, False]
    q, k, v = (t.detach() for t in make(1, 4, 2, 5, 9, 16, False, torch.float64))
    with ek.use_backend("reference"):
        out = flash_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def test_public_names():
    assert ek.flash_attention is flash_attention
    assert ek.scaled_dot_product_attention is scaled_dot_product_attention
    assert {"flash_attention", "scaled_dot_product_attention"} <= set(ek.__all__)


def test_sdpa_calls_effkern_does_not_take_are_torchs():
    """A value head dim other than the keys' (torch's SDPA takes it, effkern's op does not), the
    cuda backend (no attention kernels) and auto on CPU float16: torch's own SDPA, bit for bit."""
    q, k, v = (t.detach() for t in make(1, 2, 2, 5, 9, 16, False, torch.float32))
    for backend, args in [("reference", (q, k, v[..., :8])), ("auto", (q, k, v[..., :8])), ("cuda", (q, k, v)),
                          ("auto", (q.half(), k.half(), v.half()))]:
        with ek.use_backend(backend):
            assert not _sdpa_fast_path(*args, None, 0.0, None, False), backend
            assert torch.equal(scaled_dot_product_attention(*args, is_causal=True),
                               F.scaled_dot_product_attention(*args, is_causal=True))


@pytest.mark.parametrize("wanted", ["q", "k", "v", "qk", "kv", "qv"])
def test_gradients_of_only_the_inputs_that_require_them(wanted):
    """Each input that requires grad gets its own gradient, whichever of the others do not."""
    x = [t.detach() for t in make(1, 4, 2, 5, 9, 16, False, torch.float64)]
    dout = torch.randn(1, 4, 5, 16, dtype=torch.float64)
    with ek.use_backend("reference"):
        full = [t.clone().requires_grad_() for t in x]
        flash_attention(*full, causal=True).backward(dout)
        some = [t.clone().requires_grad_(name in wanted) for name, t in zip("qkv", x)]
        flash_attention(*some, causal=True).backward(dout)
    for name, t, f in zip("qkv", some, full):
        if name in wanted:
            torch.testing.assert_close(t.grad, f.grad, msg=f"d{name}")
        else:
            assert t.grad is None


def test_auto_on_cpu_is_the_reference():
    """auto: triton on CUDA for float16/bfloat16, the reference otherwise (CPU float16 included)."""
    from effkern.attention import choose_backend

    with ek.use_backend("auto"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            assert choose_backend("flash_attention", torch.device("cpu"), dtype) == "reference", dtype
