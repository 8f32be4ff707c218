"""Real trained experts: rank-8 LoRAs on SmolLM2-135M-Instruct, one per synthetic task, all trained
in one mixed batch per step on the fused runtime.

Tasks (short answers, checked by exact match after greedy decoding):

    add      "What is 37 + 48?"                        -> "85"          (two numbers in 10..99)
    upper    "Write in capitals: red apple sky"         -> "RED APPLE SKY"  (3-5 words)
    reverse  "Reverse the words: red apple sky"         -> "sky apple red"  (3-5 words)
    sort     "Sort these numbers: 42 7 88 19"           -> "7 19 42 88"     (4-6 distinct numbers 1..99)

Examples are drawn by a seeded ``random.Random`` and split by a hash of the question: a question
whose crc32 is 0 mod 5 is held out, every other one is training data, so the splits are disjoint
whatever the seeds. Prompts are the tokenizer's chat template (system turn ``SYSTEM``, user turn,
generation prompt); the target is the answer followed by ``<|im_end|>``, and the loss is on those
tokens only.

Training (:func:`train_experts`, ``trainer="mixed"``, the default): ``lmf.AdapterLibrary.create``
makes one LoRA per task (peft's init: A Kaiming-uniform, B zero), ``lmf.patch`` puts them in the
frozen model, and every optimizer step runs ONE forward and backward over a batch holding
``batch`` training examples of every task, each row with its own task's adapter
(``adapter_names``). The loss is the sum over tasks of each task's mean cross-entropy over its
answer tokens, gradients are clipped per adapter and AdamW's update is per parameter, so each
adapter gets exactly the update it would get if it were trained alone on its rows (the same
problem ``trainer="peft"`` solves with one peft model per task, one task after another; only
the random initialisation differs). The adapters are written with ``lib.save_peft`` (peft
folders: ``PeftModel.from_pretrained`` loads them).

Caching: :func:`ensure_experts` returns ``{task: folder}`` from a cache folder, training only
when it lacks the experts or holds experts made with other settings (``settings.json`` next to
the folders). Which trainer made them is recorded but not part of the key: both trainers solve
the same per-task problem.

``bench/real_experts.py`` is the command line (benchmark experts in ``<repo>/.cache/experts``);
``python -m loramix_fast demo`` trains a smaller set (:data:`DEMO_SETTINGS`) in the user cache.
"""
from __future__ import annotations

import json
import random
import shutil
import time
import zlib
from pathlib import Path

import torch

__all__ = ["TASKS", "TARGET_MODULES", "SYSTEM", "DEMO_SETTINGS", "make_example", "make_split",
           "is_held_out", "prompt_text", "encode_example", "question_span", "default_settings",
           "train_experts", "cached_settings", "ensure_experts", "generate_answers", "evaluate",
           "ensure_eval", "exact_match"]

TASKS = ("add", "upper", "reverse", "sort")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# a short system turn instead of the template's default one (30 tokens): sequences of 35-54 tokens
# (mean per task) keep training affordable on two cores, and it asks the base model for a bare answer (fair EM)
SYSTEM = "Reply with the answer only."
DATA_VERSION = 1  # bump when the generator changes (invalidates the cache)
TRAINERS = ("mixed", "peft")

WORDS = ("red blue green black white apple river stone cloud house tree bird fish water fire "
         "light night sun moon star road door book chair table window garden flower grass "
         "snow rain wind hill lake sea ship car train bread milk cake tea salt gold silver "
         "paper glass iron wood king queen child horse dog cat mouse lion bear wolf happy "
         "quick slow cold warm small big old new dark bright soft loud quiet sweet").split()


# ---- data ----------------------------------------------------------------------------------------

def make_example(task: str, rng: random.Random) -> tuple[str, str]:
    """One (question, answer) of ``task`` drawn with ``rng``."""
    if task == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} + {b}?", str(a + b)
    if task in ("upper", "reverse"):
        ws = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
        if task == "upper":
            return "Write in capitals: " + " ".join(ws), " ".join(ws).upper()
        return "Reverse the words: " + " ".join(ws), " ".join(reversed(ws))
    if task == "sort":
        ns = rng.sample(range(1, 100), rng.randint(4, 6))
        return ("Sort these numbers: " + " ".join(map(str, ns)),
                " ".join(map(str, sorted(ns))))
    raise ValueError(f"unknown task {task!r} (have {TASKS})")


