"""EM-LoRA (loramix_fast/emlora.py) against an fp64 reference written here from the equations:
eq. 2 poolers (last / mean / max over the non-padding tokens; appendix D's attention pooler
U = H W_p, A = softmax over the sequence of U q / sqrt(a), p = A^T H), eq. 6 activations (the
rational P/Q with explicit power sums, GeLU from erf, ReLU), eq. 3 (softmax of g(p) W^l, top-k),
each selected module's delta scale B A x times its probability, the others plain. The reference
runs on the unpatched base model with hooks (dense fp64 factors), so every patched module's output
is compared with an independent computation, padded prompts included. Also: the routers run on the
prompt only (counted during generate, beam search and a manual decode loop), skipped modules carry
id -1 in the fused op, multi-tenant batches, the load-balancing loss (eqs. 4-5) and its gradients,
fit with the eq. 7 alternation, save / load."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import loramix_fast as lmf
from loramix_fast import emlora as E
from loramix_fast.testing import tiny_model

MODS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _manual_greedy(model, ids, att, names, steps):
    """Greedy decoding by hand (prompt forward, then one token per forward with the KV cache)
    inside ``lmf.route_once``: the prompt plus ``steps`` tokens."""
    with lmf.route_once(model):
        out = model(ids, attention_mask=att, adapter_names=names, use_cache=True)
        seq, a = ids, att
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq, a = torch.cat([seq, nxt], 1), torch.cat([a, torch.ones_like(nxt)], 1)
            out = model(nxt, attention_mask=a, cache=out.cache, use_cache=True,
                        adapter_names=names)
    return seq


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", init_range=0.1, seed=3, layers=3).double()


def _lib(model, names=("t1", "t2", "plain"), r=4):
    specs = {n: lmf.LoRASpec(r=r + i, alpha=2 * (r + i), target_modules="all-linear",
                             init_lora_weights=False) for i, n in enumerate(names)}
    return lmf.AdapterLibrary.create(model, specs, seed=1)


def _em(model, adapter, seed, **kw):
    em = E.EMLoRA.create(model, adapter, seed=seed, **kw).double()
    with torch.no_grad():  # spread the probabilities: clear top-k gaps, non-trivial weights
        for r in em.routers:
            r.W.mul_(4.0)
    return em


def _batch(B=3, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, L), generator=g)
    att = torch.ones_like(ids)
    att[1, :3] = 0  # left padding
    ids[1, :3] = 0
    if B > 2:
        att[2, :1] = 0
        ids[2, :1] = 0
    return ids, att


# ---- the fp64 reference, from the equations ------------------------------------------------------

def ref_pool(Hv, kind, router):
    """p [d] of one sequence's non-padding hidden states Hv [n, d]."""
    if kind == "last":
        return Hv[-1]
    if kind == "mean":
        return Hv.sum(0) / Hv.shape[0]
    if kind == "max":
        return Hv.max(0).values
    Wp, q = router.W_p.double(), router.query.double()
    U = Hv @ Wp  # [n, a]
    s = (U @ q) / math.sqrt(Wp.shape[1])  # [n, n_q]
    A = torch.exp(s - s.max(0).values) / torch.exp(s - s.max(0).values).sum(0)
    return (A.T @ Hv).mean(0)


def ref_act(p, kind, router):
    if kind == "gelu":
        return 0.5 * p * (1 + torch.erf(p / math.sqrt(2)))
    if kind == "relu":
        return torch.clamp(p, min=0)
    a, b = router.act.p.double(), router.act.q.double()
    P = sum(a[i] * p ** i for i in range(a.shape[0]))
    Q = 1 + sum(b[j - 1] * p ** j for j in range(1, b.shape[0] + 1)).abs()
    return P / Q


