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
