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


def _stamp(t: Tensor) -> tuple:
    # Besides in-place changes (the version): a Parameter keeps its identity and version through
    # module.to(device / dtype) and `p.data = ...` (torch/nn/modules/module.py: param.data =
    # param_applied), which give it other storage (compared by identity in DerivedCache.get: a new
    # storage may take the freed one's address), dtype or shape instead.
    return (id(t), _version(t), t.dtype, t.storage_offset(), tuple(t.shape))


class DerivedCache:
    """``get((a, b, ...), make)`` returns make()'s value, computed once per tuple of tensors:
    again only if one of them is modified in place (unless it is an inference tensor), replaced,
    or given new storage, device or dtype (``p.data = ...``, ``module.to(...)``; changes made
    through ``p.data`` itself are not seen), and dropped when any of them is freed. The value must
    not hold the tensors themselves (they would never be freed)."""

    def __init__(self) -> None:
        # id(first tensor) -> (weakrefs to the tensors, to their storages, stamp, value)
        self.entries: dict[int, tuple] = {}

    def get(self, tensors: tuple[Tensor, ...], make: Callable[[], T]) -> T:
        first = tensors[0]
        key = id(first)
        stamp = tuple(_stamp(t) for t in tensors)
        storages = tuple(t.untyped_storage() for t in tensors)
        hit = self.entries.get(key)
        if (hit is not None and hit[0][0]() is first and hit[2] == stamp
                and all(ref() is s for ref, s in zip(hit[1], storages))):
            return hit[3]
        value = make()
        entries = self.entries

        def drop(_, key=key):
            entry = entries.get(key)
            if entry is not None and any(ref() is None for ref in entry[0]):
                entries.pop(key, None)

        self.entries[key] = (tuple(weakref.ref(t, drop) for t in tensors), tuple(weakref.ref(s) for s in storages),
                             stamp, value)
        return value
