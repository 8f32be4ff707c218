"""A patched HF model running entirely on the Triton kernels (under the interpreter, CPU tensors):
multi-tenant parity with peft and SpectR routing against the reference backend."""
import copy
import os
import sys

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRET:
    def test_end_to_end_under_interpreter():
        pytest.importorskip("triton")
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from interpret import run_file_under_interpreter

        print(run_file_under_interpreter(__file__))

else:
    import loramix_fast as lmf
    from loramix_fast.testing import AdapterSpec, peft_multi, tiny_model, write_peft_adapters

    @torch.no_grad()
    def test_patched_model_on_triton_kernels(tmp_path, monkeypatch):
        assert os.environ.get("LORAMIX_BACKEND") == "triton"
        model = tiny_model("llama", hidden=32, vocab=64, intermediate=48)
        dirs = write_peft_adapters(model, [AdapterSpec("a", r=4, seed=1),
                                           AdapterSpec("b", r=8, seed=2)], str(tmp_path))
        pm = peft_multi(model, dirs)
        m = lmf.patch(copy.deepcopy(model), lmf.AdapterLibrary.from_peft(dirs))
        ids = torch.randint(3, 64, (3, 4))
        names = ["a", "__base__", "b"]
        ref = pm(ids, adapter_names=names).logits
        out = m(ids, adapter_names=names).logits
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5
        lmf.set_router(m, lmf.SpectR(top_k=1, weighting="softmax"))
        routed = m(ids).logits
        monkeypatch.setenv("LORAMIX_BACKEND", "reference")
        want = m(ids).logits
        assert ((routed - want).norm() / want.norm()).item() < 1e-5
        assert ((routed - model(ids).logits).norm() / want.norm()).item() > 1e-3

    @torch.no_grad()
    def test_warmup_tunes_every_layer_shape_before_capture(tmp_path, monkeypatch):
        """lmf.warmup runs the prefill and decode shapes once: every patched layer's key is tuned
        then (a fake timer on CPU tensors), and a second warmup finds them all in the cache."""
        from loramix_fast import autotune

        model = tiny_model("llama", hidden=32, vocab=64, intermediate=48, layers=1)
        dirs = write_peft_adapters(model, [AdapterSpec("a", r=4, seed=1, targets=["q_proj"]),
                                           AdapterSpec("b", r=8, seed=2, targets=["q_proj"])],
                                   str(tmp_path))
        m = lmf.patch(model, lmf.AdapterLibrary.from_peft(dirs))
        t = autotune.Tuner(lambda name, run: (run(0), 0.5 if name == "unfused" else 1.0)[1],
                           path=str(tmp_path / "tune.json"), allow_cpu=True)
        monkeypatch.setattr(autotune, "TUNER", t)
        made = lmf.warmup(m, batch_sizes=[2], prompt_lens=[3])
        assert set(made) == {(2, 1), (2, 3)}
        tuned = [e for e in t.events if e[1] == "tuned"]
        assert len(tuned) == 2 and all(e[2] == "unfused" for e in tuned)  # M = 2 and M = 6
        assert {e[0][6] for e in tuned} == {2, 8}  # the M buckets
        t2 = autotune.Tuner(lambda name, run: 1 / 0, path=str(tmp_path / "tune.json"),
                            allow_cpu=True)
        monkeypatch.setattr(autotune, "TUNER", t2)
        made = lmf.warmup(m, batch_sizes=[2], prompt_lens=[3])
        assert [e[1] for e in t2.events] == ["cache", "cache"]

