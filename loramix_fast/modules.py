"""``MultiLoRALinear``: the drop-in module that patched models use in place of ``nn.Linear`` /
HF ``Conv1D``. It keeps the original as ``base_layer`` and adds, per token, the delta of the adapter
its sequence selected (multi-tenant) or of the experts a router picked (composition).
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .ops._dispatch import pick_backend
from .ops.multi_lora import _run
from .context import _GENERATING, _SELECTION

__all__ = ["MultiLoRALinear"]


class MultiLoRALinear(nn.Module):
    """A Linear-like layer serving every adapter of an :class:`AdapterLibrary` at once.

    Args:
        base_layer: the original ``nn.Linear`` or ``transformers.pytorch_utils.Conv1D``.
        name: the module path in the patched model (the key of its adapters in the library).
        state: the patch state shared by all patched layers of one model (library, router).
        kind: ``"linear"`` (weight [out, in]) or ``"conv1d"`` (weight [in, out]).

    Forward: ``x [..., in] -> [..., out]``. With no selection and no router, or when no adapter
    of the library targets this module, it is exactly ``base_layer(x)`` (bit-identical). Inside a
    selection the fused op computes every row: where some row has an adapter, rows whose sequence
    is ``__base__`` equal ``base_layer(x)`` to rounding (fp32 decode, <= 24 rows on AVX-512, runs
    the op's own base GEMM, in another summation order than torch's); where none has, bit for bit.
    """

    def __init__(self, base_layer: nn.Module, name: str, state, kind: str = "linear"):
        super().__init__()
        if kind not in ("linear", "conv1d"):
            raise ValueError(f"kind must be 'linear' or 'conv1d', got {kind!r}")
        self.base_layer = base_layer
        self.lmf_name = name
        self.lmf_kind = kind
        object.__setattr__(self, "_lmf_state", state)  # shared, not a submodule
        self._lmf_cache = None  # (library version, weight dtype, device, stack)
        self.__dict__["_lmf_base"] = base_layer  # plain attribute: skips nn.Module.__getattr__

    @property
    def in_features(self) -> int:
        w = self.base_layer.weight
        return w.shape[1] if self.lmf_kind == "linear" else w.shape[0]

    @property
    def out_features(self) -> int:
        w = self.base_layer.weight
        return w.shape[0] if self.lmf_kind == "linear" else w.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """Base weight as [out, in] (a transposed view for Conv1D)."""
        w = self.base_layer.weight
        return w if self.lmf_kind == "linear" else w.t()

    @property
    def bias(self):
        return self.base_layer.bias

    def extra_repr(self) -> str:
        return f"name={self.lmf_name!r}, kind={self.lmf_kind}"

    # ---- a patched model saves, loads, copies and moves as its base model ------------------
    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The base layer's state under this module's own name (``q_proj.weight``, never
        ``q_proj.base_layer.weight``): a patched model's state dict is the base model's."""
        return self._lmf_base.state_dict(*args, destination=destination, prefix=prefix,
                                         keep_vars=keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the base model's keys (``prefix + "weight"``) go to the base layer; the dict is the
        # loader's own copy, whose entries under ``prefix + "base_layer."`` the child then loads
        inner = prefix + "base_layer."
        for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
            state_dict[inner + k[len(prefix):]] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        self._lmf_cache = None  # .to() / .cuda() / .half(): the stack follows on the next forward
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        state["_lmf_cache"] = None  # derived; rebuilt from the library on first use
        return state

    def stack(self, dtype=None):
        """This module's adapter stack (None if no adapter targets it), in the weight's dtype
        unless ``dtype`` is given: views into the library's pool, as of the running forward's
        start."""
        w = self._lmf_base.weight
        return self._lmf_state.lib.stack(self.lmf_name, dtype or w.dtype, w.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self._lmf_state
        sel = _SELECTION.get()
        if sel is not None and sel.state is st:
            em = st.__dict__.get("emlora")
            plan = em.plan(self, x) if em is not None else None
            if plan is not None:  # lmf.emlora: the routing plan decided on the prompt
                if plan.skip and st.record is None:
                    return self._lmf_base(x)  # no row applies this module's delta
                idx, w = plan.idx, plan.w  # skipped rows: -1; w: router probabilities
            else:
                # this layer's own token map (encoder and decoder differ), built on x's device
                # once per forward and shape, shared by every layer
                idx = sel.token_map_for(x, expand=st in _GENERATING.get())
                w = None
        elif st.router is not None:
            return st.router.forward(self, x)
        else:
            return self.base_layer(x)
        stack = self.stack()
        if stack is None:
            return self.base_layer(x)
        if st.record is not None:  # lmf.record_routing: what the selection chose, no scores
            st.record.add(self.lmf_name, idx, None, st.lib.names, w)
        idx = stack.slots_of(idx)  # ids -> slots (a max_resident library; else the same tensor)
        return self.apply_adapters(x, stack, idx, w)

    def apply_adapters(self, x: torch.Tensor, stack, idx: torch.Tensor,
                       w: torch.Tensor | None = None) -> torch.Tensor:
        """``base_layer(x)`` plus the deltas of ``stack``'s adapters ``idx [M, S]`` (weights
        ``w [M, S]``), M = tokens of ``x [..., in]``, in one fused op; returns [..., out]."""
        x2 = x.reshape(-1, x.shape[-1])
        if idx.shape[0] != x2.shape[0]:
            raise ValueError(f"{self.lmf_name}: the adapter selection covers {idx.shape[0]} tokens "
                             f"but this layer got {x2.shape[0]} (input shape {tuple(x.shape)})")
        base = self._lmf_base
        wt = base.weight if self.lmf_kind == "linear" else base.weight.t()
        if x2.dtype != wt.dtype:
            x2 = x2.to(wt.dtype)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            y = ops.multi_lora_linear(x2, wt, stack.A, stack.B, stack.scale, stack.rank, idx, w,
                                      base.bias, validate=False)
        else:  # serving (no_grad / inference_mode): the backend's kernel, no wrapper on the way
            y = _run(pick_backend(x2, "multi_lora_linear"), x2, wt, stack.A, stack.B, stack.scale,
                     stack.rank, idx, w, base.bias)
        return y.view(*x.shape[:-1], y.shape[-1])
