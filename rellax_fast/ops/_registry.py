"""Access to the compiled torch.library ops, with their Python-side fake and autograd registrations.

Ops defined in C++ (``csrc/``) get their fake (meta) implementation and autograd formula in Python,
as in pytorch/extension-cpp. Each op module registers its hook at its own import
(:func:`register_ext_hook`); the hooks run once, right after ``rellax_fast._C`` is loaded, the first time an
op needs the extension (a hook registered after that runs at once). Registering loads nothing. A caller
that uses ``torch.ops.rellax_fast.<name>`` directly imports the op's module first (any op call does).
"""

from __future__ import annotations

import threading
from typing import Callable, List

import torch

from .. import _ext

_hooks: List[Callable[[], None]] = []
_registered = False
_lock = threading.RLock()


def register_ext_hook(hook: Callable[[], None]) -> None:
    """Run ``hook`` (an op module's fake/autograd registrations for its C++ ops) once ``_C`` is loaded.

    Called by each op module at import. If the extension is already loaded and registered, the hook runs
    now; otherwise it waits for :func:`ensure_ext_registered`.
    """
    with _lock:
        if hook in _hooks:
            return
        _hooks.append(hook)
        if _registered:
            hook()


def ensure_ext_registered() -> None:
    """Load _C (raising with the reason if it is missing) and run every registered hook once."""
    global _registered
    _ext.require()
    if _registered:
        return
    with _lock:
        if _registered:
            return
        _registered = True
        for hook in list(_hooks):
            hook()


def ext_op(name: str) -> Callable:
    """``torch.ops.rellax_fast.<name>`` with the extension loaded and registered."""
    ensure_ext_registered()
    return getattr(torch.ops.rellax_fast, name)
