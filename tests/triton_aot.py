"""Ahead-of-time compilation of Triton kernels for real GPUs, on a machine without one.

``triton.compile`` lowers a ``@triton.jit`` function through TTIR/TTGIR/LLVM to PTX and runs the
``ptxas`` shipped in the triton wheel, so it catches what the interpreter forgives (a ``tl.dot`` dim
under 16, a non-power-of-2 block, shared memory over budget, bad dtype mixes) and shows what the
hardware would run (``mma.sync`` on sm_80, ``wgmma`` on sm_90). Reuse it for any kernel:

    from triton_aot import compile_kernel, signature_of, resource_usage, tensor_core_ops

    cx = {"BLOCK": 128, "stride_xk": 1}          # constexprs; unit strides as the JIT sees them
    sig = signature_of(_my_kernel, {"x_ptr": "*fp16", "out_ptr": "*fp16"}, ints="i32", constexprs=cx)
    ck = compile_kernel(_my_kernel, sig, cx, arch=90, num_warps=4, num_stages=3,
                        divisible_by_16=div16_default(sig, exclude=("M",)))
    ck.asm["ptx"]            # PTX text;  ck.asm["cubin"]: bytes;  ck.metadata.shared: smem bytes
    resource_usage(ck)       # {"registers": 64, "spill_bytes": 0, "stack": 0, "shared": 1024} or None
    tensor_core_ops(ck)      # {"mma": 0, "wgmma": 12}

Notes (triton 3.9):
- ``signature`` maps EVERY parameter name to a type: ``"*fp16"``/``"*bf16"``/``"*fp32"``/``"*i32"``/
  ``"*i64"`` for pointers, ``"i32"``/``"i64"``/``"fp32"`` for scalars, ``"constexpr"`` for
  ``tl.constexpr`` parameters (whose values go in ``constexprs``). :func:`signature_of` fills the
  scalars and constexprs from the function's parameter list so you only name the pointers.
- A scalar typed ``"i32"`` here is what the JIT picks at run time for ints < 2**31; the JIT also
  specialises ints equal to 1 and multiples of 16, which AOT without ``attrs`` does not (the AOT code
  is the less specialised, so a config that compiles here compiles at run time).
- ``arch`` 80 = A100 (sm_80), 90 = H100 (sm_90a); 89, 100, 120 also work with this wheel.
- Results are cached per process (``functools.lru_cache`` on hashable args) and on disk by triton
  (``~/.triton/cache``), so parametrized tests stay cheap.
- Spills: ``cuobjdump --dump-resource-usage`` (in the wheel's ``backends/nvidia/bin``) prints
  ``REG``, ``STACK``, ``SHARED``, ``LOCAL``; local memory in a Triton kernel means register spills.
"""
from __future__ import annotations

import functools
import inspect
import os
import re
import shutil
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

__all__ = ["aot_available", "compile_kernel", "signature_of", "div16_default", "resource_usage", "tensor_core_ops", "cuobjdump_path"]


def _param_names(fn) -> list[str]:
    return list(fn.arg_names) if hasattr(fn, "arg_names") else list(inspect.signature(fn.fn).parameters)


def _constexpr_names(fn) -> set[str]:
    names = _param_names(fn)
    return {names[i] for i in getattr(fn, "constexprs", [])}


def signature_of(fn, pointers: dict, *, ints: str = "i32", scalars: dict | None = None,
                 constexprs: dict | None = None) -> dict:
    """A full ``signature`` for :func:`compile_kernel`: ``pointers`` gives the type of each pointer
    parameter, ``scalars`` overrides individual scalars (default ``ints``), constexpr parameters get
    ``"constexpr"``, and so does any plain scalar named in ``constexprs`` (that is how the JIT
    specialises an int equal to 1, e.g. a unit stride: pass ``constexprs={"stride_xk": 1}``).
    Raises if a constexpr has no value or a name is unknown."""
    names = _param_names(fn)
    cexpr = _constexpr_names(fn)
    scalars = scalars or {}
    unknown = (set(pointers) | set(scalars) | set(constexprs or {})) - set(names)
    if unknown:
        raise KeyError(f"{fn.__name__} has no parameter(s) {sorted(unknown)}")
    if constexprs is not None:
        missing = cexpr - set(constexprs)
        if missing:
            raise KeyError(f"{fn.__name__}: no value for constexpr(s) {sorted(missing)}")
    sig = {}
    for n in names:
        if n in cexpr or n in (constexprs or {}):
            sig[n] = "constexpr"
        elif n in pointers:
            sig[n] = pointers[n]
        else:
            sig[n] = scalars.get(n, ints)
    return sig


