# Every target sets itself up on a fresh machine: a virtual environment with the CPU build of
# torch (pinned here, not in pyproject.toml, so users keep their own torch) and the package.
PYTHON ?= python3
VENV ?= .venv
TORCH_PIN ?= torch==2.13.0
CHROMIUM ?= /usr/bin/chromium
BIN := $(VENV)/bin

.PHONY: setup chromium demo test bench bench-smoke lint

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[test,browser]" "$(TORCH_PIN)"
	touch $@

setup: $(BIN)/.installed

# The browser test drives Debian's chromium (Playwright's own browser download cannot run here).
# As root on Debian it is installed; elsewhere the browser test skips and says why.
chromium:
	@if [ ! -x "$(CHROMIUM)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "no $(CHROMIUM): the JupyterLab browser test will skip (apt-get install chromium)"; fi; \
	fi

demo: setup
	$(BIN)/python scripts/run_demo.py

test: setup chromium
	$(BIN)/python -m pytest

# torchviz, torchlens and psutil, for the rows that compare or measure memory
$(BIN)/.bench: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e ".[bench]" "$(TORCH_PIN)"
	touch $@

bench: $(BIN)/.bench
	$(BIN)/python benchmarks/run.py

bench-smoke: $(BIN)/.bench
	$(BIN)/python benchmarks/run.py --smoke

lint: setup
	$(BIN)/python -m pip install -q ruff
	$(BIN)/python -m ruff check torchmagic tests scripts benchmarks
