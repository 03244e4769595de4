"""Backend selection, the auto policy, the extension and effkern.info()."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import effkern as ek
from effkern import _backend, _ext, _policy

from op_checks import autotune_through_the_interpreter, needs_backend


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv("EFFKERN_BACKEND", raising=False)
    assert _backend.selected_backend() == "auto"
    with ek.use_backend("triton"):
        assert _backend.selected_backend() == "triton"
        with ek.use_backend("reference"):
            assert _backend.selected_backend() == "reference"
        assert _backend.selected_backend() == "triton"
    assert _backend.selected_backend() == "auto"


def test_use_backend_restores_the_choice_after_an_exception(monkeypatch):
    monkeypatch.delenv("EFFKERN_BACKEND", raising=False)
    with pytest.raises(KeyError, match="inside"):
        with ek.use_backend("triton"), ek.use_backend("reference"):
            raise KeyError("inside")
    assert _backend.selected_backend() == "auto"


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("ON", True), ("yes", True), ("y", True),
                                      ("Y", True), ("0", False), ("", False), ("off", False), ("n", False)])
def test_interpreter_switch_reads_the_values_triton_takes(monkeypatch, value, on):
    # triton's own switch takes 1/true/on/yes/y in any case: effkern must agree on what runs interpreted
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _backend.interpreter_switch_set() is on


def test_environment_variable_and_bad_names(monkeypatch):
    monkeypatch.setenv("EFFKERN_BACKEND", "reference")
    assert _backend.selected_backend() == "reference"
    with ek.use_backend("triton"):
        assert _backend.selected_backend() == "triton"
    monkeypatch.setenv("EFFKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match="EFFKERN_BACKEND: unknown effkern backend 'fast'"):
        _backend.selected_backend()
    with pytest.raises(ValueError, match="use_backend: unknown effkern backend"):
        with ek.use_backend("cublas"):
            pass


def test_env_backend_reaches_the_op(monkeypatch):
    monkeypatch.setenv("EFFKERN_BACKEND", "triton")
    # Patch the check, not TRITON_INTERPRET: triton fixes interpreter mode when it is first imported.
    monkeypatch.setattr(_backend, "triton_interpreter_on", lambda: False)
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on cpu"):
        ek.linear_gelu(x, w)


def test_policy_picks_the_nearest_measured_shape(tmp_path, monkeypatch):
    entries = [
        {"dtype": "bfloat16", "approximate": "none", "M": 16, "N": 4096, "K": 4096, "fwd": "cuda", "fwd_bwd": "cuda"},
        {"dtype": "bfloat16", "approximate": "none", "M": 8192, "N": 4096, "K": 4096, "fwd": "triton", "fwd_bwd": "cuda"},
        {"dtype": "float16", "approximate": "none", "M": 8192, "N": 4096, "K": 4096, "fwd": "cuda"},
    ]
    (tmp_path / "linear_gelu.json").write_text(json.dumps({"version": 1, "devices": {"GPU X": {"entries": entries}}}))
    monkeypatch.setattr(_policy, "POLICY_DIR", tmp_path)
    _policy._entries.cache_clear()
    try:
        assert _policy.choose("linear_gelu", "fwd", "GPU X", "bfloat16", 4096, 4096, 4096) == "triton"
        assert _policy.choose("linear_gelu", "fwd", "GPU X", "bfloat16", 32, 4096, 4096) == "cuda"
        assert _policy.choose("linear_gelu", "fwd_bwd", "GPU X", "bfloat16", 4096, 4096, 4096) == "cuda"
        assert _policy.choose("linear_gelu", "fwd", "GPU X", "float16", 1, 1, 1) == "cuda"
        assert _policy.choose("linear_gelu", "fwd_bwd", "GPU X", "float16", 1, 1, 1) is None
        assert _policy.choose("linear_gelu", "fwd", "GPU Y", "bfloat16", 1, 1, 1) is None
        assert _policy.choose("linear_gelu", "fwd", "GPU X", "bfloat16", 1, 1, 1, approximate="tanh") is None
    finally:
        _policy._entries.cache_clear()


def test_policy_distance_counts_every_side_and_an_empty_batch(tmp_path, monkeypatch):
    entries = [
        {"dtype": "float16", "approximate": "none", "M": 16, "N": 4096, "K": 512, "fwd": "cuda"},
        {"dtype": "float16", "approximate": "none", "M": 16, "N": 4096, "K": 16384, "fwd": "triton"},
        {"dtype": "float16", "M": 4096, "N": 4096, "K": 4096, "fwd": "triton", "fwd_bwd": "triton"},
    ]
    (tmp_path / "linear_gelu.json").write_text(json.dumps({"version": 1, "devices": {"GPU X": {"entries": entries}}}))
    monkeypatch.setattr(_policy, "POLICY_DIR", tmp_path)
    _policy._entries.cache_clear()
    try:
        choose = functools.partial(_policy.choose, "linear_gelu")
        assert choose("fwd", "GPU X", "float16", 16, 4096, 1024) == "cuda"  # only K tells them apart
        assert choose("fwd", "GPU X", "float16", 16, 4096, 8192) == "triton"
        assert choose("fwd", "GPU X", "float16", 0, 4096, 512) == "cuda"  # M = 0 (an empty batch) counts as 1
        # an entry that does not record a matched key does not match it
        assert choose("fwd_bwd", "GPU X", "float16", 4096, 4096, 4096, approximate="none") is None
    finally:
        _policy._entries.cache_clear()


def test_shipped_policy_files_are_well_formed():
    for path in _policy.POLICY_DIR.glob("*.json"):
        data = json.loads(path.read_text())
        for device, record in data["devices"].items():
            for entry in record["entries"]:
                assert {"dtype", "M", "N", "K"} <= entry.keys(), (path, device)
                assert entry.get("fwd", "triton") in ("triton", "cuda")
                assert entry.get("fwd_bwd", "triton") in ("triton", "cuda")


def test_extension_is_built_where_ci_requires_it():
    """.ci/run sets EFFKERN_REQUIRE_EXT=1: there the C++ extension must load and register ops."""
    if os.environ.get("EFFKERN_REQUIRE_EXT") != "1":
        pytest.skip("EFFKERN_REQUIRE_EXT is not set (only .ci/run requires the built extension)")
    assert _ext.available(), _ext.load_error()
    info = _ext.build_info()
    assert info["cuda"] is True, info  # CI compiles and links the CUDA extension with nvcc
    assert "8.0" in info["archs"] and "9.0a" in info["archs"], info
    assert hasattr(torch.ops.effkern_C, "linear_gelu_fwd") and hasattr(torch.ops.effkern_C, "linear_gelu_bwd")


def test_info_reports_versions_extension_and_backends(capsys):
    report = ek.info()
    printed = capsys.readouterr().out
    assert report["torch"] == torch.__version__ and torch.__version__ in printed
    assert "effkern._C:" in printed
    assert set(report["backends"]["cpu"]) == {"triton", "cuda", "reference"}
    assert set(report["auto"]) == {"linear_gelu", "int8", "int4", "sparse24", "attention"}  # every family
    for family in report["auto"]:
        assert report["auto"][family]["cpu"].startswith("reference")
        assert f"{family}: auto on cpu -> reference" in printed
    if not report["extension"]["built"]:
        assert report["extension"]["error"]
    elif hasattr(torch.ops.effkern_C, "compress_24"):
        assert "compress/decompress/prune: the C++ CPU kernels" in report["auto"]["sparse24"]["cpu"]
    elif report["extension"]["cuda"]:
        assert report["extension"]["archs"] and f"archs: {report['extension']['archs']}" in printed
    assert report["python"] in printed and f"triton {report['triton']}" in printed and "GPU: " in printed


def test_info_reports_the_interpreter_and_a_failed_load(monkeypatch, capsys):
    report = ek.info()
    on, printed = _backend.triton_interpreter_on(), capsys.readouterr().out
    assert report["triton_interpreter"] is on and f"Triton interpreter: {'on' if on else 'off'}" in printed
    for dev, table in report["backends"].items():
        for name, (ok, why) in table.items():
            assert f"  {dev:4s} {name:9s} {'available' if ok else 'unavailable: ' + why}\n" in printed + "\n"
    assert report["backends"]["cpu"]["reference"] == (True, "")

    def no_library(name):  # a missing shared library is an OSError, not an ImportError
        raise OSError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(_ext.importlib, "import_module", no_library)
    assert _ext._load.__wrapped__() == (False, "OSError: libcudart.so.13: cannot open shared object file")


def test_info_reports_a_wrong_environment_backend(monkeypatch, capsys):
    monkeypatch.setenv("EFFKERN_BACKEND", "fast")
    report = ek.info()
    assert report["selected_backend"].startswith("invalid: ") and "'fast'" in report["selected_backend"]
    assert "backend selected: invalid: " in capsys.readouterr().out


# A fresh interpreter in which importing effkern._C fails, as where it was never built: effkern
# must import, run linear_gelu on the CPU through the reference, and say in info() why _C is missing.
_WITHOUT_EXTENSION = """
import sys


