"""Backward of multi_lora_linear on the Triton backend (ops/backward.py ``dx_by_forward``: dx is
operation 1 itself with A and B swapped, run by the forward's Triton kernels; dA / dB / dw grouped
in torch), under the Triton interpreter on CPU tensors, against the fp64 torch formulation.

Two modes, as tests/test_triton_multi_lora.py: a normal run re-runs this file in a child pytest
with TRITON_INTERPRET=1 and LORAMIX_BACKEND=triton; the child runs the cases (small shapes: the
interpreter is slow).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRET:
    def test_triton_backward_under_interpreter():
        pytest.importorskip("triton")
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from interpret import run_file_under_interpreter

        print(run_file_under_interpreter(__file__))

else:
    pytest.importorskip("triton")
    from loramix_fast import ops, reference
    from loramix_fast.ops import backward as bw

    CASES = {
        "S1_unequal_ranks": dict(M=13, K=24, N=20, E=3, R=8, S=1, ranks=[8, 3, 5], weights=False),
        "S2_w_none_slots": dict(M=9, K=16, N=33, E=4, R=4, S=2, ranks=[4, 0, 2, 4], weights=True),
    }

    def _case(M, K, N, E, R, S, ranks, weights, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(M, K, generator=g)
        W = torch.randn(K, N, generator=g).t()  # a transposed weight, as a Conv1D gives
        A = torch.randn(E, R, K, generator=g) / K ** 0.5
        B = torch.randn(E, N, R, generator=g)
        scale = torch.rand(E, generator=g) + 0.5
        rank = torch.tensor(ranks, dtype=torch.int32)
        idx = torch.randint(0, E, (M, S), generator=g, dtype=torch.int32)
        idx[torch.rand(M, S, generator=g) < 0.2] = -1
        w = torch.rand(M, S, generator=g) + 0.25 if weights else None
        return x, W, A, B, scale, rank, idx, w

    def _rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    @pytest.mark.parametrize("name", list(CASES))
    def test_dx_by_forward_kernels_matches_fp64(name):
        x, W, A, B, scale, rank, idx, w = _case(**CASES[name])
        dy = torch.randn(x.shape[0], W.shape[0], generator=torch.Generator().manual_seed(1))
        got = bw.dx_by_forward("triton", dy, W, A, B, scale, rank, idx, w)
        d = lambda t: None if t is None else t.double()  # noqa: E731
        want = bw.linear_bwd_torch(dy.double(), x.double(), None, W.double(), A.double(),
                                   B.double(), scale.double(), rank, idx, d(w), True, False, False,
                                   False)[0]
        assert got.dtype == torch.float32 and got.shape == x.shape
        assert _rel(got, want) < 1e-5

    @pytest.mark.parametrize("name", list(CASES))
    def test_training_step_on_triton_matches_fp64(name):
        x, W, A, B, scale, rank, idx, w = _case(**CASES[name])
        dy = torch.randn(x.shape[0], W.shape[0], generator=torch.Generator().manual_seed(2))
        ins = [t.clone().requires_grad_(True) for t in (x, A, B) + ((w,) if w is not None else ())]
        y = ops.multi_lora_linear(ins[0], W, ins[1], ins[2], scale, rank, idx,
                                  ins[3] if w is not None else None)
        got = torch.autograd.grad(y, ins, dy)
        ref = [t.double().requires_grad_(True) for t in ins]
        yr = reference.multi_lora_linear(ref[0], W.double(), ref[1], ref[2], scale.double(),
                                         rank, idx, ref[3] if w is not None else None)
        want = torch.autograd.grad(yr, ref, dy.double())
        for g_, w_ in zip(got, want):
            assert _rel(g_, w_) < 1e-5
