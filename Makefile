# Two entry points on a fresh machine: `make bench` and `make test`.
# Each creates .venv and installs what it needs. Torch is installed first so that
# pip does not resolve a multi-GB CUDA build; override with e.g. TORCH_SPEC="torch>=2.4".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
STAMP := $(VENV)/.installed-dev-bench
PYTEST_ARGS ?=

.PHONY: test bench lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[dev,bench]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check lowrank_optim benchmarks tests
	$(PY) -m pytest -n 2 -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.quick

lint: $(STAMP)
	$(PY) -m ruff check lowrank_optim benchmarks tests

clean:
	rm -rf $(VENV) .pytest_cache
