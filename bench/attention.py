"""Flash-attention benchmark: effkern's flash_attention against torch SDPA with each backend
forced (flash, efficient, cuDNN, math), SDPA's default choice, and FlexAttention (compiled).

Cases are (B, H, Hkv, Sq, Skv, D, causal): q [B, H, Sq, D], k and v [B, Hkv, Skv, D]. The
standard sweep is MHA (Hkv = H) with Sq = Skv: B*S = 16k tokens, H*D = 2048. Decoding cases
have Sq = 1 and GQA 32 query / 8 kv heads, forward only; their bytes are the K and V reads
alone, so % floor is the share of the copy bandwidth reached (GB/s = bytes / ms).

FLOPs (the issue's convention): forward 4*B*H*Sq*Skv*D, halved when causal; backward 2.5x the
forward, so fwd_bwd counts 3.5x. Bytes: q, k, v, out; the backward: q, k, v, out, dout, dq, dk,
dv (its lse and delta are O(Sq), not counted). bwd times the backward alone (the harness runs its
forward outside the timed region), the number FlashAttention's papers compare.

causal is effkern's bottom-right alignment; for Sq == Skv it is torch's is_causal. SDPA gets
torch.nn.attention.bias.causal_lower_right where Sq != Skv (only from --shapes).

torch's providers: a refused backend (wrong GPU, dtype, head dim, GQA, CPU) is found by a tiny
call per kind of case and reported as a skip with torch's reason, not as an ERROR row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import effkern as ek
from effkern.attention import flash_attention_reference

from .harness import GRAD_MODES, Case, Provider, effkern_provider, parse_dtypes

OP = "attention"
BASELINES = {"torch-sdpa": "x sdpa", "torch-sdpa-flash": "x flash", "torch-sdpa-cudnn": "x cudnn",
             "torch-flex": "x flex"}
# The op's definition in plain PyTorch (effkern's reference backend, fp32 math) sets "PyTorch's error".
ERROR_BASELINE = "reference"
POLICY_BACKENDS = {}  # one effkern backend (triton): no policy
MODES = ("fwd", "bwd", "fwd_bwd")

TOKENS, HIDDEN = 16384, 2048  # standard sweep: B*S and H*D
GPU_S = (512, 1024, 2048, 4096, 8192, 16384)
GPU_D = (64, 128)
GPU_QUICK_S, GPU_QUICK_D = (4096,), (128,)
# quick: the D = 64 target (forward >= 1.0x SDPA's default choice) against that baseline alone
GPU_QUICK_D64_PROVIDERS = frozenset({"effkern-triton", "torch-sdpa"})
DECODE_HQ, DECODE_HKV, DECODE_D = 32, 8, 128
DECODE_SKV = (4096, 16384, 65536, 131072)
DECODE_B = (1, 8, 64)
DECODE_QUICK = ((8, 32768),)  # (B, Skv)
# what fits an 80 GB card: the harness's float64 copies of q, k, v (4x the bf16 K/V) next to the
# inputs; B*Skv = 2^21 is 8.6 GB of bf16 K/V
DECODE_MAX_TOKENS = 2**21
CPU_CASE = dict(B=1, H=2, S=64, D=32)
CPU_DECODE = dict(B=1, H=4, Hkv=2, Skv=128, D=32)
# the math backend materializes the [B, H, Sq, Skv] scores (and their softmax, and with a backward
# their gradients): skipped above this many bytes of float32 scores
MATH_MAX_SCORE_BYTES = 8 * 2**30
# the chunked references (float64 for the harness, fp32 effkern reference provider) work on
# pieces of at most this many score elements
CHUNK_SCORES = 2**28


def _case(dtype, B, H, Sq, Skv, D, causal, Hkv=None, providers=None) -> Case:
    Hkv = H if Hkv is None else Hkv
    s = torch.empty((), dtype=dtype).element_size()
    fwd_flops = 4 * B * H * Sq * Skv * D // (2 if causal else 1)
    q_bytes, kv_bytes = s * B * H * Sq * D, 2 * s * B * Hkv * Skv * D
    # decoding: the K/V reads are what bounds it (and GB/s, bytes / ms, is their read rate)
    fwd_bytes = kv_bytes if Sq == 1 else 2 * q_bytes + kv_bytes  # read q, k, v; write out
    grad_bytes = 2 * q_bytes + kv_bytes  # read dout; write dq, dk, dv
    bwd_bytes = 2 * q_bytes + kv_bytes + grad_bytes  # the backward alone reads q, k, v, out too
    return Case(params={"dtype": str(dtype).removeprefix("torch."), "B": B, "H": H, "Hkv": Hkv, "Sq": Sq,
                        "Skv": Skv, "D": D, "causal": causal},
                dtype=dtype, flops={"fwd": fwd_flops, "bwd": fwd_flops * 5 // 2, "fwd_bwd": fwd_flops * 7 // 2},
                bytes={"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd_bwd": fwd_bytes + grad_bytes}, providers=providers,
                # out and dq sum over keys; dk and dv over the queries of the kv head's group
                reductions={"out": Skv, "grad0": Skv, "grad1": Sq * (H // Hkv), "grad2": Sq * (H // Hkv)},
                graph=Sq == 1)  # decoding: also timed from CUDA graphs, as decoding steps are run


def parse_shape(text: str) -> tuple[int, int, int, int, int]:
    """A --shapes value BxHxSqxSkvxD (MHA: k and v have H heads too)."""
    try:
        B, H, Sq, Skv, D = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is not BxHxSqxSkvxD (e.g. 4x16x4096x4096x128)") from None
    if min(B, H, Sq, Skv, D) < 1:
        raise SystemExit(f"--shapes: {text!r}: every size must be at least 1")
    return B, H, Sq, Skv, D


def cases(device: str, quick: bool, shapes: list[str] | None, dtypes: list[str] | None) -> list[Case]:
    dts = parse_dtypes(dtypes)
    if shapes:  # explicit shapes: every provider, causal and not
        parsed = [parse_shape(s) for s in shapes]
        dts = dts or ([torch.bfloat16] if device == "cuda" else [torch.float16])
        return [_case(d, B, H, Sq, Skv, D, c) for d in dts for (B, H, Sq, Skv, D) in parsed for c in (False, True)]
    if device == "cpu":  # the interpreter: tiny, fp16 (no bf16 tl.dot there); one suite, quick or not
        dts = dts or [torch.float16]
        p, dec = CPU_CASE, CPU_DECODE
        return ([_case(d, p["B"], p["H"], p["S"], p["S"], p["D"], c) for d in dts for c in (False, True)]
                + [_case(d, dec["B"], dec["H"], 1, dec["Skv"], dec["D"], False, Hkv=dec["Hkv"]) for d in dts])
    dts = dts or [torch.bfloat16]
    ss, ds = (GPU_QUICK_S, GPU_QUICK_D) if quick else (GPU_S, GPU_D)
    decode = DECODE_QUICK if quick else [(B, Skv) for Skv in DECODE_SKV for B in DECODE_B
                                         if B * Skv <= DECODE_MAX_TOKENS]
    # quick: the reference provider is not timed (it still sets the tolerance)
    every = frozenset(providers())
    timed = every - {"reference"} if quick else every
    out = [_case(d, TOKENS // S, HIDDEN // D, S, S, D, c, providers=timed)
           for d in dts for D in ds for S in ss for c in (False, True)]
    if quick:
        out += [_case(d, TOKENS // S, HIDDEN // 64, S, S, 64, c, providers=GPU_QUICK_D64_PROVIDERS)
                for d in dts for S in ss for c in (False, True)]
    out += [_case(d, B, DECODE_HQ, 1, Skv, DECODE_D, False, Hkv=DECODE_HKV, providers=timed)
            for d in dts for (B, Skv) in decode]
    return out


def inputs(case: Case, device: str) -> list[torch.Tensor]:
    p, dt = case.params, case.dtype
    q = torch.randn(p["B"], p["H"], p["Sq"], p["D"], device=device, dtype=dt)
    k = torch.randn(p["B"], p["Hkv"], p["Skv"], p["D"], device=device, dtype=dt)
    v = torch.randn(p["B"], p["Hkv"], p["Skv"], p["D"], device=device, dtype=dt)
    return [q, k, v]


# ---------------------------------------------------------------- references, in pieces

def _pieces(q, k, v):
    """(q, k, v) pieces over batch and whole kv-head groups, each with at most CHUNK_SCORES
    score elements (one piece, the tensors themselves, when they fit)."""
    B, Hq, Sq, _ = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if B * Hq * Sq * Skv <= CHUNK_SCORES:
        return [(q, k, v)]
    hk = max(1, min(Hkv, CHUNK_SCORES // (G * Sq * Skv)))
    out = []
    for qb, kb, vb in zip(q.split(1), k.split(1), v.split(1)):
        out += list(zip(qb.split(G * hk, dim=1), kb.split(hk, dim=1), vb.split(hk, dim=1)))
    return out


def _join(outs, B):
    """The inverse of _pieces for the outputs: heads within a batch row, then the rows."""
    if len(outs) == 1:
        return outs[0]
    per = len(outs) // B
    return torch.cat([torch.cat(outs[b * per:(b + 1) * per], dim=1) for b in range(B)])


class _PiecewiseReference(torch.autograd.Function):
    """flash_attention_reference (float64 for float64 inputs) piece by piece, backward by
    recomputing each piece: the full-size reference's [B, H, Sq, Skv] float64 scores and their
    autograd graph would not fit on the GPU at S = 16k."""

    @staticmethod
    def forward(ctx, q, k, v, causal):
        ctx.causal = causal
        ctx.save_for_backward(q, k, v)
        return _join([flash_attention_reference(*t, causal=causal)[0] for t in _pieces(q, k, v)], q.shape[0])

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        pieces = _pieces(q, k, v)
        gpieces = [g for g, _, _ in _pieces(grad, k, v)]  # grad has q's shape: the same split
        grads = [[], [], []]
        for (qp, kp, vp), gp in zip(pieces, gpieces):
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(n) for t, n in zip((qp, kp, vp), needs)]
                out = flash_attention_reference(*leaves, causal=ctx.causal)[0]
                wanted = [t for t in leaves if t.requires_grad]
                got = iter(torch.autograd.grad(out, wanted, gp))
            for i, n in enumerate(needs):
                grads[i].append(next(got) if n else None)
        B = q.shape[0]
        return (*(_join(g, B) if n else None for g, n in zip(grads, needs)), None)


def reference(case: Case, q, k, v):
    return _PiecewiseReference.apply(q, k, v, case.params["causal"])


# ---------------------------------------------------------------- effkern

def _effkern_fn(case: Case):
    causal = case.params["causal"]
    return lambda q, k, v: ek.flash_attention(q, k, v, causal=causal)


def _reference_fn(case: Case):
    causal = case.params["causal"]

    def fn(q, k, v):  # in pieces at large sizes (the fp32 scores of S = 16k would not fit); one call otherwise
        return _join([ek.flash_attention(*t, causal=causal) for t in _pieces(q, k, v)], q.shape[0])

    return fn


def _triton_dtypes(case, device):
    if case.dtype not in (torch.float16, torch.bfloat16):
        return False, "effkern's triton attention takes float16/bfloat16 only"
    return True, ""


def _gqa_decoding(case, device):
    ok, why = _triton_dtypes(case, device)
    if ok and not (case.params["Sq"] == 1 and case.params["H"] > case.params["Hkv"]):
        return False, "GQA decoding cases only (where the decoding forward packs query heads)"
    return ok, why


def _effkern(backend: str, env: dict[str, str] | None = None, limits=_triton_dtypes) -> Provider:
    if backend == "triton":
        return effkern_provider(backend, _effkern_fn, limits=limits, env=env)
    return effkern_provider(backend, _reference_fn)


# ---------------------------------------------------------------- torch SDPA

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def _sdpa_call(Sq: int, Skv: int, causal: bool, gqa: bool):
    """F.scaled_dot_product_attention with effkern's (bottom-right) causal alignment."""
    mask = None
    if causal and Sq != Skv:
        from torch.nn.attention.bias import causal_lower_right  # noqa: PLC0415

        mask = causal_lower_right(Sq, Skv)
    is_causal = causal and Sq == Skv
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                          enable_gqa=gqa)


