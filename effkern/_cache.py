"""Values derived once from tensors, such as a CUDA kernel's pre-shuffled copy of a weight."""

from __future__ import annotations

import weakref
from typing import Callable, TypeVar

from torch import Tensor

T = TypeVar("T")


def _version(t: Tensor) -> int:
    # Inference tensors (made under torch.inference_mode, as a model loaded for serving) keep no
    # version counter: their in-place changes are not seen.
    return -1 if t.is_inference() else t._version


class DerivedCache:
    """``get((a, b, ...), make)`` returns make()'s value, computed once per tuple of tensors:
    again only if one of them is modified in place (unless it is an inference tensor) or
    replaced, and dropped when the first of them is freed. The value must not hold the first
    tensor itself (it would never be freed)."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple] = {}  # id(first tensor) -> (weakref to it, stamp, value)

    def get(self, tensors: tuple[Tensor, ...], make: Callable[[], T]) -> T:
        first = tensors[0]
        key = id(first)
        stamp = tuple((id(t), _version(t)) for t in tensors)
        hit = self.entries.get(key)
        if hit is not None and hit[0]() is first and hit[1] == stamp:
            return hit[2]
        value = make()
        self.entries[key] = (weakref.ref(first, lambda _: self.entries.pop(key, None)), stamp, value)
        return value
