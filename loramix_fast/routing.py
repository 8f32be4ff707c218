"""Training-free routing over a library of LoRA experts, per token and per layer (DESIGN.md op 2).

Routers plug into a patched model (``lmf.patch(model, lib, router=...)`` or ``lmf.set_router``) and
serve every token at every patched layer with the experts it aligns with:

- :class:`SpectR` (Fleshman & Van Durme): ``dW_t = scale_t B_t A_t = U S V^T`` (eq. 2; computed
  once per adapter and module from two thin QRs and an r x r SVD, one sign convention), scores
  ``s_t = ||A*_t x||`` (eqs. 7-8) with ``A*_t = V^T, B*_t = U S`` (the authors' code, default) or
  ``A*_t = S V^T, B*_t = U`` (eq. 6, ``variant="paper"``: ``s_t = ||dW_t x||``), top-k (eq. 9),
  merge in output space (eq. 13) or factor space (eqs. 10-12).
- :class:`Arrow` (Ostapenko et al.; peft ``ArrowConfig`` semantics with exact prototypes): score
  ``|v_t . x|`` with v_t the top right singular vector of dW_t (= ``|h_t[0]| / sigma_t1``), softmax of
  score / temperature over the top k, output-space merge.
- :class:`Uniform`: mu-routing, the exact output-space mean ``(1/T) sum_t dW_t x``.
- :class:`PromptCached`: routes once per sequence from the prompt (SpectR/Arrow scores on the
  pooled prompt, training-free), per module (``scope="module"``: each module scores the mean of its
  input over the prompt) or for the whole model (``scope="model"``: one scoring pass of the base
  model over the prompt, every module's per-token normalised scores pooled, one top-k per
  sequence used at every layer), then reuses that choice for every prompt and generated token.

The hot path per layer: one GEMM for the base output, one GEMM ``x @ [A*_1; ...; A*_T].T`` for every
h_t (the only extra matrix work of routing), the scoring/top-k op, then the expand of the selected
experts from that same h buffer (``ops.multi_lora_expand``; A*x is never recomputed).
"""
from __future__ import annotations

import contextlib
import math
import re
import threading
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import ops
from .context import _GENERATING, _ROUTE_CACHE

__all__ = ["SpectR", "Arrow", "Uniform", "PromptCached", "PromptDecision", "route_once",
           "align_stack", "AlignedStack", "routing_report", "record_routing", "RoutingReport"]


@dataclass
class AlignedStack:
    """SpectR alignment of one module's stack. A_star [T, R, K], B_star [T, N, R] (dW_t = B*_t A*_t
    exactly, scale folded in), sigma [T, R] singular values (0 past rank), rank [T] int32,
    A_flat [T*R, K] (A_star viewed for the scoring GEMM), ones [T] (expand scale)."""

    A_star: torch.Tensor
    B_star: torch.Tensor
    sigma: torch.Tensor
    rank: torch.Tensor
    ones: torch.Tensor
    inv_sigma1: torch.Tensor  # [T] 1 / sigma_t1 (0 where rank is 0): Arrow's score scale
    equal_ranks: bool = True  # every targeting expert has the same rank (factor merge needs it)

    @property
    def A_flat(self) -> torch.Tensor:
        T, R, K = self.A_star.shape
        return self.A_star.view(T * R, K)