def _sdpa_build(case: Case):
    p = case.params
    return _sdpa_call(p["Sq"], p["Skv"], p["causal"], p["Hkv"] != p["H"])


def _first_line(text: str, n: int = 200) -> str:
    return (str(text).strip().splitlines() or [""])[0][:n]


@functools.lru_cache(maxsize=None)
def _sdpa_refusal(backend: str | None, device: str, dtype: torch.dtype, H: int, Hkv: int, decode: bool,
                  uneven: bool, D: int, causal: bool, grad: bool) -> str:
    """Why torch SDPA (forced to backend; None: its default choice) refuses this kind of case
    ("" if it runs), found by a tiny call: torch's reasons come as warnings and an error."""
    Sq, Skv = (1, 128) if decode else ((64, 128) if uneven else (128, 128))
    G = H // Hkv
    hkv = min(Hkv, 2)
    q = torch.randn(1, hkv * G, Sq, D, device=device, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(1, hkv, Skv, D, device=device, dtype=dtype, requires_grad=grad) for _ in range(2))
    ctx = sdpa_kernel(SDPA_BACKENDS[backend]) if backend else contextlib.nullcontext()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with ctx:
                out = _sdpa_call(Sq, Skv, causal, G > 1)(q, k, v)
                if grad:
                    out.backward(torch.ones_like(out))
            if device == "cuda":
                torch.cuda.synchronize()
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            reasons = [_first_line(w.message, 160) for w in caught if "not used because" not in str(w.message)]
            reasons = [r for r in reasons if r] or [_first_line(exc)]
            return f"torch refuses it on {device}: " + "; ".join(dict.fromkeys(reasons))[:300]
    return ""


