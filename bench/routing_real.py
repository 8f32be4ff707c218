"""Routing accuracy on real trained experts: SpectR (paper and official variants) vs Arrow.

The experts are the four rank-8 LoRAs of ``bench/real_experts.py`` (add / upper / reverse / sort on
SmolLM2-135M-Instruct; trained once and cached by ``ensure_experts``). They are loaded with
``lmf.AdapterLibrary.from_peft``, SmolLM2 is patched with ``lmf.patch``, and for held-out prompts
of each task the patched model runs one forward with the router set (``lmf.set_router``) while
``lmf.record_routing`` records, per patched module (all 210: q/k/v/o/gate/up/down x 30 layers), the
router's own scores [tokens, experts] (``ops.spectr_topk``'s output: ||A*_t x|| for SpectR, |v_t . x|
for Arrow). Only the question's tokens count (the tokens overlapping the user's text, not the chat
template or the system turn).

- token top-1 accuracy: over every (question token, module) decision, the fraction whose best-scored
  expert (the router's first choice; ties to the lowest index, as the op) is the prompt's task;
- prompt accuracy: per prompt, each module's scores are averaged over the question's tokens and
  normalised to sum 1 over experts, then averaged over modules; the argmax is the prompt's route.

Routers: ``SpectR(variant="paper")`` (||S V^T x|| = ||dW x||), ``SpectR(variant="official")``
(||V^T x||, the authors' code), ``Arrow()``; each at its default top_k (SpectR 4, Arrow 3: what a
user gets) and at top_k=1. The routed experts feed the next layers, so deeper modules see the
router's own mixture (a real routed forward, not scores on the base model's activations). Scores
are norms / absolute values, so the alignment's sign convention does not change them.

    python -m bench.routing_real [--quick] [--n 50] [--no-write]

writes the ``## routing on trained SmolLM2 experts`` section of bench/RESULTS.md (only that
section; ``python -m bench.run_all --only real`` does the same through run_all).
``run(quick) -> list[dict]`` and ``format_table(rows) -> str`` are the entry points.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

import loramix_fast as lmf
from bench import real_experts as RE
from bench import common
from bench.common import machine

TITLE = "routing on trained SmolLM2 experts"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def routers(top_k: int | None):
    """name -> router (top_k None: each router's default)."""
    kw = {} if top_k is None else {"top_k": top_k}
    return {"spectr-paper": lmf.SpectR(variant="paper", **kw),
            "spectr-official": lmf.SpectR(variant="official", **kw),
            "arrow": lmf.Arrow(**kw)}


def question_batches(tok, tasks, n: int, seed: int = 0, batch: int = 50):
    """[(ids [B, L], attention_mask [B, L], question mask [B, L] bool, labels [B])], right-padded,
    from ``n`` held-out prompts per task."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    items = []
    for ti, task in enumerate(tasks):
        for q, _ in RE.make_split(task, n, "test", seed=seed):
            ids, qmask = RE.question_span(tok, q)
            items.append((ids, qmask, ti))
    out = []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        L = max(len(ids) for ids, _, _ in chunk)
        ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
        att = torch.zeros(len(chunk), L, dtype=torch.long)
        qm = torch.zeros(len(chunk), L, dtype=torch.bool)
        for j, (s, m, _) in enumerate(chunk):
            ids[j, :len(s)] = torch.tensor(s)
            att[j, :len(s)] = 1
            qm[j, :len(s)] = torch.tensor(m)
        out.append((ids, att, qm, torch.tensor([t for _, _, t in chunk])))
    return out


@torch.no_grad()
def measure(model, router, batches, T: int) -> dict:
    """Token-level and prompt-level routing of ``router`` on a patched model.

    Returns tok_correct [T], tok_total [T] (per true task, over (question token, module)
    decisions), tok_choice [T, T] (true task x chosen expert, token decisions), prompt_pred
    [prompts], prompt_label [prompts], modules (number of patched modules seen), by_group
    {group: [correct, total]} per projection type ("q_proj", ...) and layer third ("L0-9", ...)."""
    lmf.set_router(model, router)
    tok_correct = torch.zeros(T, dtype=torch.long)
    tok_total = torch.zeros(T, dtype=torch.long)
    tok_choice = torch.zeros(T, T, dtype=torch.long)
    preds, labels = [], []
    n_mod = 0
    by_group: dict = {}
    try:
        for ids, att, qm, lab in batches:
            lmf.record_routing(model)
            model(input_ids=ids, attention_mask=att)
            rep = lmf.routing_report(model)
            B, L = ids.shape
            calls = [(m, s) for m, s in rep.token_scores if s.shape[0] == B * L]
            if len({m for m, _ in calls}) != len(calls):
                raise RuntimeError("a module was recorded twice in one forward")
            n_mod = len(calls)
            qf = qm.float()
            ntok = qf.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
            prompt_scores = torch.zeros(B, T)
            true = lab[:, None].expand(B, L)[qm]  # [question tokens]
            n_layers = 1 + max(_layer(m) for m, _ in calls)
            for mod, s in calls:
                s = s.view(B, L, T)
                choice = s.argmax(-1)  # first max: the op's tie rule
                c = choice[qm]
                third = min(2, 3 * _layer(mod) // n_layers)
                lo, hi = third * n_layers // 3, (third + 1) * n_layers // 3 - 1
                for g in (mod.rsplit(".", 1)[-1], f"L{lo}-{hi}"):
                    acc = by_group.setdefault(g, [0, 0])
                    acc[0] += int((c == true).sum())
                    acc[1] += int(c.numel())
                tok_correct += torch.bincount(true[c == true], minlength=T)
                tok_total += torch.bincount(true, minlength=T)
                tok_choice += torch.bincount(true * T + c, minlength=T * T).view(T, T)
                m = (s * qf[..., None]).sum(1) / ntok  # [B, T] mean over question tokens
                prompt_scores += m / m.sum(-1, keepdim=True).clamp(min=1e-30)
            preds.append(prompt_scores.argmax(-1))
            labels.append(lab)
    finally:
        lmf.record_routing(model, False)
        lmf.set_router(model, None)
    return dict(tok_correct=tok_correct, tok_total=tok_total, tok_choice=tok_choice,
                prompt_pred=torch.cat(preds), prompt_label=torch.cat(labels), modules=n_mod,
                by_group=by_group)


def _layer(module_name: str) -> int:
    m = re.search(r"layers\.(\d+)\.", module_name)
    return int(m.group(1)) if m else 0


def expert_norms(lib) -> dict:
    """{expert: mean over modules of ||dW_t||_F} (the scale the paper variant's score carries)."""
    acc = {n: [] for n in lib.names}
    for mod in sorted(lib.modules()):
        st = lib.stack(mod, torch.float32, "cpu")
        al = lmf.align_stack(st, variant="paper")
        fro = al.sigma.double().norm(dim=1)
        for i, n in enumerate(lib.names):
            acc[n].append(float(fro[i]))
    return {n: sum(v) / len(v) for n, v in acc.items()}


def run(quick: bool = False, *, n: int | None = None, cache_dir=None, model=None, tok=None,
        top_ks=(None, 1)) -> list[dict]:
    """One row per (router, top_k): accuracies per task and overall (see the module docstring)."""
    n = n or (20 if quick else 50)
    if model is None:
        from loramix_fast import smollm2

        model, tok = smollm2.load()
    t0 = time.perf_counter()
    folders = RE.ensure_experts(cache_dir, model=model, tok=tok)
    t_train = time.perf_counter() - t0
    meta = RE.cached_settings(cache_dir) or {}
    tasks = list(folders)
    lib = lmf.AdapterLibrary.from_peft(folders)
    assert list(lib.names) == tasks
    em = RE.ensure_eval(folders, cache_dir, model, tok)  # greedy exact match, cached
    norms = expert_norms(lib)
    batches = question_batches(tok, tasks, n)
    T = len(tasks)
    rows = []
    lmf.patch(model, lib)
    try:
        for top_k in top_ks:
            for name, router in routers(top_k).items():
                t1 = time.perf_counter()
                r = measure(model, router, batches, T)
                pc = r["prompt_pred"] == r["prompt_label"]
                row = dict(router=name, top_k=getattr(router, "top_k"), default_k=top_k is None,
                           repr=repr(router), n=n, modules=r["modules"], tasks=tasks,
                           tok_acc=float(r["tok_correct"].sum() / r["tok_total"].sum()),
                           prompt_acc=float(pc.float().mean()),
                           decisions=int(r["tok_total"].sum()),
                           seconds=time.perf_counter() - t1)
                for ti, task in enumerate(tasks):
                    row[f"tok_{task}"] = float(r["tok_correct"][ti] / r["tok_total"][ti])
                    sel = r["prompt_label"] == ti
                    row[f"prompt_{task}"] = float(pc[sel].float().mean())
                    row[f"prompt_to_{task}"] = torch.bincount(
                        r["prompt_pred"][sel], minlength=T).tolist()
                    row[f"tok_to_{task}"] = (r["tok_choice"][ti].double()
                                             / r["tok_choice"][ti].sum()).tolist()
                row["by_group"] = {g: c / t for g, (c, t) in r["by_group"].items()}
                row.update(em={t: (v["base"], v["expert"]) for t, v in em.items()}, norms={k: round(v, 4) for k, v in norms.items()},
                           machine=machine(), train_s=sum(meta.get("seconds", {}).values()),
                           train_settings=meta.get("settings", {}), ensure_s=t_train)
                rows.append(row)
                print(f"  {name} top_k={row['top_k']}: token {row['tok_acc']:.3f}, prompt "
                      f"{row['prompt_acc']:.3f} ({row['seconds']:.0f}s)", flush=True)
    finally:
        lmf.unpatch(model)
    return rows


def format_table(rows) -> str:
    if not rows:
        return "(no rows)"
    r0 = rows[0]
    tasks = r0["tasks"]
    st = r0["train_settings"]
    lines = [f"Machine: {r0['machine']}",
             f"SmolLM2-135M-Instruct (fp32), {len(tasks)} peft LoRA experts trained by "
             f"bench/real_experts.py (r={st.get('rank')}, alpha={st.get('alpha')}, "
             f"{st.get('steps')} steps x batch {st.get('batch')}, lr {st.get('lr')}; "
             f"training took {r0['train_s']:.0f}s here)",
             "held-out greedy exact match, base -> expert: " + ", ".join(
                 f"{t} {b:.2f} -> {e:.2f}" for t, (b, e) in r0["em"].items()),
             f"{r0['n']} held-out prompts per task; {r0['modules']} patched modules; "
             f"{r0['decisions']} (question token, module) decisions per router; chance = "
             f"{1 / len(tasks):.2f}",
             "token = top-1 over (token, module) decisions; prompt = argmax of the module-"
             "normalised scores averaged over the prompt"]
    head = (f"{'router':>16} {'k':>2} | {'token':>5} " + " ".join(f"{t:>7}" for t in tasks)
            + f" | {'prompt':>6} " + " ".join(f"{t:>7}" for t in tasks))
    lines += ["", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['router']:>16} {r['top_k']:>2} | {r['tok_acc']:5.3f} "
                     + " ".join(f"{r['tok_' + t]:7.3f}" for t in tasks)
                     + f" | {r['prompt_acc']:6.3f} "
                     + " ".join(f"{r['prompt_' + t]:7.2f}" for t in tasks))
    lines += ["", "where the prompts go (default k): true task -> prompts routed to "
              + "/".join(tasks)]
    for r in rows:
        if r["default_k"]:
            lines.append(f"{r['router']:>16}: " + "; ".join(
                f"{t} -> {'/'.join(map(str, r['prompt_to_' + t]))}" for t in tasks))
    lines += ["", "where the tokens go (default k): share of each task's token decisions per "
              "expert " + "/".join(tasks)]
    for r in rows:
        if r["default_k"]:
            lines.append(f"{r['router']:>16}: " + "; ".join(
                f"{t} -> " + "/".join(f"{v:.2f}" for v in r['tok_to_' + t]) for t in tasks))
    groups = ([g for g in RE.TARGET_MODULES if g in r0["by_group"]]
              + sorted((g for g in r0["by_group"] if g.startswith("L")),
                       key=lambda g: int(g[1:].split("-")[0])))
    lines += ["", "token top-1 by module group (default k): " + " ".join(groups)]
    for r in rows:
        if r["default_k"]:
            lines.append(f"{r['router']:>16}: " + " ".join(
                f"{r['by_group'][g]:.3f}" for g in groups))
    lines.append("mean ||dW_t||_F over modules: " + ", ".join(
        f"{k} {v:.3f}" for k, v in r0["norms"].items()))
    return "\n".join(lines)


def write_section(table: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the others as they are."""
    try:  # keep run_all's order when the section is registered there
        from bench.run_all import SECTIONS

        order = [v[1] for v in SECTIONS.values()]  # (module, title[, run kwargs])
    except Exception:
        order = []
    later = order[order.index(TITLE) + 1:] if TITLE in order else ()
    common.write_section(TITLE, table, path, before=later)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="held-out prompts per task")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    rows = run(a.quick, n=a.n)
    table = format_table(rows)
    print(table)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if not a.no_write:
        write_section(table)
        print(f"wrote the '{TITLE}' section of {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