def _freeze(d: dict) -> tuple:
    return tuple(sorted(d.items()))


def _as_jit(fn):
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise TypeError(f"{getattr(fn, '__name__', fn)} is a {type(fn).__name__}, not a JITFunction: "
                        "AOT compilation needs triton imported without TRITON_INTERPRET=1 "
                        "(the interpreter also patches triton.language while it runs)")
    return fn


def aot_available() -> tuple[bool, str]:
    """(ok, reason): AOT compilation works in this process (triton importable, not interpreting)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False, "TRITON_INTERPRET=1: @triton.jit gives interpreted functions, no AOT compile"
    return True, ""


@functools.lru_cache(maxsize=None)
def _compile_cached(fn, sig: tuple, cexpr: tuple, arch: int, num_warps: int, num_stages: int,
                    div16: tuple):
    names = _param_names(fn)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(fn=_as_jit(fn), signature=dict(sig), constexprs=dict(cexpr), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, *, num_warps: int = 4,
                   num_stages: int = 3, divisible_by_16=()):
    """Compile ``fn`` (a ``@triton.jit`` function) for ``sm_<arch>`` without a GPU.

    ``divisible_by_16``: parameter names the JIT would mark ``tt.divisibility=16`` (pointers from
    torch allocations, sizes and strides that are multiples of 16). Without these hints (and unit
    strides passed as constexpr 1) loads cannot be vectorised and sm_80's cp.async pipelining is
    skipped, so the code would not be what runs; ``div16_default`` gives the usual set.
    Returns triton's ``CompiledKernel``: ``.asm["ptx"]`` (str), ``.asm["cubin"]`` (bytes),
    ``.asm["ttgir"]``, ``.metadata`` (``shared``, ``num_warps``, ...). Cached per process."""
    if int(triton.__version__.split(".")[0]) < 3:
        raise RuntimeError(f"triton >= 3 required for AOT checks, found {triton.__version__}")
    bad = set(divisible_by_16) - set(_param_names(fn))
    if bad:
        raise KeyError(f"{fn.__name__} has no parameter(s) {sorted(bad)}")
    return _compile_cached(fn, _freeze(signature), _freeze(constexprs), int(arch), int(num_warps),
                           int(num_stages), tuple(sorted(divisible_by_16)))


def div16_default(signature: dict, exclude=()) -> tuple:
    """What the JIT usually sees on real inputs: every pointer and every non-constexpr int
    parameter divisible by 16, except the names in ``exclude`` (e.g. M, or odd sizes)."""
    return tuple(n for n, t in signature.items()
                 if n not in exclude and (t.startswith("*") or t in ("i32", "i64")))


def tensor_core_ops(ck) -> dict:
    """Counts of tensor-core instructions in the PTX: ``mma`` (mma.sync, sm_80 style) and
    ``wgmma`` (warpgroup MMA, sm_90a)."""
    ptx = ck.asm["ptx"]
    return {"wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
            "mma": len(re.findall(r"\bmma\.sync", ptx))}


def cuobjdump_path() -> str | None:
    """The cuobjdump shipped in the triton wheel (or on PATH), or None."""
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.isfile(p) and os.access(p, os.X_OK):
        return p
    return shutil.which("cuobjdump")


def resource_usage(ck) -> dict | None:
    """Registers / spills / stack / shared memory of the compiled kernel, from
    ``cuobjdump --dump-resource-usage`` on its cubin; None when cuobjdump is unavailable.
    ``spill_bytes`` is the LOCAL (per-thread local memory) size: Triton kernels use local memory
    only for register spills. ``shared`` adds triton's dynamic shared memory (metadata.shared)."""
    tool = cuobjdump_path()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
        path = f.name
    try:
        res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                             timeout=60)
    finally:
        os.unlink(path)
    if res.returncode != 0:
        return None
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", res.stdout)
    if not m:
        return None
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "spill_bytes": local, "stack": stack,
            "shared": shared + int(getattr(ck.metadata, "shared", 0))}
