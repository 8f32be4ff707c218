"""``python -m loramix_fast demo [--tiny]``: the main job (see loramix_fast/demo.py)."""
import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loramix_fast")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="patch a real model with several peft adapters, generate a "
                                    "mixed batch, check against peft, print timings")
    d.add_argument("--tiny", action="store_true", help="use a tiny random Llama instead of "
                                                       "SmolLM2-135M-Instruct")
    d.add_argument("--new-tokens", type=int, default=16)
    d.add_argument("--reps", type=int, default=5, help="timed repetitions per provider")
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        from .demo import run_demo

        return run_demo(tiny=args.tiny, new_tokens=args.new_tokens, reps=args.reps)
    return 2


if __name__ == "__main__":
    sys.exit(main())
