"""Synthetic routing-accuracy study: SpectR vs Arrow as the adapters' rank grows.

Setup (DESIGN.md operation 2; SpectR's claim: Arrow's rank-1 prototypes lose accuracy as rank grows,
SpectR's full-subspace score does not):

- T experts on one module, in = out = d. Expert t has a random orthonormal input basis V_t [d, r]
  (distinct random subspaces), output basis U_t [d, r] and singular values S_t, so
  ``dW_t = U_t diag(S_t) V_t^T``. S_t follows a spectrum shared by all experts (sigma_1 = 1), e.g.
  ``inv``: S_i = 1/i, ``geom``: S_i = 0.85^(i-1), ``flat``: S_i = 1.
- Each expert is stored as ordinary LoRA factors with a random *non-orthogonal* factorisation:
  ``A = G diag(sqrt S) V^T``, ``B = U diag(sqrt S) G^-1 / scale`` with G a random well-conditioned
  r x r matrix (condition number up to e^2) and scale = 2, so ``scale B A = dW_t`` but neither
  factor is orthonormal and the alignment has real work to do.
- Tokens: pick an expert t uniformly, ``x = V_t c + n`` with c ~ N(0, I_r) (energy across the whole
  subspace, not only the top direction) and isotropic Gaussian noise n rescaled per token so that
  ``||n|| = noise * ||V_t c||`` (noise = 0.5 / 1.0: the token's projection on its expert's subspace
  carries 80% / 50% of its energy).
- Routing uses the library's own code: ``AdapterLibrary.add`` -> ``lib.stack("m", float32, cpu)`` ->
  ``align_stack`` -> ``H = x @ A_flat.T`` viewed [M, T, R] -> ``ops.spectr_topk``:
    SpectR   score="norm" on the paper alignment (||S V^T x|| = ||dW_t x||)
    Arrow    score="first", score_scale = 1/sigma_1 (|v_t1 . x|, the top right singular vector)
    official score="norm" on ``align_stack(variant="official")`` (||V^T x||, the official code)
- Accuracy: top-1 = the first choice is the token's expert; top-k (k = 4) = its expert is among the k.
  Mean over seeds (each seed redraws experts and tokens); the min over seeds is kept in the rows.

At r = 1 every expert is rank one with sigma_1 = 1, so SpectR's ||dW_t x|| = |v_t . x| = Arrow's
score: the two methods choose identically (checked per run: ``same_r1``).

    python bench/routing_study.py [--quick]
``run(quick) -> list[dict]`` and ``format_table(rows) -> str`` are the entry points.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from loramix_fast import ops
from loramix_fast.adapters import AdapterLibrary, LoRAFactors
from loramix_fast.routing import align_stack

METHODS = ("spectr", "arrow", "official")
SPECTRA = ("inv", "geom", "flat")


def spectrum(kind: str, r: int) -> torch.Tensor:
    i = torch.arange(1, r + 1, dtype=torch.float64)
    if kind == "inv":
        return 1.0 / i
    if kind == "geom":
        return 0.85 ** (i - 1)
    if kind == "flat":
        return torch.ones(r, dtype=torch.float64)
    raise ValueError(f"unknown spectrum {kind!r} (have {SPECTRA})")


def _orth(g, n, r):
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return q


def make_experts(d: int, T: int, r: int, spec: str, g: torch.Generator, scale: float = 2.0,
                 spread: float = 1.0):
    """Returns (AdapterLibrary with T adapters on module "m", V [T, d, r] true input bases).
    spread > 1: expert t's spectrum is multiplied by a log-uniform factor in [1/sqrt(spread),
    sqrt(spread)] (experts of unequal norm); drawn after the bases, so the bases and tokens of a
    seed do not depend on it."""
    lib = AdapterLibrary()
    Vs = []
    S0 = spectrum(spec, r)
    gs = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    for t in range(T):
        S = S0
        if spread != 1.0:
            u = torch.rand(1, generator=gs, dtype=torch.float64) - 0.5
            S = S0 * torch.exp(u * torch.log(torch.tensor(float(spread), dtype=torch.float64)))
        V, U = _orth(g, d, r), _orth(g, d, r)
        # random well-conditioned non-orthogonal G = Q1 diag(e^u) Q2, u ~ U(-1, 1)
        G = (_orth(g, r, r) * torch.exp(2 * torch.rand(r, generator=g, dtype=torch.float64) - 1))
        G = G @ _orth(g, r, r)
        A = G @ (S.sqrt()[:, None] * V.T)  # [r, d]
        B = (U * S.sqrt()[None, :]) @ torch.linalg.inv(G) / scale  # [d, r]
        lib.add(f"e{t}", {"m": LoRAFactors(A.float(), B.float(), scale)})
        Vs.append(V)
    return lib, torch.stack(Vs)


def make_tokens(V: torch.Tensor, M: int, noise: float, g: torch.Generator):
    """x = V_t c + n, ||n|| = noise * ||V_t c||. Returns x [M, d] float32, labels [M]."""
    T, d, r = V.shape
    lab = torch.randint(0, T, (M,), generator=g)
    c = torch.randn(M, r, generator=g, dtype=torch.float64)
    sig = torch.empty(M, d, dtype=torch.float64)
    for t in range(T):
        sel = lab == t
        sig[sel] = c[sel] @ V[t].T
    n = torch.randn(M, d, generator=g, dtype=torch.float64)
    n = n * (noise * sig.norm(dim=1, keepdim=True) / n.norm(dim=1, keepdim=True))
    return (sig + n).float(), lab


def route(lib, x, k):
    """{method: (idx [M, k] int32, scores [M, T])} using the library's alignment and op."""
    stack = lib.stack("m", torch.float32, "cpu")
    out = {}
    al = align_stack(stack, variant="paper")
    T, R = al.A_star.shape[:2]
    H = (x @ al.A_flat.T).view(-1, T, R)
    out["spectr"] = ops.spectr_topk(H, k, rank=al.rank, score="norm")[::2]
    out["arrow"] = ops.spectr_topk(H, k, rank=al.rank, score="first",
                                   score_scale=al.inv_sigma1)[::2]
    alo = align_stack(stack, variant="official")
    Ho = (x @ alo.A_flat.T).view(-1, T, R)
    out["official"] = ops.spectr_topk(Ho, k, rank=alo.rank, score="norm")[::2]
    return out


