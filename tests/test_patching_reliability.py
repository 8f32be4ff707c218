"""Patched models under stress (issue 16): failed forwards leave no selection behind, a names list
must match the batch outside generate, a patched model saves / loads / copies / pickles / moves as
its base model, encoder-decoder models with unequal encoder and decoder lengths, an invalid router
leaves the model unpatched."""
import copy
import io
import os
import pickle
import warnings

import pytest
import torch

import loramix_fast as lmf
from loramix_fast.testing import TARGETS, AdapterSpec, peft_multi, tiny_model, write_peft_adapters


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = tiny_model("llama")
    t = TARGETS["llama"]
    dirs = write_peft_adapters(model, [AdapterSpec("a", r=4, seed=1),
                                       AdapterSpec("b", r=8, targets=t[2:], seed=2)],
                               str(tmp_path_factory.mktemp("llama")))
    return model, dirs, peft_multi(model, dirs)


def _patched(model, dirs, router=None):
    return lmf.patch(copy.deepcopy(model), lmf.AdapterLibrary.from_peft(dirs), router=router)


# ---- 3: a failed forward leaves no adapter selection active ------------------------------------

@torch.no_grad()
def test_failed_forward_leaves_no_selection(llama):
    model, dirs, pm = llama
    m = _patched(model, dirs)
    ids2, ids3 = torch.randint(3, 128, (2, 5)), torch.randint(3, 128, (3, 5))
    base3 = model(ids3).logits
    # fails while the selection is being set up (3 names, 2 sequences)
    with pytest.raises(ValueError, match="3"):
        m(ids2, adapter_names=["a", "b", "a"])
    assert torch.equal(m(ids3).logits, base3)
    # fails inside the forward, after the selection was made (token id past the vocabulary)
    bad = ids3.clone()
    bad[0, 0] = 10_000
    with pytest.raises(IndexError):
        m(bad, adapter_names=["a", "a", "b"])
    assert torch.equal(m(ids3).logits, base3)
    # an interrupt (not an Exception: torch runs no hook after it) is cleaned up at the next forward
    def interrupt(*_):
        raise KeyboardInterrupt

    h = m.model.layers[1].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        m(ids3, adapter_names=["a", "a", "b"])
    h.remove()
    assert torch.equal(m(ids3).logits, base3)
    # a context selection survives a failed forward inside it, and ends with the context
    with lmf.use_adapters(m, ["b", "a", "__base__"]):
        with pytest.raises(IndexError):
            m(bad)
        out = m(ids3).logits
    assert _rel(out, pm(ids3, adapter_names=["b", "a", "__base__"]).logits) < 1e-5
    assert torch.equal(m(ids3).logits, base3)
    # and a working forward with adapters still matches peft
    assert _rel(m(ids2, adapter_names=["a", "b"]).logits,
                pm(ids2, adapter_names=["a", "b"]).logits) < 1e-5


# ---- 4: a names list shorter than the batch is an error outside generate ------------------------

@torch.no_grad()
def test_short_names_list_raises_outside_generate(llama):
    model, dirs, pm = llama
    m = _patched(model, dirs)
    ids4 = torch.randint(3, 128, (4, 5))
    with pytest.raises(ValueError, match="2 names but the batch has 4 sequences"):
        m(ids4, adapter_names=["a", "b"])  # peft raises too
    with pytest.raises(ValueError, match="2 names but the batch has 4 sequences"):
        with lmf.use_adapters(m, ["a", "b"]):
            m(ids4)
    assert torch.equal(m(ids4).logits, model(ids4).logits)
    # inside generate the batch grows by num_beams / num_return_sequences: the names follow it
    ids = torch.randint(3, 128, (2, 5))
    kw = dict(max_new_tokens=5, pad_token_id=0, do_sample=False, num_beams=3)
    ours = m.generate(ids, adapter_names=["a", "b"], num_return_sequences=2, **kw)
    ref = pm.generate(input_ids=ids, adapter_names=["a", "b"], num_return_sequences=2, **kw)
    assert ours.shape[0] == 4 and torch.equal(ours, ref)
    # sampling several sequences per prompt: each copy uses its prompt's adapter
    torch.manual_seed(3)
    ours = m.generate(ids, adapter_names=["a", "b"], do_sample=True, num_return_sequences=2,
                      max_new_tokens=5, pad_token_id=0)
    torch.manual_seed(3)
    ref = m.generate(ids.repeat_interleave(2, 0), adapter_names=["a", "a", "b", "b"],
                     do_sample=True, max_new_tokens=5, pad_token_id=0)
    assert torch.equal(ours, ref)


# ---- 5: a patched model's state dict is the base model's ----------------------------------------

