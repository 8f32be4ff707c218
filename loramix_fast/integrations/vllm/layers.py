"""Patches of vLLM's LoRA linear layers: packed adapter stacks (both modes), fused forward.

vLLM's LoRA linear layers run ``quant_method.apply`` (the base GEMM), then the wrapper's
``add_lora_linear`` (the deltas, one per output slice: q/k/v, gate/up). Where the layer is not
tensor-parallel and its LoRA not fully sharded, its slices' adapters are packed into one stack:
slice i's A rows at ranks [i R, (i + 1) R) of ``A_packed [E, S R, K]`` and its B block at its
output columns x ranks [i R, (i + 1) R) of ``B_packed [E, N, S R]`` (zero elsewhere: block
diagonal), so one rank-S*R delta equals the S slice deltas. vLLM's own stacks become views into
the packed ones (made right after vLLM creates them, before any adapter is loaded), so
``set_lora`` / ``reset_lora`` write straight into them: nothing is copied or kept in sync. Then

    wrapper mode   y = vLLM's base GEMM (oneDNN on CPU), then ONE multi_lora_add_ per layer
                   (each token's own adapter's shrink and expand, into y in place; instead of
                   one shrink GEMM and one expand per slice)
    fused mode     where the base layer is also unquantized: y = multi_lora_linear(x, W,
                   A_packed, B_packed, 1, S * R, idx, bias), base GEMM and deltas in one op

vLLM's CPU GEMM dispatch replaces ``layer.weight`` by an empty tensor after loading (it hands the
weight to oneDNN); in fused mode, with LoRA enabled, the original weight is kept for the fused op
(the model's linear weights are then held twice; the oneDNN copy still serves batches without any
adapter). Layers that do not qualify keep the per-slice wrapper path of punica.py.
"""
from __future__ import annotations

import functools
import logging

import torch

from ... import ops
from . import _stats
from .punica import LoramixPunicaMixin

log = logging.getLogger("loramix_fast.vllm")

__all__ = ["install", "packed", "fused_apply"]

_installed = False
_fused = False


def _lora_enabled() -> bool:
    try:
        from vllm.config import get_current_vllm_config_or_none

        cfg = get_current_vllm_config_or_none()
    except Exception:  # noqa: BLE001 - an older vLLM: keep the weight
        return True
    return cfg is None or cfg.lora_config is not None


def _keep_weight(orig):
    @functools.wraps(orig)
    def process_weights_after_loading(self, layer):
        w = getattr(layer, "weight", None)
        keep = (isinstance(w, torch.Tensor) and w.dim() == 2 and not w.is_meta
                and _lora_enabled())
        data = w.data if keep else None
        orig(self, layer)
        if keep and layer.weight.numel() == 0:
            layer._lmf_weight = data
    process_weights_after_loading._loramix = True
    return process_weights_after_loading


def _base_weight(layer):
    base = layer.base_layer
    w = base.__dict__.get("_lmf_weight")
    if w is None:
        w = getattr(base, "weight", None)
    return w if isinstance(w, torch.Tensor) and w.dim() == 2 and w.numel() else None


