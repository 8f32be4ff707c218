"""ensemble_generate: tokens against a slow fp64 oracle (peft, every expert run separately, no cache,
mixed with ``reference.mix_logits(upcast=True)``), against plain ``generate`` for one expert, sampling
reproducibility, per-expert prompts, EOS and padding, validation."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch

import loramix_fast as lmf
from loramix_fast import reference
from loramix_fast.ensemble import ensemble_generate
from loramix_fast.testing import AdapterSpec, peft_multi, tiny_model, write_peft_adapters

tf = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 100
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"a": 4, "b": 6, "c": 3}  # name -> rank (not all powers of two)
GAP = 1e-3  # compare tokens only while the oracle's top-2 gap is above fp32 rounding
NEW = 8


def _tiny():
    return tiny_model("llama", hidden=64, layers=2, vocab=VOCAB, intermediate=128, init_range=0.2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(patched fp32 model, peft fp64 oracle, adapter dirs)."""
    warnings.simplefilter("ignore")
    folder = str(tmp_path_factory.mktemp("ensemble_adapters"))
    # init_range 0.2: spread-out logits, so near-ties between top tokens are rare
    model = _tiny()
    dirs = write_peft_adapters(model, [AdapterSpec(name, r=r, seed=100 + i, targets=TARGETS)
                                       for i, (name, r) in enumerate(ADAPTERS.items())], folder)
    oracle = peft_multi(model, dirs).double()
    lmf.patch(model, lmf.AdapterLibrary.from_peft(dirs))
    return model, oracle, dirs


def _prompts(B, seed, min_len=3, max_len=9):
    """Left-padded [B, P] prompts of distinct lengths and their unpadded token lists."""
    g = torch.Generator().manual_seed(seed)
    lens = [max_len] + torch.randint(min_len, max_len + 1, (B - 1,), generator=g).tolist()
    P = max(lens)
    ids = torch.zeros(B, P, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.long)
    rows = []
    for b, n in enumerate(lens):
        toks = torch.randint(3, VOCAB, (n,), generator=g)
        ids[b, P - n:] = toks
        mask[b, P - n:] = 1
        rows.append(toks.tolist())
    return ids, mask, rows


@torch.no_grad()
def _oracle_generate(oracle, rows, experts, weights, mode, max_new, prefixes=None, eos=()):
    """Every expert separately, full forward each step (no cache), fp64 mixture, greedy.
    Returns per sequence (tokens, top-2 gaps)."""
    E = len(experts)
    prefixes = prefixes or [[] for _ in range(E)]
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.dim() == 1:
        w = w.expand(len(rows), E)
    out = []
    for b, row in enumerate(rows):
        toks, gaps = [], []
        for _ in range(max_new):
            logits = []
            for e, name in enumerate(experts):
                x = torch.tensor([prefixes[e] + row + toks])
                logits.append(oracle(input_ids=x, adapter_names=[name]).logits[0, -1])
            z = reference.mix_logits(torch.stack(logits)[None], w[b][None], mode, upcast=True)[0]
            top = z.topk(2).values
            gaps.append(float(top[0] - top[1]))
            toks.append(int(z.argmax()))
            if toks[-1] in eos:
                break
        out.append((toks, gaps))
    return out


def _assert_matches_oracle(new, ref, min_fraction=0.8):
    """Tokens equal up to the first near-tie of the oracle (after which both may diverge)."""
    compared = total = 0
    for b, (toks, gaps) in enumerate(ref):
        total += len(toks)
        for t, (tok, gap) in enumerate(zip(toks, gaps)):
            if gap < GAP:
                break
            assert int(new[b, t]) == tok, f"sequence {b}, step {t}: got {int(new[b, t])}, " \
                                          f"oracle {tok} (gap {gap:.3g}); ours {new[b].tolist()}, " \
                                          f"oracle {toks}"
            compared += 1
    assert compared >= min_fraction * total, f"only {compared}/{total} tokens comparable"


@dataclass
class Case:
    id: str
    experts: list
    mode: str
    weights: object  # [E] list or "per_sequence"


