"""Adapter pool benchmark (issue 13): serving hundreds to a thousand adapters, CPU fp32.

    python bench/bench_pool.py [--quick] [--write] [--parts serve,scale,mixed,decode,zipf]

Models: Llamas with SmolLM2-135M's shapes (hidden 576, intermediate 1536, 9 heads, 3 KV heads,
vocab 49152, tied embeddings; random weights: timing and memory do not depend on the values).

serve   6 layers, every linear targeted, rank 8 (the issue's measurement): adapters are added one
        at a time with ``lib.add`` while the model serves. After each add (below 129: every
        16th), one forward of 4
        sequences x 16 tokens whose adapters are the four newest (the new one included), then
        the same forward again (the plain forward: nothing changed in between). Per range of
        library sizes:
          add+fwd - fwd   median of (the add + the forward after it) - (the plain forward), ms
          fwd             median plain forward, ms
          rss / lib       growth of the process's resident memory since the empty library, and
                          the library's own tensor bytes (``lib.nbytes()``), over the adapters'
                          fp32 bytes (sum of r x (K + N) x 4 over their modules)
scale   30 layers (all of SmolLM2), q_proj + v_proj (peft's default targets for Llama), 1,000
        adapters of rank 8 (``mixed``: ranks 4-64, fewer adapters: the pool pads a module to
        its largest rank, so a mixed library holds every slot at 64): time per add per range of
        library sizes, memory against the adapters' bytes; every 50th add, the add + the next
        decode forward (4 sequences x 1 token) against the plain one.
decode  the same model, 256 sequences, 4 tokens of context (KV cache), one decode step with
        16 / 64 / 256 distinct adapters in the batch against the base model's step.
zipf    residency: 1,000 adapters on the host, ``max_resident`` 32 / 128 on the "device" (the
        CPU pool here), a Zipf(1.1) request stream in batches of 16 sequences (one decode
        forward of 1 token each, no cache), 60 batches; loads (misses) per batch, hit rate, forward time of
        batches with and without a miss, against the same stream with every adapter resident.

``run(quick) -> list[dict]``; ``format_table(rows)``; ``--write`` replaces this benchmark's
section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import loramix_fast as lmf  # noqa: E402
from bench.common import load_line, machine, time_side_by_side  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 576, 1536, 9, 3, 49152
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QV = ("q_proj", "v_proj")
MIXED = (4, 8, 16, 32, 64)
BATCH, TOKENS = 4, 16
TITLE = "Adapter pool: hundreds to a thousand adapters (SmolLM2 shapes)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def build(layers: int = 6):
    """A Llama with SmolLM2-135M's shapes and ``layers`` layers (30: all of SmolLM2), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, tie_word_embeddings=True,
                      max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def _shapes(model, targets=ALL_TARGETS) -> dict:
    """{module path: (K, N)} of every target linear."""
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets}


def _factors(shapes: dict, r: int, g: torch.Generator) -> dict:
    return {mod: lmf.LoRAFactors(torch.randn(r, K, generator=g) / K ** 0.5,
                                 torch.randn(N, r, generator=g) * 0.01, 2.0)
            for mod, (K, N) in shapes.items()}


def _nbytes(fs: dict) -> int:
    return sum(f.A.numel() * 4 + f.B.numel() * 4 for f in fs.values())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _settle() -> int:
    """RSS after a collection and glibc's heap trim (freed blocks given back)."""
    gc.collect()
    lmf.pool._DIRTY = True
    lmf.pool.trim()
    return _rss()


def _rank_of(ranks: str):
    return (lambda i: 8) if ranks == "8" else (lambda i: MIXED[(i * 7) % len(MIXED)])


def _warm_up(model, shapes, ids) -> None:
    """Base and adapter forwards on a throw-away library (the first adapter forward of a process
    loads, or JIT-builds, the C++ extension), then the model's own library back."""
    st = model._loramix_state
    lib, router = st.lib, st.router
    lmf.unpatch(model, guard=False)
    tmp = lmf.AdapterLibrary()
    tmp.add("warm", _factors(shapes, 8, torch.Generator().manual_seed(99)))
    lmf.patch(model, tmp)
    for _ in range(2):
        model(ids)
        model(ids, adapter_names="warm")
    lmf.unpatch(model, guard=False)
    lmf.patch(model, lib, router=router)


