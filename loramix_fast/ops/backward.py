"""Backward of every op (DESIGN.md "Training"), registered with ``torch.library.register_autograd``
so eager autograd, ``torch.autograd.gradcheck`` and ``torch.compile`` (AOTAutograd traces these
backward functions) agree.

What has a gradient:
    multi_lora_linear   x, weight, A, B, bias, w        (scale, rank, idx: none)
    multi_lora_expand   y, h, B, w                     (scale, rank, idx: none)
    mix_logits          logits, weights (both modes)
    spectr_topk         h, through the weights (softmax weighting) and the scores; the top-k
                        indices are integers, and uniform weights are constants (no gradient)

Operation 1, c[m,s] = w[m,s] * scale[e], h[m,s] = A_e x[m], g[m,s] = B_e^T dy[m] (e = idx[m,s]):

    dx[m]    = dy[m] W + sum_s c A_e^T g[m,s]        dA_e = sum_{(m,s): e} c g x[m]^T
    dB_e     = sum_{(m,s): e} c dy[m] h[m,s]^T       dw[m,s] = scale_e g[m,s] . h[m,s]

The (row, slot) pairs are sorted by adapter once (a counting sort in C++, argsort + counts in
torch) and every adapter's rows become dense GEMMs on gathered row blocks: A_e and B_e are sliced
to the adapter's rank and read in place, never copied per row, and nothing of size M x N x R
exists. With grad enabled the forward runs ``loramix::multi_lora_linear_train``, which returns
the shrink output h [M, S, R] (fp32; fp64 for fp64 inputs) next to y; saved for the backward:
x (only when A or weight needs a gradient), h, and the inputs themselves (weight, the stacks,
ids). ``loramix::multi_lora_linear`` (the inference op) has the same backward, recomputing h.

Backends: CPU -> C++ (csrc/multi_lora_backward.cpp: the training forward, the backward of
operations 1 and the expand); Triton (GPUs): dx is operation 1 itself with A and B swapped
(``dx_by_forward``: the forward's kernels, base GEMM and delta fused), the training forward's h
and the grouped dA / dB / dw in the torch formulation (one host sync per op for the group sizes;
no Triton kernel of their own yet); the torch formulation in this file everywhere else: the
"reference" backend, and the backward of ``mix_logits`` and ``spectr_topk`` on every backend
(elementwise work over tensors the forward already holds).
"""
from __future__ import annotations

import torch

from . import multi_lora as _multi_lora_module
from ._dispatch import pick_backend
from .mix_logits import _mix_logits_op
from .multi_lora import _multi_lora_expand_op, _multi_lora_linear_op
from .spectr import _spectr_topk_op

__all__ = ["multi_lora_linear_train", "linear_fwd_torch", "linear_bwd_torch", "dx_by_forward",
           "expand_bwd_torch", "mix_logits_bwd_torch", "spectr_topk_bwd"]


def _acc(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def _none(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0)


# ---- torch formulation: pairs grouped by adapter ----------------------------------------------

def _groups(idx: torch.Tensor, rank: torch.Tensor, E: int):
    """Pairs (m, s) with an adapter of rank > 0, sorted by adapter: ``(order [P] long: flat ids
    m*S + s, [(adapter, rank, begin, count)])``. One host sync (the group sizes and ranks)."""
    flat = idx.reshape(-1).long()
    rk = rank.to(device=idx.device, dtype=torch.long)
    valid = (flat >= 0) & (flat < E)  # ids outside [0, E) count as "no adapter" (GPU semantics)
    ec = torch.where(valid, flat, torch.zeros_like(flat))
    valid &= rk[ec] > 0
    key = torch.where(valid, flat, torch.full_like(flat, E))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=E + 1)[:E]
    info = torch.cat([counts, rk]).tolist()
    groups, b = [], 0
    for e in range(E):
        c = info[e]
        if c:
            groups.append((e, info[E + e], b, c))
            b += c
    return order[:b], groups


