"""Scoring a weighted ensemble of experts teacher-forced, and learning its weights (the trade-offs
paper's ensembling; ELREA eq. 10 at training time).

    lp = lmf.ensemble_logprobs(model, ids, experts=["add", "sort"], weights=w, mode="probs")
    w = lmf.fit_ensemble_weights(model, batches, experts=["add", "sort", "__base__"])

Every expert runs in ONE batched forward: each sequence is repeated once per expert and each copy
carries its expert's adapter (the multi-LoRA op with one slot, like ``ensemble_generate``).

Legend: B = sequences, E = experts, L = sequence length, V = vocabulary, T = scored tokens.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import torch

from .ensemble import _check_experts
from .patching import is_patched, use_adapters

__all__ = ["ensemble_logprobs", "expert_logprobs", "fit_ensemble_weights"]

_MODES = ("probs", "logits")


def _check_ids(input_ids, attention_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [batch, seq_len] LongTensor, got "
                         f"{type(input_ids).__name__} of shape "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids needs at least 2 tokens per sequence to score a next token, "
                         f"got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.long)
    elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids "
                         f"{tuple(input_ids.shape)}, got {tuple(getattr(attention_mask, 'shape', ()))}")
    if input_ids.is_inference():  # e.g. from ensemble_generate: autograd cannot save those
        input_ids = input_ids.clone()
    if attention_mask.is_inference():
        attention_mask = attention_mask.clone()
    return input_ids.long(), attention_mask.to(device=input_ids.device, dtype=torch.long)


def _expert_logits(model, input_ids, attention_mask, experts) -> torch.Tensor:
    """Logits of every expert on every position, one batched forward: [B, E, L, V]. Row
    ``b * E + e`` of the forward is sequence b under expert e; positions follow the mask (left
    padding is fine). Runs under the caller's grad mode."""
    B, L = input_ids.shape
    E = len(experts)
    ids = input_ids.repeat_interleave(E, dim=0)  # [B*E, L]
    mask = attention_mask.repeat_interleave(E, dim=0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    names = [experts[n % E] for n in range(B * E)]
    sel = use_adapters(model, names) if is_patched(model) else contextlib.nullcontext()
    with sel:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    logits = out.logits  # [B*E, L, V]
    return logits.view(B, E, L, logits.shape[-1])


def _valid(attention_mask) -> torch.Tensor:
    """[B, L-1] bool: the target token and its context's last token are both real."""
    return (attention_mask[:, 1:] > 0) & (attention_mask[:, :-1] > 0)


def expert_logprobs(model, input_ids: torch.Tensor, experts: Sequence[str],
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each expert's log-probability of each next token, teacher-forced, one batched forward.

    Semantics: ``lp[b, e, t] = log softmax(model(input_ids[b], adapter=experts[e])[t])[ids[b, t+1]]``
    (0 where ``attention_mask[b, t]`` or ``attention_mask[b, t+1]`` is 0).
    Shapes: input_ids [B, L] (L >= 2), attention_mask [B, L] or None (all ones). Returns
    [B, E, L-1] float32 (float64 for a float64 model), differentiable in the model's parameters
    when grad is enabled.
    """
    input_ids, attention_mask = _check_ids(input_ids, attention_mask)
    experts = _check_experts(model, experts)
    logits = _expert_logits(model, input_ids, attention_mask, experts)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lsm = torch.log_softmax(logits[:, :, :-1].to(acc), dim=-1)  # [B, E, L-1, V]
    tgt = input_ids[:, None, 1:, None].expand(-1, len(experts), -1, 1)
    lp = lsm.gather(-1, tgt)[..., 0]
    return torch.where(_valid(attention_mask)[:, None], lp, torch.zeros((), dtype=acc,
                                                                        device=lp.device))


def _check_weights(weights, B: int, E: int, mode: str, device, dtype) -> torch.Tensor:
    """[B, E] weights in ``dtype`` (autograd kept); probs mode: >= 0 and renormalised per row."""
    if weights is None:
        return torch.full((B, E), 1.0 / E, dtype=dtype, device=device)
    w = weights if isinstance(weights, torch.Tensor) else torch.as_tensor(weights)
    if not w.is_floating_point():
        w = w.to(dtype)
    w = w.to(device=device, dtype=dtype)
    if w.dim() == 1 and w.shape[0] == E:
        w = w[None].expand(B, E)
    if tuple(w.shape) != (B, E):
        raise ValueError(f"weights must have shape [n_experts] = [{E}] or [batch, n_experts] = "
                         f"[{B}, {E}], got {tuple(w.shape)}")
    with torch.no_grad():
        if not bool(torch.isfinite(w).all()):
            raise ValueError("weights must be finite")
        if mode == "probs":
            if bool((w < 0).any()):
                raise ValueError("weights must be >= 0 in mode 'probs' (they are renormalised to "
                                 "sum to 1 per sequence)")
            dead = (w.sum(1) <= 0).nonzero().flatten().tolist()
            if dead:
                raise ValueError(f"every sequence needs a positive weight in mode 'probs'; "
                                 f"sequence(s) {dead} have none")
    if mode == "probs":
        w = w / w.sum(1, keepdim=True)
    return w


def _mix_probs(lp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """log sum_e w[.., e] exp(lp[.., e, t]); lp [..., E, T], w [..., E] (w >= 0). Stable, and
    its gradient in w is finite at w = 0 (no log of a weight)."""
    m = lp.detach().amax(dim=-2, keepdim=True)  # [..., 1, T]
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m[..., 0, :] + torch.log((w[..., None] * torch.exp(lp - m)).sum(dim=-2))


def ensemble_logprobs(model, input_ids: torch.Tensor, experts: Sequence[str], weights=None,
                      mode: str = "probs", attention_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Log-probability of each next token of ``input_ids`` under a weighted mixture of experts,
    teacher-forced, every expert in one batched forward; differentiable in ``weights``.

    Semantics (z[b, e, t] = expert e's logits at position t of sequence b, y = ids[b, t+1]):
        mode="probs":  out[b, t] = log sum_e w'[b, e] softmax(z[b, e, t])[y],
                       w' = w / sum_e w   (weights must be >= 0; renormalised per sequence)
        mode="logits": out[b, t] = log_softmax(sum_e w[b, e] z[b, e, t])[y]   (ELREA eq. 10:
                       any finite weights, not renormalised)
        out[b, t] = 0 where attention_mask[b, t] or attention_mask[b, t+1] is 0 (padding).
    Args:
        model: a causal LM patched with ``lmf.patch`` (an unpatched one serves ``"__base__"``).
        input_ids: [B, L] token ids, L >= 2 (left padding with a mask is fine).
        experts: E adapter names (or ``"__base__"``).
        weights: None (uniform 1/E), [E] or [B, E] (tensor, may require grad; or a list).
        mode: "probs" (probability-level mixture) or "logits" (logit-level).
        attention_mask: [B, L] of 0/1, or None (all ones).
    Returns: [B, L-1] float32 (float64 for a float64 model). The model runs under the caller's
    grad mode (wrap the call in ``torch.no_grad()`` when only ``weights`` need a gradient: the
    mixture is then the only graph).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be 'probs' or 'logits', got {mode!r}")
    input_ids, attention_mask = _check_ids(input_ids, attention_mask)
    experts = _check_experts(model, experts)
    B, E = input_ids.shape[0], len(experts)
    logits = _expert_logits(model, input_ids, attention_mask, experts)  # [B, E, L, V]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    w = _check_weights(weights, B, E, mode, input_ids.device, acc)
    valid = _valid(attention_mask)
    tgt = input_ids[:, 1:]  # [B, L-1]
    if mode == "probs":
        lsm = torch.log_softmax(logits[:, :, :-1].to(acc), dim=-1)
        lp = lsm.gather(-1, tgt[:, None, :, None].expand(-1, E, -1, 1))[..., 0]  # [B, E, L-1]
        out = _mix_probs(lp, w)
    else:
        z = torch.einsum("be,belv->blv", w, logits[:, :, :-1].to(acc))  # [B, L-1, V]
        out = torch.log_softmax(z, dim=-1).gather(-1, tgt[..., None])[..., 0]
    return torch.where(valid, out, torch.zeros((), dtype=acc, device=out.device))


# ---- learned ensembling ------------------------------------------------------------------------

def _batch_parts(batch, i: int):
    """(input_ids, attention_mask or None, labels or None) of one batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        if "input_ids" not in batch:
            raise ValueError(f"batches[{i}] has no 'input_ids' (keys: {list(batch.keys())})")
        return batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
        parts = list(batch) + [None] * (3 - len(batch))
        return parts[0], parts[1], parts[2]
    raise TypeError(f"batches[{i}] must be an input_ids tensor, a dict with 'input_ids' (and "
                    "optionally 'attention_mask', 'labels'), or a tuple (input_ids, mask, labels); "
                    f"got {type(batch).__name__}")


@torch.no_grad()
def _collect(model, batches, experts, mode, store_dtype):
    """Per scored token: probs mode lp [E, T]; logits mode (z [E, T, V], y [T]). One batched
    forward per batch; tokens are those whose label (shifted) is not -100 and whose mask is 1."""
    lps, zs, ys, n_fwd = [], [], [], 0
    for i, batch in enumerate(batches):
        ids, mask, labels = _batch_parts(batch, i)
        ids, mask = _check_ids(ids, mask)
        keep = _valid(mask)
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != ids.shape:
                raise ValueError(f"batches[{i}]['labels'] must have the shape of input_ids "
                                 f"{tuple(ids.shape)}")
            keep = keep & (labels.to(ids.device)[:, 1:] != -100)
        logits = _expert_logits(model, ids, mask, experts)  # [B, E, L, V]
        n_fwd += 1
        z = logits[:, :, :-1].permute(1, 0, 2, 3)[:, keep]  # [E, T_i, V]
        y = ids[:, 1:][keep]
        if mode == "probs":
            lps.append(torch.log_softmax(z.float(), -1).gather(
                -1, y[None, :, None].expand(len(experts), -1, 1))[..., 0].double())
        else:
            zs.append(z.to(store_dtype))
            ys.append(y)
    if n_fwd == 0:
        raise ValueError("batches is empty")
    if mode == "probs":
        lp = torch.cat(lps, dim=1)
        if lp.shape[1] == 0:
            raise ValueError("batches hold no scored token (every label is -100 or masked)")
        return lp, None
    z, y = torch.cat(zs, dim=1), torch.cat(ys)
    if y.numel() == 0:
        raise ValueError("batches hold no scored token (every label is -100 or masked)")
    return z, y


def _mixture_nll(stored, y, w: torch.Tensor, mode: str, chunk: int = 4096) -> torch.Tensor:
    """Mean NLL over the stored tokens of the mixture with simplex weights ``w [E]``."""
    if mode == "probs":
        return -_mix_probs(stored, w.to(stored.dtype)).mean()
    T = y.shape[0]
    total = w.new_zeros(())
    for s in range(0, T, chunk):
        z = torch.einsum("e,etv->tv", w, stored[:, s:s + chunk].to(w.dtype))
        total = total - torch.log_softmax(z, -1).gather(-1, y[s:s + chunk, None]).sum()
    return total / T


def fit_ensemble_weights(model, batches: Iterable, experts: Sequence[str], mode: str = "probs", *,
                         steps: int = 300, lr: float = 0.1, init=None,
                         store_dtype: torch.dtype = torch.float32,
                         return_history: bool = False):
    """Learn one ensemble weight per expert on the simplex by SGD on the mixture NLL (the
    trade-offs paper's learned ensembling).

    The experts are frozen, so their per-token outputs are computed once, one batched forward per
    batch (every expert in it), and the fitting loop runs no model forward: probs mode keeps each
    scored token's log-probability under each expert ([E, T], float64), logits mode each expert's
    logits of each scored token ([E, T, V] in ``store_dtype``; bfloat16 halves the memory).

    Objective: ``min_{w in simplex} -(1/T) sum_t ensemble_logprob_t(w)``, with ``w = softmax(theta)``
    and Adam on theta (``steps`` full-batch steps, learning rate ``lr`` decayed by a cosine to 0);
    in "probs" mode the objective is convex in w. Weights found for "logits" mode are also on the
    simplex (ELREA's weights need not be; scale them afterwards if wanted).

    Args:
        batches: an iterable of batches, each an ``input_ids [B, L]`` tensor, a dict with
            ``input_ids`` and optionally ``attention_mask`` and ``labels`` (HF convention: tokens
            whose label is -100 are not scored; labels[:, t+1] decides for the token predicted at
            t), or a tuple ``(input_ids, attention_mask, labels)``.
        experts: E adapter names (or ``"__base__"``).
        mode: "probs" or "logits".
        init: None (uniform) or [E] positive starting weights.
    Returns: w [E] float32 on the simplex; with ``return_history=True`` also the list of mean NLLs
    (one per step, the first at ``init``).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be 'probs' or 'logits', got {mode!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    experts = _check_experts(model, experts)
    E = len(experts)
    stored, y = _collect(model, batches, experts, mode, store_dtype)
    dt = torch.float64 if mode == "probs" else torch.float32
    if init is None:
        theta0 = torch.zeros(E, dtype=dt)
    else:
        w0 = torch.as_tensor(init, dtype=dt).flatten()
        if w0.shape != (E,) or not bool((w0 > 0).all()) or not bool(torch.isfinite(w0).all()):
            raise ValueError(f"init must be {E} positive finite weights, got {init!r}")
        theta0 = torch.log(w0 / w0.sum())
    theta = theta0.to(stored.device).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    history = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad()
        loss = _mixture_nll(stored, y, torch.softmax(theta, 0), mode)
        loss.backward()
        history.append(float(loss.detach()))
        opt.step()
    with torch.no_grad():
        w = torch.softmax(theta, 0)
        if return_history:
            history.append(float(_mixture_nll(stored, y, w, mode)))
    w = w.detach().float()
    return (w, history) if return_history else w
