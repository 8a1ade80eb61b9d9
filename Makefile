# ragline developer tasks. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= examples/ragline.yaml
QUERY ?= How long is the on-call rotation and who do I escalate to?
DEMO_PORT ?= 8765
# Pages of the Python manual the ingest benchmark reads (0: all of it; about
# 55k chunks, which takes hours to embed on two slow cores).
BENCH_PAGES ?= 60

.PHONY: install demo test test-fast bench check format clean

$(BIN)/ragline: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(BIN)/ragline

install: $(BIN)/ragline

## Install, ingest the demo handbook, search it, then ask the service over HTTP.
demo: install
	$(BIN)/ragline --config $(CONFIG) ingest
	$(BIN)/ragline --config $(CONFIG) search "$(QUERY)" --collection docs -k 3
	bash examples/ask-over-http.sh $(BIN)/ragline $(CONFIG) $(DEMO_PORT) "$(QUERY)"

## The whole test suite, slow end-to-end tests included (what CI runs).
test: install
	bash .ci/services
	bash bench/prepare corpus
	$(BIN)/python -m pytest -q

## The fast suite only.
test-fast: install
	bash bench/prepare corpus
	$(BIN)/python -m pytest -q -m "not slow"

## Benchmarks on the Python 3.11 HTML manual; prints figures with their baselines.
bench: install
	bash bench/prepare
	$(BIN)/python bench/bench_ingest.py --limit $(BENCH_PAGES)
	$(BIN)/python bench/check_questions.py
	$(BIN)/python bench/bench_retrieval.py
	$(BIN)/python bench/bench_vectors.py --real-vectors bench/.cache/retrieval-vectors.npy
	$(BIN)/python bench/bench_serving.py
	$(BIN)/python bench/bench_gateway.py
	$(BIN)/python bench/bench_streaming.py

check: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) examples/.ragline .pytest_cache .mypy_cache .ruff_cache
