"""ELREA end to end (Li et al., ICLR 2025, arXiv 2502.00089; issue 10 item 6): cluster the training
instructions by their gradients, train one expert per cluster from a base adapter, and answer a test
instruction with a weighted logit-level ensemble of the cluster experts and the base adapter.

A thin pipeline over public pieces: the trainable library (``lib.parameters``, mixed batches), the
fused multi-LoRA op, :func:`loramix_fast.elrea_weights` (eq. 9), :func:`loramix_fast.ensemble_generate`
/ :func:`loramix_fast.ensemble_logprobs` (``mode="logits"``, eq. 10) and :func:`loramix_fast.merge`.

The equations, as built here (``theta`` = the base adapter's LoRA factors, flattened in peft
state-dict key order, i.e. the sorted keys ``base_model.model.<module>.lora_A.weight`` /
``.lora_B.weight``, D values in all):

    eq. 2  g_i = grad_theta  NLL_instr(x_i)        the mean NLL of the instruction tokens only
                                                    (the user turn: the caller's ``instruction_mask``)
    eq. 5  Adam form, with a checkpoint's optimizer state (m, v, step t, betas, eps):
           m' = (b1 m + (1 - b1) g) / (1 - b1^(t+1)),  v' = (b2 v + (1 - b2) g^2) / (1 - b2^(t+1)),
           G(g) = m' / (sqrt(v') + eps)             (SGD form without a state: G(g) = g)
    eq. 6  f_i = R^T G(g_i) / sqrt(d_proj)         R [D, d_proj] Rademacher (+-1), from a seed
    eq. 7  f_i = mean over checkpoints of f_i^(c), then f_i / ||f_i||    (for the clustering)
    eq. 8  mu_c = mean of the UNnormalised f_i of cluster c (BIRCH + rebalancing on the normalised)
    eq. 9  cos_c = cos(f_test, mu_c);  w_c = softmax_c((cos_c - mean) / std);  w_base = 1 - max cos
    eq. 10 z = w_base z_base + sum_c w_c z_c       (logit-level; the weights need not sum to 1)
    eq. 11 MoE routing baseline: y = W x + sum_e w_e dW_e x in every module, the same per-sequence
           weights (output space, one fused op with C + 1 slots per token)
    MoE merging baseline: one merged adapter per sequence (``lmf.merge``), by default in factor
           space, A = sum_e w_e A_e, B = sum_e w_e scale_e B_e. (With fixed per-sequence weights the
           eq. 11 mix IS the delta-space merge sum_e w_e dW_e, module by module: the routing
           baseline equals ``merged(w, space="delta")`` exactly; only the factor merge differs.)

Per-example gradients in one backward: the B rows of a batch run on B copies of the base adapter
(temporary trainable adapters of the library, row b on copy b, one fused forward), so the gradient
of sum_b NLL_b w.r.t. copy b is the gradient of row b alone.

The projection R is never materialised: its rows come in blocks of :data:`PROJECTION_BLOCK`, block
k drawn whole from a CPU ``torch.Generator`` seeded with ``(hash(seed) + k) mod 2^32``, so row j of R
depends on (seed, d_proj, j) only: not on D (a longer theta extends R) nor on how many rows are
processed at once (``chunk_rows``).

    elrea = lmf.elrea.ELREA(model, lib, "base", d_proj=1024, n_clusters=4)
    elrea.fit(batches)              # dicts: input_ids, attention_mask, labels, instruction_mask
    w = elrea.weights(test_batches)              # [N, 1 + C]: base first, then the clusters
    out = elrea.generate(ids, weights=w, attention_mask=mask, max_new_tokens=32)
    with elrea.routed(w): model.generate(...)    # MoE routing baseline (eq. 11)
    with elrea.merged(w) as names: model.generate(..., adapter_names=names)   # MoE merging

Legend: N = examples, B = rows of a batch, L = sequence length, V = vocabulary, D = LoRA parameters
of the base adapter, C = clusters.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import os
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from .adapters import BASE, AdapterLibrary, LoRAFactors
from .ensemble import ensemble_generate
from .ensemble_scoring import ensemble_logprobs
from .ensemble_weights import elrea_weights
from .merging import merge
from .patching import set_router

__all__ = ["ELREA", "gradient_features", "rademacher_project", "rademacher_matrix",
           "adam_state", "birch_clusters", "cluster_centroids", "train_cluster_experts",
           "SequenceMixRouter", "peft_keys", "PROJECTION_BLOCK"]

PROJECTION_BLOCK = 1024  # rows of R per generator seed (part of R's definition: do not change)
_PREFIX = "base_model.model."


# ---- batches -----------------------------------------------------------------------------------

def _parts(batch, i: int):
    """(input_ids [B, L], attention_mask [B, L], labels or None, instruction_mask or None)."""
    if not (isinstance(batch, dict) or hasattr(batch, "keys")) or "input_ids" not in batch:
        raise TypeError(f"batches[{i}] must be a dict with 'input_ids' (and 'attention_mask', "
                        "'labels', 'instruction_mask'), got "
                        f"{type(batch).__name__}{' keys ' + str(list(batch.keys())) if hasattr(batch, 'keys') else ''}")
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64,
                                                                                  torch.int32):
        raise ValueError(f"batches[{i}]['input_ids'] must be an integer [batch, seq_len] tensor, "
                         f"got {getattr(ids, 'dtype', type(ids).__name__)} "
                         f"{tuple(getattr(ids, 'shape', ()))}")
    out = [ids.long()]
    for key in ("attention_mask", "labels", "instruction_mask"):
        v = batch.get(key)
        if v is not None and (not isinstance(v, torch.Tensor) or v.shape != ids.shape):
            raise ValueError(f"batches[{i}][{key!r}] must have the shape of input_ids "
                             f"{tuple(ids.shape)}, got {tuple(getattr(v, 'shape', ()))}")
        out.append(None if v is None else v.to(ids.device))
    if out[1] is None:
        out[1] = torch.ones_like(out[0])
    out[1] = out[1].long()
    return tuple(out)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _token_lp(model, ids, mask, names) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) [B, L-1] in fp32 (fp64 for an fp64 model), each row on
    its adapter ``names[b]``."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                   use_cache=False, adapter_names=list(names)).logits
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.log_softmax(logits[:, :-1].to(acc), -1).gather(-1, ids[:, 1:, None])[..., 0]


def _mean_nll_rows(lp, keep, what: str) -> torch.Tensor:
    """[B] mean NLL over each row's kept targets; ValueError for a row with none."""
    n = keep.sum(1)
    empty = (n == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{what}: row(s) {empty} have no scored token")
    return -(lp * keep).sum(1) / n


# ---- layout of the base adapter ----------------------------------------------------------------

def peft_keys(factors: dict) -> list[tuple[str, str, str]]:
    """``[(peft key, module, "A" | "B")]`` of ``{module: LoRAFactors}`` in peft state-dict key
    order (sorted keys ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``; modules
    of rank 0 have no key): the order of the flattened gradient."""
    keys = []
    for mod, f in factors.items():
        if f.rank == 0:
            continue
        keys.append((f"{_PREFIX}{mod}.lora_A.weight", mod, "A"))
        keys.append((f"{_PREFIX}{mod}.lora_B.weight", mod, "B"))
    return sorted(keys)


def _flat(factors: dict, keys) -> torch.Tensor:
    return torch.cat([getattr(factors[m], w).detach().reshape(-1) for _, m, w in keys])


def _resolve_checkpoint(lib, adapter, ckpt, i, ref):
    """``{module: LoRAFactors}`` of checkpoint ``i`` (an adapter name, a factors dict or a peft
    folder), checked against the base adapter's layout ``ref``."""
    if isinstance(ckpt, str) and ckpt in lib:
        facs = lib.factors(ckpt)
    elif isinstance(ckpt, (str, os.PathLike)):
        if not os.path.isdir(ckpt):
            raise ValueError(f"checkpoints[{i}] = {ckpt!r} is neither an adapter of the library "
                             f"({[n for n in lib.names if n is not None]}) nor a peft folder")
        facs = AdapterLibrary.from_peft({"ckpt": os.fspath(ckpt)}).factors("ckpt")
    elif isinstance(ckpt, dict):
        facs = ckpt
    else:
        raise TypeError(f"checkpoints[{i}] must be an adapter name, a peft folder or a "
                        f"{{module: LoRAFactors}} dict, got {type(ckpt).__name__}")
    for mod, f in ref.items():
        if f.rank == 0:
            continue
        g = facs.get(mod)
        if (g is None or tuple(g.A.shape) != tuple(f.A.shape)
                or tuple(g.B.shape) != tuple(f.B.shape) or float(g.scale) != float(f.scale)):
            raise ValueError(f"checkpoints[{i}] does not match adapter {adapter!r} at module "
                             f"{mod!r}: a checkpoint is a state of the base adapter (same "
                             "modules, ranks and scales)")
    extra = sorted(m for m, g in facs.items() if g.rank > 0 and (m not in ref or ref[m].rank == 0))
    if extra:
        raise ValueError(f"checkpoints[{i}] has modules adapter {adapter!r} does not target: "
                         f"{extra[:3]}")
    return facs


# ---- Adam form (eq. 5) ------------------------------------------------------------------------

def adam_state(optimizer: torch.optim.Optimizer, lib: AdapterLibrary, adapter: str) -> dict:
    """A snapshot of ``optimizer``'s Adam / AdamW state for adapter ``adapter``'s parameters
    (``lib.parameters([adapter])``, which the optimizer must hold), in the form
    :func:`gradient_features` takes: ``{"exp_avg": {peft key: tensor}, "exp_avg_sq": {...},
    "step": int, "betas": (b1, b2), "eps": float}`` (tensors cloned)."""
    named = dict(lib.named_parameters([adapter]))
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    m, v, steps, hyper = {}, {}, set(), set()
    for name, p in named.items():
        mod, which = name.rsplit(".lora_", 1)[0], name.rsplit(".lora_", 1)[1][0]
        key = f"{_PREFIX}{mod}.lora_{which}.weight"
        st = optimizer.state.get(p)
        if id(p) not in groups or not st or "exp_avg" not in st:
            raise ValueError(f"optimizer has no Adam state for {name!r}: build it over "
                             f"lib.parameters([{adapter!r}]) and take at least one step")
        g = groups[id(p)]
        m[key] = st["exp_avg"].detach().clone()
        v[key] = st["exp_avg_sq"].detach().clone()
        steps.add(int(st["step"]))
        hyper.add((tuple(g["betas"]), float(g["eps"])))
    if len(steps) != 1 or len(hyper) != 1:
        raise ValueError(f"adapter {adapter!r}'s parameters have different Adam steps {steps} or "
                         f"(betas, eps) {hyper}")
    (betas, eps), = hyper
    return {"exp_avg": m, "exp_avg_sq": v, "step": steps.pop(), "betas": betas, "eps": eps}


def _adam_vectors(state, keys, D, i, dtype, device):
    """(m [D], v [D], step, b1, b2, eps) of ``optimizer_states[i]``."""
    if not isinstance(state, dict) or not {"exp_avg", "exp_avg_sq", "step"} <= set(state):
        raise ValueError(f"optimizer_states[{i}] must be a dict with 'exp_avg', 'exp_avg_sq', "
                         "'step' (and 'betas', 'eps'): see lmf.elrea.adam_state")
    vecs = []
    for which in ("exp_avg", "exp_avg_sq"):
        s = state[which]
        if isinstance(s, dict):
            missing = [k for k, _, _ in keys if k not in s]
            if missing:
                raise ValueError(f"optimizer_states[{i}][{which!r}] lacks key {missing[0]!r}")
            s = torch.cat([s[k].reshape(-1) for k, _, _ in keys])
        if not isinstance(s, torch.Tensor) or s.shape != (D,):
            raise ValueError(f"optimizer_states[{i}][{which!r}] must be a [D] = [{D}] tensor "
                             "(peft key order) or a {peft key: tensor} dict, got "
                             f"{tuple(getattr(s, 'shape', ()))}")
        vecs.append(s.to(device=device, dtype=dtype))
    b1, b2 = state.get("betas", (0.9, 0.999))
    eps = float(state.get("eps", 1e-8))
    step = state["step"]
    if not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"optimizer_states[{i}]['step'] must be an int >= 0, got {step!r}")
    if bool((vecs[1] < 0).any()):
        raise ValueError(f"optimizer_states[{i}]['exp_avg_sq'] has negative entries")
    return vecs[0], vecs[1], int(step), float(b1), float(b2), eps