def linear_fwd_torch(x, weight, A, B, scale, rank, idx, w, bias):
    """(y, h) of operation 1 by grouped GEMMs: y as ``reference.multi_lora_linear``, h [M, S, R]
    (fp32 / fp64) = A_e[:rank] x[m] for every slot with an adapter, 0 elsewhere."""
    acc = _acc(x.dtype)
    M = x.shape[0]
    E, R = A.shape[0], A.shape[1]
    S = idx.shape[1]
    y = torch.nn.functional.linear(x, weight, bias)
    h = x.new_zeros((M * S, R), dtype=acc)
    if M == 0 or E == 0 or R == 0 or S == 0 or y.shape[1] == 0:
        return y, h.view(M, S, R)
    order, groups = _groups(idx, rank, E)
    if not groups:
        return y, h.view(M, S, R)
    ya = y.to(acc)
    sc = scale.to(acc)
    wf = w.reshape(-1).to(acc) if w is not None else None
    for e, r, b, c in groups:
        p = order[b:b + c]
        rows = torch.div(p, S, rounding_mode="floor") if S > 1 else p
        xg = x.index_select(0, rows).to(acc)
        hg = xg @ A[e, :r].to(acc).T  # [c, r]
        h[p, :r] = hg
        coef = sc[e] if wf is None else sc[e] * wf[p][:, None]
        ya.index_add_(0, rows, (hg @ B[e, :, :r].to(acc).T) * coef)  # peft's rounding order
    return ya.to(x.dtype), h.view(M, S, R)


def linear_bwd_torch(dy, x, h, weight, A, B, scale, rank, idx, w, need_x, need_A, need_B, need_w):
    """(dx in x's dtype, dA [E, R, K], dB [E, N, R], dw [M, S] in fp32 / fp64) of operation 1;
    [0] tensors for gradients not asked for. h None: recomputed from x."""
    acc = _acc(x.dtype)
    M, K = x.shape
    N = weight.shape[0]
    E, R = A.shape[0], A.shape[1]
    S = idx.shape[1]
    need_w = need_w and w is not None
    dy = dy.to(x.dtype)
    dx = dy @ weight if need_x else _none(x)
    dA = x.new_zeros((E, R, K), dtype=acc) if need_A else _none(x).to(acc)
    dB = x.new_zeros((E, N, R), dtype=acc) if need_B else _none(x).to(acc)
    dw = x.new_zeros((M * S,), dtype=acc) if need_w else _none(x).to(acc)
    if M == 0 or E == 0 or R == 0 or S == 0 or not (need_x or need_A or need_B or need_w):
        return dx, dA, dB, dw.view(M, S) if need_w else dw
    order, groups = _groups(idx, rank, E)
    dxa = dx.to(acc) if need_x else None
    sc = scale.to(acc)
    wf = w.reshape(-1).to(acc) if w is not None else None
    hf = h.reshape(M * S, R).to(acc) if h is not None else None
    for e, r, b, c in groups:
        p = order[b:b + c]
        rows = torch.div(p, S, rounding_mode="floor") if S > 1 else p
        Ae, Be = A[e, :r].to(acc), B[e, :, :r].to(acc)
        # peft's rounding order: scale_e multiplies dy, the slot weights the rank-r factors
        dyg = dy.index_select(0, rows).to(acc) * sc[e]  # [c, N]
        xg = x.index_select(0, rows).to(acc) if need_A or (hf is None and (need_B or need_w)) \
            else None
        hg = None
        if need_B or need_w:
            hg = hf[p, :r] if hf is not None else xg @ Ae.T
        wp = wf[p][:, None] if wf is not None else None
        if need_x or need_A or need_w:
            gs = dyg @ Be  # [c, r] = scale_e g
            if need_w:
                dw[p] = (gs * hg).sum(1)
            gc = gs * wp if wp is not None else gs
            if need_x:
                dxa.index_add_(0, rows, gc @ Ae)
            if need_A:
                dA[e, :r] += gc.T @ xg
        if need_B:
            dB[e, :, :r] += dyg.T @ (hg * wp if wp is not None else hg)
    if need_x:
        dx = dxa.to(x.dtype)
    return dx, dA, dB, dw.view(M, S) if need_w else dw


