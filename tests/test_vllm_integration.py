"""loramix_fast as vLLM's LoRA backend, on a real offline ``vllm.LLM`` (CPU build, fp32).

A tiny random Llama saved to a folder, three peft adapters (``save_pretrained``,
``init_lora_weights=False``: rank 8 on every projection, rank 4 on every projection, rank 8 on
q/v/down only) as ``LoRARequest``s, ``max_loras=3``: every slot holds an adapter, so slot id -1
(base requests) would read a real adapter if it indexed the last slot. One greedy batch mixes the
three adapters and base requests; the two base requests also run alone. Each configuration runs in
a fresh process with the vLLM venv's python (``make vllm-env`` builds ``.venv-vllm``):

- plugin on, default mode (vLLM's base GEMM, packed lmf deltas), vLLM's usual multiprocess
  engine (the entry point has to reach the spawned worker): every request's tokens equal HF +
  peft ``generate``, base requests in the mixed batch equal themselves alone, the worker built
  loramix_fast's wrapper and ran its packed deltas;
- plugin in fused mode (base GEMM + deltas in one multi_lora_linear), in-process engine: the
  same;
- plugin off (``LORAMIX_VLLM=0``): vLLM's own CPU path gives the HF + peft tokens for the LoRA
  requests, and gives base requests batched with them the last slot's adapter (its -1 bug).

Plus a layer-level check of the wrapper's calls (tests/vllm_wrapper_check.py). The whole file is
skipped, with the reason, when the vLLM venv is missing.
"""
from __future__ import annotations


import pytest
import torch

from vllm_harness import run_check, skip_without_vllm, tiny_model_and_adapters
from vllm_harness import run_engine as _run_engine

skip_without_vllm()

MAX_TOKENS = 10
# adapter per request (None: base model); prompt lengths vary
NAMES = ["a", None, "b", "c", None, "a", "c", "b"]
BASE = [i for i, n in enumerate(NAMES) if n is None]
MIXED = list(range(len(NAMES)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Model + adapters on disk, the requests, and HF + peft greedy tokens of each request alone."""
    from loramix_fast.testing import peft_multi

    d = tmp_path_factory.mktemp("vllm")
    model, dirs = tiny_model_and_adapters(d)
    pm = peft_multi(model, dirs)
    pm.generation_config.eos_token_id = None  # vLLM runs with ignore_eos
    g = torch.Generator().manual_seed(0)
    requests, ref = [], {}
    for i, name in enumerate(NAMES):
        prompt = torch.randint(3, 256, (3 + (i * 5) % 11,), generator=g).tolist()
        requests.append([prompt, name])
        ids = torch.tensor([prompt])
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                  max_new_tokens=MAX_TOKENS, pad_token_id=0)
        with torch.no_grad():
            if name is None:
                with pm.disable_adapter():
                    out = pm.generate(**kw)
            else:
                pm.set_adapter(name)
                out = pm.generate(**kw)
        ref[i] = out[0, len(prompt):].tolist()
        assert len(ref[i]) == MAX_TOKENS
    return {"dir": d, "model": str(d / "model"), "adapters": dirs, "requests": requests,
            "ref": ref}


def run_engine(setup, mode: str, multiprocessing: bool) -> dict:
    """One engine configuration in a fresh process of the vLLM venv."""
    spec = {"model": setup["model"], "adapters": setup["adapters"], "max_loras": 3,
            "max_lora_rank": 8, "requests": setup["requests"], "max_tokens": MAX_TOKENS,
            "batches": [MIXED] + [[i] for i in BASE], "mode": mode,
            "multiprocessing": multiprocessing}
    out = _run_engine(spec, setup["dir"], mode or "default")
    mixed, *alone = out["tokens"]
    out["tokens"] = dict(zip(MIXED, mixed))
    out["alone"] = {i: toks for i, (toks,) in zip(BASE, alone)}
    return out


def _check_tokens(setup, out):
    ref, got = setup["ref"], out["tokens"]
    bad = {i: (NAMES[i], got[i], ref[i]) for i in MIXED if got[i] != ref[i]}
    assert not bad, f"tokens differ from HF + peft (request: adapter, vLLM, HF): {bad}"
    # base requests in the full mixed batch give what they give alone (in the same engine)
    assert {i: got[i] for i in BASE} == out["alone"]


def test_wrapper_layer_level():
    """The wrapper's calls against a dense per-token reference: per-slice and packed deltas (in
    place and not), fused base + deltas, logits and embedding LoRA, slot -1, a batch without
    adapters, layers whose used slots hold no adapter (skipped) or one (run)."""
    err = run_check("vllm_wrapper_check.py")
    assert err.pop("padding_ids") == -1
    assert err.pop("no_adapter_batch") == 0.0
    # a layer none of whose used slots holds an adapter is skipped (y untouched, exactly)
    assert err.pop("dead_slots_skipped") == 0.0
    assert err.pop("packed_not_inplace_input_kept") == 0.0
    assert all(v < 1e-4 for v in err.values()), err


def test_plugin_default_multiprocess(setup):
    out = run_engine(setup, "", multiprocessing=True)
    assert "loramix_fast" in out["plugins"]
    (w,) = out["workers"]
    assert w["wrapper"] == ["loramix_fast.integrations.vllm.punica.PunicaWrapperLoramixCPU"]
    st = w["stats"]
    assert st["mode"] == "on" and st["wrappers"] == 1 and st["fused_calls"] == 0
    # q/k/v, o, gate/up, down of both layers packed: one shrink + one expand per layer and step
    assert st["packed_layers"] == 8
    assert st["packed_calls"] >= 8 * MAX_TOKENS
    _check_tokens(setup, out)


def test_plugin_fused(setup):
    out = run_engine(setup, "fused", multiprocessing=False)
    (w,) = out["workers"]
    assert w["wrapper"] == ["loramix_fast.integrations.vllm.punica.PunicaWrapperLoramixCPU"]
    st = w["stats"]
    assert st["mode"] == "fused" and st["packed_layers"] == 8 and st["packed_calls"] == 0
    assert st["fused_calls"] >= 8 * MAX_TOKENS  # one multi_lora_linear per layer and step
    _check_tokens(setup, out)


def test_plugin_off_is_vllms_own_path(setup):
    out = run_engine(setup, "0", multiprocessing=False)
    (w,) = out["workers"]
    assert w["wrapper"] == ["vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"]
    assert w["stats"]["mode"] == "off" and w["stats"]["wrappers"] == 0
    ref, got = setup["ref"], out["tokens"]
    lora = [i for i in MIXED if NAMES[i] is not None]
    assert {i: got[i] for i in lora} == {i: ref[i] for i in lora}
    assert out["alone"] == {i: ref[i] for i in BASE}  # alone, base requests are right
    # vLLM 0.32.0's CPU path indexes slot -1 = the last slot: base requests in a batch with every
    # slot occupied get that adapter's delta (upstream PR #48421), which the plugin fixes
    assert any(got[i] != ref[i] for i in BASE), (
        "vLLM's own CPU path gave base requests their own tokens in a full mixed batch: "
        "the -1 slot bug is fixed upstream")
