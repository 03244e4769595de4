"""The CUDA 2:4 sparse kernel (csrc/cuda/sparse24.cu, mma.sp on the sparse tensor cores) and its
reordered weight (effkern/sparse24_cuda_layout.py).

CPU: the reorder's round trip is bit-exact, for float16 / bfloat16 (mma.sp.m16n8k32) and int8
(mma.sp.m16n8k64) values; the emulation of how the kernel and the hardware read the reordered
tensors (tile, k32 / k64 step, lane, A register element, metadata threads and bit field, by the
PTX ISA rules) rebuilds the dense W bit for bit, and fails for deliberately wrong layouts; the
PTX rule functions cover the A tile exactly once and agree with CUTLASS CuTe's layouts of the
same instructions; the C++ op is registered and its argument checks raise clear errors. GPU
(``-m gpu``): the kernel against a float64 reference.

Inputs come from the small compressor below (a random 2:4 pattern, compressed by hand in
effkern's format), independent of effkern.sparse24.
"""

from __future__ import annotations

import pytest
import torch

from effkern import sparse24_cuda_layout as L

from cuda_kernel_checks import (DTYPES, assert_bit_equal, assert_kernel_matches_float64, assert_op_raises,
                                assert_rejects_tensors_on_another_device, bits, cpp_checks_accept, misaligned,
                                needs_cuda_kernels, op_schema, random_input_and_bias, sparse24_tile_configs)

# (N, K): one m16 tile and one k64 block up; N not a multiple of 64 / 128, K not of 128.
LAYOUT_CASES = [(16, 64), (32, 128), (48, 192), (64, 256), (128, 64), (208, 320), (256, 512)]
LAYOUT_DTYPES = (*DTYPES, torch.int8)  # the m16n8k32 layout (16-bit) and the m16n8k64 one (int8)


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


def random_nonzero(shape, dtype, generator):
    """Random values of ``dtype``, none of them 0: standard normal rounded to float16 / bfloat16;
    for int8 uniform over [-127, 127] without 0."""
    if dtype == torch.int8:
        v = torch.randint(-127, 127, shape, generator=generator)
        return (v + (v >= 0)).to(torch.int8)
    return torch.randn(shape, generator=generator).to(dtype)


def make_24(N, K, dtype, seed=0, empty_fraction=0.2):
    """(W [N, K], values, meta): a random 2:4 pattern (positions uniform over the 6 pairs), random
    nonzero values (``random_nonzero``); ``empty_fraction`` of the kept entries set to 0 (groups
    with fewer nonzeros)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(N, K // 4, 4, generator=g).topk(2, dim=-1).indices
    mask = torch.zeros(N, K // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    mask &= torch.rand(N, K // 4, 4, generator=g) >= empty_fraction
    dense = random_nonzero((N, K // 4, 4), dtype, g)
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


def codes_of(meta: torch.Tensor) -> torch.Tensor:
    """effkern's meta uint8 [N, K / 8] -> the codes [N, K / 4] (int64), group G = nibble G % 2 of byte G // 2."""
    return torch.stack(((meta & 0xF).long(), (meta >> 4).long()), dim=-1).view(meta.shape[0], -1)


def test_local_compressor_follows_effkerns_format():
    W = torch.tensor([[0., 5., 0., 7., 0., 0., 0., 0.], [3., 0., 0., 0., 0., 0., 2., 1.]], dtype=torch.float16)
    values, meta = compress_local(W)
    assert values.tolist() == [[5., 7., 0., 0.], [3., 0., 2., 1.]]
    # row 0: group 0 keeps (1, 3) = 0b1101, group 1 (0, 1) = 0b0100; row 1: (0, 1), (2, 3) = 0b1110
    assert meta.tolist() == [[0b1101 | 0b0100 << 4], [0b0100 | 0b1110 << 4]]
    values8, meta8 = compress_local(W.to(torch.int8))
    assert values8.dtype == torch.int8 and values8.tolist() == values.tolist() and torch.equal(meta8, meta)


def test_random_int8_values_are_nonzero_where_kept():
    W, values, meta = make_24(64, 256, torch.int8, seed=1, empty_fraction=0.0)
    assert values.dtype == torch.int8 and bool((values != 0).all())
    assert int(values.min()) >= -127 and int(values.max()) <= 127
    assert bool(((W != 0).view(64, 64, 4).sum(-1) == 2).all())


# ---------------------------------------------------------------------------- the layout (CPU)

@pytest.mark.parametrize("dtype", LAYOUT_DTYPES)
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


@pytest.mark.parametrize("dtype", LAYOUT_DTYPES)
@pytest.mark.parametrize("N, K", LAYOUT_CASES)
def test_ptx_emulation_of_the_kernels_reads_rebuilds_W(N, K, dtype):
    W, values, meta = make_24(N, K, dtype, seed=2 * N + K)
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    assert_bit_equal(L.emulate_mma_sp_reads(values_r, meta_r), W, "W from the emulated mma.sp reads")


