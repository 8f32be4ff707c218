"""Adapter loading against peft's rules and clear errors: alpha/rank pattern matching (peft's
matcher, regex alternation included), unsupported kinds (aLoRA), malformed configs and weights
(rank 0, non-finite values, configs that are not objects, alphas that are not numbers), atomic
``lib.add`` (validated against the library and every patched model first, committed whole or not at
all), and modules whose only adapters have rank 0 under every router."""
import copy
import json
import math
import os
import shutil
import warnings

import pytest
import torch
from torch import nn

import loramix_fast as lmf
from loramix_fast.adapters import AdapterError
from loramix_fast.testing import AdapterSpec, tiny_model, write_peft_adapters

Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def plain(base, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("plain"))
    return write_peft_adapters(base, [AdapterSpec("p", r=4, alpha=8, targets=["q_proj", "v_proj"],
                                                  seed=1)], d)["p"]


def _write_lora(model, path, seed=0, **cfg):
    """A real peft adapter with an arbitrary LoraConfig (patterns the test helper does not take)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, **cfg))
        pm.save_pretrained(path)
    return path


def _peft_scales(model, path):
    """{module: scaling} as peft computes it when loading ``path``."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(copy.deepcopy(model), path, adapter_name="x").eval()
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, LoraLayer) and "x" in mod.scaling:
            out[name] = mod.scaling["x"]
    return pm, out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_cfg(path, **kv):
    p = os.path.join(path, "adapter_config.json")
    cfg = json.load(open(p))
    cfg.update(kv)
    json.dump(cfg, open(p, "w"))


def _edit_weights(path, fn):
    from safetensors.torch import load_file, save_file

    p = os.path.join(path, "adapter_model.safetensors")
    sd = load_file(p)
    sd = {k: fn(k, v) for k, v in sd.items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, p)


# ---- issue 16 item 1: alpha_pattern / rank_pattern use peft's matcher -------------------------

PATTERNS = [
    dict(r=4, lora_alpha=8, alpha_pattern={"q_proj|v_proj": 64}),  # alternation (the bug)
    dict(r=4, lora_alpha=8, alpha_pattern={"(q|v)_proj": 32, "k_proj": 4}),
    dict(r=4, lora_alpha=8, alpha_pattern={Q0: 40}),  # a full key
    dict(r=4, lora_alpha=8, alpha_pattern={"layers.1.self_attn.v_proj": 12, "v_proj": 20}),
    dict(r=8, lora_alpha=16, rank_pattern={"q_proj|v_proj": 2}),
    dict(r=8, lora_alpha=16, rank_pattern={"q_proj|k_proj": 2}, alpha_pattern={"k_proj|v_proj": 3},
         use_rslora=True),
]


@torch.no_grad()
@pytest.mark.parametrize("cfg", PATTERNS, ids=[str(i) for i in range(len(PATTERNS))])
def test_patterns_match_peft(base, tmp_path, cfg):
    path = _write_lora(base, str(tmp_path / "x"), seed=3,
                       target_modules=["q_proj", "k_proj", "v_proj"], **cfg)
    pm, scales = _peft_scales(base, path)
    lib = lmf.AdapterLibrary.from_peft({"x": path})
    fs = lib.factors("x")
    assert set(fs) == set(scales)
    for mod, s in scales.items():
        assert fs[mod].scale == pytest.approx(s, rel=1e-12), mod
    m = lmf.patch(copy.deepcopy(base), lib)
    ids = torch.randint(3, 128, (2, 5))
    out = m(ids, adapter_names=["x", "x"]).logits
    ref = pm(ids).logits
    assert _rel(out, ref) < 1e-5


def test_bad_pattern_is_an_adapter_error(plain, tmp_path):
    p = _copy(plain, tmp_path / "x")
    _edit_cfg(p, alpha_pattern={"q_proj(": 3})
    with pytest.raises(AdapterError, match=r"'mine'.*alpha_pattern.*q_proj\("):
        lmf.AdapterLibrary.from_peft({"mine": p})


def test_rank_disagreeing_with_config_is_refused(plain, tmp_path):
    p = _copy(plain, tmp_path / "x")
    _edit_cfg(p, rank_pattern={"v_proj": 2})  # the tensors have rank 4 (peft: size mismatch)
    with pytest.raises(AdapterError, match=r"'mine'.*v_proj.*rank 4.*rank_pattern.*2"):
        lmf.AdapterLibrary.from_peft({"mine": p})


# ---- issue 16 item 2: aLoRA ---------------------------------------------------------------------

def test_alora_is_refused(plain, tmp_path):
    p = _copy(plain, tmp_path / "x")
    _edit_cfg(p, alora_invocation_tokens=[5, 6, 7])
    with pytest.raises(AdapterError, match=r"'mine'.*aLoRA.*alora_invocation_tokens"):
        lmf.AdapterLibrary.from_peft({"mine": p})
    _edit_cfg(p, alora_invocation_tokens=None)  # null: a plain LoRA
    assert lmf.AdapterLibrary.from_peft({"mine": p}).names == ("mine",)


