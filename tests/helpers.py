"""Accuracy checks shared by the op tests (and imported by the benchmarks).

The convention of the FlashAttention tests: compare against a float64 reference, and allow
a kernel an error of at most ``factor`` times the error that PyTorch itself makes computing
the same thing in the same input precision, plus a floor of two units in the last place of
the output's largest magnitude (on small outputs PyTorch's max error can be luckily tiny).
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


def within_tolerance(out, ref, baseline, factor: float = 2.0) -> tuple[bool, str]:
    """out: the kernel's result; ref: float64 reference; baseline: PyTorch in out's precision."""
    err, base = max_error(out, ref), max_error(baseline, ref)
    floor = 2 * torch.finfo(out.dtype).eps * (ref.abs().max().item() if ref.numel() else 0.0)
    limit = factor * base + floor
    return err <= limit, f"error {err:.3g} vs PyTorch's {base:.3g} in {out.dtype} (limit {limit:.3g})"


def assert_within_tolerance(out, ref, baseline, what: str = "output", factor: float = 2.0) -> None:
    ok, msg = within_tolerance(out, ref, baseline, factor)
    assert ok, f"{what}: {msg}"
