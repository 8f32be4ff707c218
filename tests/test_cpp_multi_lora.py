"""C++ CPU backend of multi_lora_linear / multi_lora_expand against the fp64 reference.

Runs the op directly (torch.ops.loramix_cpp.*) and through loramix_fast.ops with
LORAMIX_BACKEND=cpp. Tolerance: at most 2x the error of plain torch at the same dtype (the
reference without upcast, and the Python-loop formulation), plus one ulp of the output's scale.
Covers the fused per-row path (S = 1), the two-phase per-row path (S > 1), the grouped-GEMM path
(groups of >= 256 rows by default) and, via LORAMIX_CPP_LARGE_GROUP, every case on each path.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import pytest
import torch

from loramix_fast import _cpp, ops, reference


@pytest.fixture(scope="module", autouse=True)
def _extension():
    if not _cpp.load():
        pytest.skip(f"C++ extension unavailable: {_cpp.load_error()}")


def _cpp_ops():
    return torch.ops.loramix_cpp


# ------------------------------------------------------------------ inputs ---------------------------
@dataclass(frozen=True)
class Case:
    name: str
    M: int
    K: int
    N: int
    E: int
    R: int
    S: int = 1
    pop: str = "uniform"          # distinct | uniform | zipf | identical
    none_frac: float = 0.0        # fraction of slots set to -1
    ranks: tuple | None = None    # per-adapter ranks (None: all R)
    weights: bool = False         # pass w [M, S]
    bias: bool = True
    x_layout: str = "contiguous"  # contiguous | row_strided | col_strided | transposed
    weight_t: bool = False        # weight given as a transposed view (HF Conv1D)
    ab_strided: bool = False      # A with non-unit last stride, B with padded rows
    dtype: torch.dtype = torch.float32


CASES = [
    Case("decode_distinct", M=16, K=64, N=96, E=16, R=8, pop="distinct"),
    Case("decode_uniform_none", M=13, K=64, N=80, E=5, R=16, none_frac=0.3),
    Case("odd_9x41x341_ranks", M=9, K=41, N=341, E=7, R=5, ranks=(5, 3, 0, 1, 4, 5, 2)),
    Case("zipf_S3_w", M=40, K=48, N=72, E=6, R=12, S=3, pop="zipf", weights=True,
         ranks=(12, 7, 3, 12, 0, 9), none_frac=0.2),
    Case("identical_small", M=20, K=32, N=40, E=3, R=4, pop="identical", bias=False),
    Case("M1", M=1, K=100, N=30, E=2, R=6),
    Case("M1_S3_w", M=1, K=100, N=30, E=4, R=6, S=3, weights=True),
    Case("M0", M=0, K=16, N=24, E=3, R=4),
    Case("S0", M=5, K=16, N=24, E=3, R=4, S=0),
    Case("E0", M=5, K=16, N=24, E=0, R=4, none_frac=1.0),
    Case("all_none", M=7, K=16, N=24, E=3, R=4, none_frac=1.0),
    Case("rank_gt16", M=11, K=40, N=50, E=3, R=40, ranks=(40, 17, 33), weights=True),
    Case("x_row_strided", M=10, K=64, N=48, E=4, R=8, x_layout="row_strided"),
    Case("x_col_strided_wT", M=10, K=64, N=48, E=4, R=8, x_layout="col_strided", weight_t=True),
    Case("x_transposed_ab_strided", M=10, K=64, N=48, E=4, R=8, x_layout="transposed",
         ab_strided=True),
    # grouped-GEMM path: groups of >= 24 rows (mixed with small groups for zipf)
    Case("prefill_uniform", M=512, K=96, N=160, E=4, R=16, none_frac=0.1),
    Case("prefill_zipf_S2_w", M=600, K=72, N=130, E=9, R=12, S=2, pop="zipf", weights=True,
         ranks=(12, 5, 12, 0, 7, 12, 3, 11, 1)),
    Case("prefill_identical_wT", M=520, K=64, N=96, E=3, R=8, pop="identical", weight_t=True,
         x_layout="row_strided"),
    Case("prefill_distinct_rank_gt16", M=512, K=40, N=70, E=8, R=24, ranks=(24, 20, 17, 24, 9, 24, 3, 16)),
]
for dt in (torch.bfloat16, torch.float16, torch.float64):
    tag = str(dt).split(".")[-1]
    CASES += [
        Case(f"decode_zipf_S2_{tag}", M=12, K=64, N=96, E=5, R=8, S=2, pop="zipf", weights=True,
             none_frac=0.2, dtype=dt, ranks=(8, 3, 8, 5, 1)),
        Case(f"odd_{tag}", M=9, K=41, N=341, E=7, R=5, ranks=(5, 3, 0, 1, 4, 5, 2), dtype=dt,
             weight_t=True),
        Case(f"prefill_zipf_S2_{tag}", M=512, K=64, N=80, E=6, R=16, S=2, pop="zipf", weights=True,
             dtype=dt, x_layout="col_strided"),
    ]


def _idx(c: Case, g: torch.Generator) -> torch.Tensor:
    M, S, E = c.M, c.S, max(c.E, 1)
    if c.pop == "distinct":
        idx = (torch.arange(M * S) % E).reshape(M, S)
    elif c.pop == "identical":
        idx = torch.full((M, S), int(torch.randint(E, (1,), generator=g)))
    elif c.pop == "zipf":
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        idx = torch.multinomial(p, M * S, replacement=True, generator=g).reshape(M, S)
    else:
        idx = torch.randint(E, (M, S), generator=g)
    drop = torch.rand(M, S, generator=g) < c.none_frac
    idx = torch.where(drop, torch.full_like(idx, -1), idx)
    if c.E == 0:
        idx = torch.full((M, S), -1)
    return idx.to(torch.int32)


def _rand(shape, g, dt, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dt)


def make_inputs(c: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    M, K, N, E, R, dt = c.M, c.K, c.N, c.E, c.R, c.dtype
    if c.x_layout == "row_strided":
        x = _rand((M, K + 7), g, dt)[:, :K]
    elif c.x_layout == "col_strided":
        x = _rand((M, 2 * K), g, dt)[:, ::2]
    elif c.x_layout == "transposed":
        x = _rand((K, M), g, dt).t()
    else:
        x = _rand((M, K), g, dt)
    weight = _rand((K, N), g, dt, K ** -0.5).t() if c.weight_t else _rand((N, K), g, dt, K ** -0.5)
    if c.ab_strided:
        A = _rand((E, K, R), g, dt, K ** -0.5).transpose(1, 2)
        B = _rand((E, N, R + 3), g, dt, R ** -0.5)[..., :R]
    else:
        A = _rand((E, R, K), g, dt, K ** -0.5)
        B = _rand((E, N, R), g, dt, R ** -0.5)
    scale = (torch.rand(E, generator=g) + 0.5).to(torch.float32)
    rank = torch.tensor(c.ranks if c.ranks is not None else [R] * E, dtype=torch.int32)
    idx = _idx(c, g)
    w = (torch.rand(M, c.S, generator=g) + 0.25) if c.weights else None
    bias = _rand((N,), g, dt) if c.bias else None
    return x, weight, A, B, scale, rank, idx, w, bias


def poison_padding(A, B, rank):
    """A copy of A / B whose rows / columns past rank[e] are NaN: a kernel that reads them fails."""
    A, B = A.clone(), B.clone()
    for e, r in enumerate(rank.tolist()):
        A[e, r:] = float("nan")
        B[e, :, r:] = float("nan")
    return A, B


def tolerance(out_ref: torch.Tensor, torch_outs, dt: torch.dtype) -> float:
    torch_err = max(((o.double() - out_ref).abs().max().item() if o.numel() else 0.0)
                    for o in torch_outs)
    ulp = torch.finfo(dt).eps * (out_ref.abs().max().item() if out_ref.numel() else 1.0)
    if dt == torch.float64:
        # the oracle is itself fp64 here (no wider dtype), so it and the kernel each carry a few
        # ulps of summation-order error: 8 ulps still tells fp64 (1e-15) from fp32 (1e-7) accuracy
        ulp *= 8
    return 2.0 * torch_err + ulp


def _check(y, y_ref, torch_outs, dt):
    assert y.dtype == dt and y.shape == y_ref.shape
    assert not torch.isnan(y).any()
    if y.numel() == 0:
        return
    err = (y.double() - y_ref).abs().max().item()
    tol = tolerance(y_ref, torch_outs, dt)
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"


# ------------------------------------------------------------------ multi_lora_linear ----------------
@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_linear_matches_reference(c: Case, monkeypatch):
    x, weight, A, B, scale, rank, idx, w, bias = make_inputs(c)
    A_p, B_p = poison_padding(A, B, rank)
    y = _cpp_ops().multi_lora_linear(x, weight, A_p, B_p, scale, rank, idx, w, bias)
    y_ref = reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias, upcast=True)
    torch_outs = [reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias)]
    if c.M and c.E:
        torch_outs.append(reference.multi_lora_linear_loop(x, weight, A, B, scale, rank, idx, w, bias))
    _check(y, y_ref, torch_outs, c.dtype)

    monkeypatch.setenv("LORAMIX_BACKEND", "cpp")
    y_ops = ops.multi_lora_linear(x, weight, A_p, B_p, scale, rank, idx.long(), w, bias)
    assert torch.equal(y_ops, y)


FORCED = [c for c in CASES if c.M >= 9 and c.E > 0 and c.none_frac < 1.0]


@pytest.mark.parametrize("large_group", [1, 10 ** 9], ids=["all_gemm", "all_per_row"])
@pytest.mark.parametrize("c", FORCED, ids=[c.name for c in FORCED])
def test_linear_each_path(c: Case, large_group: int, monkeypatch):
    monkeypatch.setenv("LORAMIX_CPP_LARGE_GROUP", str(large_group))
    x, weight, A, B, scale, rank, idx, w, bias = make_inputs(c, seed=11)
    A_p, B_p = poison_padding(A, B, rank)
    y = _cpp_ops().multi_lora_linear(x, weight, A_p, B_p, scale, rank, idx, w, bias)
    y_ref = reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias, upcast=True)
    torch_outs = [reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias),
                  reference.multi_lora_linear_loop(x, weight, A, B, scale, rank, idx, w, bias)]
    _check(y, y_ref, torch_outs, c.dtype)


def test_linear_rank64_int64_rank_and_fp16_scale():
    c = Case("r64", M=30, K=80, N=90, E=3, R=64, ranks=(64, 50, 0), S=2, weights=True)
    x, weight, A, B, scale, rank, idx, w, bias = make_inputs(c, seed=3)
    y = _cpp_ops().multi_lora_linear(x, weight, A, B, scale.half(), rank.long(), idx, w.double(), bias)
    y_ref = reference.multi_lora_linear(x, weight, A, B, scale.half(), rank, idx, w, bias, upcast=True)
    _check(y, y_ref, [reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias)],
           torch.float32)


def test_linear_leading_dims_through_ops(monkeypatch):
    monkeypatch.setenv("LORAMIX_BACKEND", "cpp")
    c = Case("3d", M=24, K=32, N=40, E=3, R=4)
    x, weight, A, B, scale, rank, idx, w, bias = make_inputs(c, seed=1)
    y = ops.multi_lora_linear(x.reshape(2, 12, 32), weight, A, B, scale, rank, idx, w, bias)
    y_ref = reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias, upcast=True)
    assert y.shape == (2, 12, 40)
    _check(y.reshape(24, 40), y_ref, [reference.multi_lora_linear(x, weight, A, B, scale, rank, idx)],
           torch.float32)


# ------------------------------------------------------------------ multi_lora_expand ----------------
EXPAND_CASES = [
    Case("expand_decode_S2_w", M=9, K=1, N=341, E=5, R=8, S=2, weights=True, none_frac=0.2,
         ranks=(8, 3, 0, 8, 5)),
    Case("expand_prefill_zipf", M=520, K=1, N=96, E=4, R=16, pop="zipf", ranks=(16, 9, 16, 4)),
    Case("expand_bf16", M=40, K=1, N=64, E=3, R=20, S=3, weights=True, dtype=torch.bfloat16),
    Case("expand_M0", M=0, K=1, N=64, E=3, R=4),
]


@pytest.mark.parametrize("c", EXPAND_CASES, ids=[c.name for c in EXPAND_CASES])
def test_expand_matches_reference(c: Case, monkeypatch):
    g = torch.Generator().manual_seed(7)
    _, _, _, B, scale, rank, idx, w, _ = make_inputs(c)
    y = _rand((c.M, c.N), g, c.dtype)
    h = _rand((c.M, c.E, c.R), g, c.dtype)
    _, B_p = poison_padding(B, B, rank)
    out = _cpp_ops().multi_lora_expand(y, h, B_p, scale, rank, idx, w)
    ref = reference.multi_lora_expand(y, h, B, scale, rank, idx, w, upcast=True)
    _check(out, ref, [reference.multi_lora_expand(y, h, B, scale, rank, idx, w)], c.dtype)
    assert out.numel() == 0 or out.data_ptr() != y.data_ptr()
    monkeypatch.setenv("LORAMIX_BACKEND", "cpp")
    assert torch.equal(ops.multi_lora_expand(y, h, B_p, scale, rank, idx, w), out)


# ------------------------------------------------------------------ errors name the argument ---------
def _base():
    return list(make_inputs(Case("err", M=6, K=16, N=24, E=3, R=4, weights=True)))


def _with(i, v):
    a = _base()
    a[i] = v
    return a


ERRORS = {
    "x_3d": (lambda: _with(0, torch.randn(2, 3, 16)), "x"),
    "x_int": (lambda: _with(0, torch.ones(6, 16, dtype=torch.int32)), "x"),
    "weight_K": (lambda: _with(1, torch.randn(24, 15)), "weight"),
    "weight_dtype": (lambda: _with(1, torch.randn(24, 16, dtype=torch.float64)), "weight"),
    "A_K": (lambda: _with(2, torch.randn(3, 4, 15)), "A"),
    "A_dtype": (lambda: _with(2, torch.randn(3, 4, 16).half()), "A"),
    "B_N": (lambda: _with(3, torch.randn(3, 23, 4)), "B"),
    "B_R": (lambda: _with(3, torch.randn(3, 24, 5)), "B"),
    "scale_E": (lambda: _with(4, torch.ones(4)), "scale"),
    "rank_dtype": (lambda: _with(5, torch.ones(3)), "rank"),
    "rank_too_big": (lambda: _with(5, torch.tensor([4, 5, 1], dtype=torch.int32)), "rank"),
    "rank_negative": (lambda: _with(5, torch.tensor([4, -1, 1], dtype=torch.int32)), "rank"),
    "idx_M": (lambda: _with(6, torch.zeros(5, 1, dtype=torch.int32)), "idx"),
    "idx_float": (lambda: _with(6, torch.zeros(6, 1)), "idx"),
    "idx_id_ge_E": (lambda: _with(6, torch.tensor([[0], [1], [3], [2], [0], [1]], dtype=torch.int32)), "idx"),
    "idx_below_minus1": (lambda: _with(6, torch.tensor([[0], [1], [-2], [2], [0], [1]], dtype=torch.int32)), "idx"),
    "w_shape": (lambda: _with(7, torch.ones(6, 2)), "w"),
    "bias_shape": (lambda: _with(8, torch.ones(23)), "bias"),
    "bias_dtype": (lambda: _with(8, torch.ones(24).half()), "bias"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_linear_errors_name_the_argument(name):
    make, arg = ERRORS[name]
    # bad values (ids, ranks) raise ValueError, like the Python-side checks of the other backends
    kind = ValueError if name.startswith(("idx_id", "idx_below", "rank_too", "rank_neg")) else RuntimeError
    with pytest.raises(kind, match=rf"\b{re.escape(arg)}\b"):
        _cpp_ops().multi_lora_linear(*make())


def test_expand_errors_name_the_argument():
    y, h = torch.randn(4, 8), torch.randn(4, 3, 2)
    B, scale, rank = torch.randn(3, 8, 2), torch.ones(3), torch.full((3,), 2, dtype=torch.int32)
    idx = torch.zeros(4, 1, dtype=torch.int32)
    f = _cpp_ops().multi_lora_expand
    with pytest.raises(RuntimeError, match=r"\bh\b"):
        f(y, torch.randn(4, 2, 2), B, scale, rank, idx, None)
    with pytest.raises(RuntimeError, match=r"\bB\b"):
        f(y, h, torch.randn(3, 7, 2), scale, rank, idx, None)
    with pytest.raises(ValueError, match=r"\bidx\b"):
        f(y, h, B, scale, rank, torch.full((4, 1), 3, dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match=r"\bw\b"):
        f(y, h, B, scale, rank, idx, torch.ones(4, 2))


def test_loader_contract(monkeypatch):
    assert _cpp.load() is True and _cpp.load_error() is None
    assert _cpp.csrc_dir().joinpath("multi_lora.cpp").exists()
    monkeypatch.setenv("LORAMIX_NO_CPP", "1")
    assert _cpp.load() is False
    with pytest.raises(RuntimeError, match="LORAMIX_NO_CPP"):
        _cpp.build()


# ------------------------------------------------------------------ 16-bit paths ----------------------
# bf16 / fp16 run on a path picked at run time from the CPU (amx, avx512bf16, avx512, avx2, generic;
# LORAMIX_CPU_ISA forces one) with the base GEMM in fp32 (the fused small-M kernel, or MKL's mixed
# GEMM), so y is rounded once: every element within half an ulp of the fp64 result (plus fp32 noise).
# LORAMIX_CPP_GEMM16=aten (torch's 16-bit GEMM, then the delta: two roundings; fp16's default)
# keeps the 2x rule.
ISAS = ("amx", "avx512bf16", "avx512", "avx2", "generic")
_ISA_RANK = {n: i for i, n in enumerate(reversed(ISAS))}


def _isa_supported(isa: str) -> bool:
    best = _cpp_ops().cpu_isa()[1]
    if isa == "amx":  # only changes which GEMM runs: testable on any AVX512-BF16 CPU with MKL
        return _ISA_RANK[best] >= _ISA_RANK["avx512bf16"] and _cpp_ops().cpu_isa()[2] == "mkl"
    return _ISA_RANK[isa] <= _ISA_RANK[best]


PATHS = {  # name: environment
    "small": {"LORAMIX_CPP_SMALL_M": "64", "LORAMIX_CPP_GEMM16": "mkl"},  # fused small-M kernel (bf16)
    "gemm": {"LORAMIX_CPP_SMALL_M": "0", "LORAMIX_CPP_GEMM16": "mkl"},  # MKL fp32 GEMM + delta
    "large": {"LORAMIX_CPP_SMALL_M": "0", "LORAMIX_CPP_GEMM16": "mkl",
              "LORAMIX_CPP_LARGE_GROUP": "1"},                                  # + grouped shrink
    "aten": {"LORAMIX_CPP_SMALL_M": "0", "LORAMIX_CPP_GEMM16": "aten"},     # two roundings
}

CASES16 = [
    Case("r16_N_tail", M=5, K=100, N=83, E=4, R=16),
    Case("r16_distinct", M=37, K=256, N=160, E=40, R=16, pop="distinct"),
    Case("r8_zipf_none", M=70, K=64, N=70, E=3, R=8, pop="zipf", none_frac=0.25),
    Case("r24_two_chunks", M=90, K=77, N=50, E=3, R=24, ranks=(24, 17, 9), weights=True),
    Case("odd_ranks_S2", M=23, K=41, N=341, E=7, R=5, S=2, weights=True, ranks=(5, 3, 0, 1, 4, 5, 2),
         none_frac=0.2),
    Case("identical_S3", M=80, K=48, N=40, E=2, R=12, S=3, pop="identical", weights=True),
    Case("layouts", M=19, K=64, N=48, E=4, R=16, x_layout="transposed", weight_t=True, ab_strided=True),
    Case("x_col_strided", M=66, K=40, N=33, E=5, R=16, x_layout="col_strided", ab_strided=True),
    Case("M1", M=1, K=2048, N=64, E=3, R=16),
    Case("M0", M=0, K=16, N=24, E=3, R=4),
    Case("no_adapter", M=9, K=32, N=40, E=3, R=4, none_frac=1.0),
]


def _half_ulp_check(y, y_ref, dt):
    """|y - y_ref| <= half an ulp of y_ref (one rounding) + fp32 accumulation noise, everywhere."""
    ref = y_ref.abs().clamp_min(torch.finfo(dt).tiny)
    ulp = torch.pow(2.0, torch.floor(torch.log2(ref))) * torch.finfo(dt).eps
    slack = 2e-6 * (y_ref.abs().max().item() if y_ref.numel() else 0.0)
    bad = (y.double() - y_ref).abs() > 0.5 * ulp + slack
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} elements off by more than half an "
                           f"ulp, e.g. {y[bad][:4].tolist()} vs {y_ref[bad][:4].tolist()}")


# (isa, path, dtype) combinations that run different code: the fused small-M kernel is bf16 on
# AVX512-BF16 only; fp16 has no AVX512-BF16 kernels (it runs the AVX-512 ones there)
COMBOS16 = ([("amx", p, torch.bfloat16) for p in PATHS]
            + [("avx512bf16", p, torch.bfloat16) for p in PATHS]
            + [(i, p, torch.bfloat16) for i in ("avx512", "avx2", "generic") for p in ("gemm", "large", "aten")]
            + [("avx512", p, torch.float16) for p in ("gemm", "large", "aten")]
            + [(i, p, torch.float16) for i in ("avx2", "generic") for p in ("gemm", "large")])


@functools.lru_cache(maxsize=None)
def _case16(c: Case):
    """Inputs (adapter padding poisoned) and the fp64 / torch-at-dtype references, built once."""
    x, weight, A, B, scale, rank, idx, w, bias = make_inputs(c, seed=5)
    A_p, B_p = poison_padding(A, B, rank)
    y_ref = reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias, upcast=True)
    torch_outs = [reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias)]
    if c.M and c.E:
        torch_outs.append(reference.multi_lora_linear_loop(x, weight, A, B, scale, rank, idx, w, bias))
    return (x, weight, A_p, B_p, scale, rank, idx, w, bias), y_ref, torch_outs


@pytest.mark.parametrize("isa,path,dt", COMBOS16,
                         ids=[f"{i}-{p}-{str(d)[6:]}" for i, p, d in COMBOS16])
@pytest.mark.parametrize("c", CASES16, ids=[c.name for c in CASES16])
def test_linear16_each_isa_and_path(c: Case, isa, path, dt, monkeypatch):
    if not _isa_supported(isa):
        pytest.skip(f"this CPU lacks {isa}")
    if path != "aten" and _cpp_ops().cpu_isa()[2] != "mkl" and not (path == "small" and dt == torch.bfloat16):
        pytest.skip("torch without MKL: 16-bit GEMMs with fp32 output come from MKL")
    monkeypatch.setenv("LORAMIX_CPU_ISA", isa)
    for k, v in PATHS[path].items():
        monkeypatch.setenv(k, v)
    args, y_ref, torch_outs = _case16(Case(**{**c.__dict__, "dtype": dt}))
    y = _cpp_ops().multi_lora_linear(*args)
    _check(y, y_ref, torch_outs, dt)  # flash-attention's rule
    if path != "aten":
        _half_ulp_check(y, y_ref, dt)


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [
    Case("aten_S1_none", M=300, K=96, N=1030, E=5, R=16, none_frac=0.4, pop="zipf"),
    Case("aten_S2_w_ranks", M=70, K=40, N=300, E=4, R=12, S=2, weights=True, ranks=(12, 5, 0, 9),
         none_frac=0.3),
], ids=lambda c: c.name)
def test_linear16_aten_rows_without_adapter_are_torch(case, dt, monkeypatch):
    """LORAMIX_CPP_GEMM16=aten: torch's 16-bit GEMM, then the delta in place. Rows with no adapter
    are F.linear's output bit for bit (nothing rewrites them); every row within the 2x rule."""
    monkeypatch.setenv("LORAMIX_CPP_GEMM16", "aten")
    monkeypatch.setenv("LORAMIX_CPP_SMALL_M", "0")
    c = Case(**{**case.__dict__, "dtype": dt})
    x, weight, A, B, scale, rank, idx, w, bias = make_inputs(c, seed=13)
    y = _cpp_ops().multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias)
    plain = ((idx < 0) | (rank.long()[idx.clamp_min(0).long()] == 0)).all(1)
    assert 0 < int(plain.sum()) < c.M
    base = torch.nn.functional.linear(x, weight, bias)
    assert torch.equal(y[plain], base[plain])
    y_ref = reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias, upcast=True)
    outs = [reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias),
            reference.multi_lora_linear_loop(x, weight, A, B, scale, rank, idx, w, bias)]
    _check(y, y_ref, outs, dt)
    assert not torch.equal(y[~plain], base[~plain])  # the delta was added


