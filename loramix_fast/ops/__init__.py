"""Functional ops: validate, pick a backend, registered as ``torch.library`` custom ops."""
from .multi_lora import multi_lora_expand, multi_lora_linear  # noqa: F401
