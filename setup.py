"""Build and install effkern.

Installs the Python packages `effkern` (./effkern) and `effkern.kernels` (./kernels) and
builds the optional extension `effkern._C` from csrc/:

* CUDA build (nvcc found via CUDA_HOME and torch built with CUDA): csrc/**/*.cpp + csrc/**/*.cu,
  linked against the cuBLASLt that torch itself loads.
* CPU-only build otherwise (or with EFFKERN_NO_CUDA=1): csrc/ops.cpp + csrc/cpu/*.cpp.

Environment:
  EFFKERN_NO_EXT=1       skip the extension (pure-Python install)
  EFFKERN_NO_CUDA=1      build the extension without CUDA sources
  EFFKERN_DEBUG=1        keep host debug info (-g) in the C++ objects
  EFFKERN_CUDA_ARCH      CUDA arch list in TORCH_CUDA_ARCH_LIST syntax (default "8.0;9.0a");
                         an existing TORCH_CUDA_ARCH_LIST is used when this is unset
  MAX_JOBS               parallel compile jobs (default: os.cpu_count())

Typical use:  pip install --no-build-isolation -e .
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg):
    print(f"[effkern setup] {msg}", file=sys.stderr)


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _set_cuda_home():
    """Point CUDA_HOME at a real toolkit before torch.utils.cpp_extension reads it.

    torch derives CUDA_HOME from `which nvcc`, which goes wrong when nvcc on PATH is a wrapper
    script (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local, which has no CUDA headers).
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
        try:  # nvcc reports its own install root as TOP in a dry run
            dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            m = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
            if m:
                candidates.append(Path(m.group(1).strip()).resolve())
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file():
            os.environ["CUDA_HOME"] = str(home)
            return


def _cuda_arch_list():
    """The arch list to build for, normalised to 'a;b;c' (TORCH_CUDA_ARCH_LIST syntax)."""
    raw = (
        os.environ.get("EFFKERN_CUDA_ARCH", "").strip()
        or os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
        or DEFAULT_CUDA_ARCHS
    )
    archs = [a for a in re.split(r"[;,\s]+", raw) if a]
    return ";".join(archs)


def _find_wheel_cublas(torch, cuda_major):
    """Locate the cuBLAS(Lt) shipped in torch's nvidia wheels.

    Returns (include_dir, lib_dir, lib_file_name) or None. Layouts handled:
      CUDA 13 wheels: site-packages/nvidia/cu13/{include,lib}/libcublasLt.so.13
      CUDA 12 wheels: site-packages/nvidia/cublas/{include,lib}/libcublasLt.so.12
    """
    bases = [Path(torch.__file__).resolve().parent.parent / "nvidia"]
    try:
        import nvidia  # namespace package of the NVIDIA wheels

        bases += [Path(p) for p in getattr(nvidia, "__path__", [])]
    except ImportError:
        pass
    seen = set()
    for base in bases:
        base = base.resolve()
        if base in seen or not base.is_dir():
            continue
        seen.add(base)
        for sub in (f"cu{cuda_major}", "cublas"):
            inc, lib = base / sub / "include", base / sub / "lib"
            if not (inc / "cublasLt.h").is_file():
                continue
            preferred = lib / f"libcublasLt.so.{cuda_major}"
            if preferred.is_file():
                return inc, lib, preferred.name
            candidates = sorted(lib.glob("libcublasLt.so.*"))
            if candidates:
                return inc, lib, candidates[0].name
    return None