@pytest.mark.parametrize("M", [7, 300, 2048])
def test_linear16_amx_default_large_products(M, monkeypatch):
    """On AMX the bf16 default past the small-M kernel is MKL's fp32-output GEMM (one rounding),
    and torch's bf16 GEMM + the delta in place for large products (M >= 2048, or M >= 256 with
    N >= 1024): both within the 2x rule of the fp64 reference."""
    if not _isa_supported("amx"):
        pytest.skip("needs AVX512-BF16 and MKL (LORAMIX_CPU_ISA=amx)")
    monkeypatch.setenv("LORAMIX_CPU_ISA", "amx")
    c = Case("amx_default", M=M, K=64, N=1024, E=6, R=16, pop="zipf", none_frac=0.2,
             dtype=torch.bfloat16)
    x, weight, A, B, scale, rank, idx, w, bias = make_inputs(c, seed=M)
    y = _cpp_ops().multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias)
    y_ref = reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias, upcast=True)
    _check(y, y_ref, [reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias)],
           torch.bfloat16)
    if M < 256:
        _half_ulp_check(y, y_ref, torch.bfloat16)  # MKL: one rounding


def test_linear16_paths_agree_with_default(monkeypatch):
    """The default path (what this CPU picks) matches the generic C++ path to one ulp of rounding."""
    c = Case("agree", M=48, K=320, N=96, E=6, R=16, S=2, weights=True, dtype=torch.bfloat16)
    x, weight, A, B, scale, rank, idx, w, bias = make_inputs(c, seed=9)
    y = _cpp_ops().multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias)
    monkeypatch.setenv("LORAMIX_CPU_ISA", "generic")
    y_gen = _cpp_ops().multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias)
    ulp = torch.finfo(torch.bfloat16).eps * y_gen.float().abs().clamp_min(1e-3)
    assert ((y.float() - y_gen.float()).abs() <= ulp * 1.01).all()


