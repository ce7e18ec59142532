# Every target sets itself up on a fresh machine: a virtual environment with the CPU build of
# torch (pinned here, not in pyproject.toml, so users keep their own torch) and the package.
PYTHON ?= python3
VENV ?= .venv
TORCH_PIN ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test bench lint

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[test]" "$(TORCH_PIN)"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python scripts/run_demo.py

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/run.py

lint: setup
	$(BIN)/python -m pip install -q ruff
	$(BIN)/python -m ruff check torchmagic tests scripts benchmarks
