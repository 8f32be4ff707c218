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


@dataclass(frozen=True)
class FwdCase:
    name: str
    M: int                     # rows the launcher is called with (picks gemm_config)
    dtype: str
    S: int = 1
    R: int = 16
    expand_only: bool = False  # multi_lora_expand_triton's specialisation
    transposed_w: bool = False  # HF Conv1D: weight.T view, unit stride along N
    tf32: bool = False          # fp32 with torch.backends.cuda.matmul.allow_tf32
    int64_ids: bool = False     # rank / idx given as int64 tensors, w and scale in half precision

    def __str__(self):
        return self.name


FWD_CASES = [
    FwdCase("decode_m1_fp16", 1, "fp16"),
    FwdCase("decode_m16_s4_r64_bf16", 16, "bf16", S=4, R=64),
    FwdCase("decode_m8_conv1d_fp16", 8, "fp16", transposed_w=True),
    FwdCase("batch_m64_fp16", 64, "fp16", S=2),
    FwdCase("batch_m32_int64_ids_bf16", 32, "bf16", S=2, int64_ids=True),
    FwdCase("prefill_grouped_fp16", 4096, "fp16"),
    FwdCase("prefill_grouped_bf16", 4096, "bf16", S=2, R=32),
    FwdCase("decode_m1_fp32", 1, "fp32"),
    FwdCase("prefill_grouped_fp32", 4096, "fp32"),
    FwdCase("prefill_grouped_fp32_tf32", 4096, "fp32", tf32=True),
    FwdCase("expand_decode_fp16", 4, "fp16", S=4, expand_only=True),
    FwdCase("expand_prefill_bf16", 2048, "bf16", S=2, expand_only=True),
]


def _compile_fwd(case: FwdCase, arch: int):
    dt = TDT[case.dtype]
    cfg = K.gemm_config(case.M, dt)
    grouped = case.M >= K.GROUPED_MIN_M and not case.expand_only
    if case.dtype == "fp32":
        dot_fp32, prec = True, ("tf32" if case.tf32 else "ieee")
    else:
        dot_fp32, prec = False, "tf32"
    BLOCK_R = K._block_r(case.R)
    split = 1 if (grouped or case.expand_only) else K.shrink_split(
        case.M, case.S, 4096, K.shrink_config(False, BLOCK_R, dt)["BLOCK_K"])
    cx = dict(HAS_BASE=not case.expand_only, HAS_BIAS=not case.expand_only,
              HAS_YIN=case.expand_only, HAS_W=case.expand_only, H_HAS_COEF=not case.expand_only,
              HAS_PERM=grouped, SPLIT=split,
              BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
              BLOCK_K=16 if case.expand_only else cfg["BLOCK_K"], BLOCK_R=BLOCK_R,
              BLOCK_S=triton.next_power_of_2(case.S), GROUP_M=cfg["GROUP_M"],
              DOT_FP32=dot_fp32, DOT_PRECISION=prec,
              # unit strides of contiguous tensors, as the JIT specialises them
              stride_on=1, stride_br=1, stride_is=1, stride_hr=1)
    if case.expand_only:
        cx.update(stride_yin=1)
    elif case.transposed_w:
        cx.update(stride_xk=1, stride_wn=1)
    else:
        cx.update(stride_xk=1, stride_wk=1)
    if case.expand_only and case.S == 1:
        cx.update(stride_wm=1)
    if case.S == 1:
        cx.update(stride_im=1)
    p = "*" + case.dtype
    sig = signature_of(K._multi_lora_fwd_kernel, dict(
        x_ptr=p, weight_ptr=p, bias_ptr=p, yin_ptr=p, out_ptr=p, h_ptr="*fp32", B_ptr=p,
        scale_ptr="*fp32", rank_ptr="*i64" if case.int64_ids else "*i32",
        idx_ptr="*i64" if case.int64_ids else "*i32", w_ptr="*bf16" if case.int64_ids else "*fp32",
        perm_ptr="*i64"), constexprs=cx)
    return cfg, compile_kernel(K._multi_lora_fwd_kernel, sig, cx, arch,
                               num_warps=cfg["num_warps"],
                               num_stages=1 if case.expand_only else cfg["num_stages"],
                               divisible_by_16=div16_default(sig, exclude=("M", "S", "E", "R")))


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
@pytest.mark.parametrize("case", FWD_CASES, ids=str)
def test_aot_fwd_kernel(case, arch):
    cfg, ck = _compile_fwd(case, arch)
    ru, tc = _report(case.name, arch, ck, f"BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']}")
    tensor_cores = case.dtype != "fp32" or case.tf32
    if tensor_cores:
        if arch == 90 and cfg["BLOCK_M"] >= 64:
            assert tc["wgmma"] > 0, "sm_90 GEMM tile without wgmma"
        else:
            assert tc["mma"] + tc["wgmma"] > 0, f"sm_{arch} GEMM without mma.sync"
    else:  # ieee fp32: exact FMA path, no tensor cores (torch's default for fp32 matmul)
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


GROUPED_CASES = [(dt, r, s) for dt, r, s in (("fp16", 16, 1), ("bf16", 32, 2), ("fp32", 16, 1))]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("dtype,R,S", GROUPED_CASES,
                         ids=[f"{d}_r{r}_s{s}" for d, r, s in GROUPED_CASES])
def test_aot_shrink_grouped_kernel(dtype, R, S, arch):
    BLOCK_R = K._block_r(R)
    sc = K.shrink_config(True, BLOCK_R, TDT[dtype])
    cx = dict(HAS_W=S > 1, BLOCK_M=sc["BLOCK_M"], BLOCK_K=sc["BLOCK_K"], BLOCK_R=BLOCK_R,
              BLOCK_S=triton.next_power_of_2(S), DOT_FP32=dtype == "fp32", DOT_PRECISION="ieee",
              stride_xk=1, stride_ak=1, stride_is=1)
    p = "*" + dtype
    sig = signature_of(K._multi_lora_shrink_grouped_kernel, dict(
        x_ptr=p, A_ptr=p, scale_ptr="*fp32", rank_ptr="*i32", idx_ptr="*i32", w_ptr="*fp32",
        h_ptr="*fp32", perm_ptr="*i64"), constexprs=cx)
    ck = compile_kernel(K._multi_lora_shrink_grouped_kernel, sig, cx, arch,
                        num_warps=sc["num_warps"], num_stages=sc["num_stages"],
                        divisible_by_16=div16_default(sig, exclude=("M", "S", "E", "R")))
    ru, tc = _report(f"shrink_grouped_{dtype}_r{R}_s{S}", arch, ck)
    if dtype != "fp32":
        assert tc["mma"] + tc["wgmma"] > 0, "grouped shrink without tensor-core instructions"
    _check_resources(ru, arch)
