"""Working with a library of experts: how alike two adapters are, clustering them, and picking a
small subset that covers a set of tasks (the trade-offs paper, section 5.1; MBC from Ostapenko et
al., "Towards Modular LLMs by Building and Reusing a Library of LoRAs").

    S = lmf.adapter_similarity(lib)                     # [T, T] cosine of the flattened dW
    groups = lmf.cluster_experts(lib, k=3)              # [["add", "sort"], ["upper"], ...]
    chosen = lmf.greedy_expert_subset(loss_matrix, k=2) # expert indices, greedy on the oracle loss

Legend: T = adapters, r_i = adapter i's rank on a module, n = tasks, E = candidate experts.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .adapters import AdapterLibrary

__all__ = ["adapter_gram", "adapter_similarity", "cluster_experts", "greedy_expert_subset"]


def _names(lib: AdapterLibrary, names) -> list[str]:
    if not isinstance(lib, AdapterLibrary):
        raise TypeError(f"lib must be an AdapterLibrary, got {type(lib).__name__}")
    if names is None:
        names = [n for n in lib.names if n is not None]
    else:
        if isinstance(names, str):
            raise ValueError(f"names must be a list of adapter names, got the string {names!r}")
        names = list(names)
        for n in names:
            if n not in lib:
                raise ValueError(f"unknown adapter {n!r}; the library has "
                                 f"{[m for m in lib.names if m is not None]}")
    if not names:
        raise ValueError("the library has no adapters")
    return names


def adapter_gram(lib: AdapterLibrary, names: Sequence[str] | None = None) -> torch.Tensor:
    """Frobenius inner products of the adapters' weight deltas, summed over every module.

    Semantics: G[i, j] = sum_modules <dW_i, dW_j>_F with dW = scale B A (0 on a module the
    adapter does not target), computed exactly from r x r products, never a dense dW:
        <s_i B_i A_i, s_j B_j A_j>_F = s_i s_j sum((B_i^T B_j) * (A_i A_j^T))
    Shapes: returns [T, T] float64 on the CPU, T = len(names) (default: every adapter, id order).
    """
    names = _names(lib, names)
    T = len(names)
    facs = [lib.factors(n) for n in names]
    G = torch.zeros(T, T, dtype=torch.float64)
    modules = sorted({m for f in facs for m in f})
    for m in modules:
        own = [(i, f[m]) for i, f in enumerate(facs) if m in f and f[m].rank > 0]
        As = [lf.A.detach().double().cpu() for _, lf in own]
        Bs = [lf.B.detach().double().cpu() * float(lf.scale) for _, lf in own]
        for p, (i, _) in enumerate(own):
            for q in range(p, len(own)):
                j = own[q][0]
                v = ((Bs[p].T @ Bs[q]) * (As[p] @ As[q].T)).sum()
                G[i, j] += v
                if i != j:
                    G[j, i] += v
    return G


def adapter_similarity(lib: AdapterLibrary, names: Sequence[str] | None = None) -> torch.Tensor:
    """Cosine similarity of the adapters' flattened weight deltas over all modules.

    Semantics: S[i, j] = G[i, j] / sqrt(G[i, i] G[j, j]) with G = :func:`adapter_gram` (the
    concatenation of dW_i over every module, a module the adapter does not target counting as
    zero). An adapter whose dW is zero everywhere has S = 0 in its row and column (its cosine is
    undefined). Shapes: returns [T, T] float64 on the CPU, T = len(names) (default: every adapter
    in id order); symmetric, diagonal 1.
    """
    G = adapter_gram(lib, names)
    d = G.diagonal().clamp(min=0).sqrt()
    live = d > 0
    S = G / torch.where(live, d, torch.ones_like(d))[:, None] / torch.where(
        live, d, torch.ones_like(d))[None, :]
    S = torch.where(live[:, None] & live[None, :], S, torch.zeros_like(S))
    S.diagonal().copy_(live.double())
    return S.clamp(-1.0, 1.0)


def _kernel_kmeans(K: torch.Tensor, k: int, n_init: int, seed: int, max_iter: int = 100):
    """Kernel k-means (Lloyd iterations in feature space) with k-means++ seeding; the best of
    ``n_init`` runs by inertia. K [T, T] positive semi-definite. Returns (labels [T], inertia)."""
    T = K.shape[0]
    g = torch.Generator().manual_seed(seed)
    diag = K.diagonal()
    best = None
    for _ in range(n_init):
        # k-means++ on the kernel distance d(i, j) = K_ii + K_jj - 2 K_ij
        centers = [int(torch.randint(T, (1,), generator=g))]
        for _c in range(1, k):
            d = torch.stack([diag + diag[c] - 2 * K[:, c] for c in centers]).amin(0).clamp(min=0)
            p = d / d.sum() if float(d.sum()) > 0 else torch.ones(T, dtype=K.dtype) / T
            centers.append(int(torch.multinomial(p, 1, generator=g)))
        dist = torch.stack([diag + diag[c] - 2 * K[:, c] for c in centers], 1)  # [T, k]
        labels = dist.argmin(1)
        for _it in range(max_iter):
            dist = torch.empty(T, k, dtype=K.dtype)
            for c in range(k):
                mem = labels == c
                n = int(mem.sum())
                if n == 0:  # an empty cluster: never chosen
                    dist[:, c] = float("inf")
                    continue
                dist[:, c] = (diag - 2 * K[:, mem].sum(1) / n + K[mem][:, mem].sum() / n ** 2)
            new = dist.argmin(1)
            if torch.equal(new, labels):
                break
            labels = new
        inertia = float(dist.gather(1, labels[:, None]).clamp(min=0).sum())
        # canonical labels: clusters numbered by their first member
        order = {}
        for lab in labels.tolist():
            order.setdefault(lab, len(order))
        labels = torch.tensor([order[lab] for lab in labels.tolist()])
        if best is None or inertia < best[1] - 1e-12:
            best = (labels, inertia)
    return best


def cluster_experts(lib: AdapterLibrary, k: int, names: Sequence[str] | None = None, *,
                    n_init: int = 10, seed: int = 0) -> list[list[str]]:
    """Model-based clustering (MBC): group the experts by the similarity of their LoRA weights.

    Semantics: spherical k-means of the unit-normalised flattened weight deltas
    ``dW_i / ||dW_i||`` (every module concatenated), run exactly as kernel k-means on
    :func:`adapter_similarity` (no dense dW is formed): k-means++ seeding, Lloyd iterations, the
    best of ``n_init`` runs (lowest within-cluster sum of squared distances), reproducible from
    ``seed``. MBC then trains one expert per cluster on the union of its tasks' data (not done
    here). Returns k lists of adapter names (each in ``names`` order; clusters ordered by their
    first member; fewer than k lists if k-means leaves a cluster empty).
    """
    names = _names(lib, names)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(names):
        raise ValueError(f"k must be an int in [1, {len(names)}] (the number of adapters), "
                         f"got {k!r}")
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    labels, _ = _kernel_kmeans(adapter_similarity(lib, names), k, n_init, seed)
    groups: dict = {}
    for n, lab in zip(names, labels.tolist()):
        groups.setdefault(lab, []).append(n)
    return [groups[c] for c in sorted(groups)]


def greedy_expert_subset(loss_matrix, k: int) -> list[int]:
    """Greedy choice of k experts for a set of tasks under oracle routing (each task served by
    its best chosen expert), the trade-offs paper's section 5.1 library pruning.

    Semantics: with L = loss_matrix [n tasks, E experts] (lower is better) and
    f(S) = sum_t min_{e in S} L[t, e], start from S = {} and k times add the expert that lowers
    f the most (ties: the lowest index); f({}) is +inf, so the first pick is argmin_e sum_t L[t, e].
    Returns the k chosen expert indices in the order they were picked.
    Shapes: loss_matrix [n, E] (tensor, array or nested list; finite), 1 <= k <= E.
    """
    L = torch.as_tensor(loss_matrix, dtype=torch.float64)
    if L.dim() != 2 or L.shape[0] == 0 or L.shape[1] == 0:
        raise ValueError(f"loss_matrix must be [n_tasks, n_experts] with both >= 1, got shape "
                         f"{tuple(L.shape)}")
    if not bool(torch.isfinite(L).all()):
        raise ValueError("loss_matrix must be finite")
    E = L.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"k must be an int in [1, {E}] (the number of experts), got {k!r}")
    chosen: list[int] = []
    cur = torch.full((L.shape[0],), float("inf"), dtype=torch.float64)
    for _ in range(k):
        f = torch.minimum(cur[:, None], L).sum(0)  # [E]: f(S + {e})
        if chosen:
            f[chosen] = float("inf")
        e = int(torch.argmin(f))  # first index on ties
        chosen.append(e)
        cur = torch.minimum(cur, L[:, e])
    return chosen
