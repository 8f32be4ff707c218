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
  7 of its module LoRAs): plain multi-tenant LoRA with the same adapters;
- ``patched, no adapter``: that copy with every row ``__base__``: each patched module runs the
  fused op with every id -1, with ``LORAMIX_CPP_SMALL32_BASE=1`` (its base GEMM alone on the
  kernel the other two use: in fp32 at M <= 24 the op's own small-M kernel, faster than torch's
  ``F.linear``; by default a call with no adapter keeps torch's GEMM), the like-for-like base of
  the two above.

Each repetition prefills the prompts in each provider (timed: the prefill column), then runs
``--steps`` greedy decode steps with the KV cache, the providers' steps interleaved (each step of
every provider timed back to back, so they share the machine's load); each patched provider keeps
its ``lmf.route_once`` scope for the loop, as ``generate`` does. ``x base`` is the median over the
steps of (provider step / base step). ``python -m bench.bench_emlora [--steps 16] [--reps 3]
[--dtype fp32|bf16|both] [--threads N] [--clock wall|cpu] [--no-write]`` writes the
``## EM-LoRA decode cost`` section of bench/RESULTS.md (``--threads 1 --clock cpu``: each step's
single-thread CPU time, for a loaded machine). The table ends with the floor: the bytes a decode
step must read (the base weights; the A and B of the modules the routers selected) and the ratio
they imply for a memory-bound step, then the measured floor: the deltas' own time per step (the
fused ops with the routed ids minus with none), as a ratio over the base step. Hold the lock:
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


# the op's fp32 small-M kernel also for calls with no (row, adapter) pair (by default those keep
# torch's GEMM, bit for bit): the like-for-like base and the floor's "all ids -1" calls
KERNEL_BASE = {"LORAMIX_CPP_SMALL32_BASE": "1"}


_env = common.env


class Decoder:
    """One provider's greedy decode with the KV cache, one step per call, in its own context
    (``lmf.route_once`` entered there for the patched models, as ``generate`` scopes it), so the
    providers' steps can be interleaved and timed under the same machine load."""

    def __init__(self, model, enc, names=None, clock=time.perf_counter, env=None):
        self.model, self.enc, self.names, self.clock = model, enc, names, clock
        self.env = env or {}  # environment knobs set around this provider's forwards
        self.ctx = contextvars.copy_context()
        self.scope = lmf.route_once(model) if names is not None else None

    def prefill(self) -> float:
        if self.scope is not None:
            self.ctx.run(self.scope.__enter__)
        kw = {} if self.names is None else {"adapter_names": self.names}
        self.att = self.enc["attention_mask"]
        with _env(self.env), torch.no_grad():
            t0 = self.clock()
            self.out = self.ctx.run(self.model, self.enc["input_ids"], attention_mask=self.att,
                                    use_cache=True, **kw)
            return self.clock() - t0

    def step(self) -> float:
        kw = {} if self.names is None else {"adapter_names": self.names}
        with _env(self.env), torch.no_grad():
            nxt = self.out.logits[:, -1].argmax(-1, keepdim=True)
            self.att = torch.cat([self.att, torch.ones_like(nxt)], 1)
            t0 = self.clock()
            self.out = self.ctx.run(self.model, nxt, attention_mask=self.att,
                                    cache=self.out.cache, use_cache=True, **kw)
            return self.clock() - t0

    def close(self):
        if self.scope is not None:
            self.ctx.run(self.scope.__exit__, None, None, None)
        self.out = None


def floor_bytes(base, model, decoder) -> dict:
    """Bytes a decode step must read, from the routing ``decoder`` (an EM-LoRA ``Decoder`` after
    its prefill) decided: ``base`` every weight matrix of the base model (the decoder's linears
    and the LM head; the embedding lookup reads only the batch's rows), ``emlora`` the A and B of
    each (module, adapter) some row applies (the modules its routers selected), ``lora`` every
    module of every adapter in the batch (plain LoRA on all modules). Memory-bound, a step costs
    ``1 + emlora / base`` x the base model's."""
    el = next(base.parameters()).element_size()
    base_b = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear)) * el
    st = E._serving(model).state
    decs = decoder.ctx.run(E._serving(model).decisions)
    names = st.lib.names
    em_b = lora_b = 0
    kinds: dict = {}
    for dec in decs:
        for mod, (i, _) in dec.maps.items():
            ids = sorted({int(e) for e in i.view(-1).tolist() if e >= 0})
            for e in ids:
                f = st.lib.factors(names[e])[mod]
                em_b += (f.A.numel() + f.B.numel()) * el
            leaf = mod.rsplit(".", 1)[-1]
            kinds[leaf] = kinds.get(leaf, 0) + len(ids)
    for n in set(decoder.names) - {None, "__base__"}:
        for f in st.lib.factors(n).values():
            lora_b += (f.A.numel() + f.B.numel()) * el
    return {"base": base_b, "emlora": em_b, "lora": lora_b, "kinds": kinds}


