"""Triton kernels for ``mix_logits`` (DESIGN.md operation 3).

Math (B = sequences, E = experts, V = vocabulary; z = logits [B, E, V], w = weights [B, E]):
    mode "logits": out[b, v] = sum_{e: w != 0} w[b,e] z[b,e,v]
    mode "probs":  out[b, v] = M + log sum_e exp(a[e,v] - M),  a[e,v] = (z[b,e,v] - m[b,e]) + k[b,e],
                   m = max_v z[b,e],  k = log w - log sum_v exp(z - m)  (-inf: w <= 0 or all -inf),
                   M = max_e a[e,v]                        (log domain: unlikely tokens stay finite)

Split-V design, so that a few sequences still fill the GPU: the grid is (B, NCHUNK) vocabulary chunks.
    1. ``_mix_logits_stats_kernel`` ("probs" only): per expert, the chunk's online max and sum of exp
       -> partials [B, E, NCHUNK] (reads E*V logits once).
    2. ``_mix_logits_fwd_kernel``: combines the partials into k[b, :] (a [E, NCHUNK] tile, tiny),
       then walks the chunk: per token block, max over experts, then one exp per expert and one log
       (the second read of the block hits L1/L2). TASK 0 stores the scores; TASK 1 keeps a running
       argmax and stores one (value, index) per chunk, reduced in torch (ties -> lowest id).
Experts with weight 0 are masked out of the loads, so their logits are never read.
Non-finite logits follow ``reference.mix_logits``: "logits" is IEEE arithmetic; in "probs" +inf is
read as FLT_MAX and an expert whose max is FLT_MAX (it holds +inf) gives -inf to every other token
(all its mass on its +inf tokens, split equally), -inf is probability 0, and a NaN in a used expert
(flagged as a NaN partial sum by kernel 1) makes the row NaN. Greedy: a chunk holding NaN reports
its first NaN token with value NaN, and NaN wins the reduction (torch.argmax).
Sampling on GPUs runs the ops layer's ``sample_from_scores`` (torch, passed in) on the kernel's scores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
NAN = tl.constexpr(float("nan"))
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # +inf logits are read as this ("probs")
_INT_MAX = 2**31 - 1
INT_MAX = tl.constexpr(_INT_MAX)


@triton.jit
def _mix_logits_stats_kernel(
    z_ptr, w_ptr, pm_ptr, ps_ptr,
    E, V, CHUNK, NCHUNK,
    stride_zb, stride_ze,
    BLOCK: tl.constexpr,
):
    # grid (B, NCHUNK): pm/ps[b, e, c] = max / sum exp(z - max) of expert e over chunk c
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    for e in range(E):
        w = tl.load(w_ptr + b * E + e).to(tl.float32)
        lim = tl.where(w > 0, V, 0)  # a scalar bound: masked-out experts are never read
        base = z_ptr + b * stride_zb + e * stride_ze
        m_vec = tl.full([BLOCK], NEG_INF, tl.float32)
        s_vec = tl.zeros([BLOCK], tl.float32)
        n_vec = tl.zeros([BLOCK], tl.int32)  # NaN logits seen per lane
        for v0 in range(c * CHUNK, (c + 1) * CHUNK, BLOCK):
            idx = v0 + offs
            x = tl.load(base + idx, mask=idx < lim, other=NEG_INF).to(tl.float32)
            n_vec += (x != x).to(tl.int32)
            x = tl.where(x != x, NEG_INF, tl.where(x == POS_INF, FLT_MAX, x))
            m_new = tl.maximum(m_vec, x)
            m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
            s_vec = s_vec * tl.exp(m_vec - m_safe) + tl.exp(x - m_safe)
            m_vec = m_new
        m = tl.max(m_vec, axis=0)
        m_safe = tl.where(m == NEG_INF, 0.0, m)
        s = tl.sum(s_vec * tl.exp(m_vec - m_safe), axis=0)
        s = tl.where(tl.sum(n_vec, axis=0) > 0, NAN, s)  # flags the expert as NaN
        tl.store(pm_ptr + (b * E + e) * NCHUNK + c, m)
        tl.store(ps_ptr + (b * E + e) * NCHUNK + c, s)


@triton.jit
def _mix_logits_fwd_kernel(
    z_ptr, w_ptr, pm_ptr, ps_ptr, out_ptr, gv_ptr, gi_ptr,
    E, V, CHUNK, NCHUNK,
    stride_zb, stride_ze,
    BLOCK: tl.constexpr, E_P2: tl.constexpr, NC_P2: tl.constexpr,
    PROBS: tl.constexpr, TASK: tl.constexpr,
):
    # grid (B, NCHUNK). TASK 0: out[b, chunk] = scores; TASK 1: (max, argmax) of the chunk -> gv, gi
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    e_ar = tl.arange(0, E_P2)
    if PROBS:
        # k[e] = log w - lse from the chunk partials of kernel 1
        c_ar = tl.arange(0, NC_P2)
        pmask = (e_ar[:, None] < E) & (c_ar[None, :] < NCHUNK)
        poff = (b * E + e_ar[:, None]) * NCHUNK + c_ar[None, :]
        pm = tl.load(pm_ptr + poff, mask=pmask, other=NEG_INF)
        ps = tl.load(ps_ptr + poff, mask=pmask, other=0.0)
        M = tl.max(pm, axis=1)
        M_safe = tl.where(M == NEG_INF, 0.0, M)
        S = tl.sum(ps * tl.exp(pm - M_safe[:, None]), axis=1)
        wv = tl.load(w_ptr + b * E + e_ar, mask=e_ar < E, other=0.0).to(tl.float32)
        # a used expert holding NaN (a NaN partial sum): the whole row is NaN
        row_nan = tl.sum(((wv > 0) & (tl.sum((ps != ps).to(tl.int32), axis=1) > 0)).to(tl.int32),
                         axis=0) > 0
        alive = (wv > 0) & (M > NEG_INF) & (S > 0)
        # a = (z - M) + (log w - log S): z - M is exact near the max, so huge logits stay accurate
        kv = tl.where(alive, tl.log(tl.where(alive, wv, 1.0)) - tl.log(tl.where(alive, S, 1.0)), NEG_INF)
    best_v = tl.full([BLOCK], NEG_INF, tl.float32)
    best_i = tl.full([BLOCK], INT_MAX, tl.int32)
    nan_i = tl.full([BLOCK], INT_MAX, tl.int32)  # first NaN token per lane
    for v0 in range(c * CHUNK, (c + 1) * CHUNK, BLOCK):
        idx = v0 + offs
        inb = idx < V
        if PROBS:
            mx = tl.full([BLOCK], NEG_INF, tl.float32)
            for e in range(E):
                k = tl.sum(tl.where(e_ar == e, kv, 0.0), axis=0)
                me = tl.sum(tl.where(e_ar == e, M_safe, 0.0), axis=0)
                lim = tl.where(k > NEG_INF, V, 0)
                x = tl.load(z_ptr + b * stride_zb + e * stride_ze + idx, mask=idx < lim,
                            other=NEG_INF).to(tl.float32)
                x = tl.where(x == POS_INF, FLT_MAX, x)
                a = (x - me) + k
                a = tl.where(x != FLT_MAX, tl.where(me == FLT_MAX, NEG_INF, a), a)  # top expert
                mx = tl.maximum(mx, a)
            mx_safe = tl.where(mx == NEG_INF, 0.0, mx)
            acc = tl.zeros([BLOCK], tl.float32)
            for e in range(E):
                k = tl.sum(tl.where(e_ar == e, kv, 0.0), axis=0)
                me = tl.sum(tl.where(e_ar == e, M_safe, 0.0), axis=0)
                lim = tl.where(k > NEG_INF, V, 0)
                x = tl.load(z_ptr + b * stride_zb + e * stride_ze + idx, mask=idx < lim,
                            other=NEG_INF).to(tl.float32)
                x = tl.where(x == POS_INF, FLT_MAX, x)
                a = (x - me) + k
                a = tl.where(x != FLT_MAX, tl.where(me == FLT_MAX, NEG_INF, a), a)  # top expert
                acc += tl.exp(a - mx_safe)
            val = tl.where(mx == NEG_INF, NEG_INF, mx_safe + tl.log(tl.where(acc > 0, acc, 1.0)))
            val = tl.where(row_nan, NAN, val)
        else:
            val = tl.zeros([BLOCK], tl.float32)
            for e in range(E):
                w = tl.load(w_ptr + b * E + e).to(tl.float32)
                lim = tl.where(w != 0, V, 0)
                x = tl.load(z_ptr + b * stride_zb + e * stride_ze + idx, mask=idx < lim,
                            other=0.0).to(tl.float32)
                val += tl.where(w != 0, w * x, 0.0)
        if TASK == 0:
            tl.store(out_ptr + b * V + idx, val.to(out_ptr.dtype.element_ty), mask=inb)
        else:
            val = tl.where(inb, val, NEG_INF)
            upd = val > best_v  # token ids grow along the loop: strict > keeps the first
            best_v = tl.where(upd, val, best_v)
            best_i = tl.where(upd, idx, best_i)
            nan_i = tl.minimum(nan_i, tl.where(val != val, idx, INT_MAX))
    if TASK == 1:
        m = tl.max(best_v, axis=0)
        i = tl.min(tl.where(best_v == m, best_i, INT_MAX), axis=0)
        ni = tl.min(nan_i, axis=0)
        has_nan = ni < INT_MAX
        tl.store(gv_ptr + b * NCHUNK + c, tl.where(has_nan, NAN, m))
        tl.store(gi_ptr + b * NCHUNK + c, tl.where(has_nan, ni, i))


# --- launchers ---------------------------------------------------------------------------------------

def _plan(B: int, V: int, block: int | None, chunk: int | None, device) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, NCHUNK): enough programs to fill the GPU (about 4 per SM)."""
    BLOCK = block or min(1024, triton.next_power_of_2(max(V, 16)))
    if chunk is None:
        sms = 132
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = max(1, triton.cdiv(4 * sms, max(B, 1)))
        nchunk = max(1, min(want, triton.cdiv(V, BLOCK), 256))
        chunk = triton.cdiv(triton.cdiv(V, nchunk), BLOCK) * BLOCK
    else:
        chunk = triton.cdiv(chunk, BLOCK) * BLOCK
    return BLOCK, chunk, triton.cdiv(V, chunk)


