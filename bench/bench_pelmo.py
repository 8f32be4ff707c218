"""PELMo's sparse ensemble: k = 2 of 4 prompt experts vs the dense ensemble, with and without the
expert-prefix KV cache (CPU).

    flock /tmp/lmf-bench.lock python -m bench.bench_pelmo [--quick] [--threads N] [--no-write]

Model: a random Llama, hidden 1024, 4 layers, intermediate 2816, 16 heads, vocab 32000, fp32,
unpatched (PELMo's experts are prompts on one backbone). Workload: 8 questions x 24 tokens, 4
prompt experts with a 128-token prefix each (instructions, few-shot examples), 16 new tokens,
greedy, mode="probs". Weights: a router's top-2 renormalised (each question its own 2 experts;
every expert used by some question) for the sparse rows, the same weights plus 1e-3 on the
unselected experts (every expert run) for the dense rows. Rows, timed side by side (round-robin,
median after warm-up): dense / sparse, each with ``prefix_cache=False`` (every copy recomputes
its prefix) and ``True`` (each prefix once, its KV rows copied). Columns: copies per step,
prefix tokens computed, median s, ratio to dense without the cache.
Writes the ``## PELMo sparse ensemble`` section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

from bench import common
from bench.common import machine, time_side_by_side
from loramix_fast import topk_renormalize
from loramix_fast.ensemble import ensemble_generate

TITLE = "PELMo sparse ensemble (k=2 of 4 prompt experts)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HIDDEN, LAYERS, INTER, HEADS, VOCAB = 1024, 4, 2816, 16, 32000
B, Q, E, PREFIX, NEW = 8, 24, 4, 128, 16


def build():
    import transformers as tf

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, max_position_embeddings=512)
    return tf.LlamaForCausalLM(cfg).eval()


def run(quick: bool = False) -> list[dict]:
    model = build()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (B, Q), generator=g)
    prefixes = [torch.randint(3, VOCAB, (PREFIX,), generator=g).tolist() for _ in range(E)]
    logits = torch.randn(B, E, generator=g)
    pick = torch.tensor([[b % E, (b + 1) % E] for b in range(B)])  # every expert used somewhere
    logits.scatter_add_(1, pick, torch.full((B, 2), 4.0))
    sparse = topk_renormalize(torch.softmax(logits, -1), 2)  # the router's top-2, eq. 3
    dense = sparse + 1e-3 * (sparse == 0)
    kw = dict(experts=["__base__"] * E, mode="probs", max_new_tokens=NEW, eos_token_id=[],
              expert_prompts=prefixes, attention_mask=torch.ones_like(ids))
    cases = {"dense, prefix per copy": (dense, False), "dense, prefix cache": (dense, True),
             "sparse k=2, prefix per copy": (sparse, False),
             "sparse k=2, prefix cache": (sparse, True)}
    outs = {}

    def call(name):
        w, pc = cases[name]
        outs[name] = ensemble_generate(model, ids, weights=w, prefix_cache=pc, **kw)

    with torch.inference_mode():
        t = time_side_by_side({k: (lambda k=k: call(k)) for k in cases},
                              reps=1 if quick else 3, warmup=1)
    assert torch.equal(outs["sparse k=2, prefix cache"], outs["sparse k=2, prefix per copy"])
    base = t["dense, prefix per copy"]
    rows = []
    for name, (w, pc) in cases.items():
        copies = int((w > 0).sum())
        rows.append(dict(name=name, copies=copies, prefix_tokens=(E if pc else copies) * PREFIX,
                         s=t[name], ratio=t[name] / base, reps=1 if quick else 3))
    return rows


def format_table(rows) -> str:
    lines = [f"Machine: {machine()}",
             f"random Llama hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}, fp32, unpatched; "
             f"{B} questions x {Q} tokens, {E} prompt experts x {PREFIX}-token prefix, {NEW} new "
             "tokens, greedy, mode=probs; sparse = router top-2 renormalised, dense = the same "
             f"plus 1e-3 on the other experts; median of {rows[0]['reps']} after 1 warm-up, side by "
             "side", "",
             f"{'provider':>28} | {'copies':>6} {'prefix tok':>10} | {'s':>6} {'/dense':>7}",
             "-" * 66]
    for r in rows:
        lines.append(f"{r['name']:>28} | {r['copies']:6d} {r['prefix_tokens']:10d} | "
                     f"{r['s']:6.2f} {r['ratio']:7.2f}")
    return "\n".join(lines)


def write_section(table: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the others as they are."""
    common.write_section(TITLE, table, path, after='ensemble_generate (4 experts x 4 sequences)')


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    table = format_table(run(a.quick))
    print(table)
    if not a.no_write:
        write_section(table)
        print(f"wrote the '{TITLE}' section of {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
