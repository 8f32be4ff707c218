"""Pure-torch references: the executable spec of every loramix_fast op.

Each function states its semantics and shapes; kernels and tests are checked against these.
All accept ``upcast=True`` to compute in float64 (the test oracle). None of them synchronise with
the host except where noted (``multi_lora_linear_loop`` is the benchmark's "best Python loop").

Legend: M = rows (tokens), K = in features, N = out features, E = adapters, R = max rank,
S = slots per row, T = experts scored by a router, B = sequences, V = vocabulary.
"""
from __future__ import annotations


import torch

__all__ = [
    "multi_lora_linear",
    "multi_lora_linear_loop",
    "multi_lora_expand",
    "spectr_topk",
    "mix_logits",
]


def _acc_dtype(x: torch.Tensor, upcast: bool) -> torch.dtype:
    """fp64 with ``upcast`` or for fp64 inputs (an fp64 model stays fp64-exact), fp32 otherwise."""
    return torch.float64 if upcast or x.dtype == torch.float64 else torch.float32


def _slot(idx, s, E, R, scale, rank, w, acc):
    """Slot ``s`` of every row: clamped ids ec [M] (0 where there is no adapter), the validity
    mask [M] bool, the coefficient w*scale [M] (0 where invalid) and the rank mask [M, R] bool
    (False everywhere for an invalid slot).

    Everything gathered through ``ec`` must be *masked* with ``torch.where``, never multiplied by
    a zero mask: adapter 0 (what an invalid slot gathers) or the padding past an adapter's rank may
    hold NaN / inf, and NaN * 0 = NaN would leak into rows that use no adapter. ``where`` also
    keeps those entries out of the backward (their gradient is exactly 0, not 0 * NaN)."""
    e = idx[:, s].long()
    valid = (e >= 0) & (e < E)
    ec = torch.where(valid, e, torch.zeros_like(e))
    zero = torch.zeros((), dtype=acc, device=idx.device)
    coef = scale.to(acc)[ec]
    if w is not None:
        coef = coef * w[:, s].to(acc)
    coef = torch.where(valid, coef, zero)
    r_ar = torch.arange(R, device=idx.device)
    rmask = (r_ar[None, :] < rank.to(idx.device)[ec][:, None]) & valid[:, None]
    return ec, valid, coef, rmask


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    rank: torch.Tensor,
    idx: torch.Tensor,
    w: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    upcast: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Base linear plus gathered per-row LoRA deltas.

    Semantics:
        y[m] = x[m] @ weight.T + bias
               + sum_s w[m, s] * scale[e] * B[e, :, :rank[e]] @ (A[e, :rank[e]] @ x[m]),
        e = idx[m, s]; slots with e < 0 contribute nothing.
    Shapes: x [M, K], weight [N, K], A [E, R, K], B [E, N, R], scale [E], rank [E] int,
        idx [M, S] int, w [M, S] or None (= 1), bias [N] or None. Returns y [M, N] in x.dtype
        (float64 with ``upcast``; or ``out_dtype``); accumulation in fp32 (fp64 with ``upcast`` or
        when x is fp64).
    Rows of A beyond rank[e] and columns of B beyond rank[e] are ignored (zero padding is not
    assumed; NaN there never reaches y), and a slot with no adapter reads nothing: a NaN or inf
    adapter changes only the rows that select it. Ids outside [0, E) count as "no adapter" here
    (``ops`` raises for them on CPU). Gathers per row, in chunks, with no host synchronisation.
    """
    acc = _acc_dtype(x, upcast)
    out_dtype = out_dtype or (acc if upcast else x.dtype)
    M, K = x.shape
    N = weight.shape[0]
    E, R = A.shape[0], A.shape[1]
    xa = x.to(acc)
    y = xa @ weight.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    if M == 0 or E == 0 or idx.shape[1] == 0:
        return y.to(out_dtype)
    chunk = max(1, (1 << 22) // max(1, N * R))  # bound the [chunk, N, R] gather
    zero = torch.zeros((), dtype=acc, device=x.device)
    for s in range(idx.shape[1]):
        ec, valid, coef, rmask = _slot(idx, s, E, R, scale, rank, w, acc)  # [M], [M], [M], [M, R]
        for m0 in range(0, M, chunk):
            sl = slice(m0, m0 + chunk)
            rm = rmask[sl]
            Ae = torch.where(rm[:, :, None], A[ec[sl]].to(acc), zero)  # [m, R, K]
            h = torch.bmm(Ae, xa[sl, :, None])[..., 0]  # [m, R]
            Be = torch.where(rm[:, None, :], B[ec[sl]].to(acc), zero)  # [m, N, R]
            d = torch.bmm(Be, (h * coef[sl, None])[..., None])[..., 0]  # [m, N]
            y[sl] = y[sl] + torch.where(valid[sl, None], d, zero)  # (inf in x: 0 * inf)
    return y.to(out_dtype)


def multi_lora_linear_loop(
    x, weight, A, B, scale, rank, idx, w=None, bias=None
) -> torch.Tensor:
    """Same semantics as :func:`multi_lora_linear`, as the fastest plain-torch formulation we know
    (a Python loop over the adapters present, like peft's mixed batch): one base GEMM, then per
    adapter a row gather, two small GEMMs and an ``index_add_``. Synchronises with the host (it
    reads which adapters are present); used as the benchmark baseline, never on the hot path."""
    y = torch.nn.functional.linear(x, weight, bias)
    if x.shape[0] == 0:
        return y
    S = idx.shape[1]
    flat = idx.reshape(-1).long()
    rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(S)
    wf = w.reshape(-1) if w is not None else None
    ranks = rank.tolist()
    scales = scale.tolist()
    for e in torch.unique(flat).tolist():
        if e < 0:
            continue
        sel = (flat == e).nonzero().squeeze(1)
        r = ranks[e]
        if r == 0:
            continue
        rr = rows[sel]
        h = x[rr] @ A[e, :r].T
        c = scales[e] if wf is None else wf[sel, None].to(h.dtype) * scales[e]
        y.index_add_(0, rr, (h * c) @ B[e, :, :r].T)
    return y


def multi_lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    rank: torch.Tensor,
    idx: torch.Tensor,
    w: torch.Tensor | None = None,
    *,
    upcast: bool = False,
) -> torch.Tensor:
    """Expand precomputed shrink outputs into y (SpectR's second half).

    Semantics:
        out[m] = y[m] + sum_s w[m, s] * scale[e] * B[e, :, :rank[e]] @ h[m, e, :rank[e]],
        e = idx[m, s] (e < 0: nothing).
    Shapes: y [M, N], h [M, E, R] (h of every adapter for every row, e.g. from one GEMM over the
        concatenated A's), B [E, N, R], scale [E], rank [E], idx [M, S], w [M, S] or None.
    Returns a new tensor [M, N] in y.dtype (float64 with ``upcast``); math in fp32 (fp64 with
    ``upcast`` or when y is fp64). As in :func:`multi_lora_linear`, entries of h and B past
    rank[e] and every adapter of a slot with no adapter are masked, never multiplied by 0.
    """
    acc = _acc_dtype(y, upcast)
    M, N = y.shape
    E, R = B.shape[0], B.shape[2]
    out = y.to(acc).clone()
    rows = torch.arange(M, device=y.device)
    zero = torch.zeros((), dtype=acc, device=y.device)
    for s in range(idx.shape[1]):
        ec, valid, coef, rmask = _slot(idx, s, E, R, scale, rank, w, acc)
        he = torch.where(rmask, h[rows, ec].to(acc), zero) * coef[:, None]  # [M, R]
        Be = torch.where(rmask[:, None, :], B[ec].to(acc), zero)  # [M, N, R]
        d = torch.bmm(Be, he[..., None])[..., 0]
        out = out + torch.where(valid[:, None], d, zero)
    return out if upcast else out.to(y.dtype)


def spectr_topk(
    h: torch.Tensor,
    k: int,
    *,
    rank: torch.Tensor | None = None,
    score: str = "norm",
    score_scale: torch.Tensor | None = None,
    weighting: str = "uniform",
    temperature: float = 1.0,
    upcast: bool = False,
):
    """Score experts per row and keep the top k, with mixing weights.

    Semantics (SpectR eqs. 7-9; Arrow):
        score="norm":  s[m, t] = || h[m, t, :rank[t]] ||_2          (SpectR, h = A*_t x)
        score="first": s[m, t] = |h[m, t, 0]| * score_scale[t]       (Arrow: |v_t . x| = |h_t0| / sigma_t1)
        experts with rank[t] == 0 (module not targeted) are never selected unless fewer than k
        experts remain, in which case the leftover slots get idx -1 and weight 0.
        idx[m] = the k highest scores, descending, ties to the lowest expert index;
        weighting="uniform": w = 1/k on each valid slot (eq. 9; when fewer than k experts target
        the module, the missing ones are zero experts and the weights sum to k'/k);
        "softmax": softmax(s / temperature) over the selected valid slots.
    Shapes: h [M, T, R]; rank [T] int or None (all R); score_scale [T] or None.
    Returns (idx [M, k] int32, w [M, k] float32, scores [M, T] float32).
    """
    if score not in ("norm", "first"):
        raise ValueError(f"score must be 'norm' or 'first', got {score!r}")
    if weighting not in ("uniform", "softmax"):
        raise ValueError(f"weighting must be 'uniform' or 'softmax', got {weighting!r}")
    acc = torch.float64 if upcast else torch.float32
    M, T, R = h.shape
    hh = h.to(acc)
    if rank is None:
        rank = torch.full((T,), R, dtype=torch.int32, device=h.device)
    rank = rank.to(h.device)
    if score == "norm":
        rmask = torch.arange(R, device=h.device)[None, :] < rank[:, None]
        # masked, not multiplied by 0: NaN in h past an expert's rank must not reach its score
        s = torch.sqrt(torch.where(rmask[None], hh * hh, torch.zeros((), dtype=acc,
                                                                     device=h.device)).sum(-1))
    else:
        s = hh[:, :, 0].abs()
        if score_scale is not None:
            s = s * score_scale.to(acc)
    valid_t = rank > 0
    neg = torch.tensor(float("-inf"), dtype=acc, device=h.device)
    s_masked = torch.where(valid_t[None, :], s, neg)
    kk = min(k, T)
    order = torch.sort(s_masked, dim=1, descending=True, stable=True).indices[:, :kk]
    top_s = torch.gather(s_masked, 1, order)
    ok = torch.isfinite(top_s)
    if weighting == "uniform":
        wt = ok.to(acc) / k
    else:
        z = torch.where(ok, top_s / temperature, neg)
        wt = torch.softmax(z, dim=1)
        wt = torch.where(ok, wt, torch.zeros_like(wt))
        wt = torch.nan_to_num(wt, nan=0.0)
    idx = torch.where(ok, order, torch.full_like(order, -1)).to(torch.int32)
    if kk < k:
        pad = k - kk
        idx = torch.cat([idx, idx.new_full((M, pad), -1)], 1)
        wt = torch.cat([wt, wt.new_zeros((M, pad))], 1)
    return idx, wt.to(torch.float32 if not upcast else acc), s.to(torch.float32 if not upcast else acc)


def mix_logits(
    logits: torch.Tensor, weights: torch.Tensor, mode: str = "probs", *, upcast: bool = False
) -> torch.Tensor:
    """Weighted mixture of E experts' next-token scores.

    Semantics:
        mode="logits": z[b] = sum_{e: w[b,e] != 0} w[b, e] * logits[b, e]            (ELREA eq. 10)
        mode="probs":  z[b] = log sum_{e: w[b,e] > 0} w[b, e] * softmax(logits[b, e])  (PELMo eq. 4)
    Experts with weight 0 are skipped entirely (their logits may be anything, -inf or NaN included).
    In "probs" mode negative weights are ignored like zeros, and a row with no positive weight gives
    -inf everywhere. NaN is never produced from finite input.

    Non-finite logits of an expert that is used (fp16 overflow, masking), on every backend:
        mode="logits": plain IEEE arithmetic of the weighted sum: w * (+-inf) is an infinity (the
            sign of w decides which), +inf and -inf meeting in one token give NaN there, and a NaN
            logit makes its token NaN.
        mode="probs", per expert e with w[b, e] > 0:
            -inf is probability 0 (an expert whose logits are all -inf contributes nothing);
            +inf: the expert puts all its mass on its +inf token(s), split equally among several
                (the limit of its softmax as those logits grow together); its other tokens get 0.
                Exactly: +inf is read as the largest float32, 3.4028235e38, so a finite float32
                logit equal to that value ties with the +inf ones (no finite fp16 / bf16 value does);
            NaN anywhere in its logits makes its whole distribution NaN (as ``torch.softmax``
                does), so the row's scores are NaN everywhere.
        Scores in "probs" mode are never +inf. ``argmax`` of scores holding NaN picks the first NaN
        token (``torch.argmax``); see ``ops.mix_logits_greedy`` / ``sample_from_scores``.
    Shapes: logits [B, E, V], weights [B, E]. Returns [B, V] float32 (float64 with upcast).
    """
    if mode not in ("logits", "probs"):
        raise ValueError(f"mode must be 'logits' or 'probs', got {mode!r}")
    acc = torch.float64 if upcast else torch.float32
    z = logits.to(acc)
    wt = weights.to(acc)
    if mode == "logits":
        use = (wt != 0)[..., None]
        terms = torch.where(use, wt[..., None] * z, torch.zeros((), dtype=acc, device=z.device))
        return terms.sum(1)
    Bn, E, V = z.shape
    if V == 0 or E == 0:
        return z.new_full((Bn, V), float("-inf"))
    use = wt > 0  # [B, E]
    ninf = torch.full((), float("-inf"), dtype=acc, device=z.device)
    top = torch.finfo(torch.float32).max
    z = torch.where(z == float("inf"), top, z)  # +inf: the top float32
    m = z.amax(dim=-1, keepdim=True)  # [B, E, 1]; NaN if the expert holds a NaN
    dead = m == float("-inf")  # all -inf: the expert contributes nothing
    zc = z - torch.where(dead, torch.zeros_like(m), m)  # exact near the max (huge logits stay exact)
    # an expert holding +inf: probability 0 (log -inf, not about -3.4e38) below its max
    zc = torch.where((m == top) & (z != top), ninf, zc)
    logS = torch.log(torch.exp(zc).sum(dim=-1, keepdim=True))  # in [0, log V]; NaN propagates
    logw = torch.log(torch.where(use, wt, torch.ones_like(wt)))
    terms = zc - logS + logw[..., None]
    terms = torch.where(use[..., None] & ~dead, terms, ninf)
    return torch.logsumexp(terms, dim=1)