class BlockExtension:
    def find_spec(self, name, path=None, target=None):
        if name == "effkern._C":
            raise ModuleNotFoundError("No module named 'effkern._C' (blocked by the test)", name=name)


sys.meta_path.insert(0, BlockExtension())
import json
import torch
import torch.nn.functional as F
import effkern as ek

x, w, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)
torch.testing.assert_close(ek.linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)))
with ek.use_backend("triton"):  # the Triton kernels need nothing from _C (TRITON_INTERPRET=1 is inherited)
    torch.testing.assert_close(ek.linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)))
try:
    with ek.use_backend("cuda"):
        ek.linear_gelu(x, w, b)
    cuda_backend_error = None
except RuntimeError as exc:
    cuda_backend_error = str(exc)
report = ek.info()
print(json.dumps({"extension": report["extension"], "cuda_backend_error": cuda_backend_error}))
"""


def test_effkern_works_without_the_extension():
    root = pathlib.Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], capture_output=True, text=True, cwd=root,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    *printed, last = done.stdout.strip().splitlines()
    result = json.loads(last)
    why = "ModuleNotFoundError: No module named 'effkern._C' (blocked by the test)"
    assert result["extension"] == {"built": False, "error": why}
    assert f"effkern._C: missing ({why})" in printed
    assert "compress/decompress/prune: PyTorch ops (no effkern._C)" in "\n".join(printed)
    assert "backend 'cuda' cannot run on cpu tensors" in result["cuda_backend_error"]
    assert why in result["cuda_backend_error"]


# effkern's kernels imported without the interpreter, the switch set afterwards: triton has fixed
# the kernels' mode, so the triton backend on CPU tensors must refuse with the reason.
_INTERPRETER_SET_TOO_LATE = """
import os
import torch
import effkern as ek
from effkern.kernels import linear_gelu

