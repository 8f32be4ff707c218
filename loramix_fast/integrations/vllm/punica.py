"""A vLLM Punica wrapper built on loramix_fast's ops.

vLLM's LoRA layers compute their base projection, then call the wrapper's
``add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices)``: one A stack
``[max_loras, 1, R, K]`` and one B stack ``[max_loras, 1, N_i, R]`` per output slice (q/k/v,
gate/up), slices at cumulative column offsets of ``y``, scaling already folded into B, one slot id
per token in ``token_lora_indices`` with -1 = no adapter. Here, per slice:

    multi_lora_add_(y[:, slice], x, A[:E], B[:E], 1, R, idx)     y's column slice, in place

``multi_lora_add_`` (C++ on CPU) computes, for each token, only its own adapter's shrink
(``A[e] @ x``) and expand into ``y`` where it lies (no shrink over every slot, no copy of y) and
skips tokens whose id is -1; on other devices it is the shrink GEMM over the slots in use and
``multi_lora_expand`` (vLLM's CPU path gathers a copy of the adapter per token and indexes
with -1 directly, so base requests batched with LoRA requests get the delta of the adapter in the
last slot). Nothing in the hot path reads a device value on the host: the host facts used (does
the batch use any adapter, how many slots from 0 hold the adapters in use) come from the mapping
vLLM hands :meth:`update_metadata` as Python lists; while tracing (torch.compile) or capturing a
CUDA graph, or on a GPU, those shortcuts are not taken and the ops run over all slots.

Layers whose slices were packed into one stack (layers.py) call :meth:`add_lora_packed` instead:
one ``multi_lora_add_`` for all their slices. The token slot ids handed to the ops are built once
per step (in :meth:`update_metadata`), not per layer.

Embedding and logits LoRA (``add_lora_embedding`` / ``add_lora_logits``) and the fully sharded
layers' ``add_shrink`` / ``add_expand`` go through the same ops with the same -1 rule. MoE LoRA and
``apply_lora_full_linear`` stay the platform wrapper's (inherited).
"""
from __future__ import annotations

import logging

import torch

from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from ... import ops
from . import _stats

log = logging.getLogger("loramix_fast.vllm")

__all__ = ["PunicaWrapperLoramixCPU", "LoramixPunicaMixin", "install", "QUALNAMES"]

_CPU_QUALNAME = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
_GPU_QUALNAME = "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU"
QUALNAMES = {
    _CPU_QUALNAME: __name__ + ".PunicaWrapperLoramixCPU",
    _GPU_QUALNAME: __name__ + ".PunicaWrapperLoramixGPU",
}


