# Everything a fresh machine needs: `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-quick test test-fast lint bench bench-accuracy clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch torchvision
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/samadapt demo --out runs/demo

demo-quick: $(STAMP)
	$(VENV)/bin/samadapt demo --quick --out runs/demo-quick

test: $(STAMP)
	$(PY) -m pytest -q --durations=30

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

bench: $(STAMP)
	$(PY) bench/run.py --out docs/benchmarks.md
	$(PY) bench/scale.py --out docs/benchmarks.md
	THP_MEM_ALLOC_ENABLE=1 $(PY) bench/onnx_bench.py --out docs/benchmarks.md

# the accuracy protocol (docs/accuracy.md): 6 tasks, the full grid is days on 2 CPU cores; ACCURACY_ARGS=--quick touches every task once
ACCURACY_ARGS ?=
bench-accuracy: $(STAMP)
	$(PY) bench/accuracy.py $(ACCURACY_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
