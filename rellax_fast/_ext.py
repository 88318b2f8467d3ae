"""Lazy loader for the compiled extension ``rellax_fast._C``, and the check that it fits the running torch.

Nothing here runs at ``import rellax_fast``: the shared library is loaded (and its torch.library
operators registered) the first time an op asks for it. The load never initialises CUDA.

A C++ extension only works with the torch it was compiled against (the C++ ABI of libtorch changes between
releases). The build (setup.py) writes ``_C_build.json`` beside the library; before loading, :func:`load`
compares it with the running torch and, on a mismatch, refuses to load with a message that says how to
rebuild. The cpp/cuda backends then report that message as the reason they are unavailable.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import threading
import warnings
from types import ModuleType
from typing import Optional

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_error: Optional[str] = None
_record: Optional[dict] = None
_tried = False

BUILD_RECORD = "_C_build.json"  # written by setup.py's build_ext
REBUILD_HINT = (
    "rebuild it against this torch from the rellax-fast source (a checkout or the sdist): "
    "`pip install --no-build-isolation --force-reinstall --no-deps <source>` (`make install` in a checkout), "
    "or install without it: `RELLAX_BUILD_EXT=0 pip install <source>` (reference and Triton backends only)"
)


def _release(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0': the local label names the wheel flavour, not the C++ API."""
    return version.split("+", 1)[0]


def torch_mismatch(
    record: dict, torch_version: str, torch_cuda: Optional[str], cxx11_abi: bool
) -> Optional[str]:
    """Why a _C built as ``record`` says cannot load into this torch, or None when it fits."""
    if "error" in record:
        return str(record["error"])
    built = str(record.get("torch", "?"))
    if _release(built) != _release(torch_version):
        return f"it was built against torch {built}, and this is torch {torch_version}"
    if "cxx11_abi" in record and bool(record["cxx11_abi"]) != bool(cxx11_abi):
        return (
            f"it was built with _GLIBCXX_USE_CXX11_ABI={int(record['cxx11_abi'])}, and this torch "
            f"({torch_version}) uses {int(cxx11_abi)}"
        )
    if record.get("with_cuda"):
        built_cuda = record.get("torch_cuda") or "?"
        if torch_cuda is None:
            return f"it was built with CUDA {built_cuda} kernels, and this torch ({torch_version}) is a CPU build"
        if str(built_cuda).split(".")[0] != str(torch_cuda).split(".")[0]:
            return f"it was built against CUDA {built_cuda}, and this torch ({torch_version}) uses CUDA {torch_cuda}"
    return None


def _read_record(library_path: str) -> Optional[dict]:
    path = os.path.join(os.path.dirname(library_path), BUILD_RECORD)
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"torch": "?", "error": f"{path} is unreadable ({exc})"}
    return record if isinstance(record, dict) else {"torch": "?", "error": f"{path} is not a JSON object"}


def load() -> Optional[ModuleType]:
    """Import ``rellax_fast._C`` once; return it, or None when it is missing or refused (see :func:`load_error`)."""
    global _module, _error, _record, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        try:
            import torch  # (the .so links against libtorch; torch must be loaded first)

            spec = importlib.util.find_spec("rellax_fast._C")
            if spec is None or not spec.origin:
                raise ModuleNotFoundError("No module named 'rellax_fast._C'", name="rellax_fast._C")
            _record = _read_record(spec.origin)
            reason = None
            if _record is not None:
                reason = torch_mismatch(
                    _record, torch.__version__, torch.version.cuda, bool(torch._C._GLIBCXX_USE_CXX11_ABI)
                )
            if reason is not None:
                _error = f"rellax_fast._C was not loaded: {reason}; {REBUILD_HINT}"
                warnings.warn(
                    _error + ". Until then ops run on their reference/Triton backends.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            else:
                _module = importlib.import_module("rellax_fast._C")
        except ImportError as exc:
            msg = str(exc)
            if "No module named" in msg:
                _error = "rellax_fast._C is not built (pure-Python install, e.g. RELLAX_BUILD_EXT=0)"
            else:
                _error = f"rellax_fast._C failed to load: {msg}; {REBUILD_HINT}"
        _tried = True
    return _module


def load_error() -> Optional[str]:
    """Why :func:`load` returned None, or None when the extension is loaded."""
    load()
    return _error


def build_record() -> Optional[dict]:
    """The build record found beside ``_C`` (what it was built against), or None when there is none."""
    load()
    return _record


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
