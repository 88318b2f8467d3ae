"""Backend routing shared by every op: reference / cpp / cuda / triton.

Rules (docs/architecture.md):
- automatic choice picks the fastest available backend for the tensor's device, in the order each op
  declares (:func:`register_op`);
- ``backend=`` or the ``RELLAX_BACKEND`` environment variable forces one;
- a forced backend that is unavailable raises :class:`BackendUnavailableError` with the reason. It never
  falls back silently.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import _ext
from .._kernel_common import triton_interpreting

BACKENDS = ("reference", "cpp", "cuda", "triton")
ENV_VAR = "RELLAX_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was forced (``backend=`` or RELLAX_BACKEND) but cannot run here; the message says why."""


def _torch_label() -> str:
    return f"torch {torch.__version__}"


def cpp_unavailable(device_type: Optional[str]) -> Optional[str]:
    err = _ext.load_error()
    if err is not None:
        return err
    if device_type is not None and device_type != "cpu":
        return f"the cpp backend runs on CPU tensors; got {device_type} tensors"
    return None


def cuda_unavailable(device_type: Optional[str]) -> Optional[str]:
    err = _ext.load_error()
    if err is not None:
        return err
    if not _ext.built_with_cuda():
        return f"extension built without CUDA ({_torch_label()})"
    if device_type is not None and device_type != "cuda":
        return f"the cuda backend runs on CUDA tensors; got {device_type} tensors"
    if device_type is None and not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


_triton_import_error: Optional[str] = None
_triton_checked = False


def _triton_import_problem() -> Optional[str]:
    global _triton_import_error, _triton_checked
    if not _triton_checked:
        try:
            import importlib.util

            if importlib.util.find_spec("triton") is None:
                _triton_import_error = "triton is not installed"
        except Exception as exc:  # pragma: no cover
            _triton_import_error = f"triton cannot be found: {exc}"
        _triton_checked = True
    return _triton_import_error


def triton_unavailable(device_type: Optional[str]) -> Optional[str]:
    err = _triton_import_problem()
    if err is not None:
        return err
    if device_type == "cuda":
        return None
    if device_type in (None, "cpu"):
        if triton_interpreting():
            return None
        if device_type is None and torch.cuda.is_available():
            return None
        return "triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors under the interpreter)"
    return f"triton does not run on {device_type} tensors"


def reference_unavailable(device_type: Optional[str]) -> Optional[str]:
    return None


_CHECKS: Dict[str, Callable[[Optional[str]], Optional[str]]] = {
    "reference": reference_unavailable,
    "cpp": cpp_unavailable,
    "cuda": cuda_unavailable,
    "triton": triton_unavailable,
}

# op name -> {device type -> ordered preference}
_OPS: Dict[str, Dict[str, List[str]]] = {}
# op name -> backends that have an implementation
_IMPLEMENTED: Dict[str, List[str]] = {}


def register_op(name: str, preference: Dict[str, Sequence[str]], implemented: Sequence[str] = BACKENDS) -> None:
    """Declare an op, the backends it implements, and its automatic order per device type (fastest first)."""
    for b in list(implemented) + [b for order in preference.values() for b in order]:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r} for {name}")
    _OPS[name] = {dev: list(order) for dev, order in preference.items()}
    _IMPLEMENTED[name] = list(implemented)


def registered_ops() -> List[str]:
    return sorted(_OPS)


def why_unavailable(backend: str, device_type: Optional[str] = None, op: Optional[str] = None) -> Optional[str]:
    """None when ``backend`` can run ``op`` on ``device_type`` (None: anywhere here), else the reason."""
    if backend not in _CHECKS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if op is not None and op in _IMPLEMENTED and backend not in _IMPLEMENTED[op]:
        return f"{op} has no {backend} implementation"
    return _CHECKS[backend](device_type)


def availability(op: Optional[str] = None, device_type: Optional[str] = None) -> Dict[str, Optional[str]]:
    """{backend: None if available else the reason} for ``op`` (None: any op) on ``device_type``."""
    return {b: why_unavailable(b, device_type, op) for b in BACKENDS}


# Evaluated eagerly while torch.compile traces (its result is a constant of the graph): the choice, and the
# one-time load of _C it may trigger, are not traceable Python. A later change of RELLAX_BACKEND does not
# recompile an already compiled function. (Marked below as torch.compiler.assume_constant_result does, but
# without calling it: that call imports torch._dynamo, and with it triton, at `import rellax_fast`.)
def resolve(op: str, device: torch.device, backend: Optional[str] = None) -> str:
    """The backend that runs ``op`` on ``device``; forced ones that cannot run raise with the reason.

    Choosing cpp or cuda also loads ``_C`` and registers its fake/autograd formulas (once).
    """
    chosen = _choose(op, device, backend)
    if chosen in ("cpp", "cuda"):
        from ._registry import ensure_ext_registered

        ensure_ext_registered()
    return chosen


resolve._dynamo_marked_constant = True  # what torch._dynamo.assume_constant_result(resolve) sets


def _choose(op: str, device: torch.device, backend: Optional[str]) -> str:
    forced = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
    device_type = device.type
    if forced is not None:
        forced = forced.strip().lower()
        if forced == "auto":
            forced = None
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(
                f"backend must be one of {', '.join(BACKENDS)} or 'auto'; got {forced!r}"
                + (f" (from ${ENV_VAR})" if backend is None else "")
            )
        reason = why_unavailable(forced, device_type, op)
        if reason is not None:
            source = "backend=" + repr(forced) if backend is not None else f"{ENV_VAR}={forced}"
            raise BackendUnavailableError(f"{op}: {source} is unavailable: {reason}")
        return forced
    order = _OPS.get(op, {}).get(device_type, ["reference"])
    for b in order:
        if why_unavailable(b, device_type, op) is None:
            return b
    return "reference"
