"""spectr_topk: the public op (validation, dispatch, custom op) and the C++ backend, against the
fp64 reference. The Triton backend reuses CASES and check_against_reference under TRITON_INTERPRET=1
(tests/test_triton_spectr.py).

Indices are compared only where the fp64 reference's neighbouring scores are further apart than
rounding (ties never flake); an exact-tie test checks the lowest-index rule on duplicated experts.
"""
from __future__ import annotations

import math
import os
import tempfile
import zlib
from dataclasses import dataclass

import pytest
import torch

from loramix_fast import reference
from loramix_fast.ops import spectr as spectr_ops


# --- cases ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    M: int
    T: int
    R: int
    k: int
    score: str = "norm"
    weighting: str = "uniform"
    temperature: float = 1.0
    rank: str = "mixed"      # "none" (all R) | "mixed" (unequal, some 0) | "zeros" (all 0)
    dtype: str = "float32"   # "float32" | "bfloat16" | "float16"
    layout: str = "contig"   # "contig" | "slice" (row stride > T*R) | "strided" (R stride != 1)
    scale: bool = True       # score_scale given (score="first" only)

    @property
    def id(self) -> str:
        return (f"M{self.M}-T{self.T}-R{self.R}-k{self.k}-{self.score}-{self.weighting}"
                f"{self.temperature:g}-{self.rank}-{self.dtype}-{self.layout}"
                + ("" if self.scale or self.score != "first" else "-noscale"))


