"""Lazy loader for the compiled extension ``rellax_fast._C``.

Nothing here runs at ``import rellax_fast``: the shared library is loaded (and its torch.library
operators registered) the first time an op asks for it. The load never initialises CUDA.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Optional

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_error: Optional[str] = None
_tried = False


def load() -> Optional[ModuleType]:
    """Import ``rellax_fast._C`` once; return it, or None when it is missing (see :func:`load_error`)."""
    global _module, _error, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        try:
            import torch  # noqa: F401  (the .so links against libtorch; torch must be loaded first)

            _module = importlib.import_module("rellax_fast._C")
        except ImportError as exc:
            msg = str(exc)
            if "No module named" in msg:
                _error = "rellax_fast._C is not built (pure-Python install, e.g. RELLAX_BUILD_EXT=0)"
            else:
                _error = f"rellax_fast._C failed to load: {msg}"
        _tried = True
    return _module


def load_error() -> Optional[str]:
    """Why :func:`load` returned None, or None when the extension is loaded."""
    load()
    return _error


def require() -> ModuleType:
    """The loaded extension, or a RuntimeError that says why it is unavailable."""
    mod = load()
    if mod is None:
        raise RuntimeError(_error)
    return mod


def built_with_cuda() -> bool:
    mod = load()
    return bool(mod is not None and mod.with_cuda())


def cuda_archs() -> str:
    mod = load()
    return mod.cuda_archs() if mod is not None and mod.with_cuda() else ""
