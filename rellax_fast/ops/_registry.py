"""Access to the compiled torch.library ops, with their Python-side fake and autograd registrations.

Ops defined in C++ (``csrc/``) get their fake (meta) implementation and autograd formula in Python,
as in pytorch/extension-cpp. Each op module lists a ``_register_ext`` hook; it runs once, right after
``rellax_fast._C`` is loaded, the first time an op needs the extension.
"""

from __future__ import annotations

import importlib
from typing import Callable, List

import torch

from .. import _ext

# modules whose _register_ext() must run after _C is loaded
_EXT_MODULES: List[str] = [
    "rellax_fast.ops.dropout",
    "rellax_fast.ops.cflora",
    "rellax_fast.ops.topk",
]
_registered = False


def ensure_ext_registered() -> None:
    """Load _C (raising with the reason if it is missing) and register fakes/autograd once."""
    global _registered
    _ext.require()
    if _registered:
        return
    _registered = True
    for name in _EXT_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        hook = getattr(mod, "_register_ext", None)
        if hook is not None:
            hook()


def ext_op(name: str) -> Callable:
    """``torch.ops.rellax_fast.<name>`` with the extension loaded and registered."""
    ensure_ext_registered()
    return getattr(torch.ops.rellax_fast, name)
