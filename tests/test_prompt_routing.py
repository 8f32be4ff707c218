"""Model-level prompt routing: ``PromptCached(router, scope="model")`` against an fp64 reference
written from the definition (every module's scores from the dense factors of dW = scale B A and
their SVD, normalised per token, pooled over the prompt's tokens and every module, top k), and the
generation it drives against ``adapter_names`` (k = 1) and a dense output-space mix (k = 2)."""
import copy
import threading

import pytest
import torch

import loramix_fast as lmf
from loramix_fast.testing import AdapterSpec, tiny_model, write_peft_adapters

NAMES = ("e0", "e1", "e2", "e3")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_model("llama", init_range=0.1, seed=3).double()
    specs = [AdapterSpec("e0", r=4, seed=1),
             AdapterSpec("e1", r=6, seed=2, targets=["q_proj", "v_proj", "down_proj"]),
             AdapterSpec("e2", r=3, seed=3),
             AdapterSpec("e3", r=4, seed=4, targets=["k_proj", "o_proj", "gate_proj", "up_proj"])]
    dirs = write_peft_adapters(model, specs, str(tmp_path_factory.mktemp("experts")))
    lib = lmf.AdapterLibrary.from_peft(dirs)
    assert lib.names == NAMES
    return model, lib


def _patched(setup, router):
    model, lib = setup
    return lmf.patch(copy.deepcopy(model), lib, router=router)


def _batch(B=3, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, L), generator=g)
    att = torch.ones_like(ids)
    att[1, :3] = 0  # left padding
    ids[1, :3] = 0
    return ids, att


def _dense(lib, mod_name):
    """Per expert: (dW [N, K] fp64, Vh [r, K]) or None where it does not target the module."""
    out = []
    for n in lib.names:
        f = lib.factors(n).get(mod_name)
        if f is None:
            out.append(None)
            continue
        dW = f.scale * f.B.double() @ f.A.double()
        Vh = torch.linalg.svd(dW, full_matrices=False).Vh[:f.rank]
        out.append((dW, Vh))
    return out


def _module_inputs(model, lib, ids, att):
    """Every target module's input [B, L, K] on the base model (fp64), by forward hooks."""
    base = copy.deepcopy(model)
    xs, hooks = {}, []
    for name in lib.modules():
        hooks.append(base.get_submodule(name).register_forward_hook(
            lambda mod, a, out, name=name: xs.__setitem__(name, a[0].detach())))
    with torch.no_grad():
        base(ids, attention_mask=att)
    for h in hooks:
        h.remove()
    return xs


def _ref_pool(v, m, pooler):
    """Pool v [B, L, X] over the tokens with m [B, L] > 0 (fp64 loops)."""
    out = []
    for b in range(v.shape[0]):
        real = v[b][m[b] > 0]
        out.append({"mean": real.mean(0), "max": real.amax(0), "last": real[-1]}[pooler])
    return torch.stack(out)


def reference_decision(model, lib, router, ids, att, prompt_mask=None, normalize="sum",
                       pooler="mean"):
    """(idx [B, k], w [B, k], pooled [B, T]) straight from the definition, fp64."""
    xs = _module_inputs(model, lib, ids, att)
    B, L = ids.shape
    T = len(lib.names)
    m = att.double() if att is not None else torch.ones(B, L, dtype=torch.float64)
    if prompt_mask is not None:
        m = m * (prompt_mask != 0).double()
    wtok = m / m.sum(1, keepdim=True).clamp(min=1)
    pooled = torch.zeros(B, T, dtype=torch.float64)
    n_mod = 0
    for name in sorted(lib.modules()):
        x = xs[name]  # [B, L, K]
        s = torch.zeros(B, L, T, dtype=torch.float64)
        for t, d in enumerate(_dense(lib, name)):
            if d is None:
                continue
            dW, Vh = d
            if isinstance(router, lmf.Arrow):
                s[..., t] = (x @ Vh[0]).abs()  # |v_t . x|, v_t the top right singular vector
            elif router.variant == "official":
                s[..., t] = (x @ Vh.T).norm(dim=-1)  # ||V^T x||
            else:
                s[..., t] = (x @ dW.T).norm(dim=-1)  # ||dW x||
        if normalize != "none":  # a token every expert scores 0 (a zero pad embedding) adds 0
            z = s.sum(-1, keepdim=True) if normalize == "sum" else s.amax(-1, keepdim=True)
            s = torch.where(z > 0, s / z, torch.zeros_like(s))
        pooled += (s * wtok[..., None]).sum(1) if pooler == "mean" else _ref_pool(s, m, pooler)
        n_mod += 1
    pooled /= n_mod
    k = router.top_k
    vals, order = torch.sort(pooled, dim=1, descending=True, stable=True)
    vals, order = vals[:, :k], order[:, :k]
    if isinstance(router, lmf.SpectR) and router.weighting == "uniform":
        w = torch.full_like(vals, 1.0 / k)
    else:
        w = torch.softmax(vals / router.temperature, 1)
    return order, w, pooled