def _nonfinite_adapter_run(dt):
    """The op on 12 rows over adapters 0, 1, 2 and none, adapter 1 with a NaN in A and an inf in
    B: checks that the output is finite exactly outside adapter 1's rows and returns (y, mask of
    those clean rows, the clean inputs as the op's arguments)."""
    c = Case("nan", M=12, K=64, N=48, E=3, R=16, dtype=dt)
    x, weight, A, B, scale, rank, idx, w, bias = make_inputs(c, seed=2)
    idx = torch.tensor([[0], [1], [2], [-1]] * 3, dtype=torch.int32)
    An, Bn = A.clone(), B.clone()
    An[1, 3, 5] = float("nan")
    Bn[1, 7, 2] = float("inf")
    y = _cpp_ops().multi_lora_linear(x, weight, An, Bn, scale, rank, idx, None, bias)
    clean = idx[:, 0] != 1
    assert torch.isfinite(y[clean]).all() and not torch.isfinite(y[~clean]).all()
    return y, clean, (x, weight, A, B, scale, rank, idx, None, bias)


@pytest.mark.parametrize("isa", ISAS)
def test_linear16_nonfinite_adapter_stays_in_its_rows(isa, monkeypatch):
    if not _isa_supported(isa):
        pytest.skip(f"this CPU lacks {isa}")
    monkeypatch.setenv("LORAMIX_CPU_ISA", isa)
    for small in ("64", "0"):
        monkeypatch.setenv("LORAMIX_CPP_SMALL_M", small)
        y, clean, args = _nonfinite_adapter_run(torch.bfloat16)
        y_ref = reference.multi_lora_linear(*args, upcast=True)
        _half_ulp_check(y[clean], y_ref[clean], torch.bfloat16)


