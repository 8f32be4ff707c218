"""The public op layer: dispatch, autograd fallback, clear errors, custom-op registration."""
import pytest
import torch

import loramix_fast as lmf
from loramix_fast import reference


def _data(M=6, K=24, N=20, E=3, R=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, dtype=dtype)
    W = torch.randn(N, K, generator=g, dtype=dtype)
    A = torch.randn(E, R, K, generator=g, dtype=dtype)
    B = torch.randn(E, N, R, generator=g, dtype=dtype)
    scale = torch.rand(E, generator=g, dtype=dtype) + 0.5
    rank = torch.tensor([5, 2, 4], dtype=torch.int32)
    idx = torch.tensor([[0], [1], [-1], [2], [0], [1]], dtype=torch.int32)
    return x, W, A, B, scale, rank, idx


def test_autograd_matches_the_differentiable_reference():
    """With grad on, the training op (its own backward, ops/backward.py) gives the reference's
    gradients."""
    x, W, A, B, scale, rank, idx = _data()
    x.requires_grad_(True)
    A.requires_grad_(True)
    y = lmf.ops.multi_lora_linear(x, W, A, B, scale, rank, idx)
    assert y.requires_grad
    y.square().sum().backward()
    x2, A2 = x.detach().clone().requires_grad_(True), A.detach().clone().requires_grad_(True)
    reference.multi_lora_linear(x2, W, A2, B, scale, rank, idx).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(A.grad, A2.grad)
    assert A.grad[1, 2:].abs().sum() == 0  # rows past rank get no gradient


@pytest.mark.parametrize("bad, match", [
    (lambda a: a.update(W=a["W"][:, :-1]), "weight"),
    (lambda a: a.update(A=a["A"].float()), "A"),
    (lambda a: a.update(B=a["B"][:, :-1]), "B"),
    (lambda a: a.update(idx=a["idx"][:-1]), "idx"),
    (lambda a: a.update(idx=a["idx"].float()), "idx"),
    (lambda a: a.update(idx=a["idx"] + 5), "adapter id"),
    (lambda a: a.update(idx=a["idx"] - 3), "adapter id"),
    (lambda a: a.update(scale=a["scale"][:2]), "scale"),
    (lambda a: a.update(rank=a["rank"].float()), "rank"),
], ids=["weight-K", "A-dtype", "B-N", "idx-M", "idx-dtype", "id>=E", "id<-1", "scale-E", "rank-dtype"])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_bad_input_errors_name_the_argument(monkeypatch, bad, match, backend):
    from loramix_fast.ops._dispatch import cpp_available

    if backend == "cpp" and not cpp_available("multi_lora_linear"):
        pytest.skip("C++ extension unavailable: " + str(lmf._cpp.load_error()))
    monkeypatch.setenv("LORAMIX_BACKEND", backend)
    x, W, A, B, scale, rank, idx = _data()
    a = dict(x=x, W=W, A=A, B=B, scale=scale, rank=rank, idx=idx)
    bad(a)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        lmf.ops.multi_lora_linear(a["x"], a["W"], a["A"], a["B"], a["scale"], a["rank"], a["idx"])


