"""LearnedRouter: it learns (loss drops, the right expert per input on a toy task, top-k after
training), init="arrow" equals Arrow at step 0 (logits = Arrow's scores, same model output),
experts that do not target a module get no weight, validation."""
from __future__ import annotations

import warnings

import pytest
import torch

import loramix_fast as lmf
from loramix_fast.routing import Arrow
from loramix_fast.testing import AdapterSpec, tiny_model, write_peft_adapters

K = 16


def _toy(seed=0):
    """One Linear, three rank-2 experts, inputs in three clusters: cluster i's target is the
    output of expert i."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(K, K))
    lib = lmf.AdapterLibrary()
    for n in ["a", "b", "c"]:
        lib.add(n, {"0": lmf.LoRAFactors(torch.randn(2, K), torch.randn(K, 2), 1.0)})
    mu = torch.randn(3, K) * 3
    lab = torch.randint(0, 3, (192,))
    x = mu[lab] + torch.randn(192, K)
    return model, lib, x, lab


def test_learns_the_right_expert():
    model, lib, x, lab = _toy()
    r = lmf.LearnedRouter()
    lmf.patch(model, lib, router=r)
    with torch.no_grad():
        tgt = torch.cat([model(x[i:i + 1], adapter_names=[lib.names[int(lab[i])]])
                         for i in range(x.shape[0])])
        out0 = model(x)
        # zero init: mu-routing (the exact mean of the experts)
        lmf.set_router(model, lmf.Uniform())
        torch.testing.assert_close(out0, model(x), rtol=1e-5, atol=1e-5)
        lmf.set_router(model, r)
    assert len(r.parameters()) == 1 and r.parameters()[0].shape == (3, K)
    opt = torch.optim.Adam(r.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = ((model(x) - tgt) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 1e-2 * losses[0], (losses[0], losses[-1])
    with torch.no_grad():
        p = torch.softmax(r.logits(model[0], x), 1)
    assert float((p.argmax(1) == lab).float().mean()) > 0.97
    # the trained gates with top-1 serve each input with its expert
    r1 = lmf.LearnedRouter(top_k=1)
    lmf.set_router(model, r1)
    r1.load_state_dict(r.state_dict())
    with torch.no_grad():
        out = model(x)
    right = ((out - tgt).abs().amax(1) < 1e-4).float().mean()
    assert float(right) > 0.97, float(right)


def test_arrow_init_equals_arrow(tmp_path):
    warnings.simplefilter("ignore")
    model = tiny_model("llama", hidden=64, layers=2, vocab=96, intermediate=128)
    dirs = write_peft_adapters(model, [AdapterSpec(n, r=r, seed=400 + i)
                                       for i, (n, r) in enumerate({"a": 4, "b": 6, "c": 3}.items())],
                               str(tmp_path))
    lib = lmf.AdapterLibrary.from_peft(dirs)
    r = lmf.LearnedRouter(top_k=2, init="arrow")
    lmf.patch(model, lib, router=r)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    arrow = Arrow(top_k=2)
    # logits of one module's gate == Arrow's scores on the same input
    mod = model.model.layers[1].self_attn.v_proj
    x2 = torch.randn(7, 64)
    _, H, al = arrow._base_and_h(mod, x2)
    _, _, scores = arrow.select(H, al)
    torch.testing.assert_close(r.logits(mod, x2), scores.float(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        out = model(ids).logits
        lmf.set_router(model, arrow)
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # it trains from there
    lmf.set_router(model, r)
    opt = torch.optim.SGD(r.parameters(), lr=1e-3)
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in r.parameters())
    assert any(float(p.grad.abs().max()) > 0 for p in r.parameters())
    opt.step()


def test_expert_off_module_gets_no_weight():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(K, K), torch.nn.Linear(K, K))
    lib = lmf.AdapterLibrary()
    lib.add("a", {"0": lmf.LoRAFactors(torch.randn(2, K), torch.randn(K, 2), 1.0),
                  "1": lmf.LoRAFactors(torch.randn(2, K), torch.randn(K, 2), 1.0)})
    lib.add("b", {"0": lmf.LoRAFactors(torch.randn(2, K), torch.randn(K, 2), 1.0)})
    r = lmf.LearnedRouter()
    lmf.patch(model, lib, router=r)
    x = torch.randn(5, K)
    l1 = r.logits(model[1], x)
    assert bool(torch.isinf(l1[:, 1]).all()) and bool(torch.isfinite(l1[:, 0]).all())
    with torch.no_grad():  # module 1: expert a alone (weight 1)
        y = model(x)
        h0 = model[0].base_layer(x) + 0.5 * (lib.factors("a")["0"].B @ (lib.factors("a")["0"].A @ x.T)).T \
            + 0.5 * (lib.factors("b")["0"].B @ (lib.factors("b")["0"].A @ x.T)).T
        fa = lib.factors("a")["1"]
        y_ref = model[1].base_layer(h0) + (fa.B @ (fa.A @ h0.T)).T
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


def test_validation():
    with pytest.raises(ValueError, match="init"):
        lmf.LearnedRouter(init="random")
    with pytest.raises(ValueError, match="top_k"):
        lmf.LearnedRouter(top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        lmf.LearnedRouter(temperature=0)
    model, lib, x, _ = _toy()
    r = lmf.LearnedRouter()
    lmf.patch(model, lib, router=r)
    lib.add("d", {"0": lmf.LoRAFactors(torch.randn(2, K), torch.randn(K, 2), 1.0)})
    with pytest.raises(ValueError, match="set_router"):
        model(x)
    lmf.set_router(model, r)  # re-attached: a new row for "d", the old rows kept
    assert r.parameters()[0].shape[0] == 4
    model(x)
