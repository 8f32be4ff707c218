"""ensemble_logprobs against an fp64 oracle (each expert run alone through peft in float64, mixed in
float64), gradients in the weights, and fit_ensemble_weights (one forward per batch, optimum of the
convex mixture NLL against a grid over the simplex)."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import loramix_fast as lmf
from loramix_fast.testing import AdapterSpec, peft_multi, tiny_model, write_peft_adapters

pytest.importorskip("transformers")
pytest.importorskip("peft")

VOCAB = 96
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"a": 4, "b": 6, "c": 3}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    warnings.simplefilter("ignore")
    folder = str(tmp_path_factory.mktemp("scoring_adapters"))
    model = tiny_model("llama", hidden=64, layers=2, vocab=VOCAB, intermediate=128, init_range=0.2)
    dirs = write_peft_adapters(model, [AdapterSpec(n, r=r, seed=200 + i, targets=TARGETS)
                                       for i, (n, r) in enumerate(ADAPTERS.items())], folder)
    oracle = peft_multi(model, dirs).double()
    lmf.patch(model, lmf.AdapterLibrary.from_peft(dirs))
    return model, oracle


def _batch(B, L, seed, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if pad:  # left padding of distinct lengths
        for b in range(1, B):
            n = int(torch.randint(0, L - 3, (1,), generator=g))
            ids[b, :n] = 0
            mask[b, :n] = 0
    return ids, mask


@torch.no_grad()
def _oracle(oracle, ids, mask, experts, w, mode):
    """fp64: every expert alone through peft, mixed in fp64. [B, L-1], 0 where padded."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    z = torch.stack([oracle(input_ids=ids, attention_mask=mask, position_ids=pos,
                            adapter_names=[e] * ids.shape[0]).logits for e in experts], 1)
    z = z[:, :, :-1].double()  # [B, E, L-1, V]
    y = ids[:, 1:]
    w = torch.as_tensor(w, dtype=torch.float64)
    w = w.expand(ids.shape[0], len(experts)) if w.dim() == 1 else w
    if mode == "probs":
        w = w / w.sum(1, keepdim=True)
        p = torch.einsum("be,belv->blv", w, torch.softmax(z, -1))
        out = torch.log(p.gather(-1, y[..., None])[..., 0])
    else:
        out = torch.log_softmax(torch.einsum("be,belv->blv", w, z), -1).gather(
            -1, y[..., None])[..., 0]
    valid = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
    return torch.where(valid, out, torch.zeros_like(out))


@pytest.mark.parametrize("mode", ["probs", "logits"])
@pytest.mark.parametrize("weights", ["vector", "per_sequence"])
def test_matches_fp64_oracle(setup, mode, weights):
    model, oracle = setup
    experts = ["a", "__base__", "c", "b"]
    ids, mask = _batch(3, 11, seed=1)
    g = torch.Generator().manual_seed(7)
    if weights == "vector":
        w = torch.tensor([0.5, 0.1, 0.3, 0.1]) if mode == "probs" else torch.tensor(
            [1.1, -0.3, 0.6, 0.2])
    else:
        w = torch.rand(3, 4, generator=g) + 0.05
    out = lmf.ensemble_logprobs(model, ids, experts, w, mode=mode, attention_mask=mask)
    assert out.shape == (3, 10) and out.dtype == torch.float32
    ref = _oracle(oracle, ids, mask, experts, w, mode)
    valid = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
    assert bool((out[~valid] == 0).all())
    rel = ((out.double() - ref).abs() / ref.abs().clamp(min=1e-30))[valid]
    assert float(rel.max()) < 1e-5, float(rel.max())


def test_probs_renormalised_and_one_expert(setup):
    model, oracle = setup
    ids, mask = _batch(2, 8, seed=3, pad=False)
    a = lmf.ensemble_logprobs(model, ids, ["a", "b"], [1.0, 3.0])
    b = lmf.ensemble_logprobs(model, ids, ["a", "b"], [0.25, 0.75])
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    one = lmf.ensemble_logprobs(model, ids, ["c"], mode="logits")
    ref = lmf.expert_logprobs(model, ids, ["c"])[:, 0]
    torch.testing.assert_close(one, ref, rtol=1e-6, atol=1e-6)
    # a zero weight removes the expert
    zero = lmf.ensemble_logprobs(model, ids, ["a", "b", "c"], [0.4, 0.0, 0.6])
    two = lmf.ensemble_logprobs(model, ids, ["a", "c"], [0.4, 0.6])
    torch.testing.assert_close(zero, two, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["probs", "logits"])
