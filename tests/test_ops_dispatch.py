"""The public op layer: dispatch, autograd fallback, clear errors, custom-op registration."""
import pytest
import torch

import loramix_fast as lmf
from loramix_fast import reference


def _data(M=6, K=24, N=20, E=3, R=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, dtype=dtype)
    W = torch.randn(N, K, generator=g, dtype=dtype)
    A = torch.randn(E, R, K, generator=g, dtype=dtype)
    B = torch.randn(E, N, R, generator=g, dtype=dtype)
    scale = torch.rand(E, generator=g, dtype=dtype) + 0.5
    rank = torch.tensor([5, 2, 4], dtype=torch.int32)
    idx = torch.tensor([[0], [1], [-1], [2], [0], [1]], dtype=torch.int32)
    return x, W, A, B, scale, rank, idx


def test_autograd_falls_back_to_differentiable_reference():
    x, W, A, B, scale, rank, idx = _data()
    x.requires_grad_(True)
    A.requires_grad_(True)
    y = lmf.ops.multi_lora_linear(x, W, A, B, scale, rank, idx)
    assert y.requires_grad
    y.square().sum().backward()
    x2, A2 = x.detach().clone().requires_grad_(True), A.detach().clone().requires_grad_(True)
    reference.multi_lora_linear(x2, W, A2, B, scale, rank, idx).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(A.grad, A2.grad)
    assert A.grad[1, 2:].abs().sum() == 0  # rows past rank get no gradient


@pytest.mark.parametrize("bad, match", [
    (lambda a: a.update(W=a["W"][:, :-1]), "weight"),
    (lambda a: a.update(A=a["A"].float()), "A"),
    (lambda a: a.update(B=a["B"][:, :-1]), "B"),
    (lambda a: a.update(idx=a["idx"][:-1]), "idx"),
    (lambda a: a.update(idx=a["idx"].float()), "idx"),
    (lambda a: a.update(idx=a["idx"] + 5), "adapter id"),
    (lambda a: a.update(idx=a["idx"] - 3), "adapter id"),
    (lambda a: a.update(scale=a["scale"][:2]), "scale"),
    (lambda a: a.update(rank=a["rank"].float()), "rank"),
], ids=["weight-K", "A-dtype", "B-N", "idx-M", "idx-dtype", "id>=E", "id<-1", "scale-E", "rank-dtype"])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_bad_input_errors_name_the_argument(monkeypatch, bad, match, backend):
    from loramix_fast.ops._dispatch import cpp_available

    if backend == "cpp" and not cpp_available("multi_lora_linear"):
        pytest.skip("C++ extension unavailable: " + str(lmf._cpp.load_error()))
    monkeypatch.setenv("LORAMIX_BACKEND", backend)
    x, W, A, B, scale, rank, idx = _data()
    a = dict(x=x, W=W, A=A, B=B, scale=scale, rank=rank, idx=idx)
    bad(a)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        lmf.ops.multi_lora_linear(a["x"], a["W"], a["A"], a["B"], a["scale"], a["rank"], a["idx"])


def test_backend_override(monkeypatch):
    from loramix_fast.ops._dispatch import pick_backend

    monkeypatch.setenv("LORAMIX_BACKEND", "reference")
    assert pick_backend(torch.empty(1), "multi_lora_linear") == "reference"
    monkeypatch.setenv("LORAMIX_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="LORAMIX_BACKEND"):
        pick_backend(torch.empty(1), "multi_lora_linear")


def test_registered_custom_op_and_fake():
    x, W, A, B, scale, rank, idx = _data(dtype=torch.float32)
    out = torch.ops.loramix.multi_lora_linear(x, W, A, B, scale, rank, idx, None, None)
    torch.testing.assert_close(out, reference.multi_lora_linear(x, W, A, B, scale, rank, idx))
    torch.library.opcheck(torch.ops.loramix.multi_lora_linear.default,
                          (x, W, A, B, scale, rank, idx, None, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_expand_registered_custom_op_and_fake():
    x, W, A, B, scale, rank, idx = _data(dtype=torch.float32)
    y = torch.randn(x.shape[0], W.shape[0])
    h = torch.einsum("erk,mk->mer", A, x)
    args = (y, h, B, scale, rank, idx, None)
    torch.testing.assert_close(torch.ops.loramix.multi_lora_expand(*args),
                               reference.multi_lora_expand(*args))
    torch.library.opcheck(torch.ops.loramix.multi_lora_expand.default, args,
                          test_utils=("test_schema", "test_faketensor"))