def study_point(*, d: int, T: int, r: int, spec: str, noise: float, seed: int, M: int, k: int = 4,
                spread: float = 1.0):
    """One (rank, spectrum, noise, seed) cell: accuracies per method and whether SpectR and Arrow
    chose identically (all k slots, all tokens)."""
    g = torch.Generator().manual_seed(seed)
    lib, V = make_experts(d, T, r, spec, g, spread=spread)
    x, lab = make_tokens(V, M, noise, g)
    res = {}
    routed = route(lib, x, k)
    for m, (idx, _) in routed.items():
        idx = idx.long()
        res[f"{m}_top1"] = (idx[:, 0] == lab).float().mean().item()
        res[f"{m}_topk"] = (idx == lab[:, None]).any(1).float().mean().item()
    res["same"] = bool(torch.equal(routed["spectr"][0], routed["arrow"][0]))
    return res


def run(quick: bool = False, *, d: int | None = None, T: int = 16, ranks=None, spectra=None,
        noises=None, seeds=None, M: int | None = None, k: int = 4, spread_runs=None) -> list[dict]:
    """Grid of (spectrum, noise, rank) with sigma_1 = 1 for all experts, then ``spread_runs``
    [(spectrum, noise, spread)] with experts of unequal norm (full run: inv, noise 1, spread 4:
    sigma_1 in [1/2, 2]). Seeds depend on the rank only, so every spectrum / noise / spread of a
    rank sees the same subspaces and token coefficients (a paired comparison)."""
    d = d or 512
    ranks = ranks or ((1, 2, 4, 8, 16, 32) if not quick else (1, 4, 8, 16))
    spectra = spectra or (SPECTRA if not quick else ("inv",))
    noises = noises or ((0.5, 1.0, 2.0, 4.0) if not quick else (1.0,))
    if spread_runs is None:
        spread_runs = [("inv", 1.0, 4.0)] if not quick else []
    seeds = seeds or (tuple(range(5)) if not quick else (0, 1))
    M = M or (8192 if not quick else 4096)
    rows = []
    grid = [(spec, noise, 1.0) for spec in spectra for noise in noises] + list(spread_runs)
    for spec, noise, spread in grid:
        for r in ranks:
            pts = [study_point(d=d, T=T, r=r, spec=spec, noise=noise, seed=1000 * r + s, M=M,
                               k=k, spread=spread) for s in seeds]
            row = dict(d=d, T=T, k=k, M=M, seeds=len(seeds), spectrum=spec, noise=noise,
                       spread=spread, rank=r,
                       same_r1=all(p["same"] for p in pts) if r == 1 else None)
            for key in pts[0]:
                if key == "same":
                    continue
                vals = [p[key] for p in pts]
                row[key] = statistics.fmean(vals)
                row[key + "_min"] = min(vals)
            rows.append(row)
    return rows


def format_table(rows) -> str:
    if not rows:
        return "(no rows)"
    r0 = rows[0]
    k = r0["k"]
    lines = [f"d = {r0['d']}, T = {r0['T']} experts, {r0['M']} tokens x {r0['seeds']} seeds, "
             f"k = {k}; accuracy in % (mean over seeds; min over seeds in brackets for top-1)"]
    head = (f"{'spectrum':>8} {'spread':>6} {'noise':>5} {'rank':>4} | "
            + " | ".join(f"{m + ' top1':>16} {m[:6] + ' top' + str(k):>11}" for m in METHODS))
    lines += [head, "-" * len(head)]
    for row in rows:
        cells = []
        for m in METHODS:
            cells.append(f"{100 * row[m + '_top1']:6.1f} ({100 * row[m + '_top1_min']:5.1f})   "
                         f"{100 * row[m + '_topk']:11.1f}")
        note = ""
        if row["rank"] == 1 and row["spread"] == 1.0:
            note = "  <- r=1: SpectR == Arrow " + ("(identical choices)" if row["same_r1"]
                                                   else "(CHOICES DIFFER)")
        lines.append(f"{row['spectrum']:>8} {row['spread']:>6} {row['noise']:>5} {row['rank']:>4} | "
                     + " | ".join(cells) + note)
    lines.append("spectra: inv S_i = 1/i, geom S_i = 0.85^(i-1), flat S_i = 1 (sigma_1 = 1 for all "
                 "experts unless spread > 1: sigma_1 log-uniform in [1/sqrt(spread), sqrt(spread)]);"
                 "\nnoise = ||n|| / ||V_t c|| per token (0.5 / 1 / 2 / 4: 80% / 50% / 20% / 6% of the "
                 "token's energy in its expert's subspace)")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--T", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: the study is small, threads only contend)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run(args.quick, d=args.d, T=args.T)
    print(format_table(rows))
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
