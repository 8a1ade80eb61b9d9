# ragline developer tasks. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= examples/ragline.yaml
QUERY ?= How long is the on-call rotation and who do I escalate to?

.PHONY: install demo test test-fast bench check format clean

$(BIN)/ragline: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(BIN)/ragline

install: $(BIN)/ragline

## Install, ingest the demo handbook and search it: no servers needed.
demo: install
	$(BIN)/ragline --config $(CONFIG) ingest
	$(BIN)/ragline --config $(CONFIG) search "$(QUERY)" --collection docs -k 3

## The whole test suite, slow end-to-end tests included (what CI runs).
test: install
	bash .ci/services
	bash bench/prepare
	$(BIN)/python -m pytest -q

## The fast suite only.
test-fast: install
	bash bench/prepare
	$(BIN)/python -m pytest -q -m "not slow"

## Benchmarks on the Python 3.11 HTML manual; prints figures with their baselines.
bench: install
	bash bench/prepare
	$(BIN)/python bench/bench_ingest.py
	$(BIN)/python bench/bench_vectors.py --real-vectors bench/.cache/manual-vectors.npy

check: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) examples/.ragline .pytest_cache .mypy_cache .ruff_cache