os.environ["TRITON_INTERPRET"] = "1"
try:
    with ek.use_backend("triton"):
        ek.linear_gelu(torch.randn(2, 8), torch.randn(4, 8))
except RuntimeError as exc:
    print(exc)
"""


def test_interpreter_switch_set_after_the_kernels_were_imported():
    needs_backend("triton")
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _INTERPRETER_SET_TOO_LATE], capture_output=True, text=True,
                          cwd=root, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "backend 'triton' cannot run on cpu tensors" in done.stdout
    assert "(they were imported without it)" in done.stdout


def test_every_autotune_key_names_a_kernel_argument():
    """Triton's autotuner silently leaves out of its cache key any name that is not an argument
    of the kernel: a misspelt key would reuse one shape's (or one epilogue's) tuned tile for
    another, found only by a slow or failed launch on a GPU."""
    pytest.importorskip("triton")
    import importlib
    import pkgutil

    from triton.runtime.autotuner import Autotuner

    import effkern.kernels

    tuned = {}
    for module in pkgutil.iter_modules(effkern.kernels.__path__):
        found = importlib.import_module(f"effkern.kernels.{module.name}")
        tuned.update({f"{module.name}.{name}": obj for name, obj in vars(found).items() if isinstance(obj, Autotuner)})
    assert {"linear_gelu._fwd_tuned", "int8._gemm_tma_tuned", "sparse24._dgrad_tuned"} <= tuned.keys()
    for name, autotuner in tuned.items():
        assert autotuner.keys and set(autotuner.keys) <= set(autotuner.arg_names), (name, autotuner.keys)


def test_every_masked_load_says_what_masked_lanes_read():
    """tl.load without ``other`` leaves the masked-off lanes unspecified on a GPU, while Triton's
    interpreter fills them with zeros: a kernel whose K tail or edge relied on those zeros would
    pass every CPU test and differ on a GPU. Every masked load in effkern's kernels names its
    ``other`` (or takes it positionally)."""
    import ast
    import pathlib

    import effkern.kernels

    root = pathlib.Path(effkern.kernels.__file__).parent
    missing, masked = [], 0
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"):
                continue
            names = {k.arg for k in node.keywords}
            if "mask" in names or len(node.args) >= 2:
                masked += 1
                if "other" not in names and len(node.args) < 3:
                    missing.append(f"kernels/{path.name}:{node.lineno}")
    assert masked > 30, masked  # (the scan found the kernels' loads)
    assert not missing, missing


# ---------------------------------------------------------------------------- 32-bit reduction offsets

def test_rows_shape_is_the_shape_of_rows():
    from effkern._tensors import rows, rows_shape

    for shape in ((5, 8), (2, 3, 8), (2, 3, 4, 8), (8,), (0, 3, 8), (2, 3, 0)):
        t = torch.empty(shape, device="meta")
        assert rows_shape(t) == tuple(rows(t).shape), shape


def test_with_short_steps_counts_the_deepest_tile_past_the_reduction():
    from effkern.kernels._launch import MAX_32BIT_OFFSET, with_short_steps

    # k * stride stays below 2^31 for k < K, but not for k < K + 256 (the last tile's masked lanes)
    near = torch.empty_strided((2**20, 2000), (1, 2**20), device="meta")
    assert near.stride(1) * near.shape[1] < MAX_32BIT_OFFSET <= near.stride(1) * (near.shape[1] + 256)
    assert with_short_steps(near, 1).stride(1) == 1


def test_host_cdiv_and_next_power_of_2_are_tritons():
    import triton

    from effkern.kernels._launch import cdiv, next_power_of_2

    for a in range(0, 70):
        assert a == 0 or next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 16, 64):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_with_short_steps_copies_only_operands_whose_reduction_offsets_could_wrap():
    """The Triton GEMMs compute offsets along the reduction in 32 bits: an operand where k * stride
    could reach 2^31 (here a column-major activation of 2^20 x 4096 elements, on the meta device:
    no memory) is copied with stride 1 along the reduction; any other is passed as it is."""
    from effkern.kernels._launch import with_short_steps

    column_major = torch.empty_strided((2**20, 4096), (1, 2**20), device="meta")  # x [M, K], K-stride M
    copied = with_short_steps(column_major, 1)
    assert copied.shape == column_major.shape and copied.stride(1) == 1
    row_major = torch.empty((2**20, 4096), device="meta")
    assert with_short_steps(row_major, 1) is row_major
    assert with_short_steps(column_major, 0) is column_major  # along dim 0 its stride is 1
    b = torch.empty_strided((4096, 2**20), (2**20, 1), device="meta")  # a [K, N] operand, K-stride N
    assert with_short_steps(b, 0).stride(0) == 1
    small = torch.empty_strided((64, 32), (1, 64), device="meta")
    assert with_short_steps(small, 1) is small  # 64 * (32 + 256) < 2^31


def test_gemm_launchers_copy_operands_with_wide_reduction_strides(monkeypatch):
    """With the 2^31 limit lowered to 64 elements, every Triton GEMM launcher hands its kernels
    copies of transposed operands (the helper is called on them and copies), and the results
    stay those of the contiguous inputs."""
    needs_backend("triton")
    from effkern.kernels import _launch, _splitk, int8, linear_gelu, sparse24

    monkeypatch.setattr(_launch, "MAX_32BIT_OFFSET", 64)
    copies = []

    def spy(t, dim):
        out = _launch.with_short_steps(t, dim)
        copies.append(out is not t)
        return out

    for module in (_splitk, int8, linear_gelu):
        monkeypatch.setattr(module, "with_short_steps", spy)
    torch.manual_seed(0)
    x = torch.randn(40, 24).t()  # [24, 40], stride (1, 24): column-major
    w = torch.randn(16, 40)
    want = torch.nn.functional.linear(x, w)
    y, gelu_grad = linear_gelu.linear_gelu_fwd(x, w, None, "none", store_gelu_grad=True)
    torch.testing.assert_close(y, torch.nn.functional.gelu(want))
    dy = torch.randn(24, 16)
    x_ref, w_ref = x.detach().requires_grad_(), w.detach().requires_grad_()
    torch.nn.functional.gelu(torch.nn.functional.linear(x_ref, w_ref)).backward(dy)
    grad_x, grad_w, _ = linear_gelu.linear_gelu_bwd(dy, x, w, gelu_grad, (True, True, False))
    torch.testing.assert_close(grad_x, x_ref.grad)
    torch.testing.assert_close(grad_w, w_ref.grad)
    W = ek.prune_24(w)
    values, meta = ek.compress_24(W)
    torch.testing.assert_close(sparse24.sparse24_matmul(x, values, meta, None), x @ W.t())
    qx = torch.randint(-127, 128, (40, 24), dtype=torch.int8).t()  # [24, 40], column-major
    qw = torch.randint(-127, 128, (16, 40), dtype=torch.int8)
    got = int8.int8_matmul(qx, qw.t(), None, None, None, torch.int32)
    assert torch.equal(got, (qx.int() @ qw.int().t()))
    assert any(copies) and len(copies) >= 4


# The calls below, on fresh CPU inputs: (op, its float inputs, all differentiated).
# 100 rows, past SPLIT_MAX_ROWS, so the GEMMs launch one program per tile; 16-byte rows, so the
# TMA kernels take them where they can.
def _linear_gelu_call():
    return ek.linear_gelu, [torch.randn(100, 96).half(), torch.randn(80, 96).half() / 10, torch.randn(80).half()]


def _int8_call(op):
    def call():
        qweight, scale = ek.quantize_int8(torch.randn(80, 96) / 10)
        return lambda x, b: op(x, qweight, scale, b), [torch.randn(100, 96).half(), torch.randn(80).half()]

    return call


def _int4_call():
    q = ek.quantize_int4(torch.randn(80, 128).half(), group_size=64)  # depths 32 and 64 fit: two configs
    return (lambda x, b: ek.int4_linear(x, *q, group_size=64, bias=b),
            [torch.randn(100, 128).half(), torch.randn(80).half()])


def _sparse24_call():
    values, meta = ek.compress_24(ek.prune_24(torch.randn(80, 96) / 10).half())
    return (lambda x, v, b: ek.sparse24_linear(x, v, meta, b),
            [torch.randn(100, 96).half(), values, torch.randn(80).half()])


def _sparse24_int8_call():
    qweight, scale = ek.quantize_int8(ek.prune_24(torch.randn(80, 96) / 10))  # a pruned zero stays 0
    values, meta = ek.compress_24(qweight)
    return (lambda x, b: ek.sparse24_int8_linear(x, values, meta, scale, b),
            [torch.randn(100, 96).half(), torch.randn(80).half()])


def _attention_call():
    # GQA, causal with Sq != Skv: masked and unmasked key blocks at every tile
    return (lambda q, k, v: ek.flash_attention(q, k, v, causal=True),
            [torch.randn(1, 4, 100, 64).half(), torch.randn(1, 2, 90, 64).half(), torch.randn(1, 2, 90, 64).half()])


# name -> (environment, call, the kernels whose autotuners must have benchmarked configs)
AUTOTUNED_CALLS = {
    "linear_gelu": ({"EFFKERN_TRITON_TMA": "1"}, _linear_gelu_call,
                    {"linear_gelu_fwd_tma_kernel", "linear_gelu_bwd_tma_kernel"}),
    "linear_gelu without TMA": ({"EFFKERN_TRITON_TMA": "0"}, _linear_gelu_call,
                                {"linear_gelu_fwd_kernel", "linear_gelu_bwd_kernel"}),
    "int8_linear": ({"EFFKERN_INT8_QUANTIZATION": "separate"}, _int8_call(ek.int8_linear),
                    {"int8_matmul_tma_kernel", "int8_matmul_kernel"}),
    "int8_linear fused": ({"EFFKERN_INT8_QUANTIZATION": "fused"}, _int8_call(ek.int8_linear),
                          {"int8_matmul_kernel"}),
    "int8_weight_only_linear": ({}, _int8_call(ek.int8_weight_only_linear), {"int8_matmul_kernel"}),
    "int4_linear": ({}, _int4_call, {"int4_matmul_kernel"}),
    "sparse24_linear": ({}, _sparse24_call, {"sparse24_matmul_kernel", "sparse24_dgrad_kernel"}),
    # (its backward is int8_linear's: through the dequantized weight)
    "sparse24_int8_linear": ({}, _sparse24_int8_call, {"sparse24_matmul_kernel", "int8_matmul_kernel"}),
    "flash_attention": ({}, _attention_call,
                        {"flash_attn_fwd_kernel", "flash_attn_bwd_dkdv_kernel", "flash_attn_bwd_dq_kernel"}),
}


def _forward_backward(call, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    op, leaves = call()
    leaves = [t.requires_grad_() for t in leaves]
    out = op(*leaves)
    out.backward(torch.randn_like(out))
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("name", list(AUTOTUNED_CALLS))
def test_autotuned_launches_give_the_interpreted_results(name, monkeypatch):
    """What a GPU runs by default, autotuning, from the launch to the chosen config: the pruning,
    the keys, the pre-hooks that give TMA descriptors each config's tiles, a config run after the
    others ran on the same buffers. Run here through the interpreter, forward and backward, it
    must give what the interpreter's own fixed tiles give (which each family's tests hold
    against float64), within fp16 rounding of another summation order."""
    needs_backend("triton")
    env, call, tuned = AUTOTUNED_CALLS[name]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with ek.use_backend("triton"):
        want = _forward_backward(call, 0)
        benchmarked = autotune_through_the_interpreter(monkeypatch)
        got = _forward_backward(call, 0)
    assert {kernel for kernel, runs in benchmarked.items() if runs >= 2} == tuned
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", ["linear_gelu", "linear_gelu without TMA", "int8_linear", "int4_linear",
                                  "sparse24_linear", "flash_attention"])
def test_a_tuned_key_runs_its_config_without_the_autotuners_run(name, monkeypatch):
    """Once Triton's autotuner has chosen a config for a key, launch() runs that config itself
    (kernels/_launch.py, run_tuned: Autotuner.run rebuilt its argument dicts, ~10 us per launch):
    each launch reaches the kernel with what Autotuner.run hands it on a cached key (the config's
    kwargs, the TMA descriptors' tiles its pre-hook sets), and gives the same results."""
    from triton.runtime.autotuner import Autotuner
    from triton.tools.tensor_descriptor import TensorDescriptor

    from effkern.kernels import _launch

    needs_backend("triton")
    env, call, tuned = AUTOTUNED_CALLS[name]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runs, real_run = [], Autotuner.run

    def counted_run(self, *args, **kwargs):
        runs.append(self.base_fn.__name__)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", counted_run)
    launched = []  # what reached each autotuned kernel: (kernel, its kwargs, its descriptors' tiles)
    wrapped = {id(tuner.fn): (tuner.fn, tuner.base_fn.__name__) for tuner in effkern_autotuners()}
    for fn, kernel in wrapped.values():  # (tuners may share one)
        def spy(*args, real=fn.run, kernel=kernel, **kwargs):
            launched.append((kernel, {k: v for k, v in kwargs.items() if k != "grid"},
                             [a.block_shape for a in args if isinstance(a, TensorDescriptor)]))
            return real(*args, **kwargs)

        monkeypatch.setattr(fn, "run", spy)
    with ek.use_backend("triton"):
        autotune_through_the_interpreter(monkeypatch)
        _forward_backward(call, 0)  # tunes each key
        assert set(runs) == tuned
        runs.clear(), launched.clear()
        ours = _forward_backward(call, 0)
        assert runs == [], f"went through Autotuner.run again: {runs}"
        ours_launched = list(launched)
        launched.clear()
        monkeypatch.setattr(_launch, "run_tuned", lambda tuner, grid, args, kwargs: tuner[grid](*args, **kwargs))
        theirs = _forward_backward(call, 0)
    assert len(runs) == len(ours_launched) and {kernel for kernel, _, _ in ours_launched} == tuned
    assert ours_launched == launched
    for g, w in zip(ours, theirs):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_run_tuned_goes_through_the_autotuner_for_a_new_key(monkeypatch):
    from triton.runtime.autotuner import Autotuner

    needs_backend("triton")
    runs, real_run = [], Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **k: runs.append(1) or real_run(self, *a, **k))
    monkeypatch.setenv("EFFKERN_TRITON_TMA", "0")
    w, b = torch.randn(24, 32).half(), torch.randn(24).half()
    with ek.use_backend("triton"):
        autotune_through_the_interpreter(monkeypatch)
        for rows, through_run in ((5, 1), (5, 0), (7, 1), (5, 0), (7, 0)):
            runs.clear()
            x = torch.randn(rows, 32).half()
            torch.testing.assert_close(ek.linear_gelu(x, w, b), torch.nn.functional.gelu(
                torch.nn.functional.linear(x.float(), w.float(), b.float())).half(), rtol=2e-3, atol=2e-3)
            assert len(runs) == through_run, rows