CASES = [
    Case("probs-3-with-base", ["a", "__base__", "c"], "probs", "per_sequence"),
    Case("logits-3-with-base", ["b", "a", "__base__"], "logits", "per_sequence"),
    Case("logits-negative-and-zero", ["a", "b", "__base__", "c"], "logits", [1.2, -0.4, 0.0, 0.5]),
    Case("probs-zero-weight", ["__base__", "c", "a"], "probs", [0.0, 0.7, 0.3]),
    Case("probs-duplicate-expert", ["a", "a", "b"], "probs", [0.2, 0.3, 0.5]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_greedy_matches_fp64_oracle(setup, case):
    model, oracle, _ = setup
    B, E = 3, len(case.experts)
    ids, mask, rows = _prompts(B, seed=CASES.index(case))
    if case.weights == "per_sequence":
        w = torch.rand(B, E, generator=torch.Generator().manual_seed(1)) + 0.05
        if case.mode == "probs":
            w = w / w.sum(1, keepdim=True)
    else:
        w = case.weights
    out = ensemble_generate(model, ids, experts=case.experts, weights=w, mode=case.mode,
                            max_new_tokens=NEW, attention_mask=mask, eos_token_id=[])
    assert out.shape == (B, ids.shape[1] + NEW) and out.dtype == torch.long
    assert torch.equal(out[:, :ids.shape[1]], ids)
    ref = _oracle_generate(oracle, rows, case.experts, w, case.mode, NEW)
    _assert_matches_oracle(out[:, ids.shape[1]:], ref)


@pytest.mark.parametrize("mode", ["logits", "probs"])
@pytest.mark.parametrize("expert", ["b", "__base__"])
def test_one_expert_equals_generate(setup, mode, expert):
    model, _, _ = setup
    ids, mask, _ = _prompts(4, seed=7)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                         adapter_names=[expert] * 4)
    out = ensemble_generate(model, ids, experts=[expert], weights=[1.0], mode=mode,
                            max_new_tokens=NEW, attention_mask=mask)
    assert torch.equal(out, ref)


def test_sampling_reproducible(setup):
    model, _, _ = setup
    ids, mask, _ = _prompts(3, seed=3)
    kw = dict(experts=["a", "__base__", "b"], weights=[0.5, 0.2, 0.3], max_new_tokens=NEW,
              attention_mask=mask, do_sample=True, temperature=1.5, eos_token_id=[])
    outs = [ensemble_generate(model, ids, generator=torch.Generator().manual_seed(s), **kw)
            for s in (11, 11, 12)]
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    torch.manual_seed(5)
    g1 = ensemble_generate(model, ids, **kw)
    torch.manual_seed(5)
    assert torch.equal(g1, ensemble_generate(model, ids, **kw))
    # top_p that keeps only the top token is greedy
    greedy = ensemble_generate(model, ids, experts=kw["experts"], weights=kw["weights"],
                               max_new_tokens=NEW, attention_mask=mask, eos_token_id=[])
    tiny_p = ensemble_generate(model, ids, top_p=1e-6,
                               generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(tiny_p, greedy)


def test_sampling_follows_mixture(setup):
    """One step, many draws of one sequence: the empirical distribution matches the mixture."""
    model, _, _ = setup
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    experts, w = ["a", "c"], torch.tensor([0.6, 0.4])
    n = 2000
    out = ensemble_generate(model, ids.expand(n, -1), experts=experts, weights=w,
                            max_new_tokens=1, do_sample=True, temperature=2.0, eos_token_id=[],
                            generator=torch.Generator().manual_seed(0))
    emp = torch.bincount(out[:, -1], minlength=VOCAB).double() / n
    with torch.no_grad():
        logits = torch.stack([model(ids, adapter_names=[e]).logits[0, -1] for e in experts])
    p = torch.softmax(reference.mix_logits(logits[None], w[None], "probs", upcast=True)[0] / 2.0,
                      -1)
    assert (emp - p).abs().max() < 0.045  # ~4 sigma of a binomial with n = 2000


def test_expert_prompts_of_different_lengths(setup):
    model, oracle, _ = setup
    ids, mask, rows = _prompts(3, seed=21)
    experts = ["__base__", "a", "__base__", "c"]
    prefixes = [[5, 17, 9, 40, 33], [], [71, 8], torch.tensor([64])]
    w = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.6, 0.1]])
    out = ensemble_generate(model, ids, experts=experts, weights=w, mode="probs",
                            max_new_tokens=NEW, attention_mask=mask, expert_prompts=prefixes,
                            eos_token_id=[])
    assert torch.equal(out[:, :ids.shape[1]], ids)
    ref = _oracle_generate(oracle, rows, experts, w, "probs", NEW,
                           prefixes=[list(map(int, p)) for p in prefixes])
    _assert_matches_oracle(out[:, ids.shape[1]:], ref)


def test_prompt_experts_on_unpatched_backbone(setup):
    """PELMo: experts are prompts on one backbone, no adapters, no patch needed."""
    model, _, _ = setup
    plain = _tiny()
    plain.load_state_dict(setup_base_state(model))
    ids, mask, _ = _prompts(2, seed=5)
    kw = dict(experts=["__base__", "__base__"], weights=[0.5, 0.5], max_new_tokens=NEW,
              attention_mask=mask, expert_prompts=[[12, 13, 14], [90]], eos_token_id=[])
    assert torch.equal(ensemble_generate(plain, ids, **kw), ensemble_generate(model, ids, **kw))


