"""Run by tests/test_device_handling.py in a subprocess (it patches torch.cuda): every Triton launch
of effkern's kernels with all tensors on a (fake) cuda:1 while the (fake) current device is cuda:0.
Records, at each launch, the fake current device and the devices of the tensor / descriptor
arguments. No GPU, no compile: launches are intercepted.

Prints a JSON report. ``control`` as argument: on_device made a no-op, so launches must be flagged.
"""
import contextlib
import json
import os
import sys
import warnings

warnings.simplefilter("ignore")

os.environ.pop("TRITON_INTERPRET", None)
import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.runtime.jit import KernelInterface
from triton.tools.tensor_descriptor import TensorDescriptor

state = {"current": 0}
queries = []   # (what, argument)
launches = []  # (kernel, current, arg devices)


class FakeDeviceCtx:
    def __init__(self, d):
        self.idx = torch.device(d).index if d is not None else None

    def __enter__(self):
        self.prev = state["current"]
        if self.idx is not None:
            state["current"] = self.idx

    def __exit__(self, *a):
        state["current"] = self.prev


class Props:
    multi_processor_count = 132


def fake_props(d=None):
    queries.append(("get_device_properties", d))
    return Props()


def fake_cap(d=None):
    queries.append(("get_device_capability", d))
    return (9, 0)


torch.cuda.current_device = lambda: state["current"]
torch.cuda.device = FakeDeviceCtx
torch.cuda.get_device_properties = fake_props
torch.cuda.get_device_capability = fake_cap
torch.cuda.get_device_name = lambda d=None: (queries.append(("get_device_name", d)), "NVIDIA H100")[1]


def kname(k):
    while not hasattr(k, "__name__") or isinstance(k, KernelInterface) and hasattr(k, "fn") and not hasattr(k, "src"):
        k = k.fn
    return k.__name__


def fake_getitem(self, grid):
    def run(*args, **kwargs):
        devs = set()
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                devs.add(str(a.device))
            elif isinstance(a, TensorDescriptor):
                devs.add(str(a.base.device))
        launches.append((kname(self), state["current"], devs))
    return run


KernelInterface.__getitem__ = fake_getitem

from effkern.kernels import _launch, _splitk, _tma, attention, int4, int8, linear_gelu, sparse24  # noqa: E402

assert not _launch.interpreted()
if len(sys.argv) > 1 and sys.argv[1] == "control":
    for m in (_launch, _splitk, attention, int8):
        m.on_device = lambda d: contextlib.nullcontext()

DEV = "cuda:1"


def run_all():
    f16 = dict(dtype=torch.float16, device=DEV)
    for M, K in ((8, 256), (8, 8192), (200, 256)):
        x = torch.empty(M, K, **f16)
        w = torch.empty(128, K, **f16)
        b = torch.empty(128, **f16)
        y, d = linear_gelu.linear_gelu_fwd(x, w, b, "none", True, True)
        linear_gelu.linear_gelu_bwd(y, x, w, d, [True, True, True])
        linear_gelu.linear_gelu_fwd(x.float(), w.float(), None, "tanh", True, False)
        xq, xs = int8.quantize_rows_int8(x)
        wq = torch.empty(128, K, dtype=torch.int8, device=DEV)
        ws = torch.empty(128, dtype=torch.float32, device=DEV)
        int8.int8_matmul(xq, wq.t(), xs, ws, b, torch.float16)
        int8.int8_matmul(xq, wq.t(), None, None, None, torch.int32)
        int8.int8_matmul(x, wq.t(), None, ws, b, torch.float16, quantize_a=True)
        int8.int8_matmul(x, wq.t(), None, ws, b, torch.float16)
        int8.int8_matmul(y, wq, None, ws, None, torch.float16, scale_k=True)
        qw = torch.empty(128, K // 8, dtype=torch.int32, device=DEV)
        sc = torch.empty(128, K // 128, **f16)
        int4.int4_matmul(x, qw, sc, sc, 128, b)
        vals = torch.empty(128, K // 2, **f16)
        meta = torch.empty(128, K // 8, dtype=torch.uint8, device=DEV)
        sparse24.sparse24_matmul(x, vals, meta, b)
        sparse24.sparse24_int8_matmul(xq, xs, vals.to(torch.int8), meta, ws, b, torch.float16)
        sparse24.sparse24_dgrad(y, vals, meta)
    for Sq, splits in ((1, None), (1, 1), (4, 3), (300, None)):
        q = torch.empty(2, 4, Sq, 64, **f16)
        k = torch.empty(2, 2, 512, 64, **f16)
        out, lse = attention.flash_attn_fwd(q, k, k, True, 0.125, -1, -1, 0.0, splits)
        attention.flash_attn_bwd(out, lse, q, k, k, out, lse, True, 0.125, -1, -1, 0.0)


with FakeTensorMode(allow_non_fake_inputs=True):
    for tune in ("1", "0"):
        os.environ["EFFKERN_TRITON_AUTOTUNE"] = tune
        run_all()

bad = [[k, cur, sorted(devs)] for k, cur, devs in launches if devs - {f"cuda:{cur}"}]
print(json.dumps({"kernels": sorted({k for k, _, _ in launches}), "launches": len(launches), "bad": bad,
                  "queries": sorted({(w, str(a)) for w, a in queries})}))
