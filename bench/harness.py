"""The op-independent half of the benchmark: timers, ceilings, the run loop, result writers.

An op's benchmark module (bench/<family>.py) supplies:
  OP              op name, e.g. "linear_gelu"
  BASELINES       {provider: speedup column label}: "x eager" = that provider's ms / this row's ms
  ERROR_BASELINE  provider whose error vs float64 sets the tolerance (the DESIGN's "2x PyTorch")
  POLICY_BACKENDS {provider: effkern backend name} compared for --write-policy ({}: one backend, no policy)
  MODES           (optional) the modes the op is measured in, default fwd and fwd_bwd; an op
                measured in fwd is also timed in fwd_graph where a case asks for it (Case.graph)
  providers()     {name: Provider}
  cases(device, quick, shapes, dtypes) -> [Case]
  inputs(case, device) -> [Tensor]  (the op's arguments; float tensors get gradients in bwd, fwd_bwd)
  GRAD_INPUTS     (optional) positions of the inputs that get gradients there, default every float one
  reference(case, *args) -> Tensor  (run on float64 copies)
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import functools
import io
import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import effkern as ek
from effkern._backend import triton_multiplies
from effkern.testing import max_error, tolerance

# bwd: the backward alone (the forward that it needs runs before each call, outside the timed
# region), as flash-attention papers report it.
# fwd_graph: the forward again, timed as replays of a CUDA graph of many calls (GPU only, cases
# with Case.graph): the GPU time alone, as a user who captures decoding steps in CUDA graphs sees
# it. In fwd, small ops are timed through their per-call CPU cost (Python, dispatch, launches)
# whenever that exceeds their GPU time.
MODES = ("fwd", "bwd", "fwd_bwd", "fwd_graph")
GRAD_MODES = ("bwd", "fwd_bwd")  # the modes that run the backward and check gradients
REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO / "bench" / "results"


@dataclass
class Case:
    """One measured configuration of an op."""

    params: dict  # shown as columns, e.g. {"dtype": "bfloat16", "approximate": "none", "M": .., "N": .., "K": ..}
    dtype: torch.dtype
    flops: dict  # {mode: FLOPs by the DESIGN's convention}
    bytes: dict  # {mode: minimum bytes moved to and from device memory}
    providers: frozenset | None = None  # restricts which providers run here (None: all)
    # {"out" or "grad<i>" (the gradient of argument i): length of the sums behind one element}
    reductions: dict = field(default_factory=dict)
    flop_ceiling: str = "gemm_tflops"  # the ceiling its FLOPs are held against ("int8_tops": int8 tensor cores)
    # bytes of the inputs that the leanest provider reads, where providers read different subsets
    # of them (None: all); what the rotation of input copies is sized by
    input_bytes: int | None = None
    graph: bool = False  # also time the forward as CUDA-graph replays (mode fwd_graph)
    # what the GB/s column counts: the bytes of the operand whose read bounds the op at small sizes
    # (a quantized or sparse weight in effkern's format, decoding's K and V); None: the mode's bytes
    gbps_bytes: int | None = None


# GEMM cases with at most this many rows (decoding sizes) are also timed from CUDA graphs
GRAPH_MAX_ROWS = 64


@dataclass
class Provider:
    build: Callable[[Case], Callable]  # -> fn(*inputs) returning the op's output
    available: Callable[[Case, str, str], tuple[bool, str]] = lambda case, device, mode: (True, "")
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    backward: bool = True  # False: forward only (no autograd formula)
    checked: bool = True  # False: a yardstick computing another function (timed, not compared)
    # the bytes its GB/s counts where it reads that operand in another format than effkern's
    # (a bf16 weight, torch's own packing); None: Case.gbps_bytes
    gbps_bytes: Callable[[Case], int] | None = None


@contextlib.contextmanager
def _backend_and_env(backend: str, env: dict[str, str]):
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        with ek.use_backend(backend):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def effkern_provider(backend: str, build: Callable[[Case], Callable], float_dot=lambda case: True,
                     limits=lambda case, device: (True, ""), env: dict[str, str] | None = None,
                     not_capturable: str = "") -> Provider:
    """An effkern op under ``use_backend(backend)``: available where that backend runs, except
    bf16 cases that need a floating-point tl.dot (``float_dot``) under Triton's interpreter,
    which cannot do those; ``limits(case, device)`` adds the op's own (shapes, dtypes). ``env``:
    environment variables set while it runs (effkern reads its kernel switches per call), to time
    two ways of one backend in the same run. ``not_capturable``: why a CUDA graph cannot capture
    it (it is then not timed in fwd_graph)."""
    def available(case, device, mode):
        if mode == "fwd_graph" and not_capturable:
            return False, not_capturable
        if backend == "triton" and float_dot(case) and not triton_multiplies(torch.device(device), case.dtype):
            return False, "Triton's interpreter cannot do bf16 tl.dot"
        ok, why = ek.backend_available(backend, device)
        return limits(case, device) if ok else (ok, why)

    context = functools.partial(_backend_and_env, backend, env) if env else functools.partial(ek.use_backend, backend)
    return Provider(build=build, available=available, context=context)


def dense_weight_bytes(case: Case) -> int:
    """A GEMM-shaped case's weight [N, K] in the activation dtype: what bf16 cuBLAS reads of it
    (the GB/s of a dense baseline next to a quantized or sparse weight)."""
    return case.dtype.itemsize * case.params["N"] * case.params["K"]


# ---------------------------------------------------------------- command-line values

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def parse_dtypes(names: list[str] | None) -> list[torch.dtype] | None:
    """--dtypes values (bf16, fp16, fp32 and their long names) as torch dtypes; None if not given."""
    try:
        return [DTYPES[d.lower()] for d in names] if names else None
    except KeyError as exc:
        raise SystemExit(f"--dtypes: unknown dtype {exc.args[0]!r}; one of {sorted(DTYPES)}") from None


def parse_mnk(text: str) -> tuple[int, int, int]:
    """A --shapes value MxNxK (GEMM-shaped ops: input [M, K], weight [N, K])."""
    try:
        M, N, K = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is not MxNxK (e.g. 2048x16384x4096)") from None
    return M, N, K


# ---------------------------------------------------------------- device and timing

def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name() -> str:
    if device_type() == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu ({model})"


def device_slug() -> str:
    """Results folder name; CPU runs all go to "cpu" (git-ignored: interpreter timings mean nothing)."""
    if device_type() == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")


def _l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)


def input_sets(tensors: list[torch.Tensor], device: str, nbytes: int | None = None) -> int:
    """How many copies of the inputs to rotate through so that, on a GPU, one call's inputs
    have left L2 by the time they are used again (2x the L2 size in total). nbytes: what one
    call reads of them, if less than all."""
    if device != "cuda":
        return 1
    nbytes = nbytes or sum(t.numel() * t.element_size() for t in tensors)
    return max(1, min(64, math.ceil(2 * _l2_bytes() / max(nbytes, 1))))


def measure(call: Callable[[int], None], reset: Callable[[int], None], device: str,
            budget_ms: float = 100.0) -> float:
    """Median milliseconds of call(i) for i = 0, 1, 2, ... (the input set to use, modulo the
    caller's set count). reset(i) runs before each call, outside the timed region.
    The caller has run call() at least once already (compilation, autotuning)."""
    if device == "cuda":
        return _measure_cuda(call, reset, budget_ms)
    return _measure_cpu(call, reset, budget_ms * 3)


def _measure_cuda(call, reset, budget_ms):
    # estimate, so that warm-up and measurement each take about budget_ms
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(5):
        reset(i)
        call(i)
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    warm = max(1, min(200, int(budget_ms / 4 / estimate)))
    for i in range(5, 5 + warm):
        reset(i)
        call(i)
    reps = max(10, min(1000, int(budget_ms / estimate)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    # the input sets' rotation goes on where the warm-up left it (restarting at 0 would reuse
    # the sets the last warm-up calls read, still in L2)
    for i, (s, e) in enumerate(events, start=5 + warm):
        reset(i)
        s.record()
        call(i)
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


# calls captured in one graph, at least (whole rotations of the input sets): a replay's launch cost is shared
GRAPH_CALLS = 16


def measure_graph(call: Callable[[int], torch.Tensor], n_sets: int, budget_ms: float = 100.0):
    """Median milliseconds per call of call(0), call(1), ... captured in one CUDA graph and
    replayed, and the output that call(0) writes in each replay. call(i) must be a forward
    with no autograd; it has run at least once already (compilation, autotuning)."""
    # torch's rule for capture: warm up on a side stream first (lazy initialisations, caches)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(n_sets):
            call(i)
    torch.cuda.current_stream().wait_stream(side)
    # a whole number of rotations per replay: with a partial one, the next replay's first calls
    # reuse the input sets its last calls read (still in L2)
    n_calls = n_sets * math.ceil(GRAPH_CALLS / n_sets)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        first = call(0)
        for i in range(1, n_calls):
            call(i)
    _poison(first)  # capture ran nothing: what the error check reads must come from the replays
    ms = measure(lambda i: graph.replay(), lambda i: None, "cuda", budget_ms) / n_calls
    return ms, first


def _measure_cpu(call, reset, budget_ms):
    # the Triton interpreter takes seconds per call: stop after the time budget, at least 1, at most 20 reps
    samples: list[float] = []
    while len(samples) < 20 and (not samples or sum(samples) < budget_ms):
        reset(len(samples))
        t0 = time.perf_counter()
        call(len(samples))
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def ceilings(device: str) -> dict:
    """The card's measured matmul rates (float and int8) and copy bandwidth: the denominators of
    "% GEMM" and the floor."""
    if device == "cuda":
        n, dtype, copy_elems = 8192, torch.bfloat16, 2**28  # 1 GiB of float32 per copy side
    else:
        n, dtype, copy_elems = 512, torch.float32, 2**24  # small: a 2-core machine, seconds matter
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    mm_ms = measure(lambda i: torch.matmul(a, b), lambda i: None, device)
    del a, b
    # B as the transpose of a row-major [N, K] (a weight's layout, as torch-int-mm passes it): cuBLAS
    # has no int8 kernel for two row-major operands on some GPUs and CUDA versions (PyTorch's own
    # _int_mm test skips that case on CUDA 13). A failure leaves the int8 rate unknown, not the run.
    qa = torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8)
    qb = torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8).t()
    int8_method = f"torch._int_mm int8 {n}x{n}x{n} (B column-major), random data, median"
    try:
        torch._int_mm(qa, qb)
        int8_tops = 2 * n**3 / (measure(lambda i: torch._int_mm(qa, qb), lambda i: None, device) * 1e-3) / 1e12
    except RuntimeError as exc:
        first_line = (str(exc).splitlines() or [""])[0][:120]
        int8_tops, int8_method = math.nan, f"not measured: torch._int_mm raised {first_line}"
    del qa, qb
    src = torch.randn(copy_elems, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_ms = measure(lambda i: dst.copy_(src), lambda i: None, device)
    nbytes = 2 * src.numel() * src.element_size()  # read + write
    del src, dst
    dname = str(dtype).removeprefix("torch.")
    return {
        "gemm_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
        "gemm_method": f"torch.matmul {dname} {n}x{n}x{n}, random data, median",
        "int8_tops": int8_tops,
        "int8_method": int8_method,
        "copy_gbps": nbytes / (copy_ms * 1e-3) / 1e9,
        "copy_method": f"Tensor.copy_ of {nbytes // 2 // 2**20} MiB, counting read + write, median",
    }


# ---------------------------------------------------------------- the run loop

@dataclass
class Run:
    op: str
    device: str
    ceil: dict
    baselines: dict
    rows: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)  # (provider, reason) -> count


def _poison(t: torch.Tensor, spare: tuple = ()) -> None:
    """Fill t with NaN (-1 if an integer tensor), unless it is a view of one of spare (inputs)."""
    if t.numel() and not any(t.untyped_storage().data_ptr() == s.untyped_storage().data_ptr() for s in spare):
        t.detach().fill_(math.nan if t.is_floating_point() else -1)


def _errors(fn, args, g, ref, ref_grads: dict, mode) -> dict:
    """Max abs error of the output ("out") and, in the gradient modes, of each float argument's
    gradient ("grad<i>", i its position; inf where the provider left it without one)."""
    for t in args:
        if t.grad is not None:  # an unchecked provider's warm-up leaves its gradients here
            _poison(t.grad)
        t.grad = None
    out = fn(*args)
    errs = {"out": max_error(out, ref)}
    if mode in GRAD_MODES:
        out.backward(g)
        errs.update({f"grad{i}": math.inf if args[i].grad is None else max_error(args[i].grad, r)
                     for i, r in ref_grads.items()})
    # then poisoned: the next provider's output, often given the same memory, must not find this
    # right answer on the same inputs there where it writes nothing
    for t in [out, *(args[i].grad for i in ref_grads if args[i].grad is not None)]:
        _poison(t, spare=(*args, g))
    for t in args:
        t.grad = None
    return errs


def _tolerance(case: Case, base: dict, ref: torch.Tensor, ref_grads: dict) -> dict:
    # effkern.testing's rule, the tests' own: ~2x PyTorch's error in the same precision + a floor
    scale = {"out": ref.abs().max().item(), **{f"grad{i}": r.abs().max().item() for i, r in ref_grads.items()}}
    return {k: tolerance(v, scale[k], case.dtype, case.reductions.get(k, 1)) for k, v in base.items()}


def worst_gradient(row: dict) -> str | None:
    """The key of the row's gradient error closest to (or furthest past) its tolerance."""
    grads = [k for k in row.get("errors", {}) if k.startswith("grad")]
    tol = row.get("tolerance", {})
    return max(grads, key=lambda k: row["errors"][k] / max(tol.get(k, 0.0), 1e-30), default=None)


def run_case(run: Run, mod, case: Case, mode: str, providers: dict) -> None:
    device = run.device
    wants_grad = mode in GRAD_MODES
    graphed = mode == "fwd_graph"
    counted = "fwd" if graphed else mode  # the FLOPs and bytes of the forward
    timed = {}
    for name, prov in providers.items():
        if case.providers is not None and name not in case.providers:
            continue
        try:
            ok, why = prov.available(case, device, mode)
        except Exception as exc:  # a provider that cannot even say (e.g. effkern.kernels not installed)
            ok, why = False, f"availability check failed: {type(exc).__name__}: {exc}"
        if ok and wants_grad and not prov.backward:
            ok, why = False, "no autograd formula: forward only"
        if ok:
            timed[name] = prov
        else:
            run.skipped[(name, why)] = run.skipped.get((name, why), 0) + 1
    if not timed:  # nothing runs here: spare the float64 reference
        return
    grad_inputs = getattr(mod, "GRAD_INPUTS", None)
    base = [t.requires_grad_(wants_grad and t.is_floating_point() and (grad_inputs is None or i in grad_inputs))
            for i, t in enumerate(mod.inputs(case, device))]
    # float64 reference: the output, and every float argument's gradient for a fixed random output gradient
    ref_args = [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in base]
    ref = mod.reference(case, *ref_args)
    g = torch.randn(ref.shape, device=device, dtype=case.dtype)
    ref_grads = {}
    if wants_grad:
        ref.backward(g.double())
        ref_grads = {i: t.grad for i, t in enumerate(ref_args) if t.requires_grad}
    ref = ref.detach()
    del ref_args

    n_sets = input_sets(base + ([g] if wants_grad else []), device, case.input_bytes)
    sets = [base] + [[t.detach().clone().requires_grad_(t.requires_grad) for t in base] for _ in range(n_sets - 1)]
    grads = [g] + [g.clone() for _ in range(n_sets - 1)]

    baseline = mod.providers()[mod.ERROR_BASELINE]  # even when it is not among those timed
    with baseline.context():
        tol = _tolerance(case, _errors(baseline.build(case), base, g, ref, ref_grads, mode), ref, ref_grads)

    # bwd: the forward run just before each timed backward leaves the weight, the inputs and the
    # saved tensors in L2, which a training step's backward (layers later) does not find there:
    # writing 2x L2 of scratch after the forward evicts them, outside the timed region
    evict = None
    if mode == "bwd" and device == "cuda":
        evict = torch.empty(2 * _l2_bytes() // 4, dtype=torch.int32, device=device)

    def calls(fn):
        pending = []  # bwd: the output whose backward the next call runs

        def reset(i):
            for t in sets[i % n_sets]:
                t.grad = None
            if mode == "bwd":
                pending.append(fn(*sets[i % n_sets]))  # the forward, outside the timed region
                if evict is not None:
                    evict.zero_()

        def call(i):
            if mode == "bwd":
                return pending.pop().backward(grads[i % n_sets])
            out = fn(*sets[i % n_sets])
            if wants_grad:
                out.backward(grads[i % n_sets])
            return out

        return reset, call

    # every provider's check before any provider is timed: a timed call's output on the checked
    # inputs is not poisoned when freed, and a later provider's output in the same memory would
    # show that right answer wherever it writes nothing
    built, failed = {}, {}
    for name, prov in timed.items():
        try:
            with prov.context():
                fn = prov.build(case)
                if prov.checked:
                    errs = _errors(fn, base, g, ref, ref_grads, mode)  # also the warm-up (compile, autotune)
                else:
                    errs = {}
                    reset, call = calls(fn)
                    reset(0)
                    call(0)
            built[name] = fn, errs
        except Exception as exc:
            failed[name] = exc

    ms_by_provider = {}
    case_rows = []
    for name, prov in timed.items():
        row = {"op": run.op, "mode": mode, "params": case.params, "provider": name}
        try:
            if name in failed:
                raise failed[name]
            fn, errs = built[name]
            with prov.context():
                reset, call = calls(fn)
                # one call on every input copy before any is timed: what a provider derives from
                # its inputs on first sight (the int4/2:4 CUDA backends' re-laid-out weight) is
                # then made here, not inside a timed call
                for i in range(1, n_sets):
                    reset(i)
                    call(i)
                if graphed:
                    ms, replayed = measure_graph(call, n_sets)
                    if prov.checked:  # what the replays wrote, not only what the eager call did
                        errs = {"out": max_error(replayed, ref)}
                    del replayed
                else:
                    ms = measure(call, reset, device)
        except Exception as exc:  # a provider failing is a result to report, not a reason to stop
            row.update(status="ERROR", note=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
            print(f"  ERROR {name} {mode} {case.params}: {row['note']}", flush=True)
            case_rows.append(row)
            continue
        tflops = case.flops[counted] / (ms * 1e-3) / 1e12
        gbps_bytes = prov.gbps_bytes(case) if prov.gbps_bytes else case.gbps_bytes or case.bytes[counted]
        gbps = gbps_bytes / (ms * 1e-3) / 1e9
        rate = run.ceil[case.flop_ceiling]
        floor_ms = 1e3 * max(case.flops[counted] / (rate * 1e12), case.bytes[counted] / (run.ceil["copy_gbps"] * 1e9))
        row.update(
            ms=ms,
            tflops=tflops,
            pct_gemm=100 * tflops / rate,
            gbps=gbps,
            pct_copy=100 * gbps / run.ceil["copy_gbps"],
            floor_ms=floor_ms,
            pct_floor=100 * floor_ms / ms,
            err=max(errs.values()) if errs else None,
            errors=errs,
            tolerance=tol,
            status=("ok" if all(errs[k] <= tol[k] for k in errs) else "FAIL") if prov.checked else "timing only",
            input_sets=n_sets,
        )
        ms_by_provider[name] = ms
        case_rows.append(row)
    for row in case_rows:
        if "ms" in row:
            row["speedup"] = {label: ms_by_provider[b] / row["ms"] for b, label in run.baselines.items()
                              if b in ms_by_provider}
    run.rows.extend(case_rows)


def run_op(mod, cases: list[Case], device: str, ceil: dict, providers, modes,
           checkpoint: Callable[[Run], None]) -> Run:
    """Run every case; checkpoint(run) after each, so a run cut short by a time limit leaves its rows."""
    run = Run(op=mod.OP, device=device, ceil=ceil, baselines=mod.BASELINES)
    chosen = {k: v for k, v in mod.providers().items() if providers is None or k in providers}
    op_modes = getattr(mod, "MODES", ("fwd", "fwd_bwd"))
    if "fwd" in op_modes:
        op_modes = (*op_modes, "fwd_graph")
    for mode in modes:
        if mode not in op_modes:
            print(f"{run.op}: {mode} not measured (this op's modes: {', '.join(op_modes)})", flush=True)
    if "fwd_graph" in modes and device != "cuda":
        print(f"{run.op}: fwd_graph not measured (CUDA graphs need a GPU)", flush=True)

    def measured(case: Case, mode: str) -> bool:
        return mode in op_modes and (mode != "fwd_graph" or (case.graph and device == "cuda"))

    for case in cases:
        for mode in (m for m in modes if measured(case, m)):
            t0 = time.perf_counter()
            run_case(run, mod, case, mode, chosen)
            print(f"{run.op} {mode} {case.params}: {time.perf_counter() - t0:.1f} s", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            checkpoint(run)
    return run


# ---------------------------------------------------------------- writers

def fmt(x, digits=3) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def table_rows(rows: list, labels: list) -> tuple[list, list]:
    """Header and string cells for the human-readable tables (markdown, stdout)."""
    params = list(rows[0]["params"]) if rows else []
    header = ["op", "mode", *params, "provider", "ms", "TFLOP/s", "% GEMM", "GB/s", "% copy", "% floor", *labels,
              "max err", "ok"]
    body = []
    for r in rows:
        sp = r.get("speedup", {})
        body.append([r["op"], r["mode"], *(fmt(r["params"][p]) for p in params), r["provider"],
                     fmt(r.get("ms"), 4), fmt(r.get("tflops")), fmt(r.get("pct_gemm"), 2), fmt(r.get("gbps")),
                     fmt(r.get("pct_copy"), 2), fmt(r.get("pct_floor"), 2), *(fmt(sp.get(lb)) for lb in labels),
                     fmt(r.get("err"), 2), r["status"] if r["status"] != "ERROR" else f"ERROR: {r['note']}"])
    return header, body


def markdown(header: list, body: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def run_meta(run: Run, command: str) -> dict:
    import triton  # noqa: PLC0415  (only for its version; the bench runs without effkern's Triton path too)

    return {
        "op": run.op,
        "device": device_name(),
        "device_type": run.device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": command,
        "ceilings": run.ceil,
        "baselines": run.baselines,
    }


def write_atomically(path: Path, text: str) -> None:
    """path's new content, or its old one if the process is stopped while writing (a time limit's
    SIGTERM): a truncated policy file would break every auto call on that GPU."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(run: Run, out: Path, command: str, plot: bool = True) -> str:
    """Write <op>.json/.csv/.md (and .png) under out; return the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    meta = run_meta(run, command)
    skipped = [{"provider": p, "reason": r, "count": n} for (p, r), n in run.skipped.items()]
    write_atomically(out / f"{run.op}.json", json.dumps({**meta, "rows": run.rows, "skipped": skipped}, indent=1) + "\n")

    labels = list(run.baselines.values())
    with io.StringIO(newline="") as f:
        params = list(run.rows[0]["params"]) if run.rows else []
        w = csv.writer(f)
        # err_grad/tol_grad: the gradient nearest its tolerance (the JSON has every gradient's)
        w.writerow(["op", "mode", *params, "provider", "ms", "tflops", "pct_gemm", "gbps", "pct_copy", "floor_ms",
                    "pct_floor", *labels, "err_out", "err_grad", "tol_out", "tol_grad", "status", "note"])
        for r in run.rows:
            e, t, sp = r.get("errors", {}), r.get("tolerance", {}), r.get("speedup", {})
            worst = worst_gradient(r)
            w.writerow([r["op"], r["mode"], *(r["params"][p] for p in params), r["provider"], r.get("ms"),
                        r.get("tflops"), r.get("pct_gemm"), r.get("gbps"), r.get("pct_copy"), r.get("floor_ms"),
                        r.get("pct_floor"), *(sp.get(lb) for lb in labels), e.get("out"), e.get(worst),
                        t.get("out"), t.get(worst), r["status"], r.get("note", "")])
        write_atomically(out / f"{run.op}.csv", f.getvalue())

    c = run.ceil
    table = markdown(*table_rows(run.rows, labels))
    head = (f"{run.op} on {meta['device']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}\n"
            f"ceilings: GEMM {fmt(c['gemm_tflops'])} TFLOP/s ({c['gemm_method']}); "
            f"int8 GEMM {fmt(c['int8_tops'])} TOPS ({c['int8_method']}); "
            f"copy {fmt(c['copy_gbps'])} GB/s ({c['copy_method']})\n`{command}`\n\n")
    write_atomically(out / f"{run.op}.md", head + table)
    if plot:
        _plot(run, out / f"{run.op}.png")
    return head + table


def _plot(run: Run, path: Path) -> None:
    try:
        import matplotlib  # noqa: PLC0415  (optional: the PNG is a convenience)
    except ImportError:
        print(f"note: matplotlib is not installed, {path.name} not written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    modes = [m for m in MODES if any(r["mode"] == m and "ms" in r for r in run.rows)]
    if not modes:
        return
    fig, axes = plt.subplots(len(modes), 1, figsize=(14, 4.5 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        rows = [r for r in run.rows if r["mode"] == mode and "ms" in r]
        cases = list(dict.fromkeys(" ".join(map(str, r["params"].values())) for r in rows))
        provs = list(dict.fromkeys(r["provider"] for r in rows))
        width = 0.8 / len(provs)
        for j, p in enumerate(provs):
            val = {" ".join(map(str, r["params"].values())): r["tflops"] for r in rows if r["provider"] == p}
            ax.bar([i + j * width for i in range(len(cases))], [val.get(c, 0) for c in cases], width, label=p)
        ax.axhline(run.ceil["gemm_tflops"], color="k", ls="--", lw=1, label="GEMM ceiling")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")  # M spans 1..8192: rates span four orders of magnitude
        ax.set_xlabel(" ".join(rows[0]["params"]), fontsize=8)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{run.op} {mode} ({device_name()})")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_policy(run: Run, backends: dict, command: str) -> Path | None:
    """Record, per measured shape, the faster correct effkern backend for each mode (read by backend
    "auto"), where more than one backend ran. Only this card's entry in
    effkern/policies/<op>.json is replaced."""
    if not backends:  # one effkern backend: nothing to choose
        return None
    if run.device != "cuda":
        print("--write-policy: skipped, policies are per GPU and this run is on the CPU")
        return None
    ran: dict = {}  # (shape, mode) -> the backends that ran there, correct or not
    times: dict = {}  # (shape, mode) -> {backend: ms} of the correct ones
    for r in run.rows:
        if r["provider"] not in backends:
            continue
        where, backend = (tuple(r["params"].items()), r["mode"]), backends[r["provider"]]
        ran.setdefault(where, set()).add(backend)
        if r["status"] == "ok":
            ms = times.setdefault(where, {})
            ms[backend] = min(r["ms"], ms.get(backend, r["ms"]))
    best: dict = {}
    for (key, mode), ms in times.items():
        # a backend that ran alone (the others unavailable there) beat nothing: no entry, and
        # auto keeps its default for such shapes; one that failed or raised there still loses
        if len(ran[(key, mode)]) > 1:
            best.setdefault(key, {})[mode] = min(ms, key=ms.get)
    entries = [{**dict(k), **modes} for k, modes in best.items()]
    path = REPO / "effkern" / "policies" / f"{run.op}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc = {"version": 1, "op": run.op, "devices": doc.get("devices", {})}
    meta = run_meta(run, command)
    doc["devices"][meta["device"]] = {
        "generated": meta["date"], "torch": meta["torch"], "triton": meta["triton"],
        "command": command, "entries": entries,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(doc, indent=1) + "\n")
    return path