def _extensions():
    if _env_flag("EFFKERN_NO_EXT"):
        _log("EFFKERN_NO_EXT is set: installing the pure-Python package without effkern._C")
        return [], {}
    cuda_home_given = bool(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"))
    _set_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable: installing without effkern._C "
             "(use `pip install --no-build-isolation` with torch installed to build it)")
        return [], {}

    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

    # torch sets CUDA_HOME to /usr/local/cuda whenever that folder exists, nvcc in it or not (a
    # runtime-only CUDA image): a toolkit found that way counts only with its compiler. One the
    # user named (CUDA_HOME / CUDA_PATH) is taken as it is: a wrong one fails the build loudly.
    cuda_toolkit = cpp_extension.CUDA_HOME is not None and (
        cuda_home_given or (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists())
    use_cuda = cuda_toolkit and torch.version.cuda is not None and not _env_flag("EFFKERN_NO_CUDA")
    cpu_sources = [ROOT / "csrc" / "ops.cpp"] + list((ROOT / "csrc" / "cpu").glob("*.cpp"))
    include_dirs = [str(ROOT / "csrc")]
    # Python's default CFLAGS carry -g; the debug info of torch's registration templates
    # doubles the host compile time and makes a ~8 MB .so. EFFKERN_DEBUG=1 keeps it.
    cxx_flags = ["-O3"] + ([] if _env_flag("EFFKERN_DEBUG") else ["-g0"])
    define_macros = []
    extra_link_args = []

    if not use_cuda:
        _log("building effkern._C for CPU only "
             f"(CUDA_HOME={cpp_extension.CUDA_HOME}, CUDA toolkit: {cuda_toolkit}, torch.version.cuda={torch.version.cuda})")
        ext = cpp_extension.CppExtension(
            name="effkern._C",
            sources=_rel(cpu_sources),
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
        )
    else:
        archs = _cuda_arch_list()
        # cpp_extension reads this; without a GPU it cannot detect the arch and fails.
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        cuda_sources = list((ROOT / "csrc" / "cuda").glob("*.cpp")) + list(
            (ROOT / "csrc" / "cuda").glob("*.cu"))
        # One preprocessor token ('_' for ';'), stringified in csrc/ops.cpp: no quoting needed.
        define_macros += [("EFFKERN_WITH_CUDA", None),
                          ("EFFKERN_CUDA_ARCHS", archs.replace(";", "_"))]
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]

        cuda_major = torch.version.cuda.split(".")[0]
        wheel = _find_wheel_cublas(torch, cuda_major)
        if wheel is not None:
            inc, lib, lib_name = wheel
            # The toolkit may lack the cuBLAS headers; take them from torch's wheel. Searched
            # after the toolkit's own include dir (-idirafter) so that the toolkit's CUDA
            # runtime headers, which match nvcc, always win.
            cxx_flags += ["-idirafter", str(inc)]
            nvcc_flags += ["-Xcompiler", f"-idirafter,{inc}"]
            extra_link_args += [f"-L{lib}", f"-l:{lib_name}"]
            _log(f"cuBLASLt from torch's wheel: {lib / lib_name}")
        else:
            lib_dir = Path(cpp_extension.CUDA_HOME) / "lib64"
            if not lib_dir.is_dir():
                lib_dir = Path(cpp_extension.CUDA_HOME) / "lib"
            extra_link_args += [f"-L{lib_dir}", "-lcublasLt"]
            _log(f"cuBLASLt from the CUDA toolkit: {lib_dir}")

        _log(f"building effkern._C with CUDA {torch.version.cuda} for archs {archs} "
             f"(MAX_JOBS={os.environ['MAX_JOBS']})")
        ext = cpp_extension.CUDAExtension(
            name="effkern._C",
            sources=_rel(cpu_sources + cuda_sources),
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link_args,
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

# effkern and its subpackages (e.g. effkern.nn) plus ./kernels installed as effkern.kernels.
# Only names under effkern are searched, so tests/ and bench/ are never packaged.
PACKAGES = sorted(set(["effkern"] + find_packages(include=["effkern.*"])) | {"effkern.kernels"})

setup(
    packages=PACKAGES,
    package_dir={"effkern": "effkern", "effkern.kernels": "kernels"},
    package_data={"effkern": ["policies/*.json"]},
    include_package_data=False,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
