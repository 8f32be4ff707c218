"""AdapterLibrary.from_peft: scaling (alpha, rsLoRA, patterns), unequal ranks, clear errors."""
import json
import math
import os
import shutil

import pytest
import torch

import loramix_fast as lmf
from loramix_fast.adapters import AdapterError
from loramix_fast.testing import AdapterSpec, tiny_model, write_peft_adapters


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("lib"))
    return write_peft_adapters(base, [
        AdapterSpec("plain", r=4, alpha=8, targets=["q_proj", "v_proj"], seed=1),
        AdapterSpec("rs", r=9, alpha=6, rslora=True, targets=["q_proj"], seed=2),
        AdapterSpec("pat", r=8, alpha=16, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                    seed=3),
    ], d)


def test_scaling_and_ranks(saved):
    lib = lmf.AdapterLibrary.from_peft(saved)
    q = "model.layers.0.self_attn.q_proj"
    v = "model.layers.1.self_attn.v_proj"
    assert lib.factors("plain")[q].scale == pytest.approx(2.0)
    assert lib.factors("rs")[q].scale == pytest.approx(6 / math.sqrt(9))
    assert lib.factors("pat")[v].rank == 2 and lib.factors("pat")[v].scale == pytest.approx(8.0)
    st = lib.stack(q, torch.float32, torch.device("cpu"))
    assert st.A.shape == (3, 9, 64) and st.rank.tolist() == [4, 9, 8]
    st_v = lib.stack(v, torch.float32, torch.device("cpu"))
    assert st_v.rank.tolist() == [4, 0, 2] and st_v.scale[1] == 0  # "rs" does not target v
    # unrelated module: no stack
    assert lib.stack("model.layers.0.mlp.up_proj", torch.float32, torch.device("cpu")) is None
    assert lib.id_of("__base__") == -1 and lib.id_of("rs") == 1


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_cfg(path, **kv):
    p = os.path.join(path, "adapter_config.json")
    cfg = json.load(open(p))
    cfg.update(kv)
    json.dump(cfg, open(p, "w"))


@pytest.mark.parametrize("kind, match", [
    ("missing_dir", "does not exist"),
    ("missing_cfg", "adapter_config.json"),
    ("corrupt_cfg", "cannot parse"),
    ("missing_weights", "no adapter_model.safetensors"),
    ("corrupt_weights", "cannot read weights"),
    ("dora", "DoRA"),
    ("modules_to_save", "modules_to_save"),
    ("bias", "LoRA bias"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_load_errors_name_the_adapter(saved, tmp_path, kind, match):
    p = _copy(saved["plain"], tmp_path / "x")
    if kind == "missing_dir":
        p = str(tmp_path / "nope")
    elif kind == "missing_cfg":
        os.remove(os.path.join(p, "adapter_config.json"))
    elif kind == "corrupt_cfg":
        open(os.path.join(p, "adapter_config.json"), "w").write("{not json")
    elif kind == "missing_weights":
        os.remove(os.path.join(p, "adapter_model.safetensors"))
    elif kind == "corrupt_weights":
        open(os.path.join(p, "adapter_model.safetensors"), "wb").write(b"\x00garbage" * 10)
    elif kind == "dora":
        _edit_cfg(p, use_dora=True)
    elif kind == "modules_to_save":
        _edit_cfg(p, modules_to_save=["lm_head"])
    elif kind == "bias":
        _edit_cfg(p, bias="all")
    with pytest.raises(AdapterError, match=match) as ei:
        lmf.AdapterLibrary.from_peft({"mine": p})
    assert "'mine'" in str(ei.value)


def test_shape_mismatch_and_unsupported_targets(base, saved, tmp_path):
    other = tiny_model("llama", hidden=32)
    lib = lmf.AdapterLibrary.from_peft({"plain": saved["plain"]})
    with pytest.raises(AdapterError, match=r"adapter 'plain', module 'model\.layers\.0\.self_attn\.q_proj'.*do not fit"):
        lmf.patch(other, lib)
    assert not lmf.is_patched(other)
    # embedding and LM-head targets
    d = write_peft_adapters(base, [AdapterSpec("emb", r=2, targets=["embed_tokens"], seed=4),
                                   AdapterSpec("head", r=2, targets=["lm_head"], seed=5)],
                            str(tmp_path))
    with pytest.raises(AdapterError, match="'emb'.*embedding"):
        lmf.AdapterLibrary.from_peft({"emb": d["emb"]})
    lib = lmf.AdapterLibrary.from_peft({"head": d["head"]})
    with pytest.raises(AdapterError, match="'head'.*LM head"):
        lmf.patch(tiny_model("llama"), lib)
    # a module the model does not have
    lib = lmf.AdapterLibrary()
    lib.add("ghost", {"model.layers.9.self_attn.q_proj": lmf.LoRAFactors(torch.randn(2, 64),
                                                                         torch.randn(64, 2), 1.0)})
    with pytest.raises(AdapterError, match="'ghost' targets module 'model.layers.9"):
        lmf.patch(tiny_model("llama"), lib)


def test_library_bookkeeping(saved):
    lib = lmf.AdapterLibrary.from_peft(saved)
    with pytest.raises(ValueError, match="already"):
        lib.add_peft("plain", saved["plain"])
    with pytest.raises(ValueError, match="__base__"):
        lib.add("__base__", {})
    with pytest.raises(KeyError, match="unknown adapter 'nope'"):
        lib.id_of("nope")
    v = lib.version
    lib.remove("rs")  # ids never move: "pat" keeps id 2, id 1 is free
    assert lib.version == v + 1 and lib.names == ("plain", None, "pat") and len(lib) == 2
    assert lib.id_of("pat") == 2 and "rs" not in lib
    lib.add_peft("again", saved["rs"])
    assert lib.id_of("again") == 1 and lib.names == ("plain", "again", "pat")
