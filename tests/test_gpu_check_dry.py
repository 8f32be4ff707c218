"""bench/gpu_check.py works before a GPU ever runs it: its dry run (the Triton interpreter on CPU
tensors; the "smoke" profile, the smallest shapes) passes every check and writes its section."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\n## Some other section\n\nkept\n")
    env = dict(os.environ, LORAMIX_AUTOTUNE_CACHE=str(tmp_path / "tune.json"))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"),
                          "--dry-run", "--profile", "smoke", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (res.stdout + res.stderr)[-4000:]
    assert res.returncode == 0, tail
    text = out.read_text()
    assert "## Some other section" in text and "## GPU check (bench/gpu_check.py)" in text
    assert "FAIL" not in text and text.count("- PASS") >= 10, text
    for check in ("parity multi_lora_linear", "NaN isolation", "bitwise determinism",
                  "CUDA graph", "offsets past 2^31", "timings"):
        assert check in text, check
