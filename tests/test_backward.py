"""Backward of every op (issue 9 item 1).

- ``torch.autograd.gradcheck`` in fp64 of multi_lora_linear (the training op and the plain custom
  op), multi_lora_expand, mix_logits (both modes) and spectr_topk (weights and scores), on the
  reference and the C++ backend (LORAMIX_BACKEND): random shapes, unequal ranks (0 included),
  -1 slots, S > 1 with weights, a row using one adapter in two slots, non-contiguous inputs,
  empty batches.
- fp32 (and bf16 for operation 1) gradients of the kernels against an fp64 oracle (autograd
  through ``reference``), within flash-attention's rule: at most 2x the error of plain torch (the
  reference's own autograd at the same dtype) plus a few ulps of the gradient's scale.
- torch.compile of a training step through all four ops agrees with eager.
- memory saved for backward is x and h [M, S, R] (plus the inputs themselves), never M x N x R.
"""
from __future__ import annotations

import pytest
import torch

from loramix_fast import _cpp, ops, reference

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (conftest.py)


@pytest.fixture(params=["reference", "cpp"])
def backend(request, monkeypatch):
    if request.param == "cpp" and not _cpp.load():
        pytest.skip(f"C++ extension unavailable: {_cpp.load_error()}")
    monkeypatch.setenv("LORAMIX_BACKEND", request.param)
    return request.param


# ---- inputs ------------------------------------------------------------------------------------
def _strided(shape, layout, g, dtype):
    """A tensor of ``shape`` laid out contiguous, transposed (2-D / last two dims), with every
    other element of a wider buffer along the last dim ("strided") or as a column slice of a
    wider buffer ("wide": unit last stride, a larger row stride)."""
    if layout == "transposed":
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g, dtype=F64).transpose(-1, -2)
    elif layout == "strided":
        t = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=F64)[..., ::2]
    elif layout == "wide":  # unit last stride, rows further apart (a column slice of a buffer)
        t = torch.randn(*shape[:-1], shape[-1] + 3, generator=g, dtype=F64)[..., 3:]
    else:
        t = torch.randn(*shape, generator=g, dtype=F64)
    return t.to(dtype)


def lora_case(M, K, N, E, R, S=1, ranks=None, none_frac=0.2, weights=False, bias=True,
              layout="contiguous", dup=False, dtype=F64, seed=0, pop=None, blocks=False):
    """Inputs of operation 1 in fp64 (or ``dtype``). ``blocks``: slot 0's ids sorted over the
    rows, so each adapter's rows are one consecutive run (a batch whose sequences each train one
    adapter: the C++ kernels' view path, no gathers)."""
    g = torch.Generator().manual_seed(seed)
    x = _strided((M, K), layout, g, dtype)
    W = _strided((N, K), "transposed" if layout != "contiguous" else "contiguous", g, dtype)
    A = _strided((E, R, K), "strided" if layout != "contiguous" else "contiguous", g, dtype)
    B = _strided((E, N, R), "transposed" if layout == "transposed" else layout, g, dtype)
    scale = torch.rand(E, generator=g, dtype=F64).to(dtype) + 0.5
    rank = torch.tensor(ranks if ranks is not None else [R] * E, dtype=torch.int32)
    if pop is not None:
        idx = torch.multinomial(torch.tensor(pop, dtype=F64), M * S, replacement=True,
                                generator=g).view(M, S).to(torch.int32)
    else:
        idx = torch.randint(0, max(E, 1), (M, S), generator=g, dtype=torch.int32)
    idx[torch.rand(M, S, generator=g) < none_frac] = -1
    if E == 0:
        idx.fill_(-1)
    if dup and S > 1:
        idx[::2, 1] = idx[::2, 0]  # the same adapter in two slots of one row
    if blocks:
        idx[:, 0] = idx[:, 0].sort().values
    w = (torch.rand(M, S, generator=g, dtype=F64) + 0.25).to(dtype) if weights else None
    b = torch.randn(N, generator=g, dtype=F64).to(dtype) if bias else None
    return dict(x=x, weight=W, A=A, B=B, scale=scale, rank=rank, idx=idx, w=w, bias=b)


