"""INT8 matmul in Triton: per-row int8 quantization, and one GEMM kernel for W8A8 and W8A16.

Quantization, ``quantize_rows_int8_kernel`` (symmetric, one scale per row; used for the
activations' rows = tokens and for the weight's rows = output channels):
    s[r] = max_k |x[r, k]| / 127                        fp32, correctly rounded
    q[r, k] = clamp(round_half_even(x[r, k] / s[r]), -127, 127),   q = 0 where s = 0

GEMM, ``int8_matmul_kernel``, C[m, n] = epilogue(sum_k A[m, k] * B[k, n]), B an int8 weight
read through strides (W^T for the forward, W itself for the backward):
    W8A8   (A int8):   acc = sum_k A * B in int32 (exact), then
                       C = acc * a_scale[m] * b_scale[n] + bias[n]       fp32, cast to C's dtype
    W8A8 with the quantization fused (A float, QUANT_A): each program first takes the absmax of
                       its rows over all of K (the rows come from L2 after the first program),
                       then quantizes each A tile in registers exactly as quantize_rows_int8_kernel
                       does (the same helpers), so C is bit for bit the unfused one's; the row
                       scales are also stored for the split-K reduction
    W8A16  (A float):  B converted to A's dtype inside the K loop (exact: |B| <= 127),
                       fp32 accumulation on the 16-bit tensor cores, C = acc * b_scale[n] + bias[n]
    backward (A = grad_out, B = W, scales along the reduction): B dequantized in the loop,
                       b[k, n] * b_scale[k] rounded to A's dtype, C = acc
    int8_mm (A int8, no epilogue): C = acc, int32

Few rows (decoding): the split-K launch of kernels/_splitk.py; int32 partials are added in
int64, each slice short enough that its own int32 sum is exact (|a*b| <= 2^14, fewer than 2^17
terms: MAX_EXACT_K).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (cdiv, config, dot_precision, interpreted, next_power_of_2, on_device, prune_by_rows,
                      with_short_steps)
from ._splitk import (SPLIT_MAX_ROWS, TILE_NAMES, dequant_epilogue, launch_weight_gemm, store_tile, tile_kwargs,
                      weight_gemm_kernels, weight_gemm_tile)
from ._tma import block_shapes_hook, launch_persistent, tile_origin, tma_ready, tma_tile_dot

# 1.5 * 2^23: adding and subtracting it rounds an fp32 |v| < 2^22 to the nearest integer, ties to
# even (the fp32 add itself rounds that way). Plain IEEE adds, so also exact under the interpreter.
ROUND_MAGIC: tl.constexpr = tl.constexpr(12582912.0)
INT8_MAX: tl.constexpr = tl.constexpr(127.0)
# Longest K slice whose int32 sum of int8 products cannot overflow: each |a * b| <= 128^2 = 2^14,
# and 2^17 of them could reach 2^31 (every product (-128)^2), one past int32's largest value;
# 256 less (a multiple of every BLOCK_K) stays below it.
MAX_EXACT_K = 2**17 - 256


@triton.jit
def round_half_even(v):
    return (v + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def row_scales(x_ptr, rows64, row_ok, K, stride_xr, stride_xk, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # the rows' absmax over all of K, / 127 correctly rounded: (scale, the divisor to quantize by,
    # 1 where the scale is 0 so an all-zero row gives q = 0, not 0/0). A NaN in a row makes its
    # scale NaN, as torch's amax does (tl.maximum and tl.max default to IEEE maxNum, which drops
    # NaN: the row would come out finite)
    cols = tl.arange(0, BLOCK_K)[None, :]
    amax = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        m = row_ok[:, None] & (cols < K - k)
        x = tl.load(x_ptr + rows64[:, None] * stride_xr + (cols + k) * stride_xk, mask=m, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)), propagate_nan=tl.PropagateNan.ALL)
    # tl.max (maxNum) plus a NaN flag, not tl.reduce with a NaN-keeping combine: the interpreter
    # runs a custom combine element by element in Python (~25x slower); amax >= 0, so its row sum
    # is NaN exactly where the row holds a NaN
    total = tl.sum(amax, axis=1)
    scale = tl.math.div_rn(tl.where(total != total, total, tl.max(amax, axis=1)), INT8_MAX)
    return scale, tl.where(scale > 0.0, scale, 1.0)


@triton.jit
def quantize_tile(x, divisor):
    # clamp(round_half_even(x / divisor[row]), -127, 127) as int8
    v = round_half_even(tl.math.div_rn(x.to(tl.float32), divisor[:, None]))
    return tl.minimum(tl.maximum(v, -INT8_MAX), INT8_MAX).to(tl.int8)


@triton.jit
def quantize_rows_int8_kernel(
    x_ptr, q_ptr, scale_ptr,
    R, K,
    stride_xr, stride_xk, stride_qr, stride_qk,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)[None, :]
    # Pass 1: row absmax. Pass 2 reads the row again (from L2) to scale, round and store.
    scale, divisor = row_scales(x_ptr, rows64, row_ok, K, stride_xr, stride_xk, BLOCK_R, BLOCK_K)
    for k in range(0, K, BLOCK_K):
        m = row_ok[:, None] & (cols < K - k)
        x = tl.load(x_ptr + rows64[:, None] * stride_xr + (cols + k) * stride_xk, mask=m, other=0.0)
        tl.store(q_ptr + rows64[:, None] * stride_qr + (cols + k) * stride_qk, quantize_tile(x, divisor), mask=m)
    tl.store(scale_ptr + rows, scale, mask=row_ok)


@triton.jit
def int8_matmul_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr,
    M, N, K, K_PER_SPLIT,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn,
    A_INT8: tl.constexpr, QUANT_A: tl.constexpr, SCALE_K: tl.constexpr, DEQUANT: tl.constexpr,
    SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    split, k_start, k_end, offs_m, offs_n, rm, rn = weight_gemm_tile(M, N, K, K_PER_SPLIT, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak
    b_ptrs = b_ptr + (k_start + offs_k)[:, None] * stride_bk + rn[None, :] * stride_bn
    if QUANT_A:
        # rm wraps onto valid rows: every row of the tile has a scale (duplicates are not stored)
        a_scale, divisor = row_scales(a_ptr, rm, rm < M, K, stride_am, stride_ak, BLOCK_M, BLOCK_K)
        tl.store(a_scale_ptr + offs_m, a_scale, mask=offs_m < M)  # same values from every program

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if A_INT8 or QUANT_A else tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = k_end - k
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        # out_dtype named: Triton 3.6 checks the accumulator against it (default float32)
        if A_INT8:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        elif QUANT_A:
            acc = tl.dot(quantize_tile(a, divisor), b, acc, out_dtype=tl.int32)
        else:
            if SCALE_K:
                s = tl.load(b_scale_ptr + k + offs_k, mask=offs_k < k_end - k, other=0.0)
                b = (b.to(tl.float32) * s[:, None]).to(a.dtype)
            else:
                b = b.to(a.dtype)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if DEQUANT:
        if QUANT_A:  # the row scale from registers, first, as dequant_epilogue would apply it
            acc = acc.to(tl.float32) * a_scale[:, None]
        acc = dequant_epilogue(acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, bias_ptr,
                               SCALE_ROWS, SCALE_COLS, HAS_BIAS)
    store_tile(c_ptr, acc, split, offs_m, offs_n, M, N, stride_cs, stride_cm, stride_cn)


@triton.jit
def int8_matmul_tma_kernel(
    a_desc, w_desc, c_desc, a_scale_ptr, b_scale_ptr, bias_ptr,
    M, N, K, NUM_PROGRAMS,
    DEQUANT: tl.constexpr, SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
    OUT_BYTES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # OUT_BYTES, c's element size, is in the autotune key (c_desc's dtype cannot be: a descriptor
    # has none for the autotuner to read), so that a float32 output, whose staging tile takes
    # twice the shared memory, never reuses a tile chosen for a 16-bit one that it cannot fit.
    # int8 A [M, K] times the int8 weight W [N, K], transposed, as the persistent TMA GEMM of
    # kernels/_tma.py (Hopper): exact int32 accumulators (K <= MAX_EXACT_K), then
    # int8_matmul_kernel's epilogue. Descriptors: a in [BLOCK_M, BLOCK_K] tiles, w in
    # [BLOCK_N, BLOCK_K], c in [BLOCK_M, BLOCK_N].
    tile_out = tl.program_id(0) - NUM_PROGRAMS
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), NUM_PROGRAMS, flatten=True):
        acc = tma_tile_dot(a_desc, w_desc, tile, M, N, K, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32),
                           BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, "ieee")
        tile_out += NUM_PROGRAMS
        row, col = tile_origin(tile_out, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if DEQUANT:
            acc = dequant_epilogue(acc, row + tl.arange(0, BLOCK_M), col + tl.arange(0, BLOCK_N), M, N,
                                   a_scale_ptr, b_scale_ptr, bias_ptr, SCALE_ROWS, SCALE_COLS, HAS_BIAS)
        c_desc.store([row, col], acc.to(c_desc.dtype))


# ---------------------------------------------------------------------------------------
# Launch configurations. Large M: autotuned over tiles picked for H100 (int8 tiles 128 deep
# in K, 16-bit ones 64 deep; configs that do not fit shared memory are skipped by the
# autotuner). Few rows: a split-K launch at one narrow config, the split count sized to the
# SM count (kernels/_splitk.py). Under the interpreter: small fixed tiles, and a pretend SM
# count small enough that the tests' shapes take the split-K path too.

_GEMM_SHAPES = [
    # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)
    (128, 256, 128, 3, 8),
    (256, 128, 128, 3, 8),
    (128, 128, 128, 4, 4),
    (64, 128, 128, 4, 4),
    (128, 256, 64, 3, 8),
    (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (32, 64, 256, 4, 4),
    (16, 128, 256, 4, 4),
    (16, 64, 256, 3, 4),
]
_FIXED = {"interpreter": ((32, 32, 64, 4), 1, 4), "gpu": ((64, 128, 128, 8), 3, 4)}
# The split-K launch: 16 rows (the smallest tl.dot tile) by 64 columns, 256 deep.
_SPLIT = {"interpreter": ((16, 32, 64, 1), 1, 4), "gpu": ((16, 64, 256, 1), 4, 4)}
# stride_bk tells forward launches (B = W^T, unit stride along K) from backward ones (B = W);
# QUANT_A the fused W8A8 from W8A16 (both read a float A).
_gemm, _gemm_tuned = weight_gemm_kernels(int8_matmul_kernel, _GEMM_SHAPES,
                                         key=("M", "N", "K", "stride_bk", "QUANT_A"))
# The TMA GEMM (Hopper; int8 A, more than SPLIT_MAX_ROWS rows): the int8 tiles above, at stage
# counts that leave shared memory for the epilogue's staging tile (TMA stores read from it).
_TMA_SHAPES = [
    (128, 256, 128, 3, 8),
    (256, 128, 128, 3, 8),
    (128, 128, 128, 4, 8),
    (128, 64, 128, 4, 4),
    (64, 128, 128, 4, 4),
]
_FIXED_TMA = {"interpreter": _FIXED["interpreter"], "gpu": ((128, 128, 128, 8), 4, 8)}
_set_tma_blocks = block_shapes_hook({"a_desc": ("BLOCK_M", "BLOCK_K"), "w_desc": ("BLOCK_N", "BLOCK_K"),
                                     "c_desc": ("BLOCK_M", "BLOCK_N")})
_gemm_tma_tuned = triton.autotune(
    configs=[config(TILE_NAMES, (bm, bn, bk, 8), stages, warps, pre_hook=_set_tma_blocks)
             for bm, bn, bk, stages, warps in _TMA_SHAPES],
    key=["M", "N", "K", "DEQUANT", "OUT_BYTES"],
    prune_configs_by={"early_config_prune": prune_by_rows("M", "BLOCK_M")},
)(int8_matmul_tma_kernel)


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] float (any strides) -> (q int8 [R, K], scale float32 [R])."""
    R, K = x.shape
    x = with_short_steps(x, 1)
    q = torch.empty((R, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((R,), dtype=torch.float32, device=x.device)
    if R == 0:
        return q, scale
    if K == 0:
        return q, scale.zero_()
    block_k = min(next_power_of_2(K), 1024)
    block_r = max(1, min(next_power_of_2(R), 4096 // block_k))
    grid = (cdiv(R, block_r),)
    args = (x, q, scale, R, K, x.stride(0), x.stride(1), q.stride(0), q.stride(1))
    if interpreted():
        quantize_rows_int8_kernel[grid](*args, BLOCK_R=block_r, BLOCK_K=block_k)
    else:
        with on_device(x.device):
            quantize_rows_int8_kernel[grid](*args, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)
    return q, scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor | None, b_scale: torch.Tensor | None,
                bias: torch.Tensor | None, out_dtype: torch.dtype, scale_k: bool = False,
                split_k: int | None = None, quantize_a: bool = False) -> torch.Tensor:
    """C [M, N] = epilogue(a @ b) for a [M, K] (int8 or float), b [K, N] int8, both any strides.

    a int8: int32 accumulation; with ``out_dtype`` int32 the raw accumulator is returned (no
    scales, no bias), otherwise C = acc * a_scale[:, None] * b_scale[None, :] + bias.
    a float with ``quantize_a`` (W8A8, a_scale None): a quantized per row inside the GEMM, then
    as for int8 a with its row scales; the same C as quantize_rows_int8 followed by this.
    a float: C = (a @ b) * b_scale[None, :] + bias, or with ``scale_k`` (b_scale of length K)
    C = a @ (b * b_scale[:, None]), b dequantized to a's dtype in the loop.
    ``split_k`` forces a number of K slices (tests); None chooses by shape.
    """
    M, K = a.shape
    N = b.shape[1]
    a_int8 = a.dtype == torch.int8
    dequant = out_dtype != torch.int32
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if quantize_a and K == 0:  # nothing to quantize: all scales 0, as quantize_rows_int8 gives
        return int8_matmul(a.new_zeros((M, 0), dtype=torch.int8), b, a.new_zeros((M,), dtype=torch.float32),
                           b_scale, bias, out_dtype)
    # The kernels index the per-row/per-column vectors with unit stride.
    a_scale, b_scale, bias = (v.contiguous() if v is not None else None for v in (a_scale, b_scale, bias))
    if (a_int8 and not scale_k and split_k is None and M > SPLIT_MAX_ROWS and 0 < K <= MAX_EXACT_K
            and tma_ready(a, b.t(), c)):
        _int8_matmul_tma(a, b.t(), a_scale, b_scale, bias, c)
        return c
    flags = dict(A_INT8=a_int8, QUANT_A=quantize_a, SCALE_K=scale_k, DEQUANT=dequant,
                 SCALE_ROWS=a_scale is not None, SCALE_COLS=b_scale is not None and not scale_k,
                 HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(a.dtype))
    if quantize_a:  # the kernel writes the row scales here, for the split-K reduction's epilogue
        a_scale = torch.empty((M,), dtype=torch.float32, device=a.device)
        a_int8 = True  # from here on: int32 accumulators, as for int8 a
    scales_and_bias = (a_scale if a_scale is not None else c, b_scale if b_scale is not None else c,
                       bias if bias is not None else c)
    exact_slices = a_int8 and dequant  # each slice's int32 sum must stay exact
    b = with_short_steps(b, 0)  # (launch_weight_gemm does a's)
    return launch_weight_gemm(
        _gemm, _gemm_tuned, a, (b, *scales_and_bias), (b.stride(0), b.stride(1)), c, K, flags, _FIXED, _SPLIT,
        split_k=split_k, min_splits=cdiv(K, MAX_EXACT_K) if exact_slices else 1,
        split_flags=dict(flags, DEQUANT=False), part_dtype=torch.int32 if a_int8 else torch.float32,
        a_scale=a_scale, b_scale=b_scale if flags["SCALE_COLS"] else None, bias=bias, wide=exact_slices,
        dequant=dequant, max_k_per_split=MAX_EXACT_K if exact_slices else None)


def _int8_matmul_tma(a: torch.Tensor, weight: torch.Tensor, a_scale, b_scale, bias, c: torch.Tensor) -> None:
    """int8_matmul_tma_kernel: c = epilogue(a @ weight^T) for int8 a [M, K] and weight [N, K]."""
    M, N = c.shape
    dequant = c.dtype != torch.int32
    flags = dict(DEQUANT=dequant, SCALE_ROWS=dequant and a_scale is not None,
                 SCALE_COLS=dequant and b_scale is not None, HAS_BIAS=dequant and bias is not None,
                 OUT_BYTES=c.element_size())
    launch_persistent(_gemm_tma_tuned, int8_matmul_tma_kernel, dict(a_desc=a, w_desc=weight, c_desc=c),
                      tuple(v if v is not None else c for v in (a_scale, b_scale, bias)) + (M, N, a.shape[1]),
                      M, N, flags, {where: tile_kwargs(setting) for where, setting in _FIXED_TMA.items()},
                      _set_tma_blocks)
