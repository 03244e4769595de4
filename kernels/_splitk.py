"""Launching the weight-compressed GEMMs (int8, int4, 2:4 sparse): one program per output tile,
autotuned, for many rows; split-K for few rows (decoding).

Their kernels share one argument order, so one launcher serves them:
    (a, *weight_args, c, M, N, K, K_PER_SPLIT, stride_am, stride_ak, *weight_strides,
     stride_cs, stride_cm, stride_cn, *constexprs)
with program (tile, s) summing K slice s (K_PER_SPLIT long) into c[s] (stride_cs).

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

from ._launch import (cdiv, config, fixed_config, grouped_tile, heuristics, interpreted, launch, on_device,
                      prune_by_rows, sm_count, tiles, with_short_steps)

TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
# Up to this many rows a split is considered; beyond, output tiles fill the GPU anyway.
SPLIT_MAX_ROWS = 64


@triton.jit
def weight_gemm_place(M, N, K, K_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # This program's output tile (pid_m, pid_n), in grouped order, and K slice [k_start, k_end).
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    split = tl.program_id(1)
    k_start = split * K_PER_SPLIT
    return split, k_start, tl.minimum(K, k_start + K_PER_SPLIT), pid_m, pid_n


@triton.jit
def weight_gemm_tile(M, N, K, K_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # weight_gemm_place's tile as row and column offsets. Rows/columns past the edge wrap onto
    # valid ones (rm, rn), so only K needs load masks; store_tile drops the duplicates.
    split, k_start, k_end, pid_m, pid_n = weight_gemm_place(M, N, K, K_PER_SPLIT, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return split, k_start, k_end, offs_m, offs_n, (offs_m % M).to(tl.int64), (offs_n % N).to(tl.int64)


@triton.jit
def store_tile(c_ptr, acc, split, offs_m, offs_n, M, N, stride_cs, stride_cm, stride_cn):
    # c[split] (a split-K partial) or c itself (stride_cs = 0), in c's dtype, rows/columns in range only
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = c_ptr + split * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dequant_epilogue(acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, bias_ptr,
                     SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, HAS_BIAS: tl.constexpr):
    # (acc * a_scale[m]) * b_scale[n] + bias[n], in fp32, in that order (as the reference does);
    # on a GPU the last multiply and the add may become one fma (one rounding fewer).
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


def choose_split_k(M: int, N: int, K: int, device: torch.device, block: tuple[int, int, int]) -> int:
    """Slices of K for a split-K launch with tiles ``block`` = (BLOCK_M, BLOCK_N, BLOCK_K): enough
    programs for two per SM, each slice at least four K blocks long; 1 (no split) when the rows or
    the output tiles already fill the GPU."""
    bm, bn, bk = block
    if M > SPLIT_MAX_ROWS or K == 0:
        return 1
    n_tiles = cdiv(M, bm) * cdiv(N, bn)
    return max(1, min(cdiv(2 * sm_count(device), n_tiles), cdiv(K, 4 * bk)))


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
    k_per_split = cdiv(cdiv(K, splits), bk) * bk
    if max_k_per_split:
        k_per_split = min(k_per_split, max_k_per_split)
    splits = cdiv(K, k_per_split)
    part = torch.empty((splits, M, N), dtype=part_dtype, device=c.device)
    reduce_args = (part, a_scale if a_scale is not None else c, b_scale if b_scale is not None else c,
                   bias if bias is not None else c, c, M, N, splits,
                   part.stride(0), part.stride(1), c.stride(0), c.stride(1))
    reduce_flags = dict(WIDE=wide, DEQUANT=dequant, SCALE_ROWS=a_scale is not None,
                        SCALE_COLS=b_scale is not None, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn)
    grid = (cdiv(M, bm) * cdiv(N, bn), splits)
    reduce_grid = (cdiv(M, bm), cdiv(N, bn))
    if interpreted():
        gemm[grid](*gemm_args(part, k_per_split), **gemm_flags, **setting)
        splitk_reduce_kernel[reduce_grid](*reduce_args, **reduce_flags)
    else:
        with on_device(c.device):
            gemm[grid](*gemm_args(part, k_per_split), **gemm_flags, **setting)
            splitk_reduce_kernel[reduce_grid](*reduce_args, **reduce_flags, num_warps=4)
    return c


def tile_kwargs(setting) -> dict:
    """((BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M), num_stages, num_warps) as launch kwargs."""
    blocks, stages, warps = setting
    return dict(zip(TILE_NAMES, blocks), num_stages=stages, num_warps=warps)


@functools.lru_cache(maxsize=64)
def _shared_tile_kwargs(setting) -> dict:
    return tile_kwargs(setting)


def _setting_kwargs(setting, adjust) -> dict:
    """adjust(tile_kwargs(setting)), the kwargs made once per setting (per call only when
    ``adjust`` may change them); not to be modified by the caller."""
    kwargs = _shared_tile_kwargs(setting)
    return kwargs if adjust is None else adjust(dict(kwargs))


def weight_gemm_kernels(kernel, shapes, key=("M", "N", "K"), prune=None):
    """(plain, autotuned) versions of a weight-compressed GEMM kernel: EVEN_K set per launch,
    the autotuned one over ``shapes`` = [(BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)], grouped
    tile order 8, pruned by the row count (or by ``prune``)."""
    plain = heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0
                        and a["K_PER_SPLIT"] % a["BLOCK_K"] == 0})(kernel)
    tuned = triton.autotune(
        configs=[config(TILE_NAMES, (bm, bn, bk, 8), stages, warps) for bm, bn, bk, stages, warps in shapes],
        # DOT_PRECISION: fp32 "ieee" dots (FMA) keep stages - 1 tiles in shared memory, "tf32" ones
        # (wgmma) stages tiles: a tile tuned for one may not fit the other
        key=[*key, "DOT_PRECISION"],
        prune_configs_by={"early_config_prune": prune or prune_by_rows("M", "BLOCK_M")},
    )(plain)
    return plain, tuned


def launch_weight_gemm(plain, tuned, a: torch.Tensor, weight_args: tuple, weight_strides: tuple, c: torch.Tensor,
                       K: int, flags: dict, fixed: dict, split: dict, adjust=None,
                       split_k: int | None = None, min_splits: int = 1, split_flags: dict | None = None,
                       part_dtype: torch.dtype = torch.float32, **reduction) -> torch.Tensor:
    """c [M, N] = the GEMM of a [M, K] with the weight, launched as one program per output tile
    (autotuned; ``fixed[place]`` under the interpreter or without autotuning) or, for few rows,
    split over K at ``split[place]`` with ``split_flags`` (default ``flags``) and reduced
    (``reduction``: run_split_k's scales, bias, wide, dequant, max_k_per_split). ``adjust`` fits
    a tile setting to the call (e.g. a K depth that divides the group size); ``split_k``
    forces a number of slices (tests)."""
    M, N = c.shape
    a = with_short_steps(a, 1)
    split_setting = _setting_kwargs(fixed_config(split), adjust)
    block = (split_setting["BLOCK_M"], split_setting["BLOCK_N"], split_setting["BLOCK_K"])
    splits = max(split_k or choose_split_k(M, N, K, a.device, block), min_splits) if K else 1
    if splits == 1:
        args = (a, *weight_args, c, M, N, K, K, a.stride(0), a.stride(1), *weight_strides, 0, c.stride(0), c.stride(1))
        launch(tuned, plain, tiles(M, N, "BLOCK_M", "BLOCK_N"), args, flags,
               {w: _setting_kwargs(setting, adjust) for w, setting in fixed.items()})
        return c
    return run_split_k(
        plain, lambda part, k_per_split: (a, *weight_args, part, M, N, K, k_per_split, a.stride(0), a.stride(1),
                                          *weight_strides, part.stride(0), part.stride(1), 1),
        split_flags or flags, split_setting, splits, c, K, part_dtype, **reduction)