def test_launch_heuristics_see_the_arguments_as_triton_hands_them():
    """kernels/_launch.py's heuristics wrapper hands each heuristic the launch's arguments by name
    as triton's own does ({**dict(zip(arg_names, args)), **kwargs}), without copying them."""
    needs_backend("triton")
    from effkern.kernels._launch import _LaunchArgs

    names = ["a", "b", "K", "BLOCK_K"]
    places = {name: i for i, name in enumerate(names)}
    for args, kwargs in (((1, 2, 96), {"BLOCK_K": 32}), ((1, 2, 96, 64), {"X": 5}), ((1,), {"K": 3})):
        view = _LaunchArgs(places, args, kwargs)
        want = {**dict(zip(names, args)), **kwargs}
        assert dict(view) == want and len(view) == len(want) and list(view) == list(want)
        assert all(view[k] == v for k, v in want.items())
        with pytest.raises(KeyError):
            view["nope"]


def test_launch_heuristics_miss_an_argument_not_passed():
    from effkern.kernels._launch import _LaunchArgs

    view = _LaunchArgs({"a": 0, "b": 1, "K": 2}, (1,), {"K": 3})
    assert "b" not in view and view.get("b") is None and view["K"] == 3  # b's place is past the arguments given


def test_row_pruning_keeps_tiles_between_64_rows_and_the_row_count():
    import triton

    from effkern.kernels._launch import prune_by_rows

    configs = [triton.Config({"BLOCK_M": m}) for m in (16, 32, 64, 128, 256)]
    prune = prune_by_rows("M", "BLOCK_M")
    for M, kept in ((1, {16}), (20, {32}), (64, {64}), (100, {64, 128}), (5000, {64, 128, 256})):
        assert {c.kwargs["BLOCK_M"] for c in prune(configs, {"M": M})} == kept, M


