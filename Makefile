# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment when it is missing, installs the CPU build of torch 2.13.0 first
# when torch is absent (an unpinned torch pulls gigabytes of CUDA), then the package with its extras.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export THP_MEM_ALLOC_ENABLE := 1

.PHONY: setup demo test lint

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev,peft]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/dpkd demo

lint: setup
	$(VENV)/bin/ruff check src tests bench

test: lint
	$(VENV)/bin/pytest -q
