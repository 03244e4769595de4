"""Int8Linear: an nn.Linear with its weight quantized to int8 per output channel."""

from __future__ import annotations

import torch
from torch import nn

from ..int8 import dequantize_int8, int8_linear, int8_weight_only_linear, quantize_int8

MODES = ("w8a8", "w8a16")


class Float32WeightScale(nn.Module):
    """Base of the int8 layers: a float32 ``weight_scale`` buffer [out_features] and a float
    ``bias`` Parameter (or None). ``model.half()`` / ``model.to(torch.bfloat16)`` cast the bias
    with the rest of the model, but the scale stays the float32 the int8 ops take, bit for bit
    (not rounded through the new dtype); device moves still apply to it."""

    def __init__(self, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def _apply(self, fn, recurse=True):
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self


class Int8Linear(Float32WeightScale):
    """``y = x @ W.T + bias`` with ``W = qweight * weight_scale[:, None]`` stored in int8.

    mode "w8a8": activations quantized per token on the fly, int8 x int8 GEMM
    (``effkern.int8_linear``); "w8a16": the int8 weight is converted inside the kernel and
    multiplied with the activations in their own dtype (``effkern.int8_weight_only_linear``).
    Buffers ``qweight`` (int8 [out, in]) and ``weight_scale`` (float32 [out]) are in the
    state_dict with the (float, trainable) ``bias``; the weight is frozen. ``.half()``,
    ``.to(torch.bfloat16)`` and the like cast the bias only: the scale stays float32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "w8a8",
                 device=None, dtype=None):
        super().__init__(out_features, bias, device, dtype)
        if mode not in MODES:
            raise ValueError(f"Int8Linear: mode must be one of {MODES}, got {mode!r}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "w8a8") -> "Int8Linear":
        """Quantize ``linear``'s weight (symmetric, per output channel); the bias Parameter is
        shared with ``linear``, not copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=False, mode=mode, device="meta")
        qweight, scale = quantize_int8(linear.weight)
        layer.qweight, layer.weight_scale = qweight, scale
        layer.bias = linear.bias
        return layer

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight this layer multiplies by, in ``dtype`` (default: the bias's, else float32)."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        return dequantize_int8(self.qweight, self.weight_scale, dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        op = int8_linear if self.mode == "w8a8" else int8_weight_only_linear
        return op(input, self.qweight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode!r}")