def _adam_form(g, m, v, step, b1, b2, eps):
    """eq. 5: the direction of an Adam step taken with gradient g [B, D] from state (m, v, step)."""
    t = step + 1
    m1 = (b1 * m + (1 - b1) * g) / (1 - b1 ** t)
    v1 = (b2 * v + (1 - b2) * g * g) / (1 - b2 ** t)
    return m1 / (v1.sqrt() + eps)


# ---- the projection (eq. 6) --------------------------------------------------------------------

def _base_seed(seed: int) -> int:
    h = hashlib.blake2b(f"loramix_fast.elrea.rademacher\0{int(seed)}".encode(), digest_size=4)
    return int.from_bytes(h.digest(), "little")


_SIGNS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(torch.float32) * 2 - 1  # [256, 8]


def _rademacher_block(seed: int, k: int, rows: int, d_proj: int, dtype, device) -> torch.Tensor:
    """Rows ``[k * PROJECTION_BLOCK, k * PROJECTION_BLOCK + rows)`` of R: [rows, d_proj] of +-1.
    Block k is always drawn whole (PROJECTION_BLOCK x d_proj signs, 8 per uniform random byte:
    bit j of byte i is entry 8 i + j, 1 -> +1, 0 -> -1), then cut to ``rows``."""
    g = torch.Generator().manual_seed((_base_seed(seed) + k) % 2 ** 32)
    n = PROJECTION_BLOCK * d_proj
    byte = torch.empty((n + 7) // 8, dtype=torch.uint8).random_(generator=g)
    r = F.embedding(byte.long(), _SIGNS).view(-1)[:n].view(PROJECTION_BLOCK, d_proj)[:rows]
    return r.to(device=device, dtype=dtype)


def _check_proj(d_proj, chunk_rows):
    if not isinstance(d_proj, numbers.Integral) or isinstance(d_proj, bool) or d_proj < 1:
        raise ValueError(f"d_proj must be a positive int or None, got {d_proj!r}")
    if (not isinstance(chunk_rows, numbers.Integral) or isinstance(chunk_rows, bool)
            or chunk_rows < PROJECTION_BLOCK or chunk_rows % PROJECTION_BLOCK):
        raise ValueError(f"chunk_rows must be a positive multiple of PROJECTION_BLOCK = "
                         f"{PROJECTION_BLOCK}, got {chunk_rows!r}")


def rademacher_matrix(D: int, d_proj: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """The whole projection matrix R [D, d_proj] (+-1, unscaled) that :func:`rademacher_project`
    applies without materialising it. For tests and small D only."""
    _check_proj(d_proj, PROJECTION_BLOCK)
    blocks = [_rademacher_block(seed, k, min(PROJECTION_BLOCK, D - k * PROJECTION_BLOCK), d_proj,
                                dtype, "cpu")
              for k in range(math.ceil(D / PROJECTION_BLOCK))]
    return torch.cat(blocks) if blocks else torch.zeros(0, d_proj, dtype=dtype)


def rademacher_project(G: torch.Tensor, d_proj: int, seed: int = 0, *,
                       chunk_rows: int = 16 * PROJECTION_BLOCK) -> torch.Tensor:
    """Random projection of ELREA eq. 6 (a Johnson-Lindenstrauss sketch, as LESS / TRAK do).

    Semantics: out = G @ R / sqrt(d_proj), R [D, d_proj] with entries +-1 (probability 1/2 each),
    R's rows ``[k B, (k + 1) B)`` (B = ``PROJECTION_BLOCK``) drawn from a generator seeded by
    ``(seed, k)``: R depends on (seed, D, d_proj) only (:func:`rademacher_matrix` builds it whole).
    Shapes: G [N, D] float. Returns [N, d_proj] in G's dtype and device.
    ``chunk_rows``: rows of R generated and applied at once (a multiple of ``PROJECTION_BLOCK``;
    memory chunk_rows x d_proj); it changes rounding only, not R.
    """
    _check_proj(d_proj, chunk_rows)
    if not isinstance(G, torch.Tensor) or G.dim() != 2 or not G.is_floating_point():
        raise ValueError(f"G must be a float [N, D] tensor, got "
                         f"{getattr(G, 'dtype', type(G).__name__)} {tuple(getattr(G, 'shape', ()))}")
    N, D = G.shape
    out = torch.zeros(N, d_proj, dtype=G.dtype, device=G.device)
    per = chunk_rows // PROJECTION_BLOCK
    n_blocks = math.ceil(D / PROJECTION_BLOCK)
    for k0 in range(0, n_blocks, per):
        ks = range(k0, min(n_blocks, k0 + per))
        R = torch.cat([_rademacher_block(seed, k, min(PROJECTION_BLOCK, D - k * PROJECTION_BLOCK),
                                         d_proj, G.dtype, G.device) for k in ks])
        lo = k0 * PROJECTION_BLOCK
        out.addmm_(G[:, lo:lo + R.shape[0]], R)
    return out / math.sqrt(d_proj)


# ---- gradient features (eqs. 2, 5-7) ------------------------------------------------------------

def _check_patched(model, lib) -> None:
    from .patching import _state, is_patched

    if not is_patched(model) or _state(model).lib is not lib:
        raise ValueError("model must be patched with lib (lmf.patch(model, lib)): the adapter "
                         "copies that carry the per-example gradients are added to lib")


def gradient_features(model, lib: AdapterLibrary, adapter: str, batches: Iterable, *,
                      d_proj: int | None = None, seed: int = 0, checkpoints: Sequence | None = None,
                      optimizer_states: Sequence | None = None, normalize: bool | None = None,
                      chunk_rows: int = 16 * PROJECTION_BLOCK, project_rows: int = 64
                      ) -> torch.Tensor:
    """ELREA's per-example gradient features of the instruction tokens (eqs. 2, 5-7).

    Semantics, per example i (a row of a batch) and checkpoint c (a state of the base adapter):
        NLL_i(theta) = mean over the targets t with instruction_mask[i, t] (and attention on t
                       and t - 1) of -log p_theta(x[i, t] | x[i, :t])     (eq. 2: the user turn)
        g_i^c = grad_theta NLL_i at theta = checkpoint c, flattened in peft key order [D]
        h_i^c = G_c(g_i^c)   (eq. 5 Adam form with ``optimizer_states[c]``; else g itself)
        f_i   = mean_c R^T h_i^c / sqrt(d_proj)   (eq. 6; no projection with d_proj=None)
        f_i  /= ||f_i||_2   when ``normalize`` (eq. 7)
    Args:
        model: a model patched with ``lib`` (``lmf.patch(model, lib)``); its own parameters get
            no gradient (``torch.autograd.grad`` on the adapter copies only).
        lib: the library; ``adapter``: the base adapter's name (its modules, ranks and scales give
            theta's layout; D = its LoRA parameter count).
        batches: dicts with ``input_ids`` [B, L], ``attention_mask`` [B, L] (left or right
            padding; default all ones) and ``instruction_mask`` [B, L] (1 on the instruction's
            tokens: token t counts as a target; default every attended token but the first).
            Each row needs at least one scored token.
        d_proj: projection dimension; None returns the gradients unprojected [N, D].
        seed: the projection's seed (the same seed gives the same R: use one for train and test).
        checkpoints: states of the base adapter to average over (adapter names of ``lib``,
            ``{module: LoRAFactors}`` dicts or peft folders); None: ``adapter`` as it is.
        optimizer_states: None, or one Adam state per checkpoint (:func:`adam_state`'s form;
            ``exp_avg`` / ``exp_avg_sq`` as [D] tensors in peft key order or {peft key: tensor}).
        normalize: L2-normalise each feature; None (default): only when projecting (so
            ``d_proj=None`` returns the raw gradient, averaged over the checkpoints).
        chunk_rows / project_rows: memory knobs (rows of R per chunk, examples per projection
            pass); they do not change the result beyond rounding.
    Returns: [N, D] or [N, d_proj], N = rows of all batches in order; float32 (float64 for a
    float64 adapter). Every row of a batch runs on its own temporary copy of the base adapter
    (added to ``lib`` and removed before returning), so one backward gives every row's gradient.
    """
    if adapter == BASE or adapter not in lib:
        raise KeyError(f"adapter must be an adapter of the library (not {BASE!r}), got "
                       f"{adapter!r}; the library has {[n for n in lib.names if n is not None]}")
    _check_patched(model, lib)
    if d_proj is not None:
        _check_proj(d_proj, chunk_rows)
    if not isinstance(project_rows, numbers.Integral) or project_rows < 1:
        raise ValueError(f"project_rows must be a positive int, got {project_rows!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty")
    parts = [_parts(b, i) for i, b in enumerate(batches)]
    ref = lib.factors(adapter)
    keys = peft_keys(ref)
    if not keys:
        raise ValueError(f"adapter {adapter!r} has no factor of rank >= 1")
    ckpts = [adapter] if checkpoints is None else list(checkpoints)
    if not ckpts:
        raise ValueError("checkpoints is empty (None: the base adapter as it is)")
    states = [None] * len(ckpts) if optimizer_states is None else list(optimizer_states)
    if len(states) != len(ckpts):
        raise ValueError(f"optimizer_states has {len(states)} entries for {len(ckpts)} "
                         "checkpoints (one per checkpoint)")
    facs = [_resolve_checkpoint(lib, adapter, c, i, ref) for i, c in enumerate(ckpts)]
    f0 = ref[keys[0][1]].A
    dtype = torch.float64 if f0.dtype == torch.float64 else torch.float32
    dev = f0.device
    D = sum(getattr(ref[m], w).numel() for _, m, w in keys)
    flat_ck = [_flat(f, keys).to(device=dev, dtype=dtype) for f in facs]
    adam = [None if s is None else _adam_vectors(s, keys, D, i, dtype, dev)
            for i, s in enumerate(states)]
    if normalize is None:
        normalize = d_proj is not None

    Bmax = max(p[0].shape[0] for p in parts)
    copies = [f"__elrea_grad_{i}" for i in range(Bmax)]
    taken = [c for c in copies if c in lib]
    if taken:
        raise ValueError(f"the library already holds adapter {taken[0]!r} (a name reserved for "
                         "gradient_features' temporary copies)")
    leaves = []
    out, buf = [], []

    def flush():
        if not buf:
            return
        G = torch.cat(buf)
        buf.clear()
        out.append(G if d_proj is None else rademacher_project(G, d_proj, seed,
                                                               chunk_rows=chunk_rows))

    try:
        for c in copies:  # trainable copies: leaves that require grad (filled per checkpoint)
            fs = {m: LoRAFactors(f.A.detach().clone().requires_grad_(True),
                                 f.B.detach().clone().requires_grad_(True), f.scale)
                  for m, f in ref.items() if f.rank > 0}
            lib.add(c, fs)
            leaves.append(fs)
        order = [(b, m, w) for b in range(Bmax) for _, m, w in keys]
        for i, (ids, mask, _, im) in enumerate(parts):
            B = ids.shape[0]
            keep = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)
            if im is not None:
                keep = keep & (im[:, 1:] > 0)
            acc = torch.zeros(B, D, dtype=dtype, device=dev)
            for c, flat in enumerate(flat_ck):
                with torch.no_grad():
                    for b in range(B):
                        o = 0
                        for _, m, w in keys:
                            t = getattr(leaves[b][m], w)
                            t.copy_(flat[o:o + t.numel()].view_as(t))
                            o += t.numel()
                with torch.enable_grad():
                    lp = _token_lp(model, ids, mask, copies[:B])
                    nll = _mean_nll_rows(lp, keep.to(lp.dtype), f"batches[{i}]")
                    ts = [getattr(leaves[b][m], w) for b, m, w in order[:B * len(keys)]]
                    grads = torch.autograd.grad(nll.sum(), ts, allow_unused=True)
                if any(gr is None for gr in grads):
                    raise RuntimeError(
                        f"batches[{i}]: no gradient reached the copies of adapter {adapter!r}: "
                        "the model must be patched with this library (lmf.patch(model, lib)), "
                        "and a library with max_resident cannot train")
                g = torch.cat([gr.reshape(-1) for gr in grads]).view(B, D).to(dtype)
                if adam[c] is not None:
                    g = _adam_form(g, *adam[c])
                acc += g
            buf.append(acc / len(flat_ck))
            if sum(x.shape[0] for x in buf) >= project_rows:
                flush()
        flush()
    finally:
        for c in copies:
            if c in lib:
                lib.remove(c)
    feats = torch.cat(out)
    if normalize:
        feats = F.normalize(feats, dim=1)
    return feats


# ---- clustering (BIRCH with rebalancing; eq. 8 centroids) ---------------------------------------

def _birch(X, threshold, branching_factor, n_clusters):
    try:
        from sklearn.cluster import Birch
    except ImportError as e:
        raise ImportError("ELREA's clustering needs scikit-learn: pip install "
                          "loramix_fast[elrea]") from e
    import warnings

    with warnings.catch_warnings():  # fewer subclusters than n_clusters: fewer clusters, fine
        warnings.simplefilter("ignore")
        return Birch(threshold=threshold, branching_factor=branching_factor,
                     n_clusters=n_clusters).fit_predict(X)


def birch_clusters(features: torch.Tensor, *, n_clusters: int | None = None,
                   threshold: float = 0.5, branching_factor: int = 50, max_ratio: float = 5.0,
                   rounds: int = 3, split: int = 2, return_history: bool = False):
    """BIRCH clustering of (normalised) features with ELREA's rebalancing.

    Semantics: labels = sklearn Birch(threshold, branching_factor, n_clusters) on ``features``;
    then up to ``rounds`` times: every cluster with more than ``max_ratio`` x the members of the
    smallest cluster is re-clustered on its own (Birch with ``n_clusters=split``, same threshold)
    and replaced by its parts; stop early when no cluster is too large or no split succeeds.
    Labels are renumbered 0..C-1 in order of first occurrence.
    Shapes: features [N, d]. Returns labels LongTensor [N] (with ``return_history``, also the
    list of cluster sizes after the initial clustering and after each round run).
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] < 1:
        raise ValueError(f"features must be an [N, d] tensor with N >= 1, got "
                         f"{tuple(getattr(features, 'shape', ()))}")
    if not isinstance(rounds, numbers.Integral) or rounds < 0:
        raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
    if not (isinstance(max_ratio, numbers.Real) and max_ratio >= 1):
        raise ValueError(f"max_ratio must be a number >= 1, got {max_ratio!r}")
    if not isinstance(split, numbers.Integral) or split < 2:
        raise ValueError(f"split must be an int >= 2, got {split!r}")
    X = features.detach().double().cpu().numpy()
    N = X.shape[0]
    if N == 1:
        labels = [0]
    else:
        labels = [int(v) for v in _birch(X, threshold, branching_factor,
                                         None if n_clusters is None else min(n_clusters, N))]

    def sizes(lab):
        out = {}
        for v in lab:
            out[v] = out.get(v, 0) + 1
        return out

    history = [sorted(sizes(labels).values(), reverse=True)]
    for _ in range(rounds):
        sz = sizes(labels)
        small = min(sz.values())
        big = [c for c, n in sz.items() if n > max_ratio * small]
        if not big:
            break
        nxt = max(sz) + 1
        changed = False
        for c in big:
            rows = [i for i, v in enumerate(labels) if v == c]
            sub = _birch(X[rows], threshold, branching_factor, split)
            if len(set(sub.tolist())) < 2:
                continue
            remap = {}
            for i, s in zip(rows, sub.tolist()):
                if s not in remap:
                    remap[s] = c if not remap else nxt + len(remap) - 1
                labels[i] = remap[s]
            nxt += len(remap) - 1
            changed = True
        history.append(sorted(sizes(labels).values(), reverse=True))
        if not changed:
            break
    first = {}
    for v in labels:
        first.setdefault(v, len(first))
    out = torch.tensor([first[v] for v in labels], dtype=torch.long)
    return (out, history) if return_history else out


def cluster_centroids(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """eq. 8: mu_c = mean of ``features`` [N, d] (the UNnormalised ones) over the rows with
    ``labels`` [N] == c. Returns [C, d], C = labels.max() + 1 (every cluster non-empty)."""
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be [N] = [{features.shape[0]}], got {tuple(labels.shape)}")
    C = int(labels.max()) + 1
    cnt = torch.bincount(labels, minlength=C)
    if bool((cnt == 0).any()):
        raise ValueError(f"cluster(s) {(cnt == 0).nonzero().flatten().tolist()} have no member")
    mu = torch.zeros(C, features.shape[1], dtype=features.dtype, device=features.device)
    mu.index_add_(0, labels.to(features.device), features)
    return mu / cnt.to(mu)[:, None]


# ---- cluster experts (all clusters in one mixed batch) --------------------------------------------

def _rows(parts):
    """Every example as (ids [n], labels [n] or None) with its padding dropped."""
    out = []
    for ids, mask, lab, _ in parts:
        for b in range(ids.shape[0]):
            k = mask[b] > 0
            out.append((ids[b][k], None if lab is None else lab[b][k]))
    return out


def _collate(rows, pad: int = 0):
    L = max(r[0].shape[0] for r in rows)
    B = len(rows)
    dev = rows[0][0].device
    ids = torch.full((B, L), pad, dtype=torch.long, device=dev)
    mask = torch.zeros(B, L, dtype=torch.long, device=dev)
    lab = torch.full((B, L), -100, dtype=torch.long, device=dev)
    for i, (x, y) in enumerate(rows):
        n = x.shape[0]
        ids[i, :n] = x
        mask[i, :n] = 1
        lab[i, :n] = x if y is None else y
    return ids, mask, lab


def train_cluster_experts(model, lib: AdapterLibrary, base: str, batches: Iterable,
                          labels: torch.Tensor, *, names: Sequence[str] | None = None,
                          steps: int = 20, lr: float = 1e-3, rows_per_cluster: int = 4,
                          seed: int = 0, save_dir=None) -> list[str]:
    """Train one expert per cluster, each initialised from the base adapter, all in one mixed batch
    per step (row b on its cluster's adapter: the library's multi-tenant training path).

    Semantics: adapter c starts as a copy of ``base`` (same factors, scales); every step takes
    ``rows_per_cluster`` examples of every cluster c (cycling through a seeded shuffle of its
    members), runs them in one batch on their clusters' adapters and steps Adam(lr) on
    ``sum_c mean NLL_c`` (NLL_c: the mean over cluster c's target tokens, ``labels`` != -100 of the
    batches, every token when a batch has no labels), so each adapter gets the gradient of its own
    cluster's loss.
    Args:
        model: patched with ``lib``. batches: the training data, dicts as for
            :func:`gradient_features` (``labels`` = the training targets). labels: [N] cluster of
            each example (rows of ``batches`` in order), 0..C-1.
        names: the C new adapters' names (default ``f"{base}_c{c}"``); they must be free.
        save_dir: when given, each expert is also written as a peft folder ``save_dir/<name>``.
    Returns the names; the adapters are added to ``lib`` and frozen (no ``requires_grad``).
    """
    parts = [_parts(b, i) for i, b in enumerate(list(batches))]
    rows = _rows(parts)
    if labels.shape != (len(rows),):
        raise ValueError(f"labels must be [N] = [{len(rows)}] (one per example), got "
                         f"{tuple(labels.shape)}")
    C = int(labels.max()) + 1
    names = [f"{base}_c{c}" for c in range(C)] if names is None else list(names)
    if len(names) != C:
        raise ValueError(f"names has {len(names)} entries for {C} clusters")
    for n in names:
        if n in lib or n == BASE:
            raise ValueError(f"names: adapter {n!r} is already in the library")
    for s, what in ((steps, "steps"), (rows_per_cluster, "rows_per_cluster")):
        if not isinstance(s, numbers.Integral) or s < 0 or (what != "steps" and s < 1):
            raise ValueError(f"{what} must be a positive int, got {s!r}")
    g = torch.Generator().manual_seed(int(seed))
    members = []
    for c in range(C):
        m = (labels == c).nonzero().flatten()
        if m.numel() == 0:
            raise ValueError(f"cluster {c} has no member")
        members.append(m[torch.randperm(m.numel(), generator=g)].tolist())
    ref = lib.factors(base)
    for n in names:
        lib.add(n, {m: LoRAFactors(f.A.detach().clone(), f.B.detach().clone(), f.scale)
                    for m, f in ref.items()})
    try:
        opt = torch.optim.Adam(lib.parameters(names), lr=lr)
        pos = [0] * C
        for _ in range(steps):
            pick, who = [], []
            for c in range(C):
                for _ in range(rows_per_cluster):
                    pick.append(rows[members[c][pos[c] % len(members[c])]])
                    who.append(c)
                    pos[c] += 1
            ids, mask, lab = _collate(pick)
            keep = ((mask[:, 1:] > 0) & (mask[:, :-1] > 0) & (lab[:, 1:] != -100))
            opt.zero_grad()
            lp = _token_lp(model, ids, mask, [names[c] for c in who])
            who_t = torch.tensor(who, device=lp.device)
            loss = 0.0
            for c in range(C):
                k = keep[who_t == c].to(lp.dtype)
                n = k.sum()
                if float(n) == 0:
                    raise ValueError(f"cluster {c}'s rows hold no target token")
                loss = loss - (lp[who_t == c] * k).sum() / n
            loss.backward()
            opt.step()
    except BaseException:
        for n in names:
            lib.remove(n)
        raise
    lib.freeze(names)
    if save_dir is not None:
        for n in names:
            lib.save_peft(n, os.path.join(os.fspath(save_dir), n))
    return names


# ---- MoE routing baseline (eq. 11) ----------------------------------------------------------------

class SequenceMixRouter:
    """A patched model's router that adds, in every module, a fixed per-sequence output-space mix
    of adapters: ``y[b, t] = W x[b, t] + sum_e w[b, e] scale_e B_e A_e x[b, t]`` (ELREA's MoE
    routing baseline, eq. 11: the ensemble's weights applied at layer level), one fused op with
    E slots per token. ``names``: E adapters of ``lib``; ``weights`` [B, E] (or [E] for every
    sequence alike). Inputs must be [B, L, K] with the batch of the weights (``generate`` keeps it:
    decode steps are [B, 1, K]). Install with ``lmf.set_router(model, router)`` or
    :meth:`ELREA.routed`."""

    def __init__(self, lib: AdapterLibrary, names: Sequence[str], weights):
        names = list(names)
        for n in names:
            if n == BASE or n not in lib:
                raise KeyError(f"names: {n!r} is not an adapter of the library")
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.dim() == 1:
            w = w[None]
        if w.dim() != 2 or w.shape[1] != len(names) or not bool(torch.isfinite(w).all()):
            raise ValueError(f"weights must be finite, [B, {len(names)}] or [{len(names)}], got "
                             f"{tuple(w.shape)}")
        self.lib, self.names, self.weights = lib, names, w

    def __repr__(self):
        return f"SequenceMixRouter({self.names}, weights {tuple(self.weights.shape)})"

    def forward(self, module, x):
        stack = module.stack()
        if stack is None:
            return module.base_layer(x)
        Bw, E = self.weights.shape
        if x.dim() != 3 or (x.shape[0] != Bw and Bw != 1):
            raise ValueError(f"{module.lmf_name}: SequenceMixRouter has weights for {Bw} "
                             f"sequences but the layer got input {tuple(x.shape)} ([B, L, K] "
                             "expected)")
        B, L = x.shape[0], x.shape[1]
        ids = torch.tensor([self.lib.id_of(n) for n in self.names], dtype=torch.int32,
                           device=x.device)
        idx = stack.slots_of(ids)[None].expand(B * L, E).contiguous()
        w = self.weights.to(x.device).expand(B, E).repeat_interleave(L, 0).contiguous()
        return module.apply_adapters(x, stack, idx, w)


# ---- the pipeline ------------------------------------------------------------------------------

class ELREA:
    """The ELREA pipeline on a patched model: gradient features of the instructions, BIRCH
    clusters, one expert per cluster trained from the base adapter, and the weighted logit-level
    ensemble of the cluster experts plus the base adapter at inference (see the module docstring
    for the equations).

    Args:
        model: patched with ``lib``. lib: the library. base: the base adapter's name (an adapter
            trained on all the data, e.g. a few steps; a named adapter, never ``"__base__"``).
        d_proj, seed, checkpoints, optimizer_states: as :func:`gradient_features` (the same are
            used for the training and the test instructions). d_proj=None: unprojected.
        n_clusters, threshold, branching_factor, max_ratio, rounds: as :func:`birch_clusters`.
        prefix: the cluster experts are named ``f"{prefix}{c}"``.
    After :meth:`fit`: ``labels`` [N], ``centroids`` [C, d] (unnormalised, eq. 8), ``cluster_names``
    [C], ``experts`` = [base, *cluster_names] (the ensemble's order; weights column 0 is base).
    """

    def __init__(self, model, lib: AdapterLibrary, base: str, *, d_proj: int | None = 1024,
                 seed: int = 0, checkpoints=None, optimizer_states=None,
                 n_clusters: int | None = None, threshold: float = 0.5,
                 branching_factor: int = 50, max_ratio: float = 5.0, rounds: int = 3,
                 prefix: str | None = None, chunk_rows: int = 16 * PROJECTION_BLOCK):
        if base == BASE or base not in lib:
            raise KeyError(f"base must be a named adapter of the library (ELREA's base adapter, "
                           f"not {BASE!r}), got {base!r}")
        self.model, self.lib, self.base = model, lib, base
        self.d_proj, self.seed, self.chunk_rows = d_proj, seed, chunk_rows
        self.checkpoints, self.optimizer_states = checkpoints, optimizer_states
        self.cluster_kw = dict(n_clusters=n_clusters, threshold=threshold,
                               branching_factor=branching_factor, max_ratio=max_ratio,
                               rounds=rounds)
        self.prefix = f"{base}_c" if prefix is None else prefix
        self.labels = self.centroids = self.history = None
        self.cluster_names: list[str] = []

    @property
    def experts(self) -> list[str]:
        """[base, *cluster experts]: the order of the weights' columns."""
        if not self.cluster_names:
            raise RuntimeError("ELREA.fit has not run yet")
        return [self.base, *self.cluster_names]

    def features(self, batches, normalize: bool = False) -> torch.Tensor:
        """Gradient features [N, d] of ``batches``' instructions (eqs. 2, 5-7), unnormalised by
        default (the centroids' and the cosine's input)."""
        return gradient_features(self.model, self.lib, self.base, batches, d_proj=self.d_proj,
                                 seed=self.seed, checkpoints=self.checkpoints,
                                 optimizer_states=self.optimizer_states, normalize=normalize,
                                 chunk_rows=self.chunk_rows)

    def fit(self, batches, *, steps: int = 20, lr: float = 1e-3, rows_per_cluster: int = 4,
            save_dir=None, train_seed: int = 0) -> "ELREA":
        """Features of every training example, BIRCH clusters (with rebalancing) of the normalised
        features, centroids of the unnormalised ones, then the cluster experts
        (:func:`train_cluster_experts`: ``steps`` Adam steps, all clusters in one mixed batch).
        ``batches``: dicts with ``input_ids``, ``attention_mask``, ``instruction_mask`` (the
        features' tokens) and ``labels`` (the experts' training targets). Returns self."""
        if self.cluster_names:
            raise RuntimeError("ELREA.fit has already run (make a new ELREA to refit)")
        batches = list(batches)
        feats = self.features(batches)
        self.labels, self.history = birch_clusters(F.normalize(feats, dim=1), return_history=True,
                                                   **self.cluster_kw)
        self.centroids = cluster_centroids(feats, self.labels)
        C = self.centroids.shape[0]
        self.cluster_names = train_cluster_experts(
            self.model, self.lib, self.base, batches, self.labels,
            names=[f"{self.prefix}{c}" for c in range(C)], steps=steps, lr=lr,
            rows_per_cluster=rows_per_cluster, seed=train_seed, save_dir=save_dir)
        return self

    def similarities(self, batches) -> torch.Tensor:
        """cos(f_test, mu_c) [N, C] of ``batches``' instructions to the centroids."""
        if self.centroids is None:
            raise RuntimeError("ELREA.fit has not run yet")
        f = self.features(batches)
        return F.normalize(f, dim=1) @ F.normalize(self.centroids.to(f), dim=1).T

    def weights(self, batches) -> torch.Tensor:
        """eq. 9: [N, 1 + C] float32, column 0 the base adapter (1 - max cos), then the clusters
        (softmax of the standardised cosines); the order of :attr:`experts`."""
        return elrea_weights(self.similarities(batches))

    def generate(self, input_ids, *, weights, attention_mask=None, **kwargs) -> torch.LongTensor:
        """eq. 10: ``ensemble_generate(model, input_ids, experts, weights, mode="logits")`` over
        the base adapter and the cluster experts (``weights`` [B, 1 + C] from :meth:`weights`);
        ``kwargs`` go to :func:`loramix_fast.ensemble_generate`."""
        return ensemble_generate(self.model, input_ids, self.experts, weights=weights,
                                 mode="logits", attention_mask=attention_mask, **kwargs)

    def logprobs(self, input_ids, *, weights, attention_mask=None) -> torch.Tensor:
        """The ensemble's teacher-forced next-token log-probabilities [B, L-1] (eq. 10 scored:
        :func:`loramix_fast.ensemble_logprobs` with ``mode="logits"``)."""
        return ensemble_logprobs(self.model, input_ids, self.experts, weights, mode="logits",
                                 attention_mask=attention_mask)

    @contextlib.contextmanager
    def routed(self, weights):
        """MoE routing baseline (eq. 11): inside the block, forwards and ``generate`` of the model
        (without ``adapter_names``) mix the same adapters with the same per-sequence weights
        [B, 1 + C] in output space in every module (:class:`SequenceMixRouter`). The previous
        router is put back on exit."""
        from .patching import _state

        st = _state(self.model)
        old = st.router
        set_router(self.model, SequenceMixRouter(self.lib, self.experts, weights))
        try:
            yield
        finally:
            set_router(self.model, old)

    @contextlib.contextmanager
    def merged(self, weights, space: str = "factor"):
        """MoE merging baseline: one adapter per sequence b merging the base adapter and the
        cluster experts with weights [B, 1 + C] (``lmf.merge``; ``space="factor"``, default: the
        parameter-space merge A = sum_e w_e A_e, B = sum_e w_e scale_e B_e, as LoRA merging
        baselines do; ``"delta"``: the exact sum_e w_e dW_e, which is the same per-module linear
        map as :meth:`routed`, so it reproduces the routing baseline exactly); yields their B names
        (for ``adapter_names``) and removes them on exit."""
        w = torch.as_tensor(weights, dtype=torch.float64)
        if w.dim() == 1:
            w = w[None]
        if w.dim() != 2 or w.shape[1] != len(self.experts):
            raise ValueError(f"weights must be [B, {len(self.experts)}], got {tuple(w.shape)}")
        names = []
        try:
            for b in range(w.shape[0]):
                names.append(merge(self.lib, self.experts, w[b].tolist(), space=space,
                                   name=f"{self.prefix}merged{b}"))
            yield list(names)
        finally:
            for n in names:
                self.lib.remove(n)
