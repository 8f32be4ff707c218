"""Ensemble generation: mix the next-token distributions of several experts (LoRA adapters of one
patched model, the base model, or prompts on one backbone) and decode the mixture.

    seqs = lmf.ensemble_generate(model, ids, experts=["math", "code", "__base__"],
                                 weights=[0.5, 0.3, 0.2], mode="probs", max_new_tokens=32)

All experts run in ONE batched forward per step: each sequence is repeated once per expert its
weights select (sparse: an expert of weight 0 gets no copy, so a top-k router's ensemble costs k
copies per sequence, not E), each copy carries its expert's adapter (the multi-LoRA op with one
slot) and its own KV cache, and every copy of a sequence is fed the same (mixed) next token. The
last-position logits ``[B, K, V]`` are mixed by the fused ``mix_logits`` op (ELREA eq. 10 for
``mode="logits"``, PELMo eq. 4 for ``"probs"``). Expert prompt prefixes are run once per expert
and their KV cache is copied to every sequence's copy (``prefix_cache=True``).

Legend: B = sequences, E = experts, N = copies (sum over sequences of their selected experts,
B * E when every weight is used), K = most experts any sequence selects, P = prompt length,
Lp = longest expert prefix, L = copy length after the prefix (content + prompt, left-padded),
V = vocabulary.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Sequence

import torch

from . import reference
from .adapters import BASE
from .patching import _state, is_patched, use_adapters

try:  # the fused ops; the pure-torch reference where the module is absent
    from .ops.mix_logits import mix_logits as _mix_op
    from .ops.mix_logits import mix_logits_greedy as _mix_greedy_op
    from .ops.mix_logits import mix_logits_sample as _mix_sample_op
except ModuleNotFoundError as e:  # only the module missing; a bug inside it still raises
    if e.name != f"{__package__}.ops.mix_logits":
        raise
    _mix_op = _mix_greedy_op = _mix_sample_op = None

__all__ = ["ensemble_generate", "mix_next_token"]

try:  # weight helpers (ELREA eqs. 9-10, PELMo's top-k), re-exported here
    from .ensemble_weights import elrea_weights, topk_renormalize  # noqa: F401
    __all__ += ["elrea_weights", "topk_renormalize"]
except ModuleNotFoundError as e:
    if e.name != f"{__package__}.ensemble_weights":
        raise


# ---- choosing the next token -----------------------------------------------------------------

def _mix(logits: torch.Tensor, weights: torch.Tensor, mode: str) -> torch.Tensor:
    if _mix_op is not None:
        return _mix_op(logits, weights, mode)
    return reference.mix_logits(logits, weights, mode)


def _top_p_filter(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF ``TopPLogitsWarper`` semantics: keep the smallest set of top tokens whose probability
    reaches ``top_p`` (always at least the top one); the rest get -inf. z [B, V]."""
    sorted_z, order = torch.sort(z, dim=-1, descending=False)
    cum = sorted_z.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - top_p)
    drop[:, -1] = False
    return z.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def mix_next_token(logits: torch.Tensor, weights: torch.Tensor, mode: str = "probs", *,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each sequence from its experts' logits.

    Semantics:
        z[b] = mix_logits(logits, weights, mode)[b]           (see ``reference.mix_logits``)
        greedy: tok[b] = argmax_v z[b, v]  (first index on ties)
        sample: tok[b] ~ softmax(top_p_filter(z[b] / temperature))   (one draw per sequence)
    Shapes: logits [B, E, V], weights [B, E] float32. Returns tok [B] int64.
    Uses the fused ``loramix_fast.ops.mix_logits`` ops when present (they never materialise z).
    """
    if not do_sample:
        if _mix_greedy_op is not None:
            return _mix_greedy_op(logits, weights, mode).long()
        return _mix(logits, weights, mode).argmax(-1)
    if _mix_sample_op is not None:
        return _mix_sample_op(logits, weights, mode, temperature=temperature, top_p=top_p,
                              generator=generator).long()
    z = _mix(logits, weights, mode).float()
    if temperature != 1.0:
        z = z / temperature
    if top_p < 1.0:
        z = _top_p_filter(z, top_p)
    probs = torch.softmax(z, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ---- validation ------------------------------------------------------------------------------

def _check_experts(model, experts) -> list[str]:
    if isinstance(experts, str) or not isinstance(experts, Sequence) or len(experts) == 0:
        raise ValueError("experts must be a non-empty list of adapter names (or "
                         f"{BASE!r} for the base model), got {experts!r}")
    experts = list(experts)
    for e in experts:
        if not isinstance(e, str):
            raise TypeError(f"experts must be adapter names (str), got {type(e).__name__} {e!r}")
    if is_patched(model):
        lib = _state(model).lib
        unknown = [e for e in experts if e != BASE and e not in lib]
        if unknown:
            raise ValueError(f"unknown expert(s) {unknown}; the model's library has "
                             f"{list(lib.names)} (or {BASE!r} for the base model)")
    elif any(e != BASE for e in experts):
        raise ValueError("experts name adapters but the model is not patched by loramix_fast "
                         "(call lmf.patch(model, lib) first); an unpatched model only serves "
                         f"{BASE!r} experts (e.g. with expert_prompts)")
    return experts


def _check_weights(weights, input_ids, attention_mask, B: int, E: int, mode: str,
                   device) -> torch.Tensor:
    if weights is None:
        w = torch.full((B, E), 1.0 / E, dtype=torch.float32, device=device)
    else:
        if callable(weights) and not isinstance(weights, torch.Tensor):
            weights = weights(input_ids, attention_mask)
        w = torch.as_tensor(weights, dtype=torch.float32, device=device)
        if w.dim() == 1 and w.shape[0] == E:
            w = w.expand(B, E)
        if tuple(w.shape) != (B, E):
            raise ValueError(f"weights must have shape [batch, n_experts] = [{B}, {E}] or "
                             f"[n_experts] = [{E}], got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weights must be finite")
    live = (w > 0) if mode == "probs" else (w != 0)
    dead = (~live.any(1)).nonzero().flatten().tolist()
    if dead:
        what = "positive" if mode == "probs" else "nonzero"
        raise ValueError(f"every sequence needs at least one {what} expert weight in mode "
                         f"{mode!r}; sequence(s) {dead} have none")
    return w.contiguous()


def _token_list(p, name: str) -> list[int]:
    if p is None:
        return []
    if isinstance(p, torch.Tensor):
        if p.dim() == 2 and p.shape[0] == 1:
            p = p[0]
        if p.dim() != 1:
            raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape "
                             f"{tuple(p.shape)}")
        return [int(t) for t in p.tolist()]
    if isinstance(p, str):
        raise TypeError(f"{name} must be token ids (tokenize it first), got a string")
    return [int(t) for t in p]


def _mask_like_generate(input_ids: torch.Tensor, pad, eos: list) -> torch.Tensor:
    """The attention mask when none is given, as HF ``generate`` makes it: inferred from the pad
    token (``input_ids != pad``) when it occurs in the inputs and is not an EOS token, else all
    ones; a batch that may be padded but whose mask cannot be inferred gets a warning."""
    ones = torch.ones_like(input_ids)
    B = input_ids.shape[0]
    if pad is None:
        if B > 1:
            warnings.warn(f"ensemble_generate got a batch of {B} sequences without "
                          "attention_mask and without a pad token id (argument or generation "
                          "config): padding cannot be told from tokens and would be attended to; "
                          "pass the tokenizer's attention_mask (e.g. **enc)", UserWarning,
                          stacklevel=3)
        return ones
    pad = int(pad)
    if not bool((input_ids == pad).any()):
        return ones
    if pad in eos:
        if B > 1:
            warnings.warn(f"ensemble_generate got a batch of {B} sequences without "
                          f"attention_mask, and the pad token {pad} is also an EOS token, so the "
                          "mask cannot be inferred: every pad token is attended to and the "
                          "answers differ from those of a masked batch; pass the tokenizer's "
                          "attention_mask (e.g. attention_mask=enc.attention_mask)", UserWarning,
                          stacklevel=3)
        return ones
    return (input_ids != pad).long()


def _check_content(content, B: int, E: int, pairs) -> dict:
    """``expert_content`` -> {(b, e): token list} for the used pairs with content."""
    if content is None:
        return {}
    if isinstance(content, (str, torch.Tensor)) or len(content) != B:
        raise ValueError(f"expert_content must be a list of {B} lists (one per sequence) of {E} "
                         "token-id sequences (one per expert; None or [] for none)")
    for b, row in enumerate(content):
        if isinstance(row, (str, torch.Tensor)) or row is None or len(row) != E:
            raise ValueError(f"expert_content[{b}] must be a list of {E} token-id sequences (one "
                             "per expert; None or [] for none)")
    out = {}
    for b, e in pairs:
        toks = _token_list(content[b][e], f"expert_content[{b}][{e}]")
        if toks:
            out[(b, e)] = toks
    return out


def _prefix_cache(model, prefix, extra: dict, patched: bool):
    """Run each used expert's prefix once (row u: its tokens, left-padded, its adapter) and return
    the KV cache with row u copied to every copy of that expert ([N] rows). Padded positions'
    keys and values are zeroed, so a copy never reads non-finite values from them."""
    p_ids, p_mask, p_names, row_of = prefix
    p_pos = (p_mask.cumsum(-1) - 1).masked_fill(p_mask == 0, 0)
    sel = use_adapters(model, p_names) if patched else contextlib.nullcontext()
    with sel:
        out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True,
                    **extra)
    cache = _returned_cache(out)
    layers = getattr(cache, "layers", None)
    if not hasattr(cache, "batch_select_indices") or layers is None:
        raise TypeError(f"prefix_cache=True needs the model to return a transformers Cache with "
                        f"batch_select_indices (DynamicCache); {type(model).__name__} returned "
                        f"{type(cache).__name__}: pass prefix_cache=False")
    pad = (p_mask == 0)[:, None, :, None]  # [U, 1, Lp, 1]
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[2] != p_mask.shape[1]:
                raise TypeError(f"prefix_cache=True: a cache layer of {type(layer).__name__} is "
                                "not [rows, heads, positions, dim] (a sliding or recurrent "
                                "cache); pass prefix_cache=False")
            t.masked_fill_(pad, 0)
    cache.batch_select_indices(row_of)
    return cache


# ---- the model call --------------------------------------------------------------------------

def _forward_kwargs(model) -> tuple[str, bool]:
    """(name of the cache argument, whether ``logits_to_keep`` is accepted) for this model."""
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


# ---- the public entry point ------------------------------------------------------------------

def ensemble_generate(
    model,
    input_ids: torch.Tensor,
    experts: Sequence[str],
    weights=None,
    mode: str = "probs",
    max_new_tokens: int = 20,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    expert_prompts: Sequence | None = None,
    pad_token_id: int | None = None,
    expert_content: Sequence | None = None,
    prefix_cache: bool = True,
) -> torch.LongTensor:
    """Generate from a weighted ensemble of experts, all run in one batched forward per step.

    Semantics (per sequence b, step t):
        logits[b, e] = model(prefix_e + prompt_b + generated_b, adapter=experts[e])[-1]
        z[b] = sum_e w[b, e] * logits[b, e]                        mode="logits" (ELREA eq. 10)
        z[b] = log sum_e w[b, e] * softmax(logits[b, e])           mode="probs"  (PELMo eq. 4)
        next[b] = argmax z[b]  (greedy), or one draw from softmax(top_p(z[b] / temperature)),
        appended to every expert's copy of sequence b.
    The weights are fixed for the whole generation. A sequence stops after it emits an EOS token;
    later positions hold ``pad_token_id``; the loop ends when every sequence has stopped.
    ``prefix_e + prompt_b`` is ``prefix_e + content[b][e] + prompt_b`` with ``expert_content``.

    Sparse: only the (sequence, expert) pairs with a used weight (> 0 in "probs", != 0 in
    "logits" mode; the others contribute nothing to z) get a copy, so the forward runs
    N = sum_b |{e: w[b, e] used}| rows instead of B * E, and the result equals the dense ensemble
    in which the unused weights are 0.

    Args:
        model: a causal LM (Hugging Face API: ``model(input_ids, attention_mask, position_ids,
            cache/past_key_values, use_cache)``), patched with ``lmf.patch`` when ``experts``
            name adapters; an unpatched model serves ``"__base__"`` experts only.
        input_ids: [B, P] int64 prompts, left-padded (right padding is also accepted: rows are
            compacted before decoding).
        experts: E names, each an adapter of the model's library or ``"__base__"``.
        weights: fixed mixing weights of the experts, the same at every step (not routing:
            nothing is chosen per token): [B, E] (one row per sequence) or [E] (every sequence
            alike, e.g. ``[0.5, 0.3, 0.2]``) tensor/list, None (uniform 1/E), or a callable
            ``weights(input_ids, attention_mask) -> [B, E] or [E]`` called once on the prompt.
            mode "probs" ignores non-positive weights and needs one positive weight per sequence;
            "logits" allows any finite weights (they need not sum to 1), one nonzero per sequence.
        mode: "probs" (PELMo, default) or "logits" (ELREA).
        max_new_tokens: number of tokens to generate (>= 0).
        attention_mask: [B, P] of 0/1. None: as ``generate`` does, inferred from the pad token
            (``input_ids != pad_token_id``) when it occurs in the prompts and is not an EOS token,
            else all ones, with a UserWarning when a batch may be padded but the mask cannot be
            inferred (no pad token id, or pad = EOS as in SmolLM2): pass the tokenizer's mask.
        do_sample / temperature / top_p / generator: sampling; one draw per sequence per step
            from the mixture, reproducible from ``generator`` (or the global seed when None).
        eos_token_id: int or list of ints; None takes ``model.generation_config.eos_token_id``
            (like ``generate``).
        expert_prompts: None, or E token-id sequences (1-D tensors / lists, None or [] for no
            prefix; or an [E, Lp] tensor): expert e sees ``expert_prompts[e] + prompt_b`` (PELMo's prompt experts).
            Copies of unequal length are left-padded.
        pad_token_id: fills positions after EOS (and tells padding apart when attention_mask
            is None); None takes the generation config's, else the first EOS id, else 0.
        expert_content: None, or per-(sequence, expert) content: B lists of E token-id sequences
            (None or [] for none), ``expert_content[b][e]`` going between expert e's prefix and
            prompt b (PELMo's retrieved passages or generated knowledge per question). Entries of
            pairs whose weight is unused are ignored.
        prefix_cache: with ``expert_prompts``, run each selected expert's prefix once (one row
            per expert, its adapter, positions 0..) and give every copy of that expert a copy of
            its KV cache, instead of recomputing the prefix in each of the B copies. The model must
            return a ``transformers`` Cache with ``batch_select_indices`` (DynamicCache);
            otherwise a TypeError says to pass ``prefix_cache=False``. The cache's memory is
            still one copy per row (HF caches have no shared blocks); the compute is once.

    Returns:
        LongTensor [B, P + T], the input prompts followed by the generated tokens, T <=
        max_new_tokens (fewer when every sequence stopped early), like ``generate``.
    """
    # ---- validate --------------------------------------------------------------------------
    if mode not in ("logits", "probs"):
        raise ValueError(f"mode must be 'logits' or 'probs', got {mode!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [batch, prompt_len] LongTensor, got "
                         f"{type(input_ids).__name__} of shape "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    experts = _check_experts(model, experts)
    B, P = input_ids.shape
    E = len(experts)
    device = input_ids.device
    input_ids = input_ids.long()
    gen_cfg = getattr(model, "generation_config", None)
    if eos_token_id is None and gen_cfg is not None:
        eos_token_id = gen_cfg.eos_token_id
    eos = [] if eos_token_id is None else (
        [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id])
    if pad_token_id is None:
        pad_token_id = getattr(gen_cfg, "pad_token_id", None)
    if attention_mask is None:
        attention_mask = _mask_like_generate(input_ids, pad_token_id, eos)
    elif tuple(attention_mask.shape) != (B, P):
        raise ValueError(f"attention_mask must have the shape of input_ids {(B, P)}, got "
                         f"{tuple(attention_mask.shape)}")
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if isinstance(expert_prompts, torch.Tensor) and expert_prompts.dim() == 2:
        expert_prompts = list(expert_prompts)  # [E, Lp]: one row per expert
    if expert_prompts is not None:
        if isinstance(expert_prompts, (str, torch.Tensor)) or len(expert_prompts) != E:
            raise ValueError(f"expert_prompts must be a list of {E} token-id sequences (one per "
                             "expert; None or [] for none)")
        prefixes = [_token_list(p, f"expert_prompts[{i}]") for i, p in enumerate(expert_prompts)]
    else:
        prefixes = [[] for _ in range(E)]
    w = _check_weights(weights, input_ids, attention_mask, B, E, mode, device)  # [B, E]

    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    if B == 0 or max_new_tokens == 0:
        return input_ids.clone()

    # ---- the copies: one per (sequence, used expert), row-major ------------------------------
    live = (w > 0) if mode == "probs" else (w != 0)  # [B, E]: the experts each sequence runs
    pairs = [tuple(p) for p in live.nonzero().tolist()]  # copy n = (b, e), b ascending
    N = len(pairs)
    seq_of = torch.tensor([b for b, _ in pairs], dtype=torch.long, device=device)  # [N]
    K = int(live.sum(1).max())
    slot_rows = torch.zeros(B, K, dtype=torch.long)  # [B, K]: copy of slot j of sequence b
    slot_w = torch.zeros(B, K, dtype=torch.float32)  # [B, K]: its weight (0 = empty slot)
    fill = [0] * B
    w_host = w.cpu()
    for n, (b, e) in enumerate(pairs):
        slot_rows[b, fill[b]] = n
        slot_w[b, fill[b]] = w_host[b, e]
        fill[b] += 1
    for b in range(B):  # empty slots read the sequence's first copy, weight 0 (skipped)
        slot_rows[b, fill[b]:] = slot_rows[b, 0]
    slot_rows, slot_w = slot_rows.to(device), slot_w.to(device)
    contents = _check_content(expert_content, B, E, pairs)  # {(b, e): [tokens]}

    def left_pad(seqs):
        Lc = max(len(c) for c in seqs)
        t = torch.full((len(seqs), Lc), pad_token_id, dtype=torch.long)
        m = torch.zeros((len(seqs), Lc), dtype=torch.long)
        for i, c in enumerate(seqs):
            if c:
                t[i, Lc - len(c):] = torch.tensor(c, dtype=torch.long)
                m[i, Lc - len(c):] = 1
        return t.to(device), m.to(device)

    used = sorted({e for _, e in pairs})
    shared = prefix_cache and any(prefixes[e] for e in used)
    prefix = None  # (ids [U, Lp], mask [U, Lp], names [U], copy -> row [N]) when shared
    if (shared or contents or any(prefixes[e] for e in used)
            or not bool((attention_mask[:, -1] == 1).all())):
        # rebuild every copy as [prefix_e] + content_be + the prompt's real tokens, left-padded
        rows = [input_ids[b][attention_mask[b].bool()].tolist() for b in range(B)]
        head = [[] if shared else prefixes[e] for _, e in pairs]
        copies = [h + contents.get((b, e), []) + rows[b] for h, (b, e) in zip(head, pairs)]
        empty = sorted({b for (b, e), c in zip(pairs, copies) if not c and not prefixes[e]})
        if empty:
            raise ValueError(f"sequence(s) {empty} have no tokens (an all-zero attention_mask "
                             "row and no expert prompt)")
        if shared and not all(copies):
            raise ValueError("prefix_cache=True needs every sequence to have at least one token "
                             "after the expert prefix (an all-zero attention_mask row); pass "
                             "prefix_cache=False")
        ids, mask = left_pad(copies)  # [N, L]
        if shared:
            u_of = {e: i for i, e in enumerate(used)}
            p_ids, p_mask = left_pad([prefixes[e] for e in used])  # [U, Lp]
            prefix = (p_ids, p_mask, [experts[e] for e in used],
                      torch.tensor([u_of[e] for _, e in pairs], dtype=torch.long, device=device))
    else:
        if bool((attention_mask.sum(1) == 0).any()):
            raise ValueError("every sequence needs at least one token")
        ids = input_ids[seq_of]  # [N, P]
        mask = attention_mask[seq_of]
    if prefix is not None:
        full = torch.cat([prefix[1][prefix[3]], mask], dim=1)  # [N, Lp + L]
        pos = ((full.cumsum(-1) - 1).masked_fill(full == 0, 0))[:, prefix[1].shape[1]:]
        mask = full
    else:
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [N, L]

    cache_kw, has_keep = _forward_kwargs(model)
    extra = {"logits_to_keep": 1} if has_keep else {}
    names = [experts[e] for _, e in pairs]
    eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens = []
    step_mask = mask
    step_pos = pos
    step_ids = ids
    cache = None
    patched = is_patched(model)
    if prefix is not None:
        with torch.inference_mode():
            cache = _prefix_cache(model, prefix, extra, patched)

    selection = use_adapters(model, names) if patched else contextlib.nullcontext()
    with torch.inference_mode(), selection:
        for t in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos,
                        use_cache=True, **{cache_kw: cache}, **extra)
            cache = _returned_cache(out)
            logits = out.logits[:, -1, :]  # [N, V]
            logits = logits[slot_rows]  # [B, K, V]; empty slots have weight 0
            tok = mix_next_token(logits, slot_w, mode, do_sample=do_sample, temperature=temperature,
                                 top_p=top_p, generator=generator)  # [B]
            if eos_t is not None:
                tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
                done = done | torch.isin(tok, eos_t)
            new_tokens.append(tok)
            if t == max_new_tokens - 1 or (eos_t is not None and bool(done.all())):
                break
            step_ids = tok[seq_of][:, None]  # [N, 1]
            step_pos = step_pos[:, -1:] + 1
            step_mask = torch.cat([step_mask, step_mask.new_ones(N, 1)], dim=1)
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)

