"""INT8 matmul: W8A8 with dynamic per-token activation quantization, and W8A16 weight-only.

Quantization (symmetric, one float32 scale per row, round half to even, clamp to +-127):
    scale[r] = max_k |x[r, k]| / 127,   q[r, k] = clamp(round(x[r, k] / scale[r]), -127, 127)
A row of zeros gets scale 0 and q = 0 (no NaN). Weights [N, K] are quantized per output
channel (row), activations [..., K] per token (row), by the same rule.

Ops (schemas defined here and nowhere else):
  effkern::quantize_per_token_int8(input) -> (q int8 [..., K], scale float32 [...])
  effkern::int8_mm(a, b) -> int32 [M, N] = a @ b.T, a int8 [M, K], b int8 [N, K]; exact (wraps
      modulo 2^32 only where the true sum does not fit int32), any M, N, K
  effkern::int8_matmul(a_q, b_q, a_scale, b_scale, bias=None, out_dtype=bfloat16)
      = (a_q @ b_q.T) * a_scale[..., None] * b_scale + bias, the int32 accumulator dequantized in fp32
  effkern::int8_linear(input, qweight, weight_scale, bias=None)             W8A8, differentiable
      = int8_matmul(*quantize_per_token_int8(input), qweight, weight_scale, bias, input.dtype)
  effkern::int8_weight_only_linear(input, qweight, weight_scale, bias=None) W8A16, differentiable
      = (input @ qweight.T) * weight_scale + bias   (fp32 accumulation, the scale applied after)
  effkern::int8_linear_bwd(grad_out, qweight, weight_scale, output_mask) -> (grad_input, grad_bias)
      the backward of both: grad_input = grad_out @ (qweight * weight_scale[:, None]), the weight
      dequantized to grad_out's dtype; grad_bias = grad_out summed over tokens
Python function: quantize_int8(weight) -> (qweight int8 [N, K], scale float32 [N]).

int8_linear on the triton backend quantizes the activations either in a kernel of their own
before the GEMM or inside the GEMM (w8a8_quantization(): EFFKERN_INT8_QUANTIZATION, or on auto
the faster as measured per shape on this GPU model); the results are the same bits.

Autograd: the weight is frozen (int8 tensors cannot require grad; a weight_scale that requires
grad is an error). For W8A8 the gradient flows through the per-token quantization of the
input as if it were the identity (the straight-through estimator of quantization-aware
training), so both linear ops share one backward.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _policy
from ._backend import backend_available, kernel_module, require, selected_backend
from ._registry import autocast_on, register_autocast, register_family
from ._tensors import check_same_device, empty, rows

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# float64 activations run on the reference backend only (tests, gradcheck).
REFERENCE_DTYPES = FLOAT_DTYPES + (torch.float64,)
BACKENDS = ("triton", "reference")


# ---------------------------------------------------------------------------- references

def quantize_rows_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 quantization of x [..., K] in fp32: (q [..., K], scale [...])."""
    xf = x.float()
    # 127 as a tensor on x's device: CUDA divides by a Python number as a multiply by its
    # reciprocal, one rounding off the correctly rounded quotient the kernels compute
    scale = xf.abs().amax(-1) / xf.new_full((), 127.0) if x.shape[-1] else xf.new_zeros(x.shape[:-1])
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    q = torch.round(xf / divisor).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_accumulate_reference(a: Tensor, b: Tensor) -> Tensor:
    """Exact a @ b.T for int8 a [..., K], b [N, K], as float64 (exact while |sum| < 2^53)."""
    return a.double() @ b.double().t()


