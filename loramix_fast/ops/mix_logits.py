"""``mix_logits``: weighted mixture of E experts' next-token scores (DESIGN.md operation 3).

Validates, picks a backend (Triton / C++ / reference) and is registered as the custom ops
``loramix::mix_logits``, ``loramix::mix_logits_greedy`` and ``loramix::mix_logits_sample`` with fake
implementations, so ``torch.compile`` sees one opaque node each. In eager mode the backend is called
directly (no custom-op dispatch overhead).

Legend: B = sequences, E = experts, V = vocabulary.
"""
from __future__ import annotations

import torch

from .. import reference
from ._dispatch import FLOAT_DTYPES, check_tensor, pick_backend

__all__ = [
    "mix_logits",
    "mix_logits_greedy",
    "mix_logits_sample",
    "sample_from_scores",
]

_MODES = ("logits", "probs")
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# --- torch formulations of the token pickers (the spec of the fused variants) ---------------------

def sample_from_scores(scores: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0,
                       top_p: float = 1.0) -> torch.Tensor:
    """Inverse-CDF sampling from ``softmax(scores / temperature)``, optionally top-p filtered.

    Semantics (fp64):
        p[b] = softmax(scores[b] / temperature); with top_p < 1, keep the tokens whose mass *before*
        them in descending order (ties: lower token id first) is < top_p (HF TopPLogitsWarper: the
        smallest set of top tokens holding top_p of the mass; the top token is always kept);
        token[b] = the smallest v with sum_{v' <= v} p[b, v'] > uniforms[b] * sum_v p[b, v].
        Non-finite scores (as ``reference.mix_logits`` defines them): -inf has probability 0; a
        row holding +inf scores samples among its +inf tokens only, uniformly (the limit of the
        softmax); a row holding NaN gives its first NaN token (what ``torch.argmax``, i.e. greedy,
        picks); a row whose scores are all -inf gives token 0.
    Shapes: scores [B, V], uniforms [B] in [0, 1). Returns [B] int64. No host synchronisation.
    """
    s = scores.to(torch.float64) / temperature
    G = s.amax(dim=1, keepdim=True)  # NaN when the row holds a NaN
    nan = torch.isnan(s)
    has_nan = nan.any(dim=1)
    first_nan = nan.to(torch.uint8).argmax(dim=1)
    valid = G > float("-inf")
    top = G == float("inf")
    p = torch.exp(s - torch.where(valid & ~top, G, torch.zeros_like(G)))  # exp(-inf) = 0
    p = torch.where(top, (s == float("inf")).to(p.dtype), p)
    if top_p < 1.0:
        sp, order = torch.sort(p, dim=1, descending=True, stable=True)
        before = sp.cumsum(1) - sp
        keep_sorted = before < top_p * sp.sum(1, keepdim=True)
        keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
        p = torch.where(keep, p, torch.zeros_like(p))
    cdf = p.cumsum(1)
    target = uniforms.to(device=scores.device, dtype=torch.float64)[:, None] * cdf[:, -1:]
    tok = (cdf <= target).sum(1)
    tok = torch.where(valid[:, 0] & (tok < scores.shape[1]), tok, torch.zeros_like(tok))
    tok = torch.where(has_nan, first_nan, tok)
    return tok.to(torch.int64)


# --- backends --------------------------------------------------------------------------------------

def _scores(backend: str, logits: torch.Tensor, weights: torch.Tensor, mode: str) -> torch.Tensor:
    if logits.dtype == torch.float64:  # fp64 logits: fp64 math and scores (every backend)
        return reference.mix_logits(logits, weights, mode, upcast=True)
    if backend == "cpp":
        return torch.ops.loramix_cpp.mix_logits(logits, weights, mode)
    if backend == "triton":
        from ..kernels.mix_logits import mix_logits_triton

        return mix_logits_triton(logits, weights, mode)
    return reference.mix_logits(logits, weights, mode)


def _greedy(backend: str, logits: torch.Tensor, weights: torch.Tensor, mode: str) -> torch.Tensor:
    if logits.dtype == torch.float64:
        return reference.mix_logits(logits, weights, mode, upcast=True).argmax(dim=1)
    if backend == "cpp":
        return torch.ops.loramix_cpp.mix_logits_greedy(logits, weights, mode)
    if backend == "triton":
        from ..kernels.mix_logits import mix_logits_greedy_triton

        return mix_logits_greedy_triton(logits, weights, mode)
    return reference.mix_logits(logits, weights, mode).argmax(dim=1)


