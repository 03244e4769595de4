"""int8 benchmark: effkern's W8A8 and W8A16 linear layers against bf16 cuBLAS and PyTorch's int8 GEMM.

Shapes are (M, N, K): input x [M, K] in the activation dtype, weight [N, K] quantized to int8 per
output channel (scale float32 [N]) once per case, offline and untimed; bias [N]; output [M, N].
Param "quant": "w8a8" times ek.int8_linear, whose per-token quantization of x is part of the call
(effkern-triton: a separate quantization kernel; effkern-triton-fused: inside the GEMM; the faster
goes to the policy that backend "auto" reads; effkern-triton-no-tma: the separate one without the
TMA GEMM that Hopper runs for M > 64); "w8a16" times ek.int8_weight_only_linear. Forward only: these are inference ops (the weight is frozen).

GB/s is of the weight reads (int8 weight and scales; torch-linear: its bf16 weight).
TFLOP/s counts 2*M*N*K for both (int8 TOPS for w8a8). % GEMM and the FLOP side of the floor are
against the measured int8 GEMM rate (torch._int_mm) for w8a8, the float GEMM rate for w8a16,
for every row of the case: torch-linear's bf16 GEMM in a w8a8 case is held against the int8 rate
too (so its % GEMM there is about half that in the w8a16 row of the same shape). Bytes
count x, the int8 weight (1 byte per element), the scales, the bias and the output (not w8a8's
int8 copy of x, which a fused kernel would not write): at small M the weight is nearly all of
them, and % floor is the share of the copy bandwidth that the weight reads reach.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

import effkern as ek
from effkern.int8 import int8_linear_reference, int8_weight_only_linear_reference, quantize_rows_reference

from .harness import GRAPH_MAX_ROWS, Case, Provider, dense_weight_bytes, effkern_provider, parse_dtypes, parse_mnk

OP = "int8"
BASELINES = {"torch-linear": "x linear", "torch-int-mm": "x int_mm"}
# The op's own definition in PyTorch (effkern's reference backend: the exact int32 accumulator,
# then fp32, then the activation dtype) sets "PyTorch's error". torch-int-mm would for w8a8, but
# cuBLAS refuses M <= 16, and W8A16 has no other PyTorch form that computes the same function.
ERROR_BASELINE = "reference"
# triton is the int8 ops' only GPU backend; what auto chooses is how W8A8 quantizes its input
# (effkern.int8.w8a8_quantization): these two providers time the two ways
POLICY_BACKENDS = {"effkern-triton": "separate", "effkern-triton-fused": "fused"}
MODES = ("fwd",)

QUANTS = ("w8a8", "w8a16")
LINEAR_OPS = {"w8a8": ek.int8_linear, "w8a16": ek.int8_weight_only_linear}
REFERENCES = {"w8a8": int8_linear_reference, "w8a16": int8_weight_only_linear_reference}

GPU_M = (1, 16, 64, 256, 1024, 4096, 16384)
GPU_KN = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672))
GPU_QUICK_M = (1, 16, 4096)
GPU_QUICK_KN = ((4096, 14336), (8192, 8192))
CPU_M, CPU_KN = (1, 3, 64, 128), ((96, 80), (256, 512))
CPU_QUICK_M, CPU_QUICK_KN = (3, 64), ((96, 80),)


def _case(dtype: torch.dtype, quant: str, M: int, N: int, K: int, providers=None) -> Case:
    s = torch.empty((), dtype=dtype).element_size()
    int8_inputs = s * (M * K + N) + N * K + 4 * N  # x, bias, int8 weight, float32 scales
    return Case(params={"dtype": str(dtype).removeprefix("torch."), "quant": quant, "M": M, "N": N, "K": K},
                dtype=dtype, flops={"fwd": 2 * M * N * K}, bytes={"fwd": int8_inputs + s * M * N},
                providers=providers, reductions={"out": K},
                flop_ceiling="int8_tops" if quant == "w8a8" else "gemm_tflops",
                # the int8 providers leave the float weight (torch-linear's) unread: rotate enough
                # copies that their own inputs leave L2
                input_bytes=int8_inputs, graph=M <= GRAPH_MAX_ROWS,
                gbps_bytes=N * K + 4 * N)  # GB/s of the weight reads: int8 weight, float32 scales


def cases(device: str, quick: bool, shapes: list[str] | None, dtypes: list[str] | None) -> list[Case]:
    dts = parse_dtypes(dtypes)
    if shapes:  # explicit shapes: every provider, both quantizations
        mnk = [parse_mnk(s) for s in shapes]
        dts = dts or ([torch.bfloat16] if device == "cuda" else [torch.float32])
        return [_case(d, q, *s) for d in dts for q in QUANTS for s in mnk]
    if device == "cpu":  # the interpreter is slow: tiny shapes, fp32 and fp16
        ms, kns = (CPU_QUICK_M, CPU_QUICK_KN) if quick else (CPU_M, CPU_KN)
        dts = dts or [torch.float32, torch.float16]
        return [_case(d, q, M, N, K) for d in dts for q in QUANTS for (K, N) in kns for M in ms]
    dts = dts or [torch.bfloat16]
    if not quick:
        return [_case(d, q, M, N, K) for d in dts for q in QUANTS for (K, N) in GPU_KN for M in GPU_M]
    # quick: no reference timings (its float64 GEMM on a GPU says nothing about effkern)
    no_reference = frozenset(providers()) - {"reference"}
    return [_case(d, q, M, N, K, no_reference)
            for d in dts for q in QUANTS for (K, N) in GPU_QUICK_KN for M in GPU_QUICK_M]


def inputs(case: Case, device: str) -> list[torch.Tensor]:
    p, dt = case.params, case.dtype
    x = torch.randn(p["M"], p["K"], device=device, dtype=dt)
    w = torch.randn(p["N"], p["K"], device=device, dtype=dt) * p["K"] ** -0.5  # nn.Linear-like
    qw, scale = quantize_rows_reference(w)  # offline, as a model is quantized once: not timed
    b = torch.randn(p["N"], device=device, dtype=dt)
    # every provider gets all five and uses its own: the float weight for torch-linear, the int8 one else
    return [x, w, qw, scale, b]


def reference(case: Case, x, w, qw, scale, b):
    # on float64 inputs: w8a8 quantizes x per token in fp32 as the op defines, then everything
    # (dequantization, GEMM, bias) is float64; w8a16 is float64 throughout
    return REFERENCES[case.params["quant"]](x, qw, scale, b)


def _quantized(case: Case):
    op = LINEAR_OPS[case.params["quant"]]
    return lambda x, w, qw, scale, b: op(x, qw, scale, b)


def _effkern(backend: str, quantization: str | None = None, tma: bool = True) -> Provider:
    # w8a8's int8 tl.dot runs in the interpreter with bf16 activations; w8a16's bf16 one does not
    def limits(case, device):
        if quantization == "fused" and case.params["quant"] != "w8a8":
            return False, "W8A8 only (the fused quantization of the activations)"
        if not tma:  # asked only where the triton backend is available, so its kernels import
            from effkern.kernels._splitk import SPLIT_MAX_ROWS

            if case.params["quant"] != "w8a8" or case.params["M"] <= SPLIT_MAX_ROWS:
                return False, f"the TMA GEMM runs for W8A8 with M > {SPLIT_MAX_ROWS} only"
        return True, ""

    # W8A8's activation quantization forced to one way, the TMA GEMM off if asked (the variables
    # are read per call)
    env = {"EFFKERN_INT8_QUANTIZATION": quantization} if quantization else {}
    if not tma:
        env["EFFKERN_TRITON_TMA"] = "0"
    return effkern_provider(backend, _quantized, float_dot=lambda case: case.params["quant"] == "w8a16",
                            limits=limits, env=env or None)


def quantize_per_token_as_torch_users_do(x):
    """W8A8's activation quantization as a PyTorch user writes it (torchao's dynamic int8 does
    the same): per-token absmax scales [M, 1], round, clamp: (x int8, scales)."""
    xf = x.float()
    x_scale = xf.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(xf / x_scale.clamp_min(torch.finfo(torch.float32).tiny)).clamp_(-127, 127).to(torch.int8)
    return xq, x_scale


def _int_mm_w8a8(x, w, qw, scale, b):
    # W8A8 as a PyTorch user writes it: int8 GEMM with an int32 result, dequantized in fp32
    xq, x_scale = quantize_per_token_as_torch_users_do(x)
    return (torch._int_mm(xq, qw.t()).float() * x_scale * scale + b.float()).to(x.dtype)


def _int_mm_available(case, device, mode):
    p = case.params
    if p["quant"] != "w8a8":
        return False, "computes W8A8 only"
    if device == "cuda" and not (p["M"] > 16 and p["K"] % 8 == 0 and p["N"] % 8 == 0):
        return False, "torch._int_mm on CUDA needs M > 16 and K, N multiples of 8"
    return True, ""


def providers() -> dict[str, Provider]:
    return {
        "effkern-triton": _effkern("triton", "separate"),
        "effkern-triton-fused": _effkern("triton", "fused"),
        # the separate quantization with the plain-load GEMM everywhere (no TMA GEMM on Hopper):
        # the TMA GEMM's gain, measured in the same run
        "effkern-triton-no-tma": _effkern("triton", "separate", tma=False),
        "reference": _effkern("reference"),
        # bf16 cuBLAS on the unquantized weight: what int8 has to beat, column "x linear"; another
        # function (no quantization), so timed but not checked
        "torch-linear": Provider(build=lambda case: lambda x, w, qw, scale, b: F.linear(x, w, b), checked=False,
                                 gbps_bytes=dense_weight_bytes),
        "torch-int-mm": Provider(build=lambda case: _int_mm_w8a8, available=_int_mm_available),
    }

