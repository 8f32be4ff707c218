"""Patching HF models: parity with peft's adapter_names path on every supported family,
generate (greedy, beam, sampling), unpatch bit-identity, adapters added/removed without re-patch,
the context manager, torch.compile."""
import copy

import pytest
import torch

import loramix_fast as lmf
from loramix_fast.testing import FAMILIES, TARGETS, AdapterSpec, peft_multi, tiny_model, write_peft_adapters


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _specs(family):
    t = TARGETS[family]
    return [
        AdapterSpec("a", r=4, targets=t[:2], seed=1),                 # partial targets
        AdapterSpec("b", r=7, targets=t[1:], rslora=True, seed=2),    # rsLoRA, odd rank
        AdapterSpec("c", r=16, alpha=5, seed=3),                      # all targets, other alpha
    ]


def _setup(fam, tmp_path_factory):
    model = tiny_model(fam)
    dirs = write_peft_adapters(model, _specs(fam), str(tmp_path_factory.mktemp(fam)), fam)
    return fam, model, dirs, peft_multi(model, dirs)


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request, tmp_path_factory):
    return _setup(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    """Selection mechanics are family-independent: checked once, on Llama."""
    return _setup("llama", tmp_path_factory)


NAMES = ["a", "__base__", "b", "c", "a"]


@torch.no_grad()
def test_parity_with_peft_mixed_batch(family_setup):
    fam, model, dirs, pm = family_setup
    m = copy.deepcopy(model)
    ids = torch.randint(3, 128, (len(NAMES), 6))
    before = m(ids).logits
    lib = lmf.AdapterLibrary.from_peft(dirs)
    lmf.patch(m, lib)
    ref = pm(ids, adapter_names=NAMES).logits
    out = m(ids, adapter_names=NAMES).logits
    assert _rel(out, ref) < 1e-5, fam
    # the adapters really move the output (the check above is not vacuous)
    assert _rel(ref, before) > 1e-2
    # __base__ rows equal the base model
    torch.testing.assert_close(out[1], before[1], rtol=1e-5, atol=1e-5)
    # no selection: exactly the base model
    assert torch.equal(m(ids).logits, before)
    lmf.unpatch(m)
    assert torch.equal(m(ids).logits, before)
    assert not any(isinstance(x, lmf.MultiLoRALinear) for x in m.modules())


@torch.no_grad()
def test_generate_greedy_beam_sampling_match_peft(llama_setup):
    fam, model, dirs, pm = llama_setup
    m = lmf.patch(copy.deepcopy(model), lmf.AdapterLibrary.from_peft(dirs))
    ids = torch.randint(3, 128, (len(NAMES), 5))
    kw = dict(max_new_tokens=6, pad_token_id=0)
    for extra in ({"do_sample": False}, {"do_sample": False, "num_beams": 3}):
        ours = m.generate(ids, adapter_names=NAMES, **kw, **extra)
        ref = pm.generate(input_ids=ids, adapter_names=NAMES, **kw, **extra)
        assert torch.equal(ours, ref), extra
    torch.manual_seed(7)
    ours = m.generate(ids, adapter_names=NAMES, do_sample=True, top_k=0, **kw)
    torch.manual_seed(7)
    ref = pm.generate(input_ids=ids, adapter_names=NAMES, do_sample=True, top_k=0, **kw)
    assert torch.equal(ours, ref)


@torch.no_grad()
def test_context_manager_and_left_padding(llama_setup):
    fam, model, dirs, pm = llama_setup
    m = lmf.patch(copy.deepcopy(model), lmf.AdapterLibrary.from_peft(dirs))
    ids = torch.randint(3, 128, (len(NAMES), 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with lmf.use_adapters(m, NAMES):
        out = m(ids, attention_mask=mask).logits
    ref = pm(ids, attention_mask=mask, adapter_names=NAMES).logits
    assert _rel(out, ref) < 1e-5
    # leaving the context restores the base model
    lmf.unpatch(m)
    base = m(ids, attention_mask=mask).logits
    assert _rel(out, base) > 1e-2


@torch.no_grad()
def test_add_and_remove_adapters_without_repatch(tmp_path):
    model = tiny_model("llama")
    t = TARGETS["llama"]
    dirs = write_peft_adapters(model, [AdapterSpec("a", r=4, targets=t[:1], seed=1),
                                       AdapterSpec("z", r=5, targets=t[5:], seed=9)], str(tmp_path))
    pm = peft_multi(model, dirs)
    lib = lmf.AdapterLibrary()
    lib.add_peft("a", dirs["a"])
    m = lmf.patch(copy.deepcopy(model), lib)
    ids = torch.randint(3, 128, (2, 4))
    lib.add_peft("z", dirs["z"])  # targets modules that were not patched before
    out = m(ids, adapter_names=["z", "a"]).logits
    ref = pm(ids, adapter_names=["z", "a"]).logits
    assert _rel(out, ref) < 1e-5
    lib.remove("a")
    out = m(ids, adapter_names=["z", "z"]).logits
    ref = pm(ids, adapter_names=["z", "z"]).logits
    assert _rel(out, ref) < 1e-5
    with pytest.raises(KeyError, match="unknown adapter 'a'"):
        m(ids, adapter_names=["a", "z"])


def test_bad_selection_errors(tmp_path):
    model = tiny_model("llama")
    dirs = write_peft_adapters(model, [AdapterSpec("a", r=4, seed=1)], str(tmp_path))
    m = lmf.patch(model, lmf.AdapterLibrary.from_peft(dirs))
    ids = torch.randint(3, 128, (3, 4))
    with pytest.raises(ValueError, match="3"):
        m(ids, adapter_names=["a", "a"])
    with pytest.raises(TypeError, match="one adapter name per sequence"):
        m(ids, adapter_names=7)  # a string broadcasts (issue 17); other non-lists are errors
    with pytest.raises(ValueError, match="already patched"):
        lmf.patch(m, lmf.AdapterLibrary.from_peft(dirs))


@torch.no_grad()
def test_torch_compile_patched_model(tmp_path):
    model = tiny_model("llama", layers=1)
    dirs = write_peft_adapters(model, [AdapterSpec("a", r=4, seed=1), AdapterSpec("b", r=8, seed=2)],
                               str(tmp_path))
    m = lmf.patch(copy.deepcopy(model), lmf.AdapterLibrary.from_peft(dirs))
    ids = torch.randint(3, 128, (3, 5))
    names = ["b", "__base__", "a"]
    eager = m(ids, adapter_names=names).logits
    cm = torch.compile(m, backend="inductor")
    with lmf.use_adapters(m, names):
        comp = cm(ids).logits
    torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-4)
    # the op itself compiles as one opaque custom op
    x = torch.randn(7, 64)
    st = m.model.layers[0].self_attn.q_proj.stack()
    idx = torch.tensor([[0], [1], [-1], [0], [1], [1], [0]], dtype=torch.int32)
    w = m.model.layers[0].self_attn.q_proj.weight

    def f(x):
        return lmf.ops.multi_lora_linear(x, w, st.A, st.B, st.scale, st.rank, idx)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_two_threads_share_a_patched_model(llama_setup):
    """The selection lives in contextvars: concurrent forwards with different adapters on one
    model each see their own."""
    import threading

    fam, model, dirs, pm = llama_setup
    m = lmf.patch(copy.deepcopy(model), lmf.AdapterLibrary.from_peft(dirs))
    ids = torch.randint(3, 128, (2, 5))
    want = {n: pm(ids, adapter_names=[n, n]).logits for n in ("a", "c")}
    barrier = threading.Barrier(2)
    errors = []

    def worker(name):
        try:
            for _ in range(5):
                barrier.wait()
                with torch.no_grad():
                    got = m(ids, adapter_names=[name, name]).logits
                assert _rel(got, want[name]) < 1e-5, name
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(n,)) for n in want]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
