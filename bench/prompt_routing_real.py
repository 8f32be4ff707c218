"""Model-level prompt routing on real trained experts: greedy exact match of every router.

The experts are the four rank-8 LoRAs of ``bench/real_experts.py`` (add / upper / reverse / sort on
SmolLM2-135M-Instruct, cached in ``.cache/experts``). For ``n`` held-out prompts per task, the
patched model generates greedily (up to 24 new tokens, stopping at ``<|im_end|>``) and the answer
is compared with the gold one exactly (``real_experts.generate_answers``' decoding). Rows:

- ``base`` (``adapter_names="__base__"``) and ``oracle`` (``adapter_names`` = the task's expert);
- per-token routers, top-2: ``SpectR(variant="official")``, ``SpectR(variant="paper")``, ``Arrow``;
- ``PromptCached(router)`` (scope="module": each module routes the mean of its prompt input);
- ``PromptCached(router, scope="model", normalize=...)``: one scoring pass of the base model on
  the prompt, every module's per-token normalised scores pooled over the prompt's tokens and all
  210 modules, one top-k per sequence used at every layer. ``span=all``: every non-padding token of
  the chat-templated prompt (system turn included); ``span=question``: ``prompt_mask`` = the
  tokens overlapping the user's question (``real_experts.question_span``).

``route`` is the share of prompts whose first chosen expert is the task's (model scope only, from
``PromptCached.decide``). Bar (issue 11): ``PromptCached(Arrow(top_k=1), scope="model")`` reaches
at least 90% of the oracle's exact match. A second table measures which normalisation works: the
model-level choice of every (scorer, normalize, span) on ``n_route`` prompts per task, from one
base forward per batch with hooks (no generation; written apart from PromptCached's code).

    python -m bench.prompt_routing_real [--quick] [--n 25] [--n-route 50] [--no-write]

writes the ``## prompt routing on trained SmolLM2 experts`` section of bench/RESULTS.md.
``run(quick) -> list[dict]`` and ``format_table(rows) -> str`` are the entry points.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import loramix_fast as lmf
from bench import real_experts as RE
from bench import common
from bench.common import machine

TITLE = "prompt routing on trained SmolLM2 experts"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def configs(full: bool = True):
    """(label, kind, router factory or None, normalize, span) rows to generate with."""
    A1, A2 = (lambda: lmf.Arrow(top_k=1)), (lambda: lmf.Arrow(top_k=2))
    S1 = lambda: lmf.SpectR(top_k=1)  # noqa: E731
    rows = [("base", "names", None, None, None), ("oracle", "names", None, None, None),
            ("token", "token", lambda: lmf.SpectR(top_k=2), None, None),
            ("token", "token", lambda: lmf.SpectR(top_k=2, variant="paper"), None, None),
            ("token", "token", A2, None, None),
            ("pc-module", "module", A1, None, None),
            ("pc-module", "module", S1, None, None),
            ("pc-model", "model", A1, "sum", "all"),
            ("pc-model", "model", A1, "sum", "question")]
    if full:
        rows += [("pc-model", "model", S1, "sum", "all"),
                 ("pc-model", "model", S1, "sum", "question"),
                 ("pc-model", "model", A2, "sum", "question"),
                 ("pc-model", "model", lambda: lmf.Arrow(top_k=2, temperature=0.05), "sum",
                  "question")]
    return rows


SCORERS = ("Arrow", "SpectR official", "SpectR paper")
NORMS = ("sum", "max", "none")


@torch.no_grad()
def route_table(model, lib, tok, questions, labels, batch: int = 50) -> dict:
    """Which expert the model-level pooling picks, for every (scorer, normalize, span), from ONE
    base forward per batch: forward hooks on the patched modules (router off, no adapters) take
    every module's input and score it from ``lmf.align_stack``'s factors (an implementation of
    the pooling written apart from PromptCached's). Returns {(scorer, normalize, span): share of
    prompts routed to their task's expert}."""
    from loramix_fast.patching import _state

    st = _state(model)
    mods = [(name, m) for name, m in st.patched.items() if m.stack() is not None]
    hits = {(sc, nm, sp): 0 for sc in SCORERS for nm in NORMS for sp in ("all", "question")}
    total = 0
    lmf.set_router(model, None)
    for i in range(0, len(questions), batch):
        ids, att, qm = encode(tok, questions[i:i + batch], True)
        B, L = ids.shape
        spans = {"all": att.bool(), "question": qm & att.bool()}
        tw = {k: (v.float() / v.float().sum(1, keepdim=True).clamp(min=1)) for k, v in spans.items()}
        pooled = {k: torch.zeros(B, len(lib.names)) for k in hits}
        hooks = []

        def hook(mod, args, out):
            x2 = args[0].reshape(-1, args[0].shape[-1]).to(mod.weight.dtype)
            paper = lmf.align_stack(mod.stack(), variant="paper")
            off = lmf.align_stack(mod.stack(), variant="official")
            Tn, R = off.A_star.shape[:2]
            raw = {"Arrow": F.linear(x2, off.A_star[:, 0]).abs() * off.inv_sigma1,
                   "SpectR official": F.linear(x2, off.A_flat).view(-1, Tn, R).norm(dim=-1),
                   "SpectR paper": F.linear(x2, paper.A_flat).view(-1, Tn, R).norm(dim=-1)}
            for sc, s in raw.items():
                for nm in NORMS:
                    z = (s.sum(-1, keepdim=True) if nm == "sum" else s.amax(-1, keepdim=True)
                         if nm == "max" else torch.ones_like(s[:, :1]))
                    sn = (s / z.clamp(min=1e-30)).view(B, L, -1)
                    for sp, w in tw.items():
                        pooled[(sc, nm, sp)] += (sn * w[..., None]).sum(1) / len(mods)

        for _, m in mods:
            hooks.append(m.register_forward_hook(hook))
        try:
            model(input_ids=ids, attention_mask=att)
        finally:
            for h in hooks:
                h.remove()
        lab = torch.tensor(labels[i:i + batch])
        for k, p in pooled.items():
            hits[k] += int((p.argmax(-1) == lab).sum())
        total += B
    return {k: v / total for k, v in hits.items()}


def encode(tok, questions, span: bool):
    """Left-padded ``input_ids``, ``attention_mask`` and (``span``) the question mask [B, L]."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seqs = [RE.question_span(tok, q) for q in questions]
    L = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    att = torch.zeros(len(seqs), L, dtype=torch.long)
    qm = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, (s, m) in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        att[i, L - len(s):] = 1
        qm[i, L - len(s):] = torch.tensor(m)
    return ids, att, (qm if span else None)


@torch.no_grad()
def answers(model, tok, questions, adapter_names=None, span=False, max_new_tokens=24,
            batch=50, router=None):
    """Greedy answers (text before <|im_end|>, stripped), and the model-scope decisions'
    first expert per question when ``router`` is a model-scope PromptCached."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    outs, routes = [], []
    for i in range(0, len(questions), batch):
        ids, att, pm = encode(tok, questions[i:i + batch], span)
        kw = {"prompt_mask": pm} if pm is not None else {}
        if adapter_names is not None:
            kw["adapter_names"] = adapter_names[i:i + batch]
        if router is not None and getattr(router, "scope", None) == "model":
            dec = router.decide(model, ids, attention_mask=att, prompt_mask=pm)
            routes += dec.idx[:, 0].tolist()
        gen = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id, eos_token_id=end_id, **kw)
        for row in gen[:, ids.shape[1]:].tolist():
            if end_id in row:
                row = row[:row.index(end_id)]
            outs.append(tok.decode(row, skip_special_tokens=True).strip())
    return outs, routes


