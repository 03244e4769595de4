"""2:4 semi-structured sparse linear layers: pruning, compression, and the sparse matmul.

A weight W [N, K] (nn.Linear layout) is 2:4 sparse along K when every group of 4 consecutive
input features, group g of row n = W[n, 4g : 4g + 4], has at most 2 nonzeros (as NVIDIA's ASP
and torch's semi-structured sparsity prune it).

effkern's compressed format (K % 4 == 0), of a float or an int8 (quantized) W:
    values [N, K / 2], W's dtype:  values[n, 2g] = W[n, 4g + i0], values[n, 2g + 1] = W[n, 4g + i1]
    meta   uint8 [N, ceil(K / 8)]: group g's code i0 | i1 << 2 in byte g // 2, the low nibble for
                                   even g, the high nibble for odd g (0 past the last group)
with i0 < i1 the group's kept positions: its nonzeros, completed with its lowest-index zeros
when it has fewer than two (so every code is one of 0b0100, 0b1000, 0b1100, 0b1001, 0b1101,
0b1110). -0.0 counts as zero.

Pruning keeps the two entries of largest magnitude of each group; between equal magnitudes
the lower positions win; NaN counts as larger than any number.

Ops (schemas defined here and nowhere else):
  effkern::prune_24(weight) -> weight with the two smallest |w| of every group zeroed (floats)
  effkern::compress_24(weight) -> (values, meta); an error naming the row and group if not 2:4
      (float or int8 weights)
  effkern::decompress_24(values, meta) -> weight, the exact inverse
  effkern::sparse24_linear(input, values, meta, bias=None) -> input @ W.T + bias; differentiable
      in input, values (the weight gradient at the kept positions: fine-tuning keeps the
      pattern) and bias
  effkern::sparse24_linear_bwd(grad_out, input, values, meta, output_mask)
      -> (grad_input, grad_values, grad_bias); grad_input = grad_out @ W by dgrad_path:
      the Triton kernel on the compressed W, or W expanded once and one dense GEMM
  effkern::sparse24_int8_linear(input, values, meta, weight_scale, bias=None)
      W8A8 on a 2:4 sparse int8 weight: == effkern.int8_linear(input, decompress_24(values,
      meta), weight_scale, bias) (input quantized per token, exact int32 accumulation,
      dequantized in fp32); values int8 [N, K / 2] from compress_24 of a quantized weight.
      Differentiable in input and bias (straight-through, as int8_linear; the weight is frozen)

W8A8 2:4 weights: ``qweight, scale = effkern.quantize_int8(effkern.prune_24(w))`` (a pruned
zero quantizes to 0, so the pattern survives), then ``values, meta = effkern.compress_24(qweight)``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _policy
from . import int8 as _int8
from ._backend import backend_available, kernel_module, require, selected_backend
from ._cache import DerivedCache
from ._registry import autocast_on, register_autocast, register_family
from ._tensors import check_same_device, empty, rows, rows_shape

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float64: reference only
FORMAT_DTYPES = FLOAT_DTYPES + (torch.int8,)  # compress/decompress also take a quantized weight


# ---------------------------------------------------------------------------- references

def prune_24_reference(weight: Tensor) -> Tensor:
    N, K = weight.shape
    groups = weight.view(N, K // 4, 4)
    nan = groups.isnan()
    # Two stable descending sorts, so equal keys keep the lower positions first: by magnitude
    # (exact: |w| in the weight's own dtype), then NaNs to the front (above inf too).
    by_magnitude = torch.where(nan, 0, groups.abs()).sort(dim=-1, descending=True, stable=True).indices
    nan_first = nan.gather(-1, by_magnitude).to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices
    keep = by_magnitude.gather(-1, nan_first)[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return torch.where(mask, groups, torch.zeros_like(groups)).view(N, K)


def _kept_positions(groups: Tensor) -> Tensor:
    """[..., 4] groups with at most 2 nonzeros -> int64 [..., 2], the kept positions ascending:
    the nonzeros first, then the lowest-index zeros."""
    rank = (groups == 0).to(torch.int64) * 4 + torch.arange(4, device=groups.device)
    return torch.sort(torch.topk(rank, 2, dim=-1, largest=False).indices, dim=-1).values


def compress_24_reference(weight: Tensor) -> tuple[Tensor, Tensor]:
    N, K = weight.shape
    groups = weight.view(N, K // 4, 4)
    nonzeros = (groups != 0).sum(-1)
    if bool((nonzeros > 2).any()):
        n, g = (int(i) for i in (nonzeros > 2).nonzero()[0])
        raise ValueError(f"effkern.compress_24: weight is not 2:4 sparse: row {n}, group {g} (k = {4 * g}..{4 * g + 3}) "
                         f"has {int(nonzeros[n, g])} nonzeros (at most 2 of every 4 along K); prune it first "
                         f"with effkern.prune_24")
    kept = _kept_positions(groups)
    values = groups.gather(-1, kept).reshape(N, K // 2)
    codes = (kept[..., 0] | (kept[..., 1] << 2)).to(torch.uint8)
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))
    return values, codes[:, 0::2] | (codes[:, 1::2] << 4)


def _codes(meta: Tensor, n_groups: int, check: bool = True, op: str = "decompress_24") -> Tensor:
    """meta uint8 [N, ceil(G / 2)] -> uint8 codes [N, G]. ``check``: raise on a code that is not
    two ascending positions or on a nonzero nibble past the last group (a wait for the GPU: the
    backward, whose meta the forward has taken, skips it)."""
    nibbles = torch.stack((meta & 0xF, meta >> 4), dim=-1).flatten(-2)
    codes, rest = nibbles[:, :n_groups], nibbles[:, n_groups:]
    if check:
        bad = (codes & 3) >= (codes >> 2)  # valid: i0 < i1
        if bool(bad.any()):
            n, g = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"effkern.{op}: meta row {n}, group {g} holds the code "
                             f"{int(codes[n, g]):#06b}, which is not two ascending positions i0 | i1 << 2")
        if bool((rest != 0).any()):
            raise ValueError(f"effkern.{op}: meta has a nonzero nibble past the last group")
    return codes


# The Triton kernels expand whatever codes they are given (an invalid one gives a wrong weight,
# not an error), so their callers check each meta tensor's codes once: a wait for the GPU on the
# first call with a weight, none after (again only if meta is modified in place).
_CHECKED_META = DerivedCache()


def check_meta_once(op: str, meta: Tensor, n_groups: int) -> None:
    # (the groups are part of the check: a meta checked for K = 12, its last nibble 0, may not
    # pass for K = 16, where that nibble is a code)
    checked_groups = _CHECKED_META.get((meta,), lambda: _codes(meta, n_groups, op=op).shape[1])
    if checked_groups != n_groups:
        _codes(meta, n_groups, op=op)


# Expansion and its inverse by selects on the codes (i0 in 0..2, i1 in 1..3), which copy bits
# (-0.0, NaN payloads) and need no int64 index tensor: scatter/gather would take 8 bytes per
# kept entry, 2x the size of 16-bit values, as scratch in every backward.

def _expand(values: Tensor, codes: Tensor) -> Tensor:
    """values [N, K / 2], codes [N, K / 4] -> W [N, K]: position p of group g holds
    values[n, 2g] if p == i0, values[n, 2g + 1] if p == i1, else +0.0."""
    N, G = codes.shape
    pairs = values.unflatten(1, (G, 2))
    position = torch.arange(4, device=codes.device, dtype=codes.dtype)
    i0, i1 = (codes & 3).unsqueeze(-1), (codes >> 2).unsqueeze(-1)
    zero = values.new_zeros(())
    return torch.where(position == i0, pairs[..., :1],
                       torch.where(position == i1, pairs[..., 1:], zero)).view(N, 4 * G)


def _kept(dense: Tensor, codes: Tensor) -> Tensor:
    """dense [N, K], codes [N, K / 4] -> [N, K / 2]: each group's entries at i0 and i1 (what
    _expand placed there)."""
    N, G = codes.shape
    quads = dense.unflatten(1, (G, 4))
    i0, i1 = codes & 3, codes >> 2
    first = torch.where(i0 == 0, quads[..., 0], torch.where(i0 == 1, quads[..., 1], quads[..., 2]))
    second = torch.where(i1 == 3, quads[..., 3], torch.where(i1 == 2, quads[..., 2], quads[..., 1]))
    return torch.stack((first, second), dim=-1).view(N, 2 * G)


def decompress_24_reference(values: Tensor, meta: Tensor, check: bool = True) -> Tensor:
    return _expand(values, _codes(meta, values.shape[1] // 2, check))


# ---------------------------------------------------------------------------- checks

def _check_tensor(op: str, name: str, t, dtypes: tuple, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"effkern.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"effkern.{op}: {name} must be {what}, got dtype {t.dtype}")


def check_weight(op: str, weight, int8_allowed: bool = False) -> None:
    if int8_allowed:
        _check_tensor(op, "weight", weight, FORMAT_DTYPES, "a float or int8 tensor")
    else:
        _check_tensor(op, "weight", weight, FLOAT_DTYPES, "a float tensor")
    if weight.dim() != 2:
        raise ValueError(f"effkern.{op}: weight must be 2-D [N, K], got shape {list(weight.shape)}")
    if weight.shape[1] % 4:
        raise ValueError(f"effkern.{op}: K={weight.shape[1]} must be a multiple of 4 (groups of 4 along K); "
                         f"pad the weight's input features with zeros")


def check_compressed(op: str, values, meta, int8_allowed: bool = False) -> None:
    if int8_allowed:
        _check_tensor(op, "values", values, FORMAT_DTYPES, "a float or int8 tensor")
    else:
        _check_tensor(op, "values", values, FLOAT_DTYPES, "a float tensor")
    _check_tensor(op, "meta", meta, (torch.uint8,), "uint8 (from effkern.compress_24)")
    if values.dim() != 2 or values.shape[1] % 2:
        raise ValueError(f"effkern.{op}: values must be 2-D [N, K / 2] with K a multiple of 4, got "
                         f"{list(values.shape)}")
    N, K = values.shape[0], values.shape[1] * 2
    expected = (N, -(-K // 8))
    if tuple(meta.shape) != expected:
        raise ValueError(f"effkern.{op}: meta must have shape [N, ceil(K / 8)] = {list(expected)} for values "
                         f"{list(values.shape)}, got {list(meta.shape)}")
    if meta.device != values.device:
        raise RuntimeError(f"effkern.{op}: meta is on {meta.device} but values is on {values.device}")


def check_linear_args(op: str, input, values, meta, bias, mixed_dtypes_allowed: bool = False) -> None:
    """``mixed_dtypes_allowed``: values and bias of other float dtypes than input, for a caller
    that autocast will cast before the op runs (the op checks again after the cast)."""
    _check_tensor(op, "input", input, FLOAT_DTYPES, "float16, bfloat16 or float32")
    if input.dim() < 1:
        raise ValueError(f"effkern.{op}: input must have shape [..., K], got a scalar")
    check_compressed(op, values, meta)
    N, K = values.shape[0], values.shape[1] * 2
    if input.shape[-1] != K:
        raise ValueError(f"effkern.{op}: input's last dimension K={input.shape[-1]} does not match the weight's "
                         f"K={K} (values is [N, K / 2] = {list(values.shape)})")
    for name, t in (("values", values), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != input.dtype and not mixed_dtypes_allowed:
            raise TypeError(f"effkern.{op}: {name} has dtype {t.dtype} but input has {input.dtype}; use one dtype "
                            f"(or torch.autocast)")
        if t.device != input.device:
            raise RuntimeError(f"effkern.{op}: {name} is on {t.device} but input is on {input.device}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"effkern.{op}: bias must have shape [N] = [{N}], got {list(bias.shape)}")


def check_int8_linear_args(op: str, input, values, meta, weight_scale, bias,
                           mixed_dtypes_allowed: bool = False) -> None:
    """sparse24_int8_linear's arguments: float input [..., K], int8 values [N, K / 2] and their
    meta, weight_scale float32 [N], bias [N] in input's dtype (``mixed_dtypes_allowed``: any
    float dtype, for autocast to cast)."""
    _check_tensor(op, "input", input, _int8.REFERENCE_DTYPES, "float16, bfloat16 or float32")
    if input.dim() < 1:
        raise ValueError(f"effkern.{op}: input must have shape [..., K], got a scalar")
    _check_tensor(op, "values", values, (torch.int8,),
                  "int8 (compress_24 of a weight quantized with effkern.quantize_int8)")
    check_compressed(op, values, meta, int8_allowed=True)
    N, K = values.shape[0], values.shape[1] * 2
    if input.shape[-1] != K:
        raise ValueError(f"effkern.{op}: input's last dimension K={input.shape[-1]} does not match the weight's "
                         f"K={K} (values is [N, K / 2] = {list(values.shape)})")
    _check_tensor(op, "weight_scale", weight_scale, (torch.float32,), "float32 (one scale per output channel)")
    if tuple(weight_scale.shape) != (N,):
        raise ValueError(f"effkern.{op}: weight_scale must have shape [N] = [{N}], got {list(weight_scale.shape)}")
    _int8._check_bias(op, bias, N, _int8.REFERENCE_DTYPES, like=None if mixed_dtypes_allowed else input)
    check_same_device(op, "input", input, values=values, weight_scale=weight_scale, bias=bias)


# ---------------------------------------------------------------------------- backends

def _cuda_layout():
    from . import sparse24_cuda_layout  # the mma.sp kernel's reordered values and metadata

    return sparse24_cuda_layout


def _cpp_op(name: str):
    """effkern._C's C++ CPU kernel ``name`` if the extension has it, else None."""
    if not backend_available("cuda", "cpu")[0]:
        return None
    return getattr(torch.ops.effkern_C, name, None)


