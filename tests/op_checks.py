"""What the tests of effkern's op families share (test_int4.py, test_int8.py, test_sparse24.py,
test_linear_gelu.py; the float64 rule also serves cuda_kernel_checks.py).

Skipping a test whose backend is missing; tests over lists of named cases; a result against
float64, with effkern.testing's tolerance of PyTorch's own error in the same precision; bad calls
raising clear errors; torch.library.opcheck over an op's sample inputs; a torch.compile'd training
step against eager mode; an op captured in a CUDA graph against eager mode (GPU); fine-tuning a
layer; a Triton kernel compiled for a GPU without one (the ``compile_for_gpu`` fixture,
conftest.py) landing on tensor cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effkern as ek
from effkern.testing import max_error, tolerance

# Shared memory a thread block may use, in bytes: A100 (sm_80) and H100's opt-in maximum (sm_90).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def needs_backend(backend: str, device: str = "cpu"):
    ok, why = ek.backend_available(backend, device)
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable on {device}: {why}")


def parametrize_by_name(cases: list):
    """Parametrizes a test's ``case`` over the indices of ``cases``, (name, ...) tuples, each test
    named by its case's name; the test makes the cases again (fresh tensors) and takes its own."""
    return pytest.mark.parametrize("case", range(len(cases)), ids=[c[0] for c in cases])


# ---------------------------------------------------------------------------- against float64

def assert_matches_float64(out, exact, torch_same, reduction: int, factor: float = 2.0, what: str = "output",
                           apart: tuple[int, ...] = ()):
    """out against ``exact``, the float64 result: its error may be at most ``factor`` times that of
    ``torch_same`` (PyTorch computing the same in the inputs' precision, torch_same's dtype) plus
    effkern.testing.tolerance's floor for sums of ``reduction`` terms (K for a linear layer).
    ``apart``: output columns (last dimension) held on their own, e.g. that of an outlier weight
    row 50x the others: in one maximum with the rest, its size would be every column's slack (a
    dropped bias elsewhere would pass)."""
    groups = [(slice(None), what)]
    if apart:
        rest = [c for c in range(out.shape[-1]) if c not in apart]
        groups = [(list(apart), f"{what}, columns {list(apart)}"), (rest, f"{what}, other columns")]
    for columns, name in groups:
        o, e, t = out[..., columns], exact[..., columns], torch_same[..., columns]
        err, base = max_error(o, e), max_error(t, e)
        limit = tolerance(base, e.abs().max().item() if e.numel() else 0.0, torch_same.dtype, reduction, factor)
        assert err <= limit, f"{name}: error {err:.3g} vs PyTorch's {base:.3g} in {torch_same.dtype} (limit {limit:.3g})"


def assert_linear_matches_float64(y, x, weight64, weight_same, bias=None, what: str = "output",
                                  apart: tuple[int, ...] = ()):
    """y, an op's x @ W^T + bias, against F.linear in float64 on ``weight64`` (W in float64): within
    2x the error of F.linear in x's dtype on ``weight_same`` (W as PyTorch would use it in that
    dtype); ``apart`` as for assert_matches_float64."""
    exact = F.linear(x.double(), weight64, None if bias is None else bias.double())
    assert_matches_float64(y, exact, F.linear(x, weight_same, bias), x.shape[-1], what=what, apart=apart)


# ---------------------------------------------------------------------------- int8 dequantization

def rounded_from(out, exact32):
    """Where out == exact32 rounded to out's dtype. Triton's interpreter rounds fp32 -> bf16 toward
    zero (GPUs round to nearest), so for bf16 either is accepted: the nearest bf16 value, or the
    fp32 value with its low 16 bits cut off, and nothing else."""
    if out.dtype != torch.bfloat16:
        return out == exact32.to(out.dtype)
    toward_zero = (exact32.contiguous().view(torch.int32) & -(1 << 16)).view(torch.float32).to(torch.bfloat16)
    return (out == exact32.to(torch.bfloat16)) | (out == toward_zero)