def short(router) -> str:
    """A router's name in the table: ``Arrow k=1``, ``SpectR-official k=2``."""
    if router is None:
        return "-"
    t = f" T={router.temperature:g}" if router.temperature != 1.0 else ""
    if isinstance(router, lmf.SpectR):
        return f"SpectR-{router.variant} k={router.top_k}{t}"
    return f"{type(router).__name__} k={router.top_k}{t}"


def _key(label, router, normalize, span) -> str:
    return f"{label}|{router}|{normalize}|{span}"


_PRIORITY = {"names": 0, "model": 1, "module": 2, "token": 3}  # the bar's rows first


def run(quick: bool = False, *, n: int | None = None, n_route: int | None = None,
        cache_dir=None, model=None, tok=None, state=None, budget_s: float | None = None
        ) -> list[dict]:
    """Rows of exact match per generation config (``n`` prompts per task), each carrying the
    routing table (``n_route`` prompts per task). ``state``: a JSON file where every finished
    row is saved at once; a rerun with the same settings skips the rows already there.
    Configs run in the order base/oracle, model scope, module scope, per token (the slowest);
    with ``budget_s``, no new config starts once that many seconds have passed, and the rows not
    run are returned as ``skipped`` rows (the table lists them)."""
    n = n or (6 if quick else 25)
    n_route = n_route or (12 if quick else 50)
    if model is None:
        from loramix_fast import smollm2

        model, tok = smollm2.load()
    folders = RE.ensure_experts(cache_dir, model=model, tok=tok)
    meta = RE.cached_settings(cache_dir) or {}
    tasks = list(folders)
    settings = dict(n=n, n_route=n_route, experts=meta.get("settings", {}))
    saved = {}
    if state is not None and Path(state).exists():
        js = json.loads(Path(state).read_text())
        if js.get("settings") == settings:
            saved = js
    lib = lmf.AdapterLibrary.from_peft(folders)
    data = {t: RE.make_split(t, n, "test") for t in tasks}
    qs = [q for t in tasks for q, _ in data[t]]
    gold = [a for t in tasks for _, a in data[t]]
    task_of = [ti for ti, t in enumerate(tasks) for _ in data[t]]
    done = {r["key"]: r for r in saved.get("rows", [])}
    rows = []

    def save(route_acc):
        if state is not None:
            Path(state).write_text(json.dumps(dict(settings=settings, routes=route_acc,
                                                   rows=list(done.values())), indent=1))

    lmf.patch(model, lib)
    try:
        route_acc = saved.get("routes")
        if route_acc is None:
            t0 = time.perf_counter()
            rq = [q for t in tasks for q, _ in RE.make_split(t, n_route, "test")]
            acc = route_table(model, lib, tok, rq, [ti for ti in range(len(tasks))
                                                    for _ in range(n_route)])
            route_acc = {"|".join(k): v for k, v in acc.items()}
            print(f"  route table ({len(rq)} prompts, {time.perf_counter() - t0:.0f}s)",
                  flush=True)
            save(route_acc)
        t_start = time.perf_counter()
        todo = sorted(enumerate(configs(not quick)), key=lambda c: (_PRIORITY[c[1][1]], c[0]))
        order = {}
        for pos, (label, kind, make, normalize, span) in todo:
            router = names = None
            if kind == "names":
                names = (["__base__"] * len(qs) if label == "base"
                         else [tasks[ti] for ti in task_of])
            elif kind == "token":
                router = make()
            elif kind == "module":
                router = lmf.PromptCached(make())
            else:
                router = lmf.PromptCached(make(), scope="model", normalize=normalize)
            inner = router.router if isinstance(router, lmf.PromptCached) else router
            key = _key(label, repr(inner), normalize, span)
            order[key] = pos
            if key in done:
                rows.append(done[key])
                continue
            if budget_s is not None and time.perf_counter() - t_start > budget_s:
                rows.append(dict(key=key, label=label, router=short(inner),
                                 normalize=normalize or "-", span=span or "-", skipped=True))
                continue
            t0 = time.perf_counter()
            lmf.set_router(model, router)
            out, chosen = answers(model, tok, qs, names, span=span == "question", router=router)
            ok = [o == g for o, g in zip(out, gold)]
            row = dict(key=key, label=label, router=short(inner), normalize=normalize or "-",
                       span=span or "-", n=n, tasks=tasks, em=sum(ok) / len(ok),
                       seconds=time.perf_counter() - t0)
            for ti, t in enumerate(tasks):
                sel = [k for k, x in zip(ok, task_of) if x == ti]
                row[f"em_{t}"] = sum(sel) / len(sel)
            row["route"] = (sum(r == t for r, t in zip(chosen, task_of)) / len(chosen)
                            if chosen else None)
            row["example"] = (qs[0], gold[0], out[0])
            rows.append(row)
            done[key] = row
            save(route_acc)
            print(f"  {label:9s} {row['router']:22s} {row['normalize']:4s} {row['span']:8s} "
                  f"EM {row['em']:.3f} route {row['route']} ({row['seconds']:.0f}s)", flush=True)
    finally:
        lmf.set_router(model, None)
        lmf.unpatch(model)
    rows.sort(key=lambda r: order[r["key"]])
    oracle = next(r["em"] for r in rows if r["label"] == "oracle")
    for r in rows:
        if r.get("skipped"):
            r.update(machine=machine(), train_settings=meta.get("settings", {}),
                     routes=route_acc, n_route=n_route)
            continue
        r.update(vs_oracle=r["em"] / oracle if oracle else float("nan"), machine=machine(),
                 train_settings=meta.get("settings", {}), routes=route_acc, n_route=n_route)
    return rows


