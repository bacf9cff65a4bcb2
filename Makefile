# User entry points. On a fresh clone: `make run` (main job) and `make test` (tests); both set up first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.odmt-setup-stamp
DATA   ?= data/fashion
RUN_DIR ?= runs
PYTEST_ARGS ?=

.PHONY: setup run test bench clean

setup: $(STAMP)

# Re-installs only when the pins or the package metadata change, so a second `make setup` is instant.
$(STAMP): constraints-cpu.txt pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) bash scripts/setup.sh
	touch $(STAMP)

run: setup
	$(BIN)/odmt prepare --source fashion --out $(DATA)

test: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/etl.py

clean:
	rm -rf data runs repo .pytest_cache
