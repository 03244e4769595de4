"""A stand-in for torch.cuda's graph API on CPU tensors, so that the code capturing and replaying
CUDA graphs (op_checks.assert_cuda_graph_replays_like_eager, bench.harness.measure_graph) is
itself tested without a GPU.

Capture records every op run inside ``torch.cuda.graph(g)`` (through a TorchDispatchMode: aten
ops, effkern's custom ops, and those the autograd engine runs for a backward) with the tensors
it read and returned. Replay runs them again in order and writes each result into the tensor
the capture returned, as a real graph re-runs its kernels on the same memory. What happened
outside ops during the capture (Python arithmetic, a value read to the host, a tensor cached in
Python) is not replayed, as on a GPU. A tensor made from host data during the capture
(torch.tensor, torch.as_tensor: a host-to-device copy that waits for the stream, which CUDA
refuses while capturing) raises, as it does on a GPU.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _Recorder(TorchDispatchMode):
    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.log.append((func, args, kwargs, out))
        return out


class FakeCUDAGraph:
    def __init__(self):
        self.log: list = []

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs, out in self.log:
                new = func(*args, **kwargs)
                for old, fresh in zip(tree_leaves(out), tree_leaves(new), strict=True):
                    if isinstance(old, torch.Tensor) and old is not fresh:
                        old.copy_(fresh)


class _FakeStream:
    def wait_stream(self, other) -> None:
        pass


_capturing = [False]


def _refused_while_capturing(name: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"torch.{name} of host data during a CUDA graph capture: a synchronizing "
                           f"host-to-device copy, which CUDA does not permit while a stream is capturing")

    return refuse


@contextlib.contextmanager
def _graph(g: FakeCUDAGraph):
    _capturing[0] = True
    made_from_host = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}
    for name in made_from_host:
        setattr(torch, name, _refused_while_capturing(name))
    try:
        with _Recorder(g.log):
            yield
    finally:
        for name, real in made_from_host.items():
            setattr(torch, name, real)
        _capturing[0] = False


def install(monkeypatch) -> None:
    """Replace torch.cuda's streams and graphs with the CPU stand-ins for one test."""
    stream = _FakeStream()
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: _FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeCUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", _graph)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: _capturing[0])
