"""The pre-shuffled INT4 weight layout of effkern's small-M CUDA W4A16 kernel (csrc/cuda/int4.cu).

Pure PyTorch; runs on CPU and GPU tensors. ``shuffle_for_cuda`` turns effkern's packed layout
(``qweight`` int32 [N, K / 8], nibble j of word w = q[n, 8w + j]; ``scales``/``zeros`` [N, K / G])
into the order in which the kernel's 16-byte loads and the mma.m16n8k16 B fragments consume it,
once, offline; ``unshuffle_from_cuda`` is its exact inverse. ``emulate_fragments`` reads a
shuffled tensor the way the kernel does (block, stage, warp, lane, word, nibble -> B-fragment
register half -> (k, n) by the PTX ISA's fragment layout) and rebuilds q; the tests compare it
with the original bit for bit.

Kernel geometry (mirrors csrc/cuda/int4.h): a thread block computes 64 output columns (8 mma
n8-subtiles) for up to 64 rows of x; 8 warps; a pipeline stage is k = 128 (8 tiles of k16, warp w
takes tile w of each stage: the warps split K and reduce in shared memory at the end).

Shuffled weight: qweight_s int32 [N / 64, 8 K]
=============================================

Row nb holds output columns 64 nb .. 64 nb + 63 (thread block nb), as K / 16 tiles of 512 bytes
(128 words); tile kt covers k = 16 kt .. 16 kt + 15::

    row nb:  | tile 0 | tile 1 | ... | tile 7 | tile 8 | ... |          512 B per tile
             |<------ pipeline stage 0 ------>|<- stage 1 ...           4096 B per stage
    tile kt: | lane 0: 16 B | lane 1: 16 B | ... | lane 31: 16 B |       = words i = 0..3 per lane

    int32 index within row nb:   128 kt + 4 lane + i          (kt = 8 stage + warp)

Loads: in stage s every thread tid (0..255) of the block issues one 16-byte cp.async of bytes
[16 tid, 16 tid + 16) of the stage's 4096 contiguous bytes (coalesced, 512 B per warp); warp w
then reads tile 8 s + w from shared memory with one 16-byte load per lane (lane l: bytes
[16 l, 16 l + 16) of the tile, conflict-free).

Inside one lane's 16 bytes (lane l: groupID g = l // 4, threadID_in_group t = l % 4; PTX
m16n8k16 .f16/.bf16 B fragment: b0, b1 hold rows k = 2t, 2t + 1, b2, b3 rows k = 2t + 8, 2t + 9,
all at column n = g; {b0, b1} is the first 32-bit register, {b2, b3} the second, low half first)::

    word i (i = 0..3) feeds the n8-subtiles c = 2i and c = 2i + 1 (columns 64 nb + 8c + g)

    bits of word i : 31..28 27..24 23..20 19..16 | 15..12 11..8  7..4   3..0
    nibble j       :    7      6      5      4   |    3     2     1      0
    j = 4h + p     :  p=3    p=2    p=1    p=0   |  p=3   p=2   p=1    p=0     h = 1 | h = 0

    p = 0 -> subtile 2i,     register {b0, b1}:  h = 0 -> b0 (k = 2t),     h = 1 -> b1 (k = 2t + 1)
    p = 1 -> subtile 2i,     register {b2, b3}:  h = 0 -> b2 (k = 2t + 8), h = 1 -> b3 (k = 2t + 9)
    p = 2 -> subtile 2i + 1, register {b0, b1}:  as p = 0
    p = 3 -> subtile 2i + 1, register {b2, b3}:  as p = 1

    value of nibble (i, p, h) of lane l in tile kt of row nb
        = q[64 nb + 8 (2i + p // 2) + g,  16 kt + 2t + 8 (p % 2) + h]

    e.g. lane 5 (g = 1, t = 1), word 0, nibble 4 (p = 0, h = 1): b1 of subtile 0 -> q[64 nb + 1, 16 kt + 3]

Dequantization (one lop3 per register): ((word >> 4p) & 0x000f000f) | 0x64006400 is the f16x2
pair (1024 + q_lo, 1024 + q_hi), nibble p in the low half and nibble p + 4 in the high half: one
whole B register (bf16: 0x43004300, 128 + q). Minus the prepared zero pair, times the scale pair.

Prepared scales and zeros: [K / G, N] in the activation dtype
=============================================================

Row r = group r (G = group_size, or K for -1), transposed so one group's 64 columns of a block
are 128 contiguous bytes, and permuted inside each 64 columns so a lane's 8 values (columns
8c + g, c = 0..7, one per subtile) are 16 contiguous bytes::

    scales_p[r, 64 nb + 8 g + c] = scales[64 nb + 8 c + g, r]          (zeros_p likewise)
    zeros_p = zeros + 1024 (float16) or zeros + 128 (bfloat16)          (exact: z in 0..16)

so that (1024 + q) - (1024 + z) = q - z exactly, and the multiplication by the scale is the only
rounding. Per stage the kernel copies the <= 4 group rows of its 128 k (64 columns each) into
shared memory; warp w uses row (16 w) // G of them (0 when G >= 128), lane l the 16 bytes at
[16 g, 16 g + 16) of it: value c is the scale of subtile c (element c of words 0..3, low half
first).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .int4 import _group, pack_int4, unpack_int4

__all__ = [
    "TILE_N", "TILE_K", "WARPS", "STAGE_K", "MAX_M", "ZERO_OFFSET",
    "cuda_kernel_supports", "shape_supported", "shuffle_for_cuda", "unshuffle_from_cuda",
    "mma_b_fragment_coords", "emulate_fragments", "emulate_scale_reads", "emulate_dequantize",
]

TILE_N = 64      # output columns per thread block (8 n8-subtiles)
TILE_K = 16      # k per mma and per 512-byte tile
WARPS = 8        # warps per block; warp w takes tile w of every stage
STAGE_K = TILE_K * WARPS  # 128
MAX_M = 64       # rows of x one block takes (4 m16 tiles); the predicate's M limit, see below
ZERO_OFFSET = {torch.float16: 1024.0, torch.bfloat16: 128.0}  # the exponent trick's bias
_MAGIC = {torch.float16: 0x6400, torch.bfloat16: 0x4300}     # 16-bit pattern of that bias
_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------- predicate

def shape_supported(N: int, K: int, group_size: int) -> bool:
    """The kernel's shape rule, the same as effkern_cuda::w4a16::supports in csrc/cuda/int4.h:
    N % 64 == 0, K % 128 == 0 (both > 0), and a group size G (K for -1) with K % G == 0,
    G % 32 == 0 and G dividing 128 or a multiple of 128 (so 32, 64, 128, 256 and -1 for every
    K % 128 == 0, and K % 256 == 0 for 256)."""
    if group_size != -1 and group_size <= 0:
        return False
    G = _group(group_size, K)
    return (N > 0 and K > 0 and N % TILE_N == 0 and K % STAGE_K == 0 and G % 32 == 0 and K % G == 0
            and (STAGE_K % G == 0 or G % STAGE_K == 0))


def cuda_kernel_supports(M: int, N: int, K: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether effkern's CUDA W4A16 kernel should run this problem: float16/bfloat16 activations,
    ``shape_supported(N, K, group_size)``, and 0 <= M <= 64. The kernel itself is correct for any
    M (row blocks of 64 become more thread blocks), but it is a decoding kernel: every 64 rows of
    x read and dequantize the whole weight again, so for larger M a GEMM-shaped kernel (Triton)
    is the right choice."""
    return dtype in _DTYPES and 0 <= M <= MAX_M and shape_supported(N, K, group_size)


