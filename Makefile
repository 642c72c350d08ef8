# One-command entry points: `make serve` and `make test` set up the virtual environment when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.acecal-installed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: setup test lint serve bench clean-venv light-venvs

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

# Python 3.9 and 3.12 holding only numpy + requests (+ urllib3) at the versions 3D Slicer 5.8.1 and 5.12.3 ship: the
# Slicer extension's own copy of the client is tested under them (Testing/slicer/test_light_client_copy.py skips,
# saying why, where an interpreter is missing). Interpreters come from pyenv ($$PYENV_ROOT/versions/X.Y.Z).
LIGHT_PYTHONS := "3.9.18 3.9 numpy==1.26.4 requests==2.32.3 urllib3==2.2.1" \
                 "3.12.1 3.12 numpy==2.4.6 requests==2.34.2 urllib3==2.7.0"
light-venvs:
	@for spec in $(LIGHT_PYTHONS); do \
		set -- $$spec; version=$$1; dir=$(VENV)/light-py$$2; shift 2; \
		if [ -x $$dir/bin/python ] && [ "$$(cat $$dir/.pins 2>/dev/null)" = "$$*" ]; then continue; fi; \
		prefix=$$(pyenv prefix $$version 2>/dev/null || echo "$${PYENV_ROOT:-$$HOME/.pyenv}/versions/$$version"); \
		if [ ! -x $$prefix/bin/python ]; then echo "no Python $$version (pyenv): its light-client tests will be skipped"; continue; fi; \
		rm -rf $$dir && $$prefix/bin/python -m venv $$dir && $$dir/bin/python -m pip install -q "$$@" \
			&& echo "$$*" > $$dir/.pins || { rm -rf $$dir; echo "could not set up $$dir: its tests will be skipped"; }; \
	done

test: setup light-venvs
	$(PY) -m pytest Testing $(PYTEST_ARGS)

# Formatting, lint, types and import contracts (configured in pyproject.toml); read-only: `ruff format .` and
# `ruff check --fix .` apply what the first two report.
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

serve: setup
	$(VENV)/bin/acecal serve --host $(HOST) --port $(PORT) --models models

bench: setup
	$(PY) benchmarks/bench_losses.py
	$(PY) benchmarks/bench_served.py

clean-venv:
	rm -rf $(VENV)
