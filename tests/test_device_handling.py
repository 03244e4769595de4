"""Device handling without a GPU: which device each launch runs on and each query reads, when the
tensors are on cuda:1 and the current device is cuda:0; derived-weight caches across module
moves and casts; whether the extension's archs cover a device."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import effkern._ext as ext
from effkern._cache import DerivedCache
from effkern.nn import Sparse24Linear

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"flash_attn_bwd_dkdv_kernel", "flash_attn_bwd_dq_kernel", "flash_attn_bwd_preprocess_kernel",
           "flash_attn_decode_merge_kernel", "flash_attn_fwd_kernel", "int4_matmul_kernel", "int8_matmul_kernel",
           "int8_matmul_tma_kernel", "linear_gelu_bwd_kernel", "linear_gelu_bwd_tma_kernel", "linear_gelu_fwd_kernel",
           "linear_gelu_fwd_tma_kernel", "quantize_rows_int8_kernel", "sparse24_dgrad_kernel", "sparse24_matmul_kernel",
           "splitk_reduce_kernel"}


def _probe(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "device_launch_probe.py"), *args], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_every_triton_launch_runs_on_its_tensors_device():
    # Triton launches on the current device (triton/runtime/jit.py: driver.active.get_current_device())
    report = _probe()
    assert set(report["kernels"]) == KERNELS
    assert report["bad"] == []
    assert all(arg == "cuda:1" for _, arg in report["queries"])  # SM counts, capabilities: of cuda:1


def test_the_launch_probe_sees_a_missing_device_guard():
    report = _probe("control")
    assert report["bad"] and {k for k, _, _ in report["bad"]} >= {"splitk_reduce_kernel", "flash_attn_fwd_kernel"}


def _reorder(values, meta):
    from effkern.sparse24_cuda_layout import reorder_for_mma_sp

    return reorder_for_mma_sp(values, meta)


def _sparse_layer(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return Sparse24Linear.from_linear(torch.nn.Linear(64, 16, bias=False).to(dtype))


def test_cached_layout_follows_a_module_cast():
    # module.half() keeps the values Parameter (param.data = ...), same version; meta (uint8) is untouched
    layer, cache = _sparse_layer(), DerivedCache()
    first = cache.get((layer.values, layer.meta), lambda: _reorder(layer.values, layer.meta))
    layer.half()
    again = cache.get((layer.values, layer.meta), lambda: _reorder(layer.values, layer.meta))
    assert first[0].dtype == torch.bfloat16 and again[0].dtype == torch.float16


def test_cached_layout_follows_a_data_replacement():
    layer, cache = _sparse_layer(), DerivedCache()
    cache.get((layer.values, layer.meta), lambda: _reorder(layer.values, layer.meta))
    layer.values.data = layer.values.data * 2  # same id, version, dtype and device
    again = cache.get((layer.values, layer.meta), lambda: _reorder(layer.values, layer.meta))
    assert torch.equal(again[0], _reorder(layer.values, layer.meta)[0])


def test_cached_values_are_per_view_of_a_storage():
    # views of one storage share its version counter: where (offset) and as what (dtype) each lies tells them apart
    cache, w = DerivedCache(), torch.randn(8, 16, dtype=torch.float16)
    for view in (w[:4], w[4:], w[4:].view(torch.int16), w[4:].view(torch.int16)):
        assert torch.equal(cache.get((view,), view.clone), view)
    square = torch.randn(8, 8)
    for view in (square, square.t()):  # and in which order (strides)
        assert torch.equal(cache.get((view,), view.clone), view)


def test_cached_value_follows_each_of_its_tensors_and_is_replaced_in_place():
    cache, w, meta = DerivedCache(), torch.randn(4, 8), torch.ones(4, dtype=torch.uint8)
    cache.get((w, meta), lambda: meta.clone())
    other = meta + 1  # same dtype, shape, strides and version: only the storage differs (meta kept alive)
    assert torch.equal(cache.get((w, other), other.clone), other)
    for step in range(3):  # a weight updated in place (an optimizer step) keeps one entry, not one per version
        w.add_(1)
        assert torch.equal(cache.get((w, meta), lambda: w.sum(0)), w.sum(0))
    assert len(cache.entries) == 1


def test_cached_layout_is_dropped_with_any_of_its_tensors():
    # module.to(other device) keeps the values Parameter but replaces the meta buffer: the copy made
    # for the old device must not outlive it until the next call
    layer, cache = _sparse_layer(), DerivedCache()
    cache.get((layer.values, layer.meta), lambda: _reorder(layer.values, layer.meta))
    layer.meta = layer.meta.clone()
    gc.collect()
    assert not cache.entries


def test_cached_layout_does_not_block_swapping_the_module_tensors():
    # torch.utils.swap_tensors (load_state_dict and module.to() under
    # torch.__future__.set_swap_module_params_on_conversion(True)) refuses a tensor with a weakref
    layer, cache = _sparse_layer(), DerivedCache()
    with torch.no_grad():  # as in the op, which autograd calls without grad mode
        cache.get((layer.values, layer.meta), lambda: _reorder(layer.values, layer.meta))
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.half()  # swaps the values Parameter
        other = _sparse_layer(torch.float16)
        other.values.data.mul_(2)
        layer.load_state_dict(other.state_dict())  # swaps values and meta
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    with torch.no_grad():
        again = cache.get((layer.values, layer.meta), lambda: _reorder(layer.values, layer.meta))
        assert again[0].dtype == torch.float16 and torch.equal(again[0], _reorder(other.values, other.meta)[0])
    gc.collect()
    assert len(cache.entries) == 1  # the entry of the swapped-out tensors went with them


@pytest.mark.parametrize("archs, capability, runs", [
    ("8.0;9.0a", (8, 0), True), ("8.0;9.0a", (8, 9), True), ("8.0;9.0a", (9, 0), True),
    ("8.0;9.0a", (10, 0), False), ("8.0;9.0a", (12, 0), False), ("8.0;9.0a", (7, 5), False),
    ("8.0+PTX;9.0a", (12, 0), True), ("9.0a+PTX", (10, 0), False), ("10.0f+PTX", (10, 3), True),
    ("10.0f+PTX", (12, 0), False)])
def test_the_cuda_backend_is_available_only_where_the_extension_has_code(monkeypatch, archs, capability, runs):
    from effkern._backend import backend_available

    monkeypatch.setattr(ext, "build_info", lambda: {"cuda": True, "archs": archs, "cuda_version": "13.0"})
    monkeypatch.setattr(ext, "available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    clear = getattr(getattr(ext, "_runs_on", None), "cache_clear", lambda: None)
    clear()
    try:
        assert backend_available("cuda", torch.device("cuda", 1))[0] is runs
    finally:
        clear()


def test_the_cuda_backend_needs_an_extension_built_with_cuda(monkeypatch):
    from effkern._backend import backend_available

    monkeypatch.setattr(ext, "build_info", lambda: {"cuda": False, "archs": "", "cuda_version": None})
    monkeypatch.setattr(ext, "available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ok, why = backend_available("cuda", torch.device("cuda", 0))
    assert not ok and "built without CUDA" in why
    assert backend_available("cuda", torch.device("cpu")) == (True, "")


def test_the_extension_archs_are_checked_on_the_current_device_for_an_unindexed_one(monkeypatch):
    monkeypatch.setattr(ext, "build_info", lambda: {"cuda": True, "archs": "9.0a", "cuda_version": "13.0"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: {0: (8, 0), 1: (9, 0)}[d])
    ext._runs_on.cache_clear()
    try:
        assert ext.runs_on(torch.device("cuda")) and not ext.runs_on(torch.device("cuda", 0))
    finally:
        ext._runs_on.cache_clear()


def test_an_arch_specific_build_runs_only_on_its_own_capability():
    # "a" (arch-specific) code: X.Y only, not X.Z (sm_100a SASS does not run on sm_103)
    assert ext._arch_runs("10.0a", (10, 0)) and not ext._arch_runs("10.0a", (10, 3))
    assert not ext._arch_runs("9.0a", (9, 5)) and ext._arch_runs("10.0f", (10, 3))


def test_same_device_check_tells_gpus_apart():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from effkern._tensors import check_same_device

    mode = FakeTensorMode()
    on = [FakeTensor(mode, torch.empty(2, device="meta"), torch.device("cuda", i)) for i in (0, 1)]
    check_same_device("op", "input", on[1], weight=on[1], bias=None)
    with pytest.raises(RuntimeError, match="effkern.op: weight is on cuda:0 but input is on cuda:1"):
        check_same_device("op", "input", on[1], weight=on[0])


def test_autotuned_choices_are_kept_per_gpu_model(monkeypatch):
    import triton

    from effkern.kernels import _launch
    from effkern.kernels.int8 import _gemm_tuned

    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA L40S", 2: "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: names[torch.device(d).index])
    monkeypatch.setattr(_launch, "_TUNED_PER_GPU", {})
    _launch._gpu_name.cache_clear()
    h100, l40s, h100_again = (_launch.tuned_for(_gemm_tuned, torch.device("cuda", i)) for i in range(3))
    assert h100 is h100_again and h100 is not l40s
    h100.cache[("M", "N")] = triton.Config({})
    assert ("M", "N") not in l40s.cache and l40s.fn is _gemm_tuned.fn and l40s.configs == _gemm_tuned.configs
    _launch._gpu_name.cache_clear()
