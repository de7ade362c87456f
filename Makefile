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
# The judge's browser tests drive Debian's Chromium with the playwright pip package (its own
# browser download cannot work offline); make installs the Debian package when it is missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
APT := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q

.PHONY: demo test install lint bench clean

# The peers the format tests load SAEs with (SAELens, sparsify, dictionary_learning) come from
# tests/peers.txt, pinned with only the modules their imports need, and with --no-deps: their
# declared dependencies would replace the CPU torch with a multi-GB CUDA build and add numba,
# umap, plotly and nltk, which loading an SAE never touches.
$(STAMP): pyproject.toml Makefile tests/peers.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[embedded,judge,test,lint]"
	$(BIN)/python -m pip install --quiet --no-deps -r tests/peers.txt
	command -v chromium >/dev/null 2>&1 || $(APT) chromium || ($(SUDO) apt-get update -q && $(APT) chromium)
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/saelab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# ruff; the import layers of pyproject.toml; private names and the package root (what ruff
# cannot see); pyright in basic mode, clean on src/.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/lint-imports
	$(BIN)/python tools/check_names.py src tests benchmarks
	$(BIN)/pyright

bench: $(STAMP)
	$(if $(wildcard .venv-bench/bin/python),.venv-bench/bin/python,$(BIN)/python) benchmarks/extract.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
