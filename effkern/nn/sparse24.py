"""Sparse24Linear: an nn.Linear whose weight is 2:4 sparse along K and stored compressed;
Sparse24Int8Linear: the same with the weight quantized to int8 (W8A8)."""

from __future__ import annotations

import torch
from torch import nn

from ..int8 import dequantize_int8, quantize_int8
from ..sparse24 import compress_24, decompress_24, prune_24, sparse24_int8_linear, sparse24_linear
from .int8 import Float32WeightScale


def initial_meta(out_features: int, in_features: int, device) -> torch.Tensor:
    """A layer's metadata until weights are loaded: every group keeps positions 0 and 1 (code
    0b0100; the unused high nibble past an odd number of groups 0)."""
    meta = torch.full((out_features, -(-in_features // 8)), 0x44, dtype=torch.uint8, device=device)
    if in_features % 8:
        meta[:, -1] = 0x04
    return meta


def _load_old_meta_key(module, state_dict, prefix, *args) -> None:
    # a state_dict saved before the buffer was renamed holds it as "meta"
    if prefix + "meta" in state_dict and prefix + "metadata" not in state_dict:
        state_dict[prefix + "metadata"] = state_dict.pop(prefix + "meta")


class _Metadata(nn.Module):
    """The 2:4 layers' metadata, ``layer.meta``, held in the buffer ``metadata``: a buffer named
    ``meta`` collides with the ``meta`` dict of torch.fx's GraphModule and of torch.export's
    unflattened modules (``torch.export.export(layer, ...).module()`` and
    ``torch.export.unflatten`` of any model holding such a layer raise on it). A state_dict with
    the key ``meta`` still loads."""

    def _register_metadata(self, out_features: int, in_features: int, device) -> None:
        self.register_buffer("metadata", initial_meta(out_features, in_features, device))
        self.register_load_state_dict_pre_hook(_load_old_meta_key)

    @property
    def meta(self) -> torch.Tensor:
        return self.metadata

    @meta.setter
    def meta(self, value: torch.Tensor) -> None:
        self.metadata = value


class Sparse24Linear(_Metadata):
    """``y = x @ W.T + bias`` with W 2:4 sparse, kept as ``values`` (a Parameter [out, in / 2]:
    fine-tuning updates only the kept entries, so the pattern stays 2:4) and ``meta`` (a uint8
    buffer [out, ceil(in / 8)], the kept positions, in the state_dict as ``metadata``; see
    effkern.sparse24); ``bias`` a Parameter."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if in_features % 4:
            raise ValueError(f"Sparse24Linear: in_features={in_features} must be a multiple of 4 (groups of 4)")
        self.in_features, self.out_features = in_features, out_features
        self.values = nn.Parameter(torch.zeros(out_features, in_features // 2, device=device, dtype=dtype))
        self._register_metadata(out_features, in_features, device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, prune: bool = True) -> "Sparse24Linear":
        """``linear``'s weight, pruned to 2:4 first (``prune=True``) or required to be 2:4 already,
        compressed; the bias Parameter is shared."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Sparse24Linear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight = prune_24(linear.weight) if prune else linear.weight.detach()
        values, meta = compress_24(weight)
        layer = cls(linear.in_features, linear.out_features, bias=False, device="meta", dtype=weight.dtype)
        layer.values = nn.Parameter(values, requires_grad=linear.weight.requires_grad)
        layer.meta = meta
        layer.bias = linear.bias
        return layer

    def dense_weight(self) -> torch.Tensor:
        """The 2:4 sparse weight [out, in] this layer multiplies by."""
        return decompress_24(self.values, self.meta)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return sparse24_linear(input, self.values, self.meta, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Sparse24Int8Linear(Float32WeightScale, _Metadata):
    """``y = x @ W.T + bias`` with W 2:4 sparse and quantized to int8 per output channel, W8A8
    (``effkern.sparse24_int8_linear``: activations quantized per token on the fly). Buffers
    ``values`` (int8 [out, in / 2]), ``meta`` (uint8 [out, ceil(in / 8)], as ``metadata``) and
    ``weight_scale`` (float32 [out]) are in the state_dict with the (float, trainable) ``bias``; the weight is
    frozen. ``.half()``, ``.to(torch.bfloat16)`` and the like cast the bias only."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(out_features, bias, device, dtype)
        if in_features % 4:
            raise ValueError(f"Sparse24Int8Linear: in_features={in_features} must be a multiple of 4 (groups of 4)")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=torch.int8, device=device))
        self._register_metadata(out_features, in_features, device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, prune: bool = True) -> "Sparse24Int8Linear":
        """``linear``'s weight, pruned to 2:4 first (``prune=True``) or required to be 2:4
        already, quantized (symmetric, per output channel: a pruned zero stays 0) and
        compressed; the bias Parameter is shared."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Sparse24Int8Linear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight = prune_24(linear.weight) if prune else linear.weight.detach()
        qweight, scale = quantize_int8(weight)
        layer = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        layer.values, layer.meta = compress_24(qweight)
        layer.weight_scale = scale
        layer.bias = linear.bias
        return layer

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float 2:4 weight [out, in] this layer multiplies by, in ``dtype`` (default: the
        bias's, else float32)."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return dequantize_int8(decompress_24(self.values, self.meta), self.weight_scale, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return sparse24_int8_linear(input, self.values, self.meta, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
