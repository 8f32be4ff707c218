"""``lmf.ops.mix_logits`` (+ greedy / sample) on CPU: the C++ backend and the reference dispatch,
against ``reference.mix_logits(..., upcast=True)`` (fp64), and the ensemble weight helpers.

Tolerance (flash-attention style): the error against fp64 may be at most twice the error of the
plain-torch reference at fp32, plus a floor of a few ulps of the scores' scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from loramix_fast import reference
from loramix_fast.ensemble_weights import elrea_weights, topk_renormalize
from loramix_fast.ops import _dispatch
from loramix_fast.ops.mix_logits import (mix_logits, mix_logits_greedy, mix_logits_sample,
                                         sample_from_scores)

NEG = float("-inf")
BACKENDS = ["cpp", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "cpp" and not _dispatch.cpp_available():
        pytest.skip(f"C++ extension unavailable: {_dispatch._cpp_error()}")
    monkeypatch.setenv("LORAMIX_BACKEND", request.param)
    return request.param


def _check_scores(got, z, w, mode):
    ref = reference.mix_logits(z, w, mode, upcast=True)
    r32 = reference.mix_logits(z, w, mode)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert not torch.isnan(got).any(), "NaN from finite input"
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin), "finite/infinite pattern differs from the reference"
    assert torch.equal(got[~fin], ref[~fin].float()), "infinities of the wrong sign"
    if fin.any():
        err = (got.double() - ref)[fin].abs().max().item()
        err_torch = (r32.double() - ref)[fin].abs().max().item()
        scale = ref[fin].abs().max().item()
        floor = 8 * torch.finfo(torch.float32).eps * (1.0 + scale)
        assert err <= 2 * err_torch + floor, f"err {err:.3g} vs torch {err_torch:.3g} (floor {floor:.3g})"
    return ref


def _rand(B, E, V, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, E, V, generator=g) * scale).to(dtype)
    w = torch.rand(B, E, generator=g) + 0.05
    return z, w


# --- scores against fp64 -----------------------------------------------------------------------------

SHAPES = [(V, E) for E in range(1, 9) for V in (32000, 32001)] + [(128256, E) for E in (1, 4, 8)]


@pytest.mark.parametrize("mode", ["probs", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("V,E", SHAPES, ids=[f"V{V}-E{E}" for V, E in SHAPES])
def test_scores_vs_fp64(V, E, dtype, mode, monkeypatch):
    if not _dispatch.cpp_available():
        pytest.skip(f"C++ extension unavailable: {_dispatch._cpp_error()}")
    monkeypatch.setenv("LORAMIX_BACKEND", "cpp")
    B = 3 if E % 2 else 5  # 3 rows: split across threads; 5: whole rows per thread
    z, w = _rand(B, E, V, dtype, seed=V + 10 * E)
    if E > 1:
        w[0, E - 1] = 0.0  # an expert masked out for one sequence
    _check_scores(mix_logits(z, w, mode), z, w, mode)


@pytest.mark.parametrize("mode", ["probs", "logits"])
def test_reference_backend(backend, mode):
    z, w = _rand(4, 3, 1031, torch.float32, seed=1)
    _check_scores(mix_logits(z, w, mode), z, w, mode)


@dataclass
class Special:
    name: str
    mode: str
    dtype: torch.dtype = torch.float32


SPECIALS = [Special(f"{m}-{d}", m, dt) for m in ("probs", "logits")
            for d, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))]


@pytest.mark.parametrize("case", SPECIALS, ids=lambda c: c.name)
@pytest.mark.parametrize("V", [1000, 32001])
def test_special_values(backend, case, V):
    B, E = 7, 4
    z, w = _rand(B, E, V, case.dtype, seed=7)
    big = 6e4 if case.dtype == torch.float16 else 1e4
    z[0, 1, : V // 2] = NEG                  # -inf logits in half of one expert
    z[1, 2] = NEG                            # an expert that is -inf everywhere
    z[2, 0, 5:9] = big                       # huge logits: overflow without a max
    z[2, 3, 100] = -big
    z[5, 0, V - 3] = 300.0                   # a late block far above the running max
    w[3] = 0.0                               # a row with all weights zero
    w[4, 1] = 0.0                            # a masked expert whose logits are garbage
    z[4, 1] = float("nan")
    z[5, :, 17] = NEG                        # a token that is -inf in every expert
    w[6, 2] = -0.5 if case.mode == "probs" else 0.0  # a negative weight counts as 0 in "probs"
    if case.mode == "logits":
        z[0, 1, : V // 2] = -50.0            # w * (-inf) sums to -inf; keep "logits" finite here
        z[1, 2] = -30.0
    ref = _check_scores(mix_logits(z, w, case.mode), z, w, case.mode)
    tok = mix_logits_greedy(z, w, case.mode)
    assert tok.dtype == torch.int64 and tok.shape == (B,)
    assert 0 <= tok.min() and tok.max() < V
    if case.mode == "probs":
        assert torch.isneginf(ref[3]).all()
        assert tok[3].item() == 0  # argmax of an all -inf row, like torch.argmax


def test_layouts_and_out(backend):
    B, E, V = 3, 4, 517
    z, w = _rand(B, E, V, torch.float32, seed=3)
    ref = mix_logits(z, w, "probs")
    torch.testing.assert_close(mix_logits(z.reshape(B * E, V), w, "probs"), ref)
    wide = torch.randn(B, E, 2 * V)
    wide[..., ::2] = z
    torch.testing.assert_close(mix_logits(wide[..., ::2], w, "probs"), ref)  # token stride 2
    zt = z.transpose(0, 1).contiguous().transpose(0, 1)  # expert-major storage
    torch.testing.assert_close(mix_logits(zt, w, "probs"), ref)
    out = torch.empty(B, V)
    assert mix_logits(z, w, "probs", out=out) is out
    torch.testing.assert_close(out, ref)
    assert mix_logits(z[:0], w[:0], "probs").shape == (0, V)


def test_validation():
    z, w = _rand(2, 3, 50, torch.float32, seed=0)
    with pytest.raises(ValueError, match="mode"):
        mix_logits(z, w, "mean")
    with pytest.raises(ValueError, match="logits"):
        mix_logits(z[:, :2], w, "probs")
    with pytest.raises(ValueError, match="logits"):
        mix_logits(z.reshape(-1, 50)[:5], w, "probs")
    with pytest.raises(ValueError, match="weights"):
        mix_logits(z, w[0], "probs")
    with pytest.raises(TypeError, match="logits"):
        mix_logits(z.to(torch.int32), w, "probs")
    with pytest.raises(ValueError, match="out"):
        mix_logits(z, w, "probs", out=torch.empty(2, 49))
    with pytest.raises(ValueError, match="temperature"):
        mix_logits_sample(z, w, "probs", temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        mix_logits_sample(z, w, "probs", top_p=0.0)
    with pytest.raises(ValueError, match="uniforms"):
        mix_logits_sample(z, w, "probs", uniforms=torch.rand(3))


# --- greedy and sampling -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["probs", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("V", [32000, 32001, 128256])
def test_greedy(backend, mode, dtype, V):
    if backend == "reference" and V != 32001:
        pytest.skip("the reference path is argmax of the reference")
    B, E = 6, 4
    z, w = _rand(B, E, V, dtype, seed=V)
    w[1, 0] = 0.0
    ref = reference.mix_logits(z, w, mode, upcast=True)
    tok = mix_logits_greedy(z, w, mode)
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * (1 + top2[:, 0].abs())
    assert clear.sum() >= B // 2
    assert torch.equal(tok[clear], ref.argmax(1)[clear])


def test_greedy_ties_lowest_id(backend):
    z = torch.zeros(3, 2, 3000)
    z[:, :, [7, 1500, 2999]] = 5.0
    w = torch.ones(3, 2)
    for mode in ("probs", "logits"):
        assert mix_logits_greedy(z, w, mode).tolist() == [7, 7, 7]


def _cdf_ok(tok, ref_scores, u, temperature, rtol=1e-5):
    """The token's fp64 CDF interval contains u * total (up to fp32 rounding of the kernel)."""
    p = torch.softmax(ref_scores / temperature, dim=1)
    cdf = p.cumsum(1)
    rows = torch.arange(len(tok))
    hi = cdf[rows, tok]
    lo = hi - p[rows, tok]
    target = u.double() * cdf[:, -1]
    return (lo - rtol <= target) & (target < hi + rtol) & (p[rows, tok] > 0)


