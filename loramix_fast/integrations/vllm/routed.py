"""Routed requests through the vLLM plugin: requests routed over several LoRA experts (SpectR or
Arrow per token, or one decision per prompt for the whole model) instead of naming one adapter.

User-facing API
---------------
A routed request is an ordinary ``LoRARequest`` whose folder is a *routed adapter*, written once
(offline, with the main package) by :func:`write_routed_adapter`:

    import loramix_fast as lmf
    from loramix_fast.integrations.vllm.routed import write_routed_adapter

    experts = {"math": "dirs/math", "code": "dirs/code", "chat": "dirs/chat"}   # peft folders
    info = write_routed_adapter("routed/spectr2", experts, lmf.SpectR(top_k=2))
    #   per token:   lmf.SpectR(top_k, weighting, temperature, variant), lmf.Arrow(top_k, temperature)
    #   per prompt:  lmf.PromptCached(lmf.Arrow(top_k=1), scope="model")  (or a SpectR inside)
    llm = LLM(model, enable_lora=True, max_lora_rank=info["max_lora_rank"], enforce_eager=True, ...)
    outs = llm.generate(prompts, sampling, lora_request=[
        LoRARequest("math", 1, "dirs/math"),              # a named adapter, as usual
        LoRARequest("spectr2", 7, "routed/spectr2"),      # routed over math/code/chat per token
        None])                                            # the base model

Any ``lora_int_id`` works (no reserved range): the plugin recognises a routed adapter by the
``loramix_routed.json`` in its folder when vLLM's worker loads it. A routed request gives the
tokens that ``lmf.patch(model, lmf.AdapterLibrary.from_peft(experts), router=...)`` gives in
plain Hugging Face ``generate`` (tests/test_vllm_routed.py checks it on a real engine).

The folder
----------
One peft-layout adapter of rank ``r = n_experts * block_rank`` (``block_rank`` = the largest expert
rank): on every module an expert targets, expert t's SpectR-aligned factors (DESIGN.md op 2,
``routing.align_stack``: ``dW_t = scale_t B_t A_t = B*_t A*_t``, A*_t = V^T and B*_t = U S for
``variant="official"``) sit at ranks ``[t * block_rank, t * block_rank + rank_t)``, zero elsewhere;
``lora_alpha = r``, so vLLM's folded scaling is 1. Its ``loramix_routed.json`` names the experts
(in order), the block rank and the router. The weights file is ``loramix_routed.safetensors``, not
``adapter_model.safetensors``: without the plugin, vLLM refuses to load the folder (it would
otherwise apply the sum of every expert, silently).

How it runs (in the wrapper, punica.py's hooks call into here)
----------------------------------------------------------------
The wrapper's shrink GEMM already gives every token ``h[m, slot] = A_slot x``: for a routed slot
that is ``[A*_1 x; ...; A*_n x]``, every expert's h_t, the one extra matrix product routing needs.
For tokens whose slot is routed, the h of their own slot is multiplied by a gate ``g [S * R]``
that is constant on each expert's block: the router's weight of the expert, 0 for the experts it
did not select. The wrapper's usual ``multi_lora_expand`` then adds ``B_slot (g * h) =
sum_{t selected} w_t B*_t A*_t x``, the output-space merge (SpectR eq. 13, Arrow), for routed and
named tokens in the same call. Per output slice (q, k, v; gate, up): one routing decision per
slice, as Hugging Face routes each projection module on its own.

- per token (``SpectR``, ``Arrow``): ``g`` comes from ``ops.spectr_topk`` over the token's h
  blocks (score ``||h_t||`` or ``|h_t[0]|``, top k, uniform or softmax weights);
- per prompt (``PromptCached(router, scope="model")``): in a step where a routed request starts
  its prompt, the model's forward runs twice. First a scoring pass with every LoRA delta off
  (the base model): each module scores the prompt's tokens (SpectR ``||A*_t x||``, Arrow
  ``|v_t . x|``), normalises each token's scores over the experts, and adds their mean over the
  prompt to the request's total; then the decision (top k of the total over the modules, the
  router's weights) is stored per request, and the real forward runs with it. Decode steps reuse
  the stored decision. As in ``PromptCached``'s scoring pass, the extra cost is one base forward
  of that step's batch; other steps cost nothing extra.

Host syncs: none per layer or per step. The host facts used (which slots hold routed adapters,
which requests are prompt-routed and where their tokens are) come from vLLM's own host-side
mapping (``lora_index_to_id``, the input batch's request ids and scheduled token counts). The
block ranks of a routed slot are computed on the device once per (stack, slot, adapter), in the
first forward that uses it; the decision is a device tensor, never read back.

Limits (errors say so, nothing falls back silently): prompt routing needs the whole prompt in one
step (no chunked prefill of a prompt-routed request: raise ``max_num_batched_tokens``) and an eager
model (``enforce_eager=True``: the double forward wraps the model's ``forward``); the fused mode
runs routed batches through vLLM's base GEMM plus the packed deltas (the fused op has no h to
gate); ``merge="factor"`` and ``PromptCached(scope="module")`` are not supported; vLLM pads every
slot to ``max_lora_rank``, so a routed adapter of rank n * r raises the cost of every slot's
shrink and expand to that rank.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger("loramix_fast.vllm")

__all__ = ["write_routed_adapter", "read_routed_config", "RoutedSpec", "CONFIG_NAME",
           "WEIGHTS_NAME", "block_ranks", "token_gates", "prompt_scores", "prompt_decision",
           "gate_of_decision", "apply_gates", "install"]

CONFIG_NAME = "loramix_routed.json"
WEIGHTS_NAME = "loramix_routed.safetensors"
_FORMAT = 1
_VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's allowed max_lora_rank


# ---------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class RoutedSpec:
    """A routed adapter's routing, as read from its ``loramix_routed.json``.

    experts: expert names in block order; block_rank: ranks per expert block; kind: "spectr" or
    "arrow"; scope: "token" (per token and module) or "model" (once per prompt, every module);
    top_k, weighting ("uniform" | "softmax"), temperature: the router's; normalize ("sum" | "max"
    | "none"): the model-scope per-token normalisation over experts."""

    experts: tuple
    block_rank: int
    kind: str
    scope: str
    top_k: int
    weighting: str
    temperature: float
    normalize: str = "sum"

    @property
    def n(self) -> int:
        return len(self.experts)

    @property
    def k(self) -> int:
        """top_k clamped to the number of experts (as the reference routers clamp it)."""
        return min(self.top_k, self.n)

    @property
    def score(self) -> str:
        return "norm" if self.kind == "spectr" else "first"

    @classmethod
    def from_dict(cls, d: dict, where: str = CONFIG_NAME) -> "RoutedSpec":
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"{where}: not a loramix_fast routed adapter config of format "
                             f"{_FORMAT} (got format={d.get('format') if isinstance(d, dict) else d!r})")
        r = d.get("router", {})
        spec = cls(experts=tuple(d["experts"]), block_rank=int(d["block_rank"]),
                   kind=r.get("kind"), scope=d.get("scope"), top_k=int(r.get("top_k", 0)),
                   weighting=r.get("weighting"), temperature=float(r.get("temperature", 1.0)),
                   normalize=d.get("normalize", "sum"))
        if spec.kind not in ("spectr", "arrow"):
            raise ValueError(f"{where}: router kind must be 'spectr' or 'arrow', got {spec.kind!r}")
        if spec.scope not in ("token", "model"):
            raise ValueError(f"{where}: scope must be 'token' or 'model', got {spec.scope!r}")
        if spec.weighting not in ("uniform", "softmax"):
            raise ValueError(f"{where}: weighting must be 'uniform' or 'softmax', got "
                             f"{spec.weighting!r}")
        if spec.normalize not in ("sum", "max", "none"):
            raise ValueError(f"{where}: normalize must be 'sum', 'max' or 'none', got "
                             f"{spec.normalize!r}")
        if spec.top_k < 1 or spec.block_rank < 1 or spec.n < 1 or not spec.temperature > 0:
            raise ValueError(f"{where}: needs top_k >= 1, block_rank >= 1, >= 1 expert and "
                             f"temperature > 0, got {d}")
        return spec


def read_routed_config(folder) -> RoutedSpec | None:
    """The :class:`RoutedSpec` of a routed adapter folder, or None for any other folder."""
    path = os.path.join(os.fspath(folder), CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return RoutedSpec.from_dict(json.load(f), path)


def _router_dict(router):
    """(config dict, variant) of a loramix_fast router, or ValueError naming ``router``."""
    from ...routing import Arrow, PromptCached, SpectR

    scope, normalize = "token", "sum"
    inner = router
    if isinstance(router, PromptCached):
        if router.scope != "model":
            raise ValueError("router: PromptCached(scope='module') is not supported for vLLM "
                             "routed requests; use scope='model' or a per-token router")
        if router.pooler != "mean":
            raise ValueError(f"router: PromptCached(pooler={router.pooler!r}) is not supported "
                             "for vLLM routed requests (pooler='mean' only)")
        scope, normalize, inner = "model", router.normalize, router.router
    if isinstance(inner, SpectR):
        if inner.merge_mode != "output":
            raise ValueError("router: SpectR(merge='factor') is not supported for vLLM routed "
                             "requests (merge='output' only)")
        d = {"kind": "spectr", "top_k": inner.top_k, "weighting": inner.weighting,
             "temperature": inner.temperature}
        return d, inner.variant, scope, normalize
    if isinstance(inner, Arrow):
        d = {"kind": "arrow", "top_k": inner.top_k, "weighting": "softmax",
             "temperature": inner.temperature}
        return d, inner.variant, scope, normalize
    raise TypeError(f"router must be lmf.SpectR, lmf.Arrow or lmf.PromptCached(SpectR | Arrow, "
                    f"scope='model'), got {type(router).__name__}")


def write_routed_adapter(folder, adapters: dict, router) -> dict:
    """Write a routed adapter: the experts ``adapters`` (``{name: peft save_pretrained folder}``,
    in block order) aligned for ``router``, as one peft-layout folder that the vLLM plugin serves
    as a routed request (see the module docstring).

    Returns {"folder", "experts", "block_rank", "rank" (= n_experts * block_rank, the adapter's
    rank), "max_lora_rank" (the smallest vLLM max_lora_rank that holds it), "modules"}.
    """
    from safetensors.torch import save_file

    from ...adapters import _PREFIX, AdapterLibrary
    from ...routing import align_stack

    if not isinstance(adapters, dict) or not adapters:
        raise ValueError(f"adapters must be a non-empty {{name: peft folder}} dict, got {adapters!r}")
    rdict, variant, scope, normalize = _router_dict(router)
    names = list(adapters)
    # aligned in float64 (as align_stack does internally), stored as float32
    lib = AdapterLibrary.from_peft({n: adapters[n] for n in names})
    ranks = {n: {m: f.rank for m, f in lib.factors(n).items()} for n in names}
    rb = max(r for d in ranks.values() for r in d.values())
    n = len(names)
    rank = n * rb
    if rank > _VLLM_RANKS[-1]:
        raise ValueError(f"adapters: {n} experts x block rank {rb} = rank {rank} exceeds vLLM's "
                         f"largest max_lora_rank {_VLLM_RANKS[-1]}")
    tensors, short = {}, set()
    for mod in sorted(lib.modules()):
        stack = lib.stack(mod, torch.float64, torch.device("cpu"))
        if stack is None:
            continue
        al = align_stack(stack, variant=variant)
        K, N = stack.A.shape[2], stack.B.shape[1]
        A = torch.zeros(rank, K)
        B = torch.zeros(N, rank)
        for t, name in enumerate(names):
            r = ranks[name].get(mod, 0)
            if r == 0:
                continue
            e = stack.names.index(name)  # the expert's row in the stack
            A[t * rb:t * rb + r] = al.A_star[e, :r].float()
            B[:, t * rb:t * rb + r] = al.B_star[e, :, :r].float()
        tensors[f"{_PREFIX}{mod}.lora_A.weight"] = A.contiguous()
        tensors[f"{_PREFIX}{mod}.lora_B.weight"] = B.contiguous()
        short.add(mod.rsplit(".", 1)[-1])
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
           "r": rank, "lora_alpha": rank, "target_modules": sorted(short), "use_rslora": False,
           "lora_dropout": 0.0, "bias": "none", "inference_mode": True}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    spec = {"format": _FORMAT, "experts": names, "block_rank": rb, "scope": scope,
            "normalize": normalize, "variant": variant, "router": rdict,
            "sources": {nm: os.path.abspath(adapters[nm]) for nm in names}}
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(spec, f, indent=2, sort_keys=True)
    RoutedSpec.from_dict(spec)  # validates what was written
    mlr = next(r for r in _VLLM_RANKS if r >= rank)
    return {"folder": folder, "experts": names, "block_rank": rb, "rank": rank,
            "max_lora_rank": mlr, "modules": len(tensors) // 2}


# ---------------------------------------------------------------------------------- the math
# T = tokens, E = slots, S = output slices of a layer, R = vLLM's max_lora_rank (ranks per
# slice in a slot), n = experts of a routed adapter, rb = its block rank (n * rb <= R).

def block_ranks(A_slot: torch.Tensor, S: int, spec: RoutedSpec) -> torch.Tensor:
    """Each expert's rank per slice of a routed slot: ``A_slot [S * R, K]`` (the slot's A rows,
    slice i at rows [i R, (i + 1) R)) -> ``[S, n]`` int64, the number of nonzero rows of each
    expert's block (0: the expert does not target that module). Device ops only."""
    SR, K = A_slot.shape
    R = SR // S
    n, rb = spec.n, spec.block_rank
    if n * rb > R:
        raise ValueError(f"routed adapter: {n} experts x block rank {rb} do not fit rank {R}")
    rows = A_slot.view(S, R, K)[:, :n * rb].view(S, n, rb, K)
    return (rows != 0).any(-1).sum(-1).to(torch.int64)


