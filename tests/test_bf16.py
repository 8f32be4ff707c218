"""bf16 on the CPU (issue 12): the C++ kernels on bf16 inputs, against fp64 references.

Accuracy rule (flash-attention's): a kernel's error against the fp64 reference is at most twice the
error of plain torch doing the same computation in bf16, plus a small floor. The kernels accumulate
in fp32, so they are also held to twice torch's error in fp32 on the same bf16 values (stricter).
- mix_logits / spectr_topk read bf16 logits / h directly: no fp32 copy of the input is made (the
  bytes allocated inside the op are checked with the profiler's memory accounting);
- multi_lora_linear at the benchmark's shape (d = 2048, r = 16, 32 adapters, every row distinct)
  on every run-time kernel path this CPU can run (LORAMIX_CPU_ISA forces one), rounded once.
"""
from __future__ import annotations

import math

import pytest
import torch

from loramix_fast import _cpp, ops, reference

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _cpp_backend(monkeypatch):
    if not _cpp.load():
        pytest.skip(f"C++ extension unavailable: {_cpp.load_error()}")
    monkeypatch.setenv("LORAMIX_BACKEND", "cpp")


def _bytes_allocated(fn) -> int:
    """Bytes the CPU allocator handed out while fn() ran (the profiler's memory accounting)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    fin = torch.isfinite(ref)
    return (got.double() - ref)[fin].abs().max().item() if fin.any() else 0.0


def _assert_2x(err: float, err_torch: float, scale: float, what: str, floor_ulps: float = 8) -> None:
    floor = floor_ulps * torch.finfo(torch.float32).eps * (1.0 + scale)
    assert err <= 2 * err_torch + floor, f"{what}: err {err:.3g} vs torch {err_torch:.3g} (floor {floor:.3g})"


# ------------------------------------------------------------------ mix_logits -----------------------
def _torch_bf16_mix(z: torch.Tensor, w: torch.Tensor, mode: str) -> torch.Tensor:
    """What plain torch computes in bf16 (every intermediate rounded to bf16)."""
    wb = w.to(BF16)
    if mode == "logits":
        return (wb[:, :, None] * z).sum(1)
    logw = torch.where(wb > 0, wb.clamp_min(torch.finfo(BF16).tiny).log(),
                       torch.full_like(wb, -math.inf))
    return torch.logsumexp(torch.log_softmax(z, dim=-1) + logw[:, :, None], dim=1)


MIX_SHAPES = [(3, 4, 32000), (2, 3, 32001), (1, 8, 4099)]


@pytest.mark.parametrize("mode", ["probs", "logits"])
@pytest.mark.parametrize("B,E,V", MIX_SHAPES, ids=[f"B{b}-E{e}-V{v}" for b, e, v in MIX_SHAPES])
def test_mix_logits_bf16_accuracy(B, E, V, mode):
    g = torch.Generator().manual_seed(B * 1000 + E * 10 + V)
    # strided: the experts' rows are a slice of a wider logits buffer (a padded vocabulary)
    z = (torch.randn(B, E, V + 5, generator=g) * 4).to(BF16)[:, :, :V]
    w = torch.rand(B, E, generator=g) + 0.05
    if E > 1:
        w[0, 1] = 0.0  # an unused expert
    got = ops.mix_logits(z, w, mode)
    assert got.dtype == torch.float32 and got.shape == (B, V)
    ref = reference.mix_logits(z, w, mode, upcast=True)
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))
    scale = ref[torch.isfinite(ref)].abs().max().item()
    err = _err(got, ref)
    _assert_2x(err, _err(_torch_bf16_mix(z, w, mode), ref), scale, "vs torch in bf16")
    _assert_2x(err, _err(reference.mix_logits(z, w, mode), ref), scale, "vs torch in fp32")
    # greedy on bf16: the fp64 argmax wherever the top two are apart by more than rounding
    tok = ops.mix_logits_greedy(z, w, mode)
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5 * (1 + scale)
    assert torch.equal(tok[clear], ref.argmax(1)[clear])


@pytest.mark.parametrize("mode", ["probs", "logits"])
def test_mix_logits_bf16_reads_bf16(mode):
    """No fp32 copy of the [B, E, V] logits: the op allocates about its [B, V] fp32 output only."""
    B, E, V = 2, 8, 32000
    z = torch.randn(B, E, V).to(BF16)
    w = torch.rand(B, E) + 0.1
    ops.mix_logits(z, w, mode)  # warm-up (first-call allocations)
    got = _bytes_allocated(lambda: ops.mix_logits(z, w, mode))
    out_bytes, copy_bytes = B * V * 4, B * E * V * 4
    assert got < out_bytes + copy_bytes // 4, f"{got} bytes allocated (output {out_bytes}, fp32 copy {copy_bytes})"
    ops.mix_logits_greedy(z, w, mode)
    got = _bytes_allocated(lambda: ops.mix_logits_greedy(z, w, mode))
    assert got < copy_bytes // 4, f"greedy allocated {got} bytes (an fp32 copy is {copy_bytes})"


# ------------------------------------------------------------------ spectr_topk ----------------------
def _wide_h(M, T, R, N, g):
    """h [M, T, R] bf16 as the column slice Y[:, N:] of a wider [M, N + T*R] GEMM output."""
    Y = torch.randn(M, N + T * R, generator=g).to(BF16)
    return Y[:, N:].unflatten(1, (T, R))


SPECTR = [("norm", "uniform", 4), ("norm", "softmax", 3), ("first", "softmax", 2), ("first", "uniform", 5)]


@pytest.mark.parametrize("score,weighting,k", SPECTR, ids=[f"{s}-{w}-k{k}" for s, w, k in SPECTR])
def test_spectr_topk_bf16_accuracy(score, weighting, k):
    g = torch.Generator().manual_seed(len(score) * 7 + k)
    M, T, R, N = 257, 32, 16, 40
    h = _wide_h(M, T, R, N, g)
    assert not h.is_contiguous()
    rank = torch.tensor([R] * (T - 3) + [7, 0, 1], dtype=torch.int32)  # unequal ranks, one rank 0
    sc = (torch.rand(T, generator=g) + 0.5) if score == "first" else None
    kw = dict(rank=rank, score=score, score_scale=sc, weighting=weighting, temperature=0.7)
    idx, w, s = ops.spectr_topk(h, k, **kw)
    r_idx, r_w, r_s = reference.spectr_topk(h, k, upcast=True, **kw)
    _, _, t32 = reference.spectr_topk(h, k, upcast=False, **kw)
    # torch in bf16: the norm of each expert's h computed and returned in bf16
    if score == "norm":
        mask = torch.arange(R)[None, :] < rank[:, None]
        t16 = torch.linalg.vector_norm(h * mask.to(BF16), dim=-1)
    else:
        t16 = h[:, :, 0].abs() * sc.to(BF16)
    scale = r_s.abs().max().item()
    err = _err(s, r_s)
    _assert_2x(err, _err(t16, r_s), scale, "scores vs torch in bf16")
    _assert_2x(err, _err(t32, r_s), scale, "scores vs torch in fp32")
    # the selection wherever the k-th and (k+1)-th reference scores are apart by more than rounding
    valid = rank > 0
    srt = torch.where(valid[None, :], r_s, torch.full_like(r_s, -math.inf)).sort(1, descending=True).values
    clear = (srt[:, k - 1] - srt[:, k]) > 1e-5 * (1 + scale)
    assert clear.float().mean() > 0.9  # the check below covers most rows
    for m in torch.nonzero(clear).flatten().tolist():
        assert sorted(idx[m].tolist()) == sorted(r_idx[m].tolist()), (m, idx[m], r_idx[m])
        assert torch.allclose(w[m].double().sort().values, r_w[m].double().sort().values, atol=1e-5)
    assert not (idx == 30).any()  # the rank-0 expert is never selected
    assert torch.allclose(w.sum(1).double(), torch.ones(M, dtype=torch.float64) if weighting == "softmax"
                          else torch.full((M,), 1.0, dtype=torch.float64), atol=1e-5)


def test_spectr_topk_bf16_reads_bf16():
    """No fp32 copy of h (a strided column slice): the op allocates its outputs only."""
    g = torch.Generator().manual_seed(3)
    M, T, R, k = 512, 32, 16, 4
    h = _wide_h(M, T, R, 64, g)
    ops.spectr_topk(h, k)
    got = _bytes_allocated(lambda: ops.spectr_topk(h, k))
    out_bytes = M * k * 8 + M * T * 4  # idx int32 + w fp32, scores fp32
    copy_bytes = M * T * R * 4
    assert got < out_bytes + copy_bytes // 8, f"{got} bytes allocated (outputs {out_bytes}, fp32 copy {copy_bytes})"


# ------------------------------------------------------------------ multi_lora_linear ----------------
ISAS = ("amx", "avx512bf16", "avx512", "avx2", "generic")
_RANK = {n: i for i, n in enumerate(reversed(ISAS))}


def _isa_ok(isa: str) -> bool:
    active, best, gemm = torch.ops.loramix_cpp.cpu_isa()
    if isa == "amx":  # only changes which GEMM takes large groups: needs AVX512-BF16 and MKL
        return _RANK[best] >= _RANK["avx512bf16"] and gemm == "mkl"
    return _RANK[isa] <= _RANK[best]


def _bench_inputs(M: int, seed: int):
    """The op benchmark's shape: d = 2048, r = 16, 32 adapters, every row its own (distinct)."""
    g = torch.Generator().manual_seed(seed)
    K = N = 2048
    E, R = 32, 16
    x = torch.randn(M, K, generator=g).to(BF16)
    weight = (torch.randn(N, K, generator=g) / K ** 0.5).to(BF16)
    A = (torch.randn(E, R, K, generator=g) / K ** 0.5).to(BF16)
    B = (torch.randn(E, N, R, generator=g) / R ** 0.5).to(BF16)
    scale = torch.rand(E, generator=g) + 0.5
    rank = torch.full((E,), R, dtype=torch.int32)
    idx = (torch.arange(M) % E).to(torch.int32)[:, None]
    bias = (torch.randn(N, generator=g) * 0.1).to(BF16)
    return x, weight, A, B, scale, rank, idx, None, bias


