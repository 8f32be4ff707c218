"""Benchmark: spectr_topk (SpectR scoring + top-k + weights) alone, ours vs plain torch.

Providers, measured side by side in one run:
    ours         loramix_fast.ops.spectr_topk (C++ on CPU, Triton on CUDA)
    reference    loramix_fast.reference.spectr_topk (the spec: masked norm, stable sort, softmax)
    torch-topk   the leanest torch formulation: masked norm, torch.topk, softmax (ties unspecified)
Shapes: M = 16 (decode) and 1024 (prefill) rows, T = 32 experts, R = 8, k = 4, softmax weights.
Bytes moved: h read once (M*T*R elements) + scores [M, T] fp32 + idx/w [M, k] written.
Median of repeated runs after warm-up, inputs rotated, never zeros.

    python bench/bench_spectr_op.py [--quick]
``run(quick) -> list[dict]`` is the entry point for the table-printing script.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from loramix_fast import reference
from loramix_fast.ops._dispatch import pick_backend
from loramix_fast.ops.spectr import spectr_topk

SHAPES = [(16, 32, 8, 4), (1024, 32, 8, 4)]  # (M, T, R, k)


def torch_topk(h, k, rank, temperature=1.0):
    """Plain torch: norms over the first rank[t] coordinates, top-k, softmax over the k."""
    R = h.shape[-1]
    rmask = torch.arange(R, device=h.device)[None, :] < rank[:, None]  # [T, R]
    hf = h.float()
    s = torch.sqrt((hf * hf * rmask).sum(-1))  # [M, T]
    sm = s.masked_fill(~(rank > 0)[None, :], float("-inf"))
    v, i = torch.topk(sm, k, dim=1)
    return i.to(torch.int32), torch.softmax(v / temperature, dim=1), s


def _timer(device):
    if device.type == "cuda":
        def t(fn, iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(iters):
                fn(i)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) * 1e3 / iters
    else:
        def t(fn, iters):
            t0 = time.perf_counter()
            for i in range(iters):
                fn(i)
            return (time.perf_counter() - t0) * 1e6 / iters
    return t


def _measure(fn, device, *, quick):
    timer = _timer(device)
    fn(0)  # warm-up (compiles / builds)
    timer(fn, 3)
    # many short samples (~1 ms each), median: robust to preemption on a shared machine
    one = max(timer(fn, 3), 0.5)
    iters = max(3, int(1000 / one))
    reps = 7 if quick else 31
    return statistics.median(timer(fn, iters) for _ in range(reps))


def run(quick: bool = False, device: str | None = None) -> list[dict]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [torch.bfloat16] if dev.type == "cuda" or quick else [torch.float32, torch.bfloat16]
    rows = []
    g = torch.Generator().manual_seed(0)
    for M, T, R, k in SHAPES:
        for dtype in dtypes:
            n_in = 8  # rotate inputs
            hs = [(torch.randn(M, T, R, generator=g) * (torch.rand(T, generator=g)[None, :, None] + 0.5))
                  .to(dev, dtype) for _ in range(n_in)]
            rank = torch.full((T,), R, dtype=torch.int32)
            rank[::7] = R // 2
            rank = rank.to(dev)
            elem = hs[0].element_size()
            nbytes = M * T * R * elem + M * T * 4 + M * k * 8
            providers = {
                "ours": lambda i: spectr_topk(hs[i % n_in], k, rank=rank, weighting="softmax"),
                "reference": lambda i: reference.spectr_topk(hs[i % n_in], k, rank=rank,
                                                             weighting="softmax"),
                "torch-topk": lambda i: torch_topk(hs[i % n_in], k, rank),
            }
            base = None
            for name, fn in providers.items():
                us = _measure(fn, dev, quick=quick)
                if name == "ours":
                    base = us
                rows.append(dict(op="spectr_topk", provider=name,
                                 backend=pick_backend(hs[0], "spectr_topk") if name == "ours" else "torch",
                                 M=M, T=T, R=R, k=k, dtype=str(dtype).replace("torch.", ""),
                                 device=_device_name(dev), us=round(us, 2),
                                 GBps=round(nbytes / us / 1e3, 3), bytes=nbytes,
                                 vs_ours=round(us / base, 2)))
    return rows


def _device_name(dev) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(rows: list[dict]) -> str:
    hdr = (f"{'M':>5} {'T':>3} {'R':>3} {'k':>2} {'dtype':>9} {'provider':>11} {'backend':>9} "
           f"{'us':>9} {'GB/s':>8} {'x ours':>7}")
    out = [hdr, "-" * len(hdr)]
    for r in rows:
        out.append(f"{r['M']:>5} {r['T']:>3} {r['R']:>3} {r['k']:>2} {r['dtype']:>9} "
                   f"{r['provider']:>11} {r['backend']:>9} {r['us']:>9.2f} {r['GBps']:>8.3f} "
                   f"{r['vs_ours']:>7.2f}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.quick, args.device)
    print(f"torch {torch.__version__}, {rows[0]['device'] if rows else ''}")
    print(format_table(rows))

if __name__ == "__main__":
    main()
