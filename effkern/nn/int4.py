"""Int4Linear: an nn.Linear whose weight is stored in 4 bits, with group-wise scales and zeros."""

from __future__ import annotations

import torch
from torch import nn

from ..int4 import GROUP_SIZES, awq_to_int4, dequantize_int4, gptq_to_int4, int4_linear, quantize_int4


class Int4Linear(nn.Module):
    """``y = x @ W.T + bias`` with W = (q - zeros) * scales stored in effkern's int4 layout
    (see effkern.int4): buffers ``qweight`` int32 [out, in / 8], ``scales`` and ``zeros``
    [out, in / group_size], and, for GPTQ act-order checkpoints, ``perm`` (the order in which
    the input features are read); a float ``bias`` Parameter. The weight is frozen.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 device=None, dtype=None, act_order: bool = False):
        super().__init__()
        if group_size not in GROUP_SIZES:
            raise ValueError(f"Int4Linear: group_size must be one of {GROUP_SIZES}, got {group_size!r}")
        if in_features % 8 or out_features % 8:
            raise ValueError(f"Int4Linear: in_features={in_features} and out_features={out_features} must be "
                             f"multiples of 8")
        groups = 1 if group_size == -1 else in_features // group_size
        if group_size != -1 and in_features % group_size:
            raise ValueError(f"Int4Linear: in_features={in_features} is not divisible by group_size={group_size}")
        dtype = dtype or torch.get_default_dtype()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.full((out_features, groups), 8.0, dtype=dtype, device=device))
        if act_order:
            self.register_buffer("perm", torch.arange(in_features, device=device))
        else:
            self.perm = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def _from_tensors(cls, qweight, scales, zeros, group_size, bias, perm=None) -> "Int4Linear":
        N, K = qweight.shape[0], qweight.shape[1] * 8
        layer = cls(K, N, bias=False, group_size=group_size, device="meta", dtype=scales.dtype,
                    act_order=perm is not None)
        layer.qweight, layer.scales, layer.zeros = qweight, scales, zeros
        if perm is not None:
            layer.perm = perm
        if bias is not None:
            layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = False) -> "Int4Linear":
        """Quantize ``linear``'s weight (effkern.quantize_int4); the bias Parameter is shared."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int4Linear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls._from_tensors(*quantize_int4(linear.weight, group_size, symmetric), group_size, linear.bias)

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, g_idx=None, bias=None, zero_offset: int = 1) -> "Int4Linear":
        """A GPTQ 4-bit layer's checkpoint tensors (see effkern.gptq_to_int4; ``zero_offset`` 1 for
        the classic format, 0 for gptq_v2), converted exactly into effkern's layout."""
        qw, s, z, group_size, perm = gptq_to_int4(qweight, qzeros, scales, g_idx, zero_offset)
        return cls._from_tensors(qw, s, z, group_size, bias, perm)

    @classmethod
    def from_awq(cls, qweight, qzeros, scales, bias=None) -> "Int4Linear":
        """An AWQ ("GEMM" format) 4-bit layer's checkpoint tensors (see effkern.awq_to_int4)."""
        qw, s, z, group_size = awq_to_int4(qweight, qzeros, scales)
        return cls._from_tensors(qw, s, z, group_size, bias)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [out, in] this layer multiplies by, in the original input-feature order."""
        weight = dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, dtype)
        if self.perm is None:
            return weight
        return weight.new_empty(weight.shape).index_copy_(1, self.perm, weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            input = input.index_select(-1, self.perm)
        return int4_linear(input, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, act_order={self.perm is not None}")
