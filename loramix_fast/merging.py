"""Merging LoRA experts into one adapter, with fixed or learned coefficients (the trade-offs paper's
uniform and learned merging).

    lmf.merge(lib, ["add", "sort"], weights=[0.6, 0.4], space="delta", name="add+sort")
    w = lmf.fit_merge_weights(model, batches, ["add", "sort"], space="factor", granularity="layer")
    lmf.merge(lib, ["add", "sort"], weights=w, space="factor", name="learned")

Two spaces (per module; dW_i = scale_i B_i A_i, experts that do not target a module count as 0):
- ``"factor"`` (the paper's low-rank merge): A = sum_i w_i A_i, B = sum_i w_i (scale_i B_i), scale 1,
  so dW = (sum_i w_i scale_i B_i)(sum_j w_j A_j): cross terms included, the rank stays r (experts
  of one module need equal ranks).
- ``"delta"`` (exact): A = [A_1; ...; A_n], B = [w_1 scale_1 B_1, ..., w_n scale_n B_n], scale 1,
  so dW = sum_i w_i dW_i exactly, at rank sum_i r_i.

Legend: n = merged experts, M = tokens, K / N = in / out features, R = the module's stack rank.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import torch

from . import ops
from .adapters import BASE, AdapterLibrary, LoRAFactors
from .patching import _state

__all__ = ["merge", "merge_factors", "fit_merge_weights"]

_SPACES = ("factor", "delta")
_GRANULARITY = ("global", "layer")


def _layer_of(module: str) -> int:
    """The transformer block index of a module path (the first integer component; -1: none)."""
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return -1


def _check_names(lib: AdapterLibrary, names) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) == 0:
        raise ValueError(f"names must be a non-empty list of adapter names, got {names!r}")
    names = list(names)
    for n in names:
        if n == BASE:
            raise ValueError(f"{BASE!r} is the base model, not an adapter: it cannot be merged")
        if n not in lib:
            raise ValueError(f"unknown adapter {n!r}; the library has "
                             f"{[m for m in lib.names if m is not None]}")
    if len(set(names)) != len(names):
        raise ValueError(f"names must be distinct, got {names}")
    return names


def _weights_per_module(weights, names, modules) -> dict[str, torch.Tensor]:
    """{module: [n] float64} from None (1/n), [n] (global) or {module: [n]} (every module)."""
    n = len(names)

    def vec(v, what):
        t = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v,
                            dtype=torch.float64).flatten().cpu()
        if t.shape != (n,):
            raise ValueError(f"{what} must hold {n} coefficients (one per adapter of {names}), "
                             f"got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what} must be finite, got {t.tolist()}")
        return t

    if weights is None:
        return {m: torch.full((n,), 1.0 / n, dtype=torch.float64) for m in modules}
    if isinstance(weights, dict):
        missing = [m for m in modules if m not in weights]
        if missing:
            raise ValueError(f"weights is a dict per module but lacks {missing[:3]}"
                             f"{' ...' if len(missing) > 3 else ''} ({len(missing)} module(s))")
        return {m: vec(weights[m], f"weights[{m!r}]") for m in modules}
    w = vec(weights, "weights")
    return {m: w for m in modules}


def merge_factors(lib: AdapterLibrary, names: Sequence[str], weights=None,
                  space: str = "factor") -> dict[str, LoRAFactors]:
    """The merged adapter's ``{module: LoRAFactors}`` (see :func:`merge`), computed in float64 and
    returned in the library's dtype, without adding it."""
    if space not in _SPACES:
        raise ValueError(f"space must be 'factor' or 'delta', got {space!r}")
    names = _check_names(lib, names)
    facs = [lib.factors(n) for n in names]
    modules = sorted({m for f in facs for m, lf in f.items() if lf.rank > 0})
    if not modules:
        raise ValueError(f"adapters {names} target no module with rank > 0")
    wmod = _weights_per_module(weights, names, modules)
    out = {}
    for m in modules:
        parts = [(i, f[m]) for i, f in enumerate(facs) if m in f and f[m].rank > 0]
        dt = parts[0][1].A.dtype
        dev = parts[0][1].A.device
        w = wmod[m]
        As = [lf.A.detach().double() for _, lf in parts]
        Bs = [lf.B.detach().double() * (float(w[i]) * float(lf.scale)) for i, lf in parts]
        if space == "factor":
            ranks = {lf.rank for _, lf in parts}
            if len(ranks) != 1:
                raise ValueError(f"space='factor' needs equal ranks per module; module {m!r} has "
                                 f"ranks { {names[i]: lf.rank for i, lf in parts} } "
                                 "(use space='delta')")
            A = sum(float(w[i]) * a for (i, _), a in zip(parts, As))
            B = sum(Bs)
        else:
            A = torch.cat(As, 0)
            B = torch.cat(Bs, 1)
        out[m] = LoRAFactors(A.to(device=dev, dtype=dt).contiguous(),
                             B.to(device=dev, dtype=dt).contiguous(), 1.0)
    return out


