# `make demo`: offline fine-tuning demo; `make test`: the test suite. Each creates .venv and installs what it needs.
# `make results DATA=../shared/data`: every recipe of scripts/results.yaml on the real data -> docs/results.md.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
# torch and torchvision pinned to the releases on this machine's disk (pip takes them without a download).
TORCH := torch==2.14.1 torchvision==0.29.1

DATA ?= ../shared/data

.PHONY: demo test test-fast lint clean results

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/ftlab fit --config experiments/quickstart.yaml  # test_after_fit: the best checkpoint is tested too

# two pytest-xdist workers, one torch thread each (tests/conftest.py): 1.49x one process on this 2-core machine
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -n 2

# the suite without the tests marked slow or ddp (pyproject.toml): a quick check while editing
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not ddp"

results: $(VENV)/.installed
	$(BIN)/python scripts/results.py --data $(DATA) --doc docs/results.md

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

clean:
	rm -rf $(VENV) runs
