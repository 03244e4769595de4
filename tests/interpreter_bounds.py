"""Bounds checking for Triton's interpreter: every load and store an interpreted kernel makes
must fall inside the tensors passed to that launch.

On a GPU an out-of-bounds access reads garbage or writes over another allocation (or faults);
under the interpreter it reads and writes the CPU process's memory, which a test notices only
by chance (a crash many tests later, or nothing). ``install()`` wraps the interpreter's two
memory operations: each active lane's address range [ptr, ptr + element size) must lie within
the memory spanned by one of the launch's tensor arguments (from its first to its last element,
overlapping views of one storage merged), else the load or store raises ``OutOfBounds`` naming
the kernel and the first offending address. Masked-off lanes are not checked: they touch
nothing, on a GPU too.

It patches two private parts of ``triton.runtime.interpreter`` (``GridExecutor._init_args_hst``,
where a launch's arguments become host tensors, and ``InterpreterBuilder.create_masked_load`` /
``create_masked_store``), the same in Triton 3.6 and 3.8; if they move, ``install()`` raises
instead of checking nothing.
"""

import threading

import numpy as np
import torch


class OutOfBounds(AssertionError):
    pass


_launch = threading.local()  # .spans: (starts, ends) of the current launch; .kernel: its name


def _tensors(arg):
    if isinstance(arg, torch.Tensor):
        yield arg
    elif isinstance(arg, (tuple, list)):
        for a in arg:
            yield from _tensors(a)
    elif hasattr(arg, "base") and isinstance(arg.base, torch.Tensor):  # a TensorDescriptor
        yield arg.base


def _spans(args) -> tuple[np.ndarray, np.ndarray]:
    """The byte ranges the launch's tensors span, merged where views of one storage overlap."""
    ranges = []
    for t in (t for a in args for t in _tensors(a)):
        if t.numel() == 0:
            continue
        last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        ranges.append((t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()))
    merged = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    starts = np.array([s for s, _ in merged], dtype=np.uint64)
    ends = np.array([e for _, e in merged], dtype=np.uint64)
    return starts, ends


def check_addresses(ptrs: np.ndarray, mask: np.ndarray, nbytes: int, what: str) -> None:
    starts, ends = getattr(_launch, "spans", (np.empty(0, np.uint64), np.empty(0, np.uint64)))
    active = ptrs[np.broadcast_to(mask, ptrs.shape).astype(bool)].astype(np.uint64).ravel()  # (masks may be int8)
    if active.size == 0:
        return
    if starts.size == 0:
        raise OutOfBounds(f"{getattr(_launch, 'kernel', '?')}: a {what} with no tensor passed to the launch")
    which = np.searchsorted(starts, active, side="right").astype(np.int64) - 1
    inside = (which >= 0) & (active + np.uint64(nbytes) <= ends[np.maximum(which, 0)])
    if not np.all(inside):
        bad = int(active[~inside][0])
        spans = ", ".join(f"[{int(s):#x}, {int(e):#x})" for s, e in zip(starts, ends))
        raise OutOfBounds(f"{getattr(_launch, 'kernel', '?')}: {what} of {nbytes} bytes at {bad:#x}, "
                          f"{int((~inside).sum())} of {active.size} active lanes outside the launch's tensors {spans}")


def _element_bytes(ptrs) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)  # int1 is stored as one byte


def install() -> None:
    """Wrap the interpreter's argument set-up and memory operations (once per process)."""
    from triton.runtime import interpreter

    executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
    if getattr(executor, "_effkern_bounds", False):
        return
    init_args, load, store = executor._init_args_hst, builder.create_masked_load, builder.create_masked_store

    def init_args_checked(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        _launch.spans = _spans([*args_hst, *kwargs_hst.values()])
        _launch.kernel = getattr(self.fn, "__name__", repr(self.fn))
        return args_hst, kwargs_hst

    def load_checked(self, ptrs, mask, *rest, **kwargs):
        check_addresses(ptrs.data, mask.data, _element_bytes(ptrs), "load")
        return load(self, ptrs, mask, *rest, **kwargs)

    def store_checked(self, ptrs, value, mask, *rest, **kwargs):
        check_addresses(ptrs.data, mask.data, _element_bytes(ptrs), "store")
        return store(self, ptrs, value, mask, *rest, **kwargs)

    executor._init_args_hst = init_args_checked
    builder.create_masked_load, builder.create_masked_store = load_checked, store_checked
    executor._effkern_bounds = True
