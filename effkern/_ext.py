"""Loads the optional C++/CUDA extension effkern._C and remembers why it is missing."""

from __future__ import annotations

import functools
import json

import torch


@functools.lru_cache(maxsize=None)
def _load() -> tuple[bool, str]:
    try:
        from . import _C  # noqa: F401  (importing registers the effkern_C ops)
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
