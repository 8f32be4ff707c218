"""The fp32 small-M paths of the C++ op side by side, on this CPU (what ``small_m_rows32`` in
csrc/multi_lora.cpp was picked from).

For each (N, K) layer shape and row count M: torch's fp32 ``F.linear`` (no adapters), then the op
with 32 adapters of rank 32 on two paths, each with no row carrying an adapter (``-1``: the base
GEMM alone) and with one row in 7 carrying one (``1/7``, an EM-LoRA decode step's share):

- ``aten``: torch's fp32 GEMM, then the delta added in place (``LORAMIX_CPP_SMALL_M32=0``);
- ``small``: the fused small-M kernel (``LORAMIX_CPP_SMALL_M32=4096``): the base GEMM in 4 x 4
  AVX-512 tiles with the next rows of W prefetched, the delta summed into the same registers
  (``LORAMIX_CPP_SMALL32_BASE=1``: also with no pair, where by default the op keeps torch's GEMM).

Each weight is rotated over enough copies (>= 256 MB, over the L3 of the 105 MB of this VM) that every
call streams it from memory; all
providers are timed round-robin in one loop (the environment is set per call). Times are
microseconds per call, medians after warm-up; ``x torch`` is each path over ``F.linear``.
``python -m bench.bench_gemm32_paths [--M 1,16] [--no-write]`` writes the
``## fp32 small-M paths`` section of bench/RESULTS.md.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from bench import common
from bench.common import machine, time_side_by_side

TITLE = "fp32 small-M paths of the C++ op on this CPU"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (2048, 2048),
          (5632, 2048)]
MS = (1, 2, 4, 8, 12, 16, 24, 32, 64, 128)
KNOB = "LORAMIX_CPP_SMALL_M32"
BASE_KNOB = "LORAMIX_CPP_SMALL32_BASE"
PATHS = {"aten": "0", "small": "4096"}  # default: small up to M = 24


def run(Ms=MS, shapes=SHAPES, reps: int = 9, E: int = 32, R: int = 32,
        stream_bytes: float = 256e6) -> list[dict]:
    """One row per (shape, M): microseconds per call of torch and of each (path, adapter share)
    (``stream_bytes``: the weight copies rotated, so each call reads its weight from memory)."""
    from loramix_fast import _cpp

    if not _cpp.load():
        raise RuntimeError(f"the C++ extension is needed: {_cpp.load_error()}")
    op = torch.ops.loramix_cpp.multi_lora_linear.default
    g = torch.Generator().manual_seed(0)
    rows = []
    with common.env({}, clear=(KNOB, BASE_KNOB)):  # restored after (the calls set them)
        for N, K in shapes:
            copies = max(1, int(stream_bytes // (N * K * 4)))
            Ws = [torch.randn(N, K, generator=g) / K ** 0.5 for _ in range(copies)]
            A = torch.randn(E, R, K, generator=g) / K ** 0.5
            B = torch.randn(E, N, R, generator=g) / R ** 0.5
            scale = torch.ones(E)
            rank = torch.full((E,), R, dtype=torch.int32)
            for M in Ms:
                x = torch.randn(M, K, generator=g)
                none = torch.full((M, 1), -1, dtype=torch.int32)
                some = none.clone()
                some[::7, 0] = torch.arange(0, M, 7, dtype=torch.int32) % E
                fns = {"torch": [lambda W=W: torch.nn.functional.linear(x, W) for W in Ws]}
                for path, v in PATHS.items():
                    for share, idx in (("-1", none), ("1/7", some)):
                        def call(W, v=v, idx=idx):
                            os.environ[KNOB] = v
                            os.environ[BASE_KNOB] = "1"  # the kernel even with no pair
                            op(x, W, A, B, scale, rank, idx, None, None)
                        fns[f"{path} {share}"] = [lambda W=W, c=call: c(W) for W in Ws]
                with torch.no_grad():
                    res = time_side_by_side(fns, reps * copies, warmup=copies)
                rows.append({"N": N, "K": K, "M": M, **{k: t * 1e6 for k, t in res.items()}})
    return rows


def format_table(rows, load: str = "") -> str:
    cols = ["aten -1", "small -1", "aten 1/7", "small 1/7"]
    lines = [f"{'N':>5} {'K':>5} {'M':>3} {'torch':>8} " + " ".join(f"{c:>10}" for c in cols)
             + f" {'small/torch -1':>14} {'small/aten 1/7':>14}"]
    for r in rows:
        lines.append(f"{r['N']:>5} {r['K']:>5} {r['M']:>3} {r['torch']:>8.1f} "
                     + " ".join(f"{r[c]:>10.1f}" for c in cols)
                     + f" {r['small -1'] / r['torch']:>14.2f} {r['small 1/7'] / r['aten 1/7']:>14.2f}")
    lines.append("us per call (median); torch: fp32 F.linear without adapters; the op: 32 adapters "
                 "r=32, no row (-1) or one row in 7 (1/7) with an adapter; each weight streamed "
                 "from memory; every provider timed round-robin in one loop")
    if load:
        lines.append(load)
    lines.append(machine())
    return "\n".join(lines)


def main(argv=None) -> int:
    return common.paths_main(argv, __doc__, MS, run, format_table, TITLE, RESULTS)


if __name__ == "__main__":
    raise SystemExit(main())
