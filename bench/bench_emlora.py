"""EM-LoRA decode cost on SmolLM2-135M-Instruct (issue 11 bar: per generated token at most 1.1x the
base model).

16 sequences, each its own tenant: 16 adapters of rank 32 (alpha 64, random nonzero factors) on all
7 module kinds of the 30 layers, each with its own EM-LoRA (attention pooler, rational activation,
k = 1 of 7 modules per layer). Providers, timed side by side (round-robin, median after warm-up):

- ``base``: the unpatched model (a deep copy);
- ``emlora k=1``: the patched model, ``adapter_names`` = the 16 tenants, EM-LoRAs attached (the
  routing decided on the prompt; per layer and row only the selected module's delta is applied, the
  6 others carry id -1 in the fused op);
- ``lora (7 modules)``: a second patched copy sharing the library, no EM-LoRA (each row gets all
  7 of its module LoRAs): plain multi-tenant LoRA with the same adapters.

Each repetition prefills the prompts in each provider (timed: the prefill column), then runs
``--steps`` greedy decode steps with the KV cache, the providers' steps interleaved (each step of
every provider timed back to back, so they share the machine's load); each patched provider keeps
its ``lmf.route_once`` scope for the loop, as ``generate`` does. ``x base`` is the median over the
steps of (provider step / base step). ``python -m bench.bench_emlora [--steps 16] [--reps 3]
[--dtype fp32|bf16|both] [--no-write]`` writes the ``## EM-LoRA decode cost`` section of
bench/RESULTS.md. Hold the lock:
``flock /tmp/lmf-bench.lock python -m bench.bench_emlora``.
"""
from __future__ import annotations

import argparse
import contextvars
import copy
import os
import statistics
import time
from pathlib import Path

import torch

import loramix_fast as lmf
from bench import common
from bench.common import load_line, machine
from loramix_fast import emlora as E

