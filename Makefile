# The README's two commands: `make bench` (the quick benchmark suite) and `make test`.
# Each sets up everything first on a fresh machine: a virtual environment in .venv with
# torch (the CUDA 13.0 build: it brings triton and the CUDA library headers the extension
# needs), effkern installed in editable mode, and the extension effkern._C compiled.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1
STAMP  := $(VENV)/.effkern-installed
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h')

.PHONY: bench test setup clean

bench: $(STAMP)
	$(PY) -m bench --quick

test: $(STAMP)
	$(PY) -m pytest tests

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" ninja setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(PY) -c "import effkern; effkern.info()"
	touch $@

clean:
	rm -rf build effkern/_C*.so *.egg-info $(VENV)
