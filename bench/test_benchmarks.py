"""pytest-benchmark entry points (``pytest bench/test_benchmarks.py``): the headline shapes of each
op, ours next to the floor, grouped so pytest-benchmark prints them side by side."""
import pytest
import torch
import torch.nn.functional as F

import loramix_fast as lmf
from loramix_fast import reference

torch.set_grad_enabled(False)
D, E, R = 2048, 32, 16


@pytest.fixture(scope="module")
def op_data():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(D, D, generator=g) / D ** 0.5
    A = torch.randn(E, R, D, generator=g) / D ** 0.5
    B = torch.randn(E, D, R, generator=g)
    return W, A, B, torch.rand(E, generator=g), torch.full((E,), R, dtype=torch.int32)


@pytest.mark.parametrize("M", [16, 1024])
@pytest.mark.parametrize("provider", ["base", "ours", "loop"])
def test_multi_lora_linear(benchmark, op_data, M, provider):
    W, A, B, scale, rank = op_data
    benchmark.group = f"multi_lora_linear M={M}"
    x = torch.randn(M, D)
    idx = (torch.arange(M) % E).to(torch.int32)[:, None]
    fn = {"base": lambda: F.linear(x, W),
          "ours": lambda: lmf.ops.multi_lora_linear(x, W, A, B, scale, rank, idx),
          "loop": lambda: reference.multi_lora_linear_loop(x, W, A, B, scale, rank, idx)}[provider]
    benchmark(fn)


@pytest.mark.parametrize("provider", ["ours", "torch"])
def test_mix_logits_probs(benchmark, provider):
    benchmark.group = "mix_logits probs B=16 E=4 V=128256"
    z = torch.randn(16, 4, 128256)
    w = torch.rand(16, 4)
    if provider == "ours":
        benchmark(lambda: lmf.ops.mix_logits(z, w, "probs"))
    else:
        benchmark(lambda: torch.logsumexp(torch.log_softmax(z, -1) + w.log()[..., None], 1))
