"""linear_gelu: y = gelu(input @ weight.T + bias), the fused first half of a transformer MLP.

Ops (schemas defined here and nowhere else):
  effkern::linear_gelu(input, weight, bias=None, approximate="none", *, recompute_preact=False)
      public; composite: calls linear_gelu_fwd and returns its first output
  effkern::linear_gelu_fwd(input, weight, bias, approximate, save_gelu_grad) -> (out, gelu_grad)
      the differentiable op; gelu_grad = gelu'(z), z = input @ weight.T + bias, is returned (as
      [M, N]) when the backward will need it, else an empty tensor
  effkern::linear_gelu_bwd(grad_out, input, weight, bias, gelu_grad, approximate, output_mask)
      -> (grad_input, grad_weight, grad_bias); entries not asked for are empty tensors;
      gelu_grad None means "recompute it from input, weight, bias first"

Saved for backward (M tokens, N outputs): by default gelu'(z), M*N elements, as many as eager
F.gelu(F.linear(...)) keeps (it saves z for gelu's backward). gelu'(z) rather than z: the Triton
backward's GEMMs form gz = grad_out * gelu'(z) tile by tile, K / BLOCK times per element, where
from z each time would be an erf or tanh; and what is kept does not depend on the backend, so the
backend may change between forward and backward, with activation checkpointing too (which
recomputes the forward under the backward's selection). cuBLASLt's forward writes gelu'(z) in
its own elementwise kernel; the reference makes it from z with aten in one more pass. With ``recompute_preact=True`` nothing is kept, and the backward
recomputes it with one extra forward GEMM (2*M*N*K FLOPs, +50% backward work) — for when
activation memory is the limit.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _policy
from ._backend import backend_available, kernel_module, require, selected_backend
from ._registry import LIB, autocast_on, register_autocast, register_family
from ._tensors import check_same_device, empty, rows

APPROXIMATIONS = ("none", "tanh")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# float64 runs on the reference backend and the C++ CPU kernel only (tests, gradcheck).
KERNEL_DTYPES = {"triton": DTYPES[:3], "cuda": DTYPES[:3]}


def linear_gelu_reference(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                          approximate: str = "none") -> Tensor:
    """Plain PyTorch: the definition of the op and the test oracle."""
    return F.gelu(F.linear(input, weight, bias), approximate=approximate)


def check_args(input, weight, bias, approximate, mixed_dtypes_allowed: bool = False) -> None:
    """Raise a clear error for anything the kernels must never see. ``mixed_dtypes_allowed``:
    skip the one-dtype check, for a caller that autocast will cast before the op runs (the op
    itself checks again after the cast)."""
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"linear_gelu: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(f"linear_gelu: {name} has dtype {t.dtype}; supported: float16, bfloat16, "
                            f"float32 (float64 on the reference backend)")
    if not isinstance(approximate, str) or approximate not in APPROXIMATIONS:
        raise ValueError(f"linear_gelu: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if input.dim() < 1:
        raise ValueError("linear_gelu: input must have shape [..., K] (at least 1 dimension), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"linear_gelu: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if input.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_gelu: input's last dimension K={input.shape[-1]} does not match "
                         f"weight's K={weight.shape[1]} (weight is [N, K] like nn.Linear.weight)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"linear_gelu: bias must have shape [N] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != input.dtype and not mixed_dtypes_allowed:
            raise TypeError(f"linear_gelu: {name} has dtype {t.dtype} but input has {input.dtype}; "
                            f"all tensors must share one dtype (use torch.autocast to mix)")
        if t.device != input.device:
            raise RuntimeError(f"linear_gelu: {name} is on {t.device} but input is on {input.device}")


@functools.lru_cache(maxsize=4096)
def _auto_backend(mode: str, device: torch.device, dtype: torch.dtype, M: int, N: int, K: int,
                  approximate: str) -> str:
    # Cached: on a small decode-sized GEMM the lookup would otherwise cost as much as the GPU work.
    if device.type != "cuda" or dtype == torch.float64:
        return "reference"
    shape = dict(dtype=str(dtype).removeprefix("torch."), M=M, N=N, K=K)
    gpu = torch.cuda.get_device_name(device)
    choice = (_policy.choose("linear_gelu", mode, gpu, approximate=approximate, **shape)
              or _policy.choose("linear_gelu", mode, gpu, **shape))
    for candidate in (choice, "cuda", "triton"):
        if candidate and backend_available(candidate, device)[0]:
            return candidate
    return "reference"


def _choose_backend(mode: str, like: Tensor, M: int, N: int, K: int, approximate: str) -> str:
    """The backend to run on tensors like ``like`` for a GEMM of M x N x K."""
    name = selected_backend()
    device, dtype = like.device, like.dtype
    if name == "auto":
        return _auto_backend(mode, device, dtype, M, N, K, approximate)
    require(name, device, "linear_gelu", dot_dtype=dtype)
    # The C++ CPU kernel also takes float64; the GPU kernels and Triton's do not.
    if dtype not in KERNEL_DTYPES.get(name, DTYPES) and (name == "triton" or device.type == "cuda"):
        raise TypeError(f"linear_gelu: backend {name!r} supports float16, bfloat16 and float32 on "
                        f"{device.type} tensors, got input of dtype {dtype} (the reference backend "
                        f"takes float64)")
    return name


def _describe_auto(device: torch.device) -> str:
    if device.type != "cuda":
        return "reference (auto on CPU)"
    gpu = torch.cuda.get_device_name(device)
    if _policy._entries("linear_gelu", gpu):
        return f"per shape from effkern/policies/linear_gelu.json (measured on {gpu})"
    fallback = next((b for b in ("cuda", "triton") if backend_available(b, device)[0]), "reference")
    return f"{fallback} (no measurements recorded for {gpu})"


register_family("linear_gelu", _describe_auto)


# ---------------------------------------------------------------------------- forward

def _gelu_grad_of(z: Tensor, approximate: str) -> Tensor:
    """gelu'(z), elementwise: aten's gelu_backward with an incoming gradient of one (expanded: no
    [M, N] tensor of ones is made)."""
    return torch.ops.aten.gelu_backward(z.new_ones(()).expand_as(z), z, approximate=approximate)


def _forward_2d(backend: str, x2d: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str,
                store_out: bool, store_gelu_grad: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(y or None, gelu'(z) or None) on [M, K] rows."""
    if bias is not None:
        bias = bias.contiguous()  # the kernels (Triton, cuBLASLt epilogue) read it with unit stride
    if backend == "triton":
        return kernel_module("linear_gelu").linear_gelu_fwd(x2d, weight, bias, approximate, store_out, store_gelu_grad)
    if backend == "reference":
        z = F.linear(x2d, weight, bias)
        return ((F.gelu(z, approximate=approximate) if store_out else None),
                (_gelu_grad_of(z, approximate) if store_gelu_grad else None))
    out, gelu_grad = torch.ops.effkern_C.linear_gelu_fwd(x2d, weight, bias, approximate == "tanh", store_gelu_grad)
    return out, (gelu_grad if store_gelu_grad else None)


