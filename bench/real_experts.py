"""Real trained experts: four rank-8 LoRAs on SmolLM2-135M-Instruct, one per synthetic task.

Tasks (short answers, checked by exact match after greedy decoding):

    add      "What is 37 + 48?"                        -> "85"          (two numbers in 10..99)
    upper    "Write in capitals: red apple sky"         -> "RED APPLE SKY"  (3-5 words)
    reverse  "Reverse the words: red apple sky"         -> "sky apple red"  (3-5 words)
    sort     "Sort these numbers: 42 7 88 19"           -> "7 19 42 88"     (4-6 distinct numbers 1..99)

Examples are drawn by a seeded ``random.Random`` and split by a hash of the question: a question
whose crc32 is 0 mod 5 is held out, every other one is training data, so the splits are disjoint
whatever the seeds. Prompts are the tokenizer's chat template (user turn + generation prompt); the
target is the answer followed by ``<|im_end|>``, and the loss is on those tokens only.

``train_experts(out_dir)`` trains one peft LoRA per task (r=8, alpha=16, q/k/v/o/gate/up/down,
torch AdamW, batch 8) and saves each with ``save_pretrained`` into ``out_dir/<task>``.
``ensure_experts()`` returns ``{task: folder}`` from the cache (``<repo>/.cache/experts``), training
only when it is missing or was made with other settings (``settings.json`` next to the folders).

    python -m bench.real_experts [--steps N] [--retrain] [--n-eval 50]

prints the training time and per-task held-out exact match, base model vs the task's expert.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = ROOT / ".cache" / "experts"
TASKS = ("add", "upper", "reverse", "sort")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# a short system turn instead of the template's default one (30 tokens): sequences of ~25 tokens
# keep training affordable on two cores, and it asks the base model for a bare answer (fair EM)
SYSTEM = "Reply with the answer only."
DATA_VERSION = 1  # bump when the generator changes (invalidates the cache)

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
    s = dict(tasks=list(TASKS), steps=40, rank=8, alpha=16, lr=2e-3, batch=8, n_train=2000,
             seed=0, target_modules=TARGET_MODULES, weight_decay=0.0, warmup=5,
             data_version=DATA_VERSION, base_model="SmolLM2-135M-Instruct")
    unknown = set(over) - set(s)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    s.update(over)
    return s


def _batch(tok, examples, pad_id):
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


def train_experts(out_dir, steps: int = 40, rank: int = 8, *, model=None, tok=None,
                  verbose: bool = True, **settings) -> dict:
    """Train one peft LoRA per task and ``save_pretrained`` it into ``out_dir/<task>``.

    ``model, tok``: a loaded SmolLM2 (``smollm2.load()`` when None); the model is left as it was
    (each LoRA is unloaded after saving). Loss: cross-entropy on the answer tokens only (the LM
    head runs on those positions only). Writes ``out_dir/settings.json`` last; returns
    ``{"folders": {task: folder}, "seconds": {task: s}, "final_loss": {task: loss}}``.
    """
    with torch.enable_grad():  # run_all runs benchmarks with grad disabled
        return _train(out_dir, steps, rank, model, tok, verbose, settings)


def _train(out_dir, steps, rank, model, tok, verbose, settings):
    from peft import LoraConfig, get_peft_model

    s = default_settings(steps=steps, rank=rank, **settings)
    if model is None:
        from loramix_fast import smollm2

        model, tok = smollm2.load()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "settings.json").unlink(missing_ok=True)
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
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: min(1.0, (i + 1) / max(1, s["warmup"]))
            * max(0.0, 1 - i / max(1, s["steps"])) ** 0.5)
        rng = random.Random(f"order:{task}:{s['seed']}")
        causal = pm.base_model.model  # LlamaForCausalLM with LoRA layers
        t0 = time.perf_counter()
        ema = None
        for step in range(s["steps"]):
            ids, att, lab = _batch(tok, rng.sample(data, s["batch"]), pad_id)
            hid = causal.model(input_ids=ids, attention_mask=att).last_hidden_state
            tgt = lab[:, 1:]
            sel = tgt != -100
            logits = causal.lm_head(hid[:, :-1][sel])
            loss = torch.nn.functional.cross_entropy(logits.float(), tgt[sel])
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
    meta = dict(settings=s, seconds=secs, final_loss=losses)
    (out_dir / "settings.json").write_text(json.dumps(meta, indent=1))
    return {"folders": folders, "seconds": secs, "final_loss": losses}


def cached_settings(cache_dir=None) -> dict | None:
    p = Path(cache_dir or DEFAULT_CACHE) / "settings.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def ensure_experts(cache_dir=None, *, model=None, tok=None, verbose: bool = True,
                   **settings) -> dict:
    """``{task: folder}`` of the trained experts, training them only when ``cache_dir`` (default
    ``<repo>/.cache/experts``) lacks them or holds experts made with other settings."""
    cache = Path(cache_dir or DEFAULT_CACHE)
    s = default_settings(**settings)
    meta = cached_settings(cache)
    folders = {t: str(cache / t) for t in s["tasks"]}
    if (meta is not None and meta.get("settings") == s
            and all((Path(f) / "adapter_config.json").exists() for f in folders.values())):
        return folders
    if verbose:
        why = "no cached experts" if meta is None else "cached experts were made with other settings"
        print(f"training {len(s['tasks'])} experts into {cache} ({why})", flush=True)
    steps, rank = s.pop("steps"), s.pop("rank")
    return train_experts(cache, steps=steps, rank=rank, model=model, tok=tok, verbose=verbose,
                         **s)["folders"]


# ---- evaluation ----------------------------------------------------------------------------------

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


def ensure_eval(folders: dict, cache_dir=None, model=None, tok=None, n_eval: int = 50,
                force: bool = False) -> dict:
    """:func:`evaluate`, cached in ``<cache>/eval.json`` for the experts' settings and ``n_eval``.
    Returns ``{task: {"base": acc, "expert": acc}}``."""
    cache = Path(cache_dir or DEFAULT_CACHE)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--n-eval", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from bench.common import machine
    from loramix_fast import smollm2

    model, tok = smollm2.load()
    over = {} if a.steps is None else {"steps": a.steps}
    cache = Path(a.cache or DEFAULT_CACHE)
    if a.retrain:
        (cache / "settings.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    folders = ensure_experts(cache, model=model, tok=tok, **over)
    meta = cached_settings(cache) or {}
    print(f"experts: {cache} ({time.perf_counter() - t0:.0f}s here; training took "
          f"{sum(meta.get('seconds', {}).values()):.0f}s: "
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
