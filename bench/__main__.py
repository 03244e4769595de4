"""python -m bench [ops...] [options]   |   python -m bench report"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
from pathlib import Path

import torch

# op name -> module; a new family adds bench/<family>.py and one line here
OPS = {
    "linear_gelu": "bench.linear_gelu",
    "int8": "bench.int8",
    "int4": "bench.int4",
    "sparse24": "bench.sparse24",
    "sparse24_int8": "bench.sparse24_int8",
    "attention": "bench.attention",
}


def _csv(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def main(argv: list[str]) -> int:
    if argv[:1] == ["report"]:
        from . import report  # noqa: PLC0415

        return report.main(argv[1:])

    if not torch.cuda.is_available():
        # effkern's Triton backend on CPU tensors runs in the interpreter, which Triton only
        # switches on if this is set before effkern's kernels are imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # one thread: with several, one descheduled OpenMP worker stalls a whole op (seen: 8 ms
        # for a 3x80x96 GEMM while a compiler ran); CPU numbers are a smoke test, not a result
        torch.set_num_threads(1)
    from . import harness  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m bench", description="effkern kernel benchmarks. "
                                 "`python -m bench report` regenerates the README table from bench/results/.")
    ap.add_argument("ops", nargs="*", help=f"ops to run (default all: {', '.join(OPS)})")
    ap.add_argument("--quick", action="store_true",
                    help="the small suite (GPU: linear_gelu about 3 minutes on an H100; int8 not yet timed there)")
    ap.add_argument("--shapes", type=_csv,
                    help="comma-separated shapes in the op's notation (linear_gelu, int8, int4, sparse24: MxNxK; "
                         "attention: BxHxSqxSkvxD)")
    ap.add_argument("--dtypes", type=_csv, help="comma-separated, e.g. bf16,fp16")
    ap.add_argument("--providers", type=_csv, help="comma-separated provider names (default all)")
    ap.add_argument("--modes", type=_csv, default=list(harness.MODES),
                    help="fwd,bwd,fwd_bwd,fwd_graph (default all, each where the op is measured in it; bwd: the "
                         "backward alone, attention and sparse24 (its input gradient); fwd_graph: the forward "
                         "timed as CUDA-graph replays, GPU only, for the decode-sized cases)")
    ap.add_argument("--out", type=Path, help="results folder (default bench/results/<device>)")
    ap.add_argument("--write-policy", action="store_true",
                    help="record the faster effkern backend per shape in effkern/policies/<op>.json (GPU only)")
    args = ap.parse_args(argv)
    unknown = [o for o in args.ops if o not in OPS]
    bad_modes = [m for m in args.modes if m not in harness.MODES]
    if unknown or bad_modes:
        ap.error(f"unknown op(s) {unknown} (known: {list(OPS)})" if unknown else f"unknown mode(s) {bad_modes}")

    device = harness.device_type()
    mods = {op: importlib.import_module(OPS[op]) for op in args.ops or OPS}
    known = {p for mod in mods.values() for p in mod.providers()}
    if set(args.providers or ()) - known:
        ap.error(f"unknown provider(s) {sorted(set(args.providers) - known)}; known: {sorted(known)}")
    cases = {op: mod.cases(device, args.quick, args.shapes, args.dtypes) for op, mod in mods.items()}
    out = args.out or harness.DEFAULT_RESULTS / harness.device_slug()
    command = shlex.join(["python", "-m", "bench", *argv])
    t0 = time.perf_counter()
    ceil = harness.ceilings(device)
    print(f"{harness.device_name()}: GEMM {ceil['gemm_tflops']:.3g} TFLOP/s, int8 GEMM {ceil['int8_tops']:.3g} TOPS, "
          f"copy {ceil['copy_gbps']:.3g} GB/s "
          f"(measured in {time.perf_counter() - t0:.1f} s)", flush=True)

    tables, bad = [], 0
    for op, mod in mods.items():
        run = harness.run_op(mod, cases[op], device, ceil, args.providers, args.modes,
                             checkpoint=lambda r: harness.write_results(r, out, command, plot=False))
        for (provider, reason), n in run.skipped.items():
            print(f"skipped {provider} ({n} case{'s' * (n > 1)}): {reason}")
        tables.append(harness.write_results(run, out, command))
        bad += sum(r["status"] in ("FAIL", "ERROR") for r in run.rows)
        if args.write_policy:
            path = harness.write_policy(run, mod.POLICY_BACKENDS, command)
            if path:
                print(f"policy written: {path}")
    print(f"\nresults in {out} ({time.perf_counter() - t0:.0f} s)\n")
    print("\n".join(tables))
    if bad:
        print(f"{bad} row(s) FAIL or ERROR")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
