"""Adapter library: peft LoRA adapters loaded from ``save_pretrained`` folders, kept in a slot pool.

An :class:`AdapterLibrary` holds named adapters; each adapter is a set of ``(A [r, K], B [N, r],
scale)`` factors keyed by the module path inside the base model (peft's key without the
``base_model.model.`` prefix). Every adapter has an id that never changes while it is in the
library (``lib.id_of(name)``; ``lib.names[i]`` is the adapter with id ``i``, None for a free id).
Per patched module, :meth:`AdapterLibrary.stack` returns what the kernels read (``A [E, R, K]``,
``B [E, N, R]``, ``scale [E]``, ``rank [E]``): views into the module's slot pool, where adapter
``i`` lives in slot ``i``; an adapter that does not target the module (or a free id) has rank 0
there and contributes nothing. Adding an adapter writes it into free slots (O(its size)), removing
one frees them, and the pool is the only copy of a frozen adapter (``lib.factors(name)`` returns
views into it). A forward sees the library as it was when the forward began. With
``AdapterLibrary(max_resident=n)`` at most n adapters are held per device, the rest on the host.
See :mod:`loramix_fast.pool` for the design and its costs. Adding or removing an adapter never
needs a re-patch.

Training: ``AdapterLibrary.create`` makes new adapters (peft's initialisation),
``lib.parameters(names)`` hands out their factors as leaf tensors for an optimizer, and
``lib.save_peft(name, folder)`` writes a peft folder; see :mod:`loramix_fast.training` for how the
stacks follow the trained factors.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import threading
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from . import pool as _pool

__all__ = ["AdapterLibrary", "LoRAFactors", "ModuleStack", "AdapterError", "BASE"]

BASE = "__base__"  # peft's name for "no adapter"
_PREFIX = "base_model.model."
_MISSING = object()


class AdapterError(ValueError):
    """A problem with an adapter: missing/corrupt files, shapes that do not fit, unsupported kinds."""


@dataclass
class LoRAFactors:
    """One adapter on one module: delta(x) = scale * B @ (A @ x). A [r, K], B [N, r]."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class ModuleStack:
    """Stacked factors of every adapter for one module (padded to the rank R of the module's pool).

    A [E, R, K], B [E, N, R], scale [E] float32 (float64 for a float64 stack), rank [E] int32;
    adapter id = position in ``names`` (None: a free slot, rank 0). ``A`` and ``B`` are views into
    the module's slot pool (``pool``), not copies.
    ``cache`` holds derived data (e.g. SpectR alignment) computed once per stack; ``pool.cache``
    holds per-slot data shared by the stacks of every library version (``pool_epoch`` tells
    whether it still describes this stack's tensors).
    ``lut``: with ``max_resident``, the slots are not the ids: ``lut [ids + 1]`` maps an id (-1:
    none) to its slot, see :meth:`slots_of`.
    """

    names: tuple
    A: torch.Tensor
    B: torch.Tensor
    scale: torch.Tensor
    rank: torch.Tensor
    cache: dict = field(default_factory=dict)
    pool: object = None
    pool_epoch: int = -1
    lut: torch.Tensor | None = None

    @property
    def max_rank(self) -> int:
        return self.A.shape[1]

    def slots_of(self, idx: torch.Tensor) -> torch.Tensor:
        """Adapter ids ``idx`` (int, -1 = none) as positions in this stack (the same tensor unless
        the library has ``max_resident``)."""
        if self.lut is None:
            return idx
        return self.lut[idx.long() + 1]