def test_tile_grid_counts_row_and_column_tiles_each_by_its_own_block():
    from effkern.kernels._launch import tiles

    assert tiles(100, 30, "BLOCK_M", "BLOCK_N", 3)({"BLOCK_M": 32, "BLOCK_N": 8}) == (4 * 4, 3)
    assert tiles(64, 65, "BLOCK_P", "BLOCK_Q")({"BLOCK_P": 64, "BLOCK_Q": 16}) == (5,)


def effkern_autotuners():
    from triton.runtime.autotuner import Autotuner

    from effkern.kernels import attention, int4, int8, linear_gelu, sparse24
    for module in (attention, int4, int8, linear_gelu, sparse24):
        for value in vars(module).values():
            for tuner in (value.values() if isinstance(value, dict) else (value,)):
                if isinstance(tuner, Autotuner):
                    yield tuner


def test_autotuners_key_on_the_dot_precision():
    """fp32 dots in exact "ieee" precision (FMA, stages - 1 tiles in shared memory with Triton 3.6
    on sm_90) and in "tf32" (wgmma, stages tiles: up to 1.5x the shared memory) choose from the same
    configs; DOT_PRECISION follows torch's fp32 matmul precision (TF32 or not) per call, so a config tuned
    with it off and reused with it on may not fit (OutOfResources at the launch)."""
    tuners = [t for t in effkern_autotuners() if "DOT_PRECISION" in t.arg_names]
    assert len(tuners) >= 7
    for tuner in tuners:
        assert "DOT_PRECISION" in tuner.keys, tuner.base_fn.__name__


