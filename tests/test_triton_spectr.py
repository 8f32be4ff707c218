"""The Triton spectr_topk kernel without a GPU.

1. Correctness under the Triton interpreter: a subprocess sets TRITON_INTERPRET=1 (and
   LORAMIX_BACKEND=triton) before triton is imported and runs every case of test_spectr_op.CASES
   through the public op, checked against the fp64 reference, plus the exact-tie rule.
2. Ahead-of-time compilation for sm_80 and sm_90 over the launch configs the launcher picks for
   representative shapes: must compile, with no register spills.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

_INTERPRET_SCRIPT = textwrap.dedent(r"""
    import sys
    sys.path.insert(0, {here!r})
    import torch
    from test_spectr_op import CASES, make_inputs, check_against_reference, check_nonfinite
    from loramix_fast.ops.spectr import spectr_topk
    import loramix_fast.kernels.spectr as ks
    from loramix_fast.kernels.spectr import spectr_topk_triton

    # Below M = 512 the launcher picks one row per program; force 4-row blocks on every other case so
    # multi-row programs (masked tail rows included) are checked too, and the interpreter runs faster.
    default_config = ks.spectr_topk_config
    force = {{"on": False}}

    def config(*a, **kw):
        cfg = default_config(*a, **kw)
        if force["on"]:
            cfg["BLOCK_M"] = 4
        return cfg

    ks.spectr_topk_config = config
    n = 0
    for i, c in enumerate(CASES):
        force["on"] = i % 2 == 0
        h, rank, scale = make_inputs(c, seed=11)
        out = spectr_topk(h, c.k, rank=rank, score=c.score, score_scale=scale,
                          weighting=c.weighting, temperature=c.temperature)
        try:
            check_against_reference(h, c.k, rank, c.score, scale, c.weighting, c.temperature, out)
        except AssertionError as e:
            raise SystemExit(f"FAILED {{c.id}}: {{e}}")
        n += 1

    # exact ties go to the lowest expert index
    g = torch.Generator().manual_seed(3)
    M, T, R = 6, 12, 8
    h = torch.randn(M, T, R, generator=g) * 0.1
    h[:, 2] = torch.randn(M, R, generator=g) * 3
    for t in (5, 7, 11):
        h[:, t] = h[:, 2]
    h[:, 9] = h[:, 2] * 0.5
    h[:, 4] = h[:, 9]
    for score in ("norm", "first"):
        for dtype in (torch.float32, torch.bfloat16):
            idx, w, _ = spectr_topk_triton(h.to(dtype), 6, None, score, None, "softmax", 1.0)
            assert idx.tolist() == [[2, 5, 7, 11, 4, 9]] * M, (score, dtype, idx)
            assert torch.allclose(w[:, :4], w[:, :1].expand(M, 4)), w
            idx, _, _ = spectr_topk_triton(h.to(dtype), 3, None, score, None, "uniform", 1.0)
            assert idx.tolist() == [[2, 5, 7]] * M, (score, dtype, idx)

    # int64 rank, rank above R (reads all R), k > T
    h = torch.randn(4, 5, 3) + 0.1
    rank = torch.tensor([3, 0, 7, 1, 2], dtype=torch.int64)
    out = spectr_topk_triton(h, 7, rank, "norm", None, "softmax", 0.7)
    check_against_reference(h, 7, rank, "norm", None, "softmax", 0.7, out)
    check_nonfinite(spectr_topk_triton)
    print("OK", n)
""")


def test_triton_interpreter_matches_reference():
    env = dict(os.environ, TRITON_INTERPRET="1", LORAMIX_BACKEND="triton")
    res = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT.format(here=HERE)], env=env,
                         capture_output=True, text=True, timeout=300, cwd=os.path.dirname(HERE))
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


# --- AOT --------------------------------------------------------------------------------------------

AOT_SHAPES = [  # (M, T, R, k, score, h dtype, rank dtype)
    (16, 32, 8, 4, "norm", "*bf16", "*i32"),      # decode, the benchmark shape
    (1024, 32, 8, 4, "norm", "*bf16", "*i32"),    # prefill
    (8192, 32, 16, 4, "first", "*fp16", "*i64"),  # Arrow
    (7, 33, 5, 33, "norm", "*fp32", "*i32"),      # odd T and R, k = T
    (3, 300, 16, 8, "norm", "*bf16", "*i32"),     # a large expert library
]


@pytest.fixture(scope="module")
def aot():
    pytest.importorskip("triton")
    sys.path.insert(0, HERE)
    import triton_aot

    return triton_aot


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("shape", AOT_SHAPES, ids=lambda s: "M{}-T{}-R{}-k{}-{}-{}".format(*s[:5], s[5][1:]))
def test_triton_aot_compiles(aot, shape, arch):
    from loramix_fast.kernels.spectr import _spectr_topk_kernel, spectr_topk_config

    M, T, R, k, score, hdt, rdt = shape
    cfg = spectr_topk_config(M, T, R, k, score)
    nw = cfg.pop("num_warps")
    for v in cfg.values():
        assert v & (v - 1) == 0, f"non-power-of-2 block {cfg}"
    ce = dict(HAS_RANK=True, HAS_SCALE=score == "first", SCORE_FIRST=score == "first",
              SOFTMAX=score == "first", **cfg)
    sig = aot.signature_of(_spectr_topk_kernel,
                           {"h_ptr": hdt, "rank_ptr": rdt, "scale_ptr": "*fp32", "idx_ptr": "*i32",
                            "w_ptr": "*fp32", "s_ptr": "*fp32"},
                           scalars={"inv_temp": "fp32"}, constexprs=ce)
    ck = aot.compile_kernel(_spectr_topk_kernel, sig, ce, arch, num_warps=nw)
    assert ck.asm["ptx"] and ck.asm["cubin"]
    use = aot.resource_usage(ck)
    if use is not None:
        assert use["spill_bytes"] == 0 and use["stack"] == 0, use
