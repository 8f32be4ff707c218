"""Benchmark of the fused multi-LoRA linear (DESIGN.md operation 1) on CPU.

    python bench/bench_multi_lora_op.py [--quick] [--dtype float32] [--threads N] [--clock cpu]

Shapes: d_in = d_out = 2048, rank 16, 32 adapters, one slot per row (multi-tenant serving), decode
M = 1, 4, 16, 64 and prefill M = 512, 1024, 4096; adapter popularity distinct (idx = arange % 32),
uniform, zipf (s = 1.2) and identical.
Providers, timed side by side (round-robin, inputs rotated, median after warm-up):
    base     torch.nn.functional.linear alone: the floor
    ours     loramix_fast.ops.multi_lora_linear (C++ backend on CPU)
    loop     reference.multi_lora_linear_loop: one GEMM + per-adapter gather/GEMMs/index_add_
    peft     peft's LoRA Linear with a mixed batch (adapter_names=...)
    gather   reference.multi_lora_linear: per-row gathered adapter weights (decode shapes only)
Columns: median ms, ratio to base, GB/s over the bytes the op must move (W + the used adapters'
A[:r], B[:, :r] + x + y), GFLOP/s over base + delta flops (both from the median), and the 10th
percentile time with its ratio to base's (on a shared machine, closer to the uncontended cost).
``--clock cpu`` (with ``--threads 1``) times this thread's CPU time instead of wall time: on an
oversubscribed machine it leaves out the time a call waits descheduled (cache and memory-bandwidth
contention from the other processes still count).
``run(quick) -> list[dict]`` returns the rows for other writers (pytest-benchmark, RESULTS.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import load_line, machine, time_side_by_side  # noqa: E402
from loramix_fast import ops, reference  # noqa: E402

K = N = 2048
E = 32
R = 16
DECODE = (1, 4, 16, 64)
PREFILL = (512, 1024, 4096)
POPS = ("distinct", "uniform", "zipf", "identical")


def _reps(M: int, quick: bool) -> int:
    if M <= 64:
        return 20 if quick else 50
    if M <= 1024:
        return 5 if quick else 20
    return 3


def make_idx(M: int, pop: str, g: torch.Generator) -> torch.Tensor:
    if pop == "distinct":
        idx = torch.arange(M) % E
    elif pop == "identical":
        idx = torch.zeros(M, dtype=torch.long)
    elif pop == "zipf":
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        idx = torch.multinomial(p, M, replacement=True, generator=g)
    else:
        idx = torch.randint(E, (M,), generator=g)
    return idx.to(torch.int32)[:, None]


def _peft_layer(weight, A, B, scale):
    """peft LoRA Linear with E adapters named a0..a{E-1} holding A, B (scaling = scale)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    base = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    base.weight.data = weight
    cfg = LoraConfig(r=R, lora_alpha=R, lora_dropout=0.0, init_lora_weights=False)
    lin = LoraLinear(base, "a0", config=cfg, r=R, lora_alpha=R, init_lora_weights=False)
    for e in range(1, A.shape[0]):
        lin.update_layer(f"a{e}", r=R, lora_alpha=R, config=cfg, lora_dropout=0.0,
                         init_lora_weights=False)
    for e in range(A.shape[0]):
        lin.lora_A[f"a{e}"].weight.data = A[e].clone()
        lin.lora_B[f"a{e}"].weight.data = B[e].clone()
        lin.scaling[f"a{e}"] = float(scale[e])
    lin.requires_grad_(False)
    return lin


