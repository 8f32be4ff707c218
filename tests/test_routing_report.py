"""The routing report (issue 17 item 3): stopping keeps the last report, adapter_names / Uniform
forwards record what they selected, per-token views per sequence (padding dropped, generated
tokens included, decoded labels), and the heatmap."""
import copy
import types

import pytest
import torch

import loramix_fast as lmf
from loramix_fast.testing import AdapterSpec, tiny_model, tiny_tokenizer, write_peft_adapters

PROMPTS = ["hello world w40", "add one two three four", "w60 w61"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_model("llama", init_range=0.2)
    model.generation_config.pad_token_id = 0
    dirs = write_peft_adapters(model, [AdapterSpec("a", r=4, seed=1), AdapterSpec("b", r=8, seed=2),
                                       AdapterSpec("c", r=2, targets=["q_proj", "v_proj"],
                                                   seed=3)],
                               str(tmp_path_factory.mktemp("report")))
    tok = tiny_tokenizer()
    return model, lmf.AdapterLibrary.from_peft(dirs), tok, tok(PROMPTS, return_tensors="pt",
                                                              padding=True)


def _patched(model, lib, router=None):
    return lmf.patch(copy.deepcopy(model), lib, router=router)


@torch.no_grad()
def test_stop_keeps_the_last_report(setup):
    model, lib, tok, enc = setup
    m = _patched(model, lib, lmf.SpectR(top_k=2))
    with pytest.raises(ValueError, match="record_routing"):
        lmf.routing_report(m)
    rep = lmf.record_routing(m)
    m(**enc)
    assert lmf.record_routing(m, enable=False) is rep
    m(**enc)  # not recorded any more
    assert lmf.routing_report(m) is rep and len(rep.forwards) == 1
    assert lmf.record_routing(m) is not rep  # a fresh one
    with pytest.raises(ValueError, match="nothing recorded"):
        lmf.routing_report(m).per_token()
    m.model(**enc)  # the inner model: no top-level forward, its modules still record
    assert lmf.routing_report(m).counts


@torch.no_grad()
def test_adapter_names_and_uniform_forwards_record_their_selection(setup):
    model, lib, tok, enc = setup
    m = _patched(model, lib)
    rep = lmf.record_routing(m)
    names = ["a", "__base__", "b"]
    m(**enc, adapter_names=names)
    lengths = enc["attention_mask"].sum(1).tolist()
    q = "model.layers.0.self_attn.q_proj"
    P = enc["input_ids"].shape[1]
    assert rep.counts[q].tolist() == [P, P, 0]  # the token map covers padding too
    seqs = rep.per_token(tokenizer=tok)
    assert [s.adapter for s in seqs] == names
    assert [len(s.labels) for s in seqs] == lengths  # padding dropped
    ids = {"a": 0, "b": 1, "__base__": -1}
    for s, n in zip(seqs, names):
        assert s.choice.tolist() == [ids[n]] * len(s.labels)
        assert torch.all(s.first == ids[n]) and s.layers == ["L0", "L1"]
        assert torch.all(s.choice_frac == 1)
        assert s.labels == [f"'{w}'" for w in PROMPTS[s.seq].split()]
        if n != "__base__":
            assert torch.equal(s.share, torch.eye(3)[ids[n]].expand(len(s.labels), 3))
    assert rep.mean_scores().shape == (3 * P, 3)
    # one name for the batch, and a default adapter, record too
    rep = lmf.record_routing(m)
    m(**enc, adapter_names="c")
    lmf.set_adapter(m, "b")
    m(**enc)
    lmf.set_adapter(m, None)
    assert len(rep.runs) == 2
    assert all(torch.all(s.choice == 2) for s in rep.per_token(0))
    assert all(torch.all(s.choice == 1) for s in rep.per_token(-1))
    assert rep.forwards[0].how == "adapter 'c' for every sequence"
    # Uniform: every expert, even weights: no first choice ("mix", -2)
    lmf.set_router(m, lmf.Uniform())
    rep = lmf.record_routing(m)
    m(**enc)
    for s in rep.per_token():
        assert torch.all(s.choice == -2)
        torch.testing.assert_close(s.share, torch.full_like(s.share, 1 / 3))


@torch.no_grad()
def test_spectr_generation_per_token_view(setup, tmp_path):
    model, lib, tok, enc = setup
    m = _patched(model, lib, lmf.SpectR(top_k=2))
    rep = lmf.record_routing(m)
    new = 4
    out = m.generate(**enc, max_new_tokens=new, do_sample=False, eos_token_id=None)
    assert len(rep.runs) == 1 and len(rep.forwards) == new  # the prompt + 3 decode steps
    seqs = rep.per_token(tokenizer=tok)
    lengths = enc["attention_mask"].sum(1).tolist()
    P = enc["input_ids"].shape[1]
    for s, L in zip(seqs, lengths):
        # the prompt's real tokens, then each generated token read back (the last is never read)
        assert len(s.labels) == L + new - 1
        assert s.generated == [False] * L + [True] * (new - 1)
        row = out[s.seq]
        want = row[P - L:P].tolist() + row[P:P + new - 1].tolist()
        assert s.token_ids == want
        assert s.first.shape == (L + new - 1, 2) and s.share.shape == (L + new - 1, 3)
        torch.testing.assert_close(s.share.sum(1), torch.ones(len(s.labels)))
    # the view agrees with the router's own scores: first choice = best score (ties: lowest)
    f0 = rep.forwards[0]
    B = f0.batch
    best = torch.stack([c.scores.argmax(1).view(B, P) for c in f0.calls], -1)  # [B, P, modules]
    for s, L in zip(seqs, lengths):
        mode = [int(torch.bincount(best[s.seq, P - L + j], minlength=3).argmax())
                for j in range(L)]
        assert s.choice[:L].tolist() == mode
    # heatmap: all sequences, one chosen, the last run
    p = rep.save_heatmap(str(tmp_path / "h.png"), tok)
    assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    one = rep.per_token(sequences=1, tokenizer=tok)
    assert [s.seq for s in one] == [1]
    rep.save_heatmap(str(tmp_path / "h1.png"), tok, sequences=[1], run=-1)
    with pytest.raises(IndexError, match="run 3"):
        rep.per_token(run=3)
    with pytest.raises(IndexError, match="sequences"):
        rep.per_token(sequences=[5])


@torch.no_grad()
def test_finished_generations_drop_their_padding(setup):
    model, lib, tok, enc = setup
    m = _patched(model, lib, lmf.SpectR(top_k=1))
    free = m.generate(**enc, max_new_tokens=4, do_sample=False, eos_token_id=None)
    P = enc["input_ids"].shape[1]
    stop = int(free[0, P])  # sequence 0's first token: make it the EOS
    others = [b for b in range(3) if stop not in free[b, P:P + 3].tolist()]
    rep = lmf.record_routing(m)
    out = m.generate(**enc, max_new_tokens=4, do_sample=False, eos_token_id=stop,
                     pad_token_id=0)
    assert out[0, P + 1:].tolist() == [0] * (out.shape[1] - P - 1)
    t = types.SimpleNamespace(eos_token_id=stop, pad_token_id=0, decode=tok.decode)
    seqs = rep.per_token(tokenizer=t)
    lengths = enc["attention_mask"].sum(1).tolist()
    assert seqs[0].generated.count(True) == 1  # its EOS, read back once; the padding dropped
    for b in others:  # never emitted it: every generated token is kept
        assert seqs[b].generated.count(True) == out.shape[1] - P - 1
    assert len(rep.per_token()[0].labels) == lengths[0] + out.shape[1] - P - 1  # no tokenizer


@torch.no_grad()
def test_prompt_cached_decisions_hold_for_every_token(setup):
    model, lib, tok, enc = setup
    m = _patched(model, lib, lmf.PromptCached(lmf.SpectR(top_k=1)))
    rep = lmf.record_routing(m)
    m.generate(**enc, max_new_tokens=3, do_sample=False)
    for s in rep.per_token(tokenizer=tok):
        assert len(s.labels) == int(enc["attention_mask"][s.seq].sum()) + 2
        assert torch.all(s.first == s.first[0])  # one decision per sequence and module
        assert torch.all(s.first >= 0)
