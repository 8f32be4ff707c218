"""Functional ops: validate, pick a backend, registered as ``torch.library`` custom ops."""
from .multi_lora import multi_lora_expand, multi_lora_linear  # noqa: F401
try:  # landing separately
    from .spectr import spectr_topk  # noqa: F401
except ImportError:  # pragma: no cover
    from ..reference import spectr_topk  # noqa: F401