def _tracing() -> bool:
    """True while torch.compile traces or a CUDA graph is captured: host-side shortcuts would be
    frozen into the graph, so the branch-free path runs."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class LoramixPunicaMixin:
    """The loramix_fast half of the wrapper; mixed in front of the platform's wrapper class."""

    def _lmf_init(self):
        # slot ids past the mapping (padding rows) read -1, never a stale or uninitialised slot
        self._token_lora_indices.fill_(-1)
        self._sampler_indices.fill_(-1)
        self._lmf_any_lora = True      # host: does the current batch use any adapter
        self._lmf_slots: int | None = None  # host: slots [0, n) hold every adapter in use
        self._lmf_used: frozenset | None = None  # host: the slots the current batch uses
        self._lmf_consts: dict = {}    # (E, R, dtype, device, scale) -> (scale [E], rank [E])
        self._lmf_idx_cache: dict = {}  # n -> this step's slot ids [n, 1] (a view)
        self._lmf_views: dict = {}  # (id(A), E) -> (A, A[:E], B[:E], scale[:E], rank[:E])
        # multi_lora_add_'s eager kernel for this device, resolved once (hot path: one call per
        # layer per step); under torch.compile the custom op runs instead (_lmf_add)
        self._lmf_add_fn = ops.multi_lora_add_kernel(self.device)
        _stats["wrappers"] += 1
        _stats["wrapper_class"] = type(self).__name__
        from ... import _cpp

        # build / load the C++ extension now, not inside the first forward
        ok = _cpp.load() if str(self.device).startswith("cpu") else None
        log.info("loramix_fast: %s built (ops backend on CPU: %s)", type(self).__name__,
                 "C++" if ok else ("reference" if ok is False else "device"))

    # ---------------------------------------------------------------- metadata (once per mapping)
    def _lmf_update_host(self, mapping, lora_index_to_id):
        slot = {i: s for s, i in enumerate(lora_index_to_id) if i is not None}
        used = {slot[i] for i in set(mapping.index_mapping) | set(mapping.prompt_mapping)
                if i > 0 and i in slot}
        self._lmf_any_lora = bool(used)
        self._lmf_slots = max(used) + 1 if used else 0
        self._lmf_used = frozenset(used)
        self._lmf_idx_cache = {}

    def _lmf_fill_tails(self):
        n0, n1 = self.indices_len[0], self.indices_len[1]
        self._token_lora_indices[n0:].fill_(-1)
        self._sampler_indices[n1:].fill_(-1)

    # ---------------------------------------------------------------- helpers
    def _lmf_host_shortcuts(self, x: torch.Tensor) -> bool:
        # CPU tensors are never part of a CUDA graph capture: only torch.compile tracing matters
        # (the full _tracing() check costs a torch.cuda.is_available() call per layer)
        return x.device.type == "cpu" and not torch.compiler.is_compiling()

    def _lmf_dead(self, x: torch.Tensor, *stacks) -> bool:
        """True when none of the slots the batch uses holds a nonzero B in any of ``stacks``
        (the host-side sets layers.py keeps on each B stack at set_lora / reset_lora: an
        adapter without lm_head or embedding weights, or one that does not target a module,
        costs nothing there). False when a stack carries no set or the shortcut is off."""
        if self._lmf_used is None or not self._lmf_host_shortcuts(x):
            return False
        for t in stacks:
            live = getattr(t, "_lmf_live", None)
            if live is None or not live.isdisjoint(self._lmf_used):
                return False
        return True

    def _lmf_n_slots(self, E: int, x: torch.Tensor) -> int:
        """How many slots from 0 the ops must cover: all of them unless the host knows better."""
        if self._lmf_slots is not None and self._lmf_host_shortcuts(x):
            return max(1, min(E, self._lmf_slots))
        return E

    def _lmf_const(self, E: int, R: int, dtype, device, scale: float = 1.0):
        """(scale [E] filled with ``scale``, rank [E] filled with R), cached."""
        key = (E, R, dtype, device, scale)
        c = self._lmf_consts.get(key)
        if c is None:
            c = (torch.full((E,), scale, dtype=dtype, device=device),
                 torch.full((E,), R, dtype=torch.int64, device=device))
            self._lmf_consts[key] = c
        return c

    def _lmf_token_idx(self, n: int) -> torch.Tensor:
        """Slot ids [n, 1] of the step's first n tokens (a view; built once per step and n)."""
        rt = self.__dict__.get("_lmf_routed")
        if rt is not None:  # routed.py: routed tokens are -1 for the wrapper's own ops
            return rt.named_idx(n)
        c = self._lmf_idx_cache.get(n)
        if c is None:
            c = self._lmf_idx_cache[n] = self._token_lora_indices[:n].unsqueeze(1)
        return c

    def _lmf_sampler_idx(self, n: int) -> torch.Tensor:
        return self._sampler_indices[:n].unsqueeze(1)

    def _lmf_delta(self, y2, x2, A4, B4, idx, scale: float):
        """y2[:, :] += delta of the selected slot per row (y2 a column slice of y, updated in
        place by ``multi_lora_add_``); A4 [E, 1, R, K], B4 [E, 1, N, R]."""
        E0, _, R, K = A4.shape
        E = self._lmf_n_slots(E0, x2)
        A = A4[:E, 0]
        B = B4[:E, 0]
        if A.dtype != y2.dtype:
            A = A.to(y2.dtype)
        if B.dtype != y2.dtype:
            B = B.to(y2.dtype)
        x3 = x2 if x2.dtype == y2.dtype else x2.to(y2.dtype)
        sc, rank = self._lmf_const(E, R, torch.float32, x2.device, scale)
        self._lmf_add(y2, x3, A, B, sc, rank, idx)

    def _lmf_add(self, y2, x2, A, B, scale, rank, idx):
        """y2 += the deltas (``multi_lora_add_``, in place): the kernel resolved at init in
        eager mode, the custom op while torch.compile traces."""
        if torch.compiler.is_compiling():
            ops.multi_lora_add_(y2, x2, A, B, scale, rank, idx, None, validate=False)
        else:
            self._lmf_add_fn(y2, x2, A, B, scale, rank, idx, None)

    # ---------------------------------------------------------------- routed requests
    # (routed.py: ``_lmf_routed`` is its StepState in a step whose batch uses routed slots)
    def _lmf_routed_scoring(self) -> bool:
        rt = self.__dict__.get("_lmf_routed")
        return rt is not None and rt.scoring

    def _lmf_routed_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale,
                           output_slices) -> bool:
        """Per-slice layers: the routed tokens' deltas into y (in place; the wrapper's ops see
        those tokens as -1), or in the scoring pass their scores only. True: skip the rest."""
        rt = self.__dict__.get("_lmf_routed")
        if rt is None:
            return False
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        off = 0
        for A4, B4, n in zip(lora_a_stacked, lora_b_stacked, output_slices):
            if rt.scoring:
                rt.score(x2, A4[:, 0], 1)
            else:
                rt.add(y2[:, off:off + n], x2, A4[:, 0], B4[:, 0], 1, scale)
            off += n
        return rt.scoring

    def _lmf_routed_packed(self, y2, x2, A, B, scale) -> bool:
        """Packed layers: as :meth:`_lmf_routed_linear` on the packed stacks."""
        rt = self.__dict__.get("_lmf_routed")
        if rt is None:
            return False
        S = A.shape[1] // rt.R
        if rt.scoring:
            rt.score(x2, A, S)
            return True
        rt.add(y2, x2, A, B, S, scale)
        return False

    # ---------------------------------------------------------------- the LoRA layers' calls
    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *,
                        buffer=None, **kwargs):
        """y[:, slice i] += B_i[e] @ (A_i[e] @ x) for each token's slot e (-1: nothing)."""
        assert len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
        if kwargs.get("add_inputs", True) is False:
            y.zero_()
        if not self._lmf_any_lora and self._lmf_host_shortcuts(x):
            return y
        if self._lmf_dead(x, *lora_b_stacked):
            return y
        if not torch.compiler.is_compiling():
            _stats["lora_linear_calls"] += 1
        if self._lmf_routed_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices):
            return y  # routed.py's scoring pass: no deltas
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        idx = self._lmf_token_idx(x2.shape[0])
        off = 0
        for A4, B4, n in zip(lora_a_stacked, lora_b_stacked, output_slices):
            self._lmf_delta(y2[:, off:off + n], x2, A4, B4, idx, scale)
            off += n
        return y

    def add_lora_packed(self, y2, x2, A, B, scale, rank, inplace: bool = True):
        """A packed layer (layers.py): y2 [T, N] += its slices' deltas, as one ``multi_lora_add_``
        on the packed stacks (A [E, S R, K], B [E, N, S R]) over the slots in use. Returns y2,
        updated in place (``inplace=False``: a new tensor, y2 untouched)."""
        if not inplace:
            y2 = y2.clone()
        E = A.shape[0]
        if x2.device.type == "cpu" and not torch.compiler.is_compiling():
            # eager on CPU (the host shortcuts of _lmf_host_shortcuts / _lmf_dead / _lmf_n_slots,
            # inlined: this runs once per layer per step)
            if not self._lmf_any_lora:
                return y2
            used, live = self._lmf_used, B.__dict__.get("_lmf_live")
            if used is not None and live is not None and live.isdisjoint(used):
                return y2
            _stats["packed_calls"] += 1
            if self._lmf_slots is not None:
                E = max(1, min(E, self._lmf_slots))
        elif not torch.compiler.is_compiling():
            _stats["packed_calls"] += 1
        if self._lmf_routed_packed(y2, x2, A, B, scale):
            return y2  # routed.py's scoring pass: no deltas
        key = (id(A), E)
        v = self._lmf_views.get(key)
        if v is None or v[0] is not A:  # the stacks' first E slots, sliced once per (layer, E)
            v = self._lmf_views[key] = (A, A[:E], B[:E], scale[:E], rank[:E])
        _, Ae, Be, sc, rk = v
        if Ae.dtype != y2.dtype:
            Ae, Be = Ae.to(y2.dtype), Be.to(y2.dtype)
        x3 = x2 if x2.dtype == y2.dtype else x2.to(y2.dtype)
        self._lmf_add(y2, x3, Ae, Be, sc, rk, self._lmf_token_idx(x2.shape[0]))
        return y2

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None,
                        **kwargs):
        """logits rows (one per request, ``sampler_indices``) += the request's lm_head delta."""
        if not self._lmf_any_lora and self._lmf_host_shortcuts(x):
            return y
        if self._lmf_dead(x, lora_b_stacked):
            return y
        if self._lmf_routed_scoring():
            return y  # routed.py's scoring pass: no deltas
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        A4 = lora_a_stacked if lora_a_stacked.dim() == 4 else lora_a_stacked.unsqueeze(1)
        B4 = lora_b_stacked if lora_b_stacked.dim() == 4 else lora_b_stacked.unsqueeze(1)
        n = min(y2.shape[1], B4.shape[2])  # vLLM: lm_head delta and logits may pad differently
        self._lmf_delta(y2[:, :n], x2, A4, B4[:, :, :n], self._lmf_sampler_idx(x2.shape[0]),
                        scale)
        return y

    def _lmf_expand_rows(self, y2, h2, B4, idx):
        """y2 += B[e] @ h2[m] (h2 [T, R]: each token's own shrink output)."""
        E0, _, N, R = B4.shape
        E = self._lmf_n_slots(E0, y2)
        h = h2.to(torch.float32).unsqueeze(1).expand(h2.shape[0], E, R).contiguous()
        ones, rank = self._lmf_const(E, R, torch.float32, y2.device)
        out = ops.multi_lora_expand(y2, h, B4[:E, 0], ones, rank, idx)
        y2.copy_(out)

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
        """Embedding LoRA: x holds each token's A row already (vLLM gathers it, from slot 0 for
        tokens without an adapter); y += B[e] @ x for tokens with a slot, nothing for -1."""
        if not add_inputs:
            y.zero_()
        if not self._lmf_any_lora and self._lmf_host_shortcuts(x):
            return y
        if self._lmf_dead(x, lora_b_stacked):
            return y
        if self._lmf_routed_scoring():
            return y  # routed.py's scoring pass: no deltas
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        B4 = lora_b_stacked if lora_b_stacked.dim() == 4 else lora_b_stacked.unsqueeze(1)
        self._lmf_expand_rows(y2, x2, B4, self._lmf_token_idx(x2.shape[0]))
        return y

    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs):
        """Fully sharded layers: y[i] += scale * A_i[e] @ x per token (0 for -1)."""
        x2 = x.view(-1, x.shape[-1])
        T = x2.shape[0]
        idx = self._token_lora_indices[:T]
        rows = torch.arange(T, device=x2.device)
        keep = (idx >= 0).unsqueeze(1)
        for i, A4 in enumerate(lora_a_stacked):
            E0, _, R, K = A4.shape
            E = self._lmf_n_slots(E0, x2)
            h = torch.mm(x2, A4[:E, 0].to(x2.dtype).reshape(E * R, K).t()).view(T, E, R)
            sel = h[rows, idx.clamp(0, E - 1)]  # [T, R]
            y[i].view(T, -1)[:, :R] += torch.where(keep, sel * scale, 0).to(y[i].dtype)
        return y

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True,
                   **kwargs):
        """Fully sharded layers: y[:, slice i] += B_i[e] @ x[i] per token (nothing for -1)."""
        y2 = y.view(-1, y.shape[-1])
        if not add_inputs:
            y2.zero_()
        idx = self._lmf_token_idx(y2.shape[0])
        off = offset_start
        for i, (B4, n) in enumerate(zip(lora_b_stacked, output_slices)):
            self._lmf_expand_rows(y2[:, off:off + n], x[i].view(y2.shape[0], -1), B4, idx)
            off += n
        return y


