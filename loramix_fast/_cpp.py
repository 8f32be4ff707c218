"""Builds (JIT, with ninja) and loads the C++ CPU extension from csrc/. Placeholder until the
C++ kernels land: reports the extension as unavailable."""
from __future__ import annotations

_error: Exception | None = RuntimeError("C++ extension not built yet")


def load() -> bool:
    return False


def load_error():
    return _error