def is_held_out(question: str) -> bool:
    return zlib.crc32(question.encode()) % 5 == 0


def make_split(task: str, n: int, split: str, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct examples of ``task`` from ``split`` ("train" or "test"); deterministic."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{task}:{split}:{seed}")
    want_test = split == "test"
    out, seen = [], set()
    for _ in range(200 * n + 1000):
        q, a = make_example(task, rng)
        if is_held_out(q) == want_test and q not in seen:
            seen.add(q)
            out.append((q, a))
            if len(out) == n:
                return out
    raise RuntimeError(f"could not draw {n} distinct {split} examples of {task!r}")


def prompt_text(tok, question: str) -> str:
    """The chat-templated prompt (system turn ``SYSTEM``, user turn, generation prompt)."""
    return tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                    {"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)


def encode_example(tok, question: str, answer: str) -> tuple[list[int], int]:
    """(token ids of prompt + answer + <|im_end|>, number of prompt tokens)."""
    p = tok(prompt_text(tok, question), add_special_tokens=False)["input_ids"]
    a = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return p + a, len(p)


def question_span(tok, question: str) -> tuple[list[int], list[bool]]:
    """(prompt token ids, mask of the tokens that overlap the question's characters)."""
    text = prompt_text(tok, question)
    start = text.index(question)
    end = start + len(question)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [s < end and e > start for s, e in enc["offset_mapping"]]
    return enc["input_ids"], mask


# ---- training ------------------------------------------------------------------------------------

def default_settings(**over) -> dict:
    """The experts' settings (the cache key, but for ``trainer``); ``over`` replaces entries.
    ``steps`` optimizer steps, each on ``batch`` examples of every task (one mixed batch of
    ``batch * len(tasks)`` rows with ``trainer="mixed"``); ``n_train`` examples per task."""
    s = dict(tasks=list(TASKS), steps=40, rank=8, alpha=16, lr=2e-3, batch=8, n_train=2000,
             seed=0, target_modules=TARGET_MODULES, weight_decay=0.0, warmup=5,
             data_version=DATA_VERSION, base_model="SmolLM2-135M-Instruct", trainer="mixed")
    unknown = set(over) - set(s)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    s.update(over)
    if s["trainer"] not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {s['trainer']!r}")
    bad = [t for t in s["tasks"] if t not in TASKS]
    if bad or not s["tasks"]:
        raise ValueError(f"tasks must be a non-empty list from {TASKS}, got {s['tasks']!r}")
    return s


# What `python -m loramix_fast demo` trains on a cold cache: 4 experts in 24 mixed steps of 4 rows
# per task (96 examples per task, against the benchmark experts' 320), a higher learning rate
# making up for the shorter run. Its cost is about 30 s of CPU time per step on the 2-core
# development machine (measured while shared: about 15 s per step on both cores, an estimate).
DEMO_SETTINGS = dict(steps=24, batch=4, lr=4e-3, warmup=3)


def _batch(tok, examples, pad_id):
    """Right-padded ``(input_ids, attention_mask, labels)`` [B, L]; labels -100 but on the
    answer tokens (and <|im_end|>)."""
    seqs = [encode_example(tok, q, a) for q, a in examples]
    L = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    att = torch.zeros(len(seqs), L, dtype=torch.long)
    lab = torch.full((len(seqs), L), -100, dtype=torch.long)
    for i, (s, np_) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
        lab[i, np_:len(s)] = torch.tensor(s[np_:])
    return ids, att, lab


def _schedule(s):
    """Linear warm-up over ``warmup`` steps, then sqrt decay to 0 at ``steps``."""
    return lambda i: (min(1.0, (i + 1) / max(1, s["warmup"]))
                      * max(0.0, 1 - i / max(1, s["steps"])) ** 0.5)


def _answer_loss(model, hid, lab, row_task=None, n_tasks=1):
    """Cross-entropy on the answer tokens only (the LM head runs on those positions only):
    the mean over them, or with ``row_task`` [B] the sum over tasks of each task's mean."""
    tgt = lab[:, 1:]
    sel = tgt != -100
    logits = model.get_output_embeddings()(hid[:, :-1][sel])
    ce = torch.nn.functional.cross_entropy(logits.float(), tgt[sel], reduction="none")
    if row_task is None:
        return ce.mean(), {}
    tok_task = row_task[:, None].expand_as(tgt)[sel]
    per = {i: ce[tok_task == i].mean() for i in range(n_tasks)}
    return sum(per.values()), per


def train_experts(out_dir, steps: int = 40, rank: int = 8, *, model=None, tok=None,
                  verbose: bool = True, **settings) -> dict:
    """Train one LoRA per task and save each as a peft folder ``out_dir/<task>``.

    ``trainer="mixed"`` (default): every step is one forward + backward of a batch mixing
    ``batch`` rows of every task through loramix_fast (``AdapterLibrary.create``,
    ``lib.parameters``, ``adapter_names``), saved with ``lib.save_peft``; ``"peft"``: one peft
    model per task, trained one task after another, saved with ``save_pretrained``.
    ``model, tok``: a loaded SmolLM2 (``smollm2.load()`` when None), not patched; it is left
    unpatched, frozen and in eval mode. Writes ``out_dir/settings.json`` last; returns
    ``{"folders": {task: folder}, "seconds": {task: s} ("mixed": {"all": s}),
    "final_loss": {task: loss}}``.
    """
    with torch.enable_grad():  # run_all runs benchmarks with grad disabled
        s = default_settings(steps=steps, rank=rank, **settings)
        if model is None:
            from loramix_fast import smollm2

            model, tok = smollm2.load()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "settings.json").unlink(missing_ok=True)
        fn = _train_mixed if s["trainer"] == "mixed" else _train_peft
        folders, secs, losses = fn(out_dir, s, model, tok, verbose)
    meta = dict(settings=s, seconds=secs, final_loss=losses)
    (out_dir / "settings.json").write_text(json.dumps(meta, indent=1))
    return {"folders": folders, "seconds": secs, "final_loss": losses}


