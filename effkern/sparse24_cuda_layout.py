"""The reordered 2:4 sparse weight of effkern's CUDA kernel on the sparse tensor cores
(csrc/cuda/sparse24.cu: ``mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{f16,bf16}``
for float16 / bfloat16 weights, ``mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.s32.s8.s8.s32``
for int8 weights).

Pure PyTorch; runs on CPU and GPU tensors. ``reorder_for_mma_sp`` turns effkern's compressed 2:4
format (``values`` [N, K / 2], ``meta`` uint8 [N, ceil(K / 8)], see below) into the per-lane order
in which the kernel's 16-byte loads feed the sparse MMA's A fragments and metadata registers,
once, offline; ``restore_from_mma_sp`` is its exact inverse. ``emulate_mma_sp_reads`` reads the
reordered tensors the way the kernel and the hardware do, by the PTX ISA rules written out
below (not by inverting the reorder), and rebuilds the dense W; the tests compare it with the
original bit for bit and check that it fails for deliberately wrong layouts. The dtype of the
values (float16 / bfloat16, or int8) selects the instruction and so the layout.

effkern's format (produced by ``effkern.compress_24``), W [N, K] 2:4 sparse along K::

    group G of row n = W[n, 4G : 4G + 4], kept positions i0 < i1 (its nonzeros, completed with
    its lowest-index zeros), values[n, 2G] = W[n, 4G + i0], values[n, 2G + 1] = W[n, 4G + i1],
    code = i0 | i1 << 2 in byte G // 2 of meta[n], low nibble for even G, high nibble for odd G.

The operation: y [M, N] = x [M, K] @ W^T. The kernel makes W the sparse operand A of
``mma.sp.m16n8k32`` (16 rows of W x 32 dense k per instruction; int8: ``mma.sp.m16n8k64``, 16
rows x 64 dense k, accumulating in int32) and x the dense operand B (8 rows of x per
instruction, "col" layout = x row-major), so the instruction computes a 16 x 8 tile of
y^T = W x^T; the epilogue writes it transposed into y.

PTX ISA facts used (PTX ISA 9.x, section 9.7.14.6 "Matrix multiply-accumulate operation using
mma.sp instruction with sparse matrix A")
===============================================================================================

lane = %laneid, groupID g = lane >> 2, threadID_in_group t = lane % 4.

[P1] "Sparse matrix storage" (9.7.14.6.1), .f16/.bf16: every chunk of 4 consecutive elements of
     a row of A holds 2 zeros and 2 kept elements; only the kept ones are stored in the A
     operand, and their positions in the chunk are two 2-bit indices in the metadata operand e.
     For ``mma.sp::ordered_metadata`` the two indices of a chunk must be increasing from the LSB
     (9.7.14.6.3: "requires the indices in the sparsity metadata to be sorted in an increasing
     order starting from LSB"), so the meaningful 4-bit values are 0b0100, 0b1000, 0b1001,
     0b1100, 0b1101, 0b1110 = i0 | i1 << 2 with i0 < i1: exactly effkern's code.
[P2] Same section: "m16n8k32: A thread-pair within a group of four consecutive threads
     contributes the sparsity metadata. Hence, the sparsity selector must be either 0 (threads
     T0, T1) or 1 (threads T2, T3)". The selector f is an immediate operand of the instruction.
[P3] "Matrix Fragments for sparse mma.m16n8k32 with .f16 and .bf16 types" (9.7.14.6.2.2,
     Figure 120), multiplicand A: four .b32 registers, each holding the two kept (non-zero)
     elements of one 4-wide chunk, elements a0..a7 (a_{2r} in the low half of register r):
         row      = g        for a_i with 0 <= i < 2 or 4 <= i < 6,   g + 8 otherwise
         firstcol = 4 t      for a_i with i < 4,   4 t + 16 for i >= 4;   lastcol = firstcol + 3
     so register r = 0, 1, 2, 3 covers (row g, k 4t..4t+3), (g + 8, 4t..), (g, 16+4t..),
     (g + 8, 16+4t..), the chunk's first kept element (lower index) in the low 16 bits.
[P4] Same section, metadata (Figure 122, "Sparse MMA .m16n8k32 metadata layout for .f16/.bf16
     type"): e is a .b32 holding 16 2-bit indices, each pair the indices of one 4-wide chunk.
     The figure's assignment, for the metadata thread pair (T_{2f}, T_{2f+1}) of group g:
         thread T_{2f + p}, bits [4c + 3 : 4c]      -> row g,     chunk 4p + c (k 16p + 4c ..)
         thread T_{2f + p}, bits [16 + 4c + 3 : 16 + 4c] -> row g + 8, chunk 4p + c
     (c = 0..3; within a nibble the lower 2 bits are the first index). The figure is an image;
     the same assignment is spelled out in text by LLVM's MLIR integration test
     mlir/test/Integration/Dialect/SparseTensor/GPU/CUDA/sparse-mma-2-4-f16.mlir ("Lower i16
     bits <- A_meta[quad_id, pair_id]", upper <- row quad_id + 8, metadata 16x2xi16 with i16
     column p covering k 16p .. 16p + 15, indices little-endian in the i16: 0x8888 for positions
     0 and 2), and by CUTLASS's SM89 sparse-QMMA emulation (cutlass/arch/mma_sparse_sm89.h,
     "E[TA] = T0:00 T0:01 T1:00 T1:01 ... T3:01 T0:02 T0:03 ..., E[TB] = T0:04 T0:05 ...": the
     first thread of the pair holds the A elements a0..a3 of the quad = k 0..15, the second
     a4..a7 = k 16..31, rows g in the low and g + 8 in the high 16 bits).
[P5] B (Figure 121) and C/D: b_j = rows k 8j + 2t, 8j + 2t + 1 (j = 0..3) of column n = g;
     c0, c1 = (row g, columns 2t, 2t + 1), c2, c3 = (row g + 8, same columns), as for dense
     m16n8k16. In the kernel B comes from ldmatrix.x4 over x (not reordered offline).
[P6] 9.7.14.6.3 Notes: "mma.sp instruction may have substantially reduced performance on some
     target architectures. Hence, it is advised to use mma.sp::ordered_metadata" (PTX ISA 8.5,
     sm_80 and later): the kernel uses it, which is why reorder_for_mma_sp rejects unordered codes.

The 8-bit instruction, ``mma.sp.m16n8k64`` with .s8 (same sections; its A fragment and metadata
layout is the one of all 8-bit types of m16n8k64, .u8/.s8 and the FP8 ones):

[Q1] "Sparse matrix storage" (9.7.14.6.1), .u8/.s8 m16n8k64: the 2:4 granularity of [P1]: every
     chunk of 4 consecutive elements of a row of A has 2 kept elements with 2-bit indices, and
     for ordered_metadata the two indices of a chunk increase from the LSB: the same 4-bit code
     i0 | i1 << 2 (i0 < i1) as effkern's meta nibble.
[Q2] Same section: for m16n8k64 with 8-bit types all four threads of each group of four
     contribute the metadata, so the sparsity selector must be 0.
[Q3] "Matrix Fragments for sparse mma.m16n8k64 with .u8/.s8 ... type" (9.7.14.6.2), A: four .b32
     registers, each holding the 4 kept int8 elements of 8 consecutive elements (two 4-wide
     chunks) of one row, elements a0..a15, a_i = byte i % 4 of register i // 4:
         row      = g        for a_i with 0 <= i < 4 or 8 <= i < 12,   g + 8 otherwise
         firstcol = 8 t      for a_i with i < 8,   8 t + 32 for i >= 8;   lastcol = firstcol + 7
     bytes 0, 1 of a register are the two kept elements (lower index first) of the chunk
     firstcol .. firstcol + 3, bytes 2, 3 those of the chunk firstcol + 4 .. firstcol + 7. This
     is [P3] with every count doubled (and the documented .u4/.s4 m16n8k128 rule, "row = g for
     0 <= i < 8 || 16 <= i < 24", firstcol = 16 t / 16 t + 64, halved).
[Q4] Metadata: each thread's e holds 16 2-bit fields, LSB first. In text (the figure is an
     image), CUTLASS's SM89 sparse-QMMA emulation (cutlass::arch::emu, ``convert_E``,
     "Representation of E in QMMA": "For sparse 16864 MMAs: All threads within a group of four
     consecutive threads contribute the sparsity metadata", with "TX:Y" = the index of thread
     X's Yth element of operand A):
         E[T0] = T0:00 T0:01 T0:02 T0:03 T1:00 T1:01 T1:02 T1:03 T2:00 ... T3:03
         E[T1] = T0:04 .. T0:07 T1:04 .. T1:07 T2:04 .. T3:07
         E[T2] = T0:08 .. T0:11 T1:08 .. T3:11,    E[T3] = T0:12 .. T0:15 T1:12 .. T3:15
     i.e. field 4u + j (j = 0..3) of the word of thread T_t of group g is the index of element
     a_{4t+j} of thread T_u of the same group: by [Q3] row g + 8 (t % 2), chunk 8 (t // 2) +
     2u + j // 2, the first (j even) or second (j odd) kept element of that chunk. So nibble c
     (c = 0..7) of lane (g, t)'s word is the code of row g + 8 (t % 2), chunk 8 (t // 2) + c.
     The same for s8 itself in CuTe (CUTLASS), MMA_Traits<SM80_SPARSE_16x8x64_S32S8S8S32_TN>:
     ELayout ((2, 2, 8), 32):((8, 512, 1), 0) over the column-major 16 x 64 tile puts lane
     4 g + t's word at row g + 8 (t % 2), k 32 (t // 2) .. + 31, and ALayout ((4, 8), (8, 2, 2)):
     ((128, 1), (16, 8, 512)) is [Q3] (a review checked both, 2026-11-28).

The reordered tensors
=====================

float16 / bfloat16 (mma.sp.m16n8k32, [P1]-[P5]): values_r [N / 16, 8 K] in W's dtype. Row mt =
rows 16 mt .. 16 mt + 15 of W (one m16 tile), as K / 32 tiles of 512 bytes, tile ks = dense k
32 ks .. 32 ks + 31 = one mma.sp::
    row mt:  | ks = 0 | ks = 1 | ... |                                       512 B = 256 values each
    tile ks: | lane 0: 16 B | lane 1: 16 B | ... | lane 31: 16 B |          registers r = 0..3 each
    lane l = 4 g + t, register r, half h (h = 0 the low 16 bits: the chunk's first kept element):
        values_r[mt, 256 ks + 8 l + 2 r + h] = values[16 mt + g + 8 (r % 2),  16 ks + 2 (t + 4 (r // 2)) + h]
                                             = W[16 mt + g + 8 (r % 2),  32 ks + 4 (t + 4 (r // 2)) + i_h]
    e.g. lane 6 (g = 1, t = 2), register 3, half 1 of tile (mt, ks) = the second kept element of
    row 16 mt + 9, chunk 6 (dense k 32 ks + 24 .. 32 ks + 27) = values[16 mt + 9, 16 ks + 13]

meta_r int32 [N / 16, K / 2]. Row mt as K / 64 blocks of 32 words (128 B), block j = dense k
64 j .. 64 j + 63 = the two mma of k32 steps ks = 2j (selector f = 0) and 2j + 1 (f = 1): every
lane's one metadata register serves both, the selector choosing whose word the hardware reads::
    lane l = 4 g + q, q = 2 f + p (f = q // 2 the selector it serves, p = q % 2 its place in the pair)
    bits of meta_r[mt, 32 j + l]:
        31..28 27..24 23..20 19..16 | 15..12 11..8  7..4   3..0
         c = 3  c = 2  c = 1  c = 0 |  c = 3  c = 2  c = 1  c = 0
        row 16 mt + g + 8           |  row 16 mt + g
    nibble c of half hh = code of row 16 mt + g + 8 hh, group G = 16 j + 8 f + 4 p + c
        (dense k 4G .. 4G + 3 = k32 step 2j + f, chunk 4p + c)
    e.g. lane 6 (g = 1, q = 2: f = 1, p = 0), bits 23..20 (hh = 1, c = 1) of block (mt, j) = the
    code of row 16 mt + 9, group 16 j + 9 (dense k 64 j + 36 .. 64 j + 39)

int8 (mma.sp.m16n8k64, [Q1]-[Q4]): the same 512-byte tiles, each now dense k 64 ks .. 64 ks + 63 =
one mma; lane l = 4 g + t, register r, byte h = 0..3 (bytes 0, 1: the two kept elements of the
register's first chunk, 2, 3: of its second)::
    values_r[mt, 512 ks + 16 l + 4 r + h] = values[16 mt + g + 8 (r % 2),  32 ks + 16 (r // 2) + 4 t + h]
    e.g. lane 6 (g = 1, t = 2), register 3, byte 2 of tile (mt, ks) = the first kept element of
    row 16 mt + 9, chunk 13 (dense k 64 ks + 52 .. 64 ks + 55) = values[16 mt + 9, 32 ks + 26]
In bytes this is the 16-bit layout: there values_r[mt, 256 ks + 8 l + 2 r + h] = values[.., 16 ks +
8 (r // 2) + 2 t + h] with 2-byte elements, so either way byte 512 ks + 16 l + 4 r + b of row mt of
values_r is byte 32 ks + 16 (r // 2) + 4 t + b of row 16 mt + g + 8 (r % 2) of values. meta_r is
int32 [N / 16, K / 2] as above, but block j of 32 words is ONE mma (k64 step ks = j, selector 0),
every lane's word read::
    bits of meta_r[mt, 32 j + l]:   31..28 .. 3..0 = nibbles c = 7 .. 0
    nibble c of lane l = 4 g + t = code of row 16 mt + g + 8 (t % 2), group G = 16 j + 8 (t // 2) + c
        (the row half in the lane's bit 0, the k32 half of the k64 tile in its bit 1)
    e.g. lane 7 (g = 1, t = 3), bits 23..20 (c = 5) of block (mt, j) = the code of row 16 mt + 9,
    group 16 j + 13 (dense k 64 j + 52 .. 64 j + 55: the chunk of the values example above)

The kernel: for m16 tile mt and k32 step ks, lane l loads the 16 bytes at values_r[mt, 256 ks +
8 l :] as its A registers (one LDS.128; the block copies the stage's bytes with 16-byte
cp.async) and the word meta_r[mt, 32 (ks // 2) + l] as e, and issues the mma with selector
f = ks % 2; int8: for k64 step ks, values_r[mt, 512 ks + 16 l :] and meta_r[mt, 32 ks + l],
selector 0. Requirements, either dtype: N % 16 == 0 and K % 64 == 0 (``layout_supported``; the
kernel's own rule, ``cuda_kernel_supports``, adds the dtype, the largest M and, for int8, K <=
2**17).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "TILE_ROWS", "K_STEP", "META_K", "MAX_M", "MAX_K_INT8",
    "k_step", "layout_supported", "cuda_kernel_supports", "reorder_for_mma_sp", "restore_from_mma_sp",
    "ptx_a_element", "ptx_metadata_threads", "ptx_metadata_field",
    "ptx_a_element_s8", "ptx_metadata_threads_s8", "ptx_metadata_field_s8", "emulate_mma_sp_reads",
]

TILE_ROWS = 16   # rows of W per mma m16 tile (a row of values_r / meta_r)
K_STEP = 32      # dense k per mma.sp.m16n8k32 (float16 / bfloat16; k_step gives int8's 64 too)
META_K = 64      # dense k per lane metadata word (16-bit: selectors 0 and 1; int8: one mma)
MAX_M = 65535 * 128  # the launch grid's limit (csrc/cuda/sparse24.h kMaxM)
MAX_K_INT8 = 2**17   # the int8 kernel's largest K: its int32 sums stay exact (see cuda_kernel_supports)
_DTYPES = (torch.float16, torch.bfloat16, torch.int8)
_DTYPE_NAMES = "float16 or bfloat16 (mma.sp.m16n8k32) or int8 (mma.sp.m16n8k64)"
_VALID_CODES = (0b0100, 0b1000, 0b1001, 0b1100, 0b1101, 0b1110)  # i0 | i1 << 2, i0 < i1

# Axes of the compressed values [N, K / 2], R = 4 // element size kept elements per A register
# (2 for 16-bit, 4 for int8):   row = 16 mt + 8 rh + g,   col = 8 R ks + 4 R rq + R t + h
# (register r = 2 rq + rh). values_r order: (mt, ks, g, t, rq, rh, h), lane = 4 g + t.
_VALUES_TO_R = (0, 3, 2, 5, 4, 1, 6)      # from (mt, rh, g, ks, rq, t, h)
# Axes of the codes [N, K / 4]:   row = 16 mt + 8 hh + g,   group = 16 j + 8 f + 4 p + c.
# 16-bit: meta_r word order (mt, j, g, f, p), nibble 4 hh + c, lane = 4 g + 2 f + p (f the selector).
# int8:   meta_r word order (mt, j, g, f, hh), nibble 4 p + c, lane = 4 g + 2 f + hh (f = t // 2).
_CODES_TO_R_16 = (0, 3, 2, 4, 5, 1, 6)    # from (mt, hh, g, j, f, p, c)
_CODES_TO_R_S8 = (0, 3, 2, 4, 1, 5, 6)    # from (mt, hh, g, j, f, p, c)


# ---------------------------------------------------------------------------------------- predicates

def k_step(dtype: torch.dtype) -> int:
    """Dense k per mma of the kernel for values of ``dtype``: 32 for float16 / bfloat16
    (mma.sp.m16n8k32), 64 for int8 (mma.sp.m16n8k64); either way one 512-byte tile of values_r."""
    if dtype not in _DTYPES:
        raise TypeError(f"the CUDA 2:4 kernel takes {_DTYPE_NAMES} values, got {dtype}")
    return 64 if dtype == torch.int8 else K_STEP


def layout_supported(N: int, K: int) -> bool:
    """The reordered layout's shape rule: N % 16 == 0 and K % 64 == 0, both positive."""
    return N > 0 and K > 0 and N % TILE_ROWS == 0 and K % META_K == 0


