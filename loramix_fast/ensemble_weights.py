"""Mixing weights of the ensemble methods, fed to ``lmf.ops.mix_logits`` as ``weights [B, E]``.

ELREA (Li et al., ICLR 2025, eqs. 9-10): cluster experts are weighted by the softmax of the
standardised cosine similarity between the input's gradient feature and each cluster centroid; the
base adapter (trained on all data) gets ``1 - max_c cos`` on top, so the weights need not sum to 1;
then ``mix_logits(..., mode="logits")``.
PELMo (eq. 3): a router's probabilities, only the top k kept and renormalised; then
``mix_logits(..., mode="probs")``.
Pure torch, no host synchronisation.
"""
from __future__ import annotations

import torch

__all__ = ["elrea_weights", "topk_renormalize"]


def elrea_weights(cos_sim: torch.Tensor, *, include_base: bool = True, eps: float = 1e-6
                  ) -> torch.Tensor:
    """ELREA's ensemble weights from cosine similarities to the C cluster centroids.

    Semantics:
        cos'[b, c] = (cos[b, c] - mean_c cos[b]) / (std_c cos[b] + eps)   (population std; eq. 9)
        w[b, c]    = softmax_c(cos'[b])                                     (cluster experts)
        w_base[b]  = 1 - max_c cos[b, c]                                     (base adapter; eq. 10)
    Shapes: cos_sim [C] or [B, C]. Returns [B, 1 + C] float32 (or [1 + C] for a 1-D input) with the
    base adapter in column 0, then the clusters in order; [B, C] / [C] with ``include_base=False``.
    With C = 1 (or equal similarities) the cluster weights are uniform.
    """
    if not isinstance(cos_sim, torch.Tensor):
        raise TypeError(f"cos_sim must be a torch.Tensor, got {type(cos_sim).__name__}")
    if cos_sim.dim() not in (1, 2) or cos_sim.shape[-1] == 0:
        raise ValueError(f"cos_sim must be [C] or [B, C] with C >= 1, got shape {tuple(cos_sim.shape)}")
    if not cos_sim.is_floating_point():
        raise TypeError(f"cos_sim must be a float tensor, got {cos_sim.dtype}")
    one_d = cos_sim.dim() == 1
    cos = (cos_sim[None] if one_d else cos_sim).to(torch.float32)
    mean = cos.mean(dim=1, keepdim=True)
    std = cos.std(dim=1, keepdim=True, unbiased=False)
    w = torch.softmax((cos - mean) / (std + eps), dim=1)
    if include_base:
        w = torch.cat([1.0 - cos.amax(dim=1, keepdim=True), w], dim=1)
    return w[0] if one_d else w


def topk_renormalize(probs: torch.Tensor, k: int) -> torch.Tensor:
    """PELMo's sparse routing (eq. 3): keep the k largest router probabilities, renormalise.

    Semantics: w[..., e] = p[..., e] / sum_{e' in top-k} p[..., e'] for e in the top k (ties: the
    lower expert index), else 0. A row whose kept mass is 0 stays 0 (no NaN).
    Shapes: probs [..., E]; 1 <= k (k >= E keeps every expert). Returns probs' shape and dtype.
    """
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"probs must be a torch.Tensor, got {type(probs).__name__}")
    if probs.dim() == 0 or not probs.is_floating_point():
        raise ValueError(f"probs must be a float tensor [..., E], got shape {tuple(probs.shape)} "
                         f"dtype {probs.dtype}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    E = probs.shape[-1]
    if k >= E:
        kept = probs
    else:
        order = torch.sort(probs, dim=-1, descending=True, stable=True).indices[..., :k]
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, True)
        kept = torch.where(mask, probs, torch.zeros_like(probs))
    total = kept.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, kept / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.zeros_like(kept))