def assert_dequantized_from(out, acc, a_scale, b_scale, bias=None, what: str = "output"):
    """out == (acc * a_scale[m]) * b_scale[n] (+ bias[n]) in fp32, acc the exact integer sums
    rounded once to fp32, then rounded to out's dtype, with the last multiply and the add rounded
    apart (the interpreter, the reference) or fused into one fma (what the GPU compiler may
    emit): either, per element. Nothing else may differ: the int32 accumulation is exact."""
    scaled = acc.float() * a_scale[:, None]
    bias32, bias64 = (0.0, 0.0) if bias is None else (bias.float(), bias.double())
    separate = scaled * b_scale[None, :] + bias32
    fused = (scaled.double() * b_scale[None, :].double() + bias64).float()  # fp32 fma: one rounding
    off = ~(rounded_from(out, separate) | rounded_from(out, fused))
    assert not off.any(), f"{what}: {int(off.sum())} elements off, first at {off.nonzero()[0].tolist()}"


# ---------------------------------------------------------------------------- errors

def assert_bad_call_raises(backend: str, op, case):
    """case = (name, args, exception type, message regex): op(*args) under ``backend`` raises that
    exception with a message matching the regex."""
    _, args, exc, message = case
    with ek.use_backend(backend), pytest.raises(exc, match=message):
        op(*args)


# ---------------------------------------------------------------------------- registration

def assert_opcheck_passes(backend: str, samples):
    """torch.library.opcheck on each (op, args) of ``samples`` under ``backend``; a generator is
    drawn inside, so the inputs it makes with effkern's ops use that backend too."""
    needs_backend(backend)
    with ek.use_backend(backend):
        for op, args in samples:
            torch.library.opcheck(op, args)


def assert_compiles_like_eager(layer: torch.nn.Module, backend: str):
    """A training step, the mean square of ``layer``'s output, compiled with torch.compile(fullgraph=True,
    dynamic=True) under ``backend``: for two numbers of tokens (the second must reuse the dynamic
    graph) the loss and the gradients of the input and of each trainable parameter equal eager mode's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    needs_backend(backend)
    torch._dynamo.reset()
    params = [p for p in layer.parameters() if p.requires_grad]

    def step(x):
        return layer(x).square().mean()

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    with ek.use_backend(backend):
        for tokens in (5, 9):
            x = torch.randn(tokens, layer.in_features, requires_grad=True)
            loss = compiled(x)
            loss.backward()
            grads = [x.grad, *(p.grad for p in params)]
            layer.zero_grad(set_to_none=True)
            x_eager = x.detach().requires_grad_()
            expected = step(x_eager)
            expected.backward()
            torch.testing.assert_close(loss, expected)
            for got, want in zip(grads, [x_eager.grad, *(p.grad for p in params)], strict=True):
                assert got is not None and want is not None
                torch.testing.assert_close(got, want)
            layer.zero_grad(set_to_none=True)
            if tokens == 5:
                frames_after_the_first = counter.frame_count
    assert counter.frame_count == frames_after_the_first > 0  # the second number of tokens reused the graph


def assert_exports_like_eager(layer: torch.nn.Module, x):
    """torch.export of ``layer`` alone (batch dimension dynamic) gives a program whose module()
    computes what the layer does at another batch size, and torch.export.unflatten of a model
    holding the layer keeps it as a module that does too (either raises where a buffer's name
    collides with an attribute of the modules they make, such as their ``meta`` dict)."""
    batch = torch.export.Dim("batch")
    with ek.use_backend("reference"):
        exported = torch.export.export(layer, (x,), dynamic_shapes=({0: batch},))
        other = torch.cat([x, x[:1]])
        torch.testing.assert_close(exported.module()(other), layer(other), rtol=0, atol=0)
        model = torch.nn.Sequential(layer, torch.nn.ReLU())
        unflat = torch.export.unflatten(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)))
        torch.testing.assert_close(unflat(other), model(other), rtol=0, atol=0)


def assert_cuda_graph_replays_like_eager(backend: str, fn, make_inputs):
    """fn(*inputs) under ``backend``, and its backward for the inputs that require grad, captured
    in a CUDA graph once: for two fresh sets of inputs (make_inputs(seed), seeds 1 and 2) copied
    into the captured ones, a replay gives what eager mode gives for them (output and gradients),
    and the two replays differ (the graph reads its inputs, not values fixed at capture). The
    weights fn closes over stay as they are: a graph holds what was derived from them before it."""
    needs_backend(backend, "cuda")
    static = make_inputs(0)
    trained = [i for i, t in enumerate(static) if t.requires_grad]
    with ek.use_backend(backend):
        grad_out = torch.randn_like(fn(*static))

        def step():
            for i in trained:
                static[i].grad = None
            out = fn(*static)
            if trained:
                out.backward(grad_out)
            return out, [static[i].grad for i in trained]

        # torch's rule for capture: warm up on a side stream (autotuning, caches, lazy init)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, grads = step()

        replayed = []
        for seed in (1, 2):
            fresh = make_inputs(seed)
            with torch.no_grad():
                for s, f in zip(static, fresh, strict=True):
                    s.copy_(f)
            graph.replay()
            out_eager = fn(*fresh)
            if trained:
                out_eager.backward(grad_out)
            torch.testing.assert_close(out, out_eager, rtol=0, atol=0)
            for i, g in zip(trained, grads, strict=True):
                torch.testing.assert_close(g, fresh[i].grad, rtol=0, atol=0)
            replayed.append(out.clone())
    assert not torch.equal(replayed[0], replayed[1]), "the replays ignored their new inputs"


def assert_fine_tuning_lowers_the_loss(layer: torch.nn.Module, x, target, steps: int):
    """``steps`` of SGD (lr 0.1) on the mean squared error of layer(x) to ``target`` lower it."""
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = F.mse_loss(layer(x), target).item()
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(layer(x), target).backward()
        opt.step()
    assert F.mse_loss(layer(x), target).item() < before


def record_calls(monkeypatch, module, name: str, record) -> list:
    """Wrap ``module.name`` for the test: each call appends ``record(args, result)`` to the list
    returned (e.g. which kernel path a launcher took); keyword arguments pass through unrecorded."""
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(record(args, result))
        return result

    monkeypatch.setattr(module, name, spy)
    return calls


def tile_of(kwargs: dict) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M) of a weight GEMM launch's or config's kwargs."""
    from effkern.kernels._splitk import TILE_NAMES

    return tuple(kwargs[name] for name in TILE_NAMES)


