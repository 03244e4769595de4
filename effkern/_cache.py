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
    # storage may take the freed one's address), dtype or shape instead. Where in its storage the
    # tensor lies (offset, shape, strides) identifies it along with the storage: views of one
    # weight share its version counter, so equal stamps on one storage mean the same values.
    return (t.dtype, t.storage_offset(), tuple(t.shape), t.stride(), _version(t))


class DerivedCache:
    """``get((a, b, ...), make)`` returns make()'s value, computed once per tuple of tensors:
    again only if one of them is modified in place (unless it is an inference tensor), replaced,
    or given new storage, device or dtype (``p.data = ...``, ``module.to(...)``; changes made
    through ``p.data`` itself are not seen, nor changes to ``p`` when each call is given a new
    ``p.data``, which has a version counter of its own), and dropped when the storage of any of
    them is freed.
    It holds weak references to the tensors' storages, never to the tensors themselves:
    torch.utils.swap_tensors (``load_state_dict`` and ``module.to()`` under
    ``torch.__future__.set_swap_module_params_on_conversion(True)``)
    refuses a tensor that has a weakref. The value must not hold the tensors or views of them
    (their storage would never be freed)."""

    def __init__(self) -> None:
        # (storage of the first tensor, where in it the tensor lies) -> (weakrefs to the tensors'
        # storages, stamp, value): one entry per weight, however many tensor objects view it
        self.entries: dict[tuple, tuple] = {}

    def get(self, tensors: tuple[Tensor, ...], make: Callable[[], T]) -> T:
        stamp = tuple(_stamp(t) for t in tensors)
        storages = tuple(t.untyped_storage() for t in tensors)
        key = (id(storages[0]), *stamp[0][:-1])
        hit = self.entries.get(key)
        if hit is not None and hit[1] == stamp and all(ref() is s for ref, s in zip(hit[0], storages)):
            return hit[2]
        value = make()
        entries = self.entries

        def drop(_, key=key):
            entry = entries.get(key)
            if entry is not None and any(ref() is None for ref in entry[0]):
                entries.pop(key, None)

        self.entries[key] = (tuple(weakref.ref(s, drop) for s in storages), stamp, value)
        return value