# fp32 small M (csrc small32: the base GEMM in AVX-512 tiles fused with the delta, chunks of 16 rows):
# odd K (tails of the 16-wide steps) and N (panels of 16, quads of 4), unequal ranks with 0 and > 16,
# two and three slots with weights, strided inputs, row counts to 40 (three chunks);
# LORAMIX_CPP_SMALL_M32=0 is torch's GEMM + the delta in place (the path for larger M and for W
# without unit last stride).
SMALL32 = [
    Case("s32_M1_K1_N1", M=1, K=1, N=1, E=2, R=3),
    Case("s32_M3_K17_N5", M=3, K=17, N=5, E=3, R=5, ranks=(5, 0, 2)),
    Case("s32_M5_K3_N33_S2_w", M=5, K=3, N=33, E=4, R=33, S=2, weights=True, ranks=(33, 16, 1, 17),
         none_frac=0.25),
    Case("s32_M16_K577_N1030_r32", M=16, K=577, N=1030, E=16, R=32, pop="distinct",
         none_frac=0.4),
    Case("s32_M12_K96_N47_strided", M=12, K=96, N=47, E=5, R=12, x_layout="row_strided",
         ab_strided=True, weights=True, bias=False),
    Case("s32_M8_colstrided_zipf_S3", M=8, K=64, N=80, E=6, R=8, S=3, pop="zipf", weights=True,
         x_layout="col_strided", none_frac=0.2),
    Case("s32_M16_all_none", M=16, K=64, N=48, E=3, R=4, none_frac=1.0),
]