def _pack(layer) -> str | None:
    """Make the layer's stacks views of packed ones; returns why not, or None when packed. The
    base weight goes with them where the fused mode can use it (None otherwise)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    base = layer.base_layer
    if getattr(layer, "tp_size", 1) != 1:
        return "tensor parallel"
    if getattr(layer.lora_config, "fully_sharded_loras", False):
        return "fully sharded LoRA"
    A_t, B_t = layer.lora_a_stacked, layer.lora_b_stacked
    S = len(A_t)
    E, one, R, K = A_t[0].shape
    Ns = [b.shape[2] for b in B_t]
    if (one != 1 or len(B_t) != S or any(a.shape != A_t[0].shape for a in A_t)
            or any(b.shape[0] != E or b.shape[1] != 1 or b.shape[3] != R for b in B_t)
            or tuple(Ns) != tuple(layer.output_slices)):
        return "unexpected stack layout"
    W = None
    if _fused and isinstance(getattr(base, "quant_method", None), UnquantizedLinearMethod):
        W = _base_weight(layer)
        if W is not None and (W.shape != (sum(Ns), K) or W.dtype != A_t[0].dtype
                              or W.device != A_t[0].device):
            W = None
        if W is None:
            log.info("loramix_fast: %s (%s) not fused (base weight not usable): packed deltas",
                     type(layer).__name__, getattr(base, "prefix", "?"))
    A = A_t[0].new_zeros(E, S * R, K)
    B = B_t[0].new_zeros(E, sum(Ns), S * R)
    a_views, b_views, off = [], [], 0
    for i, (a, b, n) in enumerate(zip(A_t, B_t, Ns)):
        av = A[:, i * R:(i + 1) * R].unsqueeze(1)
        bv = B[:, off:off + n, i * R:(i + 1) * R].unsqueeze(1)
        av.copy_(a)
        bv.copy_(b)
        a_views.append(av)
        b_views.append(bv)
        off += n
    layer.lora_a_stacked = tuple(a_views)
    layer.lora_b_stacked = tuple(b_views)
    layer._lmf_packed = (W, A, B, torch.ones(E, dtype=torch.float32, device=A.device),
                         torch.full((E,), S * R, dtype=torch.int64, device=A.device))
    _stats["packed_layers"] += 1
    return None


def _after_create(orig):
    @functools.wraps(orig)
    def create_lora_weights(self, *args, **kwargs):
        depth = self.__dict__.get("_lmf_create_depth", 0)
        self.__dict__["_lmf_create_depth"] = depth + 1
        try:
            out = orig(self, *args, **kwargs)
        finally:
            self.__dict__["_lmf_create_depth"] = depth
        if depth == 0:  # the outermost create_lora_weights (subclasses may call super's)
            self.__dict__.pop("_lmf_packed", None)
            why = _pack(self)
            if why is not None:
                log.info("loramix_fast: %s (%s) not packed: %s (per-slice deltas)",
                         type(self).__name__, getattr(self.base_layer, "prefix", "?"), why)
        return out
    create_lora_weights._loramix = True
    return create_lora_weights


def packed(layer):
    """(W, A_packed, B_packed, scale, rank) of a fused layer, or None."""
    return getattr(layer, "_lmf_packed", None)


def fused_apply(layer, x: torch.Tensor, bias):
    """The layer's output (base + deltas) from one multi_lora_linear, or None to take vLLM's path
    (not packed with its weight, another wrapper, or - eager on CPU - a batch without any
    adapter)."""
    pk = getattr(layer, "_lmf_packed", None)
    pw = getattr(layer, "punica_wrapper", None)
    if pk is None or pk[0] is None or not isinstance(pw, LoramixPunicaMixin):
        return None
    if pw.__dict__.get("_lmf_routed") is not None:  # routed.py: the packed path adds them
        return None
    if not pw._lmf_any_lora and pw._lmf_host_shortcuts(x):
        return None
    if pw._lmf_dead(x, pk[2]):  # no slot in use holds an adapter for this layer
        return None
    W, A, B, scale, rank = pk
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    E = pw._lmf_n_slots(A.shape[0], x2)
    if bias is not None and bias.dtype != x2.dtype:
        bias = bias.to(x2.dtype)
    if not torch.compiler.is_compiling():
        _stats["fused_calls"] += 1
    y = ops.multi_lora_linear(x2, W, A[:E], B[:E], scale[:E], rank[:E],
                              pw._lmf_token_idx(x2.shape[0]), None, bias, validate=False)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def _fused_apply_sync(orig):
    @functools.wraps(orig)
    def _apply_sync(self, x, bias=None):
        y = fused_apply(self, x, bias)
        return orig(self, x, bias) if y is None else y
    _apply_sync._loramix = True
    return _apply_sync


def _packed_lora_to_output(orig):
    @functools.wraps(orig)
    def _apply_lora_to_output(self, x, output):
        pk = getattr(self, "_lmf_packed", None)
        pw = getattr(self, "punica_wrapper", None)
        if pk is None or not isinstance(pw, LoramixPunicaMixin):
            return orig(self, x, output)
        _, A, B, scale, rank = pk
        pw.add_lora_packed(output.view(-1, output.shape[-1]), x.reshape(-1, x.shape[-1]),
                           A, B, scale, rank)  # in place
        return output
    _apply_lora_to_output._loramix = True
    return _apply_lora_to_output


def _b_stacks(layer) -> list:
    """The layer's B stacks (the tensors the wrapper receives): vLLM's (a tensor or a tuple of
    per-slice tensors) and the packed one."""
    b = getattr(layer, "lora_b_stacked", None)
    out = [b] if isinstance(b, torch.Tensor) else [t for t in (b or ()) if
                                                    isinstance(t, torch.Tensor)]
    pk = layer.__dict__.get("_lmf_packed")
    if pk is not None:
        out.append(pk[2])
    return out


def mark_live(layer, index: int | None = None) -> None:
    """Record on each of the layer's B stacks (attribute ``_lmf_live``, a host set) which slots
    hold a nonzero B: all slots when ``index`` is None, else slot ``index``. Runs at adapter load
    time (set_lora / reset_lora; one host read per stack), never in a forward; the wrapper skips
    a module when no slot its batch uses is live there."""
    for t in _b_stacks(layer):
        live = t.__dict__.get("_lmf_live")
        if live is None:
            live = set()
            t._lmf_live = live
        slots = range(t.shape[0]) if index is None else [index]
        for i in slots:
            if bool(t[i].any()):
                live.add(i)
            else:
                live.discard(i)


def _track_live(orig, kind: str):
    @functools.wraps(orig)
    def method(self, *args, **kwargs):
        key = "_lmf_live_depth"
        depth = self.__dict__.get(key, 0)
        self.__dict__[key] = depth + 1
        try:
            out = orig(self, *args, **kwargs)
        finally:
            self.__dict__[key] = depth
        if depth == 0:  # the outermost call (subclasses call their parents')
            if kind == "create":
                mark_live(self)
            else:
                index = args[0] if args else kwargs["index"]
                mark_live(self, int(index))
        return out
    method._loramix_live = True
    return method


def _subclasses(cls):
    out, todo = [], [cls]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return out


def install(fused: bool) -> None:
    """Patch vLLM's LoRA linear layers (packed stacks; packed deltas after the base GEMM) and, for
    the fused mode, its unquantized linear method (keep the weight) and the layers' forward (one
    multi_lora_linear). Idempotent."""
    global _installed, _fused
    if _installed:
        return
    _installed, _fused = True, fused
    from vllm.lora import layers as _layers  # noqa: F401 - imports every LoRA layer class
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.lora.layers.base import BaseLayerWithLoRA
    from vllm.platforms import current_platform

    inplace = current_platform.can_update_inplace()  # the packed deltas update y in place
    if not inplace:
        log.warning("loramix_fast: %s cannot update in place; per-slice deltas only",
                    type(current_platform).__name__)
    else:
        for c in _subclasses(BaseLinearLayerWithLoRA):
            f = c.__dict__.get("create_lora_weights")
            if f is not None and not getattr(f, "_loramix", False):
                c.create_lora_weights = _after_create(f)
    # which slots hold an adapter, per B stack; wraps the packing above (it runs first)
    for c in _subclasses(BaseLayerWithLoRA):
        for name, kind in (("create_lora_weights", "create"), ("set_lora", "slot"),
                           ("reset_lora", "slot")):
            f = c.__dict__.get(name)
            if f is not None and not getattr(f, "_loramix_live", False):
                setattr(c, name, _track_live(f, kind))
    if not inplace:
        return
    f = BaseLinearLayerWithLoRA._apply_lora_to_output
    if not getattr(f, "_loramix", False):
        BaseLinearLayerWithLoRA._apply_lora_to_output = _packed_lora_to_output(f)
    if fused:
        m = UnquantizedLinearMethod
        if not getattr(m.process_weights_after_loading, "_loramix", False):
            m.process_weights_after_loading = _keep_weight(m.process_weights_after_loading)
        f = BaseLinearLayerWithLoRA._apply_sync
        if not getattr(f, "_loramix", False):
            BaseLinearLayerWithLoRA._apply_sync = _fused_apply_sync(f)
    log.info("loramix_fast: %s", "fused mode (base GEMM + LoRA deltas in one multi_lora_linear)"
             if fused else "packed LoRA deltas after vLLM's base GEMM")