def _launch(logits, weights, mode, task, block=None, chunk=None, num_warps=4):
    if mode not in ("logits", "probs"):
        raise ValueError(f"mode must be 'logits' or 'probs', got {mode!r}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, E, V], got shape {tuple(logits.shape)}")
    B, E, V = logits.shape
    if tuple(weights.shape) != (B, E):
        raise ValueError(f"weights has shape {tuple(weights.shape)}, expected [B, E] = [{B}, {E}]")
    if logits.stride(2) != 1:
        logits = logits.contiguous()
    w = weights.to(torch.float32).contiguous()
    dev = logits.device
    probs = mode == "probs"
    BLOCK, CHUNK, NCHUNK = _plan(B, V, block, chunk, dev)
    out = torch.empty((B, V), device=dev, dtype=torch.float32) if task == 0 else None
    gv = gi = None
    if task == 1:
        gv = torch.empty((B, NCHUNK), device=dev, dtype=torch.float32)
        gi = torch.empty((B, NCHUNK), device=dev, dtype=torch.int32)
    if B == 0 or V == 0:
        return out, gv, gi
    if probs and E > 0:
        pm = torch.empty((B, E, NCHUNK), device=dev, dtype=torch.float32)
        ps = torch.empty((B, E, NCHUNK), device=dev, dtype=torch.float32)
        _mix_logits_stats_kernel[(B, NCHUNK)](
            logits, w, pm, ps, E, V, CHUNK, NCHUNK, logits.stride(0), logits.stride(1),
            BLOCK=BLOCK, num_warps=num_warps)
    else:
        pm = ps = w  # unused
    dummy = w
    _mix_logits_fwd_kernel[(B, NCHUNK)](
        logits, w, pm, ps, out if out is not None else dummy,
        gv if gv is not None else dummy, gi if gi is not None else dummy,
        E, V, CHUNK, NCHUNK, logits.stride(0), logits.stride(1),
        BLOCK=BLOCK, E_P2=triton.next_power_of_2(max(E, 1)), NC_P2=triton.next_power_of_2(NCHUNK),
        PROBS=probs, TASK=task, num_warps=num_warps)
    return out, gv, gi


