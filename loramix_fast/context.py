"""Per-forward adapter selection, kept in ``contextvars`` (never module globals), so two threads
can share one patched model.

``_SELECTION`` holds the sequence-level choice (adapter id per sequence) for a patched model; the
patched model's forward pre-hook turns it into the token-level map ``idx [M, 1]`` ONCE per forward
(``_TOKENS``), which every patched layer reads.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch

__all__ = ["Selection", "token_map"]


@dataclass(frozen=True)
class Selection:
    """Adapter per sequence for one patched model. seq_ids [b] int32 on the model's device."""

    state: object
    seq_ids: torch.Tensor


_SELECTION: contextvars.ContextVar[Selection | None] = contextvars.ContextVar(
    "loramix_selection", default=None)
# (state, idx [M, 1] int32) for the forward in flight
_TOKENS: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("loramix_tokens",
                                                                       default=None)
# per-forward routing caches (PromptCached etc.): dict owned by the call that set it
_ROUTE_CACHE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("loramix_route_cache",
                                                                          default=None)


def token_map(seq_ids: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Token-level adapter ids ``[batch * seqlen, 1]`` int32 from per-sequence ids ``[b]``.

    ``batch`` may be a multiple of ``b`` (beam search / num_return_sequences repeat each sequence
    consecutively, as HF's generate does)."""
    b = seq_ids.shape[0]
    if batch != b:
        if b == 0 or batch % b:
            raise ValueError(f"adapter selection has {b} sequences but the model got a batch of "
                             f"{batch}; pass one adapter name per sequence")
        seq_ids = seq_ids.repeat_interleave(batch // b)
    if seqlen != 1:
        seq_ids = seq_ids.repeat_interleave(seqlen)
    return seq_ids.view(-1, 1)
