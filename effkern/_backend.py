"""Backend selection: which implementation an effkern op runs.

Backends:
  reference  plain PyTorch (any device); the test oracle
  triton     effkern's Triton kernels; on CPU tensors through Triton's interpreter,
             which must be switched on with TRITON_INTERPRET=1 before triton is
             first imported (triton fixes the mode of every @triton.jit at import)
  cuda       the C++ extension effkern._C: cuBLASLt / CUDA kernels on CUDA tensors,
             its C++ CPU kernels on CPU tensors
  auto       reference on CPU; on CUDA the faster of triton and cuda for the shape,
             from measurements recorded in effkern/policies/ (see effkern/_policy.py)

The choice comes from, in order: the innermost ``use_backend(...)`` block, the
``EFFKERN_BACKEND`` environment variable, then "auto". It is read when the op runs
(inside the op's implementation), so it also applies to ops in compiled graphs. Like
torch's own ``sdpa_kernel`` it is process-wide, not per thread: the autograd engine runs
CUDA backward ops on its own worker thread, which must see the same choice.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import torch

from . import _ext

BACKENDS = ("auto", "triton", "cuda", "reference")

_stack: list[str] = []  # names of the open use_backend blocks, innermost last


def _check_name(name: str, origin: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{origin}: unknown effkern backend {name!r}; expected one of {BACKENDS}")
    return name


def selected_backend() -> str:
    """The backend asked for right now (may be "auto")."""
    if _stack:
        return _stack[-1]
    return _check_name(os.environ.get("EFFKERN_BACKEND", "auto") or "auto", "EFFKERN_BACKEND")


@contextlib.contextmanager
def use_backend(name: str):
    """Run effkern ops inside this block with backend ``name`` (auto|triton|cuda|reference)."""
    _stack.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _stack.pop()


def interpreter_switch_set() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's interpreter now."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")  # as triton reads it


def triton_interpreter_on() -> bool:
    """Whether effkern's Triton kernels run in Triton's interpreter: once they are imported, the
    mode they were imported in (triton fixes it then; setting the variable later changes nothing),
    before that the environment's switch."""
    launch = sys.modules.get("effkern.kernels._launch")
    return launch.INTERPRETED_AT_IMPORT if launch is not None else interpreter_switch_set()


_KERNEL_MODULES: dict = {}


def kernel_module(name: str):
    """effkern.kernels.<name>, imported on first use (so importing effkern does not import triton);
    looked up once, not per call (an import statement costs ~0.7 us of host time each time)."""
    module = _KERNEL_MODULES.get(name)
    if module is None:
        module = _KERNEL_MODULES[name] = importlib.import_module(f"{__package__}.kernels.{name}")
    return module


# (a constant, not a cached function: torch.compile traces backend_available in the SDPA drop-in)
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def backend_available(name: str, device: torch.device | str) -> tuple[bool, str]:
    """Whether backend ``name`` can run on tensors of ``device``, and why not if it cannot."""
    _check_name(name, "backend_available")
    dev = device.type if isinstance(device, torch.device) else torch.device(device).type
    if name in ("auto", "reference"):
        return True, ""
    if name == "cuda":
        if not _ext.available():
            return False, f"effkern._C is not built or failed to load: {_ext.load_error()}"
        if dev == "cuda" and not _ext.built_with_cuda():
            return False, "effkern._C was built without CUDA (CPU-only extension)"
        if dev == "cuda" and not _ext.runs_on(torch.device(device)):
            return False, (f"effkern._C was built for CUDA archs {_ext.build_info().get('archs')}, none of which "
                           f"runs on {torch.device(device)} (compute capability "
                           f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}); rebuild with "
                           f"EFFKERN_CUDA_ARCH including it")
        return True, ""
    # triton
    if not TRITON_INSTALLED:
        return False, "triton is not installed"
    if dev == "cpu" and not triton_interpreter_on():
        return False, (
            "the triton backend on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "in the environment before triton and effkern's kernels are first imported"
            + (" (they were imported without it)" if "effkern.kernels._launch" in sys.modules else "")
        )
    if dev not in ("cpu", "cuda"):
        return False, f"no Triton kernels for device type {dev!r}"
    return True, ""


def triton_multiplies(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether the Triton kernels' tl.dot gives right products of ``dtype`` operands on ``device``:
    not bfloat16 in the interpreter (CPU tensors), which multiplies their bit patterns as if they
    were numbers."""
    return not (device.type == "cpu" and dtype == torch.bfloat16)


def require(name: str, device: torch.device, op: str, dot_dtype: torch.dtype | None = None) -> None:
    """Raise unless backend ``name`` can run ``op`` on ``device``. ``dot_dtype``: the float dtype in
    which op's Triton kernels multiply (tl.dot), if they do: Triton's interpreter multiplies the bit
    patterns of bfloat16 operands as if they were numbers, so bfloat16 is refused there rather than
    answered with garbage."""
    ok, why = backend_available(name, device)
    if not ok:
        raise RuntimeError(f"effkern.{op}: backend {name!r} cannot run on {device.type} tensors: {why}")
    if name == "triton" and not triton_multiplies(device, dot_dtype):
        raise TypeError(f"effkern.{op}: the triton backend on CPU tensors (Triton's interpreter) cannot multiply "
                        f"bfloat16: its tl.dot takes their bit patterns for numbers. Use float16 there, "
                        f"or the reference backend (auto on CPU) for bfloat16")
