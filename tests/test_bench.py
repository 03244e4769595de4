"""The benchmark harness: its correctness column must catch wrong kernels, and its files must
hold what the README table and the auto policy are built from."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import effkern as ek
from bench import attention as bench_attention
from bench import harness
from bench import int4 as bench_int4
from bench import int8 as bench_int8
from bench import linear_gelu as bench_linear_gelu
from bench import sparse24 as bench_sparse24
from bench import sparse24_int8 as bench_sparse24_int8
from effkern import _policy
from effkern.int4 import dequantize_int4, int4_linear_reference
from effkern.int8 import dequantize_int8, int8_linear_reference, int8_weight_only_linear_reference
from effkern.sparse24 import decompress_24_reference, sparse24_int8_linear_reference, sparse24_linear_reference

from op_checks import needs_backend

CEIL = {"gemm_tflops": 1.0, "int8_tops": 2.0, "copy_gbps": 1.0, "gemm_method": "test", "int8_method": "test",
        "copy_method": "test"}


def _run(providers: dict, tmp_path):
    case = bench_linear_gelu._case(torch.float32, "none", 5, 12, 16)
    run = harness.run_op(bench_linear_gelu, [case], "cpu", CEIL, list(providers), ["fwd", "fwd_bwd"],
                         checkpoint=lambda r: None)
    table = harness.write_results(run, tmp_path, "test", plot=False)
    return run, table


def _doubled_gradient(t):
    """t's values, with twice its gradient flowing back: a right forward, a wrong backward."""
    return 2 * t - t.detach()