def test_backend_override(monkeypatch):
    from loramix_fast.ops._dispatch import pick_backend

    monkeypatch.setenv("LORAMIX_BACKEND", "reference")
    assert pick_backend(torch.empty(1), "multi_lora_linear") == "reference"
    monkeypatch.setenv("LORAMIX_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="LORAMIX_BACKEND"):
        pick_backend(torch.empty(1), "multi_lora_linear")


def test_registered_custom_op_and_fake():
    x, W, A, B, scale, rank, idx = _data(dtype=torch.float32)
    out = torch.ops.loramix.multi_lora_linear(x, W, A, B, scale, rank, idx, None, None)
    torch.testing.assert_close(out, reference.multi_lora_linear(x, W, A, B, scale, rank, idx))
    torch.library.opcheck(torch.ops.loramix.multi_lora_linear.default,
                          (x, W, A, B, scale, rank, idx, None, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_expand_registered_custom_op_and_fake():
    x, W, A, B, scale, rank, idx = _data(dtype=torch.float32)
    y = torch.randn(x.shape[0], W.shape[0])
    h = torch.einsum("erk,mk->mer", A, x)
    args = (y, h, B, scale, rank, idx, None)
    torch.testing.assert_close(torch.ops.loramix.multi_lora_expand(*args),
                               reference.multi_lora_expand(*args))
    torch.library.opcheck(torch.ops.loramix.multi_lora_expand.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# --- issue 16 item 8: a NaN / inf adapter never reaches rows that did not select it ---------------

def _poisoned(dtype=torch.float32, M=9, K=16, N=12, E=4, R=5, S=2, seed=3):
    """Adapter 0 is NaN / inf everywhere; every other adapter holds NaN past its rank. Rows 0-2
    use no adapter (ids -1: the reference used to gather adapter 0 for them and multiply by 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=torch.float64).to(dtype)
    W = torch.randn(N, K, generator=g, dtype=torch.float64).to(dtype)
    A = torch.randn(E, R, K, generator=g, dtype=torch.float64).to(dtype)
    B = torch.randn(E, N, R, generator=g, dtype=torch.float64).to(dtype)
    scale = (torch.rand(E, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    rank = torch.tensor([R, 2, 3, R], dtype=torch.int32)
    A[0], B[0], scale[0] = float("nan"), float("inf"), float("nan")
    for e, r in enumerate(rank.tolist()):
        A[e, r:] = float("nan")
        B[e, :, r:] = float("nan")
    idx = torch.randint(1, E, (M, S), generator=g, dtype=torch.int32)
    idx[:3] = -1
    idx[3, S - 1] = -1
    idx[7, 0] = 0  # the one row that uses the NaN adapter
    w = torch.rand(M, S, generator=g, dtype=torch.float64).to(dtype) + 0.5
    h = torch.randn(M, E, R, generator=g, dtype=torch.float64).to(dtype)
    h[:, 0] = float("nan")
    h[:, 1, 2:] = float("nan")
    y = torch.randn(M, N, generator=g, dtype=torch.float64).to(dtype)
    return x, W, A, B, scale, rank, idx, w, h, y


def _clean(A, B, scale, rank, h):
    """The same adapters with the NaN ones zeroed: what clean rows must see (fp64 oracle)."""
    A, B, scale, h = A.double().clone(), B.double().clone(), scale.double().clone(), h.double().clone()
    A[0], B[0], scale[0], h[:, 0] = 0.0, 0.0, 0.0, 0.0
    for e, r in enumerate(rank.tolist()):
        A[e, r:] = 0.0
        B[e, :, r:] = 0.0
        h[:, e, r:] = 0.0
    return A, B, scale, h


@pytest.mark.parametrize("backend", ["cpp", "reference", "grad"])
@pytest.mark.parametrize("S", [1, 2])
def test_nan_adapter_stays_in_its_rows(monkeypatch, backend, S):
    from loramix_fast.ops._dispatch import cpp_available

    if backend == "cpp" and not cpp_available("multi_lora_linear"):
        pytest.skip("C++ extension unavailable")
    monkeypatch.setenv("LORAMIX_BACKEND", "reference" if backend == "grad" else backend)
    x, W, A, B, scale, rank, idx, w, h, y = _poisoned(S=S)
    Ac, Bc, sc, hc = _clean(A, B, scale, rank, h)
    clean = (idx != 0).all(1)
    assert clean.sum() == 8
    xg = x.clone().requires_grad_(backend == "grad")
    out = lmf.ops.multi_lora_linear(xg, W, A, B, scale, rank, idx, w)
    want = reference.multi_lora_linear(x.double(), W.double(), Ac, Bc, sc, rank, idx, w.double())
    assert torch.isfinite(out[clean]).all()
    torch.testing.assert_close(out[clean].double(), want[clean], rtol=1e-5, atol=1e-5)
    assert torch.isnan(out[~clean]).all()  # the row that asked for the NaN adapter gets it
    if backend == "grad":  # the backward keeps NaN out of the clean rows and adapters too
        out[clean].sum().backward()
        assert torch.isfinite(xg.grad[clean]).all()
        # no row selects the NaN adapter: every gradient is finite and adapter 0 gets exactly 0
        idx1 = torch.where(idx == 0, torch.ones_like(idx), idx)
        xg, Ag, Bg = (t.clone().requires_grad_(True) for t in (x, A, B))
        lmf.ops.multi_lora_linear(xg, W, Ag, Bg, scale, rank, idx1, w).sum().backward()
        for t in (xg, Ag, Bg):
            assert torch.isfinite(t.grad).all()
        assert (Ag.grad[0] == 0).all() and (Bg.grad[0] == 0).all()
        for e, r in enumerate(rank.tolist()):  # nor does the padding past each rank
            assert (Ag.grad[e, r:] == 0).all() and (Bg.grad[e, :, r:] == 0).all()
    yg = y.clone().requires_grad_(backend == "grad")
    out = lmf.ops.multi_lora_expand(yg, h, B, scale, rank, idx, w)
    want = reference.multi_lora_expand(y.double(), hc, Bc, sc, rank, idx, w.double())
    assert torch.isfinite(out[clean]).all()
    torch.testing.assert_close(out[clean].double(), want[clean], rtol=1e-5, atol=1e-5)


def test_spectr_reference_ignores_nan_past_rank():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 3, 4, generator=g)
    rank = torch.tensor([4, 2, 3], dtype=torch.int32)
    hp = h.clone()
    for t, r in enumerate(rank.tolist()):
        hp[:, t, r:] = float("nan")
    for score in ("norm", "first"):
        i0, w0, s0 = reference.spectr_topk(h, 2, rank=rank, score=score)
        i1, w1, s1 = reference.spectr_topk(hp, 2, rank=rank, score=score)
        assert torch.equal(i0, i1) and torch.equal(w0, w1) and torch.equal(s0, s1)


# --- issue 16 item 11: fp64 models are fp64-exact ----------------------------------------------------

def _fp64_case(S=2):
    x, W, A, B, scale, rank, idx = _data(dtype=torch.float64)
    scale = torch.full((3,), 4 * 2 ** 0.5, dtype=torch.float64)  # 5.656854249492381, not fp32's
    idx = torch.cat([idx, idx.flip(0)], 1)[:, :S]
    w = torch.rand(idx.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    return x, W, A, B, scale, rank, idx, w


@pytest.mark.parametrize("S", [1, 2])
def test_gradcheck_fp64_multi_lora_linear(S):
    x, W, A, B, scale, rank, idx, w = _fp64_case(S)
    f = lambda x_, w_: lmf.ops.multi_lora_linear(x_, W, A, B, scale, rank, idx, w_)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), w.requires_grad_(True)))
    g = lambda A_, B_: lmf.ops.multi_lora_linear(x.detach(), W, A_, B_, scale, rank, idx, w.detach())  # noqa: E731
    assert torch.autograd.gradcheck(g, (A.requires_grad_(True), B.requires_grad_(True)))


@pytest.mark.parametrize("S", [1, 2])
def test_gradcheck_fp64_multi_lora_expand(S):
    x, W, A, B, scale, rank, idx, w = _fp64_case(S)
    h = torch.einsum("erk,mk->mer", A, x)
    y = x @ W.T
    f = lambda y_, h_, w_: lmf.ops.multi_lora_expand(y_, h_, B, scale, rank, idx, w_)  # noqa: E731
    assert torch.autograd.gradcheck(f, (y.requires_grad_(True), h.requires_grad_(True),
                                        w.requires_grad_(True)))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_fp64_forward_is_fp64_exact(monkeypatch, backend):
    from loramix_fast.ops._dispatch import cpp_available

    if backend == "cpp" and not cpp_available("multi_lora_linear"):
        pytest.skip("C++ extension unavailable")
    monkeypatch.setenv("LORAMIX_BACKEND", backend)
    x, W, A, B, scale, rank, idx, w = _fp64_case()
    want = x @ W.T
    for s in range(idx.shape[1]):
        for m in range(x.shape[0]):
            e = int(idx[m, s])
            if e >= 0:
                r = int(rank[e])
                want[m] += w[m, s] * scale[e] * (B[e, :, :r] @ (A[e, :r] @ x[m]))
    got = lmf.ops.multi_lora_linear(x, W, A, B, scale, rank, idx, w)
    assert got.dtype == torch.float64
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-13
    h = torch.einsum("erk,mk->mer", A, x)
    got = lmf.ops.multi_lora_expand(x @ W.T, h, B, scale, rank, idx, w)
    assert got.dtype == torch.float64
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-13


def test_fp64_patched_llama_matches_peft(tmp_path):
    import copy

    from loramix_fast.testing import AdapterSpec, peft_multi, tiny_model, write_peft_adapters

    model = tiny_model("llama", dtype=torch.float64)
    specs = [AdapterSpec("a", r=2, alpha=8, rslora=True, seed=1),  # scale 4 * sqrt(2)
             AdapterSpec("b", r=3, alpha=5, seed=2)]               # scale 5 / 3
    dirs = write_peft_adapters(model, specs, str(tmp_path))
    pm = peft_multi(model, dirs)
    m = copy.deepcopy(model)
    lib = lmf.AdapterLibrary.from_peft(dirs)
    lmf.patch(m, lib)
    st = m.model.layers[0].self_attn.q_proj.stack()
    assert st.scale.dtype == torch.float64 and st.scale[0].item() == 8 / 2 ** 0.5  # peft's alpha/sqrt(r)
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    names = ["a", "__base__", "b"]
    with torch.no_grad():
        ref = pm(ids, adapter_names=names).logits
        base = model(ids).logits
        out = m(ids, adapter_names=names).logits
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert out.dtype == torch.float64
    assert rel(ref, base) > 1e-2  # the adapters matter
    assert rel(out, ref) < 1e-12
    out_grad = m(ids, adapter_names=names).logits  # grad on: the reference path
    assert rel(out_grad.detach(), ref) < 1e-12