def ref_route(em, l, Hv):
    """(pi [N], selected module positions (list), weights {j: w}) for one sequence at layer l."""
    r = em.routers[l]
    z = ref_act(ref_pool(Hv, em.pooler, r), em.activation, r) @ r.W.double()
    pi = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
    order = sorted(range(pi.shape[0]), key=lambda j: -float(pi[j].detach()))
    k = em.top_k
    if k < len(order):  # no near-tie at the cut (fresh data: the gap is far above rounding)
        assert float(pi[order[k - 1]].detach() - pi[order[k]].detach()) > 1e-9
    sel = order[:k]
    tot = sum(pi[j] for j in sel)
    w = {j: (pi[j] if em.weighting == "prob" else pi[j] / tot) for j in sel}
    return pi, sel, w


class Reference:
    """The base model with hooks: per sequence its tenant's routing at every layer (from the
    layer's input), each module's output + the selected deltas, dense fp64."""

    def __init__(self, model, lib, ems, names, att):
        self.model, self.lib, self.names, self.att = copy.deepcopy(model), lib, names, att
        self.ems = {em.adapter: em for em in ems}
        self.decisions = {}  # (layer path, b) -> (pi, sel, w)
        self.outputs = {}
        self.hooks = []
        self.frozen = False  # True: keep the decisions (a prompt's routing, reused)
        layers = {lp: (l, ms) for em in ems for l, (lp, ms) in enumerate(em.layers)}
        for lp, (l, ms) in layers.items():
            self.hooks.append(self.model.get_submodule(lp).register_forward_pre_hook(
                lambda mod, args, lp=lp, l=l: self._route(lp, l, args[0])))
            for j, name in enumerate(ms):
                self.hooks.append(self.model.get_submodule(name).register_forward_hook(
                    lambda mod, args, out, name=name, lp=lp, j=j: self._delta(name, lp, j,
                                                                              args[0], out)))

    def _route(self, lp, l, H):
        if self.frozen:
            return
        for b, n in enumerate(self.names):
            em = self.ems.get(n)
            if em is not None:
                Hv = H[b][self.att[b] != 0].double()
                self.decisions[(lp, b)] = ref_route(em, l, Hv)

    def _delta(self, name, lp, j, x, out):
        out = out.clone()
        for b, n in enumerate(self.names):
            if n is None or n == "__base__":
                continue
            f = self.lib.factors(n)[name]
            d = f.scale * (x[b].double() @ f.A.double().T @ f.B.double().T)
            if n in self.ems:
                _, sel, w = self.decisions[(lp, b)]
                if j not in sel:
                    continue
                d = w[j] * d
            out[b] = out[b] + d
        self.outputs[name] = out
        return out

    def __call__(self, ids):
        return self.model(ids, attention_mask=self.att).logits


def _capture(model, names):
    outs, hooks = {}, []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(
            lambda mod, a, out, n=n: outs.__setitem__(n, out)))
    return outs, hooks


@pytest.mark.parametrize("pooler", E.POOLERS)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("activation", ["rational", "gelu"])
def test_layer_outputs_match_fp64_reference(base, pooler, k, activation):
    lib = _lib(base)
    model = lmf.patch(copy.deepcopy(base), lib)
    kw = dict(top_k=k, pooler=pooler, activation=activation)
    if pooler == "attn":
        kw["n_queries"] = 2
        kw["attn_dim"] = 8
    ems = [_em(model, "t1", seed=5, **kw), _em(model, "t2", seed=6, **kw)]
    E.attach(model, *ems)
    names = ["t1", "t2", "t1", "__base__", "plain"]
    ids, att = _batch(B=5, L=8, seed=k)
    att[4, :2] = 0
    ref = Reference(base, lib, ems, names, att)
    mods = [n for _, ms in ems[0].layers for n in ms]
    got, hooks = _capture(model, mods)
    with torch.no_grad():
        y = model(ids, attention_mask=att, adapter_names=names).logits
        y_ref = ref(ids)
    for h in hooks:
        h.remove()
    m = att.bool()
    for n in mods:
        err = (got[n] - ref.outputs[n])[m].abs().max()
        assert err < 1e-10, (n, float(err))
    assert (y - y_ref)[m].abs().max() < 1e-10
    # the deltas are not trivially small: the routed model differs from the plain adapters
    with torch.no_grad():
        plain = lmf.patch(copy.deepcopy(base), lib)(ids, attention_mask=att,
                                                     adapter_names=names).logits
    assert (plain - y)[m[:, :]].abs().max() > 1e-4