class PunicaWrapperLoramixCPU(LoramixPunicaMixin, PunicaWrapperCPU):
    """vLLM's CPU wrapper with its LoRA deltas on loramix_fast's ops (C++ kernels)."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs):
        PunicaWrapperCPU.__init__(self, max_num_batched_tokens, max_batches, device, **kwargs)
        self._lmf_init()

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        # vLLM's base metadata (slot ids per token and per request), without the sgmv segment
        # metadata its torch ops need (that one reads lengths back with .item())
        self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)
        self._lmf_fill_tails()
        self.is_prefill = mapping.is_prefill
        self.no_lora = False
        self._lmf_update_host(mapping, lora_index_to_id)


def __getattr__(name):
    # the GPU twin is built on first access only: importing punica_gpu needs vLLM's CUDA build
    if name == "PunicaWrapperLoramixGPU":
        from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

        class PunicaWrapperLoramixGPU(LoramixPunicaMixin, PunicaWrapperGPU):
            """vLLM's GPU wrapper with its linear/logits/embedding deltas on loramix_fast's Triton
            ops (MoE LoRA stays vLLM's)."""

            def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs):
                PunicaWrapperGPU.__init__(self, max_num_batched_tokens, max_batches, device,
                                          **kwargs)
                self._lmf_init()

            def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size,
                                **kwargs):
                PunicaWrapperGPU.update_metadata(self, mapping, lora_index_to_id, max_loras,
                                                 vocab_size, **kwargs)
                self._lmf_fill_tails()
                self._lmf_update_host(mapping, lora_index_to_id)

        PunicaWrapperLoramixGPU.__module__ = __name__
        PunicaWrapperLoramixGPU.__qualname__ = "PunicaWrapperLoramixGPU"
        globals()[name] = PunicaWrapperLoramixGPU
        return PunicaWrapperLoramixGPU
    raise AttributeError(name)


def install() -> None:
    """Make ``current_platform.get_punica_wrapper()`` name the loramix_fast wrapper (idempotent)."""
    from vllm.platforms import current_platform

    cls = type(current_platform)
    if getattr(cls.get_punica_wrapper, "_loramix", False):
        return
    orig = cls.get_punica_wrapper

    def get_punica_wrapper(klass) -> str:
        name = orig()
        ours = QUALNAMES.get(name)
        if ours is None:
            log.warning("loramix_fast: no wrapper for platform wrapper %s; keeping it", name)
            return name
        return ours

    get_punica_wrapper._loramix = True
    cls.get_punica_wrapper = classmethod(get_punica_wrapper)
    log.info("loramix_fast: vLLM LoRA deltas run on loramix_fast ops (%s)", cls.__name__)