def format_backend(op: str, t: Tensor) -> str:
    """prune/compress/decompress: "cuda" (effkern._C's C++ CPU kernels, for CPU tensors) or
    "reference" (PyTorch ops, on any device). auto, and triton (no Triton kernels for these),
    take the C++ kernels for CPU tensors when they are built, PyTorch ops otherwise."""
    name = selected_backend()
    if name in ("auto", "triton"):
        return "cuda" if t.device.type == "cpu" and _cpp_op(op) is not None else "reference"
    if name == "reference":
        return name
    if t.device.type != "cpu":
        raise RuntimeError(f"effkern.{op}: backend 'cuda' runs {op} with effkern._C's C++ kernels, which are for CPU "
                           f"tensors; on a GPU, auto and reference run it as PyTorch ops")
    require(name, t.device, op)
    if _cpp_op(op) is None:
        raise RuntimeError(f"effkern.{op}: effkern._C was built without the 2:4 CPU kernels")
    return name


# op -> the policy (effkern/policies/<name>.json, written by python -m bench <name>) that records
# its faster forward backend per shape
_POLICIES = {"sparse24_linear": "sparse24", "sparse24_int8_linear": "sparse24_int8"}


def _cuda_kernel_runs(op: str, device: torch.device, dtype: torch.dtype, M: int, N: int, K: int) -> bool:
    """Whether effkern._C's mma.sp kernel (``op``: the 16-bit one, or W8A8 on int8 values with
    16-bit input and output) takes this problem."""
    weight_dtype = torch.int8 if op == "sparse24_int8_linear" else dtype
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and backend_available("cuda", device)[0] and hasattr(torch.ops.effkern_C, op)
            and _cuda_layout().cuda_kernel_supports(M, N, K, weight_dtype))


