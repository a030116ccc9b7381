# One command to set up and run the main job, one to pass the tests (see README).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# Writes 3 synthetic hospitals to data/synthetic and federates MM-CL across them.
demo: $(STAMP)
	$(BIN)/fedmsk synth
	$(BIN)/fedmsk simulate

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/bench_loading.py
	$(BIN)/python bench/bench_models.py --out runs/bench-models5 num_sites=5
	$(BIN)/python bench/bench_dp.py

clean:
	rm -rf runs data/synthetic
