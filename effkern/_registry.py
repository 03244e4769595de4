"""Shared plumbing for registering effkern ops: the library handle, autocast rules, and
the list of op families that ``effkern.info()`` reports on."""

from __future__ import annotations

from typing import Callable

import torch

# The "effkern" operator namespace. custom_op registrations create their own fragments;
# this one holds the hand-written definitions (composite public ops, autocast kernels).
LIB = torch.library.Library("effkern", "FRAGMENT")

# family name -> function(device) -> one-line description of what `auto` runs there
FAMILIES: dict[str, Callable[[torch.device], str]] = {}


def register_family(name: str, describe_auto: Callable[[torch.device], str]) -> None:
    FAMILIES[name] = describe_auto


# The device types whose autocast effkern's matmul-like ops follow.
AUTOCAST_DEVICE_TYPES = ("cuda", "cpu")


def autocast_on(input) -> bool:
    """Whether torch.autocast is enabled for input's device type, so an op registered with
    register_autocast will see its float tensors cast to one dtype: a public wrapper that checks
    its arguments before the dispatcher then lets mixed dtypes through, as F.linear does (the
    op checks again after the cast). False for a non-tensor or another device type.
    (Not torch.amp.is_autocast_available: torch 2.11's dynamo cannot trace it, so every public op
    broke torch.compile(fullgraph=True) there.)"""
    if not isinstance(input, torch.Tensor):
        return False
    device_type = input.device.type
    return device_type in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type)


def register_autocast(op_name: str, device_types=AUTOCAST_DEVICE_TYPES, cast_args: tuple[int, ...] | None = None) -> None:
    """Autocast rule for a matmul-like op: inside ``torch.autocast(device, dtype)`` its
    floating-point tensor arguments on that device are cast to the autocast dtype that is
    active at call time (bf16 or fp16, as the user chose), like torch's own F.linear;
    float64 tensors are left alone, as torch's autocast does. ``cast_args``: the positions
    of the arguments to cast (default all), e.g. not a quantized weight's float32 scales."""
    op = getattr(torch.ops.effkern, op_name).default
    for device_type in device_types:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

        def cast(arg, dtype, device_type=device_type):
            if (isinstance(arg, torch.Tensor) and arg.is_floating_point() and arg.dtype != torch.float64
                    and arg.device.type == device_type):
                return arg.to(dtype)
            return arg

        def kernel(*args, device_type=device_type, keyset=keyset, cast=cast):
            dtype = torch.get_autocast_dtype(device_type)
            with torch._C._ExcludeDispatchKeyGuard(keyset):
                return op(*(cast(a, dtype) if cast_args is None or i in cast_args else a
                        for i, a in enumerate(args)))

        LIB.impl(op_name, kernel, key_name)