TITLE = "EM-LoRA decode cost"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def build(dtype=torch.float32, n_seq: int = 16, rank: int = 32, top_k: int = 1):
    """(base model, EM-LoRA model, plain-LoRA model sharing its library, EMLoRAs, names, enc)."""
    from bench import real_experts as RE
    from loramix_fast import smollm2

    model, tok = smollm2.load(dtype)
    base = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    names = [f"t{i}" for i in range(n_seq)]
    specs = {n: lmf.LoRASpec(r=rank, alpha=2 * rank, target_modules="all-linear",
                             init_lora_weights=False) for n in names}
    lib = lmf.AdapterLibrary.create(model, specs, seed=0)
    lmf.patch(model, lib)
    lmf.patch(plain, lib)
    ems = [E.EMLoRA.create(model, n, top_k=top_k, seed=i).to(dtype) for i, n in enumerate(names)]
    E.attach(model, *ems)
    tasks = list(RE.TASKS)
    qs = [RE.make_split(tasks[i % len(tasks)], 1 + i // len(tasks), "test")[-1][0]
          for i in range(n_seq)]
    tok.padding_side = "left"
    enc = tok([RE.prompt_text(tok, q) for q in qs], return_tensors="pt", padding=True,
              add_special_tokens=False)
    return base, model, plain, ems, names, enc


class Decoder:
    """One provider's greedy decode with the KV cache, one step per call, in its own context
    (``lmf.route_once`` entered there for the patched models, as ``generate`` scopes it), so the
    providers' steps can be interleaved and timed under the same machine load."""

    def __init__(self, model, enc, names=None):
        self.model, self.enc, self.names = model, enc, names
        self.ctx = contextvars.copy_context()
        self.scope = lmf.route_once(model) if names is not None else None

    def prefill(self) -> float:
        if self.scope is not None:
            self.ctx.run(self.scope.__enter__)
        kw = {} if self.names is None else {"adapter_names": self.names}
        self.att = self.enc["attention_mask"]
        t0 = time.perf_counter()
        with torch.no_grad():
            self.out = self.ctx.run(self.model, self.enc["input_ids"], attention_mask=self.att,
                                    use_cache=True, **kw)
        return time.perf_counter() - t0

    def step(self) -> float:
        kw = {} if self.names is None else {"adapter_names": self.names}
        with torch.no_grad():
            nxt = self.out.logits[:, -1].argmax(-1, keepdim=True)
            self.att = torch.cat([self.att, torch.ones_like(nxt)], 1)
            t0 = time.perf_counter()
            self.out = self.ctx.run(self.model, nxt, attention_mask=self.att,
                                    cache=self.out.cache, use_cache=True, **kw)
            return time.perf_counter() - t0

    def close(self):
        if self.scope is not None:
            self.ctx.run(self.scope.__exit__, None, None, None)
        self.out = None


def run(steps: int = 16, reps: int = 3, warmup: int = 1, dtype=torch.float32) -> dict:
    base, model, plain, ems, names, enc = build(dtype)
    load0 = os.getloadavg()[0]
    mk = {"base": lambda: Decoder(base, enc), "emlora k=1": lambda: Decoder(model, enc, names),
          "lora (7 modules)": lambda: Decoder(plain, enc, names)}
    pre = {k: [] for k in mk}
    dec = {k: [] for k in mk}
    ratio = {k: [] for k in mk}  # per decode step: provider / base, measured back to back
    for it in range(warmup + reps):
        ds = {k: f() for k, f in mk.items()}
        p = {k: d.prefill() for k, d in ds.items()}
        for _ in range(steps):
            t = {k: d.step() for k, d in ds.items()}
            if it >= warmup:
                for k in mk:
                    dec[k].append(t[k])
                    ratio[k].append(t[k] / t["base"])
        for d in ds.values():
            d.close()
        if it >= warmup:
            for k in mk:
                pre[k].append(p[k])
    res = {k: (statistics.median(pre[k]), statistics.median(dec[k]),
               statistics.median(ratio[k]), _q(ratio[k], 0.1), _q(ratio[k], 0.9)) for k in mk}
    return {"res": res, "dtype": str(dtype).replace("torch.", ""), "steps": steps, "reps": reps,
            "prompt_len": int(enc["input_ids"].shape[1]), "load": load_line(load0),
            "machine": machine()}


def _q(v, q):
    s = sorted(v)
    return s[min(len(s) - 1, int(q * len(s)))]


def format_table(runs) -> str:
    lines = []
    for r in runs:
        b_pre, b_dec = r["res"]["base"][:2]
        lines.append(f"{r['dtype']}: 16 sequences x prompt {r['prompt_len']} tokens, "
                     f"{r['steps']} decode steps x {r['reps']} runs, steps interleaved across "
                     "providers")
        lines.append(f"{'provider':<18} {'ms/token':>9} {'x base':>7} {'p10-p90 x base':>15} "
                     f"{'prefill ms':>11} {'x base':>7}")
        for k, (p, d, rt, lo, hi) in r["res"].items():
            lines.append(f"{k:<18} {d * 1e3:>9.2f} {rt:>7.3f} {lo:>7.2f}-{hi:<7.2f} "
                         f"{p * 1e3:>11.1f} {p / b_pre:>7.3f}")
        e = r["res"]["emlora k=1"][2]
        lines.append("x base: median over decode steps of (provider step / base step), each "
                     "pair timed back to back")
        lines.append(f"bar (emlora k=1 per token <= 1.1x base): {'met' if e <= 1.1 else 'NOT met'}"
                     f" ({e:.3f}x)")
        lines.append(r["load"])
        lines.append("")
    lines.append(runs[0]["machine"])
    lines.append("SmolLM2-135M-Instruct; 16 adapters r=32 on q,k,v,o,gate,up,down of 30 layers, "
                 "one per sequence; EM-LoRA: attention pooler, rational activation, k=1 of 7, "
                 "routing decided on the prompt (the prefill column includes the 16 x 30 router "
                 "calls)")
    return "\n".join(lines)


def write_section(table: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the others as they are."""
    common.write_section(TITLE, table, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="fp32", help="fp32, bf16 or both")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    dts = {"fp32": [torch.float32], "bf16": [torch.bfloat16],
           "both": [torch.float32, torch.bfloat16]}[a.dtype]
    runs = [run(a.steps, a.reps, dtype=dt) for dt in dts]
    table = format_table(runs)
    print(table)
    if not a.no_write:
        write_section(table)
        print(f"wrote the '{TITLE}' section of {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