@torch.library.custom_op("effkern::linear_gelu_fwd", mutates_args=())
def linear_gelu_fwd(input: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str,
                    save_gelu_grad: bool) -> tuple[Tensor, Tensor]:
    check_args(input, weight, bias, approximate)
    x2d = rows(input)
    # Training (gelu'(z) kept for a backward): auto takes the backend measured fastest for forward
    # + backward together, which the backward then takes too.
    mode = "fwd_bwd" if save_gelu_grad else "fwd"
    backend = _choose_backend(mode, x2d, x2d.shape[0], weight.shape[0], x2d.shape[1], approximate)
    out, gelu_grad = _forward_2d(backend, x2d, weight, bias, approximate, True, save_gelu_grad)
    if input.dim() != 2:  # (a 2-D input's rows are the output's: no view to make)
        out = out.reshape(*input.shape[:-1], weight.shape[0])
    return out, (gelu_grad if save_gelu_grad else empty(input))


@linear_gelu_fwd.register_fake
def _(input, weight, bias, approximate, save_gelu_grad):
    check_args(input, weight, bias, approximate)
    N = weight.shape[0]
    M = math.prod(input.shape[:-1])
    return input.new_empty((*input.shape[:-1], N)), (input.new_empty((M, N)) if save_gelu_grad else empty(input))


# ---------------------------------------------------------------------------- backward

def _reference_backward_2d(g, x, w, gelu_grad, output_mask):
    gz = g * gelu_grad
    return (gz @ w if output_mask[0] else None,
            gz.t() @ x if output_mask[1] else None,
            gz.sum(0) if output_mask[2] else None)