@pytest.mark.parametrize("dtype, extreme", [(torch.bfloat16, -0.0), (torch.int8, -128)])
def test_emulation_keeps_extreme_values_and_every_pattern(dtype, extreme):
    """All 6 kept-position pairs at every lane, register and element (the pair of row n, group G
    is number (G + n + n // 16) % 6: at a fixed place in the tile it steps by 5 per m16 tile,
    over 6 tiles), and an extreme value kept bit for bit: -0.0 (the kernel multiplies it, the
    emulation must not drop its sign), int8's -128."""
    N, K = 96, 128
    pairs = torch.tensor([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])
    n = torch.arange(N).view(N, 1)
    kept = pairs[(torch.arange(K // 4).view(1, -1) + n + n // 16) % 6]          # [N, K / 4, 2]
    vals = random_nonzero((N, K // 4, 2), dtype, torch.Generator().manual_seed(4))
    vals[0, 0, 0] = extreme
    W = torch.zeros(N, K // 4, 4, dtype=dtype).scatter_(-1, kept, vals).view(N, K)
    codes = kept[..., 0] | (kept[..., 1] << 2)
    meta = (codes.view(N, K // 8, 2)[..., 0] | (codes.view(N, K // 8, 2)[..., 1] << 4)).to(torch.uint8)
    values = vals.view(N, K // 2)
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    assert_bit_equal(L.emulate_mma_sp_reads(values_r, meta_r), W, "W")


def test_k_step():
    assert L.k_step(torch.float16) == L.k_step(torch.bfloat16) == L.K_STEP == 32
    assert L.k_step(torch.int8) == 64
    for dtype in (torch.float32, torch.int16, torch.uint8):
        with pytest.raises(TypeError, match="int8"):
            L.k_step(dtype)


def assert_covers_the_tile_once(row, chunk, which, chunks):
    """The (row, chunk, kept element) slots given (broadcast together) are the 16 rows x ``chunks``
    chunks x 2 kept elements of an A tile, each exactly once."""
    row, chunk, which = torch.broadcast_tensors(row, chunk, which)
    seen = torch.zeros(16, chunks, 2, dtype=torch.int64)
    seen.index_put_((row.flatten(), chunk.flatten(), which.flatten()), torch.ones(row.numel(), dtype=torch.int64),
                    accumulate=True)
    assert (seen == 1).all()


def test_ptx_a_fragment_rule_covers_the_tile_once():
    """[P3] (PTX ISA 9.7.14.6.2.2, Figure 120): the 32 lanes x 8 elements are the 16 rows x 8
    chunks x 2 kept elements of the A tile, each once; spot checks of the formula."""
    lanes = torch.arange(32).view(-1, 1)
    i = torch.arange(8).view(1, -1)
    row, firstcol = L.ptx_a_element(lanes, i)
    assert_covers_the_tile_once(row, firstcol // 4, i % 2, chunks=8)
    assert L.ptx_a_element(0, 0) == (0, 0)
    assert L.ptx_a_element(5, 2) == (9, 4)     # g = 1, t = 1, register 1: row g + 8, k 4t
    assert L.ptx_a_element(6, 7) == (9, 24)    # g = 1, t = 2, register 3: row g + 8, k 16 + 4t
    assert L.ptx_a_element(31, 4) == (7, 28)
    assert [L.ptx_a_element(4, k)[0] for k in range(8)] == [1, 1, 9, 9, 1, 1, 9, 9]


def test_ptx_a_fragment_rule_s8_covers_the_tile_once():
    """[Q3] (PTX ISA 9.7.14.6.2, sparse m16n8k64 .s8): the 32 lanes x 16 elements are the 16 rows
    x 16 chunks x 2 kept elements of the A tile, each once (bytes 2, 3 of a register in the chunk
    after firstcol's); spot checks of the formula."""
    lanes = torch.arange(32).view(-1, 1)
    i = torch.arange(16).view(1, -1)
    row, firstcol = L.ptx_a_element_s8(lanes, i)
    assert bool((firstcol % 8 == 0).all())
    assert_covers_the_tile_once(row, firstcol // 4 + (i % 4) // 2, i % 2, chunks=16)
    assert L.ptx_a_element_s8(0, 0) == (0, 0)
    assert L.ptx_a_element_s8(5, 4) == (9, 8)      # g = 1, t = 1, register 1: row g + 8, k 8t
    assert L.ptx_a_element_s8(6, 15) == (9, 48)    # g = 1, t = 2, register 3: row g + 8, k 32 + 8t
    assert L.ptx_a_element_s8(31, 8) == (7, 56)    # g = 7, t = 3, register 2: row g, k 32 + 8t
    assert [L.ptx_a_element_s8(4, k)[0] for k in range(16)] == [1] * 4 + [9] * 4 + [1] * 4 + [9] * 4


@pytest.mark.parametrize("selector", [0, 1])
def test_ptx_metadata_rule_covers_the_tile_once(selector):
    """[P2], [P4]: for each selector, the two threads' 2 x 16 two-bit fields of every group are
    the 16 rows x 8 chunks x 2 indices of the tile, each once; T_{2f} has k 0..15."""
    assert L.ptx_metadata_threads(selector) == (2 * selector, 2 * selector + 1)
    p = torch.arange(2).view(2, 1)
    field = torch.arange(16).view(1, 16)
    row_offset, chunk, which = L.ptx_metadata_field(p, field)
    g = torch.arange(8).view(8, 1, 1)  # every group of four lanes
    assert_covers_the_tile_once(g + row_offset, chunk, which, chunks=8)
    assert L.ptx_metadata_field(0, 0) == (0, 0, 0) and L.ptx_metadata_field(0, 1) == (0, 0, 1)
    assert L.ptx_metadata_field(0, 7) == (0, 3, 1)   # bits 15..14: row g, k 12..15, second index
    assert L.ptx_metadata_field(0, 8) == (8, 0, 0)   # bits 17..16: row g + 8
    assert L.ptx_metadata_field(1, 10) == (8, 5, 0)  # the second thread: k 16.., bits 21..20
    with pytest.raises(ValueError):
        L.ptx_metadata_threads(2)


def test_ptx_metadata_rule_s8_covers_the_tile_once():
    """[Q2], [Q4]: the four threads' 4 x 16 two-bit fields of every group are the 16 rows x 16
    chunks x 2 indices of the tile, each once; nibble c of T_t is the code of row g + 8 (t % 2),
    chunk 8 (t // 2) + c (the consistency check of [Q4])."""
    assert L.ptx_metadata_threads_s8(0) == (0, 1, 2, 3)
    for selector in (1, 2, 3):
        with pytest.raises(ValueError, match="selector 0 only"):
            L.ptx_metadata_threads_s8(selector)
    t = torch.arange(4).view(4, 1)
    field = torch.arange(16).view(1, 16)
    row_offset, chunk, which = L.ptx_metadata_field_s8(t, field)
    g = torch.arange(8).view(8, 1, 1)  # every group of four lanes
    assert_covers_the_tile_once(g + row_offset, chunk, which, chunks=16)
    assert torch.equal(row_offset.expand(4, 16), (8 * (t % 2)).expand(4, 16))
    assert torch.equal(chunk, 8 * (t // 2) + field // 2) and torch.equal(which.expand(4, 16), (field % 2).expand(4, 16))
    assert L.ptx_metadata_field_s8(0, 0) == (0, 0, 0) and L.ptx_metadata_field_s8(0, 1) == (0, 0, 1)
    assert L.ptx_metadata_field_s8(0, 2) == (0, 1, 0)    # T0:02 = byte 2 of T0's register 0: the next chunk
    assert L.ptx_metadata_field_s8(0, 4) == (0, 2, 0)    # T1:00: k 8..11
    assert L.ptx_metadata_field_s8(1, 0) == (8, 0, 0)    # T0:04 = register 1: row g + 8
    assert L.ptx_metadata_field_s8(2, 0) == (0, 8, 0)    # T0:08 = register 2: k 32..35
    assert L.ptx_metadata_field_s8(3, 15) == (8, 15, 1)  # T3:15: row g + 8, k 60..63, second index


# CUTLASS's CuTe describes the same fragments, as layouts (thread, value) -> offset in the tile
# stored column-major: MMA_Traits<SM80_SPARSE_16x8x32_F32F16F16F32_TN> (with the bf16 one, same
# layouts) and MMA_Traits<SM80_SPARSE_16x8x64_S32S8S8S32_TN> in include/cute/atom/
# mma_traits_sm80_sparse.hpp, as (shape, stride) of the thread and value modes. Their A counts
# every position of the 2:4 tile ("full indices": a register's 2 (int8: 4) kept elements are its
# chunk's (int8: two chunks') 4 (8) values); E gives the rows and k range of a thread's metadata.
CUTE_SPARSE = {
    16: dict(A=(((4, 8), (4, 2, 2)), ((64, 1), (16, 8, 256))), B=(((4, 8), (2, 4)), ((16, 1), (8, 64))),
             E=(((2, 2, 8), (16, 2)), ((256, 0, 1), (0, 8)))),
    8: dict(A=(((4, 8), (8, 2, 2)), ((128, 1), (16, 8, 512))), B=(((4, 8), (4, 4)), ((32, 1), (8, 128))),
            E=(((2, 2, 8), 32), ((8, 512, 1), 0))),
}
CUTE_C = (((4, 8), (2, 2)), ((32, 1), (16, 8)))  # SM80_16x8_Row, the C/D of both


def cute_coord(layout, thread, value, rows):
    """(row, column) of the tile (``rows`` rows, column-major) that ``layout`` gives (thread, value)."""
    def modes(shape, stride):
        if isinstance(shape, int):
            return [(shape, stride)]
        return [m for sh, st in zip(shape, stride) for m in modes(sh, st)]

    def offset(shape, stride, index):
        out = 0
        for size, step in modes(shape, stride):
            out += index % size * step
            index //= size
        return out

    (thread_shape, value_shape), (thread_stride, value_stride) = layout
    o = offset(thread_shape, thread_stride, thread) + offset(value_shape, value_stride, value)
    return o % rows, o // rows


@pytest.mark.parametrize("bits", [16, 8])
def test_ptx_rules_are_cutlass_cute_sparse_mma_layouts(bits):
    """effkern's PTX rules (A, metadata: effkern.sparse24_cuda_layout; B, C/D: the model below)
    against CuTe's: each kept element's row and chunk, each metadata field's row and k range, every
    B and C/D element."""
    cute = CUTE_SPARSE[bits]
    kept, per_chunk = (8, 2) if bits == 16 else (16, 4)   # kept A elements per lane, per register
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(kept):
            row, firstcol = (L.ptx_a_element if bits == 16 else L.ptx_a_element_s8)(lane, i)
            chunk = firstcol // 4 + (0 if bits == 16 else (i % 4) // 2)
            first = 8 * (i // 4) + 4 * ((i % 4) // 2) if bits == 8 else 4 * (i // 2)  # its chunk's values
            assert [cute_coord(cute["A"], lane, first + v, 16) for v in range(4)] == [
                (row, 4 * chunk + v) for v in range(4)], (bits, lane, i)
        for i in range(16 if bits == 8 else 8):
            k, n = ptx_b_element(lane, i, int8=bits == 8)
            assert cute_coord(cute["B"], lane, i, 8) == (n, k), (bits, lane, i)
        for i in range(4):
            assert cute_coord(CUTE_C, lane, i, 16) == ptx_c_element(lane, i), (lane, i)
        # metadata: the (row, chunk) pairs of the thread's fields are those of its rows and k range in
        # CuTe's E (16-bit: lane's t % 2 of the selected thread pair; the pairs are laid out alike)
        # (an E element, 16 or 32 bits, covers 16 or 32 k of its row: the metadata of 4 or 8 chunks)
        fields = [L.ptx_metadata_field(t % 2, f) if bits == 16 else L.ptx_metadata_field_s8(t, f) for f in range(16)]
        cute_e = {cute_coord(cute["E"], lane, v, 16) for v in range(32)}
        want = {(row - g, k // 4) for row, k0 in cute_e for k in range(k0, k0 + (16 if bits == 16 else 32), 4)}
        assert len(set(fields)) == 16 and {f[:2] for f in fields} == want and len(want) == 8, (bits, lane)


def test_layout_diagram_examples():
    """The worked examples of the module docstring."""
    N, K = 64, 256
    W, values, meta = make_24(N, K, torch.float16, seed=3, empty_fraction=0.0)
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    codes = codes_of(meta)
    for mt, ks in ((0, 0), (1, 3), (3, 7)):
        # lane 6 (g = 1, t = 2), register 3, half 1 -> values[16 mt + 9, 16 ks + 13]
        assert bits(values_r[mt, 256 * ks + 8 * 6 + 2 * 3 + 1]) == bits(values[16 * mt + 9, 16 * ks + 13])
    for mt, j in ((0, 0), (2, 1), (3, 3)):
        # lane 6 (q = 2: selector 1, first of the pair), bits 23..20 -> row 16 mt + 9, group 16 j + 9
        word = int(meta_r[mt, 32 * j + 6]) & 0xFFFFFFFF
        assert (word >> 20) & 0xF == int(codes[16 * mt + 9, 16 * j + 9])


def test_layout_diagram_examples_int8():
    """The worked int8 examples of the module docstring, and the corners of a tile."""
    N, K = 64, 256
    W, values, meta = make_24(N, K, torch.int8, seed=3, empty_fraction=0.0)
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    codes = codes_of(meta)
    for mt, ks in ((0, 0), (1, 2), (3, 3)):
        tile = values_r[mt, 512 * ks:512 * ks + 512]
        # lane 6 (g = 1, t = 2), register 3, byte 2 -> row 16 mt + 9, chunk 13: values[16 mt + 9, 32 ks + 26]
        assert tile[16 * 6 + 4 * 3 + 2] == values[16 * mt + 9, 32 * ks + 26]
        assert tile[0] == values[16 * mt, 32 * ks]                                   # lane 0, register 0, byte 0
        assert tile[16 * 31 + 4 * 1 + 3] == values[16 * mt + 15, 32 * ks + 15]       # lane 31, register 1, byte 3
        assert tile[16 * 31 + 4 * 2 + 0] == values[16 * mt + 7, 32 * ks + 28]       # lane 31, register 2, byte 0
    for mt, j in ((0, 0), (2, 1), (3, 3)):
        word = lambda lane: int(meta_r[mt, 32 * j + lane]) & 0xFFFFFFFF  # noqa: E731
        # lane 7 (g = 1, t = 3), bits 23..20 (c = 5) -> row 16 mt + 9, group 16 j + 13
        assert (word(7) >> 20) & 0xF == int(codes[16 * mt + 9, 16 * j + 13])
        assert word(0) & 0xF == int(codes[16 * mt, 16 * j])                         # lane 0, nibble 0
        assert (word(1) >> 28) & 0xF == int(codes[16 * mt + 8, 16 * j + 7])         # lane 1 (t = 1), nibble 7
        assert (word(31) >> 28) & 0xF == int(codes[16 * mt + 15, 16 * j + 15])      # lane 31 (g = 7, t = 3), nibble 7


def test_int8_layout_is_the_documented_formula():
    """Every byte and nibble of the int8 layout against the formulas the CUDA kernel reads:
    values_r[mt, 512 ks + 16 l + 4 r + h] = values[16 mt + g + 8 (r % 2), 32 ks + 16 (r // 2) + 4 t + h],
    nibble c of meta_r[mt, 32 j + l] = code of row 16 mt + g + 8 (t % 2), group 16 j + 8 (t // 2) + c."""
    N, K = 32, 128
    W, values, meta = make_24(N, K, torch.int8, seed=6)
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    v, vr, codes = values.tolist(), values_r.tolist(), codes_of(meta).tolist()
    words = [[w & 0xFFFFFFFF for w in row] for row in meta_r.tolist()]
    for mt in range(N // 16):
        for ks in range(K // 64):
            for lane in range(32):
                g, t = lane >> 2, lane % 4
                for r in range(4):
                    row = 16 * mt + g + 8 * (r % 2)
                    for h in range(4):
                        assert vr[mt][512 * ks + 16 * lane + 4 * r + h] == v[row][32 * ks + 16 * (r // 2) + 4 * t + h]
                row = 16 * mt + g + 8 * (t % 2)
                for c in range(8):
                    assert (words[mt][32 * ks + lane] >> (4 * c)) & 0xF == codes[row][16 * ks + 8 * (t // 2) + c]


# ---------------------------------------------------------------------------- the check fails wrong layouts

CHECK_DTYPES = (torch.float16, torch.int8)   # one per layout (bfloat16's is float16's)


def good_layout(dtype):
    W, values, meta = make_24(64, 256, dtype, seed=7, empty_fraction=0.0)  # every kept value nonzero
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    assert rebuilds(values_r, meta_r, W)
    return W, values, meta, values_r, meta_r


@pytest.fixture(params=CHECK_DTYPES, ids=str)
def good(request):
    return good_layout(request.param)


def test_check_fails_two_metadata_nibbles_swapped(good):
    W, _, _, values_r, meta_r = good
    nib = L._unpack_nibbles(meta_r)
    for a, b in ((0, 1), (0, 4), (3, 7)):  # same row half / across the row halves (16-bit), k halves (int8)
        bad = nib.clone()
        # the first word whose nibbles a and b differ
        idx = (bad[..., a] != bad[..., b]).nonzero()[0]
        word = bad[idx[0], idx[1]]
        word[a], word[b] = word[b].clone(), word[a].clone()
        assert not rebuilds(values_r, L._pack_nibbles(bad), W), (a, b)


def test_check_fails_a_chunk_whose_two_indices_are_equal(good):
    """A metadata word that names one position twice (a zero-filled meta_r: index 0, 0 in every
    chunk) is undefined behavior for mma.sp::ordered_metadata: the emulation raises, it does not
    return a W with one of the two values written over the other."""
    _, _, _, values_r, meta_r = good
    with pytest.raises(AssertionError, match="not increasing"):
        L.emulate_mma_sp_reads(values_r, torch.zeros_like(meta_r))
    nib = L._unpack_nibbles(meta_r)
    nib[0, 0, 0] = 0b0101  # one chunk's two 2-bit fields both 1, the rest as reordered
    with pytest.raises(AssertionError, match="not increasing"):
        L.emulate_mma_sp_reads(values_r, L._pack_nibbles(nib))


def test_check_fails_metadata_words_of_the_wrong_lanes(good):
    W, _, _, values_r, meta_r = good
    words = meta_r.view(meta_r.shape[0], -1, 8, 2, 2)   # (mt, j, g, t // 2, t % 2)
    # 16-bit: as if selector f were served by the other pair (words of t = 0, 1 <-> 2, 3), or as if
    # the pair's two threads had their k halves exchanged; int8: the k32 halves, or the row halves
    for axis in (3, 4):
        assert not rebuilds(values_r, words.flip(axis).reshape(meta_r.shape).contiguous(), W), axis


def _pair_rule_read_into_s8(t, field):
    """[P4]'s thread-pair rule read into m16n8k64: T_t as thread t % 2 of the pair of selector t // 2,
    rows g and g + 8 in the halves of the word (the 16-bit layout of the same 64 k)."""
    row_offset, chunk, which = L.ptx_metadata_field(t % 2, field)
    return row_offset, 8 * (t // 2) + chunk, which


def _own_thread_elements_s8(t, field):
    """[Q4] misread: field 4u + j of T_t as the index of element a_{4u+j} of T_t itself."""
    return 8 * ((field // 4) % 2), 8 * (field // 8) + 2 * t + (field % 4) // 2, field % 2


WRONG_METADATA_RULES = {  # name: (dtype, rule, a wrong reading of it)
    "pair's threads exchanged": (torch.float16, "ptx_metadata_threads", lambda f: (2 * f + 1, 2 * f)),
    "threads f, f + 2": (torch.float16, "ptx_metadata_threads", lambda f: (f, f + 2)),
    "selector ignored": (torch.float16, "ptx_metadata_threads", lambda f: (0, 1)),
    "rows g, g + 8 exchanged": (torch.float16, "ptx_metadata_field",
                                lambda p, f: (8 - 8 * (f // 8), 4 * p + (f % 8) // 2, f % 2)),
    "s8: a thread pair, as for 16-bit": (torch.int8, "ptx_metadata_threads_s8", lambda f: (0, 1)),
    "s8: threads in the wrong order": (torch.int8, "ptx_metadata_threads_s8", lambda f: (1, 0, 3, 2)),
    "s8: the 16-bit thread-pair rule": (torch.int8, "ptx_metadata_field_s8", _pair_rule_read_into_s8),
    "s8: the word's own thread's elements": (torch.int8, "ptx_metadata_field_s8", _own_thread_elements_s8),
    "s8: rows g, g + 8 exchanged": (torch.int8, "ptx_metadata_field_s8",
                                    lambda t, f: (8 - 8 * (t % 2), 8 * (t // 2) + f // 2, f % 2)),
}


@pytest.mark.parametrize("case", list(WRONG_METADATA_RULES))
def test_check_fails_a_wrong_metadata_rule(case, monkeypatch):
    """The emulation with a wrong reading of [P2] / [P4] (16-bit) or [Q2] / [Q4] (int8): the check
    must notice."""
    dtype, rule, wrong = WRONG_METADATA_RULES[case]
    W, _, _, values_r, meta_r = good_layout(dtype)
    monkeypatch.setattr(L, rule, wrong)
    assert not rebuilds(values_r, meta_r, W)


def test_check_fails_two_values_swapped(good):
    W, _, _, values_r, meta_r = good
    R = 4 // W.dtype.itemsize             # kept elements per A register
    tile = 8 * L.k_step(W.dtype)          # values_r entries per mma
    # a chunk's two elements, across chunks / registers, registers, lanes, mma steps
    for a, b in ((0, 1), (1, 2), (0, R), (4 * R, 8 * R), (5, tile + 5)):
        bad = values_r.clone()
        assert bits(bad[0, a]) != bits(bad[0, b])
        bad[0, a], bad[0, b] = values_r[0, b], values_r[0, a]
        assert not rebuilds(bad, meta_r, W), (a, b)


@pytest.mark.parametrize("misread", ["registers 1 and 2 exchanged", "rows g and g + 8 exchanged",
                                     "threads t and t ^ 1 exchanged"])
def test_check_fails_a_wrong_a_fragment_rule(good, misread, monkeypatch):
    W, _, _, values_r, meta_r = good
    rule = "ptx_a_element_s8" if W.dtype == torch.int8 else "ptx_a_element"
    original = getattr(L, rule)
    R = 4 // W.dtype.itemsize  # a_i is in register i // R

    def wrong(lane, i):
        i = torch.as_tensor(i)
        if misread == "registers 1 and 2 exchanged":  # row g + 8, k 4t.. read as row g, k 16 + 4t.. and back (16-bit)
            return original(lane, torch.where(i // R == 1, i + R, torch.where(i // R == 2, i - R, i)))
        if misread == "rows g and g + 8 exchanged":   # registers 0 <-> 1, 2 <-> 3
            return original(lane, i ^ R)
        return original(lane ^ 1, i)

    monkeypatch.setattr(L, rule, wrong)
    assert not rebuilds(values_r, meta_r, W)


def test_check_fails_unreordered_tensors(good):
    W, values, meta, values_r, meta_r = good
    N, K = W.shape
    plain_values = values.reshape(N // 16, 8 * K)      # effkern's order, right shape
    assert not rebuilds(plain_values, meta_r, W)
    plain_meta = meta.view(torch.int32).reshape(N // 16, K // 2)   # effkern's bytes, right shape
    assert not rebuilds(values_r, plain_meta, W)


def test_check_fails_int8_values_in_the_16_bit_layout():
    """The two layouts differ: int8 values_r or meta_r built by the 16-bit reorder (the same
    values as float16, exactly) do not give W through the int8 emulation."""
    W, values, meta, values_r, meta_r = good_layout(torch.int8)
    values_r16, meta_r16 = L.reorder_for_mma_sp(values.to(torch.float16), meta)
    assert not rebuilds(values_r16.to(torch.int8), meta_r, W)
    assert not rebuilds(values_r, meta_r16, W)
    assert rebuilds(values_r16, meta_r16, W.to(torch.float16))


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


def test_cuda_kernel_supports_up_to_its_size_limits():
    ok = L.cuda_kernel_supports
    assert ok(1, 16, 2**28, torch.float16) and not ok(1, 16, 2**28 + 64, torch.float16)
    assert ok(1, 2**30, 64, torch.bfloat16) and not ok(1, 2**30 + 16, 64, torch.bfloat16)
    assert not ok(1, 8, 64, torch.float16) and not ok(1, 24, 64, torch.float16)  # N % 16, not % 8


def test_cuda_kernel_supports_int8():
    ok = L.cuda_kernel_supports
    for M in (0, 1, 16, 17, 4096, L.MAX_M):
        assert ok(M, 4096, 4096, torch.int8)
    assert ok(1, 16, 64, torch.int8) and ok(3, 208, 320, torch.int8)
    assert not ok(1, 4104, 4096, torch.int8) and not ok(1, 4096, 4128, torch.int8)   # N % 16, K % 64
    assert not ok(1, 0, 64, torch.int8) and not ok(1, 16, 0, torch.int8)
    assert not ok(L.MAX_M + 1, 16, 64, torch.int8) and not ok(-1, 16, 64, torch.int8)
    # K <= 2**17: at most 2**16 products of magnitude <= 2**14 per int32 sum; 16-bit has no such limit
    assert L.MAX_K_INT8 == 2**17 and (2**17 // 2) * 128 * 128 < 2**31
    assert ok(1, 16, 2**17, torch.int8) and not ok(1, 16, 2**17 + 64, torch.int8)
    assert ok(1, 16, 2**17 + 64, torch.float16) and ok(1, 16, 2**17 + 64, torch.bfloat16)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert not ok(1, 4096, 4096, dtype)


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


def test_int8_validation():
    W, values, meta = make_24(64, 256, torch.int8)
    for dtype in (torch.int16, torch.uint8, torch.int32):
        with pytest.raises(TypeError, match="or int8"):
            L.reorder_for_mma_sp(values.to(dtype), meta)
    with pytest.raises(ValueError, match="N % 16 == 0 and K % 64 == 0"):
        L.reorder_for_mma_sp(values[:, :48].contiguous(), meta[:, :12].contiguous())  # K = 96
    with pytest.raises(ValueError, match="N % 16 == 0 and K % 64 == 0"):
        L.reorder_for_mma_sp(values[:24], meta[:24])
    bad = meta.clone()
    bad[9, 0] = (bad[9, 0] & 0x0F) | (0b0110 << 4)   # group 1: i0 = 2 > i1 = 1
    with pytest.raises(ValueError, match=r"row 9, group 1 \(k = 4..7\)"):
        L.reorder_for_mma_sp(values, bad)
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    with pytest.raises(TypeError, match="or int8"):
        L.restore_from_mma_sp(values_r.to(torch.int16), meta_r)
    with pytest.raises(ValueError, match="int32"):
        L.restore_from_mma_sp(values_r, meta_r.to(torch.int64))
    with pytest.raises(TypeError, match="or int8"):
        L.emulate_mma_sp_reads(values_r.view(torch.uint8), meta_r)
    with pytest.raises(TypeError, match="K % 64 == 0"):   # K = 96: a whole number of k32 tiles, not of k64
        L.emulate_mma_sp_reads(torch.zeros(4, 8 * 96, dtype=torch.int8), torch.zeros(4, 48, dtype=torch.int32))


# ---------------------------------------------------------------------------- a model of the kernel (CPU)
#
# The kernel has not run yet; until it does, this Python model of csrc/cuda/sparse24.cu replays its
# index arithmetic (stage copies into a shared-memory byte array with the same offsets and swizzle,
# warp roles, per-lane LDS / ldmatrix addresses, the mma.sp operands by the PTX rules of
# effkern.sparse24_cuda_layout, the epilogue through the reduction buffer, split-K) on small
# integer inputs, where every sum is exact, so its output must equal x @ W^T + bias bit for bit
# (int8: (x @ W^T) * a_scale * w_scale + bias with power-of-two scales, also exact).
# The constants mirror the TileConfig instantiations in csrc/cuda/sparse24.cu.

KERNEL_CONFIGS = {  # name: (warps N, warps M, warps K, MI, NI, stages)
    "decode8": (4, 1, 2, 1, 1, 4), "decode16": (4, 1, 2, 1, 2, 4),
    "medium": (4, 2, 1, 2, 4, 4), "large": (2, 4, 1, 4, 4, 3),
}


def ptx_b_element(lane, i, int8=False):
    """(k, n) inside the B tile (32 x 8; int8 64 x 8) of element b_i held by ``lane`` (16-bit: half
    i % 2 of register i // 2; int8: byte i % 4 of register i // 4), by the PTX fragment of the
    dense B of mma.m16n8k32 (m16n8k64 .s8): n = g, k = 8 (i // 2) + 2 t + i % 2 (int8: 16 (i // 4)
    + 4 t + i % 4). Ints or broadcasting integer tensors."""
    g, t = lane >> 2, lane % 4
    k = 16 * (i // 4) + 4 * t + i % 4 if int8 else 8 * (i // 2) + 2 * t + i % 2
    return k, g + 0 * k


def ptx_c_element(lane, i):
    """(row, column) inside the 16 x 8 C/D tile of element c_i (i = 0..3) held by ``lane``: rows g,
    g + 8 (i // 2), columns 2 t, 2 t + 1 (i % 2)."""
    g, t = lane >> 2, lane % 4
    return g + 8 * (i // 2), 2 * t + i % 2


def _mma_sp_model(a_regs, e_words, selector, b_regs):
    """D (16 x 8, float64) of one mma.sp.m16n8k32 from the 32 lanes' A registers (int32 [32, 4]),
    metadata words (int32 [32]) and B registers (int32 [32, 4]), by the PTX rules [P2]-[P5]."""
    if a_regs.dtype == torch.int8:  # the int8 kernel's registers, viewed as int8 by the caller
        return _mma_sp_s8_model(a_regs, e_words, selector, b_regs)
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
    B[ptx_b_element(lane, i)] = b
    assert_ordered(index)
    return A @ B


def assert_ordered(index):
    """[P1]/[Q1]: every chunk's two indices increasing, else undefined behavior for
    mma.sp::ordered_metadata (e.g. metadata read from shared memory that no copy wrote)."""
    assert bool((index[..., 0] < index[..., 1]).all()), "an mma read metadata that is not ordered"


def _mma_sp_s8_model(a_regs, e_words, selector, b_regs):
    """D (16 x 8, int64: exact) of one mma.sp.m16n8k64 .s8 from the 32 lanes' A registers (int8
    [32, 16]: a_i = byte i), metadata words (int32 [32]) and B registers (int8 [32, 16]), by the PTX
    rules [Q2]-[Q4] and the 8-bit B fragment (byte i of a lane: k = 16 (i // 4) + 4 t + i % 4,
    column n = g)."""
    e = e_words.to(torch.int64) & 0xFFFFFFFF
    g, t, field = torch.arange(8).view(8, 1, 1), torch.arange(4).view(1, 4, 1), torch.arange(16).view(1, 1, 16)
    lanes = 4 * g + torch.tensor(L.ptx_metadata_threads_s8(selector))[t]
    row_offset, chunk, which = L.ptx_metadata_field_s8(t, field)
    index = torch.full((16, 16, 2), -1, dtype=torch.int64)
    index[(g + row_offset).expand(8, 4, 16), chunk.expand(8, 4, 16), which.expand(8, 4, 16)] = (
        (e[lanes] >> (2 * field)) & 3)
    lane, i = torch.arange(32).view(32, 1), torch.arange(16).view(1, 16)
    row, firstcol = L.ptx_a_element_s8(lane, i)
    chunk = firstcol // 4 + (i % 4) // 2
    A = torch.zeros(16, 64, dtype=torch.int64)
    A[row, 4 * chunk + index[row, chunk, i % 2]] = a_regs.to(torch.int64)
    B = torch.zeros(64, 8, dtype=torch.int64)
    B[ptx_b_element(lane, i, int8=True)] = b_regs.to(torch.int64)
    assert_ordered(index)
    return A @ B


def model_kernel(x, values_r, meta_r, bias, config, splits=1, a_scale=None, w_scale=None, run_past_k=False):
    """x and values_r float16 (bias float16), or int8 with a_scale [M] and w_scale [N] (float32)
    and a float16 bias: the kernel's result in float16. ``run_past_k``: a deliberately wrong
    kernel that also runs an int8 slice's second k64 step past K (what a review found in the
    first version: an mma on uncopied shared memory)."""
    WN, WM, WK, MI, NI, _stages = KERNEL_CONFIGS[config]  # the ring of slots: test_cuda_pipelines.py
    M, K = x.shape
    N = values_r.shape[0] * 16
    int8 = x.dtype == torch.int8
    s = x.element_size()
    k_step = 64 // s                                   # dense k per mma: 32 (16-bit) or 64 (int8)
    steps_per_word = 64 // k_step                      # mma steps per lane metadata word: 2 or 1
    BN, BM, BK = WN * MI * 16, WM * NI * 8, WK * 2 * k_step
    tile_value_bytes, tile_meta_bytes, x_row_bytes = BK // k_step * 512, BK * 2, BK * s
    meta_offset = BN // 16 * tile_value_bytes
    x_offset = meta_offset + BN // 16 * tile_meta_bytes
    stage_bytes = x_offset + BM * x_row_bytes
    vbytes = values_r.contiguous().view(torch.uint8).view(N // 16, 8 * K * s)
    mbytes = meta_r.contiguous().view(torch.uint8).view(N // 16, 2 * K)
    xbytes = x.contiguous().view(torch.uint8).view(M, s * K)
    total_stages = -(-K // BK)
    per_split = -(-total_stages // splits)
    splits = -(-total_stages // per_split)
    words = lambda buf, off, n: buf[off:off + 4 * n].view(torch.int32)  # noqa: E731  (n 32-bit LDS words)
    partial = torch.zeros(splits, M, N, dtype=torch.int64 if int8 else torch.float64)
    for split in range(splits):
        begin = split * per_split
        n_stages = min(per_split, total_stages - begin)
        k_end = min(K, (begin + n_stages) * BK)
        for n0 in range(0, N, BN):
            for m0 in range(0, M, BM):
                acc = torch.zeros(WK, WM, WN, MI, NI, 16, 8, dtype=torch.int64 if int8 else torch.float64)
                for stage in range(begin, begin + n_stages):
                    k0 = stage * BK
                    # bytes no copy writes: 0xFF (a NaN value, an invalid metadata code)
                    smem = torch.full((stage_bytes,), 0xFF, dtype=torch.uint8)
                    vk = k0 * (512 // k_step)                          # values_r bytes before k0
                    for idx in range(BN // 16 * tile_value_bytes // 16):  # values
                        tile, off = divmod(idx, tile_value_bytes // 16)
                        if k0 + (off // 32) * k_step < K:
                            trow = min(n0 // 16 + tile, N // 16 - 1)
                            smem[idx * 16:idx * 16 + 16] = vbytes[trow, vk + off * 16:vk + off * 16 + 16]
                    for idx in range(BN // 16 * BK // 8):             # metadata
                        tile, off = divmod(idx, BK // 8)
                        if k0 + (off // 8) * 64 < K:
                            trow = min(n0 // 16 + tile, N // 16 - 1)
                            dst = meta_offset + idx * 16
                            smem[dst:dst + 16] = mbytes[trow, k0 * 2 + off * 16:k0 * 2 + off * 16 + 16]
                    for idx in range(BM * x_row_bytes // 16):         # x, swizzled, zero-filled
                        r, c = divmod(idx, x_row_bytes // 16)
                        dst = x_offset + r * x_row_bytes + ((c ^ (r & 7)) << 4)
                        kk = k0 + c * (16 // s)
                        valid = m0 + r < M and kk < K
                        smem[dst:dst + 16] = xbytes[m0 + r, s * kk:s * kk + 16] if valid else 0
                    for warp in range(8):
                        wn, wm, wk = warp % WN, (warp // WN) % WM, warp // (WN * WM)
                        if k0 + wk * 2 * k_step >= k_end:
                            continue
                        for i in range(MI):
                            tile = wn * MI + i
                            for step in (0, 1):  # 16-bit: one word, selectors 0 and 1; int8: a word each
                                if int8 and step == 1 and k0 + wk * 2 * k_step + k_step >= k_end and not run_past_k:
                                    continue  # the int8 slice's second k64 step past K (K % 128 == 64)
                                word_block = wk * 2 // steps_per_word + step // steps_per_word
                                sel = step % steps_per_word
                                e = words(smem, meta_offset + tile * tile_meta_bytes + word_block * 128, 32)
                                a = words(smem, tile * tile_value_bytes + (wk * 2 + step) * 512, 128).view(32, 4)
                                for j in range(NI):
                                    b = torch.zeros(32, 4, dtype=torch.int32)
                                    for q in range(4):      # ldmatrix.x4: lane 8q + r8 gives row r8 of matrix q
                                        for r8 in range(8):
                                            lane_a = 8 * q + r8
                                            rr = wm * NI * 8 + j * 8 + (lane_a & 7)
                                            chunk = wk * 8 + step * 4 + (lane_a >> 3)
                                            addr = x_offset + rr * x_row_bytes + ((chunk ^ (lane_a & 7)) << 4)
                                            b[4 * r8:4 * r8 + 4, q] = words(smem, addr, 4)  # thread 4 r8 + t: word t
                                    if int8:  # registers as their 16 bytes
                                        acc[wk, wm, wn, i, j] += _mma_sp_model(a.view(torch.int8), e, sel,
                                                                               b.view(torch.int8))
                                    else:
                                        acc[wk, wm, wn, i, j] += _mma_sp_model(a, e, sel, b)
                # epilogue, per lane as the kernel: the C/D fragment c0..c3 of lane 4 g + t (PTX: rows g,
                # g + 8 of D, columns 2 t, 2 t + 1) -> red[(wk BM + m_local) (BN + 4) + n_local + 0 / stride
                # / 8 / stride + 8], then quads summed over wk in order
                stride = BN + 4
                red = torch.full((WK * BM * stride,), float("nan") if not int8 else -2**40, dtype=acc.dtype)
                lane = torch.arange(32)
                g, t = lane >> 2, lane & 3
                for wk in range(WK):
                    for wm in range(WM):
                        for wn in range(WN):
                            for i in range(MI):
                                for j in range(NI):
                                    D = acc[wk, wm, wn, i, j]
                                    frag = [D[ptx_c_element(lane, c)] for c in range(4)]
                                    n_local = (wn * MI + i) * 16 + g
                                    m_local = wm * NI * 8 + j * 8 + 2 * t
                                    p = (wk * BM + m_local) * stride + n_local
                                    for off, c in zip((0, stride, 8, stride + 8), frag):
                                        red[p + off] = c
                quads = torch.arange(BM * BN // 4)
                m_local, n_local = quads // (BN // 4), (quads % (BN // 4)) * 4
                base = (m_local * stride + n_local).view(-1, 1) + torch.arange(4)
                tile_sum = red[base].clone()
                for wk in range(1, WK):
                    tile_sum += red[base + wk * BM * stride]
                tile_sum = tile_sum.view(BM, BN)
                rows, cols = min(BM, M - m0), min(BN, N - n0)
                tile_sum = tile_sum[:rows, :cols]
                partial[split, m0:m0 + rows, n0:n0 + cols] = tile_sum
    out = partial[0].clone()
    for split in range(1, splits):  # int8: the exact int32 slices, added in int64
        out += partial[split]
    if int8:  # (exact sum * a_scale[m]) * w_scale[n] (+ bias) in fp32
        out = out.float() * a_scale[:, None] * w_scale
        return (out + bias.float() if bias is not None else out).to(torch.float16)
    if bias is not None:
        out += bias.double()
    return out.to(torch.float16)


@pytest.mark.parametrize("config, M, N, K, splits", [
    ("decode8", 3, 80, 320, 1),     # N not a multiple of 64 (clamped tile rows), K % 128 == 64
    ("decode8", 5, 64, 512, 2),     # split-K
    ("decode16", 13, 64, 192, 1),
    ("medium", 17, 144, 128, 1),
    ("medium", 40, 128, 256, 2),
    ("large", 130, 128, 64, 1),    # two row blocks of x, the second one partial
    ("decode16", 13, 64, 320, 2),  # split-K, the last split's last stage half past K
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


@pytest.mark.parametrize("config, M, N, K, splits", [
    ("decode8", 3, 80, 320, 1),     # N not a multiple of 64, K % 256 != 0 (a warp's slice past K)
    ("decode8", 5, 64, 768, 2),     # split-K
    ("decode16", 13, 64, 384, 1),
    ("medium", 17, 144, 192, 1),    # K % 128 == 64: the last slice's second k64 step past K
    ("medium", 40, 128, 512, 2),
    ("large", 130, 128, 128, 1),
    ("large", 70, 128, 64, 1),      # one k64 step in all
    ("decode16", 13, 64, 448, 2),   # split-K, the second split ending at a slice's first step
])
def test_model_of_the_int8_kernel_computes_the_dequantized_product_exactly(config, M, N, K, splits):
    """The int8 path (m16n8k64 .s8, twice the k per stage, a metadata word per mma, exact int32
    sums dequantized in the epilogue) with full-range int8 values and power-of-two scales, where
    every step is exact."""
    g = torch.Generator().manual_seed(M * N + K)
    W, values, meta = make_24(N, K, torch.int8, seed=M + N)
    x = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    a_scale = 2.0 ** -torch.randint(8, 12, (M,), generator=g).float()
    w_scale = 2.0 ** -torch.randint(4, 8, (N,), generator=g).float()
    bias = torch.randint(-8, 9, (N,), generator=g).to(torch.float16)
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    exact = (x.double() @ W.double().t()) * a_scale.double()[:, None] * w_scale.double() + bias.double()
    got = model_kernel(x, values_r, meta_r, bias, config, splits, a_scale=a_scale, w_scale=w_scale)
    assert_bit_equal(got, exact.to(torch.float16), f"int8 model {config}")
    if K % 128 == 64:  # the model sees an mma past K read metadata that no copy wrote
        with pytest.raises(AssertionError, match="not ordered"):
            model_kernel(x, values_r, meta_r, bias, config, splits, a_scale=a_scale, w_scale=w_scale,
                         run_past_k=True)


def test_kernel_configs_are_the_tile_configs_of_the_cu():
    """KERNEL_CONFIGS (the model's constants) are csrc/cuda/sparse24.cu's TileConfig instantiations."""
    names = {"Decode8": "decode8", "Decode16": "decode16", "Medium": "medium", "Large": "large"}
    assert {names[name]: cfg[:6] for name, cfg in sparse24_tile_configs().items()} == KERNEL_CONFIGS


# ---------------------------------------------------------------------------- the C++ op (CPU side)

def test_op_is_registered_with_its_schema():
    assert op_schema("sparse24_linear") == "effkern_C::sparse24_linear(Tensor input, Tensor values, Tensor meta, Tensor? bias) -> Tensor"
    assert op_schema("sparse24_int8_linear") == (
        "effkern_C::sparse24_int8_linear(Tensor input, Tensor input_scale, Tensor values, Tensor meta, "
        "Tensor weight_scale, Tensor? bias, ScalarType out_dtype) -> Tensor")


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


def _int8_op_args(M=2, N=64, K=256):
    W, values, meta = make_24(N, K, torch.int8)
    values_r, meta_r = L.reorder_for_mma_sp(values, meta)
    return dict(input=torch.randint(-127, 128, (M, K), dtype=torch.int8), input_scale=torch.rand(M),
                values=values_r, meta=meta_r, weight_scale=torch.rand(N), bias=torch.randn(N).bfloat16(),
                out_dtype=torch.bfloat16)


def _int8_bad_cases():
    good = _int8_op_args()
    return {
        "float input": (dict(good, input=good["input"].half()), "input must be int8"),
        "float32 output": (dict(good, out_dtype=torch.float32), "out_dtype must be float16 or bfloat16"),
        "16-bit values": (dict(good, values=good["values"].half()), "values has dtype"),
        "input_scale of the wrong length": (dict(good, input_scale=torch.rand(3)), r"input_scale must be \[2\]"),
        "input_scale float16": (dict(good, input_scale=torch.rand(2).half()), "input_scale must be float32"),
        "weight_scale of the wrong length": (dict(good, weight_scale=torch.rand(48)), r"weight_scale must be \[64\]"),
        "bias not of out_dtype": (dict(good, bias=good["bias"].half()), "bias has dtype .* but out_dtype"),
        "K past the int8 limit": (dict(good, input=torch.zeros(2, 2**17 + 64, dtype=torch.int8),
                                       values=torch.zeros(4, 8 * (2**17 + 64), dtype=torch.int8),
                                       meta=torch.zeros(4, (2**17 + 64) // 2, dtype=torch.int32)),
                                  r"K <= 131072 for int8"),
    }


@pytest.mark.parametrize("case", list(_int8_bad_cases()))
def test_int8_op_argument_checks_raise_clear_errors(case):
    kwargs, message = _int8_bad_cases()[case]
    assert_op_raises("sparse24_int8_linear", kwargs, message)


def test_int8_op_on_cpu_tensors_passes_the_checks_then_says_there_is_no_cpu_kernel():
    kwargs = _int8_op_args(N=208, K=320)
    assert_op_raises("sparse24_int8_linear", kwargs, "no CPU kernel")
    assert_op_raises("sparse24_int8_linear", dict(kwargs, bias=None, out_dtype=torch.float16), "no CPU kernel")


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
    for N in (16, 48):  # int8: the same, and K <= 2**17
        for K in (32, 64, 96, 2**17, 2**17 + 64):
            args = (torch.zeros(1, K, dtype=torch.int8), torch.ones(1), torch.zeros(N // 16, 8 * K, dtype=torch.int8),
                    torch.zeros(N // 16, K // 2, dtype=torch.int32), torch.ones(N), None, torch.bfloat16)
            assert cpp_checks_accept("sparse24_int8_linear", *args) == L.cuda_kernel_supports(1, N, K, torch.int8), K


# ---------------------------------------------------------------------------- the kernel (GPU)

def run_kernel(x, values, meta, bias):
    needs_cuda_kernels()
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
# edges / partial stages / split-K / split-K with a partial last stage
@pytest.mark.parametrize("N, K", [(256, 512), (208, 320), (384, 4096), (384, 2112)])
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
    needs_cuda_kernels()
    W, values, meta = make_24(N, K, dtype, seed=11)
    values_r, meta_r = (t.cuda() for t in L.reorder_for_mma_sp(values, meta))
    for k0 in range(0, K, M_rows):
        rows = min(M_rows, K - k0)
        x = torch.zeros(rows, K, dtype=dtype, device="cuda")
        x[torch.arange(rows), k0 + torch.arange(rows)] = 1
        out = torch.ops.effkern_C.sparse24_linear(x, values_r, meta_r, None)
        assert_bit_equal(out.cpu(), W[:, k0:k0 + rows].t().contiguous(), f"W[:, {k0}:{k0 + rows}] from the kernel")


def run_int8_kernel(x, values_r, meta_r, a_scale, w_scale, bias=None, out_dtype=torch.bfloat16):
    needs_cuda_kernels()
    return torch.ops.effkern_C.sparse24_int8_linear(x, a_scale.cuda(), values_r, meta_r, w_scale.cuda(), bias,
                                                    out_dtype)


@pytest.mark.smoke
@pytest.mark.gpu
@pytest.mark.parametrize("M_rows, N, K", [(64, 208, 320), (16, 128, 256), (130, 128, 512)])
def test_gpu_int8_kernel_reads_every_weight_bit_exactly(M_rows, N, K, poison_empty):
    """The int8 kernel (mma.sp m16n8k64 .s8) on one-hot rows of x with unit scales: y[m, n] =
    W[n, k_m] (any int8, exact in bf16), the kernel's view of W itself, bit for bit. M_rows picks
    the tile configuration (decode, medium, large)."""
    needs_cuda_kernels()
    W, values, meta = make_24(N, K, torch.int8, seed=12)
    values_r, meta_r = (t.cuda() for t in L.reorder_for_mma_sp(values, meta))
    for k0 in range(0, K, M_rows):
        rows = min(M_rows, K - k0)
        x = torch.zeros(rows, K, dtype=torch.int8, device="cuda")
        x[torch.arange(rows), k0 + torch.arange(rows)] = 1
        out = run_int8_kernel(x, values_r, meta_r, torch.ones(rows), torch.ones(N))
        assert_bit_equal(out.cpu(), W[:, k0:k0 + rows].t().bfloat16(), f"W[:, {k0}:{k0 + rows}] from the int8 kernel")


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 130, 1024])
# edges / partial stages / split-K / split-K with a partial last stage
@pytest.mark.parametrize("N, K", [(256, 512), (208, 320), (384, 4096), (384, 2112)])
def test_gpu_int8_kernel_dequantizes_the_exact_sum(N, K, M, out_dtype, poison_empty):
    """Full-range int8 x and W (-128 included), power-of-two scales: the exact int32 sum times the
    scales is exact in fp32 (split K adds exact slices), so y is the float64 result plus bias
    rounded once (the fp32 bias add is the one rounding before it)."""
    g = torch.Generator().manual_seed(M + N + K)
    W, values, meta = make_24(N, K, torch.int8, seed=M)
    W = torch.where(W != 0, torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8), W)
    values, meta = compress_local(W)
    x = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
    a_scale = 2.0 ** -torch.randint(10, 14, (M,), generator=g).float()
    w_scale = 2.0 ** -torch.randint(2, 6, (N,), generator=g).float()
    bias = torch.randn(N, generator=g).to(out_dtype)
    values_r, meta_r = (t.cuda() for t in L.reorder_for_mma_sp(values, meta))
    out = run_int8_kernel(x.cuda(), values_r, meta_r, a_scale, w_scale, bias.cuda(), out_dtype)
    scaled = ((x.double() @ W.double().t()) * a_scale.double()[:, None] * w_scale.double()).float()
    assert_bit_equal(out.cpu(), (scaled + bias.float()).to(out_dtype), f"int8 M={M} N={N} K={K}")


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
