"""The CUDA 2:4 sparse kernel (csrc/cuda/sparse24.cu, mma.sp on the sparse tensor cores) and its
reordered weight (effkern/sparse24_cuda_layout.py).

CPU: the reorder's round trip is bit-exact; the emulation of how the kernel and the hardware
read the reordered tensors (tile, k32 step, lane, A register half, metadata thread pair and bit
field, by the PTX ISA rules) rebuilds the dense W bit for bit, and fails for deliberately wrong
layouts; the PTX rule functions cover the 16 x 32 tile exactly once; the C++ op is registered
and its argument checks raise clear errors. GPU (``-m gpu``): the kernel against a float64
reference.

Inputs come from the small compressor below (a random 2:4 pattern, compressed by hand in
effkern's format), independent of effkern.sparse24.
"""

from __future__ import annotations

import pytest
import torch

from effkern import sparse24_cuda_layout as L

from cuda_kernel_checks import (DTYPES, assert_bit_equal, assert_kernel_matches_float64, assert_op_raises,
                                assert_rejects_tensors_on_another_device, bits, cpp_checks_accept, misaligned,
                                op_schema, random_input_and_bias)

# (N, K): one m16 tile and one k64 block up; N not a multiple of 64 / 128, K not of 128.
LAYOUT_CASES = [(16, 64), (32, 128), (48, 192), (64, 256), (128, 64), (208, 320), (256, 512)]


# ---------------------------------------------------------------------------- test inputs

