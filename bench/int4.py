"""int4 benchmark: effkern's W4A16 linear layer against bf16 cuBLAS and PyTorch's own int4 GEMM.

Shapes are (M, N, K): input x [M, K] in the activation dtype, weight [N, K] quantized once per case
(offline, untimed) by ek.quantize_int4 to 4-bit q with a scale and a zero per group of
``group_size`` along K (qweight int32 [N, K / 8], scales and zeros [N, K / G] in the activation
dtype); bias [N]; output [M, N]. Times ek.int4_linear, which dequantizes the weight inside the
GEMM. Forward only: an inference op (the weight is frozen).

TFLOP/s counts 2*M*N*K, against the float GEMM rate. Bytes count x, the 4-bit weight (N*K/2), the
scales and zeros, the bias and the output: at small M the weight is nearly all of them, and
% floor is the share of the copy bandwidth that the weight reads reach. GB/s and % copy are of
the weight reads alone (torch-linear: its bf16 weight; torch-int4pack: its own packing, the same
bytes).

torch-int4pack is PyTorch's W4A16 (tinygemm: torch._weight_int4pack_mm on CUDA, bf16 only;
torch._weight_int4pack_mm_for_cpu on the CPU), given its own packing of the same q, scales and
zeros, made once per case and untimed. It dequantizes as (q - 8) * scale + zero, so effkern's
(q - z) * s is scale = s, zero = (8 - z) * s (rounded once to its dtype: within the tolerance).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

import effkern as ek
from effkern.int4 import int4_linear_reference, unpack_int4

from .harness import GRAPH_MAX_ROWS, Case, Provider, dense_weight_bytes, effkern_provider, parse_dtypes, parse_mnk

OP = "int4"
BASELINES = {"torch-linear": "x linear", "torch-int4pack": "x int4pack"}
# The op's definition in PyTorch (effkern's reference backend: F.linear on the weight dequantized
# in fp32 and rounded once to the activation dtype) sets "PyTorch's error".
ERROR_BASELINE = "reference"
# --write-policy records the faster of these in effkern/policies/int4.json, which auto reads
# (effkern.int4._auto_backend: "cuda" where the CUDA kernel takes the shape, else triton)
POLICY_BACKENDS = {"effkern-triton": "triton", "effkern-cuda": "cuda"}
MODES = ("fwd",)

GROUP_SIZE = 128  # the suites' and --shapes' group size
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)

GPU_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
GPU_KN = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672))
GPU_QUICK_M = (1, 16, 64, 4096)
GPU_QUICK_KN = ((4096, 14336), (8192, 8192))
CPU_M, CPU_KN = (1, 3, 64, 128), ((128, 80), (256, 512))
CPU_QUICK_M, CPU_QUICK_KN = (3, 64), ((128, 80),)


def _case(dtype: torch.dtype, M: int, N: int, K: int, group_size: int = GROUP_SIZE, providers=None) -> Case:
    s = torch.empty((), dtype=dtype).element_size()
    groups = 1 if group_size == -1 else K // group_size
    int4_inputs = s * (M * K + N) + N * K // 2 + 2 * s * N * groups  # x, bias, 4-bit weight, scales + zeros
    return Case(params={"dtype": str(dtype).removeprefix("torch."), "group_size": group_size, "M": M, "N": N, "K": K},
                dtype=dtype, flops={"fwd": 2 * M * N * K}, bytes={"fwd": int4_inputs + s * M * N},
                providers=providers, reductions={"out": K},
                # the int4 providers leave the float weight (torch-linear's) unread: rotate enough
                # copies that their own inputs leave L2
                input_bytes=int4_inputs, graph=M <= GRAPH_MAX_ROWS,
                gbps_bytes=N * K // 2 + 2 * s * N * groups)  # GB/s of the weight reads: 4-bit q, scales, zeros


def cases(device: str, quick: bool, shapes: list[str] | None, dtypes: list[str] | None) -> list[Case]:
    dts = parse_dtypes(dtypes)
    if shapes:  # explicit shapes: every provider, group size 128
        mnk = [parse_mnk(s) for s in shapes]
        if any(K % GROUP_SIZE or N % 8 for _, N, K in mnk):
            raise SystemExit(f"--shapes: K must be a multiple of the group size {GROUP_SIZE} and N of 8 "
                             f"(int4 packs eight values per word), got {shapes}")
        dts = dts or ([torch.bfloat16] if device == "cuda" else [torch.float32])
        return [_case(d, *s) for d in dts for s in mnk]
    if device == "cpu":  # the interpreter is slow and has no bf16 tl.dot: tiny shapes, fp32 and fp16
        ms, kns = (CPU_QUICK_M, CPU_QUICK_KN) if quick else (CPU_M, CPU_KN)
        dts = dts or [torch.float32, torch.float16]
        return [_case(d, M, N, K) for d in dts for (K, N) in kns for M in ms]
    dts = dts or [torch.bfloat16]
    if not quick:
        return [_case(d, M, N, K) for d in dts for (K, N) in GPU_KN for M in GPU_M]
    # quick: no reference timings (PyTorch's dequantize-then-GEMM: the full suite has them)
    no_reference = frozenset(providers()) - {"reference"}
    return [_case(d, M, N, K, providers=no_reference) for d in dts for (K, N) in GPU_QUICK_KN for M in GPU_QUICK_M]


def _int4pack_available(case, device, mode):
    if device == "cuda":
        if not hasattr(torch, "_weight_int4pack_mm"):
            return False, "torch._weight_int4pack_mm does not exist in this torch"
        if case.dtype != torch.bfloat16:
            return False, "torch._weight_int4pack_mm on CUDA takes bfloat16 only"
    elif not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return False, "torch._weight_int4pack_mm_for_cpu does not exist in this torch"
    elif case.params["N"] % 16:
        return False, "torch._convert_weight_to_int4pack_for_cpu needs N a multiple of 16"
    if case.params["group_size"] not in TINYGEMM_GROUP_SIZES:  # then K, a multiple of it, is one of 32 as needed
        return False, f"tinygemm takes group sizes {TINYGEMM_GROUP_SIZES} only"
    return True, ""


def _int4pack(case: Case, device: str, qweight, scales, zeros) -> list[torch.Tensor]:
    """torch's packing of effkern's q, scales and zeros: [packed weight, scales_and_zeros [K / G, N, 2]]."""
    if not _int4pack_available(case, device, "fwd")[0]:
        return [torch.empty(0, device=device), torch.empty(0, device=device)]  # stand-ins: the provider is skipped
    q = unpack_int4(qweight)  # uint8 [N, K]
    if device == "cuda":
        # two values per byte, the even k in the high nibble; inner k-tiles of 16: the widest
        # (16-byte loads, torchao's default 8) that divides K
        K = q.shape[1]
        inner_k_tiles = next(t for t in (8, 4, 2) if K % (16 * t) == 0)
        packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), inner_k_tiles)
    else:  # the CPU packer takes one int32 per value and ignores innerKTiles
        packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    zero = (8 - zeros.float()) * scales.float()  # (q - z) * s = (q - 8) * s + (8 - z) * s
    scales_and_zeros = torch.stack([scales.float().t(), zero.t()], dim=-1).to(case.dtype).contiguous()
    return [packed, scales_and_zeros]


def inputs(case: Case, device: str) -> list[torch.Tensor]:
    p, dt = case.params, case.dtype
    x = torch.randn(p["M"], p["K"], device=device, dtype=dt)
    w = torch.randn(p["N"], p["K"], device=device, dtype=dt) * p["K"] ** -0.5  # nn.Linear-like
    qweight, scales, zeros = ek.quantize_int4(w, p["group_size"])  # offline, as a model is quantized once
    b = torch.randn(p["N"], device=device, dtype=dt)
    # every provider gets all eight and uses its own: the float weight for torch-linear, torch's
    # packing for torch-int4pack, effkern's int4 weight else
    return [x, w, qweight, scales, zeros, b, *_int4pack(case, device, qweight, scales, zeros)]


def reference(case: Case, x, w, qweight, scales, zeros, b, packed, scales_and_zeros):
    # float64 inputs: the weight dequantized exactly, a float64 GEMM
    return int4_linear_reference(x, qweight, scales, zeros, case.params["group_size"], b)


def _int4_linear(case: Case):
    group_size = case.params["group_size"]
    return lambda x, w, qweight, scales, zeros, b, packed, scales_and_zeros: ek.int4_linear(
        x, qweight, scales, zeros, group_size, b)


def _cuda_kernel_takes(case, device):
    if device != "cuda":
        return False, "the CUDA int4 kernel runs on CUDA tensors only"
    try:
        from effkern.int4_cuda_layout import cuda_kernel_supports  # noqa: PLC0415  (absent until it is built)
    except ImportError:
        return False, "CUDA int4 kernel not built"
    if not hasattr(torch.ops.effkern_C, "int4_linear"):
        return False, "CUDA int4 kernel not built (effkern._C predates it: rebuild)"
    p = case.params
    if not cuda_kernel_supports(p["M"], p["N"], p["K"], p["group_size"], case.dtype):
        return False, "the CUDA int4 kernel does not take this shape, group size or dtype"
    return True, ""


def _effkern(backend: str) -> Provider:
    if backend == "cuda":
        return effkern_provider(backend, _int4_linear, limits=_cuda_kernel_takes)
    return effkern_provider(backend, _int4_linear)


def _int4pack_mm(case: Case):
    group_size = case.params["group_size"]

    def fn(x, w, qweight, scales, zeros, b, packed, scales_and_zeros):
        mm = torch._weight_int4pack_mm if x.is_cuda else torch._weight_int4pack_mm_for_cpu
        # torch's op has no bias: added by a second kernel, as a PyTorch user would
        return mm(x, packed, group_size, scales_and_zeros).add_(b)

    return fn


def providers() -> dict[str, Provider]:
    return {
        "effkern-triton": _effkern("triton"),
        "effkern-cuda": _effkern("cuda"),
        "reference": _effkern("reference"),
        # bf16 cuBLAS on the unquantized weight: what int4 has to beat, column "x linear"; another
        # function (no quantization), so timed but not checked
        "torch-linear": Provider(build=lambda case: lambda x, w, qweight, scales, zeros, b, *_: F.linear(x, w, b),
                                 checked=False, gbps_bytes=dense_weight_bytes),
        "torch-int4pack": Provider(build=_int4pack_mm, available=_int4pack_available),
    }