def delta_time(model, decoder, reps: int = 7) -> float:
    """Seconds a decode step spends in the deltas themselves: every patched module's fused op on
    its step-shaped input ([rows, in], random) with the routing ``decoder`` decided, minus the same
    calls with every id -1 (the op's base GEMM alone), summed over the modules, median of ``reps``
    interleaved passes. What the selected adapters' bytes cost on this machine at the kernels'
    bandwidth: no implementation of the step that reads them can cost less over the base."""
    from loramix_fast.modules import MultiLoRALinear
    from loramix_fast.ops.multi_lora import _run
    from loramix_fast.ops._dispatch import pick_backend

    decs = decoder.ctx.run(E._serving(model).decisions)
    mods = {m.lmf_name: m for m in model.modules() if isinstance(m, MultiLoRALinear)}
    work = []
    for dec in decs:
        for name, (i, w) in dec.maps.items():
            m = mods[name]
            st, W = m.stack(), m._lmf_base.weight
            x = torch.randn(i.shape[0], W.shape[1], dtype=W.dtype)
            work.append((x, W, st, i, torch.full_like(i, -1), w))
    be = pick_backend(work[0][0], "multi_lora_linear")

    def one(live: bool) -> float:
        t0 = time.perf_counter()
        for x, W, st, i, neg, w in work:
            _run(be, x, W, st.A, st.B, st.scale, st.rank, i if live else neg, w, None)
        return time.perf_counter() - t0

    with _env(KERNEL_BASE), torch.no_grad():
        one(True), one(False)
        d = [one(True) - one(False) for _ in range(reps)]
    return statistics.median(d)


def floor_lines(fb: dict) -> list[str]:
    mb = 1e6
    kinds = ", ".join(f"{k.replace('_proj', '')} {v}" for k, v in fb["kinds"].items())
    return [f"floor (bytes read per decode step): base weights {fb['base'] / mb:.1f} MB; "
            f"EM-LoRA's selected A+B {fb['emlora'] / mb:.1f} MB (+{fb['emlora'] / fb['base']:.1%}"
            f", memory-bound ratio {1 + fb['emlora'] / fb['base']:.3f}x); plain LoRA "
            f"{fb['lora'] / mb:.1f} MB ({1 + fb['lora'] / fb['base']:.3f}x)",
            f"  (module, adapter) pairs applied per step by kind: {kinds}"]


def run(steps: int = 16, reps: int = 3, warmup: int = 1, dtype=torch.float32,
        clock: str = "wall") -> dict:
    """``clock``: ``"wall"`` (perf_counter) or ``"cpu"`` (this thread's CPU time; one torch
    thread only: on a loaded machine it leaves out the time spent descheduled)."""
    if clock == "cpu" and torch.get_num_threads() != 1:
        raise ValueError(f"clock='cpu' needs --threads 1 (this thread's CPU time), got "
                         f"{torch.get_num_threads()} threads")
    clk = {"wall": time.perf_counter, "cpu": time.thread_time}[clock]
    base, model, plain, ems, names, enc = build(dtype)
    load0 = os.getloadavg()[0]
    mk = {"base": lambda: Decoder(base, enc, clock=clk),
          "emlora k=1": lambda: Decoder(model, enc, names, clock=clk),
          "lora (7 modules)": lambda: Decoder(plain, enc, names, clock=clk),
          "patched, no adapter": lambda: Decoder(plain, enc, ["__base__"] * len(names),
                                                 clock=clk, env=KERNEL_BASE)}
    pre = {k: [] for k in mk}
    dec = {k: [] for k in mk}
    ratio = {k: [] for k in mk}  # per decode step: provider / base, measured back to back
    like = {k: [] for k in mk}  # per decode step: provider / patched with no adapter
    for it in range(warmup + reps):
        ds = {k: f() for k, f in mk.items()}
        p = {k: d.prefill() for k, d in ds.items()}
        if it == 0:
            fb = floor_bytes(base, model, ds["emlora k=1"])
            fb["delta_s"] = delta_time(model, ds["emlora k=1"])
        for _ in range(steps):
            t = {k: d.step() for k, d in ds.items()}
            if it >= warmup:
                for k in mk:
                    dec[k].append(t[k])
                    ratio[k].append(t[k] / t["base"])
                    like[k].append(t[k] / t["patched, no adapter"])
        for d in ds.values():
            d.close()
        if it >= warmup:
            for k in mk:
                pre[k].append(p[k])
    res = {k: (statistics.median(pre[k]), statistics.median(dec[k]),
               statistics.median(ratio[k]), _q(ratio[k], 0.1), _q(ratio[k], 0.9)) for k in mk}
    return {"res": res, "dtype": str(dtype).replace("torch.", ""), "steps": steps, "reps": reps,
            "clock": "wall time" if clock == "wall" else "1-thread CPU time",
            "prompt_len": int(enc["input_ids"].shape[1]), "load": load_line(load0), "floor": fb,
            "like": {k: statistics.median(v) for k, v in like.items()},
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
                     f"providers, {r['clock']}")
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
        lk = r["like"]
        lines.append(f"like for like (over 'patched, no adapter', the same fused ops with every id "
                     f"-1, each step pair back to back): emlora k=1 {lk['emlora k=1']:.3f}x, "
                     f"lora (7 modules) {lk['lora (7 modules)']:.3f}x")
        lines += floor_lines(r["floor"])
        dl = r["floor"]["delta_s"]
        lines.append(f"  measured: the deltas alone (each module's fused op with the routed ids minus "
                     f"with all ids -1) {dl * 1e3:.2f} ms per step = +{dl / b_dec:.1%} of the base "
                     f"step: the floor on this machine, {1 + dl / b_dec:.3f}x, before any Python "
                     f"or framework cost")
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
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's, 2 on the 2-core machine)")
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                    help="wall: perf_counter; cpu: this thread's CPU time (needs --threads 1; "
                         "for a loaded machine)")
    ap.add_argument("--no-write", action="store_true",
                    help="print the table only (do not touch bench/RESULTS.md)")
    a = ap.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    dts = {"fp32": [torch.float32], "bf16": [torch.bfloat16],
           "both": [torch.float32, torch.bfloat16]}[a.dtype]
    runs = [run(a.steps, a.reps, dtype=dt, clock=a.clock) for dt in dts]
    table = format_table(runs)
    print(table)
    if not a.no_write:
        write_section(table)
        print(f"wrote the '{TITLE}' section of {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
