# Two commands on a fresh machine: `make run` and `make test`. Both make the venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck bench bench-commands bench-projector bench-fanout bench-history bench-retention \
        bench-redis-sizing clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m devstack

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

bench-commands: $(STAMP)
	$(BIN)/python -m benchmarks.commands

$(VENV)/.bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(VENV)/.bench

bench-projector: $(STAMP)
	$(BIN)/python -m benchmarks.projector

bench-fanout: $(VENV)/.bench
	$(BIN)/python -m benchmarks.fanout

bench-history: $(STAMP)
	$(BIN)/python -m benchmarks.history

bench-retention: $(STAMP)
	$(BIN)/python -m benchmarks.retention

bench-redis-sizing: $(STAMP)
	$(BIN)/python -m benchmarks.redis_sizing

bench: bench-commands bench-projector bench-fanout bench-history bench-retention bench-redis-sizing

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
