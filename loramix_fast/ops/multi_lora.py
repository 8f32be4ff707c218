"""``multi_lora_linear``: one base GEMM plus gathered per-row LoRA deltas (DESIGN.md operation 1).

Validates, picks a backend (Triton / C++ / reference) and is registered as the custom op
``loramix::multi_lora_linear`` with a fake implementation, so ``torch.compile`` sees one opaque node.
"""
from __future__ import annotations

import functools
from typing import Callable  # noqa: F401 - in an annotation

import torch

from .. import reference
from ._dispatch import FLOAT_DTYPES, INT_DTYPES, check_tensor, pick_backend

__all__ = ["multi_lora_linear", "multi_lora_expand", "multi_lora_add_", "multi_lora_add_kernel"]


def _run(backend, x, weight, A, B, scale, rank, idx, w, bias):
    """The eager forward on ``backend`` (no checks, no autograd): also the serving hot path of
    patched modules under ``torch.no_grad``."""
    if backend == "cpp":
        return torch.ops.loramix_cpp.multi_lora_linear.default(x, weight, A, B, scale, rank, idx, w,
                                                               bias)
    if backend == "triton":  # the autotuned choice: fused / cuBLAS + shrink + expand / dense
        from ._tuned import multi_lora_linear_tuned

        return multi_lora_linear_tuned(x, weight, A, B, scale, rank, idx, w, bias)
    return reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias)


@torch.library.custom_op("loramix::multi_lora_linear", mutates_args=())
def _multi_lora_linear_op(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          scale: torch.Tensor, rank: torch.Tensor, idx: torch.Tensor,
                          w: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    return _run(pick_backend(x, "multi_lora_linear"), x, weight, A, B, scale, rank, idx, w, bias)


@_multi_lora_linear_op.register_fake
def _(x, weight, A, B, scale, rank, idx, w, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


_train_op = None  # loramix::multi_lora_linear_train (returns y and h), set by ops/backward.py


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def _validate(x, weight, A, B, scale, rank, idx, w, bias, backend):
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    M, K = x.shape
    dev = x.device
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=dev, shape=(None, K))
    N = weight.shape[0]
    check_tensor("A", A, ndim=3, dtypes=(x.dtype,), device=dev, shape=(None, None, K))
    E, R = A.shape[0], A.shape[1]
    check_tensor("B", B, ndim=3, dtypes=(x.dtype,), device=dev, shape=(E, N, R))
    check_tensor("scale", scale, ndim=1, dtypes=FLOAT_DTYPES, device=dev, shape=(E,))
    check_tensor("rank", rank, ndim=1, dtypes=INT_DTYPES, device=dev, shape=(E,))
    check_tensor("idx", idx, ndim=2, dtypes=INT_DTYPES, device=dev, shape=(M, None))
    check_tensor("w", w, ndim=2, dtypes=FLOAT_DTYPES, device=dev, shape=(M, idx.shape[1]),
                 optional=True)
    check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=dev, shape=(N,), optional=True)
    _check_ids(idx, E, backend)


def _check_ids(idx, E, backend):
    """ValueError for an adapter id outside [-1, E) on CPU (free on the host: no device sync; the
    C++ kernel checks ids itself, before any narrowing, with the same kind of error). On GPUs the
    kernels treat such ids as "no adapter". ids are never narrowed to int32 before this check
    (every backend takes int64 ids as they are), so 2**32 + 2 can never alias adapter 2."""
    if (idx.device.type == "cpu" and backend != "cpp" and idx.numel()
            and not torch.compiler.is_compiling()):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= E:
            raise ValueError(f"idx holds adapter id {lo if lo < -1 else hi}, outside [-1, {E - 1}] "
                             f"(E = {E} adapters; -1 = no adapter)")


