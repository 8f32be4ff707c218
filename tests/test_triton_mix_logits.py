"""Triton ``mix_logits`` kernels (kernels/mix_logits.py): interpreter runs on CPU tensors and
ahead-of-time compilation for sm_80 / sm_90.

TRITON_INTERPRET=1 must be set before triton is imported, so this file works in two modes:
- normal run: one test re-runs this file in a child ``python -m pytest`` with TRITON_INTERPRET=1 and
  LORAMIX_BACKEND=triton; the AOT tests compile the kernels for real GPUs (no GPU needed);
- child run (TRITON_INTERPRET=1 from the start): the interpreter cases below.
Oracle: ``reference.mix_logits(..., upcast=True)``; tolerance: twice torch's fp32 error plus a floor.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NEG = float("-inf")

if not INTERPRET:
    triton = pytest.importorskip("triton")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from triton_aot import compile_kernel, div16_default, resource_usage, signature_of  # noqa: E402

    from loramix_fast.kernels import mix_logits as K  # noqa: E402

    def test_interpreter_suite_in_subprocess():
        from interpret import run_file_under_interpreter

        print(run_file_under_interpreter(__file__))

    AOT = [(dt, probs, task) for dt in ("fp32", "bf16", "fp16") for probs in (True, False)
           for task in (0, 1)]

    def _report(name, arch, ck):
        ru = resource_usage(ck)
        print(f"\n[aot] {name:34s} sm_{arch}: regs={ru and ru['registers']} "
              f"spill={ru and ru['spill_bytes']} smem={ru and ru['shared']}")
        if ru is not None:
            assert ru["spill_bytes"] == 0 and ru["stack"] == 0, f"register spills: {ru}"

    @pytest.mark.parametrize("arch", [80, 90], ids=lambda a: f"sm{a}")
    @pytest.mark.parametrize("dt", ["fp32", "bf16", "fp16"])
    def test_aot_stats_kernel(dt, arch):
        cx = dict(BLOCK=1024)
        sig = signature_of(K._mix_logits_stats_kernel, dict(
            z_ptr="*" + dt, w_ptr="*fp32", pm_ptr="*fp32", ps_ptr="*fp32"), constexprs=cx)
        ck = compile_kernel(K._mix_logits_stats_kernel, sig, cx, arch, num_warps=4,
                            divisible_by_16=div16_default(sig, exclude=("E", "V", "NCHUNK")))
        assert "ex2" in ck.asm["ptx"]
        _report(f"stats {dt}", arch, ck)

    @pytest.mark.parametrize("arch", [80, 90], ids=lambda a: f"sm{a}")
    @pytest.mark.parametrize("dt,probs,task", AOT, ids=[f"{d}-{'probs' if p else 'logits'}-t{t}"
                                                        for d, p, t in AOT])
    def test_aot_fwd_kernel(dt, probs, task, arch):
        cx = dict(BLOCK=1024, E_P2=8, NC_P2=32, PROBS=probs, TASK=task)
        sig = signature_of(K._mix_logits_fwd_kernel, dict(
            z_ptr="*" + dt, w_ptr="*fp32", pm_ptr="*fp32", ps_ptr="*fp32", out_ptr="*fp32",
            gv_ptr="*fp32", gi_ptr="*i32"), constexprs=cx)
        ck = compile_kernel(K._mix_logits_fwd_kernel, sig, cx, arch, num_warps=4,
                            divisible_by_16=div16_default(sig, exclude=("E", "V", "NCHUNK")))
        ptx = ck.asm["ptx"]
        if task == 0:
            assert "st.global" in ptx
        if probs:
            assert "ex2" in ptx
        _report(f"fwd {dt} probs={probs} task={task}", arch, ck)

else:
    triton = pytest.importorskip("triton")
    from loramix_fast import reference
    from loramix_fast.kernels.mix_logits import mix_logits_greedy_triton, mix_logits_triton
    from loramix_fast.ops.mix_logits import mix_logits, mix_logits_greedy, mix_logits_sample

    def _check(got, z, w, mode):
        ref = reference.mix_logits(z, w, mode, upcast=True)
        r32 = reference.mix_logits(z, w, mode)
        assert not torch.isnan(got).any()
        fin = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(got), fin)
        assert torch.equal(got[~fin], ref[~fin].float())
        err = (got.double() - ref)[fin].abs().max().item()
        err_torch = (r32.double() - ref)[fin].abs().max().item()
        floor = 8 * torch.finfo(torch.float32).eps * (1.0 + ref[fin].abs().max().item())
        assert err <= 2 * err_torch + floor, f"err {err:.3g} vs torch {err_torch:.3g}"
        return ref

    def _data(B, E, V, dtype, seed, special=False):
        g = torch.Generator().manual_seed(seed)
        z = (torch.randn(B, E, V, generator=g) * 3).to(dtype)
        w = torch.rand(B, E, generator=g) + 0.05
        if special:
            z[0, 1, : V // 2] = NEG
            z[1, 2] = NEG
            z[2, 0, 5:9] = 1e4
            w[3] = 0.0
            w[1, 0] = 0.0
            z[1, 0] = float("nan")  # masked expert: never read
        return z, w

    @pytest.mark.parametrize("mode", ["probs", "logits"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
    @pytest.mark.parametrize("V", [1000, 1031])
    @pytest.mark.parametrize("E", [1, 3, 4])
    def test_scores_dispatch(E, V, dtype, mode):
        z, w = _data(4, E, V, dtype, seed=V + E, special=(E == 4))
        if mode == "logits" and E == 4:
            z[0, 1, : V // 2] = -50.0
            z[1, 2] = -30.0
        _check(mix_logits(z, w, mode), z, w, mode)

    @pytest.mark.parametrize("mode", ["probs", "logits"])
    @pytest.mark.parametrize("block,chunk", [(128, 256), (256, 256), (64, 1024)])
    def test_split_v_chunks(block, chunk, mode):
        z, w = _data(3, 4, 1031, torch.float32, seed=block + chunk)
        z[0, 2, 700:] = NEG
        ref = _check(mix_logits_triton(z, w, mode, block=block, chunk=chunk), z, w, mode)
        tok = mix_logits_greedy_triton(z, w, mode, block=block, chunk=chunk)
        top2 = ref.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4
        assert torch.equal(tok[clear], ref.argmax(1)[clear])

    def test_greedy_ties_and_sample():
        z = torch.zeros(2, 2, 1031)
        z[:, :, [7, 500, 1030]] = 5.0
        w = torch.ones(2, 2)
        for mode in ("probs", "logits"):
            assert mix_logits_greedy(z, w, mode).tolist() == [7, 7]
            assert mix_logits_greedy_triton(z, w, mode, block=64, chunk=128).tolist() == [7, 7]
        z, w = _data(3, 3, 1000, torch.float32, seed=3)
        a = mix_logits_sample(z, w, "probs", generator=torch.Generator().manual_seed(4))
        b = mix_logits_sample(z, w, "probs", generator=torch.Generator().manual_seed(4))
        assert torch.equal(a, b)
        cold = mix_logits_sample(z, w, "probs", temperature=1e-3,
                                 generator=torch.Generator().manual_seed(4))
        assert torch.equal(cold, mix_logits_greedy(z, w, "probs"))
