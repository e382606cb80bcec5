# Two commands do all the set-up: `make demo` (the main job) and `make test`.
# Each creates the virtual environment on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test lint bench clean-venv

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/featcache demo --out featcache-demo

test: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks

bench: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run.py --quick

clean-venv:
	rm -rf $(VENV)
