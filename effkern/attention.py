"""Flash attention: forward and backward, causal (bottom-right), sliding window, softcap, GQA/MQA,
and an exact drop-in for F.scaled_dot_product_attention.

Semantics (one rule for the reference and the kernels): q [B, Hq, Sq, D], k and v [B, Hkv, Skv, D],
Hq % Hkv == 0, query head h reads kv head h // (Hq // Hkv). With off = Skv - Sq, query i sees key j
when
    causal:           j <= i + off                      (aligned bottom-right, FlashAttention-2)
    window (L, R):    i + off - L <= j <= i + off + R   (-1: that side unbounded)
scores s = q.k * scale (scale defaults to 1 / sqrt(D)); softcap > 0 replaces s by
softcap * tanh(s / softcap); out = softmax(s over the visible keys) @ v; lse = logsumexp of the
visible scores (natural log, float32 [B, Hq, Sq]). A row with no visible key gives out 0 and
lse -inf (and zero gradients).

Ops (schemas defined here and nowhere else):
  effkern::flash_attention_fwd(q, k, v, causal, scale, window_left, window_right, softcap)
      -> (out, lse); differentiable in q, k, v (and through lse)
  effkern::flash_attention_bwd(grad_out, grad_lse, q, k, v, out, lse, causal, scale, window_left,
      window_right, softcap) -> (dq, dk, dv)
Backends: triton (float16/bfloat16; CPU tensors through Triton's interpreter) and reference
(plain PyTorch, fp32 math for 16-bit inputs, fp64 for fp64; every float dtype). auto: triton on
CUDA for float16/bfloat16, reference otherwise. There are no C++ attention kernels: "cuda" is
a clear error. For decoding (at most 16 query rows whose programs cannot fill the GPU, and
enough visible keys), the triton forward splits the keys over the SMs and merges the partial
results by their lse (flash-decoding); the outputs and the backward are the same.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import backend_available, kernel_module, require, selected_backend, triton_multiplies
from ._registry import register_autocast, register_family

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float32, torch.float64)
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------- checks

def check_args(op: str, q, k, v, window=(-1, -1), softcap=0.0, scale=None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"effkern.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in REFERENCE_DTYPES:
            raise TypeError(f"effkern.{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"effkern.{op}: {name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"effkern.{op}: {name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must "
                            f"share one dtype")
        if t.device != q.device:
            raise RuntimeError(f"effkern.{op}: {name} is on {t.device} but q is on {q.device}")
    B, Hq, Sq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"effkern.{op}: k and v must have the same shape [B, Hkv, Skv, D], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"effkern.{op}: k and v must be [B={B}, Hkv, Skv, D={D}] for q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if D < 1 or D > MAX_HEAD_DIM:
        raise ValueError(f"effkern.{op}: the head dim D must be in 1..{MAX_HEAD_DIM}, got {D}")
    Hkv = k.shape[1]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"effkern.{op}: the number of query heads Hq={Hq} must be a multiple of the number of "
                         f"kv heads Hkv={Hkv} (GQA/MQA)")
    # (a SymInt under torch.compile with dynamic shapes: SDPA's window from Sq - Skv, say)
    if not (isinstance(window, (tuple, list)) and len(window) == 2
            and all(isinstance(w, (int, torch.SymInt)) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"effkern.{op}: window must be a pair of ints (left, right), got {window!r}")
    if any(w < -1 for w in window):
        raise ValueError(f"effkern.{op}: window values must be >= 0, or -1 for unbounded, got {tuple(window)}")
    # comparisons only (no math.isnan): they also trace under torch.compile; NaN fails them all
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not 0 <= softcap < math.inf:
        raise ValueError(f"effkern.{op}: softcap must be a finite number >= 0 (0: no softcap), got {softcap!r}")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                              or not -math.inf < scale < math.inf):
        raise ValueError(f"effkern.{op}: scale must be a finite number or None, got {scale!r}")


# ---------------------------------------------------------------------------- backends

def choose_backend(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """triton or reference for the attention ops on ``device`` with data of ``dtype``."""
    name = selected_backend()
    if name == "auto":
        if device.type == "cuda" and dtype in KERNEL_DTYPES and backend_available("triton", device)[0]:
            return "triton"
        return "reference"
    if name == "cuda":
        raise RuntimeError(f"effkern.{op}: backend 'cuda' is not implemented for attention (there are no C++ "
                           f"attention kernels); use auto, triton or reference")
    require(name, device, op, dot_dtype=dtype)
    if name == "triton" and dtype not in KERNEL_DTYPES:
        raise TypeError(f"effkern.{op}: the triton backend takes float16 or bfloat16, got {dtype} "
                        f"(float32 and float64 run on the reference backend)")
    return name


def _describe_auto(device: torch.device) -> str:
    if device.type == "cuda" and backend_available("triton", device)[0]:
        return "triton for float16/bfloat16, reference for float32/float64"
    return "reference" + (" (auto on CPU)" if device.type == "cpu" else "")


register_family("attention", _describe_auto)


def _kernels():
    return kernel_module("attention")  # imported on first use, so importing effkern does not import triton


# ---------------------------------------------------------------------------- reference

def visible(Sq: int, Skv: int, causal: bool, left: int, right: int, device=None) -> Tensor:
    """bool [Sq, Skv]: whether query i sees key j (see the module docstring)."""
    i = torch.arange(Sq, device=device)[:, None] + (Skv - Sq)
    j = torch.arange(Skv, device=device)[None, :]
    keep = torch.ones(Sq, Skv, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= i
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_kv(t: Tensor, Hq: int) -> Tensor:
    return t.repeat_interleave(Hq // t.shape[1], dim=1)


def _reference_probs(q, k, causal, scale, left, right, softcap):
    """(p [B, Hq, Sq, Skv], lse, tanh of the capped scores or None), in the compute dtype."""
    ct = _compute_dtype(q.dtype)
    Hq, Sq, Skv = q.shape[1], q.shape[2], k.shape[2]
    s = torch.matmul(q.to(ct), _expand_kv(k.to(ct), Hq).transpose(-1, -2)) * scale
    t = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = softcap * t
    keep = visible(Sq, Skv, causal, left, right, q.device)
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))  # masked rows: all zeros
    return p, lse, t


def flash_attention_reference(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None,
                              window=(-1, -1), softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """(out in q's dtype [B, Hq, Sq, D], lse float32 [B, Hq, Sq]), in fp32 (fp64 for fp64 inputs)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, lse, _ = _reference_probs(q, k, causal, scale, window[0], window[1], softcap)
    out = torch.matmul(p, _expand_kv(v.to(p.dtype), q.shape[1]))
    return out.to(q.dtype).contiguous(), lse.to(torch.float32).contiguous()


def _reference_bwd(dout, dlse, q, k, v, out, lse, causal, scale, left, right, softcap):
    ct = _compute_dtype(q.dtype)
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    p, _, t = _reference_probs(q, k, causal, scale, left, right, softcap)
    do = dout.to(ct)
    delta = (do * out.to(ct)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(ct)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, _expand_kv(v.to(ct), Hq).transpose(-1, -2))
    ds = p * (dp - delta.unsqueeze(-1))
    if t is not None:
        ds = ds * (1 - t * t)
    dq = torch.matmul(ds, _expand_kv(k.to(ct), Hq)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(ct)) * scale
    G = Hq // Hkv
    dk = dk.view(B, Hkv, G, *dk.shape[2:]).sum(2)
    dv = dv.view(B, Hkv, G, *dv.shape[2:]).sum(2)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


# ---------------------------------------------------------------------------- ops

def _check_op_args(op, q, k, v, window_left, window_right, softcap):
    check_args(op, q, k, v, (window_left, window_right), softcap)


def _check_bwd_args(grad_out, grad_lse, q, k, v, out, lse, window_left, window_right, softcap):
    """The backward op's tensors against the forward's q, k, v (a caller of
    torch.ops.effkern.flash_attention_bwd may pass any): the kernels index them by q's shape."""
    op = "flash_attention_bwd"
    _check_op_args(op, q, k, v, window_left, window_right, softcap)
    # name -> (tensor, its shape, its dtype: None for any float dtype)
    expected = {"grad_out": (grad_out, q.shape, q.dtype), "out": (out, q.shape, q.dtype),
                "lse": (lse, q.shape[:3], torch.float32), "grad_lse": (grad_lse, q.shape[:3], None)}
    for name, (t, shape, dtype) in expected.items():
        if t is None:  # grad_lse only: the schema allows None there alone
            continue
        if t.shape != shape:
            raise ValueError(f"effkern.{op}: {name} must have shape {list(shape)} for q {list(q.shape)}, "
                             f"got {list(t.shape)}")
        wrong_dtype = t.dtype != dtype if dtype is not None else not t.is_floating_point()
        if wrong_dtype:
            raise TypeError(f"effkern.{op}: {name} must be {dtype or 'a float tensor'}, got {t.dtype}")
        if t.device != q.device:
            raise RuntimeError(f"effkern.{op}: {name} is on {t.device} but q is on {q.device}")


@torch.library.custom_op("effkern::flash_attention_fwd", mutates_args=())
def _flash_attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, window_left: int,
                         window_right: int, softcap: float) -> tuple[Tensor, Tensor]:
    _check_op_args("flash_attention", q, k, v, window_left, window_right, softcap)
    if choose_backend("flash_attention", q.device, q.dtype) == "reference":
        return flash_attention_reference(q, k, v, causal, scale, (window_left, window_right), softcap)
    return _kernels().flash_attn_fwd(q, k, v, causal, scale, window_left, window_right, softcap)


