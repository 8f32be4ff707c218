"""Transformers pipelines over a patched model, with one adapter per request.

A pipeline hands its keyword arguments to every batch it runs, whole: ``pipe(prompts,
adapter_names=[...])`` on a plain pipeline gives every batch the full list (6 names for a batch of
4 fails). :func:`pipeline_adapters` makes a pipeline adapter-aware: each prompt is tagged with its
name before the pipeline preprocesses it, the tags are batched with the prompts (whatever
``batch_size``, ``num_workers`` or the order of batches), and each batch runs under the names of
its own prompts (``lmf.use_adapters`` around the pipeline's forward, so ``num_return_sequences``
and beam search follow too)::

    pipe = lmf.pipeline_adapters(transformers.pipeline("text-generation", model=model,
                                                       tokenizer=tok, batch_size=4))
    outs = pipe(prompts, adapter_names=["math", "code", "__base__", ...], max_new_tokens=32)

One name as a string (``adapter_names="math"``) serves every prompt, on a plain pipeline too.
For a pipeline you cannot wrap, ``lmf.set_adapter(model, name)`` sets a default adapter.
"""
from __future__ import annotations

from collections.abc import MutableMapping

from .adapters import BASE
from .patching import is_patched, use_adapters

__all__ = ["pipeline_adapters", "pipeline"]

_KEY = "_loramix_adapter_name"  # the tag carried in each preprocessed item


class _Named:
    """A pipeline input and the adapter name that serves it."""

    __slots__ = ("item", "name")

    def __init__(self, item, name):
        self.item, self.name = item, (BASE if name is None else name)  # None: the base model

    def __repr__(self):
        return f"_Named({self.item!r}, {self.name!r})"


def _is_message(x) -> bool:
    return isinstance(x, dict) and "role" in x and "content" in x


def _is_chat(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and _is_message(x[0])


def _adapter_class(cls):
    """A subclass of pipeline class ``cls`` whose calls take ``adapter_names`` per input (a plain
    subclass, so an instance's ``__class__`` can be switched to it)."""

    class AdapterPipeline(cls):
        _loramix_adapters = True

        def __call__(self, inputs, *args, adapter_names=None, **kwargs):
            if adapter_names is None:
                return super().__call__(inputs, *args, **kwargs)
            broadcast = isinstance(adapter_names, str)
            if isinstance(inputs, tuple):
                inputs = list(inputs)
            if isinstance(inputs, (str, dict)) or _is_chat(inputs):  # one input
                names = [adapter_names] if broadcast else list(adapter_names)
                if len(names) != 1:
                    raise ValueError(f"adapter_names has {len(names)} names for one input; pass "
                                     "one name (a string, or a list of one)")
                return super().__call__([_Named(inputs, names[0])], *args, **kwargs)[0]
            if isinstance(inputs, list):
                names = [adapter_names] * len(inputs) if broadcast else list(adapter_names)
                if len(names) != len(inputs):
                    raise ValueError(f"adapter_names has {len(names)} names for {len(inputs)} "
                                     "inputs; pass one adapter name per input (or one name as a "
                                     "string for all)")
                return super().__call__([_Named(x, n) for x, n in zip(inputs, names)], *args,
                                        **kwargs)
            # a generator or a dataset: tagged lazily, the lengths checked as it runs
            tagged = ((_Named(x, adapter_names) for x in inputs) if broadcast
                      else _strict_zip(inputs, adapter_names))
            return super().__call__(tagged, *args, **kwargs)

        def preprocess(self, inputs, *args, **kwargs):
            if not isinstance(inputs, _Named):
                return super().preprocess(inputs, *args, **kwargs)
            item = inputs.item
            if _is_chat(item):  # what Pipeline.__call__ does for untagged chats
                from transformers.pipelines.base import Chat

                item = Chat(item)
            out = super().preprocess(item, *args, **kwargs)
            if not isinstance(out, MutableMapping):
                raise TypeError(f"{type(self).__name__}: lmf.pipeline_adapters needs a pipeline "
                                "whose preprocess returns one dict per input")
            out[_KEY] = inputs.name
            return out

        def _forward(self, model_inputs, *args, **forward_params):
            names = (model_inputs.pop(_KEY, None) if isinstance(model_inputs, MutableMapping)
                     else None)
            if names is None:
                return super()._forward(model_inputs, *args, **forward_params)
            if isinstance(names, str):  # batch_size=1: the item itself, not collated
                names = [names]
            with use_adapters(self.model, list(names)):
                return super()._forward(model_inputs, *args, **forward_params)

    AdapterPipeline.__name__ = cls.__name__
    AdapterPipeline.__qualname__ = cls.__qualname__
    AdapterPipeline.__module__ = cls.__module__
    AdapterPipeline.__doc__ = cls.__doc__
    return AdapterPipeline


def _strict_zip(inputs, names):
    names = iter(names)
    for x in inputs:
        n = next(names, _END)
        if n is _END:
            raise ValueError("adapter_names ran out before the inputs: pass one name per input")
        yield _Named(x, n)
    if next(names, _END) is not _END:
        raise ValueError("adapter_names has more names than inputs: pass one name per input")


_END = object()
_CLASSES: dict = {}


def pipeline_adapters(pipe):
    """Make a transformers pipeline over a patched model serve one adapter per request: after
    this, ``pipe(inputs, adapter_names=[one name per input])`` runs each input with its own
    adapter (``"__base__"`` / None: the base model) through the pipeline's batching
    (``batch_size``, ``num_workers``); one name as a string serves every input. Works for
    pipelines whose preprocess returns one dict per input (text-generation, text2text,
    feature-extraction, text-classification, ...; not chunked pipelines such as question
    answering). Changes ``pipe`` in place (its class gains a mixin) and returns it.

    >>> pipe = lmf.pipeline_adapters(transformers.pipeline("text-generation", model=model,
    ...                                                    tokenizer=tok, batch_size=4))
    >>> pipe(prompts, adapter_names=["math", "code", "__base__", "math"], max_new_tokens=16)
    """
    from transformers.pipelines.base import ChunkPipeline, Pipeline

    if not isinstance(pipe, Pipeline):
        raise TypeError(f"pipeline_adapters takes a transformers Pipeline, got "
                        f"{type(pipe).__name__}")
    if isinstance(pipe, ChunkPipeline):
        raise TypeError(f"{type(pipe).__name__} splits each input into chunks; "
                        "lmf.pipeline_adapters supports pipelines with one model row per input "
                        "(use lmf.set_adapter(model, name) per call instead)")
    if not is_patched(pipe.model):
        raise ValueError("the pipeline's model is not patched by loramix_fast (call "
                         "lmf.patch(model, lib) before building the pipeline)")
    cls = type(pipe)
    if getattr(cls, "_loramix_adapters", False):
        return pipe
    new = _CLASSES.get(cls)
    if new is None:
        new = _CLASSES[cls] = _adapter_class(cls)
    pipe.__class__ = new
    return pipe


def pipeline(*args, **kwargs):
    """``transformers.pipeline(*args, **kwargs)`` made adapter-aware with
    :func:`pipeline_adapters` (the model must be patched already)."""
    import transformers

    return pipeline_adapters(transformers.pipeline(*args, **kwargs))

