"""SpectR / Arrow expert scoring with top-k and mixing weights (DESIGN.md operation 2), Triton.

Math (``loramix_fast.reference.spectr_topk`` is the spec):
    score="norm":  s[m, t] = || h[m, t, :rank[t]] ||_2          (SpectR, h = A*_t x)
    score="first": s[m, t] = |h[m, t, 0]| * score_scale[t]       (Arrow)
    idx[m] = top-k_t s[m, t] over experts with rank[t] > 0, descending, ties to the lowest t
             (selected on s^2 for "norm": no rounded square root decides a near-tie);
    slots without a finite-scored expert: idx -1, weight 0;
    w = 1/k on each valid slot ("uniform"; an expert that does not target the module is a zero expert) or softmax(s / temperature) over them ("softmax").
Legend: M = rows, T = experts, R = max rank, K = slots (k).

One program per BLOCK_M rows: it loads h for all T experts of its rows (T padded to BLOCK_T, R in
chunks of BLOCK_R), keeps the scores [BLOCK_M, BLOCK_T] in registers, then runs min(k, T) argmax
passes (ties to the lowest index: the min index among the maxima) and writes idx, w and the scores.
h may have any strides (typically a column slice of a wider GEMM output).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["spectr_topk_triton"]


@triton.jit
def _spectr_topk_kernel(
    h_ptr, rank_ptr, scale_ptr, idx_ptr, w_ptr, s_ptr,
    M, T, R, KK, K,
    stride_hm, stride_ht, stride_hr,
    inv_temp,
    HAS_RANK: tl.constexpr, HAS_SCALE: tl.constexpr, SCORE_FIRST: tl.constexpr,
    SOFTMAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] int64
    offs_t = tl.arange(0, BLOCK_T)  # [BT]
    m_mask = offs_m < M
    t_mask = offs_t < T
    if HAS_RANK:
        rk = tl.load(rank_ptr + offs_t, mask=t_mask, other=0).to(tl.int32)  # [BT]
    else:
        rk = tl.where(t_mask, R, 0).to(tl.int32)
    mt_mask = m_mask[:, None] & t_mask[None, :]  # [BM, BT]
    row_ptr = h_ptr + offs_m[:, None] * stride_hm + offs_t[None, :] * stride_ht  # [BM, BT]

    if SCORE_FIRST:
        h0 = tl.load(row_ptr, mask=mt_mask, other=0.0).to(tl.float32)
        s = tl.abs(h0)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + offs_t, mask=t_mask, other=0.0).to(tl.float32)
            s = s * sc[None, :]
    else:
        offs_r = tl.arange(0, BLOCK_R)
        ss = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_r  # [BR]
            r_ok = (rr < R)[None, None, :] & (rr[None, None, :] < rk[None, :, None])
            msk = mt_mask[:, :, None] & r_ok  # [BM, BT, BR]
            v = tl.load(row_ptr[:, :, None] + rr[None, None, :] * stride_hr, mask=msk,
                        other=0.0).to(tl.float32)
            ss += tl.sum(v * v, axis=2)
        s = tl.sqrt_rn(ss)  # correctly rounded (sqrt.approx.ftz flushes tiny norms to 0)
    tl.store(s_ptr + offs_m[:, None] * T + offs_t[None, :], s.to(s_ptr.dtype.element_ty), mask=mt_mask)

    # Selection key: the squared norm (the same order as the norm, without a rounding step that can
    # merge near-ties or flush tiny norms); invalid experts (rank 0, padding) are -inf; NaN ranks
    # first, like torch.sort, and its slot becomes -1 like any non-finite score.
    if SCORE_FIRST:
        key = s
    else:
        key = ss
    valid = (rk > 0)[None, :] & mt_mask
    key = tl.where(key != key, float("inf"), key)
    key = tl.where(valid, key, float("-inf"))
    offs_k = tl.arange(0, BLOCK_K)
    sel_v = tl.full((BLOCK_M, BLOCK_K), float("-inf"), dtype=tl.float32)
    sel_i = tl.full((BLOCK_M, BLOCK_K), -1, dtype=tl.int32)
    for j in range(KK):
        best = tl.max(key, axis=1)  # [BM]
        cand = tl.where(key == best[:, None], offs_t[None, :], BLOCK_T)
        bi = tl.min(cand, axis=1)  # [BM] lowest index among the maxima
        sel_v = tl.where(offs_k[None, :] == j, best[:, None], sel_v)
        sel_i = tl.where(offs_k[None, :] == j, bi[:, None], sel_i)
        key = tl.where(offs_t[None, :] == bi[:, None], float("-inf"), key)

    ok = (sel_v > float("-inf")) & (sel_v < float("inf"))  # finite; NaN cannot occur here
    if not SCORE_FIRST:
        sel_v = tl.sqrt_rn(tl.where(ok, sel_v, 0.0))  # the selected scores themselves
    if SOFTMAX:
        vmax = tl.max(tl.where(ok, sel_v, float("-inf")), axis=1)  # [BM]
        vmax = tl.where(vmax > float("-inf"), vmax, 0.0)
        e = tl.where(ok, tl.exp((sel_v - vmax[:, None]) * inv_temp), 0.0)
        den = tl.sum(e, axis=1)
        wt = e / tl.where(den > 0, den, 1.0)[:, None]
    else:
        wt = tl.where(ok, 1.0 / K, 0.0)  # 1/k per selected expert (eq. 9; non-targeting = 0)
    out_i = tl.where(ok, sel_i, -1)
    k_mask = m_mask[:, None] & (offs_k[None, :] < KK)
    out_off = offs_m[:, None] * K + offs_k[None, :]
    tl.store(idx_ptr + out_off, out_i.to(idx_ptr.dtype.element_ty), mask=k_mask)
    tl.store(w_ptr + out_off, wt.to(w_ptr.dtype.element_ty), mask=k_mask)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def spectr_topk_config(M: int, T: int, R: int, k: int, score: str) -> dict:
    """Block sizes for a launch (shared with the AOT tests). A program holds at most ~2K h elements
    (16 per thread at 4 warps) and the grid aims at >= 256 programs (H100: 132 SMs) before rows are
    batched, since the op is latency-bound at decode sizes."""
    BLOCK_T = _pow2(max(T, 1))
    BLOCK_R = 1 if score == "first" else min(_pow2(max(R, 1)), 16, max(1, 2048 // BLOCK_T))
    BLOCK_K = _pow2(max(min(k, T), 1))
    cap = max(1, 2048 // (BLOCK_T * BLOCK_R))
    want = max(1, M // 256)
    BLOCK_M = 1 << (min(16, cap, want).bit_length() - 1)  # power of 2, <= all three
    elems = BLOCK_M * BLOCK_T * BLOCK_R
    num_warps = 4 if elems >= 1024 else 2 if elems >= 256 else 1
    return dict(BLOCK_M=BLOCK_M, BLOCK_T=BLOCK_T, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, num_warps=num_warps)


def spectr_topk_triton(h: torch.Tensor, k: int, rank: torch.Tensor | None = None, score: str = "norm",
                       score_scale: torch.Tensor | None = None, weighting: str = "uniform",
                       temperature: float = 1.0):
    """Launcher. Shapes: h [M, T, R] (any strides), rank [T] int or None, score_scale [T] or None.
    Returns (idx [M, k] int32, w [M, k] float32, scores [M, T] float32). Arguments are validated by
    ``loramix_fast.ops.spectr.spectr_topk``; only what the kernel itself needs is checked here."""
    if h.dim() != 3:
        raise ValueError(f"h must be 3-D [M, T, R], got shape {tuple(h.shape)}")
    if score not in ("norm", "first"):
        raise ValueError(f"score must be 'norm' or 'first', got {score!r}")
    if weighting not in ("uniform", "softmax"):
        raise ValueError(f"weighting must be 'uniform' or 'softmax', got {weighting!r}")
    M, T, R = h.shape
    kk = min(k, T)
    dev = h.device
    if kk < k:  # slots past T are always empty
        idx = torch.full((M, k), -1, dtype=torch.int32, device=dev)
        w = torch.zeros((M, k), dtype=torch.float32, device=dev)
    else:
        idx = torch.empty((M, k), dtype=torch.int32, device=dev)
        w = torch.empty((M, k), dtype=torch.float32, device=dev)
    s = torch.empty((M, T), dtype=torch.float32, device=dev)
    if M == 0 or T == 0:
        return idx, w, s
    first = score == "first"
    has_scale = first and score_scale is not None
    cfg = spectr_topk_config(M, T, R, k, score)
    nw = cfg.pop("num_warps")
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    _spectr_topk_kernel[grid](
        h, rank if rank is not None else s, score_scale if has_scale else s, idx, w, s,
        M, T, R, kk, k,
        h.stride(0), h.stride(1), h.stride(2),
        float(1.0 / temperature) if weighting == "softmax" else 1.0,
        HAS_RANK=rank is not None, HAS_SCALE=has_scale, SCORE_FIRST=first,
        SOFTMAX=weighting == "softmax", num_warps=nw, **cfg,
    )
    return idx, w, s
