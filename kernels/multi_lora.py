"""Fused multi-LoRA linear in Triton: one base GEMM whose epilogue adds every row's adapter deltas.

Math (DESIGN.md, operation 1). M = rows, K = in, N = out, E = adapters, R = max rank,
S = slots per row, R_PAD = max(16, next_pow2(R)), SPLIT = shrink split-K factor:

    y[m] = x[m] @ W.T + bias + sum_s  c[m,s] * B[e, :, :r_e] @ (A[e, :r_e] @ x[m]),
    e = idx[m, s] (ids outside [0, E) mean "none"), c[m,s] = w[m,s] * scale[e], r_e = rank[e]

Kernels (never a second pass over y, except the split-K reduction at decode):
1. shrink  h[p, m, s, :] = c[m,s] * A[e, :r_e, k-part p] @ x[m, k-part p]   # [SPLIT, M, S, R_PAD] fp32
   - small M (decode): ``_multi_lora_shrink_kernel``, one program per (row, slot, k-part), a
     pipelined GEMV on CUDA cores; nothing past rank[e] is read, invalid slots write zeros.
   - large M (prefill): ``_multi_lora_shrink_grouped_kernel``, tiles of rows grouped by adapter (an
     on-device argsort of idx[:, 0], once per idx tensor, i.e. once per forward: every layer gets
     the same token map; rows are gathered through the permutation, x is never reordered); per
     distinct adapter in the tile one tensor-core ``tl.dot(x_tile, A_e^T)``.
2. ``_multi_lora_fwd_kernel``: the GEMM ``x @ W.T`` with ``tl.dot`` (fp32 accumulator), then one of
   two epilogues before the single store of y:
   - GATHER (decode, any tile whose rows use many adapters): per slot s, every row gathers its own
     adapter's B[e_m, n_tile, :] and h[m, s, :] (independent loads: the load addresses depend on
     idx only, the rank masks the loaded values) and adds ``sum_r h[m,r] * B[e_m, n, r]`` on CUDA
     cores, R_CHUNK ranks at a time (r FMAs per output);
   - DOT (grouped prefill): per distinct adapter e of the tile, ``acc += tl.dot(h_e, B_e^T)``
     with h_e[m] = sum_{s: idx[m,s]=e} h[m, s]; a tile whose rows share one adapter does one dot.
   Either way a row reads only its own adapters, so a NaN / inf adapter never reaches a row that did
   not select it (a mixed DOT tile masks the product).
   At decode the base GEMM is split over K (``SPLIT_K`` programs per output tile, so the grid is at
   least 2x the SM count): each program stores an fp32 partial, and the same kernel without the
   GEMM sums the partials in a fixed order (deterministic), adds bias and the GATHER epilogue.
   The same kernel with no base GEMM, a y input and h[m, e, :] is the expand-only op
   ``multi_lora_expand_triton`` (SpectR's second half), and the in-place expand of the unfused
   path ``multi_lora_linear_unfused`` (cuBLAS + shrink + expand).
3. ``multi_lora_linear_dense`` / ``multi_lora_expand_dense``: no Triton, for small E*R (routing
   over a few experts): ``x @ A_flat^T`` for every adapter, the slot weights scattered into a dense
   [M, E*R] matrix, one ``addmm`` with B_flat; rows that did not select an adapter holding inf /
   NaN get nothing from it (they are masked; rows that selected it get NaN where it is non-finite).
Candidates for the first-use autotuner (``loramix_fast.autotune``): :func:`linear_candidates`,
:func:`expand_candidates`, with :func:`linear_tune_key` / :func:`linear_default`.

No host synchronisation (no ``.item()``, no data-dependent shapes): CUDA-graph safe.
All offsets that can pass 2^31 (row * stride, k * stride of a transposed Conv1D weight) are int64.
Under ``TRITON_INTERPRET=1`` the dots run on fp32 copies (the interpreter's bf16 dot is wrong).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["multi_lora_linear_triton", "multi_lora_expand_triton", "multi_lora_linear_unfused",
           "multi_lora_linear_dense", "multi_lora_expand_dense", "linear_candidates",
           "expand_candidates", "linear_tune_key", "expand_tune_key", "linear_default",
           "expand_default", "GROUPED_MIN_M", "DENSE_MAX_ER"]

_NO_ADAPTER = tl.constexpr(2**31 - 1)  # sentinel id: sorts after every real adapter id
GROUPED_MIN_M = 128      # from this many rows on, rows are grouped by adapter (sort on device)
GATHER_MAX_M = 64        # up to this many rows the epilogue gathers B per row (decode)
DENSE_MAX_ER = 1024      # the dense candidate exists when E * R is at most this


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _multi_lora_shrink_kernel(
    x_ptr, A_ptr, scale_ptr, rank_ptr, idx_ptr, w_ptr, h_ptr,
    M, K, S, E, R,
    stride_xm, stride_xk,
    stride_ae, stride_ar, stride_ak,
    stride_im, stride_is,
    stride_wm, stride_ws,
    stride_hp, stride_hm, stride_hs,
    K_PER_SPLIT,
    HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h[p, m, s, :] = w[m,s] * scale[e] * A[e, :r_e, kp] @ x[m, kp]; grid (M * S, SPLIT)."""
    pid = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    m = pid // S
    s = pid % S
    e = tl.load(idx_ptr + m * stride_im + s * stride_is).to(tl.int64)
    valid = (e >= 0) & (e < E)
    e = tl.where(valid, e, 0)
    r_e = tl.minimum(tl.load(rank_ptr + e, mask=valid, other=0), R)
    coef = tl.load(scale_ptr + e, mask=valid, other=0.0).to(tl.float32)
    if HAS_W:
        coef = coef * tl.load(w_ptr + m * stride_wm + s * stride_ws).to(tl.float32)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    k_lo = p * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    k_hi = tl.where(r_e > 0, k_hi, k_lo)  # no adapter / rank 0: read nothing
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    rmask = rr[:, None] < r_e
    x_ptrs = x_ptr + m * stride_xm + (k_lo + rk) * stride_xk                   # int64 offsets
    a_ptrs = A_ptr + e * stride_ae + rr[:, None] * stride_ar + (k_lo + rk)[None, :] * stride_ak
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kmask = (k0 + rk) < k_hi
        xv = tl.load(x_ptrs, mask=kmask, other=0.0)
        a = tl.load(a_ptrs, mask=rmask & kmask[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    tl.store(h_ptr + p * stride_hp + m * stride_hm + s * stride_hs + rr,
             (acc * coef).to(h_ptr.dtype.element_ty))


@triton.jit
def _multi_lora_shrink_grouped_kernel(
    x_ptr, A_ptr, scale_ptr, rank_ptr, idx_ptr, w_ptr, h_ptr, perm_ptr,
    M, K, S, E, R,
    stride_xm, stride_xk,
    stride_ae, stride_ar, stride_ak,
    stride_im, stride_is,
    stride_wm, stride_ws,
    stride_hm, stride_hs,
    HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """h[m, s, :] for a tile of BLOCK_M rows taken in perm order (rows grouped by adapter):
    one tl.dot(x_tile, A_e^T) per distinct adapter e of the tile (its ids: a [BLOCK_M, BLOCK_S]
    tile, 16 registers per thread at S = 32). Grid (cdiv(M, BLOCK_M),)."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs < M
    rows = tl.load(perm_ptr + offs, mask=mmask, other=0).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    rs = tl.arange(0, BLOCK_S)
    ids = tl.load(idx_ptr + rows[:, None] * stride_im + rs[None, :] * stride_is,
                  mask=mmask[:, None] & (rs < S)[None, :], other=-1)
    ids = tl.where((ids >= 0) & (ids < E), ids, _NO_ADAPTER)  # [BLOCK_M, BLOCK_S]
    h_rows = h_ptr + rows[:, None] * stride_hm + rr[None, :]
    # slots with no adapter: zeros (disjoint from every store below)
    for s in range(S):
        id_s = tl.load(idx_ptr + rows * stride_im + s * stride_is, mask=mmask, other=0)
        none = mmask & ((id_s < 0) | (id_s >= E))
        tl.store(h_rows + s * stride_hs, tl.zeros((BLOCK_M, BLOCK_R), dtype=h_ptr.dtype.element_ty),
                 mask=none[:, None])
    e = tl.min(tl.min(ids, axis=1), axis=0)
    while e < _NO_ADAPTER:
        e64 = e.to(tl.int64)
        r_e = tl.minimum(tl.load(rank_ptr + e64), R)
        row_use = tl.max((ids == e).to(tl.int32), axis=1) > 0  # rows of this tile using e
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if r_e > 0:
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + rk
                kmask = kk < K
                a = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                            mask=row_use[:, None] & kmask[None, :], other=0.0)
                at = tl.load(A_ptr + e64 * stride_ae + rr[None, :] * stride_ar
                             + kk[:, None] * stride_ak,
                             mask=(rr < r_e)[None, :] & kmask[:, None], other=0.0)  # [BK, BR]
                if DOT_FP32:
                    a = a.to(tl.float32)
                    at = at.to(tl.float32)
                acc = tl.dot(a, at, acc, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_R]
        sc = tl.load(scale_ptr + e64).to(tl.float32)
        for s in range(S):
            id_s = tl.load(idx_ptr + rows * stride_im + s * stride_is, mask=mmask, other=-1)
            sel = mmask & (id_s == e)
            coef = tl.zeros((BLOCK_M,), dtype=tl.float32) + sc
            if HAS_W:
                coef = coef * tl.load(w_ptr + rows * stride_wm + s * stride_ws, mask=sel,
                                      other=0.0).to(tl.float32)
            tl.store(h_rows + s * stride_hs, (acc * coef[:, None]).to(h_ptr.dtype.element_ty),
                     mask=sel[:, None])
        e = tl.min(tl.min(tl.where(ids > e, ids, _NO_ADAPTER), axis=1), axis=0)


@triton.jit
def _multi_lora_fwd_kernel(
    x_ptr, weight_ptr, bias_ptr, yin_ptr, out_ptr,
    h_ptr, B_ptr, scale_ptr, rank_ptr, idx_ptr, w_ptr, perm_ptr,
    M, N, K, S, E, R, K_PER_SPLIT, NUM_YIN, NUM_H,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_yip, stride_yim, stride_yin,
    stride_op, stride_om, stride_on,
    stride_hp, stride_hm, stride_hs, stride_he, stride_hr,
    stride_be, stride_bn, stride_br,
    stride_im, stride_is,
    stride_wm, stride_ws,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_YIN: tl.constexpr, HAS_W: tl.constexpr,
    H_HAS_COEF: tl.constexpr, HAS_PERM: tl.constexpr, PARTIAL: tl.constexpr,
    GATHER: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_RC: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[rows, n_tile] = x[rows] @ W[n_tile, k-part].T (+ sum_q y_in[q]) (+ bias) + adapter expand.
    Grid (tiles, K parts). PARTIAL: store the fp32 GEMM partial of K part program_id(1) at
    out + part*stride_op and stop (the reduce launch adds the rest). h address:
    h + p*stride_hp + m*stride_hm + s*stride_hs + e*stride_he + r*stride_hr, p < NUM_H
    (fused: h[p, m, s, r] with w*scale folded in; expand-only: h[m, e, r], stride_hs = 0)."""
    pid = tl.program_id(0).to(tl.int64)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n                  # swizzle: GROUP_M row tiles share W tiles in L2
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs < M
    if HAS_PERM:
        rows = tl.load(perm_ptr + offs, mask=mmask, other=0).to(tl.int64)
    else:
        rows = tl.where(mmask, offs, 0)  # in-bounds rows for unmasked loads; discarded at the store
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rn_ld = rn % N  # in-bounds columns for unmasked-N loads; discarded at the store
    omask = mmask[:, None] & nmask[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BASE:
        kp = tl.program_id(1)
        k_lo = kp * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        rk = tl.arange(0, BLOCK_K)
        kk0 = (k_lo + rk).to(tl.int64)  # k * stride_wk passes 2^31 for a large Conv1D weight
        a_ptrs = x_ptr + rows[:, None] * stride_xm + kk0[None, :] * stride_xk
        b_ptrs = weight_ptr + rn_ld[None, :] * stride_wn + kk0[:, None] * stride_wk
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                kmask = (k0 + rk) < k_hi
                a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_xk
            b_ptrs += BLOCK_K * stride_wk
    if PARTIAL:
        tl.store(out_ptr + tl.program_id(1).to(tl.int64) * stride_op + rows[:, None] * stride_om
                 + rn[None, :] * stride_on, acc, mask=omask)
    else:
        if HAS_YIN:  # y_in, or the K-split partials summed in a fixed order (deterministic)
            y_ptrs = yin_ptr + rows[:, None] * stride_yim + rn[None, :] * stride_yin
            acc += tl.load(y_ptrs, mask=omask, other=0.0).to(tl.float32)
            for q in range(1, NUM_YIN):
                acc += tl.load(y_ptrs + q * stride_yip, mask=omask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn_ld).to(tl.float32)[None, :]

        if GATHER:
            # ---- per row and slot: gathered B[e_m, n_tile, :] rows, r FMAs per output ----------
            rc = tl.arange(0, BLOCK_RC)
            for s in range(S):
                id_s = tl.load(idx_ptr + rows * stride_im + s * stride_is, mask=mmask, other=-1)
                ok = mmask & (id_s >= 0) & (id_s < E)
                e_s = tl.where(ok, id_s, 0).to(tl.int64)
                r_s = tl.where(ok, tl.minimum(tl.load(rank_ptr + e_s, mask=ok, other=0), R), 0)
                if not H_HAS_COEF:
                    coef = tl.load(scale_ptr + e_s, mask=ok, other=0.0).to(tl.float32)
                    if HAS_W:
                        coef = coef * tl.load(w_ptr + rows * stride_wm + s * stride_ws, mask=ok,
                                              other=0.0).to(tl.float32)
                h_row = h_ptr + rows * stride_hm + s * stride_hs + e_s * stride_he  # [BLOCK_M]
                b_row = B_ptr + e_s * stride_be                                      # [BLOCK_M]
                for r0 in range(0, R, BLOCK_RC):
                    rr = r0 + rc
                    hm = ok[:, None] & (rr[None, :] < r_s[:, None])          # [BLOCK_M, RC]
                    hv = tl.load(h_row[:, None] + rr[None, :] * stride_hr, mask=hm,
                                 other=0.0).to(tl.float32)
                    for p in range(1, NUM_H):
                        hv += tl.load(h_row[:, None] + p * stride_hp + rr[None, :] * stride_hr,
                                      mask=hm, other=0.0).to(tl.float32)
                    if not H_HAS_COEF:
                        hv = tl.where(hm, hv * coef[:, None], 0.0)
                    # whole vectors along r (the row's validity is the only load mask); the
                    # padding past the row's rank is discarded after the load (it may hold NaN)
                    b = tl.load(b_row[:, None, None] + rn_ld[None, :, None] * stride_bn
                                + rr[None, None, :] * stride_br,
                                mask=ok[:, None, None] & (rr < R)[None, None, :], other=0.0)
                    b = tl.where(hm[:, None, :], b.to(tl.float32), 0.0)   # [BLOCK_M, BLOCK_N, RC]
                    acc += tl.sum(hv[:, None, :] * b, axis=2)
        else:
            # ---- one tl.dot(h_e, B_e^T) per distinct adapter e in this tile ---------------------
            rr = tl.arange(0, BLOCK_R)
            b_tile = B_ptr + rr[:, None] * stride_br + rn_ld[None, :] * stride_bn  # [BLOCK_R, BLOCK_N]
            e = tl.program_id(0) * 0 + _NO_ADAPTER  # int32 scalar (loop-carried)
            for s in range(S):
                id_s = tl.load(idx_ptr + rows * stride_im + s * stride_is, mask=mmask, other=-1)
                ok = (id_s >= 0) & (id_s < E)
                e = tl.minimum(e, tl.min(tl.where(ok, id_s, _NO_ADAPTER), axis=0).to(tl.int32))
            while e < _NO_ADAPTER:
                e64 = e.to(tl.int64)
                r_e = tl.minimum(tl.load(rank_ptr + e64), R)
                rmask = rr < r_e
                if not H_HAS_COEF:
                    sc = tl.load(scale_ptr + e64).to(tl.float32)
                h_e = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                use = tl.zeros((BLOCK_M,), dtype=tl.int32)
                nxt = tl.program_id(0) * 0 + _NO_ADAPTER
                for s in range(S):
                    id_s = tl.load(idx_ptr + rows * stride_im + s * stride_is, mask=mmask,
                                   other=-1)
                    ok = (id_s >= 0) & (id_s < E)
                    sel = mmask & (id_s == e)
                    nxt = tl.minimum(nxt, tl.min(tl.where(ok & (id_s > e), id_s, _NO_ADAPTER),
                                                 axis=0).to(tl.int32))
                    use = tl.maximum(use, sel.to(tl.int32))
                    hm = sel[:, None] & rmask[None, :]
                    hp = h_ptr + rows[:, None] * stride_hm + s * stride_hs + e64 * stride_he \
                        + rr[None, :] * stride_hr
                    hv = tl.load(hp, mask=hm, other=0.0).to(tl.float32)
                    for p in range(1, NUM_H):
                        hv += tl.load(hp + p * stride_hp, mask=hm, other=0.0).to(tl.float32)
                    if not H_HAS_COEF:
                        c = tl.zeros((BLOCK_M,), dtype=tl.float32) + sc
                        if HAS_W:
                            c = c * tl.load(w_ptr + rows * stride_wm + s * stride_ws, mask=sel,
                                            other=0.0).to(tl.float32)
                        hv = tl.where(hm, hv * c[:, None], 0.0)
                    h_e += hv
                if r_e > 0:
                    b = tl.load(b_tile + e64 * stride_be, mask=rmask[:, None], other=0.0)
                    if DOT_FP32:
                        b = b.to(tl.float32)
                        h_d = h_e
                    else:
                        h_d = h_e.to(b.dtype)
                    # rows of the tile that do not use e hold h_e = 0, but 0 * (NaN or inf in B_e)
                    # is NaN: a tile whose rows all use e (grouped prefill) accumulates in the dot;
                    # a mixed tile masks the product, so an adapter never reaches another row
                    row_use = (use > 0) | (offs >= M)
                    if tl.min(row_use.to(tl.int32), axis=0) > 0:
                        acc = tl.dot(h_d, b, acc, input_precision=DOT_PRECISION)
                    else:
                        d = tl.dot(h_d, b, input_precision=DOT_PRECISION)
                        acc += tl.where(row_use[:, None], d, 0.0)
                e = nxt

        tl.store(out_ptr + rows[:, None] * stride_om + rn[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=omask)


# ------------------------------------------------------------------------------------------------
# launch configuration
# ------------------------------------------------------------------------------------------------

def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _dot_mode(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_FP32, DOT_PRECISION): fp32 inputs follow torch's TF32 switch; the interpreter always
    multiplies fp32 copies (its bf16 dot is wrong)."""
    if dtype == torch.float32:
        return True, ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")
    return _interpret(), "ieee" if _interpret() else "tf32"


def _block_r(R: int) -> int:
    return max(16, triton.next_power_of_2(max(R, 1)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132, an H100's, for CPU tensors / the interpreter)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132


def gemm_config(M: int, dtype: torch.dtype) -> dict:
    """Block config of ``_multi_lora_fwd_kernel`` for M rows (no autotuning at import time).
    Decode (small M) uses narrow N tiles and split-K (see :func:`split_k`) so W streams through
    every SM; prefill uses 128x128 tiles (64x128 in fp32). EPILOGUE "gather" up to GATHER_MAX_M
    rows, "dot" above. From AOT register/smem reports; the autotuner times alternatives."""
    if M <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)
    elif M <= 32:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif M <= 64:  # BLOCK_N 32: the gathered B tile [64, 32, RC] stays in registers
        cfg = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)
    elif M < 256:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    if dtype == torch.float32:  # twice the bytes per element: halve the K step
        cfg["BLOCK_K"] = max(32, cfg["BLOCK_K"] // 2)
        cfg["num_stages"] = min(cfg["num_stages"], 3)
        if cfg["BLOCK_M"] == 128:  # exact (non-TF32) fp32 dots run on FMA units: 128x128 spills
            cfg["BLOCK_M"] = 64
    cfg["GROUP_M"] = 8
    cfg["EPILOGUE"] = "gather" if M <= GATHER_MAX_M else "dot"
    return cfg


def block_rc(BLOCK_M: int, BLOCK_N: int, BLOCK_R: int, num_warps: int) -> int:
    """Ranks per step of the GATHER epilogue: a [BLOCK_M, BLOCK_N, RC] tile of B of about 32
    elements per thread (no spills), whole 16-byte vectors along r when the tile allows."""
    per = (32 * 32 * num_warps) // (BLOCK_M * BLOCK_N)
    rc = 1
    while rc * 2 <= per and rc * 2 <= BLOCK_R:
        rc *= 2
    return rc


def split_k(M: int, N: int, K: int, cfg: dict, sms: int) -> tuple[int, int]:
    """(number of K parts, K per part) of the base GEMM: at decode (M <= GATHER_MAX_M, ungrouped)
    enough K parts that the grid holds at least 2x ``sms`` programs, each part at least two
    BLOCK_K steps; (1, K) otherwise."""
    BK = cfg["BLOCK_K"]
    n_k = triton.cdiv(K, BK)
    want = cfg.get("SPLIT_K")
    if want is None:
        if M > GATHER_MAX_M:
            want = 1
        else:
            tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
            want = triton.cdiv(2 * sms, tiles) if tiles < 2 * sms else 1
    want = max(1, min(int(want), n_k // 2 if cfg.get("SPLIT_K") is None else n_k))
    if want <= 1:
        return 1, max(K, 1)
    blocks = max(1, n_k // want)
    return triton.cdiv(n_k, blocks), blocks * BK


def shrink_split(M: int, S: int, K: int, BLOCK_K: int, sms: int = 132) -> int:
    """Split-K factor of the per-row shrink: about 2x ``sms`` programs at decode, each at least
    two BLOCK_K steps (the loop is pipelined)."""
    split = 1
    while split < 64 and M * S * split < 2 * sms and K >= 4 * split * BLOCK_K:
        split *= 2
    return split


def shrink_config(grouped: bool, BLOCK_R: int, dtype: torch.dtype) -> dict:
    """Block config of the shrink kernels. Per-row: a [BLOCK_R, BLOCK_K] tile of A per step
    (~4K elements, software-pipelined over 3 stages); grouped: [64 rows, BLOCK_K] x
    [BLOCK_K, BLOCK_R] tensor-core steps."""
    if grouped:
        return dict(BLOCK_M=64, BLOCK_K=64 if dtype != torch.float32 else 32, num_warps=4,
                    num_stages=3)
    return dict(BLOCK_K=max(32, 4096 // BLOCK_R), num_warps=4, num_stages=3)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(name, t):
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton backend takes float32, float16 or "
                        "bfloat16 (float64 runs on the C++/reference backends)")


def _check(name, t, shape):
    if t is None:
        return
    if t.dim() != len(shape) or any(w is not None and g != w for g, w in zip(t.shape, shape)):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected "
                         f"{tuple('*' if s is None else s for s in shape)}")


def _sort_rows(idx: torch.Tensor, E: int) -> torch.Tensor:
    """Row order grouped by adapter (slot 0; rows with no adapter last). On device, no sync.

    Computed once per idx tensor and kept on it (every patched layer of a forward gets the same
    token map, so the sort runs once per forward, not once per layer); recomputed when idx is
    modified in place (its version counter moves). Not kept while a CUDA graph is captured: the
    graph then sorts in every layer, and a replay never reads a sort from another capture."""
    capturing = idx.is_cuda and torch.cuda.is_current_stream_capturing()
    try:
        version = idx._version
    except RuntimeError:  # an inference-mode tensor has no version counter
        version = None
    key = (version, idx.data_ptr(), E)
    hit = getattr(idx, "_lmf_perm", None)
    if hit is not None and hit[0] == key and not capturing:
        return hit[1]
    k = idx[:, 0]
    k = torch.where((k >= 0) & (k < E), k, torch.full_like(k, E))
    perm = torch.argsort(k)
    if not capturing:
        try:
            idx._lmf_perm = (key, perm)
        except (AttributeError, RuntimeError):  # e.g. a tensor subclass refusing attributes
            pass
    return perm


def _launch_params(M: int, dtype: torch.dtype, dot_dtype: torch.dtype, config: dict | None,
                   R: int, S: int, E: int):
    """Block config for M rows of ``dtype`` (``config`` overrides), the dot mode for
    ``dot_dtype`` operands, the rank block, and whether any adapter can apply."""
    cfg = gemm_config(M, dtype)
    if config:
        cfg.update(config)
    if cfg["EPILOGUE"] not in ("gather", "dot"):
        raise ValueError(f"EPILOGUE must be 'gather' or 'dot', got {cfg['EPILOGUE']!r}")
    dot_fp32, precision = _dot_mode(dot_dtype)
    return cfg, dot_fp32, precision, _block_r(R), S > 0 and E > 0


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------

def _shrink(x, A, scale, rank, idx, w, *, grouped: bool, perm, BLOCK_R: int, dot_fp32: bool,
            precision: str, split: int | None = None) -> torch.Tensor:
    """h [SPLIT, M, S, BLOCK_R] fp32 (w * scale folded in) by the per-row or grouped shrink.
    Exact fp32 (no TF32) takes the per-row shrink even for grouped rows: its dots run on FMA units
    either way, and the grouped kernel spills there on sm_80."""
    M, K = x.shape
    E, R = A.shape[0], A.shape[1]
    S = idx.shape[1]
    ws = (w.stride(0), w.stride(1)) if w is not None else (0, 0)
    if grouped and not (x.dtype == torch.float32 and precision == "ieee"):
        h = torch.empty((1, M, S, BLOCK_R), dtype=torch.float32, device=x.device)
        sc = shrink_config(True, BLOCK_R, x.dtype)
        _multi_lora_shrink_grouped_kernel[(triton.cdiv(M, sc["BLOCK_M"]),)](
            x, A, scale, rank, idx, w if w is not None else scale, h, perm,
            M, K, S, E, R,
            x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2),
            idx.stride(0), idx.stride(1), *ws, h.stride(1), h.stride(2),
            HAS_W=w is not None, BLOCK_M=sc["BLOCK_M"], BLOCK_K=sc["BLOCK_K"],
            BLOCK_R=BLOCK_R, BLOCK_S=triton.next_power_of_2(max(S, 1)), DOT_FP32=dot_fp32,
            DOT_PRECISION=precision,
            num_warps=sc["num_warps"], num_stages=sc["num_stages"])
        return h
    sc = shrink_config(False, BLOCK_R, x.dtype)
    bk = sc["BLOCK_K"]
    if split is None:
        split = shrink_split(M, S, K, bk, num_sms(x.device))
    k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
    h = torch.empty((split, M, S, BLOCK_R), dtype=torch.float32, device=x.device)
    _multi_lora_shrink_kernel[(M * S, split)](
        x, A, scale, rank, idx, w if w is not None else scale, h,
        M, K, S, E, R,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2),
        idx.stride(0), idx.stride(1), *ws, h.stride(0), h.stride(1), h.stride(2),
        k_per_split,
        HAS_W=w is not None, BLOCK_R=BLOCK_R, BLOCK_K=bk, num_warps=sc["num_warps"],
        num_stages=sc["num_stages"])
    return h


def epilogue_config(cfg: dict, has_base: bool, gather: bool) -> dict:
    """A launch without the base GEMM (reduce / expand) that gathers B per row uses tiles of at
    most 32 x 32 (its grid does not follow the GEMM's): [32, 32, 4] gathered B tiles, no spills."""
    if has_base or not gather:
        return cfg
    return dict(cfg, BLOCK_M=min(cfg["BLOCK_M"], 32), BLOCK_N=min(cfg["BLOCK_N"], 32), num_warps=4)


def _fwd(parts, cfg, *, out, M, N, S, E, R, B, scale, rank, idx, BLOCK_R, dot_fp32, precision,
         x=None, weight=None, K=0, k_per=1, partial=False, bias=None, yin=None, num_yin=1,
         h=None, h_strides=(0, 0, 0, 0, 0), num_h=1, h_coef=True, w=None, perm=None,
         gather=True, num_stages=None):
    """One launch of ``_multi_lora_fwd_kernel`` (every mode: fused, partial, reduce, expand) over
    ``parts`` K parts."""
    has_base = x is not None
    cfg = epilogue_config(cfg, has_base, gather)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), parts)
    dummy = out
    ystr = (0, 0, 0)
    if yin is not None:
        ystr = (yin.stride(0), yin.stride(1), yin.stride(2)) if yin.dim() == 3 else \
            (0, yin.stride(0), yin.stride(1))
    ostr = (out.stride(0), out.stride(1), out.stride(2)) if out.dim() == 3 else \
        (0, out.stride(0), out.stride(1))
    _multi_lora_fwd_kernel[grid](
        x if has_base else dummy, weight if has_base else dummy,
        bias if bias is not None else dummy, yin if yin is not None else dummy, out,
        h if h is not None else dummy, B, scale, rank, idx, w if w is not None else scale,
        perm if perm is not None else idx,
        M, N, K, S, E, R, k_per, num_yin, num_h,
        x.stride(0) if has_base else 0, x.stride(1) if has_base else 0,
        weight.stride(0) if has_base else 0, weight.stride(1) if has_base else 0,
        *ystr, *ostr, *h_strides,
        B.stride(0), B.stride(1), B.stride(2),
        idx.stride(0), idx.stride(1),
        w.stride(0) if w is not None else 0, w.stride(1) if w is not None else 0,
        **fwd_constexprs(cfg, has_base=has_base, partial=partial, has_bias=bias is not None,
                         has_yin=yin is not None, has_w=w is not None, h_coef=h_coef,
                         has_perm=perm is not None, gather=gather,
                         even_k=has_base and K % cfg["BLOCK_K"] == 0
                         and k_per % cfg["BLOCK_K"] == 0,
                         BLOCK_R=BLOCK_R, dot_fp32=dot_fp32, precision=precision),
        num_warps=cfg["num_warps"],
        num_stages=num_stages if num_stages is not None else fwd_num_stages(cfg, has_base))


def fwd_num_stages(cfg: dict, has_base: bool) -> int:
    return cfg["num_stages"] if has_base else 1


def fwd_constexprs(cfg: dict, *, has_base: bool, partial: bool = False, has_bias: bool = False,
                   has_yin: bool = False, has_w: bool = False, h_coef: bool = True,
                   has_perm: bool = False, gather: bool = True, even_k: bool = False,
                   BLOCK_R: int = 16, dot_fp32: bool = False, precision: str = "tf32") -> dict:
    """The constexpr arguments of one ``_multi_lora_fwd_kernel`` launch (shared with the AOT
    tests, so they compile exactly what the launchers run)."""
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    return dict(HAS_BASE=has_base, HAS_BIAS=has_bias, HAS_YIN=has_yin, HAS_W=has_w,
                H_HAS_COEF=h_coef, HAS_PERM=has_perm, PARTIAL=partial, GATHER=gather,
                EVEN_K=even_k, BLOCK_M=BM, BLOCK_N=BN,
                BLOCK_K=cfg["BLOCK_K"] if has_base else 16, BLOCK_R=BLOCK_R,
                BLOCK_RC=block_rc(BM, BN, BLOCK_R, cfg["num_warps"]), GROUP_M=cfg["GROUP_M"],
                DOT_FP32=dot_fp32, DOT_PRECISION=precision)


def _validate_linear(x, weight, A, B, scale, rank, idx, w, bias, out):
    _check_dtype("x", x)
    M, K = x.shape
    N = weight.shape[0]
    E, R = A.shape[0], A.shape[1]
    S = idx.shape[1]
    _check("weight", weight, (N, K))
    _check("A", A, (E, R, K))
    _check("B", B, (E, N, R))
    _check("scale", scale, (E,))
    _check("rank", rank, (E,))
    _check("idx", idx, (M, S))
    _check("w", w, (M, S))
    _check("bias", bias, (N,))
    if out is not None:
        _check("out", out, (M, N))
    return M, K, N, E, R, S, out


def multi_lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                             B: torch.Tensor, scale: torch.Tensor, rank: torch.Tensor,
                             idx: torch.Tensor, w: torch.Tensor | None = None,
                             bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                             grouped: bool | None = None, config: dict | None = None
                             ) -> torch.Tensor:
    """Base linear plus per-row adapter deltas in one GEMM kernel (after a small shrink kernel).

    Semantics (== reference.multi_lora_linear):
        y[m] = x[m] @ weight.T + bias
               + sum_s w[m, s] * scale[e] * B[e, :, :rank[e]] @ (A[e, :rank[e]] @ x[m]),
        e = idx[m, s]; ids outside [0, E) contribute nothing (never read out of bounds).
    Shapes: x [M, K], weight [N, K] (any strides, e.g. HF Conv1D's transposed view), A [E, R, K],
        B [E, N, R], scale [E] float, rank [E] int, idx [M, S] int, w [M, S] or None,
        bias [N] or None. fp32 / fp16 / bf16, fp32 accumulation. Returns y [M, N] in x.dtype
        (written into ``out`` when given).
    ``grouped`` forces (True) or forbids (False) the adapter-grouped large-M path (default: M >=
    GROUPED_MIN_M); ``config`` overrides keys of :func:`gemm_config` (plus ``SPLIT``: the shrink's
    split-K, ``SPLIT_K``: the base GEMM's K parts). Both exist for tests, benchmarks, the tuner.
    """
    M, K, N, E, R, S, out = _validate_linear(x, weight, A, B, scale, rank, idx, w, bias, out)
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:  # empty reduction: bias only
        return out.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(out))

    cfg, dot_fp32, precision, BLOCK_R, has_adapters = _launch_params(
        M, x.dtype, x.dtype, config, R, S, E)
    if grouped is None:
        grouped = M >= GROUPED_MIN_M
    grouped = grouped and has_adapters
    gather = cfg["EPILOGUE"] == "gather"

    perm = _sort_rows(idx, E) if grouped else None
    if has_adapters:
        h = _shrink(x, A, scale, rank, idx, w, grouped=grouped, perm=perm, BLOCK_R=BLOCK_R,
                    dot_fp32=dot_fp32, precision=precision, split=cfg.get("SPLIT"))
    else:
        h = torch.empty((1, 1, 1, BLOCK_R), dtype=torch.float32, device=x.device)  # never read
    hs = (h.stride(0), h.stride(1), h.stride(2), 0, h.stride(3))
    common = dict(M=M, N=N, S=S if has_adapters else 0, E=E, R=R, B=B, scale=scale, rank=rank,
                  idx=idx, BLOCK_R=BLOCK_R, dot_fp32=dot_fp32, precision=precision,
                  h=h, h_strides=hs, num_h=h.shape[0], perm=perm, gather=gather)
    n_split, k_per = (1, K) if grouped else split_k(M, N, K, cfg, num_sms(x.device))
    if n_split == 1:
        _fwd(1, cfg, out=out, x=x, weight=weight, K=K, k_per=max(K, 1), bias=bias,
             **common)
        return out
    # decode: K-split partials of x @ W.T, then one reduce + bias + expand pass
    part = torch.empty((n_split, M, N), dtype=torch.float32, device=x.device)
    _fwd(n_split, cfg, out=part, x=x, weight=weight, K=K, k_per=k_per, partial=True,
         **dict(common, S=0, perm=None))
    _fwd(1, cfg, out=out, yin=part, num_yin=n_split, bias=bias, **common)
    return out


def multi_lora_linear_unfused(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                              B: torch.Tensor, scale: torch.Tensor, rank: torch.Tensor,
                              idx: torch.Tensor, w: torch.Tensor | None = None,
                              bias: torch.Tensor | None = None, *,
                              out: torch.Tensor | None = None, grouped: bool | None = None,
                              config: dict | None = None) -> torch.Tensor:
    """The unfused baseline: cuBLAS ``F.linear`` (bias included), then the shrink and the expand
    added to y in place (one read and one write of y). Same semantics and shapes as
    :func:`multi_lora_linear_triton`."""
    M, K, N, E, R, S, _ = _validate_linear(x, weight, A, B, scale, rank, idx, w, bias, out)
    y = F.linear(x, weight, bias)
    out = y if out is None else out.copy_(y)
    if M == 0 or N == 0:
        return out
    cfg, dot_fp32, precision, BLOCK_R, has_adapters = _launch_params(
        M, x.dtype, x.dtype, config, R, S, E)
    if not has_adapters or K == 0:
        return out
    if grouped is None:
        grouped = M >= GROUPED_MIN_M
    perm = _sort_rows(idx, E) if grouped else None
    h = _shrink(x, A, scale, rank, idx, w, grouped=grouped, perm=perm, BLOCK_R=BLOCK_R,
                dot_fp32=dot_fp32, precision=precision, split=cfg.get("SPLIT"))
    _fwd(1, cfg, out=out, yin=out, M=M, N=N, S=S, E=E, R=R, B=B, scale=scale,
         rank=rank, idx=idx, BLOCK_R=BLOCK_R, dot_fp32=dot_fp32, precision=precision, h=h,
         h_strides=(h.stride(0), h.stride(1), h.stride(2), 0, h.stride(3)), num_h=h.shape[0],
         perm=perm, gather=cfg["EPILOGUE"] == "gather")
    return out


def multi_lora_expand_triton(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor,
                             scale: torch.Tensor, rank: torch.Tensor, idx: torch.Tensor,
                             w: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                             config: dict | None = None) -> torch.Tensor:
    """Add the selected adapters' expand to y from precomputed shrink outputs h.

    Semantics (== reference.multi_lora_expand):
        out[m] = y[m] + sum_s w[m, s] * scale[e] * B[e, :, :rank[e]] @ h[m, e, :rank[e]],
        e = idx[m, s] (ids outside [0, E): nothing).
    Shapes: y [M, N], h [M, E, R], B [E, N, R], scale [E], rank [E], idx [M, S], w [M, S] or None.
    Returns a new [M, N] tensor in y.dtype (or ``out``; ``out`` may be ``y`` itself). One pass: y
    read once, out written once.
    """
    _check_dtype("y", y)
    _check_dtype("B", B)
    M, N = y.shape
    E, R = B.shape[0], B.shape[2]
    S = idx.shape[1]
    _check("h", h, (M, E, R))
    _check("B", B, (E, N, R))
    _check("scale", scale, (E,))
    _check("rank", rank, (E,))
    _check("idx", idx, (M, S))
    _check("w", w, (M, S))
    if out is None:
        out = torch.empty((M, N), dtype=y.dtype, device=y.device)
    else:
        _check("out", out, (M, N))
    if M == 0 or N == 0:
        return out
    cfg, dot_fp32, precision, BLOCK_R, has_adapters = _launch_params(
        M, y.dtype, B.dtype, config, R, S, E)
    _fwd(1, cfg, out=out, yin=y, M=M, N=N, S=S if has_adapters else 0, E=E, R=R, B=B,
         scale=scale, rank=rank, idx=idx, BLOCK_R=BLOCK_R, dot_fp32=dot_fp32,
         precision=precision, h=h, h_strides=(0, h.stride(0), 0, h.stride(1), h.stride(2)),
         h_coef=False, w=w, gather=cfg["EPILOGUE"] == "gather")
    return out


# ------------------------------------------------------------------------------------------------
# dense formulation (torch GEMMs) for small E*R
# ------------------------------------------------------------------------------------------------

def _dense_coef(idx, w, scale, E, acc):
    """c [M, E]: sum over the slots that selected e of w * scale[e] (0, never 0 * NaN, for an
    adapter a row did not select), and used [M, E] bool."""
    onehot = idx[:, :, None].long() == torch.arange(E, device=idx.device)  # [M, S, E]
    zero = torch.zeros((), dtype=acc, device=idx.device)
    if w is None:
        wsum = onehot.to(acc).sum(1)
    else:
        wsum = torch.where(onehot, w.to(acc)[:, :, None], zero).sum(1)
    used = onehot.any(1)
    return torch.where(used, wsum * scale.to(acc)[None, :], zero), used


def _dense_apply(y, G, used, B, rank):
    """y += G [M, E*R] @ B_flat [E*R, N] in place, B masked past each rank; rows get NaN where an
    adapter they selected holds inf / NaN (masked out of every other row)."""
    E, N, R = B.shape
    rmask = torch.arange(R, device=B.device)[None, :] < rank.to(B.device)[:, None]  # [E, R]
    Bm = torch.where(rmask[:, None, :], B, torch.zeros((), dtype=B.dtype, device=B.device))
    fin = torch.isfinite(Bm)
    Bf = torch.where(fin, Bm, torch.zeros((), dtype=B.dtype, device=B.device))
    Bf = Bf.permute(0, 2, 1).reshape(E * R, N)
    y.addmm_(G.to(y.dtype), Bf.to(y.dtype))
    bad = (~fin).any(2)  # [E, N]
    hit = (used.to(y.dtype) @ bad.to(y.dtype)) > 0  # [M, N]: a selected adapter is non-finite
    return y.masked_fill_(hit, float("nan"))


def multi_lora_linear_dense(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                            B: torch.Tensor, scale: torch.Tensor, rank: torch.Tensor,
                            idx: torch.Tensor, w: torch.Tensor | None = None,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same semantics as :func:`multi_lora_linear_triton` as three GEMMs (cuBLAS): y = x W^T + b,
    h = x A_flat^T [M, E*R] (every adapter for every row), y += (c ⊙ h) B_flat. Cheaper than the
    gathered kernels when E*R is small and rows use many adapters (routing over all experts).
    Rows that select an adapter whose B holds inf / NaN get NaN there (not +-inf)."""
    M, K = x.shape
    E, R = A.shape[0], A.shape[1]
    y = F.linear(x, weight, bias)
    if M == 0 or E == 0 or R == 0 or idx.shape[1] == 0:
        return y
    acc = torch.float32
    c, used = _dense_coef(idx, w, scale, E, acc)  # [M, E]
    h = F.linear(x, A.reshape(E * R, K)).view(M, E, R).to(acc)
    rmask = torch.arange(R, device=x.device)[None, :] < rank.to(x.device)[:, None]  # [E, R]
    keep = used[:, :, None] & rmask[None]
    G = torch.where(keep, h * c[:, :, None], torch.zeros((), dtype=acc, device=x.device))
    return _dense_apply(y, G.view(M, E * R), used, B, rank)


def multi_lora_expand_dense(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor,
                            scale: torch.Tensor, rank: torch.Tensor, idx: torch.Tensor,
                            w: torch.Tensor | None = None) -> torch.Tensor:
    """Same semantics as :func:`multi_lora_expand_triton` as one ``addmm`` over all E*R columns."""
    M, N = y.shape
    E, R = B.shape[0], B.shape[2]
    out = y.clone(memory_format=torch.contiguous_format)
    if M == 0 or E == 0 or R == 0 or idx.shape[1] == 0:
        return out
    acc = torch.float32
    c, used = _dense_coef(idx, w, scale, E, acc)
    rmask = torch.arange(R, device=y.device)[None, :] < rank.to(y.device)[:, None]
    keep = used[:, :, None] & rmask[None]
    G = torch.where(keep, h.to(acc) * c[:, :, None], torch.zeros((), dtype=acc, device=y.device))
    return _dense_apply(out, G.reshape(M, E * R), used, B, rank)


# ------------------------------------------------------------------------------------------------
# candidates for the first-use autotuner (loramix_fast.autotune): name -> fn(*args)
# ------------------------------------------------------------------------------------------------

def _bucket(n: int) -> int:
    return 1 if n <= 1 else triton.next_power_of_2(n)


def _dtype_tag(t: torch.Tensor) -> str:
    tag = str(t.dtype).replace("torch.", "")
    if t.dtype == torch.float32:
        tag += "-tf32" if torch.backends.cuda.matmul.allow_tf32 else "-ieee"
    return tag


def linear_tune_key(x, weight, A, B, scale, rank, idx, w=None, bias=None) -> tuple:
    """(dtype, N, K, R, S, M bucket, distinct-adapter bucket, weight layout, w?, bias?). The
    distinct-adapter count is bounded by min(E, M*S) (counting it would synchronise)."""
    M, K = x.shape
    E, R = A.shape[0], A.shape[1]
    S = idx.shape[1]
    return ("multi_lora_linear", _dtype_tag(x), weight.shape[0], K, R, S, _bucket(M),
            _bucket(min(E, M * S)), "t" if weight.stride(0) == 1 and K > 1 else "n",
            w is not None, bias is not None)


def linear_default(x, weight, A, B, scale, rank, idx, w=None, bias=None) -> str:
    """The choice without timings: the dense GEMMs for routing over a small library (S >= 2 and
    E*R <= DENSE_MAX_ER); otherwise the unfused baseline on GPUs (never slower than itself until
    the tuner has measured the fused kernel) and the fused kernel elsewhere (the interpreter)."""
    E, R = A.shape[0], A.shape[1]
    if x.is_cuda and idx.shape[1] >= 2 and E * R <= DENSE_MAX_ER:
        return "dense"
    return "unfused" if x.is_cuda else "fused"


def linear_candidates(x, weight, A, B, scale, rank, idx, w=None, bias=None) -> dict:
    """name -> fn(x, weight, A, B, scale, rank, idx, w, bias): the fused kernel in 2-3 configs,
    cuBLAS + shrink + expand, and the dense GEMMs where E*R is small."""
    M = x.shape[0]
    E, R = A.shape[0], A.shape[1]
    c = {"fused": multi_lora_linear_triton}
    if M <= GATHER_MAX_M:
        c["fused_nosplit"] = functools.partial(multi_lora_linear_triton, config={"SPLIT_K": 1})
        c["fused_n64"] = functools.partial(multi_lora_linear_triton,
                                           config={"BLOCK_N": 64, "BLOCK_K": 64})
    else:
        c["fused_m64"] = functools.partial(
            multi_lora_linear_triton, config={"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4})
    c["unfused"] = multi_lora_linear_unfused
    if E * R <= DENSE_MAX_ER:
        c["dense"] = multi_lora_linear_dense
    return c


def expand_tune_key(y, h, B, scale, rank, idx, w=None) -> tuple:
    M, N = y.shape
    E, R = B.shape[0], B.shape[2]
    S = idx.shape[1]
    return ("multi_lora_expand", _dtype_tag(y), N, E, R, S, _bucket(M), _bucket(min(E, M * S)),
            w is not None)


def expand_default(y, h, B, scale, rank, idx, w=None) -> str:
    E, R = B.shape[0], B.shape[2]
    if y.is_cuda and E * R <= DENSE_MAX_ER and y.shape[0] > GATHER_MAX_M:
        return "dense"
    return "fused"


def expand_candidates(y, h, B, scale, rank, idx, w=None) -> dict:
    E, R = B.shape[0], B.shape[2]
    c = {"fused": multi_lora_expand_triton,
         "fused_dot" if y.shape[0] <= GATHER_MAX_M else "fused_gather": functools.partial(
             multi_lora_expand_triton,
             config={"EPILOGUE": "dot" if y.shape[0] <= GATHER_MAX_M else "gather"})}
    if E * R <= DENSE_MAX_ER:
        c["dense"] = multi_lora_expand_dense
    return c