def dx_by_forward(backend, dy, weight, A, B, scale, rank, idx, w):
    """dx [M, K] = dy W + sum_s c[m,s] A_e^T (B_e^T dy[m]) as operation 1 itself with the roles of
    A and B swapped: ``multi_lora_linear(dy, W^T, B^T [E, R, N], A^T [E, K, R])`` on ``backend``
    (the Triton forward kernels on GPUs: the base GEMM and the delta in one kernel, one rounding).
    The swapped stacks are copied once (E x R x (K + N) values), never per row."""
    dy = dy.to(weight.dtype)
    return _multi_lora_module._run(backend, dy, weight.t(), B.transpose(1, 2).contiguous(),
                                   A.transpose(1, 2).contiguous(), scale, rank, idx, w, None)


def expand_bwd_torch(dout, h, B, scale, rank, idx, w, need_h, need_B, need_w):
    """(dh [M, E, R], dB [E, N, R], dw [M, S]) of ``multi_lora_expand`` in fp32 / fp64 (the
    accumulation type of y); [0] tensors for gradients not asked for."""
    acc = _acc(dout.dtype)
    M, N = dout.shape
    E, R = B.shape[0], B.shape[2]
    S = idx.shape[1]
    need_w = need_w and w is not None
    dh = dout.new_zeros((M, E, R), dtype=acc) if need_h else _none(dout).to(acc)
    dB = dout.new_zeros((E, N, R), dtype=acc) if need_B else _none(dout).to(acc)
    dw = dout.new_zeros((M * S,), dtype=acc) if need_w else _none(dout).to(acc)
    if M == 0 or E == 0 or R == 0 or S == 0 or not (need_h or need_B or need_w):
        return dh, dB, dw.view(M, S) if need_w else dw
    order, groups = _groups(idx, rank, E)
    sc = scale.to(acc)
    wf = w.reshape(-1).to(acc) if w is not None else None
    for e, r, b, c in groups:
        p = order[b:b + c]
        rows = torch.div(p, S, rounding_mode="floor") if S > 1 else p
        Be = B[e, :, :r].to(acc)
        dg = dout.index_select(0, rows).to(acc) * sc[e]
        hg = h[rows, e, :r].to(acc) if (need_B or need_w) else None
        wp = wf[p][:, None] if wf is not None else None
        if need_h or need_w:
            gs = dg @ Be  # scale_e B_e^T dout
            if need_w:
                dw[p] = (gs * hg).sum(1)
            if need_h:
                dh[:, e, :r].index_add_(0, rows, gs * wp if wp is not None else gs)
        if need_B:
            dB[e, :, :r] += dg.T @ (hg * wp if wp is not None else hg)
    return dh, dB, dw.view(M, S) if need_w else dw


def mix_logits_bwd_torch(grad, logits, weights, out, mode):
    """(d logits [B, E, V] in logits' dtype, d weights [B, E] in weights' dtype) of
    ``mix_logits`` given the forward's output ``out``. Unused experts (weight 0; in "probs" weight
    <= 0) get no gradient, their weight neither (the op never reads them)."""
    z = logits.to(torch.float32)
    wt = weights.to(torch.float32)
    g = grad.to(torch.float32)
    zero = torch.zeros((), dtype=torch.float32, device=z.device)
    if mode == "logits":
        use = wt != 0
        dz = torch.where(use[..., None], wt[..., None] * g[:, None, :], zero)
        dw = torch.where(use, (g[:, None, :] * z).sum(-1), zero)
        return dz.to(logits.dtype), dw.to(weights.dtype)
    Bn, E, V = z.shape
    if V == 0 or E == 0 or Bn == 0:
        return torch.zeros_like(logits), torch.zeros_like(weights)
    use = wt > 0
    top = torch.finfo(torch.float32).max
    pinf = z == float("inf")
    zz = torch.where(pinf, top, z)
    m = zz.amax(dim=-1, keepdim=True)
    dead = m == float("-inf")
    zc = zz - torch.where(dead, torch.zeros_like(m), m)
    zc = torch.where((m == top) & (zz != top), float("-inf"), zc)
    logS = torch.log(torch.exp(zc).sum(dim=-1, keepdim=True))
    p = torch.exp(zc - logS)  # each expert's softmax
    live = use[..., None] & ~dead
    logw = torch.log(torch.where(use, wt, torch.ones_like(wt)))
    terms = zc - logS + logw[..., None]
    # responsibility of expert e for token v: q = w_e p_e[v] / sum_e' w_e' p_e'[v]
    q = torch.where(live & (terms > float("-inf")), torch.exp(terms - out[:, None, :]), zero)
    G = g[:, None, :] * q
    sG = G.sum(-1)  # [B, E]
    dz = torch.where(live & ~pinf, G - p * sG[..., None], zero)
    dw = torch.where(use & ~dead[..., 0], sG / torch.where(use, wt, torch.ones_like(wt)), zero)
    return dz.to(logits.dtype), dw.to(weights.dtype)


