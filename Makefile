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

.PHONY: bench test setup clean

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

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir "$(TORCH)" ninja setuptools wheel
	$(PY) -m pip install -q --no-cache-dir --no-build-isolation -e ".[dev]"
	$(PY) -c "import effkern; effkern.info()"
	touch $@

clean:
	rm -rf build effkern/_C*.so *.egg-info $(VENV) $(GPU_TRITON_DIR)
