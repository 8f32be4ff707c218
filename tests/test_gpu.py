"""GPU-only tests (``pytest -m gpu``): the checks of bench/gpu_check.py at its "test" profile
(smaller shapes than the full script): parity of every candidate with the fp64 reference in fp16 /
bf16 / fp32, NaN isolation, bitwise determinism, CUDA-graph capture and replay (op and patched
model), int64 offsets, and the tuner's pick against cuBLAS + shrink + expand. Skipped, with the
reason, where there is no CUDA GPU; run ``python bench/gpu_check.py`` for the full matrix, or
``python bench/gpu_check.py --dry-run`` for the same script through the Triton interpreter."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (no GPU here: bench/gpu_check.py --dry-run runs "
                              "the same checks through the Triton interpreter)"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="compiled Triton on a GPU, not the interpreter"),
]

CHECKS = ["parity_linear", "parity_expand", "parity_spectr", "parity_mix", "nan_isolation",
          "determinism", "cuda_graph_op", "cuda_graph", "offsets", "timings"]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    sys.path.insert(0, ROOT)
    from bench import gpu_check

    os.environ.setdefault("LORAMIX_AUTOTUNE_CACHE",
                          str(tmp_path_factory.mktemp("tune") / "autotune.json"))
    return gpu_check.Runner(gpu_check.TEST, log=lambda *a, **k: None)


@pytest.mark.parametrize("check", CHECKS)
def test_gpu_check(runner, check, monkeypatch):
    if check.startswith("parity"):
        monkeypatch.setenv("LORAMIX_AUTOTUNE", "0")  # "ops" runs the default candidate
    n = len(runner.results)
    with torch.no_grad():
        fn = getattr(runner, check)
        fn(extra=True) if check == "parity_linear" else fn()
    new = runner.results[n:]
    assert new, f"{check} recorded no result"
    bad = [f"{c.name}: {c.detail}" for c in new if not (c.ok or c.skipped)]
    assert not bad, "\n".join(bad)
