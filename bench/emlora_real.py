"""EM-LoRA on the real SmolLM2 tasks (issue 11): one EM-LoRA trained on the pooled tasks vs one
LoRA trained on the pooled tasks at the same parameter budget vs the per-task oracle.

Data: the four synthetic tasks of ``bench/real_experts.py`` (add / upper / reverse / sort), the
training split pooled and shuffled, batches of ``--batch`` (each batch mixes tasks). Rows:

- ``oracle``: the four cached rank-8 experts (``.cache/experts``), each question served by its
  task's expert (``adapter_names``);
- ``emlora``: one adapter of rank ``--rank`` on all 7 module kinds with its EM-LoRA routers
  (attention pooler of width 16, rational activation, k = ``--k`` of 7 per layer), trained with
  ``lmf.emlora.fit`` (LM loss on the answer tokens + 1e-2 x the load-balancing loss; the routers
  pool the prompt tokens only, ``route_mask``, as at generation);
- ``lora``: one plain LoRA on all 7 module kinds whose rank is chosen so that its parameter count
  is at least the EM-LoRA's (LoRA + routers), trained with the same steps, batches and lr;
- ``base``: the base model.

Exact match: greedy answers (up to 24 new tokens, stopping at <|im_end|>) on ``--n-eval`` held-out
questions per task. tokens/s: the generated answer tokens (re-tokenised, + the end token) over
the wall time of that evaluation (batches of 50; not a decode benchmark, the machine is shared).

    python -m bench.emlora_real [--steps 60] [--batch 8] [--n-eval 25] [--no-write]

writes the ``## EM-LoRA on the SmolLM2 tasks`` section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

import loramix_fast as lmf
from bench import real_experts as RE
from bench import common
from bench.common import load_line, machine
from loramix_fast import emlora as E

TITLE = "EM-LoRA on the SmolLM2 tasks"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _lora_params(lib, name):
    return sum(f.A.numel() + f.B.numel() for f in lib.factors(name).values())


def _batches(tok, steps, batch, seed=0):
    """``steps`` training batches from the pooled training splits (each a dict for fit)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    per = (steps * batch) // len(RE.TASKS) + 1
    pool = [ex for t in RE.TASKS for ex in RE.make_split(t, per, "train")]
    random.Random(seed).shuffle(pool)
    out = []
    for i in range(steps):
        ex = pool[(i * batch) % len(pool):][:batch]
        ids, att, lab = RE._batch(tok, ex, pad)
        prompt = (att != 0) & (lab == -100)  # the prompt's tokens (answers carry labels)
        out.append(dict(input_ids=ids, attention_mask=att, labels=lab, route_mask=prompt))
    return out


def _eval(model, tok, names_for, n_eval):
    """{task: exact match}, tokens/s over the whole evaluation."""
    res, toks, secs = {}, 0, 0.0
    for t in RE.TASKS:
        data = RE.make_split(t, n_eval, "test")
        qs = [q for q, _ in data]
        t0 = time.perf_counter()
        outs = RE.generate_answers(model, tok, qs, names_for(t, len(qs)))
        secs += time.perf_counter() - t0
        toks += sum(len(tok(o, add_special_tokens=False)["input_ids"]) + 1 for o in outs)
        res[t] = RE.exact_match(outs, [a for _, a in data])
    return res, toks / secs


