"""python -m bench.overhead: the host (CPU) cost of one effkern op call, up to its kernel launches.

At decoding sizes a GPU op's work takes 10-50 us, about what one Python-level op call costs the
CPU: dispatch through torch.library, autograd and autocast wrappers, the argument checks, the
backend choice and the launcher's Python (grids, split-K choice, buffers). When that cost is the
larger, eager timings measure it and not the kernel. This tool measures it without a GPU: each
op runs on tiny CPU tensors with the ``triton`` backend, whose kernels are Triton's interpreter
functions here, and every kernel launch is replaced by a stub that only counts it. What it
leaves out is Triton's own launch cost (binding the arguments, the driver call), a further few
microseconds per launch on a GPU machine. Rows: median microseconds per call over repeated
loops, one thread, next to F.linear on the same tensors as the yardstick of one torch op's call
(its tiny computation included).

Writes overhead.json and overhead.md under bench/results/cpu/ (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.runtime import interpreter

import effkern as ek

from .harness import DEFAULT_RESULTS, device_name, markdown

LAUNCHES: list[str] = []


def _stub_launch(self, *args, grid, warmup, **kwargs):
    LAUNCHES.append(self.fn.__name__)


def calls(M: int = 1, K: int = 64, N: int = 64) -> dict:
    """{name: (zero-argument call, "effkern"/"torch")} on tiny fp16 CPU tensors."""
    x, w, b = torch.randn(M, K).half(), torch.randn(N, K).half(), torch.randn(N).half()
    qw8, s8 = ek.quantize_int8(w)
    q4 = ek.quantize_int4(w, group_size=32)
    values, meta = ek.compress_24(ek.prune_24(w))
    q = torch.randn(1, 32, 1, 128).half()  # one decoding step, GQA 32/8, over 4096 keys
    k, v = torch.randn(1, 8, 4096, 128).half(), torch.randn(1, 8, 4096, 128).half()
    return {
        "F.linear": (lambda: F.linear(x, w, b), "torch"),
        "linear_gelu": (lambda: ek.linear_gelu(x, w, b), "effkern"),
        "int8_weight_only_linear": (lambda: ek.int8_weight_only_linear(x, qw8, s8, b), "effkern"),
        "int8_linear": (lambda: ek.int8_linear(x, qw8, s8, b), "effkern"),
        "int4_linear": (lambda: ek.int4_linear(x, *q4, group_size=32, bias=b), "effkern"),
        "sparse24_linear": (lambda: ek.sparse24_linear(x, values, meta, b), "effkern"),
        "flash_attention (decode)": (lambda: ek.flash_attention(q, k, v), "effkern"),
    }


def per_call_us(fn, loops: int = 7, target_s: float = 0.05) -> float:
    """Median over ``loops`` timed loops of the mean microseconds per call."""
    for _ in range(20):
        fn()
    t0 = time.perf_counter()
    fn()
    n = max(10, int(target_s / max(time.perf_counter() - t0, 1e-7)))
    samples = []
    for _ in range(loops):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(samples)


def measure(names: list[str] | None = None, target_s: float = 0.05) -> list[dict]:
    from effkern.kernels._launch import interpreted  # noqa: PLC0415

    if not interpreted():
        raise RuntimeError("bench.overhead stubs the launches of Triton's interpreter: run it in a process where "
                           "TRITON_INTERPRET=1 was set before triton was imported (python -m bench.overhead does)")
    torch.set_num_threads(1)
    real_run = interpreter.InterpretedFunction.run
    interpreter.InterpretedFunction.run = _stub_launch
    try:
        rows = []
        with ek.use_backend("triton"):
            for name, (fn, kind) in calls().items():
                if names and name not in names:
                    continue
                LAUNCHES.clear()
                fn()
                launched = list(LAUNCHES)
                rows.append({"call": name, "kind": kind, "us": per_call_us(fn, target_s=target_s),
                             "launches": launched})
        return rows
    finally:
        interpreter.InterpretedFunction.run = real_run


def main(argv: list[str]) -> int:
    # before effkern's kernels are imported (on first use): they become interpreter functions
    os.environ["TRITON_INTERPRET"] = "1"
    ap = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_RESULTS / "cpu")
    args = ap.parse_args(argv)
    rows = measure()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": device_name(), "python": platform.python_version(),
            "torch": torch.__version__, "triton": triton.__version__, "command": "python -m bench.overhead"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    body = [[r["call"], f"{r['us']:.1f}", str(len(r["launches"])) if r["kind"] == "effkern" else "",
             ", ".join(dict.fromkeys(r["launches"]))] for r in rows]
    table = markdown(["call", "host us per call", "Triton launches (stubbed)", "kernels"], body)
    head = (f"Host cost per call, {meta['date']}, {meta['cpu']}, python {meta['python']}, torch {meta['torch']}, "
            f"triton {meta['triton']}, one thread; effkern rows: backend triton with kernel launches stubbed\n"
            f"`{meta['command']}`\n\n")
    (args.out / "overhead.md").write_text(head + table)
    print(head + table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