@pytest.fixture
def tf32_switch():
    before = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def in_float32(call):
    def call_in_float32():
        op, leaves = call()
        return op, [t.float() for t in leaves]

    return call_in_float32


@pytest.fixture
def tf32_new_api():
    if getattr(torch.backends.cuda.matmul, "fp32_precision", None) is None:
        pytest.skip("this torch has no fp32_precision API")
    before = torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision = before


def test_tf32_switched_on_through_torchs_new_api(tf32_new_api):
    """torch.backends.cuda.matmul.fp32_precision = "tf32", torch's current TF32 switch (F.linear
    follows it): fp32 dots take TF32 and the ops run. The legacy getter allow_tf32 raises a
    RuntimeError ("mix of the legacy and new APIs") in that state, so reading it failed every
    fp32 Triton call (and the cuBLASLt binding's allowTF32CuBLAS() every fp32 cuda call)."""
    from effkern.kernels._launch import dot_precision

    torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert dot_precision(torch.float32) == "tf32"
    torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))  # torch itself is fine with it
    needs_backend("triton")
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    with ek.use_backend("triton"):
        y = ek.linear_gelu(x, w, b)
    torch.testing.assert_close(y, torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)))
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert dot_precision(torch.float32) == "ieee"


@pytest.mark.parametrize("name", ["linear_gelu without TMA", "int8_weight_only_linear", "int4_linear",
                                  "sparse24_linear"])
