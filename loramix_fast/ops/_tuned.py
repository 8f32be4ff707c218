"""The Triton backend's call sites, through the first-use autotuner (``loramix_fast.autotune``).

The candidates live in ``kernels/multi_lora.py`` (fused kernel configs, cuBLAS + shrink + expand,
dense GEMMs); the spec they are gated against is ``loramix_fast.reference``. On CPU tensors (the
Triton interpreter) nothing is timed and the fused kernel runs.
"""
from __future__ import annotations

import functools

from .. import reference
from .. import autotune
from ..autotune import Plan

__all__ = ["multi_lora_linear_tuned", "multi_lora_expand_tuned"]


def _linear_subset(args, rows, cols):
    x, weight, A, B, scale, rank, idx, w, bias = args
    if rows is not None:
        x, idx = x.index_select(0, rows), idx.index_select(0, rows)
        w = w.index_select(0, rows) if w is not None else None
    if cols is not None:
        weight, B = weight.index_select(0, cols), B.index_select(1, cols)
        bias = bias.index_select(0, cols) if bias is not None else None
    return x, weight, A, B, scale, rank, idx, w, bias


def _expand_subset(args, rows, cols):
    y, h, B, scale, rank, idx, w = args
    if rows is not None:
        y, h, idx = y.index_select(0, rows), h.index_select(0, rows), idx.index_select(0, rows)
        w = w.index_select(0, rows) if w is not None else None
    if cols is not None:
        y, B = y.index_select(1, cols), B.index_select(1, cols)
    return y, h, B, scale, rank, idx, w


@functools.lru_cache(maxsize=None)
def linear_plan() -> Plan:
    from ..kernels import multi_lora as K

    return Plan("multi_lora_linear", K.linear_tune_key, K.linear_default, K.linear_candidates,
                reference.multi_lora_linear, _linear_subset,
                lambda a: (a[0].shape[0], a[1].shape[0]), rotate=(1,))


@functools.lru_cache(maxsize=None)
def expand_plan() -> Plan:
    from ..kernels import multi_lora as K

    return Plan("multi_lora_expand", K.expand_tune_key, K.expand_default, K.expand_candidates,
                reference.multi_lora_expand, _expand_subset,
                lambda a: (a[0].shape[0], a[0].shape[1]), rotate=(0,))


def multi_lora_linear_tuned(x, weight, A, B, scale, rank, idx, w, bias):
    return autotune.TUNER.run(linear_plan(), (x, weight, A, B, scale, rank, idx, w, bias))


def multi_lora_expand_tuned(y, h, B, scale, rank, idx, w):
    return autotune.TUNER.run(expand_plan(), (y, h, B, scale, rank, idx, w))