def test_harness_marks_wrong_providers_fail(tmp_path, monkeypatch):
    wrong = {
        "torch-eager": harness.Provider(build=bench_linear_gelu._eager),
        "bias-dropped": harness.Provider(build=lambda case: lambda x, w, b: F.gelu(F.linear(x, w))),
        "tanh-for-erf": harness.Provider(build=lambda case: lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh")),
        "gemm-only": harness.Provider(build=lambda case: F.linear, checked=False),
        # right outputs and input gradients: only the weight's or the bias's gradient is wrong
        "weight-grad-doubled": harness.Provider(build=lambda case: lambda x, w, b: F.gelu(
            F.linear(x, _doubled_gradient(w), b))),
        "no-bias-grad": harness.Provider(build=lambda case: lambda x, w, b: F.gelu(F.linear(x, w, b.detach()))),
    }
    monkeypatch.setattr(bench_linear_gelu, "providers", lambda: wrong)
    run, table = _run(wrong, tmp_path)
    status = {(r["provider"], r["mode"]): r["status"] for r in run.rows}
    assert status[("torch-eager", "fwd")] == status[("torch-eager", "fwd_bwd")] == "ok"
    for name in ("bias-dropped", "tanh-for-erf"):
        assert status[(name, "fwd")] == status[(name, "fwd_bwd")] == "FAIL", name
    for name in ("weight-grad-doubled", "no-bias-grad"):
        assert (status[(name, "fwd")], status[(name, "fwd_bwd")]) == ("ok", "FAIL"), name
    errors = {r["provider"]: r["errors"] for r in run.rows if r["mode"] == "fwd_bwd"}
    assert set(errors["torch-eager"]) == {"out", "grad0", "grad1", "grad2"}  # x, weight, bias
    assert errors["no-bias-grad"]["grad2"] == float("inf")
    assert status[("gemm-only", "fwd")] == "timing only"
    assert "FAIL" in table
    rows = json.loads((tmp_path / "linear_gelu.json").read_text())["rows"]
    assert len(rows) == len(run.rows) and all(r["ms"] > 0 for r in rows)
    assert (tmp_path / "linear_gelu.csv").read_text().count("\n") == len(rows) + 1


def test_a_provider_whose_availability_check_raises_is_skipped_with_the_reason(tmp_path, monkeypatch):
    """As on a GPU machine whose build failed (effkern.kernels not installed): the run goes on."""
    def unknowable(case, device, mode):
        raise ModuleNotFoundError("No module named 'effkern.kernels'")

    providers = {"torch-eager": harness.Provider(build=bench_linear_gelu._eager),
                 "broken": harness.Provider(build=bench_linear_gelu._eager, available=unknowable)}
    monkeypatch.setattr(bench_linear_gelu, "providers", lambda: providers)
    run, _ = _run(providers, tmp_path)
    assert {r["provider"] for r in run.rows} == {"torch-eager"}
    assert run.skipped == {("broken", "availability check failed: ModuleNotFoundError: No module named "
                                      "'effkern.kernels'"): 2}
    assert not list(tmp_path.glob("*.tmp"))  # the results were written through temporary files, all renamed


@pytest.mark.parametrize("family", [bench_sparse24, bench_sparse24_int8])
def test_sparse24_reference_is_not_timed_in_cuda_graphs(family):
    """Its meta check reads back to the host: a CUDA graph cannot capture it."""
    case = family.cases("cpu", True, None, None)[0]
    ok, why = family.providers()["reference"].available(case, "cuda", "fwd_graph")
    assert not ok and "no CUDA graph" in why
    assert family.providers()["reference"].available(case, "cpu", "fwd") == (True, "")


def test_policy_records_the_faster_backend(tmp_path, monkeypatch):
    run = harness.Run(op="linear_gelu", device="cuda", ceil={}, baselines={})
    params = {"dtype": "bfloat16", "approximate": "none", "M": 64, "N": 128, "K": 256}
    for provider, mode, ms, status in [("effkern-triton", "fwd", 1.0, "ok"), ("effkern-cuda", "fwd", 2.0, "ok"),
                                       ("effkern-triton", "fwd_bwd", 1.0, "FAIL"), ("effkern-cuda", "fwd_bwd", 3.0, "ok")]:
        run.rows.append({"provider": provider, "mode": mode, "params": params, "ms": ms, "status": status})
    monkeypatch.setattr(harness, "REPO", tmp_path)
    monkeypatch.setattr(harness, "device_name", lambda: "GPU X")
    # a shape where one backend ran alone (the other unavailable there) compared nothing
    alone = {**params, "M": 4096}
    run.rows.append({"provider": "effkern-triton", "mode": "fwd", "params": alone, "ms": 1.0, "status": "ok"})
    path = harness.write_policy(run, bench_linear_gelu.POLICY_BACKENDS, "test")
    entries = json.loads(path.read_text())["devices"]["GPU X"]["entries"]
    # a failing row never wins, however fast
    assert entries == [{**params, "fwd": "triton", "fwd_bwd": "cuda"}]


def _only(quant: str, fn) -> harness.Provider:
    """A provider of one of the int8 functions, run on the cases of that quantization only."""
    return harness.Provider(build=lambda case: fn,
                            available=lambda case, device, mode: (case.params["quant"] == quant, f"{quant} only"))


def _per_tensor_w8a8(x, w, qw, scale, b):
    x_scale = x.abs().max() / 127  # one scale for all of x instead of one per token
    xq = torch.round(x / x_scale).clamp(-127, 127)
    return (xq @ qw.float().t()) * x_scale * scale + b  # integer sums below 2^24: exact in fp32


def test_int8_harness_marks_wrong_providers_fail(tmp_path, monkeypatch):
    # fp32, where the tolerance is far below a quantization step: the W8A8 and W8A16 functions differ
    wrong = {
        "bias-dropped": _only("w8a8", lambda x, w, qw, scale, b: int8_linear_reference(x, qw, scale)),
        "per-tensor": _only("w8a8", _per_tensor_w8a8),
        "x-unquantized": _only("w8a8", lambda x, w, qw, scale, b: int8_weight_only_linear_reference(x, qw, scale, b)),
        "fp16-weight": _only("w8a16", lambda x, w, qw, scale, b: F.linear(
            x, dequantize_int8(qw, scale, torch.float16).float(), b)),
    }
    provs = {**bench_int8.providers(), **wrong}
    monkeypatch.setattr(bench_int8, "providers", lambda: provs)
    cases = [bench_int8._case(torch.float32, q, 5, 24, 40) for q in ("w8a8", "w8a16")]
    run = harness.run_op(bench_int8, cases, "cpu", CEIL, list(provs), ["fwd", "fwd_bwd"], checkpoint=lambda r: None)
    status = {(r["provider"], r["params"]["quant"], r["mode"]): r["status"] for r in run.rows}
    assert {mode for _, _, mode in status} == {"fwd"}  # forward only
    assert ek.backend_available("triton", "cpu")[0]  # effkern-triton is Triton's interpreter here
    expected = {("effkern-triton", "w8a8"): "ok", ("effkern-triton-fused", "w8a8"): "ok",
                ("reference", "w8a8"): "ok", ("torch-int-mm", "w8a8"): "ok",
                ("effkern-triton", "w8a16"): "ok", ("reference", "w8a16"): "ok",
                ("torch-linear", "w8a8"): "timing only", ("torch-linear", "w8a16"): "timing only",
                ("bias-dropped", "w8a8"): "FAIL", ("per-tensor", "w8a8"): "FAIL",
                ("x-unquantized", "w8a8"): "FAIL", ("fp16-weight", "w8a16"): "FAIL"}
    assert {(p, q): s for (p, q, _), s in status.items()} == expected
    for r in run.rows:  # W8A8 runs on int8 tensor cores: held against that ceiling
        rate = CEIL["int8_tops" if r["params"]["quant"] == "w8a8" else "gemm_tflops"]
        assert r["pct_gemm"] == 100 * r["tflops"] / rate
        # GB/s of the weight reads: the int8 weight and its scales; torch-linear's fp32 weight
        weight = 4 * 24 * 40 if r["provider"] == "torch-linear" else 24 * 40 + 4 * 24
        assert r["gbps"] == pytest.approx(weight / (r["ms"] * 1e-3) / 1e9)
        assert r["pct_copy"] == pytest.approx(100 * r["gbps"] / CEIL["copy_gbps"])


def test_int8_policy_records_the_faster_quantization(tmp_path, monkeypatch):
    run = harness.Run(op="int8", device="cuda", ceil={}, baselines={})
    params = {"dtype": "bfloat16", "quant": "w8a8", "M": 16, "N": 64, "K": 64}
    for provider, ms in (("effkern-triton", 2.0), ("effkern-triton-fused", 1.0)):
        run.rows.append({"provider": provider, "mode": "fwd", "ms": ms, "status": "ok", "params": params})
    monkeypatch.setattr(harness, "REPO", tmp_path)
    monkeypatch.setattr(harness, "device_name", lambda: "GPU X")
    path = harness.write_policy(run, bench_int8.POLICY_BACKENDS, "test")
    assert json.loads(path.read_text())["devices"]["GPU X"]["entries"] == [{**params, "fwd": "fused"}]


def test_int8_providers_force_each_quantization(monkeypatch):
    from effkern import int8 as int8_module

    monkeypatch.setenv("EFFKERN_INT8_QUANTIZATION", "auto")
    seen = {}
    for name in ("effkern-triton", "effkern-triton-fused"):
        with bench_int8.providers()[name].context():
            seen[name] = int8_module.w8a8_quantization()
    assert seen == {"effkern-triton": "separate", "effkern-triton-fused": "fused"}
    assert int8_module.w8a8_quantization() == "auto"  # restored
    w8a16 = bench_int8._case(torch.float16, "w8a16", 4, 8, 16)
    assert bench_int8.providers()["effkern-triton-fused"].available(w8a16, "cpu", "fwd") == (
        False, "W8A8 only (the fused quantization of the activations)")


def test_no_tma_providers_time_only_cases_the_tma_kernels_take():
    """No-TMA timings only where effkern would run a TMA kernel: linear_gelu from 64 rows, W8A8
    from 65 (fewer: split-K), and never W8A16."""
    needs_backend("triton")  # their limits import the Triton kernels' constants
    gelu = bench_linear_gelu.providers()["effkern-triton-no-tma"]
    assert not gelu.available(bench_linear_gelu._case(torch.float16, "none", 63, 16, 16), "cpu", "fwd")[0]
    assert gelu.available(bench_linear_gelu._case(torch.float16, "none", 64, 16, 16), "cpu", "fwd")[0]
    int8 = bench_int8.providers()["effkern-triton-no-tma"]
    for quant, M, available in (("w8a8", 64, False), ("w8a8", 65, True), ("w8a16", 65, False)):
        assert int8.available(bench_int8._case(torch.float16, quant, M, 16, 16), "cpu", "fwd")[0] == available


@pytest.mark.parametrize("bench_op", [bench_linear_gelu, bench_int8, bench_attention],
                         ids=["linear_gelu", "int8", "attention"])
def test_no_tma_providers_turn_the_tma_kernels_off_while_they_run(bench_op, monkeypatch):
    from effkern.kernels import _tma

    monkeypatch.delenv("EFFKERN_TRITON_TMA", raising=False)
    with bench_op.providers()["effkern-triton-no-tma"].context():
        assert not _tma.tma_on()
    assert _tma.tma_on() and "EFFKERN_TRITON_TMA" not in os.environ  # unset again, as before


def test_no_gqa_packing_provider_times_gqa_decoding_with_the_packing_off(monkeypatch):
    from effkern.kernels import _launch

    prov = bench_attention.providers()["effkern-triton-no-gqa-packing"]
    decoding = {Hkv: bench_attention._case(torch.float16, 1, 4, 1, 128, 32, False, Hkv=Hkv) for Hkv in (2, 4)}
    assert prov.available(decoding[2], "cpu", "fwd")[0]
    assert not prov.available(decoding[4], "cpu", "fwd")[0]  # MHA: nothing to pack
    assert not prov.available(bench_attention._case(torch.float16, 1, 4, 64, 64, 32, False, Hkv=2), "cpu", "fwd")[0]
    monkeypatch.delenv("EFFKERN_TRITON_PACK_GQA", raising=False)
    with prov.context():
        assert not _launch.switch_on("EFFKERN_TRITON_PACK_GQA")
    assert _launch.switch_on("EFFKERN_TRITON_PACK_GQA")


def _int4_wrong(dequantize) -> harness.Provider:
    """A provider computing F.linear on a wrongly dequantized weight (``dequantize(qweight, scales, zeros)``)."""
    return harness.Provider(build=lambda case: lambda x, w, qweight, scales, zeros, b, *_: F.linear(
        x, dequantize(qweight, scales, zeros).to(x.dtype), b))


def test_int4_harness_marks_wrong_providers_fail(tmp_path, monkeypatch):
    # fp32, four groups per row (group 32, K 128): per-row and per-group scales differ
    G = 32
    wrong = {
        "zeros-ignored": _int4_wrong(lambda q, s, z: dequantize_int4(q, s, torch.zeros_like(z), G)),
        "per-row-scales": _int4_wrong(lambda q, s, z: dequantize_int4(q, s[:, :1].expand_as(s), z, G)),
        "bias-dropped": harness.Provider(build=lambda case: lambda x, w, qweight, scales, zeros, b, *_:
                                         int4_linear_reference(x, qweight, scales, zeros, G)),
    }
    provs = {**bench_int4.providers(), **wrong}
    monkeypatch.setattr(bench_int4, "providers", lambda: provs)
    case = bench_int4._case(torch.float32, 5, 32, 128, group_size=G)
    run = harness.run_op(bench_int4, [case], "cpu", CEIL, list(provs), ["fwd", "fwd_bwd"], checkpoint=lambda r: None)
    status = {(r["provider"], r["mode"]): r["status"] for r in run.rows}
    assert ek.backend_available("triton", "cpu")[0]  # effkern-triton is Triton's interpreter here
    # forward only; torch-int4pack is torch's CPU int4 GEMM on its own packing of the same q, scales, zeros
    assert status == {("effkern-triton", "fwd"): "ok", ("reference", "fwd"): "ok", ("torch-int4pack", "fwd"): "ok",
                      ("torch-linear", "fwd"): "timing only", ("zeros-ignored", "fwd"): "FAIL",
                      ("per-row-scales", "fwd"): "FAIL", ("bias-dropped", "fwd"): "FAIL"}
    assert [p for p, _ in run.skipped] == ["effkern-cuda"]
    # bytes: x, bias, output in fp32, the weight at half a byte per value, a scale and a zero per group
    assert case.bytes["fwd"] == 4 * (5 * 128 + 32 + 5 * 32) + 32 * 128 // 2 + 2 * 4 * 32 * (128 // G)


def test_int4_policy_is_read_by_shape_and_group_size(tmp_path, monkeypatch):
    run = harness.Run(op="int4", device="cuda", ceil={}, baselines={})
    for M, triton_ms, cuda_ms in [(1, 2.0, 1.0), (4096, 1.0, 2.0)]:
        params = {"dtype": "bfloat16", "group_size": 128, "M": M, "N": 4096, "K": 4096}
        run.rows += [{"provider": "effkern-triton", "mode": "fwd", "params": params, "ms": triton_ms, "status": "ok"},
                     {"provider": "effkern-cuda", "mode": "fwd", "params": params, "ms": cuda_ms, "status": "ok"},
                     {"provider": "torch-int4pack", "mode": "fwd", "params": params, "ms": 0.1, "status": "ok"}]
    monkeypatch.setattr(harness, "REPO", tmp_path)
    monkeypatch.setattr(harness, "device_name", lambda: "GPU X")
    path = harness.write_policy(run, bench_int4.POLICY_BACKENDS, "test")
    assert path == tmp_path / "effkern" / "policies" / "int4.json"
    monkeypatch.setattr(_policy, "POLICY_DIR", path.parent)
    _policy._entries.cache_clear()
    try:  # what effkern.int4's auto would ask; a baseline never wins
        def choose(M, **match):
            return _policy.choose("int4", "fwd", "GPU X", dtype="bfloat16", M=M, N=4096, K=4096, **match)

        assert choose(2, group_size=128) == "cuda" and choose(2048, group_size=128) == "triton"
        assert choose(2, group_size=64) is None  # no measurement for that group size
    finally:
        _policy._entries.cache_clear()


def _values_at_positions_0_1(x, w, values, meta, b, *_):
    """F.linear with the metadata ignored: each group's two values at its positions 0 and 1."""
    N, K = w.shape
    dense = values.new_zeros(N, K // 4, 4)
    dense[..., :2] = values.view(N, K // 4, 2)
    return F.linear(x, dense.view(N, K), b)


def test_sparse24_harness_marks_wrong_providers_fail(tmp_path, monkeypatch):
    unpruned = {}  # id(pruned weight) -> the weight it was pruned from
    prune = ek.prune_24

    def prune_and_remember(weight):
        pruned = prune(weight)
        unpruned[id(pruned)] = weight
        return pruned

    monkeypatch.setattr(ek, "prune_24", prune_and_remember)
    wrong = {
        "metadata-ignored": harness.Provider(build=lambda case: _values_at_positions_0_1),
        "bias-dropped": harness.Provider(build=lambda case: lambda x, w, values, meta, b, *_:
                                         sparse24_linear_reference(x, values, meta)),
        "unpruned": harness.Provider(build=lambda case: lambda x, w, values, meta, b, *_:
                                     F.linear(x, unpruned[id(w)], b)),
        # a right forward, twice the input gradient
        "input-grad-doubled": harness.Provider(build=lambda case: lambda x, w, values, meta, b, *_:
                                               sparse24_linear_reference(_doubled_gradient(x), values, meta, b)),
    }
    provs = {**bench_sparse24.providers(), **wrong}
    monkeypatch.setattr(bench_sparse24, "providers", lambda: provs)
    case = bench_sparse24._case(torch.float32, 5, 32, 64)
    run = harness.run_op(bench_sparse24, [case], "cpu", CEIL, list(provs), ["fwd", "bwd", "fwd_bwd"],
                         checkpoint=lambda r: None)
    status = {(r["provider"], r["mode"]): r["status"] for r in run.rows}
    assert ek.backend_available("triton", "cpu")[0]  # effkern-triton is Triton's interpreter here
    # fwd and bwd (not fwd_bwd); torch-linear runs the same function on the pruned weight stored dense
    right, wrong_forward = ("effkern-triton", "reference", "torch-linear"), ("metadata-ignored", "bias-dropped",
                                                                             "unpruned")
    assert status == {**{(p, m): "ok" for p in right for m in ("fwd", "bwd")},
                      **{(p, m): "FAIL" for p in wrong_forward for m in ("fwd", "bwd")},
                      ("input-grad-doubled", "fwd"): "ok", ("input-grad-doubled", "bwd"): "FAIL"}
    # bwd: x's gradient alone (GRAD_INPUTS), so the dense weight torch-linear reads needs none
    assert all(set(r["errors"]) == {"out", "grad0"} for r in run.rows if r["mode"] == "bwd")
    skipped = {(p, why) for p, why in run.skipped}
    assert {p for p, _ in skipped} == {"effkern-cuda", "torch-semi-cutlass", "torch-semi-cusparselt"}
    for p in ("torch-semi-cutlass", "torch-semi-cusparselt"):
        assert {why for q, why in skipped if q == p} == {
            "torch's semi-structured sparse tensors are CUDA only",
            "torch's input gradient needs a packed_t that to_sparse_semi_structured does not make"}
    # bytes: x, bias, output in fp32, half the weight's values, 4 bits of metadata per group of 4;
    # bwd: dY, W compressed, grad_x
    assert case.bytes["fwd"] == 4 * (5 * 64 + 32 * 64 // 2 + 32 + 5 * 32) + 32 * 64 // 8
    assert case.bytes["bwd"] == 4 * (5 * 32 + 32 * 64 // 2 + 5 * 64) + 32 * 64 // 8


def test_sparse24_torch_semi_baselines_run_in_graph_mode_not_in_gradient_modes(monkeypatch):
    monkeypatch.setattr(bench_sparse24, "_torch_semi_refusal", lambda cutlass, dtype: "")  # a GPU that takes it
    case = bench_sparse24._case(torch.bfloat16, 16, 4096, 4096)
    for cutlass in (True, False):
        available = bench_sparse24._torch_semi_available(cutlass)
        assert available(case, "cuda", "fwd") == available(case, "cuda", "fwd_graph") == (True, "")
        assert not any(available(case, "cuda", mode)[0] for mode in harness.GRAD_MODES)


def test_sparse24_a_weight_torch_cannot_compress_is_an_error_row_not_a_crash(monkeypatch):
    """torch's conversion runs in inputs(), outside the per-provider error handling: a refusal
    there becomes its provider's ERROR row with torch's message, and the run goes on."""
    def refuse(weight, cutlass):
        raise RuntimeError("CUDA out of memory (a stand-in refusal)")

    monkeypatch.setattr(bench_sparse24, "_torch_semi_available", lambda cutlass: lambda case, device, mode: (True, ""))
    monkeypatch.setattr(bench_sparse24, "_to_semi_structured", refuse)
    case = bench_sparse24._case(torch.float32, 5, 32, 64)
    run = harness.run_op(bench_sparse24, [case], "cpu", CEIL, ["torch-semi-cutlass", "reference"], ["fwd"],
                         checkpoint=lambda r: None)
    status = {r["provider"]: (r["status"], r.get("note", "")) for r in run.rows}
    assert status["reference"][0] == "ok"
    assert status["torch-semi-cutlass"][0] == "ERROR" and "a stand-in refusal" in status["torch-semi-cutlass"][1]


def test_sparse24_policy_is_read_by_shape(tmp_path, monkeypatch):
    run = harness.Run(op="sparse24", device="cuda", ceil={}, baselines={})
    for M, triton_ms, cuda_ms in [(1, 2.0, 1.0), (4096, 1.0, 2.0)]:
        params = {"dtype": "bfloat16", "M": M, "N": 4096, "K": 4096}
        run.rows += [{"provider": "effkern-triton", "mode": "fwd", "params": params, "ms": triton_ms, "status": "ok"},
                     {"provider": "effkern-cuda", "mode": "fwd", "params": params, "ms": cuda_ms, "status": "ok"},
                     {"provider": "torch-semi-cusparselt", "mode": "fwd", "params": params, "ms": 0.1,
                      "status": "ok"},
                     # bwd, the input gradient: the dgrad kernel (triton) against the dense expansion (cuda)
                     {"provider": "effkern-triton", "mode": "bwd", "params": params, "ms": cuda_ms, "status": "ok"},
                     {"provider": "effkern-cuda", "mode": "bwd", "params": params, "ms": triton_ms, "status": "ok"},
                     {"provider": "torch-linear", "mode": "bwd", "params": params, "ms": 0.1, "status": "ok"}]
    monkeypatch.setattr(harness, "REPO", tmp_path)
    monkeypatch.setattr(harness, "device_name", lambda: "GPU X")
    path = harness.write_policy(run, bench_sparse24.POLICY_BACKENDS, "test")
    assert path == tmp_path / "effkern" / "policies" / "sparse24.json"
    entries = json.loads(path.read_text())["devices"]["GPU X"]["entries"]
    assert [sorted(e) for e in entries] == [["K", "M", "N", "bwd", "dtype", "fwd"]] * 2
    monkeypatch.setattr(_policy, "POLICY_DIR", path.parent)
    _policy._entries.cache_clear()
    try:  # what effkern.sparse24's auto asks; a baseline never wins
        def choose(M, dtype="bfloat16", mode="fwd"):
            return _policy.choose("sparse24", mode, "GPU X", dtype=dtype, M=M, N=4096, K=4096)

        assert choose(2) == "cuda" and choose(2048) == "triton"
        assert choose(2, mode="bwd") == "triton" and choose(2048, mode="bwd") == "cuda"
        assert choose(2, dtype="float16") is None  # no measurement in that dtype
    finally:
        _policy._entries.cache_clear()


def test_sparse24_int8_harness_marks_wrong_providers_fail(tmp_path, monkeypatch):
    # fp32, where the tolerance is far below a quantization step
    def first_two_kept(values, meta):
        """The int8 weight read as if every group kept positions 0 and 1 (the metadata ignored)."""
        return decompress_24_reference(values, torch.full_like(meta, 0x44))

    wrong = {
        "metadata-ignored": harness.Provider(build=lambda case: lambda x, w, qw, values, meta, scale, b, packed:
                                             int8_linear_reference(x, first_two_kept(values, meta), scale, b)),
        "scale-ignored": harness.Provider(build=lambda case: lambda x, w, qw, values, meta, scale, b, packed:
                                          sparse24_int8_linear_reference(x, values, meta, torch.ones_like(scale), b)),
        "x-unquantized": harness.Provider(build=lambda case: lambda x, w, qw, values, meta, scale, b, packed:
                                          F.linear(x, qw.to(x.dtype) * scale[:, None].to(x.dtype), b)),
    }
    provs = {**bench_sparse24_int8.providers(), **wrong}
    monkeypatch.setattr(bench_sparse24_int8, "providers", lambda: provs)
    case = bench_sparse24_int8._case(torch.float32, 5, 32, 64)
    run = harness.run_op(bench_sparse24_int8, [case], "cpu", CEIL, list(provs), ["fwd", "fwd_bwd"],
                         checkpoint=lambda r: None)
    status = {(r["provider"], r["mode"]): r["status"] for r in run.rows}
    assert ek.backend_available("triton", "cpu")[0]  # effkern-triton is Triton's interpreter here
    assert status == {("effkern-triton", "fwd"): "ok", ("reference", "fwd"): "ok", ("int8-dense", "fwd"): "ok",
                      ("torch-linear", "fwd"): "timing only", ("metadata-ignored", "fwd"): "FAIL",
                      ("scale-ignored", "fwd"): "FAIL", ("x-unquantized", "fwd"): "FAIL"}
    assert {p for p, _ in run.skipped} == {"effkern-cuda", "torch-cusparselt"}
    assert ("torch-cusparselt", "torch's cuSPARSELt GEMMs are CUDA only") in run.skipped
    for r in run.rows:  # int8 tensor cores' ceiling; GB/s of the weight reads in each provider's format
        assert r["pct_gemm"] == 100 * r["tflops"] / CEIL["int8_tops"]
        weight = {"torch-linear": 4 * 32 * 64, "int8-dense": 32 * 64 + 4 * 32}.get(r["provider"],
                                                                                 32 * 64 // 2 + 32 * 64 // 8 + 4 * 32)
        assert r["gbps"] == pytest.approx(weight / (r["ms"] * 1e-3) / 1e9)


def test_sparse24_int8_cusparselt_baseline_computes_the_op(monkeypatch):
    """The torch-cusparselt provider's own steps (PyTorch's per-token quantization, the rows padded
    to 16, the transposes, the dequantization), with torch's cuSPARSELt calls stood in for on the
    CPU by the product they compute (an int32 W @ B): the op's result. What torch's kernel itself
    returns is checked on a GPU, in the benchmark's ok column."""
    monkeypatch.setattr(torch, "_cslt_compress", lambda w: w.clone())
    monkeypatch.setattr(torch, "_cslt_sparse_mm", lambda packed, dense, out_dtype: packed.int() @ dense.int())
    case = bench_sparse24_int8._case(torch.float32, 5, 32, 64)
    x, w, qweight, values, meta, scale, b, _ = bench_sparse24_int8.inputs(case, "cpu")
    packed = bench_sparse24_int8._cusparselt_compress(qweight)
    got = bench_sparse24_int8.cusparselt_w8a8(x, w, qweight, values, meta, scale, b, packed)
    torch.testing.assert_close(got, sparse24_int8_linear_reference(x, values, meta, scale, b))
    with pytest.raises(RuntimeError, match="torch._cslt_compress failed on this weight"):
        bench_sparse24_int8.cusparselt_w8a8(x, w, qweight, values, meta, scale, b, qweight[:0])


def test_sparse24_int8_policy_is_what_auto_reads(tmp_path, monkeypatch):
    run = harness.Run(op="sparse24_int8", device="cuda", ceil={}, baselines={})
    params = {"dtype": "bfloat16", "M": 16, "N": 4096, "K": 4096}
    run.rows += [{"provider": "effkern-triton", "mode": "fwd", "params": params, "ms": 2.0, "status": "ok"},
                 {"provider": "effkern-cuda", "mode": "fwd", "params": params, "ms": 1.0, "status": "ok"},
                 {"provider": "int8-dense", "mode": "fwd", "params": params, "ms": 0.5, "status": "ok"}]
    monkeypatch.setattr(harness, "REPO", tmp_path)
    monkeypatch.setattr(harness, "device_name", lambda: "GPU X")
    path = harness.write_policy(run, bench_sparse24_int8.POLICY_BACKENDS, "test")
    assert path == tmp_path / "effkern" / "policies" / "sparse24_int8.json"
    assert json.loads(path.read_text())["devices"]["GPU X"]["entries"] == [{**params, "fwd": "cuda"}]
    from effkern import sparse24  # the op's policy name is the benchmark's
    assert sparse24._POLICIES["sparse24_int8_linear"] == bench_sparse24_int8.OP


def _scores_softmax(q, k, v, keep, renormalize=True):
    """softmax(q.k / sqrt(D)) @ v with keep [Sq, Skv] the visible keys; renormalize=False: the
    softmax over all keys, the hidden ones then zeroed."""
    s = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
    p = torch.softmax(s.masked_fill(~keep, float("-inf")) if renormalize else s, dim=-1) * keep
    return (p @ v.float()).to(q.dtype)


def test_attention_harness_marks_wrong_providers_fail(tmp_path, monkeypatch):
    def causal_keep(q, k, shift=0):  # Sq == Skv here: query i sees keys j <= i + shift
        return torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(shift)

    wrong = {
        "no-scale": harness.Provider(build=lambda case: lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=1.0)),
        "causal-off-by-one": harness.Provider(build=lambda case: lambda q, k, v: _scores_softmax(
            q, k, v, causal_keep(q, k, shift=1))),
        "softmax-all-keys": harness.Provider(build=lambda case: lambda q, k, v: _scores_softmax(
            q, k, v, causal_keep(q, k), renormalize=False)),
        # the sketch above done right: shows the three failures come from their mistakes alone
        "masked-sketch": harness.Provider(build=lambda case: lambda q, k, v: _scores_softmax(
            q, k, v, causal_keep(q, k))),
    }
    provs = {**bench_attention.providers(), **wrong}
    monkeypatch.setattr(bench_attention, "providers", lambda: provs)
    case = bench_attention._case(torch.float16, 1, 2, 32, 32, 16, True)
    names = ["effkern-triton", "reference", "torch-sdpa", "torch-flex", *wrong]
    modes = ["fwd", "bwd", "fwd_bwd"]
    run = harness.run_op(bench_attention, [case], "cpu", CEIL, names, modes, checkpoint=lambda r: None)
    status = {(r["provider"], r["mode"]): r["status"] for r in run.rows}
    assert ek.backend_available("triton", "cpu")[0]  # effkern-triton is Triton's interpreter here
    for mode in modes:
        for name in ("effkern-triton", "reference", "torch-sdpa", "masked-sketch"):
            assert status[(name, mode)] == "ok", (name, mode)
        for name in ("no-scale", "causal-off-by-one", "softmax-all-keys"):
            assert status[(name, mode)] == "FAIL", (name, mode)
    assert {p for p, _ in run.skipped} == {"torch-flex"}  # compiled FlexAttention: GPU only
    for r in run.rows:
        if r["mode"] != "fwd":  # dq, dk and dv all checked
            assert {"grad0", "grad1", "grad2"} <= set(r["errors"]), r["provider"]
    # FLOPs: 4*B*H*S*S*D halved when causal, the backward 2.5x, fwd_bwd 3.5x; bytes q, k, v, out
    # (the backward: q, k, v, out, dout and the three gradients)
    fwd = 4 * 2 * 32 * 32 * 16 // 2
    assert case.flops == {"fwd": fwd, "bwd": 5 * fwd // 2, "fwd_bwd": 7 * fwd // 2}
    tensor = 2 * 2 * 32 * 16  # one of q, k, v [1, 2, 32, 16] in fp16
    assert case.bytes == {"fwd": 4 * tensor, "bwd": 8 * tensor, "fwd_bwd": 8 * tensor}
    decode = bench_attention._case(torch.bfloat16, 8, 32, 1, 4096, 128, False, Hkv=8)
    assert decode.bytes["fwd"] == 2 * 2 * 8 * 8 * 4096 * 128  # decoding: the K and V reads
    assert decode.reductions == {"out": 4096, "grad0": 4096, "grad1": 4, "grad2": 4}  # 4 query heads per kv head


def test_bwd_mode_times_the_backward_alone(monkeypatch):
    # the forward runs before each timed call, outside it; the call runs the backward only
    events = []

    def logged(case):
        def fn(x, w, b):
            events.append("forward")
            y = F.gelu(F.linear(x, w, b))
            y.register_hook(lambda grad: events.append("backward"))
            return y
        return fn

    provs = {"torch-eager": harness.Provider(build=bench_linear_gelu._eager), "logged": harness.Provider(build=logged)}
    monkeypatch.setattr(bench_linear_gelu, "providers", lambda: provs)
    monkeypatch.setattr(bench_linear_gelu, "MODES", ("fwd", "bwd"), raising=False)
    timed = []
    real_measure = harness.measure

    def measure(call, reset, device, budget_ms=100.0):
        def watched(i):
            before = len(events)
            call(i)
            timed.append(events[before:])
        return real_measure(watched, reset, device, budget_ms)

    monkeypatch.setattr(harness, "measure", measure)
    case = bench_linear_gelu._case(torch.float32, "none", 3, 8, 16)
    case.flops["bwd"], case.bytes["bwd"] = case.flops["fwd_bwd"], case.bytes["fwd_bwd"]
    run = harness.run_op(bench_linear_gelu, [case], "cpu", CEIL, list(provs), ["bwd"], checkpoint=lambda r: None)
    assert {(r["provider"], r["status"]) for r in run.rows} == {("torch-eager", "ok"), ("logged", "ok")}
    # torch-eager's timed calls log nothing, the logged provider's each a backward and no forward
    assert ["backward"] in timed and all(t in ([], ["backward"]) for t in timed)


def test_graph_mode_runs_only_on_a_gpu_and_only_for_flagged_cases(tmp_path, capsys):
    flagged = bench_linear_gelu._case(torch.float32, "none", 5, 12, 16)
    assert flagged.graph  # M <= GRAPH_MAX_ROWS
    assert not bench_linear_gelu._case(torch.float32, "none", harness.GRAPH_MAX_ROWS + 1, 12, 16).graph
    eager = {"torch-eager": harness.Provider(build=bench_linear_gelu._eager)}
    run = harness.run_op(bench_linear_gelu, [flagged], "cpu", CEIL, list(eager), ["fwd", "fwd_graph"],
                         checkpoint=lambda r: None)
    assert [r["mode"] for r in run.rows] == ["fwd"]
    assert "fwd_graph not measured (CUDA graphs need a GPU)" in capsys.readouterr().out


def test_a_case_no_provider_runs_computes_no_reference(monkeypatch):
    def reference(case, *args):
        raise AssertionError("the float64 reference was computed for a case nothing runs")

    monkeypatch.setattr(bench_linear_gelu, "reference", reference)
    never = {"never": harness.Provider(build=bench_linear_gelu._eager,
                                       available=lambda case, device, mode: (False, "not here"))}
    monkeypatch.setattr(bench_linear_gelu, "providers", lambda: never)
    case = bench_linear_gelu._case(torch.float32, "none", 5, 12, 16)
    run = harness.run_op(bench_linear_gelu, [case], "cpu", CEIL, list(never), ["fwd"], checkpoint=lambda r: None)
    assert run.rows == [] and run.skipped == {("never", "not here"): 1}


@pytest.mark.gpu
def test_graph_timing_checks_what_the_replays_write(monkeypatch):
    # A provider whose work is not captured (here: it computes on the host side while the
    # stream is capturing, so the graph holds nothing) is right in fwd and FAIL in fwd_graph.
    def not_captured(case):
        def fn(x, w, b):
            if torch.cuda.is_current_stream_capturing():
                return torch.zeros(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
            return F.gelu(F.linear(x, w, b))
        return fn

    provs = {"torch-eager": harness.Provider(build=bench_linear_gelu._eager),
             "not-captured": harness.Provider(build=not_captured)}
    monkeypatch.setattr(bench_linear_gelu, "providers", lambda: provs)
    case = bench_linear_gelu._case(torch.bfloat16, "none", 16, 256, 512)
    ceil = {**CEIL, "gemm_tflops": 100.0, "int8_tops": 200.0, "copy_gbps": 1000.0}
    run = harness.run_op(bench_linear_gelu, [case], "cuda", ceil, list(provs), ["fwd", "fwd_graph"],
                         checkpoint=lambda r: None)
    status = {(r["provider"], r["mode"]): r["status"] for r in run.rows}
    assert status == {("torch-eager", "fwd"): "ok", ("torch-eager", "fwd_graph"): "ok",
                      ("not-captured", "fwd"): "ok", ("not-captured", "fwd_graph"): "FAIL"}
    graph_rows = [r for r in run.rows if r["mode"] == "fwd_graph"]
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 for r in graph_rows)


def test_overhead_tool_stubs_and_counts_each_launch_then_restores_them():
    from bench import overhead
    from effkern.kernels._launch import interpreted

    if not interpreted():
        pytest.skip("bench.overhead stubs the Triton interpreter's launches (CPU machines)")
    wanted = ["F.linear", "int8_linear", "flash_attention (decode)"]
    rows = {r["call"]: r for r in overhead.measure(wanted, target_s=0.001)}
    assert list(rows) == wanted and all(r["us"] > 0 for r in rows.values())
    assert rows["F.linear"]["launches"] == []
    assert rows["int8_linear"]["launches"] == ["quantize_rows_int8_kernel", "int8_matmul_kernel"]
    assert rows["flash_attention (decode)"]["launches"] == ["flash_attn_fwd_kernel"]
    # the real launches are back: the kernel computes again
    x, w = torch.randn(3, 32), torch.randn(8, 32)
    qw, scale = ek.quantize_int8(w)
    with ek.use_backend("triton"):
        y = ek.int8_weight_only_linear(x, qw, scale)
    torch.testing.assert_close(y, int8_weight_only_linear_reference(x, qw, scale))


def test_every_input_copy_is_used_once_before_the_timing(monkeypatch):
    # a provider that derives something from each input it first sees (as the CUDA backends'
    # weight layouts do) must not pay for it inside a timed call
    seen = []

    def first_sight(case):
        def fn(x, w, b):
            seen.append(id(x))
            return F.gelu(F.linear(x, w, b))
        return fn

    provs = {"torch-eager": harness.Provider(build=bench_linear_gelu._eager),
             "first-sight": harness.Provider(build=first_sight)}
    monkeypatch.setattr(bench_linear_gelu, "providers", lambda: provs)
    monkeypatch.setattr(harness, "input_sets", lambda tensors, device, nbytes=None: 5)
    warmed = {}
    real_measure = harness.measure

    def measure(call, reset, device, budget_ms=100.0):
        warmed["ids"] = set(seen)
        return real_measure(call, reset, device, budget_ms)

    monkeypatch.setattr(harness, "measure", measure)
    case = bench_linear_gelu._case(torch.float32, "none", 3, 8, 16)
    harness.run_op(bench_linear_gelu, [case], "cpu", CEIL, list(provs), ["fwd"], checkpoint=lambda r: None)
    assert len(warmed["ids"]) == 5  # all five copies of x before the first timed call


def test_ceilings_survive_an_int8_gemm_that_cublas_refuses(monkeypatch):
    """cuBLAS lacks some int8 layouts on some GPUs: the int8 rate is then unknown, the run goes on."""
    def refuse(a, b):
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul")

    monkeypatch.setattr(torch, "_int_mm", refuse)
    ceil = harness.ceilings("cpu")
    assert math.isnan(ceil["int8_tops"]) and "CUBLAS_STATUS_NOT_SUPPORTED" in ceil["int8_method"]
    assert ceil["gemm_tflops"] > 0 and ceil["copy_gbps"] > 0


def test_int4_shapes_that_cannot_be_packed_are_refused_up_front():
    with pytest.raises(SystemExit, match="multiple of the group size 128"):
        bench_int4.cases("cpu", quick=True, shapes=["4x64x100"], dtypes=None)


@pytest.mark.smoke
@pytest.mark.gpu
def test_gpu_ceilings_measure_every_rate():
    """The card's bf16 and int8 GEMM rates and copy bandwidth, as every benchmark run measures them first."""
    ceil = harness.ceilings("cuda")
    assert all(ceil[k] > 0 for k in ("gemm_tflops", "int8_tops", "copy_gbps")), ceil


def test_command_line_runs_the_real_providers_and_writes_every_result_file(tmp_path, capsys):
    from bench.__main__ import main

    threads = torch.get_num_threads()  # main() pins the CPU to one thread for its timings
    try:
        rc = main(["linear_gelu", "--shapes", "3x8x16", "--modes", "fwd,fwd_bwd", "--out", str(tmp_path),
                   "--providers", "effkern-triton,effkern-cuda,reference,torch-eager"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    for ext in ("json", "csv", "md", "png"):
        assert (tmp_path / f"linear_gelu.{ext}").stat().st_size > 0, ext
    rows = json.loads((tmp_path / "linear_gelu.json").read_text())["rows"]
    ran = {(r["provider"], r["mode"], r["params"]["approximate"]) for r in rows}
    assert ran == {(p, m, a) for p in ("effkern-triton", "effkern-cuda", "reference", "torch-eager")
                   for m in ("fwd", "fwd_bwd") for a in ("none", "tanh")}
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["gbps"] > 0 for r in rows)
    assert all(r["speedup"]["x eager"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "| x eager |" in printed and "results in" in printed
    with pytest.raises(SystemExit):
        main(["no_such_op"])


LLAMA_KN = {(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)}  # the issues' K x N
# family -> (the issue's M values, its K x N pairs, the modes it asks for)
GEMM_SWEEPS = {
    bench_linear_gelu: ((1, 16, 128, 2048, 8192), {(4096, 16384), (16384, 4096), (1024, 4096), (768, 3072)},
                        {"fwd", "fwd_bwd"}),
    bench_int8: ((1, 16, 64, 256, 1024, 4096, 16384), LLAMA_KN, {"fwd"}),
    bench_int4: ((1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096), LLAMA_KN, {"fwd"}),
    bench_sparse24: ((1, 16, 128, 1024, 4096, 16384), LLAMA_KN, {"fwd"}),
}


@pytest.mark.parametrize("mod", list(GEMM_SWEEPS), ids=lambda m: m.OP)
def test_full_gpu_sweep_covers_the_issue_shapes(mod):
    ms, kns, modes = GEMM_SWEEPS[mod]
    swept = {(c.params["M"], c.params["K"], c.params["N"]) for c in mod.cases("cuda", False, None, None)}
    missing = {(M, K, N) for M in ms for K, N in kns} - swept
    assert not missing, sorted(missing)
    assert modes <= set(getattr(mod, "MODES", ("fwd", "fwd_bwd")))


def test_full_gpu_attention_sweep_is_the_issue_standard_sweep():
    cases = bench_attention.cases("cuda", False, None, None)
    prefill = [c.params for c in cases if c.params["Sq"] > 1]
    decode = [c.params for c in cases if c.params["Sq"] == 1]
    # B*S = 16k tokens, H*D = 2048, D in 64 and 128, S from 512 to 16k, causal and not
    assert {(p["Sq"], p["D"], p["causal"]) for p in prefill} == {
        (S, D, c) for S in (512, 1024, 2048, 4096, 8192, 16384) for D in (64, 128) for c in (False, True)}
    assert all(p["B"] * p["Sq"] == 16384 and p["H"] * p["D"] == 2048 and p["Sq"] == p["Skv"] for p in prefill)
    # decoding: Sq = 1 against 4k..128k keys, B from 1 to 64 (within the memory cap), GQA 32/8 heads
    assert {p["Skv"] for p in decode} == {4096, 16384, 65536, 131072}
    assert {p["B"] for p in decode} == {1, 8, 64}
    assert all((p["H"], p["Hkv"]) == (32, 8) and p["B"] * p["Skv"] <= bench_attention.DECODE_MAX_TOKENS
               for p in decode)
    assert {"fwd", "bwd", "fwd_bwd"} <= set(bench_attention.MODES)


def test_quick_gpu_attention_suite_measures_the_issue_targets():
    """bench/gpu_check.sh runs the quick suite: it must hold a row for each performance target of
    the attention issue (D = 128 and D = 64 at S >= 4k against SDPA's default, SDPA's flash
    backward, decoding at B * Skv >= 256k)."""
    cases = bench_attention.cases("cuda", True, None, None)
    prefill = {(c.params["D"], c.params["causal"]): c.providers for c in cases if c.params["Sq"] >= 4096}
    for D in (64, 128):
        for causal in (False, True):
            assert {"effkern-triton", "torch-sdpa"} <= prefill[(D, causal)], (D, causal)
    assert "torch-sdpa-flash" in prefill[(128, False)]
    assert any(c.params["Sq"] == 1 and c.params["B"] * c.params["Skv"] >= 2**18 for c in cases)


def test_gpu_check_script_runs_its_steps_and_prints_the_summary_last(tmp_path):
    """bench/gpu_check.sh as the GPU machine runs it, here with one family's smoke tests (all
    skipped without a GPU): each step logged under $OUT, the step table and pytest's count last."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PY=sys.executable, OUT=str(tmp_path), OPS="linear_gelu", STEPS="pytest",
               TEST_MARK="gpu and smoke")
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {"env.txt", "pytest_gpu.log", "summary.txt", "results.tgz"} <= {p.name for p in tmp_path.iterdir()}
    last = done.stdout.strip().splitlines()[-4:]
    assert last[0].startswith("================ gpu_check summary")
    assert last[1].split()[:2] == ["env", "ok"] and last[2].split()[:2] == ["pytest", "ok"]
    assert last[3].startswith("pytest: ") and "skipped" in last[3]


def test_readme_results_table_is_the_one_bench_report_builds():
    """The README's performance table is generated, never typed: between its markers it holds
    exactly what `python -m bench report` builds from the committed results (rerun that command
    after committing new results)."""
    from bench import report
    text = (harness.REPO / "README.md").read_text()
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert text.split(report.BEGIN, 1)[1].split(report.END, 1)[0] == "\n" + report.build()


def test_an_output_element_the_provider_never_writes_fails(monkeypatch):
    # a kernel whose last tile is missing: its output buffer holds whatever the memory held
    # before, which must not be an earlier provider's right answer on the same inputs (the
    # harness poisons every checked output and runs all checks before any timing)
    def last_row_unwritten(case):
        def fn(x, w, b):
            y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
            y[:-1] = F.gelu(F.linear(x[:-1], w, b))
            return y
        return fn

    provs = {"torch-eager": harness.Provider(build=bench_linear_gelu._eager),
             "last-row-unwritten": harness.Provider(build=last_row_unwritten)}
    monkeypatch.setattr(bench_linear_gelu, "providers", lambda: provs)
    for _ in range(5):  # the allocator's choice of memory varies from run to run
        case = bench_linear_gelu._case(torch.float32, "none", 5, 12, 16)
        run = harness.run_op(bench_linear_gelu, [case], "cpu", CEIL, list(provs), ["fwd"], checkpoint=lambda r: None)
        assert {r["provider"]: r["status"] for r in run.rows} == {"torch-eager": "ok", "last-row-unwritten": "FAIL"}


def test_graph_replays_rotate_the_input_sets_whole(monkeypatch):
    # each replay runs every input set equally often, in order: a partial rotation would start
    # the next replay on the sets its last calls read (still in L2). No GPU: the graph is faked,
    # its "replay" runs the calls made while capturing.
    import contextlib

    state = {"capturing": False, "captured": []}

    class Graph:
        def replay(self):
            pass

    @contextlib.contextmanager
    def graph(g):
        state["capturing"] = True
        yield
        state["capturing"] = False

    stream = type("Stream", (), {"wait_stream": lambda self, other: None})
    monkeypatch.setattr(torch.cuda, "Stream", stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: stream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(harness, "measure", lambda call, reset, device, budget_ms=100.0: 1.0)
    out = torch.zeros(4)

    def call(i):
        if state["capturing"]:
            state["captured"].append(i % n_sets)
        return out

    for n_sets in (1, 3, 7, 12, 16, 23):
        state["captured"] = []
        ms, first = harness.measure_graph(call, n_sets)
        sets = state["captured"]
        assert len(sets) >= harness.GRAPH_CALLS and len(sets) % n_sets == 0, (n_sets, len(sets))
        assert sets == [i % n_sets for i in range(len(sets))]
        assert torch.isnan(first).all()  # poisoned after capture: the error check reads the replays' writes
        out.zero_()


def test_report_shows_the_fastest_correct_effkern_row():
    from bench import report

    def row(provider, ms, status):
        return {"op": "x", "mode": "fwd", "params": {"M": 16}, "provider": provider, "ms": ms, "status": status}

    doc = {"rows": [row("effkern-triton", 0.1, "FAIL"), row("effkern-cuda", 0.4, "ok"), row("torch-eager", 0.5, "ok")]}
    assert [r["provider"] for r in report._best_rows(doc)] == ["effkern-cuda"]
    doc["rows"][1]["status"] = "FAIL"  # none correct: the fastest, marked FAIL
    assert [r["provider"] for r in report._best_rows(doc)] == ["effkern-triton"]
