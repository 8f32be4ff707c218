"""What a user touches first (issue 17): the README's usage on a padded batch, ensemble_generate
without a mask, pipelines with one adapter per prompt, one name for a whole batch, a default
adapter, adapter_names after unpatch, print(lib), top_k past the library, the CLI."""
import copy
import re
import warnings

import pytest
import torch

import loramix_fast as lmf
from loramix_fast.testing import (AdapterSpec, peft_multi, tiny_model, tiny_tokenizer,
                                  write_peft_adapters)

PROMPTS = ["hello world w40", "add one two three four", "w60 w61", "sort the list of numbers",
           "w100", "what is the w70 of w80 ?"]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # init_range 0.2: spread-out logits, so greedy answers differ between adapters
    model = tiny_model("llama", init_range=0.2)
    model.generation_config.pad_token_id = 0
    dirs = write_peft_adapters(model, [AdapterSpec("a", r=4, seed=1), AdapterSpec("b", r=8, seed=2),
                                       AdapterSpec("c", r=2, targets=["q_proj", "v_proj"],
                                                   seed=3)],
                               str(tmp_path_factory.mktemp("surface")))
    return model, dirs, peft_multi(model, dirs), tiny_tokenizer()


def _patched(model, dirs, router=None):
    return lmf.patch(copy.deepcopy(model), lmf.AdapterLibrary.from_peft(dirs), router=router)


def _peft_answers(pm, tok, prompts, names, new=5, skip=False):
    """peft's greedy answer to each prompt alone (no padding) with its adapter."""
    out = []
    for p, n in zip(prompts, names):
        enc = tok(p, return_tensors="pt")
        g = pm.generate(**enc, adapter_names=[n or "__base__"], max_new_tokens=new,
                        do_sample=False, pad_token_id=0)
        out.append(tok.decode(g[0, enc["input_ids"].shape[1]:], skip_special_tokens=skip))
    return out


# ---- item 1: the README's snippet on a padded batch ------------------------------------------

@torch.no_grad()
def test_readme_usage_on_a_padded_batch(setup):
    model, dirs, pm, tok = setup
    m = _patched(model, dirs)
    prompts = PROMPTS[:3]
    enc = tok(prompts, return_tensors="pt", padding=True)  # left padding
    assert bool((enc["attention_mask"] == 0).any())  # a padded batch
    names = ["a", "__base__", "b"]
    out = m(**enc, adapter_names=names).logits
    ref = pm(**enc, adapter_names=names).logits
    assert _rel(out, ref) < 1e-5
    # None in a list is the base model, like "__base__"
    assert torch.equal(m(**enc, adapter_names=["a", None, "b"]).logits, out)
    gen = m.generate(**enc, adapter_names=["a", "b", "b"], max_new_tokens=6, do_sample=False)
    gref = pm.generate(**enc, adapter_names=["a", "b", "b"], max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, gref)
    # each padded row answers as it does alone (what right padding broke)
    P = enc["input_ids"].shape[1]
    solo = _peft_answers(pm, tok, prompts, ["a", "b", "b"], new=6)
    assert tok.batch_decode(gen[:, P:]) == solo


def test_ensemble_generate_without_mask_warns_or_infers_like_generate(setup):
    model, dirs, pm, tok = setup
    m = _patched(model, dirs)
    enc = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    kw = dict(experts=["a", "b"], weights=[0.5, 0.5], mode="probs", max_new_tokens=4,
              eos_token_id=[2])
    masked = lmf.ensemble_generate(m, ids, attention_mask=mask, **kw)
    # pad (0) is not EOS (2): the mask is inferred from it, as generate does, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inferred = lmf.ensemble_generate(m, ids, **kw)
    assert torch.equal(inferred, masked)
    # pad = EOS (SmolLM2): the mask cannot be inferred -> a warning, like generate's
    eos_padded = ids.masked_fill(mask == 0, 2)
    with pytest.warns(UserWarning, match="cannot be inferred"):
        lmf.ensemble_generate(m, eos_padded, pad_token_id=2, **kw)
    assert torch.equal(lmf.ensemble_generate(m, eos_padded, attention_mask=mask,
                                             pad_token_id=2, **kw)[:, -4:], masked[:, -4:])
    # no pad token id at all and a batch: a warning too
    m.generation_config.pad_token_id = None
    try:
        with pytest.warns(UserWarning, match="attention_mask"):
            lmf.ensemble_generate(m, ids, **kw)
    finally:
        m.generation_config.pad_token_id = 0
    # an unpadded single prompt: nothing to warn about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lmf.ensemble_generate(m, ids[:1, -3:], pad_token_id=2, **kw)