# ---- serve: add while serving (the measurement and bar) ----------------------------
def run_serve(n: int = 256, ranks: str = "8", measure_from: int = 65) -> list[dict]:
    model = build(6)
    shapes = _shapes(model)
    lib = lmf.AdapterLibrary()
    lmf.patch(model, lib)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (BATCH, TOKENS), generator=g)
    rank_of = _rank_of(ranks)
    steps = []
    with torch.inference_mode():
        _warm_up(model, shapes, ids)
        rss0 = _settle()
        adapter_bytes = 0
        for i in range(n):
            fs = _factors(shapes, rank_of(i), g)
            adapter_bytes += _nbytes(fs)
            names = [f"a{max(0, i - j)}" for j in range(BATCH)]
            if i + 1 < measure_from and (i + 1) % 16:
                lib.add(f"a{i}", fs)  # (below measure_from: one forward every 16 adds)
                continue
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
                              rss=_rss() - rss0, bytes=adapter_bytes, lib=lib.nbytes()))
    rows = []
    for lo, hi in ((1, 64), (65, 128), (129, 256), (257, 512), (513, 1024)):
        sel = [s for s in steps if lo <= s["n"] <= hi]
        if not sel:
            continue
        last = sel[-1]
        extra = sorted(s["add"] + s["first"] - s["plain"] for s in sel)
        rows.append(dict(
            part="serve", lo=lo, hi=min(hi, last["n"]), ranks=ranks,
            extra_ms=statistics.median(extra) * 1e3, p10_extra_ms=extra[len(sel) // 10] * 1e3,
            max_extra_ms=extra[-1] * 1e3,
            add_ms=statistics.median(s["add"] for s in sel) * 1e3,
            fwd_ms=statistics.median(s["plain"] for s in sel) * 1e3,
            cpu_extra_ms=statistics.median(s["cpu_extra"] for s in sel) * 1e3,
            cpu_fwd_ms=statistics.median(s["cpu_plain"] for s in sel) * 1e3,
            rss_ratio=last["rss"] / last["bytes"],
            max_rss_ratio=max(s["rss"] / s["bytes"] for s in sel),
            lib_ratio=last["lib"] / last["bytes"],
            max_lib_ratio=max(s["lib"] / s["bytes"] for s in sel),
            mb=last["bytes"] / 2 ** 20))
    return rows


# ---- scale: a thousand adapters on all 30 layers -------------------------------------------
def run_scale(model, n: int, ranks: str = "8", keep: bool = False):
    """Adds ``n`` adapters (q/v of every layer) to an empty library patched into ``model``;
    returns (rows, lib if keep else None)."""
    shapes = _shapes(model, QV)
    lib = lmf.AdapterLibrary()
    lmf.patch(model, lib)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (BATCH, 1), generator=g)
    rank_of = _rank_of(ranks)
    adds, extra, fwd = [], [], []
    with torch.inference_mode():
        _warm_up(model, shapes, ids)
        rss0 = _settle()
        adapter_bytes = 0
        for i in range(n):
            fs = _factors(shapes, rank_of(i), g)
            adapter_bytes += _nbytes(fs)
            t0 = time.perf_counter()
            lib.add(f"a{i}", fs)
            t1 = time.perf_counter()
            del fs
            adds.append((i + 1, t1 - t0))
            if (i + 1) % 50 == 0:
                names = [f"a{max(0, i - j)}" for j in range(BATCH)]
                model(ids, adapter_names=names)
                t2 = time.perf_counter()
                model(ids, adapter_names=names)
                t3 = time.perf_counter()
                extra.append((t1 - t0) + (t2 - t1) - (t3 - t2))
                fwd.append(t3 - t2)
        rss = _settle() - rss0
    rows = []
    ranges = [(1, 100), (101, 250), (251, 500), (501, 1000)]
    for lo, hi in ranges:
        sel = sorted(t for k, t in adds if lo <= k <= hi)
        if not sel:
            continue
        rows.append(dict(part="scale", ranks=ranks, lo=lo, hi=min(hi, n),
                         layers=len(model.model.layers),
                         add_ms=statistics.median(sel) * 1e3,
                         p90_add_ms=sel[int(len(sel) * 0.9)] * 1e3, max_add_ms=sel[-1] * 1e3))
    rows.append(dict(part="scale_mem", ranks=ranks, n=n, layers=len(model.model.layers), mb=adapter_bytes / 2 ** 20,
                     per_adapter_kb=adapter_bytes / n / 2 ** 10,
                     rss_per_adapter_kb=rss / n / 2 ** 10, rss_ratio=rss / adapter_bytes,
                     lib_ratio=lib.nbytes() / adapter_bytes,
                     extra_ms=statistics.median(extra) * 1e3 if extra else float("nan"),
                     fwd_ms=statistics.median(fwd) * 1e3 if fwd else float("nan")))
    if not keep:
        lmf.unpatch(model, guard=False)
        del lib
        _settle()
        return rows, None
    return rows, lib


