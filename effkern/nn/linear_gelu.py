"""LinearGELU: nn.Linear followed by GELU, as one fused effkern op."""

from __future__ import annotations

import torch
from torch import nn

from ..linear_gelu import APPROXIMATIONS, linear_gelu


class LinearGELU(nn.Linear):
    """``gelu(x @ weight.T + bias)``; parameters, init and state_dict exactly as nn.Linear.

    ``recompute_preact=True`` keeps less activation memory in training (see
    ``effkern.linear_gelu``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 approximate: str = "none", recompute_preact: bool = False):
        if approximate not in APPROXIMATIONS:
            raise ValueError(f"LinearGELU: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.approximate = approximate
        self.recompute_preact = recompute_preact

    @classmethod
    def from_linear(cls, linear: nn.Linear, approximate: str = "none", recompute_preact: bool = False) -> "LinearGELU":
        """A LinearGELU that shares ``linear``'s weight and bias Parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LinearGELU.from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                    approximate=approximate, recompute_preact=recompute_preact)
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear_gelu(input, self.weight, self.bias, self.approximate, recompute_preact=self.recompute_preact)

    def extra_repr(self) -> str:
        extra = ", recompute_preact=True" if self.recompute_preact else ""
        return f"{super().extra_repr()}, approximate={self.approximate!r}{extra}"