def test_real_alora_folder_is_refused(base, tmp_path):
    path = _write_lora(base, str(tmp_path / "al"), target_modules=["q_proj"], r=2,
                       alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM")
    with pytest.raises(AdapterError, match=r"'al'.*aLoRA"):
        lmf.AdapterLibrary.from_peft({"al": path})


# ---- issue 16 item 14: malformed configs and weights --------------------------------------------

@pytest.mark.parametrize("kind, match", [
    ("cfg_list", r"adapter_config\.json.*JSON object.*list"),
    ("alpha_null", r"lora_alpha.*number.*None"),
    ("alpha_str", r"lora_alpha.*number.*'16'"),
    ("alpha_bool", r"lora_alpha.*number.*True"),
    ("alpha_inf", r"lora_alpha.*finite"),
    ("alpha_pattern_str", r"alpha_pattern\['q_proj'\].*number.*'16'"),
    ("alpha_pattern_list", r"alpha_pattern.*object"),
    ("rank0", r"module 'model\.layers\.\d\.self_attn\.[qv]_proj'.*rank 0"),
    ("r0_cfg", r"\br must be a positive integer, got 0"),
    ("r_str", r"\br must be a positive integer, got '4'"),
    ("nan_B", r"module 'model\.layers\.0\.self_attn\.q_proj'.*lora_B.*NaN"),
    ("inf_A", r"module 'model\.layers\.1\.self_attn\.v_proj'.*lora_A.*Inf"),
])
def test_malformed_folders_name_the_adapter(plain, tmp_path, kind, match):
    p = _copy(plain, tmp_path / "x")
    if kind == "cfg_list":
        json.dump([{"peft_type": "LORA"}], open(os.path.join(p, "adapter_config.json"), "w"))
    elif kind == "alpha_null":
        _edit_cfg(p, lora_alpha=None)
    elif kind == "alpha_str":
        _edit_cfg(p, lora_alpha="16")
    elif kind == "alpha_bool":
        _edit_cfg(p, lora_alpha=True)
    elif kind == "alpha_inf":
        _edit_cfg(p, lora_alpha=float("inf"))
    elif kind == "alpha_pattern_str":
        _edit_cfg(p, alpha_pattern={"q_proj": "16"})
    elif kind == "alpha_pattern_list":
        _edit_cfg(p, alpha_pattern=["q_proj"])
    elif kind == "rank0":  # the ZeroDivisionError of issue 16 item 14
        _edit_weights(p, lambda k, v: v[:0] if "lora_A" in k else v[:, :0])
    elif kind == "r0_cfg":
        _edit_cfg(p, r=0)
        _edit_weights(p, lambda k, v: v[:0] if "lora_A" in k else v[:, :0])
    elif kind == "r_str":
        _edit_cfg(p, r="4")
    elif kind == "nan_B":
        def nan(k, v):
            if "layers.0.self_attn.q_proj.lora_B" in k:
                v = v.clone()
                v[3, 1] = float("nan")
            return v
        _edit_weights(p, nan)
    elif kind == "inf_A":
        def inf(k, v):
            if "layers.1.self_attn.v_proj.lora_A" in k:
                v = v.clone()
                v[0, 7] = -float("inf")
            return v
        _edit_weights(p, inf)
    with pytest.raises(AdapterError, match=match) as ei:
        lmf.AdapterLibrary.from_peft({"mine": p})
    assert "'mine'" in str(ei.value)


def _f(r, K=64, N=64, scale=1.0):
    return lmf.LoRAFactors(torch.randn(r, K), torch.randn(N, r), scale)


@pytest.mark.parametrize("where", ["A", "B", "scale"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factors_are_refused_by_add(base, where, bad):
    f = _f(4)
    if where == "A":
        f.A[1, 2] = bad
    elif where == "B":
        f.B[5, 0] = bad
    else:
        f.scale = bad
    lib = lmf.AdapterLibrary()
    lib.add("ok", {Q0: _f(4)})
    with pytest.raises(AdapterError, match=rf"'bad', module '{Q0}'.*{where}.*(NaN|Inf|finite)"):
        lib.add("bad", {Q0: f})
    assert lib.names == ("ok",)
    # nothing reaches the routers' SVD: SpectR / Arrow keep working on the rest of the library
    m = lmf.patch(copy.deepcopy(base), lib, router=lmf.SpectR(top_k=1))
    assert torch.isfinite(m(torch.randint(3, 128, (1, 4))).logits).all()


@pytest.mark.parametrize("factors, match", [
    ({Q0: "nope"}, r"'x', module '.*q_proj'.*LoRAFactors.*str"),
    ({Q0: lmf.LoRAFactors(torch.randn(2, 64).tolist(), torch.randn(64, 2), 1.0)},
     r"'x', module '.*q_proj'.*A must be a torch.Tensor, got list"),
    ({Q0: lmf.LoRAFactors(torch.randint(0, 3, (2, 64)), torch.randn(64, 2), 1.0)},
     r"'x', module '.*q_proj'.*floating"),
    ({Q0: lmf.LoRAFactors(torch.randn(2, 64), torch.randn(64, 2), "1")},
     r"'x', module '.*q_proj'.*scale.*number"),
    ({7: _f(2)}, r"'x'.*module path.*7"),
    ([("a", _f(2))], r"'x'.*dict"),
])
def test_add_rejects_malformed_factors(factors, match):
    lib = lmf.AdapterLibrary()
    with pytest.raises(AdapterError, match=match):
        lib.add("x", factors)
    assert lib.names == ()


# ---- issue 16 item 9: atomic add ---------------------------------------------------------------

@torch.no_grad()
def test_add_is_validated_against_patched_modules(base, plain):
    lib = lmf.AdapterLibrary.from_peft({"p": plain})
    m = lmf.patch(copy.deepcopy(base), lib)
    ids = torch.randint(3, 128, (2, 4))
    before = m(ids, adapter_names=["p", "__base__"]).logits
    v = lib.version
    with pytest.raises(AdapterError, match=rf"'bad', module '{Q0}'.*in=64.*K=32"):
        lib.add("bad", {Q0: _f(2, K=32)})  # K does not fit the patched q_proj
    with pytest.raises(AdapterError, match=rf"'bad', module '{V1}'.*out=32.*N=48"):
        lib.add("bad", {V1: _f(2, N=48)})  # v_proj is 64 -> 32
    assert lib.names == ("p",) and lib.version == v
    assert torch.equal(m(ids, adapter_names=["p", "__base__"]).logits, before)
    lib.add("good", {Q0: _f(3)})  # a later valid add works and is served
    assert lib.names == ("p", "good")
    assert not torch.equal(m(ids, adapter_names=["good", "__base__"]).logits, before)
    assert torch.equal(m(ids, adapter_names=["p", "__base__"]).logits, before)


def test_add_is_validated_against_the_library():
    lib = lmf.AdapterLibrary()
    lib.add("a", {Q0: _f(4)})
    with pytest.raises(AdapterError, match=rf"'b', module '{Q0}'.*\(2, 48\).*'a'.*K=64"):
        lib.add("b", {Q0: _f(2, K=48)})
    assert lib.names == ("a",)
    st = lib.stack(Q0, torch.float32, "cpu")
    assert st.A.shape == (1, 4, 64)


@torch.no_grad()
def test_failed_add_leaves_model_and_library_unchanged(base, plain):
    lib = lmf.AdapterLibrary.from_peft({"p": plain})
    m = lmf.patch(copy.deepcopy(base), lib)
    patched = {n for n, mod in m.named_modules() if isinstance(mod, lmf.MultiLoRALinear)}
    up = "model.layers.0.mlp.up_proj"  # sorts before the bad target: patched first, then undone
    for bad in ({up: _f(2, N=base.config.intermediate_size), "model.layers.9.self_attn.q_proj": _f(2)},
                {up: _f(2, N=base.config.intermediate_size), "lm_head": _f(2, N=128)},
                {up: _f(2, N=base.config.intermediate_size), "model.embed_tokens": _f(2, K=128)}):
        with pytest.raises(AdapterError, match="'bad'"):
            lib.add("bad", bad)
        assert lib.names == ("p",)
        assert {n for n, mod in m.named_modules() if isinstance(mod, lmf.MultiLoRALinear)} == patched
        assert type(m.get_submodule(up)) is nn.Linear
    ids = torch.randint(3, 128, (1, 4))
    assert torch.isfinite(m(ids, adapter_names=["p"]).logits).all()
    lib.add("up", {up: _f(2, N=base.config.intermediate_size)})
    assert isinstance(m.get_submodule(up), lmf.MultiLoRALinear)


# ---- issue 16 item 14: a module whose only adapters have rank 0, under every router -----------

ROUTERS = [None, lmf.SpectR(top_k=1), lmf.SpectR(top_k=2, variant="official"), lmf.Arrow(top_k=2),
           lmf.Uniform(), lmf.PromptCached(lmf.SpectR(top_k=1))]


@torch.no_grad()
@pytest.mark.parametrize("router", ROUTERS, ids=repr)
def test_rank0_only_module_is_the_base_module(base, router):
    torch.manual_seed(0)
    a = {V1: _f(4, N=32, scale=0.5)}
    with_zero = lmf.AdapterLibrary()
    with_zero.add("a", a)
    with_zero.add("z", {Q0: _f(0)})  # rank 0: the only adapter of q_proj
    without = lmf.AdapterLibrary()
    without.add("a", a)
    without.add("z", {})
    ids = torch.randint(3, 128, (2, 5))
    outs = []
    for lib in (with_zero, without):
        m = lmf.patch(copy.deepcopy(base), lib, router=router)
        if router is None:
            outs.append(m(ids, adapter_names=["a", "z"]).logits)
        else:
            outs.append(m(ids).logits)
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=1e-6)
    assert with_zero.stack(Q0, torch.float32, "cpu") is None
