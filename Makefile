# The two commands: `make demo` and `make test`. Both create .venv when it is missing and
# install saelab into it; nothing else needs doing by hand on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first, and only when the venv has none: the pinned CPU build by default
# (set TORCH=torch, or pre-install your CUDA build into the venv, to choose another).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.saelab-installed
PYTEST_ARGS ?=

.PHONY: demo test install lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[embedded,test]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/saelab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(if $(wildcard .venv-bench/bin/python),.venv-bench/bin/python,$(BIN)/python) benchmarks/extract.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
