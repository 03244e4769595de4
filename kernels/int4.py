"""W4A16 matmul in Triton: the int4 weight unpacked and dequantized inside the K loop.

``int4_matmul_kernel``, C[m, n] = sum_k A[m, k] * W[n, k] + bias[n], with W in effkern's packed
layout (effkern/int4.py): qweight int32 [N, K / 8], value k of row n in bits 4 (k % 8) .. +3 of
word qweight[n, k // 8], and per group j = k // GROUP of each row a scale and a zero:
    W[n, k] = (q[n, k] - zeros[n, j]) * scales[n, j]     fp32, rounded to A's dtype
then a 16-bit (or fp32) tensor-core dot with fp32 accumulation. The tile's K range lies in one
group (BLOCK_K divides GROUP, or there is one group per row), so each K step loads one scale and
one zero per column.

Few rows (decoding, where the op only reads the weight): the split-K launch of kernels/_splitk.py,
K spread over two programs per SM, the slices added in a fixed order by its reduce kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import dot_precision, prune_by_rows
from ._splitk import launch_weight_gemm, store_tile, weight_gemm_kernels, weight_gemm_tile


@triton.jit
def int4_matmul_kernel(
    a_ptr, q_ptr, s_ptr, z_ptr, bias_ptr, c_ptr,
    M, N, K, K_PER_SPLIT,
    stride_am, stride_ak, stride_qn, stride_qw, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_cs, stride_cm, stride_cn,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    split, k_start, k_end, offs_m, offs_n, rm, rn = weight_gemm_tile(M, N, K, K_PER_SPLIT, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak
    # [BLOCK_K / 8, BLOCK_N] words of W^T (k_start and BLOCK_K are multiples of 8), each word
    # loaded once and expanded to its 8 values: [BLOCK_K / 8, 8, BLOCK_N] -> [BLOCK_K, BLOCK_N]
    offs_w = tl.arange(0, BLOCK_K // 8)
    q_ptrs = q_ptr + rn[None, :] * stride_qn + (k_start // 8 + offs_w)[:, None] * stride_qw
    shifts = (tl.arange(0, 8) * 4)[None, :, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            words = tl.load(q_ptrs)
        else:
            k_left = k_end - k
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            words = tl.load(q_ptrs, mask=offs_w[:, None] * 8 < k_left, other=0)
        group = k // GROUP
        scale = tl.load(s_ptr + rn * stride_sn + group * stride_sg).to(tl.float32)
        zero = tl.load(z_ptr + rn * stride_zn + group * stride_zg).to(tl.float32)
        # q as fp32 without an int -> float conversion (a quarter-rate instruction, one per weight:
        # at decoding sizes it, not the memory, would bound the kernel): the bits 0x4B000000 | q
        # are the float 2^23 + q, and subtracting 2^23 leaves q exactly
        nibbles = tl.reshape((words[:, None, :] >> shifts) & 0xF, (BLOCK_K, BLOCK_N))
        q = (nibbles | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        w = ((q - zero[None, :]) * scale[None, :]).to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        q_ptrs += (BLOCK_K // 8) * stride_qw

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    store_tile(c_ptr, acc, split, offs_m, offs_n, M, N, stride_cs, stride_cm, stride_cn)


# ---------------------------------------------------------------------------------------
# Launch configurations: as for the int8 GEMMs (kernels/int8.py), autotuned for large M over
# tiles whose K depth divides the group size; split-K for few rows at one narrow config.

_GEMM_SHAPES = [
    # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
    # groups of 32 fit 32-deep tiles only: three sizes of them
    (128, 256, 32, 3, 8),
    (128, 128, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (32, 64, 128, 4, 4),
    (16, 128, 128, 4, 4),
    (16, 64, 256, 3, 4),
]
_FIXED = {"interpreter": ((32, 32, 32, 4), 1, 4), "gpu": ((64, 128, 32, 8), 3, 4)}
_SPLIT = {"interpreter": ((16, 32, 32, 1), 1, 4), "gpu": ((16, 64, 128, 1), 4, 4)}


def _depth_fits(cfg, group: int, K: int) -> bool:
    # every K step inside one group: the depth divides the group size, or one group per row
    return group == K or group % cfg["BLOCK_K"] == 0


def _prune(configs, named_args, **kwargs):
    # Triton's autotuner names only the positional arguments; GROUP comes among the keyword ones
    fitting = [c for c in configs if _depth_fits(c.kwargs, kwargs["GROUP"], named_args["K"])]
    return prune_by_rows("M", "BLOCK_M")(fitting, named_args, **kwargs)


_gemm, _gemm_tuned = weight_gemm_kernels(int4_matmul_kernel, _GEMM_SHAPES, key=("M", "N", "K", "GROUP"), prune=_prune)


def _fit_depth(kwargs: dict, group: int, K: int) -> dict:
    if not _depth_fits(kwargs, group, K):
        kwargs["BLOCK_K"] = group  # group sizes are powers of two >= 32: still a valid tl.dot depth
    return kwargs


def int4_matmul(a: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                bias: torch.Tensor | None, split_k: int | None = None) -> torch.Tensor:
    """C [M, N] = a @ W.T + bias for a [M, K] float (any strides) and W in effkern's int4 layout
    (qweight [N, K / 8], scales/zeros [N, K / group]; group = K for one group per row).
    ``split_k`` forces a number of K slices (tests); None chooses by shape."""
    M, K = a.shape
    N = qweight.shape[0]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    bias = bias.contiguous() if bias is not None else None
    flags = dict(GROUP=group, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(a.dtype))
    weight = (qweight, scales, zeros, bias if bias is not None else c)
    strides = (qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
               zeros.stride(0), zeros.stride(1))
    # split: the bias is added once, by the reduction
    return launch_weight_gemm(_gemm, _gemm_tuned, a, weight, strides, c, K, flags, _FIXED, _SPLIT,
                              adjust=lambda kwargs: _fit_depth(kwargs, group, K), split_k=split_k,
                              split_flags=dict(flags, HAS_BIAS=False), bias=bias)