@pytest.mark.parametrize("M", [None, 2, 4, 6, 7, 13, 16, 17, 40])
@pytest.mark.parametrize("c", SMALL32, ids=[c.name for c in SMALL32])
def test_linear_fp32_small_path(c: Case, M, monkeypatch):
    """The fused fp32 small-M kernel and torch's GEMM + delta each within the 2x rule of the fp64
    reference, padding past rank poisoned; they differ in summation order (so the kernel ran)."""
    if M is not None:
        c = Case(**{**c.__dict__, "M": M})
    x, weight, A, B, scale, rank, idx, w, bias = make_inputs(c, seed=5)
    A_p, B_p = poison_padding(A, B, rank)
    y_ref = reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias, upcast=True)
    torch_outs = [reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias),
                  reference.multi_lora_linear_loop(x, weight, A, B, scale, rank, idx, w, bias)]
    ys = {}
    for small in ("64", "0"):
        monkeypatch.setenv("LORAMIX_CPP_SMALL_M32", small)
        ys[small] = _cpp_ops().multi_lora_linear(x, weight, A_p, B_p, scale, rank, idx, w, bias)
        _check(ys[small], y_ref, torch_outs, torch.float32)
    if c.K >= 96:
        assert not torch.equal(ys["64"], ys["0"])