_REFS: dict = {}


def _refs(M: int):
    if M not in _REFS:
        args = _bench_inputs(M, seed=M)
        y64 = reference.multi_lora_linear(*args, upcast=True)
        x, weight, A, B, scale, rank, idx, w, bias = args
        # torch in bf16: F.linear, then the per-adapter delta in bf16 added to it
        d = torch.einsum("mrk,mk->mr", A[idx[:, 0]], x) * scale[idx[:, 0]].to(BF16)[:, None]
        y16 = torch.nn.functional.linear(x, weight, bias) + torch.einsum("mnr,mr->mn", B[idx[:, 0]], d)
        _REFS[M] = (args, y64, [y16, reference.multi_lora_linear(*args)])
    return _REFS[M]


@pytest.mark.parametrize("M", [1, 16, 80])
@pytest.mark.parametrize("isa", ISAS)
def test_multi_lora_bf16_bench_shape_each_isa(isa, M, monkeypatch):
    if not _isa_ok(isa):
        pytest.skip(f"this CPU cannot run the {isa} path (detected: {torch.ops.loramix_cpp.cpu_isa()[1]})")
    monkeypatch.setenv("LORAMIX_CPU_ISA", isa)
    assert torch.ops.loramix_cpp.cpu_isa()[0] == isa
    args, y64, torch_outs = _refs(M)
    y = ops.multi_lora_linear(*args)
    assert y.dtype == BF16 and y.shape == y64.shape
    err = (y.double() - y64).abs().max().item()
    err_torch = max((o.double() - y64).abs().max().item() for o in torch_outs)
    ulp = torch.finfo(BF16).eps * y64.abs().max().item()
    assert err <= 2 * err_torch + ulp, f"{isa}: err {err:.3g} vs torch {err_torch:.3g}"
    # one rounding: within half a bf16 ulp of the fp64 value (plus fp32 accumulation noise)
    ref_abs = y64.abs().clamp_min(torch.finfo(BF16).tiny)
    half_ulp = 0.5 * torch.pow(2.0, torch.floor(torch.log2(ref_abs))) * torch.finfo(BF16).eps
    bad = (y.double() - y64).abs() > half_ulp + 2e-6 * y64.abs().max().item()
    assert not bad.any(), f"{isa}: {int(bad.sum())} elements off by more than half an ulp"
