# One entry point for set-up, tests and the demo.  Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-fast bench gpu-check demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,notebooks]'
	touch $(STAMP)

install: $(STAMP)

# The suite on every core (pytest-xdist: tests/conftest.py says how tests are handed out), the 15 slowest tests
# listed at the end.  TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= auto
XDIST = -n $(TEST_WORKERS)

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) --durations=15 $(PYTEST_ARGS)

# The quick loop while developing: everything but the end-to-end tests marked slow (notebooks, training runs,
# sweeps, the SASS builds); `make test` (CI) runs those too.
test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m mbmlib bench

# On a lent GPU (under 8 minutes): CUDA tests, tile autotuning, bench, one SeedNet epoch each for exact, MBM and
# Mitchell; results under results/ named by the device.  Without CUDA it plans and checks every step (dry run).
gpu-check: $(STAMP)
	$(PY) -m mbmlib.workflow.gpu_check $(GPU_CHECK_ARGS)

# The main job: the demo sweep (exact, mitchell, mbm on SeedNet, shortened runs) and the comparison notebook.
demo: $(STAMP)
	$(PY) -m mbmlib sweep experiments/demo.yaml
	@echo "figures: $$(pwd)/results/figures/"

clean:
	rm -rf $(VENV) .pytest_cache
