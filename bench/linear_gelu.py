"""linear_gelu benchmark: effkern's backends against what a PyTorch user would pick instead.

Shapes are (M, N, K): input [M, K], weight [N, K], bias [N], output [M, N]. Always with bias.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

import effkern as ek
from effkern.linear_gelu import linear_gelu_reference

from .harness import GRAPH_MAX_ROWS, Case, Provider, effkern_provider, parse_dtypes, parse_mnk

OP = "linear_gelu"
BASELINES = {"torch-eager": "x eager", "torch-addmm-act": "x addmm_act", "torch-compile": "x compile",
             "torch-linear": "x gemm"}
ERROR_BASELINE = "torch-eager"
POLICY_BACKENDS = {"effkern-triton": "triton", "effkern-cuda": "cuda"}


GPU_M = (1, 16, 128, 2048, 8192)
GPU_KN = ((4096, 16384), (16384, 4096), (1024, 4096), (768, 3072))
GPU_QUICK_M = (16, 2048, 8192)
GPU_QUICK_KN = ((4096, 16384), (16384, 4096))
EFFKERN_AND_EAGER = frozenset({"effkern-triton", "effkern-triton-no-tma", "effkern-cuda", "torch-eager",
                               "torch-linear"})
CPU_M, CPU_KN = (1, 3, 64, 128), ((96, 80), (256, 512))
CPU_QUICK_M, CPU_QUICK_KN = (3, 64), ((96, 80),)


def _case(dtype: torch.dtype, approximate: str, M: int, N: int, K: int, providers=None) -> Case:
    s = torch.empty((), dtype=dtype).element_size()
    fwd = s * (M * K + N * K + N + M * N)  # read input, weight, bias; write output
    # backward floor: read grad_out and the pre-activation, read input and weight again,
    # write grad_input, grad_weight, grad_bias
    bwd = s * (2 * M * N + 2 * (M * K + N * K) + N)
    return Case(params={"dtype": str(dtype).removeprefix("torch."), "approximate": approximate, "M": M, "N": N, "K": K},
                dtype=dtype, flops={"fwd": 2 * M * N * K, "fwd_bwd": 3 * 2 * M * N * K},  # + grad_input, grad_weight
                bytes={"fwd": fwd, "fwd_bwd": fwd + bwd}, providers=providers,
                # y sums over K; grad_input over N; grad_weight and grad_bias over M
                reductions={"out": K, "grad0": N, "grad1": M, "grad2": M},
                graph=M <= GRAPH_MAX_ROWS)


def cases(device: str, quick: bool, shapes: list[str] | None, dtypes: list[str] | None) -> list[Case]:
    dts = parse_dtypes(dtypes)
    if shapes:  # explicit shapes: every provider, both approximations
        mnk = [parse_mnk(s) for s in shapes]
        dts = dts or ([torch.bfloat16] if device == "cuda" else [torch.float32])
        return [_case(d, a, *s) for d in dts for a in ("none", "tanh") for s in mnk]
    if device == "cpu":  # the interpreter has no bf16 tl.dot: fp32 and fp16 only
        ms, kns = (CPU_QUICK_M, CPU_QUICK_KN) if quick else (CPU_M, CPU_KN)
        dts = dts or [torch.float32, torch.float16]
        return [_case(d, a, M, N, K) for d in dts for a in ("none", "tanh") for (K, N) in kns for M in ms]
    dts = dts or [torch.bfloat16]
    if not quick:
        return [_case(d, a, M, N, K) for d in dts for a in ("none", "tanh") for (K, N) in GPU_KN for M in GPU_M]
    # quick: tanh with every baseline (torch's fused addmm+GELU is tanh-only on CUDA), torch.compile
    # only at the largest shape, run last (max-autotune takes tens of seconds per shape: a time
    # limit then cuts only it); "none" for the effkern backends and eager, so the policy covers both
    no_compile = frozenset(providers()) - {"torch-compile"}
    out, last = [], []
    for d, (K, N), M in itertools.product(dts, GPU_QUICK_KN, GPU_QUICK_M):
        largest = M == max(GPU_QUICK_M) and (K, N) == GPU_QUICK_KN[0]
        (last if largest else out).append(_case(d, "tanh", M, N, K, None if largest else no_compile))
        out.append(_case(d, "none", M, N, K, EFFKERN_AND_EAGER))
    return out + last


def inputs(case: Case, device: str) -> list[torch.Tensor]:
    p, dt = case.params, case.dtype
    # nn.Linear-like scale keeps the pre-activation O(1), where GELU is not linear
    x = torch.randn(p["M"], p["K"], device=device, dtype=dt)
    w = torch.randn(p["N"], p["K"], device=device, dtype=dt) * p["K"] ** -0.5
    b = torch.randn(p["N"], device=device, dtype=dt)
    return [x, w, b]


def reference(case: Case, x, w, b):
    return linear_gelu_reference(x, w, b, approximate=case.params["approximate"])


def _linear_gelu(case: Case):
    return functools.partial(ek.linear_gelu, approximate=case.params["approximate"])


def _effkern(backend: str) -> Provider:
    return effkern_provider(backend, _linear_gelu)


def _tma_rows(case: Case, device: str):
    # where the TMA forward can run at all (fewer rows always take the plain kernel); asked only
    # where the triton backend is available, so its kernels import
    from effkern.kernels.linear_gelu import TMA_MIN_ROWS

    if case.params["M"] < TMA_MIN_ROWS:
        return False, f"M < {TMA_MIN_ROWS}: the plain kernel either way"
    return True, ""


def _eager(case: Case):
    approximate = case.params["approximate"]
    return lambda x, w, b: F.gelu(F.linear(x, w, b), approximate=approximate)


def _addmm_act_available(case, device, mode):
    if not hasattr(torch, "_addmm_activation"):
        return False, "torch._addmm_activation does not exist in this torch"
    # aten: the cuBLASLt GELU epilogue (and its fallback) is the tanh form; the CPU kernel is exact
    native = "tanh" if device == "cuda" else "none"
    if case.params["approximate"] != native:
        return False, f"torch._addmm_activation on {device} computes approximate={native!r} only"
    return True, ""


def _compile(case: Case):
    torch._dynamo.reset()  # one compiled graph per shape; stays clear of the recompile limit
    return torch.compile(_eager(case), mode="max-autotune-no-cudagraphs", dynamic=False)


def _gpu_only(case, device, mode):
    return device == "cuda", "GPU only (max-autotune on a CPU is slow and not what is measured)"


def _addmm_act(case: Case):
    return lambda x, w, b: torch._addmm_activation(b, x, w.t(), use_gelu=True)


def providers() -> dict[str, Provider]:
    return {
        "effkern-triton": _effkern("triton"),
        # the Triton forward with plain loads everywhere (no TMA kernel on Hopper): the TMA
        # kernel's gain, measured in the same run
        "effkern-triton-no-tma": effkern_provider("triton", _linear_gelu, limits=_tma_rows,
                                                  env={"EFFKERN_TRITON_TMA": "0"}),
        "effkern-cuda": _effkern("cuda"),
        "reference": _effkern("reference"),
        "torch-eager": Provider(build=_eager),
        # aten defines no derivative for _addmm_activation: forward only
        "torch-addmm-act": Provider(build=_addmm_act, available=_addmm_act_available, backward=False),
        "torch-compile": Provider(build=_compile, available=_gpu_only),
        # the GEMM alone (cuBLAS, bias in its epilogue): the yardstick for "% of cuBLAS GEMM for
        # the same shape" (column "x gemm"); not GELU, so timed but not checked
        "torch-linear": Provider(build=lambda case: F.linear, checked=False),
    }
