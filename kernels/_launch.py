"""What every Triton GEMM in effkern shares: the grouped tile order, the autotuning configs'
plumbing, and the launcher that picks autotuned, fixed or interpreter configs.

On a GPU a kernel is autotuned over its family's configs (or, with EFFKERN_TRITON_AUTOTUNE=0,
run at one fixed config, as the GPU tests do); under Triton's interpreter (CPU tensors) one
small fixed config keeps the tests quick and makes odd test sizes cross tile edges.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os

import torch
import triton
import triton.language as tl

from effkern._backend import interpreter_switch_set


# Host-side helpers on the launch path, which runs once per op call: at decoding sizes its CPU
# time is as long as the GPU work. triton.cdiv and triton.next_power_of_2 are constexpr functions
# for use inside kernels and cost ~2 us per host call (triton 3.8); these cost ~0.05 us.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# The kernels compute some offsets in 32-bit arithmetic (Triton passes a stride below 2^31 as an
# int32): the GEMMs' along the reduction, k * stride with k below K plus the deepest tile (256);
# attention's along the sequence and the head dimension. Where such an offset could reach
# MAX_32BIT_OFFSET (a column-major activation of 2^31 elements, say), the launcher copies the
# operand into a layout where it cannot.
MAX_32BIT_OFFSET = 2**31


def with_short_steps(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t``, or where an offset along ``dim`` (the reduction) could reach MAX_32BIT_OFFSET
    elements, a copy with stride 1 there."""
    if t.stride(dim) * (t.shape[dim] + 256) < MAX_32BIT_OFFSET:
        return t
    return t.movedim(dim, -1).contiguous().movedim(-1, dim)


# triton fixes each kernel's mode when the kernel is defined, at import: the switch as it was then
INTERPRETED_AT_IMPORT = interpreter_switch_set()


def interpreted() -> bool:
    return INTERPRETED_AT_IMPORT


# Under the interpreter: few enough "SMs" that the tests' shapes take the split-K paths and
# persistent programs walk several tiles.
_INTERPRETER_SMS = 4


@functools.lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int:
    if interpreted():
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def on_device(device: torch.device):
    """Make ``device`` current for a Triton launch (it launches on the current device), if it
    is not already: switching devices costs microseconds per call."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


@triton.jit
def grouped_tile(pid, num_p, num_q, GROUP: tl.constexpr):
    # Visit output tiles in groups of GROUP tile-rows, column by column inside a group, so
    # programs running together reuse the same B column tiles and A row tiles from L2.
    per_group = GROUP * num_q
    first_p = (pid // per_group) * GROUP
    rows = tl.minimum(num_p - first_p, GROUP)
    pid_p = first_p + (pid % per_group) % rows
    pid_q = (pid % per_group) // rows
    return pid_p, pid_q


def config(names: tuple[str, ...], values: tuple[int, ...], stages: int, warps: int, pre_hook=None) -> triton.Config:
    return triton.Config(dict(zip(names, values)), num_stages=stages, num_warps=warps, pre_hook=pre_hook)


def prune_by_rows(rows_arg: str, block_arg: str):
    # Keep row blocks between min(64, R) and R, R = the row count rounded up to a power of two
    # (16 at least, the smallest tl.dot tile): taller tiles only add idle rows, and thin tiles
    # re-read the weight too often once there are many rows. Autotuning stays short. (Configs
    # that do not fit the shared memory are skipped by the autotuner itself.)
    def prune(configs, named_args, **_):
        limit = max(16, next_power_of_2(named_args[rows_arg]))
        kept = [c for c in configs if min(limit, 64) <= c.kwargs[block_arg] <= limit]
        return kept or [min(configs, key=lambda c: c.kwargs[block_arg])]

    return prune


def switch_on(name: str) -> bool:
    """An on/off environment switch of the kernels (on unless set to something other than
    1/true/on/yes), read per call: the benchmark times both settings in one run."""
    return os.environ.get(name, "1").lower() in ("1", "true", "on", "yes")


def autotune_on() -> bool:
    return switch_on("EFFKERN_TRITON_AUTOTUNE")


def tf32_matmuls() -> bool:
    """torch's own switch for F.linear's fp32 GEMMs (off by default). Read through the new API
    where torch has it: the legacy torch.backends.cuda.matmul.allow_tf32 raises a RuntimeError
    ("mix of the legacy and new APIs") once TF32 was switched on with
    torch.backends.cuda.matmul.fp32_precision = "tf32" (or torch.backends.fp32_precision)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)  # torch >= 2.9
    return precision == "tf32" if precision is not None else bool(matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own switch for F.linear (off by default): exact fp32 or TF32.
    if dtype == torch.float32 and not tf32_matmuls():
        return "ieee"
    return "tf32"


def fixed_config(fixed: dict) -> dict:
    """The entry of ``fixed`` (see launch) that a launch without autotuning runs here."""
    return fixed["interpreter" if interpreted() else "gpu"]


@functools.lru_cache(maxsize=16)
def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


_TUNED_PER_GPU: dict = {}  # (id of an autotuned kernel, GPU name) -> its copy with that GPU's choices


def tuned_for(tuned, device: torch.device):
    """``tuned`` (a triton.autotune kernel) with choices of its own per GPU model: Triton's autotuner
    keys its cache on the key arguments and the tensors' dtypes only (triton/runtime/autotuner.py,
    Autotuner.run), so on a machine with two GPU models a tile tuned on one would be reused on
    the other, which may not have the shared memory for it (OutOfResources) or run it slowly."""
    if device.type != "cuda":  # (the tests' autotuning through the interpreter)
        return tuned
    key = (id(tuned), _gpu_name(device))
    own = _TUNED_PER_GPU.get(key)
    if own is None:
        own = copy.copy(tuned)
        own.cache = {}
        own = _TUNED_PER_GPU.setdefault(key, own)
    return own


def launch(tuned, plain, grid, args, kwargs, fixed: dict, device: torch.device | None = None) -> None:
    """Run ``plain`` at ``fixed[\"interpreter\"]`` under the interpreter, else ``tuned``
    (autotuned) or ``plain`` at ``fixed[\"gpu\"]`` when autotuning is off. ``fixed`` maps
    those two names to config kwargs (block sizes, num_stages, num_warps). ``device``: where it
    runs, when the first argument is not a tensor."""
    if interpreted():
        plain[grid](*args, **kwargs, **fixed["interpreter"])
        return
    device = device or args[0].device
    with on_device(device):
        if autotune_on():
            tuned_for(tuned, device)[grid](*args, **kwargs)
        else:
            plain[grid](*args, **kwargs, **fixed["gpu"])


def tiles(rows: int, cols: int, rows_block: str, cols_block: str, *more: int):
    """Grid of one program per output tile (times ``more``, e.g. split-K slices)."""
    return lambda meta: (cdiv(rows, meta[rows_block]) * cdiv(cols, meta[cols_block]), *more)
