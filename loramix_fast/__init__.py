"""loramix_fast: fused kernels to run many LoRA experts at once on one base model.

    lib = lmf.AdapterLibrary.from_peft({"math": "dir/math", "code": "dir/code"})
    model = lmf.patch(model, lib)
    model(ids, adapter_names=["math", "__base__"])
"""
from . import ops, reference  # noqa: F401
from . import ensemble  # noqa: F401
from .ensemble import ensemble_generate, mix_next_token  # noqa: F401
from .ensemble_weights import elrea_weights, topk_renormalize  # noqa: F401
from .ensemble_scoring import ensemble_logprobs, expert_logprobs, fit_ensemble_weights  # noqa: F401
from .merging import fit_merge_weights, merge, merge_factors  # noqa: F401
from .routing import LearnedRouter  # noqa: F401
from .library_tools import (adapter_gram, adapter_similarity, cluster_experts,  # noqa: F401
                            greedy_expert_subset)
from .adapters import BASE, AdapterError, AdapterLibrary, LoRAFactors, ModuleStack  # noqa: F401
from .modules import MultiLoRALinear  # noqa: F401
from .training import LoRASpec  # noqa: F401
from .routing import (Arrow, PromptCached, PromptDecision, SpectR, Uniform,  # noqa: F401
                      align_stack, record_routing, route_once, routing_report)
from .patching import (PATCH_TABLE, is_patched, patch, set_adapter, set_router,  # noqa: F401
                       unpatch, use_adapters)
from .pipelines import pipeline, pipeline_adapters  # noqa: F401
from .autotune import warmup  # noqa: F401
from . import emlora  # noqa: F401
from .emlora import EMLoRA  # noqa: F401
from . import pelmo  # noqa: F401
from . import elrea  # noqa: F401

__version__ = "0.1.0"
