"""Adapter pool benchmark (issue 13): adapters added one at a time while serving, CPU fp32.

    python bench/bench_pool.py [--quick] [--n 256] [--ranks 8|mixed]

A patched 6-layer Llama as wide as SmolLM2-135M (hidden 576, intermediate 1536, 9 heads, 3 KV
heads, vocab 49152, tied embeddings; random weights), starting from an empty library. Adapters of
rank 8 (``--ranks mixed``: 4-64) on every linear layer are added one at a time with ``lib.add``
while the model serves: after each add, one forward of 4 sequences x 16 tokens whose adapters are
the four newest (the new one included), then the same forward again (the plain forward: nothing
changed in between). Reported per range of library sizes:

    add+fwd - fwd   median of (time of the add + the forward after it) - (the plain forward), ms
    fwd             median plain forward, ms
    held / bytes    growth of the process's resident memory since the empty library, and the
                    library's own tensor bytes (``lib.nbytes()`` where it exists), against the
                    adapters' fp32 bytes (sum of r x (K + N) x 4 over their modules)

``run(quick) -> list[dict]``; ``format_table(rows)``.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import loramix_fast as lmf  # noqa: E402
from bench.common import machine  # noqa: E402

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 576, 1536, 6, 9, 3, 49152
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIXED = (4, 8, 16, 32, 64)
BATCH, TOKENS = 4, 16


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, tie_word_embeddings=True,
                      max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def _shapes(model) -> dict:
    """{module path: (K, N)} of every target linear."""
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS}


def _factors(shapes: dict, r: int, g: torch.Generator) -> dict:
    return {mod: lmf.LoRAFactors(torch.randn(r, K, generator=g) / K ** 0.5,
                                 torch.randn(N, r, generator=g) * 0.01, 2.0)
            for mod, (K, N) in shapes.items()}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _lib_bytes(lib):
    f = getattr(lib, "nbytes", None)
    if f is not None:
        return f()
    seen, total = set(), 0  # the library before issue 13: factors + cached stacks
    ts = [t for fs in lib._adapters.values() for x in fs.values() for t in (x.A, x.B)]
    ts += [t for s in lib._stacks.values() if hasattr(s, "A") for t in (s.A, s.B)]
    for t in ts:
        p = t.untyped_storage().data_ptr()
        if p not in seen:
            seen.add(p)
            total += t.untyped_storage().nbytes()
    return total


def run(quick: bool = False, n: int | None = None, ranks: str = "8") -> list[dict]:
    n = n or (160 if quick else 256)
    model = build()
    shapes = _shapes(model)
    lib = lmf.AdapterLibrary()
    lmf.patch(model, lib)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (BATCH, TOKENS), generator=g)
    rank_of = (lambda i: 8) if ranks == "8" else (lambda i: MIXED[(i * 7) % len(MIXED)])
    steps = []
    with torch.inference_mode():
        for _ in range(3):
            model(ids)  # warm-up: the base path
        gc.collect()
        rss0 = _rss()
        adapter_bytes = 0
        for i in range(n):
            r = rank_of(i)
            fs = _factors(shapes, r, g)
            adapter_bytes += sum(f.A.numel() * 4 + f.B.numel() * 4 for f in fs.values())
            names = [f"a{max(0, i - j)}" for j in range(BATCH)]
            c0, t0 = time.process_time(), time.perf_counter()
            lib.add(f"a{i}", fs)
            c1, t1 = time.process_time(), time.perf_counter()
            model(ids, adapter_names=names)
            c2, t2 = time.process_time(), time.perf_counter()
            model(ids, adapter_names=names)
            c3, t3 = time.process_time(), time.perf_counter()
            del fs
            steps.append(dict(n=i + 1, add=t1 - t0, first=t2 - t1, plain=t3 - t2,
                              cpu_extra=(c2 - c0) - (c3 - c2), cpu_plain=c3 - c2,
                              rss=_rss() - rss0, bytes=adapter_bytes, lib=_lib_bytes(lib)))
    rows = []
    for lo, hi in ((1, 64), (65, 128), (129, 256), (257, 512), (513, 1024)):
        sel = [s for s in steps if lo <= s["n"] <= hi]
        if not sel:
            continue
        last = sel[-1]
        rows.append(dict(
            lo=lo, hi=min(hi, last["n"]), ranks=ranks,
            extra_ms=statistics.median(s["add"] + s["first"] - s["plain"] for s in sel) * 1e3,
            add_ms=statistics.median(s["add"] for s in sel) * 1e3,
            max_extra_ms=max(s["add"] + s["first"] - s["plain"] for s in sel) * 1e3,
            fwd_ms=statistics.median(s["plain"] for s in sel) * 1e3,
            p10_extra_ms=sorted(s["add"] + s["first"] - s["plain"] for s in sel)[len(sel) // 10]
            * 1e3,
            cpu_extra_ms=statistics.median(s["cpu_extra"] for s in sel) * 1e3,
            cpu_fwd_ms=statistics.median(s["cpu_plain"] for s in sel) * 1e3,
            rss_ratio=last["rss"] / last["bytes"],
            max_rss_ratio=max(s["rss"] / s["bytes"] for s in sel),
            lib_ratio=last["lib"] / last["bytes"],
            max_lib_ratio=max(s["lib"] / s["bytes"] for s in sel),
            mb=last["bytes"] / 2 ** 20, threads=torch.get_num_threads()))
    return rows


def format_table(rows: list[dict]) -> str:
    out = [f"{'adapters':<10}{'ranks':<6}{'add+fwd-fwd':>12}{'p10':>8}{'max':>8}{'cpu':>8}"
           f"{'add':>8}{'fwd':>9}{'cpu fwd':>9}{'rss/bytes':>10}{'max':>6}{'lib/bytes':>10}"
           f"{'max':>6}{'MB':>6}"]
    for r in rows:
        out.append(f"{r['lo']:>4}-{r['hi']:<5}{r['ranks']:<6}{r['extra_ms']:>10.1f}ms"
                   f"{r['p10_extra_ms']:>6.1f}ms{r['max_extra_ms']:>6.0f}ms"
                   f"{r['cpu_extra_ms']:>6.1f}ms{r['add_ms']:>6.1f}ms{r['fwd_ms']:>7.1f}ms"
                   f"{r['cpu_fwd_ms']:>7.1f}ms{r['rss_ratio']:>10.2f}{r['max_rss_ratio']:>6.2f}"
                   f"{r['lib_ratio']:>10.2f}{r['max_lib_ratio']:>6.2f}{r['mb']:>6.0f}")
    out.append("add+fwd-fwd: median over the range of (the add + the forward after it) - the plain "
               "forward, wall clock (p10: its 10th percentile, max: its worst: a capacity growth); "
               "cpu: the same in process CPU time; rss / lib: the process's resident-memory growth "
               "/ the library's tensor bytes over the adapters' fp32 bytes at the end of the range "
               "(max: over it); MB: the adapters' fp32 bytes at the end")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--ranks", default="8", choices=["8", "mixed"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = run(a.quick, a.n, a.ranks)
    print(machine())
    print(format_table(rows))


if __name__ == "__main__":
    main()
