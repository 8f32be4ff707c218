"""Real trained experts for the benchmarks: four rank-8 LoRAs on SmolLM2-135M-Instruct (tasks add /
upper / reverse / sort), trained in one mixed batch per step on loramix_fast's training path and
cached in ``<repo>/.cache/experts``.

The tasks, data, trainers and evaluation live in :mod:`loramix_fast.demo_experts` (the demo uses
them too); this module re-exports them with the benchmarks' cache folder as the default:
``ensure_experts()`` returns ``{task: folder}``, training only when the cache is missing or was
made with other settings (``settings.json`` next to the folders; the trainer is recorded there
but is not part of the key).

    python -m bench.real_experts [--steps N] [--trainer mixed|peft] [--retrain] [--n-eval 50]

prints the training time and per-task held-out exact match, the base model next to every expert
on every task (the README's table).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from loramix_fast import demo_experts as _E
from loramix_fast.demo_experts import (DATA_VERSION, SYSTEM, TARGET_MODULES, TASKS,  # noqa: F401
                                       _batch, cache_hit, default_settings, encode_example,
                                       evaluate, exact_match, generate_answers, is_held_out,
                                       make_example, make_split, prompt_text, question_span,
                                       train_experts)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / ".cache" / "experts"


def cached_settings(cache_dir=None) -> dict | None:
    return _E.cached_settings(cache_dir or DEFAULT_CACHE)


def ensure_experts(cache_dir=None, *, model=None, tok=None, verbose: bool = True,
                   **settings) -> dict:
    """``{task: folder}`` of the trained experts (default cache ``<repo>/.cache/experts``)."""
    return _E.ensure_experts(cache_dir or DEFAULT_CACHE, model=model, tok=tok, verbose=verbose,
                             **settings)


def ensure_eval(folders: dict, cache_dir=None, model=None, tok=None, n_eval: int = 50,
                force: bool = False) -> dict:
    return _E.ensure_eval(folders, cache_dir or DEFAULT_CACHE, model, tok, n_eval=n_eval,
                          force=force)


@torch.no_grad()
def cross_eval(folders: dict, model, tok, n_eval: int = 50, seed: int = 0) -> dict:
    """Held-out greedy exact match of every expert (and the base model) on every task, all in
    mixed batches: ``{task: {"__base__": acc, expert: acc, ...}}``."""
    import loramix_fast as lmf

    lib = lmf.AdapterLibrary.from_peft(folders)
    lmf.patch(model, lib)
    res = {}
    try:
        for task in folders:
            data = make_split(task, n_eval, "test", seed=seed)
            qs = [q for q, _ in data]
            gold = [a for _, a in data]
            who = ["__base__", *folders]
            outs = generate_answers(model, tok, qs * len(who), [w for w in who for _ in qs],
                                    batch=100)
            res[task] = {w: exact_match(outs[i * len(qs):(i + 1) * len(qs)], gold)
                         for i, w in enumerate(who)}
    finally:
        lmf.unpatch(model)
    return res


def format_cross(cross: dict) -> str:
    """The cross-evaluation as a markdown table: one row per task, base then each expert."""
    experts = [w for w in next(iter(cross.values())) if w != "__base__"]
    lines = ["| task | base | " + " | ".join(f"{e} expert" for e in experts) + " |",
             "|---|---|" + "---|" * len(experts)]
    for task, r in cross.items():
        cells = [f"**{r[e]:.2f}**" if e == task else f"{r[e]:.2f}" for e in experts]
        lines.append(f"| {task} | {r['__base__']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--trainer", choices=_E.TRAINERS, default=None,
                    help="mixed (one mixed batch per step through loramix_fast; default) or peft "
                         "(one peft model per task, one after another)")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--n-eval", type=int, default=50)
    ap.add_argument("--cross", action="store_true",
                    help="also every expert on every task (cached in <cache>/cross_eval.json)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from bench.common import machine
    from loramix_fast import smollm2

    model, tok = smollm2.load()
    over = {} if a.steps is None else {"steps": a.steps}
    if a.trainer:
        over["trainer"] = a.trainer
    cache = Path(a.cache or DEFAULT_CACHE)
    if a.retrain:
        (cache / "settings.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    folders = ensure_experts(cache, model=model, tok=tok, **over)
    meta = cached_settings(cache) or {}
    made_by = meta.get("settings", {}).get("trainer", "peft")
    print(f"experts: {cache} (trainer {made_by}; {time.perf_counter() - t0:.0f}s here; training "
          f"took {sum(meta.get('seconds', {}).values()):.0f}s: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in meta.get("seconds", {}).items()) + ")")
    print(f"machine: {machine()}")
    t0 = time.perf_counter()
    res = ensure_eval(folders, cache, model, tok, n_eval=a.n_eval, force=a.retrain)
    print(f"held-out greedy exact match ({a.n_eval} prompts per task, {time.perf_counter() - t0:.0f}s)")
    print(f"{'task':8s} {'base':>6s} {'expert':>7s}")
    for task, r in res.items():
        print(f"{task:8s} {r['base']:6.2f} {r['expert']:7.2f}")
    for task, r in res.items():
        for q, gold, b, e in r["examples"][:2]:
            print(f"  [{task}] {q!r} gold={gold!r} base={b!r} expert={e!r}")
    if a.cross:
        p = cache / "cross_eval.json"
        key = dict(settings=meta.get("settings"), n_eval=a.n_eval)
        hit = None
        try:
            js = json.loads(p.read_text())
            hit = js["results"] if js.get("key") == key and not a.retrain else None
        except (OSError, ValueError, KeyError):
            pass
        t0 = time.perf_counter()
        cross = hit or cross_eval(folders, model, tok, n_eval=a.n_eval)
        if hit is None:
            p.write_text(json.dumps(dict(key=key, results=cross), indent=1))
        print(f"\nevery expert on every task ({a.n_eval} held-out prompts each, "
              f"{time.perf_counter() - t0:.0f}s):\n" + format_cross(cross))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