def test_padding_does_not_change_the_routing(base):
    lib = _lib(base)
    model = lmf.patch(copy.deepcopy(base), lib)
    for pooler in E.POOLERS:
        E.attach(model, _em(model, "t1", seed=2, pooler=pooler, top_k=2))
        ids, att = _batch(B=2, L=6, seed=4)
        ids[1], att[1] = ids[0], att[0]
        padded = torch.cat([torch.zeros(2, 3, dtype=ids.dtype), ids], 1)
        patt = torch.cat([torch.zeros(2, 3, dtype=att.dtype), att], 1)
        pos = lambda m: (m.cumsum(-1) - 1).clamp(min=0)  # noqa: E731 (RoPE ignores pads)
        with torch.no_grad():
            a = model(ids, attention_mask=att, position_ids=pos(att),
                      adapter_names=["t1", "t1"]).logits
            b = model(padded, attention_mask=patt, position_ids=pos(patt),
                      adapter_names=["t1", "t1"]).logits
        assert (a[0] - b[0, 3:]).abs().max() < 1e-9, pooler


def test_rational_init_approximates_gelu():
    x = torch.linspace(-4, 4, 4001, dtype=torch.float64)
    r = E.Rational().double()
    err = (r(x) - F.gelu(x)).abs().max()
    assert err < 0.0065
    # the activation is P/Q with orders 6 and 5, learnable
    assert r.p.shape == (7,) and r.q.shape == (5,) and r.p.requires_grad


