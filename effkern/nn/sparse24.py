"""Sparse24Linear: an nn.Linear whose weight is 2:4 sparse along K and stored compressed."""

from __future__ import annotations

import torch
from torch import nn

from ..sparse24 import compress_24, decompress_24, prune_24, sparse24_linear


class Sparse24Linear(nn.Module):
    """``y = x @ W.T + bias`` with W 2:4 sparse, kept as ``values`` (a Parameter [out, in / 2]:
    fine-tuning updates only the kept entries, so the pattern stays 2:4) and ``meta`` (a uint8
    buffer [out, ceil(in / 8)], the kept positions; see effkern.sparse24); ``bias`` a Parameter."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if in_features % 4:
            raise ValueError(f"Sparse24Linear: in_features={in_features} must be a multiple of 4 (groups of 4)")
        self.in_features, self.out_features = in_features, out_features
        self.values = nn.Parameter(torch.zeros(out_features, in_features // 2, device=device, dtype=dtype))
        # every group keeps positions 0 and 1 (code 0b0100) until weights are loaded
        meta = torch.full((out_features, -(-in_features // 8)), 0x44, dtype=torch.uint8, device=device)
        if in_features % 8:
            meta[:, -1] = 0x04
        self.register_buffer("meta", meta)
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
