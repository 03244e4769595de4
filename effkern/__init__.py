"""effkern: fused and quantized GPU kernels for PyTorch, as torch.library operators.

    import effkern as ek
    y = ek.linear_gelu(x, weight, bias)          # == F.gelu(F.linear(x, weight, bias))
    layer = ek.nn.LinearGELU.from_linear(linear)
    qw, w_scale = ek.quantize_int8(linear.weight)
    y = ek.int8_linear(x, qw, w_scale, bias)     # W8A8; ek.int8_weight_only_linear for W8A16
    layer = ek.nn.Int4Linear.from_linear(linear, group_size=128)   # W4A16
    layer = ek.nn.Sparse24Linear.from_linear(linear, prune=True)  # 2:4 sparse
    model = ek.swap(model, "int8")               # effkern's modules into a whole model
    with ek.use_backend("triton"): ...           # auto | triton | cuda | reference
    ek.info()
"""

from . import nn
from ._backend import BACKENDS, backend_available, use_backend
from ._info import info
from ._swap import swap
from .attention import flash_attention, scaled_dot_product_attention
from .int4 import awq_to_int4, dequantize_int4, gptq_to_int4, int4_linear, pack_int4, quantize_int4, unpack_int4
from .int8 import (int8_linear, int8_matmul, int8_mm, int8_weight_only_linear, quantize_int8,
                   quantize_per_token_int8)
from .linear_gelu import linear_gelu
from .sparse24 import compress_24, decompress_24, prune_24, sparse24_int8_linear, sparse24_linear

__version__ = "0.1.0"
__all__ = ["BACKENDS", "awq_to_int4", "backend_available", "compress_24", "decompress_24", "dequantize_int4",
           "flash_attention", "gptq_to_int4", "info",
           "int4_linear", "int8_linear", "int8_matmul", "int8_mm", "int8_weight_only_linear", "linear_gelu",
           "nn", "pack_int4", "prune_24", "quantize_int4", "quantize_int8", "quantize_per_token_int8", "scaled_dot_product_attention",
           "sparse24_int8_linear", "sparse24_linear", "swap", "unpack_int4",
           "use_backend"]