@torch.no_grad()
def test_state_dict_is_the_base_models(llama, tmp_path):
    import transformers as tf

    model, dirs, _ = llama
    m = _patched(model, dirs)
    sd, base_sd = m.state_dict(), model.state_dict()
    assert list(sd) == list(base_sd)
    assert all(torch.equal(sd[k], base_sd[k]) for k in base_sd)
    q = m.model.layers[0].self_attn.q_proj
    assert sd["model.layers.0.self_attn.q_proj.weight"].data_ptr() == q.base_layer.weight.data_ptr()
    # loading a base model's state dict changes the weights the patched forward uses
    other = tiny_model("llama", seed=5)
    res = m.load_state_dict(other.state_dict())
    assert not res.missing_keys and not res.unexpected_keys
    ids = torch.randint(3, 128, (2, 6))
    assert torch.equal(m(ids).logits, other(ids).logits)
    pm_other = peft_multi(other, dirs)
    assert _rel(m(ids, adapter_names=["a", "b"]).logits,
                pm_other(ids, adapter_names=["a", "b"]).logits) < 1e-5
    # save_pretrained + from_pretrained: the base model, every projection loaded
    m.save_pretrained(str(tmp_path / "saved"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back, info = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"),
                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(back.eval()(ids).logits, other(ids).logits)
    # a patched model loads a patched model's state dict too
    m2 = _patched(model, dirs)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(ids).logits, other(ids).logits)


# ---- 6: deepcopy, pickle, torch.save ------------------------------------------------------------

@torch.no_grad()
def test_deepcopy_pickle_and_torch_save(llama, tmp_path):
    model, dirs, pm = llama
    m = _patched(model, dirs)
    ids = torch.randint(3, 128, (3, 5))
    names = ["a", "__base__", "b"]
    want = m(ids, adapter_names=names).logits
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    copies = {"deepcopy": copy.deepcopy(m), "pickle": pickle.loads(pickle.dumps(m)),
              "torch.save": torch.load(buf, weights_only=False)}
    gen = m.generate(ids, adapter_names=names, max_new_tokens=4, pad_token_id=0)
    for how, c in copies.items():
        assert lmf.is_patched(c), how
        assert torch.equal(c(ids, adapter_names=names).logits, want), how
        assert torch.equal(c(ids).logits, model(ids).logits), how
        assert torch.equal(c.generate(ids, adapter_names=names, max_new_tokens=4,
                                      pad_token_id=0), gen), how
    # independent: its own weights and library; adds reach only the library's own model
    c = copies["deepcopy"]
    lib, lib_c = m._loramix_state.lib, c._loramix_state.lib
    assert lib_c is not lib and c.generate.model is c
    c.model.layers[0].self_attn.q_proj.base_layer.weight.add_(1.0)
    assert torch.equal(m(ids, adapter_names=names).logits, want)
    extra = write_peft_adapters(model, [AdapterSpec("z", r=3, targets=["gate_proj"], seed=9)],
                                str(tmp_path))
    lib_c.add_peft("z", extra["z"])
    assert "z" in lib_c and "z" not in lib
    p = copies["pickle"]
    p._loramix_state.lib.add_peft("z", extra["z"])
    ref = peft_multi(model, {**dirs, **extra})
    assert _rel(p(ids, adapter_names=["z", "a", "b"]).logits,
                ref(ids, adapter_names=["z", "a", "b"]).logits) < 1e-5
    with pytest.raises(KeyError, match="unknown adapter 'z'"):
        m(ids, adapter_names=["z", "a", "b"])
    # a copy unpatches back to the base model
    lmf.unpatch(p)
    assert torch.equal(p(ids).logits, model(ids).logits)


# ---- 7: the device is the input's, not the one at patch time ------------------------------------

@torch.no_grad()
def test_meta_init_then_to_empty_and_moves(llama):
    import transformers as tf

    model, dirs, pm = llama
    with torch.device("meta"):
        meta = tf.LlamaForCausalLM(model.config)
    m = lmf.patch(meta, lmf.AdapterLibrary.from_peft(dirs))
    m.to_empty(device="cpu")
    # load the weights (patching keeps the parameters' order; buffers too: rotary inv_freq is
    # not in the state dict)
    for dst, src in zip(list(m.parameters()) + list(m.buffers()),
                        list(model.parameters()) + list(model.buffers())):
        dst.copy_(src)
    m.eval()
    ids = torch.randint(3, 128, (2, 6))
    names = ["b", "a"]
    assert _rel(m(ids, adapter_names=names).logits, pm(ids, adapter_names=names).logits) < 1e-5
    # moving the model (dtype here): the stacks follow the weights
    m.to(torch.float64)
    q = m.model.layers[0].self_attn.q_proj
    out = m(ids, adapter_names=names).logits
    assert out.dtype == torch.float64 and q.stack().A.dtype == torch.float64
    assert _rel(out, pm(ids, adapter_names=names).logits.double()) < 1e-5
    m.to(torch.float32)
    assert q.stack().A.dtype == torch.float32
    assert _rel(m(ids, adapter_names=names).logits, pm(ids, adapter_names=names).logits) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_patched_model_moves_to_cuda_and_back(llama):
    model, dirs, pm = llama
    m = _patched(model, dirs)
    ids = torch.randint(3, 128, (2, 6))
    names = ["a", "b"]
    want = pm(ids, adapter_names=names).logits
    m(ids, adapter_names=names)
    m.cuda()
    out = m(ids.cuda(), adapter_names=names).logits
    assert out.is_cuda and m.model.layers[0].self_attn.q_proj.stack().A.is_cuda
    assert _rel(out.cpu(), want) < 1e-4
    m.cpu()
    assert _rel(m(ids, adapter_names=names).logits, want) < 1e-5


# ---- 12: encoder-decoder, encoder and decoder of different lengths ------------------------------

def _tiny_bart():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2,
                        decoder_start_token_id=2, forced_eos_token_id=None)
    return tf.BartForConditionalGeneration(cfg).eval()


