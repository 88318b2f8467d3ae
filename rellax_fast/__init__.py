"""rellax-fast: ReLLaX (SUBR, SPA, CFLoRA) for LLM-based CTR prediction, with fused kernels.

``import rellax_fast`` is light: it imports no triton, loads no compiled extension and initialises no
CUDA. Public names are resolved lazily on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# every public name of rellax_fast.cflora (its __all__; tests/cflora/test_config_interaction.py checks that the two
# lists agree), resolved from there on first access
_CFLORA_NAMES = (
    "INTERACTIONS",
    "INTERACTION_KINDS",
    "register_interaction",
    "IdentityInteraction",
    "CFLoRAConfig",
    "CFLoRALinear",
    "InteractionGenerator",
    "StaticInteraction",
    "FullInteraction",
    "MoEInteraction",
    "RecRank1Interaction",
    "build_interaction",
    "inject_cflora",
    "cflora_condition",
    "cflora_checkpoint_context_fn",
    "clear_cflora_condition",
    "cflora_layers",
    "cflora_trainable_parameters",
    "get_cflora_config",
    "set_cflora_backend",
    "merge_cflora",
    "unmerge_cflora",
    "merge_and_unload",
    "unload",
    "disable_adapter",
    "cflora_enabled",
    "set_cflora_enabled",
    "print_trainable_parameters",
    "AdapterFileError",
    "save_cflora",
    "load_cflora",
    "cflora_state_dict",
    "load_peft_lora",
    "export_peft_lora",
    "enable_cflora_cond_kwarg",
    "disable_cflora_cond_kwarg",
    "apply_cflora",
    "revert_cflora",
    "cflora_patched_modules",
    "add_cflora_adapter",
    "set_cflora_adapter",
    "delete_cflora_adapter",
    "cflora_adapter_names",
    "active_cflora_adapter",
)
_LAZY = {
    **{name: "rellax_fast.cflora" for name in _CFLORA_NAMES},
    "cflora_linear": "rellax_fast.ops",
    "semantic_topk": "rellax_fast.ops",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rellax_fast' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
