"""Test setup shared by every op family.

Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors; it must be
switched on before effkern's kernels are first imported, hence here. Tests marked ``gpu``
run only where CUDA is available (bench/gpu_check.sh runs them) and are skipped with that
reason elsewhere.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton
except ImportError:  # no Triton: its kernels are skipped, nothing to check
    pass
else:
    if triton.knobs.runtime.interpret:
        import interpreter_bounds

        # every interpreted load and store must stay inside the launch's tensors (a GPU would
        # read garbage or overwrite another allocation there; the interpreter, the CPU's memory)
        interpreter_bounds.install()
# On a GPU, test the kernels at one fixed tile config instead of autotuning every test shape
# (minutes of compiles); tests that cover the autotuned configs switch it back on.
os.environ.setdefault("EFFKERN_TRITON_AUTOTUNE", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run by bench/gpu_check.sh")
    config.addinivalue_line("markers", "smoke: among the few GPU tests per family that check each kernel against "
                                       "float64 or bit for bit, to run first when GPU time is short "
                                       "(TEST_MARK='gpu and smoke' bench/gpu_check.sh)")
    config.addinivalue_line("markers", "aot: compiles Triton kernels for a GPU here (the compile_for_gpu fixture)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "compile_for_gpu" in item.fixturenames:
            item.add_marker(pytest.mark.aot)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run `bash bench/gpu_check.sh` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison_empty():
    """Fill every torch.empty allocation with NaN, so an output element a kernel forgot
    to write shows up as NaN instead of as plausible leftover memory."""
    prev = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])


@pytest.fixture(scope="module")
def compile_for_gpu():
    """compile(requests) -> results: Triton kernels compiled ahead of time for CUDA GPUs, here,
    without one (tests/aot_compile.py, in a child process: this one runs the interpreter).
    ``requests`` maps names to dicts with "kernel" ("module:function"), "types" (runtime
    arguments -> Triton types such as "*bf16", "i32"), "constexprs", "cc", "num_warps" and
    "num_stages"; each result has the PTX ("ptx") and the shared memory in bytes ("shared")."""
    import json
    import pathlib
    import subprocess
    import sys

    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"Triton's NVIDIA backend is needed to compile for a GPU: {exc}")
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # EFFKERN_AOT_TRITON: a directory holding another Triton (`pip install --target`), which the
    # compiling process imports instead of the installed one: `make test` sets it to the GPU
    # machines' Triton, so the kernels are known to compile there too.
    other = os.environ.get("EFFKERN_AOT_TRITON")
    if other:
        env["PYTHONPATH"] = os.pathsep.join([other, str(root), env.get("PYTHONPATH", "")])

    def compile(requests: dict) -> dict:
        done = subprocess.run([sys.executable, str(root / "tests" / "aot_compile.py")], input=json.dumps(requests),
                              capture_output=True, text=True, env=env, cwd=root, timeout=600)
        assert done.returncode == 0, f"compiling for a GPU failed:\n{done.stderr[-4000:]}"
        results = json.loads(done.stdout)
        if other:  # the other Triton compiled them, not this one
            import triton

            assert all(r["triton"] != triton.__version__ for r in results.values()), (other, triton.__version__)
        return results

    return compile


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state: a failure reproduces on its own."""
    torch.manual_seed(0)
