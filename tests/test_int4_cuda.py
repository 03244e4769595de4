"""The CUDA W4A16 kernel (csrc/cuda/int4.cu) and its pre-shuffled weight (effkern/int4_cuda_layout.py).

CPU: the shuffle's round trip is bit-exact; the emulation of how the kernel reads the shuffled
tensor (stage, warp, lane, 16-byte load, word, nibble -> mma B-fragment register half -> (k, n)
by the PTX ISA) rebuilds q bit for bit, and fails for deliberately wrong layouts; the emulated
exponent-trick dequantization equals (q - z) * s rounded once; a thread-level model of the whole
kernel (tests/int4_kernel_model.py: pipeline, shared memory, ldmatrix / mma by the PTX rules,
epilogue, split-K) computes x @ W^T + bias bit for bit on exact inputs, and fails deliberately wrong
kernels; the C++ op is registered and its argument checks raise clear errors. GPU (``-m gpu``): the
kernel against a float64 reference.

Inputs come from the small quantizer below (random q, integer zeros, positive scales, packed by
hand in effkern's layout), independent of effkern.int4.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

import effkern as ek
from effkern import int4_cuda_layout as L

import int4_kernel_model as model
from cuda_kernel_checks import (DTYPES, assert_bit_equal, assert_kernel_matches_float64, assert_op_raises,
                                assert_rejects_tensors_on_another_device, bits, cpp_checks_accept, misaligned,
                                needs_cuda_kernels, op_schema, random_input_and_bias)

GROUPS = (32, 64, 128, 256, -1)
# (N, K, group_size): every group size, one and several blocks of 64 columns, K from one
# pipeline stage (128) up; 256 needs K % 256 == 0.
LAYOUT_CASES = [(64, 128, 32), (64, 128, -1), (128, 256, 64), (192, 512, 128), (64, 512, 256),
                (128, 384, -1), (256, 1024, 32), (64, 768, 256)]


# ---------------------------------------------------------------------------- test inputs

def pack_effkern(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in [0, 15] -> int32 [N, K / 8]: nibble j of word w is q[n, 8 w + j]."""
    N, K = q.shape
    words = torch.zeros(N, K // 8, dtype=torch.int64)
    for j in range(8):
        words |= q[:, j::8].to(torch.int64) << (4 * j)
    words[words >= 2**31] -= 2**32  # bit 31 is int32's sign bit
    return words.to(torch.int32)


def make_int4(N, K, group_size, dtype, seed=0):
    """(q int64 [N, K], qweight, scales, zeros) in effkern's layout, scales/zeros in ``dtype``."""
    G = K if group_size == -1 else group_size
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=g)
    zeros = torch.randint(0, 16, (N, K // G), generator=g).to(dtype)
    scales = ((torch.rand(N, K // G, generator=g) + 0.25) / 16).to(dtype)
    return q, pack_effkern(q), scales, zeros


def dequantized(q, scales, zeros, group_size):
    """W = (q - z) * s, computed in float64 (exact) and rounded once to the scales' dtype."""
    K = q.shape[1]
    G = K if group_size == -1 else group_size
    s = scales.double().repeat_interleave(G, dim=1)
    z = zeros.double().repeat_interleave(G, dim=1)
    return ((q.double() - z) * s).to(scales.dtype)


# ---------------------------------------------------------------------------- the layout (CPU)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K, group_size", LAYOUT_CASES)
def test_shuffle_then_unshuffle_is_the_identity(N, K, group_size, dtype):
    q, qweight, scales, zeros = make_int4(N, K, group_size, dtype)
    qs, sp, zp = L.shuffle_for_cuda(qweight, scales, zeros, group_size)
    G = K if group_size == -1 else group_size
    assert qs.dtype == torch.int32 and tuple(qs.shape) == (N // 64, 8 * K) and qs.is_contiguous()
    assert sp.dtype == zp.dtype == dtype and tuple(sp.shape) == tuple(zp.shape) == (K // G, N)
    back = L.unshuffle_from_cuda(qs, sp, zp, group_size)
    for name, got, want in zip(("qweight", "scales", "zeros"), back, (qweight, scales, zeros)):
        assert_bit_equal(got, want, name)
    # the shuffle moves bits only: same multiset of nibbles, and not the identity
    assert torch.equal(ek.unpack_int4(qs).long().flatten().sort().values, q.flatten().sort().values)
    assert not torch.equal(qs.flatten(), qweight.flatten())


@pytest.mark.parametrize("N, K, group_size", LAYOUT_CASES)
def test_kernel_reads_of_the_shuffled_weight_rebuild_q(N, K, group_size):
    q, qweight, scales, zeros = make_int4(N, K, group_size, torch.float16, seed=1)
    qs, _, _ = L.shuffle_for_cuda(qweight, scales, zeros, group_size)
    assert torch.equal(L.emulate_fragments(qs), q)


def test_ptx_b_fragment_layout():
    """mma.m16n8k16 .f16/.bf16 B fragment (PTX ISA): b0, b1 at k = 2t, 2t + 1, b2, b3 at
    k = 2t + 8, 2t + 9, n = groupID; the 32 lanes x 4 elements cover the 16 x 8 tile once."""
    lanes = torch.arange(32).view(-1, 1)
    idx = torch.arange(4).view(1, -1)
    row, col = L.mma_b_fragment_coords(lanes, idx)
    seen = torch.zeros(16, 8, dtype=torch.int64)
    seen.index_put_((row.flatten(), col.expand(32, 4).flatten()), torch.ones(128, dtype=torch.int64), accumulate=True)
    assert (seen == 1).all()
    assert L.mma_b_fragment_coords(0, 0) == (0, 0)
    assert L.mma_b_fragment_coords(1, 1) == (3, 0)
    assert L.mma_b_fragment_coords(6, 2) == (12, 1)
    assert L.mma_b_fragment_coords(31, 3) == (15, 7)


def test_layout_diagram_example():
    """The worked example of the module docstring: lane 5 (groupID 1, threadID_in_group 1),
    word 0, nibble 4 (p = 0, h = 1) of tile kt is b1 of subtile 0: q[64 nb + 1, 16 kt + 3]."""
    N, K = 128, 256
    q, qweight, scales, zeros = make_int4(N, K, 128, torch.float16, seed=2)
    qs, _, _ = L.shuffle_for_cuda(qweight, scales, zeros, 128)
    for nb, kt in ((0, 0), (1, 5), (1, 15)):
        word = int(qs[nb, 128 * kt + 4 * 5 + 0]) & 0xFFFFFFFF
        assert (word >> 16) & 0xF == q[64 * nb + 1, 16 * kt + 3]
        # word 3, nibble 3 (p = 3, h = 0): b2 of subtile 7 -> n = 8 * 7 + 1, k = 2 + 8
        word = int(qs[nb, 128 * kt + 4 * 5 + 3]) & 0xFFFFFFFF
        assert (word >> 12) & 0xF == q[64 * nb + 57, 16 * kt + 10]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K, group_size", LAYOUT_CASES)
def test_emulated_dequantization_is_q_minus_z_times_s_rounded_once(N, K, group_size, dtype):
    q, qweight, scales, zeros = make_int4(N, K, group_size, dtype, seed=3)
    qs, sp, zp = L.shuffle_for_cuda(qweight, scales, zeros, group_size)
    assert_bit_equal(L.emulate_scale_reads(sp, K, group_size), scales, "scales as the lanes read them")
    assert_bit_equal(L.emulate_scale_reads(zp, K, group_size), (zeros.float() + L.ZERO_OFFSET[dtype]).to(dtype),
                     "prepared zeros as the lanes read them")
    assert_bit_equal(L.emulate_dequantize(qs, sp, zp, group_size), dequantized(q, scales, zeros, group_size),
                     "dequantized weight")


def shifted_zero_table(zeros_p: torch.Tensor, zero_shift: int) -> torch.Tensor:
    """The prepared zeros of zeros + zero_shift from those of zeros (the shuffle only moves values,
    and BIAS + z + 1 is exact): zero_shift 1 makes zeros 1..16 from 0..15, the top of the
    range shuffle_for_cuda takes."""
    return zeros_p + zero_shift


@pytest.mark.parametrize("zero_shift", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exponent_trick_over_every_q_z_and_extreme_scales(dtype, zero_shift):
    """All (q, z) pairs, q in 0..15 and z in 0..16 (BIAS + 16, 1040 or 144, and (BIAS + q) - (BIAS + 16)
    are exact), with scales from tiny (subnormal products) to large."""
    N, K, G = 64, 256, 32
    q = (torch.arange(N * K) % 16).view(N, K)
    zeros = (torch.arange(N * K // G) // 3 % 16).view(N, K // G).to(dtype)
    info = torch.finfo(dtype)
    scale_values = torch.tensor([info.tiny, info.tiny * 3, 1e-3, 0.1, 1.0, 1.5, 7.0, 100.0,
                                 info.max / 16, info.eps, 1 / 3, 2.0 ** -20])
    scales = scale_values[torch.arange(N * K // G) % len(scale_values)].view(N, K // G).to(dtype)
    qs, sp, zp = L.shuffle_for_cuda(pack_effkern(q), scales, zeros, G)
    assert_bit_equal(L.emulate_dequantize(qs, sp, shifted_zero_table(zp, zero_shift), G),
                     dequantized(q, scales, zeros + zero_shift, G), "dequantized weight")


# ---------------------------------------------------------------------------- the checker fails wrong layouts

def _map_nibbles(qs: torch.Tensor, fn) -> torch.Tensor:
    """Applies fn to the nibble axis of every word ([..., 8] int64) and repacks."""
    nib = ek.unpack_int4(qs).long().unflatten(-1, (-1, 8))
    return ek.pack_int4(fn(nib).flatten(-2)).view_as(qs)


def _wrong_layouts(qs: torch.Tensor) -> dict:
    rows = qs.shape[0]
    tiles = qs.view(rows, -1, 32, 4)  # (nb, kt, lane, word)
    one = qs.clone()
    w = int(one[0, 0]) & 0xFFFFFFFF
    w = (w & ~0xFF) | ((w & 0xF) << 4) | ((w >> 4) & 0xF)  # swap nibbles 0 and 1 of a single word
    one[0, 0] = w - 2**32 if w >= 2**31 else w
    return {
        "low and high halves swapped (k rows 2t and 2t+1)": _map_nibbles(qs, lambda n: n[..., [4, 5, 6, 7, 0, 1, 2, 3]]),
        "registers swapped ({b0,b1} <-> {b2,b3})": _map_nibbles(qs, lambda n: n[..., [1, 0, 3, 2, 5, 4, 7, 6]]),
        "two nibbles of one word swapped": one,
        "groupID and threadID_in_group mixed (lane l <-> l ^ 4)": tiles[:, :, torch.arange(32) ^ 4].reshape_as(qs),
        "words of a lane reversed (subtiles 2i <-> 6-2i)": tiles.flip(-1).reshape_as(qs),
        "k16 tiles in the wrong order": tiles.flip(1).reshape_as(qs),
    }


@pytest.mark.parametrize("case", range(6))
def test_checker_rejects_a_wrong_layout(case):
    q, qweight, scales, zeros = make_int4(128, 256, 64, torch.float16, seed=4)
    qs, _, _ = L.shuffle_for_cuda(qweight, scales, zeros, 64)
    name, wrong = list(_wrong_layouts(qs).items())[case]
    assert not torch.equal(L.emulate_fragments(wrong), q), name


def test_checker_rejects_a_wrong_fragment_map(monkeypatch):
    """An emulation built on a wrong B-fragment layout (b2, b3 without the + 8 rows) maps two
    register halves onto one (k, n): the coverage check raises instead of returning q."""
    q, qweight, scales, zeros = make_int4(64, 128, 32, torch.float16, seed=5)
    qs, _, _ = L.shuffle_for_cuda(qweight, scales, zeros, 32)
    monkeypatch.setattr(L, "mma_b_fragment_coords", lambda lane, i: ((lane % 4) * 2 + (i & 1), lane >> 2))
    with pytest.raises(AssertionError, match="never"):
        L.emulate_fragments(qs)


def test_checker_rejects_wrongly_permuted_scales():
    q, qweight, scales, zeros = make_int4(128, 256, 32, torch.float16, seed=6)
    _, sp, _ = L.shuffle_for_cuda(qweight, scales, zeros, 32)
    plain = scales.t().contiguous()  # transposed but not permuted within the 64 columns
    assert torch.equal(L.emulate_scale_reads(sp, 256, 32), scales)
    assert not torch.equal(L.emulate_scale_reads(plain, 256, 32), scales)


# ---------------------------------------------------------------------------- predicate and validation

def test_cuda_kernel_supports():
    ok = L.cuda_kernel_supports
    for G in GROUPS:
        assert ok(1, 4096, 4096, G, torch.float16) and ok(16, 4096, 4096, G, torch.bfloat16)
    assert ok(64, 64, 128, -1, torch.float16) and ok(0, 64, 128, 32, torch.float16)
    assert not ok(65, 4096, 4096, 128, torch.float16)  # a prefill: the GEMM-shaped kernel
    assert not ok(1, 4096, 4096, 128, torch.float32)
    assert not ok(1, 4000, 4096, 128, torch.float16)  # N % 64
    assert not ok(1, 4096, 4000, 32, torch.float16)   # K % 128
    assert not ok(1, 4096, 128 * 3, 256, torch.float16)  # K % 256 for group 256
    assert ok(1, 4096, 128 * 3, -1, torch.float16)
    assert not ok(1, 4096, 4096, 16, torch.float16) and not ok(1, 4096, 4096, 96, torch.float16)
    assert not ok(1, 4096, 3072, 96, torch.float16)  # 96 divides K = 3072 but neither divides 128 nor is a multiple
    assert not ok(1, 0, 128, 32, torch.float16) and not ok(1, 64, 0, -1, torch.float16)


def test_cuda_kernel_refuses_group_sizes_that_are_not_positive():
    for G in (0, -2, -32, -64, -128):
        assert not L.shape_supported(4096, 4096, G), G
        assert not L.cuda_kernel_supports(1, 4096, 4096, G, torch.float16), G


def test_shuffle_validates_its_input():
    q, qweight, scales, zeros = make_int4(128, 256, 32, torch.float16)
    with pytest.raises(ValueError, match="N % 64"):
        L.shuffle_for_cuda(qweight[:96], scales[:96], zeros[:96], 32)
    with pytest.raises(ValueError, match="group_size"):
        L.shuffle_for_cuda(qweight, scales, zeros, 48)
    with pytest.raises(ValueError, match=r"\[128, 4\]"):
        L.shuffle_for_cuda(qweight, scales[:, :4], zeros[:, :4], 32)
    with pytest.raises(ValueError, match="integers in"):
        L.shuffle_for_cuda(qweight, scales, zeros + 0.5, 32)
    with pytest.raises(ValueError, match="integers in"):
        L.shuffle_for_cuda(qweight, scales, torch.full_like(zeros, 17), 32)
    L.shuffle_for_cuda(qweight, scales, torch.full_like(zeros, 16), 32)  # a classic GPTQ zero: exact
    with pytest.raises(TypeError, match="dtype="):
        L.shuffle_for_cuda(qweight, scales.float(), zeros.float(), 32)
    with pytest.raises(TypeError, match="int32"):
        L.shuffle_for_cuda(qweight.to(torch.int64), scales, zeros, 32)
    # float32 scales with an explicit activation dtype: rounded once to it
    qs, sp, zp = L.shuffle_for_cuda(qweight, scales.float(), zeros.float(), 32, dtype=torch.bfloat16)
    assert sp.dtype == zp.dtype == torch.bfloat16
    back = L.unshuffle_from_cuda(qs, sp, zp, 32)
    assert torch.equal(back[1], scales.float().to(torch.bfloat16)) and torch.equal(back[2].float(), zeros.float())


# ---------------------------------------------------------------------------- a model of the kernel (CPU)
#
# The kernel has not run yet; until it does, tests/int4_kernel_model.py replays it thread by thread
# (its index arithmetic, the cp.async pipeline with its commit groups, wait counts, ring slots and
# barriers, shared memory that starts poisoned and is checked for races, ldmatrix and mma by the
# PTX rules, the epilogue through the reduction buffer, split-K and its reduction) on small integer
# inputs and power-of-two scales, where every sum is exact: its output must equal the float64
# x @ W^T + bias rounded once, bit for bit.

def test_model_constants_are_the_kernels():
    """The model's constants, evaluated from the constexpr int definitions of csrc/cuda/int4.h and
    int4.cu (C's integer division for /)."""
    csrc = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "cuda"
    values = {}
    for name in ("int4.h", "int4.cu"):
        for const, expr in re.findall(r"^constexpr int (k\w+) = ([^;]+);", (csrc / name).read_text(), re.M):
            values[const] = eval(expr.replace("/", "//"), {}, values)  # noqa: S307  (the repo's own source)
    mirrored = {"kTileN": model.TILE_N, "kTileK": model.TILE_K, "kWarps": model.WARPS, "kThreads": model.THREADS,
                "kStageK": model.STAGE_K, "kStages": model.STAGES, "kTileM": model.TILE_M,
                "kMaxMTiles": model.MAX_M_TILES, "kNSub": model.N_SUB, "kTileBytes": model.TILE_BYTES,
                "kStageWeightBytes": model.STAGE_WEIGHT_BYTES, "kXRowBytes": model.X_ROW_BYTES,
                "kMinGroup": model.MIN_GROUP, "kGroupRowBytes": model.GROUP_ROW_BYTES,
                "kScaleBytes": model.SCALE_BYTES, "kRedStride": model.RED_STRIDE}
    assert {const: values[const] for const in mirrored} == mirrored


def test_model_ptx_fragment_rules():
    """The model's mma.m16n8k16 rules (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating
    point type") put the 32 lanes' elements on each tile once, agree with spot values of the ISA's
    figures, and the B rule is the layout module's (mma_b_fragment_coords)."""
    lane = torch.arange(32).view(32, 1)
    for rule, count, rows, cols in ((model.mma_a_coords, 8, 16, 16), (model.mma_b_coords, 4, 16, 8),
                                    (model.mma_c_coords, 4, 16, 8)):
        tile = model.fragment_to_tile(torch.arange(32 * count).view(32, count), rule, rows, cols)
        assert torch.equal(tile.flatten().sort().values, torch.arange(rows * cols))
    assert model.mma_a_coords(5, 0) == (1, 2) and model.mma_a_coords(5, 3) == (9, 3)  # g = 1, t = 1
    assert model.mma_a_coords(5, 4) == (1, 10) and model.mma_a_coords(31, 7) == (15, 15)
    assert model.mma_b_coords(6, 1) == (5, 1) and model.mma_b_coords(6, 2) == (12, 1)
    assert model.mma_c_coords(6, 1) == (1, 5) and model.mma_c_coords(31, 2) == (15, 6)
    i = torch.arange(4).view(1, 4)
    assert all(torch.equal(*pair) for pair in zip(model.mma_b_coords(lane, i), L.mma_b_fragment_coords(lane, i)))


def test_model_ldmatrix_of_the_four_quarters_is_the_a_fragment():
    """ldmatrix.x4 with lanes 0-15 pointing at rows 0-15, k 0-7 of a row-major 16 x 16 tile and lanes
    16-31 at k 8-15 (the kernel's addressing, unswizzled) loads the mma A fragment: the two PTX
    rules of the model, written separately, agree."""
    smem = model.SharedMemory(512, check_races=True)
    tile = torch.arange(256, dtype=torch.int16)  # element (r, k) = 16 r + k
    smem.store(torch.zeros(1, dtype=torch.int64), tile.view(torch.uint8)[None])
    smem.sync()
    lane = torch.arange(32)
    regs = model.ldmatrix_x4(smem, (lane & 15) * 32 + (lane >> 4) * 16)
    a = model.fragment_to_tile(model.halves(regs, torch.int16), model.mma_a_coords, 16, 16)
    assert torch.equal(a.flatten(), tile)


def test_model_shared_memory_reports_races():
    """The race check of the model's shared memory (PTX: a cp.async may land at any time until the
    issuing thread's wait_group; other threads see it, and plain stores, after a barrier) reports
    reading bytes nobody wrote, or a copy's bytes before its wait or before the next barrier, and
    writing bytes read between the same two barriers (a slot refilled while a slower warp may still
    read it) or under a copy in flight."""
    smem = model.SharedMemory(64, check_races=True)
    src = torch.arange(32, dtype=torch.uint8)
    at = lambda *addr: torch.tensor(addr)  # noqa: E731
    unseen = "no copy or store has made visible"
    with pytest.raises(AssertionError, match=unseen):
        smem.read(at(0), 16)
    smem.cp_async16(at(0), src, at(16))
    smem.commit()
    with pytest.raises(AssertionError, match=unseen):
        smem.read(at(0), 16)
    smem.wait(0)
    with pytest.raises(AssertionError, match=unseen):
        smem.read(at(0), 16)
    smem.sync()
    assert torch.equal(smem.read(at(0), 16)[0], src[16:])
    with pytest.raises(AssertionError, match="between the same two barriers"):
        smem.cp_async16(at(0), src, at(0))
    smem.sync()
    smem.cp_async16(at(0), src, at(0))
    with pytest.raises(AssertionError, match="under a cp.async in flight"):
        smem.store(at(0), torch.zeros(1, 16, dtype=torch.uint8))


def exact_int4_problem(M, N, K, group_size, dtype, with_bias, seed):
    """x, the prepared weight (shuffle_for_cuda), bias and the float64 x @ W^T + bias rounded once,
    for x and bias small integers, zeros 0..16 and scales 1/2, 1/4 or 1/8: W = (q - z) s and every
    product and fp32 sum of the kernel are exact."""
    q, qweight, _, _ = make_int4(N, K, group_size, dtype, seed=seed)
    G = K if group_size == -1 else group_size
    g = torch.Generator().manual_seed(seed + 1)
    zeros = torch.randint(0, 17, (N, K // G), generator=g).to(dtype)
    scales = (2.0 ** -torch.randint(1, 4, (N, K // G), generator=g)).to(dtype)
    x = torch.randint(-3, 4, (M, K), generator=g).to(dtype)
    bias = torch.randint(-8, 9, (N,), generator=g).to(dtype) if with_bias else None
    want = x.double() @ dequantized(q, scales, zeros, group_size).double().t()
    want = (want + bias.double() if with_bias else want).to(dtype)
    return x, L.shuffle_for_cuda(qweight, scales, zeros, group_size), bias, want


def run_model(M, N, K, group_size, dtype, with_bias, num_sms=1000, seed=0, check_races=True):
    """(the model's output, the exact result, the plan)."""
    x, (qs, sp, zp), bias, want = exact_int4_problem(M, N, K, group_size, dtype, with_bias, seed)
    G = K if group_size == -1 else group_size
    out, plan = model.linear(x, qs, sp, zp, G, bias, num_sms, check_races=check_races)
    return out, want, plan


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("M", [1, 3, 17, 64, 70])
def test_model_of_the_kernel_computes_x_wt_exactly(M, group_size, dtype, with_bias):
    """Every group size at m-tiles 1 (M 1, 3), 2 (17) and 4 (64; 70: a second row block of 6 rows),
    two column blocks, K of 4 stages: the ring's every slot, no split."""
    out, want, plan = run_model(M, 128, 512, group_size, dtype, with_bias, seed=M)
    assert plan["splits"] == 1 and plan["grid_n"] == 2
    assert_bit_equal(out, want, f"model M={M} G={group_size}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N, K, group_size, num_sms, with_bias, split", [
    (1, 64, 128, 32, 1000, True, (1, 1)),      # one stage: the prologue's other two groups empty
    (17, 64, 768, 128, 1000, False, (1, 6)),   # the ring wraps; at most K / 512 splits
    (64, 64, 1024, 256, 1000, True, (2, 4)),   # split K
    (5, 64, 1152, 128, 1000, True, (2, 5)),    # uneven: 5 + 4 stages
    (3, 64, 1664, 32, 1000, False, (3, 5)),    # 5 + 5 + 3
    (1, 64, 2304, 256, 1000, True, (4, 5)),    # 5 + 5 + 5 + 3; splits 1 and 3 begin mid-group (k 640, 1920)
    (17, 64, 2048, -1, 1000, True, (4, 4)),    # one group over all splits
    (70, 64, 1024, 64, 2, False, (2, 4)),      # two row blocks, split
    (1, 64, 1536, 32, 1, True, (2, 6)),        # the SM count limits the splits, not K
])
def test_model_of_the_kernel_splits_k_exactly(M, N, K, group_size, num_sms, with_bias, split, dtype):
    """split-K plans (splits, stages per split) as make_plan makes them for num_sms SMs: the
    blocks' fp32 partial sums in the NaN-poisoned workspace, then splitk_reduce_kernel (+ bias)."""
    out, want, plan = run_model(M, N, K, group_size, dtype, with_bias, num_sms=num_sms, seed=K)
    assert (plan["splits"], plan["stages_per_split"]) == split
    assert_bit_equal(out, want, f"model M={M} K={K} G={group_size} splits={split}")


def test_model_refuses_an_unresolved_group_size():
    x, (qs, sp, zp), _, _ = exact_int4_problem(1, 64, 128, -1, torch.float16, False, seed=0)
    with pytest.raises(ValueError, match="resolved"):
        model.linear(x, qs, sp, zp, -1, None, 1000)


# ---------------------------------------------------------------------------- the model fails wrong kernels

CONTROL = dict(M=3, N=64, K=640, group_size=64, dtype=torch.float16, with_bias=True)  # 5 stages: slot 0 reused


def assert_model_differs(**kwargs):
    out, want, _ = run_model(**dict(CONTROL, **kwargs))
    assert not torch.equal(bits(out), bits(want)), "the wrong kernel passed"


@pytest.mark.parametrize("misread", ["rows g and g + 8 exchanged", "k halves exchanged",
                                     "threads t and t ^ 1 exchanged"])
def test_model_fails_a_wrong_a_fragment_rule(misread, monkeypatch):
    original = model.mma_a_coords
    wrong = {"rows g and g + 8 exchanged": lambda lane, i: original(lane, i ^ 2),  # a0a1 <-> a2a3
             "k halves exchanged": lambda lane, i: original(lane, i ^ 4),  # a0..a3 <-> a4..a7
             "threads t and t ^ 1 exchanged": lambda lane, i: original(lane ^ 1, i)}[misread]
    monkeypatch.setattr(model, "mma_a_coords", wrong)
    assert_model_differs()


def test_model_fails_a_wait_group_count_one_too_large(monkeypatch):
    """cp.async.wait_group kStages - 1: the stage about to be read may not have landed. The race
    check raises; without it, the poisoned shared memory reaches the output."""
    wait = model.SharedMemory.wait
    monkeypatch.setattr(model.SharedMemory, "wait", lambda self, pending: wait(self, pending + 1))
    with pytest.raises(AssertionError, match="no copy or store has made visible"):
        run_model(**CONTROL)
    assert_model_differs(check_races=False)


def test_model_fails_a_missing_barrier(monkeypatch):
    """Without __syncthreads the warps read a stage that other threads' copies fill (and refill the
    slot of the previous stage while a slower warp may still read it): races whose outcome depends
    on timing, which the model's lockstep replay alone would compute correctly; the race check
    reports them."""
    monkeypatch.setattr(model.SharedMemory, "sync", lambda self: None)
    with pytest.raises(AssertionError, match="no copy or store has made visible"):
        run_model(**CONTROL)


@pytest.mark.parametrize("misplaced", ["columns 4t instead of 2t", "the rows of groupID g ^ 1"])
def test_model_fails_a_wrong_epilogue_lane_offset(misplaced, monkeypatch):
    """A lane's c0..c3 stored at the wrong place of the reduction buffer: leaving holes, which the
    race check reports as reads of unwritten bytes (without it, the poison's NaN reaches the
    output), or putting other lanes' sums where this lane's belong (a wrong result)."""
    right = model.red_fragment_offset
    wrong = {"columns 4t instead of 2t": lambda warp, lane, c: right(warp, lane, c) + 2 * (lane & 3),
             "the rows of groupID g ^ 1": lambda warp, lane, c: right(warp, lane ^ 4, c)}[misplaced]
    monkeypatch.setattr(model, "red_fragment_offset", wrong)
    if misplaced == "columns 4t instead of 2t":
        with pytest.raises(AssertionError, match="no copy or store has made visible"):
            run_model(**CONTROL)
    assert_model_differs(check_races=False)


# ---------------------------------------------------------------------------- the C++ op (CPU side)

def test_op_is_registered_with_its_schema():
    assert op_schema("int4_linear") == ("effkern_C::int4_linear(Tensor input, Tensor qweight, Tensor scales, Tensor zeros, "
                      "int group_size, Tensor? bias) -> Tensor")


def _op_args(M=2, N=128, K=256, group_size=32, dtype=torch.float16):
    q, qweight, scales, zeros = make_int4(N, K, group_size, dtype)
    qs, sp, zp = L.shuffle_for_cuda(qweight, scales, zeros, group_size)
    x = torch.randn(M, K).to(dtype)
    return dict(input=x, qweight=qs, scales=sp, zeros=zp, group_size=group_size, bias=torch.randn(N).to(dtype)), qweight


def _bad_cases():
    good, unshuffled = _op_args()
    cases = {
        "effkern's unshuffled layout": (dict(good, qweight=unshuffled), r"shuffled weight \[N / 64, 8 \* K\]"),
        "float32 input": (dict(good, input=good["input"].float()), "float16 or bfloat16"),
        "3-D input": (dict(good, input=good["input"][None]), "2-D"),
        "scales of the other dtype": (dict(good, scales=good["scales"].bfloat16()), "scales has dtype"),
        "group size of another layout": (dict(good, group_size=64), r"scales must be the prepared \[K / group_size, N\] = \[4, 128\]"),
        "unsupported group size": (dict(good, group_size=48), "G % 32 == 0"),
        "zero group size": (dict(good, group_size=0), "positive or -1"),
        "K of another layout": (dict(good, input=good["input"][:, :128].contiguous()), r"8 \* K"),
        "int64 qweight": (dict(good, qweight=good["qweight"].long()), "must be int32"),
        "non-contiguous scales": (dict(good, scales=good["scales"].t().contiguous().t()), "contiguous"),
        "misaligned zeros": (dict(good, zeros=misaligned(good["zeros"])), "16-byte aligned"),
        "bias of the wrong length": (dict(good, bias=good["bias"][:5]), r"bias must be \[128\]"),
        "bias of the other dtype": (dict(good, bias=good["bias"].float()), "bias has dtype"),
    }
    return cases


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_op_argument_checks_raise_clear_errors(case):
    kwargs, message = _bad_cases()[case]
    assert_op_raises("int4_linear", kwargs, message)


@pytest.mark.parametrize("group_size", GROUPS)
def test_op_on_cpu_tensors_passes_the_checks_then_says_there_is_no_cpu_kernel(group_size):
    kwargs, _ = _op_args(K=512, group_size=group_size, dtype=torch.bfloat16)
    assert_op_raises("int4_linear", kwargs, "no CPU kernel")


def test_cpp_shape_rule_is_the_python_predicate():
    """The C++ check (csrc/cuda/int4.h supports()) accepts exactly what shape_supported does."""
    for K in (128, 256, 384, 640, 1024):
        for G in (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, -1, K):
            Ge = K if G == -1 else G
            if K % Ge or K // Ge == 0:
                continue
            qs = torch.zeros(1, 8 * K, dtype=torch.int32)
            table = torch.zeros(K // Ge, 64, dtype=torch.float16)
            accepted = cpp_checks_accept("int4_linear", torch.zeros(1, K, dtype=torch.float16), qs, table, table, G, None)
            assert accepted == L.shape_supported(64, K, G), (K, G)


# ---------------------------------------------------------------------------- the kernel (GPU)

def run_kernel(x, qweight, scales, zeros, group_size, bias):
    needs_cuda_kernels()
    qs, sp, zp = L.shuffle_for_cuda(qweight, scales, zeros, group_size)
    return torch.ops.effkern_C.int4_linear(x, qs.cuda(), sp.cuda(), zp.cuda(), group_size, bias)


def check_against_float64(M, N, K, group_size, dtype, with_bias, seed=0):
    q, qweight, scales, zeros = make_int4(N, K, group_size, dtype, seed=seed)
    x, bias = random_input_and_bias(M, N, K, dtype, with_bias, seed=seed + 100)
    out = run_kernel(x, qweight, scales, zeros, group_size, bias)
    w = dequantized(q, scales, zeros, group_size).cuda()  # what the kernel multiplies by, exactly
    assert_kernel_matches_float64(out, x, w, bias, f"M={M} N={N} K={K} G={group_size} {dtype}")
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 16, 17, 33, 64, 100])
@pytest.mark.parametrize("N, K", [(256, 512), (192, 2048)])  # one K slice / split-K over blocks
def test_gpu_kernel_matches_float64(N, K, M, dtype, group_size, with_bias, poison_empty):
    check_against_float64(M, N, K, group_size, dtype, with_bias)


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N, K, group_size", [(1, 4096, 4096, 128), (16, 4096, 4096, -1), (4, 11008, 4096, 64),
                                                  (8, 4096, 11008, 128), (2, 21504, 1024, 32)])
def test_gpu_kernel_decode_shapes(M, N, K, group_size, dtype, poison_empty):
    check_against_float64(M, N, K, group_size, dtype, with_bias=True)


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K, group_size, zero_shift", [(128, 256, 32, 0), (64, 512, 256, 0), (192, 2048, -1, 0),
                                                          (128, 256, 32, 1)])
def test_gpu_dequantization_is_bit_exact(N, K, group_size, zero_shift, dtype, poison_empty):
    """x = one-hot rows e_k: y[m, n] = W[n, k_m], one exact term in the fp32 sum, so the output is
    the kernel's dequantized weight itself; it must equal (q - z) * s rounded once, bit for bit,
    also for scales that make subnormal or huge products, and for zeros up to 16 (zero_shift 1)."""
    needs_cuda_kernels()
    q, qweight, scales, zeros = make_int4(N, K, group_size, dtype, seed=7)
    info = torch.finfo(dtype)
    extreme = torch.tensor([info.tiny, 1e-3, 1 / 3, 100.0, info.max / 16]).to(dtype)
    scales[:, 0] = extreme[torch.arange(N) % len(extreme)]  # first group of every row
    w = dequantized(q, scales, zeros + zero_shift, group_size)
    qs, sp, zp = L.shuffle_for_cuda(qweight, scales, zeros, group_size)
    qs, sp, zp = qs.cuda(), sp.cuda(), shifted_zero_table(zp, zero_shift).cuda()
    for k0 in range(0, K, 64):
        x = torch.zeros(64, K, dtype=dtype, device="cuda")
        x[torch.arange(64), k0 + torch.arange(64)] = 1
        out = torch.ops.effkern_C.int4_linear(x, qs, sp, zp, group_size, None)
        assert_bit_equal(out.cpu(), w[:, k0:k0 + 64].t().contiguous(), f"W[:, {k0}:{k0 + 64}] from the kernel")


@pytest.mark.gpu
def test_gpu_kernel_is_deterministic_and_takes_any_input_strides(poison_empty):
    N, K, G = 256, 2048, 128
    q, qweight, scales, zeros = make_int4(N, K, G, torch.bfloat16)
    x = torch.randn(K, 5, dtype=torch.bfloat16, device="cuda").t()  # not contiguous
    a = run_kernel(x, qweight, scales, zeros, G, None)
    b = run_kernel(x.contiguous(), qweight, scales, zeros, G, None)
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_kernel_empty_m():
    q, qweight, scales, zeros = make_int4(128, 256, 32, torch.float16)
    out = run_kernel(torch.empty(0, 256, dtype=torch.float16, device="cuda"), qweight, scales, zeros, 32, None)
    assert tuple(out.shape) == (0, 128)


@pytest.mark.gpu
def test_gpu_kernel_rejects_tensors_on_another_device():
    assert_rejects_tensors_on_another_device("int4_linear", _op_args()[0], "qweight")
