"""Ensembles on real trained experts: exact match of ``lmf.ensemble_generate`` over the four
SmolLM2 task experts of ``bench/real_experts.py`` (add / upper / reverse / sort), against each
prompt's own expert (the oracle) and the base model.

For ``n`` held-out prompts per task (the same prompts for every row), greedy, up to 24 new tokens:

- ``oracle``: each prompt served by its own task's expert (``adapter_names``);
- ``base``: the base model;
- ``ensemble probs, uniform``: the four experts' next-token distributions averaged (PELMo,
  ``mode="probs"``, weights 1/4), all 4 x B copies in one forward per step;
- ``ensemble logits, uniform``: their logits averaged (ELREA, ``mode="logits"``);
- ``ensemble probs, Arrow top-2 weights``: per prompt, the weights of
  ``PromptCached(Arrow(top_k=2), scope="model").decide`` (two experts, softmax of the pooled
  scores; the others 0): the router picks the ensemble's members.

Accuracy only (nothing is timed here, so no benchmark lock is needed; the seconds are wall time).

    python -m bench.ensemble_real [--quick] [--n 10] [--no-write]

writes the ``## ensembles on trained SmolLM2 experts`` section of bench/RESULTS.md (only that one).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import loramix_fast as lmf
from bench import real_experts as RE
from bench import common
from bench.common import machine

TITLE = "ensembles on trained SmolLM2 experts"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@torch.no_grad()
def run(quick: bool = False, *, n: int | None = None, cache_dir=None, model=None,
        tok=None) -> list[dict]:
    """One row per configuration (module docstring): EM overall and per task, vs oracle."""
    from loramix_fast.demo import _answers, _Prompts

    n = n or (4 if quick else 10)
    if model is None:
        from loramix_fast import smollm2

        model, tok = smollm2.load()
    folders = RE.ensure_experts(cache_dir, model=model, tok=tok)
    meta = RE.cached_settings(cache_dir) or {}
    tasks = list(folders)
    P = _Prompts(tok, tasks, n)
    B, E = len(P.gold), len(tasks)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    kw = dict(max_new_tokens=24, attention_mask=P.att, pad_token_id=pad_id)
    lmf.patch(model, lmf.AdapterLibrary.from_peft(folders))
    rows = []

    def add(label, fn):
        t0 = time.perf_counter()
        gen = fn()
        outs, _ = _answers(tok, gen, P.ids.shape[1], end_id)
        em = sum(o == g for o, g in zip(outs, P.gold)) / B
        rows.append(dict(label=label, em=em, by_task=P.em_by_task(outs), n=n, tasks=tasks,
                         seconds=time.perf_counter() - t0, example=(P.questions[-1], P.gold[-1],
                                                                   outs[-1])))
        print(f"  {label:40s} EM {em:.3f} ({rows[-1]['seconds']:.0f}s)", flush=True)

    try:
        for label, names in (("oracle", P.task), ("base", "__base__")):
            add(label, lambda names=names: model.generate(
                input_ids=P.ids, adapter_names=names, do_sample=False, eos_token_id=end_id, **kw))
        for mode in ("probs", "logits"):
            add(f"ensemble {mode}, uniform", lambda mode=mode: lmf.ensemble_generate(
                model, P.ids, experts=tasks, mode=mode, eos_token_id=end_id, **kw))
        pc = lmf.PromptCached(lmf.Arrow(top_k=2), scope="model")
        lmf.set_router(model, pc)
        dec = pc.decide(model, P.ids, attention_mask=P.att)
        lmf.set_router(model, None)
        w = torch.zeros(B, E).scatter_(1, dec.idx.long(), dec.weights.float())
        add("ensemble probs, Arrow top-2 weights", lambda: lmf.ensemble_generate(
            model, P.ids, experts=tasks, weights=w, mode="probs", eos_token_id=end_id, **kw))
    finally:
        lmf.set_router(model, None)
        lmf.unpatch(model)
    oracle = rows[0]["em"]
    for r in rows:
        r.update(vs_oracle=r["em"] / oracle if oracle else float("nan"), machine=machine(),
                 train_settings=meta.get("settings", {}))
    return rows


def format_table(rows) -> str:
    r0 = rows[0]
    tasks, st = r0["tasks"], r0["train_settings"]
    lines = [f"Machine: {r0['machine']}",
             f"SmolLM2-135M-Instruct (fp32), {len(tasks)} rank-{st.get('rank')} experts of "
             f"bench/real_experts.py ({st.get('steps')} steps x {st.get('batch')} rows per task, "
             f"trainer {st.get('trainer', 'peft')}); {r0['n']} held-out prompts per task, greedy "
             "exact match, up to 24 new tokens", ""]
    head = f"{'configuration':40s} {'EM':>5s} {'vs oracle':>9s} " + " ".join(
        f"{t:>7s}" for t in tasks) + f" {'s':>5s}"
    lines += [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:40s} {r['em']:5.3f} {r['vs_oracle']:8.2f}x " + " ".join(
            f"{r['by_task'][t]:7.2f}" for t in tasks) + f" {r['seconds']:5.0f}")
    return "\n".join(lines)


def write_section(table: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the others as they are."""
    common.write_section(TITLE, table, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="held-out prompts per task")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = run(a.quick, n=a.n)
    table = format_table(rows)
    print(table)
    if not a.no_write:
        write_section(table)
        print(f"wrote the '{TITLE}' section of {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