def setup_base_state(model):
    """The base weights of a patched model, under the unpatched model's keys."""
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}


def test_eos_stops_and_pads(setup):
    model, oracle, _ = setup
    ids, mask, rows = _prompts(3, seed=9)
    kw = dict(experts=["a", "b"], weights=[0.5, 0.5], mode="logits", attention_mask=mask)
    free = ensemble_generate(model, ids, max_new_tokens=NEW, eos_token_id=[], **kw)
    P = ids.shape[1]
    eos = int(free[0, P + 3])  # sequence 0 emits it at step 3 (or earlier)
    out = ensemble_generate(model, ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0,
                            **kw)
    for b in range(3):
        new = out[b, P:].tolist()
        if eos in new:
            k = new.index(eos)
            assert all(t == 0 for t in new[k + 1:])
            assert new[:k + 1] == free[b, P:P + k + 1].tolist()
        else:
            assert new == free[b, P:P + len(new)].tolist()
    ref = _oracle_generate(oracle, rows, kw["experts"], kw["weights"], "logits", NEW, eos=(eos,))
    _assert_matches_oracle(out[:, P:], ref)
    # all sequences stop at once: generation ends early
    one = ensemble_generate(model, ids[:1], max_new_tokens=NEW, eos_token_id=eos,
                            experts=["a", "b"], weights=[0.5, 0.5], mode="logits",
                            attention_mask=mask[:1])
    assert one.shape[1] < P + NEW and int(one[0, -1]) == eos


def test_right_padding_and_weight_forms(setup):
    model, _, _ = setup
    ids, mask, rows = _prompts(3, seed=13)
    experts = ["c", "__base__"]
    left = ensemble_generate(model, ids, experts=experts, weights=[0.7, 0.3], max_new_tokens=6,
                             attention_mask=mask)
    P = ids.shape[1]
    # right padding: same new tokens
    rids = torch.zeros_like(ids)
    rmask = torch.zeros_like(mask)
    for b, r in enumerate(rows):
        rids[b, :len(r)] = torch.tensor(r)
        rmask[b, :len(r)] = 1
    right = ensemble_generate(model, rids, experts=experts, weights=[0.7, 0.3],
                              max_new_tokens=6, attention_mask=rmask)
    assert torch.equal(right[:, P:], left[:, P:])
    # [E] list == [B, E] tensor == callable on the prompt; None == uniform
    full = ensemble_generate(model, ids, experts=experts, weights=torch.tensor([[0.7, 0.3]] * 3),
                             max_new_tokens=6, attention_mask=mask)
    seen = []

    def weigh(input_ids, attention_mask):
        seen.append((input_ids, attention_mask))
        return torch.tensor([0.7, 0.3])

    called = ensemble_generate(model, ids, experts=experts, weights=weigh, max_new_tokens=6,
                               attention_mask=mask)
    assert torch.equal(full, left) and torch.equal(called, left)
    assert len(seen) == 1 and torch.equal(seen[0][0], ids)
    uni = ensemble_generate(model, ids, experts=experts, max_new_tokens=6, attention_mask=mask)
    half = ensemble_generate(model, ids, experts=experts, weights=[0.5, 0.5], max_new_tokens=6,
                             attention_mask=mask)
    assert torch.equal(uni, half)
    assert torch.equal(ensemble_generate(model, ids, experts=experts, max_new_tokens=0), ids)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(experts=["a", "nope"]), ValueError, "unknown expert"),
    (dict(experts="a"), ValueError, "non-empty list"),
    (dict(experts=[]), ValueError, "non-empty list"),
    (dict(experts=["a", "b"], weights=[1.0, 2.0, 3.0]), ValueError, r"\[2, 2\] or"),
    (dict(experts=["a", "b"], weights=torch.ones(3, 2)), ValueError, "shape"),
    (dict(experts=["a", "b"], weights=[0.0, -1.0]), ValueError, "positive"),
    (dict(experts=["a", "b"], weights=[0.0, 0.0], mode="logits"), ValueError, "nonzero"),
    (dict(experts=["a", "b"], weights=[float("nan"), 1.0]), ValueError, "finite"),
    (dict(experts=["a"], mode="mean"), ValueError, "mode"),
    (dict(experts=["a"], max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(experts=["a"], do_sample=True, temperature=0.0), ValueError, "temperature"),
    (dict(experts=["a"], do_sample=True, top_p=0.0), ValueError, "top_p"),
    (dict(experts=["a", "b"], expert_prompts=[[1]]), ValueError, "expert_prompts"),
    (dict(experts=["a"], expert_prompts=["hello"]), TypeError, "token ids"),
    (dict(experts=["a"], attention_mask=torch.ones(2, 3)), ValueError, "attention_mask"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_validation(setup, kwargs, err, match):
    model, _, _ = setup
    ids = torch.randint(3, VOCAB, (2, 4))
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(err, match=match):
        ensemble_generate(model, ids, **kwargs)


def test_validation_unpatched_and_ids():
    plain = _tiny()
    with pytest.raises(ValueError, match="not patched"):
        ensemble_generate(plain, torch.ones(1, 3, dtype=torch.long), experts=["a"])
    with pytest.raises(ValueError, match="input_ids"):
        ensemble_generate(plain, torch.ones(3, dtype=torch.long), experts=["__base__"])
    with pytest.raises(ValueError, match="no tokens"):
        ensemble_generate(plain, torch.ones(2, 3, dtype=torch.long), experts=["__base__"],
                          attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))


@pytest.fixture(scope="module")
def gpt2_setup(tmp_path_factory):
    """GPT-2 has learned absolute positions: left padding and prefixes of unequal length only come
    out right if every copy's position ids start at 0 at its first real token (RoPE in Llama is
    blind to a constant shift)."""
    warnings.simplefilter("ignore")
    folder = tmp_path_factory.mktemp("ensemble_gpt2")
    torch.manual_seed(1)
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                        initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    base_sd = tf.GPT2LMHeadModel(cfg).state_dict()
    m = tf.GPT2LMHeadModel(cfg)
    m.load_state_dict(base_sd)
    torch.manual_seed(7)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=5, lora_alpha=10, init_lora_weights=False,
                                                target_modules=["c_attn", "c_fc"],
                                                fan_in_fan_out=True))
    pm.save_pretrained(str(folder / "g"))
    model = tf.GPT2LMHeadModel(cfg)
    model.load_state_dict(base_sd)
    lmf.patch(model.eval(), lmf.AdapterLibrary.from_peft({"g": str(folder / "g")}))
    base64 = tf.GPT2LMHeadModel(cfg)
    base64.load_state_dict(base_sd)
    oracle = peft.PeftModel.from_pretrained(base64, str(folder / "g"), adapter_name="g")
    return model, oracle.double().eval()


