"""adapter_similarity against the dense fp64 cosine, cluster_experts (planted groups; the optimum of
the spherical k-means objective by brute force), greedy_expert_subset against a direct recount."""
from __future__ import annotations

import itertools

import pytest
import torch

import loramix_fast as lmf

MODS = {"m0": (24, 16), "m1": (16, 24), "m2": (20, 20)}  # module -> (N, K)


def _lib(specs, seed=0):
    """specs: name -> {module: (rank, scale)}; random factors."""
    g = torch.Generator().manual_seed(seed)
    lib = lmf.AdapterLibrary()
    for n, mods in specs.items():
        lib.add(n, {m: lmf.LoRAFactors(torch.randn(r, MODS[m][1], generator=g),
                                       torch.randn(MODS[m][0], r, generator=g), s)
                    for m, (r, s) in mods.items()})
    return lib


def _dense_cos(lib, names):
    flat = []
    for n in names:
        f = lib.factors(n)
        parts = []
        for m, (N, K) in MODS.items():
            if m in f:
                parts.append((f[m].scale * f[m].B.double() @ f[m].A.double()).flatten())
            else:
                parts.append(torch.zeros(N * K, dtype=torch.float64))
        flat.append(torch.cat(parts))
    X = torch.stack(flat)
    X = X / X.norm(dim=1, keepdim=True)
    return X @ X.T


def test_similarity_equals_dense_fp64():
    lib = _lib({"a": {"m0": (4, 2.0), "m1": (3, 0.5)},
                "b": {"m0": (6, 1.0), "m2": (5, 1.5)},          # skips m1, adds m2
                "c": {"m1": (2, 3.0)},                           # one module only
                "d": {"m0": (4, 1.0), "m1": (3, 1.0), "m2": (1, 0.25)}})
    names = ["a", "b", "c", "d"]
    S = lmf.adapter_similarity(lib)
    ref = _dense_cos(lib, names)
    assert S.shape == (4, 4) and S.dtype == torch.float64
    assert float((S - ref).abs().max()) < 1e-6, float((S - ref).abs().max())
    # a subset in another order
    sub = lmf.adapter_similarity(lib, ["d", "a"])
    assert float((sub - ref[[3, 0]][:, [3, 0]]).abs().max()) < 1e-6
    # the scale matters only through the sign: a negated expert has cosine -1 with the original
    f = lib.factors("a")
    lib.add("neg_a", {m: lmf.LoRAFactors(x.A.clone(), x.B.clone(), -3 * x.scale)
                      for m, x in f.items()})
    S2 = lmf.adapter_similarity(lib, ["a", "neg_a"])
    assert abs(float(S2[0, 1]) + 1) < 1e-9


def _planted(n_groups=3, per=3, noise=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    lib = lmf.AdapterLibrary()
    truth = []
    for c in range(n_groups):
        base = {m: (torch.randn(4, K, generator=g), torch.randn(N, 4, generator=g))
                for m, (N, K) in MODS.items()}
        for i in range(per):
            name = f"g{c}_{i}"
            lib.add(name, {m: lmf.LoRAFactors(A + noise * torch.randn(A.shape, generator=g),
                                              B + noise * torch.randn(B.shape, generator=g), 1.0)
                           for m, (A, B) in base.items()})
            truth.append(c)
    return lib, truth


def test_cluster_recovers_planted_groups():
    lib, truth = _planted()
    groups = lmf.cluster_experts(lib, 3)
    got = sorted(sorted(g) for g in groups)
    want = sorted(sorted(f"g{c}_{i}" for i in range(3)) for c in range(3))
    assert got == want
    assert lmf.cluster_experts(lib, 3) == groups  # reproducible
    assert lmf.cluster_experts(lib, 1) == [list(n for n in lib.names)]


def test_cluster_is_optimal_by_brute_force():
    """Spherical k-means objective sum_i ||u_i - mean_c||^2 (u_i unit dW_i): the clusters found
    reach the minimum over every partition into 2 groups."""
    lib, _ = _planted(n_groups=2, per=3, noise=1.2, seed=3)  # noisy: not obvious
    names = [n for n in lib.names]
    S = lmf.adapter_similarity(lib)

    def cost(labels):
        tot = 0.0
        for c in set(labels):
            mem = [i for i, lab in enumerate(labels) if lab == c]
            sub = S[mem][:, mem]
            tot += len(mem) - float(sub.sum()) / len(mem)
        return tot

    best = min(cost(lab) for lab in itertools.product([0, 1], repeat=len(names))
               if len(set(lab)) == 2)
    groups = lmf.cluster_experts(lib, 2)
    labels = [next(i for i, g in enumerate(groups) if n in g) for n in names]
    assert abs(cost(labels) - best) < 1e-9, (cost(labels), best)


def test_greedy_subset():
    g = torch.Generator().manual_seed(0)
    L = torch.rand(7, 5, generator=g)
    chosen = lmf.greedy_expert_subset(L, 3)
    assert len(chosen) == 3 and len(set(chosen)) == 3
    assert chosen[0] == int(L.sum(0).argmin())  # k = 1 is exact
    for k in range(1, 4):  # each pick is the best marginal improvement (recounted)
        prev = chosen[:k - 1]

        def f(S):
            return float(L[:, S].amin(1).sum())

        cands = [e for e in range(5) if e not in prev]
        best = min(f(prev + [e]) for e in cands)
        assert abs(f(prev + [chosen[k - 1]]) - best) < 1e-12
    assert sorted(lmf.greedy_expert_subset(L, 5)) == list(range(5))
    # ties go to the lowest index; list input works
    assert lmf.greedy_expert_subset([[1.0, 1.0], [2.0, 2.0]], 1) == [0]
    # the oracle objective can prefer two specialists over one generalist
    L2 = torch.tensor([[0.0, 5.0, 1.0], [5.0, 0.0, 1.0]])
    assert lmf.greedy_expert_subset(L2, 1) == [2]
    assert lmf.greedy_expert_subset(L2, 2) == [2, 0]


def test_validation():
    lib = _lib({"a": {"m0": (2, 1.0)}})
    with pytest.raises(ValueError, match="unknown adapter"):
        lmf.adapter_similarity(lib, ["a", "zz"])
    with pytest.raises(ValueError, match="k must be"):
        lmf.cluster_experts(lib, 2)
    with pytest.raises(ValueError, match="k must be"):
        lmf.greedy_expert_subset(torch.rand(3, 2), 3)
    with pytest.raises(ValueError, match="finite"):
        lmf.greedy_expert_subset([[float("nan"), 1.0]], 1)
    with pytest.raises(ValueError, match="loss_matrix"):
        lmf.greedy_expert_subset(torch.rand(3), 1)
    with pytest.raises(TypeError, match="AdapterLibrary"):
        lmf.adapter_similarity({"a": 1})