def test_linear_fp32_small_path_nonfinite_and_conv1d(monkeypatch):
    """A NaN / inf in one adapter stays in its rows; a transposed (HF Conv1D) weight takes torch's
    GEMM (no unit last stride) and equals the contiguous weight's result within the 2x rule."""
    monkeypatch.setenv("LORAMIX_CPP_SMALL_M32", "64")
    y, clean, args = _nonfinite_adapter_run(torch.float32)
    y_ref = reference.multi_lora_linear(*args, upcast=True)
    outs = [reference.multi_lora_linear(*args)]
    _check(y[clean], y_ref[clean], [o[clean] for o in outs], torch.float32)
    x, weight, *rest = args
    wt = weight.t().contiguous().t()  # same values, stride (1, N)
    y_t = _cpp_ops().multi_lora_linear(x, wt, *rest)
    _check(y_t, y_ref, outs, torch.float32)


@pytest.mark.parametrize("how", ["all_none", "rank0"])
def test_linear_fp32_small_no_pair_is_torch(how, monkeypatch):
    """A call with no (row, adapter) pair keeps torch's GEMM: F.linear bit for bit (so removing a
    module's last adapter changes no other row); LORAMIX_CPP_SMALL32_BASE=1 runs the kernel there
    too (within the 2x rule, another summation order)."""
    c = Case("nopair", M=16, K=577, N=300, E=3, R=8, none_frac=1.0 if how == "all_none" else 0.0,
             ranks=(0, 0, 0) if how == "rank0" else None)
    x, weight, A, B, scale, rank, idx, w, bias = make_inputs(c, seed=9)
    base = torch.nn.functional.linear(x, weight, bias)
    y = _cpp_ops().multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias)
    assert torch.equal(y, base)
    monkeypatch.setenv("LORAMIX_CPP_SMALL32_BASE", "1")
    yk = _cpp_ops().multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias)
    y_ref = reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias, upcast=True)
    _check(yk, y_ref, [base], torch.float32)
    assert not torch.equal(yk, base)


