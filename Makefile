# Two entry points, each self-contained on a fresh machine:
#   make demo   -- build .venv, run the embedded showcase (`supervise demo`: node agents
#                  on localhost survive a crash, a hang, a node loss and a NaN)
#   make test   -- build .venv, run ruff, the import layers check (tools/check_layers.py),
#                  mypy (strict on supervise/) and pytest
# and the benchmarks (minutes; each rewrites its section of benchmarks/RESULTS.md):
#   make bench
# and the recovery benchmark (about 40 min; `--quick` for a 10-minute run):
#   make bench-recovery
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo lint typecheck pytest bench bench-recovery venv clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,torch]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tools/check_layers.py

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q --durations=25

test: lint typecheck pytest

# DEMO_ARGS: options for `supervise demo`, e.g. make demo DEMO_ARGS="--quick" (see --help)
demo: $(STAMP)
	$(BIN)/supervise demo $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/policy_schedule.py
	$(BIN)/python benchmarks/telemetry_overhead.py
	$(BIN)/python benchmarks/runtime.py --reps 9 --logs
	$(BIN)/python benchmarks/snapshot.py
	$(BIN)/python benchmarks/replication.py

bench-recovery: $(STAMP)
	$(BIN)/python benchmarks/recovery.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
