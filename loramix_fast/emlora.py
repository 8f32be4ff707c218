"""EM-LoRA (seed 002: eqs. 1-7, appendix D): a trained router before every decoder layer picks which
of the layer's module LoRAs (q, k, v, o, gate, up, down for Llama) of ONE adapter get their delta,
decided once on the prompt and reused for every generated token.

Per decoder layer l and sequence b, on the hidden states ``H^l [L, d]`` entering the layer (the
prompt's; padding excluded everywhere):

    p^l   = pool(H^l)                                   eq. 2: last | mean | max | attn
    z^l   = g(p^l) @ W^l            W^l [d, N_mod]     eq. 6: g rational P(x)/Q(x), GeLU or ReLU
    pi^l  = softmax(z^l)                                eq. 3
    S^l   = top-k(pi^l)                                 the k module LoRAs applied in layer l
    y_j   = W_j x + pi^l_j * scale B_j A_j x   (j in S^l);   y_j = W_j x   (j not in S^l)

Poolers (``pooler=``): ``"last"`` the last non-padding token; ``"mean"`` the mean over non-padding
tokens; ``"max"`` the elementwise max over them; ``"attn"`` (appendix D) ``U = H W_p``
(``W_p [d, a]``), scores ``s = U q / sqrt(a)`` for each learnable query vector ``q [a]``
(``n_queries`` of them), ``A = softmax`` over the sequence (padding at -inf), ``p = A^T H``, averaged
over the queries. The rational activation (eq. 6, orders m = 6, n = 5) is the "safe" Pade unit
``P(x) / (1 + |b_1 x + ... + b_5 x^5|)``, initialised to approximate GeLU (coefficients fitted once
by nonlinear least squares on [-4, 4]: :func:`fit_rational_gelu`; max error 0.0062 there).

**Scaling by the router probability** (``weighting="prob"``, default): a selected module's delta
is multiplied by its softmax probability ``pi_j`` over all N_mod modules (not renormalised over the
k), so the router, its pooler and its activation get a gradient through the fused op's ``w``
(``dw = scale g . h``; the probability is the fused op's per-row weight, folded into its
``w * scale``, not a separate pass); the unselected modules are skipped: their rows carry id -1 in
``multi_lora_linear`` and cost nothing, and a module that no row of the batch selected (known on
the host when the routing runs on CPU) runs as its plain base linear, without the fused op.
``weighting="renorm"``: ``pi_j / sum_{i in S} pi_i``.

**Route once, reuse.** The decision of layer l is computed in a forward pre-hook of the decoder
layer during the prompt's forward and kept per sequence in the call's routing cache (the
``_ROUTE_CACHE`` contextvar that ``generate`` and :func:`loramix_fast.route_once` scope, as
:class:`loramix_fast.PromptCached` does), so every decode step (``generate``, beam search,
``num_return_sequences``, a manual loop inside ``with lmf.route_once(model):``) reuses it: at decode
a layer costs the base model plus its k selected module deltas. Each patched module turns the
decision into a plan (its ids and weights for the fused op, or "skip") on its first call and
reuses it at every decode step: no per-step bookkeeping. A new prompt (a new batch or selection)
makes a new decision and new plans; leaving the scope drops both. Outside those scopes every forward
is its own prompt. A forward with a KV cache but no decision (a manual loop without
``route_once``) raises instead of routing on the new token.

**Multi-tenant.** Each EM-LoRA belongs to one adapter of the library (its LoRAs) and carries its own
routers; :func:`attach` registers any number of them on a patched model, and the usual
``adapter_names=[...]`` picks each sequence's tenant: a row of an EM-LoRA adapter is routed by its
routers, a row of a plain adapter gets every module of it (weight 1), ``"__base__"`` rows stay
plain.

**Training** (:func:`loss`, :func:`fit`): the LM loss plus ``balance * L_bal`` with the
load-balancing loss of eqs. 4-5 per layer and tenant, ``L_bal = N_mod * sum_j f_j P_j``,
``f_j = (1 / (B k)) sum_b 1[j in S_b]`` (share of the selections that went to module j),
``P_j = (1 / B) sum_b pi_j(b)`` (mean probability), averaged over layers and tenants (1 at a
uniform router). Routers, activations and LoRAs train together through the fused op;
``fit(..., heldout=...)`` alternates the activations' coefficients on a held-out split (eq. 7,
first-order bi-level: the LoRAs, poolers and W^l step on the training batch, the activations on
the held-out batch). :func:`save` / :func:`load` keep the routers next to the adapter's peft folder.

    lib = lmf.AdapterLibrary.create(model, {"t1": lmf.LoRASpec(r=32, target_modules="all-linear")})
    lmf.patch(model, lib)
    em = lmf.EMLoRA.create(model, "t1", top_k=1, pooler="attn", activation="rational")
    lmf.emlora.attach(model, em)
    model.generate(**enc, adapter_names=["t1", "__base__"], max_new_tokens=16)
"""
from __future__ import annotations

import contextvars
import json
import math
import os
import re
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import BASE
from .context import _GENERATING, _ROUTE_CACHE, _SELECTION

