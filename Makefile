# Two commands that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	# opendataval pins torch~=2.1 / numpy<1.26 (and pyDVL pulls cvxpy): install both without their pins
	$(PY) -m pip install --quiet --no-deps opendataval pydvl pyDeprecate more-itertools "geomloss~=0.2.6"
	touch $(BENCH_STAMP)

demo: $(STAMP)
	$(PY) -m lightning_attr.demo --out artifacts/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(BENCH_STAMP)
	$(PY) benchmarks/amortization.py --out artifacts/bench
	$(PY) benchmarks/influence.py --out artifacts/bench/influence
	$(PY) benchmarks/ggda.py --out artifacts/bench/ggda
	$(PY) benchmarks/influence_functions.py --out artifacts/bench/influence_functions
	$(PY) benchmarks/dtda.py --out artifacts/bench/dtda
	$(PY) benchmarks/valuation.py --out artifacts/bench/valuation

clean:
	rm -rf artifacts lightning_logs wandb .pytest_cache
