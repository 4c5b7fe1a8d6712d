# sscardd developer entry points. On a fresh Debian 12 machine, `make test` (as root) alone does
# all the set-up: missing Debian packages, then .venv with the project and its test extras.
#
#   make test   PYTEST_ARGS='-k harness'   extra pytest arguments
#   make bench  BENCH_ARGS='--iterations 500 --json bench.json'

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
LINT_PATHS := apdu_specs firmware_sim sscardd backend_sim tests bench
PYTEST_ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := test
.PHONY: setup test lint bench demo clean distclean

# Idempotent and quick when nothing changed (re-installs only when pyproject.toml changed).
setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy

lint: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy

# A benchmark, not a test: prints ratios against the floor card and vicc (see bench/bench_vpcd.py).
bench: setup
	$(PY) bench/bench_vpcd.py $(BENCH_ARGS)

# The emulated card and PSAM through a real pcscd (where none can run it says why, exit 2, and
# the demo goes on), then the settlement path: broker, backend, two daemons (sscardd demo).
demo: setup
	$(PY) -m firmware_sim.demo || [ $$? -eq 2 ]
	$(PY) -m sscardd demo

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Also drops the venv (the next `make setup` rebuilds it).
distclean: clean
	rm -rf $(VENV)
