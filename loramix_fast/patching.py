"""Patch a Hugging Face model in place so every module targeted by an :class:`AdapterLibrary` serves
all adapters at once; ``unpatch`` restores the original modules.

One engine driven by a table (``PATCH_TABLE``: predicate -> kind of replacement), no per-model code.
Per-sequence selection works like peft: ``model(ids, adapter_names=[...])``,
``model.generate(..., adapter_names=[...])`` (beam search and sampling included), or the
``use_adapters`` context manager. The token -> adapter map is built once per forward in the top
model's pre-hook and kept in a contextvar that every patched layer reads.
"""
from __future__ import annotations

import contextlib
import contextvars
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import BASE, AdapterError, AdapterLibrary
from .context import _ROUTE_CACHE, _SELECTION, _TOKENS, Selection, token_map
from .modules import MultiLoRALinear

__all__ = ["patch", "unpatch", "use_adapters", "set_router", "PATCH_TABLE", "is_patched"]


def _is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or (isinstance(m, nn.Linear) and not isinstance(m, MultiLoRALinear))


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and m.weight.dim() == 2


# predicate -> kind of MultiLoRALinear; first match wins (peft-style dispatch)
PATCH_TABLE: list = [(_is_linear, "linear"), (_is_conv1d, "conv1d")]


@dataclass
class PatchState:
    """Shared by every patched layer of one model."""

    lib: AdapterLibrary
    router: object = None
    device: torch.device = None
    hooks: list = field(default_factory=list)
    patched: dict = field(default_factory=dict)  # name -> MultiLoRALinear
    record: object = None  # routing report recorder (opt-in)


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
    """
    if not isinstance(lib, AdapterLibrary):
        raise TypeError(f"lib must be an AdapterLibrary, got {type(lib).__name__}")
    if is_patched(model):
        raise ValueError("model is already patched; add adapters to its library (no re-patch "
                         "needed) or call lmf.unpatch(model) first")
    p = next(model.parameters(), None)
    st = PatchState(lib=lib, device=p.device if p is not None else torch.device("cpu"))
    object.__setattr__(model, "_loramix_state", st)
    try:
        _extend_patch(model, lib)
    except Exception:
        unpatch(model)
        raise
    st.hooks.append(model.register_forward_pre_hook(_pre_hook, with_kwargs=True))
    st.hooks.append(model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True))
    if hasattr(model, "generate"):
        orig = type(model).generate

        def generate(self, *args, adapter_names=None, **kwargs):
            with contextlib.ExitStack() as es:
                es.enter_context(_route_cache_scope())
                if adapter_names is not None:
                    es.enter_context(use_adapters(self, adapter_names))
                return orig(self, *args, **kwargs)

        generate.__doc__ = orig.__doc__
        model.generate = types.MethodType(generate, model)
    lib._attach(model)
    if router is not None:
        set_router(model, router)
    return model


def _extend_patch(model: nn.Module, lib: AdapterLibrary) -> None:
    """Patch modules targeted by ``lib`` that are not patched yet (called by patch and lib.add)."""
    st = _state(model)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name in sorted(lib.modules()):
        if name in st.patched:
            continue
        owners = [a for a in lib.names if name in lib.factors(a)]
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


def unpatch(model: nn.Module) -> nn.Module:
    """Put the original modules back and remove hooks; outputs are bit-identical to before."""
    st = _state(model)
    for name, new in st.patched.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new.base_layer)
    st.patched.clear()
    for h in st.hooks:
        h.remove()
    st.hooks.clear()
    if "generate" in model.__dict__:
        del model.__dict__["generate"]
    st.lib._detach(model)
    object.__setattr__(model, "_loramix_state", None)
    del model.__dict__["_loramix_state"]
    return model


def set_router(model: nn.Module, router) -> None:
    """Switch the router of a patched model (None: base model unless adapter_names are given)."""
    st = _state(model)
    if router is not None and not hasattr(router, "forward"):
        raise TypeError(f"router must be a loramix_fast router (SpectR, Arrow, Uniform, "
                        f"PromptCached) or None, got {type(router).__name__}")
    if router is not None and hasattr(router, "bind"):
        router.bind(st)
    st.router = router


def _seq_ids(st: PatchState, adapter_names) -> torch.Tensor | None:
    if isinstance(adapter_names, str):
        raise TypeError("adapter_names must be a list with one adapter name per sequence "
                        f"(or {BASE!r}), not a string")
    ids = st.lib.ids_of(list(adapter_names))
    if all(i < 0 for i in ids):
        return torch.full((len(ids),), -1, dtype=torch.int32, device=st.device)
    return torch.tensor(ids, dtype=torch.int32, device=st.device)


@contextlib.contextmanager
def use_adapters(model: nn.Module, adapter_names):
    """Context manager: every forward of ``model`` inside uses ``adapter_names`` (one per sequence,
    ``"__base__"`` for none), for code that cannot pass ``adapter_names=`` itself."""
    st = _state(model)
    tok = _SELECTION.set(Selection(st, _seq_ids(st, adapter_names)))
    try:
        yield model
    finally:
        _SELECTION.reset(tok)


@contextlib.contextmanager
def _route_cache_scope():
    tok = _ROUTE_CACHE.set({})
    try:
        yield
    finally:
        _ROUTE_CACHE.reset(tok)


# contextvar resets to undo in the post-hook, one tuple per forward in flight
_HOOK_TOKENS: contextvars.ContextVar[tuple] = contextvars.ContextVar("loramix_hook_tokens",
                                                                     default=())


def _input_shape(args, kwargs):
    for key in ("input_ids", "inputs_embeds"):
        t = kwargs.get(key)
        if t is not None:
            return t.shape[0], t.shape[1]
    if args and isinstance(args[0], torch.Tensor):
        t = args[0]
        return t.shape[0], (t.shape[1] if t.dim() > 1 else 1)
    return None


def _pre_hook(model, args, kwargs):
    st = model._loramix_state
    resets = []
    names = kwargs.pop("adapter_names", None)
    if names is not None:
        resets.append((_SELECTION, _SELECTION.set(Selection(st, _seq_ids(st, names)))))
    if st.router is not None and _ROUTE_CACHE.get() is None:  # routers' per-forward cache
        resets.append((_ROUTE_CACHE, _ROUTE_CACHE.set({})))
    sel = _SELECTION.get()
    shape = _input_shape(args, kwargs)
    if sel is not None and sel.state is st and shape is not None:
        resets.append((_TOKENS, _TOKENS.set((st, token_map(sel.seq_ids, *shape)))))
    elif st.router is not None and hasattr(st.router, "begin_forward"):
        st.router.begin_forward(st, args, kwargs, shape)
    _HOOK_TOKENS.set(_HOOK_TOKENS.get() + (resets,))
    return args, kwargs


def _post_hook(model, args, kwargs, output):
    stack = _HOOK_TOKENS.get()
    if not stack:
        return None
    resets = stack[-1]
    _HOOK_TOKENS.set(stack[:-1])
    for var, tok in reversed(resets):
        var.reset(tok)
    return None