def int8_matmul_reference(a_q: Tensor, b_q: Tensor, a_scale: Tensor, b_scale: Tensor,
                          bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    # The exact accumulator rounded once to fp32, then scaled in fp32, in the kernels' order.
    out = int8_accumulate_reference(a_q, b_q).float() * a_scale.unsqueeze(-1) * b_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def int8_linear_reference(input: Tensor, qweight: Tensor, weight_scale: Tensor,
                          bias: Optional[Tensor] = None) -> Tensor:
    xq, xs = quantize_rows_reference(input)
    if input.dtype == torch.float64:  # float64: the same quantization, dequantized in float64
        out = int8_accumulate_reference(xq, qweight) * xs.double().unsqueeze(-1) * weight_scale.double()
        return out + bias if bias is not None else out
    return int8_matmul_reference(xq, qweight, xs, weight_scale, bias, input.dtype)


def int8_weight_only_linear_reference(input: Tensor, qweight: Tensor, weight_scale: Tensor,
                                      bias: Optional[Tensor] = None) -> Tensor:
    ct = _compute_dtype(input.dtype)
    out = F.linear(input.to(ct), qweight.to(ct)) * weight_scale.to(ct)
    if bias is not None:
        out = out + bias.to(ct)
    return out.to(input.dtype)


def dequantize_int8(qweight: Tensor, weight_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """W = qweight * weight_scale[:, None], rounded to ``dtype``."""
    return (qweight.to(_compute_dtype(dtype)) * weight_scale.to(_compute_dtype(dtype)).unsqueeze(-1)).to(dtype)


# ---------------------------------------------------------------------------- checks

def _check_tensor(op: str, name: str, t, dtypes: tuple, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"effkern.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"effkern.{op}: {name} must be {what}, got dtype {t.dtype}")


def _check_qweight(op: str, qweight, weight_scale, K: int, scale_name: str = "weight_scale",
                   weight_name: str = "qweight", input_name: str = "input") -> None:
    if isinstance(qweight, Tensor) and qweight.is_floating_point():
        raise TypeError(f"effkern.{op}: {weight_name} must be int8 (quantize a float weight first with "
                        f"effkern.quantize_int8), got a {qweight.dtype} tensor")
    _check_tensor(op, weight_name, qweight, (torch.int8,), "int8")
    _check_tensor(op, scale_name, weight_scale, (torch.float32,), "float32 (one scale per output channel)")
    if qweight.dim() != 2:
        raise ValueError(f"effkern.{op}: {weight_name} must be 2-D [N, K], got shape {tuple(qweight.shape)}")
    N = qweight.shape[0]
    if weight_scale.shape != (N,):
        raise ValueError(f"effkern.{op}: {scale_name} must have shape [N] = [{N}] (one per row of "
                         f"{weight_name} [N, K]), got {tuple(weight_scale.shape)}")
    if qweight.shape[1] != K:
        raise ValueError(f"effkern.{op}: {input_name}'s last dimension K={K} does not match {weight_name}'s "
                         f"K={qweight.shape[1]} ({weight_name} is [N, K] like nn.Linear.weight)")


def _check_bias(op: str, bias, N: int, dtypes: tuple, like: Optional[Tensor] = None) -> None:
    if bias is None:
        return
    _check_tensor(op, "bias", bias, dtypes, "a float tensor" if like is None else f"{like.dtype} like the input")
    if like is not None and bias.dtype != like.dtype:
        raise TypeError(f"effkern.{op}: bias has dtype {bias.dtype} but input has {like.dtype}; "
                        f"use one dtype (or torch.autocast)")
    if bias.shape != (N,):
        raise ValueError(f"effkern.{op}: bias must have shape [N] = [{N}], got {tuple(bias.shape)}")


def check_linear_args(op: str, input, qweight, weight_scale, bias, mixed_dtypes_allowed: bool = False) -> None:
    """``mixed_dtypes_allowed``: a bias of another float dtype than input, for a caller that
    autocast will cast before the op runs (the op checks again after the cast)."""
    _check_tensor(op, "input", input, REFERENCE_DTYPES, "float16, bfloat16 or float32")
    if input.dim() < 1:
        raise ValueError(f"effkern.{op}: input must have shape [..., K], got a scalar")
    _check_qweight(op, qweight, weight_scale, input.shape[-1])
    _check_bias(op, bias, qweight.shape[0], REFERENCE_DTYPES, like=None if mixed_dtypes_allowed else input)
    check_same_device(op, "input", input, qweight=qweight, weight_scale=weight_scale, bias=bias)


def check_quantize_args(op: str, input, two_d: bool = False) -> None:
    _check_tensor(op, "input", input, REFERENCE_DTYPES, "float16, bfloat16 or float32")
    if input.dim() < 1 or (two_d and input.dim() != 2):
        raise ValueError(f"effkern.{op}: expected a {'2-D [N, K] weight' if two_d else '[..., K] tensor'}, "
                         f"got shape {tuple(input.shape)}")


def check_mm_args(op: str, a, b) -> None:
    _check_tensor(op, "a", a, (torch.int8,), "int8")
    _check_tensor(op, "b", b, (torch.int8,), "int8")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"effkern.{op}: a must be [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"effkern.{op}: a is [M, K={a.shape[1]}] but b is [N, K={b.shape[1]}]; K must match")
    check_same_device(op, "a", a, b=b)


def check_matmul_args(op: str, a_q, b_q, a_scale, b_scale, bias, out_dtype) -> None:
    _check_tensor(op, "a_q", a_q, (torch.int8,), "int8 (from effkern.quantize_per_token_int8)")
    if a_q.dim() < 1:
        raise ValueError(f"effkern.{op}: a_q must have shape [..., K], got a scalar")
    _check_qweight(op, b_q, b_scale, a_q.shape[-1], scale_name="b_scale", weight_name="b_q", input_name="a_q")
    _check_tensor(op, "a_scale", a_scale, (torch.float32,), "float32 (one scale per row of a_q)")
    if a_scale.shape != a_q.shape[:-1]:
        raise ValueError(f"effkern.{op}: a_scale must have shape {tuple(a_q.shape[:-1])} (one per row of a_q), "
                         f"got {tuple(a_scale.shape)}")
    _check_bias(op, bias, b_q.shape[0], REFERENCE_DTYPES)
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"effkern.{op}: out_dtype must be torch.float16, bfloat16 or float32, got {out_dtype}")
    check_same_device(op, "a_q", a_q, b_q=b_q, a_scale=a_scale, b_scale=b_scale, bias=bias)


# ---------------------------------------------------------------------------- backends

# The int8 ops whose Triton kernels multiply in the float dtype (the weight dequantized first); the
# others multiply int8.
FLOAT_DOT_OPS = ("int8_weight_only_linear", "int8_linear_bwd")


def choose_backend(op: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """triton or reference for an int8 op on ``device`` with float data of ``dtype``."""
    name = selected_backend()
    if name == "auto":
        if device.type == "cuda" and dtype != torch.float64 and backend_available("triton", device)[0]:
            return "triton"
        return "reference"
    if name not in BACKENDS:
        raise RuntimeError(f"effkern.{op}: backend {name!r} is not implemented for the int8 ops (they have "
                           f"Triton kernels and a reference, no C++ ones); use one of auto, {', '.join(BACKENDS)}")
    require(name, device, op, dot_dtype=dtype if op in FLOAT_DOT_OPS else None)
    if name == "triton" and dtype == torch.float64:
        raise TypeError(f"effkern.{op}: the triton backend takes float16, bfloat16 or float32, got float64 "
                        f"(float64 runs on the reference backend)")
    return name


def _describe_auto(device: torch.device) -> str:
    if device.type == "cuda" and backend_available("triton", device)[0]:
        return "triton (the int8 ops have no other GPU kernels)"
    return "reference" + (" (auto on CPU)" if device.type == "cpu" else "")


register_family("int8", _describe_auto)


def _kernels():
    return kernel_module("int8")  # imported on first use, so importing effkern does not import triton


# ---------------------------------------------------------------------------- quantization

@torch.library.custom_op("effkern::quantize_per_token_int8", mutates_args=())
def _quantize_per_token_int8(input: Tensor) -> tuple[Tensor, Tensor]:
    check_quantize_args("quantize_per_token_int8", input)
    if choose_backend("quantize_per_token_int8", input.device, input.dtype) == "reference":
        return quantize_rows_reference(input)
    q, scale = _kernels().quantize_rows_int8(rows(input))
    return q.view(input.shape), scale.view(input.shape[:-1])


@_quantize_per_token_int8.register_fake
def _(input):
    check_quantize_args("quantize_per_token_int8", input)
    return input.new_empty(input.shape, dtype=torch.int8), input.new_empty(input.shape[:-1], dtype=torch.float32)


def quantize_per_token_int8(input: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic per-token quantization: input [..., K] -> (int8 [..., K], float32 scale [...]).
    Not differentiable (the input is detached)."""
    check_quantize_args("quantize_per_token_int8", input)
    return torch.ops.effkern.quantize_per_token_int8(input.detach())


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel quantization of a weight [N, K] (nn.Linear layout):
    (qweight int8 [N, K], scale float32 [N]), weight ~= qweight * scale[:, None]."""
    check_quantize_args("quantize_int8", weight, two_d=True)
    return torch.ops.effkern.quantize_per_token_int8(weight.detach())


# ---------------------------------------------------------------------------- int8_mm, int8_matmul

@torch.library.custom_op("effkern::int8_mm", mutates_args=())
def _int8_mm(a: Tensor, b: Tensor) -> Tensor:
    check_mm_args("int8_mm", a, b)
    if choose_backend("int8_mm", a.device) == "reference":
        return int8_accumulate_reference(a, b).to(torch.int64).to(torch.int32)  # wraps like int32 sums
    return _kernels().int8_matmul(a, b.t(), None, None, None, torch.int32)


@_int8_mm.register_fake
def _(a, b):
    check_mm_args("int8_mm", a, b)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


def int8_mm(a: Tensor, b: Tensor) -> Tensor:
    """int32 ``a @ b.T`` for int8 a [M, K] and b [N, K] (nn.Linear layout), exact, any M, N, K
    (``torch._int_mm`` takes b as [K, N] and needs M > 16 and K, N multiples of 8)."""
    check_mm_args("int8_mm", a, b)
    return torch.ops.effkern.int8_mm(a, b)


@torch.library.custom_op("effkern::int8_matmul", mutates_args=())
def _int8_matmul(a_q: Tensor, b_q: Tensor, a_scale: Tensor, b_scale: Tensor, bias: Optional[Tensor] = None,
                 out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    check_matmul_args("int8_matmul", a_q, b_q, a_scale, b_scale, bias, out_dtype)
    if choose_backend("int8_matmul", a_q.device) == "reference":
        return int8_matmul_reference(a_q, b_q, a_scale, b_scale, bias, out_dtype)
    N = b_q.shape[0]
    out = _kernels().int8_matmul(rows(a_q), b_q.t(), a_scale.reshape(-1), b_scale, bias, out_dtype)
    return out if a_q.dim() == 2 else out.view(*a_q.shape[:-1], N)


@_int8_matmul.register_fake
def _(a_q, b_q, a_scale, b_scale, bias=None, out_dtype=torch.bfloat16):
    check_matmul_args("int8_matmul", a_q, b_q, a_scale, b_scale, bias, out_dtype)
    return a_q.new_empty((*a_q.shape[:-1], b_q.shape[0]), dtype=out_dtype)


def int8_matmul(a_q: Tensor, b_q: Tensor, a_scale: Tensor, b_scale: Tensor, bias: Optional[Tensor] = None,
                out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``(a_q @ b_q.T) * a_scale[..., None] * b_scale[None, :] + bias`` with an exact int32
    accumulator: a_q int8 [..., K], b_q int8 [N, K], a_scale float32 [...], b_scale float32 [N],
    bias [N] (any float dtype) or None; the result in ``out_dtype``."""
    check_matmul_args("int8_matmul", a_q, b_q, a_scale, b_scale, bias, out_dtype)
    return torch.ops.effkern.int8_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype)


# ---------------------------------------------------------------------------- linear layers

QUANTIZATIONS = ("auto", "fused", "separate")


def w8a8_quantization() -> str:
    """How the triton backend quantizes int8_linear's activations: "separate" (a quantization
    kernel, then the int8 GEMM) or "fused" (inside the GEMM, per tile: no int8 copy of x, no
    second launch, but every program re-reads its rows for their absmax). Both give the same
    bits. From EFFKERN_INT8_QUANTIZATION (auto|fused|separate, default auto), read per call;
    auto takes the faster as measured on this GPU model (effkern/policies/int8.json), else
    separate."""
    name = os.environ.get("EFFKERN_INT8_QUANTIZATION", "auto") or "auto"
    if name not in QUANTIZATIONS:
        raise ValueError(f"EFFKERN_INT8_QUANTIZATION: unknown value {name!r}; expected one of {QUANTIZATIONS}")
    return name


@functools.lru_cache(maxsize=4096)
def _measured_quantization(device: torch.device, dtype: torch.dtype, M: int, N: int, K: int) -> str:
    # cached: the lookup would otherwise cost as much as a decode-sized GEMM
    if device.type != "cuda":
        return "separate"
    return _policy.choose("int8", "fwd", torch.cuda.get_device_name(device), str(dtype).removeprefix("torch."),
                          M, N, K, quant="w8a8") or "separate"


def _fuse_quantization(x2d: Tensor, N: int) -> bool:
    name = w8a8_quantization()
    if name == "auto":
        name = _measured_quantization(x2d.device, x2d.dtype, x2d.shape[0], N, x2d.shape[1])
    return name == "fused"


def _linear_2d(op: str, input: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    x2d = rows(input)
    kernels = _kernels()
    if op == "int8_linear" and _fuse_quantization(x2d, qweight.shape[0]):
        out = kernels.int8_matmul(x2d, qweight.t(), None, weight_scale, bias, input.dtype, quantize_a=True)
    elif op == "int8_linear":
        xq, xs = kernels.quantize_rows_int8(x2d)
        out = kernels.int8_matmul(xq, qweight.t(), xs, weight_scale, bias, input.dtype)
    else:
        out = kernels.int8_matmul(x2d, qweight.t(), None, weight_scale, bias, input.dtype)
    return out if input.dim() == 2 else out.view(*input.shape[:-1], qweight.shape[0])


@torch.library.custom_op("effkern::int8_linear", mutates_args=())
def _int8_linear(input: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    check_linear_args("int8_linear", input, qweight, weight_scale, bias)
    if choose_backend("int8_linear", input.device, input.dtype) == "reference":
        return int8_linear_reference(input, qweight, weight_scale, bias)
    return _linear_2d("int8_linear", input, qweight, weight_scale, bias)


@torch.library.custom_op("effkern::int8_weight_only_linear", mutates_args=())
def _int8_weight_only_linear(input: Tensor, qweight: Tensor, weight_scale: Tensor,
                             bias: Optional[Tensor] = None) -> Tensor:
    check_linear_args("int8_weight_only_linear", input, qweight, weight_scale, bias)
    if choose_backend("int8_weight_only_linear", input.device, input.dtype) == "reference":
        return int8_weight_only_linear_reference(input, qweight, weight_scale, bias)
    return _linear_2d("int8_weight_only_linear", input, qweight, weight_scale, bias)


@torch.library.custom_op("effkern::int8_linear_bwd", mutates_args=())
def _int8_linear_bwd(grad_out: Tensor, qweight: Optional[Tensor], weight_scale: Optional[Tensor],
                     output_mask: list[bool]) -> tuple[Tensor, Tensor]:
    need_input, need_bias = output_mask
    check_same_device("int8_linear_bwd", "grad_out", grad_out, qweight=qweight, weight_scale=weight_scale)
    g2d = rows(grad_out)
    grad_input = grad_bias = empty(grad_out)
    if need_input:
        if choose_backend("int8_linear_bwd", grad_out.device, grad_out.dtype) == "reference":
            grad_input = g2d @ dequantize_int8(qweight, weight_scale, grad_out.dtype)
        else:
            grad_input = _kernels().int8_matmul(g2d, qweight, None, weight_scale, None, grad_out.dtype, scale_k=True)
        grad_input = grad_input.view(*grad_out.shape[:-1], qweight.shape[1])
    if need_bias:
        grad_bias = g2d.sum(0)
    return grad_input, grad_bias


@_int8_linear_bwd.register_fake
def _(grad_out, qweight, weight_scale, output_mask):
    check_same_device("int8_linear_bwd", "grad_out", grad_out, qweight=qweight, weight_scale=weight_scale)
    need_input, need_bias = output_mask
    return (grad_out.new_empty((*grad_out.shape[:-1], qweight.shape[1])) if need_input else empty(grad_out),
            grad_out.new_empty(grad_out.shape[-1:]) if need_bias else empty(grad_out))


def _linear_fake(input, qweight, weight_scale, bias=None):
    return input.new_empty((*input.shape[:-1], qweight.shape[0]))


def _setup_context(ctx, inputs, output):
    input, qweight, weight_scale, bias = inputs
    if ctx.needs_input_grad[2]:
        raise RuntimeError("effkern int8 linear: weight_scale requires grad, but the quantized weight is frozen: "
                           "these ops give gradients for the input and the bias only. Call "
                           "weight_scale.requires_grad_(False), and train adapters (e.g. LoRA) instead of the weight")
    ctx.needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[3])]
    ctx.save_for_backward(qweight if ctx.needs[0] else None, weight_scale if ctx.needs[0] else None)


def _backward(ctx, grad_out):
    qweight, weight_scale = ctx.saved_tensors
    grad_input, grad_bias = torch.ops.effkern.int8_linear_bwd(grad_out, qweight, weight_scale, ctx.needs)
    return (grad_input if ctx.needs[0] else None, None, None, grad_bias if ctx.needs[1] else None)


for _op in (_int8_linear, _int8_weight_only_linear):
    _op.register_fake(_linear_fake)
    _op.register_autograd(_backward, setup_context=_setup_context)
for _name in ("int8_linear", "int8_weight_only_linear"):
    register_autocast(_name, cast_args=(0, 3))  # input and bias; not the float32 weight scales


def int8_linear(input: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """W8A8 ``F.linear``: input [..., K] (float16, bfloat16 or float32) is quantized per token on
    the fly, multiplied by qweight int8 [N, K] in int8 with an exact int32 accumulator, and
    dequantized with weight_scale float32 [N]; bias [N] in input's dtype. Output in input's dtype.
    Differentiable in input and bias (straight-through the activation quantization)."""
    check_linear_args("int8_linear", input, qweight, weight_scale, bias, mixed_dtypes_allowed=autocast_on(input))
    return torch.ops.effkern.int8_linear(input, qweight, weight_scale, bias)


def int8_weight_only_linear(input: Tensor, qweight: Tensor, weight_scale: Tensor,
                            bias: Optional[Tensor] = None) -> Tensor:
    """W8A16 ``F.linear``: ``(input @ qweight.T) * weight_scale + bias`` with the int8 weight
    converted to input's dtype inside the kernel, fp32 accumulation. Differentiable in input
    and bias."""
    check_linear_args("int8_weight_only_linear", input, qweight, weight_scale, bias,
                      mixed_dtypes_allowed=autocast_on(input))
    return torch.ops.effkern.int8_weight_only_linear(input, qweight, weight_scale, bias)