def _kernels_run(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether auto runs effkern's kernels at all here (else the PyTorch ops)."""
    return device.type == "cuda" and dtype != torch.float64 and backend_available("triton", device)[0]


def _recorded_winner(mode: str, device: torch.device, dtype: torch.dtype, M: int, N: int, K: int,
                     policy: str = "sparse24") -> str | None:
    return _policy.choose(policy, mode, torch.cuda.get_device_name(device),
                          dtype=str(dtype).removeprefix("torch."), M=M, N=N, K=K)


@functools.lru_cache(maxsize=4096)
def _auto_backend(op: str, device: torch.device, dtype: torch.dtype, M: int, N: int, K: int) -> str:
    # Cached: at decoding sizes the lookup would cost as much as the GPU work.
    if not _kernels_run(device, dtype):
        return "reference"
    if (_recorded_winner("fwd", device, dtype, M, N, K, policy=_POLICIES[op]) == "cuda"
            and _cuda_kernel_runs(op, device, dtype, M, N, K)):
        return "cuda"
    return "triton"


@functools.lru_cache(maxsize=4096)
def _auto_dgrad_path(device: torch.device, dtype: torch.dtype, M: int, N: int, K: int) -> str:
    # the bwd benchmark times grad_input alone: its effkern-triton rows run the dgrad kernel,
    # its effkern-cuda rows the dense expansion and cuBLAS
    if _kernels_run(device, dtype) and _recorded_winner("bwd", device, dtype, M, N, K) == "triton":
        return "triton"
    return "dense"


def dgrad_path(grad_out: Tensor, K: int) -> str:
    """How the backward computes grad_input = grad_out @ W, W [N, K] 2:4 compressed: "triton"
    (kernels/sparse24.py's sparse24_dgrad_kernel expands W's tiles in registers) under backend
    triton, and under auto where effkern/policies/sparse24.json records it faster (mode bwd);
    "dense" (W expanded once into an N x K scratch, then one GEMM: cuBLAS on a GPU) under the
    other backends and where nothing is measured."""
    name = selected_backend()
    M, N = rows_shape(grad_out)
    if name == "auto":
        return _auto_dgrad_path(grad_out.device, grad_out.dtype, M, N, K)
    if name == "triton":
        require(name, grad_out.device, "sparse24_linear_bwd", dot_dtype=grad_out.dtype)
        if grad_out.dtype not in KERNEL_DTYPES:  # a forward on another backend, its backward under triton
            raise TypeError(f"effkern.sparse24_linear: backend 'triton' takes float16, bfloat16 or float32, got "
                            f"a {grad_out.dtype} gradient (float64 runs on the reference backend)")
        return name
    return "dense"


def linear_backend(op: str, input: Tensor, N: int) -> str:
    """triton, cuda or reference for ``op`` (sparse24_linear or sparse24_int8_linear): auto
    follows effkern/policies/sparse24.json resp. sparse24_int8.json (per GPU and shape), the
    Triton fallback where nothing is measured."""
    name = selected_backend()
    device, dtype = input.device, input.dtype
    M, K = rows_shape(input)
    if name == "auto":
        return _auto_backend(op, device, dtype, M, N, K)
    require(name, device, op, dot_dtype=dtype if op == "sparse24_linear" else None)  # the int8 op multiplies int8
    if name != "reference" and dtype not in KERNEL_DTYPES:
        raise TypeError(f"effkern.{op}: backend {name!r} takes float16, bfloat16 or float32, got {dtype} "
                        f"(float64 runs on the reference backend)")
    if name == "cuda" and not _cuda_kernel_runs(op, device, dtype, M, N, K):
        raise RuntimeError(f"effkern.{op}: the mma.sp CUDA kernel runs on CUDA tensors of float16/bfloat16 for the "
                           f"shapes effkern.sparse24_cuda_layout.cuda_kernel_supports accepts; got {device.type} "
                           f"{dtype}, M={M}, N={N}, K={K}. Use triton (the fallback) or auto.")
    return name


def _describe_auto(device: torch.device) -> str:
    if device.type != "cuda" or not backend_available("triton", device)[0]:
        formats = "the C++ CPU kernels" if _cpp_op("compress_24") is not None else "PyTorch ops (no effkern._C)"
        return f"reference (auto on CPU; compress/decompress/prune: {formats})"
    gpu = torch.cuda.get_device_name(device)
    int8 = ("per shape from effkern/policies/sparse24_int8.json" if _policy._entries("sparse24_int8", gpu)
            else "triton (nothing measured)")
    if _policy._entries("sparse24", gpu):
        return (f"per shape from effkern/policies/sparse24.json (measured on {gpu}), triton elsewhere; "
                f"grad_input: the dgrad kernel where measured faster, else W expanded and cuBLAS; W8A8: {int8}")
    return (f"triton fallback (no measurements recorded for {gpu}); grad_input: W expanded and cuBLAS; "
            f"W8A8: {int8}")


register_family("sparse24", _describe_auto)
_CUDA_LAYOUTS = DerivedCache()  # the mma.sp kernel's reordered copy of each compressed weight


# ---------------------------------------------------------------------------- format ops

@torch.library.custom_op("effkern::prune_24", mutates_args=())
def _prune_24(weight: Tensor) -> Tensor:
    check_weight("prune_24", weight)
    if format_backend("prune_24", weight) == "cuda":
        return torch.ops.effkern_C.prune_24(weight)
    return prune_24_reference(weight)


@_prune_24.register_fake
def _(weight):
    check_weight("prune_24", weight)
    return torch.empty_like(weight)


@torch.library.custom_op("effkern::compress_24", mutates_args=())
def _compress_24(weight: Tensor) -> tuple[Tensor, Tensor]:
    check_weight("compress_24", weight, int8_allowed=True)
    if format_backend("compress_24", weight) == "cuda":
        return torch.ops.effkern_C.compress_24(weight)
    return compress_24_reference(weight)


@_compress_24.register_fake
def _(weight):
    check_weight("compress_24", weight, int8_allowed=True)
    N, K = weight.shape
    return weight.new_empty((N, K // 2)), weight.new_empty((N, -(-K // 8)), dtype=torch.uint8)


@torch.library.custom_op("effkern::decompress_24", mutates_args=())
def _decompress_24(values: Tensor, meta: Tensor) -> Tensor:
    check_compressed("decompress_24", values, meta, int8_allowed=True)
    if format_backend("decompress_24", values) == "cuda":
        return torch.ops.effkern_C.decompress_24(values, meta)
    return decompress_24_reference(values, meta)


@_decompress_24.register_fake
def _(values, meta):
    check_compressed("decompress_24", values, meta, int8_allowed=True)
    return values.new_empty((values.shape[0], values.shape[1] * 2))


def prune_24(weight: Tensor) -> Tensor:
    """weight [N, K] with the two smallest-magnitude entries of every 4 along K set to zero
    (ties: the lower positions are kept; NaN counts as largest). Not differentiable."""
    check_weight("prune_24", weight)
    return torch.ops.effkern.prune_24(weight.detach())


def compress_24(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A 2:4 sparse weight [N, K] (float, or int8 from effkern.quantize_int8) -> (values
    [N, K / 2] in its dtype, meta uint8 [N, ceil(K / 8)]); a ValueError naming the row and group
    if some group of 4 has more than 2 nonzeros."""
    check_weight("compress_24", weight, int8_allowed=True)
    return torch.ops.effkern.compress_24(weight.detach())


def decompress_24(values: Tensor, meta: Tensor) -> Tensor:
    """The dense weight [N, K] back from compress_24's output, exactly."""
    check_compressed("decompress_24", values, meta, int8_allowed=True)
    return torch.ops.effkern.decompress_24(values.detach(), meta)


# ---------------------------------------------------------------------------- sparse24_linear

def sparse24_linear_reference(input: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return F.linear(input, decompress_24_reference(values, meta), bias)


@torch.library.custom_op("effkern::sparse24_linear", mutates_args=())
def _sparse24_linear(input: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    check_linear_args("sparse24_linear", input, values, meta, bias)
    N = values.shape[0]
    backend = linear_backend("sparse24_linear", input, N)
    if backend == "reference":
        return sparse24_linear_reference(input, values, meta, bias)
    x2d = rows(input)
    if backend == "triton":
        check_meta_once("sparse24_linear", meta, values.shape[1] // 2)
        out = kernel_module("sparse24").sparse24_matmul(x2d, values, meta, bias)
    else:
        reordered = _CUDA_LAYOUTS.get((values, meta), lambda: _cuda_layout().reorder_for_mma_sp(values, meta))
        out = torch.ops.effkern_C.sparse24_linear(x2d.contiguous(), *reordered, bias)
    return out if input.dim() == 2 else out.view(*input.shape[:-1], N)


@_sparse24_linear.register_fake
def _(input, values, meta, bias=None):
    check_linear_args("sparse24_linear", input, values, meta, bias)
    return input.new_empty((*input.shape[:-1], values.shape[0]))


@torch.library.custom_op("effkern::sparse24_linear_bwd", mutates_args=())
def _sparse24_linear_bwd(grad_out: Tensor, input: Optional[Tensor], values: Optional[Tensor], meta: Tensor,
                         output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    need_input, need_values, need_bias = output_mask
    check_same_device("sparse24_linear_bwd", "grad_out", grad_out, input=input, values=values, meta=meta)
    g2d = rows(grad_out)
    # each output not asked for is its own empty tensor: a custom op's outputs may not alias
    grad_input, grad_values, grad_bias = (empty(grad_out) for _ in range(3))
    if need_input:
        K = values.shape[1] * 2
        if dgrad_path(grad_out, K) == "triton":
            grad_input = kernel_module("sparse24").sparse24_dgrad(g2d, values, meta)
        else:
            grad_input = g2d @ decompress_24_reference(values, meta, check=False)
        grad_input = grad_input.view(*grad_out.shape[:-1], K)
    if need_values:
        # dL/dW = grad_out^T @ input, kept only where W has its values: the pattern stays 2:4
        x2d = rows(input)
        grad_values = _kept(g2d.t() @ x2d, _codes(meta, x2d.shape[1] // 4, check=False))
    if need_bias:
        grad_bias = g2d.sum(0)
    return grad_input, grad_values, grad_bias


@_sparse24_linear_bwd.register_fake
def _(grad_out, input, values, meta, output_mask):
    check_same_device("sparse24_linear_bwd", "grad_out", grad_out, input=input, values=values, meta=meta)
    need_input, need_values, need_bias = output_mask
    N = grad_out.shape[-1]
    K = input.shape[-1] if input is not None else values.shape[1] * 2
    return (grad_out.new_empty((*grad_out.shape[:-1], K)) if need_input else empty(grad_out),
            grad_out.new_empty((N, K // 2)) if need_values else empty(grad_out),
            grad_out.new_empty((N,)) if need_bias else empty(grad_out))


def _setup_context(ctx, inputs, output):
    input, values, meta, bias = inputs
    ctx.needs = [bool(ctx.needs_input_grad[i]) for i in (0, 1, 3)]
    need_input, need_values, _ = ctx.needs
    ctx.save_for_backward(input if need_values else None, values if need_input else None, meta)


def _backward(ctx, grad_out):
    input, values, meta = ctx.saved_tensors
    grad_input, grad_values, grad_bias = torch.ops.effkern.sparse24_linear_bwd(grad_out, input, values, meta,
                                                                               ctx.needs)
    need_input, need_values, need_bias = ctx.needs
    return (grad_input if need_input else None, grad_values if need_values else None, None,
            grad_bias if need_bias else None)


_sparse24_linear.register_autograd(_backward, setup_context=_setup_context)
register_autocast("sparse24_linear", cast_args=(0, 1, 3))  # input, values, bias; not the metadata


def sparse24_linear(input: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(input, decompress_24(values, meta), bias)`` with the 2:4 sparse weight kept
    compressed: input [..., K] (float16, bfloat16 or float32; float64 on the reference backend),
    values [N, K / 2] and bias [N] in input's dtype, meta from compress_24. Differentiable in
    input, values and bias."""
    check_linear_args("sparse24_linear", input, values, meta, bias, mixed_dtypes_allowed=autocast_on(input))
    return torch.ops.effkern.sparse24_linear(input, values, meta, bias)


# ---------------------------------------------------------------------------- sparse24_int8_linear (W8A8)

def sparse24_int8_linear_reference(input: Tensor, values: Tensor, meta: Tensor, weight_scale: Tensor,
                                   bias: Optional[Tensor] = None) -> Tensor:
    return _int8.int8_linear_reference(input, decompress_24_reference(values, meta), weight_scale, bias)


@torch.library.custom_op("effkern::sparse24_int8_linear", mutates_args=())
def _sparse24_int8_linear(input: Tensor, values: Tensor, meta: Tensor, weight_scale: Tensor,
                          bias: Optional[Tensor] = None) -> Tensor:
    check_int8_linear_args("sparse24_int8_linear", input, values, meta, weight_scale, bias)
    N = values.shape[0]
    backend = linear_backend("sparse24_int8_linear", input, N)
    if backend == "reference":
        return sparse24_int8_linear_reference(input, values, meta, weight_scale, bias)
    x_q, x_scale = kernel_module("int8").quantize_rows_int8(rows(input))
    if backend == "triton":
        check_meta_once("sparse24_int8_linear", meta, values.shape[1] // 2)
        out = kernel_module("sparse24").sparse24_int8_matmul(x_q, x_scale, values, meta, weight_scale, bias,
                                                             input.dtype)
    else:
        reordered = _CUDA_LAYOUTS.get((values, meta), lambda: _cuda_layout().reorder_for_mma_sp(values, meta))
        out = torch.ops.effkern_C.sparse24_int8_linear(x_q, x_scale, *reordered, weight_scale, bias, input.dtype)
    return out if input.dim() == 2 else out.view(*input.shape[:-1], N)


@_sparse24_int8_linear.register_fake
def _(input, values, meta, weight_scale, bias=None):
    check_int8_linear_args("sparse24_int8_linear", input, values, meta, weight_scale, bias)
    return input.new_empty((*input.shape[:-1], values.shape[0]))


def _int8_setup_context(ctx, inputs, output):
    input, values, meta, weight_scale, bias = inputs
    if ctx.needs_input_grad[3]:
        raise RuntimeError("effkern.sparse24_int8_linear: weight_scale requires grad, but the quantized weight is "
                           "frozen: this op gives gradients for the input and the bias only. Call "
                           "weight_scale.requires_grad_(False)")
    ctx.needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[4])]
    saved = (values, meta, weight_scale) if ctx.needs[0] else (None, None, None)
    ctx.save_for_backward(*saved)


def _int8_backward(ctx, grad_out):
    # int8_linear's backward (straight-through the activation quantization) on the dense int8 W
    values, meta, weight_scale = ctx.saved_tensors
    qweight = decompress_24_reference(values, meta, check=False) if ctx.needs[0] else None
    grad_input, grad_bias = torch.ops.effkern.int8_linear_bwd(grad_out, qweight, weight_scale, ctx.needs)
    return (grad_input if ctx.needs[0] else None, None, None, None, grad_bias if ctx.needs[1] else None)


_sparse24_int8_linear.register_autograd(_int8_backward, setup_context=_int8_setup_context)
register_autocast("sparse24_int8_linear", cast_args=(0, 4))  # input and bias; not the float32 scales


def sparse24_int8_linear(input: Tensor, values: Tensor, meta: Tensor, weight_scale: Tensor,
                         bias: Optional[Tensor] = None) -> Tensor:
    """W8A8 on a 2:4 sparse weight: ``effkern.int8_linear(input, decompress_24(values, meta),
    weight_scale, bias)`` with the int8 weight kept compressed. input [..., K] (float16, bfloat16
    or float32; float64 on the reference backend) is quantized per token, multiplied with an
    exact int32 accumulator (on the sparse tensor cores on the cuda backend) and dequantized with
    weight_scale float32 [N]; values int8 [N, K / 2] and meta from compress_24 of an int8 weight;
    bias [N] in input's dtype. Output in input's dtype. Differentiable in input and bias."""
    check_int8_linear_args("sparse24_int8_linear", input, values, meta, weight_scale, bias,
                           mixed_dtypes_allowed=autocast_on(input))
    return torch.ops.effkern.sparse24_int8_linear(input, values, meta, weight_scale, bias)
