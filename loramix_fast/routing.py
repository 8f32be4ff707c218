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
- :class:`PromptCached`: routes once per sequence from the mean of each module's input over the
  prompt's non-padding tokens, then reuses that choice for every prompt and generated token.

The hot path per layer: one GEMM for the base output, one GEMM ``x @ [A*_1; ...; A*_T].T`` for every
h_t (the only extra matrix work of routing), the scoring/top-k op, then the expand of the selected
experts from that same h buffer (``ops.multi_lora_expand``; A*x is never recomputed).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import ops
from .context import _ROUTE_CACHE

__all__ = ["SpectR", "Arrow", "Uniform", "PromptCached", "align_stack", "AlignedStack",
           "routing_report", "record_routing", "RoutingReport"]


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

    Returns an :class:`AlignedStack` (A_star [T, R, K], B_star [T, N, R], zero past each rank),
    cached on ``stack.cache``.
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
    A_star = torch.zeros(E, R, K, dtype=dt, device=dev)
    B_star = torch.zeros(E, N, R, dtype=dt, device=dev)
    sigma = torch.zeros(E, R, dtype=torch.float32, device=dev)
    ranks = stack.rank.tolist()
    scales = stack.scale.tolist()
    for t in range(E):
        r = ranks[t]
        if r == 0:
            continue
        A = stack.A[t, :r].double()  # [r, K]
        B = stack.B[t, :, :r].double()  # [N, r]
        Qb, Rb = torch.linalg.qr(B)  # [N, r], [r, r]
        Qa, Ra = torch.linalg.qr(A.T)  # [K, r], [r, r]
        U_c, S, Vh_c = torch.linalg.svd(scales[t] * Rb @ Ra.T)  # r x r core
        U, Vt = _svd_flip(Qb @ U_c, Vh_c @ Qa.T)  # [N, r], [r, K]
        if variant == "paper":
            A_star[t, :r] = (S[:, None] * Vt).to(dt)
            B_star[t, :, :r] = U.to(dt)
        else:
            A_star[t, :r] = Vt.to(dt)
            B_star[t, :, :r] = (U * S[None, :]).to(dt)
        sigma[t, :r] = S.float()
    s1 = sigma[:, 0]
    inv = torch.where(s1 > 0, 1.0 / s1.clamp(min=1e-30), torch.zeros_like(s1))
    if variant == "official":  # h_t[0] = v_t . x already
        inv = (s1 > 0).float()
    out = AlignedStack(A_star, B_star, sigma, stack.rank.clone(),
                       torch.ones(E, dtype=torch.float32, device=dev), inv,
                       len({r for r in ranks if r > 0}) <= 1)
    stack.cache[key] = out
    return out


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
        T = stack.A.shape[0]
        M = x.numel() // x.shape[-1]
        idx = torch.arange(T, dtype=torch.int32, device=x.device).expand(M, T).contiguous()
        w = torch.full((M, T), 1.0 / T, dtype=torch.float32, device=x.device)
        _record(module, idx, None, w)
        return module.apply_adapters(x, stack, idx, w)


class PromptCached:
    """Route once per sequence from its prompt, reuse the choice for every token.

    At every patched module, the first forward of a generation (the prompt) averages the module's
    input over each sequence's non-padding prompt tokens, lets ``router`` pick experts and weights
    for that mean, and caches them; every prompt and generated token of the sequence then uses
    them (EM-LoRA / PELMo's route-once-per-prompt, training-free). The cache belongs to the
    ``generate`` call (or to a single forward outside generate) and is dropped after it.
    """

    def __init__(self, router):
        if isinstance(router, PromptCached) or not isinstance(router, (SpectR, Arrow)):
            raise TypeError("PromptCached wraps a SpectR or Arrow router, got "
                            f"{type(router).__name__}")
        if getattr(router, "merge_mode", "output") != "output":
            raise ValueError("PromptCached supports merge='output' only")
        self.router = router

    def __repr__(self):
        return f"PromptCached({self.router!r})"

    def begin_forward(self, state, args, kwargs, shape):
        cache = _ROUTE_CACHE.get()
        if cache is not None:
            cache["__mask__"] = kwargs.get("attention_mask")

    def forward(self, module, x):
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
                m = mask[:, -t:].to(x3.dtype)[..., None]
                mean = (x3 * m).sum(1) / m.sum(1).clamp(min=1)
            else:
                mean = x3.mean(1)
            al = align_stack(stack, variant=self.router.variant)
            H = F.linear(mean, al.A_flat).view(b, al.A_star.shape[0], al.A_star.shape[1])
            idx, w, scores = self.router.select(H, al)
            _record(module, idx, scores)
            hit = (idx, w)
            cache[key] = hit
        idx, w = hit
        if t != 1:
            idx, w = idx.repeat_interleave(t, 0), w.repeat_interleave(t, 0)
        return module.apply_adapters(x, stack, idx, w)


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
