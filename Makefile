# Two commands do all set-up on a fresh machine:
#   make demo   installs, then prints what this installation can run and the quick benchmarks
#   make test   installs, then lints and runs the whole test suite
# Variables: PYTHON (interpreter for the venv, default python3.11), and setup.py's FLORENCE_SKIP_CUDA_BUILD,
# CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h') setup.py pyproject.toml

.PHONY: install test demo lint format bench gpu-check clean

install: $(VENV)/.built

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: requirements.txt | $(PY)
	$(PIP) install --quiet --upgrade pip==23.2.1
	$(PIP) install --quiet -r requirements.txt
	touch $@

# Editable install; pip compiles the extension into florence_kernels/ (CUDA included where nvcc exists).
# The first lines of `info` say how it was built (with CUDA for which architectures, or CPU-only and why).
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install --quiet --no-build-isolation --no-deps --config-settings editable_mode=compat -e .
	$(PY) -m florence_kernels.info | head -n 3
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install lint
	$(PY) -m pytest

demo: install
	$(PY) -m florence_kernels.info
	$(PY) -m benchmarks --quick

bench: install
	$(PY) -m benchmarks

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build $(VENV) florence_kernels/_C*.so *.egg-info
