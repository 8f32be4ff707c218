"""Triton kernels on non-finite data and wide ids (issue 16, items 8, 10 and 13), under the
interpreter (the same checks as the C++ / reference backends get in test_ops_dispatch.py,
test_op_errors.py and test_mix_logits.py):
- a NaN / inf adapter (or NaN past an adapter's rank) never reaches a row that did not select it,
  on the per-row and the grouped path of multi_lora_linear and on multi_lora_expand;
- int64 ids past the int32 range are "no adapter" in the kernels (never the adapter they would
  wrap to) and raise ValueError through ``ops`` on CPU tensors;
- mix_logits / greedy / sample follow reference.mix_logits' rules for +inf, -inf and NaN.

Normal run: one test re-runs this file in a child pytest with TRITON_INTERPRET=1 and
LORAMIX_BACKEND=triton (see interpret.py); child run: the cases below.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRET:
    pytest.importorskip("triton")

    def test_interpreter_suite_in_subprocess():
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from interpret import run_file_under_interpreter

        print(run_file_under_interpreter(__file__))

else:
    pytest.importorskip("triton")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_mix_logits import _expected, _inf_cases, _same  # noqa: E402
    from test_ops_dispatch import _clean, _poisoned  # noqa: E402

    from loramix_fast import ops, reference  # noqa: E402
    from loramix_fast.kernels.mix_logits import (mix_logits_greedy_triton,  # noqa: E402
                                                 mix_logits_triton)
    from loramix_fast.kernels.multi_lora import (multi_lora_expand_dense,  # noqa: E402
                                                 multi_lora_expand_triton,
                                                 multi_lora_linear_dense,
                                                 multi_lora_linear_triton,
                                                 multi_lora_linear_unfused)
    from loramix_fast.ops.mix_logits import sample_from_scores  # noqa: E402

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    @pytest.mark.parametrize("S", [1, 2])
    @pytest.mark.parametrize("grouped", [False, True], ids=["per_row", "grouped"])
    def test_nan_adapter_stays_in_its_rows(grouped, S, dtype):
        x, W, A, B, scale, rank, idx, w, h, y = _poisoned(dtype=dtype, S=S, M=21)
        Ac, Bc, sc, hc = _clean(A, B, scale, rank, h)
        clean = (idx != 0).all(1)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for ids in (idx, idx.long()):
            out = multi_lora_linear_triton(x, W, A, B, scale, rank, ids, w, grouped=grouped)
            want = reference.multi_lora_linear(x.double(), W.double(), Ac, Bc, sc, rank, ids,
                                               w.double())
            assert torch.isfinite(out[clean]).all()
            torch.testing.assert_close(out[clean].double(), want[clean], rtol=tol, atol=tol)
            assert torch.isnan(out[~clean].float()).all()
            out = multi_lora_expand_triton(y, h, B, scale, rank, ids, w)
            want = reference.multi_lora_expand(y.double(), hc, Bc, sc, rank, ids, w.double())
            assert torch.isfinite(out[clean]).all()
            torch.testing.assert_close(out[clean].double(), want[clean], rtol=tol, atol=tol)

    _SPLIT = {"SPLIT_K": 2, "BLOCK_K": 16, "SPLIT": 2}

    @pytest.mark.parametrize("S", [1, 2])
    @pytest.mark.parametrize("launcher", ["unfused", "dense", "split_k", "dot_epilogue"])
    def test_nan_adapter_stays_in_its_rows_every_candidate(launcher, S):
        """Every candidate of the autotuner keeps a NaN / inf adapter in the rows that select it."""
        x, W, A, B, scale, rank, idx, w, h, y = _poisoned(S=S, M=21)
        Ac, Bc, sc, hc = _clean(A, B, scale, rank, h)
        clean = (idx != 0).all(1)
        run = {"unfused": multi_lora_linear_unfused, "dense": multi_lora_linear_dense,
               "split_k": lambda *a: multi_lora_linear_triton(*a, config=_SPLIT),
               "dot_epilogue": lambda *a: multi_lora_linear_triton(
                   *a, grouped=False, config={"EPILOGUE": "dot"})}[launcher]
        out = run(x, W, A, B, scale, rank, idx, w, None)
        want = reference.multi_lora_linear(x.double(), W.double(), Ac, Bc, sc, rank, idx,
                                           w.double())
        assert torch.isfinite(out[clean]).all()
        torch.testing.assert_close(out[clean].double(), want[clean], rtol=1e-4, atol=1e-4)
        assert torch.isnan(out[~clean]).all()
        if launcher in ("dense", "dot_epilogue"):
            ex = multi_lora_expand_dense if launcher == "dense" else (
                lambda *a: multi_lora_expand_triton(*a, config={"EPILOGUE": "dot"}))
            out = ex(y, h, B, scale, rank, idx, w)
            want = reference.multi_lora_expand(y.double(), hc, Bc, sc, rank, idx, w.double())
            assert torch.isfinite(out[clean]).all()
            torch.testing.assert_close(out[clean].double(), want[clean], rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("bad", [2 ** 32 + 2, 2 ** 32 - 1, -(2 ** 32) - 1, 4, -2])  # E = 4
    def test_int64_ids_out_of_range(bad):
        x, W, A, B, scale, rank, idx, w, h, y = _poisoned(S=1, M=9)
        ids = idx.long()
        ids[5, 0] = bad
        none = ids.clone()
        none[5, 0] = -1
        for grouped in (False, True):  # the kernels: "no adapter", never id % 2**32
            out = multi_lora_linear_triton(x, W, A, B, scale, rank, ids, w, grouped=grouped)
            want = multi_lora_linear_triton(x, W, A, B, scale, rank, none, w, grouped=grouped)
            assert torch.equal(torch.isnan(out), torch.isnan(want))
            torch.testing.assert_close(out, want, equal_nan=True)
        with pytest.raises(ValueError, match=rf"\bidx\b.*{bad}"):  # ops on CPU tensors: raises
            ops.multi_lora_linear(x, W, A, B, scale, rank, ids, w)
        with pytest.raises(ValueError, match=rf"\bidx\b.*{bad}"):
            ops.multi_lora_expand(y, h, B, scale, rank, ids, w)

    @pytest.mark.parametrize("mode", ["probs", "logits"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("block,chunk", [(None, None), (64, 128)])
    def test_nonfinite_logits_semantics(mode, dtype, block, chunk):
        V = 300
        z, w = _inf_cases(V, dtype, seed=5)
        want = _expected(z, w, mode)
        tol = 1e-5 if dtype == torch.float32 else 1e-4
        _same(mix_logits_triton(z, w, mode, block=block, chunk=chunk), want, tol)
        assert torch.equal(mix_logits_greedy_triton(z, w, mode, block=block, chunk=chunk),
                           want.argmax(1))
        if block is None:  # through ops: greedy and sample (sample = the kernel's scores + torch)
            _same(ops.mix_logits(z, w, mode), want, tol)
            for rows in (slice(None), slice(0, 2), slice(4, 6)):
                ref = want[rows]
                assert torch.equal(ops.mix_logits_greedy(z[rows], w[rows], mode), ref.argmax(1))
                for u in (0.0, 0.3, 0.7):
                    uu = torch.full((ref.shape[0],), u)
                    tok = ops.mix_logits_sample(z[rows], w[rows], mode, uniforms=uu)
                    assert torch.equal(tok, sample_from_scores(ref, uu)), f"sample at u = {u}"