def _check_x(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least 1 dim (its last is the features), got a scalar")


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      scale: torch.Tensor, rank: torch.Tensor, idx: torch.Tensor,
                      w: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                      *, validate: bool = True) -> torch.Tensor:
    """Base linear plus per-row adapter deltas, fused.

    Semantics:
        y[m] = x[m] @ weight.T + bias
               + sum_s w[m, s] * scale[e] * B[e, :, :rank[e]] @ (A[e, :rank[e]] @ x[m]),
        e = idx[m, s]; e = -1 means "no adapter" for that slot.
    Shapes (M = rows, K = in, N = out, E = adapters, R = max rank, S = slots per row):
        x [..., K] (leading dims flattened to M), weight [N, K] (any strides), A [E, R, K],
        B [E, N, R], scale [E] float, rank [E] int (<= R; rows past it are never read),
        idx [M, S] int32 (int64 accepted), w [M, S] float or None (= 1), bias [N] or None.
        x, weight, A, B, bias share one dtype (fp32, fp16, bf16; fp64 on CPU); accumulation is fp32
        (fp64 for fp64 inputs: an fp64 model is fp64-exact if its ``scale`` is fp64 too).
    Returns y [..., N] in x.dtype.
    Errors name the offending argument. On CPU an id outside [-1, E) raises ValueError on every
    backend (int64 ids are checked as they are, never wrapped to int32); on GPU (where checking
    would cost a sync) kernels treat it as -1, so no id can read out of bounds.
    Autograd: differentiable in x, weight, A, B, w and bias (not scale, rank, idx). When grad
    mode is on and one of them requires grad, ``loramix::multi_lora_linear_train`` runs (C++ on
    CPU, the torch formulation elsewhere): it returns the shrink output h [M, S, R] with y and
    saves x, h and the inputs for a backward of grouped GEMMs (``ops/backward.py``; nothing of
    size M x N x R). Serving: wrap in ``torch.no_grad`` / ``torch.inference_mode``.
    """
    _check_x("x", x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    train = _needs_grad(x2, weight, A, B, bias, w)
    backend = pick_backend(x2, "multi_lora_linear_fwd" if train else "multi_lora_linear")
    if validate:
        _validate(x2, weight, A, B, scale, rank, idx, w, bias, backend)
    # idx stays int64 when given so (no narrowing cast: every backend reads int64 ids)
    if train:
        y = _train_op(x2, weight, A, B, scale, rank, idx, w, bias)[0]
    elif torch.compiler.is_compiling():
        y = _multi_lora_linear_op(x2, weight, A, B, scale, rank, idx, w, bias)
    else:
        y = _run(backend, x2, weight, A, B, scale, rank, idx, w, bias)
    return y.reshape(*lead, weight.shape[0]) if x.dim() != 2 else y


def multi_lora_expand(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                      rank: torch.Tensor, idx: torch.Tensor, w: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Add the selected adapters' expand to ``y`` from precomputed shrink outputs ``h``.

    Semantics: out[m] = y[m] + sum_s w[m,s] * scale[e] * B[e, :, :rank[e]] @ h[m, e, :rank[e]],
    e = idx[m, s]. Shapes: y [M, N], h [M, E, R], B [E, N, R], scale [E], rank [E], idx [M, S],
    w [M, S] or None. Returns a new [M, N] tensor in y.dtype (math in fp64 for fp64 y).
    Errors as :func:`multi_lora_linear` (an id outside [-1, E) raises ValueError on CPU).
    Autograd: differentiable in y, h, B and w (through the registered custom op).
    """
    check_tensor("y", y, ndim=2, dtypes=FLOAT_DTYPES)
    M, N = y.shape
    dev = y.device
    check_tensor("B", B, ndim=3, dtypes=FLOAT_DTYPES, shape=(None, N, None), device=dev)
    E, R = B.shape[0], B.shape[2]
    check_tensor("h", h, ndim=3, dtypes=FLOAT_DTYPES, shape=(M, E, R), device=dev)
    check_tensor("scale", scale, ndim=1, dtypes=FLOAT_DTYPES, device=dev, shape=(E,))
    check_tensor("rank", rank, ndim=1, dtypes=INT_DTYPES, device=dev, shape=(E,))
    check_tensor("idx", idx, ndim=2, dtypes=INT_DTYPES, shape=(M, None), device=dev)
    check_tensor("w", w, ndim=2, dtypes=FLOAT_DTYPES, shape=(M, idx.shape[1]), optional=True,
                 device=dev)
    if torch.compiler.is_compiling():
        return _multi_lora_expand_op(y, h, B, scale, rank, idx, w)
    backend = pick_backend(y, "multi_lora_expand")
    _check_ids(idx, E, backend)
    if _needs_grad(y, h, B, w):  # the custom op carries the backward (ops/backward.py)
        return _multi_lora_expand_op(y, h, B, scale, rank, idx, w)
    return _run_expand(backend, y, h, B, scale, rank, idx, w)


def _run_expand(backend, y, h, B, scale, rank, idx, w):
    if backend == "cpp":
        return torch.ops.loramix_cpp.multi_lora_expand(y, h, B, scale, rank, idx, w)
    if backend == "triton":  # the autotuned choice: fused / dense
        from ._tuned import multi_lora_expand_tuned

        return multi_lora_expand_tuned(y, h, B, scale, rank, idx, w)
    return reference.multi_lora_expand(y, h, B, scale, rank, idx, w)


@torch.library.custom_op("loramix::multi_lora_expand", mutates_args=())
def _multi_lora_expand_op(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                          rank: torch.Tensor, idx: torch.Tensor,
                          w: torch.Tensor | None) -> torch.Tensor:
    return _run_expand(pick_backend(y, "multi_lora_expand"), y, h, B, scale, rank, idx, w)


@_multi_lora_expand_op.register_fake
def _(y, h, B, scale, rank, idx, w):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def multi_lora_add_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    scale: torch.Tensor, rank: torch.Tensor, idx: torch.Tensor,
                    w: torch.Tensor | None = None, *, validate: bool = True) -> torch.Tensor:
    """Add the selected adapters' deltas of ``x`` to ``y`` in place (the delta half of
    :func:`multi_lora_linear`, for a base output the caller computed, e.g. a serving engine's).

    Semantics: y[m] += sum_s w[m, s] * scale[e] * B[e, :, :rank[e]] @ (A[e, :rank[e]] @ x[m]),
    e = idx[m, s]; e = -1 adds nothing (rows without an adapter are never written).
    Shapes: y [M, N] (any strides: a column slice of a wider output is updated where it lies),
    x [M, K], A [E, R, K], B [E, N, R] (x, A, B in y's dtype), scale [E] float, rank [E] int,
    idx [M, S] int, w [M, S] float or None (= 1). Returns y (the same tensor).
    Math: fp32 accumulation (fp64 for fp64 y); a bf16/fp16 y gets round(y + delta), one rounding.
    On CPU (C++) each row's shrink reads only its own adapter's A (no h over every adapter, no copy
    of y); elsewhere (Triton / reference) it is the shrink GEMM over all E adapters followed by
    :func:`multi_lora_expand`, copied into y. ``validate=False`` skips the Python-side checks
    (the C++ kernel checks shapes, dtypes and ids itself; a serving engine's hot path).
    Errors name the offending argument; ids outside [-1, E) raise ValueError on CPU.
    Inference only: not differentiable (use :func:`multi_lora_linear` to train). Registered as the
    custom op ``loramix::multi_lora_add_`` (mutates y) with a fake implementation, so torch.compile
    and CUDA graphs see one node.
    """
    if validate:
        check_tensor("y", y, ndim=2, dtypes=FLOAT_DTYPES)
        M, N = y.shape
        dev = y.device
        check_tensor("x", x, ndim=2, dtypes=(y.dtype,), shape=(M, None), device=dev)
        K = x.shape[1]
        check_tensor("A", A, ndim=3, dtypes=(y.dtype,), shape=(None, None, K), device=dev)
        E, R = A.shape[0], A.shape[1]
        check_tensor("B", B, ndim=3, dtypes=(y.dtype,), shape=(E, N, R), device=dev)
        check_tensor("scale", scale, ndim=1, dtypes=FLOAT_DTYPES, device=dev, shape=(E,))
        check_tensor("rank", rank, ndim=1, dtypes=INT_DTYPES, device=dev, shape=(E,))
        check_tensor("idx", idx, ndim=2, dtypes=INT_DTYPES, shape=(M, None), device=dev)
        check_tensor("w", w, ndim=2, dtypes=FLOAT_DTYPES, shape=(M, idx.shape[1]), optional=True,
                     device=dev)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (y, x, A, B, w)):
            raise RuntimeError("multi_lora_add_ is inference only (not differentiable): call it "
                               "under torch.no_grad(), or use multi_lora_linear to train")
    if torch.compiler.is_compiling():
        _multi_lora_add_op(y, x, A, B, scale, rank, idx, w)
        return y
    backend = pick_backend(y, "multi_lora_add_")
    if validate:
        _check_ids(idx, A.shape[0], backend)
    _run_add(backend, y, x, A, B, scale, rank, idx, w)
    return y


def multi_lora_add_kernel(device) -> "Callable":
    """The eager callable behind :func:`multi_lora_add_` for tensors on ``device``, resolved
    once: ``f(y, x, A, B, scale, rank, idx, w) -> None`` (y updated in place). For a serving
    engine's hot path (one call per layer per step): no per-call backend lookup and no Python
    checks (the C++ kernel checks shapes, dtypes and ids itself; the other backends check
    nothing). The backend is the one ``pick_backend`` chooses now (``LORAMIX_BACKEND`` read once).
    Not for torch.compile regions: call :func:`multi_lora_add_` there (the custom op)."""
    backend = pick_backend(torch.empty(0, device=device), "multi_lora_add_")
    if backend == "cpp":
        return torch.ops.loramix_cpp.multi_lora_add_
    return functools.partial(_run_add, backend)


def _run_add(backend, y, x, A, B, scale, rank, idx, w):
    if backend == "cpp":
        torch.ops.loramix_cpp.multi_lora_add_(y, x, A, B, scale, rank, idx, w)
        return
    E, R, K = A.shape
    if E == 0 or R == 0 or idx.shape[1] == 0 or y.numel() == 0:
        return  # nothing selects an adapter
    h = torch.mm(x, A.reshape(E * R, K).t()).view(x.shape[0], E, R)  # every adapter's shrink
    y.copy_(_run_expand(backend, y, h, B, scale, rank, idx, w))


@torch.library.custom_op("loramix::multi_lora_add_", mutates_args=("y",))
def _multi_lora_add_op(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       scale: torch.Tensor, rank: torch.Tensor, idx: torch.Tensor,
                       w: torch.Tensor | None) -> None:
    _run_add(pick_backend(y, "multi_lora_add_"), y, x, A, B, scale, rank, idx, w)


@_multi_lora_add_op.register_fake
def _(y, x, A, B, scale, rank, idx, w):
    return None
