"""effkern: fused and quantized GPU kernels for PyTorch, as torch.library operators.

    import effkern as ek
    y = ek.linear_gelu(x, weight, bias)          # == F.gelu(F.linear(x, weight, bias))
    layer = ek.nn.LinearGELU.from_linear(linear)
    with ek.use_backend("triton"): ...           # auto | triton | cuda | reference
    ek.info()
"""

from . import nn
from ._backend import BACKENDS, backend_available, use_backend
from ._info import info
from .linear_gelu import linear_gelu

__version__ = "0.1.0"
__all__ = ["BACKENDS", "backend_available", "info", "linear_gelu", "nn", "use_backend"]