def merge(lib: AdapterLibrary, names: Sequence[str], weights=None, space: str = "factor", *,
          name: str = "merged") -> str:
    """Add to ``lib`` one adapter ``name`` that merges adapters ``names`` with coefficients
    ``weights``; patched models serve it at once (``adapter_names=[name]``).

    Semantics per module (dW_i = scale_i B_i A_i; an adapter that does not target the module
    contributes nothing there):
        space="factor": dW = (sum_i w_i scale_i B_i) (sum_i w_i A_i)   (rank r; equal ranks needed)
        space="delta":  dW = sum_i w_i dW_i   exactly                    (rank sum_i r_i)
    Args:
        lib: the library holding the adapters.
        names: n distinct adapter names.
        weights: None (uniform 1/n), [n] coefficients (the same in every module), or
            ``{module: [n]}`` for every targeted module (e.g. :func:`fit_merge_weights` with
            ``granularity="layer"``). Any finite values (not renormalised).
        space: "factor" or "delta".
        name: the new adapter's name (must be free).
    Returns ``name``. The merged factors are computed in float64 and stored in the library's dtype;
    ``lib.save_peft(name, folder)`` writes them as a peft adapter (scale 1 folded in).
    """
    if not isinstance(name, str) or not name or name == BASE:
        raise ValueError(f"name must be a non-empty string other than {BASE!r}, got {name!r}")
    if name in lib:
        raise ValueError(f"adapter {name!r} is already in the library (pick another name or "
                         "lib.remove it first)")
    lib.add(name, merge_factors(lib, names, weights, space))
    return name


# ---- learned merging ------------------------------------------------------------------------

def autograd_safe_stack(stack):
    """``stack`` with every inference tensor replaced by a normal copy. A library stack first
    built inside ``torch.inference_mode`` (e.g. by ``ensemble_generate``) holds inference tensors
    (its scale vector, or slots grown there), which autograd refuses to save for a backward."""
    fix = {k: getattr(stack, k).clone() for k in ("A", "B", "scale", "rank")
           if getattr(stack, k).is_inference()}
    if not fix:
        return stack
    return dataclasses.replace(stack, **fix, cache={})


class _MergeRouter:
    """Installed as the patched model's router while coefficients are fitted: every module adds
    the merged delta of ``names`` with the current coefficients ``coef[group[module]]`` [n], in the
    fused ops (differentiable in the coefficients)."""

    def __init__(self, lib, names, space, coef, group):
        self.lib, self.names, self.space = lib, names, space
        self.coef, self.group = coef, group  # coef [G, n] (autograd leaf), group: module -> row

    def forward(self, module, x):
        stack = module.stack()
        if stack is None or module.lmf_name not in self.group:
            return module.base_layer(x)
        stack = autograd_safe_stack(stack)
        x2 = x.reshape(-1, x.shape[-1])
        M, n = x2.shape[0], len(self.names)
        ids = torch.tensor([self.lib.id_of(nm) for nm in self.names], dtype=torch.int32,
                           device=x.device)
        slots = stack.slots_of(ids)
        c = self.coef[self.group[module.lmf_name]].to(x2.dtype)  # [n]
        idx = slots[None].expand(M, n).contiguous()
        w = c[None].expand(M, n).contiguous()
        if self.space == "delta":  # sum_i c_i dW_i x: the op with n slots
            y = module.apply_adapters(x2, stack, idx, w)
        else:  # (sum_i c_i scale_i B_i)(sum_j c_j A_j x): h_bar fed to every B_i
            r = self.rank_of(module.lmf_name)
            wt = module.weight
            xw = x2.to(wt.dtype)
            sl = slots.long()
            live = (stack.rank.to(x.device)[sl] > 0).to(c.dtype)
            A = stack.A[sl, :r]  # [n, r, K]
            h_bar = torch.einsum("mk,nrk,n->mr", xw, A, c * live)  # [M, r]
            E, R = stack.A.shape[0], stack.A.shape[1]
            H = torch.zeros(M, E, R, dtype=h_bar.dtype, device=x.device)
            H = H.index_copy(1, sl, torch.nn.functional.pad(h_bar, (0, R - r))[:, None]
                             .expand(M, n, R).contiguous())
            y = torch.nn.functional.linear(xw, wt, module.base_layer.bias)
            y = ops.multi_lora_expand(y, H, stack.B, stack.scale, stack.rank, idx, w)
        return y.view(*x.shape[:-1], y.shape[-1])

    def rank_of(self, module: str) -> int:
        rs = {f[module].rank for f in self._facs if module in f and f[module].rank > 0}
        if len(rs) != 1:
            raise ValueError(f"space='factor' needs equal ranks per module; module {module!r} "
                             f"has ranks {sorted(rs)} (use space='delta')")
        return rs.pop()