def cuda_kernel_supports(M: int, N: int, K: int, dtype: torch.dtype) -> bool:
    """Whether effkern's CUDA 2:4 kernel runs this problem (the same rule as
    effkern_cuda::sp24::supports in csrc/cuda/sparse24.h, plus the dtype and int8's K limit):
    float16/bfloat16 or int8, N % 16 == 0, K % 64 == 0 (both positive, K <= 2**28, N <= 2**30) and
    0 <= M <= MAX_M. Any M in that range is handled (rows of x past M are zero-filled and masked);
    the kernel picks its tile shape by M (decode tiles for M <= 16). Otherwise the op layer takes
    the Triton kernel.

    int8 also needs K <= MAX_K_INT8 = 2**17: the kernel accumulates int8 x int8 in int32, exact for
    any int8 operands while a dot product has at most K / 2 = 2**16 (2:4 sparse) products of
    magnitude <= 2**14 (-128 * -128), at most 2**30 in all."""
    return (dtype in _DTYPES and 0 <= M <= MAX_M and layout_supported(N, K) and K <= 2**28
            and N <= 2**30 and (dtype != torch.int8 or K <= MAX_K_INT8))


# ---------------------------------------------------------------------------------------- codes

def _unpack_codes(meta: Tensor, N: int, K: int) -> Tensor:
    """effkern's meta uint8 [N, ceil(K / 8)] -> uint8 codes [N, K / 4] (K % 8 == 0 here). Small
    integer types throughout the reorder: it runs on the GPU on a model's largest weights."""
    return torch.stack((meta & 0xF, meta >> 4), dim=-1).reshape(N, K // 4)


def _pack_codes(codes: Tensor) -> Tensor:
    """int64 codes [N, K / 4] (K % 8 == 0) -> effkern's meta uint8 [N, K / 8]."""
    N, G = codes.shape
    pairs = codes.view(N, G // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


def _pack_nibbles(nibbles: Tensor) -> Tensor:
    """[..., 8] of 4-bit values (any integer dtype) -> int32 [...], nibble s at bits 4 s .. 4 s + 3
    (nibble 7 reaches bit 31, int32's sign bit: shifts wrap in two's complement, as wanted)."""
    words = nibbles[..., 0].to(torch.int32)
    for s in range(1, 8):
        words |= nibbles[..., s].to(torch.int32) << (4 * s)
    return words


def _unpack_nibbles(words: Tensor) -> Tensor:
    """int32 [...] -> int64 [..., 8], nibble s = bits 4 s .. 4 s + 3."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int64)
    return (w.unsqueeze(-1) >> shifts) & 0xF


def _check_ordered(codes: Tensor, fn: str) -> None:
    i0, i1 = codes & 3, codes >> 2
    bad = ~(i0 < i1)
    if bool(bad.any()):
        n, G = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{fn}: row {n}, group {G} (k = {4 * G}..{4 * G + 3}) has metadata code "
                         f"{int(codes[n, G]):#06b}: the kernel's mma.sp::ordered_metadata needs two distinct "
                         f"kept positions i0 < i1 (code i0 | i1 << 2, one of "
                         f"{', '.join(f'{c:#06b}' for c in _VALID_CODES)}), as effkern.compress_24 writes them")


# ---------------------------------------------------------------------------------------- reorder

def _value_axes(N: int, K: int, dtype: torch.dtype) -> tuple[int, ...]:
    """Sizes of the values' axes (mt, rh, g, ks, rq, t, h) for ``dtype``'s instruction."""
    return (N // 16, 2, 8, K // k_step(dtype), 2, 4, 4 // dtype.itemsize)


def _code_axes(N: int, K: int) -> tuple[int, ...]:
    """Sizes of the codes' axes (mt, hh, g, j, f, p, c), the same for every dtype."""
    return (N // 16, 2, 8, K // META_K, 2, 2, 4)


def _codes_to_r(dtype: torch.dtype) -> tuple[int, ...]:
    return _CODES_TO_R_S8 if dtype == torch.int8 else _CODES_TO_R_16


def _to_r(x: Tensor, axes: tuple[int, ...], order: tuple[int, ...], shape: tuple[int, ...]) -> Tensor:
    """x split into ``axes``, permuted into ``order``, as ``shape`` (contiguous)."""
    return x.reshape(axes).permute(order).reshape(shape).contiguous()


def _from_r(x_r: Tensor, axes: tuple[int, ...], order: tuple[int, ...], shape: tuple[int, ...]) -> Tensor:
    """The inverse of ``_to_r``: x_r split into the permuted axes, permuted back, as ``shape``."""
    inverse = tuple(order.index(a) for a in range(len(order)))
    return x_r.reshape(tuple(axes[a] for a in order)).permute(inverse).reshape(shape).contiguous()


def reorder_for_mma_sp(values: Tensor, meta: Tensor) -> tuple[Tensor, Tensor]:
    """effkern's 2:4 format -> the CUDA kernel's: (values_r [N / 16, 8 K] in values' dtype,
    meta_r int32 [N / 16, K / 2]), as described in the module docstring. values is [N, K / 2]
    float16 or bfloat16 (the m16n8k32 layout) or int8 (the m16n8k64 layout), meta uint8
    [N, ceil(K / 8)]; N % 16 == 0 and K % 64 == 0. Every code must be ordered (i0 < i1), which
    effkern.compress_24 guarantees."""
    fn = "reorder_for_mma_sp"
    if not isinstance(values, Tensor) or values.dim() != 2:
        raise TypeError(f"{fn}: values must be a 2-D [N, K / 2] tensor, got {type(values).__name__} "
                        f"of shape {list(getattr(values, 'shape', []))}")
    if values.dtype not in _DTYPES:
        raise TypeError(f"{fn}: values must be {_DTYPE_NAMES}, the kernel's dtypes, got {values.dtype}")
    N, K = values.shape[0], values.shape[1] * 2
    if not layout_supported(N, K):
        raise ValueError(f"{fn}: the CUDA kernel's layout needs N % 16 == 0 and K % 64 == 0 (N, K > 0); got "
                         f"values of shape {list(values.shape)}: N = {N}, K = {K} (see cuda_kernel_supports)")
    if not isinstance(meta, Tensor) or meta.dtype != torch.uint8 or tuple(meta.shape) != (N, -(-K // 8)):
        raise ValueError(f"{fn}: meta must be uint8 [N, ceil(K / 8)] = [{N}, {-(-K // 8)}] for values of shape "
                         f"{list(values.shape)}, got {getattr(meta, 'dtype', type(meta).__name__)} of shape "
                         f"{list(getattr(meta, 'shape', []))}")
    if meta.device != values.device:
        raise RuntimeError(f"{fn}: meta is on {meta.device} but values is on {values.device}")
    codes = _unpack_codes(meta, N, K)
    _check_ordered(codes, fn)
    values_r = _to_r(values, _value_axes(N, K, values.dtype), _VALUES_TO_R, (N // 16, 8 * K))
    nibbles = _to_r(codes, _code_axes(N, K), _codes_to_r(values.dtype), (N // 16, K // 2, 8))
    return values_r, _pack_nibbles(nibbles).contiguous()


def restore_from_mma_sp(values_r: Tensor, meta_r: Tensor) -> tuple[Tensor, Tensor]:
    """The exact inverse of ``reorder_for_mma_sp``: (values [N, K / 2], meta uint8 [N, K / 8]);
    the dtype of values_r (float16 / bfloat16, or int8) selects the layout."""
    fn = "restore_from_mma_sp"
    if (not isinstance(values_r, Tensor) or values_r.dim() != 2 or values_r.shape[1] % 8
            or values_r.dtype not in _DTYPES):
        raise TypeError(f"{fn}: values_r must be the [N / 16, 8 K] tensor from reorder_for_mma_sp, "
                        f"{_DTYPE_NAMES}")
    N, K = values_r.shape[0] * 16, values_r.shape[1] // 8
    if not layout_supported(N, K):
        raise ValueError(f"{fn}: N = {N}, K = {K} is not a shape of the reordered layout (N % 16, K % 64)")
    if not isinstance(meta_r, Tensor) or meta_r.dtype != torch.int32 or tuple(meta_r.shape) != (N // 16, K // 2):
        raise ValueError(f"{fn}: meta_r must be int32 [N / 16, K / 2] = [{N // 16}, {K // 2}], got "
                         f"{getattr(meta_r, 'dtype', None)} of shape {list(getattr(meta_r, 'shape', []))}")
    values = _from_r(values_r, _value_axes(N, K, values_r.dtype), _VALUES_TO_R, (N, K // 2))
    codes = _from_r(_unpack_nibbles(meta_r), _code_axes(N, K), _codes_to_r(values_r.dtype), (N, K // 4))
    return values, _pack_codes(codes).contiguous()


# ---------------------------------------------------------------------------------------- PTX rules

def _a_fragment_element(lane, i, per_register):
    """[P3] (per_register = 2 kept elements per .b32 register) and [Q3] (4): (row, firstcol) of
    a_i, i = 0 .. 4 per_register - 1: row g for the first and third quarter of the elements, g + 8
    for the others; firstcol = 2 per_register t, plus 8 per_register in the second half."""
    n = per_register
    g = lane >> 2
    t = lane % 4
    if isinstance(i, Tensor) or isinstance(lane, Tensor):
        i = torch.as_tensor(i)
        low = (i < n) | ((i >= 2 * n) & (i < 3 * n))
        row = torch.where(low, g, g + 8)
        firstcol = 2 * n * t + torch.where(i >= 2 * n, 8 * n, 0)
        return row, firstcol
    low = i < n or 2 * n <= i < 3 * n
    return (g if low else g + 8), 2 * n * t + (8 * n if i >= 2 * n else 0)


def ptx_a_element(lane, i):
    """[P3] (row, firstcol) inside the 16 x 32 A tile of sparse mma.m16n8k32 .f16/.bf16 of the
    kept element a_i (i = 0..7; a_{2r} and a_{2r+1} are the low and high halves of register r)
    held by ``lane``: the element is one of the two kept ones of the chunk firstcol ..
    firstcol + 3 of that row. Works on ints and integer tensors (broadcasting)."""
    return _a_fragment_element(lane, i, 2)


def ptx_a_element_s8(lane, i):
    """[Q3] (row, firstcol) inside the 16 x 64 A tile of sparse mma.m16n8k64 .s8 of the kept
    element a_i (i = 0..15, byte i % 4 of register i // 4) held by ``lane``: the element is one of
    the four kept ones of the 8 elements firstcol .. firstcol + 7 of that row, bytes 0, 1 those of
    the chunk firstcol .. firstcol + 3 and bytes 2, 3 those of the next chunk (lower index first).
    Works on ints and integer tensors (broadcasting)."""
    return _a_fragment_element(lane, i, 4)


def ptx_metadata_threads(selector: int) -> tuple[int, int]:
    """[P2] The threads of each group of four (threadID_in_group) whose metadata register the
    m16n8k32 .f16/.bf16 instruction reads for sparsity selector 0 or 1, in pair order."""
    if selector not in (0, 1):
        raise ValueError(f"m16n8k32 with .f16/.bf16 takes sparsity selector 0 or 1, got {selector}")
    return (2 * selector, 2 * selector + 1)


def ptx_metadata_threads_s8(selector: int) -> tuple[int, int, int, int]:
    """[Q2] The threads of each group of four whose metadata register the m16n8k64 .s8
    instruction reads: all four, T0..T3, with the only sparsity selector it takes, 0."""
    if selector != 0:
        raise ValueError(f"m16n8k64 with .s8 takes sparsity selector 0 only, got {selector}")
    return (0, 1, 2, 3)


def ptx_metadata_field(p, field):
    """[P4] What the 2-bit field ``field`` (bits 2 field + 1 .. 2 field, field = 0..15) of the
    metadata register of the pair's thread ``p`` (0 = T_{2f}, 1 = T_{2f+1}) of group g describes:
    (row offset from g: 0 or 8, chunk 0..7 of the 32-wide A tile, which kept element: 0 = the
    first / lower index, 1 = the second). Works on ints and integer tensors (broadcasting)."""
    row_offset = 8 * (field // 8)
    chunk = 4 * p + (field % 8) // 2
    which = field % 2
    return row_offset, chunk, which


def ptx_metadata_field_s8(t, field):
    """[Q4] What the 2-bit field ``field`` (bits 2 field + 1 .. 2 field, field = 0..15) of the
    metadata register of thread T_t (t = 0..3) of group g of m16n8k64 .s8 describes: (row offset
    from g: 0 or 8, chunk 0..15 of the 64-wide A tile, which kept element: 0 = the first / lower
    index, 1 = the second). By [Q4] field 4u + j is the index of element a_{4t+j} of thread T_u
    of the group, placed by the A fragment rule [Q3]. Works on ints and integer tensors."""
    u, j = field // 4, field % 4
    i = 4 * t + j                                    # the element's number in T_u's fragment
    row_offset, firstcol = _a_fragment_element(u, i, 4)   # [Q3] with g = 0 (lane u of group 0)
    return row_offset, firstcol // 4 + (i % 4) // 2, i % 2


def _tile_slots(row: Tensor, chunk: Tensor, which: Tensor, chunks: int, what: str) -> Tensor:
    """Flat numbers (row * chunks + chunk) * 2 + which of (row, chunk, kept element) slots of a
    16 x chunks A tile; AssertionError when a rule puts one outside the tile."""
    inside = (row >= 0) & (row < 16) & (chunk >= 0) & (chunk < chunks) & (which >= 0) & (which < 2)
    if not bool(inside.all()):
        raise AssertionError(f"emulate_mma_sp_reads: {what} fall outside the 16 x {4 * chunks} A tile")
    return ((row * chunks + chunk) * 2 + which).reshape(-1)


def emulate_mma_sp_reads(values_r: Tensor, meta_r: Tensor) -> Tensor:
    """The dense W [N, K] (values_r's dtype) as the kernel's mma.sp instructions see it.

    float16 / bfloat16: for every m16 tile mt and k32 step ks, as csrc/cuda/sparse24.cu issues
    them, lane l holds the A registers values_r[mt, 256 ks + 8 l : + 8] (element a_i = entry i)
    and the metadata word meta_r[mt, 32 (ks // 2) + l], and the instruction (m16n8k32) runs with
    selector f = ks % 2. int8: for every k64 step ks, lane l holds values_r[mt, 512 ks + 16 l :
    + 16] (a_i = byte i) and meta_r[mt, 32 ks + l], and m16n8k64 runs with selector 0.

    Then, by the PTX rules only (not by inverting the reorder): the hardware reads the metadata
    of threads ``ptx_metadata_threads(f)`` (int8: ``ptx_metadata_threads_s8(0)``) of each group,
    each 2-bit field of which gives, by ``ptx_metadata_field`` (``ptx_metadata_field_s8``), the
    position of one kept element of one (row, chunk); each register element a_i of each lane
    belongs, by ``ptx_a_element`` (``ptx_a_element_s8``), to one (row, chunk), the low half (even
    byte) being the chunk's first kept element and the high half (odd byte) its second; the
    element is placed at column 4 chunk + index of that row of the dense 16 x 32 (16 x 64) tile,
    the rest of which is zero.

    Raises AssertionError when the fields or elements do not cover every (row, chunk, kept
    element) of a tile exactly once, or when a chunk's two indices are not increasing (undefined
    behavior for mma.sp::ordered_metadata)."""
    if not isinstance(values_r, Tensor) or values_r.dim() != 2 or values_r.dtype not in _DTYPES:
        raise TypeError(f"emulate_mma_sp_reads: values_r must be a 2-D [N / 16, 8 K] tensor, {_DTYPE_NAMES}")
    step = k_step(values_r.dtype)
    if values_r.shape[1] % (8 * step):
        raise TypeError(f"emulate_mma_sp_reads: values_r must be a [N / 16, 8 K] tensor with K % {step} == 0")
    NT, K = values_r.shape[0], values_r.shape[1] // 8
    N = NT * TILE_ROWS
    if K % META_K or meta_r.dtype != torch.int32 or tuple(meta_r.shape) != (NT, K // 2):
        raise TypeError(f"emulate_mma_sp_reads: meta_r must be int32 [N / 16, K / 2] = [{NT}, {K // 2}] with "
                        f"K % 64 == 0, got {meta_r.dtype} {list(meta_r.shape)}")
    s8 = values_r.dtype == torch.int8
    a_element = ptx_a_element_s8 if s8 else ptx_a_element
    metadata_threads = ptx_metadata_threads_s8 if s8 else ptx_metadata_threads
    metadata_field = ptx_metadata_field_s8 if s8 else ptx_metadata_field
    per_register = 4 // values_r.dtype.itemsize       # kept elements per .b32 A register
    elements = 4 * per_register                       # a_i per lane
    chunks = step // 4                                # 4-wide chunks per row of the A tile
    slots = 16 * chunks * 2                           # (row, chunk, kept element) of a tile = 32 * elements
    dev = values_r.device
    ar = lambda n: torch.arange(n, device=dev, dtype=torch.int64)  # noqa: E731
    KS = K // step

    # --- metadata: index[mt, ks, row 0..15, chunk, which 0..1] from the read threads' bits
    words = meta_r.to(torch.int64).view(NT, K // META_K, 32) & 0xFFFFFFFF
    index = torch.full((NT, KS, 16, chunks, 2), -1, dtype=torch.int64, device=dev)
    count = torch.zeros((NT, KS, 16, chunks, 2), dtype=torch.int64, device=dev)
    g = ar(8).view(8, 1, 1)
    field = ar(16).view(1, 1, 16)
    for ks in range(KS):
        f = 0 if s8 else ks % 2                          # the kernel's selector for this step
        threads = torch.tensor(metadata_threads(f), device=dev, dtype=torch.int64)
        p = ar(len(threads)).view(1, -1, 1)              # the thread's place in the list read
        lane = 4 * g + threads[p]                        # [8, P, 1]: the threads of group g
        e = words[:, ks * step // META_K, :][:, lane.view(-1)].view(NT, 8, -1, 1)  # each lane's word
        bits = (e >> (2 * field)) & 3                    # [NT, 8, P, 16]
        row_offset, chunk, which = metadata_field(p, field)
        shape = (8, len(threads), 16)
        flat = _tile_slots((g + row_offset).expand(shape), torch.as_tensor(chunk, device=dev).expand(shape),
                           torch.as_tensor(which, device=dev).expand(shape), chunks, "metadata fields")
        index[:, ks].view(NT, -1)[:, flat] = bits.reshape(NT, -1)
        count[:, ks].view(NT, -1).index_add_(1, flat, torch.ones(NT, flat.numel(), dtype=torch.int64, device=dev))
    if not bool((count == 1).all()):
        raise AssertionError(f"emulate_mma_sp_reads: the metadata fields cover {(count == 0).sum().item()} "
                             f"(row, chunk, element) slots never and {(count > 1).sum().item()} more than once")
    if not bool((index[..., 0] < index[..., 1]).all()):
        raise AssertionError("emulate_mma_sp_reads: a chunk's metadata indices are not increasing (undefined "
                             "behavior for mma.sp::ordered_metadata)")

    # --- A fragments: every element of every lane -> (row, chunk, which) -> dense column
    lane = ar(32).view(32, 1)
    i = ar(elements).view(1, elements)
    row, firstcol = a_element(lane, i)                   # [32, elements]
    chunk = firstcol // 4 + (i % per_register) // 2      # int8: bytes 2, 3 are the next chunk's
    which = (i % 2).expand_as(row)                       # low half / even byte: the first kept element
    slot = _tile_slots(row, chunk, which, chunks, "A fragment elements")  # lane-major, element-minor
    seen = torch.zeros(slots, dtype=torch.int64, device=dev).index_add_(0, slot, torch.ones_like(slot))
    if not bool((seen == 1).all()):
        raise AssertionError(f"emulate_mma_sp_reads: the A fragment elements cover {(seen == 0).sum().item()} "
                             f"(row, chunk, element) slots never and {(seen > 1).sum().item()} more than once")
    vals = values_r.view(NT, KS, slots)                  # entry lane * elements + i: what the kernel's LDS.128 gives
    pos = index.view(NT, KS, slots)[:, :, slot]          # metadata index of each element
    dense_row = (ar(NT).view(NT, 1, 1) * 16 + row.reshape(1, 1, slots))
    dense_col = (ar(KS).view(1, KS, 1) * step + 4 * chunk.reshape(1, 1, slots) + pos)
    W = torch.zeros(N, K, dtype=values_r.dtype, device=dev)
    W.view(-1)[(dense_row * K + dense_col).reshape(-1)] = vals.reshape(-1)
    return W