# Axes of the dense q [N, K] split by the layout:
#   n = 64 nb + 8 (2 i + pc) + g          (pc = p // 2: which subtile of word i's pair)
#   k = 16 kt + 8 r + 2 t + h             (r = p % 2: register {b0,b1} or {b2,b3})
# Dense order (nb, i, pc, g, kt, r, t, h); shuffled order (nb, kt, g, t, i, h, pc, r), whose last
# three axes are the nibble j = 4 h + 2 pc + r, and (g, t) the lane 4 g + t.
_DENSE_TO_SHUFFLED = (0, 4, 3, 6, 1, 7, 2, 5)
_SHUFFLED_TO_DENSE = tuple(_DENSE_TO_SHUFFLED.index(a) for a in range(8))


def _check_format(fn: str, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                  dtype: Optional[torch.dtype]) -> tuple[int, int, int, torch.dtype]:
    if not isinstance(qweight, Tensor) or qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise TypeError(f"{fn}: qweight must be an int32 [N, K / 8] tensor (effkern's packed layout), "
                        f"got {getattr(qweight, 'dtype', type(qweight))} of shape {list(getattr(qweight, 'shape', []))}")
    N, K = qweight.shape[0], qweight.shape[1] * 8
    if group_size != -1 and (not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"{fn}: group_size must be a positive int or -1, got {group_size!r}")
    if not shape_supported(N, K, group_size):
        raise ValueError(f"{fn}: the CUDA kernel's layout needs N % 64 == 0, K % 128 == 0 and a group size "
                         f"dividing K that divides 128 or is a multiple of it (32, 64, 128, 256, -1); got "
                         f"N={N}, K={K}, group_size={group_size} (see cuda_kernel_supports)")
    G = _group(group_size, K)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if not isinstance(t, Tensor) or tuple(t.shape) != (N, K // G):
            raise ValueError(f"{fn}: {name} must have shape [N, K / group_size] = [{N}, {K // G}], "
                             f"got {list(getattr(t, 'shape', []))}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != qweight.device:
            raise RuntimeError(f"{fn}: {name} is on {t.device} but qweight is on {qweight.device}")
    dtype = dtype or scales.dtype
    if dtype not in _DTYPES:
        raise TypeError(f"{fn}: the CUDA kernel takes float16 or bfloat16 scales and zeros (the activation "
                        f"dtype); got {dtype}: pass dtype=<the input's dtype> to convert")
    return N, K, G, dtype


# ---------------------------------------------------------------------------------------- shuffle

def shuffle_for_cuda(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                     dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    """effkern's INT4 layout -> the CUDA kernel's: (qweight_s int32 [N / 64, 8 K],
    scales_p [K / G, N], zeros_p [K / G, N]) as described in the module docstring.

    ``dtype`` (default: scales.dtype) is the activation dtype the kernel will run in, float16 or
    bfloat16; scales in another dtype are rounded to it once here (the kernel multiplies in the
    activation dtype). zeros must hold integers in [0, 16] (quantize_int4 and the importers give
    0..15; the exponent trick below is exact up to 16)."""
    N, K, G, dtype = _check_format("shuffle_for_cuda", qweight, scales, zeros, group_size, dtype)
    z = zeros.to(torch.float32)
    if not bool(((z == z.round()) & (z >= 0) & (z <= 16)).all()):
        raise ValueError("shuffle_for_cuda: zeros must hold integers in [0, 16] (the kernel forms q - z "
                         "exactly with the exponent trick)")
    q = unpack_int4(qweight).view(N // 64, 4, 2, 8, K // 16, 2, 4, 2)  # (nb, i, pc, g, kt, r, t, h)
    qweight_s = pack_int4(q.permute(_DENSE_TO_SHUFFLED).reshape(N // 64, 64 * K))  # 8 K words

    def prepare(t: Tensor) -> Tensor:  # [N, K / G] -> [K / G, N], col 64 nb + 8 g + c <- 64 nb + 8 c + g
        return t.t().reshape(K // G, N // 64, 8, 8).transpose(2, 3).reshape(K // G, N).contiguous()

    scales_p = prepare(scales.to(dtype))
    zeros_p = prepare((z + ZERO_OFFSET[dtype]).to(dtype))
    return qweight_s.contiguous(), scales_p, zeros_p


def unshuffle_from_cuda(qweight_s: Tensor, scales_p: Tensor, zeros_p: Tensor,
                        group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The exact inverse of ``shuffle_for_cuda``: (qweight int32 [N, K / 8], scales [N, K / G],
    zeros [N, K / G]) in effkern's layout, scales and zeros in the prepared tensors' dtype."""
    fn = "unshuffle_from_cuda"
    if not isinstance(qweight_s, Tensor) or qweight_s.dtype != torch.int32 or qweight_s.dim() != 2 \
            or qweight_s.shape[1] % 8:
        raise TypeError(f"{fn}: qweight_s must be the int32 [N / 64, 8 K] tensor from shuffle_for_cuda")
    N, K = qweight_s.shape[0] * 64, qweight_s.shape[1] // 8
    if not shape_supported(N, K, group_size):
        raise ValueError(f"{fn}: N={N}, K={K}, group_size={group_size} is not a shape of the CUDA layout")
    G = _group(group_size, K)
    dtype = scales_p.dtype
    if dtype not in _DTYPES or zeros_p.dtype != dtype:
        raise TypeError(f"{fn}: scales_p and zeros_p must both be float16 or both bfloat16, got "
                        f"{scales_p.dtype} and {zeros_p.dtype}")
    for name, t in (("scales_p", scales_p), ("zeros_p", zeros_p)):
        if tuple(t.shape) != (K // G, N):
            raise ValueError(f"{fn}: {name} must have shape [K / group_size, N] = [{K // G}, {N}], "
                             f"got {list(t.shape)}")
    q = unpack_int4(qweight_s).view(N // 64, K // 16, 8, 4, 4, 2, 2, 2)  # (nb, kt, g, t, i, h, pc, r)
    qweight = pack_int4(q.permute(_SHUFFLED_TO_DENSE).reshape(N, K))

    def restore(t: Tensor) -> Tensor:
        return t.reshape(K // G, N // 64, 8, 8).transpose(2, 3).reshape(K // G, N).t().contiguous()

    zeros = (zeros_p.to(torch.float32) - ZERO_OFFSET[dtype]).to(dtype)
    return qweight.contiguous(), restore(scales_p), restore(zeros)


# ---------------------------------------------------------------------------------------- emulation

def mma_b_fragment_coords(lane, i):
    """(row k, column n) inside the 16 x 8 B tile of mma.m16n8k16 with .f16/.bf16 of element b_i
    (i = 0..3) held by ``lane``, from the PTX ISA ("Matrix Fragments for mma.m16n8k16 with
    floating point type"): groupID = lane >> 2, threadID_in_group = lane % 4,
    row = threadID_in_group * 2 + (i & 1) for i < 2, + 8 for i >= 2; col = groupID.
    b0, b1 are the low and high halves of the first .f16x2 register, b2, b3 of the second.
    Works on ints and on integer tensors (broadcasting)."""
    group_id = lane >> 2
    tid_in_group = lane % 4
    row = tid_in_group * 2 + (i & 1) + 8 * (i >= 2)
    return row, group_id


def _kernel_reads(qweight_s: Tensor):
    """For every nibble the kernel loads: (value, n, k) as int64 tensors of one shape, walking
    block nb, stage s, warp w, lane l, word i, nibble j exactly as csrc/cuda/int4.cu does."""
    if qweight_s.dtype != torch.int32 or qweight_s.dim() != 2 or qweight_s.shape[1] % (8 * STAGE_K):
        raise TypeError("emulate_fragments: qweight_s must be an int32 [N / 64, 8 K] tensor, K % 128 == 0")
    NB, K = qweight_s.shape[0], qweight_s.shape[1] // 8
    S = K // STAGE_K
    dev = qweight_s.device
    ar = lambda n: torch.arange(n, device=dev, dtype=torch.int64)  # noqa: E731
    nb = ar(NB).view(-1, 1, 1, 1, 1, 1)
    s = ar(S).view(1, -1, 1, 1, 1, 1)
    w = ar(WARPS).view(1, 1, -1, 1, 1, 1)
    lane = ar(32).view(1, 1, 1, -1, 1, 1)
    i = ar(4).view(1, 1, 1, 1, -1, 1)
    j = ar(8).view(1, 1, 1, 1, 1, -1)
    # cp.async: stage s = bytes [4096 s, 4096 s + 4096) of row nb into a shared slot; the warp's
    # 16-byte LDS: bytes [512 w + 16 lane, + 16) of the slot -> int32 word 1024 s + 128 w + 4 lane + i.
    word_index = s * 1024 + w * 128 + lane * 4 + i  # 4096 B = 1024 words per stage, 512 B per tile
    words = qweight_s.to(torch.int64)[nb.view(-1, 1), word_index.reshape(1, -1)].view(
        NB, S, WARPS, 32, 4, 1)
    value = (words >> (4 * j)) & 0xF
    # dequant_pair<p>: (word >> 4p) & 0x000f000f: nibble p -> low half (h = 0), p + 4 -> high (h = 1)
    p, h = j % 4, j // 4
    subtile = 2 * i + p // 2          # b[2i + p/2][p % 2] in the kernel
    b_index = 2 * (p % 2) + h         # register p % 2, half h -> b0..b3
    row, col = mma_b_fragment_coords(lane, b_index)
    n = nb * TILE_N + subtile * 8 + col
    k = s * STAGE_K + w * TILE_K + row  # warp w's k16 tile of stage s
    shape = torch.broadcast_shapes(value.shape, n.shape, k.shape)
    return value.expand(shape), n.expand(shape), k.expand(shape), NB * TILE_N, K


def emulate_fragments(qweight_s: Tensor) -> Tensor:
    """The dense q [N, K] (int64) as the kernel's mma B fragments see it: every nibble of the
    shuffled tensor is read as csrc/cuda/int4.cu reads it (block, stage, warp, lane, 16-byte load,
    word, nibble -> B register and half) and placed at the (k, n) the PTX fragment layout gives
    that register half (``mma_b_fragment_coords``). Raises if some (n, k) is fed zero or several
    times, i.e. if the layout is not a one-to-one map onto the weight."""
    value, n, k, N, K = _kernel_reads(qweight_s)
    flat = (n * K + k).reshape(-1)
    count = torch.zeros(N * K, dtype=torch.int64, device=qweight_s.device)
    count.index_add_(0, flat, torch.ones_like(flat))
    if not bool((count == 1).all()):
        raise AssertionError(f"emulate_fragments: the kernel's reads cover {(count == 0).sum().item()} weight "
                             f"elements never and {(count > 1).sum().item()} more than once")
    q = torch.empty(N * K, dtype=torch.int64, device=qweight_s.device)
    q[flat] = value.reshape(-1)
    return q.view(N, K)


def emulate_scale_reads(table_p: Tensor, K: int, group_size: int) -> Tensor:
    """The per-(n, group) values [N, K / G] that the kernel's lanes take from a prepared table
    (scales_p or zeros_p, [K / G, N]): stage s copies group rows 128 s // G onward, warp w uses
    row (16 w) // G of them (0 when G >= 128), lane l the 16 bytes at 16 (l // 4) of the block's
    64 columns, value c of which belongs to subtile c, column 64 nb + 8 c + l // 4."""
    G = _group(group_size, K)
    ng, N = table_p.shape
    dev = table_p.device
    ar = lambda n: torch.arange(n, device=dev, dtype=torch.int64)  # noqa: E731
    nb = ar(N // TILE_N).view(-1, 1, 1, 1, 1)
    s = ar(K // STAGE_K).view(1, -1, 1, 1, 1)
    w = ar(WARPS).view(1, 1, -1, 1, 1)
    lane = ar(32).view(1, 1, 1, -1, 1)
    c = ar(8).view(1, 1, 1, 1, -1)
    group_row = (s * STAGE_K) // G + (0 if G >= STAGE_K else (w * TILE_K) // G)
    col_p = nb * TILE_N + (lane // 4) * 8 + c              # where the lane's 16-byte load reads
    n = nb * TILE_N + c * 8 + lane // 4                    # the output column it scales
    shape = torch.broadcast_shapes(group_row.shape, col_p.shape)
    group_row, col_p, n = group_row.expand(shape), col_p.expand(shape), n.expand(shape)
    out = torch.full((N, ng), float("nan"), dtype=table_p.dtype, device=dev)
    out[n.reshape(-1), group_row.reshape(-1)] = table_p[group_row.reshape(-1), col_p.reshape(-1)]
    return out


def emulate_dequantize(qweight_s: Tensor, scales_p: Tensor, zeros_p: Tensor, group_size: int) -> Tensor:
    """W [N, K] in the prepared tables' dtype, computed the kernel's way: the 16-bit pattern
    MAGIC | q (= 1024 + q for float16, 128 + q for bfloat16), minus the prepared zero, times the
    scale, each step one rounding in that dtype (torch's CPU half/bfloat16 arithmetic rounds
    every operation to nearest, as the GPU's HSUB2/HMUL2 do)."""
    dtype = scales_p.dtype
    q = emulate_fragments(qweight_s)
    N, K = q.shape
    G = _group(group_size, K)
    biased = (q | _MAGIC[dtype]).to(torch.int16).view(dtype)
    s = emulate_scale_reads(scales_p, K, group_size).repeat_interleave(G, dim=1)
    z = emulate_scale_reads(zeros_p, K, group_size).repeat_interleave(G, dim=1)
    return (biased - z) * s
