"""Clear errors from the functional ops (issue 16, items 10 and 14): every backend raises the same
kind of error, naming the argument and what was expected, instead of a crash deep inside, a silent
drop, or a wrapped adapter id."""
from __future__ import annotations

import math

import pytest
import torch

from loramix_fast import ops, reference
from loramix_fast.ops import _dispatch

BACKENDS = ["cpp", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "cpp" and not _dispatch.cpp_available():
        pytest.skip(f"C++ extension unavailable: {_dispatch._cpp_error()}")
    monkeypatch.setenv("LORAMIX_BACKEND", request.param)
    return request.param


def _data(M=6, K=12, N=10, E=3, R=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=dtype)
    W = torch.randn(N, K, generator=g, dtype=dtype)
    A = torch.randn(E, R, K, generator=g, dtype=dtype)
    B = torch.randn(E, N, R, generator=g, dtype=dtype)
    scale = torch.rand(E, generator=g, dtype=dtype) + 0.5
    rank = torch.tensor([4, 2, 3], dtype=torch.int32)
    idx = torch.tensor([[0], [1], [-1], [2], [0], [1]], dtype=torch.int32)
    h = torch.randn(M, E, R, generator=g, dtype=dtype)
    y = torch.randn(M, N, generator=g, dtype=dtype)
    return x, W, A, B, scale, rank, idx, h, y


# --- item 10: int64 ids past the int32 range never wrap to another adapter --------------------------

BAD_IDS = [2 ** 32 + 2, 2 ** 32 - 1, -(2 ** 32) - 1, 2 ** 31, 3, -2]  # wrap to 2, -1, -1, <0; E; < -1


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("validate", [True, False])
def test_int64_ids_out_of_range_raise_not_wrap(backend, bad, validate):
    x, W, A, B, scale, rank, idx, h, y = _data()
    ids = idx.long()
    ids[3, 0] = bad
    if not validate and backend == "reference":
        # unvalidated (the caller vouches for ids): the reference reads an out-of-range id as
        # "no adapter" - never as the adapter it would wrap to in int32
        got = ops.multi_lora_linear(x, W, A, B, scale, rank, ids, validate=False)
        none = ids.clone()
        none[3, 0] = -1
        want = reference.multi_lora_linear(x, W, A, B, scale, rank, none, upcast=True)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        return
    with pytest.raises(ValueError, match=rf"\bidx\b.*{bad}"):
        ops.multi_lora_linear(x, W, A, B, scale, rank, ids, validate=validate)
    with pytest.raises(ValueError, match=rf"\bidx\b.*{bad}"):
        ops.multi_lora_expand(y, h, B, scale, rank, ids)


def test_int64_ids_in_range_are_served_as_given(backend):
    x, W, A, B, scale, rank, idx, h, y = _data()
    want = reference.multi_lora_linear(x, W, A, B, scale, rank, idx, upcast=True)
    got = ops.multi_lora_linear(x, W, A, B, scale, rank, idx.long())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    want = reference.multi_lora_expand(y, h, B, scale, rank, idx, upcast=True)
    torch.testing.assert_close(ops.multi_lora_expand(y, h, B, scale, rank, idx.long()).double(), want,
                               rtol=1e-5, atol=1e-5)


# --- item 14: ids equal to E raise on every backend (the reference used to drop them silently) ------

@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_id_equal_to_E_raises_the_same_error_on_every_backend(backend, dtype):
    x, W, A, B, scale, rank, idx, h, y = _data()
    ids = idx.to(dtype)
    ids[0, 0] = 3  # == E
    with pytest.raises(ValueError, match=r"\bidx\b.*adapter id 3.*outside \[-1, 2\]"):
        ops.multi_lora_expand(y, h, B, scale, rank, ids)
    with pytest.raises(ValueError, match=r"\bidx\b.*adapter id 3.*outside \[-1, 2\]"):
        ops.multi_lora_linear(x, W, A, B, scale, rank, ids)


def test_id_equal_to_E_raises_with_grad(backend):
    """With grad on, the training ops run (whatever the backend): they check ids too."""
    x, W, A, B, scale, rank, idx, h, y = _data()
    ids = idx.clone()
    ids[0, 0] = 3
    with pytest.raises(ValueError, match=r"\bidx\b"):
        ops.multi_lora_linear(x.requires_grad_(True), W, A, B, scale, rank, ids)
    with pytest.raises(ValueError, match=r"\bidx\b"):
        ops.multi_lora_expand(y, h.requires_grad_(True), B, scale, rank, ids)


# --- item 14: missing / wrongly typed arguments name the argument ----------------------------------

@pytest.mark.parametrize("arg", ["y", "h", "B", "scale", "rank", "idx"])
@pytest.mark.parametrize("value", [None, [[1.0]]], ids=["None", "list"])
def test_expand_missing_argument_is_named(backend, arg, value):
    x, W, A, B, scale, rank, idx, h, y = _data()
    a = dict(y=y, h=h, B=B, scale=scale, rank=rank, idx=idx)
    a[arg] = value
    with pytest.raises(TypeError, match=rf"^{arg}\b.*torch\.Tensor.*got (None|list)"):
        ops.multi_lora_expand(a["y"], a["h"], a["B"], a["scale"], a["rank"], a["idx"])


def test_expand_scale_none_says_what_is_expected(backend):
    x, W, A, B, scale, rank, idx, h, y = _data()
    with pytest.raises(TypeError, match=r"scale is required: expected a torch\.Tensor of shape \(3,\)"):
        ops.multi_lora_expand(y, h, B, None, rank, idx)


@pytest.mark.parametrize("arg", ["x", "weight", "A", "B", "scale", "rank", "idx"])
def test_linear_list_argument_is_a_type_error_naming_it(backend, arg):
    x, W, A, B, scale, rank, idx, h, y = _data()
    a = dict(x=x, weight=W, A=A, B=B, scale=scale, rank=rank, idx=idx)
    a[arg] = a[arg].tolist()
    with pytest.raises(TypeError, match=rf"^{arg} must be a torch\.Tensor.*got list"):
        ops.multi_lora_linear(**a)


def test_linear_x_list_is_a_type_error_even_unvalidated(backend):
    x, W, A, B, scale, rank, idx, h, y = _data()
    with pytest.raises(TypeError, match=r"^x must be a torch\.Tensor.*got list"):
        ops.multi_lora_linear(x.tolist(), W, A, B, scale, rank, idx, validate=False)
    with pytest.raises(ValueError, match=r"^x must have at least 1 dim"):
        ops.multi_lora_linear(torch.tensor(1.0), W, A, B, scale, rank, idx)


# --- item 14: mix_logits_sample uniforms must lie in [0, 1) -----------------------------------------

@pytest.mark.parametrize("bad", [5.0, -1.0, float("nan"), 1.0, float("inf"), -1e-30])
@pytest.mark.parametrize("mode", ["probs", "logits"])
def test_sample_uniforms_outside_unit_interval_raise(backend, bad, mode):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, 50, generator=g)
    w = torch.rand(3, 2, generator=g) + 0.1
    u = torch.tensor([0.5, bad, 0.25])
    with pytest.raises(ValueError, match=r"uniforms must be in \[0, 1\).*row 1"):
        ops.mix_logits_sample(z, w, mode, uniforms=u)
    with pytest.raises(ValueError, match=r"uniforms must be in \[0, 1\)"):
        ops.mix_logits_sample(z, w, mode, uniforms=u.double(), top_p=0.9)


def test_sample_uniforms_at_the_edges_are_accepted(backend):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, 50, generator=g)
    w = torch.rand(3, 2, generator=g) + 0.1
    scores = reference.mix_logits(z, w, "probs", upcast=True)
    # 0, the largest float32 below 1, and an fp64 value that float32 would round up to 1.0
    u = torch.tensor([0.0, 1.0 - 2.0 ** -24, 1.0 - 2.0 ** -40], dtype=torch.float64)
    tok = ops.mix_logits_sample(z, w, "probs", uniforms=u)
    p = torch.softmax(scores, 1)
    first = (p > 0).to(torch.int8).argmax(1)
    last = p.shape[1] - 1 - (p > 0).flip(1).to(torch.int8).argmax(1)
    assert tok[0] == first[0]
    assert tok[1] == last[1] and tok[2] == last[2]
    assert not math.isnan(float(u.sum()))
