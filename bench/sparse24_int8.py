"""W8A8 2:4 sparse benchmark: effkern.sparse24_int8_linear against effkern's dense W8A8 and bf16 cuBLAS.

Shapes are (M, N, K), the suites of bench/sparse24.py: input x [M, K] in the activation dtype; a
random weight [N, K] pruned to 2:4, quantized to int8 per output channel and compressed once per
case (offline, untimed): values int8 [N, K / 2], meta uint8 [N, ceil(K / 8)], scale float32 [N];
bias [N]; output [M, N]. Forward only (the weight is frozen; the op's backward is int8_linear's).
The per-token quantization of x is part of every W8A8 call.

TFLOP/s counts 2*M*N*K, the dense GEMM's operations (not the half that sparse tensor cores
execute), held against the measured dense int8 GEMM rate (torch._int_mm): a kernel on the sparse
tensor cores can pass 100 % GEMM. Bytes count x, the weight (values, metadata, scales), the bias
and the output; GB/s is of the weight reads alone (int8-dense: its dense int8 weight and scales;
torch-linear: its bf16 weight).

Providers: effkern-triton (kernels/sparse24.py: the int8 values expanded in registers, a dense
int8 tl.dot), effkern-cuda (csrc/cuda/sparse24.cu: mma.sp m16n8k64 on the sparse tensor cores),
reference (the dense int8 weight decompressed, an exact float64 GEMM), int8-dense (effkern.int8_linear
on the same int8 weight stored dense: the same function, so checked; column "x int8 dense"),
torch-cusparselt (W8A8 on PyTorch's own 2:4 int8 GEMM, as torchao's int8 semi-sparse layout calls
it: x quantized per token in PyTorch ops, torch._cslt_compress of the int8 weight once per case,
untimed, torch._cslt_sparse_mm with an int32 result (x's rows padded to a multiple of 16, as
torch's semi-structured tensors pad them), dequantized in fp32; the same function, so checked;
CUDA only, and skipped with torch's message where its cuSPARSELt refuses int8; column "x
cusparselt") and torch-linear (bf16 cuBLAS on the pruned float weight: what W8A8 has to beat; no
quantization, so timed, not checked; column "x linear"). --write-policy records the faster of effkern-triton and
effkern-cuda per shape in effkern/policies/sparse24_int8.json, which auto reads.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import effkern as ek
from effkern.sparse24 import sparse24_int8_linear_reference

from . import sparse24 as bench_sparse24
from .harness import GRAPH_MAX_ROWS, Case, Provider, dense_weight_bytes, effkern_provider
from .int8 import quantize_per_token_as_torch_users_do

OP = "sparse24_int8"
BASELINES = {"int8-dense": "x int8 dense", "torch-cusparselt": "x cusparselt", "torch-linear": "x linear"}
ERROR_BASELINE = "reference"
POLICY_BACKENDS = {"effkern-triton": "triton", "effkern-cuda": "cuda"}
MODES = ("fwd",)


def _case(dtype: torch.dtype, M: int, N: int, K: int, providers=None) -> Case:
    s = torch.empty((), dtype=dtype).element_size()
    weight = N * K // 2 + N * -(-K // 8) + 4 * N  # int8 values, meta, float32 scales
    compressed_inputs = s * (M * K + N) + weight  # x, bias
    return Case(params={"dtype": str(dtype).removeprefix("torch."), "M": M, "N": N, "K": K},
                dtype=dtype, flops={"fwd": 2 * M * N * K}, bytes={"fwd": compressed_inputs + s * M * N},
                providers=providers, reductions={"out": K}, flop_ceiling="int8_tops",
                input_bytes=compressed_inputs, graph=M <= GRAPH_MAX_ROWS, gbps_bytes=weight)


def cases(device: str, quick: bool, shapes: list[str] | None, dtypes: list[str] | None) -> list[Case]:
    # the 2:4 benchmark's suites (bench/sparse24.py), these cases and providers
    return bench_sparse24.cases(device, quick, shapes, dtypes, make_case=_case, provider_names=providers())


def inputs(case: Case, device: str) -> list[torch.Tensor]:
    p, dt = case.params, case.dtype
    x = torch.randn(p["M"], p["K"], device=device, dtype=dt)
    # nn.Linear-like, pruned, quantized and compressed offline, as a model is converted once
    w = ek.prune_24(torch.randn(p["N"], p["K"], device=device, dtype=dt) * p["K"] ** -0.5)
    qweight, scale = ek.quantize_int8(w)
    values, meta = ek.compress_24(qweight)
    b = torch.randn(p["N"], device=device, dtype=dt)
    # every provider gets all eight and uses its own; torch-cusparselt's packed weight where it runs
    packed = _cusparselt_compress(qweight) if _cusparselt_available(case, device, "fwd")[0] else qweight[:0]
    return [x, w, qweight, values, meta, scale, b, packed]


def reference(case: Case, x, w, qweight, values, meta, scale, b, packed):
    # on float64 inputs: x quantized per token in fp32 as the op defines, the int8 weight
    # decompressed exactly, then dequantization, GEMM and bias in float64
    return sparse24_int8_linear_reference(x, values, meta, scale, b)


def _sparse24_int8_linear(case: Case):
    return lambda x, w, qweight, values, meta, scale, b, packed: ek.sparse24_int8_linear(x, values, meta, scale, b)


def _cuda_kernel_takes(case, device):
    if device != "cuda":
        return False, "the CUDA 2:4 kernel runs on CUDA tensors only"
    if not hasattr(torch.ops.effkern_C, "sparse24_int8_linear"):
        return False, "CUDA W8A8 2:4 kernel not built (effkern._C predates it: rebuild)"
    from effkern.sparse24_cuda_layout import cuda_kernel_supports  # noqa: PLC0415

    p = case.params
    if case.dtype not in (torch.float16, torch.bfloat16) or not cuda_kernel_supports(p["M"], p["N"], p["K"],
                                                                                       torch.int8):
        return False, "the CUDA W8A8 2:4 kernel does not take this shape or dtype"
    return True, ""


# ---------------------------------------------------------------- PyTorch's cuSPARSELt 2:4 int8 GEMM

# weight shape -> torch's error compressing it: inputs() runs outside the per-provider error
# handling, so the provider raises it in its own row
_COMPRESSION_ERRORS: dict = {}


def _cusparselt_compress(qweight: torch.Tensor) -> torch.Tensor:
    """torch._cslt_compress(qweight), or an empty stand-in (its error kept) where torch refuses it."""
    try:
        return torch._cslt_compress(qweight)
    except RuntimeError as exc:
        _COMPRESSION_ERRORS[tuple(qweight.shape)] = (str(exc).splitlines() or [""])[0][:160]
        return qweight[:0]


def cusparselt_w8a8(x, w, qweight, values, meta, scale, b, packed):
    """W8A8 on torch's 2:4 int8 GEMM: (the int32 product of the packed weight and x quantized per
    token) dequantized in fp32, + bias, in x's dtype."""
    if packed.numel() == 0:
        raise RuntimeError(f"torch._cslt_compress failed on this weight: "
                           f"{_COMPRESSION_ERRORS.get(tuple(qweight.shape), '?')}")
    xq, x_scale = quantize_per_token_as_torch_users_do(x)
    M = xq.shape[0]
    xq = F.pad(xq, (0, 0, 0, -M % 16))  # rows to a multiple of 16, as torch's semi-structured mm pads
    acc = torch._cslt_sparse_mm(packed, xq.t(), out_dtype=torch.int32)[:, :M].t()  # [M, N]
    return (acc.float() * x_scale * scale + b.float()).to(x.dtype)


