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
from collections.abc import Mapping

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Heuristics

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


class _LaunchArgs(Mapping):
    """A launch's arguments by name, as Triton's Heuristics.run hands them to each heuristic
    (``{**dict(zip(arg_names, args)), **kwargs}``), looked up in place instead of copied."""

    __slots__ = ("places", "args", "kwargs")

    def __init__(self, places: dict, args: tuple, kwargs: dict) -> None:
        self.places, self.args, self.kwargs = places, args, kwargs

    def __getitem__(self, name):
        if name in self.kwargs:
            return self.kwargs[name]
        i = self.places.get(name)
        if i is None or i >= len(self.args):
            raise KeyError(name)
        return self.args[i]

    def __iter__(self):
        names = [name for name, i in self.places.items() if i < len(self.args)]
        return iter(names + [name for name in self.kwargs if name not in names])

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _Heuristics(Heuristics):
    """triton.heuristics' kernel wrapper, whose run builds a dict of all the launch's arguments for
    each heuristic (~2 us of host time per launch for effkern's 20-30 arguments); here each
    heuristic reads the arguments in place. The heuristics (effkern's own) only index them by name."""

    def __init__(self, fn, arg_names, values) -> None:
        super().__init__(fn, arg_names, values)
        self.places = {name: i for i, name in enumerate(arg_names)}

    def run(self, *args, **kwargs):
        named = _LaunchArgs(self.places, args, kwargs)
        for name, heuristic in self.values.items():
            kwargs[name] = heuristic(named)
        return self.fn.run(*args, **kwargs)


def heuristics(values: dict):
    """triton.heuristics(values), with a cheaper run (_Heuristics)."""
    return lambda fn: _Heuristics(fn, fn.arg_names, values)


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


def _key_places(tuned) -> tuple | None:
    """Where the arguments of ``tuned``'s autotuning key come from: ((position, name), ...) in key
    order, computed once per kernel; None when ``tuned`` lacks what run_tuned relies on (a Triton
    whose Autotuner differs: it then always goes through Autotuner.run)."""
    places = tuned.__dict__.get("_effkern_key_places", False)
    if places is False:
        try:
            names = list(tuned.arg_names)
            places = tuple((names.index(k) if k in names else len(names) + 1, k) for k in tuned.keys)
            tuned.cache, tuned.configs, tuned.fn  # noqa: B018 (present, or no shortcut)
        except AttributeError:
            places = None
        tuned._effkern_key_places = places
    return places


_CONFIG_KWARGS: dict = {}  # id of a triton.Config -> its all_kwargs() (the configs live as long as their kernels)


def run_tuned(tuned, grid, args: tuple, kwargs: dict) -> None:
    """``tuned[grid](*args, **kwargs)`` (a triton.autotune kernel). Where Triton's autotuner has
    already chosen a config for this call's key, this runs what Autotuner.run then runs (the
    config's pre-hook, then the wrapped kernel with the config's kwargs; triton 3.6 and 3.8:
    triton/runtime/autotuner.py, Autotuner.run) without rebuilding its argument dicts per call,
    which cost ~10 us of host time per launch (bench/overhead.py's GPU-path emulation). The key
    is built as Autotuner.run builds it: the key arguments' values in key order, then str(dtype)
    of each argument with a dtype (effkern's launches pass tensors, TMA descriptors, which have no
    dtype, and Python scalars). A key not chosen for yet, or one that came out other than
    Autotuner.run's, goes through Autotuner.run, which tunes and caches: a mismatch costs time,
    never a wrong config."""
    places = _key_places(tuned)
    if places is None or len(tuned.configs) <= 1:
        tuned[grid](*args, **kwargs)
        return
    n = len(args)
    key = tuple([args[i] if i < n else kwargs[name] for i, name in places if i < n or name in kwargs]
                + [str(a.dtype) for a in args if isinstance(a, torch.Tensor)]
                + [str(v.dtype) for v in kwargs.values() if isinstance(v, torch.Tensor)])
    config = tuned.cache.get(key)
    if config is None:
        tuned[grid](*args, **kwargs)
        return
    config_kwargs = _CONFIG_KWARGS.get(id(config))
    if config_kwargs is None or config_kwargs[0] is not config:
        config_kwargs = _CONFIG_KWARGS[id(config)] = (config, config.all_kwargs())
    config_kwargs = config_kwargs[1]
    tuned.best_config = config
    if config.pre_hook is not None:
        # (what Autotuner.run hands it: its own kwargs hold grid and warmup)
        config.pre_hook({**dict(zip(tuned.arg_names, args)), "grid": grid, "warmup": False, **kwargs, **config_kwargs})
    tuned.fn.run(*args, grid=grid, warmup=False, **kwargs, **config_kwargs)


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
            run_tuned(tuned_for(tuned, device), grid, args, kwargs)
        else:
            plain[grid](*args, **kwargs, **fixed["gpu"])


def tiles(rows: int, cols: int, rows_block: str, cols_block: str, *more: int):
    """Grid of one program per output tile (times ``more``, e.g. split-K slices)."""
    return lambda meta: (cdiv(rows, meta[rows_block]) * cdiv(cols, meta[cols_block]), *more)