def _counting(monkeypatch):
    """Counts the router evaluations (one per layer and group of same-form tenants: a batch of
    tenants is routed in one pass)."""
    calls = [0]
    real = E._route_rows

    def counted(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(E, "_route_rows", counted)
    return calls


def test_routers_run_on_the_prompt_only(base, monkeypatch):
    lib = _lib(base)
    model = lmf.patch(copy.deepcopy(base), lib)
    ems = [_em(model, "t1", seed=1), _em(model, "t2", seed=2, top_k=2, pooler="last")]
    E.attach(model, *ems)
    calls = _counting(monkeypatch)  # two tenants of different forms: two passes per layer
    n_layers = len(ems[0].layers)
    ids, att = _batch()
    names = ["t1", "t2", "__base__"]
    with torch.no_grad():
        g1 = model.generate(ids, attention_mask=att, adapter_names=names, max_new_tokens=6,
                            do_sample=False, pad_token_id=0)
        assert calls[0] == 2 * n_layers  # one call per tenant and layer, for 6 new tokens
        calls[0] = 0
        model.generate(ids, attention_mask=att, adapter_names=names, max_new_tokens=5,
                       num_beams=2, do_sample=False, pad_token_id=0)
        assert calls[0] == 2 * n_layers
        calls[0] = 0
        # a manual decode loop inside route_once: same tokens as generate, routers on the prompt
        seq = _manual_greedy(model, ids, att, names, 6)
        assert calls[0] == 2 * n_layers
        assert torch.equal(seq, g1)
        # without route_once a decode step has no decision: an error, not routing on one token
        out = model(ids, attention_mask=att, adapter_names=names, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        with pytest.raises(ValueError, match="route_once"):
            model(nxt, attention_mask=torch.cat([att, torch.ones_like(nxt)], 1),
                  cache=out.cache, use_cache=True, adapter_names=names)


def test_generate_uses_the_prompt_routing_for_every_token(base):
    """generate's tokens equal greedy decoding of the dense reference whose routing was decided
    on the prompt and then frozen (every later token reuses it), re-running the whole sequence
    at each step without a KV cache."""
    lib = _lib(base)
    model = lmf.patch(copy.deepcopy(base), lib)
    em = _em(model, "t1", seed=3, top_k=2, pooler="mean")
    E.attach(model, em)
    ids, att = _batch(B=2, L=6, seed=7)
    names = ["t1", "t1"]
    with torch.no_grad():
        g = model.generate(ids, attention_mask=att, adapter_names=names, max_new_tokens=5,
                           do_sample=False, pad_token_id=0)
        ref = Reference(base, lib, [em], names, att)
        cur = ids
        for step in range(5):
            ref.att = torch.cat([att, torch.ones(2, step, dtype=att.dtype)], 1)
            logits = ref(cur)
            ref.frozen = True  # decided on the prompt (step 0) only
            cur = torch.cat([cur, logits[:, -1].argmax(-1, keepdim=True)], 1)
        # a routing decided on the full sequence instead would differ (the test can fail)
        ref2 = Reference(base, lib, [em], names, torch.cat([att, torch.ones(2, 5,
                                                                      dtype=att.dtype)], 1))
        ref2(g)
    assert torch.equal(g, cur)
    assert any(not torch.allclose(ref.decisions[k][0], ref2.decisions[k][0])
               for k in ref.decisions)


def test_skipped_modules_get_minus_one(base, monkeypatch):
    lib = _lib(base)
    model = lmf.patch(copy.deepcopy(base), lib)
    ems = [_em(model, "t1", seed=1, top_k=1), _em(model, "t2", seed=2, top_k=2)]
    E.attach(model, *ems)
    seen = {}
    _spy_fused(monkeypatch, lambda x, weight, idx, w: seen.setdefault(id(weight), []).append(
        (idx.clone(), None if w is None else w.clone())))
    wid = {id(model.get_submodule(n).weight): n for _, ms in ems[0].layers for n in ms}
    ids, att = _batch()
    with torch.no_grad():
        model.generate(ids, attention_mask=att, adapter_names=["t1", "t2", "plain"],
                       max_new_tokens=3, do_sample=False, pad_token_id=0)
    steps = len(next(iter(seen.values())))
    assert steps == 3
    for step in range(steps):
        for l, (_, ms) in enumerate(ems[0].layers):
            on = torch.zeros(3, dtype=torch.long)
            for n in ms:
                idx, w = seen[next(i for i, m in wid.items() if m == n)][step]
                rows = idx.view(3, -1)[:, -1]  # the last token of each sequence
                on += (rows >= 0).long()
                assert int(rows[2]) == lib.id_of("plain")  # a plain adapter: every module
            assert on.tolist() == [1, 2, len(ms)]


def test_multi_tenant_rows_equal_each_tenant_alone(base):
    lib = _lib(base)
    model = lmf.patch(copy.deepcopy(base), lib)
    E.attach(model, _em(model, "t1", seed=1), _em(model, "t2", seed=2, top_k=2, pooler="max"))
    ids, att = _batch(B=4, L=6, seed=9)
    names = ["t2", "__base__", "t1", "plain"]
    with torch.no_grad():
        y = model(ids, attention_mask=att, adapter_names=names).logits
        y0 = base(ids, attention_mask=att).logits
        for b, n in enumerate(names):
            alone = model(ids[b:b + 1], attention_mask=att[b:b + 1], adapter_names=[n]).logits
            m = att[b].bool()
            assert (alone[0] - y[b])[m].abs().max() < 1e-10
        assert (y[1] - y0[1])[att[1].bool()].abs().max() < 1e-10  # __base__ stays plain
    E.detach(model)
    with torch.no_grad():  # detached: plain multi-tenant LoRA again
        plain = lmf.patch(copy.deepcopy(base), lib)(ids, attention_mask=att,
                                                     adapter_names=names).logits
        assert (model(ids, attention_mask=att, adapter_names=names).logits - plain).abs().max() \
            < 1e-12


def test_balance_loss_and_gradients_match_reference(base):
    lib = _lib(base)
    model = lmf.patch(copy.deepcopy(base), lib)
    em = _em(model, "t1", seed=4, top_k=2, pooler="attn", attn_dim=8)
    E.attach(model, em)
    ids, att = _batch(B=3, L=6, seed=11)
    names = ["t1", "t1", "t1"]
    labels = ids.masked_fill(att == 0, -100)
    out = E.loss(model, ids, labels, names, att, balance=0.5)

    def ce(logits):  # fp64 (transformers' loss upcasts to fp32 only)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               labels[:, 1:].reshape(-1), ignore_index=-100)

    params = [r.W for r in em.routers] + [em.routers[0].act.p, em.routers[0].W_p]
    grads = torch.autograd.grad(ce(out.logits) + 0.5 * out.balance_loss, params)
    # reference: eqs. 4-5 from the reference decisions, and autograd through the dense reference
    ref = Reference(base, lib, [em], names, att)
    lm = ce(ref(ids))
    terms = []
    for l, (lp, ms) in enumerate(em.layers):
        pis = torch.stack([ref.decisions[(lp, b)][0] for b in range(3)])
        f = torch.zeros(len(ms), dtype=torch.float64)
        for b in range(3):
            for j in ref.decisions[(lp, b)][1]:
                f[j] += 1.0 / (3 * em.top_k)
        terms.append(len(ms) * (f * pis.mean(0)).sum())
    bal = torch.stack(terms).mean()
    assert abs(float((out.lm_loss - lm).detach())) < 1e-5 * float(lm.detach())  # fp32 loss
    assert abs(float((out.loss - out.lm_loss - 0.5 * out.balance_loss).detach())) < 1e-6
    assert abs(float(out.balance_loss - bal)) < 1e-10
    gref = torch.autograd.grad(lm + 0.5 * bal, params)
    for g, gr in zip(grads, gref):
        assert gr.abs().max() > 0
        assert (g - gr).abs().max() <= 1e-8 * (1 + gr.abs().max())


def test_fit_trains_lora_router_and_activation(base):
    lib = _lib(base, names=("t1",))
    model = lmf.patch(copy.deepcopy(base).float(), lib)
    model.requires_grad_(False)
    em = E.EMLoRA.create(model, "t1", top_k=2)
    E.attach(model, em)
    ids, att = _batch(B=4, L=8, seed=12)
    b = dict(input_ids=ids, attention_mask=att, labels=ids.masked_fill(att == 0, -100),
             adapter_names=["t1"] * 4)
    W0 = em.routers[0].W.detach().clone()
    p0 = em.routers[0].act.p.detach().clone()
    A0 = lib.factors("t1")["model.layers.0.self_attn.q_proj"].A.clone()
    hist = E.fit(model, em, [b], heldout=[b], steps=5, lr=1e-2)
    assert hist[-1]["lm_loss"] < hist[0]["lm_loss"]
    assert "heldout_loss" in hist[0]
    assert not torch.equal(em.routers[0].W.detach(), W0)
    assert not torch.equal(em.routers[0].act.p.detach(), p0)
    assert not torch.equal(lib.factors("t1")["model.layers.0.self_attn.q_proj"].A, A0)


def test_save_load_next_to_peft_folder(base, tmp_path):
    lib = _lib(base, names=("t1",))
    model = lmf.patch(copy.deepcopy(base), lib)
    em = _em(model, "t1", seed=8, top_k=2, pooler="attn", attn_dim=8, n_queries=3)
    E.attach(model, em)
    ids, att = _batch()
    with torch.no_grad():
        y = model(ids, attention_mask=att, adapter_names=["t1"] * 3).logits
    E.save(em, tmp_path / "t1", lib=lib)
    assert (tmp_path / "t1" / "adapter_config.json").exists()
    lib2 = lmf.AdapterLibrary()
    em2 = E.load(tmp_path / "t1", lib=lib2)
    assert em2.config() == em.config()
    m2 = lmf.patch(copy.deepcopy(base), lib2)
    E.attach(m2, em2)
    with torch.no_grad():
        y2 = m2(ids, attention_mask=att, adapter_names=["t1"] * 3).logits
    assert (y - y2).abs().max() < 1e-12


def test_errors_name_the_argument(base):
    lib = _lib(base, names=("t1",))
    model = lmf.patch(copy.deepcopy(base), lib)
    with pytest.raises(ValueError, match="pooler"):
        E.EMLoRA.create(model, "t1", pooler="sum")
    with pytest.raises(ValueError, match="activation"):
        E.EMLoRA.create(model, "t1", activation="tanh")
    with pytest.raises(ValueError, match="top_k"):
        E.EMLoRA.create(model, "t1", top_k=8)
    with pytest.raises(KeyError):
        E.EMLoRA.create(model, "nope")
    with pytest.raises(TypeError):
        E.attach(model, "t1")


def test_route_mask_routes_on_the_prompt_only(base):
    """Training on prompt + answer with ``route_mask`` = the prompt: the routers see exactly what
    they see at generation (the prompt's hidden states; causal, so the answer cannot change them)."""
    lib = _lib(base, names=("t1",))
    model = lmf.patch(copy.deepcopy(base), lib)
    em = _em(model, "t1", seed=9, top_k=2, pooler="mean")
    E.attach(model, em)
    ids, att = _batch(B=3, L=9, seed=13)
    P = 6
    rm = torch.zeros_like(att)
    rm[:, :P] = 1
    got = {}

    def keep(*a, **kw):
        pi = real(*a, **kw)
        got.setdefault("pi", []).append(pi.detach())
        return pi

    real = E._route_rows
    E._route_rows = keep
    try:
        E.loss(model, ids, ids, ["t1"] * 3, att, route_mask=rm)
        train_pi = got.pop("pi")
        with torch.no_grad():
            model(ids[:, :P], attention_mask=att[:, :P], adapter_names=["t1"] * 3)
        prompt_pi = got.pop("pi")
        with torch.no_grad():
            model(ids, attention_mask=att, adapter_names=["t1"] * 3)
        full_pi = got.pop("pi")
    finally:
        E._route_rows = real
    for a, b in zip(train_pi, prompt_pi):
        assert (a - b).abs().max() < 1e-12
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(train_pi, full_pi))
    with pytest.raises(ValueError, match="route_mask"):
        E.loss(model, ids, ids, ["t1"] * 3, att, route_mask=rm[:, :P])


def test_deepcopy_serves_without_emlora(base):
    lib = _lib(base, names=("t1",))
    model = lmf.patch(copy.deepcopy(base), lib)
    E.attach(model, _em(model, "t1", seed=1))
    twin = copy.deepcopy(model)  # the copy is served without EM-LoRAs (attach them again)
    assert E.attached(twin) == {} and set(E.attached(model)) == {"t1"}
    ids, att = _batch()
    plain = lmf.patch(copy.deepcopy(base), lib)
    with torch.no_grad():
        a = twin(ids, attention_mask=att, adapter_names=["t1"] * 3).logits
        b = plain(ids, attention_mask=att, adapter_names=["t1"] * 3).logits
        c = model(ids, attention_mask=att, adapter_names=["t1"] * 3).logits
    assert (a - b).abs().max() < 1e-12 and (a - c).abs().max() > 1e-6


def _spy_fused(monkeypatch, see):
    """Call ``see(x, weight, idx, w)`` on every fused-op call of the patched modules: the
    grad-mode path (``ops.multi_lora_linear``) and the no-grad serving path (``modules._run``)."""
    real_op, real_run = lmf.modules.ops.multi_lora_linear, lmf.modules._run

    def op(x, weight, A, B, scale, rank, idx, w=None, bias=None, **kw):
        see(x, weight, idx, w)
        return real_op(x, weight, A, B, scale, rank, idx, w, bias, **kw)

    def run(backend, x, weight, A, B, scale, rank, idx, w, bias):
        see(x, weight, idx, w)
        return real_run(backend, x, weight, A, B, scale, rank, idx, w, bias)

    monkeypatch.setattr(lmf.modules.ops, "multi_lora_linear", op)
    monkeypatch.setattr(lmf.modules, "_run", run)


def _op_calls(monkeypatch):
    """Spy on the fused op: the module paths it runs for (by weight identity), in call order."""
    seen = []
    _spy_fused(monkeypatch, lambda x, weight, idx, w: seen.append(id(weight)))
    return seen


def test_modules_no_row_selected_run_the_base_linear(base, monkeypatch):
    """One tenant with k = 1: in each layer most modules are selected by no row of the batch;
    they skip the fused op and run their base linear (known on the host at route time), and the
    outputs still equal the fp64 reference, at the prompt and at every decode step."""
    lib = _lib(base)
    model = lmf.patch(copy.deepcopy(base), lib)
    em = _em(model, "t1", seed=11, top_k=1, pooler="mean")
    E.attach(model, em)
    names = ["t1", "t1", "__base__"]
    ids, att = _batch(B=3, L=7, seed=5)
    ref = Reference(base, lib, [em], names, att)
    mods = [n for _, ms in em.layers for n in ms]
    wid = {id(model.get_submodule(n).weight): n for n in mods}
    seen = _op_calls(monkeypatch)
    got, hooks = _capture(model, mods)
    with torch.no_grad():
        model(ids, attention_mask=att, adapter_names=names)
        ref(ids)
    for h in hooks:
        h.remove()
    selected = set()
    for l, (lp, ms) in enumerate(em.layers):
        for b in (0, 1):
            selected |= {ms[j] for j in ref.decisions[(lp, b)][1]}
    ran = {wid[i] for i in seen if i in wid}
    assert ran == selected  # the fused op ran exactly for the modules some row selected
    assert len(selected) < len(mods)  # and some were skipped (<= 2 of 7 per layer here)
    m = att.bool()
    for n in mods:
        err = (got[n] - ref.outputs[n])[m].abs().max()
        assert err < 1e-10, (n, float(err))
    # a skipped module is bit-identical to the unpatched base model's module on its input
    skipped = [n for n in mods if n not in selected]
    inputs = {}
    hs = [model.get_submodule(n).register_forward_hook(
        lambda mod, a, out, n=n: inputs.__setitem__(n, (a[0], out))) for n in skipped]
    with torch.no_grad():
        model(ids, attention_mask=att, adapter_names=names)
        for n in skipped:
            x, out = inputs[n]
            assert torch.equal(out, base.get_submodule(n)(x)), n
    for h in hs:
        h.remove()
    # decode steps reuse the skip: generate's tokens equal the frozen-routing reference's
    seen.clear()
    with torch.no_grad():
        g = model.generate(ids, attention_mask=att, adapter_names=names, max_new_tokens=4,
                           do_sample=False, pad_token_id=0)
        cur = ids
        ref.decisions.clear()
        ref.frozen = False
        for step in range(4):
            ref.att = torch.cat([att, torch.ones(3, step, dtype=att.dtype)], 1)
            logits = ref(cur)
            ref.frozen = True
            cur = torch.cat([cur, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(g, cur)
    assert {wid[i] for i in seen if i in wid} == selected  # 4 forwards, same modules
    assert sum(i in wid for i in seen) == 4 * len(selected)


def test_routing_plan_built_once_per_generation_and_renewed(base, monkeypatch):
    """Each patched module builds its plan (ids, weights, skip) once per generation and routed
    shape (the prompt's rows, then one row per sequence for every decode step); a new prompt, a
    new selection or a new route_once scope builds new plans, never reusing stale ones."""
    lib = _lib(base)
    model = lmf.patch(copy.deepcopy(base), lib)
    ems = [_em(model, "t1", seed=1), _em(model, "t2", seed=2, top_k=2, pooler="last")]
    E.attach(model, *ems)
    n_mods = sum(len(ms) for _, ms in ems[0].layers)
    built = [0]
    real = E._Serving._plan

    def counted(*a, **kw):
        built[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(E._Serving, "_plan", counted)
    ids, att = _batch(seed=3)
    ids2, att2 = _batch(seed=9)
    names = ["t1", "t2", "__base__"]

    def gen(i, a, nm, n=6):
        return model.generate(i, attention_mask=a, adapter_names=nm, max_new_tokens=n,
                              do_sample=False, pad_token_id=0)

    with torch.no_grad():
        g1 = gen(ids, att, names)
        assert built[0] == 2 * n_mods  # prompt rows + decode rows, not once per token
        built[0] = 0
        g2 = gen(ids2, att2, names[::-1])  # new prompt and selection: new plans
        assert built[0] == 2 * n_mods
        # a manual loop inside route_once: plans built on the prompt and its first decode step
        built[0] = 0
        seq = _manual_greedy(model, ids, att, names, 6)
        assert built[0] == 2 * n_mods
        assert torch.equal(seq, g1)
        # a new scope after the exit: a fresh decision and plans for the other prompt, whose
        # tokens equal a fresh model's (nothing of the first prompt's plans is reused)
        built[0] = 0
        with lmf.route_once(model):
            out = model(ids2, attention_mask=att2, adapter_names=names[::-1], use_cache=True)
        assert built[0] == n_mods
    fresh = lmf.patch(copy.deepcopy(base), lib)
    E.attach(fresh, *ems)
    with torch.no_grad():
        f2 = fresh.generate(ids2, attention_mask=att2, adapter_names=names[::-1],
                            max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(g2, f2)
    assert not torch.equal(g1, g2)


def test_bench_floor_counts_the_selected_factors(base, monkeypatch):
    """bench_emlora's floor: base bytes = every nn.Linear weight of the base model; EM-LoRA bytes
    = A + B of each (module, adapter) some row's routing selected, counted here by hand from the
    fp64 reference's decisions (a second count, from the equations, not from the decision)."""
    import importlib
    import pathlib

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parents[1]))  # bench/
    BE = importlib.import_module("bench.bench_emlora")

    lib = _lib(base)
    model = lmf.patch(copy.deepcopy(base), lib)
    ems = [_em(model, "t1", seed=4, top_k=1), _em(model, "t2", seed=8, top_k=2)]
    E.attach(model, *ems)
    names = ["t1", "t2", "t1", "__base__"]
    ids, att = _batch(B=4, L=6, seed=2)
    enc = {"input_ids": ids, "attention_mask": att}
    d = BE.Decoder(model, enc, names)
    d.prefill()
    fb = BE.floor_bytes(base, model, d)
    ref = Reference(base, lib, ems, names, att)
    with torch.no_grad():
        ref(ids)
    d.close()
    el = 8  # fp64
    want_base = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
    assert fb["base"] == want_base * el
    pairs = set()
    for l, (lp, ms) in enumerate(ems[0].layers):
        for b, n in enumerate(names[:3]):
            pairs |= {(ms[j], n) for j in ref.decisions[(lp, b)][1]}
    want = sum(lib.factors(n)[m].A.numel() + lib.factors(n)[m].B.numel() for m, n in pairs)
    assert fb["emlora"] == want * el
    assert sum(fb["kinds"].values()) == len(pairs)
    want_lora = sum(f.A.numel() + f.B.numel() for n in ("t1", "t2")
                    for f in lib.factors(n).values())
    assert fb["lora"] == want_lora * el > fb["emlora"]
