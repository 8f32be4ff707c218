"""ELREA end to end (issue 10 item 6): per-example gradient features of the instruction tokens against
per-example autograd through peft (fp64), the Rademacher projection against the dense matrix, the
Adam form against its formula (and against torch's Adam step), BIRCH rebalancing, and the pipeline
fit -> weights -> generate (plus the MoE routing / merging baselines) on a tiny Llama."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import loramix_fast as lmf
from loramix_fast import elrea as EL
from loramix_fast.testing import AdapterSpec, tiny_model, write_peft_adapters

try:
    import sklearn  # noqa: F401
    _NO_SKLEARN = None
except ImportError:
    _NO_SKLEARN = "ELREA's clustering needs scikit-learn (pip install loramix_fast[elrea])"
needs_sklearn = pytest.mark.skipif(_NO_SKLEARN is not None, reason=_NO_SKLEARN or "")

V = 96
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (conftest.py)


@pytest.fixture(scope="module")
def base64():
    m = tiny_model("llama", vocab=V, dtype=F64, init_range=0.1)
    m.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("elrea"))
    return write_peft_adapters(tiny_model("llama", vocab=V), [
        AdapterSpec("base", r=4, alpha=6, targets=["q_proj", "v_proj", "o_proj", "down_proj"],
                    rank_pattern={"down_proj": 3}, seed=7)], d)["base"]


def _examples(lengths, seed):
    """[(ids [n], instruction mask [n] bool)] with a random instruction span (>= 1 target)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, V, (n,), generator=g)
        a = int(torch.randint(1, n - 1, (1,), generator=g))
        b = int(torch.randint(a + 1, n + 1, (1,), generator=g))
        m = torch.zeros(n, dtype=torch.bool)
        m[a:b] = True
        out.append((ids, m))
    return out


def _batch(exs, side):
    L = max(x.shape[0] for x, _ in exs)
    ids = torch.zeros(len(exs), L, dtype=torch.long)
    att = torch.zeros(len(exs), L, dtype=torch.long)
    im = torch.zeros(len(exs), L, dtype=torch.long)
    for i, (x, m) in enumerate(exs):
        n = x.shape[0]
        sl = slice(0, n) if side == "right" else slice(L - n, L)
        ids[i, sl], att[i, sl], im[i, sl] = x, 1, m.long()
    return {"input_ids": ids, "attention_mask": att, "instruction_mask": im, "labels": ids.clone()}


@pytest.fixture(scope="module")
def data():
    exs = [_examples([9, 6, 11], 0), _examples([7, 12], 1), _examples([8], 2)]
    batches = [_batch(exs[0], "right"), _batch(exs[1], "left"), _batch(exs[2], "right")]
    return [e for es in exs for e in es], batches


@pytest.fixture(scope="module")
def patched(base64, folder):
    lib = lmf.AdapterLibrary.from_peft({"base": folder}, dtype=F64)
    model = lmf.patch(copy.deepcopy(base64), lib)
    model.requires_grad_(False)
    return model, lib


