"""Model-level benchmark of multi-tenant serving (issue: core), CPU, fp32 or bf16.

    python bench/bench_model.py [--quick] [--dtype bfloat16] [--only decode] [--threads N] [--clock cpu]

Llama with hidden 1024 (8 layers, intermediate 2816, 16 heads, vocab 32000, random weights),
16 rank-16 LoRA adapters on every linear layer (peft save_pretrained folders). Shapes:
    decode  : 16 sequences x 1 new token over a 32-token KV cache, 16 distinct adapters
    prefill : 4 sequences x 128 tokens, 4 distinct adapters
Every model (and every adapter) in --dtype (bf16: the adapters' fp32 factors rounded once).
Providers, side by side (round-robin, median after warm-up):
    base  the unpatched model (the floor)
    ours  lmf.patch + adapter_names (one fused multi-LoRA op per linear)
    peft  PeftModel with every adapter loaded + adapter_names (peft's mixed batch)
``--clock cpu`` (with ``--threads 1``): this thread's CPU time instead of wall time (leaves out the
time spent descheduled on an oversubscribed machine). ``run(quick) -> list[dict]``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import loramix_fast as lmf  # noqa: E402
from bench.common import load_line, machine, time_side_by_side  # noqa: E402
from loramix_fast.testing import AdapterSpec, peft_multi, write_peft_adapters  # noqa: E402

HIDDEN, LAYERS, INTER, HEADS, VOCAB, RANK, N_ADAPTERS = 1024, 8, 2816, 16, 32000, 16, 16


def build(folder: str, layers: int = LAYERS, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, max_position_embeddings=512)
    base = LlamaForCausalLM(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dirs = write_peft_adapters(base, [AdapterSpec(f"a{i}", r=RANK, alpha=RANK, seed=i)
                                          for i in range(N_ADAPTERS)], folder)
    peft = peft_multi(base, dirs).to(dtype)
    ours = lmf.patch(copy.deepcopy(base).to(dtype), lmf.AdapterLibrary.from_peft(dirs))
    return base.to(dtype), ours, peft, dirs


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


SHAPES = {"decode": (16, 32, 1, 16), "prefill": (4, 0, 128, 4)}  # batch, context, tokens, distinct


def run(quick: bool = False, layers: int = LAYERS, dtype: torch.dtype = torch.float32,
        shapes=tuple(SHAPES), threads: int | None = None, clock: str = "wall") -> list[dict]:
    if threads:  # every provider on this many threads (restored after)
        was = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run(quick, layers, dtype, shapes, clock=clock)
        finally:
            torch.set_num_threads(was)
    import os

    from bench.bench_multi_lora_op import _clock

    timer = _clock(clock)

    rows = []
    load0 = os.getloadavg()[0]
    esz = torch.empty((), dtype=dtype).element_size()
    with tempfile.TemporaryDirectory() as d, torch.inference_mode():
        base, ours, peft, dirs = build(d, layers, dtype)
        lib_bytes = sum((f.A.numel() + f.B.numel()) * esz for n in dirs
                        for f in lmf.AdapterLibrary.from_peft({n: dirs[n]}).factors(n).values())
        # bytes a decode step reads: every weight but the embedding table
        read_bytes = _bytes(base) - base.get_input_embeddings().weight.numel() * esz
        g = torch.Generator().manual_seed(0)
        for shape in shapes:
            b, ctx, t, n_distinct = SHAPES[shape]
            names = [f"a{i % n_distinct}" for i in range(b)]
            prompt = torch.randint(3, VOCAB, (b, max(ctx, 1)), generator=g)
            step = torch.randint(3, VOCAB, (b, t), generator=g)
            caches = {}
            if ctx:
                from transformers import DynamicCache

                for prov, m in (("base", base), ("ours", ours), ("peft", peft)):
                    cache = DynamicCache()
                    kw = {} if prov == "base" else {"adapter_names": names}
                    m(prompt, past_key_values=cache, use_cache=True, **kw)
                    caches[prov] = cache

            def call(prov, m):
                kw = {} if prov == "base" else {"adapter_names": names}

                def f():
                    if ctx:
                        c = caches[prov]
                        m(step, past_key_values=c, use_cache=True, **kw)
                        c.crop(-t)  # drop the step: the next call sees the same context
                    else:
                        m(step, use_cache=False, **kw)
                return f

            fns = {p: call(p, m) for p, m in (("base", base), ("ours", ours), ("peft", peft))}
            reps = (5 if quick else 40) if shape == "decode" else (2 if quick else 5)
            tm = time_side_by_side(fns, reps=reps, warmup=2, with_p10=True, clock=timer)
            med = {k: v[0] for k, v in tm.items()}
            for prov, s in med.items():
                rows.append(dict(shape=shape, provider=prov, batch=b, tokens=t, context=ctx,
                                 dtype=str(dtype).split(".")[-1],
                                 distinct=n_distinct, ms=s * 1e3, ratio=s / med["base"],
                                 vs_peft=med["peft"] / s, tok_s=b * t / s,
                                 ratio_p10=tm[prov][1] / tm["base"][1],
                                 adapter_share=lib_bytes / read_bytes * n_distinct / N_ADAPTERS,
                                 layers=layers, threads=torch.get_num_threads(), clock=clock))
    where = f"{machine()}; {load_line(load0)}; clock: {clock}"
    for r in rows:
        r["machine"] = where
    return rows


def format_table(rows: list[dict]) -> str:
    out = [f"# {rows[0]['machine']}"] if rows and "machine" in rows[0] else []
    out += [f"{'shape':<8}{'dtype':<9}{'provider':<9}{'ms':>9}{'x base':>8}{'peft/ours':>10}{'tok/s':>9}"
            f"{'p10 x':>7}"]
    for r in rows:
        out.append(f"{r['shape']:<8}{r.get('dtype', 'float32'):<9}{r['provider']:<9}{r['ms']:>9.2f}"
                   f"{r['ratio']:>8.3f}{r['vs_peft']:>10.2f}{r['tok_s']:>9.1f}"
                   f"{r.get('ratio_p10', float('nan')):>7.3f}")
    share = rows[0]["adapter_share"] if rows else 0
    out.append(f"(decode: used adapters' bytes = {share:.0%} of the weights a step reads)")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--only", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="cpu: this thread's CPU time (needs --threads 1)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = run(a.quick, a.layers, getattr(torch, a.dtype), a.only, clock=a.clock)
    print(format_table(rows))


if __name__ == "__main__":
    main()
