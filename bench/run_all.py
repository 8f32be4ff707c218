"""Run every benchmark and write bench/RESULTS.md (``make bench``; ``--quick`` for a short run).

    python -m bench.run_all [--quick] [--only model,op,...] [--out bench/RESULTS.md]

Each section is produced by its module's ``run(quick) -> list[dict]`` and ``format_table(rows)``;
numbers are medians of side-by-side runs after warm-up, on the machine named in the header.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine, splice_section  # noqa: E402

BF16 = {"dtype": torch.bfloat16}
SECTIONS = {  # key: (module, title[, keyword arguments of run])
    "op": ("bench.bench_multi_lora_op", "Multi-LoRA linear, op level (d=2048, r=16, 32 adapters)"),
    "op_bf16": ("bench.bench_multi_lora_op",
                "Multi-LoRA linear, op level, bf16 (d=2048, r=16, 32 adapters)",
                {**BF16, "Ms": (1, 16, 256, 1024), "pops": ("distinct",),
                 "providers": ("base", "ours", "peft")}),
    "model": ("bench.bench_model", "Multi-tenant model, decode and prefill (Llama hidden 1024)"),
    "model_bf16": ("bench.bench_model",
                   "Multi-tenant model, bf16, decode and prefill (Llama hidden 1024)", BF16),
    # one thread, timed by its CPU time (clock="cpu"): on a shared, oversubscribed machine a
    # 2-thread region waits for its descheduled thread, and wall time counts the waits
    "op_bf16_1t": ("bench.bench_multi_lora_op",
                   "Multi-LoRA linear, op level, bf16, 1 thread (d=2048, r=16, 32 adapters)",
                   {**BF16, "Ms": (1, 16, 256, 1024), "pops": ("distinct",), "threads": 1,
                    "providers": ("base", "ours", "peft"), "clock": "cpu"}),
    "model_bf16_1t": ("bench.bench_model",
                      "Multi-tenant model, bf16, 1 thread, decode and prefill (Llama hidden 1024)",
                      {**BF16, "threads": 1, "clock": "cpu"}),
    # the same on a CPU with AMX-BF16 tiles, where torch's bf16 GEMM is oneDNN on the tiles (the
    # sections above ran on AVX512-BF16 without AMX): kept side by side, each with its machine
    "op_bf16_amx": ("bench.bench_multi_lora_op",
                    "Multi-LoRA linear, op level, bf16, AMX-BF16 CPU (d=2048, r=16, 32 adapters)",
                    {**BF16, "Ms": (1, 16, 256, 1024, 2048), "pops": ("distinct",),
                     "providers": ("base", "ours", "peft")}),
    "op_amx": ("bench.bench_multi_lora_op",
               "Multi-LoRA linear, op level, fp32, on the AMX-BF16 VM (d=2048, r=16, 32 adapters)",
               {"Ms": (1, 16, 256, 1024), "pops": ("distinct",),
                "providers": ("base", "ours", "peft")}),
    "model_amx": ("bench.bench_model",
                  "Multi-tenant model, fp32, on the AMX-BF16 VM, decode and prefill (Llama hidden 1024)"),
    "model_bf16_amx": ("bench.bench_model",
                       "Multi-tenant model, bf16, AMX-BF16 CPU, decode and prefill (Llama hidden 1024)",
                       BF16),
    "routing": ("bench.bench_routing_layer", "Routed layer: SpectR/Arrow (d=2048, T=32, r=8, k=4)"),
    "spectr_op": ("bench.bench_spectr_op", "spectr_topk scoring op"),
    "study": ("bench.routing_study", "Synthetic routing accuracy: SpectR vs Arrow"),
    # trains four SmolLM2 experts the first time (~15 min on 2 cores; cached in .cache/experts)
    "real": ("bench.routing_real", "routing on trained SmolLM2 experts"),
    "mix": ("bench.bench_mix_logits", "mix_logits (B=16, E=4, V=128256)"),
    "ensemble": ("bench.bench_ensemble", "ensemble_generate (4 experts x 4 sequences)"),
}


def _table(mod, rows):
    for name in ("format_table", "_table"):
        f = getattr(mod, name, None)
        if f is not None:
            return f(rows)
    return "\n".join(str(r) for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated sections to rerun (the others are "
                    "kept from the existing file): " + ",".join(SECTIONS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    a = ap.parse_args(argv)
    keys = [k for k in a.only.split(",") if k] or list(SECTIONS)
    header = (f"# Benchmark results\n\nMachine: {machine()}  \nDate: "
              f"{datetime.date.today()}; mode: {'quick' if a.quick else 'full'}; fp32 unless noted. "
              "Medians of side-by-side runs after warm-up; ratios are the numbers to compare (this "
              "machine is shared and noisy).\n")
    out = Path(a.out)
    if not a.only or not out.exists():  # a full run renews the header (machine, date)
        text = out.read_text() if out.exists() else ""
        i = text.find("\n## ")
        out.write_text(header + (text[i:] if i >= 0 else ""))
    order = [v[1] for v in SECTIONS.values()]
    for k in keys:
        modname, title, *kw = SECTIONS[k]
        t0 = time.perf_counter()
        mod = importlib.import_module(modname)
        rows = mod.run(a.quick, **(kw[0] if kw else {}))
        table = _table(mod, rows)
        print(f"== {title} ({time.perf_counter() - t0:.0f}s)\n{table}\n", flush=True)
        # spliced in: every other section (other benchmarks' and hand-written ones) stays as it is;
        # a new one goes before the first of those listed after it here
        splice_section(title, f"```\n{table}\n```", out, before=order[order.index(title) + 1:])
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