def _write_seq2seq_adapters(model, specs, folder):
    from peft import LoraConfig, get_peft_model

    dirs = {}
    for name, r, targets, seed in specs:
        torch.manual_seed(seed)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False,
                         task_type="SEQ_2_SEQ_LM")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(copy.deepcopy(model), cfg).save_pretrained(os.path.join(folder, name))
        dirs[name] = os.path.join(folder, name)
    return dirs


@torch.no_grad()
def test_encoder_decoder_unequal_lengths_match_peft(tmp_path):
    model = _tiny_bart()
    dirs = _write_seq2seq_adapters(model, [
        ("a", 4, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], 1),
        ("b", 6, ["k_proj", "v_proj", "fc1"], 2)], str(tmp_path))
    pm = peft_multi(model, dirs)
    m = _patched(model, dirs)
    ids = torch.randint(3, 128, (3, 7))
    labels = torch.randint(3, 128, (3, 3))
    names = ["a", "__base__", "b"]
    ours = m(input_ids=ids, labels=labels, adapter_names=names)
    ref = pm(input_ids=ids, labels=labels, adapter_names=names)
    base = model(input_ids=ids, labels=labels)
    assert ours.logits.shape == (3, 3, 128)
    assert _rel(ours.logits, ref.logits) < 1e-5
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert _rel(ref.logits, base.logits) > 1e-2  # the adapters move the output
    # decoder inputs given directly, and generation (the encoder runs outside the top forward;
    # beams widen only the decoder's batch)
    dec = torch.randint(3, 128, (3, 2))
    assert _rel(m(input_ids=ids, decoder_input_ids=dec, adapter_names=names).logits,
                pm(input_ids=ids, decoder_input_ids=dec, adapter_names=names).logits) < 1e-5
    for extra in ({}, {"num_beams": 2}):
        kw = dict(max_new_tokens=4, do_sample=False, **extra)
        assert torch.equal(m.generate(ids, adapter_names=names, **kw),
                           pm.generate(input_ids=ids, adapter_names=names, **kw)), extra


# ---- 14 (part): patch validates its arguments before touching the model ------------------------

def test_invalid_router_leaves_model_unpatched(llama):
    model, dirs, _ = llama
    m = copy.deepcopy(model)
    lib = lmf.AdapterLibrary.from_peft(dirs)
    hooks = (len(m._forward_pre_hooks), len(m._forward_hooks))
    for bad in ("spectr", 3, object()):
        with pytest.raises(TypeError, match="router"):
            lmf.patch(m, lib, router=bad)
        assert not lmf.is_patched(m)
        assert not any(isinstance(x, lmf.MultiLoRALinear) for x in m.modules())
        assert (len(m._forward_pre_hooks), len(m._forward_hooks)) == hooks
        assert "generate" not in m.__dict__
        assert len(lib._listeners) == 0
    with pytest.raises(TypeError, match=r"lmf\.SpectR\(\)"):
        lmf.patch(m, lib, router="spectr")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lmf.patch("model", lib)
    with pytest.raises(TypeError, match="lib must be an AdapterLibrary"):
        lmf.patch(m, dirs)
    # the same model patches fine afterwards, and set_router refuses a bad router as it was
    lmf.patch(m, lib, router=lmf.SpectR(top_k=1))
    with pytest.raises(TypeError, match="router must be None"):
        lmf.set_router(m, "arrow")
    assert isinstance(m._loramix_state.router, lmf.SpectR)