def _sdpa(backend: str | None) -> Provider:
    def available(case, device, mode):
        p = case.params
        if backend == "math" and 4 * p["B"] * p["H"] * p["Sq"] * p["Skv"] > MATH_MAX_SCORE_BYTES:
            return False, (f"the math backend materializes the scores: skipped above "
                           f"{MATH_MAX_SCORE_BYTES // 2**30} GiB of float32 scores")
        why = _sdpa_refusal(backend, device, case.dtype, p["H"], p["Hkv"], p["Sq"] == 1,
                            p["Sq"] != p["Skv"] and p["Sq"] != 1, p["D"], p["causal"], mode in GRAD_MODES)
        return not why, why

    context = functools.partial(sdpa_kernel, SDPA_BACKENDS[backend]) if backend else contextlib.nullcontext
    return Provider(build=_sdpa_build, available=available, context=context)


# ---------------------------------------------------------------- FlexAttention

@functools.lru_cache(maxsize=1)
def _flex_compiled(key: tuple):
    """The compiled flex_attention for one case (a fresh dynamo cache per case: clear of the recompile limit)."""
    from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415

    torch._dynamo.reset()
    return torch.compile(flex_attention, dynamic=False)


def _flex_build(case: Case):
    from torch.nn.attention.flex_attention import create_block_mask  # noqa: PLC0415

    p = case.params
    flex = _flex_compiled(tuple(p.items()))
    gqa = p["Hkv"] != p["H"]
    mask = None
    if p["causal"]:
        off = p["Skv"] - p["Sq"]

        def causal_mod(b, h, q_idx, kv_idx):
            return q_idx + off >= kv_idx

        mask = create_block_mask(causal_mod, None, None, p["Sq"], p["Skv"], device="cuda")
    return lambda q, k, v: flex(q, k, v, block_mask=mask, enable_gqa=gqa)