def _train_mixed(out_dir, s, model, tok, verbose):
    import loramix_fast as lmf

    if lmf.is_patched(model):
        raise ValueError("train_experts: the model is already patched by loramix_fast; pass the "
                         "plain model (lmf.unpatch(model))")
    tasks = list(s["tasks"])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    specs = {t: lmf.LoRASpec(r=s["rank"], alpha=s["alpha"],
                             target_modules=list(s["target_modules"])) for t in tasks}
    lib = lmf.AdapterLibrary.create(model, specs, seed=s["seed"])
    data = {t: make_split(t, s["n_train"], "train", seed=s["seed"]) for t in tasks}
    rngs = {t: random.Random(f"order:{t}:{s['seed']}") for t in tasks}
    model.requires_grad_(False)
    lmf.patch(model, lib)
    try:
        model.train()
        params = {t: lib.parameters([t]) for t in tasks}
        opt = torch.optim.AdamW([{"params": params[t]} for t in tasks], lr=s["lr"],
                                weight_decay=s["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(s))
        decoder = model.get_decoder()
        row_task = torch.arange(len(tasks)).repeat_interleave(s["batch"])
        names = [tasks[i] for i in row_task.tolist()]
        t0, c0 = time.perf_counter(), time.process_time()
        ema: dict = {}
        for step in range(s["steps"]):
            examples = [ex for t in tasks for ex in rngs[t].sample(data[t], s["batch"])]
            ids, att, lab = _batch(tok, examples, pad_id)
            with lmf.use_adapters(model, names):  # the decoder's forward: no LM head over pads
                hid = decoder(input_ids=ids, attention_mask=att).last_hidden_state
            loss, per = _answer_loss(model, hid, lab, row_task, len(tasks))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for t in tasks:  # per adapter, as if each were trained alone
                torch.nn.utils.clip_grad_norm_(params[t], 1.0)
            opt.step()
            sched.step()
            for i, t in enumerate(tasks):
                v = per[i].item()
                ema[t] = v if t not in ema else 0.9 * ema[t] + 0.1 * v
            if verbose and (step % 4 == 0 or step == s["steps"] - 1):
                print(f"  step {step:3d}/{s['steps']}  {ids.shape[0]} rows x {ids.shape[1]} "
                      "tokens  loss " + " ".join(f"{t} {per[i].item():.2f}"
                                                 for i, t in enumerate(tasks))
                      + f"  {time.perf_counter() - t0:6.1f}s ({time.process_time() - c0:.0f}s "
                      "CPU)", flush=True)
        secs = {"all": time.perf_counter() - t0}
        model.eval()
        folders = {}
        for t in tasks:
            dest = out_dir / t
            if dest.exists():
                shutil.rmtree(dest)
            lib.save_peft(t, dest)
            folders[t] = str(dest)
    finally:
        lmf.unpatch(model)
        model.eval()
    return folders, secs, ema


def _train_peft(out_dir, s, model, tok, verbose):
    from peft import LoraConfig, get_peft_model

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    folders, secs, losses = {}, {}, {}
    for ti, task in enumerate(s["tasks"]):
        torch.manual_seed(s["seed"] * 1000 + ti)
        data = make_split(task, s["n_train"], "train", seed=s["seed"])
        cfg = LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=0.0,
                         target_modules=list(s["target_modules"]), bias="none",
                         task_type="CAUSAL_LM")
        pm = get_peft_model(model, cfg)
        pm.train()
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(s))
        rng = random.Random(f"order:{task}:{s['seed']}")
        causal = pm.base_model.model  # LlamaForCausalLM with LoRA layers
        t0 = time.perf_counter()
        ema = None
        for step in range(s["steps"]):
            ids, att, lab = _batch(tok, rng.sample(data, s["batch"]), pad_id)
            hid = causal.get_decoder()(input_ids=ids, attention_mask=att).last_hidden_state
            loss, _ = _answer_loss(causal, hid, lab)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
            if verbose and (step % 10 == 0 or step == s["steps"] - 1):
                print(f"  {task:8s} step {step:4d} loss {loss.item():.3f} (ema {ema:.3f}) "
                      f"{time.perf_counter() - t0:6.1f}s", flush=True)
        secs[task] = time.perf_counter() - t0
        losses[task] = ema
        dest = out_dir / task
        if dest.exists():
            shutil.rmtree(dest)
        pm.eval()
        pm.save_pretrained(str(dest))
        folders[task] = str(dest)
        model = pm.unload()
        for p in model.parameters():
            p.requires_grad_(False)
    model.eval()
    return folders, secs, losses


