"""Training adapters on the fused runtime: new adapters (:class:`LoRASpec`,
``AdapterLibrary.create``), peft folders written back (``AdapterLibrary.save_peft``), and HF
gradient checkpointing.

How a library trains (the design, and why)
-------------------------------------------
A frozen adapter lives in the library's slot pool (:mod:`loramix_fast.pool`): one slot per module,
and ``lib.factors(name)`` are views into it. ``lib.parameters(names)`` copies each named adapter's
factors out of its slots once, into its own tensors (one ``A [r, K]`` and one ``B [N, r]`` per
module), makes those leaves with ``requires_grad`` and hands them out, so any torch optimizer takes
them (optimizers refuse non-leaf tensors, which rules out handing out views into the pool, and a
pool that grows reallocates its slots), and weight decay or momentum can only ever touch the
adapters the caller asked for. The kernels still read one zero-padded stack per module:

- with grad enabled, a module whose adapters are trainable assembles its stack in every forward
  from the pool's stack plus the trainable factors (``F.pad`` to the max rank, one
  ``index_copy``): differentiable, so the backward of ``multi_lora_linear`` reaches each
  adapter's own ``A`` / ``B``; the padding is not storage, so it gets no gradient and stays zero.
  Cost per module and step: one copy of the stack in the forward and one stack-sized gradient
  in the backward, sliced back to each adapter (E x R x (K + N) values each, e.g. 0.26 M floats
  for 8 adapters of rank 16 at K = N = 1024, against the 4 x M x K x N flops of a frozen base
  module's forward and input-gradient GEMMs: 8.6 GFLOP at M = 2048);
- with grad disabled (serving, evaluation), the pool's stack is used; a trainable adapter's
  slots are rewritten from its leaves when a leaf changed in place since they were written (each
  tensor's ``_version`` counter, which every in-place update, an optimizer step included,
  increments), so a forward after an optimizer step never sees stale factors. The check costs
  two integer reads per trainable factor of the module, and only adapters handed out by
  ``lib.parameters`` (or added with factors that require grad) are checked: serving a library
  nobody trains costs nothing extra. Updates through ``.data`` bypass version counters:
  ``lib.refresh()``. A trainable adapter is held twice (its leaves and its slots).

The alternative DESIGN.md sketches (factors as views into the padded stack) would need the stack
itself as the optimizer's parameter, so weight decay and momentum would reach the padding and the
frozen adapters; masking that inside every optimizer is not possible from here. What DESIGN.md
asks of the gradients holds either way: ``multi_lora_linear``'s registered backward
(``ops/backward.py``; C++ grouped GEMMs over each adapter's rows on CPU, the torch formulation of
the same grouped GEMMs elsewhere) saves x and the shrink output h [M, S, R], never M x N x R, and
only the stack assembly above sits between it and each adapter's leaves.

Gradient checkpointing: HF recomputes each checkpointed layer during the backward, after the
forward's adapter selection (a contextvar) is gone. A patched model wraps each layer's
``_gradient_checkpointing_func`` so the layer runs, in the forward and in its recompute, inside a
copy of the forward's context (:func:`keep_context_in_checkpoints`, called by the patched
model's forward pre-hook in train mode with grad enabled).
"""
from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import AdapterError, LoRAFactors, _pattern_value

__all__ = ["LoRASpec", "create_factors", "peft_config", "write_peft", "keep_context_in_checkpoints"]

_PREFIX = "base_model.model."


