"""Patch a Hugging Face model in place so every module targeted by an :class:`AdapterLibrary` serves
all adapters at once; ``unpatch`` restores the original modules.

One engine driven by a table (``PATCH_TABLE``: predicate -> kind of replacement), no per-model code.
Per-sequence selection works like peft: ``model(ids, adapter_names=[...])`` (one name per
sequence; ``"__base__"`` or ``None`` for the base model), ``model.generate(...,
adapter_names=[...])`` (beam search and sampling included), or the ``use_adapters`` context
manager; one name given as a string (``adapter_names="math"``) serves the whole batch, and
``set_adapter`` sets a default adapter for code that cannot pass keyword arguments (peft's habit).
Transformers pipelines: :func:`loramix_fast.pipeline_adapters`. The selection (adapter per
sequence) is kept in a contextvar that every patched layer reads; its token -> adapter map is
built on the input's device once per forward and shape (an encoder-decoder's encoder and decoder
each get theirs) and shared by the layers. The top model's pre-hook sets the selection of
``adapter_names=`` and its always-called post-hook resets it, also when the forward raises. A
patched model's state dict, pickle and deep copy are those of the base model plus the patch:
``save_pretrained`` writes a plain base checkpoint.
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import BASE, AdapterError, AdapterLibrary
from .context import _GENERATING, _ROUTE_CACHE, _SELECTION, Selection
from .modules import MultiLoRALinear
from .pool import active_snapshot
from .training import keep_context_in_checkpoints

__all__ = ["patch", "unpatch", "use_adapters", "set_router", "set_adapter", "PATCH_TABLE",
           "is_patched"]


def _is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or (isinstance(m, nn.Linear) and not isinstance(m, MultiLoRALinear))


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and m.weight.dim() == 2


# predicate -> kind of MultiLoRALinear; first match wins (peft-style dispatch)
PATCH_TABLE: list = [(_is_linear, "linear"), (_is_conv1d, "conv1d")]


@dataclass(eq=False)
class PatchState:
    """Shared by every patched layer of one model. Holds no device: token maps are built on each
    forward's input device, stacks on each layer's weight device."""

    lib: AdapterLibrary
    router: object = None
    hooks: list = field(default_factory=list)
    patched: dict = field(default_factory=dict)  # name -> MultiLoRALinear
    record: object = None  # routing report recorder (opt-in)
    last_record: object = None  # the report of the last recording (kept after it stops)
    default_adapter: object = None  # lmf.set_adapter: the adapter of forwards that name none
    _default_sel: object = None  # (library version, Selection) of default_adapter
    model_ref: object = None  # weakref to the patched model (attached to the library on unpickle)

    # ---- a listener of the library (lib.subscribe): the library knows no model ------------
    def check_adapter(self, lib, name: str, factors: dict) -> None:
        """AdapterError if a factor of adapter ``name`` does not fit a patched module's in / out
        features (modules not patched yet are checked when :meth:`adapter_added` patches them)."""
        model = self.model_ref() if self.model_ref is not None else None
        for mod, f in factors.items():
            new = self.patched.get(mod)
            if new is None:
                continue
            if f.A.shape[1] != new.in_features or f.B.shape[0] != new.out_features:
                raise AdapterError(
                    f"adapter {name!r}, module {mod!r}: the patched module of "
                    f"{type(model).__name__} has in={new.in_features}, "
                    f"out={new.out_features}, but A {tuple(f.A.shape)} / B "
                    f"{tuple(f.B.shape)} give K={f.A.shape[1]}, N={f.B.shape[0]}")

    def adapter_added(self, lib, name: str):
        """Patch the modules the new adapter ``name`` targets; returns the undo (a failed add),
        or None. Leaves the model as it was when it raises."""
        model = self.model_ref() if self.model_ref is not None else None
        if model is None or getattr(model, "_loramix_state", None) is not self:
            return None
        before = set(self.patched)
        try:
            _extend_patch(model, lib)
        except BaseException:
            self._unpatch_new(model, before)
            raise
        return lambda: self._unpatch_new(model, before)

    def _unpatch_new(self, model, before: set) -> None:
        """Put back the base layer of every module patched since ``before``."""
        for mod in [m for m in self.patched if m not in before]:
            new = self.patched.pop(mod)
            parent_name, _, child = mod.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new.base_layer)

    # pickle / deepcopy: the library's lock and registry of models are not state; the copy of the
    # model is attached to the copy of the library when this state is rebuilt
    def __getstate__(self):
        state = dict(self.__dict__)
        state["model_ref"] = self.model_ref() if self.model_ref is not None else None
        state["_default_sel"] = None  # derived (rebuilt on the next forward)
        return state

    def __setstate__(self, state):
        model = state.pop("model_ref", None)
        self.__dict__.update(state)
        self.model_ref = weakref.ref(model) if model is not None else None
        if model is not None:
            self.lib.subscribe(self)


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "_loramix_state", None) is not None


def _state(model) -> PatchState:
    st = getattr(model, "_loramix_state", None)
    if st is None:
        raise ValueError("model is not patched by loramix_fast (call lmf.patch(model, lib) first)")
    return st


def patch(model: nn.Module, lib: AdapterLibrary, router=None) -> nn.Module:
    """Swap, in place, every module an adapter of ``lib`` targets for a :class:`MultiLoRALinear`.

    Args:
        model: a Hugging Face (or any) ``nn.Module``; module paths match peft's adapter keys.
        lib: the adapters. Adding/removing adapters later needs no re-patch.
        router: None (per-sequence selection with ``adapter_names``) or a router
            (``lmf.SpectR``, ``lmf.Arrow``, ``lmf.Uniform``, ``lmf.PromptCached``) that picks
            experts per token and layer when no ``adapter_names`` are given.
    Returns the same model.

    Selecting adapters afterwards: ``model(ids, adapter_names=[...])`` with one entry per
    sequence, each an adapter name, ``"__base__"`` or ``None`` (the base model for that sequence);
    ``adapter_names="name"`` (a string) serves every sequence of the batch with one adapter;
    ``lmf.set_adapter(model, name)`` makes ``name`` the default of forwards that pass none. An
    explicit selection (either kind) takes precedence over the router.
    """
    # every argument is checked before the model is touched: a failed patch leaves it as it was
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(lib, AdapterLibrary):
        raise TypeError(f"lib must be an AdapterLibrary, got {type(lib).__name__}")
    _check_router(router)
    if is_patched(model):
        raise ValueError("model is already patched; add adapters to its library (no re-patch "
                         "needed) or call lmf.unpatch(model) first")
    had_guard = _remove_guard(model)  # a model patched, unpatched and patched again
    st = PatchState(lib=lib, model_ref=weakref.ref(model))
    object.__setattr__(model, "_loramix_state", st)
    try:
        _extend_patch(model, lib)
        st.hooks.append(model.register_forward_pre_hook(_pre_hook, with_kwargs=True))
        st.hooks.append(model.register_forward_hook(_post_hook, with_kwargs=True,
                                                    always_call=True))
        if hasattr(model, "generate"):
            model.generate = _Generate(model)
        lib.subscribe(st)
        if router is not None:
            set_router(model, router)
    except BaseException:
        unpatch(model, guard=had_guard)
        raise
    return model


class _Generate:
    """``model.generate`` of a patched model: takes ``adapter_names`` (one per input sequence,
    repeated over beams / ``num_return_sequences``) and scopes the routers' cache to the call.
    A plain object (not a closure), so a patched model pickles and deep-copies."""

    def __init__(self, model):
        self.model = model
        self.__doc__ = type(model).generate.__doc__

    def __reduce__(self):
        return (_Generate, (self.model,))

    def __call__(self, *args, adapter_names=None, prompt_mask=None, **kwargs):
        model = self.model
        st = _state(model)
        if prompt_mask is not None:
            _check_prompt_mask_use(st, adapter_names)
        if st.record is not None:  # the forwards of this call are one run of the report
            st.record.begin_generate()
        with contextlib.ExitStack() as es:
            if active_snapshot(st.lib) is None:  # every step sees the library as of the call
                es.enter_context(st.lib.pinned(_needed(st, adapter_names)))
            es.enter_context(_route_cache_scope())
            if prompt_mask is not None:  # read by the router at the prompt's forward only
                _ROUTE_CACHE.get()["prompt_mask"] = prompt_mask
            es.enter_context(_set(_GENERATING, _GENERATING.get() + (st,)))
            if adapter_names is not None:
                es.enter_context(use_adapters(model, adapter_names))
            return type(model).generate(model, *args, **kwargs)


def _check_prompt_mask_use(st: PatchState, adapter_names, always: bool = False) -> None:
    sel = _SELECTION.get()
    if (always or adapter_names is not None or (sel is not None and sel.state is st)
            or not getattr(st.router, "reads_prompt_mask", False)):
        raise ValueError("prompt_mask= is read by lmf.PromptCached routing only (set it with "
                         "lmf.set_router; it cannot be combined with adapter_names)")


def _extend_patch(model: nn.Module, lib: AdapterLibrary) -> None:
    """Patch modules targeted by ``lib`` that are not patched yet (called by patch and lib.add)."""
    st = _state(model)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name in sorted(lib.modules()):
        if name in st.patched:
            continue
        owners = lib.owners(name)
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"adapter {owners[0]!r} targets module {name!r}, which the model "
                               f"({type(model).__name__}) does not have") from None
        if isinstance(mod, MultiLoRALinear):
            continue
        if out_emb is not None and mod is out_emb:
            raise AdapterError(f"adapter {owners[0]!r} targets the LM head {name!r}; LM-head "
                               "targets are not supported yet")
        if isinstance(mod, nn.Embedding):
            raise AdapterError(f"adapter {owners[0]!r} targets embedding {name!r}; embedding "
                               "targets are not supported yet")
        kind = next((k for pred, k in PATCH_TABLE if pred(mod)), None)
        if kind is None:
            raise AdapterError(f"adapter {owners[0]!r} targets module {name!r} of type "
                               f"{type(mod).__name__}, which loramix_fast cannot patch (supported: "
                               "nn.Linear, transformers Conv1D)")
        new = MultiLoRALinear(mod, name, st, kind)
        lib.check_module(name, new.in_features, new.out_features)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        st.patched[name] = new


def _unpatched_guard(model, args, kwargs):
    """Forward pre-hook ``unpatch`` leaves behind: transformers models take ``**kwargs`` and would
    silently ignore ``adapter_names``; this refuses it instead. Inert while the model is patched
    (a copy of an unpatched model, patched again)."""
    if "adapter_names" in kwargs and not is_patched(model):
        raise TypeError("adapter_names= was passed to a model that lmf.unpatch() restored to its "
                        "base modules, which would silently ignore it; patch it again "
                        "(lmf.patch(model, lib)) to serve adapters, or drop the argument")
    return None


def _remove_guard(model: nn.Module) -> bool:
    keys = [k for k, h in model._forward_pre_hooks.items() if h is _unpatched_guard]
    for k in keys:
        model._forward_pre_hooks.pop(k, None)
        model._forward_pre_hooks_with_kwargs.pop(k, None)
    return bool(keys)


def unpatch(model: nn.Module, guard: bool = True) -> nn.Module:
    """Put the original modules back and remove hooks; outputs are bit-identical to before.

    ``guard`` (default True): leave one forward pre-hook that raises a TypeError when
    ``adapter_names=`` is passed to the restored model (a transformers model would silently
    ignore it and run the base model); ``lmf.patch`` removes it, ``guard=False`` leaves no
    trace."""
    st = _state(model)
    for name, new in st.patched.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new.base_layer)
    st.patched.clear()
    for h in st.hooks:
        h.remove()
    st.hooks.clear()
    if isinstance(model.__dict__.get("generate"), _Generate):
        del model.__dict__["generate"]
    st.lib.unsubscribe(st)
    object.__setattr__(model, "_loramix_state", None)
    del model.__dict__["_loramix_state"]
    if guard:
        model.register_forward_pre_hook(_unpatched_guard, with_kwargs=True)
    return model


def _check_router(router) -> None:
    if router is None or callable(getattr(router, "forward", None)):
        return
    hint = ""
    if isinstance(router, str):
        known = {"spectr": "lmf.SpectR()", "arrow": "lmf.Arrow()", "uniform": "lmf.Uniform()",
                 "promptcached": "lmf.PromptCached(lmf.SpectR())"}
        if router.lower().replace("_", "") in known:
            hint = f" (pass {known[router.lower().replace('_', '')]}, not the string {router!r})"
    raise TypeError("router must be None or a loramix_fast router instance (lmf.SpectR(...), "
                    "lmf.Arrow(...), lmf.Uniform(), lmf.PromptCached(...)), got "
                    f"{type(router).__name__} {router!r}{hint}")


def set_router(model: nn.Module, router) -> None:
    """Switch the router of a patched model (None: base model unless adapter_names are given).

    A router whose ``top_k`` exceeds the number of adapters in the library is clamped to it, with
    a UserWarning (every token then mixes every expert)."""
    st = _state(model)
    _check_router(router)
    if router is not None and hasattr(router, "bind"):
        router.bind(st)
    _warn_top_k(router, len(st.lib))
    st.router = router


def _warn_top_k(router, n_experts: int) -> None:
    inner = getattr(router, "router", router)  # PromptCached(SpectR(...))
    warn = getattr(inner, "_warn_clamp", None)
    k = getattr(inner, "top_k", None)
    if warn is not None and isinstance(k, int) and 0 < n_experts < k:
        warn(n_experts)


def set_adapter(model: nn.Module, name) -> None:
    """Make adapter ``name`` the default of every forward (and ``generate``) of a patched model
    that passes no ``adapter_names`` (peft's ``set_adapter`` habit, for code that cannot pass
    keyword arguments: pipelines, evaluation harnesses). ``None`` or ``"__base__"`` clears it.
    ``adapter_names=`` and ``lmf.use_adapters`` take precedence over it; while a default is set
    the router is not used (clear the default to route again)."""
    st = _state(model)
    if name is None or name == BASE:
        st.default_adapter, st._default_sel = None, None
        return
    if not isinstance(name, str):
        raise TypeError(f"set_adapter takes one adapter name (a string), None or {BASE!r}, got "
                        f"{type(name).__name__} {name!r}; per-sequence adapters go in "
                        "adapter_names=[...]")
    st.lib.id_of(name)  # KeyError naming the library's adapters
    st.default_adapter, st._default_sel = name, None


def _default_selection(st: PatchState) -> Selection:
    cached = st._default_sel
    if cached is None or cached[0] != st.lib.version:  # ids shift when adapters are removed
        cached = (st.lib.version, Selection(st, [st.lib.id_of(st.default_adapter)],
                                            broadcast=True))
        st._default_sel = cached
    return cached[1]


def _selection(st: PatchState, adapter_names) -> Selection:
    """A list: one entry per sequence (an adapter name; ``"__base__"`` or None: the base model).
    A string: that adapter for every sequence of the batch."""
    if isinstance(adapter_names, str):
        return Selection(st, [st.lib.id_of(adapter_names)], broadcast=True)
    if not hasattr(adapter_names, "__iter__"):
        raise TypeError("adapter_names must be a list with one adapter name per sequence "
                        f"({BASE!r} or None for the base model), or one name as a string for "
                        f"the whole batch; got {type(adapter_names).__name__} {adapter_names!r}")
    names = list(adapter_names)
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad:
        raise TypeError("adapter_names entries must be adapter names (str), "
                        f"{BASE!r} or None; got {type(bad[0]).__name__} {bad[0]!r}")
    return Selection(st, st.lib.ids_of(names))


def _needed(st: PatchState, adapter_names):
    """The adapters a forward may select (what a ``max_resident`` library must load): the names
    given, else the default adapter, else every adapter under a router, else none."""
    if adapter_names is not None:
        if isinstance(adapter_names, str):
            return [adapter_names]
        return list(adapter_names) if hasattr(adapter_names, "__iter__") else []
    default = getattr(st, "default_adapter", None)  # lmf.set_adapter
    if default is not None:
        return [default]
    return None if st.router is not None else []


@contextlib.contextmanager
def _set(var: contextvars.ContextVar, value):
    tok = var.set(value)
    try:
        yield
    finally:
        var.reset(tok)


@contextlib.contextmanager
def use_adapters(model: nn.Module, adapter_names):
    """Context manager: every forward of ``model`` inside uses ``adapter_names`` (one per sequence,
    ``"__base__"`` or None for none; or one name as a string for every sequence), for code that
    cannot pass ``adapter_names=`` itself."""
    st = _state(model)
    with contextlib.ExitStack() as es:
        if active_snapshot(st.lib) is None:  # the ids stay those of the library as of now
            es.enter_context(st.lib.pinned(_needed(st, adapter_names)))
        es.enter_context(_set(_SELECTION, _selection(st, adapter_names)))
        yield model


@contextlib.contextmanager
def _route_cache_scope():
    with _set(_ROUTE_CACHE, {}):
        yield


# contextvar resets to undo in the post-hook: one (state, resets) entry per forward in flight
_HOOK_TOKENS: contextvars.ContextVar[tuple] = contextvars.ContextVar("loramix_hook_tokens",
                                                                     default=())


def _input_shape(args, kwargs):
    for key in ("input_ids", "inputs_embeds"):
        t = kwargs.get(key)
        if t is not None:
            return t.shape[0], t.shape[1], t.device
    if args and isinstance(args[0], torch.Tensor):
        t = args[0]
        return t.shape[0], (t.shape[1] if t.dim() > 1 else 1), t.device
    return None


def _undo(resets) -> None:
    for var, tok in reversed(resets):
        try:
            var.reset(tok)
        except (ValueError, RuntimeError):  # token of another context: put the value back by hand
            old = tok.old_value
            var.set(None if old is contextvars.Token.MISSING else old)


def _unwind(stack: tuple, i: int) -> None:
    """Undo entries ``i:`` of the hook stack (innermost first) and drop them."""
    for _, resets in reversed(stack[i:]):
        _undo(resets)
    _HOOK_TOKENS.set(stack[:i])


def _pre_hook(model, args, kwargs):
    st = model._loramix_state
    stack = _HOOK_TOKENS.get()
    for i, (s, _) in enumerate(stack):
        if s is st:  # a forward of this model whose post-hook never ran (KeyboardInterrupt)
            _unwind(stack, i)
            break
    resets = []
    try:
        names = kwargs.pop("adapter_names", None)
        if active_snapshot(st.lib) is None:  # the forward sees the library as of its start
            resets.append(st.lib._pin_context(_needed(st, names)))
        if names is not None:
            resets.append((_SELECTION, _SELECTION.set(_selection(st, names))))
        elif st.default_adapter is not None:
            cur = _SELECTION.get()
            if cur is None or cur.state is not st:  # lmf.set_adapter's default
                resets.append((_SELECTION, _SELECTION.set(_default_selection(st))))
        if st.router is not None and _ROUTE_CACHE.get() is None:  # routers' per-forward cache
            resets.append((_ROUTE_CACHE, _ROUTE_CACHE.set({})))
        sel = _SELECTION.get()
        if model.training and torch.is_grad_enabled():  # HF recomputes layers in the backward
            keep_context_in_checkpoints(model)
        shape = _input_shape(args, kwargs)
        if st.record is not None:  # the report keeps each forward's tokens and mask
            st.record.begin_forward(st, args, kwargs, sel if sel is not None and sel.state is st
                                    else None, generating=st in _GENERATING.get())
        if sel is not None and sel.state is st:
            if shape is not None:  # check the names against the batch now, build the map once
                sel.token_map(shape[0], shape[1], shape[2], expand=st in _GENERATING.get())
        elif st.router is not None and hasattr(st.router, "begin_forward"):
            st.router.begin_forward(st, args, kwargs, shape[:2] if shape is not None else None)
        if kwargs.pop("prompt_mask", None) is not None:  # a router that reads it popped it
            _check_prompt_mask_use(st, names, always=True)
    except BaseException:
        _undo(resets)  # a failed pre-hook leaves no selection behind
        raise
    _HOOK_TOKENS.set(_HOOK_TOKENS.get() + ((st, resets),))
    return args, kwargs


def _post_hook(model, args, kwargs, output):
    # always_call: runs when the forward raised too, so no selection outlives its forward
    st = model.__dict__.get("_loramix_state")
    stack = _HOOK_TOKENS.get()
    for i in range(len(stack) - 1, -1, -1):
        if stack[i][0] is st:
            _unwind(stack, i)
            break
    return None