def _bar_row(rows, span):
    """The row of the issue's bar: PromptCached(Arrow(top_k=1), scope="model"), default pooling."""
    for r in rows:
        if r.get("skipped"):
            continue
        if (r["label"], r["router"], r["normalize"], r["span"]) == (
                "pc-model", short(lmf.Arrow(top_k=1)), "sum", span):
            return r
    return None


def format_table(rows) -> str:
    if not rows:
        return "(no rows)"
    ran = [r for r in rows if not r.get("skipped")]
    r0 = ran[0]
    tasks, st = r0["tasks"], r0["train_settings"]
    lines = [f"Machine: {r0['machine']}",
             f"SmolLM2-135M-Instruct (fp32), {len(tasks)} peft LoRA experts of "
             f"bench/real_experts.py (r={st.get('rank')}, alpha={st.get('alpha')}, "
             f"{st.get('steps')} steps x batch {st.get('batch')}); {r0['n']} held-out prompts "
             "per task; greedy, up to 24 new tokens; exact match of the answer",
             "token = per-token routing at every module; pc-module = PromptCached(router) "
             "(scope='module'); pc-model = PromptCached(router, scope='model', normalize): "
             "span all = every non-padding prompt token, question = prompt_mask over the user's "
             "question; route = share of prompts whose chosen expert is the task's",
             ""]
    head = (f"{'rows':>9} {'router':>22} {'norm':>4} {'span':>8} | {'EM':>5} "
            + " ".join(f"{t:>7}" for t in tasks) + f" | {'/oracle':>7} {'route':>5} {'s':>5}")
    lines += [head, "-" * len(head)]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"{r['label']:>9} {r['router']:>22} {r['normalize']:>4} {r['span']:>8} | "
                         "not run (the run's time budget was spent)")
            continue
        route = f"{r['route']:5.2f}" if r["route"] is not None else "    -"
        lines.append(f"{r['label']:>9} {r['router']:>22} {r['normalize']:>4} {r['span']:>8} | "
                     f"{r['em']:5.3f} " + " ".join(f"{r['em_' + t]:7.2f}" for t in tasks)
                     + f" | {r['vs_oracle']:7.2f} {route} {r['seconds']:5.0f}")
    rt, nr = r0["routes"], r0["n_route"]
    lines += ["", f"model-level routing accuracy ({nr} held-out prompts per task; one base "
              "forward per batch, hooks on the patched modules; share of prompts whose pooled "
              "argmax is the task's expert)",
              f"{'scorer':>16} | " + " ".join(f"{nm + '/' + sp:>13}" for nm in NORMS
                                               for sp in ("all", "question"))]
    for sc in SCORERS:
        lines.append(f"{sc:>16} | " + " ".join(f"{rt['|'.join((sc, nm, sp))]:13.3f}" for nm in NORMS
                                               for sp in ("all", "question")))
    lines.append("")
    for span, how in (("all", "pooled over every prompt token"),
                      ("question", "prompt_mask = the question")):
        bar = _bar_row(rows, span)
        if bar is not None:
            lines.append(f"bar: PromptCached(Arrow(top_k=1), scope='model'), {how}: "
                         f"{bar['vs_oracle']:.0%} of the oracle's exact match (target >= 90%): "
                         f"{'met' if bar['vs_oracle'] >= 0.9 else 'NOT met'}")
    return "\n".join(lines)


def write_section(table: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the others as they are."""
    common.write_section(TITLE, table, path, after='routing on trained SmolLM2 experts')


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="held-out prompts per task (EM)")
    ap.add_argument("--n-route", type=int, default=None,
                    help="held-out prompts per task (routing table)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    ap.add_argument("--state", default=None, help="JSON file of finished rows (a rerun resumes)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which no new config starts (the rest: 'not run')")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    rows = run(a.quick, n=a.n, n_route=a.n_route, state=a.state, budget_s=a.budget)
    table = format_table(rows)
    print(table)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if not a.no_write:
        write_section(table)
        print(f"wrote the '{TITLE}' section of {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