def autotuned_tiles(tuned, named_args: dict | None = None, **kwargs) -> list:
    """The tiles (tile_of) that the autotuner ``tuned`` may pick for a launch with these arguments
    (those its pruning reads besides M, as Triton hands them over: the positional ones by name, the
    keyword ones apart): its configs that the pruning keeps for some row count (it reads M rounded
    up to a power of two; 512 is past the tallest tile)."""
    return [tile_of(c.kwargs) for rows in (2**i for i in range(10))
            for c in tuned.early_config_prune(tuned.configs, dict(named_args or {}, M=rows), **kwargs)]


def autotune_through_the_interpreter(monkeypatch) -> dict[str, int]:
    """The launchers' GPU path, autotuning, run here: launch() (kernels/_launch.py) takes the
    autotuned kernels, at the interpreter's pretend SM count; every autotuner of effkern's kernels
    starts with an empty cache and "benchmarks" each config its pruning keeps by running it once
    through the interpreter (its pre-hooks included), the first one it tries counting as the
    fastest. Returns {kernel name: configs run by benchmarks}, filled as the test runs."""
    from triton.runtime.autotuner import Autotuner

    from effkern.kernels import _launch, _splitk, _tma, attention, int4, int8, linear_gelu, sparse24

    monkeypatch.setenv("EFFKERN_TRITON_AUTOTUNE", "1")
    sms = _launch.sm_count(torch.device("cpu"))
    monkeypatch.setattr(_launch, "interpreted", lambda: False)
    for module in (_launch, _splitk, _tma, attention):
        monkeypatch.setattr(module, "sm_count", lambda device: sms)
    benchmarked: dict[str, int] = {}
    for module in (attention, int4, int8, linear_gelu, sparse24):
        for value in vars(module).values():
            for tuner in (value.values() if isinstance(value, dict) else (value,)):
                if isinstance(tuner, Autotuner):
                    def run_once(kernel_call, quantiles, name=tuner.base_fn.__name__):
                        kernel_call()
                        benchmarked[name] = benchmarked.get(name, 0) + 1
                        return [float(benchmarked[name])] * len(quantiles)

                    monkeypatch.setattr(tuner, "cache", {})
                    monkeypatch.setitem(tuner.__dict__, "do_bench", run_once)  # a cached_property on the class
    return benchmarked


