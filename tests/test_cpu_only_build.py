"""The extension's CPU-only build. Where nvcc or a CUDA build of torch is missing (or with
EFFKERN_NO_CUDA=1), setup.py compiles csrc/ops.cpp and csrc/cpu/*.cpp alone. CI builds the CUDA
extension, so this test builds the CPU-only one as well, in a copy of the tree, and runs the C++
CPU kernels' tests against it: test_sparse24_cpu.py, and linear_gelu's `cuda` backend, which is
the C++ kernel on CPU tensors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SKIP_PATTERNS = ("*.so", "__pycache__", "*.egg-info")


def run(cmd: list[str], cwd: Path, env: dict, timeout: int) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (f"{' '.join(cmd)} failed ({done.returncode}):\n"
                                  f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def test_cpu_only_extension_builds_loads_and_passes_the_cpu_kernel_tests(tmp_path):
    tree = tmp_path / "effkern-cpu-only"
    for name in ("csrc", "effkern", "kernels", "tests"):
        # effkern/kernels left out: a checkout may hold a link there to kernels/ (copied below)
        skip = SKIP_PATTERNS + (("kernels",) if name == "effkern" else ())
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns(*skip))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(REPO / name, tree / name)
    # effkern.kernels from this copy: the editable install of the checkout would map it to its own
    shutil.copytree(REPO / "kernels", tree / "effkern" / "kernels", ignore=shutil.ignore_patterns(*SKIP_PATTERNS))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EFFKERN_NO_EXT")}
    env.update(EFFKERN_NO_CUDA="1", MAX_JOBS=str(os.cpu_count() or 1), PYTHONPATH=str(tree))
    run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp", str(tmp_path / "build")],
        tree, env, timeout=900)

    loaded = run([sys.executable, "-c", "import effkern, effkern._ext as e; "
                  "print(effkern.__file__, e.available(), e.build_info()['cuda'], e.load_error())"],
                 tmp_path, env, timeout=300).split()
    assert loaded[:3] == [str(tree / "effkern" / "__init__.py"), "True", "False"], loaded

    # EFFKERN_REQUIRE_EXT=1: test_sparse24_cpu.py fails, not skips, if the build lacks its ops
    env["EFFKERN_REQUIRE_EXT"] = "1"
    out = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_sparse24_cpu or cuda",
               "tests/test_sparse24_cpu.py", "tests/test_linear_gelu.py"], tree, env, timeout=900)
    summary = out.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