def compress_local(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """effkern's format of a 2:4 sparse W [N, K] (K % 8 == 0): kept positions i0 < i1 of each
    group of 4 = its nonzeros completed with its lowest-index zeros; values [N, K / 2] =
    (W[4G + i0], W[4G + i1]); meta uint8 [N, K / 8], code i0 | i1 << 2, low nibble = even group."""
    N, K = W.shape
    groups = W.view(N, K // 4, 4)
    nonzero = groups != 0
    assert bool((nonzero.sum(-1) <= 2).all()), "not 2:4 sparse"
    rank = (~nonzero).to(torch.int64) * 4 + torch.arange(4)  # nonzeros first, then low positions
    kept = torch.sort(torch.topk(rank, 2, dim=-1, largest=False).indices, dim=-1).values
    values = groups.gather(-1, kept).reshape(N, K // 2)
    codes = kept[..., 0] | (kept[..., 1] << 2)
    pairs = codes.view(N, K // 8, 2)
    meta = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return values, meta


def make_24(N, K, dtype, seed=0, empty_fraction=0.2):
    """(W [N, K], values, meta): a random 2:4 pattern (positions uniform over the 6 pairs), random
    normal values; ``empty_fraction`` of the kept entries set to 0 (groups with fewer nonzeros)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(N, K // 4, 4, generator=g).topk(2, dim=-1).indices
    mask = torch.zeros(N, K // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    mask &= torch.rand(N, K // 4, 4, generator=g) >= empty_fraction
    dense = torch.randn(N, K // 4, 4, generator=g).to(dtype)
    W = torch.where(mask, dense, torch.zeros((), dtype=dtype)).view(N, K)
    values, meta = compress_local(W)
    return W, values, meta


def rebuilds(values_r, meta_r, W) -> bool:
    """The check under test: the PTX-rule emulation of the kernel's reads gives W bit for bit
    (False also when the emulation finds the layout inconsistent)."""
    try:
        got = L.emulate_mma_sp_reads(values_r, meta_r)
    except AssertionError:
        return False
    return torch.equal(bits(got), bits(W))


def test_local_compressor_follows_effkerns_format():
    W = torch.tensor([[0., 5., 0., 7., 0., 0., 0., 0.], [3., 0., 0., 0., 0., 0., 2., 1.]], dtype=torch.float16)
    values, meta = compress_local(W)
    assert values.tolist() == [[5., 7., 0., 0.], [3., 0., 2., 1.]]
    # row 0: group 0 keeps (1, 3) = 0b1101, group 1 (0, 1) = 0b0100; row 1: (0, 1), (2, 3) = 0b1110
    assert meta.tolist() == [[0b1101 | 0b0100 << 4], [0b0100 | 0b1110 << 4]]


# ---------------------------------------------------------------------------- the layout (CPU)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K", LAYOUT_CASES)
def test_reorder_then_restore_is_the_identity(N, K, dtype):
    W, values, meta = make_24(N, K, dtype, seed=N + K)
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    assert values_r.dtype == dtype and tuple(values_r.shape) == (N // 16, 8 * K) and values_r.is_contiguous()
    assert meta_r.dtype == torch.int32 and tuple(meta_r.shape) == (N // 16, K // 2) and meta_r.is_contiguous()
    back_values, back_meta = L.restore_from_mma_sp(values_r, meta_r)
    assert_bit_equal(back_values, values, "values")
    assert_bit_equal(back_meta, meta, "meta")
    # the reorder moves bits only, and is not the identity
    assert torch.equal(bits(values_r).flatten().sort().values, bits(values).flatten().sort().values)
    assert not torch.equal(bits(values_r).flatten(), bits(values).flatten())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, K", LAYOUT_CASES)
def test_ptx_emulation_of_the_kernels_reads_rebuilds_W(N, K, dtype):
    W, values, meta = make_24(N, K, dtype, seed=2 * N + K)
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    assert_bit_equal(L.emulate_mma_sp_reads(values_r, meta_r), W, "W from the emulated mma.sp reads")


def test_emulation_keeps_negative_zero_values_and_every_pattern():
    """All 6 kept-position pairs in every lane and register, and -0.0 among the values (kept
    bit for bit: the kernel multiplies it, the emulation must not drop its sign)."""
    N, K = 32, 128
    pairs = torch.tensor([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])
    kept = pairs[torch.arange(N * K // 4) % 6].view(N, K // 4, 2)
    vals = torch.randn(N, K // 4, 2).to(torch.bfloat16)
    vals[0, 0, 0] = -0.0
    W = torch.zeros(N, K // 4, 4, dtype=torch.bfloat16).scatter_(-1, kept, vals).view(N, K)
    codes = kept[..., 0] | (kept[..., 1] << 2)
    meta = (codes.view(N, K // 8, 2)[..., 0] | (codes.view(N, K // 8, 2)[..., 1] << 4)).to(torch.uint8)
    values = vals.view(N, K // 2)
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    assert_bit_equal(L.emulate_mma_sp_reads(values_r, meta_r), W, "W")


def test_ptx_a_fragment_rule_covers_the_tile_once():
    """[P3] (PTX ISA 9.7.14.6.2.2, Figure 120): the 32 lanes x 8 elements are the 16 rows x 8
    chunks x 2 kept elements of the A tile, each once; spot checks of the formula."""
    lanes = torch.arange(32).view(-1, 1)
    i = torch.arange(8).view(1, -1)
    row, firstcol = L.ptx_a_element(lanes, i)
    seen = torch.zeros(16, 8, 2, dtype=torch.int64)
    seen.index_put_((row.flatten(), (firstcol // 4).flatten(), (i % 2).expand(32, 8).flatten()),
                    torch.ones(256, dtype=torch.int64), accumulate=True)
    assert (seen == 1).all()
    assert L.ptx_a_element(0, 0) == (0, 0)
    assert L.ptx_a_element(5, 2) == (9, 4)     # g = 1, t = 1, register 1: row g + 8, k 4t
    assert L.ptx_a_element(6, 7) == (9, 24)    # g = 1, t = 2, register 3: row g + 8, k 16 + 4t
    assert L.ptx_a_element(31, 4) == (7, 28)
    assert [L.ptx_a_element(4, k)[0] for k in range(8)] == [1, 1, 9, 9, 1, 1, 9, 9]


@pytest.mark.parametrize("selector", [0, 1])
def test_ptx_metadata_rule_covers_the_tile_once(selector):
    """[P2], [P4]: for each selector, the two threads' 2 x 16 two-bit fields of every group are
    the 16 rows x 8 chunks x 2 indices of the tile, each once; T_{2f} has k 0..15."""
    assert L.ptx_metadata_threads(selector) == (2 * selector, 2 * selector + 1)
    p = torch.arange(2).view(2, 1)
    field = torch.arange(16).view(1, 16)
    row_offset, chunk, which = L.ptx_metadata_field(p, field)
    seen = torch.zeros(16, 8, 2, dtype=torch.int64)
    for g in range(8):
        seen.index_put_(((g + row_offset).expand(2, 16).flatten(), chunk.expand(2, 16).flatten(),
                         which.expand(2, 16).flatten()), torch.ones(32, dtype=torch.int64), accumulate=True)
    assert (seen == 1).all()
    assert L.ptx_metadata_field(0, 0) == (0, 0, 0) and L.ptx_metadata_field(0, 1) == (0, 0, 1)
    assert L.ptx_metadata_field(0, 7) == (0, 3, 1)   # bits 15..14: row g, k 12..15, second index
    assert L.ptx_metadata_field(0, 8) == (8, 0, 0)   # bits 17..16: row g + 8
    assert L.ptx_metadata_field(1, 10) == (8, 5, 0)  # the second thread: k 16.., bits 21..20
    with pytest.raises(ValueError):
        L.ptx_metadata_threads(2)


def test_layout_diagram_examples():
    """The worked examples of the module docstring."""
    N, K = 64, 256
    W, values, meta = make_24(N, K, torch.float16, seed=3, empty_fraction=0.0)
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    codes = torch.stack(((meta & 0xF).long(), (meta >> 4).long()), dim=-1).view(N, K // 4)
    for mt, ks in ((0, 0), (1, 3), (3, 7)):
        # lane 6 (g = 1, t = 2), register 3, half 1 -> values[16 mt + 9, 16 ks + 13]
        assert bits(values_r[mt, 256 * ks + 8 * 6 + 2 * 3 + 1]) == bits(values[16 * mt + 9, 16 * ks + 13])
    for mt, j in ((0, 0), (2, 1), (3, 3)):
        # lane 6 (q = 2: selector 1, first of the pair), bits 23..20 -> row 16 mt + 9, group 16 j + 9
        word = int(meta_r[mt, 32 * j + 6]) & 0xFFFFFFFF
        assert (word >> 20) & 0xF == int(codes[16 * mt + 9, 16 * j + 9])


# ---------------------------------------------------------------------------- the check fails wrong layouts

@pytest.fixture
def good():
    W, values, meta = make_24(64, 256, torch.float16, seed=7, empty_fraction=0.0)  # every kept value nonzero
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    assert rebuilds(values_r, meta_r, W)
    return W, values, meta, values_r, meta_r


def test_check_fails_two_metadata_nibbles_swapped(good):
    W, _, _, values_r, meta_r = good
    nib = L._unpack_nibbles(meta_r)
    for a, b in ((0, 1), (0, 4), (3, 7)):  # same row half / across the row halves
        bad = nib.clone()
        # the first word whose nibbles a and b differ
        idx = (bad[..., a] != bad[..., b]).nonzero()[0]
        word = bad[idx[0], idx[1]]
        word[a], word[b] = word[b].clone(), word[a].clone()
        assert not rebuilds(values_r, L._pack_nibbles(bad), W), (a, b)


def test_check_fails_the_wrong_thread_pair_supplying_metadata(good, monkeypatch):
    W, _, _, values_r, meta_r = good
    # the layout built as if selector f were served by the other pair (words of q = 0, 1 <-> 2, 3)
    words = meta_r.view(meta_r.shape[0], -1, 8, 2, 2)
    assert not rebuilds(values_r, words.flip(3).reshape(meta_r.shape).contiguous(), W)
    # ... or as if the pair's two threads had their k halves exchanged
    assert not rebuilds(values_r, words.flip(4).reshape(meta_r.shape).contiguous(), W)
    # the emulation with a wrong reading of [P2]: the check must notice too
    for wrong in (lambda f: (2 * f + 1, 2 * f), lambda f: (f, f + 2), lambda f: (0, 1)):
        monkeypatch.setattr(L, "ptx_metadata_threads", wrong)
        assert not rebuilds(values_r, meta_r, W)


def test_check_fails_a_wrong_metadata_field_rule(good, monkeypatch):
    W, _, _, values_r, meta_r = good
    # rows g and g + 8 exchanged between the halves of the word
    monkeypatch.setattr(L, "ptx_metadata_field", lambda p, f: (8 - 8 * (f // 8), 4 * p + (f % 8) // 2, f % 2))
    assert not rebuilds(values_r, meta_r, W)


def test_check_fails_two_values_swapped(good):
    W, _, _, values_r, meta_r = good
    for a, b in ((0, 1), (0, 2), (8, 16), (5, 256 + 5)):  # halves, registers, lanes, k32 steps
        bad = values_r.clone()
        assert bits(bad[0, a]) != bits(bad[0, b])
        bad[0, a], bad[0, b] = values_r[0, b], values_r[0, a]
        assert not rebuilds(bad, meta_r, W), (a, b)


def test_check_fails_a_wrong_a_fragment_rule(good, monkeypatch):
    W, _, _, values_r, meta_r = good
    original = L.ptx_a_element

    def registers_1_and_2_exchanged(lane, i):  # row g + 8, k 4t.. read as row g, k 16 + 4t.. and back
        i = torch.as_tensor(i)
        return original(lane, torch.where(i // 2 == 1, i + 2, torch.where(i // 2 == 2, i - 2, i)))

    monkeypatch.setattr(L, "ptx_a_element", registers_1_and_2_exchanged)
    assert not rebuilds(values_r, meta_r, W)


def test_check_fails_unreordered_tensors(good):
    W, values, meta, values_r, meta_r = good
    N, K = W.shape
    plain_values = values.reshape(N // 16, 8 * K)      # effkern's order, right shape
    assert not rebuilds(plain_values, meta_r, W)
    plain_meta = meta.view(torch.int32).reshape(N // 16, K // 2)   # effkern's bytes, right shape
    assert not rebuilds(values_r, plain_meta, W)


# ---------------------------------------------------------------------------- validation and predicate

def test_cuda_kernel_supports():
    ok = L.cuda_kernel_supports
    for M in (0, 1, 16, 17, 64, 65, 4096):
        assert ok(M, 4096, 4096, torch.float16) and ok(M, 4096, 4096, torch.bfloat16)
    assert ok(1, 16, 64, torch.float16) and ok(3, 208, 320, torch.bfloat16)
    assert not ok(1, 4096, 4096, torch.float32)
    assert not ok(1, 4104, 4096, torch.float16)   # N % 16
    assert not ok(1, 4096, 4128, torch.float16)   # K % 64
    assert not ok(1, 0, 64, torch.float16) and not ok(1, 16, 0, torch.float16)
    assert not ok(L.MAX_M + 1, 16, 64, torch.float16) and not ok(-1, 16, 64, torch.float16)


def test_reorder_validates_its_input():
    W, values, meta = make_24(64, 256, torch.float16)
    with pytest.raises(ValueError, match="N % 16 == 0 and K % 64 == 0"):
        L.reorder_for_mma_sp(values[:40], meta[:40])
    with pytest.raises(ValueError, match="N % 16 == 0 and K % 64 == 0"):
        L.reorder_for_mma_sp(values[:, :80].contiguous(), meta[:, :20].contiguous())  # K = 160
    with pytest.raises(ValueError, match=r"uint8 \[N, ceil\(K / 8\)\] = \[64, 32\]"):
        L.reorder_for_mma_sp(values, meta[:, :16])
    with pytest.raises(ValueError, match="uint8"):
        L.reorder_for_mma_sp(values, meta.to(torch.int32))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        L.reorder_for_mma_sp(values.float(), meta)
    for code in (0b0000, 0b0101, 0b0001, 0b0111):  # i0 == i1, or i0 > i1: not ordered
        bad = meta.clone()
        bad[5, 3] = (bad[5, 3] & 0xF0) | code
        with pytest.raises(ValueError, match=r"row 5, group 6 \(k = 24..27\)"):
            L.reorder_for_mma_sp(values, bad)
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    with pytest.raises(ValueError, match="int32"):
        L.restore_from_mma_sp(values_r, meta_r[:, :64])


# ---------------------------------------------------------------------------- a model of the kernel (CPU)
#
# The kernel has not run yet; until it does, this Python model of csrc/cuda/sparse24.cu replays its
# index arithmetic (stage copies into a shared-memory byte array with the same offsets and swizzle,
# warp roles, per-lane LDS / ldmatrix addresses, the mma.sp operands by the PTX rules of
# effkern.sparse24_cuda_layout, the epilogue through the reduction buffer, split-K) on small
# integer inputs, where every sum is exact, so its output must equal x @ W^T + bias bit for bit.
# The constants mirror the TileConfig instantiations in csrc/cuda/sparse24.cu.

KERNEL_CONFIGS = {  # name: (warps N, warps M, warps K, MI, NI, stages)
    "decode8": (4, 1, 2, 1, 1, 4), "decode16": (4, 1, 2, 1, 2, 4),
    "medium": (4, 2, 1, 2, 4, 4), "large": (2, 4, 1, 4, 4, 3),
}


def _mma_sp_model(a_regs, e_words, selector, b_regs):
    """D (16 x 8, float64) of one mma.sp.m16n8k32 from the 32 lanes' A registers (int32 [32, 4]),
    metadata words (int32 [32]) and B registers (int32 [32, 4]), by the PTX rules [P2]-[P5]."""
    a = a_regs.contiguous().view(torch.float16).double()   # [32, 8]: a_i of each lane (low half first)
    b = b_regs.contiguous().view(torch.float16).double()
    e = e_words.to(torch.int64) & 0xFFFFFFFF
    g, p, field = torch.arange(8).view(8, 1, 1), torch.arange(2).view(1, 2, 1), torch.arange(16).view(1, 1, 16)
    lanes = 4 * g + torch.tensor(L.ptx_metadata_threads(selector))[p]
    row_offset, chunk, which = L.ptx_metadata_field(p, field)
    index = torch.full((16, 8, 2), -1, dtype=torch.int64)
    index[(g + row_offset).expand(8, 2, 16), chunk.expand(8, 2, 16), which.expand(8, 2, 16)] = (e[lanes] >> (2 * field)) & 3
    lane, i = torch.arange(32).view(32, 1), torch.arange(8).view(1, 8)
    row, firstcol = L.ptx_a_element(lane, i)
    A = torch.zeros(16, 32, dtype=torch.float64)
    A[row, firstcol + index[row, firstcol // 4, i % 2]] = a
    B = torch.zeros(32, 8, dtype=torch.float64)
    B[8 * (i // 2) + 2 * (lane % 4) + i % 2, (lane >> 2).expand(32, 8)] = b   # b_i: k, n = g
    return A @ B


def model_kernel(x, values_r, meta_r, bias, config, splits=1):
    WN, WM, WK, MI, NI, _stages = KERNEL_CONFIGS[config]  # the pipeline's slot rotation is not modeled
    M, K = x.shape
    N = values_r.shape[0] * 16
    BN, BM, BK = WN * MI * 16, WM * NI * 8, WK * 64
    tile_value_bytes, tile_meta_bytes, x_row_bytes = BK * 16, BK * 2, BK * 2
    meta_offset = BN // 16 * tile_value_bytes
    x_offset = meta_offset + BN // 16 * tile_meta_bytes
    stage_bytes = x_offset + BM * x_row_bytes
    vbytes = values_r.contiguous().view(torch.uint8).view(N // 16, 16 * K)
    mbytes = meta_r.contiguous().view(torch.uint8).view(N // 16, 2 * K)
    xbytes = x.contiguous().view(torch.uint8).view(M, 2 * K)
    total_stages = -(-K // BK)
    per_split = -(-total_stages // splits)
    splits = -(-total_stages // per_split)
    words = lambda buf, off, n: buf[off:off + 4 * n].view(torch.int32)  # noqa: E731  (n 32-bit LDS words)
    partial = torch.zeros(splits, M, N, dtype=torch.float64)
    for split in range(splits):
        begin = split * per_split
        n_stages = min(per_split, total_stages - begin)
        k_end = min(K, (begin + n_stages) * BK)
        for n0 in range(0, N, BN):
            for m0 in range(0, M, BM):
                acc = torch.zeros(WK, WM, WN, MI, NI, 16, 8, dtype=torch.float64)  # per warp: D tiles
                for stage in range(begin, begin + n_stages):
                    k0 = stage * BK
                    smem = torch.zeros(stage_bytes, dtype=torch.uint8)
                    for idx in range(BN // 16 * BK):                  # values
                        tile, off = divmod(idx, BK)
                        if k0 + (off // 32) * 32 < K:
                            trow = min(n0 // 16 + tile, N // 16 - 1)
                            smem[idx * 16:idx * 16 + 16] = vbytes[trow, k0 * 16 + off * 16:k0 * 16 + off * 16 + 16]
                    for idx in range(BN // 16 * BK // 8):             # metadata
                        tile, off = divmod(idx, BK // 8)
                        if k0 + (off // 8) * 64 < K:
                            trow = min(n0 // 16 + tile, N // 16 - 1)
                            dst = meta_offset + idx * 16
                            smem[dst:dst + 16] = mbytes[trow, k0 * 2 + off * 16:k0 * 2 + off * 16 + 16]
                    for idx in range(BM * BK // 8):                   # x, swizzled, zero-filled
                        r, c = divmod(idx, BK // 8)
                        dst = x_offset + r * x_row_bytes + ((c ^ (r & 7)) << 4)
                        if m0 + r < M and k0 + c * 8 < K:
                            smem[dst:dst + 16] = xbytes[m0 + r, 2 * (k0 + c * 8):2 * (k0 + c * 8) + 16]
                    for warp in range(8):
                        wn, wm, wk = warp % WN, (warp // WN) % WM, warp // (WN * WM)
                        if k0 + wk * 64 >= k_end:
                            continue
                        for i in range(MI):
                            tile = wn * MI + i
                            e = words(smem, meta_offset + tile * tile_meta_bytes + wk * 128, 32)  # lane l: word l
                            for sel in (0, 1):
                                a = words(smem, tile * tile_value_bytes + (wk * 2 + sel) * 512, 128).view(32, 4)
                                for j in range(NI):
                                    b = torch.zeros(32, 4, dtype=torch.int32)
                                    for q in range(4):      # ldmatrix.x4: lane 8q + r8 gives row r8 of matrix q
                                        for r8 in range(8):
                                            lane_a = 8 * q + r8
                                            rr = wm * NI * 8 + j * 8 + (lane_a & 7)
                                            chunk = wk * 8 + sel * 4 + (lane_a >> 3)
                                            addr = x_offset + rr * x_row_bytes + ((chunk ^ (lane_a & 7)) << 4)
                                            b[4 * r8:4 * r8 + 4, q] = words(smem, addr, 4)  # thread 4 r8 + t: word t
                                    acc[wk, wm, wn, i, j] += _mma_sp_model(a, e, sel, b)
                # epilogue: D[i][j] (rows of W x rows of x) -> red[wk][m][n] -> sum over wk in order
                red = torch.zeros(WK, BM, BN, dtype=torch.float64)
                for wk in range(WK):
                    for wm in range(WM):
                        for wn in range(WN):
                            for i in range(MI):
                                for j in range(NI):
                                    n_l, m_l = (wn * MI + i) * 16, wm * NI * 8 + j * 8
                                    red[wk, m_l:m_l + 8, n_l:n_l + 16] = acc[wk, wm, wn, i, j].t()
                tile_sum = red[0].clone()
                for wk in range(1, WK):
                    tile_sum += red[wk]
                rows, cols = min(BM, M - m0), min(BN, N - n0)
                partial[split, m0:m0 + rows, n0:n0 + cols] = tile_sum[:rows, :cols]
    out = partial[0].clone()
    for split in range(1, splits):
        out += partial[split]
    if bias is not None:
        out += bias.double()
    return out.to(x.dtype)


@pytest.mark.parametrize("config, M, N, K, splits", [
    ("decode8", 3, 80, 320, 1),     # N not a multiple of 64 (clamped tile rows), K % 128 == 64
    ("decode8", 5, 64, 512, 2),     # split-K
    ("decode16", 13, 64, 192, 1),
    ("medium", 17, 144, 128, 1),
    ("medium", 40, 128, 256, 2),
    ("large", 130, 128, 64, 1),    # two row blocks of x, the second one partial
])
def test_model_of_the_kernel_computes_x_wt_exactly(config, M, N, K, splits):
    g = torch.Generator().manual_seed(M * N + K)
    W, values, meta = make_24(N, K, torch.float16, seed=M + N)
    W = torch.where(W != 0, torch.randint(-3, 4, (N, K), generator=g).to(torch.float16), W)  # small integers
    values, meta_check = compress_local(W)
    x = torch.randint(-3, 4, (M, K), generator=g).to(torch.float16)
    bias = torch.randint(-8, 9, (N,), generator=g).to(torch.float16)
    values_r, meta_r = L.reorder_for_mma_sp(values, meta_check)
    want = (x.double() @ W.double().t() + bias.double()).to(torch.float16)   # exact sums
    assert_bit_equal(model_kernel(x, values_r, meta_r, bias, config, splits), want, f"model {config}")


# ---------------------------------------------------------------------------- the C++ op (CPU side)

def test_op_is_registered_with_its_schema():
    assert op_schema("sparse24_linear") == "effkern_C::sparse24_linear(Tensor input, Tensor values, Tensor meta, Tensor? bias) -> Tensor"


def _op_args(M=2, N=64, K=256, dtype=torch.float16):
    W, values, meta = make_24(N, K, dtype)
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    x = torch.randn(M, K).to(dtype)
    return dict(input=x, values=values_r, meta=meta_r, bias=torch.randn(N).to(dtype)), (values, meta)


def _bad_cases():
    good, (values, meta) = _op_args()
    return {
        "effkern's compressed values": (dict(good, values=values), r"reordered \[N / 16, 8 \* K\]"),
        "effkern's uint8 metadata": (dict(good, meta=meta), "meta must be the reordered int32"),
        "float32 input": (dict(good, input=good["input"].float()), "float16 or bfloat16"),
        "3-D input": (dict(good, input=good["input"][None]), "2-D"),
        "values of the other dtype": (dict(good, values=good["values"].bfloat16()), "values has dtype"),
        "K of another layout": (dict(good, input=good["input"][:, :128].contiguous()), r"8 \* K"),
        "K not a multiple of 64": (dict(good, input=torch.zeros(2, 96, dtype=torch.float16),
                                        values=torch.zeros(4, 768, dtype=torch.float16)), "K % 64 == 0"),
        "meta of the wrong shape": (dict(good, meta=good["meta"][:, :64].contiguous()), r"\[4, 128\]"),
        "non-contiguous values": (dict(good, values=good["values"].t().contiguous().t()), "contiguous"),
        "misaligned meta": (dict(good, meta=misaligned(good["meta"])), "16-byte aligned"),
        "bias of the wrong length": (dict(good, bias=good["bias"][:5]), r"bias must be \[64\]"),
        "bias of the other dtype": (dict(good, bias=good["bias"].float()), "bias has dtype"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_op_argument_checks_raise_clear_errors(case):
    kwargs, message = _bad_cases()[case]
    assert_op_raises("sparse24_linear", kwargs, message)


@pytest.mark.parametrize("dtype", DTYPES)
def test_op_on_cpu_tensors_passes_the_checks_then_says_there_is_no_cpu_kernel(dtype):
    kwargs, _ = _op_args(N=208, K=320, dtype=dtype)
    assert_op_raises("sparse24_linear", kwargs, "no CPU kernel")
    assert_op_raises("sparse24_linear", dict(kwargs, bias=None), "no CPU kernel")


def test_cpp_shape_rule_is_the_python_predicate():
    """The C++ check (csrc/cuda/sparse24.h supports()) accepts exactly what the layout predicate
    does, for shapes the op can be given (values [N / 16, 8 K])."""
    for N in (16, 48, 64, 208):
        for K in (8, 32, 64, 96, 128, 192, 320):
            values = torch.zeros(N // 16, 8 * K, dtype=torch.float16)
            meta = torch.zeros(N // 16, K // 2, dtype=torch.int32)
            accepted = cpp_checks_accept("sparse24_linear", torch.zeros(1, K, dtype=torch.float16), values, meta, None)
            assert accepted == L.cuda_kernel_supports(1, N, K, torch.float16), (N, K)


# ---------------------------------------------------------------------------- the kernel (GPU)

def run_kernel(x, values, meta, bias):
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    return torch.ops.effkern_C.sparse24_linear(x, values_r.cuda(), meta_r.cuda(), bias)


def check_against_float64(M, N, K, dtype, with_bias, seed=0):
    W, values, meta = make_24(N, K, dtype, seed=seed)
    x, bias = random_input_and_bias(M, N, K, dtype, with_bias, seed=seed + 100)
    out = run_kernel(x, values, meta, bias)
    assert_kernel_matches_float64(out, x, W.cuda(), bias, f"M={M} N={N} K={K} {dtype}")
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 16, 17, 130, 1024])
@pytest.mark.parametrize("N, K", [(256, 512), (208, 320), (384, 4096)])  # edges / partial stages / split-K
def test_gpu_kernel_matches_float64(N, K, M, dtype, with_bias, poison_empty):
    check_against_float64(M, N, K, dtype, with_bias)


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N, K", [(1, 4096, 4096), (8, 4096, 4096), (16, 11008, 4096), (33, 4096, 11008),
                                     (64, 1024, 1024), (4096, 4096, 4096)])
def test_gpu_kernel_llm_shapes(M, N, K, dtype, poison_empty):
    check_against_float64(M, N, K, dtype, with_bias=True)


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M_rows, N, K", [(64, 208, 320), (16, 128, 256)])
def test_gpu_kernel_reads_every_weight_bit_exactly(M_rows, N, K, dtype, poison_empty):
    """x = one-hot rows e_k: y[m, n] = W[n, k_m], one exact product in the fp32 sum, so the output
    is the kernel's view of W itself and must equal it bit for bit (a layout error anywhere
    shows up as a wrong element). M_rows picks the tile configuration (decode or medium)."""
    W, values, meta = make_24(N, K, dtype, seed=11)
    values_r, meta_r = (t.cuda() for t in L.reorder_for_mma_sp(values, meta))
    for k0 in range(0, K, M_rows):
        rows = min(M_rows, K - k0)
        x = torch.zeros(rows, K, dtype=dtype, device="cuda")
        x[torch.arange(rows), k0 + torch.arange(rows)] = 1
        out = torch.ops.effkern_C.sparse24_linear(x, values_r, meta_r, None)
        assert_bit_equal(out.cpu(), W[:, k0:k0 + rows].t().contiguous(), f"W[:, {k0}:{k0 + rows}] from the kernel")


@pytest.mark.gpu
def test_gpu_kernel_is_deterministic_and_takes_any_input_strides(poison_empty):
    N, K = 256, 2048
    W, values, meta = make_24(N, K, torch.bfloat16)
    x = torch.randn(K, 5, dtype=torch.bfloat16, device="cuda").t()  # not contiguous
    a = run_kernel(x, values, meta, None)
    b = run_kernel(x.contiguous(), values, meta, None)
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_kernel_empty_m():
    W, values, meta = make_24(64, 256, torch.float16)
    out = run_kernel(torch.empty(0, 256, dtype=torch.float16, device="cuda"), values, meta, None)
    assert tuple(out.shape) == (0, 64)


@pytest.mark.gpu
def test_gpu_kernel_rejects_tensors_on_another_device():
    assert_rejects_tensors_on_another_device("sparse24_linear", _op_args()[0], "values")


@pytest.mark.smoke
@pytest.mark.gpu
def test_gpu_reorder_on_cuda_tensors_is_the_cpu_reorder():
    W, values, meta = make_24(208, 320, torch.bfloat16, seed=5)
    cpu = L.reorder_for_mma_sp(values, meta)
    gpu = L.reorder_for_mma_sp(values.cuda(), meta.cuda())
    for a, b, name in zip(cpu, gpu, ("values_r", "meta_r")):
        assert b.is_cuda
        assert_bit_equal(b.cpu(), a, name)
    assert_bit_equal(L.emulate_mma_sp_reads(*gpu).cpu(), W, "W emulated on the GPU")
