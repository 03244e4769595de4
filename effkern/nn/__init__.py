"""effkern's nn modules: drop-in replacements for torch.nn building blocks."""

from .int4 import Int4Linear
from .int8 import Int8Linear
from .linear_gelu import LinearGELU
from .sparse24 import Sparse24Int8Linear, Sparse24Linear

__all__ = ["Int4Linear", "Int8Linear", "LinearGELU", "Sparse24Int8Linear", "Sparse24Linear"]
