"""rellax-fast: ReLLaX (SUBR, SPA, CFLoRA) for LLM-based CTR prediction, with fused kernels.

``import rellax_fast`` is light: it imports no triton, loads no compiled extension and initialises no
CUDA. Public names are resolved lazily on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "CFLoRAConfig": "rellax_fast.cflora",
    "inject_cflora": "rellax_fast.cflora",
    "cflora_condition": "rellax_fast.cflora",
    "save_cflora": "rellax_fast.cflora",
    "load_cflora": "rellax_fast.cflora",
    "merge_cflora": "rellax_fast.cflora",
    "unmerge_cflora": "rellax_fast.cflora",
    "set_cflora_backend": "rellax_fast.cflora",
    "load_peft_lora": "rellax_fast.cflora",
    "export_peft_lora": "rellax_fast.cflora",
    "print_trainable_parameters": "rellax_fast.cflora",
    "disable_adapter": "rellax_fast.cflora",
    "unload": "rellax_fast.cflora",
    "merge_and_unload": "rellax_fast.cflora",
    "enable_cflora_cond_kwarg": "rellax_fast.cflora",
    "apply_cflora": "rellax_fast.cflora",
    "revert_cflora": "rellax_fast.cflora",
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
