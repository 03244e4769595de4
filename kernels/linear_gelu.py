"""Fused linear + bias + GELU in Triton: one forward GEMM kernel, one backward GEMM kernel.

Forward, ``linear_gelu_fwd_kernel`` (weight in nn.Linear layout [N, K]):
    z[m, n] = sum_k x[m, k] * w[n, k] + b[n]        fp32 accumulation
    y[m, n] = gelu(z[m, n])                          in the epilogue, on the fp32 accumulator
    d[m, n] = gelu'(z[m, n])                         too, when the backward will need it (gelu'
                                                     shares most of its work with gelu)
``linear_gelu_fwd_tma_kernel`` computes the same on Hopper (and under the interpreter) when x, w
and the outputs suit TMA (16-bit, 16-byte aligned rows, M >= TMA_MIN_ROWS): the persistent TMA
GEMM of kernels/_tma.py with this epilogue.

Backward, ``linear_gelu_bwd_kernel``: both weight-side GEMMs have the form
    C[p, q] = sum_r gz[p, r] * B[r, q],   gz = dy * d
with gz formed from tiles of dy and d inside the K loop (a prologue), never stored:
    grad_input  [M, K]: p = m, r = n, B = w            C = gz @ w
    grad_weight [N, K]: p = n, r = m, B = x            C = gz^T @ x  (dy, d read transposed)
and, in the grad_weight launch, grad_bias[n] = sum_m gz[m, n] from the same tiles.
Each element of gz is formed once per tile of the other output dimension (K / BLOCK_Q times):
from d that is one multiply, where evaluating gelu'(z) from a saved z (an erf or tanh each time)
cost more than the GEMMs' tensor-core work on an H100 (bench/NOTES.md, version 1 of this kernel).
``linear_gelu_bwd_tma_kernel`` computes the same on Hopper, persistent, tiles by TMA.

GELU, written as gelu(z) = z * s(z), so gelu'(z) = s(z) + z * s'(z):
  approximate="none":  s = Phi(z) = 0.5 (1 + erf(z / sqrt 2)),  s' = phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
  approximate="tanh":  u = sqrt(2/pi) (z + 0.044715 z^3),  t = tanh(u)
                       s = 0.5 (1 + t),  s' = 0.5 (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 z^2)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._launch import (config, dot_precision, grouped_tile, heuristics, interpreted, launch, prune_by_rows, tiles,
                      with_short_steps)
from ._tma import block_shapes_hook, launch_persistent, tile_origin, tma_ready, tma_tile_dot

# Constants stay on the right of tensor products: constexpr * tensor would wrap the tensor
# in a constexpr under the interpreter.
SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)
INV_SQRT_2: tl.constexpr = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)
TANH_CUBIC: tl.constexpr = tl.constexpr(0.044715)


# PRECISE (fp32 on a GPU): libdevice's exp/tanh instead of tl.exp, which compiles to the
# approximate ex2.approx; its error shows in fp32 gradients. Not for the interpreter, which
# cannot call libdevice and computes tl.exp exactly anyway.
@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _tanh(u, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.tanh(u)
    else:
        # 1 - 2 / (exp(2u) + 1): saturates to +-1 for large |u| instead of producing inf/inf.
        return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def gelu_and_grad(z, APPROX_TANH: tl.constexpr, PRECISE: tl.constexpr):
    """(gelu(z), gelu'(z)) = (z * s, s + z * s') from the fp32 accumulator (the formulas above). A
    caller that stores only gelu(z) pays nothing for gelu'(z): the compiler drops what is unused."""
    if APPROX_TANH:
        t = _tanh((z + z * z * z * TANH_CUBIC) * SQRT_2_OVER_PI, PRECISE)
        s = 0.5 * (1.0 + t)
        ds = 0.5 * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + z * z * TANH_CUBIC * 3.0)
    else:
        s = 0.5 * (1.0 + tl.math.erf(z * INV_SQRT_2))
        ds = _exp(-0.5 * z * z, PRECISE) * INV_SQRT_2PI
    return z * s, s + z * ds


