# One-command entry points: `make serve` and `make test` set up the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.acecal-installed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: setup test serve bench clean-venv

setup: $(STAMP)

# torch: a machine without an NVIDIA GPU gets the CPU build (found locally by pip), never the multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing the default (CUDA) torch build"; \
	else \
		echo "No GPU: installing the CPU build of torch"; \
		$(PIP) install "torch==2.13.0"; \
	fi
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest Testing $(PYTEST_ARGS)

serve: setup
	$(VENV)/bin/acecal serve --host $(HOST) --port $(PORT) --models models

bench: setup
	$(PY) benchmarks/bench_losses.py

clean-venv:
	rm -rf $(VENV)
