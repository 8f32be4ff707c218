"""The trade-offs paper's comparison on the real SmolLM2 experts (issue 10 item 7): ensembling,
merging and routing over the four task experts of bench/real_experts.py, one table.

    flock /tmp/lmf-bench.lock .venv/bin/python -m bench.strategies_real [--quick] [--no-write]
        [--only REGEX]   # rerun some rows, the others from the row cache (.cache/strategies_rows.json)

Per strategy: multi-task answer NLL (mean over the answer tokens of held-out examples of every
task, teacher-forced), held-out greedy exact match, forwards per token, and ms per token of the
scoring pass (wall time of the batched teacher-forced forward / tokens in it). Learned strategies
fit on training examples of every task pooled (no task labels used), evaluated on held-out ones.
ELREA (issue 10 item 6): its own base adapter, gradient-feature clusters and cluster experts, trained
on the pooled training examples (``_elrea_rows``), then its ensemble and its MoE routing/merging
baselines.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

import loramix_fast as lmf
from bench import real_experts as RE
from bench import common
from bench.common import load_line, machine

TITLE = "strategies on trained SmolLM2 experts (ensembling / merging / routing)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _examples(tasks, n, split, seed=0):
    return [(t, q, a) for t in tasks for q, a in RE.make_split(t, n, split, seed=seed)]


def _batches(tok, ex, size):
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for i in range(0, len(ex), size):
        ids, att, lab = RE._batch(tok, [(q, a) for _, q, a in ex[i:i + size]], pad)
        qmask = torch.zeros_like(att, dtype=torch.bool)  # the user's question's tokens
        for j, (_, q, _) in enumerate(ex[i:i + size]):
            m = RE.question_span(tok, q)[1]
            qmask[j, :len(m)] = torch.tensor(m)
        out.append({"input_ids": ids, "attention_mask": att, "labels": lab,
                    "tasks": [t for t, _, _ in ex[i:i + size]], "question_mask": qmask})
    return out


def _keep(b):
    m = b["attention_mask"]
    return (m[:, 1:] > 0) & (m[:, :-1] > 0) & (b["labels"][:, 1:] != -100)


@torch.no_grad()
def _nll_forward(model, batches, names_of=None, prompt_mask=False):
    """(mean answer NLL, ms per token) of a single-forward strategy. ``prompt_mask``: hand the
    forward ``prompt_mask`` = the prompt's tokens (not the answer; a teacher-forced pass must not
    route on the answer it scores), or with ``"question"`` the user's question's tokens only, for
    routers that pool over the prompt."""
    tot, n, secs, toks = 0.0, 0, 0.0, 0
    for b in batches:
        ids, att = b["input_ids"], b["attention_mask"]
        kw = {} if names_of is None else {"adapter_names": names_of(b)}
        if prompt_mask == "question":
            kw["prompt_mask"] = b["question_mask"]
        elif prompt_mask:
            kw["prompt_mask"] = (b["labels"] == -100) & (att > 0)
        t0 = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=att, **kw).logits
        secs += time.perf_counter() - t0
        toks += int(att.sum())
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        k = _keep(b)
        tot -= float(lp[k].sum())
        n += int(k.sum())
    return tot / n, 1e3 * secs / toks


@torch.no_grad()
def _score(batches, lp_of):
    """(mean answer NLL, ms per token) of a strategy whose ``lp_of(i, batch)`` returns the
    next-token log-probabilities [B, L-1] of batch i; the call is what is timed."""
    tot, n, secs, toks = 0.0, 0, 0.0, 0
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        lp = lp_of(i, b)
        secs += time.perf_counter() - t0
        toks += int(b["attention_mask"].sum())
        k = _keep(b)
        tot -= float(lp[k].sum())
        n += int(k.sum())
    return tot / n, 1e3 * secs / toks


def _nll_ensemble(model, batches, experts, w, mode):
    return _score(batches, lambda i, b: lmf.ensemble_logprobs(
        model, b["input_ids"], experts, w, mode=mode, attention_mask=b["attention_mask"]))


def _em_single(model, tok, ex, names=None, new=20):
    qs = [q for _, q, _ in ex]
    outs = RE.generate_answers(model, tok, qs, names, max_new_tokens=new, batch=64)
    return RE.exact_match(outs, [a for _, _, a in ex])


@torch.no_grad()
def _em_ensemble(model, tok, ex, experts, w, mode, new=20):
    old = tok.padding_side
    tok.padding_side = "left"
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    outs = []
    try:
        for i in range(0, len(ex), 32):
            qs = [q for _, q, _ in ex[i:i + 32]]
            enc = tok([RE.prompt_text(tok, q) for q in qs], return_tensors="pt", padding=True,
                      add_special_tokens=False)
            gen = lmf.ensemble_generate(model, enc["input_ids"], experts, weights=w, mode=mode,
                                        attention_mask=enc["attention_mask"],
                                        max_new_tokens=new, eos_token_id=end_id,
                                        pad_token_id=pad)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                if end_id in row:
                    row = row[:row.index(end_id)]
                outs.append(tok.decode(row, skip_special_tokens=True).strip())
    finally:
        tok.padding_side = old
    return RE.exact_match(outs, [a for _, _, a in ex])


def _train_router(model, router, batches, steps, lr):
    lmf.set_router(model, router)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    for s in range(steps):
        b = batches[s % len(batches)]
        opt.zero_grad()
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(
            -1, b["input_ids"][:, 1:, None])[..., 0]
        k = _keep(b)
        (-(lp * k).sum() / k.sum()).backward()
        opt.step()
    lmf.set_router(model, None)


CACHE = Path(__file__).resolve().parent.parent / ".cache" / "strategies_rows.json"


def _read_cache(path) -> dict:
    path = Path(path or CACHE)
    return json.loads(path.read_text()) if path.exists() else {}


def _load_cache(path, key) -> dict:
    """``{name: row}`` of earlier runs with the same settings (empty if none). The cache holds one
    set of rows per settings, so a --quick run does not replace a full one."""
    rows = _read_cache(path).get(json.dumps(key, sort_keys=True), [])
    return {r["name"]: r for r in rows}


def _save_cache(path, key, rows) -> None:
    path = Path(path or CACHE)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_cache(path)
    k = json.dumps(key, sort_keys=True)
    old = {r["name"]: r for r in data.get(k, [])}
    old.update({r["name"]: {f: v for f, v in r.items() if f != "cached"} for r in rows})
    data[k] = list(old.values())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def run(quick=False, *, n_test=None, n_train=None, steps=None, em=True, model=None, tok=None,
        only=None, cache=None):
    """Measure every strategy (or, with ``only``, those whose name matches the regular expression;
    the other rows then come from ``cache``, a JSON file of an earlier run with the same settings).
    Every measured row is written to ``cache`` as soon as it is done, so an interrupted run keeps
    what it measured. Returns ``(rows, meta)``."""
    n_test = n_test or (4 if quick else 12)
    n_train = n_train or (4 if quick else 8)
    steps = steps or (3 if quick else 12)
    if model is None:
        from loramix_fast import smollm2

        model, tok = smollm2.load()
    t_all = time.perf_counter()
    load0 = __import__("os").getloadavg()[0]
    folders = RE.ensure_experts(model=model, tok=tok, verbose=False)
    tasks = list(folders)
    lib = lmf.AdapterLibrary.from_peft(folders)
    lmf.patch(model, lib)
    model.requires_grad_(False)
    test = _examples(tasks, n_test, "test")
    train = _examples(tasks, n_train, "train")
    # interleave the tasks in the training batches (pooled data, no task labels)
    train = [train[j * n_train + i] for i in range(n_train) for j in range(len(tasks))]
    tb = _batches(tok, test, 16)
    trb = _batches(tok, train, 16)
    E = len(tasks)
    rows = []

    key = dict(n_test=n_test, n_train=n_train, steps=steps, em=em, tasks=tasks)
    cached = _load_cache(cache, key) if only is not None else {}
    pat = re.compile(only) if only is not None else None

    def want(name):
        """Measure this strategy now? (Otherwise its cached row is used, if there is one.)"""
        if pat is None or pat.search(name):
            return True
        if name in cached:
            rows.append({**cached[name], "cached": True})
        return False

    def add(name, nll_ms, em_fn, fwd, fit_s=0.0, note=""):
        acc = em_fn() if em else None
        rows.append(dict(name=name, nll=nll_ms[0], ms=nll_ms[1], em=acc, fwd=fwd, fit_s=fit_s,
                         note=note))
        _save_cache(cache, key, rows)
        print(f"  {name:28s} nll {nll_ms[0]:.3f}  em {acc}  ms/tok {nll_ms[1]:.2f}  "
              f"fit {fit_s:.0f}s {note}", flush=True)

    try:
        if want("base"):
            add("base", _nll_forward(model, tb, lambda b: ["__base__"] * len(b["tasks"])),
                lambda: _em_single(model, tok, test, ["__base__"] * len(test)), 1)
        if want("oracle (task's expert)"):
            add("oracle (task's expert)", _nll_forward(model, tb, lambda b: b["tasks"]),
                lambda: _em_single(model, tok, test, [t for t, _, _ in test]), 1)
        for mode in ("probs", "logits"):
            if want(f"ensemble uniform {mode}"):
                add(f"ensemble uniform {mode}", _nll_ensemble(model, tb, tasks, None, mode),
                    lambda: _em_ensemble(model, tok, test, tasks, None, mode), E)
            if want(f"ensemble learned {mode}"):
                t0 = time.perf_counter()
                w = lmf.fit_ensemble_weights(model, trb, tasks, mode=mode, steps=300)
                fit = time.perf_counter() - t0
                add(f"ensemble learned {mode}", _nll_ensemble(model, tb, tasks, w, mode),
                    lambda: _em_ensemble(model, tok, test, tasks, w, mode), E, fit,
                    "w=" + "/".join(f"{v:.2f}" for v in w.tolist()))
        for space in ("factor", "delta"):
            if want(f"merge uniform {space}"):
                nm = lmf.merge(lib, tasks, None, space=space, name=f"uniform_{space}")
                add(f"merge uniform {space}", _nll_forward(model, tb, lambda b: nm),
                    lambda: _em_single(model, tok, test, [nm] * len(test)), 1)
                lib.remove(nm)
            for gran in ("global", "layer"):
                if not want(f"merge learned {space} {gran}"):
                    continue
                t0 = time.perf_counter()
                w = lmf.fit_merge_weights(model, trb, tasks, space=space, granularity=gran,
                                          steps=steps, lr=0.05)
                fit = time.perf_counter() - t0
                nm = lmf.merge(lib, tasks, w, space=space, name=f"learned_{space}_{gran}")
                note = ("w=" + "/".join(f"{v:.2f}" for v in w.tolist())) if gran == "global" \
                    else ""
                add(f"merge learned {space} {gran}", _nll_forward(model, tb, lambda b: nm),
                    lambda: _em_single(model, tok, test, [nm] * len(test)), 1, fit, note)
                lib.remove(nm)
        for name, router in [("mu-routing (Uniform)", lmf.Uniform()),
                             ("Arrow top-1", lmf.Arrow(top_k=1)),
                             ("SpectR top-1", lmf.SpectR(top_k=1)),
                             ("prompt Arrow top-1 (model scope)",
                              lmf.PromptCached(lmf.Arrow(top_k=1), scope="model"))]:
            if not want(name):
                continue
            lmf.set_router(model, router)
            prompt = isinstance(router, lmf.PromptCached)
            add(name, _nll_forward(model, tb, prompt_mask=prompt),
                lambda: _em_single(model, tok, test), 1,
                note="+1 base pass over the prompt to route; EM pools over the whole "
                     "templated prompt" if prompt else "")
            lmf.set_router(model, None)
        name = "prompt Arrow top-1 (model scope, question span)"
        if want(name):
            from bench.prompt_routing_real import answers

            router = lmf.PromptCached(lmf.Arrow(top_k=1), scope="model")
            lmf.set_router(model, router)
            add(name, _nll_forward(model, tb, prompt_mask="question"),
                lambda: RE.exact_match(answers(model, tok, [q for _, q, _ in test], span=True,
                                               max_new_tokens=20)[0], [a for _, _, a in test]),
                1, note="pools over the user's question's tokens only (prompt_mask), NLL and EM")
            lmf.set_router(model, None)
        for init, lr in (("zero", 1e-3), ("arrow", 1e-3)):
            if not want(f"learned routing ({init} init)"):
                continue
            r = lmf.LearnedRouter(init=init)
            t0 = time.perf_counter()
            _train_router(model, r, trb, steps, lr)
            fit = time.perf_counter() - t0
            lmf.set_router(model, r)
            add(f"learned routing ({init} init)", _nll_forward(model, tb),
                lambda: _em_single(model, tok, test), 1, fit)
            lmf.set_router(model, None)
        elrea = ["ELREA", "ELREA MoE routing", "ELREA MoE merging"]
        if any([want(n) for n in elrea]):  # (a list: every name's cached row is kept or skipped)
            rows[:] = [r for r in rows if r["name"] not in elrea]
            _elrea_rows(model, tok, lib, tasks, train, test, tb, trb, add, steps)
    finally:
        lmf.unpatch(model)
    meta = dict(machine=machine(), load=load_line(load0), n_test=n_test, n_train=n_train,
                steps=steps, em=em, tasks=tasks, seconds=time.perf_counter() - t_all,
                cached=sum(bool(r.get("cached")) for r in rows))
    return rows, meta


def _elrea_rows(model, tok, lib, tasks, train, test, tb, trb, add, steps):
    """The ELREA rows (issue 10 item 6): ELREA's own experts from its own clusters of the pooled
    training data, not the task experts. A base adapter (rank 8 on the experts' modules) trains
    ``steps`` Adam steps on the pooled training batches (answer NLL); gradient features of every
    training question (the question's tokens only, eq. 2; Adam form with the base adapter's
    optimizer state at two checkpoints, eqs. 5-7; projected to 256 dims); BIRCH into
    ``len(tasks)`` clusters with rebalancing; one expert per cluster trained from the base adapter
    (``steps`` Adam steps, all clusters in one mixed batch); then per test question the features,
    cosines to the centroids and eq. 9's weights, and three ways to use them: the logit-level
    ensemble of the base adapter and the cluster experts (eq. 10), the MoE routing baseline
    (eq. 11: the same weights mixing the same adapters in output space in every module) and the
    MoE merging baseline (one factor-space merge per question with the same weights)."""
    from loramix_fast import elrea as EL

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def batches(ex, size=16):
        out = []
        for i in range(0, len(ex), size):
            chunk = ex[i:i + size]
            ids, att, lab = RE._batch(tok, [(q, a) for _, q, a in chunk], pad)
            im = torch.zeros_like(ids)
            for r, (_, q, _) in enumerate(chunk):
                p, m = RE.question_span(tok, q)
                assert ids[r, :len(p)].tolist() == p  # the prompt is the sequence's prefix
                im[r, :len(p)] = torch.tensor(m, dtype=torch.long)
            out.append({"input_ids": ids, "attention_mask": att, "labels": lab,
                        "instruction_mask": im})
        return out

    def answer_nll(b, names):
        ids, att = b["input_ids"], b["attention_mask"]
        logits = model(input_ids=ids, attention_mask=att, adapter_names=names).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        k = _keep(b)
        return -(lp * k).sum() / k.sum()

    train_b, test_b = batches(train), batches(test)
    base = "elrea_base"
    added = [base]
    t0 = time.perf_counter()
    try:
        lib.add_new(base, model, lmf.LoRASpec(r=8, alpha=16, target_modules=RE.TARGET_MODULES),
                    seed=0)
        opt = torch.optim.Adam(lib.parameters([base]), lr=2e-3)
        ckpts, states = [], []
        for s in range(steps):  # the base adapter: pooled data, a few steps
            b = train_b[s % len(train_b)]
            opt.zero_grad()
            answer_nll(b, [base] * b["input_ids"].shape[0]).backward()
            opt.step()
            if s + 1 in (max(1, steps // 2), steps):  # two checkpoints (one when steps == 1)
                if s + 1 not in [c[0] for c in ckpts]:
                    ckpts.append((s + 1, {m: lmf.LoRAFactors(f.A.detach().clone(),
                                                             f.B.detach().clone(), f.scale)
                                          for m, f in lib.factors(base).items()}))
                    states.append(EL.adam_state(opt, lib, base))
        lib.freeze([base])
        el = EL.ELREA(model, lib, base, d_proj=256, seed=0, checkpoints=[c for _, c in ckpts],
                      optimizer_states=states, n_clusters=len(tasks), threshold=0.5)
        el.fit(train_b, steps=steps, lr=2e-3, rows_per_cluster=max(1, 16 // len(tasks)))
        added += el.cluster_names
        fit = time.perf_counter() - t0
        C = len(el.cluster_names)
        sizes = "/".join(str(int(n)) for n in torch.bincount(el.labels).tolist())
        # how the clusters line up with the (unseen) task labels
        purity = sum(max(sum(1 for (t, _, _), c in zip(train, el.labels.tolist())
                             if c == k and t == task) for task in tasks)
                     for k in range(C)) / len(train)
        t1 = time.perf_counter()
        w = el.weights(test_b)  # [N_test, 1 + C], base first
        feat_ms = 1e3 * (time.perf_counter() - t1) / len(test)
        note = (f"C={C} sizes {sizes} purity {purity:.2f}; + features {feat_ms:.0f} ms/prompt "
                f"(fwd+bwd x{len(ckpts)} ckpts); mean w base {w[:, 0].mean():.2f}")

        def rows_of(i):
            n = test_b[i]["input_ids"].shape[0]
            off = sum(x["input_ids"].shape[0] for x in test_b[:i])
            return w[off:off + n]

        def score(fn):
            return _score(test_b, lambda i, b: fn(b, rows_of(i)))

        def token_lp(b, names=None):
            kw = {} if names is None else {"adapter_names": names}
            ids = b["input_ids"]
            logits = model(input_ids=ids, attention_mask=b["attention_mask"], **kw).logits
            return torch.log_softmax(logits[:, :-1].float(), -1).gather(
                -1, ids[:, 1:, None])[..., 0]

        def routed_lp(b, wb):
            with el.routed(wb):
                return token_lp(b)

        def merged_lp(b, wb):
            with el.merged(wb) as names:
                return token_lp(b, names)

        @torch.no_grad()
        def em(kind):
            old = tok.padding_side
            tok.padding_side = "left"
            end_id = tok.convert_tokens_to_ids("<|im_end|>")
            outs = []
            try:
                for i in range(0, len(test), 16):
                    qs = [q for _, q, _ in test[i:i + 16]]
                    wb = w[i:i + 16]
                    if kind == "ensemble":
                        enc = tok([RE.prompt_text(tok, q) for q in qs], return_tensors="pt",
                                  padding=True, add_special_tokens=False)
                        gen = el.generate(enc["input_ids"], weights=wb,
                                          attention_mask=enc["attention_mask"], max_new_tokens=20,
                                          eos_token_id=end_id, pad_token_id=pad)
                        for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                            if end_id in row:
                                row = row[:row.index(end_id)]
                            outs.append(tok.decode(row, skip_special_tokens=True).strip())
                    elif kind == "routing":
                        with el.routed(wb):
                            outs += RE.generate_answers(model, tok, qs, None, max_new_tokens=20,
                                                        batch=len(qs))
                    else:
                        with el.merged(wb) as names:
                            outs += RE.generate_answers(model, tok, qs, names, max_new_tokens=20,
                                                        batch=len(qs))
            finally:
                tok.padding_side = old
            return RE.exact_match(outs, [a for _, _, a in test])

        add("ELREA", score(lambda b, wb: el.logprobs(b["input_ids"], weights=wb,
                                                     attention_mask=b["attention_mask"])),
            lambda: em("ensemble"), C + 1, fit, note)
        add("ELREA MoE routing", score(routed_lp), lambda: em("routing"), 1, fit,
            f"eq. 11, {C + 1} adapters per token, ELREA's weights")
        add("ELREA MoE merging", score(merged_lp), lambda: em("merging"), 1, fit,
            "factor-space merge per prompt, ELREA's weights (ms/tok includes the merges)")
    finally:
        for n in added:
            if n in lib:
                lib.remove(n)


def format_table(rows, meta) -> str:
    lines = [f"Machine: {meta['machine']}; {meta['load']}"
             + (f"; {meta['note']}" if meta.get("note") else ""),
             f"SmolLM2-135M-Instruct (fp32), experts {'/'.join(meta['tasks'])} (bench/real_experts.py); "
             f"{meta['n_test']} held-out examples per task for NLL and exact match, "
             f"{meta['n_train']} training examples per task (pooled) to fit; merges and learned "
             f"routers: {meta['steps']} Adam steps of 16 rows; ensemble weights: 300 steps on "
             f"stored per-token outputs; greedy, 20 new tokens; "
             + (f"{meta['cached']} of the {len(rows)} rows from the row cache (earlier runs, "
                "same settings; --only); " if meta.get("cached") else "")
             + f"this run took {meta['seconds']:.0f}s",
             ("EM: not run (--no-em); " if meta.get("em") is False else "") +
             "NLL: mean over answer tokens (lower is better); EM: exact match; fwd/tok: model "
             "forwards per token; ms/tok: scoring pass wall time per token (shared, loaded CPU)",
             "", f"{'strategy':>30} | {'NLL':>6} | {'EM':>5} | fwd/tok | {'ms/tok':>6} | fit s | note",
             "-" * 96]
    for r in rows:
        em = "  n/a" if r["em"] is None else f"{r['em']:5.3f}"
        ms = "   n/a" if r["ms"] is None else f"{r['ms']:6.2f}"
        lines.append(f"{r['name']:>30} | {r['nll']:6.3f} | {em} | {r['fwd']:7d} | "
                     f"{ms} | {r['fit_s']:5.0f} | {r['note']}")
    if not any(r["name"].startswith("ELREA") for r in rows):
        lines.append(f"{'ELREA':>30} | (not measured in this run)")
    by = {r["name"]: r for r in rows}

    def cmp(a, b, key="nll"):
        if a not in by or b not in by:
            return "n/a"
        x, y = by[a][key], by[b][key]
        if x is None or y is None:
            return "n/a"
        if x == y:
            return f"equal ({x:.3f} vs {y:.3f})"
        better = x < y if key == "nll" else x > y
        return f"{'yes' if better else 'no'} ({x:.3f} vs {y:.3f})"

    lines += ["", "the paper's claims, as these numbers show them (NLL):",
              "  probability > logit ensembling (uniform): "
              + cmp("ensemble uniform probs", "ensemble uniform logits"),
              "  probability > logit ensembling (learned): "
              + cmp("ensemble learned probs", "ensemble learned logits"),
              "  learned > uniform ensembling (probs): "
              + cmp("ensemble learned probs", "ensemble uniform probs"),
              "  learned > uniform merging (delta, global): "
              + cmp("merge learned delta global", "merge uniform delta"),
              "  learned > uniform merging (factor, global): "
              + cmp("merge learned factor global", "merge uniform factor"),
              "  routing (learned, arrow init) > merging (learned delta layer): "
              + cmp("learned routing (arrow init)", "merge learned delta layer"),
              "  routing (Arrow top-1) > merging (uniform delta): "
              + cmp("Arrow top-1", "merge uniform delta"),
              "  ELREA > uniform logit ensemble: " + cmp("ELREA", "ensemble uniform logits"),
              "", "the same claims by exact match (higher is better):",
              "  probability > logit ensembling (uniform / learned): "
              + cmp("ensemble uniform probs", "ensemble uniform logits", "em") + " / "
              + cmp("ensemble learned probs", "ensemble learned logits", "em"),
              "  learned > uniform (probs ensemble / delta merge global): "
              + cmp("ensemble learned probs", "ensemble uniform probs", "em") + " / "
              + cmp("merge learned delta global", "merge uniform delta", "em"),
              "  routing (learned, arrow init) > merging (learned delta layer): "
              + cmp("learned routing (arrow init)", "merge learned delta layer", "em"),
              "  prompt routing (question span) vs oracle: "
              + cmp("prompt Arrow top-1 (model scope, question span)", "oracle (task's expert)",
                    "em")]
    return "\n".join(lines)


def write_section(table: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the others as they are."""
    common.write_section(TITLE, table, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--no-timing", action="store_true",
                    help="accuracy only: leave ms/tok out (a run that does not hold the bench lock)")
    ap.add_argument("--no-em", action="store_true",
                    help="skip greedy exact match (generation dominates the run time on CPU)")
    ap.add_argument("--only", default=None, metavar="REGEX",
                    help="measure only the strategies whose name matches; the other rows come "
                         "from the row cache of an earlier run with the same settings")
    ap.add_argument("--cache", default=None,
                    help=f"row cache (JSON; default {CACHE}); every measured row is saved there")
    ap.add_argument("--note", default=None,
                    help="a line for the table's header (e.g. how and when cached rows were run)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows, meta = run(a.quick, n_test=a.n_test, n_train=a.n_train, steps=a.steps,
                     em=not a.no_em, only=a.only, cache=a.cache)
    meta["note"] = a.note
    if a.no_timing:
        for r in rows:
            r["ms"] = None
    table = format_table(rows, meta)
    print(table)
    if not a.no_write:
        write_section(table)
        print(f"wrote the '{TITLE}' section of {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
