"""The 16-bit base-GEMM paths of the C++ op side by side, on this CPU (what the bf16 defaults in
csrc/multi_lora.cpp ``small_m_rows`` and ``gemm16`` were picked from).

For each (N, K) layer shape and row count M: torch's bf16 ``F.linear`` (no adapters: the floor),
and the op with 32 adapters of rank 32, one row in 7 carrying an adapter (the rest -1), on each
path forced by the environment:

- ``small``: the fused small-M kernel (``LORAMIX_CPP_SMALL_M=4096``; bf16 with AVX512-BF16 only);
- ``mkl``: MKL's bf16 x bf16 -> fp32 GEMM per column chunk + the delta, one rounding
  (``LORAMIX_CPP_SMALL_M=0 LORAMIX_CPP_GEMM16=mkl``);
- ``aten``: torch's bf16 GEMM, then the delta of the adapted rows in place, two roundings
  (``LORAMIX_CPP_SMALL_M=0 LORAMIX_CPP_GEMM16=aten``);
- ``default``: what this CPU picks with no environment set.

Each weight is rotated over enough copies (>= 64 MB) that every call streams it from memory.
Times are microseconds per call, medians of round-robin repetitions after warm-up; ``x torch`` is
the default path over ``F.linear``. ``python -m bench.bench_gemm16_paths [--M 1,16,256]
[--no-write]`` writes the ``## bf16 base-GEMM paths`` section of bench/RESULTS.md.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bench import common
from bench.common import machine, time_side_by_side

TITLE = "bf16 base-GEMM paths of the C++ op on this CPU"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SHAPES = [(576, 576), (1536, 576), (576, 1536), (2048, 2048), (5632, 2048), (4096, 4096)]
MS = (1, 4, 6, 8, 16, 64, 256, 688, 2048)
PATHS = {"small": {"LORAMIX_CPP_SMALL_M": "4096", "LORAMIX_CPP_GEMM16": "mkl"},
         "mkl": {"LORAMIX_CPP_SMALL_M": "0", "LORAMIX_CPP_GEMM16": "mkl"},
         "aten": {"LORAMIX_CPP_SMALL_M": "0", "LORAMIX_CPP_GEMM16": "aten"},
         "default": {}}
KNOBS = ("LORAMIX_CPP_SMALL_M", "LORAMIX_CPP_GEMM16")


def _env(values: dict):
    return common.env(values, clear=KNOBS)


def run(Ms=MS, shapes=SHAPES, reps: int = 9, E: int = 32, R: int = 32,
        stream_bytes: float = 64e6) -> list[dict]:
    """One row per (shape, M): microseconds per call of torch and of each path (``stream_bytes``:
    the weight copies rotated, so each call reads its weight from memory)."""
    from loramix_fast import _cpp

    if not _cpp.load():
        raise RuntimeError(f"the C++ extension is needed: {_cpp.load_error()}")
    op = torch.ops.loramix_cpp.multi_lora_linear.default
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    rows = []
    for N, K in shapes:
        copies = max(1, int(stream_bytes // (N * K * 2)))
        Ws = [(torch.randn(N, K, generator=g) / K ** 0.5).to(bf) for _ in range(copies)]
        A = (torch.randn(E, R, K, generator=g) / K ** 0.5).to(bf)
        B = (torch.randn(E, N, R, generator=g) / R ** 0.5).to(bf)
        scale = torch.ones(E)
        rank = torch.full((E,), R, dtype=torch.int32)
        for M in Ms:
            x = torch.randn(M, K, generator=g).to(bf)
            idx = torch.full((M, 1), -1, dtype=torch.int32)
            idx[::7, 0] = torch.arange(0, M, 7, dtype=torch.int32) % E
            res = {}
            fns = {"torch": [lambda W=W: torch.nn.functional.linear(x, W) for W in Ws]}
            with torch.no_grad():
                res.update(time_side_by_side(fns, reps * copies, warmup=copies))
                for name, env in PATHS.items():
                    with _env(env):
                        f = [lambda W=W: op(x, W, A, B, scale, rank, idx, None, None) for W in Ws]
                        res.update(time_side_by_side({name: f}, reps * copies, warmup=copies))
            rows.append({"N": N, "K": K, "M": M, **{k: v * 1e6 for k, v in res.items()}})
    return rows


def format_table(rows, load: str = "") -> str:
    lines = [f"{'N':>5} {'K':>5} {'M':>5} {'torch':>9} {'small':>9} {'mkl':>9} {'aten':>9} "
             f"{'default':>9} {'x torch':>8}"]
    for r in rows:
        lines.append(f"{r['N']:>5} {r['K']:>5} {r['M']:>5} {r['torch']:>9.1f} {r['small']:>9.1f} "
                     f"{r['mkl']:>9.1f} {r['aten']:>9.1f} {r['default']:>9.1f} "
                     f"{r['default'] / r['torch']:>8.2f}")
    lines.append("us per call (median); torch: bf16 F.linear without adapters; the op: 32 adapters "
                 "r=32, one row in 7 with an adapter; each weight streamed from memory")
    if load:
        lines.append(load)
    lines.append(machine())
    return "\n".join(lines)


def main(argv=None) -> int:
    return common.paths_main(argv, __doc__, MS, run, format_table, TITLE, RESULTS)


if __name__ == "__main__":
    raise SystemExit(main())