def _svd_flip(U: torch.Tensor, Vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sign per singular pair: the entry of largest magnitude of each column u_i of U [N, r] is
    made positive (ties go to the lowest index), flipping row i of Vt [r, K] with it (scikit-learn's
    ``svd_flip`` convention). U S Vt is unchanged."""
    i = U.abs().argmax(0)  # first index of the maximum: ties go to the lowest index
    sign = torch.sign(U.gather(0, i[None]))[0]
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign[None, :], Vt * sign[:, None]


def align_stack(stack, *, variant: str = "official") -> AlignedStack:
    """Factor every adapter's ``dW_t = scale_t B_t A_t`` as ``U S V^T`` (exact, via thin QRs of B
    and A^T and an r x r SVD, in float64; never a d_out x d_in SVD).

    variant="official" (default): ``A* = V^T, B* = U S`` (the SpectR authors' code: score
    ``||V^T x||``, the norm of x's projection on the expert's input subspace);
    variant="paper": ``A* = S V^T, B* = U`` (SpectR eq. 6: score ``||A* x|| = ||dW x||``).

    Sign convention: singular vectors are unique only up to the sign of each pair (u_i, v_i), and
    LAPACK / cuSOLVER return either. Each pair is flipped so that the entry of largest magnitude
    of u_i is positive (ties to the lowest index; scikit-learn's ``svd_flip``), so the factors, and
    the factor merge that sums B*_i and h_i across experts, are the same on every machine.

    Returns an :class:`AlignedStack` (A_star [T, R, K], B_star [T, N, R], zero past each rank;
    a rank-0 slot may hold stale values, which every consumer masks by rank), cached on
    ``stack.cache``. For a stack of the library's slot pool, the aligned factors are kept per
    slot across library versions: an add or a remove aligns only the slots it changed.
    """
    if variant not in ("paper", "official"):
        raise ValueError(f"variant must be 'paper' or 'official', got {variant!r}")
    key = f"aligned:{variant}"
    hit = stack.cache.get(key)
    if hit is not None:
        return hit
    E, R, K = stack.A.shape
    N = stack.B.shape[1]
    dev, dt = stack.A.device, stack.A.dtype
    ranks = stack.rank.tolist()
    scales = stack.scale.tolist()
    pool = getattr(stack, "pool", None)
    if pool is not None and stack.pool_epoch == pool.epoch:
        # a slot pool: the aligned factors live in buffers shaped like the pool and shared by
        # every library version; only slots whose content changed since are aligned again
        with _ALIGN_LOCK:
            buf = pool.cache.get(key)
            if buf is None:
                buf = pool.cache[key] = (
                    torch.zeros(pool.cap, R, K, dtype=dt, device=dev),
                    torch.zeros(pool.cap, N, R, dtype=dt, device=dev),
                    torch.zeros(pool.cap, R, dtype=torch.float32, device=dev), [None] * pool.cap)
            A_buf, B_buf, s_buf, keys = buf
            for t in range(E):
                if ranks[t] and keys[t] != pool.keys[t]:
                    _align_slot(stack, t, ranks[t], scales[t], variant, A_buf, B_buf, s_buf)
                    keys[t] = pool.keys[t]
        live = torch.tensor([r > 0 for r in ranks], device=dev)
        A_star, B_star = A_buf[:E], B_buf[:E]
        sigma = torch.where(live[:, None], s_buf[:E], torch.zeros((), device=dev))
    else:
        A_star = torch.zeros(E, R, K, dtype=dt, device=dev)
        B_star = torch.zeros(E, N, R, dtype=dt, device=dev)
        sigma = torch.zeros(E, R, dtype=torch.float32, device=dev)
        for t in range(E):
            if ranks[t]:
                _align_slot(stack, t, ranks[t], scales[t], variant, A_star, B_star, sigma)
    s1 = sigma[:, 0]
    inv = torch.where(s1 > 0, 1.0 / s1.clamp(min=1e-30), torch.zeros_like(s1))
    if variant == "official":  # h_t[0] = v_t . x already
        inv = (s1 > 0).float()
    out = AlignedStack(A_star, B_star, sigma, stack.rank.clone(),
                       torch.ones(E, dtype=torch.float32, device=dev), inv,
                       len({r for r in ranks if r > 0}) <= 1)
    stack.cache[key] = out
    return out


_ALIGN_LOCK = threading.Lock()


def _align_slot(stack, t, r, scale, variant, A_star, B_star, sigma) -> None:
    """Align adapter ``t`` (rank ``r``) of ``stack`` into row ``t`` of ``A_star`` / ``B_star`` /
    ``sigma`` (zero past the rank)."""
    dt = A_star.dtype
    A = stack.A[t, :r].double()  # [r, K]
    B = stack.B[t, :, :r].double()  # [N, r]
    Qb, Rb = torch.linalg.qr(B)  # [N, r], [r, r]
    Qa, Ra = torch.linalg.qr(A.T)  # [K, r], [r, r]
    U_c, S, Vh_c = torch.linalg.svd(scale * Rb @ Ra.T)  # r x r core
    U, Vt = _svd_flip(Qb @ U_c, Vh_c @ Qa.T)  # [N, r], [r, K]
    A_star[t].zero_()
    B_star[t].zero_()
    sigma[t].zero_()
    if variant == "paper":
        A_star[t, :r] = (S[:, None] * Vt).to(dt)
        B_star[t, :, :r] = U.to(dt)
    else:
        A_star[t, :r] = Vt.to(dt)
        B_star[t, :, :r] = (U * S[None, :]).to(dt)
    sigma[t, :r] = S.float()


def _record(module, idx, scores, w=None) -> None:
    """Add a routing decision to the model's report when recording is on: ``idx [M, k]`` the
    selected experts, ``scores [M, T]`` (None: a selection without scores), ``w [M, k]`` their
    weights (None: 1). M is the module's tokens, or its batch for a per-sequence decision."""
    rec = module._lmf_state.record
    if rec is not None:
        rec.add(module.lmf_name, idx, scores, module._lmf_state.lib.names, w)


class _Router:
    """Shared plumbing: base output + all h_t for a patched layer's input."""

    variant = "official"  # the alignment every router shares by default (Arrow is invariant to it)

    def _base_and_h(self, module, x2):
        stack = module.stack()
        if stack is None:
            return None, None, None
        al = align_stack(stack, variant=self.variant)
        w = module.weight
        y = F.linear(x2, w, module.base_layer.bias)
        H = F.linear(x2, al.A_flat)  # [M, T*R]: every expert's h_t
        T, R = al.A_star.shape[0], al.A_star.shape[1]
        return y, H.view(-1, T, R), al

    def select(self, H, al):  # -> idx [M, k], w [M, k], scores [M, T]
        raise NotImplementedError

    def effective_top_k(self, n_experts: int) -> int:
        """``top_k`` clamped to the library's ``n_experts`` (a UserWarning the first time)."""
        k = self.top_k
        if k > n_experts > 0:
            self._warn_clamp(n_experts)
            return n_experts
        return k

    def _warn_clamp(self, n_experts: int) -> None:
        if getattr(self, "_clamp_warned", None) == n_experts:
            return
        self._clamp_warned = n_experts
        warnings.warn(f"{self!r}: top_k={self.top_k} exceeds the library's {n_experts} experts; "
                      f"using top_k={n_experts} (every token mixes every expert)", UserWarning,
                      stacklevel=3)

    def merge(self, y, H, al, idx, w):
        return ops.multi_lora_expand(y, H, al.B_star, al.ones, al.rank, idx, w)

    def forward(self, module, x):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != module.weight.dtype:
            x2 = x2.to(module.weight.dtype)
        y, H, al = self._base_and_h(module, x2)
        if y is None:
            return module.base_layer(x)
        idx, w, scores = self.select(H, al)
        _record(module, idx, scores, w)
        y = self.merge(y, H, al, idx, w)
        return y.view(*x.shape[:-1], y.shape[-1])


class SpectR(_Router):
    """SpectR routing: per token and layer, score every expert by ``||A*_t x||`` and mix the top k.

    Args:
        top_k: experts per token (eq. 9). Larger than the library: clamped to the number of
            experts, with a UserWarning (not an error: adapters may be added later, and k = all
            experts with uniform weights is mu-routing; without the clamp, uniform weights 1/k
            would shrink the mixture by T/k).
        weighting: "uniform" (1/k, the paper) or "softmax" (softmax(s / temperature) over the top k).
        temperature: softmax temperature.
        merge: "output" (eq. 13, default: ``sum_i w_i B*_i h_i``) or "factor" (eqs. 10-12:
            ``(sum_i w_i B*_i)(sum_i w_i h_i)``; needs equal ranks).
        variant: "official" (default) scores ``||V^T x||`` with ``A* = V^T, B* = U S``: the SpectR
            authors' code, which produced the paper's tables. "paper" scores ``||S V^T x|| =
            ||dW x||`` (eq. 6, ``A* = S V^T, B* = U``). With S inside A*, an expert's overall scale
            (its alpha / r, or how far training moved it) decides the route: on SmolLM2 with four
            experts trained on distinct tasks, "paper" sent every prompt of all four tasks to one
            expert, while "official" routes by direction and beats Arrow per token (see
            bench/RESULTS.md). With merge="output" both give the same delta for a given
            selection (B*_t h_t = dW_t x); the factor merge differs.
    """

    def __init__(self, top_k: int = 4, weighting: str = "uniform", temperature: float = 1.0,
                 merge: str = "output", variant: str = "official"):
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if weighting not in ("uniform", "softmax"):
            raise ValueError(f"weighting must be 'uniform' or 'softmax', got {weighting!r}")
        if merge not in ("output", "factor"):
            raise ValueError(f"merge must be 'output' or 'factor', got {merge!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if variant not in ("paper", "official"):
            raise ValueError(f"variant must be 'paper' or 'official', got {variant!r}")
        self.top_k, self.weighting, self.temperature = int(top_k), weighting, float(temperature)
        self.merge_mode, self.variant = merge, variant

    def __repr__(self):
        return (f"SpectR(top_k={self.top_k}, weighting={self.weighting!r}, temperature="
                f"{self.temperature}, merge={self.merge_mode!r}, variant={self.variant!r})")

    def select(self, H, al):
        return ops.spectr_topk(H, self.effective_top_k(H.shape[1]), rank=al.rank, score="norm",
                               weighting=self.weighting, temperature=self.temperature)

    def merge(self, y, H, al, idx, w):
        if self.merge_mode == "output":
            return super().merge(y, H, al, idx, w)
        if not al.equal_ranks:  # known at alignment time: no host sync here
            raise ValueError("SpectR(merge='factor') needs experts of equal rank in every module; "
                             f"got ranks {al.rank.tolist()} (use merge='output')")
        # h_bar = sum_i w_i h_i, fed to every selected expert's B*: (sum_i w_i B*_i) h_bar
        M, T, R = H.shape
        sel = idx.clamp(min=0).long()
        hs = torch.gather(H, 1, sel[..., None].expand(M, sel.shape[1], R))  # [M, k, R]
        wv = torch.where(idx >= 0, w, torch.zeros_like(w)).to(hs.dtype)
        h_bar = (hs * wv[..., None]).sum(1)  # [M, R]
        return ops.multi_lora_expand(y, h_bar[:, None, :].expand(M, T, R), al.B_star, al.ones,
                                     al.rank, idx, w)


class Arrow(_Router):
    """Arrow routing (peft ``ArrowConfig`` semantics, exact prototypes): score ``|v_t . x|`` with
    v_t the top right singular vector of dW_t, softmax(score / temperature) over the top k,
    output-space merge of each expert's (scaled) delta. ``top_k`` larger than the library is
    clamped to its size with a UserWarning, as for :class:`SpectR`."""

    def __init__(self, top_k: int = 3, temperature: float = 1.0):
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.top_k, self.temperature = int(top_k), float(temperature)

    def __repr__(self):
        return f"Arrow(top_k={self.top_k}, temperature={self.temperature})"

    def select(self, H, al):
        return ops.spectr_topk(H, self.effective_top_k(H.shape[1]), rank=al.rank, score="first",
                               score_scale=al.inv_sigma1,
                               weighting="softmax", temperature=self.temperature)


class Uniform(_Router):
    """mu-routing: the exact output-space mean of every expert, ``(1/T) sum_t dW_t x`` (T = all
    adapters in the library; an adapter that does not target a module adds 0 there)."""

    def __repr__(self):
        return "Uniform()"

    def forward(self, module, x):
        stack = module.stack()
        if stack is None:
            return module.base_layer(x)
        live = stack.cache.get("uniform:ids")
        if live is None:  # the adapters of the library (a free id is none), on x's device
            ids = [i for i, n in enumerate(stack.names) if n is not None]
            live = stack.cache["uniform:ids"] = torch.tensor(ids, dtype=torch.int32,
                                                             device=x.device)
        T = live.shape[0]
        M = x.numel() // x.shape[-1]
        idx = live.to(x.device).expand(M, T).contiguous()
        w = torch.full((M, T), 1.0 / T, dtype=torch.float32, device=x.device)
        _record(module, idx, None, w)
        return module.apply_adapters(x, stack, idx, w)


_SCOPES = ("module", "model")
_NORMALIZE = ("sum", "max", "none")
_POOLERS = ("mean", "max", "last")
# forward kwargs the scoring pass drops: it runs the decoder once on the prompt, without a cache
# (and any KV cache object, whatever its keyword: ``cache`` in transformers 5)
_NOT_FOR_SCORING = ("cache", "past_key_values", "past_key_value", "use_cache", "labels",
                    "logits_to_keep", "num_logits_to_keep", "prompt_mask")
_MAX_MAPS = 16


class PromptDecision(NamedTuple):
    """A model-level routing decision: ``idx [B, k]`` int32 expert ids (positions in the library's
    names), ``weights [B, k]`` float32, ``scores [B, T]`` float32 the pooled,
    normalised scores every expert got (see :class:`PromptCached`)."""

    idx: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor


class _Scoring:
    """Accumulates the pooled scores of the scoring pass (lives in the call's route cache)."""

    def __init__(self, token_w: torch.Tensor, normalize: str, keep_votes: bool,
                 pooler: str = "mean"):
        self.token_w = token_w  # [B, L] float32, each row sums to 1 over its pooled tokens
        self.normalize, self.pooler = normalize, pooler
        self.total = None  # [B, T] float32: sum over modules of each module's pooled scores
        self.n = 0
        self.votes = [] if keep_votes else None  # (module, [B, T]) for the routing report

    def add(self, module, s: torch.Tensor) -> None:
        """``s [B*L, T]``: the router's scores of every prompt token at ``module``."""
        B, L = self.token_w.shape
        if s.shape[0] != B * L:
            raise ValueError(f"{module.lmf_name}: the prompt has {B} x {L} tokens but this module "
                             f"got {s.shape[0]} rows; PromptCached(scope='model') needs modules "
                             "that see every prompt token once (decoder-only models)")
        if self.normalize == "sum":
            s = s / s.sum(-1, keepdim=True).clamp(min=1e-30)
        elif self.normalize == "max":
            s = s / s.amax(-1, keepdim=True).clamp(min=1e-30)
        w = self.token_w.to(s.device)
        if self.pooler == "max":  # per expert, the largest score over the pooled tokens
            vote = s.view(B, L, -1).masked_fill((w <= 0)[..., None], float("-inf")).amax(1)
            vote = torch.where(torch.isfinite(vote), vote, torch.zeros((), device=s.device))
        else:  # mean: uniform weights; last: one-hot at the last pooled token
            vote = (s.view(B, L, -1) * w[..., None]).sum(1)  # [B, T]
        if self.total is None:
            self.total = vote.clone()
        else:
            self.total += vote.to(self.total.device)
        self.n += 1
        if self.votes is not None:
            self.votes.append((module, vote))


def _last_one_hot(m: torch.Tensor) -> torch.Tensor:
    """[B, L] pooled-token mask (> 0 = pooled) -> one-hot at each row's last pooled token (a row
    with none stays 0)."""
    L = m.shape[1]
    pos = torch.arange(L, device=m.device).expand_as(m)
    last = torch.where(m > 0, pos, torch.full_like(pos, -1)).amax(1, keepdim=True)  # [B, 1]
    return ((pos == last) & (last >= 0)).to(m.dtype)


def _pool_rows(x3: torch.Tensor, m: torch.Tensor, pooler: str) -> torch.Tensor:
    """Pool x3 [b, t, K] over the tokens with m [b, t] > 0: mean, max per feature, or the last
    such token; a row with no pooled token gives 0 (mean, last) or its unmasked max."""
    if pooler == "mean":
        w = m[..., None]
        return (x3 * w).sum(1) / w.sum(1).clamp(min=1)
    if pooler == "last":
        pos = torch.arange(m.shape[1], device=m.device).expand_as(m)
        last = torch.where(m > 0, pos, torch.full_like(pos, -1)).amax(1)  # [b]
        picked = x3[torch.arange(x3.shape[0], device=x3.device), last.clamp(min=0)]
        return torch.where((last >= 0)[:, None], picked, torch.zeros((), dtype=x3.dtype,
                                                                    device=x3.device))
    none = ~(m > 0).any(1, keepdim=True)  # [b, 1]
    keep = (m > 0) | none
    return x3.masked_fill(~keep[..., None], float("-inf")).amax(1)


class _Decision:
    """One decision per sequence, and its token-level maps per (tokens per sequence, device)."""

    __slots__ = ("idx", "w", "scores", "_maps")

    def __init__(self, idx, w, scores):
        self.idx, self.w, self.scores = idx, w, scores
        self._maps: dict = {}

    def token_maps(self, module, x):
        B = self.idx.shape[0]
        if x.dim() >= 3:
            b, t = x.shape[0], math.prod(x.shape[1:-1])
        else:
            rows = x.shape[0] if x.dim() == 2 else 1
            b, t = (B, rows // B) if rows % B == 0 else (rows, 1)
        if b != B:
            raise ValueError(f"{module.lmf_name}: the prompt routing was decided for {B} sequences "
                             f"but this forward has {b}")
        key = (t, x.device)
        hit = self._maps.get(key)
        if hit is None:
            idx, w = self.idx.to(x.device), self.w.to(x.device)
            if t != 1:
                idx, w = idx.repeat_interleave(t, 0), w.repeat_interleave(t, 0)
            if len(self._maps) >= _MAX_MAPS:
                self._maps.clear()
            hit = self._maps[key] = (idx.contiguous(), w.contiguous())
        return hit


class PromptCached:
    """Route once per sequence from its prompt with a training-free router's scores, and reuse the
    choice for every prompt and generated token of that sequence.

    ``router`` is a :class:`SpectR` or :class:`Arrow`; its scores (``||A*_t x||`` or
    ``|v_t . x|``, from the adapters' own factors, nothing trained) are taken on the prompt instead
    of on each token. It is neither EM-LoRA (trained per-layer routers over module LoRAs) nor PELMo
    (a trained multi-label router over prompt experts), only their training-free counterpart.

    scope="module" (default): each patched module decides for itself. Its first forward of a
    generation (the prompt) pools the module's input over each sequence's pooled prompt tokens
    (``pooler``: "mean" (default), "max" per feature, or "last" = the last pooled token), lets
    ``router`` score the pooled vector and pick its top k experts and weights, and caches them.

    scope="model": one decision per sequence for the whole model, used at every patched module:

    1. *Scoring pass.* Every module needs the scores of every other module before any of them may
       apply a delta, so before the prompt forward the model's decoder (``model.base_model`` for a
       Hugging Face model: no LM head) runs once more on the prompt with every adapter off and no
       KV cache. Each patched module then computes its base output plus only the scoring GEMM:
       ``x @ A_flat^T`` (all of ``A*_t``, SpectR) or ``x @ [v_1; ...; v_T]^T`` (the T prototype
       rows, Arrow); no expand. Cost: one extra base-model forward of the prompt per ``generate``
       call (or per forward outside generate); decode steps cost nothing extra.
    2. *Normalise* each module's scores per token over the experts, so no module dominates:
       ``normalize="sum"`` (default) ``s[l, t] / sum_t' s[l, t']``; ``"max"``
       ``s[l, t] / max_t' s[l, t']``; ``"none"`` the raw scores.
    3. *Pool*: ``p[t] = (1 / n_mod) sum_m pool_l s_m[l, t]`` over the pooled tokens (the
       non-padding tokens, ``attention_mask``, of the prompt, intersected with ``prompt_mask``
       when one is given); ``m`` runs over every patched module that has adapters.
       ``pooler="mean"`` (default): ``sum_l w[l] s_m[l, t]`` with ``w`` uniform over the pooled
       tokens; ``"last"``: ``s_m`` at the last pooled token; ``"max"``: ``max_l s_m[l, t]``.
    4. *Top k* of ``p`` (``router.top_k``, clamped to the library's size like the per-token
       routers; ties to the lowest index) with the router's weighting of the pooled scores: Arrow
       ``softmax(p / temperature)`` over the k; SpectR ``1/k`` (weighting="uniform") or
       ``softmax(p / temperature)``.
    5. Every patched module adds ``sum_i w_i scale_i B_i A_i x`` of those experts (the output-space
       mix) for the prompt and every generated token; beam search and ``num_return_sequences``
       repeat each sequence's decision over its copies.

    ``prompt_mask [B, L]`` (bool or 0/1, L = the prompt's length, aligned with ``input_ids``) may
    be passed to the patched model's forward or ``generate`` to pool over a span of the prompt
    only (e.g. the user's question, not the chat template); both scopes honour it.

    The decision lives in the call's per-forward / per-``generate`` context (contextvars), so two
    threads may share one model. :meth:`decide` returns it without generating; with
    ``lmf.record_routing`` on, the report gets, per module, the chosen ids and (model scope) that
    module's pooled normalised scores.
    """

    def __init__(self, router, scope: str = "module", normalize: str = "sum",
                 pooler: str = "mean"):
        if isinstance(router, PromptCached) or not isinstance(router, (SpectR, Arrow)):
            raise TypeError("PromptCached wraps a SpectR or Arrow router, got "
                            f"{type(router).__name__}")
        if getattr(router, "merge_mode", "output") != "output":
            raise ValueError("PromptCached supports merge='output' only")
        if scope not in _SCOPES:
            raise ValueError(f"scope must be 'module' or 'model', got {scope!r}")
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be 'sum', 'max' or 'none', got {normalize!r}")
        if pooler not in _POOLERS:
            raise ValueError(f"pooler must be 'mean', 'max' or 'last', got {pooler!r}")
        self.router, self.scope, self.normalize, self.pooler = router, scope, normalize, pooler

    def __repr__(self):
        pool = "" if self.pooler == "mean" else f", pooler={self.pooler!r}"
        if self.scope == "module":
            return f"PromptCached({self.router!r}{pool})"
        return (f"PromptCached({self.router!r}, scope='model', normalize={self.normalize!r}"
                f"{pool})")

    reads_prompt_mask = True  # patching: generate(prompt_mask=...) is handed to begin_forward

    # ---- per forward ----------------------------------------------------------------------
    def begin_forward(self, state, args, kwargs, shape):
        cache = _ROUTE_CACHE.get()
        pmask = kwargs.pop("prompt_mask", None)
        if cache is None:
            return
        if pmask is None:
            pmask = cache.pop("prompt_mask", None)  # generate(prompt_mask=...): the prompt only
        if self.scope == "module":
            if pmask is not None or "__mask__" not in cache:
                cache["__mask__"] = self._token_mask(state, kwargs, shape, pmask, weights=False)
            return
        key = (id(self), id(state))
        dec = cache.get(key)
        if dec is not None and (shape is None or dec.idx.shape[0] == shape[0]):
            return  # decided on the prompt: decode steps reuse it
        model = state.model_ref() if state.model_ref is not None else None
        if model is None:
            raise RuntimeError("PromptCached(scope='model'): the patched model is gone")
        if any(hasattr(v, "get_seq_length") and v.get_seq_length() > 0 for v in kwargs.values()):
            raise ValueError("PromptCached(scope='model'): a forward with a KV cache but no routing "
                             "decision (a manual decode loop): run the loop inside "
                             "`with lmf.route_once(model):` so the prompt's decision is reused")
        cache[key] = self._score_prompt(model, state, args, kwargs, shape, pmask)

    def _token_mask(self, state, kwargs, shape, pmask, weights=True):
        """[B, L] float32 over the prompt's pooled tokens: attention_mask (non-padding) times
        prompt_mask; row-normalised to sum 1 when ``weights`` (module scope: the 0/1 mask, or
        None when neither is given)."""
        att = kwargs.get("attention_mask")
        if shape is None:
            if pmask is not None:
                raise ValueError("prompt_mask needs input_ids or inputs_embeds of shape [B, L]")
            return None
        B, L = shape
        dev = None
        m = None
        if isinstance(att, torch.Tensor) and att.dim() == 2 and att.shape[0] == B:
            m = (att[:, -L:] != 0).float()
            dev = att.device
        if pmask is not None:
            if not isinstance(pmask, torch.Tensor):
                pmask = torch.as_tensor(pmask)
            if pmask.dim() != 2 or pmask.shape[1] != L:
                raise ValueError(f"prompt_mask must be [batch, prompt length] = [{B}, {L}] like "
                                 f"input_ids, got shape {tuple(pmask.shape)}")
            b0 = pmask.shape[0]
            if b0 != B:
                if not (state in _GENERATING.get() and b0 and B % b0 == 0):
                    raise ValueError(f"prompt_mask has {b0} rows but the batch has {B} sequences"
                                     " (one row per input sequence)")
                pmask = pmask.repeat_interleave(B // b0, 0)  # beams / num_return_sequences
            pm = (pmask != 0).float()
            if m is not None:
                pm = pm.to(m.device)
            m = pm if m is None else m * pm
        if m is None:
            if not weights:
                return None
            m = torch.ones(B, L)
        if not weights:
            return m
        return m / m.sum(1, keepdim=True).clamp(min=1)

    def _score_prompt(self, model, state, args, kwargs, shape, pmask) -> _Decision:
        """The scoring pass (base model, adapters off, scores only) and the decision."""
        if shape is None:
            raise ValueError("PromptCached(scope='model') needs input_ids or inputs_embeds [B, L]")
        token_w = self._token_mask(state, kwargs, shape, pmask)
        if self.pooler == "last":
            token_w = _last_one_hot(token_w)
        acc = _Scoring(token_w, self.normalize, state.record is not None, self.pooler)
        cache = _ROUTE_CACHE.get()
        skey = ("scoring", id(self), id(state))
        kw = {k: v for k, v in kwargs.items()
              if k not in _NOT_FOR_SCORING and not hasattr(v, "get_seq_length")}
        kw["use_cache"] = False
        inner = getattr(model, "base_model", None)
        cache[skey] = acc
        try:
            with torch.no_grad():
                if isinstance(inner, torch.nn.Module) and inner is not model:
                    inner(*args, **kw)
                else:
                    type(model).forward(model, *args, **kw)
        finally:
            cache.pop(skey, None)
        dec = self._decide(acc, shape[0], len(state.lib.names))
        if acc.votes is not None:
            for module, vote in acc.votes:
                _record(module, dec.idx, vote, dec.w)
        return dec

    def _decide(self, acc: _Scoring, B: int, T: int) -> _Decision:
        r = self.router
        k = r.effective_top_k(T)  # top_k past the library: clamped with a warning, as per token
        if acc.total is None:  # nothing scored: no module has adapters
            p = torch.zeros(B, T)
        else:
            p = acc.total / acc.n
        vals, order = torch.sort(p, dim=1, descending=True, stable=True)
        vals, order = vals[:, :k], order[:, :k]
        if isinstance(r, SpectR) and r.weighting == "uniform":
            w = torch.full_like(vals, 1.0 / k)
        else:
            w = torch.softmax(vals / r.temperature, dim=1)
        return _Decision(order.to(torch.int32), w.float(), p.float())

    def _scores(self, module, x2, stack) -> torch.Tensor:
        """The router's scores ``[M, T]`` (float32) of the rows of ``x2`` at ``module``."""
        al = align_stack(stack, variant=self.router.variant)
        if isinstance(self.router, Arrow):
            key = f"arrow_protos:{self.router.variant}"
            P = stack.cache.get(key)
            if P is None:
                P = stack.cache[key] = al.A_star[:, 0].contiguous()  # [T, K]: v_t (or s1 v_t)
            inv = al.inv_sigma1.to(x2.device)  # 0 for a rank-0 slot, whose row may be stale
            s = F.linear(x2, P).float().abs() * inv
            return torch.where(inv > 0, s, torch.zeros((), device=s.device))
        T, R = al.A_star.shape[0], al.A_star.shape[1]
        H = F.linear(x2, al.A_flat).view(-1, T, R).float()
        rmask = torch.arange(R, device=H.device)[None, :] < al.rank.to(H.device)[:, None]
        return torch.sqrt(torch.where(rmask[None], H * H, torch.zeros((), device=H.device)).sum(-1))

    def decide(self, model, input_ids=None, attention_mask=None, prompt_mask=None,
               **kwargs) -> PromptDecision:
        """The model-level decision (steps 1-4 above) for a prompt batch, without generating:
        runs the scoring pass only. ``model`` must be patched with this router set."""
        from .context import _SELECTION
        from .patching import _input_shape, _route_cache_scope, _state

        st = _state(model)
        if st.router is not self:
            raise ValueError("decide() needs this PromptCached set as the model's router "
                             "(lmf.set_router(model, router))")
        sel = _SELECTION.get()
        if sel is not None and sel.state is st:
            raise ValueError("decide() inside use_adapters: adapter_names bypass the router")
        kw = dict(kwargs)
        if input_ids is not None:
            kw["input_ids"] = input_ids
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        shape = _input_shape((), kw)
        with _route_cache_scope():
            dec = self._score_prompt(model, st, (), kw, shape[:2] if shape else None, prompt_mask)
        return PromptDecision(dec.idx, dec.w, dec.scores)

    # ---- per module ---------------------------------------------------------------------------
    def forward(self, module, x):
        if self.scope == "model":
            return self._forward_model(module, x)
        stack = module.stack()
        if stack is None:
            return module.base_layer(x)
        cache = _ROUTE_CACHE.get()
        if cache is None:
            cache = {}
        b, t = (x.shape[0], x.shape[1]) if x.dim() == 3 else (x.shape[0], 1)
        key = (id(self), module.lmf_name)
        hit = cache.get(key)
        if hit is None or hit[0].shape[0] != b:
            x3 = x.reshape(b, t, x.shape[-1]).to(module.weight.dtype)
            mask = cache.get("__mask__")
            if mask is not None and mask.dim() == 2 and mask.shape[0] == b:
                m = mask[:, -t:].to(device=x3.device, dtype=x3.dtype)
            else:
                m = torch.ones(b, t, device=x3.device, dtype=x3.dtype)
            mean = _pool_rows(x3, m, self.pooler)  # [b, K]
            al = align_stack(stack, variant=self.router.variant)
            H = F.linear(mean, al.A_flat).view(b, al.A_star.shape[0], al.A_star.shape[1])
            idx, w, scores = self.router.select(H, al)
            _record(module, idx, scores, w)
            hit = (idx, w)
            cache[key] = hit
        idx, w = hit
        if t != 1:
            idx, w = idx.repeat_interleave(t, 0), w.repeat_interleave(t, 0)
        return module.apply_adapters(x, stack, idx, w)

    def _forward_model(self, module, x):
        st = module._lmf_state
        cache = _ROUTE_CACHE.get()
        stack = module.stack()
        acc = cache.get(("scoring", id(self), id(st))) if cache is not None else None
        if acc is not None:  # the scoring pass: base output, scores on the side
            y = module.base_layer(x)
            if stack is not None:
                x2 = x.reshape(-1, x.shape[-1])
                if x2.dtype != module.weight.dtype:
                    x2 = x2.to(module.weight.dtype)
                acc.add(module, self._scores(module, x2, stack))
            return y
        if stack is None:
            return module.base_layer(x)
        dec = cache.get((id(self), id(st))) if cache is not None else None
        if dec is None:
            raise RuntimeError(f"{module.lmf_name}: PromptCached(scope='model') decides in the "
                               "patched model's own forward; call the patched model (or its "
                               "generate), not one of its submodules")
        idx, w = dec.token_maps(module, x)
        return module.apply_adapters(x, stack, idx, w)


@contextlib.contextmanager
def route_once(model):
    """Context manager for a manual decode loop: every forward of the patched ``model`` inside
    shares one routing cache, so a :class:`PromptCached` router decides on the first forward (the
    prompt) and every later forward (one token at a time with ``past_key_values``) reuses that
    decision, as inside ``generate``. A forward with another batch size decides anew. The cache
    lives in this context (contextvars): other threads are not affected.

        with lmf.route_once(model):
            out = model(ids, attention_mask=att, use_cache=True)        # decides
            for _ in range(n):                                           # reuses
                out = model(next_ids, attention_mask=att, past_key_values=out.past_key_values)
    """
    from .patching import _route_cache_scope, _state

    _state(model)  # a patched model
    with _route_cache_scope():
        yield model


# ---- routing report ----------------------------------------------------------------------------

_MISSING, _MIXED, _NONE = -3, -2, -1  # codes of the per-token views, besides expert ids 0..T-1
_BASE_NAME = "__base__"


@dataclass
class _Call:
    """One patched module's decision in one forward (host tensors)."""

    module: str
    idx: torch.Tensor  # [M, S] int32, -1 = empty slot
    w: torch.Tensor | None  # [M, S] float32 (None: weight 1)
    scores: torch.Tensor | None  # [M, T] float32 (None: a selection without scores)


@dataclass
class _Forward:
    """One recorded forward of the patched model: its tokens, mask and every module's decision."""

    run: int
    how: str  # the router's repr, or how the adapters were selected
    generating: bool
    batch: int | None = None
    seqlen: int | None = None
    past: int = 0  # positions before this forward's tokens (cached ones, from the mask's width)
    input_ids: torch.Tensor | None = None  # [B, L] (None: inputs_embeds)
    mask: torch.Tensor | None = None  # [B, L] bool, this forward's columns (None: all real)
    adapters: tuple | None = None  # the selection's adapter per sequence, if one was given
    calls: list = field(default_factory=list)


@dataclass
class SequenceRouting:
    """Per-token routing of one sequence in a recorded run (:meth:`RoutingReport.per_token`).

    ``n`` rows: the prompt's tokens (padding dropped), then every generated token the model read
    back (after an EOS / pad token the rest of a generation is dropped when a tokenizer is given).

    - ``token_ids`` [n] (None with ``inputs_embeds``), ``labels`` [n], ``generated`` [n] bool;
    - ``share`` [n, T]: per token, each expert's share of the router's scores (score / sum over
      experts) averaged over the modules that recorded the token; for a selection without
      scores (``adapter_names``, ``set_adapter``, ``Uniform``) the selection weights instead;
    - ``first`` [n, len(layers)]: per token and layer, the expert most of the layer's modules
      ranked first (ties: the lowest code); -1 no expert (``"__base__"``), -2 an even mix with no
      first choice (``Uniform``), -3 nothing recorded;
    - ``choice`` [n] and ``choice_frac`` [n]: the first choice over all modules, and the fraction
      of the modules that made it;
    - ``adapter``: the sequence's adapter when the run selected adapters by name.
    """

    seq: int
    token_ids: list | None
    labels: list
    generated: list
    share: torch.Tensor
    first: torch.Tensor
    layers: list
    choice: torch.Tensor
    choice_frac: torch.Tensor
    adapter: str | None = None


def _layer_of(module: str) -> int:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module)
    return int(m.group(1)) if m else -1


def _first_and_share(c: _Call, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first choice [M] codes, share [M, T]) of one call."""
    idx = c.idx.long()
    M, S = idx.shape
    valid = idx >= 0
    w = c.w if c.w is not None else torch.ones(M, S)
    w = torch.where(valid, w, torch.zeros_like(w))
    W = torch.zeros(M, T).scatter_add_(1, idx.clamp(min=0), w)
    if c.scores is not None and c.scores.shape == (M, T):
        s = torch.nan_to_num(c.scores, nan=0.0).clamp(min=0)
        share = s / s.sum(1, keepdim=True).clamp(min=1e-30)
        first = torch.where(valid[:, 0], idx[:, 0], torch.full_like(idx[:, 0], _NONE))
        return first, share
    share = W / W.sum(1, keepdim=True).clamp(min=1e-30)
    top, arg = W.max(1)
    ties = (W == top[:, None]).sum(1) > 1
    first = torch.where(top <= 0, torch.full_like(arg, _NONE),
                        torch.where(ties, torch.full_like(arg, _MIXED), arg))
    return first, share


def _mode(codes: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Most frequent code per row of ``codes [n, m]`` ignoring -3 (ties: the lowest code), and
    its fraction of the row's recorded entries; -3 where a row has none."""
    n = codes.shape[0]
    ok = codes != _MISSING
    cat = (codes - _MIXED).clamp(min=0)  # -2..T-1 -> 0..T+1
    counts = torch.zeros(n, T + 2).scatter_add_(1, cat, ok.float())
    total = counts.sum(1)
    best = counts.argmax(1) + _MIXED
    frac = counts.max(1).values / total.clamp(min=1)
    return torch.where(total > 0, best, torch.full_like(best, _MISSING)), frac


def _decode_label(tokenizer, t: int) -> str:
    s = tokenizer.decode([t]) if tokenizer is not None else f"#{t}"
    s = s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if len(s) > 18:
        s = s[:17] + "…"
    return f"'{s}'"


def _expert_colours(T: int) -> list:
    import matplotlib

    if T <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i) for i in range(T)]
    if T <= 20:
        cmap = matplotlib.colormaps["tab20"]
        return [cmap(i) for i in range(T)]
    cmap = matplotlib.colormaps["hsv"]
    return [cmap(i / T) for i in range(T)]


class RoutingReport:
    """What a patched model's router, or its adapter selection, chose while recording.

    Started by :func:`record_routing`. Every forward of the model is kept with its tokens and
    attention mask, and every patched module's decision (selected experts, weights, the router's
    scores) with its forward. A *run* is one ``model.generate`` call (the prompt forward and
    every decode step: generated tokens are recorded too) or one plain forward.
    ``adapter_names`` / ``lmf.set_adapter`` / ``Uniform`` forwards record what was selected
    (no scores); forwards of the base model record nothing.

    ``counts``: {module: LongTensor [T]} how often each expert was selected (over tokens and
    slots); ``expert_names``: the library's names; ``token_scores``: per recorded call with scores,
    (module, scores [M, T]); ``forwards``, ``runs``: the recorded forwards and their grouping.
    :meth:`per_token` gives each sequence's routing per token and layer; :meth:`save_heatmap`
    draws it.
    """

    def __init__(self):
        self.counts: dict[str, torch.Tensor] = {}
        self.expert_names: tuple = ()
        self.token_scores: list = []
        self.forwards: list[_Forward] = []
        self._gen_new = False

    def __repr__(self):
        return (f"RoutingReport({len(self.runs)} run(s), {len(self.forwards)} forward(s), "
                f"{len(self.counts)} module(s), experts={list(self.expert_names)})")

    # ---- recording (called by the patched model) ---------------------------------------------
    def begin_generate(self) -> None:
        """The next forward starts a new run, and the decode steps after it join that run."""
        self._gen_new = True

    def begin_forward(self, st, args, kwargs, sel, generating: bool) -> None:
        """Called by the patched model's pre-hook: keep this forward's tokens and mask."""
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) \
                and not args[0].is_floating_point():
            ids = args[0]
        emb = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        B = L = None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            B, L = ids.shape
        else:
            ids = None
            if isinstance(emb, torch.Tensor) and emb.dim() == 3:
                B, L = emb.shape[:2]
        past, m = 0, None
        if (B is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2
                and mask.shape[0] == B and mask.shape[1] >= L):
            past = mask.shape[1] - L
            m = (mask[:, mask.shape[1] - L:] != 0).cpu()
        prev = self.forwards[-1] if self.forwards else None
        cont = (generating and not self._gen_new and prev is not None and prev.generating
                and prev.batch == B)
        self._gen_new = False
        run = prev.run if cont else (prev.run + 1 if prev is not None else 0)
        names = st.lib.names
        adapters = None
        if sel is not None:
            adapters = tuple(_BASE_NAME if i < 0 else names[i] for i in sel.ids)
            if B and len(adapters) and len(adapters) != B and B % len(adapters) == 0:
                rep = B // len(adapters)  # one name for the batch, or beams / return sequences
                adapters = tuple(a for a in adapters for _ in range(rep))
            how = (f"adapter {adapters[0]!r} for every sequence" if sel.broadcast
                   else "adapter_names (one adapter per sequence)")
        else:
            how = repr(st.router) if st.router is not None else "base model"
        self.forwards.append(_Forward(run, how, generating, B, L, past,
                                      ids.detach().cpu() if ids is not None else None, m,
                                      adapters))

    def add(self, module, idx, scores, names, w=None):
        """One module's decision: ``idx [M, S]``, ``scores [M, T]`` or None, ``w [M, S]`` or
        None; M = the module's tokens (or its batch for a per-sequence decision)."""
        self.expert_names = tuple(names)
        T = len(names)
        sel = idx.reshape(-1)
        sel = sel[sel >= 0].long().cpu()
        c = torch.bincount(sel, minlength=T)
        prev = self.counts.get(module)
        self.counts[module] = c if prev is None or prev.numel() != T else prev + c
        s = scores.detach().float().cpu() if scores is not None else None
        if s is not None:
            self.token_scores.append((module, s))
        M = idx.shape[0] if idx.dim() else 1
        call = _Call(module, idx.detach().to("cpu", torch.int32).reshape(M, -1),
                     None if w is None else w.detach().float().cpu().reshape(M, -1), s)
        if not self.forwards:  # a module called on its own, outside the model's forward
            self.forwards.append(_Forward(0, "?", False))
        self.forwards[-1].calls.append(call)

    # ---- reading --------------------------------------------------------------------------
    @property
    def runs(self) -> list[list[int]]:
        """Indices into ``forwards``, one list per run (a generate call or a plain forward)."""
        out: list[list[int]] = []
        for i, f in enumerate(self.forwards):
            if out and self.forwards[out[-1][0]].run == f.run:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def _nothing(self):
        return ValueError("nothing recorded: no patched module served an adapter or a router since "
                          "lmf.record_routing(model) (forwards of the base model record nothing)")

    def mean_scores(self) -> torch.Tensor:
        """Scores [tokens, T] averaged over layers, for the first recorded batch of tokens (all
        sequences flattened; for selections without scores, the selection weights)."""
        if not self.token_scores:
            for f in self.forwards:
                shares = {}
                for c in f.calls:
                    if c.module not in shares:
                        shares[c.module] = _first_and_share(c, len(self.expert_names))[1]
                if shares:
                    M = next(iter(shares.values())).shape[0]
                    return torch.stack([s for s in shares.values() if s.shape[0] == M]).mean(0)
            raise self._nothing()
        M = self.token_scores[0][1].shape[0]
        same = [s for _, s in self.token_scores if s.shape[0] == M]
        seen, picked = set(), []
        for (mod, s) in self.token_scores:  # one entry per module for that first forward
            if s.shape[0] == M and mod not in seen:
                seen.add(mod)
                picked.append(s)
        return torch.stack(picked or same).mean(0)

    def _run(self, run: int) -> list[_Forward]:
        if not any(f.calls for f in self.forwards):
            raise self._nothing()
        runs = self.runs
        try:
            fids = runs[run]
        except (IndexError, TypeError):
            raise IndexError(f"run {run!r} out of range: {len(runs)} run(s) recorded (one per "
                             "generate call or plain forward)") from None
        fs = [self.forwards[i] for i in fids]
        if fs[0].batch is None:
            raise ValueError(f"run {run}: the forward had no input_ids / inputs_embeds of shape "
                             "[batch, length], so its rows cannot be told apart")
        return fs

    def per_token(self, run: int = 0, tokenizer=None, sequences=None,
                  tokens=None) -> list[SequenceRouting]:
        """Each sequence's routing per token and layer in run ``run`` (0: the first recorded;
        -1: the last), as :class:`SequenceRouting` objects.

        ``tokenizer``: decodes the labels, and drops a generation's tokens after its first EOS
        and its pad tokens (``eos_token_id`` / ``pad_token_id``); ``sequences``: None (all), an
        int or a list of batch rows; ``tokens``: labels
        to use instead (one list per selected sequence, or one list for a single sequence).
        Per-sequence decisions (``PromptCached``) hold for every token of their sequence, decode
        steps included. Recorded generation with ``num_beams > 1`` shows beam slots, which beam
        search reorders between steps."""
        fs = self._run(run)
        T = len(self.expert_names)
        B = fs[0].batch
        modules = sorted({c.module for f in fs for c in f.calls},
                         key=lambda m: (_layer_of(m) < 0, _layer_of(m), m))
        col = {m: j for j, m in enumerate(modules)}
        layer_ids = sorted({_layer_of(m) for m in modules}, key=lambda v: (v < 0, v))
        layer_cols = [[col[m] for m in modules if _layer_of(m) == lv] for lv in layer_ids]
        layers = [f"L{lv}" if lv >= 0 else "other" for lv in layer_ids]
        if sequences is None:
            seqs = list(range(B))
        else:
            seqs = [sequences] if isinstance(sequences, int) else list(sequences)
            bad = [b for b in seqs if not -B <= b < B]
            if bad:
                raise IndexError(f"sequences {bad} out of range for a batch of {B}")
            seqs = [b % B for b in seqs]
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        rows = {b: [] for b in range(B)}  # b -> [(token id, generated, codes [m], share [T], n)]
        sticky: dict = {}  # module -> (first [B], share [B, T]) of a per-sequence decision
        seen = 0
        for fi, f in enumerate(fs):
            if f.batch != B or f.seqlen is None:
                continue
            L = f.seqlen
            codes = torch.full((B, L, len(modules)), _MISSING, dtype=torch.long)
            share = torch.zeros(B, L, T)
            n = torch.zeros(B, L)
            done = set()
            for c in f.calls:
                if c.module in done:
                    continue  # a module called twice in a forward (recomputation): the first
                M = c.idx.shape[0]
                if M != B * L and M != B:
                    continue
                first, sh = _first_and_share(c, T)
                done.add(c.module)
                if M == B * L:
                    first, sh = first.view(B, L), sh.view(B, L, T)
                else:  # one decision per sequence, for each of its tokens
                    sticky[c.module] = (first, sh)
                    first, sh = first[:, None].expand(B, L), sh[:, None].expand(B, L, T)
                codes[:, :, col[c.module]] = first
                share += sh
                n += 1
            for mod, (first, sh) in sticky.items():
                if mod not in done:
                    codes[:, :, col[mod]] = first[:, None]
                    share += sh[:, None]
                    n += 1
            for b in range(B):
                for j in range(L):
                    if f.past + j < seen or (f.mask is not None and not bool(f.mask[b, j])):
                        continue
                    tid = int(f.input_ids[b, j]) if f.input_ids is not None else None
                    rows[b].append((tid, fi > 0, codes[b, j], share[b, j], float(n[b, j])))
            seen = max(seen, f.past + L)
        out = []
        for si, b in enumerate(seqs):
            rs = rows[b]
            if eos is not None or pad is not None:  # a finished generation's padding
                kept, ended = [], False
                for r in rs:
                    if r[1] and (ended or (r[0] == pad and pad != eos)):
                        continue
                    kept.append(r)
                    ended = ended or (r[1] and r[0] == eos)
                rs = kept
            n_rows = len(rs)
            C = torch.stack([r[2] for r in rs]) if rs else torch.zeros(0, len(modules),
                                                                       dtype=torch.long)
            S = (torch.stack([r[3] / max(r[4], 1.0) for r in rs]) if rs
                 else torch.zeros(0, T))
            first = torch.full((n_rows, len(layers)), _MISSING, dtype=torch.long)
            for li, cols in enumerate(layer_cols):
                first[:, li] = _mode(C[:, cols], T)[0]
            choice, frac = _mode(C, T)
            ids = [r[0] for r in rs]
            have_ids = all(t is not None for t in ids)
            if tokens is not None:
                flat = len(seqs) == 1 and not (tokens and isinstance(tokens[0], (list, tuple)))
                lab = tokens if flat else tokens[si]
                labels = [str(x) for x in lab][:n_rows]
                labels += [str(i) for i in range(len(labels), n_rows)]
            elif have_ids:
                labels = [_decode_label(tokenizer, t) for t in ids]
            else:
                labels = [str(i) for i in range(n_rows)]
            ad = fs[0].adapters[b] if fs[0].adapters is not None else None
            out.append(SequenceRouting(b, ids if have_ids else None, labels,
                                       [r[1] for r in rs], S, first, layers, choice, frac, ad))
        return out

    def save_heatmap(self, path: str, tokenizer=None, *, tokens=None, sequences=None,
                     run: int = 0, clip: tuple = (2.0, 98.0), dpi: int = 110) -> str:
        """Save the routing of run ``run`` (see :meth:`per_token`) as a PNG (needs matplotlib).

        One row of panels per sequence (``sequences``: all, one int, or a list), one row per
        token (decoded with ``tokenizer``; padding dropped; generated tokens below a dashed line,
        in blue). Left: each expert's share of the router's scores per token (mean over modules;
        the colour scale is clipped to the ``clip`` percentiles of the values shown, so one
        outlier token cannot wash out the rest); a dot marks the token's first choice over all
        modules. Right: per token and layer, the expert most of the layer's modules ranked first,
        one colour per expert (legend on top); the right-hand labels name each token's first
        choice and the fraction of modules that made it. The title names the router and k.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            import numpy as np
            from matplotlib.colors import ListedColormap
            from matplotlib.patches import Patch
        except ImportError as e:
            raise RuntimeError("save_heatmap needs matplotlib (pip install matplotlib)") from e
        seqs = self.per_token(run, tokenizer, sequences=sequences, tokens=tokens)
        fs = self._run(run)
        names = list(self.expert_names)
        T = len(names)
        n_mod = len({c.module for f in fs for c in f.calls})
        k = max((c.idx.shape[1] for f in fs for c in f.calls), default=0)
        scored = any(c.scores is not None for f in fs for c in f.calls)
        vals = np.concatenate([s.share.numpy().ravel() for s in seqs]) if seqs else np.zeros(1)
        vals = vals if vals.size else np.zeros(1)
        lo, hi = (float(v) for v in np.percentile(vals, clip))
        if hi - lo < 1e-9:
            lo, hi = min(lo, 0.0), max(hi, lo + 1e-9)
        colours = _expert_colours(T)
        special = [(1, 1, 1, 1), (0.33, 0.33, 0.33, 1), (0.85, 0.85, 0.85, 1)]  # -3, -2, -1
        cmap = ListedColormap(special + colours)
        n_layers = len(seqs[0].layers) if seqs else 1
        wA, wB = 0.42 * T + 0.4, max(2.2, 0.14 * n_layers)
        heights = [max(len(s.labels), 1) + 5 for s in seqs] or [6]
        fig = plt.figure(figsize=(max(8.0, wA + wB + 4.4), 0.19 * sum(heights) + 1.8), dpi=dpi,
                         layout="constrained")
        gs = fig.add_gridspec(len(seqs) or 1, 2, height_ratios=heights, width_ratios=[wA, wB])
        ims = []
        axes_a = []
        used = set()
        for i, s in enumerate(seqs):
            n = len(s.labels)
            ax, bx = fig.add_subplot(gs[i, 0]), fig.add_subplot(gs[i, 1])
            axes_a.append(ax)
            ims.append(ax.imshow(s.share.numpy() if n else np.zeros((1, T)), aspect="auto",
                                 cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest"))
            ch = s.choice.numpy()
            ys = np.nonzero(ch >= 0)[0]
            ax.scatter(ch[ys], ys, s=14, c="white", edgecolors="black", linewidths=0.6,
                       zorder=3)
            ax.xaxis.tick_top()
            ax.set_xticks(range(T), names, rotation=45, ha="left", fontsize=8)
            ax.set_yticks(range(n), s.labels, fontsize=7)
            codes = s.first.numpy()
            used |= set(int(v) for v in np.unique(codes)) | set(int(v) for v in np.unique(ch))
            bx.imshow((codes - _MISSING) if n else np.zeros((1, n_layers)), aspect="auto",
                      cmap=cmap, vmin=-0.5, vmax=len(special) + T - 0.5, interpolation="nearest")
            step = max(1, int(np.ceil(n_layers / 16)))
            bx.xaxis.tick_top()
            bx.set_xticks(range(0, n_layers, step), s.layers[::step], fontsize=7, rotation=90)
            bx.yaxis.tick_right()

            def _name(v):
                return (names[v] if v >= 0 else {_NONE: "base", _MIXED: "mix",
                                                 _MISSING: "-"}[v])

            bx.set_yticks(range(n), [f"{_name(int(c))} {f:.0%}" if c != _MISSING else "-"
                                     for c, f in zip(ch, s.choice_frac.numpy())], fontsize=7)
            for lab_a, lab_b, g in zip(ax.get_yticklabels(), bx.get_yticklabels(), s.generated):
                if g:
                    lab_a.set_color("tab:blue")
                    lab_b.set_color("tab:blue")
            if any(s.generated) and not all(s.generated):
                y = s.generated.index(True) - 0.5
                for a in (ax, bx):
                    a.axhline(y, color="red", lw=1.0, ls="--")
            who = f" · adapter {s.adapter!r}" if s.adapter is not None else ""
            ax.set_title(f"sequence {s.seq}{who}\n" + ("score share per expert" if scored
                                                       else "selection weight per expert"),
                         fontsize=8, loc="left")
            bx.set_title("first choice per layer" + (" · generated in blue, below the red line"
                                                     if any(s.generated) else ""),
                         fontsize=8, loc="left")
        if ims:
            fig.colorbar(ims[-1], ax=axes_a, location="bottom", shrink=0.9, aspect=25,
                         label=(f"{'score share' if scored else 'weight'} (mean over modules)\n"
                                f"colours clipped to percentiles {clip[0]:g}-{clip[1]:g}"))
        handles = [Patch(color=colours[t], label=names[t]) for t in range(T)]
        if _NONE in used:
            handles.append(Patch(color=special[2], label="none (__base__)"))
        if _MIXED in used:
            handles.append(Patch(color=special[1], label="even mix"))
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False,
                   title="first choice", title_fontsize=8)
        how = fs[0].how
        fig.suptitle(f"routing: {how}\nk={k} · {T} experts · {n_mod} modules · run {run} · "
                     "dot / right labels: each token's first choice over all modules",
                     fontsize=9)
        fig.savefig(path)
        plt.close(fig)
        return path


def record_routing(model, enable: bool = True) -> RoutingReport | None:
    """Start (a fresh report) or stop recording which experts each patched module picks per token.

    Returns the report being filled (``enable=True``) or the one just stopped (``False``; None if
    nothing was ever recorded). Stopping keeps the report: :func:`routing_report` returns it
    until the next ``record_routing(model)``."""
    from .patching import _state

    st = _state(model)
    if enable:
        st.record = st.last_record = RoutingReport()
        return st.record
    if st.record is not None:
        st.last_record = st.record
    st.record = None
    return st.last_record


def routing_report(model) -> RoutingReport:
    """The routing record of a patched model: the one being recorded, else the last one stopped
    (see :func:`record_routing`). ValueError if recording was never started."""
    from .patching import _state

    st = _state(model)
    rec = st.record if st.record is not None else getattr(st, "last_record", None)
    if rec is None:
        raise ValueError("routing is not being recorded: call lmf.record_routing(model) first")
    return rec


# ---- learned routing (issue 10 item 4: the trade-offs paper's SGD routing, ELREA's MoLE) -------

class LearnedRouter(_Router):
    """Learned per-token, per-layer routing: each patched module has its own linear map from its
    input to logits over the experts, softmax (over the top k, optional), output-space mix of the
    selected experts' deltas through the fused op (differentiable in the routing weights).

    Semantics per patched module with gate ``W [E, K]`` (E = the library's adapter ids) and
    input rows ``x [M, K]``:
        l[m, e] = W[e] . x[m]              init="zero"   (all-zero gate: mu-routing at step 0)
        l[m, e] = |W[e] . x[m]|            init="arrow"  (Arrow's sign-free score; see ``absolute``)
        l[m, e] = -inf where expert e does not target the module (rank 0 there)
        top_k=None: w = softmax(l / temperature) over every expert; else over the k largest l
        y[m] = base(x[m]) + sum_{e selected} w[m, e] * dW_e x[m]
    init="arrow" sets row e of every module's gate to expert e's Arrow prototype v_e (the top
    right singular vector of dW_e = scale_e B_e A_e; the paper's Arrow-HC initialisation), so at
    step 0 the logits are Arrow's scores ``|v_e . x|`` and ``LearnedRouter(top_k=k, init="arrow")``
    routes exactly as ``Arrow(top_k=k)``.

    Training: the gates are created when the router is attached (``lmf.patch(..., router=r)`` or
    ``lmf.set_router(model, r)``), one fp32 leaf tensor per patched module on its device; pass
    ``r.parameters()`` to any optimizer and train on the model's loss with no ``adapter_names``
    (an explicit selection bypasses the router). Attach before creating the optimizer; after
    adding adapters to the library call ``set_router`` again (new rows are created, existing ones
    kept; a new optimizer is needed). Libraries with ``max_resident`` are not supported (a router
    needs every expert resident).

    Args:
        top_k: None (softmax over every expert) or k >= 1 (clamped to the library's size).
        init: "zero" or "arrow".
        temperature: softmax temperature (> 0).
        absolute: use ``|W x|`` as logits (default: True for init="arrow", False for "zero";
            ``|.|`` of an all-zero gate has no gradient).
    """

    def __init__(self, top_k: int | None = None, init: str = "zero", temperature: float = 1.0,
                 absolute: bool | None = None):
        if top_k is not None and (isinstance(top_k, bool) or int(top_k) < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if init not in ("zero", "arrow"):
            raise ValueError(f"init must be 'zero' or 'arrow', got {init!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.top_k = None if top_k is None else int(top_k)
        self.init, self.temperature = init, float(temperature)
        self.absolute = (init == "arrow") if absolute is None else bool(absolute)
        self._gates: dict = {}  # module name -> W [E, K] fp32 leaf

    def __repr__(self):
        return (f"LearnedRouter(top_k={self.top_k}, init={self.init!r}, temperature="
                f"{self.temperature}, absolute={self.absolute})")

    def bind(self, st) -> None:
        """Create (or extend to new adapter ids) the gate of every patched module of ``st``."""
        if getattr(st.lib, "_max_resident", None) is not None:
            raise ValueError("LearnedRouter needs every expert resident: build the library "
                             "without max_resident")
        with torch.no_grad():
            for name, module in st.patched.items():
                stack = module.stack()
                if stack is None:
                    continue
                E, K = stack.A.shape[0], stack.A.shape[2]
                old = self._gates.get(name)
                if old is not None and old.shape[0] >= E:
                    continue
                W = torch.zeros(E, K, dtype=torch.float32, device=stack.A.device)
                if self.init == "arrow":
                    al = align_stack(stack, variant="official")  # row 0 of A* = v_e^T
                    live = (al.rank > 0).to(W.device)
                    W[:] = torch.where(live[:, None], al.A_star[:, 0].float(), W)
                if old is not None:
                    W[:old.shape[0]] = old
                self._gates[name] = W.requires_grad_(True)

    def named_parameters(self) -> list:
        """``[(module_name, W [E, K])]`` in module order: the trainable gates."""
        return sorted(self._gates.items())

    def parameters(self) -> list:
        """The trainable gates (fp32 leaf tensors with ``requires_grad``), one per module."""
        return [w for _, w in self.named_parameters()]

    def state_dict(self) -> dict:
        return {n: w.detach().clone() for n, w in self._gates.items()}

    def load_state_dict(self, state: dict) -> None:
        """Copy gates in place (the tensors an optimizer holds stay the same objects)."""
        with torch.no_grad():
            for n, w in state.items():
                if n not in self._gates or self._gates[n].shape != w.shape:
                    raise ValueError(f"gate {n!r}: shape {tuple(w.shape)} does not match "
                                     f"{tuple(self._gates[n].shape) if n in self._gates else None}")
                self._gates[n].copy_(w)

    def logits(self, module, x2: torch.Tensor, stack=None) -> torch.Tensor:
        """The gate's logits ``l [M, E]`` for a module's input rows ``x2 [M, K]`` (-inf for the
        experts without a factor on the module)."""
        stack = module.stack() if stack is None else stack
        W = self._gates.get(module.lmf_name)
        if W is None or W.shape[0] < stack.A.shape[0]:
            raise ValueError(f"LearnedRouter has no gate for module {module.lmf_name!r} over "
                             f"{stack.A.shape[0]} adapter ids (attach it with lmf.set_router "
                             "again after adding adapters)")
        l = F.linear(x2.to(W.dtype), W[:stack.A.shape[0]])  # [M, E]
        if self.absolute:
            l = l.abs()
        live = (stack.rank > 0).to(l.device)
        return l.masked_fill(~live[None, :], float("-inf"))

    def forward(self, module, x):
        from .merging import autograd_safe_stack

        stack = module.stack()
        if stack is None:
            return module.base_layer(x)
        if stack.lut is not None:
            raise ValueError("LearnedRouter needs every expert resident (no max_resident)")
        if torch.is_grad_enabled():
            stack = autograd_safe_stack(stack)
        x2 = x.reshape(-1, x.shape[-1])
        l = self.logits(module, x2, stack)  # [M, E]
        M, E = l.shape
        k = E if self.top_k is None else self.effective_top_k(E)
        if k < E:
            val, idx = torch.topk(l, k, dim=1)
        else:
            val, idx = l, torch.arange(E, device=l.device).expand(M, E)
        ok = torch.isfinite(val)
        w = torch.softmax(val / self.temperature, dim=1)
        w = torch.where(ok, w, torch.zeros_like(w))
        idx = torch.where(ok, idx, torch.full_like(idx, -1)).to(torch.int32).contiguous()
        _record(module, idx, torch.softmax(l.detach() / self.temperature, dim=1), w.detach())
        return module.apply_adapters(x, stack, idx, w.contiguous())


__all__ += ["LearnedRouter"]
