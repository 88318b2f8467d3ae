"""Backend routing shared by every op: reference / cpp / cuda / triton, and the one table of implementations.

This module owns the backend names (:data:`BACKENDS`), each backend's environment check (is ``_C`` built, with
CUDA, is triton installed, ...), the per-op automatic preference (:func:`register_op`) and the per-op
implementation table (:func:`register_impl`). Each op module fills its rows at import: one call per backend
that implements the op, with the function that runs it and, optionally, a ``supports`` capability check
(rank limits, dtypes, ...). The op then dispatches through :func:`impl`; there is no per-op if-chain on
backend names.

Rules (docs/architecture.md):
- automatic choice picks the fastest backend for the tensor's device, in the order each op declares
  (:func:`register_op`), skipping one whose environment check fails or whose ``supports`` refuses the call;
- ``backend=`` or the ``RELLAX_BACKEND`` environment variable forces one;
- a forced backend that is unavailable, or whose ``supports`` refuses the call, raises
  :class:`BackendUnavailableError` naming the op, the backend and the reason. It never falls back silently.

Registering loads nothing: implementations import their kernels (triton, ``_C``) when they first run. This
module imports no torch at import either (torch is imported inside the checks), so command-line parsers take
their ``--backend`` choices from :data:`BACKENDS` without importing it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .. import _ext
from .._kernel_common import triton_interpreting

if TYPE_CHECKING:
    import torch

BACKENDS = ("reference", "cpp", "cuda", "triton")
# what a backend= argument accepts wherever one is taken (configs, layers, patches): None/"auto" is automatic
BACKEND_CHOICES = (None, "auto", *BACKENDS)
ENV_VAR = "RELLAX_BACKEND"
# semantic_topk's prefilter= values (ops/topk_prefilter.py); here so that CLIs list them without torch
PREFILTERS = ("bf16",)


class BackendUnavailableError(RuntimeError):
    """A backend was forced (``backend=`` or RELLAX_BACKEND) but cannot run here; the message says why."""


def _torch_label() -> str:
    import torch

    return f"torch {torch.__version__}"


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------------------
# environment checks, one per backend: can it run at all here, on this device type?
# ----------------------------------------------------------------------------------------------------------


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
    if device_type is None and not _cuda_visible():
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
        if device_type is None and _cuda_visible():
            return None
        return "triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors under the interpreter)"
    return f"triton does not run on {device_type} tensors"


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (oneDNN's AVX512-BF16 / AMX kernels): CPU bf16 autocast is
    then faster than fp32 (1.7x for a MiniLM step on an AVX512-BF16 machine, ``bench finetune``); without it
    bf16 is emulated and slower than fp32. The one home of this check (the trainer's ``--mixed-precision fast``
    and DIN's ``DINTrainConfig.mixed_precision``)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def reference_unavailable(device_type: Optional[str]) -> Optional[str]:
    return None


_CHECKS: Dict[str, Callable[[Optional[str]], Optional[str]]] = {
    "reference": reference_unavailable,
    "cpp": cpp_unavailable,
    "cuda": cuda_unavailable,
    "triton": triton_unavailable,
}

# backends whose implementations live in rellax_fast._C: choosing one loads it and runs the ops' extension
# hooks (fake implementations, autograd) once (ops/_registry.py)
EXT_BACKENDS = ("cpp", "cuda")


# ----------------------------------------------------------------------------------------------------------
# the tables: automatic order per op and device type, and the implementations
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Impl:
    """One row of the table: ``fn`` runs the op on this backend (its signature is the op's own, see the op
    module); ``supports(**call)`` returns None when it can run that call, else the reason (shapes, dtypes)."""

    fn: Callable[..., Any]
    supports: Optional[Callable[..., Optional[str]]] = None


# op name -> {device type -> ordered preference}
_OPS: Dict[str, Dict[str, List[str]]] = {}
# op name -> {backend -> Impl}
_IMPLS: Dict[str, Dict[str, Impl]] = {}


def _check_backend_name(backend: str, what: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be one of {', '.join(BACKENDS)}; got {backend!r}")


def register_op(name: str, preference: Mapping[str, Sequence[str]]) -> None:
    """Declare an op and its automatic order per device type (fastest first); device types not named get
    ``["reference"]``. The backends it implements are those given to :func:`register_impl`."""
    for order in preference.values():
        for b in order:
            _check_backend_name(b, f"register_op({name!r})")
    _OPS[name] = {dev: list(order) for dev, order in preference.items()}
    _IMPLS.setdefault(name, {})


def register_impl(
    op: str, backend: str, fn: Callable[..., Any], supports: Optional[Callable[..., Optional[str]]] = None
) -> None:
    """Register ``fn`` as ``op``'s implementation on ``backend`` (replacing an earlier one).

    ``supports``, if given, is called with the call's keyword arguments (whatever the op passes to
    :func:`resolve`, e.g. its tensors) and returns None when the backend can run that call, or a reason
    string (e.g. "rank r=200 exceeds the triton kernel's limit of 128"). Automatic choice skips a backend
    that refuses; a forced one raises with the reason. It may read shapes, dtypes and devices only (it also
    runs while torch.compile traces), never tensor values. Neither ``fn`` nor ``supports`` may import triton
    or load ``_C`` at registration: import inside ``fn``.
    """
    _check_backend_name(backend, f"register_impl({op!r})")
    if not callable(fn):
        raise TypeError(f"register_impl({op!r}, {backend!r}): fn must be callable; got {type(fn).__name__}")
    if supports is not None and not callable(supports):
        raise TypeError(
            f"register_impl({op!r}, {backend!r}): supports must be callable or None; "
            f"got {type(supports).__name__}"
        )
    _IMPLS.setdefault(op, {})[backend] = Impl(fn, supports)


def registered_ops() -> List[str]:
    return sorted(set(_OPS) | set(_IMPLS))


def implemented(op: str) -> Tuple[str, ...]:
    """The backends that have an implementation of ``op``, in :data:`BACKENDS` order."""
    table = _IMPLS.get(op, {})
    return tuple(b for b in BACKENDS if b in table)


def auto_order(op: str, device_type: str) -> List[str]:
    """``op``'s automatic preference on ``device_type`` (fastest first), as declared by :func:`register_op`."""
    return list(_OPS.get(op, {}).get(device_type, ["reference"]))


