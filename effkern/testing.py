"""Accuracy checks for effkern's kernels, shared by the tests and the benchmarks.

The convention of the FlashAttention tests: compare against a float64 reference, and allow
a kernel an error of at most ``factor`` times the error that PyTorch itself makes computing
the same thing in the same input precision, plus a floor: two units in the last place of the
output's largest magnitude and the fp32 rounding noise of the sums behind it (PyTorch's own
max error can be luckily small, and a sum taken in another order lands elsewhere in that noise).
"""

from __future__ import annotations

import torch


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference; NaN or inf anywhere in ``out`` counts as infinitely wrong."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    return (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0


def tolerance(baseline_error: float, scale: float, dtype: torch.dtype, reduction: int = 1,
              factor: float = 2.0) -> float:
    """The largest error allowed for an output of ``dtype`` and largest magnitude ``scale``,
    each element a sum of ``reduction`` terms, when PyTorch's own error is ``baseline_error``."""
    floor = (2 * torch.finfo(dtype).eps + torch.finfo(torch.float32).eps * reduction ** 0.5) * scale
    return factor * baseline_error + floor


def within_tolerance(out, ref, baseline, factor: float = 2.0, reduction: int = 1) -> tuple[bool, str]:
    """out: the kernel's result; ref: float64 reference; baseline: PyTorch in out's precision;
    reduction: the length of the sums behind each element (K for a GEMM output)."""
    err, base = max_error(out, ref), max_error(baseline, ref)
    scale = ref.abs().max().item() if ref.numel() else 0.0
    limit = tolerance(base, scale, out.dtype, reduction, factor)
    return err <= limit, f"error {err:.3g} vs PyTorch's {base:.3g} in {out.dtype} (limit {limit:.3g})"


def assert_within_tolerance(out, ref, baseline, what: str = "output", factor: float = 2.0,
                            reduction: int = 1) -> None:
    ok, msg = within_tolerance(out, ref, baseline, factor, reduction)
    assert ok, f"{what}: {msg}"
