"""effkern's nn modules: drop-in replacements for torch.nn building blocks."""

from .linear_gelu import LinearGELU

__all__ = ["LinearGELU"]
