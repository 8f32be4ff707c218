"""Model-level benchmark of multi-tenant serving (issue: core), CPU fp32.

    python bench/bench_model.py [--quick]

Llama with hidden 1024 (8 layers, intermediate 2816, 16 heads, vocab 32000, random weights),
16 rank-16 LoRA adapters on every linear layer (peft save_pretrained folders). Shapes:
    decode  : 16 sequences x 1 new token over a 32-token KV cache, 16 distinct adapters
    prefill : 4 sequences x 128 tokens, 4 distinct adapters
Providers, side by side (round-robin, median after warm-up):
    base  the unpatched model (the floor)
    ours  lmf.patch + adapter_names (one fused multi-LoRA op per linear)
    peft  PeftModel with every adapter loaded + adapter_names (peft's mixed batch)
``run(quick) -> list[dict]``.
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
from bench.common import machine, time_side_by_side  # noqa: E402
from loramix_fast.testing import AdapterSpec, peft_multi, write_peft_adapters  # noqa: E402

HIDDEN, LAYERS, INTER, HEADS, VOCAB, RANK, N_ADAPTERS = 1024, 8, 2816, 16, 32000, 16, 16


def build(folder: str, layers: int = LAYERS):
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
    peft = peft_multi(base, dirs)
    ours = lmf.patch(copy.deepcopy(base), lmf.AdapterLibrary.from_peft(dirs))
    return base, ours, peft, dirs


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run(quick: bool = False, layers: int = LAYERS) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as d, torch.inference_mode():
        base, ours, peft, dirs = build(d, layers)
        lib_bytes = sum(f.A.numel() * 4 + f.B.numel() * 4 for n in dirs
                        for f in lmf.AdapterLibrary.from_peft({n: dirs[n]}).factors(n).values())
        # bytes a decode step reads: every weight but the embedding table
        read_bytes = _bytes(base) - base.get_input_embeddings().weight.numel() * 4
        g = torch.Generator().manual_seed(0)
        for shape, (b, ctx, t, n_distinct) in {"decode": (16, 32, 1, 16),
                                               "prefill": (4, 0, 128, 4)}.items():
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
            reps = (5 if quick else 15) if shape == "decode" else (2 if quick else 5)
            med = time_side_by_side(fns, reps=reps, warmup=2)
            for prov, s in med.items():
                rows.append(dict(shape=shape, provider=prov, batch=b, tokens=t, context=ctx,
                                 distinct=n_distinct, ms=s * 1e3, ratio=s / med["base"],
                                 vs_peft=med["peft"] / s, tok_s=b * t / s,
                                 adapter_share=lib_bytes / read_bytes * n_distinct / N_ADAPTERS,
                                 layers=layers, threads=torch.get_num_threads()))
    return rows


def format_table(rows: list[dict]) -> str:
    out = [f"{'shape':<8}{'provider':<9}{'ms':>9}{'x base':>8}{'peft/ours':>10}{'tok/s':>9}"]
    for r in rows:
        out.append(f"{r['shape']:<8}{r['provider']:<9}{r['ms']:>9.2f}{r['ratio']:>8.3f}"
                   f"{r['vs_peft']:>10.2f}{r['tok_s']:>9.1f}")
    share = rows[0]["adapter_share"] if rows else 0
    out.append(f"(decode: used adapters' bytes = {share:.0%} of the weights a step reads)")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--layers", type=int, default=LAYERS)
    a = p.parse_args(argv)
    rows = run(a.quick, a.layers)
    print(machine())
    print(format_table(rows))


if __name__ == "__main__":
    main()