@pytest.mark.parametrize("mode", ["probs", "logits"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("B", [2, 8])  # 2: rows split across threads; 8: whole rows per thread
def test_sample_matches_inverse_cdf(backend, mode, temperature, B):
    E, V = 3, 32001
    z, w = _rand(B, E, V, torch.float32, seed=11, scale=4.0)
    u = torch.rand(B, generator=torch.Generator().manual_seed(5))
    tok = mix_logits_sample(z, w, mode, temperature=temperature, uniforms=u)
    ref = reference.mix_logits(z, w, mode, upcast=True)
    assert _cdf_ok(tok, ref, u, temperature).all()
    want = sample_from_scores(ref, u, temperature)
    assert (tok == want).float().mean() >= 0.75  # equal except at a rounding boundary


def test_sample_reproducible_and_limits(backend):
    B, E, V = 6, 4, 32001
    z, w = _rand(B, E, V, torch.float32, seed=2)
    a = mix_logits_sample(z, w, "probs", generator=torch.Generator().manual_seed(123))
    b = mix_logits_sample(z, w, "probs", generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    greedy = mix_logits_greedy(z, w, "probs")
    cold = mix_logits_sample(z, w, "probs", temperature=1e-3,
                             generator=torch.Generator().manual_seed(1))
    assert torch.equal(cold, greedy)
    assert torch.equal(mix_logits_sample(z, w, "probs", temperature=0.0), greedy)
    nucleus = mix_logits_sample(z, w, "probs", top_p=1e-6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(nucleus, greedy)
    # a very peaked mixture: every expert puts its mass on token 4242
    zp = z.clone()
    zp[:, :, 4242] = 40.0
    for mode in ("probs", "logits"):
        t = mix_logits_sample(zp, w, mode, generator=torch.Generator().manual_seed(9))
        assert (t == 4242).all()


def test_top_p_semantics(backend):
    # scores with probabilities 0.5, 0.3, 0.15, 0.05 on tokens 3, 0, 2, 1
    p = torch.tensor([0.3, 0.05, 0.15, 0.5])
    z = p.log()[None, None].repeat(1, 1, 1)
    w = torch.ones(1, 1)
    for top_p, allowed in ((0.5, {3}), (0.6, {3, 0}), (0.8, {3, 0}), (0.81, {3, 0, 2}), (1.0, {0, 1, 2, 3})):
        seen = set()
        for s in range(40):
            u = torch.tensor([(s + 0.5) / 40])
            seen.add(mix_logits_sample(z, w, "probs", top_p=top_p, uniforms=u).item())
        assert seen == allowed, (top_p, seen)


def test_custom_ops_opcheck():
    import importlib

    m = importlib.import_module("loramix_fast.ops.mix_logits")

    z, w = _rand(2, 3, 67, torch.float32, seed=4)
    torch.library.opcheck(m._mix_logits_op, (z, w, "probs"))
    torch.library.opcheck(m._mix_logits_greedy_op, (z, w, "logits"))
    torch.library.opcheck(m._mix_logits_sample_op, (z, w, "probs", torch.rand(2), 1.0, 0.9))


# --- ensemble weight helpers ---------------------------------------------------------------------------

def test_elrea_weights():
    cos = torch.tensor([[0.1, 0.5, 0.3], [0.2, 0.2, 0.2]])
    w = elrea_weights(cos)
    assert w.shape == (2, 4)
    torch.testing.assert_close(w[:, 0], 1 - cos.max(1).values)
    std = (cos[0] - cos[0].mean()) / cos[0].std(unbiased=False)
    torch.testing.assert_close(w[0, 1:], torch.softmax(std, 0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w[1, 1:], torch.full((3,), 1 / 3))  # equal similarities: uniform
    assert elrea_weights(cos[0]).shape == (4,)
    assert elrea_weights(cos, include_base=False).shape == (2, 3)
    assert torch.isfinite(elrea_weights(torch.tensor([[0.4]]))).all()
    with pytest.raises(ValueError, match="cos_sim"):
        elrea_weights(torch.zeros(2, 0))


def test_topk_renormalize():
    p = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]])
    w = topk_renormalize(p, 2)
    torch.testing.assert_close(w[0], torch.tensor([0.0, 4 / 7, 0.0, 3 / 7]))
    torch.testing.assert_close(w[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))  # ties: lower index
    assert torch.equal(w[2], torch.zeros(4))
    torch.testing.assert_close(topk_renormalize(p[:2], 9), p[:2] / p[:2].sum(1, keepdim=True))
    with pytest.raises(ValueError, match="k"):
        topk_renormalize(p, 0)


# --- issue 16 item 13: non-finite logits have one meaning on every backend ---------------------------

INF, NAN = float("inf"), float("nan")


def _expected(z, w, mode):
    """Independent fp64 oracle of the documented semantics (reference.mix_logits' docstring),
    one expert at a time in plain Python/torch."""
    z, w = z.double(), w.double()
    Bn, E, V = z.shape
    out = torch.empty(Bn, V, dtype=torch.float64)
    for b in range(Bn):
        if mode == "logits":
            acc = torch.zeros(V, dtype=torch.float64)
            for e in range(E):
                if w[b, e] != 0:
                    acc = acc + w[b, e] * z[b, e]
            out[b] = acc
            continue
        mix = torch.zeros(V, dtype=torch.float64)
        for e in range(E):
            if not w[b, e] > 0:
                continue
            ze = z[b, e]
            if torch.isnan(ze).any():
                mix = mix + NAN
            elif torch.isposinf(ze).any():
                top = torch.isposinf(ze).double()
                mix = mix + w[b, e] * top / top.sum()
            elif torch.isfinite(ze).any():
                mix = mix + w[b, e] * torch.softmax(ze, 0)
        out[b] = torch.log(mix)
    return out


def _inf_cases(V, dtype, seed):
    B, E = 9, 3
    z, w = _rand(B, E, V, dtype, seed)
    z[0, 0, 2] = INF                        # the issue's case: one +inf logit
    z[1, 1, [3, V - 5]] = INF               # two +inf in one expert: its mass split equally
    z[1, 1, 0] = NEG
    z[2, 0, :] = INF                        # +inf everywhere: uniform
    z[3, 0, 7], z[3, 2, V - 1] = INF, INF   # +inf in two experts, different tokens
    z[3, 2, 7] = NEG
    z[4, 2, 11] = NAN                       # NaN in a used expert: the row is NaN
    z[5, 1, 13], w[5, 1] = NAN, 0.0         # NaN / +inf in an unused expert: ignored
    z[5, 2, 17], w[5, 2] = INF, 0.0
    z[6, :, 19] = INF                       # +inf in every expert at one token
    z[7, 1] = NEG                           # an all -inf expert next to a +inf one
    z[7, 0, V // 2] = INF
    z[8, 0, V // 3], z[8, 1, V // 3] = INF, NEG  # "logits": +inf + -inf = NaN at that token
    return z, w


def _same(got, want, rtol=1e-5):
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN pattern"
    for sign in (torch.isposinf, torch.isneginf):
        assert torch.equal(sign(got), sign(want)), "infinity pattern"
    fin = torch.isfinite(want)
    torch.testing.assert_close(got.double()[fin], want[fin], rtol=rtol, atol=rtol)


@pytest.mark.parametrize("mode", ["probs", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("V", [300, 32001])
def test_nonfinite_logits_semantics(backend, mode, dtype, V):
    z, w = _inf_cases(V, dtype, seed=V)
    want = _expected(z, w, mode)
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    _same(reference.mix_logits(z, w, mode, upcast=True), want, 1e-12)
    _same(mix_logits(z, w, mode), want, tol)
    if mode == "probs":
        assert not torch.isposinf(want).any()
        assert torch.isnan(want[4]).all() and not torch.isnan(want[torch.arange(9) != 4]).any()
        # expert 1 of row 1 alone: its mass is on its two +inf tokens, equally
        w1 = torch.tensor([[0.0, 0.25, 0.0]])
        s = mix_logits(z[1:2], w1, mode)[0]
        assert s[3].item() == s[V - 5].item() == pytest.approx(math.log(0.125), abs=1e-6)
        assert torch.isneginf(s[torch.ones(V, dtype=torch.bool).index_fill_(0, torch.tensor([3, V - 5]), False)]).all()
    for rows in (slice(None), slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 9)):  # split rows too
        zz, ww = z[rows], w[rows]
        ref = _expected(zz, ww, mode)
        assert torch.equal(mix_logits_greedy(zz, ww, mode), ref.argmax(1)), "greedy (torch.argmax)"
        for u in (0.0, 0.3, 0.7):  # (not next to 1: fp32 CDF rounding may move the token)
            uu = torch.full((zz.shape[0],), u)
            tok = mix_logits_sample(zz, ww, mode, uniforms=uu)
            assert torch.equal(tok, sample_from_scores(ref, uu)), f"sample at u = {u}"


def test_plus_inf_issue_case(backend):
    """issue 16: one +inf logit made the C++ row flat (89.13 everywhere, greedy 0)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 2, 5, generator=g)
    z[0, 0, 2] = INF
    w = torch.tensor([[0.5, 0.5]])
    got = mix_logits(z, w, "probs")
    p1 = torch.softmax(z[0, 1].double(), 0)
    want = torch.log(0.5 * p1 + 0.5 * (torch.arange(5) == 2).double())
    torch.testing.assert_close(got[0].double(), want, rtol=1e-6, atol=1e-6)
    assert torch.exp(got.double()).sum().item() == pytest.approx(1.0, abs=1e-6)
    assert mix_logits_greedy(z, w, "probs").item() == 2


def test_sample_from_scores_nonfinite_rules():
    s = torch.tensor([[0.0, INF, 1.0, INF, -5.0],   # +inf: uniform over tokens 1 and 3
                      [0.0, NAN, 1.0, NAN, 2.0],    # NaN: the first NaN token
                      [NEG, NEG, NEG, NEG, NEG]])   # nothing finite: token 0
    for u, first in ((0.0, 1), (0.49, 1), (0.5, 3), (0.99, 3)):
        tok = sample_from_scores(s, torch.full((3,), u), temperature=0.7)
        assert tok.tolist() == [first, 1, 0]
        assert sample_from_scores(s, torch.full((3,), u), top_p=0.5).tolist() == [1, 1, 0]
