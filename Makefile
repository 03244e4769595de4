# The README's two commands: `make bench` (the quick benchmark suite) and `make test`.
# Each sets up everything first on a fresh machine: a virtual environment in .venv with
# torch (the CUDA 13.0 build: it brings triton and the CUDA library headers the extension
# needs), effkern installed in editable mode, and the extension effkern._C compiled.
# The venv takes about 5.6 GB and the GPU Triton 0.6 GB; pip keeps no cache (--no-cache-dir), so
# the downloaded wheels do not take that much again.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1
STAMP  := $(VENV)/.effkern-installed
GPU_TRITON ?= triton==3.6.0
GPU_TRITON_DIR := .gpu-triton
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h')

.PHONY: bench test test-gpu-stack setup clean

bench: $(STAMP)
	$(PY) -m bench --quick

# The tests, then the kernels compiled for GPUs again with the GPU machines' Triton (3.6, where
# this environment has the Triton that torch 2.14 requires): an API that changed between the two
# shows here, not on the first GPU run.
test: $(STAMP) $(GPU_TRITON_DIR)/.installed
	$(PY) -m pytest tests
	EFFKERN_AOT_TRITON=$(CURDIR)/$(GPU_TRITON_DIR) $(PY) -m pytest -q -m aot tests

$(GPU_TRITON_DIR)/.installed: | $(STAMP)
	$(PY) -m pip install -q --no-cache-dir --no-deps --target $(GPU_TRITON_DIR) "$(GPU_TRITON)"
	touch $@

setup: $(STAMP)

# The CPU suite once more on the GPU machines' software: Python 3.12, torch 2.11 (cu130) with its
# Triton 3.6, the extension compiled against that torch, in a venv and a copy of the tree of their
# own under .gpu-stack/ (the build would overwrite .venv's extension). An API that those versions
# lack fails here instead of on a GPU run. Not part of `make test` (another 5 GB, ~12-15 min here).
# GPU_STACK_PYTHON: python3.12 where that runs (pyenv's 3.12 on this project's machines), else
# $(PYTHON) with a warning: the torch and Triton versions are then checked, the Python one is not.
# numpy below 2.4: Triton 3.6's interpreter takes int() of one-element arrays, which 2.4 refuses.
# TORCHINDUCTOR_COMPILE_THREADS=1: torch 2.11's inductor compile-worker pool hung 300 s at the
# run's exit (after every test had passed); compiling in-process avoids the pool.
GPU_STACK := .gpu-stack
GPU_STACK_PY := $(GPU_STACK)/venv/bin/python
GPU_STACK_PYTHON ?= $(shell for p in python3.12 $$(command -v pyenv >/dev/null && pyenv root)/versions/3.12*/bin/python3.12; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)
# A venv left there by another Python is made again with the chosen one.
test-gpu-stack:
	@test -n "$(GPU_STACK_PYTHON)" || echo "warning: no Python 3.12 found; the GPU stack runs on $(PYTHON)"
	test -x $(GPU_STACK_PY) && [ "$$($(GPU_STACK_PY) -c 'import sys; print(sys.version_info[:2])')" = \
		"$$($(or $(GPU_STACK_PYTHON),$(PYTHON)) -c 'import sys; print(sys.version_info[:2])')" ] || \
		{ rm -rf $(GPU_STACK)/venv && $(or $(GPU_STACK_PYTHON),$(PYTHON)) -m venv $(GPU_STACK)/venv; }
	$(GPU_STACK_PY) -c 'import sys; print("GPU stack on Python", sys.version.split()[0])'
	$(GPU_STACK_PY) -m pip install -q --no-cache-dir "torch==2.11.0" "numpy<2.4" ninja setuptools wheel
	rm -rf $(GPU_STACK)/src && mkdir -p $(GPU_STACK)/src
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(GPU_STACK)/src
	cd $(GPU_STACK)/src && $(CURDIR)/$(GPU_STACK_PY) -m pip install -q --no-cache-dir --no-build-isolation -e ".[dev]"
	cd $(GPU_STACK)/src && EFFKERN_REQUIRE_EXT=1 TORCHINDUCTOR_COMPILE_THREADS=1 $(CURDIR)/$(GPU_STACK_PY) -m pytest -q -p no:cacheprovider tests

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir "$(TORCH)" ninja setuptools wheel
	$(PY) -m pip install -q --no-cache-dir --no-build-isolation -e ".[dev]"
	$(PY) -c "import effkern; effkern.info()"
	touch $@

clean:
	rm -rf build effkern/_C*.so *.egg-info $(VENV) $(GPU_TRITON_DIR) $(GPU_STACK)