@triton.jit
def linear_gelu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, d_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_ym, stride_yn, stride_dm, stride_dn,
    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr, PRECISE: tl.constexpr,
    STORE_Y: tl.constexpr, STORE_GELU_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap onto valid ones, so only K needs load masks; the
    # duplicated results are dropped by the masked stores.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)  # rn * stride_wn passes 2^31 for a weight of 2^31 elements
    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + rn[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N] tile of w^T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    om = offs_m.to(tl.int64)[:, None]
    y, d = gelu_and_grad(acc, APPROX_TANH, PRECISE)
    if STORE_GELU_GRAD:
        tl.store(d_ptr + om * stride_dm + offs_n[None, :] * stride_dn, d.to(d_ptr.dtype.element_ty), mask=mask)
    if STORE_Y:
        tl.store(y_ptr + om * stride_ym + offs_n[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def linear_gelu_fwd_tma_kernel(
    x_desc, w_desc, y_desc, d_desc, b_ptr,
    M, N, K, NUM_PROGRAMS,
    HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr, PRECISE: tl.constexpr,
    STORE_Y: tl.constexpr, STORE_GELU_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # The persistent TMA GEMM of kernels/_tma.py. Descriptors: x [M, K] in [BLOCK_M, BLOCK_K]
    # tiles, w [N, K] in [BLOCK_N, BLOCK_K], y and d [M, N] in [BLOCK_M, BLOCK_N].
    tile_out = tl.program_id(0) - NUM_PROGRAMS
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), NUM_PROGRAMS, flatten=True):
        acc = tma_tile_dot(x_desc, w_desc, tile, M, N, K, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                           BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, DOT_PRECISION)
        tile_out += NUM_PROGRAMS
        row, col = tile_origin(tile_out, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if HAS_BIAS:
            # columns past N wrap onto valid ones; the store drops them
            acc += tl.load(b_ptr + (col + tl.arange(0, BLOCK_N)) % N).to(tl.float32)[None, :]
        y, d = gelu_and_grad(acc, APPROX_TANH, PRECISE)
        if STORE_GELU_GRAD:
            d_desc.store([row, col], d.to(d_desc.dtype))
        if STORE_Y:
            y_desc.store([row, col], y.to(y_desc.dtype))


@triton.jit
def linear_gelu_bwd_kernel(
    dy_ptr, d_ptr, b_ptr, c_ptr, rowsum_ptr,
    P, Q, R,
    stride_dyp, stride_dyr, stride_dp, stride_dr,
    stride_br, stride_bq, stride_cp, stride_cq,
    ROWSUM: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_R: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_P: tl.constexpr,
):
    pid_p, pid_q = grouped_tile(tl.program_id(0), tl.cdiv(P, BLOCK_P), tl.cdiv(Q, BLOCK_Q), GROUP_P)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_r = tl.arange(0, BLOCK_R)
    rp = (offs_p % P).to(tl.int64)
    rq = (offs_q % Q).to(tl.int64)  # rq * stride_bq: a transposed weight or column-major x of 2^31 elements
    dy_ptrs = dy_ptr + rp[:, None] * stride_dyp + offs_r[None, :] * stride_dyr
    d_ptrs = d_ptr + rp[:, None] * stride_dp + offs_r[None, :] * stride_dr
    b_ptrs = b_ptr + offs_r[:, None] * stride_br + rq[None, :] * stride_bq

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for r in range(0, tl.cdiv(R, BLOCK_R)):
        if EVEN_R:
            dy = tl.load(dy_ptrs)
            d = tl.load(d_ptrs)
            b = tl.load(b_ptrs)
        else:
            r_left = R - r * BLOCK_R
            dy = tl.load(dy_ptrs, mask=offs_r[None, :] < r_left, other=0.0)  # dy = 0 makes gz = 0 there
            d = tl.load(d_ptrs, mask=offs_r[None, :] < r_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_r[:, None] < r_left, other=0.0)
        gz = dy.to(tl.float32) * d.to(tl.float32)
        if ROWSUM:
            rowsum += tl.sum(gz, axis=1)
        # Round gz to the operand dtype like eager's gelu_backward output, then use the tensor cores.
        acc = tl.dot(gz.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
        dy_ptrs += BLOCK_R * stride_dyr
        d_ptrs += BLOCK_R * stride_dr
        b_ptrs += BLOCK_R * stride_br

    mask = (offs_p[:, None] < P) & (offs_q[None, :] < Q)
    op = offs_p.to(tl.int64)[:, None]
    tl.store(c_ptr + op * stride_cp + offs_q[None, :] * stride_cq, acc.to(c_ptr.dtype.element_ty), mask=mask)
    if ROWSUM:
        # Every column of tiles has the row sums; only the first writes them.
        tl.store(rowsum_ptr + offs_p, rowsum.to(rowsum_ptr.dtype.element_ty), mask=(offs_p < P) & (pid_q == 0))


@triton.jit
def linear_gelu_bwd_tma_kernel(
    dy_desc, d_desc, b_desc, c_desc, rowsum_ptr,
    P, Q, R, NUM_PROGRAMS,
    ROWSUM: tl.constexpr, TRANS_A: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_P: tl.constexpr,
):
    # linear_gelu_bwd_kernel's C = gz @ B, persistent, every tile moved by TMA (kernels/_tma.py's
    # loop). Descriptors: B [R, Q] in [BLOCK_R, BLOCK_Q] tiles, C [P, Q] in [BLOCK_P, BLOCK_Q];
    # dy and d are [P, R] in [BLOCK_P, BLOCK_R] tiles for grad_input, and for grad_weight
    # (TRANS_A) the same [M, N] tensors, read as [R, P] in [BLOCK_R, BLOCK_P] tiles (a descriptor
    # needs unit stride along its rows: dy.t() has none), gz formed in that layout and transposed
    # once, in the operand dtype, for the dot.
    tile_out = tl.program_id(0) - NUM_PROGRAMS
    for tile in tl.range(tl.program_id(0), tl.cdiv(P, BLOCK_P) * tl.cdiv(Q, BLOCK_Q), NUM_PROGRAMS, flatten=True):
        off_p, off_q = tile_origin(tile, P, Q, BLOCK_P, BLOCK_Q, GROUP_P)
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        rowsum = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for r in range(tl.cdiv(R, BLOCK_R)):
            # past R the copy engine reads zeros: dy = 0 there makes gz = 0
            b = b_desc.load([r * BLOCK_R, off_q])
            if TRANS_A:
                tile_r_p = [r * BLOCK_R, off_p]
                gz_t = dy_desc.load(tile_r_p).to(tl.float32) * d_desc.load(tile_r_p).to(tl.float32)
                if ROWSUM:
                    rowsum += tl.sum(gz_t, axis=0)
                gz = gz_t.to(b.dtype).T
            else:
                tile_p_r = [off_p, r * BLOCK_R]
                gz = dy_desc.load(tile_p_r).to(tl.float32) * d_desc.load(tile_p_r).to(tl.float32)
                if ROWSUM:
                    rowsum += tl.sum(gz, axis=1)
                gz = gz.to(b.dtype)
            acc = tl.dot(gz, b, acc, input_precision=DOT_PRECISION)
        tile_out += NUM_PROGRAMS
        row, col = tile_origin(tile_out, P, Q, BLOCK_P, BLOCK_Q, GROUP_P)
        c_desc.store([row, col], acc.to(c_desc.dtype))
        if ROWSUM:
            # Every column of tiles has the row sums; only the first writes them.
            offs_p = row + tl.arange(0, BLOCK_P)
            tl.store(rowsum_ptr + offs_p, rowsum.to(rowsum_ptr.dtype.element_ty), mask=(offs_p < P) & (col == 0))


# ---------------------------------------------------------------------------------------
# Launch configurations. On a GPU the kernels are autotuned over configs picked for H100
# (large 128x256 / 256x128 tiles for big GEMMs, narrow BLOCK_M for decode-sized M); under
# Triton's interpreter (CPU tensors) one small fixed config keeps tests fast.

_GEMM_SHAPES = [
    # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps): large tiles for large M ...
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
    # ... and narrow row blocks with deep K steps for decode-sized M, where the weight read dominates
    (32, 64, 128, 4, 4),
    (16, 128, 128, 4, 4),
    (16, 64, 256, 3, 4),
]
GROUP = 8
# The TMA forward, for M >= TMA_MIN_ROWS (decode-sized M keeps the narrow-row configs above):
# the large tiles; 128x256 and 256x128 at 3 stages leave room in shared memory for the
# epilogue's staging tiles (TMA stores read from shared memory). A 128x128 tile takes 8 warps:
# with 4, its erf epilogue spills (148 bytes on sm_90a).
_TMA_SHAPES = [
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
]
# The TMA backward (same rule): a stage holds tiles of dy, d and B, so the 128x256 tile takes
# 2 stages (3 would leave under 1 KB of the H100's shared memory). Compiled for sm_90a, none of
# these spills; a 256x128 tile spilled 156 bytes in the grad_weight launch (Triton 3.8) and was
# left out.
_TMA_BWD_SHAPES = [
    (128, 256, 64, 2, 8),
    (128, 128, 64, 4, 8),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
]
TMA_MIN_ROWS = 64


_FWD_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
_BWD_NAMES = ("BLOCK_P", "BLOCK_Q", "BLOCK_R", "GROUP_P")

_fwd = heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(linear_gelu_fwd_kernel)
_bwd = heuristics({"EVEN_R": lambda a: a["R"] % a["BLOCK_R"] == 0})(linear_gelu_bwd_kernel)
# The epilogue is part of the cost: erf or tanh, gelu'(z) stored beside y or not (the erf epilogue
# with gelu'(z) spills at the big tiles where the others do not), so the best tile for a shape is
# tuned per epilogue. STORE_Y is left out: recompute_preact's backward (no y) then reuses the
# forward's tile, and so its summation order, and gets the same bits as the forward kept.
_FWD_KEY = ["M", "N", "K", "APPROX_TANH", "STORE_GELU_GRAD", "DOT_PRECISION"]
_fwd_tuned = triton.autotune(
    configs=[config(_FWD_NAMES, (bm, bn, bk, GROUP), st, wa) for bm, bn, bk, st, wa in _GEMM_SHAPES],
    key=_FWD_KEY,
    prune_configs_by={"early_config_prune": prune_by_rows("M", "BLOCK_M")},
)(_fwd)
_bwd_tuned = triton.autotune(
    configs=[config(_BWD_NAMES, (bm, bn, bk, GROUP), st, wa) for bm, bn, bk, st, wa in _GEMM_SHAPES],
    # stride_dyp tells the grad_input launch (dy rows along p) from the transposed grad_weight one.
    key=["P", "Q", "R", "stride_dyp", "ROWSUM", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_by_rows("P", "BLOCK_P")},
)(_bwd)

_set_tma_blocks = block_shapes_hook({"x_desc": ("BLOCK_M", "BLOCK_K"), "w_desc": ("BLOCK_N", "BLOCK_K"),
                                     "y_desc": ("BLOCK_M", "BLOCK_N"), "d_desc": ("BLOCK_M", "BLOCK_N")})
_fwd_tma_tuned = triton.autotune(
    configs=[config(_FWD_NAMES, (bm, bn, bk, GROUP), st, wa, pre_hook=_set_tma_blocks)
             for bm, bn, bk, st, wa in _TMA_SHAPES],
    key=_FWD_KEY,
    prune_configs_by={"early_config_prune": prune_by_rows("M", "BLOCK_M")},
)(linear_gelu_fwd_tma_kernel)


def _set_tma_bwd_blocks(trans_a: bool):
    # dy and d are read as [BLOCK_R, BLOCK_P] tiles of [M, N] by the grad_weight launch
    a_tile = ("BLOCK_R", "BLOCK_P") if trans_a else ("BLOCK_P", "BLOCK_R")
    return block_shapes_hook({"dy_desc": a_tile, "d_desc": a_tile, "b_desc": ("BLOCK_R", "BLOCK_Q"),
                              "c_desc": ("BLOCK_P", "BLOCK_Q")})


# One autotuner per launch orientation: the descriptors' tile shapes (the pre-hook) differ.
_bwd_tma_tuned = {
    trans_a: triton.autotune(
        configs=[config(_BWD_NAMES, (bp, bq, br, GROUP), st, wa, pre_hook=_set_tma_bwd_blocks(trans_a))
                 for bp, bq, br, st, wa in _TMA_BWD_SHAPES],
        key=["P", "Q", "R", "ROWSUM", "DOT_PRECISION"],
        prune_configs_by={"early_config_prune": prune_by_rows("P", "BLOCK_P")},
    )(linear_gelu_bwd_tma_kernel)
    for trans_a in (False, True)
}

# One config for the interpreter (small tiles: quick, and odd test sizes cross tile edges),
# and one for GPUs with EFFKERN_TRITON_AUTOTUNE=0 (GPU tests: no autotuning per test shape).
_FIXED = {"interpreter": ((32, 32, 32, 4), 1, 4), "gpu": ((64, 128, 64, 8), 3, 4)}
_FIXED_TMA = {"interpreter": _FIXED["interpreter"], "gpu": ((128, 128, 64, 8), 4, 8)}
_FIXED_TMA_BWD = {"interpreter": _FIXED["interpreter"], "gpu": ((128, 128, 64, 8), 4, 8)}


def _fixed(names: tuple[str, ...], settings: dict = _FIXED) -> dict:
    # read per call (tests change the settings' entries), the kwargs made once per distinct
    # settings (callers do not modify them)
    return _fixed_kwargs(names, tuple(settings.items()))


@functools.lru_cache(maxsize=64)
def _fixed_kwargs(names: tuple[str, ...], settings: tuple) -> dict:
    return {where: dict(zip(names, blocks), num_stages=stages, num_warps=warps)
            for where, (blocks, stages, warps) in settings}


def _precise(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and not interpreted()


def linear_gelu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str,
                    store_out: bool = True, store_gelu_grad: bool = False):
    """x [M, K] (any strides), weight [N, K], bias [N] or None -> (y [M, N] or None,
    gelu'(z) [M, N] or None)."""
    M, K = x.shape
    N = weight.shape[0]
    x, weight = with_short_steps(x, 1), with_short_steps(weight, 1)
    y = x.new_empty((M, N)) if store_out else None
    d = x.new_empty((M, N)) if store_gelu_grad else None
    if M == 0 or N == 0:
        return y, d
    y_arg = y if y is not None else d
    d_arg = d if d is not None else y_arg
    kwargs = dict(HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", PRECISE=_precise(x.dtype),
                  STORE_Y=store_out, STORE_GELU_GRAD=store_gelu_grad, DOT_PRECISION=dot_precision(x.dtype))
    # fp32 keeps the plain kernel (its K tiles would be twice as wide in bytes; not worth a variant)
    if M >= TMA_MIN_ROWS and x.element_size() == 2 and tma_ready(x, weight, y_arg):
        _fwd_tma(x, weight, bias, y_arg, d_arg, kwargs)
        return y, d
    args = (
        x, weight, bias if bias is not None else x, y_arg, d_arg,
        M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        y_arg.stride(0), y_arg.stride(1), d_arg.stride(0), d_arg.stride(1),
    )
    launch(_fwd_tuned, _fwd, tiles(M, N, "BLOCK_M", "BLOCK_N"), args, kwargs, _fixed(_FWD_NAMES))
    return y, d


def _fwd_tma(x, weight, bias, y, d, kwargs) -> None:
    """linear_gelu_fwd_tma_kernel on x [M, K], weight [N, K] -> y, d [M, N] (y and d may be one
    tensor when only one is stored)."""
    M, N = x.shape[0], weight.shape[0]
    launch_persistent(_fwd_tma_tuned, linear_gelu_fwd_tma_kernel,
                      dict(x_desc=x, w_desc=weight, y_desc=y, d_desc=d),
                      (bias if bias is not None else x, M, N, x.shape[1]), M, N, kwargs,
                      _fixed(_FWD_NAMES, _FIXED_TMA), _set_tma_blocks)


def _bwd_gemm(dy, d, b, out, rowsum, transpose):
    """out[p, q] = sum_r gz[p, r] * b[r, q]; rowsum[p] = sum_r gz[p, r]; gz = dy * d. dy and d are
    [M, N]: gz is [P, R] = [M, N], or with ``transpose`` its transpose [N, M]."""
    kwargs = dict(ROWSUM=rowsum is not None, DOT_PRECISION=dot_precision(b.dtype))
    if out.shape[0] >= TMA_MIN_ROWS and b.element_size() == 2 and tma_ready(dy, d, b, out):
        R = dy.shape[0] if transpose else dy.shape[1]
        launch_persistent(_bwd_tma_tuned[transpose], linear_gelu_bwd_tma_kernel,
                          dict(dy_desc=dy, d_desc=d, b_desc=b, c_desc=out),
                          (rowsum if rowsum is not None else out, *out.shape, R), *out.shape,
                          dict(kwargs, TRANS_A=transpose), _fixed(_BWD_NAMES, _FIXED_TMA_BWD),
                          _set_tma_bwd_blocks(transpose), tile_blocks=("BLOCK_P", "BLOCK_Q"))
        return
    if transpose:
        dy, d = dy.t(), d.t()
    dy, d, b = with_short_steps(dy, 1), with_short_steps(d, 1), with_short_steps(b, 0)
    P, R = dy.shape
    Q = b.shape[1]
    args = (
        dy, d, b, out, rowsum if rowsum is not None else out,
        P, Q, R,
        dy.stride(0), dy.stride(1), d.stride(0), d.stride(1),
        b.stride(0), b.stride(1), out.stride(0), out.stride(1),
    )
    launch(_bwd_tuned, _bwd, tiles(P, Q, "BLOCK_P", "BLOCK_Q"), args, kwargs, _fixed(_BWD_NAMES))


def linear_gelu_bwd(grad_out: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None,
                    gelu_grad: torch.Tensor, output_mask):
    """Gradients of y = gelu(x @ w^T + b) given dy [M, N] and gelu'(z) [M, N] from the forward.

    Returns (grad_input [M, K], grad_weight [N, K], grad_bias [N]); entries not asked for in
    ``output_mask`` are None.
    """
    M, N = grad_out.shape
    need_input, need_weight, need_bias = output_mask
    grad_input = grad_weight = grad_bias = None
    if need_input:
        grad_input = grad_out.new_empty((M, weight.shape[1]))
        if grad_input.numel():
            _bwd_gemm(grad_out, gelu_grad, weight, grad_input, None, False)
        else:
            grad_input.zero_()
    if need_bias:
        grad_bias = grad_out.new_empty((N,))
    if need_weight or need_bias:
        # grad_weight = gz^T @ x: p = n, r = m, so dy and gelu'(z) are read transposed.
        # Without a weight gradient (bias only), or an empty one (K = 0: no output tiles, so no
        # program would write the row sums), a [M, 1] zero B gives the row sums alone.
        sums_only = not need_weight or x.shape[1] == 0
        b = grad_out.new_zeros((M, 1)) if sums_only else x
        c = grad_out.new_empty((N, b.shape[1]))
        if M == 0 or N == 0:
            c.zero_()
            if grad_bias is not None:
                grad_bias.zero_()
        else:
            _bwd_gemm(grad_out, gelu_grad, b, c, grad_bias, True)
        if need_weight:
            grad_weight = c[:, :0] if sums_only else c
    return grad_input, grad_weight, grad_bias
