"""Functional ops: validate, pick a backend (Triton / C++ / reference), registered as
``torch.library`` custom ops with fake implementations."""
from .mix_logits import mix_logits, mix_logits_greedy, mix_logits_sample  # noqa: F401
from .multi_lora import (multi_lora_add_, multi_lora_add_kernel, multi_lora_expand,  # noqa: F401
                         multi_lora_linear)
from .spectr import spectr_topk  # noqa: F401
from . import backward  # noqa: F401,E402  (registers every op's backward)
