"""PELMo (seed 001, eqs. 1-4): prompt experts on one backbone, a trained multi-label router that
picks k of them per question, and the sparse probability-level ensemble of the k.

    from loramix_fast import pelmo
    feats = pelmo.HiddenStateFeatures(model, pooler="mean")        # frozen backbone features
    router = pelmo.PELMoRouter(feats, n_experts=4, top_k=2)         # small head (eqs. 2-3)
    correct = pelmo.expert_correctness(model, train_ids, train_mask, experts, is_correct,
                                       expert_prompts=prompts)     # [Q, E] bool
    y = pelmo.pelmo_labels(correct)                                 # eq. 1, [Q, E]
    pelmo.fit_router(router, train_ids, train_mask, y)              # multi-label BCE
    out = pelmo.pelmo_generate(model, ids, router, experts=["__base__"] * 4,
                               expert_prompts=prompts, attention_mask=mask)

A thin layer over public pieces: the weights are ``topk_renormalize(softmax(logits), k)``
(``lmf.topk_renormalize``), and generation is ``lmf.ensemble_generate(mode="probs")``, which runs
only the k selected experts per question (k copies per sequence, not E), accepts per-(question,
expert) content (retrieved passages, generated knowledge) and computes each expert's prompt prefix
once (its KV cache copied to every sequence).

Equations as implemented (the paper's text was not available here; the issue's summary is the
spec):
- eq. 1, labels: ``y[q, e] = 1`` if expert e answers training question q correctly, else 0; a
  question that no expert answers (all wrong) falls back to ``fallback``: "all" (every expert 1:
  no preference, the default), an expert index (that expert 1, e.g. the plain backbone), or
  "drop" (the question is left out of training).
- eq. 2, router: ``p[q] = softmax(head(pool(H^l(q))))`` over the E experts, H^l the backbone's
  hidden states at layer l (adapters off), pool = mean | last | max over the question's
  non-padding tokens; trained as a multi-label classifier (binary cross-entropy with logits on
  ``head``'s outputs against y).
- eq. 3, sparse routing: ``w[q] = topk_renormalize(p[q], k)``: the k largest, renormalised.
- eq. 4, ensemble: ``log sum_e w[q, e] softmax(logits_e)`` per step (``mode="probs"``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .ensemble import ensemble_generate
from .ensemble_weights import topk_renormalize
from .patching import is_patched, use_adapters

__all__ = ["pelmo_labels", "pool_hidden", "HiddenStateFeatures", "PELMoRouter", "fit_router",
           "expert_correctness", "pelmo_generate"]

POOLERS = ("mean", "last", "max")


def pelmo_labels(correct, fallback="all") -> torch.Tensor:
    """PELMo eq. 1: the multi-label targets of the router from which experts answer correctly.

    Semantics: y[q, e] = 1.0 if correct[q, e] else 0.0; a row with no correct expert becomes
    all ones (fallback="all"), one-hot at expert ``fallback`` (an int), or stays all zeros
    (fallback="drop": :func:`fit_router` leaves such rows out).
    Shapes: correct [Q, E] bool (or 0/1). Returns [Q, E] float32.
    """
    c = torch.as_tensor(correct)
    if c.dim() != 2 or c.shape[1] == 0:
        raise ValueError(f"correct must be [questions, experts] with at least one expert, got "
                         f"shape {tuple(c.shape)}")
    if c.is_floating_point() and not bool(((c == 0) | (c == 1)).all()):
        raise ValueError("correct must hold 0/1 (or bool) per (question, expert)")
    y = (c != 0).float()
    wrong = ~y.bool().any(1)  # [Q]: no expert answers it
    if fallback == "all":
        y[wrong] = 1.0
    elif fallback == "drop":
        pass
    elif isinstance(fallback, int) and not isinstance(fallback, bool):
        if not 0 <= fallback < y.shape[1]:
            raise ValueError(f"fallback expert index {fallback} is outside 0..{y.shape[1] - 1}")
        y[wrong, fallback] = 1.0
    else:
        raise ValueError(f"fallback must be 'all', 'drop' or an expert index, got {fallback!r}")
    return y


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                pooler: str = "mean") -> torch.Tensor:
    """Pool hidden states over each sequence's non-padding tokens.

    Semantics: mean = sum_l m[l] h[l] / sum_l m[l]; last = h at the last position with m = 1
    (left or right padding); max = max over positions with m = 1 (per feature).
    Shapes: hidden [B, L, d], attention_mask [B, L] 0/1 or None (all tokens). Returns [B, d].
    """
    if pooler not in POOLERS:
        raise ValueError(f"pooler must be one of {POOLERS}, got {pooler!r}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [batch, length, dim], got shape {tuple(hidden.shape)}")
    B, L, _ = hidden.shape
    if attention_mask is None:
        m = torch.ones(B, L, dtype=torch.bool, device=hidden.device)
    else:
        if tuple(attention_mask.shape) != (B, L):
            raise ValueError(f"attention_mask must be [{B}, {L}] like the hidden states, got "
                             f"{tuple(attention_mask.shape)}")
        m = attention_mask.to(hidden.device) != 0
    if not bool(m.any(1).all()):
        raise ValueError("every sequence needs at least one token (an all-zero attention_mask "
                         "row)")
    if pooler == "mean":
        mf = m.to(hidden.dtype)[..., None]
        return (hidden * mf).sum(1) / mf.sum(1)
    if pooler == "last":
        pos = torch.arange(L, device=hidden.device).expand(B, L)
        last = torch.where(m, pos, torch.full_like(pos, -1)).amax(1)  # [B]
        return hidden[torch.arange(B, device=hidden.device), last]
    neg = torch.finfo(hidden.dtype).min
    return hidden.masked_fill(~m[..., None], neg).amax(1)


class HiddenStateFeatures:
    """The router's input: a pooled hidden state of the backbone, adapters off.

    ``feats(input_ids, attention_mask) -> [B, d]`` float32: ``pool_hidden(H^layer, mask,
    pooler)`` with H^layer the hidden states after decoder layer ``layer`` (``-1``: the last,
    as ``output_hidden_states`` numbers them: 0 = embeddings) of ``model``'s decoder
    (``model.base_model``), no gradient. A model patched by loramix_fast runs with every row on
    ``"__base__"`` (no LoRA delta, the router ignored), so the features are the backbone's.
    """

    def __init__(self, model, pooler: str = "mean", layer: int = -1):
        if pooler not in POOLERS:
            raise ValueError(f"pooler must be one of {POOLERS}, got {pooler!r}")
        self.model, self.pooler, self.layer = model, pooler, layer
        cfg = getattr(model, "config", None)
        self.dim = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inner = getattr(self.model, "base_model", self.model)
        sel = (use_adapters(self.model, ["__base__"] * input_ids.shape[0])
               if is_patched(self.model) else contextlib.nullcontext())
        with sel:
            if inner is self.model:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                 output_hidden_states=True, use_cache=False)
            else:
                out = inner(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=True, use_cache=False)
        hs = out.hidden_states
        if not -len(hs) <= self.layer < len(hs):
            raise ValueError(f"layer {self.layer} is outside the model's {len(hs)} hidden states")
        return pool_hidden(hs[self.layer], attention_mask, self.pooler).float()


class PELMoRouter(torch.nn.Module):
    """PELMo's router (eqs. 2-3): features -> head -> softmax -> top-k -> renormalise.

    ``features``: a callable ``(input_ids, attention_mask) -> [B, d]`` (e.g.
    :class:`HiddenStateFeatures`; computed without gradient). ``head``: None (a Linear(d, E),
    or Linear -> GELU -> Linear with ``hidden`` units), or any module/callable ``[B, d] -> [B, E]``
    logits. ``router(input_ids, attention_mask) -> [B, E]`` float32 weights with exactly
    min(k, E) nonzero per row summing to 1, so ``weights=router`` plugs into
    :func:`loramix_fast.ensemble_generate` (which then runs k copies per sequence).
    """

    def __init__(self, features: Callable, n_experts: int, top_k: int = 2, *,
                 head: Callable | None = None, hidden: int | None = None,
                 in_features: int | None = None):
        super().__init__()
        if not callable(features):
            raise TypeError(f"features must be callable (input_ids, attention_mask) -> [B, d], "
                            f"got {type(features).__name__}")
        if not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        self.features, self.n_experts, self.top_k = features, n_experts, top_k
        if head is None:
            d = in_features or getattr(features, "dim", None)
            if not d:
                raise ValueError("in_features is needed: the features callable has no .dim")
            head = (torch.nn.Linear(d, n_experts) if hidden is None else torch.nn.Sequential(
                torch.nn.Linear(d, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, n_experts)))
        elif not callable(head):
            raise TypeError(f"head must be a module or callable [B, d] -> [B, E], got "
                            f"{type(head).__name__}")
        self.head = head

    def logits_from_features(self, f: torch.Tensor) -> torch.Tensor:
        """head(f): [B, d] -> [B, E] (float32)."""
        params = list(self.head.parameters()) if isinstance(self.head, torch.nn.Module) else []
        z = self.head(f.to(params[0].dtype) if params else f)
        if z.dim() != 2 or z.shape[1] != self.n_experts:
            raise ValueError(f"the head must return [batch, {self.n_experts}] logits, got shape "
                             f"{tuple(z.shape)}")
        return z.float()

    def logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self.logits_from_features(self.features(input_ids, attention_mask))

    def probs(self, input_ids, attention_mask=None) -> torch.Tensor:
        """eq. 2: softmax over the experts, [B, E]."""
        return torch.softmax(self.logits(input_ids, attention_mask), dim=-1)

    def forward(self, input_ids, attention_mask=None) -> torch.Tensor:
        """eq. 3: the top-k probabilities renormalised, zeros elsewhere, [B, E]."""
        with torch.no_grad():
            return topk_renormalize(self.probs(input_ids, attention_mask), self.top_k)


def fit_router(router: PELMoRouter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               labels: torch.Tensor, *, epochs: int = 50, lr: float = 1e-2,
               batch_size: int = 64, weight_decay: float = 0.0, seed: int = 0) -> list[float]:
    """Train ``router.head`` as a multi-label classifier (binary cross-entropy with logits against
    ``labels``, eq. 1's y), the features computed once (the backbone is frozen). Rows of
    ``labels`` that are all zero (``pelmo_labels(..., fallback="drop")``) are left out. Adam,
    shuffled mini-batches from ``seed``. Returns the mean loss of every epoch.
    Shapes: input_ids / attention_mask [Q, L], labels [Q, E]."""
    if not isinstance(router.head, torch.nn.Module) or not list(router.head.parameters()):
        raise TypeError("fit_router trains router.head's parameters; this head has none")
    y = torch.as_tensor(labels, dtype=torch.float32)
    if tuple(y.shape) != (input_ids.shape[0], router.n_experts):
        raise ValueError(f"labels must be [{input_ids.shape[0]}, {router.n_experts}] (questions, "
                         f"experts), got {tuple(y.shape)}")
    keep = y.bool().any(1)
    if not bool(keep.any()):
        raise ValueError("every labels row is all zero: nothing to train on")
    with torch.no_grad():
        feats = torch.cat([router.features(input_ids[i:i + batch_size],
                                           attention_mask[i:i + batch_size])
                           for i in range(0, input_ids.shape[0], batch_size)])
    feats, y = feats[keep.to(feats.device)], y[keep].to(feats.device)
    opt = torch.optim.Adam(router.head.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        order = torch.randperm(feats.shape[0], generator=g)
        total = 0.0
        for i in range(0, feats.shape[0], batch_size):
            sel = order[i:i + batch_size].to(feats.device)
            loss = F.binary_cross_entropy_with_logits(router.logits_from_features(feats[sel]),
                                                      y[sel])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * sel.numel()
        history.append(total / feats.shape[0])
    return history


def expert_correctness(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       experts: Sequence[str], is_correct: Callable[[int, list], bool], *,
                       expert_prompts: Sequence | None = None, expert_content=None,
                       max_new_tokens: int = 20, **generate_kw) -> torch.Tensor:
    """Eq. 1's input: run every expert alone, greedily, on every training question and ask
    ``is_correct(q, new_tokens)``. Returns [Q, E] bool. One ``ensemble_generate`` call per
    expert (its weight 1, the others 0: one copy per question)."""
    E = len(experts)
    out = torch.zeros(input_ids.shape[0], E, dtype=torch.bool)
    P = input_ids.shape[1]
    for e in range(E):
        w = torch.zeros(E)
        w[e] = 1.0
        seqs = ensemble_generate(model, input_ids, experts=list(experts), weights=w,
                                 mode="probs", max_new_tokens=max_new_tokens,
                                 attention_mask=attention_mask, expert_prompts=expert_prompts,
                                 expert_content=expert_content, **generate_kw)
        for q in range(input_ids.shape[0]):
            out[q, e] = bool(is_correct(q, seqs[q, P:].tolist()))
    return out


def pelmo_generate(model, input_ids: torch.Tensor, router: Callable, experts: Sequence[str], *,
                   attention_mask: torch.Tensor | None = None,
                   expert_prompts: Sequence | None = None, expert_content=None,
                   **generate_kw) -> torch.LongTensor:
    """PELMo's inference: ``ensemble_generate(mode="probs", weights=router)``: the router's top-k
    renormalised weights (eq. 3) decide which experts run (k copies per question) and mix their
    next-token distributions (eq. 4). Every keyword of ``ensemble_generate`` passes through."""
    if "mode" in generate_kw and generate_kw["mode"] != "probs":
        raise ValueError("PELMo mixes probabilities (eq. 4): mode must be 'probs'")
    generate_kw.pop("mode", None)
    return ensemble_generate(model, input_ids, experts=list(experts), weights=router,
                             mode="probs", attention_mask=attention_mask,
                             expert_prompts=expert_prompts, expert_content=expert_content,
                             **generate_kw)