def _pattern_value(patterns: dict, module: str, default):
    """peft's ``get_pattern_key`` + lookup: the first key (in order) with
    ``re.match(rf"(.*\\.)?({key})$", module)`` wins (the group makes ``a|b`` a whole alternation);
    with no match, an entry for the module's full key, else ``default``."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return (patterns or {}).get(module, default)


def _cfg_number(name: str, what: str, v, *, integer: bool = False):
    """A finite real number from an adapter config (``integer``: a positive int), else AdapterError."""
    ok = (isinstance(v, numbers.Integral) if integer else isinstance(v, numbers.Real))
    if not ok or isinstance(v, bool):
        raise AdapterError(f"adapter {name!r}: {what} must be "
                           f"{'a positive integer' if integer else 'a number'}, got {v!r}")
    if not math.isfinite(v) or (integer and v < 1):
        raise AdapterError(f"adapter {name!r}: {what} must be "
                           f"{'a positive integer' if integer else 'finite'}, got {v!r}")
    return v


def _cfg_patterns(name: str, cfg: dict, key: str) -> dict:
    """``alpha_pattern`` / ``rank_pattern`` checked: a JSON object of valid regexes to numbers."""
    pats = cfg.get(key)
    if pats is None:
        return {}
    if not isinstance(pats, dict):
        raise AdapterError(f"adapter {name!r}: {key} must be a JSON object {{pattern: value}}, "
                           f"got {type(pats).__name__} {pats!r}")
    for k, v in pats.items():
        try:
            re.compile(rf"(.*\.)?({k})$")
        except re.error as e:
            raise AdapterError(f"adapter {name!r}: {key} key {k!r} is not a valid regular "
                               f"expression ({e})") from None
        _cfg_number(name, f"{key}[{k!r}]", v, integer=(key == "rank_pattern"))
    return pats


def _read_peft_dir(name: str, path: str) -> dict[str, LoRAFactors]:
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isdir(path):
        raise AdapterError(f"adapter {name!r}: folder {path!r} does not exist")
    if not os.path.isfile(cfg_path):
        raise AdapterError(f"adapter {name!r}: {cfg_path!r} is missing (expected a peft "
                           "save_pretrained folder)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"adapter {name!r}: cannot parse {cfg_path!r}: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter {name!r}: {cfg_path!r} must hold a JSON object (a peft "
                           f"LoraConfig), got a {type(cfg).__name__}")
    ptype = cfg.get("peft_type", "LORA")
    if ptype != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {ptype!r} is not supported (LoRA only)")
    if cfg.get("use_dora"):
        raise AdapterError(f"adapter {name!r}: DoRA adapters (use_dora=True) are not supported yet")
    if cfg.get("alora_invocation_tokens") is not None:
        raise AdapterError(f"adapter {name!r}: aLoRA adapters (alora_invocation_tokens="
                           f"{cfg['alora_invocation_tokens']!r}: the delta applies only from the "
                           "invocation tokens on) are not supported yet")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"adapter {name!r}: modules_to_save={cfg['modules_to_save']} is not "
                           "supported yet (it replaces whole modules, not a low-rank delta)")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise AdapterError(f"adapter {name!r}: LoRA bias (bias={cfg.get('bias')!r}, "
                           f"lora_bias={cfg.get('lora_bias')!r}) is not supported yet")
    st = os.path.join(path, "adapter_model.safetensors")
    binf = os.path.join(path, "adapter_model.bin")
    try:
        if os.path.isfile(st):
            from safetensors.torch import load_file

            sd = load_file(st)
        elif os.path.isfile(binf):
            sd = torch.load(binf, map_location="cpu", weights_only=True)
        else:
            raise AdapterError(f"adapter {name!r}: no adapter_model.safetensors in {path!r}")
    except AdapterError:
        raise
    except Exception as e:  # corrupt file
        raise AdapterError(f"adapter {name!r}: cannot read weights in {path!r}: {e}") from e
    alpha = _cfg_number(name, "lora_alpha", cfg.get("lora_alpha", 8))  # peft's default: 8
    alpha_pattern = _cfg_patterns(name, cfg, "alpha_pattern")
    rank_pattern = _cfg_patterns(name, cfg, "rank_pattern")
    r_cfg = cfg.get("r")
    if r_cfg is not None:
        r_cfg = _cfg_number(name, "r", r_cfg, integer=True)
    rs = bool(cfg.get("use_rslora", False))
    for key in sd:
        if "lora_embedding_" in key:
            mod = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            raise AdapterError(f"adapter {name!r}: module {mod.split('.lora_embedding_')[0]!r} is "
                               "an embedding target, not supported yet")
    out: dict[str, dict] = {}
    for key, t in sd.items():
        k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if ".base_layer." in k:  # peft saves the base weights of embedding / LM-head targets
            continue
        m = re.match(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", k)
        if m is None:
            if ".lora_magnitude_vector" in k:
                raise AdapterError(f"adapter {name!r}: DoRA weights found ({k}); not supported yet")
            raise AdapterError(f"adapter {name!r}: unexpected tensor {key!r} in the weights file "
                               "(only lora_A / lora_B of Linear-like modules are supported)")
        mod, which = m.group(1), m.group(2)
        if t.dim() != 2:
            raise AdapterError(f"adapter {name!r}, module {mod!r}: lora_{which} has shape "
                               f"{tuple(t.shape)}; only Linear / Conv1D targets are supported")
        out.setdefault(mod, {})[which] = t
    factors = {}
    for mod, ab in out.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}, module {mod!r}: lora_A or lora_B is missing")
        A, B = ab["A"], ab["B"]
        r = A.shape[0]
        if B.shape[1] != r:
            raise AdapterError(f"adapter {name!r}, module {mod!r}: lora_A {tuple(A.shape)} and "
                               f"lora_B {tuple(B.shape)} disagree on the rank")
        if r == 0:
            raise AdapterError(f"adapter {name!r}, module {mod!r}: lora_A {tuple(A.shape)} and "
                               f"lora_B {tuple(B.shape)} have rank 0; a LoRA rank must be >= 1")
        r_exp = _pattern_value(rank_pattern, mod, r_cfg)
        if r_exp is not None and r_exp != r:
            src = "rank_pattern" if _pattern_value(rank_pattern, mod, None) is not None else "r"
            raise AdapterError(f"adapter {name!r}, module {mod!r}: the weights have rank {r} but "
                               f"the config's {src} gives rank {r_exp} (peft cannot load it "
                               "either)")
        a = _pattern_value(alpha_pattern, mod, alpha)
        scale = a / math.sqrt(r) if rs else a / r
        factors[mod] = LoRAFactors(A.contiguous(), B.contiguous(), float(scale))
    if not factors:
        raise AdapterError(f"adapter {name!r}: no LoRA weights found in {path!r}")
    return factors


def _checked_factors(name: str, factors) -> dict[str, LoRAFactors]:
    """``factors`` validated on their own (types, shapes, finite values); AdapterError naming the
    adapter and module otherwise. Every way factors enter a library goes through here."""
    if not isinstance(factors, dict):
        raise AdapterError(f"adapter {name!r}: factors must be a dict {{module_path: LoRAFactors}}, "
                           f"got {type(factors).__name__}")
    for mod, f in factors.items():
        if not isinstance(mod, str) or not mod:
            raise AdapterError(f"adapter {name!r}: a module path must be a non-empty string, "
                               f"got {mod!r}")
        where = f"adapter {name!r}, module {mod!r}"
        if not isinstance(f, LoRAFactors):
            raise AdapterError(f"{where}: expected LoRAFactors(A, B, scale), got "
                               f"{type(f).__name__}")
        for which in ("A", "B"):
            t = getattr(f, which)
            if not isinstance(t, torch.Tensor):
                raise AdapterError(f"{where}: {which} must be a torch.Tensor, got "
                                   f"{type(t).__name__}")
            if not t.is_floating_point():
                raise AdapterError(f"{where}: {which} must be a floating-point tensor, got "
                                   f"{t.dtype}")
        if f.A.dim() != 2 or f.B.dim() != 2 or f.A.shape[0] != f.B.shape[1]:
            raise AdapterError(f"{where}: expected A [r, K] and "
                               f"B [N, r], got {tuple(f.A.shape)} and {tuple(f.B.shape)}")
        s = f.scale
        if isinstance(s, torch.Tensor) and s.numel() == 1 and not s.is_complex():
            s = s.item()
        if not isinstance(s, numbers.Real) or isinstance(s, bool):
            raise AdapterError(f"{where}: scale must be a real number, got {type(s).__name__} "
                               f"{s!r}")
        if not math.isfinite(s):
            raise AdapterError(f"{where}: scale is {s} (not finite)")
    if _all_finite(factors):  # one float64 sum per tensor (NaN and inf propagate into it)
        return dict(factors)
    for mod, f in factors.items():
        where = f"adapter {name!r}, module {mod!r}"
        for which in ("A", "B"):  # one bad value would reach other tenants' rows (0 * inf)
            t = getattr(f, which)
            if t.device.type == "meta":
                continue
            bad = ~torch.isfinite(t.detach())
            if bool(bad.any()):
                kinds = "NaN" if bool(torch.isnan(t.detach()).any()) else ""
                if bool(torch.isinf(t.detach()).any()):
                    kinds = f"{kinds} and Inf" if kinds else "Inf"
                first = tuple(bad.nonzero()[0].tolist())
                raise AdapterError(f"{where}: {which} (lora_{which}) {tuple(t.shape)} holds "
                                   f"{int(bad.sum())} non-finite value(s) ({kinds}, first at "
                                   f"{first}); a non-finite adapter is refused")
    return dict(factors)


def _all_finite(factors: dict) -> bool:
    """True when every factor is finite, from one float64 sum per tensor (which cannot overflow
    for fp32 / fp16 / bf16 values; False may be a false alarm for huge fp64 values: the caller
    then checks each tensor)."""
    sums: dict = {}
    for f in factors.values():
        for t in (f.A, f.B):
            if t.device.type != "meta" and t.numel():
                sums.setdefault(t.device, []).append(t.detach().sum(dtype=torch.float64))
    return all(math.isfinite(float(torch.stack(v).sum())) for v in sums.values())


class AdapterLibrary:
    """Named LoRA adapters in per-module slot pools, for the kernels.

    >>> lib = AdapterLibrary.from_peft({"math": "dir/math", "code": "dir/code"})
    >>> lib.names        # ('math', 'code'); adapter id = position (None: a free id)

    Ids never change: ``lib.remove("math")`` leaves ``code`` at id 1 (``lib.names`` is then
    ``(None, 'code')``) and a later add takes the free id 0. ``len(lib)`` counts the adapters.

    Args:
        max_resident: at most this many adapters are held on each device (model placement); the
            others stay on the host (or in their peft folders, ``offload="folder"``) and are loaded
            when a forward selects them, evicting the least recently used one no running forward
            needs. A forward that needs more than ``max_resident`` adapters (a router needs them
            all) raises an AdapterError. None (default): every adapter lives in the pool.
        offload: ``"host"`` (keep a CPU copy of every adapter) or ``"folder"`` (adapters loaded
            with :meth:`add_peft` are re-read from their folder when they are loaded again).
        device, dtype: where the pool lives (default: the first adapter's device and dtype; the
            pool's dtype is promoted, never narrowed, when a wider adapter arrives). A model whose
            weights live elsewhere reads a mirror of the pool (a second copy): :meth:`to` moves
            the library to the model's placement to keep one copy.

    Training (see :mod:`loramix_fast.training` for the design):

    >>> lib = AdapterLibrary.create(model, {"math": LoRASpec(r=8, alpha=16,
    ...                                      target_modules=["q_proj", "v_proj"])}, seed=0)
    >>> opt = torch.optim.AdamW(lib.parameters(["math"]))   # leaf tensors, requires_grad
    >>> model(ids, adapter_names=names, labels=labels).loss.backward(); opt.step()
    >>> lib.save_peft("math", "out/math")                    # PeftModel.from_pretrained loads it
    """

    def __init__(self, *, max_resident: int | None = None, offload: str = "host", device=None,
                 dtype: torch.dtype | None = None):
        if max_resident is not None and (not isinstance(max_resident, numbers.Integral)
                                         or isinstance(max_resident, bool) or max_resident < 1):
            raise ValueError(f"max_resident must be a positive integer or None, got "
                             f"{max_resident!r}")
        if offload not in ("host", "folder"):
            raise ValueError(f"offload must be 'host' or 'folder', got {offload!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self._max_resident = None if max_resident is None else int(max_resident)
        self._offload = offload
        self._want = (dtype, None if device is None else _pool.norm_device(device))
        self._home = None  # (dtype, device) of the pool that stores the adapters
        self._pools: dict = {}  # (dtype, device) -> {module: Slots}; the home one and mirrors
        self._res: dict = {}  # max_resident: (dtype, device) -> Resident
        self._host: dict = {}  # max_resident: name -> {module: LoRAFactors} on the host, or None
        self._entries: dict[str, dict] = {}  # name -> {module: (rank, scale, K, N)}, add order
        self._ids: dict[str, int] = {}
        self._slot_names: list = []  # id -> name (None: free)
        self._free: list = []  # [(version that freed it, id)]
        self._meta: dict = {}  # module -> ModMeta (current)
        self._mod_count: dict = {}  # module -> number of adapters with a factor there
        self._configs: dict[str, dict] = {}  # peft config per adapter (save_peft writes it back)
        self._paths: dict[str, str] = {}  # peft folder per adapter loaded with add_peft
        self._leaves: dict[str, dict] = {}  # trainable adapters: their own leaf factors
        self._live: set = set()  # adapters whose factors may change in place (handed out)
        self._version = 0
        self._lock = threading.RLock()  # add holds it while it patches models
        self._cond = threading.Condition(self._lock)
        self._listeners: "weakref.WeakSet" = weakref.WeakSet()  # see subscribe (patched models)
        self._pinned: "weakref.WeakSet" = weakref.WeakSet()  # snapshots of running forwards
        self._state = _pool.State(0, {}, (), {}, {})

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_peft(cls, dirs: dict[str, str], **kwargs) -> "AdapterLibrary":
        """Load peft ``save_pretrained`` folders, ``{name: folder}``; ``kwargs`` go to the
        constructor (``max_resident``, ``offload``, ``device``, ``dtype``)."""
        lib = cls(**kwargs)
        for name, path in dirs.items():
            lib.add_peft(name, path)
        return lib

    def add_peft(self, name: str, path: str) -> None:
        """Load one peft LoRA folder under ``name`` (its config is kept for :meth:`save_peft`)."""
        path = os.fspath(path)
        factors = _read_peft_dir(name, path)
        with open(os.path.join(path, "adapter_config.json")) as f:
            cfg = json.load(f)
        self.add(name, factors, config=cfg, _path=path)

    @classmethod
    def create(cls, model, specs: dict, seed: int = 0) -> "AdapterLibrary":
        """A library of new adapters for ``model``, ``{name: lmf.LoRASpec(...)}``, initialised as
        peft initialises them (``init_lora_weights``: True = A Kaiming-uniform, B zero, so the
        model is unchanged; ``"gaussian"``; False = random A and B). Each adapter's numbers depend
        only on ``(seed, name)``. Patch ``model`` with the library afterwards; train with
        :meth:`parameters`. AdapterError when a spec targets no module or one that cannot carry
        LoRA here (embedding, LM head, non-Linear)."""
        if not isinstance(specs, dict) or not specs:
            raise TypeError("specs must be a non-empty dict {name: lmf.LoRASpec(...)}, got "
                            f"{type(specs).__name__} {specs!r}")
        lib = cls()
        for name, spec in specs.items():
            lib.add_new(name, model, spec, seed=seed)
        return lib

    def add_new(self, name: str, model, spec, seed: int = 0) -> None:
        """Add one new adapter for ``model`` from ``spec`` (a ``lmf.LoRASpec``), as
        :meth:`create` does."""
        from .training import create_factors

        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"adapter name must be a non-empty string other than {BASE!r}, "
                             f"got {name!r}")
        if name in self._ids:
            raise ValueError(f"adapter {name!r} is already in the library")
        factors, cfg = create_factors(model, name, spec, seed)
        self.add(name, factors, config=cfg)

    def add(self, name: str, factors: dict[str, LoRAFactors], *, config: dict | None = None,
            _path: str | None = None) -> None:
        """Add an adapter from ``{module_path: LoRAFactors}``. Patched models pick it up at once.

        The adapter takes the lowest free id and is copied into that slot of every module it
        targets (the library keeps no reference to the given tensors, unless one of them
        requires grad: then the adapter is trainable and keeps them, see :meth:`parameters`).

        Atomic: the factors are validated first (floating-point tensors A [r, K] and B [N, r],
        finite values, a finite scale; K and N equal to those of the library's other adapters on
        the module and to the in/out features of the module in every patched model), then the
        adapter is committed and the modules it newly targets are patched; if anything fails it
        raises AdapterError and the library and the patched models are left as they were.
        A rank-0 factor (A [0, K], B [N, 0]) is accepted and contributes nothing.
        ``config``: the adapter's peft LoraConfig as a dict, written back by :meth:`save_peft`
        (without one, save_peft derives a config that reproduces the factors exactly).
        """
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"adapter name must be a non-empty string other than {BASE!r}, "
                             f"got {name!r}")
        if name in self._ids:
            raise ValueError(f"adapter {name!r} is already in the library")
        factors = _checked_factors(name, factors)
        with self._lock:
            if name in self._ids:
                raise ValueError(f"adapter {name!r} is already in the library")
            listeners = list(self._listeners)
            for ls in listeners:  # a listener (a patched model) may refuse the adapter
                ls.check_adapter(self, name, factors)
            self._check_fits(name, factors)
            self._commit(name, factors, config, _path)
            undo = []
            try:
                for ls in listeners:  # e.g. a patched model patches the modules it newly needs
                    u = ls.adapter_added(self, name)
                    if u is not None:
                        undo.append(u)
            except BaseException:
                self._discard(name)
                for u in reversed(undo):
                    u()
                raise

    # ---- listeners: the library knows no model, it publishes its changes ---------------------
    def subscribe(self, listener) -> None:
        """Tell ``listener`` (held weakly) of every add. Inside ``add``, under the library's lock:
        ``listener.check_adapter(lib, name, factors)`` before the adapter is committed (raise
        AdapterError to refuse it), then ``listener.adapter_added(lib, name)`` after, returning
        None or a callable that undoes what it did (called when a later listener fails and the
        add is rolled back; a listener that raises must leave itself as it was). Removes, evictions
        and other changes are not announced: a forward reads the library's state as of its start.
        ``lmf.patch`` subscribes the model's patch state (it patches the modules a new adapter
        targets)."""
        for m in ("check_adapter", "adapter_added"):
            if not callable(getattr(listener, m, None)):
                raise TypeError(f"a library listener needs a method {m}(lib, name, ...); "
                                f"{type(listener).__name__} has none")
        with self._lock:
            self._listeners.add(listener)

    def unsubscribe(self, listener) -> None:
        """Stop telling ``listener`` of adds (a no-op if it was not subscribed)."""
        with self._lock:
            self._listeners.discard(listener)

    def _check_fits(self, name: str, factors: dict) -> None:
        """AdapterError if a factor's K / N differ from the library's other adapters' on its
        module (the listeners check the modules of the models they patch)."""
        for mod, f in factors.items():
            K, N = f.A.shape[1], f.B.shape[0]
            meta = self._meta.get(mod)
            if meta is not None and (meta.K != K or meta.N != N):
                other = next(n for n, e in self._entries.items() if mod in e)
                raise AdapterError(
                    f"adapter {name!r}, module {mod!r}: A {tuple(f.A.shape)} / B "
                    f"{tuple(f.B.shape)} do not fit adapter {other!r}'s factors on this "
                    f"module (K={meta.K}, N={meta.N})")

    # ---- the pool (see loramix_fast.pool) ----------------------------------------------------
    def _min_pinned(self) -> float:
        return min((s.state.version for s in list(self._pinned)), default=math.inf)

    def _take_id(self) -> int:
        """The lowest id no running forward can still see in use, else a new one."""
        self._trim()
        m = self._min_pinned()
        ok = [(i, k) for k, (v, i) in enumerate(self._free) if v <= m]
        if ok:
            i, k = min(ok)
            del self._free[k]
            return i
        self._slot_names.append(None)
        return len(self._slot_names) - 1

    def _trim(self) -> None:
        """Drop free ids at the end of the id space (once no running forward sees them used)."""
        m = self._min_pinned()
        while self._slot_names and self._slot_names[-1] is None:
            i = len(self._slot_names) - 1
            k = next((k for k, (v, j) in enumerate(self._free) if j == i), None)
            if k is None or self._free[k][0] > m:
                break
            del self._free[k]
            self._slot_names.pop()

    def _placement_of(self, factors: dict):
        f = next((f for f in factors.values() if f.rank > 0), None)
        if f is None:
            return None
        return (self._want[0] or f.A.dtype,
                self._want[1] if self._want[1] is not None else _pool.norm_device(f.A.device))

    def _rehome(self, placement) -> None:
        """Move the home pool to ``placement`` (a wider dtype arrived, or :meth:`to`); mirrors
        are dropped (rebuilt from the new home when a model reads them)."""
        old = self._pools.get(self._home, {})
        self._pools = {placement: {m: s.to(*placement) for m, s in old.items()}}
        self._home = placement

    def _commit(self, name, factors, config, path) -> None:
        """Give ``name`` an id, write its factors into the pools and publish (under the lock)."""
        i = self._take_id()
        trainable = any(f.A.requires_grad or f.B.requires_grad for f in factors.values())
        if self._max_resident is None:
            want = self._placement_of(factors)
            if want is not None:
                if self._home is None:
                    self._home = want
                    self._pools.setdefault(want, {})
                elif self._want[0] is None:
                    dt = torch.promote_types(self._home[0], want[0])
                    if dt != self._home[0]:  # never narrow: a wider adapter widens the pool
                        self._rehome((dt, self._home[1]))
            for placement, pool in self._pools.items():
                for mod, f in factors.items():
                    if f.rank == 0:
                        continue
                    K, N = f.A.shape[1], f.B.shape[0]
                    s = pool.get(mod)
                    if s is not None and (s.K != K or s.N != N):  # every old adapter was removed
                        s = None
                        for p in self._pools.values():
                            p.pop(mod, None)
                    if s is None:
                        if placement != self._home:
                            continue  # a mirror copies the module when a model first reads it
                        s = pool[mod] = _pool.Slots(K, N, f.rank, _pool.grow_cap(0, i + 1),
                                                    *placement)
                    s.ensure(_pool.grow_cap(s.cap, i + 1), f.rank)
                    s.write(i, f.A.detach().to(dtype=s.dtype, device=s.device),
                            f.B.detach().to(dtype=s.dtype, device=s.device), _pool.next_key())
                    if trainable:
                        s.synced[i] = (f.A._version, f.B._version)
        elif not (self._offload == "folder" and path is not None and not trainable):
            host = {}
            for mod, f in factors.items():
                A, B = f.A.detach(), f.B.detach()
                if self._want[0] is not None:
                    A, B = A.to(self._want[0]), B.to(self._want[0])
                host[mod] = LoRAFactors(A.to("cpu", copy=A.device.type != "cpu"),
                                        B.to("cpu", copy=B.device.type != "cpu"), f.scale)
            self._host[name] = host
        else:
            self._host[name] = None  # re-read from the folder when loaded
        entry = {}
        for mod, f in factors.items():
            s = float(f.scale.item() if isinstance(f.scale, torch.Tensor) else f.scale)
            K, N = f.A.shape[1], f.B.shape[0]
            entry[mod] = (f.rank, s, K, N)
            meta = self._meta.get(mod) or _pool.ModMeta(K, N, 0)
            self._meta[mod] = meta.with_id(i, f.rank, s if f.rank else 0.0)
            self._mod_count[mod] = self._mod_count.get(mod, 0) + 1
        self._entries[name] = entry
        self._ids[name] = i
        self._slot_names[i] = name
        if config is not None:
            self._configs[name] = dict(config)
        if path is not None:
            self._paths[name] = path
        if trainable and self._max_resident is None:  # factors that require grad train as given
            self._leaves[name] = dict(factors)
            self._live.add(name)
        self._publish()

    def _discard(self, name) -> None:
        """Take ``name`` out of the library (under the lock): its id is freed, its slots are left
        as they are (a forward that began before sees them) and reused by a later add."""
        i = self._ids.pop(name)
        entry = self._entries.pop(name)
        for mod in entry:
            self._meta[mod] = self._meta[mod].with_id(i, 0, 0.0)
            self._mod_count[mod] -= 1
            if not self._mod_count[mod]:
                del self._mod_count[mod], self._meta[mod]
            for pool in self._pools.values():
                s = pool.get(mod)
                if s is not None and i < s.cap:
                    s.clear(i)
        for res in self._res.values():
            s = res.slot_of.pop(i, None)
            if s is not None:
                res.lru.pop(i, None)
                res.occupant[s] = None
                res.meta[s] = {}
                res.epoch += 1
        self._slot_names[i] = None
        for d in (self._configs, self._paths, self._leaves, self._host):
            d.pop(name, None)
        self._live.discard(name)
        self._free.append((self._version + 1, i))
        self._trim()  # a free id at the end leaves the id space at once when nothing pins it
        self._publish()

    def _publish(self) -> None:
        """A new immutable State for the forwards that start from now on (under the lock)."""
        self._version += 1
        live = {}
        for n in self._live:
            i = self._ids[n]
            for mod, f in self._leaves[n].items():
                if f.rank:
                    live.setdefault(mod, []).append((i, n))
        self._state = _pool.State(self._version, dict(self._ids), tuple(self._slot_names),
                                  dict(self._meta), {m: tuple(sorted(v)) for m, v in live.items()})
        self._cond.notify_all()
        _pool.trim()  # the old state's views of reallocated slots are gone now

    def remove(self, name: str) -> None:
        """Remove an adapter. The ids of the other adapters do not change (``lib.names`` gets a
        None where it was), their outputs stay bit-identical, and a later add reuses the id once
        no forward that began before this remove is still running."""
        with self._lock:
            if name not in self._ids:
                raise KeyError(f"adapter {name!r} is not in the library (have "
                               f"{list(self._ids)})")
            self._discard(name)

    # ---- pinning: a forward sees the library as of its start --------------------------------
    def _pin(self, names=None) -> "_pool.Snapshot":
        """Pin the current state for a forward that may select ``names`` (None: every adapter,
        as routers do; unknown names are left for the caller to report)."""
        with self._lock:
            st = self._state
            if names is None:
                needed = None
            else:
                if isinstance(names, str):
                    names = [names]
                needed = frozenset(st.ids[n] for n in names if isinstance(n, str) and n in st.ids)
            snap = _pool.Snapshot(self, st, needed)
            self._pinned.add(snap)
        return snap

    def _pin_context(self, names=None):
        """Pin (see :meth:`_pin`) into the current context: returns ``(contextvar, token)`` for
        ``contextvar.reset(token)`` when the forward ends."""
        snap = self._pin(names)
        return _pool._PINNED, _pool._PINNED.set(_pool._PINNED.get() + (snap,))

    @contextlib.contextmanager
    def pinned(self, names=None):
        """The code inside sees the library as it is now: adapters added or removed meanwhile (by
        other threads) are invisible to it, and the slots it reads are not reused until it ends.
        A patched model's forward, ``generate`` and ``lmf.use_adapters`` do this themselves;
        ``names``: the adapters it may select (None: all; matters with ``max_resident``)."""
        var, tok = self._pin_context(names)
        try:
            yield self
        finally:
            var.reset(tok)

    def _view(self) -> "_pool.State":
        snap = _pool.active_snapshot(self)
        return snap.state if snap is not None else self._state

    # ---- queries ---------------------------------------------------------------------------
    @property
    def names(self) -> tuple:
        """The adapter of each id (``names[i]``; None for a free id), as of the running forward
        inside one."""
        return self._view().names

    @property
    def version(self) -> int:
        return self._view().version

    @property
    def _adapters(self) -> dict:
        """``{name: {module: LoRAFactors}}`` of every adapter (views into the pool), add order."""
        return {n: self.factors(n) for n in self._view().ids if n in self._entries}

    def __len__(self) -> int:
        return len(self._view().ids)

    def __repr__(self) -> str:
        """One line for the library, one per adapter: rank(s), scale(s), targeted modules (leaf
        names with counts), bytes and dtype of its factors."""
        def mb(n):
            return f"{n / 2**20:.2f} MiB" if n >= 2**16 else f"{n / 2**10:.1f} KiB"

        def span(vals, fmt="{:g}"):
            vals = sorted(set(vals))
            if not vals:
                return "-"
            return fmt.format(vals[0]) if len(vals) == 1 else (
                f"{fmt.format(vals[0])}..{fmt.format(vals[-1])}")

        lines, total = [], 0
        for name, fs in self._adapters.items():
            nbytes = sum(f.A.numel() * f.A.element_size() + f.B.numel() * f.B.element_size()
                         for f in fs.values())
            total += nbytes
            leaves: dict = {}
            for mod in fs:
                leaf = mod.rsplit(".", 1)[-1]
                leaves[leaf] = leaves.get(leaf, 0) + 1
            targets = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in leaves.items())
            dtypes = sorted({str(f.A.dtype).replace("torch.", "") for f in fs.values()})
            lines.append(f"  {name}: r={span(f.rank for f in fs.values())}, scale="
                         f"{span((f.scale for f in fs.values()), '{:.4g}')}, {len(fs)} modules "
                         f"({targets}), {mb(nbytes)}, {'/'.join(dtypes) or '-'}"
                         + (", trainable" if name in self._live else ""))
        n = len(self._adapters)
        head = (f"AdapterLibrary({n} adapter{'s' if n != 1 else ''}, {len(self.modules())} "
                f"modules, {mb(total)}")
        models = len(self._listeners) if hasattr(self, "_listeners") else 0
        head += f", patched into {models} model{'s' if models != 1 else ''})" if models else ")"
        return "\n".join([head + (":" if lines else "")] + lines)

    def __contains__(self, name) -> bool:
        return name in self._view().ids

    def id_of(self, name: str) -> int:
        """Adapter id of ``name``; -1 for ``"__base__"`` (no adapter). Ids never change while the
        adapter is in the library."""
        if name == BASE or name is None:
            return -1
        try:
            return self._view().ids[name]
        except (KeyError, TypeError):
            raise KeyError(f"unknown adapter {name!r}; the library has "
                           f"{list(self._view().ids)} (or {BASE!r} for none)") from None

    def ids_of(self, names) -> list[int]:
        return [self.id_of(n) for n in names]

    def modules(self) -> set[str]:
        """Every module path targeted by at least one adapter."""
        return set(self._mod_count)

    def owners(self, module: str) -> list[str]:
        """The adapters with a factor on ``module``, in id order."""
        return [n for n in self._view().names
                if n is not None and module in self._entries.get(n, ())]

    def factors(self, name: str) -> dict[str, LoRAFactors]:
        """``{module: LoRAFactors}`` of adapter ``name``: views into the library's pool (valid
        until the pool grows; call again after adds), the leaf tensors of a trainable adapter,
        or with ``max_resident`` its host copy (re-read from its folder with
        ``offload="folder"``)."""
        with self._lock:
            if name not in self._entries:
                raise KeyError(name)
            if name in self._leaves:
                return dict(self._leaves[name])
            if self._max_resident is not None:
                host = self._host.get(name)
                return dict(host) if host is not None else _read_peft_dir(name, self._paths[name])
            i = self._ids[name]
            pool = self._pools.get(self._home, {})
            out = {}
            for mod, (r, scale, K, N) in self._entries[name].items():
                if r == 0:
                    dt, dev = self._home if self._home is not None else (torch.float32, "cpu")
                    out[mod] = LoRAFactors(torch.zeros(0, K, dtype=dt, device=dev),
                                           torch.zeros(N, 0, dtype=dt, device=dev), scale)
                else:
                    s = pool[mod]
                    out[mod] = LoRAFactors(s.A[i, :r], s.B[i, :, :r], scale)
            return out

    def check_module(self, module: str, in_features: int, out_features: int) -> None:
        """Raise AdapterError naming adapter and module if a factor does not fit the base module."""
        meta = self._meta.get(module)
        if meta is None or (meta.K == in_features and meta.N == out_features):
            return
        name = next(n for n, e in self._entries.items() if module in e)
        r = self._entries[name][module][0]
        raise AdapterError(
            f"adapter {name!r}, module {module!r}: LoRA A {(r, meta.K)} / B "
            f"{(meta.N, r)} do not fit the base module (in={in_features}, "
            f"out={out_features})")

    def nbytes(self) -> int:
        """Bytes of every tensor the library holds: pools (home, mirrors, resident), host copies
        and trainable leaves."""
        ts = [t for p in self._pools.values() for s in p.values() for t in (s.A, s.B)]
        ts += [t for r in self._res.values() for s in r.slots.values() for t in (s.A, s.B)]
        ts += [t for fs in list(self._host.values()) + list(self._leaves.values()) if fs
               for f in fs.values() for t in (f.A, f.B)]
        return _pool.storages_nbytes(ts)

    def residency(self) -> dict:
        """With ``max_resident``: per placement ``"dtype@device"``, ``{"resident": [names in slot
        order, None for an empty slot], "limit", "hits", "loads", "evictions"}`` since the
        placement's pool was created (hits: a forward's adapter already resident; loads: written
        into a slot, a miss; evictions: loads that replaced another adapter). ``{}`` without
        ``max_resident`` (every adapter is resident) or before the first forward."""
        with self._lock:
            out = {}
            for (dtype, device), res in self._res.items():
                out[f"{str(dtype).replace('torch.', '')}@{device}"] = dict(
                    resident=[o[1] if o is not None else None for o in res.occupant],
                    limit=res.limit, hits=res.hits, loads=res.loads, evictions=res.evictions)
            return out

    def stack(self, module: str, dtype: torch.dtype, device) -> ModuleStack | None:
        """The stack of every adapter for ``module`` in ``dtype`` on ``device`` (views into the
        pool, as of the running forward's start inside one); None when no adapter targets the
        module (or every one that does has rank 0). With ``max_resident`` the stack holds the
        resident adapters in their slots (``stack.names``; a forward's token maps go through
        ``stack.slots_of``); inside a forward, the ones it needs are loaded first.

        Trainable adapters (:meth:`parameters`): their slots are rewritten from their leaf
        tensors when a leaf changed in place (an optimizer step); with grad enabled the stack
        is assembled from the leaves in each call (differentiable, padding not stored)."""
        device = device if isinstance(device, torch.device) and (
            device.index is not None or device.type == "cpu") else _pool.norm_device(device)
        snap = _pool.active_snapshot(self)
        state = snap.state if snap is not None else self._state
        if self._max_resident is not None:
            return self._resident_stack(snap, state, module, dtype, device)
        key = (module, dtype, device)
        st = state.stacks.get(key, _MISSING)
        if st is _MISSING:
            with self._lock:
                st = state.stacks.get(key, _MISSING)
                if st is _MISSING:
                    with torch.no_grad():
                        st = state.stacks[key] = self._present(state, module, dtype, device)
                    _pool.trim()
        live = state.live.get(module) if state.live else None
        if live and st is not None:
            return self._live_stack(state, key, st, live)
        return st

    def _slots(self, module, placement) -> "_pool.Slots":
        """The module's slots in ``placement``: the home pool's, or a mirror built from them."""
        pool = self._pools.get(placement)
        if pool is None:
            pool = self._pools[placement] = {}
        s = pool.get(module)
        if s is None:
            s = pool[module] = self._pools[self._home][module].to(*placement)
        return s

    def _present(self, state, module, dtype, device) -> ModuleStack | None:
        meta = state.mods.get(module)
        if meta is None or not meta.active:  # no adapter, or rank 0 only: the base module
            return None
        # a stack first built inside torch.inference_mode (serving, ensemble_generate) is kept
        # and later trained through: its tensors must be normal ones, which autograd can save
        with torch.inference_mode(False):
            s = self._slots(module, (dtype, device))
            E = len(state.names)
            s.ensure(_pool.grow_cap(s.cap, E), meta.R)
            rank, scale = meta.padded(E)
            rank = rank.to(device)  # on the CPU: a view of the state's own (never written) tensor
            scale = scale.to(device=device, dtype=_pool.scale_dtype(dtype))
            if rank.is_inference():  # metadata written by an add under inference_mode
                rank = rank.clone()
            if scale.is_inference():
                scale = scale.clone()
        return ModuleStack(state.names, s.A[:E], s.B[:E], scale, rank, pool=s, pool_epoch=s.epoch)

    def _live_stack(self, state, key, base, live) -> ModuleStack:
        module, dtype, device = key
        s = base.pool
        wrote = False
        for i, n in live:
            f = self._leaves.get(n, {}).get(module)
            if f is None:
                continue
            ver = (f.A._version, f.B._version)
            if s.synced.get(i) != ver:  # an optimizer step (or any in-place update) since
                with self._lock, torch.no_grad():
                    s.write(i, f.A.detach().to(dtype=s.dtype, device=s.device),
                            f.B.detach().to(dtype=s.dtype, device=s.device), _pool.next_key())
                    s.synced[i] = ver
                wrote = True
        if wrote or base.pool_epoch != s.epoch:  # fresh derived caches (alignment) for this state
            with self._lock:
                base = state.stacks[key] = self._present(state, module, dtype, device)
        if not torch.is_grad_enabled():
            return base
        train = []
        for i, n in live:
            f = self._leaves.get(n, {}).get(module)
            if f is not None and (f.A.requires_grad or f.B.requires_grad):
                train.append((i, f))
        if not train:
            return base
        import torch.nn.functional as F

        dev = base.A.device
        R = base.max_rank
        As = torch.stack([F.pad(f.A.to(device=dev, dtype=dtype), (0, 0, 0, R - f.rank))
                          for _, f in train])
        Bs = torch.stack([F.pad(f.B.to(device=dev, dtype=dtype), (0, R - f.rank))
                          for _, f in train])
        if len(train) == base.A.shape[0]:  # every slot trainable (train is in id order)
            A, B = As, Bs
        else:
            ikey = key + ("ids", tuple(i for i, _ in train))
            ids = state.stacks.get(ikey)
            if ids is None:
                ids = state.stacks[ikey] = torch.tensor(ikey[-1], dtype=torch.long, device=dev)
            A = base.A.index_copy(0, ids, As)
            B = base.B.index_copy(0, ids, Bs)
        return ModuleStack(base.names, A, B, base.scale, base.rank)

    # ---- residency (max_resident) ------------------------------------------------------------
    def _resident_stack(self, snap, state, module, dtype, device) -> ModuleStack | None:
        meta = state.mods.get(module)
        if meta is None or not meta.active:
            return None
        if snap is None:  # outside a forward: the adapters resident now, nothing loaded
            snap = _pool.Snapshot(self, state, frozenset())
        placement = (dtype, device)
        view = snap.res.get(placement)
        if view is None:
            view = self._resolve(snap, placement)
        st = view.stacks.get(module, _MISSING)
        if st is _MISSING:
            with self._lock, torch.no_grad():
                st = view.stacks.get(module, _MISSING)
                if st is _MISSING:
                    st = view.stacks[module] = self._res_present(view, module, placement)
        return st

    def _resolve(self, snap, placement):
        """Make the adapters ``snap`` needs resident in ``placement``; returns its ResView."""
        state, limit = snap.state, self._max_resident
        need = set(state.ids.values()) if snap.needed is None else set(snap.needed)
        if len(need) > limit:
            who = ("routing over every adapter needs" if snap.needed is None
                   else "this forward selects")
            raise AdapterError(f"{who} {len(need)} adapters at once, but the library keeps "
                               f"at most max_resident={limit} on {placement[1]}; raise "
                               "max_resident or split the batch")
        reads: dict = {}
        while True:
            with self._lock:
                res = self._res.get(placement)
                if res is None:
                    res = self._res[placement] = _pool.Resident(limit, *placement)
                missing = [i for i in need if i not in res.slot_of]
                to_read = [state.names[i] for i in missing
                           if self._host.get(state.names[i], ()) is None
                           and state.names[i] not in reads]
                if not to_read:
                    for i in need:  # pinned at once: other forwards cannot evict them now
                        if i in res.slot_of:
                            res.pins[res.slot_of[i]].add(snap)
                    res.hits += len(need) - len(missing)
                    for i in missing:
                        if i in res.slot_of:  # loaded by another forward while this one waited
                            res.pins[res.slot_of[i]].add(snap)
                            continue
                        n = state.names[i]
                        fs = reads.get(n) or self._host.get(n)
                        if fs is None or self._ids.get(n) != i:
                            raise AdapterError(f"adapter {n!r} was removed from the library while "
                                               "a forward that selects it was starting")
                        s = _pool.wait_for(self._cond, lambda: res.free_slot(need))
                        if s is None:
                            raise AdapterError(
                                f"no slot to load adapter {n!r} into: all max_resident={limit} "
                                f"slots on {placement[1]} hold adapters that running forwards "
                                f"use (waited {_pool.WAIT_S:.0f} s)")
                        if i in res.slot_of:
                            res.pins[res.slot_of[i]].add(snap)
                            continue
                        self._load(res, s, i, n, fs)
                        res.pins[s].add(snap)
                    for i in need:
                        res.lru.move_to_end(i)
                    vkey = (res.epoch, state.version if snap.needed is None else None)
                    view = res.views.get(vkey)
                    if view is None:
                        view = self._res_view(res, state, snap.needed is None)
                        res.views = {vkey: view}
                    snap.res[placement] = view
                    return view
            for n in to_read:  # outside the lock: forwards that need nothing new go on
                reads[n] = _read_peft_dir(n, self._paths[n])

    def _load(self, res, s, i, name, factors) -> None:
        """Write adapter ``name`` (id ``i``) into resident slot ``s`` (under the lock)."""
        limit = self._max_resident
        if s == len(res.occupant):
            res.occupant.append(None)
            res.meta.append({})
            res.pins.append(weakref.WeakSet())
        old = res.occupant[s]
        if old is not None:
            res.slot_of.pop(old[0], None)
            res.lru.pop(old[0], None)
            res.evictions += 1
        res.loads += 1
        meta = {}
        for mod, f in factors.items():
            if f.rank == 0:
                continue
            m = self._meta[mod]
            sl = res.slots.get(mod)
            if sl is None:
                sl = res.slots[mod] = _pool.Slots(m.K, m.N, m.R, _pool.grow_cap(0, s + 1, limit),
                                                  res.dtype, res.device)
            sl.ensure(_pool.grow_cap(sl.cap, s + 1, limit), max(m.R, f.rank))
            sl.write(s, f.A.to(dtype=sl.dtype, device=sl.device),
                     f.B.to(dtype=sl.dtype, device=sl.device), _pool.next_key())
            meta[mod] = (f.rank, float(f.scale))
        res.occupant[s] = (i, name)
        res.meta[s] = meta
        res.slot_of[i] = s
        res.lru[i] = None
        res.epoch += 1

    def _res_view(self, res, state, only_state: bool):
        """What forwards see of ``res`` now; ``only_state``: slots of adapters ``state`` does not
        hold are shown free (a router must not mix in an adapter added after it began)."""
        names, meta = [], []
        for occ, m in zip(res.occupant, res.meta):
            ok = occ is not None and (not only_state or state.ids.get(occ[1]) == occ[0])
            names.append(occ[1] if ok else None)
            meta.append(m if ok else {})
        n_ids = max([len(state.names)] + [i + 1 for i in res.slot_of])
        lut = [-1] * (n_ids + 1)
        for i, s in res.slot_of.items():
            lut[i + 1] = s
        lut_t = torch.tensor(lut, dtype=torch.int32, device=res.device)
        return _pool.ResView(tuple(names), lut_t, meta, len(names))

    def _res_present(self, view, module, placement):
        ranks = [m.get(module, (0, 0.0))[0] for m in view.meta]
        if not any(ranks):
            return None
        s = self._res[placement].slots[module]
        E = view.E
        s.ensure(_pool.grow_cap(s.cap, E, self._max_resident), 0)
        dtype, device = placement
        rank = torch.tensor(ranks, dtype=torch.int32, device=device)
        scale = torch.tensor([m.get(module, (0, 0.0))[1] for m in view.meta],
                             dtype=_pool.scale_dtype(dtype), device=device)
        return ModuleStack(view.names, s.A[:E], s.B[:E], scale, rank, pool=s, pool_epoch=s.epoch,
                           lut=view.lut)

    # ---- training --------------------------------------------------------------------------
    def _names_arg(self, names) -> list:
        if names is None:
            return list(self._ids)
        if isinstance(names, str):
            names = [names]
        try:
            names = list(names)
        except TypeError:
            raise TypeError(f"names must be a list of adapter names (or None for all), got "
                            f"{type(names).__name__} {names!r}") from None
        for n in names:
            if n == BASE:
                raise KeyError(f"{BASE!r} is the base model, not an adapter; it has no parameters")
            if n not in self._ids:
                raise KeyError(f"unknown adapter {n!r}; the library has {list(self._ids)}")
        return list(dict.fromkeys(names))

    def named_parameters(self, names=None) -> list[tuple[str, torch.Tensor]]:
        """As :meth:`parameters`, with peft's names ``"<module>.lora_A.<adapter>.weight"``."""
        names = self._names_arg(names)
        if self._max_resident is not None:
            raise RuntimeError("training needs every adapter in the pool: build the library "
                               "without max_resident to train it")
        out = []
        with self._lock:
            for n in names:
                fs = self._leaves.get(n)
                if fs is None:  # the optimizer's own tensors, copied out of the pool once
                    fs = self._leaves[n] = {
                        mod: LoRAFactors(f.A.detach().clone(), f.B.detach().clone(), f.scale)
                        for mod, f in self.factors(n).items()}
                    i = self._ids[n]
                    for mod, f in fs.items():
                        for pool in self._pools.values():
                            s = pool.get(mod)
                            if s is not None and f.rank:  # the slot already holds these values
                                s.synced[i] = (f.A._version, f.B._version)
                for mod in sorted(fs):
                    f = fs[mod]
                    if f.rank == 0:
                        continue
                    if not (f.A.is_leaf and f.B.is_leaf):  # optimizers take leaves only
                        f = fs[mod] = LoRAFactors(f.A.detach(), f.B.detach(), f.scale)
                    f.A.requires_grad_(True)
                    f.B.requires_grad_(True)
                    out.append((f"{mod}.lora_A.{n}.weight", f.A))
                    out.append((f"{mod}.lora_B.{n}.weight", f.B))
                self._live.add(n)
            self._publish()
        for n in names:
            p = (self._configs.get(n) or {}).get("lora_dropout") or 0
            if p:
                warnings.warn(f"adapter {n!r} is configured with lora_dropout={p}; loramix_fast "
                              "trains it without dropout", stacklevel=3)
        return out

    def parameters(self, names=None) -> list[torch.Tensor]:
        """The factors of adapters ``names`` (None: all), ``A [r, K]`` and ``B [N, r]`` per
        module, as leaf tensors with ``requires_grad``, for any torch optimizer.

        They are the adapters' trainable copies (the pool keeps serving a copy of them in its
        slots): an optimizer step updates the adapters every patched model serves (the slots
        follow, see :meth:`stack`). Rows of one batch may use different adapters
        (``adapter_names``); one backward gives each adapter the gradient of its own rows and
        ``"__base__"`` rows give none. Adapters not named here keep ``requires_grad`` as it was
        and are not in the list, so an optimizer (weight decay included) never touches them;
        :meth:`freeze` stops their gradients. In-place updates through ``.data`` bypass the
        version counters the slots are checked with: call :meth:`refresh` after them."""
        return [t for _, t in self.named_parameters(names)]

    def freeze(self, names=None) -> None:
        """Stop gradients to adapters ``names`` (None: all); their tensors stay the same objects."""
        for n in self._names_arg(names):
            for f in self._leaves.get(n, {}).values():
                f.A.requires_grad_(False)
                f.B.requires_grad_(False)

    def refresh(self) -> None:
        """Rewrite every trainable adapter's slots and drop every derived cache (after changing
        factors in place out of autograd's sight, e.g. through ``.data``)."""
        with self._lock:
            for pool in self._pools.values():
                for s in pool.values():
                    s.synced.clear()
                    s.cache = {}
                    s.epoch += 1
            self._publish()

    def save_peft(self, name: str, folder) -> None:
        """Write adapter ``name`` as a peft folder (``adapter_config.json`` +
        ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, folder)`` loads
        with the same outputs. An adapter loaded from peft keeps its config (alpha, rank and alpha
        patterns, rsLoRA, target modules); one made by :meth:`create` gets its spec's."""
        from .training import peft_config, write_peft

        if name not in self._ids:
            raise KeyError(f"unknown adapter {name!r}; the library has {list(self._ids)}")
        factors = self.factors(name)
        cfg = self._configs.get(name)
        if cfg is None:
            cfg = peft_config(factors)
        try:
            write_peft(folder, factors, cfg)
        except AdapterError as e:
            raise AdapterError(f"adapter {name!r}: {e}") from None

    def to(self, device=None, dtype=None) -> "AdapterLibrary":
        """Move the pool (e.g. to the model's GPU and dtype, so the model reads the pool itself
        rather than a mirror); returns self. Not after :meth:`parameters` (an optimizer would
        hold the old tensors). With ``max_resident``, converts the host copies' dtype (the
        resident pools follow each model's placement already)."""
        if isinstance(device, torch.dtype):  # lib.to(torch.float64)
            device, dtype = None, device
        if self._live:
            raise RuntimeError("lib.to() after lib.parameters(): optimizers hold the old tensors; "
                               "move the library before handing out its parameters")
        with self._lock:
            if self._max_resident is not None:
                if dtype is not None:
                    for n, fs in self._host.items():
                        if fs is not None:
                            self._host[n] = {m: LoRAFactors(f.A.to(dtype), f.B.to(dtype), f.scale)
                                             for m, f in fs.items()}
                    self._want = (dtype, self._want[1])
                self._res = {}
            else:
                dev = None if device is None else _pool.norm_device(device)
                self._want = (dtype or self._want[0], dev if dev is not None else self._want[1])
                if self._home is not None:
                    self._rehome((dtype or self._home[0], dev if dev is not None
                                  else self._home[1]))
            self._publish()
        return self

    # pickle / deepcopy: the lock, the registry of patched models and pinned forwards are not
    # state (a patched model's copy re-attaches itself to the library's copy when unpickled)
    def __getstate__(self):
        state = dict(self.__dict__)
        for k in ("_lock", "_cond", "_listeners", "_pinned"):
            state.pop(k, None)
        st = self._state
        state["_state"] = _pool.State(st.version, st.ids, st.names, st.mods, st.live)
        state["_res"] = {}  # residency is rebuilt on first use
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._listeners = weakref.WeakSet()
        self._pinned = weakref.WeakSet()