DIFF = ("x", "weight", "A", "B", "w", "bias")


def _grad_inputs(c):
    names = [n for n in DIFF if c[n] is not None]
    return names, [c[n].detach().clone().requires_grad_(True) for n in names]


def _linear_fn(c, names, op="public"):
    def f(*ts):
        kw = dict(c)
        kw.update(zip(names, ts))
        if op == "public":
            return ops.multi_lora_linear(kw["x"], kw["weight"], kw["A"], kw["B"], kw["scale"],
                                         kw["rank"], kw["idx"], kw["w"], kw["bias"])
        return torch.ops.loramix.multi_lora_linear(kw["x"], kw["weight"], kw["A"], kw["B"],
                                                   kw["scale"], kw["rank"], kw["idx"], kw["w"],
                                                   kw["bias"])
    return f


LINEAR_CASES = {
    "S1_unequal_ranks": dict(M=7, K=6, N=5, E=3, R=4, ranks=[4, 2, 3]),
    "S3_w_rank0": dict(M=6, K=5, N=4, E=4, R=3, S=3, ranks=[3, 0, 1, 2], weights=True,
                       bias=False),
    "S2_w_dup_slots": dict(M=6, K=4, N=5, E=2, R=3, S=2, ranks=[3, 2], weights=True, dup=True,
                           none_frac=0.0),
    "transposed_inputs": dict(M=5, K=6, N=4, E=3, R=2, S=2, weights=True, layout="transposed"),
    "strided_inputs": dict(M=5, K=4, N=6, E=2, R=3, weights=True, layout="strided"),
    "S1_row_blocks": dict(M=9, K=5, N=4, E=3, R=3, ranks=[3, 1, 3], blocks=True),
    "S1_row_blocks_w_strided": dict(M=8, K=4, N=5, E=2, R=2, weights=True, blocks=True,
                                    layout="strided"),
    "S2_row_blocks_w": dict(M=7, K=4, N=3, E=3, R=2, S=2, weights=True, blocks=True),
    "S1_row_blocks_wide_rows": dict(M=8, K=5, N=4, E=2, R=3, ranks=[3, 2], blocks=True,
                                    layout="wide"),
    "all_none": dict(M=4, K=3, N=3, E=2, R=2, none_frac=1.0),
    "E0": dict(M=3, K=3, N=2, E=0, R=2),
    "M0": dict(M=0, K=4, N=3, E=2, R=2, S=2, weights=True),
}
for _s in range(3):  # random shapes
    _g = torch.Generator().manual_seed(100 + _s)
    _r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=_g))  # noqa: E731
    _E, _R = _r(1, 4), _r(1, 4)
    LINEAR_CASES[f"random_{_s}"] = dict(M=_r(1, 8), K=_r(1, 7), N=_r(1, 7), E=_E, R=_R,
                                        S=_r(1, 3), ranks=[_r(0, _R) for _ in range(_E)],
                                        weights=bool(_s % 2), seed=_s)


