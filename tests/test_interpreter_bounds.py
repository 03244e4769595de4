"""The interpreter's bounds check (tests/interpreter_bounds.py, installed by conftest.py for the
whole CPU suite) against deliberately wrong kernels: it must refuse a store or a load one element
past a tensor, or before a view's first element, and accept every access inside the launch's
tensors, overlapping views and masked-off lanes included."""

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

pytestmark = pytest.mark.skipif(not triton.knobs.runtime.interpret,
                                reason="checks Triton's interpreter (the CPU suite); a GPU runs the compiled kernels")

import interpreter_bounds  # noqa: E402


@triton.jit
def shifted_copy_kernel(src_ptr, dst_ptr, n, READ_SHIFT: tl.constexpr, WRITE_PAST: tl.constexpr,
                        BLOCK: tl.constexpr):
    # dst[i] = src[i + READ_SHIFT] for i < n (+ WRITE_PAST lanes more: the wrong kernel's mask)
    offs = tl.arange(0, BLOCK)
    mask = offs < n + WRITE_PAST
    x = tl.load(src_ptr + offs + READ_SHIFT, mask=mask, other=0.0)
    tl.store(dst_ptr + offs, x, mask=mask)


def _copy(src, dst, n, read_shift=0, write_past=0, block=16):
    shifted_copy_kernel[(1,)](src, dst, n, READ_SHIFT=read_shift, WRITE_PAST=write_past, BLOCK=block)


def _refused(what, fn):
    with pytest.raises(triton.runtime.errors.InterpreterError) as info:
        fn()
    cause = info.value.__cause__  # the interpreter re-raises what the kernel raised
    assert isinstance(cause, interpreter_bounds.OutOfBounds), repr(cause)
    assert str(cause).startswith(f"shifted_copy_kernel: {what} of 4 bytes at "), str(cause)


def test_installed_for_the_suite():
    from triton.runtime import interpreter

    assert getattr(interpreter.GridExecutor, "_effkern_bounds", False)


def test_accesses_inside_the_tensors_pass():
    src, dst = torch.arange(16.0), torch.zeros(16)
    _copy(src, dst, 16)
    assert torch.equal(dst, src)
    dst = torch.zeros(16)
    _copy(src, dst, 5)  # masked-off lanes point past both tensors: not accesses
    assert torch.equal(dst[:5], src[:5]) and not dst[5:].any()


def test_a_store_one_past_the_end_is_refused():
    src, dst = torch.arange(16.0), torch.zeros(5)
    _refused("store", lambda: _copy(src, dst, 5, write_past=1))


def test_a_load_one_past_the_end_is_refused():
    src, dst = torch.arange(5.0), torch.zeros(8)
    _refused("load", lambda: _copy(src, dst, 5, read_shift=1))


def test_views_span_their_own_elements_only():
    base = torch.arange(32.0)
    dst = torch.zeros(16)
    _copy(base[8:24], dst, 16)
    assert torch.equal(dst, base[8:24])
    # reading one element before the view (memory of its storage, but not of the view) is refused
    _refused("load", lambda: _copy(base[8:24], dst, 16, read_shift=-1))
    # two overlapping views of one storage: one span, any access inside it passes
    _copy(base[0:20], base[12:28], 8, read_shift=4)
    assert torch.equal(base[12:20], torch.arange(4.0, 12.0))


def test_the_check_itself_refuses_and_names_the_first_bad_address():
    interpreter_bounds._launch.spans = interpreter_bounds._spans([torch.zeros(4)])
    start = int(interpreter_bounds._launch.spans[0][0])
    ptrs = np.array([start, start + 12, start + 16, start + 64], dtype=np.uint64)
    interpreter_bounds.check_addresses(ptrs, np.array([1, 1, 0, 0], dtype=np.int8), 4, "load")
    with pytest.raises(interpreter_bounds.OutOfBounds, match=rf"store of 4 bytes at {start + 16:#x}, 2 of 3"):
        interpreter_bounds.check_addresses(ptrs, np.array([False, True, True, True]), 4, "store")
    with pytest.raises(interpreter_bounds.OutOfBounds, match="load of 8 bytes"):  # the element's last byte counts
        interpreter_bounds.check_addresses(ptrs[1:2], np.array([True]), 8, "load")
