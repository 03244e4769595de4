"""Split-K for GEMMs with few rows (decoding), shared by the int8, int4 and 2:4 sparse kernels.

With few rows, one program per output tile leaves most SMs idle while the op is bound by
reading the weight. Program (tile, s) then sums K slice s into a partial of the accumulator's
dtype, part [S, M, N], and ``splitk_reduce_kernel`` adds the slices in a fixed order
(deterministic, no atomics) and applies the epilogue (scales, bias, output cast). Int32
partials are added in int64 when the output is dequantized, so K is not limited by int32 range
as long as each slice's own sum is exact.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import interpreted

# Up to this many rows a split is considered; beyond, output tiles fill the GPU anyway.
SPLIT_MAX_ROWS = 64
_INTERPRETER_SMS = 4  # small enough that the tests' shapes take the split-K path too


@triton.jit
def dequant_epilogue(acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, bias_ptr,
                     SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, HAS_BIAS: tl.constexpr):
    # (acc * a_scale[m]) * b_scale[n] + bias[n], in fp32, in that order (as the reference does).
    out = acc.to(tl.float32)
    if SCALE_ROWS:
        out = out * tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if SCALE_COLS:
        out = out * tl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return out


@triton.jit
def splitk_reduce_kernel(
    part_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr,
    M, N, SPLITS,
    stride_ps, stride_pm, stride_cm, stride_cn,
    WIDE: tl.constexpr, DEQUANT: tl.constexpr,
    SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # part is [SPLITS, M, N] with unit stride along N; slices are added in order 0, 1, ...
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = part_ptr + offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :]
    acc = tl.load(ptrs, mask=mask, other=0)
    if WIDE:
        acc = acc.to(tl.int64)
    for s in range(1, SPLITS):
        acc += tl.load(ptrs + s * stride_ps, mask=mask, other=0).to(acc.dtype)
    if DEQUANT:
        acc = dequant_epilogue(acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, bias_ptr,
                               SCALE_ROWS, SCALE_COLS, HAS_BIAS)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if interpreted():
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_split_k(M: int, N: int, K: int, device: torch.device, block: tuple[int, int, int]) -> int:
    """Slices of K for a split-K launch with tiles ``block`` = (BLOCK_M, BLOCK_N, BLOCK_K): enough
    programs for two per SM, each slice at least four K blocks long; 1 (no split) when the rows or
    the output tiles already fill the GPU."""
    bm, bn, bk = block
    if M > SPLIT_MAX_ROWS or K == 0:
        return 1
    n_tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    return max(1, min(triton.cdiv(2 * _sm_count(device), n_tiles), triton.cdiv(K, 4 * bk)))


def run_split_k(gemm, gemm_args, gemm_flags: dict, setting: dict, splits: int, c: torch.Tensor, K: int,
                part_dtype: torch.dtype, a_scale=None, b_scale=None, bias=None, wide: bool = False,
                dequant: bool = True, max_k_per_split: int | None = None) -> torch.Tensor:
    """Launch ``gemm`` over ``splits`` K slices into fp32/int32 partials, then the reduction into c.

    gemm_args(part, k_per_split) -> the GEMM's positional arguments writing slice s of the
    accumulator to part[s]; setting: its tile kwargs (BLOCK_M/N/K, num_stages, num_warps); the
    reduction applies (acc * a_scale[m]) * b_scale[n] + bias[n] for those given (dequant), or
    stores the raw sum (int8_mm)."""
    M, N = c.shape
    bm, bn, bk = setting["BLOCK_M"], setting["BLOCK_N"], setting["BLOCK_K"]
    k_per_split = triton.cdiv(triton.cdiv(K, splits), bk) * bk
    if max_k_per_split:
        k_per_split = min(k_per_split, max_k_per_split)
    splits = triton.cdiv(K, k_per_split)
    part = torch.empty((splits, M, N), dtype=part_dtype, device=c.device)
    reduce_args = (part, a_scale if a_scale is not None else c, b_scale if b_scale is not None else c,
                   bias if bias is not None else c, c, M, N, splits,
                   part.stride(0), part.stride(1), c.stride(0), c.stride(1))
    reduce_flags = dict(WIDE=wide, DEQUANT=dequant, SCALE_ROWS=a_scale is not None,
                        SCALE_COLS=b_scale is not None, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), splits)
    reduce_grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    if interpreted():
        gemm[grid](*gemm_args(part, k_per_split), **gemm_flags, **setting)
        splitk_reduce_kernel[reduce_grid](*reduce_args, **reduce_flags)
    else:
        with torch.cuda.device(c.device):
            gemm[grid](*gemm_args(part, k_per_split), **gemm_flags, **setting)
            splitk_reduce_kernel[reduce_grid](*reduce_args, **reduce_flags, num_warps=4)
    return c