def token_gates(h_own: torch.Tensor, ranks: torch.Tensor, spec: RoutedSpec) -> torch.Tensor:
    """Per-token routing gates of one routed slot.

    Semantics (per slice i, per token m; h_t = h_own[m, i R + t rb : i R + (t + 1) rb]):
        idx, w = spectr_topk(h, k, rank=ranks[i], score="norm" (SpectR) | "first" (Arrow, scale
                 1 where rank > 0), weighting, temperature)
        g[m, i R + t rb + j] = w of expert t if selected else 0, for j < rb; 0 past n * rb
    Shapes: h_own [T, S * R] (the tokens' own-slot shrink output), ranks [S, n] int64 ->
    g [T, S * R] float32.
    """
    from ... import ops

    T, SR = h_own.shape
    S = ranks.shape[0]
    R = SR // S
    n, rb = spec.n, spec.block_rank
    g = torch.zeros(T, S, R, dtype=torch.float32, device=h_own.device)
    for i in range(S):
        hb = h_own[:, i * R:i * R + n * rb].view(T, n, rb)
        rk = ranks[i]
        idx, w, _ = ops.spectr_topk(hb, spec.k, rank=rk, score=spec.score,
                                    score_scale=(rk > 0).float() if spec.score == "first" else None,
                                    weighting=spec.weighting, temperature=spec.temperature)
        g[:, i, :n * rb] = _gate_blocks(idx, w, n, rb)
    return g.view(T, SR)


