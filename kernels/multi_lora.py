"""Fused multi-LoRA linear in Triton: one base GEMM whose epilogue adds every row's adapter deltas.

Math (DESIGN.md, operation 1). M = rows, K = in, N = out, E = adapters, R = max rank,
S = slots per row, R_PAD = max(16, next_pow2(R)), SPLIT = shrink split-K factor:

    y[m] = x[m] @ W.T + bias + sum_s  c[m,s] * B[e, :, :r_e] @ (A[e, :r_e] @ x[m]),
    e = idx[m, s] (ids outside [0, E) mean "none"), c[m,s] = w[m,s] * scale[e], r_e = rank[e]

Two kernels per call, never a second pass over y:
1. shrink  h[p, m, s, :] = c[m,s] * A[e, :r_e, k-part p] @ x[m, k-part p]   # [SPLIT, M, S, R_PAD] fp32
   - small M (decode): ``_multi_lora_shrink_kernel``, one program per (row, slot, k-part), a GEMV on
     CUDA cores; nothing past rank[e] is read, invalid slots read nothing and write zeros.
   - large M (prefill): ``_multi_lora_shrink_grouped_kernel``, tiles of rows grouped by adapter (an
     on-device argsort of idx[:, 0]; rows are gathered through the permutation, x is never
     reordered); per distinct adapter in the tile one tensor-core ``tl.dot(x_tile, A_e^T)``.
2. ``_multi_lora_fwd_kernel``: the GEMM ``x @ W.T`` with ``tl.dot`` (fp32 accumulator), then the
   epilogue: for every distinct adapter e present in the (BLOCK_M rows x S slots) tile,
       acc += tl.dot(h_e, B[e, n_tile, :r_e]^T),   h_e[m] = sum_{s: idx[m,s]=e} h[m, s]
   (h_e rows of other adapters are zero, and their products are masked out, so a NaN / inf adapter
   never reaches a row that did not select it). A tile whose rows share one adapter - every tile of a
   grouped large-M batch but the boundary ones - does one dot; a mixed tile one per adapter it holds
   (decode, BLOCK_M = 16: up to 16 * S gathered B_e[n_tile] tiles, each read once per program, so B
   is read once per used adapter and N-tile: the memory floor). Bias is added and y stored once. The same kernel with no base GEMM, a y input and h[m, e, :] is the expand-only op
   ``multi_lora_expand_triton`` (SpectR's second half).

No host synchronisation (no ``.item()``, no data-dependent shapes): CUDA-graph safe.
Under ``TRITON_INTERPRET=1`` the dots run on fp32 copies (the interpreter's bf16 dot is wrong).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["multi_lora_linear_triton", "multi_lora_expand_triton", "GROUPED_MIN_M"]

_NO_ADAPTER = tl.constexpr(2**31 - 1)  # sentinel id: sorts after every real adapter id
GROUPED_MIN_M = 128      # from this many rows on, rows are grouped by adapter (sort on device)


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
    a_rows = A_ptr + e * stride_ae + rr[:, None] * stride_ar
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        kmask = kk < k_hi
        xv = tl.load(x_ptr + m * stride_xm + kk * stride_xk, mask=kmask, other=0.0)
        a = tl.load(a_rows + kk[None, :] * stride_ak,
                    mask=(rr[:, None] < r_e) & kmask[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
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
    one tl.dot(x_tile, A_e^T) per distinct adapter e of the tile. Grid (cdiv(M, BLOCK_M),)."""
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
                at = tl.load(A_ptr + e64 * stride_ae + rr[None, :] * stride_ar + kk[:, None] * stride_ak,
                             mask=(rr < r_e)[None, :] & kmask[:, None], other=0.0)  # [BLOCK_K, BLOCK_R]
                if DOT_FP32:
                    a = a.to(tl.float32)
                    at = at.to(tl.float32)
                acc = tl.dot(a, at, acc, input_precision=DOT_PRECISION)
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
    M, N, K, S, E, R,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_yim, stride_yin,
    stride_om, stride_on,
    stride_hp, stride_hm, stride_hs, stride_he, stride_hr,
    stride_be, stride_bn, stride_br,
    stride_im, stride_is,
    stride_wm, stride_ws,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_YIN: tl.constexpr, HAS_W: tl.constexpr,
    H_HAS_COEF: tl.constexpr, HAS_PERM: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[rows, n_tile] = x[rows] @ W[n_tile].T (+ y_in) (+ bias) + adapter expand.
    h address: h + p*stride_hp + m*stride_hm + s*stride_hs + e*stride_he + r*stride_hr
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
        rows = offs
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rn_ld = rn % N  # in-bounds columns for unmasked-N loads; discarded at the store
    rk = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BASE:
        x_rows = x_ptr + rows[:, None] * stride_xm
        w_cols = weight_ptr + rn_ld[None, :] * stride_wn
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            kmask = kk < K
            a = tl.load(x_rows + kk[None, :] * stride_xk, mask=mmask[:, None] & kmask[None, :],
                        other=0.0)
            b = tl.load(w_cols + kk[:, None] * stride_wk, mask=kmask[:, None], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    omask = mmask[:, None] & nmask[None, :]
    if HAS_YIN:
        acc += tl.load(yin_ptr + rows[:, None] * stride_yim + rn[None, :] * stride_yin, mask=omask,
                       other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_ld).to(tl.float32)[None, :]

    # ---- epilogue: one tl.dot(h_e, B_e^T) per distinct adapter e in this tile -------------------
    rr = tl.arange(0, BLOCK_R)
    rs = tl.arange(0, BLOCK_S)
    smask = mmask[:, None] & (rs < S)[None, :]
    ids = tl.load(idx_ptr + rows[:, None] * stride_im + rs[None, :] * stride_is, mask=smask,
                  other=-1)
    ids = tl.where((ids >= 0) & (ids < E), ids, _NO_ADAPTER)  # [BLOCK_M, BLOCK_S]
    if not H_HAS_COEF:
        if HAS_W:
            wv = tl.load(w_ptr + rows[:, None] * stride_wm + rs[None, :] * stride_ws, mask=smask,
                         other=0.0).to(tl.float32)
        else:
            wv = tl.full((BLOCK_M, BLOCK_S), 1.0, dtype=tl.float32)
    h_tile = h_ptr + rows[:, None, None] * stride_hm + rs[None, :, None] * stride_hs \
        + rr[None, None, :] * stride_hr                        # [BLOCK_M, BLOCK_S, BLOCK_R]
    b_tile = B_ptr + rr[:, None] * stride_br + rn_ld[None, :] * stride_bn  # [BLOCK_R, BLOCK_N]
    e = tl.min(tl.min(ids, axis=1), axis=0)
    while e < _NO_ADAPTER:
        e64 = e.to(tl.int64)
        r_e = tl.minimum(tl.load(rank_ptr + e64), R)
        if r_e > 0:
            sel = ids == e
            rmask = rr < r_e
            hmask = sel[:, :, None] & rmask[None, None, :]
            hp = h_tile + e64 * stride_he
            hh = tl.load(hp, mask=hmask, other=0.0).to(tl.float32)
            for p in tl.static_range(1, SPLIT):
                hh += tl.load(hp + p * stride_hp, mask=hmask, other=0.0).to(tl.float32)
            if not H_HAS_COEF:
                sc = tl.load(scale_ptr + e64).to(tl.float32)
                hh = hh * tl.where(sel, wv * sc, 0.0)[:, :, None]
            h_e = tl.sum(hh, axis=1)                                   # [BLOCK_M, BLOCK_R]
            b = tl.load(b_tile + e64 * stride_be, mask=rmask[:, None], other=0.0)  # [BLOCK_R, BLOCK_N]
            if DOT_FP32:
                b = b.to(tl.float32)
            else:
                h_e = h_e.to(b.dtype)
            # rows of the tile that do not use e hold h_e = 0, but 0 * (NaN or inf in B_e) is NaN:
            # a tile whose rows all use e (grouped prefill) accumulates in the dot; a mixed tile
            # masks the product, so an adapter never reaches a row that did not select it
            row_use = (tl.max(sel.to(tl.int32), axis=1) > 0) | (offs >= M)
            if tl.min(row_use.to(tl.int32), axis=0) > 0:
                acc = tl.dot(h_e, b, acc, input_precision=DOT_PRECISION)
            else:
                d = tl.dot(h_e, b, input_precision=DOT_PRECISION)
                acc += tl.where(row_use[:, None], d, 0.0)
        e = tl.min(tl.min(tl.where(ids > e, ids, _NO_ADAPTER), axis=1), axis=0)

    tl.store(out_ptr + rows[:, None] * stride_om + rn[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=omask)


# ------------------------------------------------------------------------------------------------
# launchers
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


def gemm_config(M: int, dtype: torch.dtype) -> dict:
    """Block config of ``_multi_lora_fwd_kernel`` for M rows (no autotuning at import time).
    Decode (small M) uses narrow N tiles so W streams through many SMs (N / 32 programs); prefill
    uses 128x128 tiles (64x128 in fp32). Chosen from AOT register/smem reports, not yet timed."""
    if M <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)
    elif M <= 32:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif M <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
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
    return cfg


def shrink_split(M: int, S: int, K: int, BLOCK_K: int) -> int:
    """Split-K factor of the per-row shrink: enough programs to stream A at decode (~128)."""
    split = 1
    while split < 16 and M * S * split * 2 <= 128 and K >= 2 * split * BLOCK_K:
        split *= 2
    return split


def shrink_config(grouped: bool, BLOCK_R: int, dtype: torch.dtype) -> dict:
    """Block config of the shrink kernels. Per-row: a [BLOCK_R, BLOCK_K] tile of A per step
    (~4K elements); grouped: [64 rows, BLOCK_K] x [BLOCK_K, BLOCK_R] tensor-core steps."""
    if grouped:
        return dict(BLOCK_M=64, BLOCK_K=64 if dtype != torch.float32 else 32, num_warps=4,
                    num_stages=3)
    return dict(BLOCK_K=max(32, 4096 // BLOCK_R), num_warps=4, num_stages=1)


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
    """Row order grouped by adapter (slot 0; rows with no adapter last). On device, no sync."""
    key = idx[:, 0]
    key = torch.where((key >= 0) & (key < E), key, torch.full_like(key, E))
    return torch.argsort(key)


def _launch_params(M: int, dtype: torch.dtype, dot_dtype: torch.dtype, config: dict | None,
                   R: int, S: int, E: int):
    """Block config for M rows of ``dtype`` (``config`` overrides), the dot mode for
    ``dot_dtype`` operands, rank and slot blocks, and whether any adapter can apply."""
    cfg = gemm_config(M, dtype)
    if config:
        cfg.update(config)
    dot_fp32, precision = _dot_mode(dot_dtype)
    return (cfg, dot_fp32, precision, _block_r(R), triton.next_power_of_2(max(S, 1)),
            S > 0 and E > 0)


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
    GROUPED_MIN_M); ``config`` overrides keys of :func:`gemm_config`. Both exist for tests/benchmarks.
    """
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
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        _check("out", out, (M, N))
    if M == 0 or N == 0:
        return out
    if K == 0:  # empty reduction: bias only
        return out.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(out))

    cfg, dot_fp32, precision, BLOCK_R, BLOCK_S, has_adapters = _launch_params(
        M, x.dtype, x.dtype, config, R, S, E)
    if grouped is None:
        grouped = M >= GROUPED_MIN_M
    grouped = grouped and has_adapters

    perm = _sort_rows(idx, E) if grouped else None
    if not has_adapters:
        split = 1
        h = torch.empty((1, 1, 1, BLOCK_R), dtype=torch.float32, device=x.device)  # never read
    elif grouped:
        split = 1
        h = torch.empty((1, M, S, BLOCK_R), dtype=torch.float32, device=x.device)
        sc = shrink_config(True, BLOCK_R, x.dtype)
        _multi_lora_shrink_grouped_kernel[(triton.cdiv(M, sc["BLOCK_M"]),)](
            x, A, scale, rank, idx, w if w is not None else scale, h, perm,
            M, K, S, E, R,
            x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2),
            idx.stride(0), idx.stride(1),
            w.stride(0) if w is not None else 0, w.stride(1) if w is not None else 0,
            h.stride(1), h.stride(2),
            HAS_W=w is not None, BLOCK_M=sc["BLOCK_M"], BLOCK_K=sc["BLOCK_K"],
            BLOCK_R=BLOCK_R, BLOCK_S=BLOCK_S, DOT_FP32=dot_fp32, DOT_PRECISION=precision,
            num_warps=sc["num_warps"], num_stages=sc["num_stages"])
    else:
        sc = shrink_config(False, BLOCK_R, x.dtype)
        bk = sc["BLOCK_K"]
        split = cfg.get("SPLIT", shrink_split(M, S, K, bk))
        k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
        h = torch.empty((split, M, S, BLOCK_R), dtype=torch.float32, device=x.device)
        _multi_lora_shrink_kernel[(M * S, split)](
            x, A, scale, rank, idx, w if w is not None else scale, h,
            M, K, S, E, R,
            x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2),
            idx.stride(0), idx.stride(1),
            w.stride(0) if w is not None else 0, w.stride(1) if w is not None else 0,
            h.stride(0), h.stride(1), h.stride(2),
            k_per_split,
            HAS_W=w is not None, BLOCK_R=BLOCK_R, BLOCK_K=bk, num_warps=sc["num_warps"],
            num_stages=sc["num_stages"])

    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _multi_lora_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, x, out,
        h, B, scale, rank, idx, x, perm if perm is not None else idx,
        M, N, K, S if has_adapters else 0, E, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        0, 0, out.stride(0), out.stride(1),
        h.stride(0), h.stride(1), h.stride(2), 0, h.stride(3),
        B.stride(0), B.stride(1), B.stride(2),
        idx.stride(0), idx.stride(1), 0, 0,
        HAS_BASE=True, HAS_BIAS=bias is not None, HAS_YIN=False, HAS_W=False, H_HAS_COEF=True,
        HAS_PERM=perm is not None, SPLIT=split,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=BLOCK_R, BLOCK_S=BLOCK_S, GROUP_M=cfg["GROUP_M"],
        DOT_FP32=dot_fp32, DOT_PRECISION=precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
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
    Returns a new [M, N] tensor in y.dtype (or ``out``). One pass: y read once, out written once.
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
    cfg, dot_fp32, precision, BLOCK_R, BLOCK_S, has_adapters = _launch_params(
        M, y.dtype, B.dtype, config, R, S, E)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _multi_lora_fwd_kernel[grid](
        y, y, y, y, out,
        h, B, scale, rank, idx, w if w is not None else scale, idx,
        M, N, 0, S if has_adapters else 0, E, R,
        0, 0, 0, 0,
        y.stride(0), y.stride(1), out.stride(0), out.stride(1),
        0, h.stride(0), 0, h.stride(1), h.stride(2),
        B.stride(0), B.stride(1), B.stride(2),
        idx.stride(0), idx.stride(1),
        w.stride(0) if w is not None else 0, w.stride(1) if w is not None else 0,
        HAS_BASE=False, HAS_BIAS=False, HAS_YIN=True, HAS_W=w is not None, H_HAS_COEF=False,
        HAS_PERM=False, SPLIT=1,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=16,
        BLOCK_R=BLOCK_R, BLOCK_S=BLOCK_S, GROUP_M=cfg["GROUP_M"],
        DOT_FP32=dot_fp32, DOT_PRECISION=precision,
        num_warps=cfg["num_warps"], num_stages=1)
    return out