@pytest.mark.parametrize("name", list(LINEAR_CASES))
def test_gradcheck_multi_lora_linear(backend, name):
    c = lora_case(**LINEAR_CASES[name])
    names, ins = _grad_inputs(c)
    f = _linear_fn(c, names)
    y = f(*ins)
    assert "multi_lora_linear_train" in type(y.grad_fn).__name__  # the op's own backward
    assert torch.autograd.gradcheck(f, ins, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", ["S3_w_rank0", "transposed_inputs", "M0"])
def test_gradcheck_plain_custom_op(backend, name):
    """torch.ops.loramix.multi_lora_linear (what a compiled inference graph holds) has the same
    backward, recomputing h from x."""
    c = lora_case(**LINEAR_CASES[name])
    names, ins = _grad_inputs(c)
    assert torch.autograd.gradcheck(_linear_fn(c, names, op="custom"), ins, atol=1e-7, rtol=1e-6)


def test_partial_gradients(backend):
    """Only what requires grad is computed; frozen weight and bias get none, x is not saved when
    neither A nor weight needs a gradient."""
    c = lora_case(M=9, K=6, N=5, E=3, R=4, S=2, weights=True)
    x = c["x"].clone().requires_grad_(True)
    B = c["B"].clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ops.multi_lora_linear(x, c["weight"], c["A"], B, c["scale"], c["rank"], c["idx"],
                                  c["w"], c["bias"])
    assert not any(t.data_ptr() == x.data_ptr() and t.shape == x.shape for t in saved)
    gx, gB = torch.autograd.grad(y.square().sum(), (x, B))
    xr, Br = c["x"].clone().requires_grad_(True), c["B"].clone().requires_grad_(True)
    yr = reference.multi_lora_linear(xr, c["weight"], c["A"], Br, c["scale"], c["rank"],
                                     c["idx"], c["w"], c["bias"])
    rx, rB = torch.autograd.grad(yr.square().sum(), (xr, Br))
    torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gB, rB, rtol=1e-10, atol=1e-10)


def test_empty_batch_backward(backend):
    c = lora_case(M=0, K=4, N=3, E=2, R=2, S=2, weights=True)
    names, ins = _grad_inputs(c)
    y = _linear_fn(c, names)(*ins)
    assert y.shape == (0, 3)
    grads = torch.autograd.grad(y.sum(), ins, allow_unused=True)
    for t, gr in zip(ins, grads):
        assert gr is None or (gr.shape == t.shape and not gr.abs().any())


# ---- fp32 / bf16: kernels vs plain torch vs an fp64 oracle -----------------------------------------
def _ref_grads(c, dtype, dy):
    """Gradients of <dy, y> through the differentiable reference, inputs in ``dtype``."""
    names, ins = _grad_inputs({k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                                   and k != "scale" else v) for k, v in c.items()})
    kw = dict(c)
    kw.update(zip(names, ins))
    y = reference.multi_lora_linear(kw["x"], kw["weight"], kw["A"], kw["B"], c["scale"].to(dtype),
                                    kw["rank"], kw["idx"], kw["w"], kw["bias"])
    return names, torch.autograd.grad(y, ins, dy.to(y.dtype))


def _op_grads(c, dtype, dy):
    cc = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
          for k, v in c.items()}
    names, ins = _grad_inputs(cc)
    y = _linear_fn(cc, names)(*ins)
    return names, torch.autograd.grad(y, ins, dy.to(y.dtype))


def _check_rule(got, plain, oracle, what, ulps=8):
    for n, g, p, o in zip(*got, plain[1], oracle[1]):
        o = o.double()
        err, err_torch = (g.double() - o).abs().max().item(), (p.double() - o).abs().max().item()
        floor = ulps * torch.finfo(g.dtype).eps * max(o.abs().max().item(), 1e-30)
        assert err <= 2 * err_torch + floor, (what, n, err, err_torch, floor)


PREC_CASES = {
    "prefill_zipf_S2_w": dict(M=1400, K=48, N=40, E=3, R=8, S=2, ranks=[8, 5, 3], weights=True,
                              pop=[0.85, 0.1, 0.05], none_frac=0.1),
    "decode_S1": dict(M=12, K=64, N=80, E=6, R=16, ranks=[16, 8, 1, 16, 0, 4]),
    "prefill_row_blocks_S1": dict(M=1400, K=48, N=40, E=3, R=8, ranks=[8, 5, 8], blocks=True,
                                  none_frac=0.1),
    "rank_gt16_strided": dict(M=40, K=33, N=50, E=3, R=40, ranks=[40, 17, 33], S=3, weights=True,
                              layout="transposed"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(PREC_CASES))
def test_linear_grads_within_2x_of_plain_torch(backend, name, dtype):
    c = lora_case(**PREC_CASES[name])
    M, N = c["x"].shape[0], c["weight"].shape[0]
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(7), dtype=F64)
    oracle = _ref_grads(c, F64, dy)
    plain = _ref_grads(c, dtype, dy.to(dtype))
    got = _op_grads(c, dtype, dy.to(dtype))
    _check_rule(got, plain, oracle, (name, dtype))