def _cases() -> list[Case]:
    out = []
    Ms = (0, 1, 7, 37)
    dtypes = ("float32", "bfloat16")
    layouts = ("contig", "slice", "strided")
    ranks = ("mixed", "none", "mixed")
    temps = (1.0, 0.3, 2.5)
    i = 0
    for T, R in ((1, 1), (8, 8), (32, 16), (33, 5)):
        for k in sorted({1, 4, T, T + 3}):
            for score in ("norm", "first"):
                for weighting in ("uniform", "softmax"):
                    out.append(Case(M=Ms[i % 4], T=T, R=R, k=k, score=score, weighting=weighting,
                                    temperature=temps[i % 3], rank=ranks[i % 3],
                                    dtype=dtypes[(i // 2) % 2], layout=layouts[i % 3],
                                    scale=(i // 3) % 2 == 0))
                    i += 1
    out.append(Case(M=5, T=8, R=4, k=3, rank="zeros"))
    out.append(Case(M=5, T=8, R=4, k=3, rank="zeros", score="first", weighting="softmax"))
    out.append(Case(M=9, T=16, R=8, k=4, dtype="float16", weighting="softmax", layout="slice"))
    return out


CASES = _cases()


def make_inputs(c: Case, seed: int = 0, device: str = "cpu"):
    """Random (never zero) h in the case's layout, rank [T] int32 or None, score_scale or None."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, c.dtype)
    M, T, R = c.M, c.T, c.R
    # per-expert magnitudes spread the scores so most rows have clear gaps
    mag = torch.rand(T, generator=g) * 2 + 0.25
    base = torch.randn(M, T, R, generator=g) * mag[None, :, None]
    if c.layout == "contig":
        h = base.to(dtype)
    elif c.layout == "slice":  # the typical case: a column slice of a wider GEMM output
        N = 11
        Y = torch.randn(M, N + T * R + 3, generator=g).to(dtype)
        Y[:, N:N + T * R] = base.reshape(M, T * R).to(dtype)
        h = Y[:, N:N + T * R].view(M, T, R)
    else:  # [M, R, T] storage read transposed: stride over R is T
        h = base.transpose(1, 2).contiguous().to(dtype).transpose(1, 2)
    rank = None
    if c.rank == "mixed":
        rank = torch.randint(0, R + 1, (T,), generator=g, dtype=torch.int32)
        if T > 1:
            rank[torch.randperm(T, generator=g)[: max(1, T // 4)]] = 0
            rank[0] = max(1, R - 1)  # at least one valid expert
    elif c.rank == "zeros":
        rank = torch.zeros(T, dtype=torch.int32)
    scale = None
    if c.score == "first" and c.scale:
        scale = torch.rand(T, generator=g) + 0.5
    to = (lambda t: None if t is None else t.to(device))
    return to(h), to(rank), to(scale)


# --- the checker (shared with the Triton tests) -------------------------------------------------

def check_against_reference(h, k, rank, score, score_scale, weighting, temperature, out):
    """Assert ``out = (idx, w, scores)`` matches reference.spectr_topk(..., upcast=True)."""
    idx, w, s = out
    M, T, _ = h.shape
    assert idx.shape == (M, k) and idx.dtype == torch.int32, (idx.shape, idx.dtype)
    assert w.shape == (M, k) and w.dtype == torch.float32, (w.shape, w.dtype)
    assert s.shape == (M, T) and s.dtype == torch.float32, (s.shape, s.dtype)
    idx, w, s = idx.cpu().long(), w.cpu().double(), s.cpu().double()
    kw = dict(rank=rank, score=score, score_scale=score_scale, weighting=weighting,
              temperature=temperature)
    r_idx, r_w, r_s = reference.spectr_topk(h, k, upcast=True, **kw)
    _, _, t_s = reference.spectr_topk(h, k, upcast=False, **kw)  # plain torch at fp32
    r_idx, r_w, r_s = r_idx.cpu().long(), r_w.cpu(), r_s.cpu()
    if M == 0:
        return
    # scores: at most twice plain torch's error, plus a floor
    err_torch = (t_s.cpu().double() - r_s).abs().max().item()
    err = (s - r_s).abs().max().item()
    scale = r_s.abs().max().item()
    assert err <= 2 * err_torch + 1e-6 * (1 + scale), f"scores: err {err} vs torch {err_torch}"

    # which slots are empty (-1) depends only on the ranks: exact
    assert torch.equal(idx < 0, r_idx < 0), f"-1 slots differ:\n{idx}\n{r_idx}"
    assert (w[idx < 0] == 0).all(), "empty slots must have weight 0"

    # indices: a slot is decided when its reference score is apart from both neighbours
    valid_t = (rank.cpu() > 0) if rank is not None else torch.ones(T, dtype=torch.bool)
    sm = torch.where(valid_t[None, :], r_s, torch.full_like(r_s, -math.inf))
    v = torch.sort(sm, dim=1, descending=True).values  # [M, T]
    eps = 1e-5 * (1 + scale)
    kk = min(k, T)
    pad = torch.full((M, 1), -math.inf, dtype=v.dtype)
    vp = torch.cat([torch.full((M, 1), math.inf, dtype=v.dtype), v, pad], 1)  # [M, T+2]
    gap_prev = (vp[:, 1:kk + 1] - vp[:, 0:kk]).abs()
    gap_next = (vp[:, 1:kk + 1] - vp[:, 2:kk + 2]).abs()
    decided = (gap_prev > eps) & (gap_next > eps)  # [M, kk]
    filled = r_idx[:, :kk] >= 0
    cmp = decided & filled
    assert torch.equal(idx[:, :kk][cmp], r_idx[:, :kk][cmp]), (
        f"indices differ at decided slots:\nours {idx}\nref  {r_idx}")
    # the selected set, where the k-th / (k+1)-th gap is clear
    set_ok = (v[:, kk - 1] - vp[:, kk + 1]).abs() > eps
    for m in torch.nonzero(set_ok).flatten().tolist():
        assert sorted(idx[m].tolist()) == sorted(r_idx[m].tolist()), (m, idx[m], r_idx[m])
    # selected scores are in descending order (whatever the tie-breaking)
    sel = torch.where(idx >= 0, torch.gather(r_s, 1, idx.clamp(min=0)), torch.full_like(w, -math.inf))
    assert (sel[:, :-1] + eps >= sel[:, 1:]).all(), "slots not in descending score order"

    # weights: exact structure everywhere, values where the row's selection is decided
    cnt = (idx >= 0).sum(1)
    tot = w.sum(1)
    # softmax sums to 1 over the valid slots; uniform gives 1/k to each valid slot
    want = torch.ones_like(tot) if weighting == "softmax" else cnt.to(tot.dtype) / k
    assert torch.allclose(tot[cnt > 0], want[cnt > 0], atol=1e-5)
    assert (tot[cnt == 0] == 0).all()
    row_ok = (cmp | ~filled).all(1) & (set_ok | ~filled.all(1))
    assert torch.allclose(w[row_ok], r_w[row_ok], atol=2e-6, rtol=1e-5), (
        f"weights:\n{w[row_ok]}\n{r_w[row_ok]}")


# --- the C++ backend ------------------------------------------------------------------------------

_standalone = {}


def cpp_op():
    """torch.ops.loramix_cpp.spectr_topk: from the package extension when it builds, else this
    file's source alone (so these tests run before/without the other C++ ops)."""
    from loramix_fast import _cpp

    if _cpp.load() and hasattr(torch.ops.loramix_cpp, "spectr_topk"):
        return torch.ops.loramix_cpp.spectr_topk
    if "op" not in _standalone:
        from torch.utils.cpp_extension import load

        src = os.path.join(os.path.dirname(__file__), "..", "csrc", "spectr.cpp")
        d = os.path.join(tempfile.gettempdir(), f"loramix_spectr_standalone_{os.getuid()}")
        os.makedirs(d, exist_ok=True)
        try:
            load(name="loramix_spectr_standalone", sources=[src], build_directory=d,
                 extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                 is_python_module=False)
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"cannot build csrc/spectr.cpp: {e}")
        _standalone["op"] = torch.ops.loramix_cpp.spectr_topk
    return _standalone["op"]


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_cpp_matches_reference(c: Case):
    op = cpp_op()
    h, rank, scale = make_inputs(c, seed=zlib.crc32(c.id.encode()) % 1000)
    out = op(h, c.k, rank, c.score, scale, c.weighting, c.temperature)
    check_against_reference(h, c.k, rank, c.score, scale, c.weighting, c.temperature, out)


@pytest.mark.parametrize("score", ["norm", "first"])
def test_cpp_exact_ties_lowest_index(score):
    op = cpp_op()
    g = torch.Generator().manual_seed(3)
    M, T, R = 6, 12, 8
    h = torch.randn(M, T, R, generator=g) * 0.1
    h[:, 2] = torch.randn(M, R, generator=g) * 3  # the top expert, duplicated four times
    for t in (5, 7, 11):
        h[:, t] = h[:, 2]
    h[:, 9] = h[:, 2] * 0.5  # a clear second tier, duplicated once
    h[:, 4] = h[:, 9]
    for dtype in (torch.float32, torch.bfloat16):
        idx, w, _ = op(h.to(dtype), 6, None, score, None, "softmax", 1.0)
        assert idx.tolist() == [[2, 5, 7, 11, 4, 9]] * M
        assert torch.allclose(w[:, :4], w[:, :1].expand(M, 4)) and (w[:, 4:] < w[:, :1]).all()
        idx, w, _ = op(h.to(dtype), 3, None, score, None, "uniform", 1.0)
        assert idx.tolist() == [[2, 5, 7]] * M


def test_cpp_int64_rank_and_rank_above_R():
    op = cpp_op()
    h = torch.randn(4, 5, 3) + 0.1
    rank = torch.tensor([3, 0, 7, 1, 2], dtype=torch.int64)  # 7 > R reads all R, as the reference
    out = op(h, 2, rank, "norm", None, "uniform", 1.0)
    check_against_reference(h, 2, rank, "norm", None, "uniform", 1.0, out)


# --- the public op ------------------------------------------------------------------------------

def _public_cases():
    return [c for c in CASES if c.M in (1, 7)][:12]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("c", _public_cases(), ids=[c.id for c in _public_cases()])
def test_public_op(c: Case, backend, monkeypatch):
    if backend == "cpp":
        cpp_op()  # builds / loads (standalone if the package extension lacks it)
        monkeypatch.setattr(spectr_ops, "pick_backend", lambda t, op=None: "cpp")
    else:
        monkeypatch.setenv("LORAMIX_BACKEND", "reference")
    h, rank, scale = make_inputs(c, seed=7)
    out = spectr_ops.spectr_topk(h, c.k, rank=rank, score=c.score, score_scale=scale,
                                 weighting=c.weighting, temperature=c.temperature)
    check_against_reference(h, c.k, rank, c.score, scale, c.weighting, c.temperature, out)


@pytest.mark.parametrize("bad, msg", [
    (dict(k=0), "k must be >= 1"),
    (dict(k=2.0), "k must be an int"),
    (dict(score="l2"), "score must be one of"),
    (dict(weighting="top"), "weighting must be one of"),
    (dict(weighting="softmax", temperature=0.0), "temperature must be > 0"),
    (dict(rank=torch.ones(5, dtype=torch.int32)), "rank has shape"),
    (dict(rank=torch.ones(8)), "rank must have dtype"),
    (dict(score="first", score_scale=torch.ones(3)), "score_scale has shape"),
    (dict(h=torch.randn(4, 8)), "h must be 3-D"),
    (dict(h=torch.randn(4, 8, 0), score="first"), "R = 0"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_validation_names_the_argument(bad, msg):
    kw = dict(h=torch.randn(4, 8, 3), k=2)
    kw.update(bad)
    h, k = kw.pop("h"), kw.pop("k")
    with pytest.raises((ValueError, TypeError), match=msg):
        spectr_ops.spectr_topk(h, k, **kw)


def test_custom_op_fake_and_compile(monkeypatch):
    monkeypatch.setenv("LORAMIX_BACKEND", "reference")
    h = torch.randn(6, 8, 4)[:, :, :]
    rank = torch.tensor([4, 0, 2, 4, 1, 3, 4, 4], dtype=torch.int32)
    args = (h, 3, rank, "norm", None, "softmax", 0.5)
    torch.library.opcheck(spectr_ops._spectr_topk_op, args)

    def f(x):
        idx, w, s = spectr_ops.spectr_topk(x, 3, rank=rank, weighting="softmax", temperature=0.5)
        return idx, w * 2, s

    got = torch.compile(f, backend="eager", fullgraph=True)(h)
    want = f(h)
    assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1])


def test_all_zero_ranks_and_empty_rows():
    h = torch.randn(0, 8, 4)
    idx, w, s = spectr_ops.spectr_topk(h, 3)
    assert idx.shape == (0, 3) and w.shape == (0, 3) and s.shape == (0, 8)
    h = torch.randn(3, 8, 4)
    idx, w, _ = spectr_ops.spectr_topk(h, 3, rank=torch.zeros(8, dtype=torch.int32),
                                       weighting="softmax")
    assert (idx == -1).all() and (w == 0).all()


def nonfinite_inputs():
    """NaN / inf in h and +-inf in score_scale: non-finite scores give -1 slots, exactly as the
    reference's stable sort (NaN first) + isfinite does."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 6, 4, generator=g) + 0.1
    h[0, 2, 0] = float("nan")
    h[1, 4, 1] = float("inf")
    sc = torch.tensor([1.0, float("-inf"), 1.0, 2.0, 1.0, float("inf")])
    return h, sc


def check_nonfinite(fn):
    h, sc = nonfinite_inputs()
    for score, s in (("norm", None), ("first", sc)):
        for wt in ("uniform", "softmax"):
            a = fn(h, 3, None, score, s, wt, 1.0)
            b = reference.spectr_topk(h, 3, score=score, score_scale=s, weighting=wt)
            assert torch.equal(a[0], b[0]), (score, wt, a[0], b[0])
            assert torch.allclose(a[1], b[1]), (score, wt, a[1], b[1])
            assert torch.allclose(a[2], b[2], equal_nan=True)


def test_cpp_nonfinite_scores():
    check_nonfinite(cpp_op())