# ---- item 2: pipelines, one name for the batch, a default adapter ------------------------------

@pytest.mark.parametrize("batch_size", [1, 4])
def test_pipeline_serves_each_prompt_with_its_adapter(setup, batch_size):
    model, dirs, pm, tok = setup
    m = _patched(model, dirs)
    names = ["a", "b", "__base__", "c", "a", None]
    pipe = lmf.pipeline("text-generation", model=m, tokenizer=tok, batch_size=batch_size)
    kw = dict(max_new_tokens=5, do_sample=False, return_full_text=False, pad_token_id=0)
    outs = [o[0]["generated_text"] for o in pipe(PROMPTS, adapter_names=names, **kw)]
    assert outs == _peft_answers(pm, tok, PROMPTS, names, skip=True)
    # the names matter: another assignment gives other answers, each still matching peft
    other = ["b", "a", "c", "__base__", "b", "a"]
    outs2 = [o[0]["generated_text"] for o in pipe(PROMPTS, adapter_names=other, **kw)]
    assert outs2 == _peft_answers(pm, tok, PROMPTS, other, skip=True) and outs2 != outs
    # one input, a generator, chats
    one = pipe(PROMPTS[1], adapter_names=["b"], **kw)
    assert one[0]["generated_text"] == _peft_answers(pm, tok, PROMPTS[1:2], ["b"], skip=True)[0]
    gen_outs = list(pipe((p for p in PROMPTS), adapter_names=iter(names), **kw))
    assert [o[0]["generated_text"] for o in gen_outs] == outs
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
    chat_out = pipe(chats, adapter_names=names[:4], max_new_tokens=3, do_sample=False,
                    pad_token_id=0)
    ref = []
    for c, n in zip(chats, names[:4]):
        enc = tok.apply_chat_template(c, add_generation_prompt=True, return_dict=True,
                                      return_tensors="pt")
        g = pm.generate(**enc, adapter_names=[n], max_new_tokens=3, do_sample=False,
                        pad_token_id=0)
        ref.append(tok.decode(g[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    assert [o[0]["generated_text"][-1]["content"] for o in chat_out] == ref
    with pytest.raises(ValueError, match="4 names for 6 inputs"):
        pipe(PROMPTS, adapter_names=names[:4], **kw)


def test_plain_pipeline_broadcast_and_hint(setup):
    import transformers

    model, dirs, pm, tok = setup
    m = _patched(model, dirs)
    pipe = transformers.pipeline("text-generation", model=m, tokenizer=tok, batch_size=4)
    kw = dict(max_new_tokens=5, do_sample=False, return_full_text=False, pad_token_id=0)
    outs = [o[0]["generated_text"] for o in pipe(PROMPTS, adapter_names="b", **kw)]
    assert outs == _peft_answers(pm, tok, PROMPTS, ["b"] * 6, skip=True)
    with pytest.raises(ValueError, match="pipeline_adapters"):
        pipe(PROMPTS, adapter_names=["a", "b", "c", "a", "b", "c"], **kw)
    with pytest.raises(ValueError, match="not patched"):
        lmf.pipeline_adapters(transformers.pipeline("text-generation", model=model,
                                                    tokenizer=tok))


@torch.no_grad()
def test_one_name_broadcasts_and_set_adapter(setup):
    model, dirs, pm, tok = setup
    m = _patched(model, dirs)
    ids = torch.randint(3, 128, (3, 5))
    want = pm(ids, adapter_names=["b"] * 3).logits
    assert _rel(m(ids, adapter_names="b").logits, want) < 1e-5
    with lmf.use_adapters(m, "b"):
        assert _rel(m(ids).logits, want) < 1e-5
    g = m.generate(ids, adapter_names="b", max_new_tokens=4, do_sample=False, num_beams=2)
    assert torch.equal(g, pm.generate(input_ids=ids, adapter_names=["b"] * 3, max_new_tokens=4,
                                      do_sample=False, num_beams=2, pad_token_id=0))
    with pytest.raises(ValueError, match="1 names but the batch has 3"):
        m(ids, adapter_names=["b"])  # a list still needs one name per sequence
    with pytest.raises(KeyError, match="unknown adapter 'zz'"):
        m(ids, adapter_names="zz")
    with pytest.raises(TypeError, match="adapter names"):
        m(ids, adapter_names=[1, 2, 3])
    # a default adapter for code that passes no kwargs
    base = model(ids).logits
    lmf.set_adapter(m, "b")
    assert _rel(m(ids).logits, want) < 1e-5
    mixed = ["a", "__base__", "c"]
    assert _rel(m(ids, adapter_names=mixed).logits, pm(ids, adapter_names=mixed).logits) < 1e-5
    g = m.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(g, pm.generate(input_ids=ids, adapter_names=["b"] * 3, max_new_tokens=4,
                                      do_sample=False, pad_token_id=0))
    lib = m._loramix_state.lib
    lib.remove("a")  # ids shift: the default follows its name
    assert _rel(m(ids).logits, want) < 1e-5
    lmf.set_adapter(m, "__base__")
    assert torch.equal(m(ids).logits, base)
    lmf.set_adapter(m, "b")
    lmf.set_adapter(m, None)
    assert torch.equal(m(ids).logits, base)
    with pytest.raises(KeyError, match="unknown adapter"):
        lmf.set_adapter(m, "a")
    with pytest.raises(TypeError, match="one adapter name"):
        lmf.set_adapter(m, ["b", "c"])


# ---- item 4: smaller --------------------------------------------------------------------------

@torch.no_grad()
def test_adapter_names_after_unpatch_is_an_error(setup):
    model, dirs, pm, tok = setup
    m = _patched(model, dirs)
    ids = torch.randint(3, 128, (2, 5))
    lmf.unpatch(m)
    with pytest.raises(TypeError, match="unpatch"):
        m(ids, adapter_names=["a", "b"])
    assert torch.equal(m(ids).logits, model(ids).logits)  # the base model, bit-identical
    lib = lmf.AdapterLibrary.from_peft(dirs)
    lmf.patch(m, lib)  # patched again: the guard is gone, adapter_names served
    assert len(m._forward_pre_hooks) == 1
    assert _rel(m(ids, adapter_names=["a", "b"]).logits,
                pm(ids, adapter_names=["a", "b"]).logits) < 1e-5
    lmf.unpatch(m, guard=False)
    assert len(m._forward_pre_hooks) == 0
    # a failed patch of a never-patched model leaves no guard behind
    fresh = copy.deepcopy(model)
    with pytest.raises(TypeError):
        lmf.patch(fresh, lib, router="spectr")
    assert len(fresh._forward_pre_hooks) == 0
    # a deep copy of an unpatched model, patched again: the copied guard is inert
    g = copy.deepcopy(model)
    lmf.unpatch(lmf.patch(g, lib))
    h = copy.deepcopy(g)
    lmf.patch(h, lib)
    assert _rel(h(ids, adapter_names=["a", "b"]).logits,
                pm(ids, adapter_names=["a", "b"]).logits) < 1e-5


def test_library_repr_shows_names_ranks_targets_bytes(setup):
    model, dirs, pm, tok = setup
    lib = lmf.AdapterLibrary.from_peft(dirs)
    text = repr(lib)
    assert text == str(lib)
    lines = text.splitlines()
    assert re.fullmatch(r"AdapterLibrary\(3 adapters, 14 modules, \d+\.\d+ [KM]iB\):", lines[0])
    assert lines[1].startswith("  a: r=4, scale=2, 14 modules (")
    assert "q_proj x2" in lines[1] and "down_proj x2" in lines[1]
    assert lines[3].startswith("  c: r=2, scale=2, 4 modules (q_proj x2, v_proj x2), ")
    kib = sum(f.A.numel() * 4 + f.B.numel() * 4 for f in lib.factors("c").values()) / 1024
    assert f"{kib:.1f} KiB" in lines[3] and "float32" in lines[3]
    m = lmf.patch(copy.deepcopy(model), lib)
    assert "patched into 1 model" in repr(lib)
    lmf.unpatch(m)
    assert "object at" not in repr(lmf.AdapterLibrary())


@torch.no_grad()
def test_top_k_beyond_the_library_is_clamped_with_a_warning(setup):
    model, dirs, pm, tok = setup
    m = _patched(model, dirs)
    ids = torch.randint(3, 128, (2, 6))
    lmf.set_router(m, lmf.SpectR(top_k=3))
    every = m(ids).logits
    with pytest.warns(UserWarning, match="top_k=10 exceeds the library's 3 experts"):
        lmf.set_router(m, lmf.SpectR(top_k=10))
    assert _rel(m(ids).logits, every) < 1e-6  # not shrunk by 3/10
    lmf.set_router(m, lmf.Uniform())
    assert _rel(every, m(ids).logits) < 1e-5  # all experts, 1/T each: mu-routing
    with pytest.warns(UserWarning, match="top_k=5 exceeds"):
        lmf.set_router(m, lmf.Arrow(top_k=5))
    arrow5 = m(ids).logits
    lmf.set_router(m, lmf.Arrow(top_k=3))
    assert _rel(arrow5, m(ids).logits) < 1e-6
    with pytest.warns(UserWarning, match="exceeds"):  # also when passed to patch
        _patched(model, dirs, router=lmf.SpectR(top_k=4))


# ---- the CLI ----------------------------------------------------------------------------------

def test_cli_version_and_help_for_every_option(capsys):
    from loramix_fast.__main__ import _parser, main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"loramix_fast {lmf.__version__}"
    ap = _parser()
    subs = next(a for a in ap._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"demo", "generate"} <= set(subs.choices)
    for name, sp in subs.choices.items():
        for a in sp._actions:
            assert a.help, f"{name} {a.option_strings} has no help"


def test_cli_generate_and_demo_on_your_own_model(setup, tmp_path, capsys):
    from loramix_fast.__main__ import main

    model, dirs, pm, tok = setup
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    ad = [f"--adapter={n}={d}" for n, d in dirs.items()]
    prompts = PROMPTS[:3]
    names = ["a", "__base__", "b"]
    rc = main(["generate", "--model", str(tmp_path / "model"), *ad,
               *[x for p in prompts for x in ("--prompt", p)],
               "--adapter-names", ",".join(names), "--max-new-tokens", "5"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    want = _peft_answers(pm, tok, prompts, names, skip=True)
    # batched and left-padded here, one by one in peft: the same answers
    assert lines == [f"[{n}] {p!r} -> {w!r}" for n, p, w in zip(names, prompts, want)]
    rc = main(["generate", "--model", str(tmp_path / "model"), *ad, "--prompt", "w60 w61",
               "--router", "spectr", "--top-k", "2", "--max-new-tokens", "3",
               "--heatmap", str(tmp_path / "r.png")])
    assert rc == 0 and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["generate", "--model", str(tmp_path / "model"), *ad, "--prompt", "w60",
                 "--adapter-names", "nope"]) == 2
    assert "unknown adapter 'nope'" in capsys.readouterr().out
    rc = main(["demo", "--model", str(tmp_path / "model"), *ad, "--reps", "1",
               "--new-tokens", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "parity with peft" in out and "OK" in out
    assert main(["demo", "--model", str(tmp_path / "missing")]) == 1
    assert "could not load the model" in capsys.readouterr().out