@dataclass
class LoRASpec:
    """A new LoRA adapter, as peft's ``LoraConfig`` describes one (same names where they exist).

    Args:
        r: rank (positive int).
        alpha: ``lora_alpha``; scale = alpha / r (alpha / sqrt(r) with ``use_rslora``). peft's
            default, 8.
        target_modules: as peft takes them: a list of module names, each matching a module whose
            path equals it or ends with ``"." + name``; a string, a regex that must match the
            whole module path (``re.fullmatch``); ``"all-linear"``: every Linear / Conv1D but the
            LM head; None: peft's default for the model type (``q_proj``, ``v_proj`` for Llama).
        use_rslora: rank-stabilised scale alpha / sqrt(r).
        init_lora_weights: peft's initialisation: True (A Kaiming-uniform with a = sqrt(5), like
            ``nn.Linear``, B zero: the model is unchanged), ``"gaussian"`` (A ~ N(0, 1/r^2), B zero)
            or False (A and B both ``nn.Linear``'s default init: a random, non-zero delta).
        rank_pattern, alpha_pattern: per-module rank / alpha, peft's ``{regex: value}`` (first key
            with ``re.match(rf"(.*\\.)?({key})$", path)`` wins).
        dropout: ``lora_dropout``; only 0 (the fused op has no dropout).
    """

    r: int = 8
    alpha: float = 8
    target_modules: list | str | None = None
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.r, numbers.Integral) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"LoRASpec: r must be a positive integer, got {self.r!r}")
        if (not isinstance(self.alpha, numbers.Real) or isinstance(self.alpha, bool)
                or not math.isfinite(self.alpha)):
            raise ValueError(f"LoRASpec: alpha must be a finite number, got {self.alpha!r}")
        t = self.target_modules
        if isinstance(t, str):
            if t.lower() != "all-linear":
                try:
                    re.compile(t)
                except re.error as e:
                    raise ValueError(f"LoRASpec: target_modules {t!r} is not a valid regular "
                                     f"expression ({e})") from None
        elif t is not None:
            if (not isinstance(t, (list, tuple, set, frozenset)) or not t
                    or not all(isinstance(s, str) and s for s in t)):
                raise ValueError("LoRASpec: target_modules must be a non-empty list of module "
                                 f"names, a regex string, 'all-linear' or None, got {t!r}")
            self.target_modules = sorted(t) if isinstance(t, (set, frozenset)) else list(t)
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower() == "gaussian":
            self.init_lora_weights = init = "gaussian"
        if not (isinstance(init, bool) or init == "gaussian"):
            raise ValueError(f"LoRASpec: init_lora_weights={self.init_lora_weights!r} is not "
                             "supported (True, False or 'gaussian'; peft's data-dependent inits "
                             "such as 'pissa' or 'loftq' are not)")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoRASpec: use_rslora must be a bool, got {self.use_rslora!r}")
        for key in ("rank_pattern", "alpha_pattern"):
            pats = getattr(self, key)
            if pats is None:
                setattr(self, key, {})
                continue
            if not isinstance(pats, dict):
                raise ValueError(f"LoRASpec: {key} must be a dict {{regex: value}}, got {pats!r}")
            for k, v in pats.items():
                try:
                    re.compile(rf"(.*\.)?({k})$")
                except (re.error, TypeError) as e:
                    raise ValueError(f"LoRASpec: {key} key {k!r} is not a valid regular "
                                     f"expression ({e})") from None
                if key == "rank_pattern":
                    ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
                else:
                    ok = (isinstance(v, numbers.Real) and not isinstance(v, bool)
                          and math.isfinite(v))
                if not ok:
                    want = ("a positive integer" if key == "rank_pattern"
                            else "a finite number")
                    raise ValueError(f"LoRASpec: {key}[{k!r}] must be {want}, got {v!r}")
        if not isinstance(self.dropout, numbers.Real) or self.dropout != 0:
            raise ValueError(f"LoRASpec: dropout={self.dropout!r} is not supported: the fused "
                             "multi-LoRA op has no dropout on the adapter input (use 0)")


def _linear_kind(m: nn.Module):
    """(kind, in, out, weight) of a Linear-like module we can patch, else None."""
    from .modules import MultiLoRALinear

    if isinstance(m, MultiLoRALinear):
        return m.lmf_kind, m.in_features, m.out_features, m.weight
    if isinstance(m, nn.Linear):
        return "linear", m.in_features, m.out_features, m.weight
    if type(m).__name__ == "Conv1D" and hasattr(m, "nf") and m.weight.dim() == 2:
        return "conv1d", m.weight.shape[0], m.weight.shape[1], m.weight
    return None


def _default_targets(model):
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAP

    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in MAP:
        raise AdapterError(f"LoRASpec.target_modules=None: peft has no default target modules for "
                           f"model type {mtype!r}; pass target_modules")
    return list(MAP[mtype])


def _targets(model, name: str, spec: LoRASpec) -> list:
    """``[(path, kind, in, out, weight)]`` of the modules ``spec`` targets, as peft matches them
    (``check_target_module_exists``); AdapterError for no match or a module we cannot patch."""
    from .modules import MultiLoRALinear

    t = spec.target_modules
    if t is None:
        t = _default_targets(model)
    all_linear = isinstance(t, str) and t.lower() == "all-linear"
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = []  # patched modules: their base_layer is not a module of the base model
    found = []
    for path, m in model.named_modules():
        if not path or any(path.startswith(p) for p in inside):
            continue
        if isinstance(m, MultiLoRALinear):
            inside.append(path + ".")
        info = _linear_kind(m)
        if all_linear:
            hit = info is not None and m is not out_emb
        elif isinstance(t, str):
            hit = re.fullmatch(t, path) is not None
        else:
            hit = path in t or any(path.endswith("." + s) for s in t)
        if not hit:
            continue
        if out_emb is not None and m is out_emb:
            raise AdapterError(f"adapter {name!r}: target_modules {t!r} match the LM head "
                               f"{path!r}; LM-head targets are not supported yet")
        if info is None:
            what = ("an embedding" if isinstance(m, nn.Embedding)
                    else f"a {type(m).__name__}, not nn.Linear / transformers Conv1D")
            raise AdapterError(f"adapter {name!r}: target_modules {t!r} match module {path!r}, "
                               f"{what}; loramix_fast can only train LoRA on Linear-like modules")
        found.append((path, *info))
    if not found:
        raise AdapterError(f"adapter {name!r}: target_modules {t!r} match no module of "
                           f"{type(model).__name__} (peft matches a list entry against the end of "
                           "a module path, a string as a regex on the whole path)")
    return found


