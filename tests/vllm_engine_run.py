"""Runs ONE offline vLLM engine configuration and writes its tokens as JSON (a helper of
tests/test_vllm_integration.py, run with the vLLM venv's python in a fresh process).

    python tests/vllm_engine_run.py SPEC.json OUT.json

SPEC: {"model": folder, "adapters": {name: folder}, "max_loras": int, "max_lora_rank": int,
       "requests": [[prompt token ids, adapter name or null], ...], "batches": [[request index,
       ...], ...] (each batch one llm.generate call), "max_tokens": int, "mode": LORAMIX_VLLM value,
       "multiprocessing": bool}
OUT: {"tokens": per batch, the generated ids of each of its requests, "workers": per worker,
      loramix_fast.integrations.vllm.inspect_model (the Punica wrapper class vLLM built, the
      plugin's counters), "plugins": the vllm.general_plugins entry points installed,
      "seconds": engine start and generation wall time}
"""
from __future__ import annotations

import json
import os
import sys
import time


def _setup_env(spec):
    os.environ["LORAMIX_VLLM"] = spec["mode"]
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # apply_model ships a function to the worker process
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    if not spec.get("multiprocessing", True):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def main(spec_path, out_path):
    t0 = time.perf_counter()
    spec = json.load(open(spec_path))
    _setup_env(spec)
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    kw = {}
    if not spec.get("multiprocessing", True):
        kw["distributed_executor_backend"] = "uni"
    llm = LLM(model=spec["model"], dtype="float32", enable_lora=True,
              max_loras=spec["max_loras"], max_lora_rank=spec["max_lora_rank"],
              max_model_len=spec.get("max_model_len", 128), enforce_eager=True,
              skip_tokenizer_init=True, max_num_seqs=spec.get("max_num_seqs", 16),
              seed=0, kv_cache_memory_bytes=64 << 20, **kw)
    t1 = time.perf_counter()
    names = sorted(spec["adapters"])
    lora = {n: LoRARequest(n, i + 1, spec["adapters"][n]) for i, n in enumerate(names)}
    sp = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    reqs = spec["requests"]
    tokens = []
    for batch in spec["batches"]:
        prompts = [{"prompt_token_ids": reqs[i][0]} for i in batch]
        lrs = [lora[reqs[i][1]] if reqs[i][1] else None for i in batch]
        outs = llm.generate(prompts, sp, lora_request=lrs, use_tqdm=False)
        tokens.append([list(o.outputs[0].token_ids) for o in outs])
    from importlib.metadata import entry_points

    from loramix_fast.integrations.vllm import inspect_model

    info = llm.apply_model(inspect_model)

    plugins = sorted(e.name for e in entry_points(group="vllm.general_plugins"))
    t2 = time.perf_counter()
    json.dump({"tokens": tokens, "workers": info, "plugins": plugins,
               "seconds": {"start": round(t1 - t0, 1), "generate": round(t2 - t1, 1)}},
              open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