ROUTERS = [lmf.Arrow(top_k=1), lmf.Arrow(top_k=2, temperature=0.05),
           lmf.SpectR(top_k=1), lmf.SpectR(top_k=2),
           lmf.SpectR(top_k=2, weighting="softmax", temperature=0.1, variant="paper")]


@pytest.mark.parametrize("normalize", ["sum", "max", "none"])
@pytest.mark.parametrize("router", ROUTERS, ids=repr)
def test_decision_matches_reference(setup, router, normalize):
    model, lib = setup
    pc = lmf.PromptCached(router, scope="model", normalize=normalize)
    m = _patched(setup, pc)
    for seed in range(2):
        ids, att = _batch(seed=seed)
        ref_idx, ref_w, ref_p = reference_decision(model, lib, router, ids, att,
                                                   normalize=normalize)
        dec = pc.decide(m, ids, attention_mask=att)
        torch.testing.assert_close(dec.scores.double(), ref_p, rtol=1e-5, atol=1e-7)
        assert torch.equal(dec.idx.long(), ref_idx)
        torch.testing.assert_close(dec.weights.double(), ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooler", ["max", "last"])
@pytest.mark.parametrize("router", [lmf.Arrow(top_k=1), lmf.SpectR(top_k=2)], ids=repr)
def test_model_scope_poolers_match_reference(setup, router, pooler):
    model, lib = setup
    pc = lmf.PromptCached(router, scope="model", pooler=pooler)
    assert f"pooler={pooler!r}" in repr(pc)
    m = _patched(setup, pc)
    ids, att = _batch(seed=4)
    pm = torch.ones_like(ids)
    pm[:, -2:] = 0  # the last pooled token is not the last token
    ref_idx, ref_w, ref_p = reference_decision(model, lib, router, ids, att, prompt_mask=pm,
                                               pooler=pooler)
    dec = pc.decide(m, ids, attention_mask=att, prompt_mask=pm)
    torch.testing.assert_close(dec.scores.double(), ref_p, rtol=1e-5, atol=1e-7)
    assert torch.equal(dec.idx.long(), ref_idx)
    torch.testing.assert_close(dec.weights.double(), ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooler", ["mean", "max", "last"])
def test_module_scope_poolers_match_reference(setup, pooler):
    """scope="module": each module's expert is Arrow's argmax (fp64, from the dense factors) on
    its pooled prompt input, that input captured by a hook in the same forward (a module's input
    carries the deltas of the layers before it)."""
    model, lib = setup
    pc = lmf.PromptCached(lmf.Arrow(top_k=1), pooler=pooler)
    m = _patched(setup, pc)
    ids, att = _batch(seed=5)
    xs, hooks = {}, []
    for name in lib.modules():
        hooks.append(m.get_submodule(name).register_forward_pre_hook(
            lambda mod, a, name=name: xs.__setitem__(name, a[0].detach().double())))
    lmf.record_routing(m)
    try:
        with torch.no_grad():
            m(ids, attention_mask=att)
    finally:
        for h in hooks:
            h.remove()
    rep = lmf.routing_report(m)
    for name in lib.modules():
        x = _ref_pool(xs[name], att, pooler)  # [B, K]
        s = torch.full((x.shape[0], len(NAMES)), -1.0, dtype=torch.float64)
        for t, d in enumerate(_dense(lib, name)):
            if d is not None:
                s[:, t] = (x @ d[1][0]).abs()
        top2 = s.topk(2, dim=1).values
        assert ((top2[:, 0] - top2[:, 1]) > 1e-9).all()  # no near-ties
        want = torch.bincount(s.argmax(1), minlength=len(NAMES))
        assert torch.equal(rep.counts[name], want), name
    with pytest.raises(ValueError, match="pooler"):
        lmf.PromptCached(lmf.Arrow(top_k=1), pooler="cls")


def test_recorded_in_routing_report(setup):
    model, lib = setup
    pc = lmf.PromptCached(lmf.Arrow(top_k=2), scope="model")
    m = _patched(setup, pc)
    ids, att = _batch()
    dec = pc.decide(m, ids, attention_mask=att)
    lmf.record_routing(m)
    with torch.no_grad():
        m.generate(ids, attention_mask=att, max_new_tokens=3, do_sample=False, pad_token_id=0)
    rep = lmf.routing_report(m)
    assert set(rep.counts) == set(lib.modules())
    want = torch.bincount(dec.idx.reshape(-1).long(), minlength=len(NAMES))
    for mod, c in rep.counts.items():  # one decision per sequence, recorded at every module
        assert torch.equal(c, want), mod
    assert len(rep.token_scores) == len(lib.modules())  # recorded on the prompt only
    mean_vote = torch.stack([s for _, s in rep.token_scores]).mean(0)  # modules' pooled votes
    torch.testing.assert_close(mean_vote, dec.scores)


@pytest.mark.parametrize("gen_kw", [dict(), dict(num_beams=2, num_return_sequences=2),
                                    dict(num_return_sequences=2, do_sample=True, top_k=5)],
                         ids=["greedy", "beams", "sample"])
def test_k1_generation_equals_adapter_names(setup, gen_kw):
    model, lib = setup
    pc = lmf.PromptCached(lmf.Arrow(top_k=1), scope="model")
    m = _patched(setup, pc)
    ids, att = _batch(B=4, seed=5)
    dec = pc.decide(m, ids, attention_mask=att)
    names = [lib.names[i] for i in dec.idx[:, 0].tolist()]
    assert len(set(names)) > 1  # the prompts do not all go to one expert
    kw = dict(attention_mask=att, max_new_tokens=6, pad_token_id=0, do_sample=False)
    kw.update(gen_kw)
    with torch.no_grad():
        torch.manual_seed(0)
        out = m.generate(ids, **kw)
        torch.manual_seed(0)
        ref = m.generate(ids, adapter_names=names, **kw)
    assert torch.equal(out, ref)


def _mix_model(model, lib, idx, w):
    """fp64 base model whose target modules add sum_s w[b, s] dW_{idx[b, s]} x (dense)."""
    ref = copy.deepcopy(model)
    for name in lib.modules():
        dWs = [d[0] if d is not None else None for d in _dense(lib, name)]

        def hook(mod, a, out, dWs=dWs):
            x = a[0]
            delta = torch.zeros_like(out)
            for b in range(x.shape[0]):
                for e, we in zip(idx[b].tolist(), w[b].tolist()):
                    if e >= 0 and dWs[e] is not None:
                        delta[b] += we * x[b] @ dWs[e].T
            return out + delta
        ref.get_submodule(name).register_forward_hook(hook)
    return ref


def test_k2_generation_equals_output_space_mix(setup):
    model, lib = setup
    pc = lmf.PromptCached(lmf.SpectR(top_k=2, weighting="softmax", temperature=0.05),
                          scope="model")
    m = _patched(setup, pc)
    ids, att = _batch(seed=7)
    dec = pc.decide(m, ids, attention_mask=att)
    assert (dec.weights[:, 1] > 0.05).all() and (dec.weights[:, 0] < 0.95).all()  # a real mix
    ref = _mix_model(model, lib, dec.idx, dec.weights.double())  # the same (fp32) weights
    n_new = 5
    with torch.no_grad():
        out = m.generate(ids, attention_mask=att, max_new_tokens=n_new, do_sample=False,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        seq, a = ids, att
        for step in range(n_new):  # greedy on the reference, recomputing the whole sequence
            pos = (a.cumsum(1) - 1).clamp(min=0)
            logits = ref(seq, attention_mask=a, position_ids=pos).logits[:, -1]
            torch.testing.assert_close(out.scores[step].double(), logits, rtol=1e-6, atol=1e-6)
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            a = torch.cat([a, torch.ones_like(nxt)], 1)
    assert torch.equal(out.sequences, seq)


def test_padding_excluded(setup):
    model, lib = setup
    pc = lmf.PromptCached(lmf.Arrow(top_k=2), scope="model")
    m = _patched(setup, pc)
    ids, att = _batch(seed=2)
    dec = pc.decide(m, ids, attention_mask=att)
    alone = pc.decide(m, ids[1:2, 3:])  # row 1 without its 3 left pads
    torch.testing.assert_close(dec.scores[1], alone.scores[0], rtol=1e-6, atol=1e-7)  # fp32
    assert torch.equal(dec.idx[1], alone.idx[0])
    ids2 = ids.clone()
    ids2[1, :3] = 77  # other pad ids: same decision
    torch.testing.assert_close(pc.decide(m, ids2, attention_mask=att).scores, dec.scores,
                               rtol=1e-6, atol=1e-7)


def test_prompt_mask_honoured(setup):
    model, lib = setup
    router = lmf.Arrow(top_k=1)
    pc = lmf.PromptCached(router, scope="model")
    m = _patched(setup, pc)
    ids, att = _batch(B=4, seed=11)
    pm = torch.zeros_like(ids, dtype=torch.bool)
    pm[:, 4:6] = True
    pm[1, 3] = True
    ref_idx, _, ref_p = reference_decision(model, lib, router, ids, att, prompt_mask=pm)
    dec = pc.decide(m, ids, attention_mask=att, prompt_mask=pm)
    torch.testing.assert_close(dec.scores.double(), ref_p, rtol=1e-5, atol=1e-7)
    assert torch.equal(dec.idx.long(), ref_idx)
    full = pc.decide(m, ids, attention_mask=att)
    assert not torch.allclose(full.scores, dec.scores)
    names = [lib.names[i] for i in dec.idx[:, 0].tolist()]
    kw = dict(attention_mask=att, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        # the span reaches forward and generate (an int 0/1 mask works too)
        torch.testing.assert_close(m(ids, attention_mask=att, prompt_mask=pm.long()).logits,
                                   m(ids, attention_mask=att, adapter_names=names).logits,
                                   rtol=0, atol=0)
        assert torch.equal(m.generate(ids, prompt_mask=pm, **kw),
                           m.generate(ids, adapter_names=names, **kw))
        # beam search: one mask row per input sequence, repeated over the beams
        assert torch.equal(m.generate(ids, prompt_mask=pm, num_beams=2, **kw),
                           m.generate(ids, adapter_names=names, num_beams=2, **kw))


def test_routed_on_the_prompt_only(setup, monkeypatch):
    model, lib = setup
    pc = lmf.PromptCached(lmf.Arrow(top_k=2), scope="model")
    m = _patched(setup, pc)
    passes, scored = [], []
    orig_pass, orig_scores = lmf.PromptCached._score_prompt, lmf.PromptCached._scores
    monkeypatch.setattr(lmf.PromptCached, "_score_prompt",
                        lambda self, *a: passes.append(a[4]) or orig_pass(self, *a))
    monkeypatch.setattr(lmf.PromptCached, "_scores",
                        lambda self, mod, x2, st: scored.append(x2.shape[0])
                        or orig_scores(self, mod, x2, st))
    ids, att = _batch()
    with torch.no_grad():
        m.generate(ids, attention_mask=att, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert passes == [tuple(ids.shape)]  # one scoring pass, on the prompt
    assert scored == [ids.numel()] * len(lib.modules())  # every module once, prompt tokens only
    with torch.no_grad():
        m.generate(ids, attention_mask=att, max_new_tokens=3, num_beams=2, do_sample=False,
                   pad_token_id=0)
        m(ids, attention_mask=att)  # a forward outside generate decides for itself
    assert len(passes) == 3


def test_two_threads_share_the_model(setup):
    model, lib = setup
    pc = lmf.PromptCached(lmf.Arrow(top_k=1), scope="model")
    m = _patched(setup, pc)
    batches = [_batch(B=2, seed=s) for s in (20, 21)]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = [m.generate(ids, attention_mask=att, **kw) for ids, att in batches]
    got = [None, None]
    barrier = threading.Barrier(2)

    def run(i):
        ids, att = batches[i]
        barrier.wait()
        with torch.no_grad():
            for _ in range(3):
                out = m.generate(ids, attention_mask=att, **kw)
                assert torch.equal(out, want[i])
        got[i] = out

    ths = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_module_scope_unchanged_and_takes_prompt_mask(setup):
    model, lib = setup
    pc = lmf.PromptCached(lmf.SpectR(top_k=2))
    assert pc.scope == "module" and repr(pc) == "PromptCached(" + repr(pc.router) + ")"
    m = _patched(setup, pc)
    ids, att = _batch()
    with torch.no_grad():
        a = m(ids, attention_mask=att).logits
        b = m(ids, attention_mask=att, prompt_mask=torch.ones_like(ids)).logits
        pm = torch.ones_like(ids)
        pm[:, :5] = 0
        c = m(ids, attention_mask=att, prompt_mask=pm).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_errors(setup):
    model, lib = setup
    with pytest.raises(ValueError, match="scope"):
        lmf.PromptCached(lmf.Arrow(), scope="layer")
    with pytest.raises(ValueError, match="normalize"):
        lmf.PromptCached(lmf.Arrow(), scope="model", normalize="softmax")
    with pytest.raises(TypeError):
        lmf.PromptCached(lmf.Uniform(), scope="model")
    pc = lmf.PromptCached(lmf.Arrow(top_k=1), scope="model")
    m = _patched(setup, pc)
    ids, att = _batch()
    kw = dict(attention_mask=att, max_new_tokens=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for bad in (torch.ones(ids.shape[1]), torch.ones(ids.shape[0], ids.shape[1] + 1),
                    torch.ones(ids.shape[0] + 1, ids.shape[1])):
            with pytest.raises(ValueError, match="prompt_mask"):
                m(ids, attention_mask=att, prompt_mask=bad)
            with pytest.raises(ValueError, match="prompt_mask"):
                m.generate(ids, prompt_mask=bad, **kw)
            with pytest.raises(ValueError, match="prompt_mask"):
                pc.decide(m, ids, attention_mask=att, prompt_mask=bad)
        with pytest.raises(ValueError, match="adapter_names"):
            m(ids, attention_mask=att, prompt_mask=att, adapter_names=["e0"] * 3)
        with pytest.raises(ValueError, match="adapter_names"):
            m.generate(ids, prompt_mask=att, adapter_names=["e0"] * 3, **kw)
        lmf.set_router(m, lmf.SpectR(top_k=1))  # a per-token router has no use for a span
        with pytest.raises(ValueError, match="PromptCached"):
            m(ids, attention_mask=att, prompt_mask=att)
        with pytest.raises(ValueError, match="PromptCached"):
            m.generate(ids, prompt_mask=att, **kw)
        with pytest.raises(ValueError, match="set_router"):
            pc.decide(m, ids)
        lmf.set_router(m, pc)
        with pytest.raises(RuntimeError, match="patched model"):
            m.model(ids)  # a submodule alone never ran the scoring pass
        assert m(ids, attention_mask=att).logits.shape[:2] == ids.shape  # still usable


def test_top_k_past_the_library_is_clamped(setup):
    pc = lmf.PromptCached(lmf.SpectR(top_k=9), scope="model")
    with pytest.warns(UserWarning, match="top_k"):  # as for the per-token routers
        m = _patched(setup, pc)
    ids, att = _batch()
    dec = pc.decide(m, ids, attention_mask=att)
    assert dec.idx.shape == (3, len(NAMES))  # every expert, each once, weights 1/4
    assert torch.equal(dec.idx.sort(1).values.long(), torch.arange(4).expand(3, 4))
    torch.testing.assert_close(dec.weights, torch.full((3, 4), 0.25))


@pytest.mark.parametrize("scope", ["model", "module"])
def test_manual_decode_loop_in_route_once(setup, scope):
    pc = lmf.PromptCached(lmf.Arrow(top_k=2), scope=scope)
    m = _patched(setup, pc)
    ids, att = _batch()
    kw = dict(attention_mask=att, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = m.generate(ids, **kw)
        seq, a = ids, att
        with lmf.route_once(m):  # one decision for the loop, as inside generate
            pos = (a.cumsum(1) - 1).clamp(min=0)
            out = m(seq, attention_mask=a, position_ids=pos, use_cache=True)
            for _ in range(4):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
                a = torch.cat([a, torch.ones_like(nxt)], 1)
                pos = pos[:, -1:] + 1
                out = m(nxt, attention_mask=a, position_ids=pos, past_key_values=out.past_key_values,
                        use_cache=True)
    assert torch.equal(seq, want)
    if scope == "model":  # the same loop outside route_once: a clear error at the first step
        with torch.no_grad():
            out = m(ids, attention_mask=att, use_cache=True)
            with pytest.raises(ValueError, match="route_once"):
                m(ids[:, :1], attention_mask=torch.cat([att, att[:, :1]], 1),
                  past_key_values=out.past_key_values, use_cache=True)