def cached_settings(cache_dir) -> dict | None:
    """The cache's ``settings.json`` (``{"settings", "seconds", "final_loss"}``), or None."""
    try:
        return json.loads((Path(cache_dir) / "settings.json").read_text())
    except (OSError, ValueError):
        return None


def _key(settings: dict) -> dict:
    """The cache key: the settings but for the trainer (caches made before the trainer was
    recorded were made by "peft")."""
    return {k: v for k, v in settings.items() if k != "trainer"}


def cache_hit(cache_dir, **settings) -> bool:
    """Whether ``cache_dir`` holds the experts of these settings."""
    cache = Path(cache_dir)
    s = default_settings(**settings)
    meta = cached_settings(cache)
    return (meta is not None and _key(meta.get("settings", {})) == _key(s)
            and all((cache / t / "adapter_config.json").exists() for t in s["tasks"]))


def ensure_experts(cache_dir, *, model=None, tok=None, verbose: bool = True, **settings) -> dict:
    """``{task: folder}`` of the trained experts, training them (:func:`train_experts`) only when
    ``cache_dir`` lacks them or holds experts made with other settings (the trainer aside)."""
    cache = Path(cache_dir)
    s = default_settings(**settings)
    if cache_hit(cache, **s):
        return {t: str(cache / t) for t in s["tasks"]}
    meta = cached_settings(cache)
    if verbose:
        why = "no cached experts" if meta is None else "cached experts were made with other settings"
        print(f"training {len(s['tasks'])} experts into {cache} ({why})", flush=True)
    steps, rank = s.pop("steps"), s.pop("rank")
    return train_experts(cache, steps=steps, rank=rank, model=model, tok=tok, verbose=verbose,
                         **s)["folders"]