def run(quick: bool = False, dtype: torch.dtype = torch.float32, Ms=None, pops=POPS,
        providers=("base", "ours", "loop", "peft", "gather"), threads: int | None = None,
        clock: str = "wall") -> list[dict]:
    if threads:  # every provider on this many threads (restored after)
        was = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run(quick, dtype, Ms, pops, providers, clock=clock)
        finally:
            torch.set_num_threads(was)
    import os

    timer = _clock(clock)

    load0 = os.getloadavg()[0]
    g = torch.Generator().manual_seed(0)
    esz = torch.empty((), dtype=dtype).element_size()
    weight = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    A = (torch.randn(E, R, K, generator=g) / K ** 0.5).to(dtype)
    B = (torch.randn(E, N, R, generator=g) / R ** 0.5).to(dtype)
    scale = torch.rand(E, generator=g) + 0.5
    rank = torch.full((E,), R, dtype=torch.int32)
    peft_lin = None
    if "peft" in providers:
        try:
            peft_lin = _peft_layer(weight, A, B, scale)
        except Exception as e:  # noqa: BLE001 - optional provider
            print(f"[peft provider unavailable: {type(e).__name__}: {e}]", file=sys.stderr)
    if Ms is None:
        Ms = (1, 16, 64, 1024) if quick else DECODE + PREFILL
    rows = []
    for M in Ms:
        for pop in pops:
            idx = make_idx(M, pop, g)
            names = [f"a{e}" for e in idx[:, 0].tolist()]
            xs = [torch.randn(M, K, generator=g).to(dtype) for _ in range(4)]
            cand = {
                "base": [lambda x=x: torch.nn.functional.linear(x, weight) for x in xs],
                "ours": [lambda x=x: ops.multi_lora_linear(x, weight, A, B, scale, rank, idx)
                         for x in xs],
                "loop": [lambda x=x: reference.multi_lora_linear_loop(x, weight, A, B, scale, rank, idx)
                         for x in xs],
            }
            if peft_lin is not None:
                cand["peft"] = [lambda x=x: peft_lin(x, adapter_names=names) for x in xs]
            if M <= 64:
                cand["gather"] = [lambda x=x: reference.multi_lora_linear(x, weight, A, B, scale, rank, idx)
                                  for x in xs]
            fns = {k: v for k, v in cand.items() if k in providers or k == "base"}
            with torch.inference_mode():
                t = time_side_by_side(fns, _reps(M, quick), with_p10=True, clock=timer)
            used = int(torch.unique(idx).numel())
            nbytes = (N * K + used * 2 * R * K + M * K + M * N) * esz
            flops = 2 * M * K * N + 2 * M * R * (K + N)
            for k, (s, s10) in t.items():
                rows.append(dict(M=M, pop=pop, provider=k, ms=s * 1e3, ratio=s / t["base"][0],
                                 ms_p10=s10 * 1e3, ratio_p10=s10 / t["base"][1],
                                 gbps=nbytes / s / 1e9, gflops=flops / s / 1e9, adapters_used=used,
                                 K=K, N=N, E=E, R=R, dtype=str(dtype).split(".")[-1],
                                 threads=torch.get_num_threads(), clock=clock))
    where = f"{machine()}; {load_line(load0)}; clock: {clock}"
    for r in rows:
        r["machine"] = where
    return rows


def _clock(clock: str):
    """'wall' -> time.perf_counter; 'cpu' -> time.thread_time (one thread only: the CPU time of the
    calling thread is the op's whole cost only when torch runs on that thread alone)."""
    import time

    if clock == "wall":
        return time.perf_counter
    if clock == "cpu":
        if torch.get_num_threads() != 1:
            raise ValueError(f"clock='cpu' needs threads=1 (torch has {torch.get_num_threads()})")
        return time.thread_time
    raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")


def format_table(rows: list[dict]) -> str:
    out = [f"# {rows[0]['dtype']}; {rows[0]['machine']}"] if rows and "machine" in rows[0] else []
    out += [f"{'M':>5} {'popularity':<10} {'provider':<7} {'ms':>9} {'x base':>7} {'GB/s':>7} "
            f"{'GFLOP/s':>8} {'p10 ms':>9} {'p10 x':>6}"]
    for r in rows:
        out.append(f"{r['M']:>5} {r['pop']:<10} {r['provider']:<7} {r['ms']:>9.3f} "
                   f"{r['ratio']:>7.3f} {r['gbps']:>7.2f} {r['gflops']:>8.1f} "
                   f"{r['ms_p10']:>9.3f} {r['ratio_p10']:>6.3f}")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--M", type=int, nargs="*", default=None, help="rows (default: all shapes)")
    p.add_argument("--pop", nargs="*", default=list(POPS), choices=POPS)
    p.add_argument("--providers", nargs="*", default=["base", "ours", "loop", "peft", "gather"])
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: this thread's CPU time (needs --threads 1)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    from loramix_fast.ops._dispatch import pick_backend

    print(f"# multi_lora_linear, CPU, {a.dtype}, d_in = d_out = {K}, rank {R}, {E} adapters, S = 1")
    print(f"# backend: {pick_backend(torch.empty(0))}; {machine()}")
    rows = run(a.quick, dtype, Ms=a.M, pops=a.pop, providers=tuple(a.providers), clock=a.clock)
    print(format_table(rows))


if __name__ == "__main__":
    main()
