"""What the tests of effkern's CUDA GEMM kernels share (test_int4_cuda.py, test_sparse24_cuda.py).

Bit-exact comparisons of 16-bit tensors; the C++ op's argument checks, run on CPU tensors through
its CPU registration (it validates, then raises "no CPU kernel"); the GPU result against a
float64 reference of the same rounded operands.
"""

from __future__ import annotations

import re

import pytest
import torch

from effkern import _ext

from op_checks import assert_linear_matches_float64

DTYPES = (torch.float16, torch.bfloat16)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype in DTYPES else t


def assert_bit_equal(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    assert torch.equal(bits(a), bits(b)), f"{what} differs"


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 16, dtype=t.dtype)
    out = buf[1:1 + t.numel()].view_as(t)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


# ---------------------------------------------------------------------------- the C++ op (CPU side)

def op_schema(op: str) -> str:
    if not _ext.available():
        pytest.skip(f"effkern._C is not built: {_ext.load_error()}")
    return str(getattr(torch.ops.effkern_C, op).default._schema)


def needs_cuda_extension(op: str):
    if not _ext.available():
        pytest.skip(f"effkern._C is not built: {_ext.load_error()}")
    if not _ext.built_with_cuda():
        pytest.skip(f"effkern._C was built without CUDA: effkern_C::{op} has no kernels (CPU-only build)")


def assert_op_raises(op: str, kwargs: dict, match: str):
    """effkern_C::<op>(**kwargs) raises a RuntimeError matching ``match``: on CPU tensors either an
    argument check's error or, past the checks, "no CPU kernel"."""
    needs_cuda_extension(op)
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.ops.effkern_C, op)(**kwargs)


def cpp_checks_accept(op: str, *args) -> bool:
    """Whether the op's C++ checks take these CPU arguments (True: it got as far as "no CPU
    kernel"; False: the shape rule "the CUDA kernel needs ..." rejected them)."""
    needs_cuda_extension(op)
    try:
        getattr(torch.ops.effkern_C, op)(*args)
    except RuntimeError as exc:
        accepted = "no CPU kernel" in str(exc)
        assert accepted or "the CUDA kernel needs" in str(exc), str(exc)
        return accepted
    raise AssertionError(f"effkern_C::{op} returned on CPU tensors")


# ---------------------------------------------------------------------------- the kernel (GPU)

def random_input_and_bias(M, N, K, dtype, with_bias, seed):
    """x [M, K] and bias [N] (or None) on the GPU, standard normal rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).cuda()
    bias = torch.randn(N, generator=g).to(dtype).cuda() if with_bias else None
    return x, bias


def assert_kernel_matches_float64(out, x, w, bias, what):
    """out, a kernel's x @ w^T (+ bias) for a 2-D x, is [M, N] in x's dtype and matches the float64
    product of the same operands (op_checks.assert_linear_matches_float64)."""
    assert out.dtype == x.dtype and tuple(out.shape) == (x.shape[0], w.shape[0])
    assert_linear_matches_float64(out, x, w.double(), w, bias, what)


def assert_rejects_tensors_on_another_device(op: str, kwargs: dict, weight: str):
    """kwargs on CPU with input moved to the GPU: the CUDA kernel's checks name ``weight``."""
    kwargs = dict(kwargs, input=kwargs["input"].cuda())
    with pytest.raises(RuntimeError, match=re.escape(f"{weight} is on cpu but input is on cuda")):
        getattr(torch.ops.effkern_C, op)(**kwargs)
