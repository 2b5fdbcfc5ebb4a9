# Two entry points on a fresh machine: `make train` and `make test`.
# Both create .venv and install shoal with the pinned CPU torch first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup lint train test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# ruff (lint + format check) over the code, tests, benchmarks and examples, and pyright (basic) over
# shoal/, as configured in pyproject.toml.
lint: $(VENV)/.lint-installed
	$(VENV)/bin/ruff check shoal tests benchmarks examples
	$(VENV)/bin/ruff format --check shoal tests benchmarks examples
	$(VENV)/bin/pyright

$(VENV)/.lint-installed: $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e '.[lint]'
	touch $@

train: setup
	$(VENV)/bin/shoal train

test: setup
	$(PY) -m pytest -q --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
