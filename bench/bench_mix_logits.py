"""Benchmark ``lmf.ops.mix_logits`` (DESIGN.md operation 3) against the machine's copy bandwidth and
the best pure-torch formulations, side by side in one run.

    python bench/bench_mix_logits.py [--quick] [--threads N]

Bytes moved: E*V logits read + V fp32 scores written per sequence (greedy / sample: the read only).
GB/s = bytes / median time (the min is printed too: the machine is shared). The copy floor is ``torch.empty_like(z).copy_(z)`` counting read + write.
Providers per (mode, dtype):
  ours           mix_logits (scores [B, V]);  ours-greedy / ours-sample: the fused token pickers
  torch          "probs": logsumexp(log_softmax(z) + log w);  "logits": einsum("be,bev->bv", w, z)
  torch-greedy   the torch formulation followed by argmax
``run(quick) -> list[dict]`` returns the rows (one dict per provider) for other scripts.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from loramix_fast.ops.mix_logits import mix_logits, mix_logits_greedy, mix_logits_sample
from loramix_fast.ops._dispatch import pick_backend


def _times(fn, reps: int, warmup: int = 3) -> tuple[float, float]:
    """(median, min) seconds; the min shows what a quiet machine gives (this one is shared)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def _torch_probs(z, w):
    return torch.logsumexp(torch.log_softmax(z.float(), dim=-1) + w.log()[..., None], dim=1)


def _torch_logits(z, w):
    return torch.einsum("be,bev->bv", w, z.float())


def run(quick: bool = False, B: int = 16, E: int = 4, V: int = 128256) -> list[dict]:
    reps = 7 if quick else 25
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    rows = []
    for dtype in dtypes:
        # inputs rotated between calls (never zeros), so no call finds the previous one's data in cache
        n_in = 2
        zs = [(torch.randn(B, E, V) * 3).to(dtype) for _ in range(n_in)]
        ws = [torch.rand(B, E) + 0.05 for _ in range(n_in)]
        it = {"i": 0}

        def nxt():
            it["i"] = (it["i"] + 1) % n_in
            return zs[it["i"]], ws[it["i"]]

        elt = zs[0].element_size()
        read = B * E * V * elt
        written = B * V * 4
        dst = torch.empty_like(zs[0])
        t_copy, t_copy_min = _times(lambda: dst.copy_(nxt()[0]), reps)
        copy_gbs = 2 * read / t_copy / 1e9
        rows.append(dict(op="copy", mode="-", dtype=str(dtype).replace("torch.", ""), B=B, E=E, V=V,
                         ms=t_copy * 1e3, ms_min=t_copy_min * 1e3, GBps=copy_gbs, pct_copy=100.0,
                         backend="torch"))
        backend = pick_backend(zs[0])
        for mode in ("probs", "logits"):
            ref_fn = _torch_probs if mode == "probs" else _torch_logits
            cases = [
                ("ours", lambda: mix_logits(*nxt(), mode), read + written),
                ("ours-greedy", lambda: mix_logits_greedy(*nxt(), mode), read),
                ("ours-sample", lambda: mix_logits_sample(*nxt(), mode), read),
                ("torch", lambda: ref_fn(*nxt()), read + written),
                ("torch-greedy", lambda: ref_fn(*nxt()).argmax(1), read),
            ]
            times = {}
            for name, fn, nbytes in cases:
                t, t_min = _times(fn, reps)
                times[name] = t
                gbs = nbytes / t / 1e9
                rows.append(dict(op=name, mode=mode, dtype=str(dtype).replace("torch.", ""), B=B, E=E,
                                 V=V, ms=t * 1e3, ms_min=t_min * 1e3, GBps=gbs, pct_copy=100.0 * gbs / copy_gbs,
                                 backend="torch" if name.startswith("torch") else backend))
            for r in rows[-len(cases):]:
                base = "torch-greedy" if r["op"] in ("ours-greedy", "ours-sample") else "torch"
                r["speedup_vs_torch"] = times[base] / (r["ms"] / 1e3)
    return rows


def _table(rows: list[dict]) -> str:
    head = (f"{'op':13s} {'mode':6s} {'dtype':8s} {'backend':9s} {'ms':>8s} {'ms min':>8s} {'GB/s':>7s} "
            f"{'%copy':>6s} {'x torch':>8s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        sp = r.get("speedup_vs_torch")
        lines.append(f"{r['op']:13s} {r['mode']:6s} {r['dtype']:8s} {r['backend']:9s} {r['ms']:8.3f} "
                     f"{r['ms_min']:8.3f} "
                     f"{r['GBps']:7.1f} {r['pct_copy']:6.1f} {'' if sp is None else f'{sp:8.2f}'}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--E", type=int, default=4)
    ap.add_argument("--V", type=int, default=128256)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.quick, args.B, args.E, args.V)
    print(f"mix_logits  B={args.B} E={args.E} V={args.V}  | {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(_table(rows))


if __name__ == "__main__":
    main()