def _sample(backend: str, logits: torch.Tensor, weights: torch.Tensor, mode: str,
            uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    if temperature == 0.0:
        return _greedy(backend, logits, weights, mode)
    if top_p >= 1.0 and logits.dtype != torch.float64:
        if backend == "cpp":
            return torch.ops.loramix_cpp.mix_logits_sample(logits, weights, mode, uniforms,
                                                            float(temperature))
        if backend == "triton":
            from ..kernels.mix_logits import mix_logits_sample_triton

            return mix_logits_sample_triton(logits, weights, mode, uniforms, float(temperature),
                                            sampler=sample_from_scores)
    # top-p (a sort over V) runs in torch on the kernel's scores
    return sample_from_scores(_scores(backend, logits, weights, mode), uniforms, temperature, top_p)


# --- custom ops (what torch.compile sees) ---------------------------------------------------------

@torch.library.custom_op("loramix::mix_logits", mutates_args=())
def _mix_logits_op(logits: torch.Tensor, weights: torch.Tensor, mode: str) -> torch.Tensor:
    return _scores(pick_backend(logits), logits, weights, mode)


@_mix_logits_op.register_fake
def _(logits, weights, mode):
    ft = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty((logits.shape[0], logits.shape[2]), dtype=ft)


@torch.library.custom_op("loramix::mix_logits_greedy", mutates_args=())
def _mix_logits_greedy_op(logits: torch.Tensor, weights: torch.Tensor, mode: str) -> torch.Tensor:
    return _greedy(pick_backend(logits), logits, weights, mode)


@_mix_logits_greedy_op.register_fake
def _(logits, weights, mode):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


@torch.library.custom_op("loramix::mix_logits_sample", mutates_args=())
def _mix_logits_sample_op(logits: torch.Tensor, weights: torch.Tensor, mode: str,
                          uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    return _sample(pick_backend(logits), logits, weights, mode, uniforms, temperature, top_p)


@_mix_logits_sample_op.register_fake
def _(logits, weights, mode, uniforms, temperature, top_p):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


# --- public functions ------------------------------------------------------------------------------

_BELOW_ONE = 1.0 - 2.0 ** -24  # the largest float32 below 1


def _check_uniforms(u: torch.Tensor) -> None:
    """ValueError unless every uniform is in [0, 1) (NaN is not). Free for CPU tensors; one
    device-to-host read on a GPU (not done while compiling or capturing a CUDA graph)."""
    if u.numel() == 0 or torch.compiler.is_compiling():
        return
    if u.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bad = ~((u >= 0) & (u < 1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"uniforms must be in [0, 1) (one per row), got {u[i].item()} at row {i}")


def _prepare(logits, weights, mode):
    """Validate; return logits as a [B, E, V] view (token stride 1) and weights [B, E]."""
    if mode not in _MODES:
        raise ValueError(f"mode must be 'logits' or 'probs', got {mode!r}")
    check_tensor("weights", weights, ndim=2, dtypes=FLOAT_DTYPES)
    B, E = weights.shape
    check_tensor("logits", logits, dtypes=_LOGIT_DTYPES, device=weights.device)
    if logits.dim() == 3:
        if logits.shape[0] != B or logits.shape[1] != E:
            raise ValueError(f"logits has shape {tuple(logits.shape)}, expected [B, E, V] = "
                             f"[{B}, {E}, V] (weights is [B, E] = {tuple(weights.shape)})")
        z = logits
    elif logits.dim() == 2:
        if logits.shape[0] != B * E:
            raise ValueError(f"logits has shape {tuple(logits.shape)}, expected [B*E, V] = "
                             f"[{B * E}, V] (rows b-major: row b*E + e; weights is [B, E] = "
                             f"{tuple(weights.shape)})")
        z = logits.reshape(B, E, logits.shape[1]) if B * E else logits.new_empty((B, E, logits.shape[1]))
    else:
        raise ValueError(f"logits must be [B, E, V] or [B*E, V], got shape {tuple(logits.shape)}")
    if z.shape[2] > 0 and z.stride(2) != 1:
        z = z.contiguous()
    return z, weights


def mix_logits(logits: torch.Tensor, weights: torch.Tensor, mode: str = "probs", *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mixture of E experts' next-token scores.

    Semantics:
        mode="logits": out[b] = sum_{e: w[b,e] != 0} w[b, e] * logits[b, e]            (ELREA eq. 10)
        mode="probs":  out[b] = log sum_{e: w[b,e] > 0} w[b, e] * softmax(logits[b, e])  (PELMo eq. 4)
        Experts with weight 0 are never read (their logits may be anything); in "probs" negative
        weights count as 0 and a row with no positive weight is -inf; weights need not sum to 1.
        NaN is never produced from finite input. Non-finite logits follow
        ``reference.mix_logits``'s rules on every backend (in "probs": -inf has probability 0, an
        expert with +inf logits puts all its mass on them, split equally, NaN in a used expert
        makes the row NaN; in "logits": IEEE arithmetic). (= ``reference.mix_logits``.)
    Shapes: logits [B, E, V] or [B*E, V] (rows b-major, as ``repeat_interleave(E)`` makes them),
        fp32 / bf16 / fp16 (fp64: fp64 math and scores, on every backend); weights [B, E] float.
        Returns [B, V] float32 (float64 for fp64 logits; written into ``out`` if given: a [B, V]
        tensor of that dtype on the logits' device).
    Cost: one read of the E*V logits per row, one write of V.
    Autograd: differentiable in logits and weights (both modes); an expert that is not used
    (weight 0; in "probs" weight <= 0) gets no gradient, and neither does its weight.
    """
    z, w = _prepare(logits, weights, mode)
    if out is not None:
        ft = torch.float64 if z.dtype == torch.float64 else torch.float32
        check_tensor("out", out, ndim=2, dtypes=(ft,), device=z.device,
                     shape=(z.shape[0], z.shape[2]))
    if torch.compiler.is_compiling() or (torch.is_grad_enabled()
                                         and (z.requires_grad or w.requires_grad)):
        y = _mix_logits_op(z, w, mode)  # the custom op carries the backward (ops/backward.py)
    else:
        y = _scores(pick_backend(z), z, w, mode)
    if out is not None:
        out.copy_(y)
        return out
    return y


def mix_logits_greedy(logits: torch.Tensor, weights: torch.Tensor, mode: str = "probs") -> torch.Tensor:
    """The greedy token of the mixture, fused: ``mix_logits(logits, weights, mode).argmax(1)``
    without writing the [B, V] scores (ties go to the lowest token id, like ``torch.argmax``; so
    does NaN: a row whose scores hold NaN gives its first NaN token, an all -inf row token 0).
    Shapes as :func:`mix_logits`. Returns [B] int64."""
    z, w = _prepare(logits, weights, mode)
    if torch.compiler.is_compiling():
        return _mix_logits_greedy_op(z, w, mode)
    return _greedy(pick_backend(z), z, w, mode)


def mix_logits_sample(logits: torch.Tensor, weights: torch.Tensor, mode: str = "probs", *,
                      temperature: float = 1.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None,
                      uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """A token sampled from the mixture: ``softmax(mix_logits(...) / temperature)``, top-p filtered
    like HF's ``TopPLogitsWarper`` (see :func:`sample_from_scores` for the exact rule).

    One uniform per row is drawn with torch from ``generator`` (or passed as ``uniforms`` [B], each
    in [0, 1): anything else, NaN included, raises ValueError; on a GPU that check reads one flag
    back from the device, skipped under torch.compile and CUDA-graph capture) and
    handed to the kernel, so every backend picks the same token from the same uniforms (up to
    rounding at a CDF boundary) and a seeded generator reproduces the draw. ``temperature == 0``
    is greedy. top_p = 1 is fused (no [B, V] scores in memory on the C++ backend); top_p < 1 sorts
    the kernel's scores in torch. Shapes as :func:`mix_logits`. Returns [B] int64.
    """
    z, w = _prepare(logits, weights, mode)
    temperature = float(temperature)
    top_p = float(top_p)
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    B = z.shape[0]
    if uniforms is None:
        dev = generator.device if generator is not None else z.device
        uniforms = torch.rand(B, generator=generator, device=dev, dtype=torch.float32)
    else:
        check_tensor("uniforms", uniforms, ndim=1, dtypes=FLOAT_DTYPES, shape=(B,))
        _check_uniforms(uniforms)
    # float32 rounds values just below 1 up to 1.0: keep them in [0, 1)
    uniforms = uniforms.to(device=z.device, dtype=torch.float32).clamp(max=_BELOW_ONE)
    if z.shape[2] == 0:
        raise ValueError("logits has an empty vocabulary (V = 0): no token to sample")
    if torch.compiler.is_compiling():
        return _mix_logits_sample_op(z, w, mode, uniforms, temperature, top_p)
    return _sample(pick_backend(z), z, w, mode, uniforms, temperature, top_p)