def _peft_grads(base64, folder, examples):
    """[N, D] fp64: each example alone through a peft PeftModel, the mean NLL of its instruction
    targets backwarded, the LoRA gradients concatenated in sorted state-dict key order."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(copy.deepcopy(base64), folder, is_trainable=True).double()
    named = {n.replace(".default", ""): p for n, p in pm.named_parameters() if "lora_" in n}
    keys = sorted(named)
    rows = []
    for ids, m in examples:
        logits = pm(ids[None]).logits[0, :-1]
        lp = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]
        k = m[1:].to(F64)
        loss = -(lp * k).sum() / k.sum()
        gs = torch.autograd.grad(loss, [named[k_] for k_ in keys])
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows), keys


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- the bar: gradient features with d_proj=None equal per-example autograd through peft ----------
def test_raw_features_equal_per_example_peft_autograd(base64, folder, patched, data):
    model, lib = patched
    examples, batches = data
    names_before = lib.names
    ours = EL.gradient_features(model, lib, "base", batches)
    want, keys = _peft_grads(base64, folder, examples)
    assert ours.dtype == F64 and ours.shape == want.shape == (6, want.shape[1])
    assert [k for k, _, _ in EL.peft_keys(lib.factors("base"))] == keys
    for i in range(len(examples)):  # every row: padded left / right, unequal lengths, alone
        assert _rel(ours[i], want[i]) <= 1e-10, i
    # the rows differ from each other (the check is not vacuous: per-example, not the batch mean)
    assert _rel(want[0], want[1]) > 0.1
    assert lib.names == names_before  # the temporary copies are gone
    # normalised: eq. 7
    normed = EL.gradient_features(model, lib, "base", batches, normalize=True)
    torch.testing.assert_close(normed, F.normalize(want, dim=1), rtol=1e-10, atol=1e-12)


def test_features_need_a_model_patched_with_the_library(base64, folder, patched, data):
    _, lib = patched
    other = lmf.patch(copy.deepcopy(base64), lmf.AdapterLibrary.from_peft({"base": folder},
                                                                          dtype=F64))
    with pytest.raises(ValueError, match="patched with lib"):
        EL.gradient_features(other, lib, "base", data[1][:1])
    assert lib.names == ("base",)
    with pytest.raises(KeyError, match="'nope'"):
        EL.gradient_features(patched[0], lib, "nope", data[1][:1])
    with pytest.raises(ValueError, match="instruction_mask"):
        bad = dict(data[1][0], instruction_mask=data[1][0]["instruction_mask"][:, :-1])
        EL.gradient_features(patched[0], lib, "base", [bad])
    empty = dict(data[1][1], instruction_mask=data[1][1]["instruction_mask"].clone())
    empty["instruction_mask"][1] = 0
    with pytest.raises(ValueError, match=r"batches\[1\]: row\(s\) \[1\]"):
        EL.gradient_features(patched[0], lib, "base", [data[1][0], empty])
    assert lib.names == ("base",)  # copies removed after a failure too


def test_checkpoints_are_averaged(base64, folder, patched, data):
    model, lib = patched
    examples, batches = data
    g = torch.Generator().manual_seed(3)
    other = {m: lmf.LoRAFactors(f.A + 0.1 * torch.randn(f.A.shape, generator=g, dtype=F64),
                                f.B + 0.1 * torch.randn(f.B.shape, generator=g, dtype=F64),
                                f.scale)
             for m, f in lib.factors("base").items()}
    g0 = EL.gradient_features(model, lib, "base", batches[:1])
    g1 = EL.gradient_features(model, lib, "base", batches[:1], checkpoints=[other])
    both = EL.gradient_features(model, lib, "base", batches[:1], checkpoints=["base", other])
    assert _rel(g0, g1) > 1e-2
    torch.testing.assert_close(both, (g0 + g1) / 2, rtol=1e-12, atol=1e-14)
    bad = dict(other)
    bad.pop(sorted(bad)[0])
    with pytest.raises(ValueError, match="checkpoints\\[0\\]"):
        EL.gradient_features(model, lib, "base", batches[:1], checkpoints=[bad])


# ---- the projection ----------------------------------------------------------------------------
def test_projection_equals_dense_rademacher_and_chunking_does_not_matter():
    Bk = EL.PROJECTION_BLOCK
    D, d = 3 * Bk + 17, 40
    G = torch.randn(5, D, dtype=F64, generator=torch.Generator().manual_seed(0))
    R = EL.rademacher_matrix(D, d, seed=11)
    assert R.shape == (D, d) and set(R.unique().tolist()) == {-1.0, 1.0}
    assert abs(R.mean().item()) < 0.02
    want = G @ R / math.sqrt(d)
    outs = [EL.rademacher_project(G, d, seed=11, chunk_rows=c) for c in (Bk, 2 * Bk, 8 * Bk)]
    for o in outs:
        torch.testing.assert_close(o, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(EL.rademacher_project(G, d, seed=11), EL.rademacher_project(G, d, seed=11))
    assert _rel(EL.rademacher_project(G, d, seed=12), want) > 0.5
    # R's rows depend on (seed, row) only: a longer D extends it, a wider d_proj draws anew
    assert torch.equal(EL.rademacher_matrix(D + Bk, d, seed=11)[:D], R)
    with pytest.raises(ValueError, match="chunk_rows"):
        EL.rademacher_project(G, d, chunk_rows=Bk + 1)
    with pytest.raises(ValueError, match="d_proj"):
        EL.rademacher_project(G, 0)


def test_projected_features_are_the_projection_of_the_gradients(patched, data):
    model, lib = patched
    _, batches = data
    raw = EL.gradient_features(model, lib, "base", batches)
    d = 24
    got = EL.gradient_features(model, lib, "base", batches, d_proj=d, seed=5, normalize=False,
                               project_rows=2)  # several projection passes
    want = raw @ EL.rademacher_matrix(raw.shape[1], d, seed=5) / math.sqrt(d)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    normed = EL.gradient_features(model, lib, "base", batches, d_proj=d, seed=5)  # default: eq. 7
    torch.testing.assert_close(normed, F.normalize(want, dim=1), rtol=1e-10, atol=1e-12)


# ---- Adam form (eq. 5) -----------------------------------------------------------------------------
def test_adam_form_equals_the_fp64_formula(patched, data):
    model, lib = patched
    _, batches = data
    g = EL.gradient_features(model, lib, "base", batches)
    N, D = g.shape
    gen = torch.Generator().manual_seed(4)
    m = torch.randn(D, dtype=F64, generator=gen) * 1e-2
    v = torch.rand(D, dtype=F64, generator=gen) * 1e-3
    st = {"exp_avg": m, "exp_avg_sq": v, "step": 3, "betas": (0.8, 0.95), "eps": 1e-6}
    got = EL.gradient_features(model, lib, "base", batches, optimizer_states=[st])
    t = 4
    mh = (0.8 * m + 0.2 * g) / (1 - 0.8 ** t)
    vh = (0.95 * v + 0.05 * g ** 2) / (1 - 0.95 ** t)
    want = mh / (vh.sqrt() + 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert _rel(F.normalize(got, dim=1), F.normalize(g, dim=1)) > 1e-2  # not the SGD form


def test_adam_state_gives_torch_adams_step_direction(base64, folder, data):
    """With an optimizer's real state, eq. 5 is the direction of the Adam step that example's
    gradient would take: theta_before - theta_after = lr * feature."""
    examples, batches = data
    lib = lmf.AdapterLibrary.from_peft({"base": folder}, dtype=F64)
    model = lmf.patch(copy.deepcopy(base64), lib)
    model.requires_grad_(False)
    opt = torch.optim.Adam(lib.parameters(["base"]), lr=1e-2, betas=(0.85, 0.99), eps=1e-7)
    b0 = batches[0]
    for _ in range(2):  # some history
        opt.zero_grad()
        model(input_ids=b0["input_ids"], attention_mask=b0["attention_mask"],
              adapter_names=["base"] * 3, labels=b0["labels"]).loss.backward()
        opt.step()
    st = EL.adam_state(opt, lib, "base")
    assert st["step"] == 2 and st["betas"] == (0.85, 0.99)
    one = batches[2]  # a single example: its gradient is the whole batch's
    feat = EL.gradient_features(model, lib, "base", [one], optimizer_states=[st])
    keys = EL.peft_keys(lib.factors("base"))
    before = EL._flat(lib.factors("base"), keys).clone()
    opt.zero_grad()
    ids, im = one["input_ids"], one["instruction_mask"]
    logits = model(input_ids=ids, adapter_names=["base"]).logits[0, :-1]
    lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    k = im[0, 1:].to(F64)
    (-(lp * k).sum() / k.sum()).backward()
    opt.step()
    after = EL._flat(lib.factors("base"), keys)
    torch.testing.assert_close((before - after) / 1e-2, feat[0], rtol=1e-8, atol=1e-10)


# ---- BIRCH with rebalancing ------------------------------------------------------------------------
def _blobs(centers, sizes, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    pts = [c + std * torch.randn(n, c.shape[0], generator=g, dtype=F64)
           for c, n in zip(centers, sizes)]
    return torch.cat(pts)


@needs_sklearn
def test_rebalancing_splits_a_cluster_over_5x_the_smallest():
    from sklearn.cluster import Birch

    d = 6
    e = torch.eye(d, dtype=F64)
    # one big cluster made of two tight halves (near e0), two small clusters
    X = _blobs([e[0] * 4 + e[3] * 0.5, e[0] * 4 - e[3] * 0.5, e[1] * 4, e[2] * 4],
               [30, 30, 6, 6], 0.01)
    plain = Birch(threshold=0.1, n_clusters=3).fit_predict(X.numpy())
    sizes = sorted(torch.bincount(torch.as_tensor(plain)).tolist())
    assert sizes == [6, 6, 60]  # BIRCH alone: 60 > 5 x 6
    labels, hist = EL.birch_clusters(X, n_clusters=3, threshold=0.1, return_history=True)
    assert sorted(torch.bincount(labels).tolist()) == [6, 6, 30, 30]
    assert hist == [[60, 6, 6], [30, 30, 6, 6]]
    # the split follows the halves
    assert labels[:30].unique().numel() == 1 and labels[30:60].unique().numel() == 1
    assert labels[0] != labels[30]
    none = EL.birch_clusters(X, n_clusters=3, threshold=0.1, rounds=0)
    assert sorted(torch.bincount(none).tolist()) == [6, 6, 60]


@needs_sklearn
def test_rebalancing_stops_after_three_rounds():
    # a big cluster of 16 tight blobs of 10 in a binary hierarchy (scales 8 / 4 / 2 / 1): each round
    # halves it, so balancing it against a cluster of 2 (5 x 2 = 10) would take 4 rounds
    d = 8
    e = torch.eye(d, dtype=F64)
    centers = []
    for code in range(16):
        c = e[0] * 100
        for bit, scale in enumerate((8.0, 4.0, 2.0, 1.0)):
            c = c + (scale if code >> bit & 1 else -scale) * e[1 + bit]
        centers.append(c)
    centers.append(-e[0] * 100)
    X = _blobs(centers, [10] * 16 + [2], 0.001)
    labels, hist = EL.birch_clusters(X, n_clusters=2, threshold=0.05, return_history=True)
    assert len(hist) == 4  # the initial clustering and three rounds, no fourth
    assert hist[0] == [160, 2]
    assert hist[1] == [80, 80, 2] and hist[2] == [40] * 4 + [2] and hist[3] == [20] * 8 + [2]
    assert labels.max().item() + 1 == 9
    four, h4 = EL.birch_clusters(X, n_clusters=2, threshold=0.05, rounds=4, return_history=True)
    assert h4[-1] == [10] * 16 + [2]


def test_centroids_are_means_of_the_unnormalised_features():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(7, 5, dtype=F64, generator=g) * torch.arange(1, 8, dtype=F64)[:, None]
    lab = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    mu = EL.cluster_centroids(f, lab)
    for c in range(3):
        torch.testing.assert_close(mu[c], f[lab == c].mean(0))
    with pytest.raises(ValueError, match="no member"):
        EL.cluster_centroids(f, torch.tensor([0, 0, 0, 3, 0, 0, 0]))


# ---- the pipeline ---------------------------------------------------------------------------------
@needs_sklearn
def test_pipeline_fit_weights_generate_and_baselines(tmp_path):
    base = tiny_model("llama", vocab=V, init_range=0.1)
    base.requires_grad_(False)
    lib = lmf.AdapterLibrary.create(base, {"elrea_base": lmf.LoRASpec(
        r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)})
    model = lmf.patch(base, lib)
    model.requires_grad_(False)
    exs = _examples([8, 10, 7, 9, 11, 8, 10, 9], 5)
    train = [_batch(exs[:4], "right"), _batch(exs[4:], "left")]
    el = lmf.elrea.ELREA(model, lib, "elrea_base", d_proj=32, n_clusters=2, threshold=0.3)
    el.fit(train, steps=2, lr=1e-2, rows_per_cluster=2, save_dir=tmp_path)
    C = len(el.cluster_names)
    assert 2 <= C <= 8 and el.experts[0] == "elrea_base" and lmf.BASE not in el.experts
    assert el.centroids.shape == (C, 32) and el.labels.shape == (8,)
    for n in el.cluster_names:  # trained from the base adapter, saved as peft folders
        assert (tmp_path / n / "adapter_model.safetensors").exists()
        fa, fb = lib.factors(n), lib.factors("elrea_base")
        assert any(_rel(fa[m].B, fb[m].B) > 1e-4 for m in fa)
    test = [_batch(_examples([9, 7, 10], 6), "left")]
    w = el.weights(test)
    cos = el.similarities(test)
    assert w.shape == (3, 1 + C)
    torch.testing.assert_close(w[:, 0], 1 - cos.amax(1))
    torch.testing.assert_close(w[:, 1:].sum(1), torch.ones(3))
    ids, att = test[0]["input_ids"], test[0]["attention_mask"]
    out = el.generate(ids, weights=w, attention_mask=att, max_new_tokens=3, eos_token_id=[])
    assert out.shape == (3, ids.shape[1] + 3) and torch.equal(out[:, :ids.shape[1]], ids)
    # the first generated token is the argmax of the weighted logit sum (eq. 10)
    with torch.no_grad():
        z = sum(w[:, e, None] * model(input_ids=ids, attention_mask=att,
                                      position_ids=EL._positions(att),
                                      adapter_names=[n] * 3).logits[:, -1]
                for e, n in enumerate(el.experts))
    assert torch.equal(out[:, ids.shape[1]], z.argmax(-1))
    lp = el.logprobs(ids, weights=w, attention_mask=att)
    assert lp.shape == (3, ids.shape[1] - 1)
    # MoE routing (eq. 11) = the delta merge with the same weights; the factor merge differs
    names = list(lib.names)
    with torch.no_grad():
        with el.routed(w):
            routed = model(input_ids=ids, attention_mask=att).logits
            gen_r = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=2,
                                   do_sample=False, pad_token_id=0)
        with el.merged(w, space="delta") as mn:
            delta = model(input_ids=ids, attention_mask=att, adapter_names=mn).logits
        with el.merged(w) as mn:
            factor = model(input_ids=ids, attention_mask=att, adapter_names=mn).logits
        plain = model(input_ids=ids, attention_mask=att, adapter_names=["elrea_base"] * 3).logits
    assert gen_r.shape == (3, ids.shape[1] + 2)
    keep = att.bool()
    assert _rel(routed[keep], delta[keep]) <= 1e-5
    assert _rel(factor[keep], delta[keep]) > 1e-4 and _rel(routed[keep], plain[keep]) > 1e-4
    assert list(lib.names) == names  # merged adapters removed, router back to none
    with pytest.raises(KeyError, match="named adapter"):
        lmf.elrea.ELREA(model, lib, lmf.BASE)


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(ImportError, match=r"pip install loramix_fast\[elrea\]"):
        EL.birch_clusters(torch.randn(4, 3, dtype=F64))


def test_cluster_experts_train_as_if_each_cluster_trained_alone(base64, folder, tmp_path):
    """All clusters in one mixed batch give each expert what Adam on its own cluster's rows alone
    gives it (through peft, fp64): the multi-tenant training path keeps the clusters apart."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    lib = lmf.AdapterLibrary.from_peft({"base": folder}, dtype=F64)
    model = lmf.patch(copy.deepcopy(base64), lib)
    model.requires_grad_(False)
    exs = _examples([9, 7, 11, 8], 8)
    b = _batch(exs, "right")
    b["labels"][:, :3] = -100  # targets: all but the first tokens
    labels = torch.tensor([1, 0, 0, 1])
    names = EL.train_cluster_experts(model, lib, "base", [b], labels, steps=2, lr=1e-2,
                                     rows_per_cluster=2, save_dir=tmp_path)
    assert names == ["base_c0", "base_c1"]
    for c, n in enumerate(names):
        rows = (labels == c).nonzero().flatten()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = PeftModel.from_pretrained(copy.deepcopy(base64), folder,
                                           is_trainable=True).double()
        opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        ids, att, lab = b["input_ids"][rows], b["attention_mask"][rows], b["labels"][rows]
        for _ in range(2):
            opt.zero_grad()
            logits = pm(input_ids=ids, attention_mask=att).logits[:, :-1]
            lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
            k = ((lab[:, 1:] != -100) & (att[:, 1:] > 0) & (att[:, :-1] > 0)).to(F64)
            (-(lp * k).sum() / k.sum()).backward()
            opt.step()
        want = get_peft_model_state_dict(pm)
        got = load_file(str(tmp_path / n / "adapter_model.safetensors"))
        init = load_file(f"{folder}/adapter_model.safetensors")
        assert set(got) == set(want)
        for key in want:
            assert _rel(got[key].double(), want[key]) <= 1e-6, (n, key)
            assert _rel(want[key], init[key].double()) > 1e-3, key  # training moved it