@pytest.mark.parametrize("S,blocks", [(1, False), (2, False), (1, True)])
def test_cpp_kernels_with_threads_match_the_torch_formulation(S, blocks):
    """The C++ kernels' parallel paths (several chunks per adapter, per-chunk partial sums, the
    S > 1 scatter buffers, row runs read and written in place) on two threads give the torch
    formulation's gradients."""
    if not _cpp.load():
        pytest.skip(f"C++ extension unavailable: {_cpp.load_error()}")
    from loramix_fast.ops import backward as bw

    c = lora_case(M=1600, K=40, N=36, E=3, R=8, S=S, ranks=[8, 5, 3], weights=S > 1,
                  pop=[0.8, 0.15, 0.05], none_frac=0.05, dtype=torch.float32, blocks=blocks)
    args = [c[n] for n in ("x", "weight", "A", "B", "scale", "rank", "idx", "w", "bias")]
    dy = torch.randn(1600, 36, generator=torch.Generator().manual_seed(4))
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y, h = torch.ops.loramix_cpp.multi_lora_linear_fwd(*args)
        got = torch.ops.loramix_cpp.multi_lora_linear_bwd(dy, c["x"], h, c["weight"], c["A"], c["B"],
                                                          c["scale"], c["rank"], c["idx"], c["w"],
                                                          True, True, True, S > 1)
        hw = torch.randn(1600, 3, 8, generator=torch.Generator().manual_seed(5))
        got_e = torch.ops.loramix_cpp.multi_lora_expand_bwd(dy, hw, c["B"], c["scale"], c["rank"],
                                                            c["idx"], c["w"], True, True, S > 1)
    finally:
        torch.set_num_threads(n)
    yt, ht = bw.linear_fwd_torch(*args)
    want = bw.linear_bwd_torch(dy, c["x"], ht, c["weight"], c["A"], c["B"], c["scale"], c["rank"],
                               c["idx"], c["w"], True, True, True, S > 1)
    want_e = bw.expand_bwd_torch(dy, hw, c["B"], c["scale"], c["rank"], c["idx"], c["w"], True,
                                 True, S > 1)
    for a, b in zip((y, h) + got + got_e, (yt, ht) + want + want_e):  # sums in other orders
        assert a.shape == b.shape
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-30, ((a - b).norm(), b.norm())


# ---- multi_lora_expand ----------------------------------------------------------------------------
def expand_case(M, N, E, R, S=2, ranks=None, weights=True, none_frac=0.2, dtype=F64, seed=0,
                wide_h=True, transposed_B=False):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(M, N, generator=g, dtype=F64).to(dtype)
    if wide_h:  # a column slice of a wider GEMM output, as the routers pass it
        h = torch.randn(M, 3 + E * R, generator=g, dtype=F64)[:, 3:].unflatten(1, (E, R)).to(dtype)
    else:
        h = torch.randn(M, E, R, generator=g, dtype=F64).to(dtype)
    B = (torch.randn(E, R, N, generator=g, dtype=F64).transpose(1, 2) if transposed_B
         else torch.randn(E, N, R, generator=g, dtype=F64)).to(dtype)
    scale = torch.rand(E, generator=g, dtype=F64).to(dtype) + 0.5
    rank = torch.tensor(ranks if ranks is not None else [R] * E, dtype=torch.int32)
    idx = torch.randint(0, max(E, 1), (M, S), generator=g, dtype=torch.int32)
    idx[torch.rand(M, S, generator=g) < none_frac] = -1
    w = (torch.rand(M, S, generator=g, dtype=F64) + 0.25).to(dtype) if weights else None
    return y, h, B, scale, rank, idx, w


