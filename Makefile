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

# The quick benchmarks (minutes); the quality grids behind the README tables take an hour or
# more each on 2 cores: bench_quality.py, bench_dp.py --grid, bench_ct.py --quality (see README).
bench: $(STAMP)
	$(BIN)/python bench/bench_loading.py
	$(BIN)/python bench/bench_dp.py --steps 10
	$(BIN)/python bench/bench_wire.py
	$(BIN)/python bench/bench_sim.py
	$(BIN)/python bench/bench_ct.py

clean:
	rm -rf runs data/synthetic