def spectr_topk_bwd(gw, gs, h, idx, w, rank, score, score_scale, weighting, temperature):
    """d h [M, T, R] of ``spectr_topk`` from the gradients of its weights ``gw [M, k]`` and
    scores ``gs [M, T]``: softmax weights pass their gradient to the selected experts' scores
    (uniform weights are constants), and each score to its h (score 0: subgradient 0)."""
    M, T, R = h.shape
    acc = _acc(h.dtype)
    ds = gs.to(acc) if gs is not None else h.new_zeros((M, T), dtype=acc)
    if weighting == "softmax" and gw is not None and idx.shape[1] and M:
        wa = w.to(acc)
        gwa = gw.to(acc)
        dzs = wa * (gwa - (wa * gwa).sum(1, keepdim=True)) / temperature
        valid = idx >= 0
        sel = torch.where(valid, idx.long(), torch.zeros_like(idx, dtype=torch.long))
        ds = ds.clone() if gs is not None else ds
        ds.scatter_add_(1, sel, torch.where(valid, dzs, torch.zeros_like(dzs)))
    hh = h.to(acc)
    zero = torch.zeros((), dtype=acc, device=h.device)
    if rank is None:
        rank = torch.full((T,), R, dtype=torch.long, device=h.device)
    if score == "norm":
        rmask = torch.arange(R, device=h.device)[None, :] < rank.to(h.device)[:, None]  # [T, R]
        hm = torch.where(rmask[None], hh, zero)
        s = torch.sqrt((hm * hm).sum(-1, keepdim=True))
        dh = torch.where(s > 0, hm * (ds[..., None] / torch.where(s > 0, s, torch.ones_like(s))),
                         zero)
    else:
        d0 = ds * torch.sign(hh[:, :, 0])
        if score_scale is not None:
            d0 = d0 * score_scale.to(acc)
        dh = torch.zeros_like(hh)
        dh[:, :, 0] = d0
    return dh.to(h.dtype)


# ---- custom ops: the training forward and the heavy halves of the backward --------------------

def _train_fwd(backend, x, weight, A, B, scale, rank, idx, w, bias):
    if backend == "cpp":
        return torch.ops.loramix_cpp.multi_lora_linear_fwd(x, weight, A, B, scale, rank, idx, w, bias)
    return linear_fwd_torch(x, weight, A, B, scale, rank, idx, w, bias)