def test_fp32_autotuning_starts_again_when_tf32_is_switched_on(name, monkeypatch, tf32_switch):
    needs_backend("triton")
    env, call, tuned = AUTOTUNED_CALLS[name]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with ek.use_backend("triton"):
        benchmarked = autotune_through_the_interpreter(monkeypatch)
        torch.backends.cuda.matmul.allow_tf32 = False
        _forward_backward(in_float32(call), 0)
        after_ieee = dict(benchmarked)
        torch.backends.cuda.matmul.allow_tf32 = True
        _forward_backward(in_float32(call), 0)
    for kernel in tuned:
        assert benchmarked[kernel] > after_ieee[kernel], f"{kernel}: TF32 reused the config tuned for ieee dots"


# Triton's interpreter multiplies bfloat16 operands of tl.dot by their bit patterns: the ops whose
# kernels multiply in the float dtype refuse bfloat16 on CPU; the W8A8 ones multiply int8 and run
# (their backward, through the dequantized weight, refuses it).
BF16_REFUSED = {"linear_gelu", "int8_weight_only_linear", "int4_linear", "sparse24_linear", "flash_attention"}


@pytest.mark.parametrize("name", [name for name in AUTOTUNED_CALLS if " " not in name])
def test_bfloat16_on_the_interpreter_is_refused_or_right(name):
    needs_backend("triton")
    torch.manual_seed(0)
    op, leaves = AUTOTUNED_CALLS[name][1]()
    leaves = [t.bfloat16().requires_grad_() for t in leaves]
    refused = pytest.raises(TypeError, match="cannot multiply bfloat16")
    with ek.use_backend("triton"):
        if name in BF16_REFUSED:
            with refused:
                op(*leaves)
            return
        out = op(*leaves)
        with refused:
            out.sum().backward()
    with ek.use_backend("reference"):
        torch.testing.assert_close(out, op(*leaves))