@_flash_attention_fwd.register_fake
def _(q, k, v, causal, scale, window_left, window_right, softcap):
    _check_op_args("flash_attention", q, k, v, window_left, window_right, softcap)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("effkern::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                         lse: Tensor, causal: bool, scale: float, window_left: int, window_right: int,
                         softcap: float) -> tuple[Tensor, Tensor, Tensor]:
    _check_bwd_args(grad_out, grad_lse, q, k, v, out, lse, window_left, window_right, softcap)
    if choose_backend("flash_attention_bwd", q.device, q.dtype) == "reference":
        return _reference_bwd(grad_out, grad_lse, q, k, v, out, lse, causal, scale, window_left, window_right,
                              softcap)
    return _kernels().flash_attn_bwd(grad_out, grad_lse, q, k, v, out, lse, causal, scale, window_left,
                                     window_right, softcap)


@_flash_attention_bwd.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, causal, scale, window_left, window_right, softcap):
    _check_bwd_args(grad_out, grad_lse, q, k, v, out, lse, window_left, window_right, softcap)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, window_left, window_right, softcap = inputs
    out, lse = output
    ctx.args = (causal, scale, window_left, window_right, softcap)
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.effkern.flash_attention_bwd(grad_out, grad_lse, q, k, v, out, lse, *ctx.args)
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
            None, None, None, None, None)


_flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
register_autocast("flash_attention_fwd", cast_args=(0, 1, 2))


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None,
                    window: tuple[int, int] = (-1, -1), softcap: float = 0.0, return_lse: bool = False):
    """Attention of q [B, Hq, Sq, D] over k, v [B, Hkv, Skv, D] (Hq % Hkv == 0; any strides;
    D <= 256). ``causal`` is aligned bottom-right (query i sees keys j <= i + Skv - Sq);
    ``window=(left, right)`` limits query i to keys i + Skv - Sq - left .. i + Skv - Sq + right
    (-1: unbounded); ``softcap > 0`` caps the scores at softcap * tanh(s / softcap). Returns out
    [B, Hq, Sq, D] in q's dtype, and with ``return_lse`` also lse float32 [B, Hq, Sq]."""
    check_args("flash_attention", q, k, v, window, softcap, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = torch.ops.effkern.flash_attention_fwd(q, k, v, bool(causal), scale, window[0], window[1], float(softcap))
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------- SDPA drop-in

def _sdpa_fast_path(query, key, value, attn_mask, dropout_p, scale, enable_gqa) -> bool:
    if attn_mask is not None or dropout_p != 0.0:
        return False
    # a bool is an int to isinstance; torch's SDPA takes True as 1.0 and False as 0.0: its own path runs it
    if scale is not None and (isinstance(scale, bool) or not (isinstance(scale, (int, float))
                                                              and -math.inf < scale < math.inf)):
        return False
    if not all(isinstance(t, Tensor) for t in (query, key, value)):
        return False
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in REFERENCE_DTYPES:
        return False
    if not (query.device == key.device == value.device):
        return False
    B, Hq, Sq, D = query.shape
    if key.shape != value.shape or key.shape[0] != B or key.shape[3] != D or not 1 <= D <= MAX_HEAD_DIM:
        return False
    Hkv, Skv = key.shape[1], key.shape[2]
    if Sq == 0 or Skv == 0 or B == 0 or Hkv == 0:
        return False
    if Hq != Hkv and not (enable_gqa and Hq % Hkv == 0):
        return False  # torch's own SDPA gives the error (or its own semantics)
    name = selected_backend()
    if name == "auto":
        return (query.device.type == "cuda" and query.dtype in KERNEL_DTYPES
                and backend_available("triton", query.device)[0])
    if name == "triton":  # (bf16 on CPU: the interpreter cannot multiply it, torch's SDPA runs it)
        return (query.dtype in KERNEL_DTYPES and triton_multiplies(query.device, query.dtype)
                and backend_available("triton", query.device)[0])
    return name == "reference"


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Drop-in for F.scaled_dot_product_attention, same signature and semantics (top-left causal
    alignment). effkern's kernel runs when attn_mask is None, dropout_p == 0, scale is None or a
    finite number (not a bool), the tensors are 4-D of one supported dtype with one head dim <= 256,
    and the selected backend takes them (auto: CUDA float16/bfloat16); every other call is torch's
    own SDPA."""
    if not _sdpa_fast_path(query, key, value, attn_mask, dropout_p, scale, enable_gqa):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    Sq, Skv = query.shape[2], key.shape[2]
    window = (-1, -1)
    causal = False
    if is_causal:
        # torch: query i sees keys j <= i (top-left). effkern aligns bottom-right (j <= i + Skv - Sq):
        if Sq == Skv:
            causal = True
        elif Sq < Skv:
            # keys j >= Sq are seen by no query: drop them (a view), then the two alignments agree
            key, value = key[:, :, :Sq], value[:, :, :Sq]
            causal = True
        else:
            window = (-1, Sq - Skv)  # j <= i + (Skv - Sq) + (Sq - Skv) = i
    return flash_attention(query, key, value, causal=causal, scale=scale, window=window)
