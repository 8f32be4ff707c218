"""Benchmark of ensemble generation (DESIGN.md operation 3 end to end) on CPU (or CUDA if present).

    python bench/bench_ensemble.py [--quick] [--threads N] [--device cpu|cuda]

Model: a random Llama, hidden 1024, 4 layers, intermediate 2816, 16 heads, vocab 32000 (fp32 on CPU,
bf16 on CUDA); 4 rank-16 peft adapters on every linear layer (q, k, v, o, gate, up, down).
Workload: 4 sequences x 32 prompt tokens, 32 new tokens, greedy, 4 experts, PELMo mixing
(mode="probs"), uniform weights. Every provider runs the same decode (prefill, then one token per
step, each expert with its own KV cache) and produces the same tokens.
Providers, timed side by side (round-robin, median after warm-up):
    ours          lmf.ensemble_generate: 16 copies (4 sequences x 4 experts) in ONE forward per step
                  (multi-LoRA op, one slot), fused mix_logits_greedy
    loop          each expert's forward one after another (4 forwards of 4 rows per step, each with
                  its own cache) on the same patched model, then the fused mixing: the baseline
    peft          peft's mixed batch (``adapter_names`` per row, 16 rows, one forward per step),
                  mixing in torch (reference.mix_logits + argmax)
    base-batched  the unadapted model, 16 rows in one forward per step (the floor)
    base-serial   the unadapted model, 4 forwards of 4 rows per step
Columns: median s per generation, generated tokens/s (4 sequences x new tokens, prompt included in
the time), ratio to ``loop`` and to ``base-batched``.
``run(quick) -> list[dict]`` returns the rows for other writers (pytest-benchmark, RESULTS.md).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import loramix_fast as lmf  # noqa: E402
from bench.common import machine, time_side_by_side  # noqa: E402
from loramix_fast import reference  # noqa: E402
from loramix_fast.ensemble import _forward_kwargs, _returned_cache, ensemble_generate  # noqa: E402
from loramix_fast.ensemble import mix_next_token  # noqa: E402

HIDDEN, LAYERS, INTER, HEADS, VOCAB = 1024, 4, 2816, 16, 32000
E, RANK = 4, 16
B, PROMPT, NEW = 4, 32, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERTS = [f"e{i}" for i in range(E)]
MODE = "probs"


def build(device: str, dtype: torch.dtype, folder: str):
    """(patched lmf model, peft model with the same 4 adapters, plain base model)."""
    import transformers as tf
    from peft import LoraConfig, PeftModel, get_peft_model

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, max_position_embeddings=512)
    base = tf.LlamaForCausalLM(cfg).eval()
    sd = base.state_dict()
    dirs = {}
    for i, name in enumerate(EXPERTS):  # real peft adapters, written with save_pretrained
        m = tf.LlamaForCausalLM(cfg)
        m.load_state_dict(sd)
        torch.manual_seed(100 + i)
        pm = get_peft_model(m, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS,
                                          init_lora_weights=False))
        dirs[name] = os.path.join(folder, name)
        pm.save_pretrained(dirs[name])
        del pm, m
    ours = tf.LlamaForCausalLM(cfg)
    ours.load_state_dict(sd)
    ours = ours.to(device=device, dtype=dtype).eval()
    lmf.patch(ours, lmf.AdapterLibrary.from_peft(dirs))
    pbase = tf.LlamaForCausalLM(cfg)
    pbase.load_state_dict(sd)
    peft_model = PeftModel.from_pretrained(pbase, dirs[EXPERTS[0]], adapter_name=EXPERTS[0])
    for name in EXPERTS[1:]:
        peft_model.load_adapter(dirs[name], adapter_name=name)
    peft_model = peft_model.to(device=device, dtype=dtype).eval()
    base = base.to(device=device, dtype=dtype).eval()
    return ours, peft_model, base


# ---- baselines: the same decode, with the forwards split or run by peft -------------------------

def _step(model, ids, mask, pos, cache, **kw):
    cache_kw, has_keep = _forward_kwargs(model)
    extra = {"logits_to_keep": 1} if has_keep else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                **{cache_kw: cache}, **extra, **kw)
    return out.logits[:, -1, :], _returned_cache(out)


def generate_serial(model, ids, new, mixer, select=None):
    """Each expert's forward one after another, each with its own KV cache; then mix.
    ``select(e)`` gives the context that makes ``model`` run expert e (None: the base model)."""
    Bn = ids.shape[0]
    mask = torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1)
    caches = [None] * E
    step_ids = [ids] * E
    toks = []
    with torch.inference_mode():
        for t in range(new):
            logits = []
            for e in range(E):
                ctx = select(e) if select is not None else contextlib.nullcontext()
                with ctx:
                    lg, caches[e] = _step(model, step_ids[e], mask, pos, caches[e])
                logits.append(lg)
            z = torch.stack(logits, 1)  # [B, E, V]
            tok = mixer(z)
            toks.append(tok)
            step_ids = [tok[:, None]] * E
            pos = pos[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(Bn, 1)], 1)
    return torch.cat([ids, torch.stack(toks, 1)], 1)


def generate_batched(model, ids, new, mixer, adapter_names=None):
    """All copies in one forward per step (rows b-major: b * E + e); ``adapter_names`` per row is
    passed to every forward (peft's mixed batch)."""
    Bn = ids.shape[0]
    rows = ids.repeat_interleave(E, 0)
    mask = torch.ones_like(rows)
    pos = mask.cumsum(-1) - 1
    kw = {"adapter_names": adapter_names} if adapter_names is not None else {}
    cache, step_ids, toks = None, rows, []
    with torch.inference_mode():
        for t in range(new):
            lg, cache = _step(model, step_ids, mask, pos, cache, **kw)
            tok = mixer(lg.view(Bn, E, -1))
            toks.append(tok)
            step_ids = tok.repeat_interleave(E)[:, None]
            pos = pos[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return torch.cat([ids, torch.stack(toks, 1)], 1)


def run(quick: bool = False, device: str | None = None, new: int | None = None,
        reps: int | None = None) -> list[dict]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    new = new or (16 if quick else NEW)
    reps = reps or (2 if quick else 5)
    with tempfile.TemporaryDirectory() as folder:
        ours, peft_model, base = build(device, dtype, folder)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (B, PROMPT), generator=g).to(device)
    w = torch.full((B, E), 1.0 / E, device=device)
    names = [EXPERTS[n % E] for n in range(B * E)]
    fused = lambda z: mix_next_token(z, w, MODE)  # noqa: E731  (the fused greedy op)
    torch_mix = lambda z: reference.mix_logits(z, w, MODE).argmax(-1)  # noqa: E731
    fns = {
        "ours": lambda: ensemble_generate(ours, ids, experts=EXPERTS, weights=w, mode=MODE,
                                          max_new_tokens=new, eos_token_id=[]),
        "loop": lambda: generate_serial(ours, ids, new, fused,
                                        select=lambda e: lmf.use_adapters(ours, [EXPERTS[e]] * B)),
        "peft": lambda: generate_batched(peft_model, ids, new, torch_mix, adapter_names=names),
        "base-batched": lambda: generate_batched(base, ids, new, fused),
        "base-serial": lambda: generate_serial(base, ids, new, fused),
    }
    # all adapted providers decode the same tokens (a check, not timed)
    ref = fns["ours"]()
    for k in ("loop", "peft"):
        got = fns[k]()
        agree = (got[:, PROMPT:] == ref[:, PROMPT:]).float().mean().item()
        if agree < 1.0:
            print(f"[warning: {k} agrees with ours on {agree:.0%} of tokens]", file=sys.stderr)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = time_side_by_side(fns, reps, warmup=1, sync=sync)
    rows = []
    for k, s in t.items():
        rows.append(dict(provider=k, s=s, tokens_per_s=B * new / s, x_loop=t["loop"] / s,
                         x_base_batched=t["base-batched"] / s, B=B, E=E, prompt=PROMPT, new=new,
                         hidden=HIDDEN, layers=LAYERS, rank=RANK, mode=MODE, device=device,
                         dtype=str(dtype).split(".")[-1], threads=torch.get_num_threads()))
    return rows


def format_table(rows: list[dict]) -> str:
    out = [f"{'provider':<13} {'s/gen':>8} {'tok/s':>8} {'x loop':>7} {'x base-batched':>15}"]
    for r in rows:
        out.append(f"{r['provider']:<13} {r['s']:>8.3f} {r['tokens_per_s']:>8.1f} "
                   f"{r['x_loop']:>7.2f} {r['x_base_batched']:>15.2f}")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="16 new tokens, 2 repetitions")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--new", type=int, default=None, help="new tokens (default 32)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from loramix_fast.ops._dispatch import pick_backend
    print(f"# ensemble_generate: Llama hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}; {E} experts "
          f"(rank-{RANK} LoRA on all linears) x {B} sequences, prompt {PROMPT}, mode {MODE}, greedy")
    print(f"# backend: {pick_backend(torch.empty(0, device=device))}; {machine(device)}")
    rows = run(a.quick, device, a.new, a.reps)
    print(f"# new tokens {rows[0]['new']}; tokens/s = {B} sequences x new tokens / time "
          "(prefill included)")
    print(format_table(rows))


if __name__ == "__main__":
    main()