EXPAND16 = [
    Case("e16_S1", M=30, K=1, N=83, E=4, R=16),
    Case("e16_S3_w_ranks", M=21, K=1, N=64, E=5, R=20, S=3, weights=True, ranks=(20, 3, 16, 9, 0),
         none_frac=0.2),
]


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("c", EXPAND16, ids=[c.name for c in EXPAND16])
def test_expand16_one_rounding(c: Case, isa, dt, monkeypatch):
    if not _isa_supported(isa):
        pytest.skip(f"this CPU lacks {isa}")
    monkeypatch.setenv("LORAMIX_CPU_ISA", isa)
    c = Case(**{**c.__dict__, "dtype": dt})
    g = torch.Generator().manual_seed(4)
    _, _, _, B, scale, rank, idx, w, _ = make_inputs(c)
    y = _rand((c.M, c.N), g, dt)
    h = _rand((c.M, c.E, c.R), g, dt)
    _, B_p = poison_padding(B, B, rank)
    out = _cpp_ops().multi_lora_expand(y, h, B_p, scale, rank, idx, w)
    ref = reference.multi_lora_expand(y, h, B, scale, rank, idx, w, upcast=True)
    _check(out, ref, [reference.multi_lora_expand(y, h, B, scale, rank, idx, w)], dt)
    _half_ulp_check(out, ref, dt)


def test_cpu_isa_reports_and_validates(monkeypatch):
    active, detected, gemm = _cpp_ops().cpu_isa()
    assert active == detected and detected in ISAS and gemm in ("mkl", "aten")
    monkeypatch.setenv("LORAMIX_CPU_ISA", "generic")
    assert _cpp_ops().cpu_isa()[0] == "generic"
    monkeypatch.setenv("LORAMIX_CPP_GEMM16", "aten")
    assert _cpp_ops().cpu_isa()[2] == "aten"
    monkeypatch.setenv("LORAMIX_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="LORAMIX_CPU_ISA"):
        _cpp_ops().cpu_isa()
    for isa in ISAS:  # forcing a path the CPU cannot run is an error (amx needs AVX512-BF16)
        monkeypatch.setenv("LORAMIX_CPU_ISA", isa)
        need = "avx512bf16" if isa == "amx" else isa
        if _ISA_RANK[need] <= _ISA_RANK[detected]:
            assert _cpp_ops().cpu_isa()[0] == isa
        else:
            with pytest.raises(ValueError, match="supports at most"):
                _cpp_ops().cpu_isa()
    monkeypatch.setenv("LORAMIX_CPU_ISA", "generic")
    monkeypatch.setenv("LORAMIX_CPP_GEMM16", "cublas")
    with pytest.raises(ValueError, match="LORAMIX_CPP_GEMM16"):
        _cpp_ops().cpu_isa()


# ------------------------------------------------------------------ multi_lora_add_ (in place) -------
# y += the delta of multi_lora_linear, written into the caller's y: checked against y + the fp64
# reference delta (NaN-poisoned ranks past rank[e]), on every layout of y the vLLM plugin hands it
# (contiguous, a column slice of a wider output, transposed), every path (LORAMIX_CPP_LARGE_GROUP),
# rows with no adapter bit-identical, nothing outside y's view written.
def _delta_ref(x, A, B, scale, rank, idx, w, *, upcast):
    zero_w = torch.zeros(B.shape[1], x.shape[1], dtype=x.dtype)
    return reference.multi_lora_linear(x, zero_w, A, B, scale, rank, idx, w, None, upcast=upcast)


def _y_in(c: Case, g, layout: str):
    """(y, its backing storage tensor): a fresh random [M, N] y laid out as asked."""
    if layout == "column_slice":  # columns [3, 3 + N) of a wider output (vLLM's per-slice view)
        full = _rand((c.M, c.N + 10), g, c.dtype)
        return full[:, 3:3 + c.N], full
    if layout == "transposed":
        full = _rand((c.N, c.M), g, c.dtype)
        return full.t(), full
    y = _rand((c.M, c.N), g, c.dtype)
    return y, y


def _check_add(c: Case, y, y0, full, full0, x, A, B, scale, rank, idx, w):
    ref = y0.double() + _delta_ref(x, A, B, scale, rank, idx, w, upcast=True)
    torch_out = (y0.to(torch.float32) + _delta_ref(x, A, B, scale, rank, idx, w, upcast=False)
                 .to(torch.float32)).to(c.dtype)
    _check(y, ref, [torch_out], c.dtype)
    none = (idx < 0).all(dim=1) if idx.shape[1] else torch.ones(c.M, dtype=torch.bool)
    assert torch.equal(y[none], y0[none])  # rows without an adapter are never written
    if full.shape == (c.M, c.N + 10):  # a column slice: the columns around it untouched
        assert torch.equal(full[:, :3], full0[:, :3])
        assert torch.equal(full[:, 3 + c.N:], full0[:, 3 + c.N:])


ADD_LAYOUTS = ("contiguous", "column_slice", "transposed")


@pytest.mark.parametrize("layout", ADD_LAYOUTS)
@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_add_matches_reference(c: Case, layout: str, monkeypatch):
    x, _, A, B, scale, rank, idx, w, _ = make_inputs(c, seed=5)
    g = torch.Generator().manual_seed(17)
    y, full = _y_in(c, g, layout)
    full0, y0 = full.clone(), y.clone()
    A_p, B_p = poison_padding(A, B, rank)
    ptr, strides = y.data_ptr(), y.stride()
    assert _cpp_ops().multi_lora_add_(y, x, A_p, B_p, scale, rank, idx, w) is None
    assert y.data_ptr() == ptr and y.stride() == strides
    _check_add(c, y, y0, full, full0, x, A, B, scale, rank, idx, w)
    # through ops (C++ forced): the same values, y returned; and the reference backend agrees
    monkeypatch.setenv("LORAMIX_BACKEND", "cpp")
    y2 = y0.clone()
    assert ops.multi_lora_add_(y2, x, A_p, B_p, scale, rank, idx.long(), w) is y2
    assert torch.equal(y2, y)
    monkeypatch.setenv("LORAMIX_BACKEND", "reference")
    y3 = y0.clone()
    ops.multi_lora_add_(y3, x, A, B, scale, rank, idx, w)
    _check(y3, y0.double() + _delta_ref(x, A, B, scale, rank, idx, w, upcast=True),
           [y, y0.double() + _delta_ref(x, A, B, scale, rank, idx, w, upcast=False)], c.dtype)


@pytest.mark.parametrize("large_group", [1, 10 ** 9], ids=["all_gemm", "all_per_row"])
@pytest.mark.parametrize("c", FORCED, ids=[c.name for c in FORCED])
def test_add_each_path(c: Case, large_group: int, monkeypatch):
    monkeypatch.setenv("LORAMIX_CPP_LARGE_GROUP", str(large_group))
    x, _, A, B, scale, rank, idx, w, _ = make_inputs(c, seed=13)
    y, full = _y_in(c, torch.Generator().manual_seed(3), "column_slice")
    full0, y0 = full.clone(), y.clone()
    A_p, B_p = poison_padding(A, B, rank)
    _cpp_ops().multi_lora_add_(y, x, A_p, B_p, scale, rank, idx, w)
    _check_add(c, y, y0, full, full0, x, A, B, scale, rank, idx, w)


def test_add_equals_linear_delta():
    """y = x W^T (computed by the caller) + multi_lora_add_ gives multi_lora_linear's y (fp32)."""
    c = Case("eq", M=16, K=576, N=960, E=4, R=24, none_frac=0.25)
    x, weight, A, B, scale, rank, idx, w, bias = make_inputs(c, seed=2)
    y = torch.addmm(bias, x, weight.t())
    _cpp_ops().multi_lora_add_(y, x, A, B, scale, rank, idx, w)
    y_lin = _cpp_ops().multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias)
    ref = reference.multi_lora_linear(x, weight, A, B, scale, rank, idx, w, bias, upcast=True)
    _check(y, ref, [y_lin], torch.float32)


