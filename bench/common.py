"""Shared benchmark plumbing: side-by-side timing and the machine description."""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time

import torch


@contextlib.contextmanager
def env(values: dict, clear=()):
    """Environment variables ``values`` set (and ``clear`` unset first) for the block, every one
    restored after: the C++ op's knobs, read per call."""
    old = {k: os.environ.get(k) for k in (*clear, *values)}
    try:
        for k in clear:
            os.environ.pop(k, None)
        os.environ.update(values)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def time_side_by_side(fns: dict, reps: int, warmup: int = 3, sync=lambda: None,
                      with_p10: bool = False, clock=time.perf_counter) -> dict:
    """fns: name -> zero-arg callable or list of them (rotated inputs), timed round-robin so every
    provider sees the same machine state; returns name -> median seconds after warm-up, or
    (median, 10th percentile) with ``with_p10`` (the p10 shows the uncontended time).
    ``clock``: wall time by default; ``time.thread_time`` (this thread's CPU time) leaves out the
    time a single-threaded call spends descheduled on an oversubscribed machine."""
    times = {k: [] for k in fns}
    for it in range(warmup + reps):
        for k, calls in fns.items():
            f = calls[it % len(calls)] if isinstance(calls, (list, tuple)) else calls
            sync()
            t0 = clock()
            f()
            sync()
            dt = clock() - t0
            if it >= warmup:
                times[k].append(dt)
    if with_p10:
        return {k: (statistics.median(v), sorted(v)[len(v) // 10]) for k, v in times.items()}
    return {k: statistics.median(v) for k, v in times.items()}


def machine(device: str = "cpu") -> str:
    """One line: CPU (or GPU) model, core count, torch version and threads."""
    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu, named = platform.processor() or platform.machine(), False
    flags: set = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not named:
                cpu, named = line.split(":", 1)[1].strip(), True
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    # the bf16 matrix unit decides which 16-bit GEMMs win (torch's oneDNN on AMX tiles or not)
    isa = ("AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16, no AMX" if "avx512_bf16" in flags
           else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "")
    if isa:
        cpu = f"{cpu} ({isa})"
    return (f"{cpu}, {os.cpu_count()} cpus, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), python {platform.python_version()}")


def load_line(before: float | None = None) -> str:
    """'load average (1 min) A -> B on N cpus' (A: ``before``, taken when the run began)."""
    now = os.getloadavg()[0]
    was = f"{before:.1f} -> " if before is not None else ""
    return f"load average (1 min) {was}{now:.1f} on {os.cpu_count()} cpus"


def splice_section(title: str, body: str, path, *, after: str | None = None,
                   before=(), match: str | None = None) -> None:
    """Replace (or add) the ``## {title}`` section of a RESULTS.md with ``body`` (the markdown
    under the heading), leaving the other sections as they are.

    match: a section whose heading starts with ``match`` is the one replaced (default: the heading
    equals ``title``), for headings that carry a varying detail such as a thread count.
    Placement: right after the section titled ``after`` when there is one; else before the first
    section whose title is in ``before`` (e.g. the ones bench/run_all.py lists after this one);
    else at the end. A replaced section moves there too."""
    from pathlib import Path

    path = Path(path)
    section = f"## {title}\n\n{body.strip(chr(10))}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    head, *rest = text.split("\n## ")

    def same(h):
        return h.startswith(match) if match is not None else h == title

    kept = ["## " + c.rstrip() + "\n" for c in rest if not same(c.split("\n", 1)[0].strip())]
    titles = [k.split("\n", 1)[0][3:].strip() for k in kept]
    if after in titles:
        pos = titles.index(after) + 1
    else:
        later = set(before)
        pos = next((i for i, t in enumerate(titles) if t in later), len(kept))
    kept.insert(pos, section)
    path.write_text("\n".join([head.rstrip() + "\n"] + kept))


def write_section(title: str, table: str, path, after: str | None = None, before=()) -> None:
    """Replace (or add) the ``## {title}`` section of a RESULTS.md with ``table`` in a code fence,
    leaving the other sections as they are (placement: :func:`splice_section`)."""
    splice_section(title, f"```\n{table}\n```", path, after=after, before=before)


def paths_main(argv, doc: str, Ms, run, format_table, title: str, results) -> int:
    """The command line of the op-path benchmarks (bench_gemm16_paths, bench_gemm32_paths):
    ``[--M 1,16] [--reps N] [--no-write]``; prints the table and writes its section of
    ``results`` unless ``--no-write``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--M", default=",".join(map(str, Ms)), help="comma-separated row counts")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    rows = run(tuple(int(m) for m in a.M.split(",")), reps=a.reps)
    table = format_table(rows, load_line(load0))
    print(table)
    if not a.no_write:
        write_section(title, table, results)
        print(f"wrote the '{title}' section of {results}")
    return 0