def _gate_blocks(idx: torch.Tensor, w: torch.Tensor, n: int, rb: int) -> torch.Tensor:
    """(idx [T, k] int (-1: none), w [T, k]) -> [T, n * rb] float32: each expert's weight on its
    block (scatter_add: the -1 slots add 0 to expert 0)."""
    T = idx.shape[0]
    gate = torch.zeros(T, n, dtype=torch.float32, device=idx.device)
    valid = idx >= 0
    gate.scatter_add_(1, idx.clamp(min=0).long(),
                      torch.where(valid, w.float(), torch.zeros((), device=idx.device)))
    return gate.repeat_interleave(rb, 1)


def prompt_scores(h_own: torch.Tensor, ranks: torch.Tensor, spec: RoutedSpec) -> tuple:
    """Model-scope scoring of one routed slot's tokens at one layer (PromptCached(scope="model")'s
    scoring pass): per slice i with any expert targeting it, the router's raw scores
    (SpectR ``||h_t||`` over the expert's rank, Arrow ``|h_t[0]|``, 0 where the expert does not
    target the module), normalised per token over the experts (``spec.normalize``), summed over
    the slices. Shapes: h_own [T, S * R], ranks [S, n] -> (s [T, n] float32, modules [] int64:
    how many slices were scored)."""
    T, SR = h_own.shape
    S = ranks.shape[0]
    R = SR // S
    n, rb = spec.n, spec.block_rank
    total = torch.zeros(T, n, dtype=torch.float32, device=h_own.device)
    mods = torch.zeros((), dtype=torch.int64, device=h_own.device)
    for i in range(S):
        rk = ranks[i]
        hb = h_own[:, i * R:i * R + n * rb].view(T, n, rb).float()
        if spec.kind == "arrow":
            s = hb[:, :, 0].abs() * (rk > 0).float()
        else:
            rmask = torch.arange(rb, device=hb.device)[None, :] < rk[:, None]  # [n, rb]
            s = torch.sqrt(torch.where(rmask[None], hb * hb, torch.zeros((), device=hb.device)
                                       ).sum(-1))
        if spec.normalize == "sum":
            s = s / s.sum(-1, keepdim=True).clamp(min=1e-30)
        elif spec.normalize == "max":
            s = s / s.amax(-1, keepdim=True).clamp(min=1e-30)
        live = (rk > 0).any()  # a slice no expert targets is no module of the reference
        total += torch.where(live, s, torch.zeros((), device=s.device))
        mods += live.to(torch.int64)
    return total, mods