__all__ = ["EMLoRA", "LayerRouter", "Rational", "attach", "detach", "loss", "fit", "save", "load",
           "balance_loss", "fit_rational_gelu", "EMLoRALoss", "POOLERS", "ACTIVATIONS"]

POOLERS = ("last", "mean", "max", "attn")
ACTIVATIONS = ("rational", "gelu", "relu")
WEIGHTINGS = ("prob", "renorm")
CONFIG_FILE = "emlora_config.json"
WEIGHTS_FILE = "emlora_routers.safetensors"
# canonical order of a Llama-style layer's module LoRAs (others follow, in the model's order)
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# P(x) = sum_i a_i x^i (i = 0..6), Q(x) = 1 + |sum_j b_j x^j| (j = 1..5), fitted to GeLU on [-4, 4]
# by fit_rational_gelu() (max |R - GeLU| = 0.0062 there; outside [-4, 4] it departs from GeLU)
GELU_P = (-0.0018370088349533346, 0.5074303649716815, 0.4115008568606355, 0.08614627591028627,
          -0.010308140093973845, -0.005413717044776736, -0.00047353589470061977)
GELU_Q = (-0.0019179460655813017, -0.18969032070701283, 0.015386572735018948,
          0.006086644671262617, 0.0004888744623972897)


def _coef(c: torch.Tensor, i: int) -> torch.Tensor:
    """Coefficient ``i`` of ``c [n]`` (a scalar) or of ``c [B, n]`` (``[B, 1]``, one per row)."""
    v = c[..., i]
    return v[:, None] if v.dim() else v


