"""Adapter library: peft LoRA adapters loaded from ``save_pretrained`` folders and stacked per module.

An :class:`AdapterLibrary` holds named adapters; each adapter is a set of ``(A [r, K], B [N, r],
scale)`` factors keyed by the module path inside the base model (peft's key without the
``base_model.model.`` prefix). Per patched module, :meth:`AdapterLibrary.stack` returns the
zero-padded stack the kernels read (``A [E, R, K]``, ``B [E, N, R]``, ``scale [E]``, ``rank [E]``),
where E = number of adapters and adapter ``i`` has id ``i``; an adapter that does not target the
module has rank 0 there and contributes nothing. Stacks are cached per library version, so adding or
removing an adapter never needs a re-patch.

Training: ``AdapterLibrary.create`` makes new adapters (peft's initialisation),
``lib.parameters(names)`` hands out their factors as leaf tensors for an optimizer, and
``lib.save_peft(name, folder)`` writes a peft folder; see :mod:`loramix_fast.training` for how the
stacks follow the trained factors.
"""
from __future__ import annotations

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

__all__ = ["AdapterLibrary", "LoRAFactors", "ModuleStack", "AdapterError", "BASE"]

BASE = "__base__"  # peft's name for "no adapter"
_PREFIX = "base_model.model."
_LIVE_MAP = ("live-map",)  # key in AdapterLibrary._stacks: {module: ((id, LoRAFactors), ...)}


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
    """Stacked factors of every adapter for one module (padded to the max rank R).

    A [E, R, K], B [E, N, R], scale [E] float32 (float64 for a float64 stack), rank [E] int32;
    adapter id = position in ``names``.
    ``cache`` holds derived data (e.g. SpectR alignment) computed once per stack.
    """

    names: tuple
    A: torch.Tensor
    B: torch.Tensor
    scale: torch.Tensor
    rank: torch.Tensor
    cache: dict = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return self.A.shape[1]


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


def _unpatch_new(model, before: dict) -> None:
    """Undo the patching of every module of ``model`` that was not in ``before`` (a failed add)."""
    st = getattr(model, "_loramix_state", None)
    if st is None:
        return
    for mod in [m for m in st.patched if m not in before]:
        new = st.patched.pop(mod)
        parent_name, _, child = mod.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new.base_layer)


