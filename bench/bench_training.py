"""Training-step benchmark (issue 9, bar "Cheap"): 8 adapters trained in one mixed batch.

    python bench/bench_training.py [--reps 7] [--dtypes fp32,bf16] [--quick] [--write]

Llama with hidden 1024, 4 layers (intermediate 2816, 16 heads, vocab 32000, random weights),
8 rank-16 LoRA adapters on every linear layer (q, k, v, o, gate, up, down). One mixed batch of
8 sequences x 256 tokens = 2048 tokens, sequence i trains adapter i. One step = forward + HF's
mean cross-entropy + backward, base frozen, gradients flowing to the input embeddings
(``inputs_embeds.requires_grad_()``: the base model's backward runs through every layer even
with no adapter).
Providers, side by side (round-robin over reps, median after warm-up):
    base  the unpatched model (the floor; the bar is ours <= 1.25x base)
    ours  lmf.patch + lib.parameters(all 8) + adapter_names: one fused op per linear and step
    peft  PeftModel with the 8 adapters, trained one after another on their rows
          (set_adapter, forward + backward of that adapter's sequence, 8 times per step)
Memory saved for backward: the distinct storages autograd saves during the forward
(``torch.autograd.graph.saved_tensors_hooks``), parameters and adapter factors excluded; peft's
is per adapter's forward (its peak) and summed over the 8. The old grad path of
multi_lora_linear (the reference's per-row gather of B) would save M x N x R per module on top.
``run(...) -> list[dict]``; ``--write`` splices a section into bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import loramix_fast as lmf  # noqa: E402
from bench.common import machine, time_side_by_side  # noqa: E402
from loramix_fast.testing import AdapterSpec, peft_multi, write_peft_adapters  # noqa: E402

HIDDEN, LAYERS, INTER, HEADS, VOCAB, RANK, N_ADAPTERS, SEQ = 1024, 4, 2816, 16, 32000, 16, 8, 256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(folder: str, dtype, layers: int = LAYERS, hidden: int = HIDDEN, inter: int = INTER,
          vocab: int = VOCAB, n_adapters: int = N_ADAPTERS):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, max_position_embeddings=512)
    base = LlamaForCausalLM(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dirs = write_peft_adapters(base, [AdapterSpec(f"a{i}", r=RANK, alpha=RANK, seed=i,
                                                      targets=TARGETS)
                                          for i in range(n_adapters)], folder)
    base = base.to(dtype).train()
    base.requires_grad_(False)
    lib = lmf.AdapterLibrary.from_peft(dirs)
    ours = lmf.patch(copy.deepcopy(base), lib).train()
    ours.requires_grad_(False)
    params = lib.parameters(list(dirs))
    peft = peft_multi(base, dirs).train()
    peft.requires_grad_(False)
    peft_params = [p for n, p in peft.named_parameters() if "lora_" in n]
    for p in peft_params:
        p.requires_grad_(True)
    return base, ours, lib, params, peft, peft_params, list(dirs)


def _zero(ps):
    for p in ps:
        p.grad = None


def steps(base, ours, params, peft, peft_params, names, ids, emb_table):
    """Zero-arg callables, one training step each, and the batch's embeddings."""
    labels = ids.clone()

    def embeds():
        return emb_table(ids).detach().requires_grad_(True)

    def base_step():
        e = embeds()
        base(inputs_embeds=e, labels=labels).loss.backward()
        return e

    def ours_step():
        _zero(params)
        e = embeds()
        ours(inputs_embeds=e, labels=labels, adapter_names=names).loss.backward()
        return e

    def peft_step():
        _zero(peft_params)
        e = embeds()
        for i, n in enumerate(names):  # one adapter after another, each on its own rows
            peft.set_adapter(n)
            peft(inputs_embeds=e[i:i + 1], labels=labels[i:i + 1]).loss.backward()
        return e

    return {"base": base_step, "ours": ours_step, "peft": peft_step}


def saved_bytes(fn, exclude) -> int:
    """Bytes of the distinct storages saved for backward while ``fn()`` runs its forward (its
    backward is run inside; saved tensors are counted when packed), ``exclude`` storages aside."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip and st.data_ptr() not in seen:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def peft_saved(peft, names, ids, emb_table, exclude) -> tuple[int, int]:
    """(peak, sum) over peft's 8 per-adapter forwards of the bytes saved for backward."""
    labels = ids.clone()
    out = []
    for i, n in enumerate(names):
        e = emb_table(ids[i:i + 1]).detach().requires_grad_(True)

        def fwd():
            peft.set_adapter(n)
            peft(inputs_embeds=e, labels=labels[i:i + 1]).loss.backward()

        out.append(saved_bytes(fwd, exclude))
    return max(out), sum(out)


def old_path_bytes(model_cfg_layers: int, M: int) -> int:
    """What the former grad path (autograd through ``reference.multi_lora_linear``) saves per
    step on top: its per-row gathers of B, M x N x R values per module (fp32)."""
    outs = [HIDDEN] * 4 + [INTER, INTER, HIDDEN]  # q k v o gate up down
    return model_cfg_layers * sum(M * n * RANK * 4 for n in outs)