def test_absolute_positions_padding_and_prefixes(gpt2_setup):
    model, oracle = gpt2_setup
    ids, mask, rows = _prompts(3, seed=2)
    experts, prefixes = ["g", "__base__", "g"], [[7, 8, 9, 10], [], [55]]
    w = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]])
    for pre in (None, prefixes):
        out = ensemble_generate(model, ids, experts=experts, weights=w, mode="probs",
                                max_new_tokens=8, attention_mask=mask, expert_prompts=pre,
                                eos_token_id=[])
        ref = _oracle_generate(oracle, rows, experts, w, "probs", 8, prefixes=pre)
        _assert_matches_oracle(out[:, ids.shape[1]:], ref)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         adapter_names=["g"] * 3, pad_token_id=0)
    out = ensemble_generate(model, ids, experts=["g"], weights=[1.0], mode="logits",
                            max_new_tokens=8, attention_mask=mask, pad_token_id=0)
    assert torch.equal(out, gen)


def test_weight_helpers_end_to_end(setup):
    """ELREA weights (base in column 0) in logits mode; PELMo's top-k routing in probs mode: a
    dropped expert (weight 0) is the same as leaving it out."""
    ens = pytest.importorskip("loramix_fast.ensemble_weights")
    from loramix_fast.ensemble import elrea_weights, topk_renormalize
    assert elrea_weights is ens.elrea_weights and topk_renormalize is ens.topk_renormalize
    model, oracle, _ = setup
    ids, mask, rows = _prompts(2, seed=31)
    cos = torch.tensor([[0.9, 0.2], [0.1, 0.5]])
    experts = ["__base__", "a", "b"]
    out = ensemble_generate(model, ids, experts=experts, weights=lambda i, m: elrea_weights(cos),
                            mode="logits", max_new_tokens=6, attention_mask=mask, eos_token_id=[])
    ref = _oracle_generate(oracle, rows, experts, elrea_weights(cos), "logits", 6)
    _assert_matches_oracle(out[:, ids.shape[1]:], ref)
    probs = torch.tensor([0.5, 0.1, 0.4])  # top-2 drops "b"
    experts = ["a", "b", "c"]
    kw = dict(mode="probs", max_new_tokens=6, attention_mask=mask, eos_token_id=[])
    routed = ensemble_generate(model, ids, experts=experts, weights=topk_renormalize(probs, 2),
                               **kw)
    kept = ensemble_generate(model, ids, experts=["a", "c"], weights=[0.5, 0.4], **kw)
    assert torch.equal(routed, kept)