# ---- evaluation ----------------------------------------------------------------------------------

def exact_match(outputs, golds) -> float:
    """Fraction of ``outputs`` equal to their gold answer (both stripped strings)."""
    if len(outputs) != len(golds) or not golds:
        raise ValueError(f"exact_match: {len(outputs)} outputs for {len(golds)} gold answers")
    return sum(o == g for o, g in zip(outputs, golds)) / len(golds)


@torch.no_grad()
def generate_answers(model, tok, questions, adapter_names=None, max_new_tokens: int = 24,
                     batch: int = 50) -> list[str]:
    """Greedy answers (text before <|im_end|>, stripped); ``adapter_names``: one per question for
    a model patched by loramix_fast (``"__base__"`` = none), or None."""
    old = tok.padding_side
    tok.padding_side = "left"
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    outs = []
    try:
        for i in range(0, len(questions), batch):
            qs = questions[i:i + batch]
            enc = tok([prompt_text(tok, q) for q in qs], return_tensors="pt", padding=True,
                      add_special_tokens=False)
            kw = {} if adapter_names is None else {"adapter_names": adapter_names[i:i + batch]}
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_id, eos_token_id=end_id, **kw)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                if end_id in row:
                    row = row[:row.index(end_id)]
                outs.append(tok.decode(row, skip_special_tokens=True).strip())
    finally:
        tok.padding_side = old
    return outs


def evaluate(folders: dict, model=None, tok=None, n_eval: int = 50, seed: int = 0) -> dict:
    """Held-out greedy exact match per task: ``{task: {"base": acc, "expert": acc, "examples":
    [(q, gold, base_out, expert_out), ...3]}}``. The experts run through loramix_fast's
    per-sequence adapters (``adapter_names``); the model is unpatched afterwards."""
    import loramix_fast as lmf

    if model is None:
        from loramix_fast import smollm2

        model, tok = smollm2.load()
    lib = lmf.AdapterLibrary.from_peft(folders)
    lmf.patch(model, lib)
    res = {}
    try:
        for task in folders:
            data = make_split(task, n_eval, "test", seed=seed)
            qs = [q for q, _ in data]
            base = generate_answers(model, tok, qs, ["__base__"] * len(qs))
            exp = generate_answers(model, tok, qs, [task] * len(qs))
            res[task] = {
                "base": sum(b == a for b, (_, a) in zip(base, data)) / len(data),
                "expert": sum(e == a for e, (_, a) in zip(exp, data)) / len(data),
                "examples": [(q, a, b, e) for (q, a), b, e in zip(data[:3], base, exp)],
            }
    finally:
        lmf.unpatch(model)
    return res



def ensure_eval(folders: dict, cache_dir, model=None, tok=None, n_eval: int = 50,
                force: bool = False) -> dict:
    """:func:`evaluate`, cached in ``<cache>/eval.json`` for the experts' settings and ``n_eval``.
    Returns ``{task: {"base": acc, "expert": acc, "examples": [...]}}``."""
    cache = Path(cache_dir)
    meta = cached_settings(cache) or {}
    key = dict(settings=meta.get("settings"), n_eval=n_eval)
    p = cache / "eval.json"
    if not force:
        try:
            hit = json.loads(p.read_text())
            if hit.get("key") == key:
                return hit["results"]
        except (OSError, ValueError):
            pass
    res = evaluate(folders, model, tok, n_eval=n_eval)
    p.write_text(json.dumps(dict(key=key, results=res), indent=1))
    return res