EXPAND_CASES = {
    "S2_w_unequal": dict(M=6, N=5, E=3, R=4, ranks=[4, 0, 2]),
    "S1_no_w": dict(M=5, N=4, E=2, R=3, S=1, weights=False),
    "S3_all": dict(M=4, N=3, E=3, R=2, S=3, none_frac=0.0),
    "M0": dict(M=0, N=3, E=2, R=2),
    "S2_transposed_B": dict(M=5, N=4, E=2, R=3, ranks=[1, 3], transposed_B=True),
}
for _s in range(2):  # random shapes
    _g = torch.Generator().manual_seed(200 + _s)
    _r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=_g))  # noqa: E731
    _E, _R = _r(1, 4), _r(1, 4)
    EXPAND_CASES[f"random_{_s}"] = dict(M=_r(1, 7), N=_r(1, 6), E=_E, R=_R, S=_r(1, 3),
                                        ranks=[_r(0, _R) for _ in range(_E)],
                                        weights=bool(_s % 2), wide_h=not _s % 2, seed=_s)


@pytest.mark.parametrize("name", list(EXPAND_CASES))
def test_gradcheck_multi_lora_expand(backend, name):
    y, h, B, scale, rank, idx, w = expand_case(**EXPAND_CASES[name])
    ins = [t.detach().clone().requires_grad_(True) for t in (y, h, B) + ((w,) if w is not None else ())]

    def f(y, h, B, w=None):
        return ops.multi_lora_expand(y, h, B, scale, rank, idx, w)

    assert f(*ins).grad_fn is not None
    assert torch.autograd.gradcheck(f, ins, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("expanded", [False, True])
def test_expand_grads_within_2x_of_plain_torch(backend, expanded):
    y, h, B, scale, rank, idx, w = expand_case(M=300, N=64, E=4, R=8, S=2, ranks=[8, 3, 8, 5],
                                               wide_h=not expanded)
    if expanded:  # SpectR's factor merge: one h_bar per row, broadcast over the experts
        h = h[:, :1].expand(h.shape)

    def grads(dtype, fn):
        ins = [t.detach().to(dtype).requires_grad_(True) for t in (y, h, B, w)]
        out = fn(ins[0], ins[1], ins[2], scale.to(dtype), rank, idx, ins[3])
        return [n for n in "yhBw"], torch.autograd.grad(out, ins, dy.to(out.dtype))

    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    oracle = grads(F64, reference.multi_lora_expand)
    plain = grads(torch.float32, reference.multi_lora_expand)
    got = grads(torch.float32, ops.multi_lora_expand)
    _check_rule(got, plain, oracle, "expand")


# ---- mix_logits -----------------------------------------------------------------------------------
def _mix_inputs(Bn, E, V, dtype=F64, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    if layout == "flat":  # [B*E, V] rows b-major
        z = torch.randn(Bn * E, V, generator=g, dtype=F64).to(dtype)
    elif layout == "strided":
        z = torch.randn(Bn, E, 2 * V, generator=g, dtype=F64)[..., ::2].to(dtype)
    else:
        z = (3 * torch.randn(Bn, E, V, generator=g, dtype=F64)).to(dtype)
    w = (torch.rand(Bn, E, generator=g, dtype=F64) + 0.1).to(dtype)
    return z, w


@pytest.mark.parametrize("layout", ["contiguous", "flat", "strided"])
@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_gradcheck_mix_logits(backend, mode, layout):
    z, w = _mix_inputs(3, 4, 7, layout=layout)
    z.requires_grad_(True)
    w.requires_grad_(True)
    f = lambda z, w: ops.mix_logits(z, w, mode)  # noqa: E731
    assert f(z, w).dtype == F64 and f(z, w).grad_fn is not None
    assert torch.autograd.gradcheck(f, (z, w), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_gradcheck_mix_logits_random_shapes(backend, mode, seed):
    g = torch.Generator().manual_seed(300 + seed)
    Bn, E, V = (int(torch.randint(1, 6, (1,), generator=g)) for _ in range(3))
    z, w = _mix_inputs(Bn, E, V, seed=seed, layout=("strided", "flat")[seed])
    z.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z, w: ops.mix_logits(z, w, mode), (z, w), atol=1e-7,
                                    rtol=1e-6)


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_gradcheck_mix_logits_empty(backend, mode):
    for shape in ((0, 3, 5), (2, 3, 0)):
        z = torch.randn(*shape, dtype=F64, requires_grad=True)
        w = torch.rand(shape[0], shape[1], dtype=F64, requires_grad=True)
        out = ops.mix_logits(z, w, mode)
        gz, gw = torch.autograd.grad(out.sum(), (z, w), allow_unused=True, materialize_grads=True)
        assert gz.shape == z.shape and gw.shape == w.shape


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_mix_logits_grads_within_2x_of_plain_torch(backend, mode):
    z, w = _mix_inputs(6, 5, 300)
    w[0, 1] = 0.0  # unused expert: no gradient to it or its weight
    w[1, 2] = -0.5 if mode == "probs" else w[1, 2]
    z[2, 3, :7] = float("-inf") if mode == "probs" else z[2, 3, :7]
    z[0, 1, 0] = float("nan")  # never read (weight 0)
    g = torch.randn(6, 300, generator=torch.Generator().manual_seed(5), dtype=F64)

    def grads(dtype, fn, upcast=False):
        zz, ww = z.to(dtype).requires_grad_(True), w.to(dtype).requires_grad_(True)
        out = fn(zz, ww, mode, upcast=True) if upcast else fn(zz, ww, mode)
        fin = torch.isfinite(out)
        return ["z", "w"], torch.autograd.grad(out[fin].sum() + (out[fin] * g[fin].to(out.dtype)).sum(),
                                               (zz, ww))

    oracle = grads(F64, reference.mix_logits, upcast=True)
    plain = grads(torch.float32, reference.mix_logits)
    got = grads(torch.float32, lambda z, w, m: ops.mix_logits(z, w, m))
    assert not got[1][0][0, 1].any() and got[1][1][0, 1] == 0
    oracle = (oracle[0], [torch.nan_to_num(t) for t in oracle[1]])
    plain = (plain[0], [torch.nan_to_num(t) for t in plain[1]])
    _check_rule(got, plain, oracle, ("mix", mode))


# ---- spectr_topk ----------------------------------------------------------------------------------
SPECTR_CASES = {
    "norm_softmax": dict(score="norm", weighting="softmax", temperature=0.7),
    "norm_uniform": dict(score="norm", weighting="uniform"),
    "first_softmax": dict(score="first", weighting="softmax", temperature=1.3, scaled=True),
    "norm_softmax_k_gt_T": dict(score="norm", weighting="softmax", k=7),
}


def _spectr_inputs(M=5, T=4, R=3, dtype=F64, seed=0, strided=True):
    g = torch.Generator().manual_seed(seed)
    if strided:
        h = torch.randn(M, 2 + T * R, generator=g, dtype=F64)[:, 2:].unflatten(1, (T, R))
    else:
        h = torch.randn(M, T, R, generator=g, dtype=F64)
    rank = torch.tensor([3, 1, 0, 2][:T] + [R] * max(0, T - 4), dtype=torch.int32)
    scale = torch.rand(T, generator=g, dtype=F64) + 0.5
    return h.to(dtype), rank, scale.to(dtype)


@pytest.mark.parametrize("name", list(SPECTR_CASES))
def test_gradcheck_spectr_topk(backend, name):
    cfg = dict(SPECTR_CASES[name])
    k = cfg.pop("k", 2)
    scaled = cfg.pop("scaled", False)
    h, rank, scale = _spectr_inputs()
    h = h.detach().requires_grad_(True)

    def f(h):
        idx, w, s = ops.spectr_topk(h, k, rank=rank, score_scale=scale if scaled else None, **cfg)
        return w, s

    w, s = f(h)
    assert w.dtype == F64 and s.grad_fn is not None
    assert torch.autograd.gradcheck(f, (h,), atol=1e-7, rtol=1e-6)
    if cfg["weighting"] == "softmax":
        gw = torch.autograd.grad(w.sum(1).square().sum() + (w * torch.arange(w.shape[1])).sum(),
                                 h, allow_unused=True)[0]
        assert gw is not None and gw.abs().sum() > 0  # the weights carry a gradient to h


@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck_spectr_topk_random_shapes(backend, seed):
    g = torch.Generator().manual_seed(400 + seed)
    M, T, R = (int(torch.randint(lo, 7, (1,), generator=g)) for lo in (1, 2, 1))
    k = int(torch.randint(1, T + 1, (1,), generator=g))
    h, _, scale = _spectr_inputs(M=M, T=T, R=R, seed=seed, strided=bool(seed))
    rank = torch.randint(0, R + 1, (T,), generator=g, dtype=torch.int32)
    h = h.detach().requires_grad_(True)
    weighting = ("softmax", "uniform")[seed]

    def f(h):
        idx, w, s = ops.spectr_topk(h, k, rank=rank, weighting=weighting, temperature=0.9)
        return w, s

    assert torch.autograd.gradcheck(f, (h,), atol=1e-7, rtol=1e-6)


def test_gradcheck_spectr_topk_empty(backend):
    h = torch.randn(0, 3, 2, dtype=F64, requires_grad=True)
    idx, w, s = ops.spectr_topk(h, 2, weighting="softmax")
    (gh,) = torch.autograd.grad(w.sum() + s.sum(), h, allow_unused=True, materialize_grads=True)
    assert gh.shape == h.shape


@pytest.mark.parametrize("name", list(SPECTR_CASES))
def test_spectr_grads_within_2x_of_plain_torch(backend, name):
    cfg = dict(SPECTR_CASES[name])
    k = cfg.pop("k", 2)
    scaled = cfg.pop("scaled", False)
    h, rank, scale = _spectr_inputs(M=200, T=6, R=8, strided=False)
    rank = torch.tensor([8, 3, 0, 5, 8, 1], dtype=torch.int32)
    g1 = torch.randn(200, k, generator=torch.Generator().manual_seed(1), dtype=F64)
    g2 = torch.randn(200, 6, generator=torch.Generator().manual_seed(2), dtype=F64)

    def grads(dtype, fn, **kw):
        hh = h.to(dtype).requires_grad_(True)
        idx, w, s = fn(hh, k, rank=rank, score_scale=scale.to(dtype) if scaled else None,
                       **cfg, **kw)
        loss = (w * g1.to(w.dtype)).sum() + (s * g2.to(s.dtype)).sum()
        return ["h"], torch.autograd.grad(loss, hh), idx

    oracle = grads(F64, reference.spectr_topk, upcast=True)
    plain = grads(torch.float32, reference.spectr_topk)
    got = grads(torch.float32, ops.spectr_topk)
    assert torch.equal(got[2].long(), oracle[2].long())  # same selection
    _check_rule(got[:2], plain[:2], oracle[:2], ("spectr", name))


# ---- torch.compile of a training step ----------------------------------------------------------------
def _step_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    M, K, N, E, R, T, Rh, V, Ex = 24, 16, 12, 3, 4, 3, 2, 12, 2
    c = lora_case(M=M, K=K, N=N, E=E, R=R, S=2, ranks=[4, 2, 3], weights=True, dtype=torch.float32,
                  seed=seed)
    Ah = torch.randn(T * Rh, N, generator=g) / N ** 0.5
    Bh = torch.randn(T, V, Rh, generator=g)
    ens = torch.randn(M // Ex, Ex, generator=g)
    params = [c["A"].clone().requires_grad_(True), c["B"].clone().requires_grad_(True),
              Ah.requires_grad_(True), Bh.requires_grad_(True), ens.requires_grad_(True)]
    x = c["x"].clone().requires_grad_(True)
    return c, x, params, (T, Rh, V, Ex)


def _step(c, x, params, dims):
    A, B, Ah, Bh, ens = params
    T, Rh, V, Ex = dims
    y = ops.multi_lora_linear(x, c["weight"], A, B, c["scale"], c["rank"], c["idx"], c["w"],
                              c["bias"])
    H = (y @ Ah.T).view(y.shape[0], T, Rh)
    idx, w, s = ops.spectr_topk(H, 2, weighting="softmax", temperature=0.5)
    base = y[:, :V] if y.shape[1] >= V else torch.nn.functional.pad(y, (0, V - y.shape[1]))
    out = ops.multi_lora_expand(base, H, Bh, torch.ones(T), torch.full((T,), Rh), idx, w)
    mixed = ops.mix_logits(out.view(-1, Ex, V), torch.softmax(ens, -1), "probs")
    return -mixed.logsumexp(-1).mean() + 1e-2 * s.square().mean()


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_training_step_matches_eager(backend, compile_backend):
    """The forward compiled (one graph, the ops opaque nodes); AOTAutograd traces the registered
    backward functions into the backward graph, which loss.backward() runs."""
    torch._dynamo.reset()
    c, x, params, dims = _step_inputs()
    loss = _step(c, x, params, dims)
    eager = (loss,) + torch.autograd.grad(loss, [x] + params)
    comp_loss = torch.compile(_step, backend=compile_backend, fullgraph=True)(c, x, params, dims)
    assert comp_loss.grad_fn is not None and "Compiled" in type(comp_loss.grad_fn).__name__
    compiled = (comp_loss,) + torch.autograd.grad(comp_loss, [x] + params)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


# ---- memory saved for backward ------------------------------------------------------------------------
def _saved_bytes(fn, exclude=()):
    """Bytes of the distinct storages saved for backward by ``fn()``, but those of ``exclude``."""
    seen = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("S", [1, 3])
def test_saved_memory_is_x_and_h(backend, S):
    M, K, N, E, R = 512, 64, 96, 4, 8
    c = lora_case(M=M, K=K, N=N, E=E, R=R, S=S, weights=S > 1, dtype=torch.float32)
    x = c["x"].requires_grad_(True)
    A, B = c["A"].requires_grad_(True), c["B"].requires_grad_(True)
    inputs = [c[n] for n in ("weight", "scale", "rank", "idx", "w", "bias") if c[n] is not None]
    new, y = _saved_bytes(lambda: ops.multi_lora_linear(x, c["weight"], A, B, c["scale"],
                                                        c["rank"], c["idx"], c["w"], c["bias"]),
                          exclude=[x, A, B] + inputs)
    assert new <= M * S * R * 4 + 1024, new  # h [M, S, R] fp32, nothing else new
    total, _ = _saved_bytes(lambda: ops.multi_lora_linear(x, c["weight"], A, B, c["scale"],
                                                          c["rank"], c["idx"], c["w"], c["bias"]))
    budget = sum(t.untyped_storage().nbytes() for t in [x, A, B] + inputs) + M * S * R * 4 + 1024
    assert total <= budget, (total, budget)
    ref, _ = _saved_bytes(lambda: reference.multi_lora_linear(x, c["weight"], A, B, c["scale"],
                                                              c["rank"], c["idx"], c["w"],
                                                              c["bias"]), exclude=[x, A, B] + inputs)
    assert ref >= M * N * R * 4 * S  # what the grad path saved before: per-row gathers of B