def _nll(model, batch, i):
    from .ensemble_scoring import _batch_parts, _check_ids

    ids, mask, labels = _batch_parts(batch, i)
    ids, mask = _check_ids(ids, mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    keep = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
    if labels is not None:
        keep = keep & (labels.to(ids.device)[:, 1:] != -100)
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    k = keep.sum()
    if int(k) == 0:
        raise ValueError(f"batches[{i}] holds no scored token (every label is -100 or masked)")
    return -(lp * keep).sum() / k


def fit_merge_weights(model, batches: Iterable, names: Sequence[str], space: str = "delta",
                      granularity: str = "global", *, steps: int = 100, lr: float = 0.05,
                      init=None, return_history: bool = False):
    """Learn merging coefficients by SGD on the NLL of the merged model (the trade-offs paper's
    learned merging), through the fused op: while fitting, every patched module adds the merge
    of ``names`` with the current coefficients (delta space: the multi-LoRA op with one slot per
    expert and the coefficients as slot weights; factor space: the shared shrink
    ``h_bar = sum_j c_j A_j x`` fed to every expert's expand), and the coefficients get their
    gradient from the ops' backward. The model's own parameters are not changed and get no
    gradient (their ``requires_grad`` is switched off while fitting, then restored).

    Args:
        model: a model patched with ``lmf.patch``; its library holds ``names``.
        batches: a list of batches (as :func:`lmf.fit_ensemble_weights`: ``input_ids``, a dict with
            ``input_ids`` / ``attention_mask`` / ``labels`` (-100: not scored), or a tuple); step
            t trains on ``batches[t % len(batches)]``.
        names: n adapter names.
        space: "delta" or "factor" (see :func:`merge`).
        granularity: "global" (one coefficient per expert) or "layer" (one per expert and
            transformer block; modules without a block index share one group).
        steps, lr: Adam steps (learning rate decayed by a cosine to 0).
        init: None (uniform 1/n) or [n] starting coefficients.
    Returns: coefficients for :func:`merge`: a [n] float32 tensor ("global") or ``{module: [n]}``
    ("layer"); with ``return_history=True`` also the NLL of each step's batch (before its update).
    """
    if space not in _SPACES:
        raise ValueError(f"space must be 'factor' or 'delta', got {space!r}")
    if granularity not in _GRANULARITY:
        raise ValueError(f"granularity must be 'global' or 'layer', got {granularity!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    st = _state(model)
    lib = st.lib
    names = _check_names(lib, names)
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty")
    n = len(names)
    facs = [lib.factors(nm) for nm in names]
    modules = sorted({m for f in facs for m, lf in f.items() if lf.rank > 0} & set(st.patched))
    if not modules:
        raise ValueError(f"adapters {names} target no patched module")
    if granularity == "global":
        group = {m: 0 for m in modules}
    else:
        layers = sorted({_layer_of(m) for m in modules})
        group = {m: layers.index(_layer_of(m)) for m in modules}
    G = max(group.values()) + 1
    w0 = (torch.full((n,), 1.0 / n) if init is None
          else torch.as_tensor(init, dtype=torch.float32).flatten())
    if w0.shape != (n,) or not bool(torch.isfinite(w0).all()):
        raise ValueError(f"init must be {n} finite coefficients, got {init!r}")
    dev = next(iter(st.patched.values())).weight.device
    coef = w0.to(dev, torch.float32)[None].repeat(G, 1).requires_grad_(True)  # [G, n]
    router = _MergeRouter(lib, names, space, coef, group)
    router._facs = facs
    if space == "factor":
        for m in modules:
            router.rank_of(m)  # equal ranks, checked before any forward
    opt = torch.optim.Adam([coef], lr=lr)
    history = []
    prev = st.router
    st.router = router
    # the base model's parameters get no gradient while fitting (restored afterwards)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for step in range(steps):
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                opt.zero_grad()
                loss = _nll(model, batches[step % len(batches)], step % len(batches))
                loss.backward()
                history.append(float(loss.detach()))
                opt.step()
    finally:
        st.router = prev
        for p in frozen:
            p.requires_grad_(True)
    coef = coef.detach().cpu()
    out = coef[0].clone() if granularity == "global" else {m: coef[group[m]].clone()
                                                           for m in modules}
    return (out, history) if return_history else out
