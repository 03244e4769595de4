"""2:4 sparse benchmark: effkern's semi-structured sparse linear layer against dense cuBLAS and
PyTorch's own 2:4 GEMMs (CUTLASS, cuSPARSELt) on the same weight.

Shapes are (M, N, K): input x [M, K] in the activation dtype; a random weight [N, K] pruned once
per case (offline, untimed) by ek.prune_24 and compressed by ek.compress_24 to values [N, K / 2]
in the activation dtype and meta uint8 [N, ceil(K / 8)]; bias [N]; output [M, N]. Times
ek.sparse24_linear in two modes:
  fwd  inference (the weight frozen);
  bwd  the backward alone with only x's gradient asked for (GRAD_INPUTS): grad_x = dY @ W, the
       part of the fine-tuning backward where effkern has two ways to choose from (the values'
       gradient is one dense GEMM either way). effkern-triton runs kernels/sparse24.py's
       sparse24_dgrad_kernel on the compressed W, effkern-cuda (and reference) expand W into
       an N x K scratch and run one cuBLAS GEMM; --write-policy records the faster per shape as
       the bwd entry that auto reads (effkern/sparse24.py, dgrad_path). torch-linear is cuBLAS's
       dY @ W on the dense weight.

TFLOP/s counts 2*M*N*K, the dense GEMM's FLOPs (not the half that sparse tensor cores execute),
so rates compare directly with dense rows and the float GEMM ceiling: a kernel using sparse
tensor cores can pass 100 % GEMM. Bytes count x, the values (N*K/2 elements), the metadata
(N*K/8 bytes), the bias and the output: at small M the weight is nearly all of them, 9/16 of
the dense weight's bytes in 16 bits, and % floor is the share of the copy bandwidth that these
reads reach. GB/s and % copy are of the weight reads alone (values and meta; torch-linear: the
dense weight).

torch-linear is F.linear on the pruned dense weight: the same function, so it is checked.
torch-semi-cutlass and torch-semi-cusparselt are F.linear on
torch.sparse.to_sparse_semi_structured(pruned weight), converted once per case (untimed) with
SparseSemiStructuredTensor._FORCE_CUTLASS True resp. False, the flag by which torch picks
SparseSemiStructuredTensorCUTLASS or SparseSemiStructuredTensorCUSPARSELT (cuSPARSELt at its
default algorithm, alg_id 0). Their times include what torch does around the GEMM on every call:
it computes W @ x^T, with x padded to a multiple of 8 rows and columns where it is not (M = 1
runs as M = 8), and returns the transpose (in torch 2.14 cuSPARSELt writes it transposed and
CUTLASS's [N, M] result is copied; older torch returned transposed views). CUDA only, float16
and bfloat16. Where torch refuses, the provider is skipped with torch's message: its CUTLASS
GEMM runs on compute capability 8.x only, cuSPARSELt needs a torch built with it (0.6 or later
on Hopper). They are not timed in bwd: torch's input gradient runs mm(dY, W), which needs the
transposed compression (packed_t) that to_sparse_semi_structured does not make; torch 2.14
raises NotImplementedError ("matmul: operation is not supported") there.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.sparse import (SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT,
                          SparseSemiStructuredTensorCUTLASS, to_sparse_semi_structured)

import effkern as ek
from effkern.sparse24 import sparse24_linear_reference

from .harness import (GRAD_MODES, GRAPH_MAX_ROWS, Case, Provider, dense_weight_bytes, effkern_provider, parse_dtypes,
                      parse_mnk)

OP = "sparse24"
BASELINES = {"torch-linear": "x dense", "torch-semi-cutlass": "x cutlass", "torch-semi-cusparselt": "x cusparselt"}
# The op's definition in PyTorch (effkern's reference backend: F.linear on the decompressed dense
# weight) sets "PyTorch's error".
ERROR_BASELINE = "reference"
POLICY_BACKENDS = {"effkern-triton": "triton", "effkern-cuda": "cuda"}
MODES = ("fwd", "bwd")
GRAD_INPUTS = (0,)  # bwd: x alone (see above)

GPU_M = (1, 16, 128, 1024, 4096, 16384)
# (K, N): square; Llama-3-8B gate/up, down, k/v; Llama-3-70B gate/up, down, k/v
GPU_KN = ((4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096), (4096, 1024), (8192, 28672), (28672, 8192),
          (8192, 1024))
GPU_QUICK_M = (16, 4096)
GPU_QUICK_KN = ((8192, 8192), (4096, 14336))
CPU_M, CPU_KN = (1, 3, 64, 130), ((128, 80), (256, 512))
CPU_QUICK_M, CPU_QUICK_KN = (3, 64), ((128, 80),)

TORCH_SEMI_DTYPES = (torch.float16, torch.bfloat16)


def _case(dtype: torch.dtype, M: int, N: int, K: int, providers=None) -> Case:
    s = torch.empty((), dtype=dtype).element_size()
    weight = s * N * K // 2 + N * -(-K // 8)  # values, meta
    compressed_inputs = s * (M * K + N) + weight  # x, bias
    return Case(params={"dtype": str(dtype).removeprefix("torch."), "M": M, "N": N, "K": K},
                dtype=dtype, flops={"fwd": 2 * M * N * K, "bwd": 2 * M * N * K},
                # bwd reads dY and W, writes grad_x
                bytes={"fwd": compressed_inputs + s * M * N, "bwd": s * (M * N + M * K) + weight},
                providers=providers, reductions={"out": K, "grad0": N},
                # the compressed providers leave the dense weight (torch-linear's) unread: rotate
                # enough copies that their own inputs leave L2
                input_bytes=compressed_inputs, graph=M <= GRAPH_MAX_ROWS,
                gbps_bytes=weight)  # GB/s of the weight reads


def cases(device: str, quick: bool, shapes: list[str] | None, dtypes: list[str] | None,
          make_case=_case, provider_names=None) -> list[Case]:
    """The 2:4 suites; ``make_case`` and ``provider_names`` (default: this module's): another 2:4
    benchmark's (bench/sparse24_int8.py) on the same shapes."""
    dts = parse_dtypes(dtypes)
    if shapes:  # explicit shapes: every provider
        mnk = [parse_mnk(s) for s in shapes]
        if any(K % 4 for _, _, K in mnk):
            raise SystemExit(f"--shapes: K must be a multiple of 4 (2:4 groups along K), got {shapes}")
        dts = dts or ([torch.bfloat16] if device == "cuda" else [torch.float32])
        return [make_case(d, *s) for d in dts for s in mnk]
    if device == "cpu":  # the interpreter is slow and has no bf16 tl.dot: tiny shapes, fp32 and fp16
        ms, kns = (CPU_QUICK_M, CPU_QUICK_KN) if quick else (CPU_M, CPU_KN)
        dts = dts or [torch.float32, torch.float16]
        return [make_case(d, M, N, K) for d in dts for (K, N) in kns for M in ms]
    dts = dts or [torch.bfloat16]
    if not quick:
        return [make_case(d, M, N, K) for d in dts for (K, N) in GPU_KN for M in GPU_M]
    # quick: no reference timings (PyTorch's decompress-then-GEMM: the full suite has them)
    no_reference = frozenset(provider_names or providers()) - {"reference"}
    return [make_case(d, M, N, K, providers=no_reference)
            for d in dts for (K, N) in GPU_QUICK_KN for M in GPU_QUICK_M]


# ---------------------------------------------------------------- torch's semi-structured tensors

def _torch_semi_class(cutlass: bool) -> type:
    return SparseSemiStructuredTensorCUTLASS if cutlass else SparseSemiStructuredTensorCUSPARSELT


def _to_semi_structured(weight: torch.Tensor, cutlass: bool) -> SparseSemiStructuredTensor:
    """torch.sparse.to_sparse_semi_structured(weight), made with the CUTLASS or the cuSPARSELt subclass."""
    forced = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "in prototype stage", once per process
            return to_sparse_semi_structured(weight)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = forced


@functools.lru_cache(maxsize=None)
def _torch_semi_refusal(cutlass: bool, dtype: torch.dtype) -> str:
    """Why torch's semi-structured F.linear cannot run on this GPU ("" if it can), found by
    trying it: torch's refusals (compute capability, cuSPARSELt missing or too old) come from its
    conversion or its GEMM, with no flag to read beforehand."""
    w = ek.prune_24(torch.randn(128, 128, device="cuda", dtype=dtype))
    try:
        F.linear(torch.randn(1, 128, device="cuda", dtype=dtype), _to_semi_structured(w, cutlass),
                 torch.zeros(128, device="cuda", dtype=dtype))
        torch.cuda.synchronize()
    except RuntimeError as exc:
        return f"torch refuses it here: {(str(exc).splitlines() or [''])[0][:160]}"
    return ""


def _torch_semi_available(cutlass: bool):
    cls = _torch_semi_class(cutlass)

    def available(case, device, mode):
        if mode in GRAD_MODES:
            return False, "torch's input gradient needs a packed_t that to_sparse_semi_structured does not make"
        if device != "cuda":
            return False, "torch's semi-structured sparse tensors are CUDA only"
        if case.dtype not in TORCH_SEMI_DTYPES:
            return False, "float16/bfloat16 only here (torch's float32 2:4 GEMM is CUTLASS's, in TF32)"
        limits = cls._DTYPE_SHAPE_CONSTRAINTS[case.dtype]
        rows, cols = limits.sparse_min_rows, limits.sparse_min_cols
        if case.params["N"] % rows or case.params["K"] % cols:
            return False, f"torch's {cls.BACKEND} weight needs N a multiple of {rows} and K of {cols}"
        why = _torch_semi_refusal(cutlass, case.dtype)
        return not why, why

    return available


# (cutlass, N, K, dtype) -> torch's error compressing a weight of that case: inputs() run outside
# the per-provider error handling, so the provider itself raises it, in its own row
_COMPRESSION_ERRORS: dict = {}


def _torch_semi_tensors(case: Case, device: str, w: torch.Tensor) -> list[torch.Tensor]:
    """[CUTLASS packed, CUTLASS meta, cuSPARSELt packed]: the tensors inside torch's two
    compressions of w, the float ones viewed as int16. Plain tensors: the harness copies them
    for its rotation and passes over them when it makes its float64 reference inputs, which
    torch's subclass would refuse."""
    def compressed(cutlass: bool) -> SparseSemiStructuredTensor | None:
        if not _torch_semi_available(cutlass)(case, device, "fwd")[0]:
            return None
        try:
            return _to_semi_structured(w, cutlass)
        except RuntimeError as exc:  # the availability probe was a 128 x 128 weight
            _COMPRESSION_ERRORS[(cutlass, *w.shape, w.dtype)] = (str(exc).splitlines() or [""])[0][:160]
            return None

    cutlass, cusparselt = compressed(True), compressed(False)
    stand_in = torch.empty(0, device=device)  # for a skipped provider
    return [stand_in if cutlass is None else cutlass.packed.view(torch.int16),
            stand_in if cutlass is None else cutlass.meta,
            stand_in if cusparselt is None else cusparselt.packed.view(torch.int16)]


def _torch_semi(cutlass: bool) -> Provider:
    cls = _torch_semi_class(cutlass)

    def build(case: Case):
        shape = torch.Size((case.params["N"], case.params["K"]))
        weights = {}  # id(packed) -> torch's sparse weight around one input set's tensors: no GPU work

        def fn(x, w, values, meta, b, cutlass_packed, cutlass_meta, cusparselt_packed):
            packed, packed_meta = (cutlass_packed, cutlass_meta) if cutlass else (cusparselt_packed, None)
            if packed.numel() == 0:  # the stand-in: torch could not compress this weight
                raise RuntimeError(f"to_sparse_semi_structured failed on this weight: "
                                   f"{_COMPRESSION_ERRORS.get((cutlass, *w.shape, w.dtype), '?')}")
            sparse = weights.get(id(packed))
            if sparse is None:
                sparse = weights[id(packed)] = cls(
                    shape, packed=packed.view(x.dtype), meta=packed_meta, packed_t=None, meta_t=None,
                    compressed_swizzled_bitmask=None,
                    # as to_sparse_semi_structured makes it
                    fuse_transpose_cusparselt=SparseSemiStructuredTensor._FUSE_TRANSPOSE,
                    alg_id_cusparselt=SparseSemiStructuredTensor._DEFAULT_ALG_ID)
            return F.linear(x, sparse, b)

        return fn

    return Provider(build=build, available=_torch_semi_available(cutlass))


# ---------------------------------------------------------------- inputs, effkern providers

def inputs(case: Case, device: str) -> list[torch.Tensor]:
    p, dt = case.params, case.dtype
    x = torch.randn(p["M"], p["K"], device=device, dtype=dt)
    # nn.Linear-like, then pruned and compressed offline, as a model is sparsified once
    w = ek.prune_24(torch.randn(p["N"], p["K"], device=device, dtype=dt) * p["K"] ** -0.5)
    values, meta = ek.compress_24(w)
    b = torch.randn(p["N"], device=device, dtype=dt)
    # every provider gets all eight and uses its own: the pruned dense weight for torch-linear,
    # torch's compressions for torch-semi-*, effkern's compression else
    return [x, w, values, meta, b, *_torch_semi_tensors(case, device, w)]


def reference(case: Case, x, w, values, meta, b, *torch_packed):
    # float64 inputs: the weight decompressed exactly, a float64 GEMM
    return sparse24_linear_reference(x, values, meta, b)


def _sparse24_linear(case: Case):
    return lambda x, w, values, meta, b, *torch_packed: ek.sparse24_linear(x, values, meta, b)


def _cuda_kernel_takes(case, device):
    if device != "cuda":
        return False, "the CUDA 2:4 kernel runs on CUDA tensors only"
    if not hasattr(torch.ops.effkern_C, "sparse24_linear"):
        return False, "CUDA 2:4 kernel not built (effkern._C predates it: rebuild)"
    try:
        from effkern.sparse24_cuda_layout import cuda_kernel_supports  # noqa: PLC0415  (absent until it is built)
    except ImportError:
        return False, "CUDA 2:4 kernel not built"
    p = case.params
    if not cuda_kernel_supports(p["M"], p["N"], p["K"], case.dtype):
        return False, "the CUDA 2:4 kernel does not take this shape or dtype"
    return True, ""


# the reference decompresses meta with its codes checked, a read back to the host per call
NOT_CAPTURABLE = "reads meta's validity back to the host each call: no CUDA graph"


def _effkern(backend: str) -> Provider:
    if backend == "cuda":
        return effkern_provider(backend, _sparse24_linear, limits=_cuda_kernel_takes)
    return effkern_provider(backend, _sparse24_linear, not_capturable=NOT_CAPTURABLE if backend == "reference" else "")


def providers() -> dict[str, Provider]:
    return {
        "effkern-triton": _effkern("triton"),
        "effkern-cuda": _effkern("cuda"),
        "reference": _effkern("reference"),
        # cuBLAS on the same pruned weight, stored dense: the same function, so checked; column "x dense"
        "torch-linear": Provider(build=lambda case: lambda x, w, values, meta, b, *torch_packed: F.linear(x, w, b),
                                 gbps_bytes=dense_weight_bytes),
        "torch-semi-cutlass": _torch_semi(cutlass=True),
        "torch-semi-cusparselt": _torch_semi(cutlass=False),
    }
