"""Per-forward adapter selection, kept in ``contextvars`` (never module globals), so two threads
can share one patched model.

``_SELECTION`` holds the sequence-level choice (adapter id per sequence, host ints) for a patched
model. Every patched layer turns it into the token-level map ``idx [M, 1]`` for its own input
(:meth:`Selection.token_map_for`): built once per (batch, tokens per sequence, device) and shared by
every layer with that shape, so an encoder-decoder's encoder and decoder each get theirs, and the
map is built on the device of the input, wherever the model has been moved since it was patched.
"""
from __future__ import annotations

import contextvars
import math

import torch

__all__ = ["Selection", "token_map"]

_MAX_MAPS = 16  # token maps kept per selection (generate without a cache: a new length per step)


class Selection:
    """Adapter per sequence for one patched model: ``ids`` host ints (-1: none).

    ``broadcast``: ``ids`` holds one adapter that serves every sequence of any batch (one name
    given as a string, or the default adapter of ``lmf.set_adapter``)."""

    __slots__ = ("state", "ids", "_maps", "broadcast")

    def __init__(self, state, ids, broadcast: bool = False):
        self.state = state
        self.ids = tuple(int(i) for i in ids)
        self._maps: dict = {}
        self.broadcast = bool(broadcast)
        if self.broadcast and len(self.ids) != 1:
            raise ValueError(f"a broadcast selection holds one adapter, got {len(self.ids)}")

    def token_map(self, batch: int, seqlen: int, device, expand: bool = False) -> torch.Tensor:
        """``idx [batch * seqlen, 1]`` int32 on ``device`` (cached per shape and device).

        ``expand``: the batch may be a multiple of the selection, each sequence repeated
        consecutively (HF ``generate`` with ``num_beams`` / ``num_return_sequences``)."""
        key = (batch, seqlen, device)
        idx = self._maps.get(key)
        if idx is not None:
            return idx
        idx = token_map(self.ids, batch, seqlen, device, expand or self.broadcast)
        if len(self._maps) >= _MAX_MAPS:
            self._maps.clear()
        self._maps[key] = idx
        return idx

    def token_map_for(self, x: torch.Tensor, expand: bool = False) -> torch.Tensor:
        """The token map of a patched layer's input ``x [batch, ..., in]`` (or ``[M, in]``: tokens
        flattened, matched to a map already built for this forward, else one token per sequence)."""
        if x.dim() >= 3:
            return self.token_map(x.shape[0], math.prod(x.shape[1:-1]), x.device, expand)
        rows = x.shape[0] if x.dim() == 2 else 1
        for (_, _, dev), idx in list(self._maps.items()):
            if idx.shape[0] == rows and dev == x.device:
                return idx
        return self.token_map(rows, 1, x.device, expand)


def token_map(ids, batch: int, seqlen: int, device=None, expand: bool = False) -> torch.Tensor:
    """Token-level adapter ids ``[batch * seqlen, 1]`` int32 on ``device`` from per-sequence ids.

    ``batch`` must equal ``len(ids)``, unless ``expand`` (inside ``generate``): then it may be a
    multiple, each sequence repeated consecutively (beam search / num_return_sequences, as HF's
    generate does)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    b = len(ids)
    rep = 1
    if batch != b:
        if not expand:
            note = (" (a shorter list is repeated only inside generate, over num_beams / "
                    "num_return_sequences)" if b < batch else "")
            raise ValueError(f"adapter_names has {b} names but the batch has {batch} sequences; "
                             f"pass one adapter name per sequence{note}")
        if b == 0 or batch % b:
            hint = (" (a transformers pipeline hands every batch the whole list: make it "
                    "adapter-aware with lmf.pipeline_adapters(pipe), and each prompt's name "
                    "follows it)" if b > batch else "")
            raise ValueError(f"adapter selection has {b} sequences but generate runs a batch of "
                             f"{batch}, not a multiple; pass one adapter name per input "
                             f"sequence{hint}")
        rep = batch // b
    t = torch.tensor(ids, dtype=torch.int32)
    if rep * seqlen != 1:
        t = t.repeat_interleave(rep * seqlen)
    return t.view(-1, 1).to(device) if device is not None else t.view(-1, 1)


_SELECTION: contextvars.ContextVar[Selection | None] = contextvars.ContextVar(
    "loramix_selection", default=None)
# patch states whose generate() is running: a selection may be repeated over their expanded batch
_GENERATING: contextvars.ContextVar[tuple] = contextvars.ContextVar("loramix_generating",
                                                                   default=())
# per-forward routing caches (PromptCached etc.): dict owned by the call that set it
_ROUTE_CACHE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("loramix_route_cache",
                                                                          default=None)
