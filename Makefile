# Two commands on a fresh machine: `make run` and `make test`. Both make the venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-faults lint typecheck test-deps browser-deps bench bench-commands bench-projector bench-fanout \
        bench-history bench-retention bench-redis-sizing bench-presence bench-scale bench-soak bench-c100k clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m devstack

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fault suite (tests/test_faults.py): whole stacks of real processes killed under load, the audit as
# oracle. A few minutes; plain `make test` leaves it out (pytest marker `faults`).
test-faults: $(STAMP)
	$(BIN)/python -m pytest -m faults $(PYTEST_ARGS)

# What some tests need from Debian (never a download from elsewhere): Chromium for the browser tests
# (Playwright drives /usr/bin/chromium), promtool (package prometheus) for the alert rules, libfaketime
# (package faketime) for the clock-step fault. Without them those tests are skipped and counted.
TEST_TOOLS := /usr/bin/chromium:chromium /usr/bin/promtool:prometheus /usr/bin/faketime:faketime
test-deps: $(STAMP)
	@missing=""; for t in $(TEST_TOOLS); do test -x "$${t%%:*}" || missing="$$missing $${t##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  { command -v apt-get >/dev/null && \
	    $$( [ "$$(id -u)" = 0 ] || echo sudo ) sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing"; } || \
	  echo "test-deps: could not install$$missing; the tests that need them will be skipped"; \
	fi

browser-deps: test-deps

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

# Redis CPU of presence heartbeats: how many connections the one presence slot of a cluster serves.
bench-presence: $(STAMP)
	$(BIN)/python -m benchmarks.presence_slot

# The fanout, command and projector benchmarks, smaller, on a 3-master Redis Cluster and on one Redis (a few
# minutes); SCALE_ARGS="--events 20000" etc. (python -m benchmarks.scale --help).
bench-scale: $(VENV)/.bench
	$(BIN)/python -m benchmarks.scale $(SCALE_ARGS)

# Not in `bench`: 10 minutes of steady mixed load with a fault a minute; SOAK_ARGS="--duration 60" to shorten.
bench-soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak $(SOAK_ARGS)

# Not in `bench`: up to 15 minutes (idle connections, then two reconnect storms); BENCH_ARGS="--connections
# 10000" for a smaller run, "--storm none" for the idle figures only.
bench-c100k: $(STAMP)
	$(BIN)/python -m benchmarks.c100k $(BENCH_ARGS)

bench: bench-commands bench-projector bench-fanout bench-history bench-retention bench-redis-sizing bench-presence bench-scale

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
