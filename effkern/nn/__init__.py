"""effkern's nn modules: drop-in replacements for torch.nn building blocks."""

from .int8 import Int8Linear
from .linear_gelu import LinearGELU

__all__ = ["Int8Linear", "LinearGELU"]
