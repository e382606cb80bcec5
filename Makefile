# Two commands do all the set-up: `make demo` (the main job) and `make test`;
# `make walkthrough` runs the README's walkthrough (CI runs it after the tests).
# Each creates the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test walkthrough lint bench clean-venv

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/featcache demo --out featcache-demo

# Two pytest workers (pytest-xdist) on the two cores, one torch thread each (tests/conftest.py).
test: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal

# The README's walkthrough, pasted as written into a temporary folder (tests/walkthrough.py).
# One torch thread per process: on a shared 2-core machine two threads spin against other jobs.
walkthrough: $(BIN)/.installed
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 $(BIN)/python tests/walkthrough.py

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks

bench: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run.py --quick

clean-venv:
	rm -rf $(VENV)
