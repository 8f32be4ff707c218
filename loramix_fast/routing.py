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

from dataclasses import dataclass

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


def _record(module, idx, scores) -> None:
    """Add a routing decision to the model's report when recording is on."""
    rec = module._lmf_state.record
    if rec is not None:
        rec.add(module.lmf_name, idx, scores, module._lmf_state.lib.names)


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
        _record(module, idx, scores)
        y = self.merge(y, H, al, idx, w)
        return y.view(*x.shape[:-1], y.shape[-1])


class SpectR(_Router):
    """SpectR routing: per token and layer, score every expert by ``||A*_t x||`` and mix the top k.

    Args:
        top_k: experts per token (eq. 9).
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
        return ops.spectr_topk(H, self.top_k, rank=al.rank, score="norm",
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
    output-space merge of each expert's (scaled) delta."""

    def __init__(self, top_k: int = 3, temperature: float = 1.0):
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.top_k, self.temperature = int(top_k), float(temperature)

    def __repr__(self):
        return f"Arrow(top_k={self.top_k}, temperature={self.temperature})"

    def select(self, H, al):
        return ops.spectr_topk(H, self.top_k, rank=al.rank, score="first", score_scale=al.inv_sigma1,
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

class RoutingReport:
    """What a patched model's router chose while recording.

    ``counts``: {module: LongTensor [T]} how often each expert was selected (over tokens and
    slots); ``expert_names``: the library's names; ``token_scores``: per recorded call,
    (module, scores [M, T]).
    """

    def __init__(self):
        self.counts: dict[str, torch.Tensor] = {}
        self.expert_names: tuple = ()
        self.token_scores: list = []

    def add(self, module, idx, scores, names):
        self.expert_names = tuple(names)
        T = len(names)
        sel = idx.reshape(-1)
        sel = sel[sel >= 0].long().cpu()
        c = torch.bincount(sel, minlength=T)
        prev = self.counts.get(module)
        self.counts[module] = c if prev is None or prev.numel() != T else prev + c
        self.token_scores.append((module, scores.detach().float().cpu()))

    def mean_scores(self) -> torch.Tensor:
        """Scores [tokens, T] averaged over layers, for the first recorded batch of tokens."""
        if not self.token_scores:
            raise ValueError("nothing recorded: call lmf.record_routing(model) before running it")
        M = self.token_scores[0][1].shape[0]
        same = [s for _, s in self.token_scores if s.shape[0] == M]
        seen, picked = set(), []
        for (mod, s) in self.token_scores:  # one entry per module for that first forward
            if s.shape[0] == M and mod not in seen:
                seen.add(mod)
                picked.append(s)
        return torch.stack(picked or same).mean(0)

    def save_heatmap(self, path: str, tokens: list | None = None) -> str:
        """Save a tokens x experts heatmap of the layer-averaged scores (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise RuntimeError("save_heatmap needs matplotlib (pip install matplotlib)") from e
        S = self.mean_scores()
        fig, ax = plt.subplots(figsize=(1 + 0.5 * S.shape[1], 1 + 0.25 * S.shape[0]))
        im = ax.imshow(S.numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(range(S.shape[1]), self.expert_names, rotation=45, ha="right")
        if tokens is not None:
            ax.set_yticks(range(len(tokens)), tokens)
        ax.set_xlabel("expert")
        ax.set_ylabel("token")
        fig.colorbar(im, ax=ax, label="score (mean over layers)")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path


def record_routing(model, enable: bool = True) -> None:
    """Start (fresh) or stop recording which experts each patched module picks per token."""
    from .patching import _state

    _state(model).record = RoutingReport() if enable else None


def routing_report(model) -> RoutingReport:
    """The routing record of a patched model (see :func:`record_routing`)."""
    from .patching import _state

    rec = _state(model).record
    if rec is None:
        raise ValueError("routing is not being recorded: call lmf.record_routing(model) first")
    return rec
