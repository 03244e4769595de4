"""2:4 sparse matmul in Triton: the fallback for GPUs and shapes the mma.sp CUDA kernel does not
take, and the kernel the interpreter tests on a CPU.

``sparse24_matmul_kernel``, C[m, n] = sum_k A[m, k] * W[n, k] + bias[n], with W kept in effkern's
compressed 2:4 format (effkern/sparse24.py): values [N, K / 2] and meta uint8 [N, ceil(K / 8)],
group g = k // 4 of row n holding values[n, 2g] at position i0 and values[n, 2g + 1] at i1,
code i0 | i1 << 2 in nibble g % 2 of byte meta[n, g // 2]. Each K step loads the tile's values
and metadata compressed (9/16 of the dense bytes in 16 bits), expands them in registers to the
dense [BLOCK_K, BLOCK_N] tile of W^T:
    W^T[4g + p, n] = values[n, 2g] if p == i0, values[n, 2g + 1] if p == i1, else 0
and runs a dense tl.dot with fp32 accumulation: memory saving, no compute saving.

The same kernel with A_INT8 runs W8A8 on a 2:4 sparse int8 weight (``sparse24_int8_matmul``):
int8 A [M, K] (per-token quantized) and int8 values, exact int32 accumulators, and the int8
family's epilogue (kernels/int8.py, dequant_epilogue in kernels/_splitk.py):
    C[m, n] = (acc[m, n] * a_scale[m]) * w_scale[n] + bias[n]      fp32, cast to C's dtype
Split-K (few rows, or K past MAX_EXACT_K_24) stores int32 partials that the reduction adds in
int64 before that epilogue.

``sparse24_dgrad_kernel``, the backward's grad_input G[m, k] = sum_n dY[m, n] * W[n, k], reads the
same compressed W along the other side: its reduction runs over W's rows, its output columns are
W's columns, so each step expands a tile of BLOCK_K rows of W by BLOCK_N columns (the shared
launcher's names: the kernel's K is W's rows; the groups now lie along the output columns) and
runs tl.dot(dY tile, W tile). The alternative, expanding all of W
once and running one dense GEMM (effkern/sparse24.py), writes and reads an N x K scratch; which
is faster is measured (bench/sparse24.py, mode bwd) and recorded for auto.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, dot_precision, heuristics
from ._splitk import (dequant_epilogue, launch_weight_gemm, store_tile, weight_gemm_kernels, weight_gemm_place,
                      weight_gemm_tile)


@triton.jit
def expand_24(values, meta, DENSE: tl.constexpr, COLS: tl.constexpr):
    # values [DENSE / 2, COLS] and meta [DENSE / 8, COLS] (the bytes, as loaded) -> the dense
    # [DENSE, COLS] tile, 2:4 groups along axis 0: entry 4g + p is values[2g] if p == i0,
    # values[2g + 1] if p == i1, else 0, with (i0, i1) the code in nibble g % 2 of meta[g // 2].
    # The groups' first (v0) and second (v1) values, [DENSE / 4, COLS]:
    v0, v1 = tl.split(tl.permute(tl.reshape(values, (DENSE // 4, 2, COLS)), (0, 2, 1)))
    # [DENSE / 8, COLS] bytes -> [DENSE / 4, COLS] codes, group 2b in the low nibble
    nibble_shift = (tl.arange(0, 2) * 4)[None, :, None]
    codes = tl.reshape((meta.to(tl.int32)[:, None, :] >> nibble_shift) & 0xF, (DENSE // 4, COLS))
    i0 = (codes & 3)[:, None, :]
    i1 = (codes >> 2)[:, None, :]
    position = tl.arange(0, 4)[None, :, None]
    # 0, an int literal, takes the values' dtype (float or int8); 0.0 would promote int8 to fp32
    w = tl.where(position == i0, v0[:, None, :], tl.where(position == i1, v1[:, None, :], 0))
    return tl.reshape(w, (DENSE, COLS))


@triton.jit
def sparse24_matmul_kernel(
    a_ptr, v_ptr, meta_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, c_ptr,
    M, N, K, K_PER_SPLIT,
    stride_am, stride_ak, stride_vn, stride_vk, stride_metan, stride_metak,
    stride_cs, stride_cm, stride_cn,
    A_INT8: tl.constexpr, DEQUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # A_INT8: A and W int8, exact int32 accumulators; DEQUANT: times a_scale[m] * w_scale[n]
    # (dequant_epilogue). Neither DEQUANT nor HAS_BIAS: the raw sum (a split-K partial).
    split, k_start, k_end, offs_m, offs_n, rm, rn = weight_gemm_tile(M, N, K, K_PER_SPLIT, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak
    # Per K step, BLOCK_K / 4 groups (k_start and BLOCK_K are multiples of 8, so whole meta bytes),
    # their BLOCK_K / 2 values read as one contiguous run per column (vectorized, asynchronous
    # copies) and split into each group's first and second kept value in registers:
    offs_v = tl.arange(0, BLOCK_K // 2)
    offs_b = tl.arange(0, BLOCK_K // 8)
    v_ptrs = v_ptr + rn[None, :] * stride_vn + (k_start // 2 + offs_v)[:, None] * stride_vk
    meta_ptrs = meta_ptr + rn[None, :] * stride_metan + (k_start // 8 + offs_b)[:, None] * stride_metak

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if A_INT8 else tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            values = tl.load(v_ptrs)
            meta = tl.load(meta_ptrs)
        else:
            k_left = k_end - k
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            values = tl.load(v_ptrs, mask=offs_v[:, None] * 2 < k_left, other=0)
            meta = tl.load(meta_ptrs, mask=offs_b[:, None] * 8 < k_left, other=0)
        w = expand_24(values, meta, BLOCK_K, BLOCK_N)
        # out_dtype named, int32 for int8: Triton 3.6 checks the accumulator against it (default float32)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        a_ptrs += BLOCK_K * stride_ak
        v_ptrs += (BLOCK_K // 2) * stride_vk
        meta_ptrs += (BLOCK_K // 8) * stride_metak

    if DEQUANT or HAS_BIAS:
        acc = dequant_epilogue(acc, offs_m, offs_n, M, N, a_scale_ptr, w_scale_ptr, bias_ptr,
                               DEQUANT, DEQUANT, HAS_BIAS)
    store_tile(c_ptr, acc, split, offs_m, offs_n, M, N, stride_cs, stride_cm, stride_cn)


@triton.jit
def sparse24_dgrad_kernel(
    a_ptr, v_ptr, meta_ptr, c_ptr,
    M, N, K, K_PER_SPLIT,
    stride_am, stride_ak, stride_vn, stride_vk, stride_metan, stride_metak,
    stride_cs, stride_cm, stride_cn,
    DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # C [M, N] = A [M, K] @ W [K, N] in the shared launcher's names (kernels/_splitk.py): A is dY,
    # the reduction K runs over W's rows (the layer's outputs), C's N columns are W's columns (the
    # layer's inputs). W's row r: values[r, :N / 2], meta[r, :ceil(N / 8)].
    split, k_start, k_end, pid_m, pid_n = weight_gemm_place(M, N, K, K_PER_SPLIT, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (k_start + offs_k).to(tl.int64)  # of W; dY's columns
    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_am + rows[None, :] * stride_ak
    # The tile's BLOCK_N columns of W start at a multiple of 8: BLOCK_N / 2 values and BLOCK_N / 8
    # whole meta bytes per row, contiguous along the row, loaded as [those, BLOCK_K rows] so that
    # expand_24 (groups along axis 0) gives W's tile transposed.
    offs_v = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    offs_b = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    v_ptrs = v_ptr + rows[None, :] * stride_vn + offs_v[:, None] * stride_vk
    meta_ptrs = meta_ptr + rows[None, :] * stride_metan + offs_b[:, None] * stride_metak
    # past W's last column: nothing loaded, zeros expanded, and store_tile leaves those columns out
    v_cols = offs_v[:, None] < N // 2
    meta_cols = offs_b[:, None] < tl.cdiv(N, 8)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K and EVEN_N:
            a = tl.load(a_ptrs)
            values = tl.load(v_ptrs)
            meta = tl.load(meta_ptrs)
        else:
            in_k = offs_k < k_end - k
            a = tl.load(a_ptrs, mask=in_k[None, :], other=0.0)
            values = tl.load(v_ptrs, mask=in_k[None, :] & v_cols, other=0.0)
            meta = tl.load(meta_ptrs, mask=in_k[None, :] & meta_cols, other=0)
        w_t = expand_24(values, meta, BLOCK_N, BLOCK_K)  # [BLOCK_N, BLOCK_K]: W's tile transposed
        acc = tl.dot(a, tl.trans(w_t).to(a.dtype), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        v_ptrs += BLOCK_K * stride_vn
        meta_ptrs += BLOCK_K * stride_metan

    store_tile(c_ptr, acc, split, offs_m, offs_n, M, N, stride_cs, stride_cm, stride_cn)


# ---------------------------------------------------------------------------------------
# Launch configurations, as for the other weight-compressed GEMMs (kernels/int4.py): autotuned
# for large M, split-K (kernels/_splitk.py) at one narrow config for few rows.

_GEMM_SHAPES = [
    # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (32, 64, 128, 4, 4),
    (16, 128, 128, 4, 4),
    (16, 64, 256, 3, 4),
]
_FIXED = {"interpreter": ((32, 32, 32, 4), 1, 4), "gpu": ((64, 128, 64, 8), 3, 4)}
_SPLIT = {"interpreter": ((16, 32, 32, 1), 1, 4), "gpu": ((16, 64, 128, 1), 4, 4)}
# The same tiles for int8 (each BLOCK_K a multiple of 8, whole meta bytes, and at least 32, the
# depth of an int8 mma); the autotuner keys its choice by the tensors' dtypes too.
_gemm, _gemm_tuned = weight_gemm_kernels(sparse24_matmul_kernel, _GEMM_SHAPES)
# Longest K slice whose int32 sum is exact for int8: a 2:4 row keeps K / 2 products, each
# |a * w| <= 128^2 = 2^14, and int32 holds up to 2^31 - 1. K = 2^18 could just reach 2^31 (every
# kept product (-128)^2); 256 less, a multiple of every BLOCK_K, stays below it.
MAX_EXACT_K_24 = 2**18 - 256
# the dgrad's tiles are the same shapes (its BLOCK_N, like the forward's BLOCK_K, is the expanded side)
_dgrad, _dgrad_tuned = weight_gemm_kernels(
    heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})(sparse24_dgrad_kernel), _GEMM_SHAPES)


def sparse24_matmul(a: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None,
                    split_k: int | None = None) -> torch.Tensor:
    """C [M, N] = a @ W.T + bias for a [M, K] (any strides) and W in effkern's compressed 2:4
    format (values [N, K / 2], meta [N, ceil(K / 8)]). ``split_k`` forces K slices (tests)."""
    M, K = a.shape
    N = values.shape[0]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    bias = bias.contiguous() if bias is not None else None
    flags = dict(A_INT8=False, DEQUANT=False, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(a.dtype))
    weight = (values, meta, c, c, bias if bias is not None else c)  # no scales: c in their place
    strides = (values.stride(0), values.stride(1), meta.stride(0), meta.stride(1))
    # split: the bias is added once, by the reduction
    return launch_weight_gemm(_gemm, _gemm_tuned, a, weight, strides, c, K, flags, _FIXED, _SPLIT, split_k=split_k,
                              split_flags=dict(flags, HAS_BIAS=False), bias=bias)


def sparse24_int8_matmul(a_q: torch.Tensor, a_scale: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                         w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                         split_k: int | None = None) -> torch.Tensor:
    """W8A8 on a 2:4 sparse int8 weight: C [M, N] = (acc * a_scale[m]) * w_scale[n] + bias[n] in
    fp32, cast to ``out_dtype``, with acc = a_q @ W.T exact (int32 per K slice, int64 across them)
    for a_q int8 [M, K] (any strides), a_scale float32 [M], W int8 in effkern's compressed 2:4
    format (values [N, K / 2], meta [N, ceil(K / 8)]), w_scale float32 [N], bias [N] or None.
    ``split_k`` forces K slices (tests)."""
    M, K = a_q.shape
    N = values.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    if M == 0 or N == 0:
        return c
    # the kernels index the per-row/per-column vectors with unit stride
    a_scale, w_scale, bias = (v.contiguous() if v is not None else None for v in (a_scale, w_scale, bias))
    flags = dict(A_INT8=True, DEQUANT=True, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(a_q.dtype))
    weight = (values, meta, a_scale, w_scale, bias if bias is not None else c)
    strides = (values.stride(0), values.stride(1), meta.stride(0), meta.stride(1))
    # K == 0: the single pass's zero sums give bias (or zeros). Split (few rows, or K past
    # MAX_EXACT_K_24): int32 partials, added in int64 and dequantized by the reduction.
    return launch_weight_gemm(
        _gemm, _gemm_tuned, a_q, weight, strides, c, K, flags, _FIXED, _SPLIT, split_k=split_k,
        min_splits=cdiv(K, MAX_EXACT_K_24), split_flags=dict(flags, DEQUANT=False, HAS_BIAS=False),
        part_dtype=torch.int32, a_scale=a_scale, b_scale=w_scale, bias=bias, wide=True,
        max_k_per_split=MAX_EXACT_K_24)


def sparse24_dgrad(grad_out: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                   split_k: int | None = None) -> torch.Tensor:
    """grad_input [M, K] = grad_out [M, N] @ W for W in effkern's compressed 2:4 format (values
    [N, K / 2], meta [N, ceil(K / 8)]), without expanding W in memory; grad_out any strides.
    ``split_k`` forces slices of the reduction over N (tests)."""
    M, N = grad_out.shape
    K = values.shape[1] * 2
    c = torch.empty((M, K), dtype=grad_out.dtype, device=grad_out.device)
    if M == 0 or K == 0:
        return c
    flags = dict(DOT_PRECISION=dot_precision(grad_out.dtype))
    strides = (values.stride(0), values.stride(1), meta.stride(0), meta.stride(1))
    # N == 0: launch_weight_gemm's single pass stores the zero sums
    return launch_weight_gemm(_dgrad, _dgrad_tuned, grad_out, (values, meta), strides, c, N, flags, _FIXED, _SPLIT,
                              split_k=split_k)
