"""Ahead-of-time compilation of every kernel in kernels/multi_lora.py for sm_80 and sm_90, no GPU.

Each case compiles with the block config the launcher itself would pick (``gemm_config`` /
``shrink_config``) and the specialisations the JIT sees on real inputs (unit strides as constexpr 1,
pointers and sizes divisible by 16), then checks:
- compilation succeeds (catches tl.dot dims < 16, non-power-of-2 blocks, dtype mixes);
- the GEMM kernel's PTX holds tensor-core instructions: ``mma.sync`` on sm_80; on sm_90 ``wgmma``
  where BLOCK_M >= 64 (a warpgroup's M), ``mma.sync`` for the narrow decode tiles;
- no register spills (cuobjdump LOCAL/STACK = 0) and shared memory within the SM's budget.
Run with ``-s`` to see a registers / spills / smem line per case.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from triton_aot import (aot_available, compile_kernel, div16_default, resource_usage,  # noqa: E402
                        signature_of, tensor_core_ops)

_ok, _why = aot_available()
pytestmark = pytest.mark.skipif(not _ok, reason=_why)

if _ok:
    from loramix_fast.kernels import multi_lora as K  # noqa: E402

ARCHS = [80, 90]
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TDT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


S_MATRIX = (1, 2, 4, 8, 16, 32)   # slots per row: 1 multi-tenant, k of SpectR / Arrow, T of Uniform


@dataclass(frozen=True)
class FwdCase:
    """One launch of ``_multi_lora_fwd_kernel`` as a launcher makes it.
    mode: "fused" (GEMM + epilogue), "partial" (decode split-K GEMM partials), "reduce" (the
    partials' sum + bias + expand), "expand" (multi_lora_expand_triton), "unfused" (the expand
    added to cuBLAS's y in place)."""
    name: str
    M: int                     # rows the launcher is called with (picks gemm_config)
    dtype: str
    mode: str = "fused"
    R: int = 16
    transposed_w: bool = False  # HF Conv1D: weight.T view, unit stride along N
    tf32: bool = False          # fp32 with torch.backends.cuda.matmul.allow_tf32
    int64_ids: bool = False     # rank / idx given as int64 tensors, w and scale in half precision
    config: tuple = ()          # gemm_config overrides (a tuner candidate's config)

    def __str__(self):
        return self.name


FWD_CASES = [
    FwdCase("decode_m1_fp16", 1, "fp16"),
    FwdCase("decode_m1_partial_fp16", 1, "fp16", mode="partial"),
    FwdCase("decode_m1_reduce_fp16", 1, "fp16", mode="reduce"),
    FwdCase("decode_m16_r64_bf16", 16, "bf16", R=64),
    FwdCase("decode_m16_reduce_r64_bf16", 16, "bf16", mode="reduce", R=64),
    FwdCase("decode_m8_conv1d_partial_fp16", 8, "fp16", mode="partial", transposed_w=True),
    FwdCase("decode_m16_n64_fp16", 16, "fp16", config=(("BLOCK_N", 64), ("BLOCK_K", 64))),
    FwdCase("batch_m32_int64_ids_bf16", 32, "bf16", int64_ids=True),
    FwdCase("batch_m64_fp16", 64, "fp16"),
    FwdCase("batch_m64_reduce_fp16", 64, "fp16", mode="reduce"),
    FwdCase("mid_m128_fp16", 128, "fp16"),
    FwdCase("prefill_grouped_fp16", 4096, "fp16"),
    FwdCase("prefill_grouped_r32_bf16", 4096, "bf16", R=32),
    FwdCase("prefill_grouped_conv1d_fp16", 4096, "fp16", transposed_w=True),
    FwdCase("prefill_m64_tiles_bf16", 4096, "bf16",
            config=(("BLOCK_M", 64), ("BLOCK_N", 128), ("num_warps", 4))),
    FwdCase("decode_m1_fp32", 1, "fp32"),
    FwdCase("prefill_grouped_fp32", 4096, "fp32"),
    FwdCase("prefill_grouped_fp32_tf32", 4096, "fp32", tf32=True),
    FwdCase("expand_decode_fp16", 4, "fp16", mode="expand"),
    FwdCase("expand_prefill_bf16", 2048, "bf16", mode="expand"),
    FwdCase("expand_prefill_gather_fp16", 2048, "fp16", mode="expand",
            config=(("EPILOGUE", "gather"),)),
    FwdCase("unfused_decode_fp16", 16, "fp16", mode="unfused"),
    FwdCase("unfused_prefill_bf16", 4096, "bf16", mode="unfused"),
]
PREFILL_MODES = ("fused",)  # modes whose base GEMM is the prefill GEMM (wgmma on sm_90)


def _compile_fwd(case: FwdCase, arch: int, S: int):
    dt = TDT[case.dtype]
    cfg = K.gemm_config(case.M, dt)
    cfg.update(dict(case.config))
    mode = case.mode
    grouped = case.M >= K.GROUPED_MIN_M and mode in ("fused", "unfused") \
        and cfg["EPILOGUE"] == "dot"
    if case.dtype == "fp32":
        dot_fp32, prec = True, ("tf32" if case.tf32 else "ieee")
    else:
        dot_fp32, prec = False, "tf32"
    has_base = mode in ("fused", "partial")
    cfg = K.epilogue_config(cfg, has_base, cfg["EPILOGUE"] == "gather")
    cx = K.fwd_constexprs(cfg, has_base=has_base, partial=mode == "partial",
                          has_bias=mode in ("fused", "reduce"),
                          has_yin=mode in ("reduce", "expand", "unfused"),
                          has_w=mode == "expand" and S > 1, h_coef=mode != "expand",
                          has_perm=grouped and mode != "partial",
                          gather=cfg["EPILOGUE"] == "gather", even_k=has_base,
                          BLOCK_R=K._block_r(case.R), dot_fp32=dot_fp32, precision=prec)
    # unit strides of contiguous tensors, as the JIT specialises them
    cx.update(stride_on=1, stride_br=1, stride_is=1, stride_hr=1)
    if cx["HAS_YIN"]:
        cx.update(stride_yin=1)
    if has_base:
        cx.update(stride_xk=1, **({"stride_wn": 1} if case.transposed_w else {"stride_wk": 1}))
    if S == 1:
        cx.update(stride_im=1)
        if cx["HAS_W"]:
            cx.update(stride_wm=1)
    p = "*" + case.dtype
    out_t = "*fp32" if mode == "partial" else p
    sig = signature_of(K._multi_lora_fwd_kernel, dict(
        x_ptr=p, weight_ptr=p, bias_ptr=p, yin_ptr="*fp32" if mode == "reduce" else p,
        out_ptr=out_t, h_ptr="*fp32", B_ptr=p,
        scale_ptr="*fp32", rank_ptr="*i64" if case.int64_ids else "*i32",
        idx_ptr="*i64" if case.int64_ids else "*i32", w_ptr="*bf16" if case.int64_ids else "*fp32",
        perm_ptr="*i64"), constexprs=cx)
    return cfg, compile_kernel(K._multi_lora_fwd_kernel, sig, cx, arch,
                               num_warps=cfg["num_warps"],
                               num_stages=K.fwd_num_stages(cfg, has_base),
                               divisible_by_16=div16_default(
                                   sig, exclude=("M", "S", "E", "R", "NUM_YIN", "NUM_H")))


def _report(name, arch, ck, extra=""):
    ru = resource_usage(ck)
    tc = tensor_core_ops(ck)
    print(f"\n[aot] {name:32s} sm_{arch}: mma={tc['mma']:3d} wgmma={tc['wgmma']:3d} "
          f"regs={ru and ru['registers']} spill={ru and ru['spill_bytes']} "
          f"stack={ru and ru['stack']} smem={ru and ru['shared']} {extra}")
    return ru, tc


def _check_resources(ru, arch):
    if ru is None:
        return  # cuobjdump unavailable: compilation success is still checked
    assert ru["spill_bytes"] == 0 and ru["stack"] == 0, f"register spills: {ru}"
    assert ru["shared"] <= SMEM_LIMIT[arch], f"shared memory {ru['shared']} over sm_{arch} budget"


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("S", S_MATRIX, ids=lambda s: f"s{s}")
@pytest.mark.parametrize("case", FWD_CASES, ids=str)
def test_aot_fwd_kernel(case, S, arch):
    cfg, ck = _compile_fwd(case, arch, S)
    ru, tc = _report(f"{case.name}_s{S}", arch, ck,
                     f"BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} {cfg['EPILOGUE']}")
    tensor_cores = case.dtype != "fp32" or case.tf32
    dots = case.mode in ("fused", "partial") or cfg["EPILOGUE"] == "dot"
    if tensor_cores and dots:
        if arch == 90 and cfg["BLOCK_M"] >= 64 and case.mode in PREFILL_MODES:
            assert tc["wgmma"] > 0, "sm_90 prefill GEMM tile without wgmma"
        else:
            assert tc["mma"] + tc["wgmma"] > 0, f"sm_{arch} GEMM without mma.sync"
    elif not tensor_cores:  # ieee fp32: exact FMA path, no tensor cores (torch's default)
        assert tc["mma"] == 0 and tc["wgmma"] == 0
    _check_resources(ru, arch)


SHRINK_CASES = [(dt, r) for dt in ("fp16", "bf16", "fp32") for r in (16, 64)]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("dtype,R", SHRINK_CASES, ids=[f"{d}_r{r}" for d, r in SHRINK_CASES])
def test_aot_shrink_kernel(dtype, R, arch):
    BLOCK_R = K._block_r(R)
    sc = K.shrink_config(False, BLOCK_R, TDT[dtype])
    cx = dict(HAS_W=True, BLOCK_R=BLOCK_R, BLOCK_K=sc["BLOCK_K"], stride_xk=1, stride_ak=1)
    p = "*" + dtype
    sig = signature_of(K._multi_lora_shrink_kernel, dict(
        x_ptr=p, A_ptr=p, scale_ptr="*fp32", rank_ptr="*i32", idx_ptr="*i32", w_ptr="*fp32",
        h_ptr="*fp32"), constexprs=cx)
    ck = compile_kernel(K._multi_lora_shrink_kernel, sig, cx, arch, num_warps=sc["num_warps"],
                        num_stages=sc["num_stages"],
                        divisible_by_16=div16_default(sig, exclude=("M", "S", "E", "R")))
    ru, _ = _report(f"shrink_{dtype}_r{R}", arch, ck)
    _check_resources(ru, arch)


# fp32 reaches the grouped shrink only with TF32 (exact fp32 takes the per-row shrink)
GROUPED_CASES = [(dt, r, s) for dt, r in (("fp16", 16), ("bf16", 32), ("fp32", 16))
                 for s in S_MATRIX]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("dtype,R,S", GROUPED_CASES,
                         ids=[f"{d}_r{r}_s{s}" for d, r, s in GROUPED_CASES])
def test_aot_shrink_grouped_kernel(dtype, R, S, arch):
    BLOCK_R = K._block_r(R)
    sc = K.shrink_config(True, BLOCK_R, TDT[dtype])
    cx = dict(HAS_W=S > 1, BLOCK_M=sc["BLOCK_M"], BLOCK_K=sc["BLOCK_K"], BLOCK_R=BLOCK_R,
              BLOCK_S=triton.next_power_of_2(S), DOT_FP32=dtype == "fp32", DOT_PRECISION="tf32",
              stride_xk=1, stride_ak=1, stride_is=1, **({"stride_im": 1} if S == 1 else {}))
    p = "*" + dtype
    sig = signature_of(K._multi_lora_shrink_grouped_kernel, dict(
        x_ptr=p, A_ptr=p, scale_ptr="*fp32", rank_ptr="*i32", idx_ptr="*i32", w_ptr="*fp32",
        h_ptr="*fp32", perm_ptr="*i64"), constexprs=cx)
    ck = compile_kernel(K._multi_lora_shrink_grouped_kernel, sig, cx, arch,
                        num_warps=sc["num_warps"], num_stages=sc["num_stages"],
                        divisible_by_16=div16_default(sig, exclude=("M", "S", "E", "R")))
    ru, tc = _report(f"shrink_grouped_{dtype}_r{R}_s{S}", arch, ck)
    assert tc["mma"] + tc["wgmma"] > 0, "grouped shrink without tensor-core instructions"
    _check_resources(ru, arch)
