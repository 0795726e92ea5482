# lstainnorm: every target sets itself up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch/torchvision pinned to the wheels that lie on the build machines' disk (no multi-GB download).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# Real H&E data for the tests and benchmarks (absent: real-data tests skip, benchmarks use synthetic tiles).
export LSTAINNORM_SHARED_DATA ?= $(abspath ../shared/data)

.PHONY: help install browser test test-heavy test-all docs demo bench bench-report bench-layers bench-cost bench-synthetic bench-speed bench-accuracy bench-segmentation bench-slide clean

help:
	@echo "make demo   - install, then train none/template/lstainnorm on synthetic multi-centre data (about 5 minutes; lstainnorm demo --full for the longer one)"
	@echo "make test   - install, then run the test suite (the heavy end-to-end cases: make test-heavy; all: make test-all)"
	@echo "make bench  - install, then run the benchmarks (tables for BENCHMARKS.md)"
	@echo "make bench-report - regenerate BENCHMARKS.md's tables from the committed records"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# A headless browser for the test that opens compare's HTML report (Debian's chromium; the test is
# skipped where none is installed).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null) || \
	  echo "make browser: could not install chromium (no apt or no root); the report's browser test will be skipped"

# `make test` leaves out the cases marked heavy (long end-to-end runs); CI runs them too (.ci/run).
test: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m "not heavy" $(PYTEST_ARGS)

test-heavy: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m heavy $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

# The documentation site, built strictly into site/ (mkdocs serve to browse it).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

demo: $(STAMP)
	$(VENV)/bin/lstainnorm demo --out demo_out

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(PIP) install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

# All benchmarks: several hours on 2 CPU cores (accuracy and segmentation take the most).
bench: bench-layers bench-cost bench-synthetic bench-speed bench-slide bench-accuracy bench-segmentation

# BENCHMARKS.md's tables of training runs, regenerated from benchmarks/results/ (no training; about a minute).
bench-report: $(STAMP)
	$(PY) benchmarks/report.py

bench-layers: $(BENCH_STAMP)
	$(PY) benchmarks/bench_layers.py

# The layer's training cost, its targets printed met / not met (~11 minutes on 2 CPU cores).
bench-cost: $(BENCH_STAMP)
	$(PY) benchmarks/bench_cost.py

bench-synthetic: $(BENCH_STAMP)
	$(PY) benchmarks/bench_synthetic.py

bench-speed: $(BENCH_STAMP)
	$(PY) benchmarks/bench.py speed --out bench_out

bench-accuracy: $(BENCH_STAMP)
	$(PY) benchmarks/bench.py accuracy --out bench_out

bench-segmentation: $(BENCH_STAMP)
	$(PY) benchmarks/bench.py segmentation --out bench_out --seeds 0 1 2 --set trainer.max_epochs=8 --set optim.T_max=8

bench-slide: $(BENCH_STAMP)
	$(PY) benchmarks/bench_slide.py

clean:
	rm -rf build dist *.egg-info .pytest_cache demo_out bench_out
