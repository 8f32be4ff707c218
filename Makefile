# Two commands on a fresh machine: `make demo` and `make test` (also `make bench`).
# Each creates .venv if missing, installs torch (the 2.13.0 CPU build where it lies on disk, any
# recent torch elsewhere), the package with its dev extras, and builds the C++ extension.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.loramix-installed
EXT    := $(VENV)/.loramix-ext
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: all setup ext test demo demo-tiny bench clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0 \
	    || $(PY) -m pip install -q torch
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,demo]"
	@touch $(STAMP)

setup: $(STAMP)

# JIT-builds csrc/*.cpp with ninja (the package falls back to the pure-torch reference if it can't)
ext: $(STAMP)
	@$(PY) -c "from loramix_fast import _cpp; _cpp.build(); print('C++ extension: ok')" \
	    || echo "WARNING: C++ extension could not be built; the reference backend will be used"

test: ext
	$(PY) -m pytest -q tests

demo: ext
	$(PY) -m loramix_fast demo

demo-tiny: ext
	$(PY) -m loramix_fast demo --tiny

bench: ext
	$(PY) -m bench.run_all

clean:
	rm -rf build $(VENV) *.egg-info .pytest_cache
