"""Small tensor helpers shared by the op families."""

from __future__ import annotations

import math

from torch import Tensor


def rows(t: Tensor) -> Tensor:
    """t [..., K] as [M, K], M the product of the leading dims (explicit: reshape(-1, 0) is
    ambiguous when K = 0); a 2-D t is itself (no view made: ~1 us per call on the host)."""
    if t.dim() == 2:
        return t
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def rows_shape(t: Tensor) -> tuple[int, int]:
    """rows(t).shape, without making the view."""
    shape = t.shape
    return math.prod(shape[:-1]), shape[-1]


def empty(like: Tensor) -> Tensor:
    """A 0-element tensor of like's dtype and device: what an op returns for an output that
    was not asked for (custom ops cannot return None)."""
    return like.new_empty((0,))


def check_same_device(op: str, ref_name: str, ref: Tensor, **others) -> None:
    """Each tensor of ``others`` (None skipped) on ``ref``'s device, else a RuntimeError naming it."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(f"effkern.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