def run(steps=60, batch=8, n_eval=25, rank=8, k=2, lr=2e-3, log=print) -> dict:
    from loramix_fast import smollm2

    model, tok = smollm2.load()
    model.requires_grad_(False)
    folders = RE.ensure_experts(verbose=False)
    targets = list(RE.TARGET_MODULES)
    spec = lmf.LoRASpec(r=rank, alpha=2 * rank, target_modules=targets)
    lib = lmf.AdapterLibrary.create(model, {"emlora": spec}, seed=0)
    for name, path in folders.items():
        lib.add_peft(name, path)
    em = E.EMLoRA.create(model, "emlora", lib=lib, top_k=k, pooler="attn", attn_dim=16,
                         activation="rational", seed=0)
    em_params = _lora_params(lib, "emlora") + sum(p.numel() for p in em.parameters())
    per_rank = _lora_params(lib, "emlora") // rank
    r_lora = -(-em_params // per_rank)  # ceil: at least the EM-LoRA's budget
    lib.add_new("lora", model, lmf.LoRASpec(r=r_lora, alpha=2 * r_lora, target_modules=targets),
                seed=1)
    lora_params = _lora_params(lib, "lora")
    lmf.patch(model, lib)
    E.attach(model, em)
    data = _batches(tok, steps, batch)
    t0 = time.perf_counter()
    em_b = [dict(b, adapter_names=["emlora"] * b["input_ids"].shape[0]) for b in data]
    hist = E.fit(model, em, em_b, lr=lr, router_lr=lr, balance=1e-2,
                 log=lambda r: log(f"emlora step {r['step']}: lm {r['lm_loss']:.3f} "
                                   f"bal {r['balance_loss']:.3f}") if r["step"] % 10 == 0 else None)
    t_em = time.perf_counter() - t0
    # the plain LoRA: same batches, AdamW, LM loss only
    opt = torch.optim.AdamW(lib.parameters(["lora"]), lr=lr, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    lhist = []
    for i, b in enumerate(data):
        out = model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                    adapter_names=["lora"] * b["input_ids"].shape[0])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        lhist.append(float(out.loss))
        if i % 10 == 0:
            log(f"lora step {i}: lm {lhist[-1]:.3f}")
    t_lora = time.perf_counter() - t0
    model.eval()
    lib.freeze()
    rows = {}
    load0 = __import__("os").getloadavg()[0]
    with torch.no_grad():
        rows["base"] = _eval(model, tok, lambda t, n: ["__base__"] * n, n_eval)
        rows["oracle (4 rank-8 experts)"] = _eval(model, tok, lambda t, n: [t] * n, n_eval)
        rows[f"emlora r={rank} k={k}"] = _eval(model, tok, lambda t, n: ["emlora"] * n, n_eval)
        rows[f"lora r={r_lora}"] = _eval(model, tok, lambda t, n: ["lora"] * n, n_eval)
    return {"rows": rows, "em_params": em_params, "lora_params": lora_params, "steps": steps,
            "batch": batch, "n_eval": n_eval, "lr": lr, "train_s": (t_em, t_lora),
            "final_loss": (sum(h["lm_loss"] for h in hist[-5:]) / 5, sum(lhist[-5:]) / 5),
            "load": load_line(load0), "machine": machine()}


def format_table(r) -> str:
    tasks = list(RE.TASKS)
    lines = [f"{'model':<28} " + " ".join(f"{t:>8}" for t in tasks) + f" {'mean':>6} "
             f"{'tokens/s':>9}"]
    for name, (acc, tps) in r["rows"].items():
        mean = sum(acc.values()) / len(acc)
        lines.append(f"{name:<28} " + " ".join(f"{acc[t]:>8.2f}" for t in tasks)
                     + f" {mean:>6.2f} {tps:>9.1f}")
    lines += ["",
              f"exact match on {r['n_eval']} held-out questions per task (greedy, <= 24 tokens); "
              f"training: {r['steps']} steps x {r['batch']} pooled examples, AdamW lr {r['lr']}",
              f"parameters: emlora {r['em_params']:,} (LoRA + routers), lora {r['lora_params']:,}; "
              f"final LM loss (mean of last 5 steps): emlora {r['final_loss'][0]:.3f}, "
              f"lora {r['final_loss'][1]:.3f}; training s: emlora {r['train_s'][0]:.0f}, "
              f"lora {r['train_s'][1]:.0f}",
              "tokens/s: generated answer tokens / evaluation wall time (shared machine)",
              r["load"], r["machine"]]
    return "\n".join(lines)


def write_section(table: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the others as they are."""
    common.write_section(TITLE, table, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n-eval", type=int, default=25)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    r = run(a.steps, a.batch, a.n_eval, a.rank, a.k, a.lr)
    table = format_table(r)
    print(table)
    if not a.no_write:
        write_section(table)
        print(f"wrote the '{TITLE}' section of {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