@pytest.mark.parametrize("name", [name for name in AUTOTUNED_CALLS if " " not in name])
def test_torch_export_keeps_the_op(name):
    """torch.export traces each family's op through its fake implementation into one graph node
    (not decomposed), and the exported program computes what the op does."""
    torch.manual_seed(0)
    op, leaves = AUTOTUNED_CALLS[name][1]()
    leaves = [t.float() for t in leaves]

    class Call(torch.nn.Module):
        def forward(self, *args):
            return op(*args)

    with ek.use_backend("reference"):
        exported = torch.export.export(Call(), tuple(leaves))
        targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
        assert any(target.startswith("effkern.") for target in targets), targets
        torch.testing.assert_close(exported.module()(*leaves), op(*leaves), rtol=0, atol=0)


# The backward ops, called directly (autograd checks the devices itself): every tensor on
# grad_out's device, or a clear error before any kernel runs (a Triton launch on grad_out's GPU
# would read the other GPU's memory). A meta tensor stands in for the other device: the dispatcher
# then runs the op's fake implementation, which checks as the real one does (without two devices
# here, the real one's check is read, not run).
BACKWARD_CALLS = {
    "linear_gelu_bwd": lambda g, other: torch.ops.effkern.linear_gelu_bwd(
        g, torch.randn(3, 8), other(torch.randn(4, 8)), None, torch.rand(3, 4), "none", [True, True, False]),
    "int8_linear_bwd": lambda g, other: torch.ops.effkern.int8_linear_bwd(
        g, other(torch.randint(-127, 128, (4, 8), dtype=torch.int8)), torch.rand(4), [True, False]),
    "sparse24_linear_bwd": lambda g, other: torch.ops.effkern.sparse24_linear_bwd(
        g, torch.randn(3, 8), *(lambda v, m: (other(v), m))(*ek.compress_24(ek.prune_24(torch.randn(4, 8)))),
        [True, True, False]),
}


@pytest.mark.parametrize("name", list(BACKWARD_CALLS))
def test_backward_ops_refuse_tensors_on_another_device(name):
    call = BACKWARD_CALLS[name]
    grad_out = torch.randn(3, 4)
    call(grad_out, lambda t: t)  # all on one device: runs
    with pytest.raises(RuntimeError, match=rf"effkern\.{name}: \w+ is on meta but grad_out is on cpu"):
        call(grad_out, lambda t: t.to("meta"))


@pytest.mark.parametrize("env,archs", [({}, "8.0;9.0a"), ({"TORCH_CUDA_ARCH_LIST": "7.5"}, "7.5"),
                                       ({"EFFKERN_CUDA_ARCH": "8.6", "TORCH_CUDA_ARCH_LIST": "7.5"}, "8.6")])
def test_setup_targets_sm80_sm90a_unless_overridden(env, archs):
    """setup.py's CUDA arch list: 8.0;9.0a by default, TORCH_CUDA_ARCH_LIST, and EFFKERN_CUDA_ARCH
    over both (what `setup.py --version` configures; nothing is compiled)."""
    import shutil

    if shutil.which("nvcc") is None or torch.version.cuda is None:
        pytest.skip("the CUDA build needs nvcc and a CUDA build of torch")
    root = pathlib.Path(__file__).resolve().parent.parent
    base = {k: v for k, v in os.environ.items()
            if k not in ("TORCH_CUDA_ARCH_LIST", "EFFKERN_CUDA_ARCH", "EFFKERN_NO_CUDA", "EFFKERN_NO_EXT")}
    done = subprocess.run([sys.executable, "setup.py", "--version"], cwd=root, env={**base, **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"for archs {archs} " in done.stderr, done.stderr[-2000:]