def test_add_under_torch_compile():
    """One opaque node that mutates y: aot_eager (functionalised) gives the eager result."""
    c = Case("tc", M=7, K=32, N=24, E=3, R=4, none_frac=0.3)
    x, _, A, B, scale, rank, idx, w, _ = make_inputs(c, seed=9)
    y0 = _rand((c.M, c.N), torch.Generator().manual_seed(1), torch.float32)

    def f(y, x):
        ops.multi_lora_add_(y[:, 2:], x, A[:, :, :], B[:, 2:], scale, rank, idx.long(), None)
        return y * 1.0

    ye = f(y0.clone(), x)
    yc_in = y0.clone()
    yc = torch.compile(f, backend="aot_eager", fullgraph=True)(yc_in, x)
    assert torch.equal(yc, ye) and torch.equal(yc_in, ye)
    assert not torch.equal(ye[:, 2:], y0[:, 2:]) and torch.equal(ye[:, :2], y0[:, :2])


def test_add_errors_name_the_argument(monkeypatch):
    c = Case("err", M=6, K=16, N=24, E=3, R=4)
    x, _, A, B, scale, rank, idx, w, _ = make_inputs(c)
    y = torch.randn(6, 24)
    f = _cpp_ops().multi_lora_add_
    bad = {
        "y": (torch.randn(6, 24, 1), x, A, B, scale, rank, idx),
        "x": (y, torch.randn(5, 16), A, B, scale, rank, idx),
        "A": (y, x, torch.randn(3, 4, 15), B, scale, rank, idx),
        "B": (y, x, A, torch.randn(3, 23, 4), scale, rank, idx),
        "scale": (y, x, A, B, torch.ones(2), rank, idx),
        "rank": (y, x, A, B, scale, torch.ones(3), idx),
    }
    for arg, args in bad.items():
        with pytest.raises(RuntimeError, match=rf"\b{arg}\b"):
            f(*args, None)
    with pytest.raises(RuntimeError, match=r"\bx\b"):
        f(y, x.double(), A, B, scale, rank, idx, None)
    with pytest.raises(ValueError, match=r"\bidx\b"):
        f(y, x, A, B, scale, rank, torch.full((6, 1), 3, dtype=torch.int32), None)
    monkeypatch.setenv("LORAMIX_BACKEND", "reference")
    with pytest.raises(ValueError, match=r"\bidx\b"):  # every backend checks ids on CPU
        ops.multi_lora_add_(y, x, A, B, scale, rank, torch.full((6, 1), -2), None)
    with pytest.raises(RuntimeError, match="inference only"):
        ops.multi_lora_add_(y, x.requires_grad_(), A, B, scale, rank, idx, None)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_add_custom_op_opcheck(backend, monkeypatch):
    """torch.library.opcheck on loramix::multi_lora_add_ (schema incl. the mutation of y, fake
    implementation, functionalisation) on fresh random inputs, with -1 rows."""
    monkeypatch.setenv("LORAMIX_BACKEND", backend)
    c = Case("oc", M=9, K=24, N=20, E=3, R=4, none_frac=0.3, ranks=(4, 2, 3))
    x, _, A, B, scale, rank, idx, w, _ = make_inputs(c, seed=21)
    y = _rand((c.M, c.N), torch.Generator().manual_seed(4), torch.float32)
    torch.library.opcheck(torch.ops.loramix.multi_lora_add_.default,
                          (y, x, A, B, scale, rank, idx.long(), None),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