@torch.library.custom_op("effkern::linear_gelu_bwd", mutates_args=())
def linear_gelu_bwd(grad_out: Tensor, input: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                    gelu_grad: Optional[Tensor], approximate: str,
                    output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    check_same_device("linear_gelu_bwd", "grad_out", grad_out, input=input, weight=weight, bias=bias,
                      gelu_grad=gelu_grad)
    N = grad_out.shape[-1]
    g2d = rows(grad_out)
    x2d = rows(input) if input is not None else None
    # Only what the requested gradients need was saved: K comes from whichever is present.
    K = weight.shape[1] if weight is not None else input.shape[-1] if input is not None else 0
    backend = _choose_backend("fwd_bwd", g2d, g2d.shape[0], N, K, approximate)
    if gelu_grad is None:  # recompute_preact: nothing was kept; one extra GEMM makes gelu'(z)
        # [1] only: the C++ forward returns the output too, which must not live through the backward
        gelu_grad = _forward_2d(backend, x2d, weight, bias, approximate, False, True)[1]
    if backend == "reference":
        grads = _reference_backward_2d(g2d, x2d, weight, gelu_grad, output_mask)
    elif backend == "triton":
        grads = kernel_module("linear_gelu").linear_gelu_bwd(g2d, x2d, weight, gelu_grad, output_mask)
    else:
        # The C++ op takes tensors, not None: stand in for the unsaved ones with zero-stride
        # views of the right shape, which allocate nothing and are never read.
        M = g2d.shape[0]
        grads = torch.ops.effkern_C.linear_gelu_bwd(
            g2d, x2d if x2d is not None else g2d.new_empty(()).expand(M, K),
            weight if weight is not None else g2d.new_empty(()).expand(N, K), gelu_grad, list(output_mask))
    grad_input, grad_weight, grad_bias = (
        g if wanted else empty(grad_out) for g, wanted in zip(grads, output_mask))
    if output_mask[0]:
        grad_input = grad_input.reshape(*grad_out.shape[:-1], weight.shape[1])
    return grad_input, grad_weight, grad_bias


@linear_gelu_bwd.register_fake
def _(grad_out, input, weight, bias, gelu_grad, approximate, output_mask):
    check_same_device("linear_gelu_bwd", "grad_out", grad_out, input=input, weight=weight, bias=bias,
                      gelu_grad=gelu_grad)
    N = grad_out.shape[-1]
    need_input, need_weight, need_bias = output_mask
    return (grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1])) if need_input else empty(grad_out),
            grad_out.new_empty((N, input.shape[-1])) if need_weight else empty(grad_out),
            grad_out.new_empty((N,)) if need_bias else empty(grad_out))


def _setup_context(ctx, inputs, output):
    input, weight, bias, approximate, save_gelu_grad = inputs
    need_input, need_weight, _ = ctx.needs_input_grad[:3]
    recompute = not save_gelu_grad
    # Keep only what the requested gradients need: x for grad_weight, w for grad_input,
    # and all three when gelu'(z) must be recomputed.
    ctx.save_for_backward(
        input if (need_weight or recompute) else None,
        weight if (need_input or recompute) else None,
        bias if recompute else None,
        None if recompute else output[1],
    )
    ctx.approximate = approximate
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_gelu_grad):
    input, weight, bias, gelu_grad = ctx.saved_tensors
    mask = [bool(m) for m in ctx.needs_input_grad[:3]]
    grad_input, grad_weight, grad_bias = torch.ops.effkern.linear_gelu_bwd(
        grad_out, input, weight, bias, gelu_grad, ctx.approximate, mask)
    return (grad_input if mask[0] else None, grad_weight if mask[1] else None,
            grad_bias if mask[2] else None, None, None)


linear_gelu_fwd.register_autograd(_backward, setup_context=_setup_context)
register_autocast("linear_gelu_fwd")


# ---------------------------------------------------------------------------- public op

LIB.define("linear_gelu(Tensor input, Tensor weight, Tensor? bias=None, str approximate=\"none\", *, "
           "bool recompute_preact=False) -> Tensor")


def _keeps_gelu_grad(input, weight, bias, recompute_preact: bool) -> bool:
    """Whether the forward must return gelu'(z) for the backward."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))
    return needs_grad and not recompute_preact


def _linear_gelu_composite(input, weight, bias=None, approximate="none", *, recompute_preact=False):
    # Inside torch.autocast for input's device, mixed dtypes are fine: autocast casts them before
    # the op (which checks again), as for F.linear.
    check_args(input, weight, bias, approximate, mixed_dtypes_allowed=autocast_on(input))
    return torch.ops.effkern.linear_gelu_fwd(input, weight, bias, approximate,
                                             _keeps_gelu_grad(input, weight, bias, recompute_preact))[0]


LIB.impl("linear_gelu", _linear_gelu_composite, "CompositeImplicitAutograd")


def linear_gelu(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, approximate: str = "none", *,
                recompute_preact: bool = False) -> Tensor:
    """``F.gelu(F.linear(input, weight, bias), approximate=approximate)`` in one fused kernel.

    input [..., K] (any leading dims, any strides), weight [N, K], bias [N] or None; float16,
    bfloat16 or float32, all one dtype (mixed inside torch.autocast, as F.linear takes them).
    ``approximate`` is "none" (exact erf) or "tanh".
    ``recompute_preact=True`` saves activation memory in training: gelu'(z) of the
    pre-activation z (M*N elements) is recomputed in the backward instead of kept.
    """
    # The same as torch.ops.effkern.linear_gelu, minus one dispatch: the composite checks first
    # (before the dispatcher's own, less clear, type errors) and calls the differentiable op.
    return _linear_gelu_composite(input, weight, bias, approximate, recompute_preact=recompute_preact)