def rational(x: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``P(x) / (1 + |Q'(x)|)``, P = sum_i p[i] x^i, Q' = sum_j q[j-1] x^j (Horner; elementwise).
    ``p [m+1]``, ``q [n]``, or ``[B, m+1]`` / ``[B, n]`` for ``x [B, d]`` (row b: its own)."""
    P = _coef(p, -1) * torch.ones_like(x)
    for i in range(p.shape[-1] - 2, -1, -1):
        P = P * x + _coef(p, i)
    Q = _coef(q, -1) * torch.ones_like(x)
    for j in range(q.shape[-1] - 2, -1, -1):
        Q = Q * x + _coef(q, j)
    return P / (1 + (Q * x).abs())


def _route_rows(pooler: str, activation: str, H: torch.Tensor, mask: torch.Tensor,
                W: torch.Tensor, Wp=None, query=None, p=None, q=None) -> torch.Tensor:
    """``pi [B, N]`` (eqs. 2, 6, 3) of ``H [B, L, d]`` (``mask [B, L]``, True = token) with one
    router's parameters (``W [d, N]``, ``Wp [d, a]``, ``query [a, n_q]``, rational ``p [7]``,
    ``q [5]``) or one per row (a leading ``B`` on each: a batch of tenants in one pass)."""
    m = mask.to(torch.bool)
    if pooler == "last":
        L = H.shape[1]
        pos = torch.where(m, torch.arange(L, device=H.device), -1).amax(1).clamp(min=0)
        v = H[torch.arange(H.shape[0], device=H.device), pos]
    elif pooler == "mean":
        mf = m.to(H.dtype)[..., None]
        v = (H * mf).sum(1) / mf.sum(1).clamp(min=1)
    elif pooler == "max":
        v = H.masked_fill(~m[..., None], float("-inf")).amax(1)
        v = torch.where(m.any(1, keepdim=True), v, torch.zeros_like(v))
    else:  # appendix D: U = H W_p, A = softmax over the sequence of U q / sqrt(a), p = A^T H
        U = H @ Wp  # [B, L, a]
        sc = (U @ query) / math.sqrt(U.shape[-1])  # [B, L, n_q]
        sc = sc.masked_fill(~m[..., None], float("-inf"))
        A = torch.nan_to_num(torch.softmax(sc, dim=1), nan=0.0)  # no tokens: pools to 0
        v = (A.transpose(1, 2) @ H).mean(1)  # [B, d]
    if activation == "rational":
        g = rational(v, p, q)
    elif activation == "gelu":
        g = F.gelu(v)
    else:
        g = F.relu(v)
    z = (g[:, None, :] @ W)[:, 0]  # [B, N]
    return torch.softmax(z, dim=-1)


def fit_rational_gelu(m: int = 6, n: int = 5, lo: float = -4.0, hi: float = 4.0,
                      points: int = 1601) -> tuple[list, list, float]:
    """Fit ``rational(x, p, q)`` to GeLU on ``[lo, hi]`` by nonlinear least squares (L-BFGS from
    the linearised fit ``P - GeLU * Q' = GeLU``), fp64. Returns (p [m+1], q [n], max error). The
    constants GELU_P / GELU_Q are its result for the defaults (run once, kept)."""
    x = torch.linspace(lo, hi, points, dtype=torch.float64)
    f = F.gelu(x)
    Vp = torch.stack([x ** i for i in range(m + 1)], 1)
    Vq = torch.stack([x ** j for j in range(1, n + 1)], 1)
    sol = torch.linalg.lstsq(torch.cat([Vp, -f[:, None] * Vq], 1), f[:, None]).solution[:, 0]
    p = sol[:m + 1].clone().requires_grad_(True)
    q = sol[m + 1:].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([p, q], max_iter=2000, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure():
        opt.zero_grad()
        err = ((rational(x, p, q) - f) ** 2).mean()
        err.backward()
        return err

    opt.step(closure)
    with torch.no_grad():
        err = float((rational(x, p, q) - f).abs().max())
    return p.detach().tolist(), q.detach().tolist(), err


class Rational(nn.Module):
    """Learnable rational activation of orders (6, 5) (eq. 6), ``P(x) / (1 + |sum_j b_j x^j|)``,
    initialised to approximate GeLU (max error 0.0062 on [-4, 4]). Parameters ``p [7]``, ``q [5]``."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(GELU_P, dtype=torch.float32))
        self.q = nn.Parameter(torch.tensor(GELU_Q, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rational(x, self.p.to(x.dtype), self.q.to(x.dtype))


def _activation(kind: str) -> nn.Module:
    if kind == "rational":
        return Rational()
    if kind == "gelu":
        return nn.GELU()
    if kind == "relu":
        return nn.ReLU()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


class LayerRouter(nn.Module):
    """The router of one decoder layer: pooler, activation g, ``W [d, N_mod]``, softmax.

    Forward: ``H [B, L, d]``, ``mask [B, L]`` bool (True = a real token) -> ``pi [B, N_mod]``
    (the probabilities over the layer's module LoRAs), in the router's dtype."""

    def __init__(self, d: int, n_mod: int, pooler: str = "attn", activation: str = "rational",
                 n_queries: int = 1, attn_dim: int = 64, generator: torch.Generator | None = None):
        super().__init__()
        if pooler not in POOLERS:
            raise ValueError(f"pooler must be one of {POOLERS}, got {pooler!r}")
        self.pooler = pooler
        self.W = nn.Parameter(torch.randn(d, n_mod, generator=generator) / math.sqrt(d))
        if pooler == "attn":
            if int(n_queries) < 1 or int(attn_dim) < 1:
                raise ValueError(f"n_queries and attn_dim must be >= 1, got {n_queries}, "
                                 f"{attn_dim}")
            self.W_p = nn.Parameter(torch.randn(d, attn_dim, generator=generator) / math.sqrt(d))
            self.query = nn.Parameter(torch.randn(attn_dim, n_queries, generator=generator))
        self.act = _activation(activation)

    def params(self, dtype) -> dict:
        """The keyword arguments of ``_route_rows`` for this router, in ``dtype``."""
        kw = {"W": self.W.to(dtype)}
        if self.pooler == "attn":
            kw["Wp"], kw["query"] = self.W_p.to(dtype), self.query.to(dtype)
        if isinstance(self.act, Rational):
            kw["p"], kw["q"] = self.act.p.to(dtype), self.act.q.to(dtype)
        return kw

    def forward(self, H: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _route_rows(self.pooler, _act_name(self.act), H.to(self.W.dtype), mask,
                           **self.params(self.W.dtype))


def _act_name(act: nn.Module) -> str:
    return ("rational" if isinstance(act, Rational) else "gelu" if isinstance(act, nn.GELU)
            else "relu")


_LAYER_RE = re.compile(r"^(.*?\.(\d+))\.(.+)$")


def _layers_of(module_names, order=None) -> list[tuple[str, tuple[str, ...]]]:
    """Group module paths by decoder layer (the first numbered path element): [(layer path,
    (module paths in canonical order))], layers by index."""
    groups: dict = {}
    for name in module_names:
        mt = _LAYER_RE.match(name)
        if mt is None:
            raise ValueError(f"module {name!r} is not inside a numbered decoder layer; EM-LoRA "
                             "routes the module LoRAs of each layer")
        groups.setdefault((mt.group(1), int(mt.group(2))), []).append(name)
    rank = {n: i for i, n in enumerate(order or ())}

    def key(name):
        leaf = name.rsplit(".", 1)[-1]
        return (MODULE_ORDER.index(leaf) if leaf in MODULE_ORDER else len(MODULE_ORDER),
                rank.get(name, 0), name)

    return [(lp, tuple(sorted(ns, key=key))) for (lp, _), ns in
            sorted(groups.items(), key=lambda kv: (kv[0][0].rsplit(".", 1)[0], kv[0][1]))]


class EMLoRA(nn.Module):
    """One tenant's EM-LoRA: the routers of adapter ``adapter``'s module LoRAs, one per layer.

    Args:
        adapter: the library adapter whose module LoRAs are routed.
        layers: ``[(layer path, (module path, ...)), ...]``: each decoder layer and its N_mod
            module LoRAs in routing order (``EMLoRA.create`` reads them from the library).
        d: hidden size (the router input).
        top_k: modules applied per layer (eq. 3), 1 <= top_k <= N_mod of every layer.
        pooler, activation: see the module docstring (``POOLERS``, ``ACTIVATIONS``).
        weighting: ``"prob"`` (default: a selected delta scaled by its probability) or
            ``"renorm"`` (by its probability renormalised over the k).
        n_queries, attn_dim: the attention pooler's query vectors and width a of ``W_p [d, a]``.
        seed: initialisation of W^l (N(0, 1/d)) and of the attention pooler.

    :meth:`route` gives ``(pi [B, N_mod], top [B, k] int64, w [B, k])`` for one layer. Parameters
    live in the routers (``routers[l]``), not in the model: ``model.state_dict()`` stays the base
    model's. Move them with ``.to(device, dtype)`` like any module.
    """

    def __init__(self, adapter: str, layers, d: int, top_k: int = 1, pooler: str = "attn",
                 activation: str = "rational", weighting: str = "prob", n_queries: int = 1,
                 attn_dim: int = 64, seed: int = 0):
        super().__init__()
        if not isinstance(adapter, str) or not adapter or adapter == BASE:
            raise ValueError(f"adapter must be an adapter's name, got {adapter!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        layers = [(str(lp), tuple(ms)) for lp, ms in layers]
        if not layers:
            raise ValueError(f"EM-LoRA {adapter!r}: no layers to route")
        n_min = min(len(ms) for _, ms in layers)
        if not 1 <= int(top_k) <= n_min:
            raise ValueError(f"top_k must be in [1, {n_min}] (modules of the smallest layer), "
                             f"got {top_k}")
        self.adapter, self.layers, self.d, self.top_k = adapter, layers, int(d), int(top_k)
        self.pooler, self.activation, self.weighting = pooler, activation, weighting
        self.n_queries, self.attn_dim, self.seed = int(n_queries), int(attn_dim), int(seed)
        g = torch.Generator().manual_seed(seed)
        self.routers = nn.ModuleList(LayerRouter(d, len(ms), pooler, activation, n_queries,
                                                 attn_dim, g) for _, ms in layers)

    @classmethod
    def create(cls, model, adapter: str, lib=None, **kwargs) -> "EMLoRA":
        """An EM-LoRA over every module LoRA of ``adapter`` in ``lib`` (default: the library
        ``model`` is patched with), grouped by decoder layer; ``d`` is read from the model's
        config (``hidden_size``). ``kwargs`` go to the constructor."""
        if lib is None:
            from .patching import _state

            lib = _state(model).lib
        fs = lib.factors(adapter)  # KeyError naming the library's adapters
        names = [n for n, f in fs.items() if f.rank > 0]
        order = [n for n, _ in model.named_modules()]
        d = getattr(getattr(model, "config", None), "hidden_size", None)
        if d is None:
            raise ValueError("EMLoRA.create needs model.config.hidden_size")
        return cls(adapter, _layers_of(names, order), d, **kwargs)

    def config(self) -> dict:
        return dict(adapter=self.adapter, layers=[[lp, list(ms)] for lp, ms in self.layers],
                    d=self.d, top_k=self.top_k, pooler=self.pooler, activation=self.activation,
                    weighting=self.weighting, n_queries=self.n_queries, attn_dim=self.attn_dim,
                    seed=self.seed, format=1)

    def __repr__(self):
        return (f"EMLoRA({self.adapter!r}, layers={len(self.layers)}, top_k={self.top_k}, "
                f"pooler={self.pooler!r}, activation={self.activation!r}, "
                f"weighting={self.weighting!r})")

    def route(self, l: int, H: torch.Tensor, mask: torch.Tensor):
        """Layer ``l``'s decision for ``H [B, L, d]`` (``mask [B, L]``, True = token):
        ``(pi [B, N_mod], top [B, k] int64 module positions, w [B, k] their weights)``."""
        pi = self.routers[l](H, mask)
        pv, top = torch.topk(pi, self.top_k, dim=-1)  # ties: torch.topk's order
        if self.weighting == "renorm":
            pv = pv / pv.sum(-1, keepdim=True)
        return pi, top, pv

    def router_parameters(self) -> list:
        """Every router parameter except the rational activations' (W^l, the poolers')."""
        return [p for n, p in self.named_parameters() if ".act." not in n]

    def activation_parameters(self) -> list:
        """The rational activations' coefficients (empty for GeLU / ReLU)."""
        return [p for n, p in self.named_parameters() if ".act." in n]


def balance_loss(pi: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Eqs. 4-5 for one layer: ``N * sum_j f_j P_j`` with ``f_j`` the share of the B*k selections
    that went to module j and ``P_j`` the mean probability of module j (``pi [B, N]``,
    ``top [B, k]``). 1 for a uniform router; f carries no gradient (counts)."""
    B, N = pi.shape
    f = F.one_hot(top, N).to(pi.dtype).sum(1).mean(0) / top.shape[1]
    return N * (f * pi.mean(0)).sum()


# ---- serving: hooks on the patched model --------------------------------------------------------

@dataclass
class _LayerDecision:
    """One layer's routing for one forward's batch: per module path the ids ``[B, 1]`` int32 and
    weights ``[B, 1]`` every token of a sequence uses; ``aux``: (tenant, pi, top) for the loss.
    ``live``: per module path, whether some row applies its delta (known on the host when the
    decision was made on CPU; None elsewhere: unknown without a device sync)."""

    key: tuple  # (batch, selection ids)
    maps: dict
    aux: list
    live: dict | None = None
    plans: dict | None = None  # (module path, rows, device) -> _ModulePlan, built on first use


class _ModulePlan:
    """What a patched module does in every forward that reuses a layer decision (the decode steps
    of one generation): ``idx [rows, 1]`` / ``w [rows, 1]`` ready for the fused op (the router
    probability is the op's per-row weight, folded into its ``w * scale``; no separate pass), or
    ``skip``: no row applies this module's delta, so the module is its plain base linear. Built
    once per (module, rows, device) and decision; a new prompt makes a new decision (new plans)."""

    __slots__ = ("idx", "w", "skip")

    def __init__(self, idx, w, skip: bool):
        self.idx, self.w, self.skip = idx, w, skip


# (serving, token) pairs of the route caches the top-level pre-hook opened, innermost last
_OPENED: contextvars.ContextVar[tuple] = contextvars.ContextVar("loramix_emlora_opened",
                                                               default=())


class _Hook:
    """A hook of a :class:`_Serving` (by weak reference). A deep copy or pickle of the model gets
    an inert one: the copy is served without EM-LoRAs (attach them to it again)."""

    def __init__(self, ref, method: str, *extra):
        self.ref, self.method, self.extra = ref, method, extra

    def __call__(self, *args):
        sv = self.ref() if self.ref is not None else None
        if sv is None:
            return None
        return getattr(sv, self.method)(*args, *self.extra)

    def __deepcopy__(self, memo):
        return _Hook(None, self.method, *self.extra)

    def __reduce__(self):
        return (_Hook, (None, self.method) + tuple(self.extra))


class _Serving:
    """The EM-LoRAs attached to one patched model (``state.emlora``) and their hooks."""

    def __init__(self, model, state):
        self.model_ref = weakref.ref(model)
        self.state = state
        self.tenants: dict[str, EMLoRA] = {}
        self.hooks: list = []
        self.layer_hooks: dict = {}  # layer path -> handle
        self.module_layer: dict = {}  # module path -> layer path (union over tenants)
        self.layer_index: dict = {}  # layer path -> [(tenant, l)]
        ref = weakref.ref(self)
        self.hooks.append(model.register_forward_pre_hook(_Hook(ref, "_top_pre"),
                                                          with_kwargs=True))
        self.hooks.append(model.register_forward_hook(_Hook(ref, "_top_post"), always_call=True))

    def __deepcopy__(self, memo):  # a deep copy of the patched model is served without them
        return None

    def __getstate__(self):
        raise TypeError("a model with EM-LoRAs attached cannot be pickled; lmf.emlora.detach it "
                        "first and save the EM-LoRAs with lmf.emlora.save")

    # ---- registry --------------------------------------------------------------------------
    def add(self, em: EMLoRA) -> None:
        model = self.model_ref()
        st = self.state
        if em.adapter not in st.lib:
            raise KeyError(f"EM-LoRA adapter {em.adapter!r} is not in the model's library "
                           f"{[n for n in st.lib.names if n is not None]}")
        for lp, ms in em.layers:
            for name in ms:
                if name not in st.patched:
                    raise ValueError(f"EM-LoRA {em.adapter!r} routes module {name!r}, which the "
                                     "model does not have patched")
            if lp not in self.layer_hooks:
                layer = model.get_submodule(lp)
                self.layer_hooks[lp] = layer.register_forward_pre_hook(
                    _Hook(weakref.ref(self), "_layer_pre", lp), with_kwargs=True)
        self.tenants[em.adapter] = em
        self._reindex()

    def _reindex(self) -> None:
        self.module_layer = {}
        self.layer_index: dict = {}  # layer path -> [(tenant, l)]
        for em in self.tenants.values():
            for l, (lp, ms) in enumerate(em.layers):
                for name in ms:
                    self.module_layer[name] = lp
                self.layer_index.setdefault(lp, []).append((em, l))

    def remove_hooks(self) -> None:
        for h in self.hooks + list(self.layer_hooks.values()):
            h.remove()
        self.hooks.clear()
        self.layer_hooks.clear()

    # ---- per forward -----------------------------------------------------------------------
    def _top_pre(self, model, args, kwargs):
        tok = None
        if _ROUTE_CACHE.get() is None:  # a plain forward: its own routing cache, as a router's
            tok = _ROUTE_CACHE.set({})
        _OPENED.set(_OPENED.get() + ((self, tok),))
        cache = _ROUTE_CACHE.get()
        att = kwargs.get("attention_mask")
        past = any(hasattr(v, "get_seq_length") and v.get_seq_length() > 0
                   for v in kwargs.values())
        rm = cache.get((id(self), "route_mask"))  # lmf.emlora.loss(route_mask=...)
        if rm is not None:
            att = rm if not isinstance(att, torch.Tensor) else (rm != 0) & (att != 0)
        cache[(id(self), "forward")] = (att if isinstance(att, torch.Tensor) else None, past)
        return None

    def _top_post(self, model, args, output):
        opened = _OPENED.get()
        for i in range(len(opened) - 1, -1, -1):
            if opened[i][0] is self:
                tok = opened[i][1]
                _OPENED.set(opened[:i])
                if tok is not None:
                    try:
                        _ROUTE_CACHE.reset(tok)
                    except (ValueError, RuntimeError):
                        _ROUTE_CACHE.set(None)
                break
        return None

    def _selection(self):
        sel = _SELECTION.get()
        if sel is None or sel.state is not self.state:
            return None
        return sel

    def _layer_pre(self, layer, args, kwargs, lp):
        cache = _ROUTE_CACHE.get()
        if cache is None:
            return None
        key = (id(self), lp)
        sel = self._selection()
        H = args[0] if args else kwargs.get("hidden_states")
        if sel is None or not isinstance(H, torch.Tensor) or H.dim() != 3:
            cache.pop(key, None)
            return None
        B, L = H.shape[0], H.shape[1]
        dkey = (B, sel.ids)
        dec = cache.get(key)
        if dec is not None and dec.key == dkey:
            return None  # decided on the prompt: decode steps reuse it
        names = self.state.lib.names
        ids = list(sel.ids)
        if sel.broadcast:
            ids = ids * B
        elif len(ids) != B:
            if not (self.state in _GENERATING.get() and ids and B % len(ids) == 0):
                cache.pop(key, None)
                return None  # the selection itself reports the mismatch
            ids = [i for i in ids for _ in range(B // len(ids))]
        tenants = [(em, l) for em, l in self.layer_index.get(lp, ())
                   if any(0 <= i < len(names) and names[i] == em.adapter for i in ids)]
        if not tenants:
            cache.pop(key, None)
            return None
        att, past = cache.get((id(self), "forward"), (None, False))
        if past:
            raise ValueError("EM-LoRA: a forward with a KV cache but no routing decision (a manual "
                             "decode loop): run the loop inside `with lmf.route_once(model):` so "
                             "the prompt's routing is reused")
        dev = H.device
        if att is not None and att.dim() == 2 and att.shape[0] == B:
            mask = att[:, -L:].to(dev) != 0
        else:
            mask = torch.ones(B, L, dtype=torch.bool, device=dev)
        cache[key] = self._decide(lp, H, mask, ids, names, tenants, dkey)
        return None

    def _decide(self, lp, H, mask, ids, names, tenants, dkey) -> _LayerDecision:
        """Every tenant's routing at layer ``lp``; tenants whose routers have the same form
        (pooler, activation, k, weighting, modules, shapes) are routed in one batched pass with
        per-row parameters (16 tenants cost about one)."""
        dev = H.device
        B = H.shape[0]
        ids_t = torch.tensor(ids, dtype=torch.int32, device=dev)
        all_mods = [n for n, l in self.module_layer.items() if l == lp]
        groups: dict = {}
        for em, l in tenants:
            r = em.routers[l]
            sig = (r.pooler, _act_name(r.act), em.top_k, em.weighting, em.layers[l][1],
                   r.W.dtype, r.W.device,
                   tuple((k, tuple(v.shape)) for k, v in r.params(r.W.dtype).items()))
            groups.setdefault(sig, []).append((em, l))
        wdt = tenants[0][0].routers[tenants[0][1]].W.dtype
        cur = {n: [ids_t, torch.ones(B, dtype=wdt, device=dev)] for n in all_mods}
        aux = []
        for members in groups.values():
            rows_l, row_t = [], []
            for t, (em, _) in enumerate(members):
                rs = [b for b, i in enumerate(ids) if 0 <= i < len(names) and names[i] == em.adapter]
                rows_l += rs
                row_t += [t] * len(rs)
            rows = torch.tensor(rows_l, dtype=torch.long, device=dev)
            em0, l0 = members[0]
            r0 = em0.routers[l0]
            dt = r0.W.dtype
            if len(members) == 1:
                kw = r0.params(dt)
            else:
                tix = torch.tensor(row_t, dtype=torch.long, device=dev)
                ps = [em.routers[l].params(dt) for em, l in members]
                kw = {k: torch.stack([q[k] for q in ps])[tix] for k in ps[0]}
            pi = _route_rows(r0.pooler, _act_name(r0.act), H[rows].to(dt), mask[rows], **kw)
            pv, top = torch.topk(pi, em0.top_k, dim=-1)  # ties: torch.topk's order
            if em0.weighting == "renorm":
                pv = pv / pv.sum(-1, keepdim=True)
            if len(members) == 1:
                aux.append((em0, pi, top))
            else:
                for t, (em, _) in enumerate(members):
                    sel = tix == t
                    aux.append((em, pi[sel], top[sel]))
            for j, name in enumerate(em0.layers[l0][1]):
                hit = top == j  # [b, k]
                chosen = hit.any(1)
                wj = (pv * hit.to(pv.dtype)).sum(1)  # its weight where chosen, else 0
                idx_n, w_n = cur[name]
                idx_n = idx_n.index_put((rows,), torch.where(chosen, ids_t[rows], -1))
                w_n = w_n.index_put((rows,), wj.to(w_n.dtype))
                cur[name] = [idx_n, w_n]
        maps = {n: (i.view(B, 1).contiguous(), w.view(B, 1)) for n, (i, w) in cur.items()}
        # which modules some row applies: free on the host for a CPU decision (no device sync);
        # elsewhere unknown, and the fused op skips the -1 rows itself
        live = ({n: bool((i >= 0).any()) for n, (i, _) in maps.items()}
                if dev.type == "cpu" else None)
        return _LayerDecision(dkey, maps, aux, live, {})

    def plan(self, module, x: torch.Tensor) -> _ModulePlan | None:
        """The routing plan of patched ``module`` for its input ``x [..., in]`` in this forward
        (None: no EM-LoRA decision covers it; the module serves its selection as usual).

        The plan is built on the first call per (module, rows, device) of a layer decision and
        reused by every later forward that reuses the decision (each decode step of a
        generation), so a decode step does no per-module bookkeeping of ids or weights: two dict
        lookups. ``plan.skip``: every row's delta of this module is skipped (all ids -1, known on
        the host at route time), so the caller runs the plain base linear."""
        lp = self.module_layer.get(module.lmf_name)
        if lp is None:
            return None
        cache = _ROUTE_CACHE.get()
        if cache is None:
            return None
        dec = cache.get((id(self), lp))
        if dec is None:
            return None
        rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else (
            x.shape[0] if x.dim() > 1 else 1)
        key = (module.lmf_name, rows, x.device)
        plans = dec.plans
        p = plans.get(key)
        if p is None:
            p = plans[key] = self._plan(dec, module, x, rows)
        return p

    def _plan(self, dec: _LayerDecision, module, x: torch.Tensor, rows: int):
        hit = dec.maps.get(module.lmf_name)
        if hit is None:
            return None
        i, w = hit
        B = i.shape[0]
        t = rows // B if B else 0
        if t * B != rows:
            raise ValueError(f"{module.lmf_name}: the EM-LoRA routing was decided for {B} "
                             f"sequences but this forward has {rows} rows")
        ii, ww = i.to(x.device), w.to(x.device)
        if t != 1:
            ii, ww = ii.repeat_interleave(t, 0), ww.repeat_interleave(t, 0)
        live = dec.live.get(module.lmf_name, True) if dec.live is not None else True
        return _ModulePlan(ii, ww, not live)

    def decisions(self) -> list:
        """The layer decisions of the current routing cache (for the loss)."""
        cache = _ROUTE_CACHE.get() or {}
        return [v for k, v in cache.items() if isinstance(v, _LayerDecision)
                and isinstance(k, tuple) and k[0] == id(self)]


def _serving(model, create: bool = False) -> _Serving | None:
    from .patching import _state

    st = _state(model)
    sv = st.__dict__.get("emlora")
    if sv is None and create:
        sv = _Serving(model, st)
        st.emlora = sv
    return sv


def attach(model, *ems: EMLoRA) -> None:
    """Register EM-LoRAs on a patched model (each for its own adapter of the model's library; an
    adapter's earlier EM-LoRA is replaced). Sequences select them with ``adapter_names``."""
    if not ems:
        raise TypeError("attach(model, em, ...) needs at least one EMLoRA")
    for em in ems:
        if not isinstance(em, EMLoRA):
            raise TypeError(f"attach takes EMLoRA objects, got {type(em).__name__}")
    sv = _serving(model, create=True)
    for em in ems:
        sv.add(em)


def detach(model, adapters=None) -> None:
    """Remove the EM-LoRAs of ``adapters`` (None: all; then the hooks go too)."""
    from .patching import _state

    sv = _serving(model)
    if sv is None:
        return
    names = list(sv.tenants) if adapters is None else ([adapters] if isinstance(adapters, str)
                                                       else list(adapters))
    for n in names:
        sv.tenants.pop(n, None)
    sv._reindex()
    if not sv.tenants:
        sv.remove_hooks()
        _state(model).__dict__.pop("emlora", None)


def attached(model) -> dict:
    """``{adapter: EMLoRA}`` attached to ``model``."""
    sv = _serving(model)
    return dict(sv.tenants) if sv is not None else {}


# ---- training ---------------------------------------------------------------------------------

@dataclass
class EMLoRALoss:
    """``loss = lm_loss + balance * balance_loss`` (balance_loss: eqs. 4-5 averaged over the
    layers and tenants routed in the batch; 0 when none was), plus the model's ``logits``."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    balance_loss: torch.Tensor
    logits: torch.Tensor | None = None


def loss(model, input_ids, labels, adapter_names, attention_mask=None, balance: float = 1e-2,
         route_mask=None, **kwargs) -> EMLoRALoss:
    """One training forward: the LM loss of ``model(input_ids, labels=labels, adapter_names=...)``
    and the load-balancing loss of the EM-LoRA routers that routed its rows (coefficient
    ``balance``, the paper's lambda, 1e-2 default).

    ``route_mask [B, L]``: the tokens the routers pool (with the attention mask). Training on
    prompt + answer, give the prompt's tokens: at generation the routers see the prompt only."""
    from .patching import _route_cache_scope

    sv = _serving(model)
    if sv is None:
        raise ValueError("no EM-LoRA is attached to this model (lmf.emlora.attach(model, em))")
    if route_mask is not None and (not isinstance(route_mask, torch.Tensor)
                                   or route_mask.shape != input_ids.shape):
        raise ValueError("route_mask must be a tensor shaped like input_ids "
                         f"{tuple(input_ids.shape)}, got "
                         f"{getattr(route_mask, 'shape', type(route_mask).__name__)}")
    with _route_cache_scope():
        if route_mask is not None:
            _ROUTE_CACHE.get()[(id(sv), "route_mask")] = route_mask
        out = model(input_ids, attention_mask=attention_mask, labels=labels,
                    adapter_names=adapter_names, **kwargs)
        terms = [balance_loss(pi, top) for dec in sv.decisions() for _, pi, top in dec.aux]
    lm = out.loss
    bal = torch.stack(terms).mean() if terms else lm.new_zeros(())
    return EMLoRALoss(lm + balance * bal.to(lm.dtype), lm, bal, out.logits)


def fit(model, ems, batches, *, heldout=None, steps: int | None = None, lr: float = 1e-3,
        router_lr: float | None = None, act_lr: float | None = None, balance: float = 1e-2,
        train_lora: bool = True, log=None) -> list[dict]:
    """Train the LoRAs of the EM-LoRAs' adapters, their routers and their activations together.

    ``batches``: an iterable of dicts ``input_ids, labels, adapter_names[, attention_mask,
    route_mask]`` (see :func:`loss`)
    (cycled for ``steps`` steps; default one pass). ``heldout``: a second iterable of such
    batches: then the rational activations' coefficients are not stepped on the training batches
    but on the held-out ones, alternating with the other parameters each step (eq. 7's bi-level
    optimisation, first order). AdamW; ``router_lr`` / ``act_lr`` default to ``lr``. Returns one
    dict per step (``loss``, ``lm_loss``, ``balance_loss``, and ``heldout_loss`` when alternating).
    """
    import itertools

    from .patching import _state

    ems = [ems] if isinstance(ems, EMLoRA) else list(ems)
    lib = _state(model).lib
    act = [p for em in ems for p in em.activation_parameters()]
    main = [{"params": [p for em in ems for p in em.router_parameters()],
             "lr": router_lr or lr}]
    if train_lora:
        main.append({"params": lib.parameters([em.adapter for em in ems]), "lr": lr})
    if heldout is None and act:
        main.append({"params": act, "lr": act_lr or router_lr or lr})
    opt = torch.optim.AdamW(main, weight_decay=0.0)
    opt_act = (torch.optim.AdamW(act, lr=act_lr or router_lr or lr, weight_decay=0.0)
               if heldout is not None and act else None)
    batches = list(batches)
    n = steps if steps is not None else len(batches)
    held = itertools.cycle(list(heldout)) if opt_act is not None else None
    hist = []
    was_training = model.training
    model.train()
    try:
        for step in range(n):
            b = batches[step % len(batches)]
            out = loss(model, b["input_ids"], b["labels"], b["adapter_names"],
                       b.get("attention_mask"), balance, b.get("route_mask"))
            opt.zero_grad(set_to_none=True)
            if opt_act is not None:
                opt_act.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            rec = {"step": step, "loss": float(out.loss.detach()),
                   "lm_loss": float(out.lm_loss.detach()),
                   "balance_loss": float(out.balance_loss.detach())}
            if opt_act is not None:
                hb = next(held)
                opt.zero_grad(set_to_none=True)
                ho = loss(model, hb["input_ids"], hb["labels"], hb["adapter_names"],
                          hb.get("attention_mask"), balance, hb.get("route_mask"))
                ho.loss.backward()
                opt_act.step()
                opt.zero_grad(set_to_none=True)
                rec["heldout_loss"] = float(ho.loss.detach())
            hist.append(rec)
            if log is not None:
                log(rec)
    finally:
        model.train(was_training)
    return hist


# ---- save / load ------------------------------------------------------------------------------

def save(em: EMLoRA, folder, lib=None) -> None:
    """Write ``em``'s routers into ``folder`` (``emlora_config.json`` + ``emlora_routers
    .safetensors``), next to its adapter's peft files; with ``lib``, the adapter itself is
    written there too (``lib.save_peft``), so the folder is a peft adapter plus its routers."""
    from safetensors.torch import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    if lib is not None:
        lib.save_peft(em.adapter, folder)
    state = {k: v.detach().contiguous().cpu() for k, v in em.state_dict().items()}
    save_file(state, os.path.join(folder, WEIGHTS_FILE))
    cfg = em.config()
    cfg["dtype"] = str(next(em.parameters()).dtype).replace("torch.", "")
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(cfg, f, indent=1)


def load(folder, lib=None, name: str | None = None) -> EMLoRA:
    """Read an EM-LoRA saved by :func:`save`. With ``lib``, the folder's peft adapter is added
    to it under ``name`` (default: the saved adapter name) unless it is already there."""
    from safetensors.torch import load_file

    folder = os.fspath(folder)
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder!r} holds no EM-LoRA ({CONFIG_FILE} missing)")
    with open(path) as f:
        cfg = json.load(f)
    dtype = getattr(torch, cfg.pop("dtype", "float32"))
    cfg.pop("format", None)
    adapter = name or cfg.pop("adapter")
    cfg.pop("adapter", None)
    if lib is not None and adapter not in lib:
        lib.add_peft(adapter, folder)
    em = EMLoRA(adapter, **cfg).to(dtype)
    em.load_state_dict(load_file(os.path.join(folder, WEIGHTS_FILE)))
    return em
