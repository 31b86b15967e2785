# The two quickstart commands: `make demo` (set up, then run the main job) and `make test`.
# Set-up installs torch 2.13.0 first (a local CPU wheel here; an unpinned torch pulls GBs of CUDA wheels),
# then the project with its test extras, into .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/gravity-sparse run pipelines/tiny.yaml

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check gravity_sparse tests benchmarks
	$(BIN)/ruff format --check gravity_sparse tests benchmarks