def run(reps: int = 7, dtypes=("fp32", "bf16"), quick: bool = False) -> list[dict]:
    rows = []
    kw = {}
    if quick:
        kw = dict(layers=1, hidden=256, inter=704, vocab=4000)
    for dname in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        with tempfile.TemporaryDirectory() as d:
            base, ours, lib, params, peft, peft_params, names = build(d, dtype, **kw)
            g = torch.Generator().manual_seed(0)
            vocab = base.config.vocab_size
            ids = torch.randint(3, vocab, (len(names), SEQ), generator=g)
            emb = base.get_input_embeddings()
            fns = steps(base, ours, params, peft, peft_params, names, ids, emb)
            t = time_side_by_side(fns, reps=reps, warmup=1, with_p10=True)
            fixed = [p for m in (base, ours, peft) for p in m.parameters()] + list(params)
            mem = {k: saved_bytes(fns[k], fixed) for k in ("base", "ours")}
            p_peak, p_sum = peft_saved(peft, names, ids, emb, fixed)
            M = ids.numel()
            row = dict(dtype=dname, tokens=M, layers=base.config.num_hidden_layers,
                       hidden=base.config.hidden_size, adapters=len(names), rank=RANK,
                       base_s=t["base"][0], ours_s=t["ours"][0], peft_s=t["peft"][0],
                       base_p10=t["base"][1], ours_p10=t["ours"][1], peft_p10=t["peft"][1],
                       mem_base=mem["base"], mem_ours=mem["ours"], mem_peft_peak=p_peak,
                       mem_peft_sum=p_sum,
                       mem_old_extra=old_path_bytes(base.config.num_hidden_layers, M)
                       if not quick else None)
            rows.append(row)
            print(_fmt(row), flush=True)
            del base, ours, lib, params, peft, peft_params
    return rows


def _mb(b):
    return f"{b / 2 ** 20:.0f} MB"


def _fmt(r) -> str:
    return (f"{r['dtype']}: base {r['base_s']:.2f} s, ours {r['ours_s']:.2f} s "
            f"({r['ours_s'] / r['base_s']:.3f}x base), peft sequential {r['peft_s']:.2f} s "
            f"({r['peft_s'] / r['base_s']:.3f}x base); saved for backward: base "
            f"{_mb(r['mem_base'])}, ours {_mb(r['mem_ours'])}, peft {_mb(r['mem_peft_peak'])} "
            f"peak per adapter / {_mb(r['mem_peft_sum'])} summed")


def table(rows, load: str) -> str:
    out = [f"## Training step (issue 9: 8 adapters, one mixed batch; {torch.get_num_threads()} "
           f"thread{'s' if torch.get_num_threads() > 1 else ''})", "",
           f"Machine: {machine()}. {load}", "",
           "Llama hidden 1024, 4 layers (intermediate 2816, 16 heads, vocab 32000), 8 rank-16 "
           "adapters on all 7 linear layers, one batch of 8 x 256 = 2048 tokens (sequence i "
           "trains adapter i). A step is forward + HF mean cross-entropy + backward with the "
           "base frozen and gradients flowing to `inputs_embeds`. `bench/bench_training.py`; "
           "median over round-robin reps after a warm-up (p10 in brackets: the least-contended "
           "time). peft trains the 8 adapters one after another on their rows (8 forward + "
           "backward passes of 256 tokens per step). Saved for backward: distinct storages "
           "packed by autograd in the forward, parameters and adapter factors excluded (peft: "
           "its largest single-adapter pass, and the sum over the 8).", "",
           "| dtype | base step | ours | ours / base | peft sequential | peft / base | "
           "saved: base | saved: ours | saved: peft (peak / sum) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['dtype']} | {r['base_s']:.2f} s ({r['base_p10']:.2f}) | {r['ours_s']:.2f} s "
            f"({r['ours_p10']:.2f}) | **{r['ours_s'] / r['base_s']:.3f}x** "
            f"({r['ours_p10'] / r['base_p10']:.3f}x) | {r['peft_s']:.2f} s ({r['peft_p10']:.2f}) "
            f"| {r['peft_s'] / r['base_s']:.3f}x | {_mb(r['mem_base'])} | {_mb(r['mem_ours'])} "
            f"| {_mb(r['mem_peft_peak'])} / {_mb(r['mem_peft_sum'])} |")
    old = next((r["mem_old_extra"] for r in rows if r.get("mem_old_extra")), None)
    if old:
        out += ["", f"The former grad path (autograd through the reference, per-row gathers of "
                    f"B) saved M x N x R per module on top: {old / 2 ** 30:.1f} GB per step here "
                    "(fp32); the fused backward saves x and h [M, S, R] per module."]
    return "\n".join(out) + "\n"


def splice(section: str, path: Path) -> None:
    """Replace this run's section (same heading, thread count included) of a RESULTS.md, or add
    it at the end."""
    from bench.common import splice_section

    heading, _, body = section.partition("\n")
    title = heading[3:].strip()
    old = path.read_text() if path.exists() else ""
    titles = [c.split("\n", 1)[0].strip() for c in old.split("\n## ")[1:]]
    nxt = titles[titles.index(title) + 1:titles.index(title) + 2] if title in titles else []
    splice_section(title, body, path, before=nxt)


def _load() -> str:
    try:
        la = os.getloadavg()
        return (f"Load average during the run {la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f} (1 / 5 / "
                f"15 min) on {os.cpu_count()} cores: a shared machine, other engineers' jobs ran "
                "alongside.")
    except OSError:
        return ""


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    rows = run(a.reps, a.dtypes.split(","), a.quick)
    sec = table(rows, _load())
    print(sec)
    print(f"({time.time() - t0:.0f} s)")
    if a.write and not a.quick:
        splice(sec, Path(__file__).resolve().parent / "RESULTS.md")