# ---- decode: distinct adapters in one batch ------------------------------------------------
def run_decode(model, batch: int, distinct=(16, 64, 256), reps: int = 5) -> list[dict]:
    """One decode step of ``batch`` sequences (4 tokens of context) with ``d`` distinct adapters
    (sequence j gets adapter ``a{j % d}``) against the base model's step; ``model`` is patched
    with a library holding at least max(distinct) adapters ``a0, a1, ...``."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, VOCAB, (batch, 4), generator=g)
    step = torch.randint(3, VOCAB, (batch, 1), generator=g)
    with torch.inference_mode():
        cache = DynamicCache()
        model(prompt, past_key_values=cache, use_cache=True)

        def call(names):
            kw = {} if names is None else {"adapter_names": names}

            def f():
                model(step, past_key_values=cache, use_cache=True, **kw)
                cache.crop(-1)  # drop the step: every call sees the same context
            return f

        fns = {"base": call(None)}
        for d in distinct:
            if d <= batch:
                fns[d] = call([f"a{j % d}" for j in range(batch)])
        tm = time_side_by_side(fns, reps=reps, warmup=1, with_p10=True)
    base = tm["base"]
    rows = []
    for k, (med, p10) in tm.items():
        rows.append(dict(part="decode", distinct=0 if k == "base" else k, batch=batch,
                         layers=len(model.model.layers),
                         ms=med * 1e3, p10_ms=p10 * 1e3, ratio=med / base[0],
                         ratio_p10=p10 / base[1]))
    return rows


# ---- zipf: residency under a skewed request stream -----------------------------------------
def _zipf_stream(n_adapters: int, batches: int, per: int, a: float = 1.1, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, n_adapters + 1, dtype=torch.float64) ** a
    perm = torch.randperm(n_adapters, generator=g)  # popularity is not the add order
    draws = torch.multinomial(p, batches * per, replacement=True, generator=g)
    return perm[draws].view(batches, per).tolist()


def _serve_stream(model, lib, stream, label) -> dict:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (len(stream[0]), 1), generator=g)
    key = None
    hit_t, miss_t, loads = [], [], []
    with torch.inference_mode():
        model(ids, adapter_names=[f"a{i}" for i in stream[0]])  # warm-up (not counted)
        res0 = lib.residency()
        key = next(iter(res0), None)
        before = res0[key]["loads"] if key else 0
        hits0 = res0[key]["hits"] if key else 0
        for b in stream[1:]:
            t0 = time.perf_counter()
            model(ids, adapter_names=[f"a{i}" for i in b])
            dt = time.perf_counter() - t0
            now = lib.residency()[key]["loads"] if key else 0
            loads.append(now - before)
            before = now
            (miss_t if loads[-1] else hit_t).append(dt)
        r = lib.residency()[key] if key else None
    reqs = sum(len(set(b)) for b in stream[1:])
    med = (lambda v: statistics.median(v) * 1e3 if v else float("nan"))
    return dict(part="zipf", label=label, batches=len(stream) - 1,
                distinct_per_batch=reqs / (len(stream) - 1),
                loads_per_batch=sum(loads) / len(loads) if loads else 0.0,
                miss_batches=sum(1 for x in loads if x) / len(loads),
                hit_rate=((r["hits"] - hits0) / max(1, r["hits"] - hits0 + sum(loads)))
                if r else 1.0,
                evictions=r["evictions"] if r else 0,
                hit_ms=med(hit_t), miss_ms=med(miss_t), all_ms=med(hit_t + miss_t))


def run_zipf(model, n: int, limits, stream) -> list[dict]:
    """The request ``stream`` (batches of adapter ids) over ``n`` rank-8 adapters (q/v) on the
    host, with at most ``limit`` of them resident, for each limit."""
    rows = []
    shapes = _shapes(model, QV)
    for limit in limits:
        g = torch.Generator().manual_seed(1)
        lib = lmf.AdapterLibrary(max_resident=limit)
        for i in range(n):
            lib.add(f"a{i}", _factors(shapes, 8, g))
        lmf.patch(model, lib)
        rows.append(_serve_stream(model, lib, stream, f"max_resident={limit}"))
        lmf.unpatch(model, guard=False)
        del lib
        _settle()
    return rows


def _progress(what: str, t0: float) -> None:
    print(f"[bench_pool] {what} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr,
          flush=True)


def run(quick: bool = False, parts=("serve", "scale", "mixed", "decode", "zipf")) -> list[dict]:
    t00 = time.perf_counter()
    load0 = os.getloadavg()[0]
    rows = []
    if "serve" in parts:
        rows += run_serve(160 if quick else 256, measure_from=129)
        _settle()
        _progress("serve", t00)
    big = None
    if {"scale", "mixed", "decode", "zipf"} & set(parts):
        big = build(30)
    n_big = 300 if quick else 1000
    lib = None
    if {"scale", "decode", "zipf"} & set(parts):
        r, lib = run_scale(big, n_big, "8", keep=True)
        rows += r if "scale" in parts else []
        _progress("scale", t00)
    if "decode" in parts:
        rows += run_decode(big, 64 if quick else 256, (16, 64) if quick else (16, 64, 256),
                           reps=2 if quick else 3)
        _progress("decode", t00)
    if lib is not None:
        n_batches = 30 if quick else 60
        stream = _zipf_stream(n_big, n_batches + 1, 16)
        if "zipf" in parts:  # the same stream with every adapter resident
            rows.append(_serve_stream(big, lib, stream, "all resident"))
        lmf.unpatch(big, guard=False)
        lib = None
        _settle()
        if "zipf" in parts:
            rows += run_zipf(big, n_big, (32, 128), stream)
            _progress("zipf", t00)
    if "mixed" in parts:
        rows += run_scale(big, 100 if quick else 128, "mixed")[0]
        _progress("mixed", t00)
    where = (f"{machine()}; {load_line(load0)}; {time.perf_counter() - t00:.0f} s")
    for row in rows:
        row["machine"] = where
    return rows


def format_table(rows: list[dict]) -> str:
    out = []
    if rows:
        out.append(rows[0]["machine"])
    serve = [r for r in rows if r["part"] == "serve"]
    if serve:
        out.append("")
        out.append("serve: 6 layers, every linear, rank 8; lib.add while serving 4 x 16 tokens")
        out.append(f"{'adapters':<10}{'add+fwd-fwd':>12}{'p10':>8}{'max':>8}{'cpu':>8}"
                   f"{'add':>8}{'fwd':>9}{'cpu fwd':>9}{'rss/bytes':>10}{'max':>6}"
                   f"{'lib/bytes':>10}{'max':>6}{'MB':>6}")
        for r in serve:
            out.append(f"{r['lo']:>4}-{r['hi']:<5}{r['extra_ms']:>10.1f}ms"
                       f"{r['p10_extra_ms']:>6.1f}ms{r['max_extra_ms']:>6.0f}ms"
                       f"{r['cpu_extra_ms']:>6.1f}ms{r['add_ms']:>6.1f}ms{r['fwd_ms']:>7.1f}ms"
                       f"{r['cpu_fwd_ms']:>7.1f}ms{r['rss_ratio']:>10.2f}{r['max_rss_ratio']:>6.2f}"
                       f"{r['lib_ratio']:>10.2f}{r['max_lib_ratio']:>6.2f}{r['mb']:>6.0f}")
        out.append("add+fwd-fwd: median over the range of (the add + the forward after it) - "
                   "the plain forward, wall clock (p10: its 10th percentile, max: its worst: a "
                   "capacity growth); cpu: the same in process CPU time; rss / lib: the "
                   "process's resident-memory growth / the library's tensor bytes over the "
                   "adapters' fp32 bytes at the end of the range (max: over it); MB: the "
                   "adapters' fp32 bytes at the end")
    scale = [r for r in rows if r["part"] == "scale"]
    if scale:
        out.append("")
        out.append(f"scale: {scale[0]['layers']} layers (SmolLM2-135M: 30), q_proj + v_proj; "
                   "time per lib.add")
        out.append(f"{'ranks':<7}{'adapters':<11}{'add':>9}{'p90':>9}{'max':>9}")
        for r in scale:
            out.append(f"{r['ranks']:<7}{r['lo']:>4}-{r['hi']:<6}{r['add_ms']:>7.2f}ms"
                       f"{r['p90_add_ms']:>7.2f}ms{r['max_add_ms']:>7.1f}ms")
        out.append(f"{'ranks':<7}{'adapters':>8}{'MB':>8}{'KiB/adapter':>13}{'rss KiB/ad.':>13}"
                   f"{'rss/bytes':>10}{'lib/bytes':>10}{'add+fwd-fwd':>13}{'fwd':>9}")
        for r in rows:
            if r["part"] == "scale_mem":
                out.append(f"{r['ranks']:<7}{r['n']:>8}{r['mb']:>8.0f}{r['per_adapter_kb']:>13.0f}"
                           f"{r['rss_per_adapter_kb']:>13.0f}{r['rss_ratio']:>10.2f}"
                           f"{r['lib_ratio']:>10.2f}{r['extra_ms']:>11.1f}ms"
                           f"{r['fwd_ms']:>7.1f}ms")
        out.append("KiB/adapter: an adapter's fp32 bytes (mixed: the mean); rss: the process's "
                   "growth per adapter; lib: lib.nbytes() (mixed ranks: every slot of a module "
                   "padded to its largest rank, 64, plus spare capacity); add+fwd-fwd: every 50th "
                   "add, (the add + the next forward of 4 x 1 token) - the plain forward, median")
    dec = [r for r in rows if r["part"] == "decode"]
    if dec:
        out.append("")
        out.append(f"decode: {dec[0]['layers']} layers, q/v rank 8, {dec[0]['batch']} sequences x 1 token, 4 "
                   "tokens of KV context")
        out.append(f"{'distinct':<10}{'step':>10}{'p10':>10}{'x base':>8}{'x base p10':>12}")
        for r in dec:
            out.append(f"{r['distinct'] or 'base':<10}{r['ms']:>8.1f}ms{r['p10_ms']:>8.1f}ms"
                       f"{r['ratio']:>8.2f}{r['ratio_p10']:>12.2f}")
    zipf = [r for r in rows if r["part"] == "zipf"]
    if zipf:
        out.append("")
        out.append(f"zipf: {zipf[0]['batches']} batches of 16 requests, Zipf(1.1) over the "
                   "adapters of scale (rank 8), one forward of 16 x 1 token per batch")
        out.append(f"{'pool':<18}{'distinct/b':>11}{'loads/b':>9}{'batches w/ miss':>16}"
                   f"{'hit rate':>9}{'evicted':>8}{'fwd':>9}{'no miss':>9}{'miss':>9}")
        for r in zipf:
            out.append(f"{r['label']:<18}{r['distinct_per_batch']:>11.1f}"
                       f"{r['loads_per_batch']:>9.2f}{r['miss_batches']:>16.0%}"
                       f"{r['hit_rate']:>9.1%}{r['evictions']:>8}{r['all_ms']:>7.1f}ms"
                       f"{r['hit_ms']:>7.1f}ms{r['miss_ms']:>7.1f}ms")
        out.append("loads/b: adapters loaded from the host per batch (misses); hit rate: a "
                   "batch's adapters found resident; fwd / no miss / miss: median forward of all "
                   "batches / those with no load / those with a load")
    return "\n".join(out)


def write_section(table: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the others alone."""
    from bench.common import splice_section

    splice_section(TITLE, f"```\n{table}\n```", path, match=TITLE)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--write", action="store_true", help="replace this section of RESULTS.md")
    p.add_argument("--parts", default="serve,scale,mixed,decode,zipf")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' past_key_values
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = run(a.quick, tuple(a.parts.split(",")))
    table = format_table(rows)
    print(table)
    if a.write:
        write_section(table)
        print(f"wrote the '{TITLE}' section of {RESULTS}")


if __name__ == "__main__":
    main()
