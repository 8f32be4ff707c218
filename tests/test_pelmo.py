"""PELMo: eq. 1 labels, the router (pooled hidden state -> head -> softmax -> top-k ->
renormalise) against an fp64 reference, training on a separable toy task, and the sparse
ensemble it drives: k = 2 of 4 experts runs 2 copies per sequence (rows counted) and equals the
dense ensemble whose unselected weights are 0; per-(question, expert) content; expert prefixes
run once per expert with their KV cache reused (tokens counted)."""
from __future__ import annotations

import warnings

import pytest
import torch

import loramix_fast as lmf
from loramix_fast import reference
from loramix_fast.ensemble import ensemble_generate
from loramix_fast.pelmo import (HiddenStateFeatures, PELMoRouter, expert_correctness, fit_router,
                                pelmo_generate, pelmo_labels, pool_hidden)
from loramix_fast.testing import AdapterSpec, tiny_model, write_peft_adapters

VOCAB = 100
EXPERTS = ["a", "b", "__base__", "c"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(patched fp64 model, its unpatched fp64 twin)."""
    warnings.simplefilter("ignore")
    base = tiny_model("llama", hidden=32, layers=2, vocab=VOCAB, intermediate=48, init_range=0.2)
    dirs = write_peft_adapters(base, [AdapterSpec(n, r=r, seed=40 + i) for i, (n, r) in
                                      enumerate({"a": 4, "b": 3, "c": 5}.items())],
                               str(tmp_path_factory.mktemp("pelmo")))
    plain = tiny_model("llama", hidden=32, layers=2, vocab=VOCAB, intermediate=48,
                       init_range=0.2).double()
    model = tiny_model("llama", hidden=32, layers=2, vocab=VOCAB, intermediate=48,
                       init_range=0.2).double()
    lmf.patch(model, lmf.AdapterLibrary.from_peft(dirs))
    return model, plain


def _prompts(B, seed, lo=3, hi=VOCAB, min_len=3, max_len=8):
    g = torch.Generator().manual_seed(seed)
    lens = [max_len] + torch.randint(min_len, max_len + 1, (B - 1,), generator=g).tolist()
    P = max(lens)
    ids = torch.zeros(B, P, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.long)
    rows = []
    for b, n in enumerate(lens):
        toks = torch.randint(lo, hi, (n,), generator=g)
        ids[b, P - n:] = toks
        mask[b, P - n:] = 1
        rows.append(toks.tolist())
    return ids, mask, rows


class RowCounter:
    """Forward pre-hook on the model: (rows, tokens per row) of every forward."""

    def __init__(self, model):
        self.calls = []
        self.h = model.register_forward_pre_hook(
            lambda m, a, kw: self.calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)

    def close(self):
        self.h.remove()


@torch.no_grad()
def dense_reference(model, rows, experts, w, max_new, heads=None):
    """The dense ensemble: EVERY expert run on the full sequence (no cache) at every step, mixed
    in fp64 by reference.mix_logits with the given weights (zeros included). ``heads[b][e]``:
    the tokens before prompt b for expert e (prefix + content)."""
    E = len(experts)
    out = []
    for b, row in enumerate(rows):
        toks = []
        for _ in range(max_new):
            logits = []
            for e, name in enumerate(experts):
                x = torch.tensor([(heads[b][e] if heads else []) + row + toks])
                logits.append(model(input_ids=x, adapter_names=[name]).logits[0, -1])
            z = reference.mix_logits(torch.stack(logits)[None], w[b][None].double(), "probs",
                                     upcast=True)[0]
            toks.append(int(z.argmax()))
        out.append(toks)
    return out


# ---- eq. 1 -------------------------------------------------------------------------------------

def test_labels_eq1_and_fallbacks():
    c = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    y = pelmo_labels(c)
    assert y.dtype == torch.float32
    assert torch.equal(y[0], torch.tensor([1.0, 0, 1, 0])) and torch.equal(y[2], c[2].float())
    assert torch.equal(y[1], torch.ones(4))  # all wrong: no preference
    assert torch.equal(pelmo_labels(c, fallback=2)[1], torch.tensor([0.0, 0, 1, 0]))
    assert torch.equal(pelmo_labels(c, fallback="drop")[1], torch.zeros(4))
    with pytest.raises(ValueError, match="fallback"):
        pelmo_labels(c, fallback="first")
    with pytest.raises(ValueError, match="outside"):
        pelmo_labels(c, fallback=4)
    with pytest.raises(ValueError, match="questions, experts"):
        pelmo_labels(torch.ones(3))


# ---- the router (eqs. 2-3) ----------------------------------------------------------------------

@pytest.mark.parametrize("pooler", ["mean", "last", "max"])
def test_pool_hidden_against_loops(pooler):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    m = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])  # left, none, right
    got = pool_hidden(h, m, pooler)
    for b in range(3):
        real = h[b][m[b].bool()]
        want = {"mean": real.mean(0), "last": real[-1], "max": real.amax(0)}[pooler]
        torch.testing.assert_close(got[b], want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="at least one token"):
        pool_hidden(h, torch.zeros(3, 5), pooler)
    with pytest.raises(ValueError, match="pooler"):
        pool_hidden(h, m, "cls")


@pytest.mark.parametrize("pooler,layer", [("mean", -1), ("last", 1), ("max", -1)])
def test_router_weights_match_fp64_reference(setup, pooler, layer):
    model, plain = setup
    ids, mask, _ = _prompts(4, seed=3)
    feats = HiddenStateFeatures(model, pooler=pooler, layer=layer)
    torch.manual_seed(0)
    router = PELMoRouter(feats, n_experts=4, top_k=2)
    # reference: the UNPATCHED twin's hidden states (so the features carry no adapter), fp64
    with torch.no_grad():
        hs = plain(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    H = hs[layer]
    f = torch.stack([{"mean": H[b][mask[b].bool()].mean(0), "last": H[b][mask[b].bool()][-1],
                      "max": H[b][mask[b].bool()].amax(0)}[pooler] for b in range(4)])
    W, bias = router.head.weight.double(), router.head.bias.double()
    p = torch.softmax(f @ W.T + bias, -1)
    order = p.argsort(-1, descending=True)[:, :2]
    want = torch.zeros_like(p).scatter(1, order, p.gather(1, order))
    want = want / want.sum(1, keepdim=True)
    torch.testing.assert_close(router.probs(ids, mask).double(), p, rtol=1e-5, atol=1e-6)
    got = router(ids, mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert ((got > 0).sum(1) == 2).all()


def test_router_on_any_callable_and_validation():
    feats = lambda ids, m: torch.nn.functional.one_hot(ids[:, -1] % 3, 3).float()  # noqa: E731
    head = lambda f: f @ torch.tensor([[2.0, 0, 0], [0, 1.0, 0], [0, 0, 3.0]])  # noqa: E731
    r = PELMoRouter(feats, n_experts=3, top_k=1, head=head)
    w = r(torch.tensor([[5, 3], [5, 4], [5, 5]]), None)
    assert torch.equal(w, torch.eye(3))
    with pytest.raises(ValueError, match="in_features"):
        PELMoRouter(feats, n_experts=3)
    with pytest.raises(ValueError, match=r"\[batch, 4\]"):
        PELMoRouter(feats, n_experts=4, head=head)(torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="features"):
        PELMoRouter(None, n_experts=3, in_features=4)
    with pytest.raises(TypeError, match="parameters"):
        fit_router(r, torch.ones(2, 2, dtype=torch.long), None, torch.ones(2, 3))


def test_fit_router_learns_which_experts_answer(setup):
    """Two kinds of question (tokens from disjoint ranges); expert 0 answers the first kind,
    experts 1 and 3 the second, nobody a third set (all-wrong fallback "drop"). After training,
    the top-1 of every held-out question is a correct expert. Features: the mean of the layer-0
    hidden states (the embeddings), which separate the two kinds linearly; a random tiny model's
    upper layers scramble them (that is the backbone's quality, not the training's)."""
    model, _ = setup
    n = 32
    ids_a, m_a, _ = _prompts(n, seed=1, lo=3, hi=30)
    ids_b, m_b, _ = _prompts(n, seed=2, lo=70, hi=VOCAB)
    ids_n, m_n, _ = _prompts(6, seed=4, lo=3, hi=VOCAB)
    ids, mask = torch.cat([ids_a, ids_b, ids_n]), torch.cat([m_a, m_b, m_n])
    correct = torch.zeros(2 * n + 6, 4, dtype=torch.bool)
    correct[:n, 0] = True
    correct[n:2 * n, 1] = correct[n:2 * n, 3] = True
    y = pelmo_labels(correct, fallback="drop")
    torch.manual_seed(0)
    router = PELMoRouter(HiddenStateFeatures(model, pooler="mean", layer=0), n_experts=4,
                         top_k=2)
    hist = fit_router(router, ids, mask, y, epochs=60, lr=5e-2, batch_size=16)
    assert hist[-1] < 0.2 * hist[0]
    ta, tma, _ = _prompts(16, seed=11, lo=3, hi=30)
    tb, tmb, _ = _prompts(16, seed=12, lo=70, hi=VOCAB)
    wa, wb = router(ta, tma), router(tb, tmb)
    assert (wa.argmax(1) == 0).all()
    assert torch.isin(wb.argmax(1), torch.tensor([1, 3])).all()
    assert ((wb[:, 1] > 0) & (wb[:, 3] > 0)).float().mean() >= 0.9  # both correct experts kept
    with pytest.raises(ValueError, match="all zero"):
        fit_router(router, ids[2 * n:], mask[2 * n:], y[2 * n:])


# ---- the sparse ensemble ------------------------------------------------------------------------

def test_k2_of_4_runs_2_copies_and_equals_dense_with_zeros(setup):
    model, _ = setup
    B, new = 3, 5
    ids, mask, rows = _prompts(B, seed=8)
    probs = torch.softmax(torch.randn(B, 4, generator=torch.Generator().manual_seed(2)), -1)
    w = lmf.topk_renormalize(probs, 2)
    assert ((w > 0).sum(1) == 2).all()
    rc = RowCounter(model)
    try:
        out = ensemble_generate(model, ids, experts=EXPERTS, weights=w, mode="probs",
                                max_new_tokens=new, attention_mask=mask, eos_token_id=[])
    finally:
        rc.close()
    assert rc.calls[0] == (2 * B, ids.shape[1]) and all(c[0] == 2 * B for c in rc.calls)
    assert len(rc.calls) == new
    ref = dense_reference(model, rows, EXPERTS, w, new)
    assert out[:, ids.shape[1]:].tolist() == ref
    # the dense run (every weight used) has 4 copies per sequence and other tokens
    rc = RowCounter(model)
    try:
        ensemble_generate(model, ids, experts=EXPERTS, weights=probs, mode="probs",
                          max_new_tokens=1, attention_mask=mask, eos_token_id=[])
    finally:
        rc.close()
    assert rc.calls == [(4 * B, ids.shape[1])]


def test_uneven_selection_per_sequence(setup):
    """Sequences selecting 1, 3 and 2 experts (mode logits: a zero weight is unused): 6 rows."""
    model, _ = setup
    ids, mask, rows = _prompts(3, seed=5)
    w = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.5, 0.0, -0.3, 0.8], [0.0, 0.0, 1.2, 0.4]])
    rc = RowCounter(model)
    try:
        out = ensemble_generate(model, ids, experts=EXPERTS, weights=w, mode="logits",
                                max_new_tokens=4, attention_mask=mask, eos_token_id=[])
    finally:
        rc.close()
    assert all(c[0] == 6 for c in rc.calls)
    for b, row in enumerate(rows):
        toks = []
        for _ in range(4):
            with torch.no_grad():
                z = sum(float(w[b, e]) * model(input_ids=torch.tensor([row + toks]),
                                               adapter_names=[n]).logits[0, -1]
                        for e, n in enumerate(EXPERTS))
            toks.append(int(z.argmax()))
        assert out[b, ids.shape[1]:].tolist() == toks


def test_prefix_cache_once_per_expert_and_content(setup):
    """Expert prompts of unequal length (one empty) run once per selected expert; per-(question,
    expert) content goes between prefix and question; the tokens equal the dense reference and
    the run without the prefix cache."""
    model, _ = setup
    B, new = 3, 5
    ids, mask, rows = _prompts(B, seed=13)
    prefixes = [[5, 17, 9, 40, 33, 21], [71, 8], [], [64, 3, 3]]
    g = torch.Generator().manual_seed(9)
    content = [[torch.randint(3, VOCAB, (int(n),), generator=g).tolist() for n in
                torch.randint(0, 4, (4,), generator=g)] for _ in range(B)]
    w = torch.tensor([[0.6, 0.0, 0.4, 0.0], [0.0, 0.3, 0.0, 0.7], [0.5, 0.0, 0.0, 0.5]])
    kw = dict(experts=EXPERTS, weights=w, mode="probs", max_new_tokens=new,
              attention_mask=mask, eos_token_id=[], expert_prompts=prefixes,
              expert_content=content)
    rc = RowCounter(model)
    try:
        out = ensemble_generate(model, ids, **kw)
    finally:
        rc.close()
    used = sorted({e for b in range(B) for e in range(4) if w[b, e] > 0})  # 0, 1, 2, 3
    Lp = max(len(prefixes[e]) for e in used)
    assert rc.calls[0] == (len(used), Lp)  # each expert's prefix once
    L = max(len(content[b][e]) + len(rows[b]) for b in range(B) for e in range(4) if w[b, e] > 0)
    assert rc.calls[1] == (2 * B, L)  # the copies start after the prefix
    heads = [[prefixes[e] + content[b][e] for e in range(4)] for b in range(B)]
    ref = dense_reference(model, rows, EXPERTS, w, new, heads=heads)
    assert out[:, ids.shape[1]:].tolist() == ref
    nocache = ensemble_generate(model, ids, prefix_cache=False, **kw)
    assert torch.equal(nocache, out)


def test_content_validation(setup):
    model, _ = setup
    ids = torch.randint(3, VOCAB, (2, 4))
    kw = dict(experts=["a", "b"], max_new_tokens=1)
    with pytest.raises(ValueError, match="expert_content must be a list of 2"):
        ensemble_generate(model, ids, expert_content=[[[1], [2]]], **kw)
    with pytest.raises(ValueError, match=r"expert_content\[1\]"):
        ensemble_generate(model, ids, expert_content=[[[1], [2]], [[1]]], **kw)
    with pytest.raises(TypeError, match="token ids"):
        ensemble_generate(model, ids, expert_content=[["x", [2]], [[1], [2]]], **kw)


def test_pelmo_generate_end_to_end(setup):
    """Prompt experts on the plain backbone: the router's top-2 decides which 2 of 4 run."""
    model, plain = setup
    ids, mask, rows = _prompts(3, seed=21)
    prefixes = [[11, 12, 13], [50, 51], [80], [7, 7, 7, 7]]
    experts = ["__base__"] * 4
    torch.manual_seed(3)
    router = PELMoRouter(HiddenStateFeatures(plain, pooler="last"), n_experts=4, top_k=2)
    w = router(ids, mask)
    rc = RowCounter(plain)
    try:
        out = pelmo_generate(plain, ids, router, experts, attention_mask=mask,
                             expert_prompts=prefixes, max_new_tokens=4, eos_token_id=[])
    finally:
        rc.close()
    # the features ran on plain.base_model (no LM head: not seen by the hook); then the used
    # experts' prefixes once, then 2 copies per question
    assert rc.calls[0][0] == len({int(e) for e in w.nonzero()[:, 1]})
    assert len(rc.calls) == 5 and all(c[0] == 6 for c in rc.calls[1:])
    heads = [[p for p in prefixes] for _ in range(3)]
    want = dense_reference(model, rows, experts, w, 4, heads=heads)  # patched twin, base rows
    assert out[:, ids.shape[1]:].tolist() == want
    with pytest.raises(ValueError, match="probs"):
        pelmo_generate(plain, ids, router, experts, mode="logits")
    # eq. 1's input from the experts alone
    c = expert_correctness(plain, ids, mask, experts, lambda q, toks: toks[0] % 2 == 0,
                           expert_prompts=prefixes, max_new_tokens=1, eos_token_id=[])
    assert c.shape == (3, 4) and c.dtype == torch.bool
    for e in range(4):
        one = ensemble_generate(plain, ids, experts=["__base__"], max_new_tokens=1,
                                attention_mask=mask, expert_prompts=[prefixes[e]], eos_token_id=[])
        assert c[:, e].tolist() == [int(t) % 2 == 0 for t in one[:, -1]]
