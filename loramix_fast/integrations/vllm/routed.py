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
    #   per token:   lmf.SpectR(top_k, weighting, temperature, variant),
    #                lmf.Arrow(top_k, temperature)
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

How it runs (in the wrapper; punica.py's hooks call into here)
--------------------------------------------------------------
In a step whose batch uses a routed slot, the wrapper's own ops (``multi_lora_add_`` / the fused
op) see the routed tokens as slot -1, and per layer and routed slot, on that slot's tokens only
(positions known on the host from vLLM's batch layout):

    h = x_s @ A_slot.T          [T_s, S R]: [A*_1 x; ...; A*_n x] per slice, every expert's h_t,
                                the one extra matrix product routing needs (SpectR's scoring GEMM)
    y[tok] += (g * h) @ B_slot.T   g [T_s, S R]: per slice, constant on each expert's block: the
                                router's weight of the expert, 0 for experts it did not select

so each routed token gets ``sum_{t selected} w_t B*_t A*_t x``, the output-space merge (SpectR eq.
13, Arrow), with one routing decision per output slice (q, k, v; gate, up), as Hugging Face
routes each projection module on its own.

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

Host syncs: none per step. The host facts used (which slots hold routed adapters, where each routed
slot's tokens are, which requests start their prompt) come from vLLM's own host-side state
(``lora_index_to_id``, the input batch's request ids, scheduled and computed token counts), once
per step in :func:`step`, which also copies a few small index tensors to the device (a
host-to-device copy, no sync). Decisions stay device tensors. One host read could not be avoided
without touching vLLM's loading path: the block ranks of a routed slot (which experts target each
slice, used to score slices with equal ranks in one ``spectr_topk``) are computed on the device
and read to the host once per (stack, slot, adapter), in the first forward that uses that slot
at each layer - never again while the adapter stays in its slot.

Limits (each an error that says so; nothing falls back silently): routed requests need an eager
model (``enforce_eager=True``: the per-step routing state is host Python, not part of a compiled
graph), no tensor parallelism and no fully sharded LoRA; prompt routing needs the whole prompt in
one step (a prompt split by chunked prefill or partly served from the prefix cache is refused:
raise ``max_num_batched_tokens``, disable prefix caching); the fused mode runs batches with
routed requests through vLLM's base GEMM plus the packed deltas (the fused op has no h to gate);
``merge="factor"`` and ``PromptCached(scope="module")`` are not supported. vLLM pads every slot
to ``max_lora_rank``, so serving a routed adapter of rank n * r raises ``max_lora_rank`` (and
every slot's padded stacks) to at least that. A routed request costs, per layer and routed
slot, one ``[T_s, K] x [K, S R]`` and one ``[T_s, S R] x [S R, N]`` GEMM on its tokens plus
one ``spectr_topk`` per output slice (per token); a step that starts a prompt-routed request
runs the model twice.
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
           "gate_of_decision", "StepState", "step", "install"]

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
            got = d.get("format") if isinstance(d, dict) else d
            raise ValueError(f"{where}: not a loramix_fast routed adapter config of format "
                             f"{_FORMAT} (got format={got!r})")
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
        raise ValueError(f"adapters must be a non-empty {{name: peft folder}} dict, got "
                         f"{adapters!r}")
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


def token_gates(h_own: torch.Tensor, ranks: torch.Tensor, spec: RoutedSpec,
                host_ranks: tuple | None = None) -> torch.Tensor:
    """Per-token routing gates of one routed slot.

    Semantics (per slice i, per token m; h_t = h_own[m, i R + t rb : i R + (t + 1) rb]):
        idx, w = spectr_topk(h, k, rank=ranks[i], score="norm" (SpectR) | "first" (Arrow, scale
                 1 where rank > 0), weighting, temperature)
        g[m, i R + t rb + j] = w of expert t if selected else 0, for j < rb; 0 past n * rb
    Shapes: h_own [T, S * R] (the tokens' own-slot shrink output), ranks [S, n] int64 ->
    g [T, S * R] float32. ``host_ranks`` (``ranks`` as nested tuples, optional): slices with the
    same ranks are scored in ONE ``spectr_topk`` call (rows = tokens x slices), slices no expert
    targets are skipped (gate 0): fewer small ops per layer (each costs far more than its math
    on a loaded CPU).
    """
    from ... import ops

    T, SR = h_own.shape
    S = ranks.shape[0]
    R = SR // S
    n, rb = spec.n, spec.block_rank
    if host_ranks is None:
        groups = [[i] for i in range(S)]
    else:
        by = {}
        for i, rk in enumerate(host_ranks):
            if any(rk):
                by.setdefault(tuple(rk), []).append(i)
        groups = list(by.values())
    h3 = h_own.view(T, S, R)
    if len(groups) == 1 and len(groups[0]) == S and n * rb == R:  # one call, no copy
        gate = _gate_group(ops, h3.reshape(T * S, n, rb), ranks[0], spec)
        return gate.view(T, SR)
    g = torch.zeros(T, S, R, dtype=torch.float32, device=h_own.device)
    for G in groups:
        hb = h3[:, G, :n * rb].reshape(T * len(G), n, rb)
        g[:, G, :n * rb] = _gate_group(ops, hb, ranks[G[0]], spec).view(T, len(G), n * rb)
    return g.view(T, SR)


def _gate_group(ops, hb, rk, spec):
    """Gates [rows, n * rb] of the rows of ``hb [rows, n, rb]`` (one spectr_topk)."""
    idx, w, _ = ops.spectr_topk(hb, spec.k, rank=rk, score=spec.score,
                                score_scale=(rk > 0).float() if spec.score == "first" else None,
                                weighting=spec.weighting, temperature=spec.temperature)
    return _gate_blocks(idx, w, spec.n, spec.block_rank)


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


# ---------------------------------------------------------------------------------- in vLLM
# Per process (vLLM's worker): routed adapters by lora_int_id (registered when vLLM loads their
# folder), and the model-scope decisions by request id.
_ROUTED: dict[int, RoutedSpec] = {}
_DECISIONS: dict[str, tuple] = {}  # req_id -> (lora_int_id, idx [k] int32, w [k] float32)
_EAGER = {"ok": True}  # False when the worker's model runs compiled (routed requests refused)
_MAX_CACHE = 4096


class _Scoring:
    """The model-scope scoring pass of one step, for one routed slot: per scoring request, the
    sum over modules of each module's prompt-mean normalised scores."""

    def __init__(self, spec, wtok, n_rows, device):
        self.spec = spec
        self.wtok = wtok  # [T_s] float32: 1 / prompt length on the slot's scoring tokens, else 0
        self.total = torch.zeros(n_rows + 1, spec.n, dtype=torch.float32, device=device)
        self.modules = torch.zeros((), dtype=torch.int64, device=device)


class StepState:
    """What the wrapper needs in one step whose batch uses routed slots (host facts and small
    device tensors), built by :func:`step` from vLLM's host-side batch layout and kept on the
    wrapper as ``_lmf_routed`` (None in a step without routed slots).

    slots: {slot: (lora_int_id, RoutedSpec)}; tok: {slot: [T_s] int64 positions of its tokens};
    R: vLLM's max_lora_rank; scoring: True during the model-scope scoring pass.

    The wrapper's own ops see the routed tokens as slot -1 (:meth:`named_idx`); :meth:`add`
    adds the routed tokens' deltas: per routed slot, ``h = x_s @ A[s].T`` on its tokens only
    (every expert's h_t), the gates (per token: ``token_gates``; model scope: the request's
    decision), ``y[tok] += (g * h) @ B[s].T``."""

    def __init__(self, pw, slots, tok, max_rank, T, device):
        self.pw, self.slots, self.tok, self.R, self.T = pw, slots, tok, max_rank, T
        self.device = device
        self.scoring = False
        self.score_state: dict[int, _Scoring] = {}  # slot -> scoring accumulator
        self.pending: dict[int, list] = {}  # slot -> [(req_id, row)] requests to decide
        self.model_rows: dict[int, tuple] = {}  # slot -> (rows [T_s] int64, [(req_id, row)])
        self._maps: dict = {}  # (slot, S, R) -> model-scope gate [T_s, S R]
        self._named: dict = {}  # n -> slot ids [n, 1] with the routed tokens at -1
        self._routed_pos = torch.cat(list(tok.values())) if tok else None

    def named_idx(self, n: int) -> torch.Tensor:
        """The step's slot ids [n, 1] int32 with every routed token's id set to -1 (the
        wrapper's ops add the named adapters' deltas only; :meth:`add` adds the routed ones)."""
        c = self._named.get(n)
        if c is None:
            ids = self.pw._token_lora_indices[:n].clone()
            pos = self._routed_pos
            ids[pos[pos < n]] = -1
            c = self._named[n] = ids.unsqueeze(1)
        return c

    # -- ranks of a routed slot's expert blocks, once per (stack, slot, adapter)
    def ranks(self, A: torch.Tensor, s: int, S: int, host: bool = False):
        """[S, n] int64 ranks of slot s's expert blocks in stack A (device), cached per (stack
        storage, slot, adapter); ``host=True``: (device ranks, the same as nested tuples). The
        host copy is read once per cache entry (the one host read of the routed path: after an
        adapter is loaded, in the first forward that uses it at each layer)."""
        lora_id, spec = self.slots[s]
        cache = self.pw.__dict__.setdefault("_lmf_routed_ranks", {})
        key = (A.data_ptr(), tuple(A.shape), s, lora_id, S)
        r = cache.get(key)
        if r is None:
            if len(cache) > _MAX_CACHE:
                cache.clear()
            rk = block_ranks(A[s], S, spec)
            r = cache[key] = (rk, tuple(tuple(v) for v in rk.tolist()))
        return r if host else r[0]

    def add(self, y2, x2, A, B, S: int, scale) -> None:
        """y2 [T, N] (a column slice of y, updated in place) += the routed tokens' deltas;
        x2 [T, K]; A [E, S R, K], B [E, N, S R] the slots' stacks (vLLM's storage); scale: a
        float or [E] tensor (vLLM folds the scaling into B: 1)."""
        E = A.shape[0]
        _count("routed_calls")
        for s, (lora_id, spec) in self.slots.items():
            if s >= E:
                continue
            tok = self.tok[s]
            xs = x2.index_select(0, tok)
            As, Bs = A[s], B[s]
            if As.dtype != xs.dtype:
                As, Bs = As.to(xs.dtype), Bs.to(xs.dtype)
            h = torch.mm(xs, As.t())  # [T_s, S R]: every expert's h_t
            if spec.scope == "token":
                rk, hrk = self.ranks(A, s, S, host=True)
                g = token_gates(h, rk, spec, hrk)
            else:
                g = self._model_gate(s, S, A.shape[1] // S, spec)
            if not isinstance(scale, (int, float)):
                g = g * scale[s]
            elif scale != 1.0:
                g = g * scale
            d = torch.mm(h * g.to(h.dtype), Bs.t())  # [T_s, N]
            y2.index_add_(0, tok, d.to(y2.dtype))

    def _model_gate(self, s, S, R, spec):
        key = (s, S, R)
        g = self._maps.get(key)
        if g is None:
            rows, reqs = self.model_rows[s]
            k = spec.k
            D_idx = torch.zeros(len(reqs) + 1, k, dtype=torch.int32, device=self.device)
            D_w = torch.zeros(len(reqs) + 1, k, dtype=torch.float32, device=self.device)
            for req_id, row in reqs:
                _, idx, w = _DECISIONS[req_id]
                D_idx[row], D_w[row] = idx, w
            g = self._maps[key] = gate_of_decision(D_idx[rows], D_w[rows], S, R, spec)
        return g

    def score(self, x2: torch.Tensor, A: torch.Tensor, S: int) -> None:
        """The scoring pass at one layer: x2 [T, K], A [E, S R, K]."""
        for s, sc in self.score_state.items():
            if s >= A.shape[0]:
                continue
            rows = self.model_rows[s][0]
            h = torch.mm(x2.index_select(0, self.tok[s]), A[s].to(x2.dtype).t())  # [T_s, S R]
            sco, mods = prompt_scores(h, self.ranks(A, s, S), sc.spec)
            sc.total.index_add_(0, rows, sco * sc.wtok[:, None])
            sc.modules += mods

    def decide(self) -> None:
        """After the scoring pass: store each scoring request's decision (device tensors)."""
        for s, sc in self.score_state.items():
            lora_id = self.slots[s][0]
            for req_id, row in self.pending[s]:
                idx, w = prompt_decision(sc.total[row:row + 1], sc.modules.view(1), sc.spec)
                _DECISIONS[req_id] = (lora_id, idx[0], w[0])
        self.score_state.clear()
        self.pending.clear()
        self._maps.clear()

    @property
    def needs_scoring(self) -> bool:
        return bool(self.score_state)


def step(runner, input_batch, num_scheduled_tokens) -> None:
    """Called after vLLM's ``set_active_loras`` (every step; host lists only): sets each
    loramix_fast wrapper's ``_lmf_routed`` to a :class:`StepState` when the batch uses a routed
    slot, else None, and plans the scoring pass of model-scope requests that start their
    prompt in this step."""
    mgr = getattr(getattr(runner, "lora_manager", None), "_adapter_manager", None)
    if mgr is None:
        return
    from .punica import LoramixPunicaMixin

    wrappers = [w for w in mgr.punica_wrapper_mapping.values()
                if isinstance(w, LoramixPunicaMixin)]
    for w in wrappers:
        w._lmf_routed = None
    n = input_batch.num_reqs
    req_ids = list(input_batch.req_ids[:n])
    lora_of = [int(x) for x in input_batch.request_lora_mapping[:n]]
    counts = [int(c) for c in num_scheduled_tokens[:n]]
    live = set(input_batch.req_id_to_index)
    for r in [r for r in _DECISIONS if r not in live]:  # finished or preempted requests
        del _DECISIONS[r]
    slots = {s: (i, _ROUTED[i]) for s, i in enumerate(mgr.lora_index_to_id)
             if i is not None and i in _ROUTED and i in lora_of}
    if not slots or not wrappers:
        return
    if not _EAGER["ok"]:
        raise RuntimeError("loramix_fast routed requests need an eager model "
                           "(LLM(..., enforce_eager=True)): the routing is not in vLLM's "
                           "compiled graph")
    cfg = runner.lora_config
    if getattr(cfg, "fully_sharded_loras", False):
        raise RuntimeError("loramix_fast routed requests do not support fully_sharded_loras=True")
    tp = getattr(getattr(getattr(runner, "vllm_config", None), "parallel_config", None),
                 "tensor_parallel_size", 1)
    if tp != 1:
        raise RuntimeError(f"loramix_fast routed requests need tensor_parallel_size=1, got {tp}")
    T = sum(counts)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    computed = [int(c) for c in input_batch.num_computed_tokens_cpu[:n]]
    prompt_len = [int(c) for c in input_batch.num_prompt_tokens[:n]]
    plan = {}
    for s, (lora_id, spec) in slots.items():
        pos, rows, wtok, reqs, score_reqs = [], [], [], [], []
        for j in range(n):
            if lora_of[j] != lora_id:
                continue
            c = counts[j]
            row = len(reqs) + 1
            reqs.append((req_ids[j], row))
            pos.extend(range(starts[j], starts[j] + c))
            rows.extend([row] * c)
            scoring = spec.scope == "model" and computed[j] == 0
            if spec.scope == "model":
                if computed[j] == 0 and c != prompt_len[j]:
                    raise RuntimeError(
                        f"loramix_fast: request {req_ids[j]!r} (prompt-routed adapter {lora_id})"
                        f" has its {prompt_len[j]}-token prompt split over steps ({c} tokens "
                        "now); model-scope routing needs the whole prompt in one step: raise "
                        "max_num_batched_tokens or disable chunked prefill")
                if computed[j] > 0 and req_ids[j] not in _DECISIONS:
                    raise RuntimeError(
                        f"loramix_fast: request {req_ids[j]!r} (prompt-routed adapter {lora_id})"
                        " has no routing decision: its prompt was not scored in one step (a "
                        "prefix-cache hit skips part of it: disable prefix caching for "
                        "prompt-routed requests)")
                if scoring:
                    score_reqs.append((req_ids[j], row))
            wtok.extend([1.0 / c if scoring else 0.0] * c)
        plan[s] = (pos, rows, wtok, reqs, score_reqs)
    for w in wrappers:
        dev = w.device
        tok = {s: torch.tensor(p[0], dtype=torch.int64, device=dev) for s, p in plan.items()}
        st = StepState(w, slots, tok, int(runner.lora_config.max_lora_rank), T, dev)
        for s, (pos, rows, wtok, reqs, score_reqs) in plan.items():
            if slots[s][1].scope != "model":
                continue
            st.model_rows[s] = (torch.tensor(rows, dtype=torch.int64, device=dev), reqs)
            if score_reqs:
                st.score_state[s] = _Scoring(slots[s][1], torch.tensor(
                    wtok, dtype=torch.float32, device=dev), len(reqs), dev)
                st.pending[s] = score_reqs
        w._lmf_routed = st


def _routed_forward(model, orig):
    """The model's forward: with a model-scope routed request starting its prompt, a scoring pass
    (every LoRA delta off) first, then the real forward with the decisions."""
    import functools

    @functools.wraps(orig)
    def forward(*args, **kwargs):
        states = [w._lmf_routed for w in _wrappers_of(model)
                  if getattr(w, "_lmf_routed", None) is not None]
        todo = [st for st in states if st.needs_scoring]
        if todo:
            if torch.compiler.is_compiling():
                raise RuntimeError("loramix_fast: prompt-routed requests need an eager model "
                                   "(enforce_eager=True)")
            for st in todo:
                st.scoring = True
            try:
                with torch.no_grad():
                    orig(*args, **kwargs)
            finally:
                for st in todo:
                    st.scoring = False
            for st in todo:
                st.decide()
            _count("scoring_passes")
        return orig(*args, **kwargs)

    forward._loramix_routed = True
    return forward


def _count(key: str) -> None:
    """Per-process counters in the plugin's ``stats()`` (host ints)."""
    from . import _stats

    if not torch.compiler.is_compiling():
        _stats[key] = _stats.get(key, 0) + 1


def _wrappers_of(model):
    mgr = getattr(model, "lora_manager", None)
    if mgr is None:
        return []
    return list(mgr.punica_wrapper_mapping.values())


def _load_routed(cls, orig, lora_dir, expected_lora_modules, peft_helper, **kwargs):
    """``LoRAModel.from_local_checkpoint`` for a routed adapter folder: its weights file, then
    vLLM's own ``from_lora_tensors``; registers the adapter's routing by lora_int_id."""
    from safetensors.torch import load_file

    spec = read_routed_config(lora_dir)
    lora_id = kwargs.get("lora_model_id")
    if spec is None:
        _ROUTED.pop(lora_id, None)
        return orig(lora_dir, expected_lora_modules, peft_helper, **kwargs)
    if not _EAGER["ok"]:
        raise ValueError(f"loramix_fast: routed adapter {lora_dir!r} needs an eager model "
                         "(LLM(..., enforce_eager=True))")
    if lora_id is None:
        raise ValueError(f"loramix_fast: routed adapter {lora_dir!r} loaded without a lora id")
    tensors = load_file(os.path.join(lora_dir, WEIGHTS_NAME), device="cpu")
    bad = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors}
                 - set(expected_lora_modules))
    if bad:
        raise ValueError(f"loramix_fast: routed adapter {lora_dir!r} targets {bad}, which this "
                         f"model's LoRA does not support ({sorted(expected_lora_modules)})")
    keep = ("device", "dtype", "model_vocab_size", "weights_mapper", "skip_prefixes")
    lora = cls.from_lora_tensors(lora_model_id=lora_id, tensors=tensors, peft_helper=peft_helper,
                                 **{k: v for k, v in kwargs.items() if k in keep})
    _ROUTED[lora_id] = spec
    _count("routed_adapters_loaded")
    log.info("loramix_fast: routed adapter %d (%s over %s, scope %s) from %s", lora_id,
             spec.kind, list(spec.experts), spec.scope, lora_dir)
    return lora


def install() -> None:
    """Patch vLLM for routed requests (idempotent): the adapter loader (routed folders), the
    model runner's ``set_active_loras`` (the per-step routed state) and ``load_lora_model`` (the
    model's forward gets the scoring pass; eager or not)."""
    import functools

    from vllm.lora.lora_model import LoRAModel
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin as Mixin

    f = LoRAModel.__dict__["from_local_checkpoint"]
    if not getattr(f.__func__, "_loramix_routed", False):
        orig_load = f.__func__

        def from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, **kwargs):
            return _load_routed(cls, functools.partial(orig_load, cls), lora_dir,
                                expected_lora_modules, peft_helper, **kwargs)
        from_local_checkpoint._loramix_routed = True
        LoRAModel.from_local_checkpoint = classmethod(from_local_checkpoint)

    if not getattr(Mixin.set_active_loras, "_loramix_routed", False):
        orig_set = Mixin.set_active_loras

        @functools.wraps(orig_set)
        def set_active_loras(self, input_batch, num_scheduled_tokens, *args, **kwargs):
            out = orig_set(self, input_batch, num_scheduled_tokens, *args, **kwargs)
            step(self, input_batch, num_scheduled_tokens)
            return out
        set_active_loras._loramix_routed = True
        Mixin.set_active_loras = set_active_loras

        orig_private = Mixin._set_active_loras

        @functools.wraps(orig_private)
        def _set_active_loras(self, *args, **kwargs):
            mgr = getattr(getattr(self, "lora_manager", None), "_adapter_manager", None)
            if mgr is not None:  # dummy runs call this directly: no routed state there
                for w in mgr.punica_wrapper_mapping.values():
                    w._lmf_routed = None
            return orig_private(self, *args, **kwargs)
        _set_active_loras._loramix_routed = True
        Mixin._set_active_loras = _set_active_loras

    if not getattr(Mixin.load_lora_model, "_loramix_routed", False):
        orig_model = Mixin.load_lora_model

        @functools.wraps(orig_model)
        def load_lora_model(self, model, vllm_config, *args, **kwargs):
            out = orig_model(self, model, vllm_config, *args, **kwargs)
            _EAGER["ok"] = _is_eager(vllm_config)
            fwd = out.forward
            if not getattr(fwd, "_loramix_routed", False):
                out.forward = _routed_forward(out, fwd)
            return out
        load_lora_model._loramix_routed = True
        Mixin.load_lora_model = load_lora_model


def _is_eager(vllm_config) -> bool:
    mc = getattr(vllm_config, "model_config", None)
    if mc is not None and getattr(mc, "enforce_eager", False):
        return True
    cc = getattr(vllm_config, "compilation_config", None)
    mode = getattr(cc, "mode", None)
    return mode is not None and int(mode) == 0
