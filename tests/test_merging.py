"""merge (factor / delta space) against dense fp64 references, and fit_merge_weights: the fitting
path (fused ops with coefficients as slot weights) equals the merged adapter, its gradient equals
finite differences of the merged model, and the NLL goes down."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import loramix_fast as lmf
from loramix_fast.merging import _MergeRouter
from loramix_fast.testing import AdapterSpec, tiny_model, write_peft_adapters

pytest.importorskip("transformers")
pytest.importorskip("peft")

VOCAB = 96
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    warnings.simplefilter("ignore")
    folder = str(tmp_path_factory.mktemp("merge_adapters"))
    model = tiny_model("llama", hidden=64, layers=2, vocab=VOCAB, intermediate=128, init_range=0.2)
    base = copy.deepcopy(model)
    specs = [AdapterSpec("a", r=4, seed=300, targets=ALL),
             AdapterSpec("b", r=4, seed=301, targets=["q_proj", "v_proj", "down_proj"]),
             AdapterSpec("c", r=6, seed=302, targets=ALL, alpha=3.0)]
    dirs = write_peft_adapters(model, specs, folder)
    lib = lmf.AdapterLibrary.from_peft(dirs)
    lmf.patch(model, lib)
    return model, base, lib


def _dense(lib, names, w):
    """{module: sum_i w_i dW_i} in fp64 from the library's factors."""
    out = {}
    for i, n in enumerate(names):
        for m, f in lib.factors(n).items():
            d = float(w[i]) * f.scale * f.B.double() @ f.A.double()
            out[m] = out.get(m, 0) + d
    return out


def _ref_model(base, dense):
    ref = copy.deepcopy(base).double()
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for m, d in dense.items():
            mods[m].weight += d
    return ref


def _ids(B=3, L=10, seed=0):
    return torch.randint(3, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed))


def test_delta_merge_equals_fp64_reference(setup):
    """The bar: the merged model equals base + sum_i w_i dW_i x (fp64) within 1e-5."""
    model, base, lib = setup
    names, w = ["a", "b", "c"], [0.7, -0.4, 1.3]
    name = lmf.merge(lib, names, w, space="delta", name="mdelta")
    try:
        dense = _dense(lib, names, w)
        for m, f in lib.factors(name).items():
            assert f.rank == sum(lib.factors(n)[m].rank for n in names if m in lib.factors(n))
            got = f.scale * f.B.double() @ f.A.double()
            assert float((got - dense[m]).abs().max() / dense[m].abs().max()) < 1e-6
        ids = _ids()
        with torch.no_grad():
            out = model(ids, adapter_names=[name] * 3).logits.double()
            ref = _ref_model(base, dense)(ids).logits
        err = float((out - ref).abs().max() / ref.abs().max())
        assert err < 1e-5, err
    finally:
        lib.remove(name)


def test_factor_merge_semantics(setup):
    model, base, lib = setup
    names, w = ["a", "b"], [0.6, 0.9]
    name = lmf.merge(lib, names, w, space="factor", name="mfactor")
    try:
        fa, fb = lib.factors("a"), lib.factors("b")
        for m, f in lib.factors(name).items():
            A = w[0] * fa[m].A.double() + (w[1] * fb[m].A.double() if m in fb else 0)
            B = w[0] * fa[m].scale * fa[m].B.double() + (
                w[1] * fb[m].scale * fb[m].B.double() if m in fb else 0)
            assert f.rank == 4
            got = f.scale * f.B.double() @ f.A.double()
            assert float((got - B @ A).abs().max() / (B @ A).abs().max()) < 1e-6
        ids = _ids(seed=1)
        with torch.no_grad():
            dense = {m: lib.factors(name)[m].B.double() @ lib.factors(name)[m].A.double()
                     for m in lib.factors(name)}
            out = model(ids, adapter_names=name).logits.double()
            ref = _ref_model(base, dense)(ids).logits
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
        # one expert with weight 1: the expert itself
        one = lmf.merge(lib, ["c"], [1.0], space="factor", name="c1")
        with torch.no_grad():
            torch.testing.assert_close(model(ids, adapter_names="c1").logits,
                                       model(ids, adapter_names="c").logits,
                                       rtol=1e-5, atol=1e-5)
        lib.remove(one)
    finally:
        lib.remove(name)


def test_uniform_default_and_per_module_weights(setup):
    model, _, lib = setup
    mods = sorted(set(lib.factors("a")) | set(lib.factors("c")))
    per = {m: torch.tensor([0.5, 0.5]) for m in mods}
    f1 = lmf.merge_factors(lib, ["a", "c"], None, space="delta")
    f2 = lmf.merge_factors(lib, ["a", "c"], per, space="delta")
    for m in mods:
        torch.testing.assert_close(f1[m].B, f2[m].B)
    per[mods[0]] = torch.tensor([2.0, 0.0])
    f3 = lmf.merge_factors(lib, ["a", "c"], per, space="delta")
    fa = lib.factors("a")[mods[0]]
    got = f3[mods[0]].B.double() @ f3[mods[0]].A.double()
    ref = 2.0 * fa.scale * fa.B.double() @ fa.A.double()
    assert float((got - ref).abs().max()) < 1e-5