# ---------------------------------------------------------------------------- GPU code, compiled here

def aligned_launch(types: dict, unit_strides=(), any_value=("M",)) -> dict:
    """compile_for_gpu's request fields for a kernel as a launch on contiguous, 16-byte aligned
    tensors specializes it: ``unit_strides`` equal to 1 (constexprs), every pointer and every other
    integer argument (sizes, strides) a multiple of 16, except ``any_value`` (e.g. the row count).
    The compiled code is then what such a launch runs (vectorized loads, asynchronous copies and
    the shared memory they take); without, the compiler sees element-wise loads."""
    return dict(types={a: t for a, t in types.items() if a not in unit_strides},
                constexprs={a: 1 for a in unit_strides},
                divisible=[a for a, t in types.items()
                           if a not in unit_strides and a not in any_value and (t.startswith("*") or t == "i32")])


def assert_compiles_onto_bf16_tensor_cores(compile_for_gpu, kernel: str, types: dict, constexprs: dict,
                                           launch_configs: dict, cc: int, unit_strides=()):
    """The Triton ``kernel`` ("module:function") compiled for sm_<cc> at each of ``launch_configs``
    (name -> the launcher's kwargs, BLOCK_M/N/K, GROUP_M, num_warps and num_stages among them), as
    an aligned launch with ``unit_strides`` specializes it (aligned_launch): bf16 mma instructions
    in its PTX and shared memory within SHARED_LIMIT[cc]."""
    launch = aligned_launch(types, unit_strides)
    requests = {}
    for name, cfg in launch_configs.items():
        blocks = {key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        requests[name] = dict(kernel=kernel, types=launch["types"], divisible=launch["divisible"],
                              constexprs=dict(constexprs, **launch["constexprs"], **blocks), cc=cc,
                              num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    for name, compiled in compile_for_gpu(requests).items():
        assert "bf16.bf16" in compiled["ptx"] and "mma" in compiled["ptx"], name
        assert compiled["shared"] <= SHARED_LIMIT[cc], name


def assert_tma_gemm_compiles_for_hopper(compile_for_gpu, kernel: str, shapes: list, descs: dict, types: dict,
                                        constexprs: dict, mma: str, spill_limit: int,
                                        names=("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"),
                                        aligned_sizes=("N", "K")) -> None:
    """A persistent TMA GEMM (kernels/_tma.py, ``kernel`` = "module:function") at each of its
    ``shapes`` [(BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)], compiled for sm_90a: ``descs`` maps
    its descriptor arguments to (element type, row block name, column block name), ``types`` the
    other runtime arguments (pointers and ``aligned_sizes`` taken as 16-divisible, as an aligned
    launch has them); ``names``: the kernel's names for the three blocks and the group size.
    Asserts Hopper's warpgroup MMA (``mma``, a regex, e.g. the operand types) and bulk
    tensor copies in the PTX, shared memory (stages and the epilogue's staging tiles) within
    the card, and at most ``spill_limit`` bytes of register spills."""
    import re

    requests = {}
    for bm, bn, bk, stages, warps in shapes:
        blocks = dict(zip(names, (bm, bn, bk, 8)))
        desc_types = {arg: f"tensordesc<{ty}[{blocks[rows]},{blocks[cols]}]>" for arg, (ty, rows, cols) in descs.items()}
        requests[f"{bm}x{bn}x{bk}/{stages}/{warps}"] = dict(
            kernel=kernel, types={**desc_types, **types}, constexprs=dict(constexprs, **blocks), cc=90,
            num_warps=warps, num_stages=stages, spills=True,
            divisible=[a for a, t in types.items() if t.startswith("*") or a in aligned_sizes])
    for name, compiled in compile_for_gpu(requests).items():
        ptx = compiled["ptx"]
        assert re.search(r"wgmma\.mma_async\S*" + mma, ptx), f"{name}: no wgmma {mma} in the PTX"
        assert "cp.async.bulk.tensor" in ptx, f"{name}: no TMA copies"
        assert compiled["shared"] <= SHARED_LIMIT[90], f"{name}: {compiled['shared']} bytes of shared memory"
        assert compiled["spill_bytes"] <= spill_limit, f"{name}: {compiled['spill_bytes']} bytes of spills"
