"""INT4 weight-only matmul (W4A16) with group-wise scales and zeros, and GPTQ/AWQ importers.

Quantization, per group of ``group_size`` consecutive input features (along K) of each
output row n, j = k // group_size (group_size -1: one group per row):
    W[n, k] ~= (q[n, k] - zeros[n, j]) * scales[n, j],   q in [0, 15]
asymmetric: the range [min(w, 0), max(w, 0)] of the group in 15 steps, scale = range / 15,
    zero = round(-min / scale) (an integer in [0, 15]; 0 is exactly representable);
symmetric: zero = 8, scale = 2 * absmax / 15 (q - 8 in [-8, 7]).
q = clamp(round(w / scale) + zero, 0, 15), divided by the scale *as stored* (rounded up to the
storage dtype, so the levels still span the group), so every weight is within half a step of
its dequantized value. Scales and zeros are stored in the
weight's dtype (zeros hold integers in [0, 15]); a group of zeros gets scale 1 (and zero 8 when
symmetric, -0.0 when not: q - z is then 0 or q, w = 0 either way).

effkern's packed layout, ``qweight`` int32 [N, K / 8], eight 4-bit values along K per word:

    q[n, 8w + 0] .. q[n, 8w + 7]  ->  qweight[n, w] = q0 | q1 << 4 | q2 << 8 | ... | q7 << 28
    bits:  31..28  27..24  23..20  19..16  15..12  11..8  7..4  3..0
           q[8w+7] q[8w+6] q[8w+5] q[8w+4] q[8w+3] q[8w+2] q[8w+1] q[8w+0]

A row of W is a row of qweight, like nn.Linear.weight; ``scales``/``zeros`` are [N, K / group].

Ops (schemas defined here and nowhere else):
  effkern::pack_int4(q) -> qweight int32 [..., K / 8], q [..., K] integers in [0, 15]
  effkern::unpack_int4(qweight) -> q uint8 [..., K], the exact inverse
  effkern::quantize_int4(weight, group_size=128, symmetric=False) -> (qweight, scales, zeros)
  effkern::dequantize_int4(qweight, scales, zeros, group_size, dtype=None) -> weight [N, K];
      differentiable in scales and zeros (as the plain PyTorch formula is)
  effkern::dequantize_int4_bwd(grad, qweight, scales, zeros, group_size, output_mask)
      -> (grad_scales, grad_zeros)
  effkern::int4_linear(input, qweight, scales, zeros, group_size, bias=None) -> Tensor
      y = input @ dequantize_int4(qweight, scales, zeros, group_size).T + bias, differentiable
      in input and bias (the weight is frozen)
  effkern::int4_linear_bwd(grad_out, qweight, scales, zeros, group_size, output_mask)
      -> (grad_input, grad_bias); grad_input = grad_out @ W, W dequantized to grad_out's dtype
Python functions: gptq_to_int4, awq_to_int4 (the importers, which call the ops above).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from . import _policy
from ._cache import DerivedCache
from ._backend import backend_available, kernel_module, require, selected_backend
from ._registry import autocast_on, register_autocast, register_family
from ._tensors import check_same_device, empty, rows, rows_shape

GROUP_SIZES = (32, 64, 128, 256, -1)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = ACTIVATION_DTYPES + (torch.float64,)
BACKENDS = ("triton", "cuda", "reference")


# ---------------------------------------------------------------------------- packing

# (torch's uint16/32/64 lack the comparisons the range check needs)
PACKABLE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_pack_args(q) -> None:
    if q.dim() < 1:
        raise ValueError("pack_int4: q must have shape [..., K], got a scalar")
    if q.shape[-1] % 8:
        raise ValueError(f"pack_int4: the last dimension must be a multiple of 8, got {q.shape[-1]}")
    if q.dtype not in PACKABLE_DTYPES:
        raise TypeError(f"pack_int4: q must be uint8, int8, int16, int32 or int64, got {q.dtype}")


def check_unpack_args(qweight) -> None:
    if qweight.dtype != torch.int32:
        raise TypeError(f"unpack_int4: qweight must be int32 (eight 4-bit values per word), got {qweight.dtype}")
    if qweight.dim() < 1:
        raise ValueError("unpack_int4: qweight must have shape [..., K / 8], got a scalar")


def pack_int4_reference(q: Tensor) -> Tensor:
    """The packing alone (no range check): q [..., K] in [0, 15] -> int32 [..., K / 8]."""
    # Byte by byte: byte b of a little-endian word holds nibbles 2b (low) and 2b + 1 (high), so
    # the bytes in order are q[2i] | q[2i + 1] << 4, and 4 of them viewed as int32 are a word.
    # Nothing wider than the input is made (an int64 copy of a 16k x 16k weight is 2 GB).
    q8 = q.to(torch.uint8)
    words = torch.empty((*q.shape[:-1], q.shape[-1] // 8), dtype=torch.int32, device=q.device)
    words.view(torch.uint8).copy_(q8[..., 0::2] | (q8[..., 1::2] << 4))
    return words


def unpack_int4_reference(qweight: Tensor) -> Tensor:
    """int32 [..., K / 8] -> uint8 [..., K] in [0, 15]."""
    pairs = qweight.contiguous().view(torch.uint8)  # byte i: q[2i] low, q[2i + 1] high
    return torch.stack((pairs & 0xF, pairs >> 4), dim=-1).flatten(-2)


@torch.library.custom_op("effkern::pack_int4", mutates_args=())
def _pack_int4(q: Tensor) -> Tensor:
    check_pack_args(q)
    # (a wait for the GPU: packing runs once per weight, not per call; a tensor without data, on
    # the meta device or a fake one, as in a model built there before its weights load, has no
    # values to check: those reach the fake implementation, not this one)
    if q.numel() and q.device.type != "meta" and not isinstance(q, FakeTensor):
        low, high = (int(v) for v in torch.aminmax(q))
        if low < 0 or high > 15:
            raise ValueError(f"pack_int4: q must hold values in [0, 15], got values in [{low}, {high}]")
    return pack_int4_reference(q)


@_pack_int4.register_fake
def _(q):
    check_pack_args(q)
    return q.new_empty((*q.shape[:-1], q.shape[-1] // 8), dtype=torch.int32)


@torch.library.custom_op("effkern::unpack_int4", mutates_args=())
def _unpack_int4(qweight: Tensor) -> Tensor:
    check_unpack_args(qweight)
    return unpack_int4_reference(qweight)


@_unpack_int4.register_fake
def _(qweight):
    check_unpack_args(qweight)
    return qweight.new_empty((*qweight.shape[:-1], qweight.shape[-1] * 8), dtype=torch.uint8)


def pack_int4(q: Tensor) -> Tensor:
    """q [..., K] with integers in [0, 15] (PACKABLE_DTYPES), K % 8 == 0 -> int32 [..., K / 8],
    eight values per word, the lowest k in the lowest bits (the op effkern::pack_int4; values
    outside [0, 15] are a ValueError, checked in the op: one wait for the GPU)."""
    check_pack_args(q)
    return torch.ops.effkern.pack_int4(q)


def unpack_int4(qweight: Tensor) -> Tensor:
    """The inverse of pack_int4: int32 [..., K / 8] -> uint8 [..., K] in [0, 15] (the op
    effkern::unpack_int4)."""
    check_unpack_args(qweight)
    return torch.ops.effkern.unpack_int4(qweight)


def _group(group_size: int, K: int) -> int:
    # -1: one group per row; at K = 0 the rows have no groups, of a nominal size the kernels take
    return (K or GROUP_SIZES[0]) if group_size == -1 else group_size


def _dequantize_compute_dtype(dtype: torch.dtype, scales_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (dtype, scales_dtype) else torch.float32


def dequantize_int4_reference(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                              dtype: Optional[torch.dtype] = None) -> Tensor:
    """W [N, K] = (q - zeros) * scales in fp32 (float64 for float64 scales or dtype), rounded once
    to ``dtype`` (default: the scales' dtype)."""
    dtype = dtype or scales.dtype
    ct = _dequantize_compute_dtype(dtype, scales.dtype)
    G = _group(group_size, qweight.shape[1] * 8)
    q = unpack_int4_reference(qweight).to(ct)
    w = (q - zeros.to(ct).repeat_interleave(G, dim=1)) * scales.to(ct).repeat_interleave(G, dim=1)
    return w.to(dtype)


@torch.library.custom_op("effkern::dequantize_int4", mutates_args=())
def _dequantize_int4(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                     dtype: Optional[torch.dtype] = None) -> Tensor:
    check_weight("dequantize_int4", qweight, scales, zeros, group_size)
    return dequantize_int4_reference(qweight, scales, zeros, group_size, dtype)


@_dequantize_int4.register_fake
def _(qweight, scales, zeros, group_size, dtype=None):
    check_weight("dequantize_int4", qweight, scales, zeros, group_size)
    return scales.new_empty((qweight.shape[0], qweight.shape[1] * 8), dtype=dtype or scales.dtype)


@torch.library.custom_op("effkern::dequantize_int4_bwd", mutates_args=())
def _dequantize_int4_bwd(grad: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                         output_mask: list[bool]) -> tuple[Tensor, Tensor]:
    """The formula's gradients, as autograd takes them through it in plain PyTorch: per group,
    sum of grad * (q - z) for the scale and of -grad * s for the zero, in the forward's compute
    dtype, each in its tensor's dtype (an empty tensor for one not asked for)."""
    need_scales, need_zeros = output_mask
    N, K = grad.shape
    G = _group(group_size, K)
    ct = _dequantize_compute_dtype(grad.dtype, scales.dtype)
    g = grad.to(ct).reshape(N, K // G, G)
    grad_scales, grad_zeros = empty(scales), empty(zeros)
    if need_scales:
        q = unpack_int4_reference(qweight).to(ct).view(N, K // G, G)
        grad_scales = (g * (q - zeros.to(ct).unsqueeze(-1))).sum(-1).to(scales.dtype)
    if need_zeros:
        grad_zeros = (g * -scales.to(ct).unsqueeze(-1)).sum(-1).to(zeros.dtype)
    return grad_scales, grad_zeros


@_dequantize_int4_bwd.register_fake
def _(grad, qweight, scales, zeros, group_size, output_mask):
    need_scales, need_zeros = output_mask
    return (scales.new_empty(scales.shape) if need_scales else empty(scales),
            zeros.new_empty(zeros.shape) if need_zeros else empty(zeros))


def _dequantize_setup_context(ctx, inputs, output):
    qweight, scales, zeros, group_size, dtype = inputs
    ctx.needs = [bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2])]
    ctx.group_size = group_size
    # the op's own inputs (kept alive, not copied): d/d scales needs q - zeros, d/d zeros the
    # scales, and each gradient its tensor's dtype
    ctx.save_for_backward(qweight, scales, zeros)


def _dequantize_backward(ctx, grad):
    grad_scales, grad_zeros = torch.ops.effkern.dequantize_int4_bwd(grad, *ctx.saved_tensors, ctx.group_size,
                                                                    ctx.needs)
    return None, grad_scales if ctx.needs[0] else None, grad_zeros if ctx.needs[1] else None, None, None


_dequantize_int4.register_autograd(_dequantize_backward, setup_context=_dequantize_setup_context)


def dequantize_int4(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                    dtype: Optional[torch.dtype] = None) -> Tensor:
    """W [N, K] = (q - zeros) * scales, computed in fp32 (float64 for float64 scales) and rounded
    once to ``dtype`` (default: the scales' dtype); the exact inverse of the packing. The op
    effkern::dequantize_int4; differentiable in scales and zeros."""
    check_weight("dequantize_int4", qweight, scales, zeros, group_size)
    return torch.ops.effkern.dequantize_int4(qweight, scales, zeros, group_size, dtype)


def _store_rounding_up(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """scale (fp32, positive) in ``dtype``, rounded up where rounding to nearest went down: a
    stored scale no smaller than the exact one keeps every weight within half a step of a level."""
    stored = scale.to(dtype)
    if dtype == torch.float64:
        return stored
    bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[dtype]
    next_up = (stored.view(bits) + 1).view(dtype)  # positive floats: the next bit pattern is the next value
    return torch.where(stored.float() < scale, next_up, stored)


def check_quantize_args(weight, group_size) -> None:
    _check_tensor("quantize_int4", "weight", weight, REFERENCE_DTYPES, "a float tensor")
    if weight.dim() != 2:
        raise ValueError(f"effkern.quantize_int4: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    _check_sizes("quantize_int4", weight.shape[0], weight.shape[1], group_size)


def quantize_int4_reference(weight: Tensor, group_size: int = 128,
                            symmetric: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    N, K = weight.shape
    G = _group(group_size, K)
    w = weight.detach().float().view(N, K // G, G)
    if symmetric:
        scale = w.abs().amax(-1) * (2 / 15)
        zero = torch.full_like(scale, 8.0)
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = (hi - lo) / 15
    scale = _store_rounding_up(torch.where(scale > 0, scale, torch.ones_like(scale)), weight.dtype)
    if not symmetric:
        zero = torch.round(-lo / scale.float()).clamp(0, 15)
    q = (torch.round(w / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, 15)
    return pack_int4_reference(q.view(N, K).to(torch.uint8)), scale, zero.to(weight.dtype)


@torch.library.custom_op("effkern::quantize_int4", mutates_args=())
def _quantize_int4(weight: Tensor, group_size: int = 128, symmetric: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    check_quantize_args(weight, group_size)
    return quantize_int4_reference(weight, group_size, symmetric)


@_quantize_int4.register_fake
def _(weight, group_size=128, symmetric=False):
    check_quantize_args(weight, group_size)
    N, K = weight.shape
    groups = (N, K // _group(group_size, K))
    return (weight.new_empty((N, K // 8), dtype=torch.int32), weight.new_empty(groups), weight.new_empty(groups))


def quantize_int4(weight: Tensor, group_size: int = 128, symmetric: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """weight [N, K] (nn.Linear layout) -> (qweight int32 [N, K / 8], scales [N, K / G], zeros [N, K / G]),
    scales and zeros in weight's dtype. See the module docstring for the rule and the layout. The
    op effkern::quantize_int4; not differentiable (the weight is detached)."""
    check_quantize_args(weight, group_size)
    return torch.ops.effkern.quantize_int4(weight.detach(), group_size, bool(symmetric))


# ---------------------------------------------------------------------------- checkpoint importers

def _unpack_along_columns(packed: Tensor, order=range(8)) -> Tensor:
    """int32 [R, C / 8] with eight values along C per word, value ``order[j]`` of each eight in
    nibble j -> int64 [R, C]."""
    nibbles = unpack_int4(packed).to(torch.int64).unflatten(-1, (-1, 8))
    inverse = [list(order).index(i) for i in range(8)]
    return nibbles[..., inverse].flatten(-2)


def _check_packed(fn: str, name: str, t, layout: str, shape: Optional[tuple] = None) -> None:
    """A checkpoint's packed tensor: int32, 2-D ``layout``, and ``shape`` where given."""
    _check_tensor(fn, name, t, (torch.int32,), f"int32 {layout} (eight 4-bit values per word)")
    if t.dim() != 2 or (shape is not None and tuple(t.shape) != shape):
        expected = layout if shape is None else f"{layout} = {list(shape)}"
        raise ValueError(f"effkern.{fn}: {name} must have shape {expected}, got {list(t.shape)}")


def _check_checkpoint(fn: str, qweight: Tensor, qzeros, scales, K: int, N: int) -> int:
    """Checks a checkpoint's qzeros and scales against the K x N weight its qweight holds and
    returns the group size G = K / scales.shape[0] (K itself for one group per row)."""
    if K % 8 or N % 8:
        raise ValueError(f"effkern.{fn}: the weight's K={K} and N={N} (from qweight {list(qweight.shape)}) must be "
                         f"multiples of 8 (eight 4-bit values per 32-bit word)")
    _check_tensor(fn, "scales", scales, REFERENCE_DTYPES, "a float tensor")
    if scales.dim() != 2 or scales.shape[1] != N or scales.shape[0] == 0 or K % scales.shape[0]:
        raise ValueError(f"effkern.{fn}: scales must have shape [K / G, N] with N={N} and K={K} a multiple of "
                         f"K / G (from qweight {list(qweight.shape)}), got {list(scales.shape)}")
    n_groups = scales.shape[0]
    G = K // n_groups
    if n_groups > 1 and G not in GROUP_SIZES:
        raise ValueError(f"effkern.{fn}: K={K} in {n_groups} groups (scales {list(scales.shape)}) is a group size "
                         f"of {G}; effkern takes {GROUP_SIZES[:-1]} or one group per row")
    _check_packed(fn, "qzeros", qzeros, "[K / G, N / 8]", (n_groups, N // 8))
    check_same_device(fn, "qweight", qweight, qzeros=qzeros, scales=scales)
    return G


def gptq_to_int4(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Optional[Tensor] = None,
                 zero_offset: int = 1) -> tuple[Tensor, Tensor, Tensor, int, Optional[Tensor]]:
    """A GPTQ 4-bit checkpoint's tensors -> (qweight, scales, zeros, group_size, perm) in effkern's layout.

    GPTQ (AutoGPTQ / GPTQ-for-LLaMa): qweight int32 [K / 8, N], eight values along K per word
    (lowest k lowest); qzeros int32 [K / G, N / 8], eight values along N per word, each stored
    minus ``zero_offset`` (1 in the classic format, 0 in "gptq_v2"); scales [K / G, N]; g_idx [K]
    the group of each input feature. Dequantized: W^T[k, n] = scales[g_idx[k], n] *
    (q[k, n] - (qzeros[g_idx[k], n] + zero_offset)).
    The classic format's +1 is taken modulo 16, as AutoGPTQ's PyTorch dequantization takes it: the
    quantizer's zero of 0, stored as -1 in four bits (15), is z = 0 (a kernel that adds 1 without
    the wrap would read 16 there).
    With act-order (g_idx not k // G) the input features are permuted so that groups are
    contiguous: the layer must read ``input[..., perm]`` (Int4Linear does); perm is None otherwise.
    """
    fn = "gptq_to_int4"
    if zero_offset not in (0, 1):
        raise ValueError(f"effkern.{fn}: zero_offset must be 1 (classic GPTQ) or 0 (gptq_v2), got {zero_offset!r}")
    _check_packed(fn, "qweight", qweight, "[K / 8, N]")
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    G = _check_checkpoint(fn, qweight, qzeros, scales, K, N)
    n_groups = K // G
    q = unpack_int4(qweight.t()).t()  # [K, N]: GPTQ packs along K, like effkern, but transposed
    z = (_unpack_along_columns(qzeros) + zero_offset) % 16  # [K / G, N], in [0, 15]
    perm = None
    if g_idx is not None:
        _check_tensor(fn, "g_idx", g_idx, (torch.int16, torch.int32, torch.int64), "an integer tensor [K]")
        if tuple(g_idx.shape) != (K,):
            raise ValueError(f"effkern.{fn}: g_idx must have shape [K] = [{K}], got {list(g_idx.shape)}")
        if g_idx.device != qweight.device:
            raise RuntimeError(f"effkern.{fn}: g_idx is on {g_idx.device} but qweight is on {qweight.device}")
        g_idx = g_idx.to(torch.int64)
        outside = (g_idx < 0) | (g_idx >= n_groups)
        if bool(outside.any()):
            raise ValueError(f"effkern.{fn}: g_idx must hold group indices in [0, {n_groups}) (scales has "
                             f"{n_groups} groups), got {int(g_idx[outside][0])}")
        if not torch.equal(g_idx, torch.arange(K, device=g_idx.device) // G):
            counts = torch.bincount(g_idx, minlength=n_groups)
            if not bool((counts == G).all()):
                raise ValueError(f"effkern.{fn}: g_idx must put exactly {G} input features in each group "
                                 f"(K={K} in {n_groups} groups), got group sizes from {int(counts.min())} "
                                 f"to {int(counts.max())}")
            perm = torch.argsort(g_idx, stable=True)
            q = q[perm]
    return (pack_int4(q.t().contiguous().to(torch.uint8)), scales.t().contiguous(),
            z.t().to(scales.dtype).contiguous(), G if G != K else -1, perm)


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # value AWQ_ORDER[j] of each eight columns sits in nibble j


def awq_to_int4(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """An AWQ (AutoAWQ "GEMM" format) 4-bit checkpoint's tensors -> (qweight, scales, zeros,
    group_size) in effkern's layout.

    AWQ: qweight int32 [K, N / 8] and qzeros int32 [K / G, N / 8], eight values along N per word
    in the interleaved order AWQ_ORDER; scales [K / G, N]. Dequantized:
    W^T[k, n] = (q[k, n] - z[k // G, n]) * scales[k // G, n].
    """
    fn = "awq_to_int4"
    _check_packed(fn, "qweight", qweight, "[K, N / 8]")
    K, N = qweight.shape[0], qweight.shape[1] * 8
    G = _check_checkpoint(fn, qweight, qzeros, scales, K, N)
    q = _unpack_along_columns(qweight, AWQ_ORDER)  # [K, N]
    z = _unpack_along_columns(qzeros, AWQ_ORDER)  # [K / G, N]
    return (pack_int4(q.t().contiguous().to(torch.uint8)), scales.t().contiguous(),
            z.t().to(scales.dtype).contiguous(), G if G != K else -1)


# ---------------------------------------------------------------------------- checks

def _check_tensor(op: str, name: str, t, dtypes: tuple, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"effkern.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"effkern.{op}: {name} must be {what}, got dtype {t.dtype}")


def _check_sizes(op: str, N: int, K: int, group_size) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"effkern.{op}: group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if N % 8 or K % 8:
        raise ValueError(f"effkern.{op}: N={N} and K={K} must be multiples of 8 (eight 4-bit values per "
                         f"32-bit word, and the CUDA kernel's tiles)")
    if K % _group(group_size, K):
        raise ValueError(f"effkern.{op}: K={K} is not divisible by group_size={group_size}")


def check_weight(op: str, qweight, scales, zeros, group_size) -> None:
    if isinstance(qweight, Tensor) and qweight.is_floating_point():
        raise TypeError(f"effkern.{op}: qweight must be the packed int32 tensor from effkern.quantize_int4, "
                        f"got a {qweight.dtype} tensor")
    _check_tensor(op, "qweight", qweight, (torch.int32,), "int32 (eight packed 4-bit values per word)")
    if qweight.dim() != 2:
        raise ValueError(f"effkern.{op}: qweight must be 2-D [N, K / 8], got shape {tuple(qweight.shape)}")
    N, K = qweight.shape[0], qweight.shape[1] * 8
    _check_sizes(op, N, K, group_size)
    shape = (N, K // _group(group_size, K))
    for name, t in (("scales", scales), ("zeros", zeros)):
        _check_tensor(op, name, t, REFERENCE_DTYPES, "a float tensor")
        if tuple(t.shape) != shape:
            raise ValueError(f"effkern.{op}: {name} must have shape [N, K / group_size] = {list(shape)} for "
                             f"qweight {list(qweight.shape)} and group_size={group_size}, got {list(t.shape)}")
        if t.device != qweight.device:
            raise RuntimeError(f"effkern.{op}: {name} is on {t.device} but qweight is on {qweight.device}")


def check_linear_args(op: str, input, qweight, scales, zeros, group_size, bias,
                      mixed_dtypes_allowed: bool = False) -> None:
    """``mixed_dtypes_allowed``: a bias of another float dtype than input, for a caller inside
    torch.autocast, which casts both before the op runs (the op checks again after the cast)."""
    _check_tensor(op, "input", input, REFERENCE_DTYPES, "float16, bfloat16 or float32")
    if input.dim() < 1:
        raise ValueError(f"effkern.{op}: input must have shape [..., K], got a scalar")
    check_weight(op, qweight, scales, zeros, group_size)
    N, K = qweight.shape[0], qweight.shape[1] * 8
    if input.shape[-1] != K:
        raise ValueError(f"effkern.{op}: input's last dimension K={input.shape[-1]} does not match the "
                         f"weight's K={K} (qweight is [N, K / 8] = {list(qweight.shape)})")
    if bias is not None:
        _check_tensor(op, "bias", bias, REFERENCE_DTYPES, "a float tensor")
        if bias.dtype != input.dtype and not mixed_dtypes_allowed:
            raise TypeError(f"effkern.{op}: bias has dtype {bias.dtype} but input has {input.dtype}; "
                            f"use one dtype (or torch.autocast)")
        if tuple(bias.shape) != (N,):
            raise ValueError(f"effkern.{op}: bias must have shape [N] = [{N}], got {list(bias.shape)}")
    check_same_device(op, "input", input, qweight=qweight, bias=bias)


# ---------------------------------------------------------------------------- backends

def _cuda_layout():
    from . import int4_cuda_layout  # the CUDA kernel's pre-shuffled weight layout

    return int4_cuda_layout


def _cuda_kernel_runs(device: torch.device, dtype: torch.dtype, scales_dtype: torch.dtype, M: int, N: int, K: int,
                      group_size: int) -> bool:
    # scales in the activation dtype: the kernel multiplies in that dtype, and other scales would
    # be rounded once more than the reference does
    return (device.type == "cuda" and scales_dtype == dtype and backend_available("cuda", device)[0]
            and hasattr(torch.ops.effkern_C, "int4_linear")
            and _cuda_layout().cuda_kernel_supports(M, N, K, group_size, dtype))


@functools.lru_cache(maxsize=4096)
def _auto_backend(device: torch.device, dtype: torch.dtype, scales_dtype: torch.dtype, M: int, N: int, K: int,
                  group_size: int) -> str:
    # Cached: at decoding sizes the lookup would cost as much as the GPU work.
    if device.type != "cuda" or dtype == torch.float64 or not backend_available("triton", device)[0]:
        return "reference"
    choice = _policy.choose("int4", "fwd", torch.cuda.get_device_name(device), dtype=str(dtype).removeprefix("torch."),
                            M=M, N=N, K=K, group_size=group_size)
    if choice == "cuda" and _cuda_kernel_runs(device, dtype, scales_dtype, M, N, K, group_size):
        return "cuda"
    return "triton"


def choose_backend(op: str, input: Tensor, scales: Tensor, group_size: int, N: int) -> str:
    """triton, cuda or reference for int4_linear on ``input``: ``auto`` follows the measurements
    in effkern/policies/int4.json (per GPU, nearest measured shape), triton where there are none."""
    name = selected_backend()
    device, dtype = input.device, input.dtype
    M, K = rows_shape(input)
    if name == "auto":
        return _auto_backend(device, dtype, scales.dtype, M, N, K, group_size)
    require(name, device, op, dot_dtype=dtype)
    if name != "reference" and dtype == torch.float64:
        raise TypeError(f"effkern.{op}: backend {name!r} takes float16, bfloat16 or float32, got float64 "
                        f"(float64 runs on the reference backend)")
    if name == "cuda" and not _cuda_kernel_runs(device, dtype, scales.dtype, M, N, K, group_size):
        raise RuntimeError(f"effkern.{op}: the CUDA int4 kernel runs on CUDA tensors of float16/bfloat16, with scales "
                           f"and zeros in that dtype, for the shapes effkern.int4_cuda_layout.cuda_kernel_supports "
                           f"accepts (M <= 64, N % 64 == 0, K % 128 == 0); got {device.type} {dtype} (scales "
                           f"{scales.dtype}), M={M}, N={N}, K={K}, group_size={group_size}. Use triton or auto.")
    return name


def _describe_auto(device: torch.device) -> str:
    if device.type != "cuda" or not backend_available("triton", device)[0]:
        return "reference" + (" (auto on CPU)" if device.type == "cpu" else "")
    gpu = torch.cuda.get_device_name(device)
    if _policy._entries("int4", gpu):
        return f"per shape from effkern/policies/int4.json (measured on {gpu}), triton elsewhere"
    return f"triton (no measurements recorded for {gpu})"


register_family("int4", _describe_auto)


_CUDA_LAYOUTS = DerivedCache()  # the CUDA kernel's pre-shuffled copy of each weight (same memory again)


# ---------------------------------------------------------------------------- ops

def int4_linear_reference(input: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                          bias: Optional[Tensor] = None) -> Tensor:
    """F.linear on the weight dequantized (fp32) and rounded once to the input's dtype."""
    return F.linear(input, dequantize_int4_reference(qweight, scales, zeros, group_size, input.dtype), bias)


@torch.library.custom_op("effkern::int4_linear", mutates_args=())
def _int4_linear(input: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                 bias: Optional[Tensor] = None) -> Tensor:
    check_linear_args("int4_linear", input, qweight, scales, zeros, group_size, bias)
    N = qweight.shape[0]
    backend = choose_backend("int4_linear", input, scales, group_size, N)
    if backend == "reference":
        return int4_linear_reference(input, qweight, scales, zeros, group_size, bias)
    x2d = rows(input)
    if backend == "triton":
        out = kernel_module("int4").int4_matmul(x2d, qweight, scales, zeros, _group(group_size, x2d.shape[1]), bias)
    else:
        shuffled = _CUDA_LAYOUTS.get((qweight, scales, zeros), lambda: _cuda_layout().shuffle_for_cuda(
            qweight, scales, zeros, group_size))
        out = torch.ops.effkern_C.int4_linear(x2d.contiguous(), *shuffled, group_size, bias)
    return out if input.dim() == 2 else out.view(*input.shape[:-1], N)


@_int4_linear.register_fake
def _(input, qweight, scales, zeros, group_size, bias=None):
    check_linear_args("int4_linear", input, qweight, scales, zeros, group_size, bias)
    return input.new_empty((*input.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("effkern::int4_linear_bwd", mutates_args=())
def _int4_linear_bwd(grad_out: Tensor, qweight: Optional[Tensor], scales: Optional[Tensor], zeros: Optional[Tensor],
                     group_size: int, output_mask: list[bool]) -> tuple[Tensor, Tensor]:
    need_input, need_bias = output_mask
    g2d = rows(grad_out)
    grad_input = grad_bias = empty(grad_out)
    if need_input:
        # Training through a frozen int4 layer (adapters): the weight dequantized once per
        # backward, then one GEMM; K x N x 2 bytes of scratch in grad_out's dtype.
        weight = dequantize_int4_reference(qweight, scales, zeros, group_size, grad_out.dtype)
        grad_input = (g2d @ weight).view(*grad_out.shape[:-1], weight.shape[1])
    if need_bias:
        grad_bias = g2d.sum(0)
    return grad_input, grad_bias


@_int4_linear_bwd.register_fake
def _(grad_out, qweight, scales, zeros, group_size, output_mask):
    need_input, need_bias = output_mask
    return (grad_out.new_empty((*grad_out.shape[:-1], qweight.shape[1] * 8)) if need_input else empty(grad_out),
            grad_out.new_empty(grad_out.shape[-1:]) if need_bias else empty(grad_out))


def _setup_context(ctx, inputs, output):
    input, qweight, scales, zeros, group_size, bias = inputs
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise RuntimeError("effkern.int4_linear: scales or zeros require grad, but the quantized weight is frozen: "
                           "int4_linear gives gradients for the input and the bias only. Call requires_grad_(False) "
                           "on them, and train adapters (e.g. LoRA) instead of the weight")
    ctx.needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[5])]
    ctx.group_size = group_size
    ctx.save_for_backward(*((qweight, scales, zeros) if ctx.needs[0] else (None, None, None)))


def _backward(ctx, grad_out):
    grad_input, grad_bias = torch.ops.effkern.int4_linear_bwd(grad_out, *ctx.saved_tensors, ctx.group_size,
                                                              ctx.needs)
    return (grad_input if ctx.needs[0] else None, None, None, None, None, grad_bias if ctx.needs[1] else None)


_int4_linear.register_autograd(_backward, setup_context=_setup_context)
register_autocast("int4_linear", cast_args=(0, 5))  # input and bias; scales/zeros keep their stored precision


def int4_linear(input: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int = 128,
                bias: Optional[Tensor] = None) -> Tensor:
    """W4A16 ``F.linear``: input [..., K] (float16, bfloat16 or float32) times the int4 weight
    (qweight int32 [N, K / 8], scales and zeros [N, K / group_size], from quantize_int4 or the
    GPTQ/AWQ importers) dequantized inside the kernel, fp32 accumulation, + bias [N] (input's
    dtype). Differentiable in input and bias."""
    check_linear_args("int4_linear", input, qweight, scales, zeros, group_size, bias,
                      mixed_dtypes_allowed=autocast_on(input))
    return torch.ops.effkern.int4_linear(input, qweight, scales, zeros, group_size, bias)