def test_merge_validation(setup):
    _, _, lib = setup
    with pytest.raises(ValueError, match="equal ranks"):
        lmf.merge(lib, ["a", "c"], space="factor", name="x")
    with pytest.raises(ValueError, match="space"):
        lmf.merge(lib, ["a"], space="output", name="x")
    with pytest.raises(ValueError, match="unknown adapter"):
        lmf.merge(lib, ["a", "zz"], name="x")
    with pytest.raises(ValueError, match="already in the library"):
        lmf.merge(lib, ["a"], name="a")
    with pytest.raises(ValueError, match="2 coefficients"):
        lmf.merge(lib, ["a", "b"], [1.0, 2.0, 3.0], name="x")
    with pytest.raises(ValueError, match="lacks"):
        lmf.merge(lib, ["a", "b"], {"model.layers.0.self_attn.q_proj": [1.0, 1.0]}, name="x")
    with pytest.raises(ValueError, match="distinct"):
        lmf.merge(lib, ["a", "a"], name="x")
    assert "x" not in lib


def _groups(lib, names, granularity):
    mods = sorted({m for n in names for m in lib.factors(n)})
    if granularity == "global":
        return {m: 0 for m in mods}, 1
    layers = sorted({int(m.split(".")[2]) for m in mods})
    return {m: layers.index(int(m.split(".")[2])) for m in mods}, len(layers)


@pytest.mark.parametrize("space,names", [("delta", ["a", "b", "c"]), ("factor", ["a", "b"])])
@pytest.mark.parametrize("granularity", ["global", "layer"])
def test_fitting_path_equals_merged_adapter(setup, space, names, granularity):
    """The fused fitting forward with coefficients c equals merge(weights=c); its gradient in c
    equals autograd through a dense fp64 model W_m = W0_m + dW_m(c)."""
    model, base, lib = setup
    group, G = _groups(lib, names, granularity)
    g = torch.Generator().manual_seed(5)
    coef = (torch.rand(G, len(names), generator=g) * 1.5 - 0.3).requires_grad_(True)
    st = model._loramix_state
    router = _MergeRouter(lib, names, space, coef, group)
    router._facs = [lib.factors(n) for n in names]
    ids = _ids(2, 9, seed=3)
    prev, st.router = st.router, router
    try:
        logits = model(ids).logits
    finally:
        st.router = prev
    torch.log_softmax(logits, -1)[..., 7].sum().backward()

    per = {m: coef.detach()[group[m]] for m in group}
    nm = lmf.merge(lib, names, per, space=space, name="probe")
    try:
        with torch.no_grad():
            ref = model(ids, adapter_names=nm).logits
    finally:
        lib.remove(nm)
    torch.testing.assert_close(logits.detach(), ref, rtol=1e-5, atol=1e-5)

    # dense fp64 reference, differentiable in the coefficients
    c64 = coef.detach().double().requires_grad_(True)
    facs = [lib.factors(n) for n in names]
    ref_model = copy.deepcopy(base).double()
    params = {}
    for m in group:
        parts = [(i, f[m]) for i, f in enumerate(facs) if m in f]
        c = c64[group[m]]
        if space == "delta":
            d = sum(c[i] * f.scale * f.B.double() @ f.A.double() for i, f in parts)
        else:
            d = (sum(c[i] * f.scale * f.B.double() for i, f in parts)
                 @ sum(c[i] * f.A.double() for i, f in parts))
        params[m + ".weight"] = dict(ref_model.named_modules())[m].weight.detach() + d
    out = torch.func.functional_call(ref_model, params, (ids,)).logits
    torch.log_softmax(out, -1)[..., 7].sum().backward()
    torch.testing.assert_close(coef.grad.double(), c64.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("space", ["delta", "factor"])
def test_fit_merge_weights_learns(setup, space):
    """Data sampled from expert a: the learned coefficients move toward a and the NLL drops."""
    model, _, lib = setup
    gen = torch.Generator().manual_seed(9)
    prompts = torch.randint(3, VOCAB, (4, 3), generator=gen)
    seqs = lmf.ensemble_generate(model, prompts, experts=["a"], max_new_tokens=12,
                                 do_sample=True, generator=gen, eos_token_id=[])
    labels = seqs.clone()
    labels[:, :3] = -100
    batch = {"input_ids": seqs, "labels": labels}
    model.zero_grad(set_to_none=True)
    w, hist = lmf.fit_merge_weights(model, [batch], ["a", "b"], space=space, steps=20, lr=0.2,
                                    return_history=True)
    assert len(hist) == 20 and hist[-1] < hist[0] - 0.05, (hist[0], hist[-1])
    assert float(w[0]) > 0.6 and float(w[0]) > float(w[1]), w
    assert model._loramix_state.router is None  # restored
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # untouched
    wl = lmf.fit_merge_weights(model, [batch], ["a", "b"], space=space, granularity="layer",
                               steps=2)
    assert isinstance(wl, dict) and set(wl) == {m for n in "ab" for m in lib.factors(n)}
    nm = lmf.merge(lib, ["a", "b"], wl, space=space, name="learned")
    lib.remove(nm)


def test_fit_merge_validation(setup):
    model, _, lib = setup
    ids = _ids()
    with pytest.raises(ValueError, match="granularity"):
        lmf.fit_merge_weights(model, [ids], ["a", "b"], granularity="module")
    with pytest.raises(ValueError, match="equal ranks"):
        lmf.fit_merge_weights(model, [ids], ["a", "c"], space="factor", steps=1)
    with pytest.raises(ValueError, match="empty"):
        lmf.fit_merge_weights(model, [], ["a", "b"])