def prompt_decision(total: torch.Tensor, modules: torch.Tensor, spec: RoutedSpec) -> tuple:
    """The per-request decision from pooled scores: ``total [B, n]`` (per request, the sum over
    modules of each module's prompt-mean normalised scores), ``modules [B]`` -> (idx [B, k]
    int32, w [B, k] float32): top k of ``total / modules`` (stable: ties to the lowest index),
    weights 1/k (SpectR uniform) or softmax(score / temperature) over the k."""
    p = total / modules.clamp(min=1).to(total.dtype)[:, None]
    vals, order = torch.sort(p, dim=1, descending=True, stable=True)
    k = spec.k
    vals, order = vals[:, :k], order[:, :k]
    if spec.kind == "spectr" and spec.weighting == "uniform":
        w = torch.full_like(vals, 1.0 / k)
    else:
        w = torch.softmax(vals / spec.temperature, dim=1)
    return order.to(torch.int32), w.float()


def gate_of_decision(idx: torch.Tensor, w: torch.Tensor, S: int, R: int,
                     spec: RoutedSpec) -> torch.Tensor:
    """The model-scope gate: (idx [T, k], w [T, k]) per token -> g [T, S * R] float32, the same
    expert weights on every slice."""
    T = idx.shape[0]
    g = torch.zeros(T, S, R, dtype=torch.float32, device=idx.device)
    g[:, :, :spec.n * spec.block_rank] = _gate_blocks(idx, w, spec.n, spec.block_rank)[:, None]
    return g.view(T, S * R)


def apply_gates(h3: torch.Tensor, slot: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """h3 [T, E, SR] with each token's own-slot row multiplied by ``gate [T, SR]`` (1 for tokens
    that are not routed): returns a new tensor, h3 is untouched. ``slot [T]`` int (-1: none)."""
    T, E, SR = h3.shape
    sel = slot.clamp(0, E - 1).long().view(T, 1, 1).expand(T, 1, SR)
    own = torch.gather(h3, 1, sel)  # [T, 1, SR]
    return h3.scatter(1, sel, own * gate.to(h3.dtype)[:, None])