@functools.lru_cache(maxsize=None)
def _cusparselt_refusal() -> str:
    """Why torch's cuSPARSELt int8 GEMM cannot run here ("" if it can), found by trying it on a
    64 x 64 weight: torch's refusals (a build without cuSPARSELt, a version without int8 or an
    int32 result) come from the call, with no flag to read beforehand."""
    w = ek.prune_24(torch.randn(64, 64, device="cuda")).to(torch.int8)
    try:
        # the dense operand transposed, as cusparselt_w8a8 passes it (cuSPARSELt's support differs by layout)
        torch._cslt_sparse_mm(torch._cslt_compress(w), torch.ones(16, 64, device="cuda", dtype=torch.int8).t(),
                              out_dtype=torch.int32)
        torch.cuda.synchronize()
    except RuntimeError as exc:
        return f"torch refuses it here: {(str(exc).splitlines() or [''])[0][:160]}"
    return ""


def _cusparselt_available(case, device, mode):
    if device != "cuda":
        return False, "torch's cuSPARSELt GEMMs are CUDA only"
    if case.params["N"] % 32 or case.params["K"] % 32:
        return False, "torch's cuSPARSELt int8 weight needs N and K multiples of 32"
    why = _cusparselt_refusal()
    return not why, why


def providers() -> dict[str, Provider]:
    # the int8 tl.dot runs in the interpreter with any activation dtype (float_dot: never)
    return {
        "effkern-triton": effkern_provider("triton", _sparse24_int8_linear, float_dot=lambda case: False),
        "effkern-cuda": effkern_provider("cuda", _sparse24_int8_linear, limits=_cuda_kernel_takes),
        "reference": effkern_provider("reference", _sparse24_int8_linear, not_capturable=bench_sparse24.NOT_CAPTURABLE),
        # effkern's dense W8A8 on the same int8 weight: the same function, so checked
        "int8-dense": Provider(build=lambda case: lambda x, w, qweight, values, meta, scale, b, packed:
                               ek.int8_linear(x, qweight, scale, b),
                               gbps_bytes=lambda case: case.params["N"] * case.params["K"] + 4 * case.params["N"]),
        # PyTorch's own 2:4 int8 GEMM (cuSPARSELt), the same function: checked
        "torch-cusparselt": Provider(build=lambda case: cusparselt_w8a8, available=_cusparselt_available),
        # bf16 cuBLAS on the pruned float weight: no quantization, another function: timed only
        "torch-linear": Provider(build=lambda case: lambda x, w, qweight, values, meta, scale, b, packed:
                                 F.linear(x, w, b), checked=False, gbps_bytes=dense_weight_bytes),
    }
