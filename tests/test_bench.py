"""The benchmark harness: its correctness column must catch wrong kernels, and its files must
hold what the README table and the auto policy are built from."""

import json

import torch
import torch.nn.functional as F

from bench import harness
from bench import linear_gelu as bench_linear_gelu


def _run(providers: dict, tmp_path):
    case = bench_linear_gelu._case(torch.float32, "none", 5, 12, 16)
    ceil = {"gemm_tflops": 1.0, "copy_gbps": 1.0, "gemm_method": "test", "copy_method": "test"}
    run = harness.run_op(bench_linear_gelu, [case], "cpu", ceil, list(providers), ["fwd", "fwd_bwd"],
                         checkpoint=lambda r: None)
    table = harness.write_results(run, tmp_path, "test", plot=False)
    return run, table


def test_harness_marks_wrong_providers_fail(tmp_path, monkeypatch):
    wrong = {
        "torch-eager": harness.Provider(build=bench_linear_gelu._eager),
        "bias-dropped": harness.Provider(build=lambda case: lambda x, w, b: F.gelu(F.linear(x, w))),
        "tanh-for-erf": harness.Provider(build=lambda case: lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh")),
        "gemm-only": harness.Provider(build=lambda case: F.linear, checked=False),
    }
    monkeypatch.setattr(bench_linear_gelu, "providers", lambda: wrong)
    run, table = _run(wrong, tmp_path)
    status = {(r["provider"], r["mode"]): r["status"] for r in run.rows}
    assert status[("torch-eager", "fwd")] == status[("torch-eager", "fwd_bwd")] == "ok"
    for name in ("bias-dropped", "tanh-for-erf"):
        assert status[(name, "fwd")] == status[(name, "fwd_bwd")] == "FAIL", name
    assert status[("gemm-only", "fwd")] == "timing only"
    assert "FAIL" in table
    rows = json.loads((tmp_path / "linear_gelu.json").read_text())["rows"]
    assert len(rows) == len(run.rows) and all(r["ms"] > 0 for r in rows)
    assert (tmp_path / "linear_gelu.csv").read_text().count("\n") == len(rows) + 1


def test_policy_records_the_faster_backend(tmp_path, monkeypatch):
    run = harness.Run(op="linear_gelu", device="cuda", ceil={}, baselines={})
    params = {"dtype": "bfloat16", "approximate": "none", "M": 64, "N": 128, "K": 256}
    for provider, mode, ms, status in [("effkern-triton", "fwd", 1.0, "ok"), ("effkern-cuda", "fwd", 2.0, "ok"),
                                       ("effkern-triton", "fwd_bwd", 1.0, "FAIL"), ("effkern-cuda", "fwd_bwd", 3.0, "ok")]:
        run.rows.append({"provider": provider, "mode": mode, "params": params, "ms": ms, "status": status})
    monkeypatch.setattr(harness, "REPO", tmp_path)
    monkeypatch.setattr(harness, "device_name", lambda: "GPU X")
    path = harness.write_policy(run, bench_linear_gelu.POLICY_BACKENDS, "test")
    entry = json.loads(path.read_text())["devices"]["GPU X"]["entries"][0]
    # a failing row never wins, however fast
    assert entry == {**params, "fwd": "triton", "fwd_bwd": "cuda"}