@functools.lru_cache(maxsize=4)
def _flex_refusal(key: tuple, grad: bool) -> str:
    """Why compiled flex_attention fails on this case ("" if it runs): tried on the case's own
    shapes, so the compilation is the one timed afterwards (compiling is what can fail)."""
    p = dict(key)
    case = _case(getattr(torch, p["dtype"]), p["B"], p["H"], p["Sq"], p["Skv"], p["D"], p["causal"], Hkv=p["Hkv"])
    try:
        q, k, v = (t.requires_grad_(grad) for t in inputs(case, "cuda"))
        out = _flex_build(case)(q, k, v)
        if grad:
            out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
    except Exception as exc:  # compile and lowering errors come in many types
        return f"torch refuses it here: {type(exc).__name__}: {_first_line(exc, 200)}"
    return ""


def _flex_available(case, device, mode):
    if device != "cuda":
        return False, "GPU only (compiled FlexAttention on a CPU is slow and not what is measured)"
    why = _flex_refusal(tuple(case.params.items()), mode in GRAD_MODES)
    return not why, why


def _no_decoding_backward(prov: Provider) -> Provider:
    """prov, skipped with a backward on the decoding cases (Sq = 1): those are measured forward only."""
    def available(case, device, mode):
        if mode in GRAD_MODES and case.params["Sq"] == 1:
            return False, "decoding cases (Sq = 1) are measured forward only"
        return prov.available(case, device, mode)

    return dataclasses.replace(prov, available=available)


def providers() -> dict[str, Provider]:
    return {name: _no_decoding_backward(prov) for name, prov in _providers().items()}


def _providers() -> dict[str, Provider]:
    return {
        "effkern-triton": _effkern("triton"),
        # K/V tiles by plain loads instead of TMA on Hopper (forward, dQ, split-KV decoding):
        # TMA's gain in the same run
        "effkern-triton-no-tma": _effkern("triton", {"EFFKERN_TRITON_TMA": "0"}),
        # decoding with a program per query head instead of per GQA group: the packing's gain
        "effkern-triton-no-gqa-packing": _effkern("triton", {"EFFKERN_TRITON_PACK_GQA": "0"}, _gqa_decoding),
        "reference": _effkern("reference"),
        "torch-sdpa": _sdpa(None),
        "torch-sdpa-flash": _sdpa("flash"),
        "torch-sdpa-efficient": _sdpa("efficient"),
        "torch-sdpa-cudnn": _sdpa("cudnn"),
        "torch-sdpa-math": _sdpa("math"),
        "torch-flex": Provider(build=_flex_build, available=_flex_available),
    }

