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

EPOCHS ?= 5  # the main job is a demonstration; benchmarks/quality.py trains to convergence

# The main job on the bundled fashion store: prepare, train ODMT and the ID-only baseline, compare,
# then serve ODMT on a real Triton server and show a few recommendations.
run: setup
	$(BIN)/odmt prepare --source fashion --out $(DATA)
	rm -rf $(RUN_DIR)/odmt $(RUN_DIR)/sasrec
	$(BIN)/odmt train --data $(DATA) --model odmt --out $(RUN_DIR)/odmt --epochs $(EPOCHS)
	$(BIN)/odmt train --data $(DATA) --model sasrec --out $(RUN_DIR)/sasrec --epochs $(EPOCHS)
	$(BIN)/odmt evaluate --run $(RUN_DIR)/odmt --split test > /dev/null
	$(BIN)/odmt evaluate --run $(RUN_DIR)/sasrec --split test > /dev/null
	$(BIN)/python scripts/compare_runs.py $(RUN_DIR)/odmt $(RUN_DIR)/sasrec
	$(BIN)/python scripts/demo_serving.py --run $(RUN_DIR)/odmt --data $(DATA)

test: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/etl.py
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/serving.py
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf data runs repo .pytest_cache