@torch.library.custom_op("loramix::multi_lora_linear_train", mutates_args=())
def multi_lora_linear_train(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                            B: torch.Tensor, scale: torch.Tensor, rank: torch.Tensor,
                            idx: torch.Tensor, w: torch.Tensor | None, bias: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``multi_lora_linear`` that also returns the shrink output h [M, S, R] (fp32 / fp64),
    saved for its backward. What the public op runs when an input requires grad."""
    y, h = _train_fwd(pick_backend(x, "multi_lora_linear_fwd"), x, weight, A, B, scale, rank, idx,
                      w, bias)
    return y, h


_multi_lora_module._train_op = multi_lora_linear_train


@multi_lora_linear_train.register_fake
def _(x, weight, A, B, scale, rank, idx, w, bias):
    M, S, R = x.shape[0], idx.shape[1], A.shape[1]
    return x.new_empty((M, weight.shape[0])), x.new_empty((M, S, R), dtype=_acc(x.dtype))


@torch.library.custom_op("loramix::multi_lora_linear_backward", mutates_args=())
def _linear_backward_op(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None,
                        weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        scale: torch.Tensor, rank: torch.Tensor, idx: torch.Tensor,
                        w: torch.Tensor | None, need_x: bool, need_A: bool, need_B: bool,
                        need_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor]:
    backend = pick_backend(x, "multi_lora_linear_bwd")
    if backend == "cpp":
        out = torch.ops.loramix_cpp.multi_lora_linear_bwd(dy, x, h, weight, A, B, scale, rank, idx,
                                                          w, need_x, need_A, need_B, need_w)
    elif backend == "triton" and need_x:  # dx by the forward's kernels, the rest grouped in torch
        dx = dx_by_forward(backend, dy, weight, A, B, scale, rank, idx, w)
        out = (dx,) + tuple(linear_bwd_torch(dy, x, h, weight, A, B, scale, rank, idx, w, False,
                                             need_A, need_B, need_w)[1:])
    else:
        out = linear_bwd_torch(dy, x, h, weight, A, B, scale, rank, idx, w, need_x, need_A, need_B,
                               need_w)
    return tuple(out)


@_linear_backward_op.register_fake
def _(dy, x, h, weight, A, B, scale, rank, idx, w, need_x, need_A, need_B, need_w):
    acc = _acc(x.dtype)
    M, K = x.shape
    N = weight.shape[0]
    E, R = A.shape[0], A.shape[1]
    S = idx.shape[1]
    need_w = need_w and w is not None
    return (x.new_empty((M, K)) if need_x else x.new_empty(0),
            x.new_empty((E, R, K), dtype=acc) if need_A else x.new_empty(0, dtype=acc),
            x.new_empty((E, N, R), dtype=acc) if need_B else x.new_empty(0, dtype=acc),
            x.new_empty((M, S), dtype=acc) if need_w else x.new_empty(0, dtype=acc))


@torch.library.custom_op("loramix::multi_lora_expand_backward", mutates_args=())
def _expand_backward_op(dout: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                        rank: torch.Tensor, idx: torch.Tensor, w: torch.Tensor | None,
                        need_h: bool, need_B: bool, need_w: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if pick_backend(dout, "multi_lora_expand_bwd") == "cpp":
        out = torch.ops.loramix_cpp.multi_lora_expand_bwd(dout, h, B, scale, rank, idx, w, need_h,
                                                          need_B, need_w)
    else:
        out = expand_bwd_torch(dout, h, B, scale, rank, idx, w, need_h, need_B, need_w)
    return tuple(out)


@_expand_backward_op.register_fake
def _(dout, h, B, scale, rank, idx, w, need_h, need_B, need_w):
    acc = _acc(dout.dtype)
    M, N = dout.shape
    E, R = B.shape[0], B.shape[2]
    need_w = need_w and w is not None
    return (dout.new_empty((M, E, R), dtype=acc) if need_h else dout.new_empty(0, dtype=acc),
            dout.new_empty((E, N, R), dtype=acc) if need_B else dout.new_empty(0, dtype=acc),
            dout.new_empty((M, idx.shape[1]), dtype=acc) if need_w else dout.new_empty(0, dtype=acc))


@torch.library.custom_op("loramix::mix_logits_backward", mutates_args=())
def _mix_backward_op(grad: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor,
                     out: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    return mix_logits_bwd_torch(grad, logits, weights, out, mode)


@_mix_backward_op.register_fake
def _(grad, logits, weights, out, mode):
    return torch.empty_like(logits), torch.empty_like(weights)


# ---- autograd registrations --------------------------------------------------------------------

def _opt(t, need, like):
    return t.to(like.dtype) if need else None


def _linear_setup(ctx, inputs, output):
    x, weight, A, B, scale, rank, idx, w, bias = inputs
    n = ctx.needs_input_grad
    need_x, need_W, need_A, need_B = n[0], n[1], n[2], n[3]
    need_w = w is not None and n[7]
    h = output[1] if isinstance(output, (tuple, list)) else None
    if h is not None:
        ctx.mark_non_differentiable(h)
    keep_x = need_A or need_W or (h is None and (need_B or need_w))
    ctx.save_for_backward(x if keep_x else None, h, weight if need_x else None, A, B, scale,
                          rank, idx, w)
    ctx.shape_x = tuple(x.shape)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _linear_backward(ctx, dy, *_):
    x, h, weight, A, B, scale, rank, idx, w = ctx.saved_tensors
    n = ctx.needs_input_grad
    need_x, need_W, need_A, need_B, need_bias = n[0], n[1], n[2], n[3], n[8]
    need_w = w is not None and n[7]
    M, K = ctx.shape_x
    if dy is None:
        return (None,) * 9
    if not (need_x or need_A or need_B or need_w or need_W or need_bias):
        return (None,) * 9
    xs = x if x is not None else dy.new_zeros(()).to(ctx.x_dtype).expand(M, K)
    ws = weight if weight is not None else A.new_zeros(()).expand(dy.shape[1], K)
    dx = dA = dB = dw = None
    if need_x or need_A or need_B or need_w:
        dx, dA, dB, dw = _linear_backward_op(dy, xs, h, ws, A, B, scale, rank, idx, w, need_x,
                                             need_A, need_B, need_w)
        dx = dx if need_x else None
        dA, dB = _opt(dA, need_A, A), _opt(dB, need_B, B)
        dw = _opt(dw, need_w, w) if need_w else None
    dW = (dy.to(ctx.x_dtype).t() @ x) if need_W else None
    db = dy.sum(0).to(ctx.x_dtype) if need_bias and ctx.has_bias else None
    return dx, dW, dA, dB, None, None, None, dw, db


torch.library.register_autograd("loramix::multi_lora_linear_train", _linear_backward,
                                setup_context=_linear_setup)
torch.library.register_autograd(_multi_lora_linear_op, _linear_backward,
                                setup_context=_linear_setup)


def _expand_setup(ctx, inputs, output):
    y, h, B, scale, rank, idx, w = inputs
    n = ctx.needs_input_grad
    ctx.save_for_backward(h, B, scale, rank, idx, w)
    ctx.y_dtype = y.dtype


def _expand_backward(ctx, dout):
    h, B, scale, rank, idx, w = ctx.saved_tensors
    n = ctx.needs_input_grad
    need_y, need_h, need_B = n[0], n[1], n[2]
    need_w = w is not None and n[6]
    dy = dout.to(ctx.y_dtype) if need_y else None
    dh = dB = dw = None
    if need_h or need_B or need_w:
        dh, dB, dw = _expand_backward_op(dout, h, B, scale, rank, idx, w, need_h, need_B, need_w)
        dh, dB = _opt(dh, need_h, h), _opt(dB, need_B, B)
        dw = _opt(dw, need_w, w) if need_w else None
    return dy, dh, dB, None, None, None, dw


torch.library.register_autograd(_multi_lora_expand_op, _expand_backward,
                                setup_context=_expand_setup)


def _mix_setup(ctx, inputs, output):
    logits, weights, mode = inputs
    ctx.save_for_backward(logits, weights, output)
    ctx.mode = mode


def _mix_backward(ctx, grad):
    logits, weights, out = ctx.saved_tensors
    dz, dw = _mix_backward_op(grad, logits, weights, out, ctx.mode)
    n = ctx.needs_input_grad
    return dz if n[0] else None, dw if n[1] else None, None


torch.library.register_autograd(_mix_logits_op, _mix_backward, setup_context=_mix_setup)


def _spectr_setup(ctx, inputs, output):
    h, k, rank, score, score_scale, weighting, temperature = inputs
    idx, w, s = output
    ctx.mark_non_differentiable(idx)
    ctx.save_for_backward(h, idx, w, rank, score_scale)
    ctx.args = (score, weighting, temperature)


def _spectr_backward(ctx, g_idx, gw, gs):
    h, idx, w, rank, score_scale = ctx.saved_tensors
    score, weighting, temperature = ctx.args
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    dh = spectr_topk_bwd(gw, gs, h, idx, w, rank, score, score_scale, weighting, temperature)
    return dh, None, None, None, None, None, None


torch.library.register_autograd(_spectr_topk_op, _spectr_backward, setup_context=_spectr_setup)
