# Two commands do all set-up on a fresh machine:
#   make demo   installs, builds the built-in digits dataset, pretrains a small Florence on it (2 ranks, ZeRO 2,
#               DALI input) and prints its zero-shot accuracy on held-out digits
#   make test   installs, then lints and runs the whole test suite
# Variables: PYTHON (interpreter for the venv, default python3.11), and setup.py's FLORENCE_SKIP_CUDA_BUILD,
# CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h') setup.py pyproject.toml

.PHONY: install test demo lint format bench bench-quick gpu-check clean

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

DEMO_DATA := data/digits
demo: install
	$(PY) -m florence_kernels.info | head -n 3
	$(PY) -m florence.data.builtin --out $(DEMO_DATA) --size 64
	$(PY) -m florence.data.curate --input $(DEMO_DATA)/train.jsonl --out $(DEMO_DATA)-shards --min-size 8 \
		--near-dup-threshold -1 --shard-size 256
	rm -rf runs/demo
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node 2 -m florence.train \
		--config configs/demo.yaml

bench-quick: install
	$(PY) -m florence_kernels.info
	$(PY) -m benchmarks --quick

bench: install
	$(PY) -m benchmarks

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build $(VENV) florence_kernels/_C*.so *.egg-info data runs
