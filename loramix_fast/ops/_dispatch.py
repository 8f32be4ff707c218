"""Backend selection shared by every op.

CUDA tensors -> Triton; CPU tensors -> the C++ extension; anything else, or a backend that is not
available -> the pure-torch reference. ``LORAMIX_BACKEND=triton|cpp|reference`` forces one (tests
use ``triton`` with ``TRITON_INTERPRET=1`` to run the Triton kernels on CPU tensors).
Nothing outside ``loramix_fast.ops`` imports triton or the extension.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("triton", "cpp", "reference")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def cpp_available(op: str | None = None) -> bool:
    """True when the C++ extension is built and loaded (and defines ``op``, if given)."""
    from .. import _cpp

    if not _cpp.load():
        return False
    return op is None or _cpp_has(op)


@functools.lru_cache(maxsize=None)
def _cpp_has(op: str) -> bool:
    return hasattr(torch.ops.loramix_cpp, op)


def forced_backend() -> str | None:
    b = os.environ.get("LORAMIX_BACKEND", "").strip().lower()
    if not b:
        return None
    if b not in BACKENDS:
        raise ValueError(f"LORAMIX_BACKEND must be one of {BACKENDS}, got {b!r}")
    return b


_picked: dict = {}


def pick_backend(t: torch.Tensor, op: str | None = None) -> str:
    """The backend that runs op ``op`` (its C++ name) whose main input is ``t``.

    Memoised per (LORAMIX_BACKEND, LORAMIX_NO_CPP, device type, op): it is on every layer's hot
    path."""
    env = os.environ
    key = (env.get("LORAMIX_BACKEND"), env.get("LORAMIX_NO_CPP"), t.device.type, op)
    b = _picked.get(key)
    if b is None:
        b = _pick_backend(t, op)
        _picked[key] = b
    return b


def _pick_backend(t: torch.Tensor, op: str | None) -> str:
    forced = forced_backend()
    if forced == "triton":
        if not triton_available():
            raise RuntimeError("LORAMIX_BACKEND=triton but triton cannot be imported")
        return "triton"
    if forced == "cpp":
        if not cpp_available(op):
            raise RuntimeError(f"LORAMIX_BACKEND=cpp but the C++ extension (op {op}) could not be "
                               f"built/loaded: {_cpp_error()}")
        return "cpp"
    if forced == "reference":
        return "reference"
    if t.device.type == "cuda" and triton_available():
        return "triton"
    if t.device.type == "cpu" and cpp_available(op):
        return "cpp"
    return "reference"


def _cpp_error() -> str:
    from .. import _cpp

    return str(_cpp.load_error())


# --- argument checking helpers: errors name the argument and what was expected -------------------

def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None, shape=None,
                 optional: bool = False):
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} is required: expected {_expected(ndim, shape, dtypes)}, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be {_expected(ndim, shape, dtypes)}, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None:
        for i, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected "
                                 f"{tuple('*' if s is None else s for s in shape)} (dim {i})")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (same device as x)")


def _expected(ndim, shape, dtypes) -> str:
    what = "a torch.Tensor"
    if shape is not None:
        dims = ["*" if d is None else str(d) for d in shape]
        what += " of shape (" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
    elif ndim is not None:
        what += f" with {ndim} dims"
    if dtypes is not None:
        what += " (" + " / ".join(str(d).replace("torch.", "") for d in dtypes) + ")"
    return what


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)
