"""The public ops, their torch.library registration, PyTorch references and backend routing.

Importing this package loads no extension and no triton; each op resolves its backend per call. Each op
module registers its implementations (one per backend) in the table of :mod:`rellax_fast.ops._backend` and its
extension hook (:mod:`rellax_fast.ops._registry`) at its own import; ``OP_MODULES`` lists the op modules.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._backend import (
    BACKEND_CHOICES,
    BACKENDS,
    BackendUnavailableError,
    availability,
    register_impl,
    register_op,
    registered_ops,
    resolve,
)

_LAZY = {
    "cflora_linear": "rellax_fast.ops.cflora",
    "cflora_linear_ref": "rellax_fast.ops.cflora",
    "semantic_topk": "rellax_fast.ops.topk",
    "semantic_topk_ref": "rellax_fast.ops.topk",
    "seeded_dropout": "rellax_fast.ops.dropout",
    "seeded_dropout_ref": "rellax_fast.ops.dropout",
}

# every op module, imported by all_ops() so that `rellax-fast info` sees each registration
OP_MODULES = ("rellax_fast.ops.cflora", "rellax_fast.ops.topk", "rellax_fast.ops.dropout")

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "BackendUnavailableError",
    "availability",
    "register_impl",
    "register_op",
    "registered_ops",
    "resolve",
    "all_ops",
    *_LAZY,
]


def all_ops() -> list:
    """Import every op module (cheap: no extension, no triton) and return the registered op names."""
    for name in OP_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return registered_ops()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rellax_fast.ops' has no attribute {name!r}")
