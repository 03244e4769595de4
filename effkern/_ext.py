"""Loads the optional C++/CUDA extension effkern._C and remembers why it is missing."""

from __future__ import annotations

import functools
import importlib
import json

import torch


@functools.lru_cache(maxsize=None)
def _load() -> tuple[bool, str]:
    try:
        # Importing registers the effkern_C ops. Not `from . import _C`: that would replace
        # the import's own error ("No module named ...") by "cannot import name '_C'".
        importlib.import_module(f"{__package__}._C")
    except Exception as exc:  # ImportError, or an OSError from a missing shared library
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def available() -> bool:
    return _load()[0]


def load_error() -> str:
    return _load()[1]


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """What the extension was compiled with: {"cuda": bool, "archs": str, "cuda_version": str|None}."""
    if not available():
        return {}
    return json.loads(torch.ops.effkern_C.build_info())


def built_with_cuda() -> bool:
    return bool(build_info().get("cuda"))


def _arch_runs(arch: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ``arch`` (TORCH_CUDA_ARCH_LIST syntax: "8.0", "9.0a", "8.6+PTX")
    runs on a GPU of compute ``capability``: SASS for X.Y on X.Z with Z >= Y; arch-specific
    ("a", PTX included) on X.Y only; family-specific ("f", PTX included) on X.Z with Z >= Y; PTX of
    X.Y (+PTX) JIT-compiled on any capability >= X.Y."""
    ptx = arch.endswith("+PTX")
    arch = arch.removesuffix("+PTX")
    specific, family = arch.endswith("a"), arch.endswith("f")  # family-specific: within the major
    try:
        major, minor = (int(v) for v in arch.rstrip("af").split("."))
    except ValueError:  # a name torch also takes ("Hopper"): not judged here
        return True
    if ptx and not (specific or family) and capability >= (major, minor):
        return True
    return capability == (major, minor) if specific else (capability[0] == major and capability[1] >= minor)


def runs_on(device: torch.device) -> bool:
    """Whether the extension holds kernels for CUDA ``device``'s architecture (an extension built
    for "8.0;9.0a" has none for sm_100 or sm_120: its launches there fail). True where that
    cannot be told (no GPU, archs not recorded)."""
    if not torch.cuda.is_available():
        return True
    return _runs_on(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=64)
def _runs_on(index: int) -> bool:
    archs = [a for a in build_info().get("archs", "").split(";") if a]
    if not archs:
        return True
    capability = tuple(torch.cuda.get_device_capability(index))
    return any(_arch_runs(a, capability) for a in archs)