def _seed_for(seed: int, name: str) -> int:
    # per adapter, independent of the other adapters in the call and of their order; 32 bits
    # (torch's CPU generator, an mt19937, keeps only the low 32 bits of its seed)
    h = hashlib.blake2b(f"{int(seed)}\0{name}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little")


def create_factors(model, name: str, spec: LoRASpec, seed: int = 0):
    """``({path: LoRAFactors}, peft config dict)`` of a new adapter on ``model``, initialised as
    peft initialises it (``LoraLayer.update_layer`` + ``reset_lora_parameters``), drawn on the CPU
    in fp32 from a generator seeded by ``(seed, name)`` (the same numbers on every device), then
    placed on each module's device, in its dtype (fp32 for fp16 / bf16 modules, as peft's
    ``autocast_adapter_dtype`` keeps them)."""
    if not isinstance(spec, LoRASpec):
        raise TypeError(f"adapter {name!r}: expected a lmf.LoRASpec, got {type(spec).__name__} "
                        f"{spec!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    g = torch.Generator().manual_seed(_seed_for(seed, name))
    factors = {}
    conv1d = False
    for path, kind, K, N, weight in _targets(model, name, spec):
        r = _pattern_value(spec.rank_pattern, path, spec.r)
        alpha = _pattern_value(spec.alpha_pattern, path, spec.alpha)
        A = torch.empty(r, K)
        B = torch.empty(N, r)
        if spec.init_lora_weights is False:  # nn.Linear's own init for both (peft keeps it)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
            nn.init.kaiming_uniform_(B, a=math.sqrt(5), generator=g)
        else:
            if spec.init_lora_weights is True:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
            else:  # "gaussian"
                nn.init.normal_(A, std=1 / r, generator=g)
            B.zero_()
        if weight.device.type == "meta":
            raise AdapterError(f"adapter {name!r}: module {path!r} is on the meta device; "
                               "create adapters on a materialised model")
        dt = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        A = A.to(device=weight.device, dtype=dt)
        B = B.to(device=weight.device, dtype=dt)
        scale = alpha / math.sqrt(r) if spec.use_rslora else alpha / r
        factors[path] = LoRAFactors(A, B, float(scale))
        conv1d |= kind == "conv1d"
    cfg = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "target_modules": spec.target_modules,
        "use_rslora": spec.use_rslora,
        "rank_pattern": dict(spec.rank_pattern),
        "alpha_pattern": dict(spec.alpha_pattern),
        "init_lora_weights": spec.init_lora_weights,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "inference_mode": True,
    }
    if cfg["target_modules"] is None:
        cfg["target_modules"] = _default_targets(model)
    return factors, cfg


def peft_config(factors: dict) -> dict:
    """A peft LoraConfig dict that reproduces ``factors`` exactly when nothing else is known
    (factors given to ``lib.add``): the modules' full paths as targets, each module's rank and
    ``alpha = scale * rank`` as patterns."""
    mods = sorted(m for m, f in factors.items() if f.rank > 0)
    if not mods:
        raise AdapterError("the adapter has no factor of rank >= 1; peft cannot hold it")
    r = max(factors[m].rank for m in mods)
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
        "r": r, "lora_alpha": r, "target_modules": mods, "use_rslora": False,
        "rank_pattern": {re.escape(m): factors[m].rank for m in mods},
        "alpha_pattern": {re.escape(m): factors[m].scale * factors[m].rank for m in mods},
        "lora_dropout": 0.0, "bias": "none", "inference_mode": True,
    }


def _jsonable(v):
    if isinstance(v, (set, frozenset)):
        return sorted(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def write_peft(folder, factors: dict, cfg: dict) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's ``save_pretrained``
    layout: keys ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``)."""
    from safetensors.torch import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for mod, f in sorted(factors.items()):
        if f.rank == 0:
            continue
        tensors[f"{_PREFIX}{mod}.lora_A.weight"] = f.A.detach().cpu().contiguous()
        tensors[f"{_PREFIX}{mod}.lora_B.weight"] = f.B.detach().cpu().contiguous()
    if not tensors:
        raise AdapterError("the adapter has no factor of rank >= 1; peft cannot hold it")
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w") as fh:
        json.dump(_jsonable(cfg), fh, indent=2, sort_keys=True)


# ---- gradient checkpointing -------------------------------------------------------------------
class _KeepContext:
    """A layer's gradient-checkpointing function that runs the layer inside a copy of the
    caller's contextvars context, so its recompute in the backward sees the forward's adapter
    selection and routing caches."""

    __slots__ = ("inner",)

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, function, *args, **kwargs):
        ctx = contextvars.copy_context()
        return self.inner(functools.partial(ctx.run, function), *args, **kwargs)

    def __reduce__(self):
        return (_KeepContext, (self.inner,))


def keep_context_in_checkpoints(model: nn.Module) -> None:
    """Wrap every ``_gradient_checkpointing_func`` of ``model``'s layers (HF sets one per layer in
    ``gradient_checkpointing_enable``) in :class:`_KeepContext`, once."""
    for m in model.modules():
        f = m.__dict__.get("_gradient_checkpointing_func")
        if f is not None and not isinstance(f, _KeepContext):
            m._gradient_checkpointing_func = _KeepContext(f)