class AdapterLibrary:
    """Named LoRA adapters, stacked per module for the kernels.

    >>> lib = AdapterLibrary.from_peft({"math": "dir/math", "code": "dir/code"})
    >>> lib.names        # ('math', 'code'); adapter id = position

    Training (see :mod:`loramix_fast.training` for the design):

    >>> lib = AdapterLibrary.create(model, {"math": LoRASpec(r=8, alpha=16,
    ...                                      target_modules=["q_proj", "v_proj"])}, seed=0)
    >>> opt = torch.optim.AdamW(lib.parameters(["math"]))   # leaf tensors, requires_grad
    >>> model(ids, adapter_names=names, labels=labels).loss.backward(); opt.step()
    >>> lib.save_peft("math", "out/math")                    # PeftModel.from_pretrained loads it
    """

    def __init__(self):
        self._adapters: dict[str, dict[str, LoRAFactors]] = {}
        self._configs: dict[str, dict] = {}  # peft config per adapter (save_peft writes it back)
        self._live: set = set()  # adapters whose factors may change in place (handed out)
        self._version = 0
        self._stacks: dict = {}
        self._lock = threading.RLock()  # add holds it while it patches models
        self._models: "weakref.WeakSet" = weakref.WeakSet()

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_peft(cls, dirs: dict[str, str]) -> "AdapterLibrary":
        """Load peft ``save_pretrained`` folders, ``{name: folder}``."""
        lib = cls()
        for name, path in dirs.items():
            lib.add_peft(name, path)
        return lib

    def add_peft(self, name: str, path: str) -> None:
        """Load one peft LoRA folder under ``name`` (its config is kept for :meth:`save_peft`)."""
        path = os.fspath(path)
        factors = _read_peft_dir(name, path)
        with open(os.path.join(path, "adapter_config.json")) as f:
            cfg = json.load(f)
        self.add(name, factors, config=cfg)

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
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} is already in the library")
        factors, cfg = create_factors(model, name, spec, seed)
        self.add(name, factors, config=cfg)

    def add(self, name: str, factors: dict[str, LoRAFactors], *, config: dict | None = None
            ) -> None:
        """Add an adapter from ``{module_path: LoRAFactors}``. Patched models pick it up at once.

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
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} is already in the library")
        factors = _checked_factors(name, factors)
        from .patching import _extend_patch, _state

        with self._lock:
            if name in self._adapters:
                raise ValueError(f"adapter {name!r} is already in the library")
            self._check_fits(name, factors)
            models = [(m, dict(_state(m).patched)) for m in self._patched_models()]
            self._adapters[name] = factors
            if config is not None:
                self._configs[name] = dict(config)
            self._bump()
            try:
                for model, _ in models:
                    _extend_patch(model, self)
            except BaseException:
                del self._adapters[name]
                self._configs.pop(name, None)
                self._bump()
                for model, before in models:
                    _unpatch_new(model, before)
                raise

    def _patched_models(self) -> list:
        return [m for m in list(self._models) if getattr(m, "_loramix_state", None) is not None]

    def _check_fits(self, name: str, factors: dict) -> None:
        """AdapterError if a factor's K / N differ from the library's other adapters' on its module
        or from the module's in/out features in a model this library is patched into."""
        from .patching import _state

        for model in self._patched_models():
            patched = _state(model).patched
            for mod, f in factors.items():
                new = patched.get(mod)
                if new is None:
                    continue  # not patched yet: _extend_patch checks it (and add rolls back)
                if f.A.shape[1] != new.in_features or f.B.shape[0] != new.out_features:
                    raise AdapterError(
                        f"adapter {name!r}, module {mod!r}: the patched module of "
                        f"{type(model).__name__} has in={new.in_features}, "
                        f"out={new.out_features}, but A {tuple(f.A.shape)} / B "
                        f"{tuple(f.B.shape)} give K={f.A.shape[1]}, N={f.B.shape[0]}")
        for mod, f in factors.items():
            K, N = f.A.shape[1], f.B.shape[0]
            for other, fs in self._adapters.items():
                g = fs.get(mod)
                if g is not None and (g.A.shape[1] != K or g.B.shape[0] != N):
                    raise AdapterError(
                        f"adapter {name!r}, module {mod!r}: A {tuple(f.A.shape)} / B "
                        f"{tuple(f.B.shape)} do not fit adapter {other!r}'s factors on this "
                        f"module (K={g.A.shape[1]}, N={g.B.shape[0]})")

    def remove(self, name: str) -> None:
        """Remove an adapter; ids of the adapters after it shift down by one."""
        if name not in self._adapters:
            raise KeyError(f"adapter {name!r} is not in the library (have {list(self._adapters)})")
        with self._lock:
            del self._adapters[name]
            self._configs.pop(name, None)
            self._live.discard(name)
            self._bump()

    def _bump(self):
        self._version += 1
        self._stacks.clear()

    # ---- queries ---------------------------------------------------------------------------
    @property
    def names(self) -> tuple:
        return tuple(self._adapters)

    @property
    def version(self) -> int:
        return self._version

    def __len__(self) -> int:
        return len(self._adapters)

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
        models = len(self._patched_models()) if hasattr(self, "_models") else 0
        head += f", patched into {models} model{'s' if models != 1 else ''})" if models else ")"
        return "\n".join([head + (":" if lines else "")] + lines)

    def __contains__(self, name) -> bool:
        return name in self._adapters

    def id_of(self, name: str) -> int:
        """Adapter id of ``name``; -1 for ``"__base__"`` (no adapter)."""
        if name == BASE or name is None:
            return -1
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown adapter {name!r}; the library has {list(self.names)} "
                           f"(or {BASE!r} for none)") from None

    def ids_of(self, names) -> list[int]:
        return [self.id_of(n) for n in names]

    def modules(self) -> set[str]:
        """Every module path targeted by at least one adapter."""
        return {m for fs in self._adapters.values() for m in fs}

    def factors(self, name: str) -> dict[str, LoRAFactors]:
        return self._adapters[name]

    def check_module(self, module: str, in_features: int, out_features: int) -> None:
        """Raise AdapterError naming adapter and module if a factor does not fit the base module."""
        for name, fs in self._adapters.items():
            f = fs.get(module)
            if f is None:
                continue
            if f.A.shape[1] != in_features or f.B.shape[0] != out_features:
                raise AdapterError(
                    f"adapter {name!r}, module {module!r}: LoRA A {tuple(f.A.shape)} / B "
                    f"{tuple(f.B.shape)} do not fit the base module (in={in_features}, "
                    f"out={out_features})")

    def stack(self, module: str, dtype: torch.dtype, device) -> ModuleStack | None:
        """The padded stack of every adapter for ``module`` (cached until the library changes);
        None when no adapter targets the module (or every one that does has rank 0).

        Trainable adapters (:meth:`parameters`): with grad enabled the stack is assembled from
        their factors in each call (differentiable, padding not stored); without grad the cached
        stack is rebuilt whenever one of their factors changed in place since it was built."""
        if self._live:
            live = self._live_factors(module)
            if live:
                return self._live_stack(module, dtype, device, live)
        key = (module, dtype, device)
        try:
            return self._stacks[key]
        except KeyError:
            pass
        with self._lock:
            if self._mark_live(module):  # factors that require grad train through this stack
                return self.stack(module, dtype, device)
            if key not in self._stacks:
                with torch.no_grad():
                    self._stacks[key] = self._build_stack(module, dtype, torch.device(device))
            return self._stacks[key]

    def _live_factors(self, module: str) -> tuple:
        """``((id, LoRAFactors), ...)`` of the live adapters on ``module`` (cached per version)."""
        m = self._stacks.get(_LIVE_MAP)
        if m is None:
            with self._lock:
                m = {}
                for i, n in enumerate(self.names):
                    if n in self._live:
                        for mod, f in self._adapters[n].items():
                            m.setdefault(mod, []).append((i, f))
                m = {k: tuple(v) for k, v in m.items()}
                self._stacks[_LIVE_MAP] = m
        return m.get(module, ())

    def _mark_live(self, module: str) -> bool:
        """Make live the adapters whose factors on ``module`` require grad (set by hand rather
        than through :meth:`parameters`); True if there was one."""
        new = {n for n, fs in self._adapters.items() if n not in self._live and module in fs
               and (fs[module].A.requires_grad or fs[module].B.requires_grad)}
        if new:
            self._live |= new
            self._stacks.pop(_LIVE_MAP, None)
        return bool(new)

    def _live_stack(self, module, dtype, device, live) -> ModuleStack | None:
        key = (module, dtype, device)
        vkey = (module, dtype, device, "versions")
        versions = tuple((f.A._version, f.B._version) for _, f in live)  # read before building
        base = self._stacks.get(key, False)
        if base is False or self._stacks.get(vkey) != versions:
            with self._lock, torch.no_grad():
                base = self._build_stack(module, dtype, torch.device(device))
                self._stacks[key] = base
                self._stacks[vkey] = versions
        if base is None or not torch.is_grad_enabled():
            return base
        train = [(i, f) for i, f in live if f.A.requires_grad or f.B.requires_grad]
        if not train:
            return base
        import torch.nn.functional as F

        dev = base.A.device
        R = base.max_rank
        As = torch.stack([F.pad(f.A.to(device=dev, dtype=dtype), (0, 0, 0, R - f.rank))
                          for _, f in train])
        Bs = torch.stack([F.pad(f.B.to(device=dev, dtype=dtype), (0, R - f.rank))
                          for _, f in train])
        if len(train) == len(base.names):
            A, B = As, Bs
        else:
            ikey = (module, dtype, device, "ids", tuple(i for i, _ in train))
            ids = self._stacks.get(ikey)
            if ids is None:
                ids = self._stacks[ikey] = torch.tensor(ikey[-1], dtype=torch.long, device=dev)
            A = base.A.index_copy(0, ids, As)
            B = base.B.index_copy(0, ids, Bs)
        return ModuleStack(base.names, A, B, base.scale, base.rank)

    # ---- training --------------------------------------------------------------------------
    def _names_arg(self, names) -> list:
        if names is None:
            return list(self.names)
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
            if n not in self._adapters:
                raise KeyError(f"unknown adapter {n!r}; the library has {list(self.names)}")
        return list(dict.fromkeys(names))

    def named_parameters(self, names=None) -> list[tuple[str, torch.Tensor]]:
        """As :meth:`parameters`, with peft's names ``"<module>.lora_A.<adapter>.weight"``."""
        names = self._names_arg(names)
        out = []
        with self._lock:
            for n in names:
                fs = self._adapters[n]
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
            self._stacks.pop(_LIVE_MAP, None)
        for n in names:
            p = (self._configs.get(n) or {}).get("lora_dropout") or 0
            if p:
                warnings.warn(f"adapter {n!r} is configured with lora_dropout={p}; loramix_fast "
                              "trains it without dropout", stacklevel=3)
        return out

    def parameters(self, names=None) -> list[torch.Tensor]:
        """The factors of adapters ``names`` (None: all), ``A [r, K]`` and ``B [N, r]`` per
        module, as leaf tensors with ``requires_grad``, for any torch optimizer.

        They are the library's own storage: an optimizer step updates the adapters every patched
        model serves (the stacks follow, see :meth:`stack`). Rows of one batch may use different
        adapters (``adapter_names``); one backward gives each adapter the gradient of its own rows
        and ``"__base__"`` rows give none. Adapters not named here keep ``requires_grad`` as it
        was and are not in the list, so an optimizer (weight decay included) never touches them;
        :meth:`freeze` stops their gradients. In-place updates through ``.data`` bypass the
        version counters the stacks are checked with: call :meth:`refresh` after them."""
        return [t for _, t in self.named_parameters(names)]

    def freeze(self, names=None) -> None:
        """Stop gradients to adapters ``names`` (None: all); their tensors stay the same objects."""
        for n in self._names_arg(names):
            for f in self._adapters[n].values():
                f.A.requires_grad_(False)
                f.B.requires_grad_(False)

    def refresh(self) -> None:
        """Drop every cached stack (after changing factors in place out of autograd's sight,
        e.g. through ``.data``)."""
        with self._lock:
            self._bump()

    def save_peft(self, name: str, folder) -> None:
        """Write adapter ``name`` as a peft folder (``adapter_config.json`` +
        ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, folder)`` loads
        with the same outputs. An adapter loaded from peft keeps its config (alpha, rank and alpha
        patterns, rsLoRA, target modules); one made by :meth:`create` gets its spec's."""
        from .training import peft_config, write_peft

        if name not in self._adapters:
            raise KeyError(f"unknown adapter {name!r}; the library has {list(self.names)}")
        factors = self._adapters[name]
        cfg = self._configs.get(name)
        if cfg is None:
            cfg = peft_config(factors)
        try:
            write_peft(folder, factors, cfg)
        except AdapterError as e:
            raise AdapterError(f"adapter {name!r}: {e}") from None

    def to(self, device=None, dtype=None) -> "AdapterLibrary":
        """Move every adapter's factors (e.g. to the model's GPU before training); returns self.
        Not after :meth:`parameters` (an optimizer would hold the old tensors)."""
        if isinstance(device, torch.dtype):  # lib.to(torch.float64)
            device, dtype = None, device
        if self._live:
            raise RuntimeError("lib.to() after lib.parameters(): optimizers hold the old tensors; "
                               "move the library before handing out its parameters")
        with self._lock:
            for fs in self._adapters.values():
                for mod, f in fs.items():
                    fs[mod] = LoRAFactors(f.A.to(device=device, dtype=dtype),
                                          f.B.to(device=device, dtype=dtype), f.scale)
            self._bump()
        return self

    def _build_stack(self, module, dtype, device) -> ModuleStack:
        names = self.names
        fs = [self._adapters[n].get(module) for n in names]
        present = [f for f in fs if f is not None]
        if not any(f.rank for f in present):  # no adapter, or rank 0 only: the base module
            return None
        K = present[0].A.shape[1]
        N = present[0].B.shape[0]
        for n, f in zip(names, fs):
            if f is not None and (f.A.shape[1] != K or f.B.shape[0] != N):
                raise AdapterError(f"adapter {n!r}, module {module!r}: shape A {tuple(f.A.shape)}"
                                   f" / B {tuple(f.B.shape)} differs from the other adapters' "
                                   f"(in={K}, out={N})")
        R = max(f.rank for f in present)
        E = len(names)
        A = torch.zeros(E, R, K, dtype=dtype, device=device)
        B = torch.zeros(E, N, R, dtype=dtype, device=device)
        # fp64 stacks keep the scale in fp64 (4*sqrt(2) in fp32 is off by 1e-8: an fp64 model
        # would only be fp32-accurate)
        scale = torch.zeros(E, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                            device=device)
        rank = torch.zeros(E, dtype=torch.int32, device=device)
        for i, f in enumerate(fs):
            if f is None:
                continue
            r = f.rank
            A[i, :r] = f.A.to(device=device, dtype=dtype)
            B[i, :, :r] = f.B.to(device=device, dtype=dtype)
            scale[i] = f.scale
            rank[i] = r
        return ModuleStack(names, A, B, scale, rank)

    # pickle / deepcopy: the lock, the stack cache and the registry of patched models are not
    # state (a patched model's copy re-attaches itself to the library's copy when unpickled)
    def __getstate__(self):
        state = dict(self.__dict__)
        for k in ("_lock", "_models"):
            state.pop(k, None)
        state["_stacks"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._models = weakref.WeakSet()

    def _attach(self, model) -> None:
        self._models.add(model)

    def _detach(self, model) -> None:
        self._models.discard(model)