def test_gradient_in_weights(setup, mode):
    """d(sum out)/dw against central differences of the fp64 oracle."""
    model, oracle = setup
    experts = ["a", "b", "__base__"]
    ids, mask = _batch(2, 9, seed=5)
    w = torch.tensor([0.5, 0.2, 0.3], requires_grad=True)
    out = lmf.ensemble_logprobs(model, ids, experts, w, mode=mode, attention_mask=mask)
    out.sum().backward()
    eps = 1e-5
    num = []
    for e in range(3):
        d = torch.zeros(3, dtype=torch.float64)
        d[e] = eps
        wp, wm = w.detach().double() + d, w.detach().double() - d
        num.append(float((_oracle(oracle, ids, mask, experts, wp, mode).sum()
                          - _oracle(oracle, ids, mask, experts, wm, mode).sum()) / (2 * eps)))
    torch.testing.assert_close(w.grad.double(), torch.tensor(num, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)
    # a zero weight in probs mode: finite gradient
    w0 = torch.tensor([0.0, 0.5, 0.5], requires_grad=True)
    lmf.ensemble_logprobs(model, ids, experts, w0, attention_mask=mask).sum().backward()
    assert bool(torch.isfinite(w0.grad).all())


def test_validation(setup):
    model, _ = setup
    ids, _ = _batch(2, 6, seed=0, pad=False)
    with pytest.raises(ValueError, match="mode"):
        lmf.ensemble_logprobs(model, ids, ["a"], mode="mean")
    with pytest.raises(ValueError, match=">= 0"):
        lmf.ensemble_logprobs(model, ids, ["a", "b"], [0.5, -0.1])
    with pytest.raises(ValueError, match="shape"):
        lmf.ensemble_logprobs(model, ids, ["a", "b"], [0.5, 0.2, 0.3])
    with pytest.raises(ValueError, match="unknown expert"):
        lmf.ensemble_logprobs(model, ids, ["zzz"])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        lmf.ensemble_logprobs(model, ids[:, :1], ["a"])
    with pytest.raises(ValueError, match="positive weight"):
        lmf.ensemble_logprobs(model, ids, ["a", "b"], [0.0, 0.0])


# ---- fit_ensemble_weights ------------------------------------------------------------------

class _Counter:
    def __init__(self, model):
        self.n = 0
        self.h = model.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


@pytest.mark.parametrize("mode", ["probs", "logits"])
def test_fit_one_forward_per_batch_and_optimal(setup, mode):
    model, _ = setup
    experts = ["a", "b", "c"]
    batches = []
    for i in range(3):
        ids, mask = _batch(2, 10, seed=40 + i)
        labels = ids.clone()
        labels[:, :4] = -100  # score only the tail
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    cnt = _Counter(model)
    try:
        w, hist = lmf.fit_ensemble_weights(model, batches, experts, mode=mode, steps=300, lr=0.2,
                                           return_history=True)
    finally:
        cnt.h.remove()
    assert cnt.n == len(batches)  # the fitting loop ran no forward
    assert w.shape == (3,) and abs(float(w.sum()) - 1) < 1e-5 and bool((w >= 0).all())
    assert hist[-1] <= hist[0] + 1e-9

    # the objective in fp64 from each expert's logits (one plain forward per expert and batch)
    zs, ys = [], []
    with torch.no_grad():
        for b in batches:
            ids, mask = b["input_ids"], b["attention_mask"]
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            z = torch.stack([model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                   adapter_names=[e] * ids.shape[0]).logits for e in experts])
            keep = (mask[:, 1:] > 0) & (mask[:, :-1] > 0) & (b["labels"][:, 1:] != -100)
            zs.append(z[:, :, :-1][:, keep].double())
            ys.append(ids[:, 1:][keep])
    Z, Y = torch.cat(zs, 1), torch.cat(ys)  # [E, T, V], [T]

    def nll(wv):
        wv = wv.double()
        if mode == "probs":
            p = torch.einsum("e,etv->tv", wv / wv.sum(), torch.softmax(Z, -1))
            return -float(torch.log(p.gather(-1, Y[:, None])).mean())
        return -float(torch.log_softmax(torch.einsum("e,etv->tv", wv, Z), -1)
                      .gather(-1, Y[:, None]).mean())

    fitted = nll(w)
    assert abs(fitted - hist[-1]) < 1e-4
    grid = [torch.tensor([i, j, 20 - i - j], dtype=torch.float64) / 20
            for i, j in itertools.product(range(21), range(21)) if i + j <= 20]
    best = min(nll(g) for g in grid)
    assert fitted <= best + 1e-4, (fitted, best)


def test_fit_finds_the_data_expert(setup):
    """Sequences sampled from expert b: the learned probability-level weights favour b."""
    model, _ = setup
    g = torch.Generator().manual_seed(11)
    prompts = torch.randint(3, VOCAB, (6, 3), generator=g)
    seqs = lmf.ensemble_generate(model, prompts, experts=["b"], mode="probs", max_new_tokens=20,
                                 do_sample=True, generator=g, eos_token_id=[])
    labels = seqs.clone()
    labels[:, :3] = -100
    w = lmf.fit_ensemble_weights(model, [(seqs, None, labels)], ["a", "b", "c"], steps=200)
    assert int(w.argmax()) == 1 and float(w[1]) > 0.5, w


def test_fit_validation(setup):
    model, _ = setup
    ids, _ = _batch(2, 6, seed=0, pad=False)
    with pytest.raises(ValueError, match="empty"):
        lmf.fit_ensemble_weights(model, [], ["a"])
    with pytest.raises(ValueError, match="init"):
        lmf.fit_ensemble_weights(model, [ids], ["a", "b"], init=[1.0, -1.0])
    with pytest.raises(TypeError, match="batches"):
        lmf.fit_ensemble_weights(model, [42], ["a"])
    lab = torch.full_like(ids, -100)
    with pytest.raises(ValueError, match="no scored token"):
        lmf.fit_ensemble_weights(model, [{"input_ids": ids, "labels": lab}], ["a"])
