"""``spectr_topk``: score experts per row (SpectR norm / Arrow first coordinate), keep the top k, and
give mixing weights (DESIGN.md operation 2).

Validates, picks a backend (Triton / C++ / reference) and is registered as the custom op
``loramix::spectr_topk`` with a fake implementation, so ``torch.compile`` sees one opaque node.
"""
from __future__ import annotations

import torch

from .. import reference
from ._dispatch import FLOAT_DTYPES, INT_DTYPES, check_tensor, pick_backend

__all__ = ["spectr_topk"]

SCORES = ("norm", "first")
WEIGHTINGS = ("uniform", "softmax")


def _run(backend, h, k, rank, score, score_scale, weighting, temperature):
    if h.dtype == torch.float64:  # fp64 in, fp64 math and weights / scores out (every backend)
        return reference.spectr_topk(h, k, rank=rank, score=score, score_scale=score_scale,
                                     weighting=weighting, temperature=temperature, upcast=True)
    if backend == "cpp":
        return torch.ops.loramix_cpp.spectr_topk(h, k, rank, score, score_scale, weighting, temperature)
    if backend == "triton":
        from ..kernels.spectr import spectr_topk_triton

        return spectr_topk_triton(h, k, rank, score, score_scale, weighting, temperature)
    return reference.spectr_topk(h, k, rank=rank, score=score, score_scale=score_scale,
                                 weighting=weighting, temperature=temperature)


@torch.library.custom_op("loramix::spectr_topk", mutates_args=())
def _spectr_topk_op(h: torch.Tensor, k: int, rank: torch.Tensor | None, score: str,
                    score_scale: torch.Tensor | None, weighting: str, temperature: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    idx, w, s = _run(pick_backend(h, "spectr_topk"), h, k, rank, score, score_scale, weighting,
                     temperature)
    return idx, w, s


@_spectr_topk_op.register_fake
def _(h, k, rank, score, score_scale, weighting, temperature):
    M, T = h.shape[0], h.shape[1]
    ft = torch.float64 if h.dtype == torch.float64 else torch.float32
    return (h.new_empty((M, k), dtype=torch.int32), h.new_empty((M, k), dtype=ft),
            h.new_empty((M, T), dtype=ft))


def _validate(h, k, rank, score, score_scale, weighting, temperature):
    check_tensor("h", h, ndim=3, dtypes=FLOAT_DTYPES)
    M, T, R = h.shape
    dev = h.device
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k} (k > T is allowed: extra slots get idx -1)")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "softmax" and not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0 for weighting='softmax', got {temperature}")
    if score == "first" and R < 1:
        raise ValueError(f"score='first' reads h[:, :, 0] but h has R = 0 (shape {tuple(h.shape)})")
    check_tensor("rank", rank, ndim=1, dtypes=INT_DTYPES, device=dev, shape=(T,), optional=True)
    check_tensor("score_scale", score_scale, ndim=1, dtypes=FLOAT_DTYPES, device=dev, shape=(T,),
                 optional=True)


def spectr_topk(h: torch.Tensor, k: int, *, rank: torch.Tensor | None = None, score: str = "norm",
                score_scale: torch.Tensor | None = None, weighting: str = "uniform",
                temperature: float = 1.0, validate: bool = True):
    """Score T experts per row, keep the top k, and weight them.

    Semantics (SpectR eqs. 7-9; Arrow):
        score="norm":  s[m, t] = || h[m, t, :rank[t]] ||_2          (SpectR, h = A*_t x)
        score="first": s[m, t] = |h[m, t, 0]| * score_scale[t]       (Arrow: |h_t0| / sigma_t1)
        idx[m] = the k highest s[m, t] over experts with rank[t] > 0, descending, ties to the lowest
        expert index (deterministic); slots left over (k > number of such experts, or a non-finite
        score) get idx -1 and weight 0.
        weighting="uniform": w = 1/k on each valid slot (eq. 9: a non-targeting expert is a zero expert);
        weighting="softmax": w = softmax(s / temperature) over the selected valid slots.
    Shapes (M = rows, T = experts, R = max rank):
        h [M, T, R] fp32/fp16/bf16 (fp64 on CPU), any strides -- typically a column slice
        ``Y[:, N:].view(M, T, R)`` of a wider GEMM output; rank [T] int or None (= R for all);
        score_scale [T] float or None (= 1; used only by score="first").
    Returns (idx [M, k] int32, w [M, k] float32, scores [M, T] float32). Math in fp32; for fp64
    h, math, w and scores are fp64 (on every backend: the reference with ``upcast``).
    ``rank`` and ``score_scale`` must be on h's device. k > T is allowed (extra slots: -1, weight 0).
    Autograd: differentiable in h through the scores and, with weighting="softmax", through the
    weights (uniform weights are constants; idx is an integer output; score 0 has subgradient 0).
    """
    if validate:
        _validate(h, k, rank, score, score_scale, weighting, temperature)
    k, temperature = int(k), float(temperature)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and h.requires_grad):
        # the custom op carries the backward (ops/backward.py)
        return _spectr_topk_op(h, k, rank, score, score_scale, weighting, temperature)
    return _run(pick_backend(h, "spectr_topk"), h, k, rank, score, score_scale, weighting, temperature)
