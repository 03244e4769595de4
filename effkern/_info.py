"""effkern.info(): what this installation can run, and what ``auto`` picks."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import _ext
from ._backend import BACKENDS, backend_available, selected_backend, triton_interpreter_on
from ._registry import FAMILIES


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _selected() -> str:
    # a wrong EFFKERN_BACKEND is reported here (every op call raises on it), not raised
    try:
        return selected_backend()
    except ValueError as exc:
        return f"invalid: {exc}"


def info(print_report: bool = True) -> dict:
    """Print (and return as a dict) versions, GPU, extension status and backend per op."""
    cuda = torch.cuda.is_available()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    report = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "triton_interpreter": triton_interpreter_on(),
        "extension": {"built": _ext.available(), "error": _ext.load_error() or None, **_ext.build_info()},
        "selected_backend": _selected(),
        "backends": {dev.type: {name: backend_available(name, dev) for name in BACKENDS[1:]} for dev in devices},
        "auto": {op: {dev.type: describe(dev) for dev in devices} for op, describe in FAMILIES.items()},
    }
    if print_report:
        ext = report["extension"]
        lines = [
            f"effkern: python {report['python']}, torch {report['torch']} (CUDA {report['torch_cuda']}), "
            f"triton {report['triton']}",
            f"GPU: {report['gpu'] or 'none'}; Triton interpreter: {'on' if report['triton_interpreter'] else 'off'}",
            (f"effkern._C: built (CUDA: {ext.get('cuda')}, archs: {ext.get('archs')}, "
             f"CUDA toolkit: {ext.get('cuda_version')})" if ext["built"] else f"effkern._C: missing ({ext['error']})"),
            f"backend selected: {report['selected_backend']} (EFFKERN_BACKEND or effkern.use_backend)",
        ]
        for dev, table in report["backends"].items():
            for name, (ok, why) in table.items():
                lines.append(f"  {dev:4s} {name:9s} {'available' if ok else 'unavailable: ' + why}")
        for op, per_device in report["auto"].items():
            for dev, text in per_device.items():
                lines.append(f"  {op}: auto on {dev} -> {text}")
        print("\n".join(lines))
    return report