def impl(op: str, backend: str) -> Callable[..., Any]:
    """The function registered for ``op`` on ``backend`` (after :func:`resolve` chose it)."""
    try:
        return _IMPLS[op][backend].fn
    except KeyError:
        raise BackendUnavailableError(f"{op} has no {backend} implementation") from None


def _refusal(op: str, backend: str, call: Mapping[str, Any]) -> Optional[str]:
    """The ``supports`` reason of ``op`` on ``backend`` for this call, or None (no check, or it accepts)."""
    row = _IMPLS.get(op, {}).get(backend)
    if row is None or row.supports is None or not call:
        return None
    return row.supports(**call)


def why_unavailable(
    backend: str, device_type: Optional[str] = None, op: Optional[str] = None, **call: Any
) -> Optional[str]:
    """None when ``backend`` can run ``op`` on ``device_type`` (None: anywhere here), else the reason.

    With the call's keyword arguments (``**call``, what the op passes to :func:`resolve`), the backend's
    ``supports`` check for ``op`` runs too, so a rank or dtype limit is explained as well.
    """
    if backend not in _CHECKS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if op is not None and op in _IMPLS and backend not in _IMPLS[op]:
        return f"{op} has no {backend} implementation"
    reason = _CHECKS[backend](device_type)
    if reason is None and op is not None:
        reason = _refusal(op, backend, call)
    return reason


def availability(
    op: Optional[str] = None, device_type: Optional[str] = None, **call: Any
) -> Dict[str, Optional[str]]:
    """{backend: None if available else the reason} for ``op`` (None: any op) on ``device_type``."""
    return {b: why_unavailable(b, device_type, op, **call) for b in BACKENDS}


# ----------------------------------------------------------------------------------------------------------
# the choice
# ----------------------------------------------------------------------------------------------------------


def auto_candidates(op: str, device_type: str) -> Tuple[str, ...]:
    """The backends automatic choice tries for ``op`` on ``device_type``, in order, environment checks passed
    (reference last, the fallback); the first one whose ``supports`` accepts the call runs it. Its first entry
    is what automatic choice picks on this machine for calls within every backend's limits (`rellax-fast info`)."""
    order = auto_order(op, device_type)
    if "reference" not in order:
        order.append("reference")  # the fallback when nothing faster can run
    return tuple(b for b in order if why_unavailable(b, device_type, op) is None)


def resolve(op: str, device: torch.device, backend: Optional[str] = None, **call: Any) -> str:
    """The backend that runs ``op`` on ``device``; forced ones that cannot run raise with the reason.

    ``**call`` (e.g. the op's tensors) goes to each candidate's ``supports`` check: automatic choice skips a
    backend that refuses the call, a forced one raises :class:`BackendUnavailableError` naming the op, the
    backend and the reason. Choosing cpp or cuda also loads ``_C`` and registers its fake/autograd formulas
    (once).
    """
    forced, candidates = _candidates(op, device, backend)
    refused = []
    for b in candidates:
        reason = _refusal(op, b, call)
        if reason is None:
            return b
        if forced is not None:
            raise BackendUnavailableError(f"{op}: {forced} cannot run this call: {reason}")
        refused.append(f"{b}: {reason}")
    raise BackendUnavailableError(
        f"{op}: no backend can run this call on {device.type} tensors ("
        + "; ".join(refused or ["no implementation is registered"])
        + ")"
    )


# Evaluated eagerly while torch.compile traces (its result is a constant of the graph): the environment
# checks, and the one-time load of _C they may trigger, are not traceable Python. A later change of
# RELLAX_BACKEND does not recompile an already compiled function. (Marked below as
# torch.compiler.assume_constant_result does, but without calling it: that call imports torch._dynamo, and
# with it triton, at `import rellax_fast`.) The ``supports`` checks run after it, in traced Python, so
# torch.compile guards on the shapes and dtypes they read.
def _candidates(
    op: str, device: torch.device, backend: Optional[str]
) -> Tuple[Optional[str], Tuple[str, ...]]:
    """(the label of a forced backend or None, the backends to try in order), environment checks done."""
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
        source = "backend=" + repr(forced) if backend is not None else f"{ENV_VAR}={forced}"
        reason = why_unavailable(forced, device_type, op)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: {source} is unavailable: {reason}")
        chosen: Tuple[str, ...] = (forced,)
    else:
        chosen = auto_candidates(op, device_type)
        source = None
    if any(b in EXT_BACKENDS for b in chosen):
        from ._registry import ensure_ext_registered

        ensure_ext_registered()
    return source, chosen


_candidates._dynamo_marked_constant = True  # what torch._dynamo.assume_constant_result(_candidates) sets
