"""loramix_fast: fused kernels to run many LoRA experts at once on one base model."""
from . import ops, reference  # noqa: F401

__version__ = "0.1.0"