def mix_logits_triton(logits: torch.Tensor, weights: torch.Tensor, mode: str = "probs", *,
                      block: int | None = None, chunk: int | None = None) -> torch.Tensor:
    """Scores [B, V] float32. logits [B, E, V] (token stride 1), weights [B, E]."""
    out, _, _ = _launch(logits, weights, mode, 0, block, chunk)
    return out


def mix_logits_greedy_triton(logits: torch.Tensor, weights: torch.Tensor, mode: str = "probs", *,
                             block: int | None = None, chunk: int | None = None) -> torch.Tensor:
    """argmax of the scores [B] int64 (ties -> lowest id) without writing the [B, V] scores."""
    if logits.shape[2] == 0:
        raise ValueError("logits has an empty vocabulary (V = 0): no token to pick")
    _, gv, gi = _launch(logits, weights, mode, 1, block, chunk)
    if gv.shape[0] == 0:
        return torch.zeros((0,), dtype=torch.int64, device=logits.device)
    big = _INT_MAX
    nan = torch.isnan(gv)  # a chunk holding NaN: its first NaN token, and NaN wins (torch.argmax)
    m = torch.where(nan, torch.full_like(gv, float("-inf")), gv).amax(dim=1, keepdim=True)
    tok = torch.where(gv == m, gi, torch.full_like(gi, big)).amin(dim=1)
    tok_nan = torch.where(nan, gi, torch.full_like(gi, big)).amin(dim=1)
    tok = torch.where(nan.any(dim=1), tok_nan, tok)
    return torch.where(tok == big, torch.zeros_like(tok), tok).to(torch.int64)


def mix_logits_sample_triton(logits: torch.Tensor, weights: torch.Tensor, mode: str,
                             uniforms: torch.Tensor, temperature: float, *, sampler,
                             block: int | None = None, chunk: int | None = None) -> torch.Tensor:
    """A sample [B] int64 from softmax(scores / temperature) with the given uniforms [B]: the
    kernel's scores, then ``sampler(scores, uniforms, temperature)`` (the ops layer passes its
    torch ``sample_from_scores``: a kernel file knows nothing above it)."""
    return sampler(mix_logits_triton(logits, weights, mode, block=block, chunk=chunk), uniforms,
                   temperature)
