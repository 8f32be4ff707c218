"""Builds (JIT, with ninja) and loads the C++ CPU extension from ``csrc/``.

Every ``csrc/*.cpp`` goes into ONE shared library that registers its ops under
``torch.ops.loramix_cpp`` (each file uses ``TORCH_LIBRARY_FRAGMENT(loramix_cpp, m)``).

    load() -> bool        build once per process (cached), never raises; False -> use the reference
    load_error()          the exception of a failed build/load (None if none)
    build() -> None       like load() but raises with the build log (for ``make``)

``LORAMIX_NO_CPP=1`` disables the extension. The build directory is ``$TORCH_EXTENSIONS_DIR`` if set,
else ``<repo>/build/torch_extensions`` when writable, else torch's default. The extension name
carries a hash of the sources, flags and torch install, so an edited source (or another venv) builds
into a fresh folder (a library already loaded by another process is never overwritten) and ninja
rebuilds only what changed.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

__all__ = ["load", "load_error", "build", "csrc_dir", "build_dir"]

_lock = threading.Lock()
_loaded: bool | None = None
_error: BaseException | None = None

_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno",
           "-Wno-unused-parameter", "-Wno-sign-compare"]
_LDFLAGS = ["-fopenmp"]


def csrc_dir() -> Path:
    """``<repo>/csrc`` (shipped as the package ``loramix_fast.csrc``)."""
    try:
        import loramix_fast.csrc as _c

        return Path(_c.__file__).resolve().parent
    except Exception:  # not installed as a package: the repo layout
        return Path(__file__).resolve().parent.parent / "csrc"


def _sources() -> list[Path]:
    return sorted(csrc_dir().glob("*.cpp"))


def _digest(sources: list[Path]) -> str:
    h = hashlib.sha1()
    import torch

    h.update(torch.__version__.encode())
    # the torch install (its include paths are in build.ninja): two venvs with the same torch
    # version (the main one and .venv-vllm) would otherwise rebuild one folder in turn, each
    # overwriting the library the other has loaded
    h.update(str(Path(torch.__file__).resolve().parent).encode())
    h.update(_cpu_flags().encode())  # -march=native: a build dir shared by other CPUs rebuilds
    for f in _CFLAGS + _LDFLAGS:
        h.update(f.encode() + b"\0")
    for p in sorted(csrc_dir().glob("*.h")) + sources:
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    import platform

    return platform.machine()


def _prune(root: Path, keep: str, max_age_s: float = 7 * 86400) -> None:
    """Remove stale builds of older sources (a library another process has loaded stays mapped)."""
    import shutil
    import time

    try:
        for d in root.glob("loramix_cpp_*"):
            if d.name != keep and d.is_dir() and time.time() - d.stat().st_mtime > max_age_s \
                    and not (d / "lock").exists():
                shutil.rmtree(d, ignore_errors=True)
    except OSError:
        pass


def build_dir() -> Path | None:
    """Where the extension is built; None means torch's default."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    root = csrc_dir().parent / "build"
    try:
        d = root / "torch_extensions"
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    return None


def _build_and_load() -> None:
    import torch
    from torch.utils import cpp_extension

    sources = _sources()
    if not sources:
        raise RuntimeError(f"no C++ sources in {csrc_dir()}")
    name = f"loramix_cpp_{_digest(sources)}"
    d = build_dir()
    kwargs = {}
    if d is not None:
        d = d / name
        d.mkdir(parents=True, exist_ok=True)
        kwargs["build_directory"] = str(d)
    # verbose=False: torch captures ninja's output and puts it into the exception on failure.
    cpp_extension.load(name=name, sources=[str(s) for s in sources], extra_cflags=_CFLAGS,
                       extra_ldflags=_LDFLAGS, extra_include_paths=[str(csrc_dir())],
                       is_python_module=False, verbose=False, **kwargs)
    if d is not None:
        _prune(d.parent, keep=name)
    if (csrc_dir() / "multi_lora.cpp").exists():
        torch.ops.loramix_cpp.multi_lora_linear  # noqa: B018 - raises if registration failed


def load() -> bool:
    """Build (first call) and load the extension; True if ``torch.ops.loramix_cpp`` is usable.
    Never raises: on failure returns False and keeps the exception for :func:`load_error`."""
    global _loaded, _error
    if os.environ.get("LORAMIX_NO_CPP", "").strip() not in ("", "0"):
        return False
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            try:
                _build_and_load()
                _loaded, _error = True, None
            except BaseException as e:  # noqa: BLE001 - a compiler crash must never break a forward
                if isinstance(e, KeyboardInterrupt):
                    raise
                _loaded, _error = False, e
    return _loaded


def load_error() -> BaseException | None:
    """The exception from a failed build or load (with the compiler output), else None."""
    if os.environ.get("LORAMIX_NO_CPP", "").strip() not in ("", "0") and _loaded is None:
        return RuntimeError("the C++ extension is disabled by LORAMIX_NO_CPP=1")
    return _error


def build() -> None:
    """Build and load, raising with the build log on failure (``make`` calls this)."""
    if os.environ.get("LORAMIX_NO_CPP", "").strip() not in ("", "0"):
        raise RuntimeError("LORAMIX_NO_CPP is set: the C++ extension is disabled")
    if not load():
        raise RuntimeError(f"building the loramix_fast C++ extension failed:\n{_error}") from _error
