"""The CFLoRA linear op: ``y = x Wᵀ + b + scale·((drop(x) Aᵀ) Cᵀ) Bᵀ`` with C = None, (r, r) or (B, r, r).

This module owns the public op :func:`cflora_linear` (validation once for every backend, backend routing,
seed drawing), its PyTorch autograd oracle :func:`cflora_linear_ref` (float64-capable), the backend table
(one entry per backend, Triton's with its ``supports`` limits) and the registration of the fused ops:

- the C++ ops ``rellax_fast::cflora_fwd`` / ``cflora_bwd`` (schemas and CPU/CUDA kernels in
  ``csrc/cflora.cpp`` and ``csrc/cflora_cuda.cu``) get their fake implementations and autograd (from
  :mod:`rellax_fast.ops._cflora_autograd`, shared by every fused op) in :func:`_register_ext`;
- the Triton path, the Python custom ops ``rellax_fast::cflora_fwd_triton`` / ``cflora_bwd_triton`` around
  the launchers of ``rellax_fast.kernels.cflora``, lives in :mod:`rellax_fast.ops._cflora_triton`;
- a dropout seed given as a tensor (what torch.compile needs: see :func:`cflora_linear`) goes through the
  Python custom ops ``rellax_fast::cflora_fwd_tensor_seed`` / ``cflora_bwd_tensor_seed``, opaque to the
  compiler, which read the seed with ``.item()`` inside their implementation and call the backend's op.

Row layout shared by every backend: x is flattened to (M, d_in) rows; with a per-sample C (B, r, r), row m
uses ``C[m // rows_per_sample]`` (rows_per_sample = T for x (B, T, d_in), 1 for x (B, d_in)). The dropout
mask is the shared hash of (seed, m·d_in + k) (``csrc/common.h``); the backward regenerates it. Autograd
saves x, S = drop(x)Aᵀ and T = SCᵀ (both M×r), never a d_out-sized activation.

Autocast and the IEEE semantics of special values are defined once, in :func:`cflora_linear`'s docstring,
and every backend follows them (the autocast cast happens here, before any backend runs).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _backend, _cflora_triton, _registry
from ._cflora_autograd import bwd_fake, fwd_fake, fwd_setup_context, make_function, make_fwd_backward
from ._registry import ext_op
from .dropout import SeedLike, seeded_dropout_ref

OP = "cflora_linear"
_backend.register_op(OP, {"cpu": ["cpp", "reference"], "cuda": ["cuda", "triton", "reference"]})

__all__ = ["cflora_linear", "cflora_linear_ref"]


# ----------------------------------------------------------------------------------------------------------
# validation (once, in Python, for every backend)
# ----------------------------------------------------------------------------------------------------------


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _validate(x, weight, bias, lora_a, lora_b, interaction, scale, dropout_p, seed) -> int:
    """Check every argument; return rows_per_sample (the x rows that share one C[b])."""
    named = [("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)]
    if bias is not None:
        named.append(("bias", bias))
    if interaction is not None:
        named.append(("interaction", interaction))
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"cflora_linear: {name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"cflora_linear: {name} must be a floating-point tensor; got dtype {t.dtype}")
    for name, t in named[1:]:
        if t.dtype != x.dtype:
            raise TypeError(
                f"cflora_linear: {name} must have x's dtype {x.dtype}; got {t.dtype} (mixed dtypes are not supported)"
            )
        if t.device != x.device:
            raise ValueError(f"cflora_linear: {name} must be on x's device {x.device}; got {t.device}")
    if x.dim() < 1:
        raise ValueError("cflora_linear: x must have shape (..., d_in); got a 0-d tensor")
    d_in = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d_in:
        raise ValueError(
            f"cflora_linear: weight must have shape (d_out, d_in={d_in}), d_in being x's last dimension "
            f"(x {tuple(x.shape)}); got {tuple(weight.shape)}"
        )
    d_out = weight.shape[0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != d_out):
        raise ValueError(f"cflora_linear: bias must have shape (d_out={d_out},); got {tuple(bias.shape)}")
    if lora_a.dim() != 2 or lora_a.shape[1] != d_in:
        raise ValueError(
            f"cflora_linear: lora_a must have shape (r, d_in={d_in}), d_in being x's last dimension "
            f"(x {tuple(x.shape)}); got {tuple(lora_a.shape)}"
        )
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"cflora_linear: lora_a must have rank r >= 1; got shape {tuple(lora_a.shape)}")
    if lora_b.dim() != 2 or lora_b.shape[0] != d_out or lora_b.shape[1] != r:
        raise ValueError(
            f"cflora_linear: lora_b must have shape (d_out={d_out}, r={r}); got {tuple(lora_b.shape)}"
        )
    rows_per_sample = _validate_interaction(x, interaction, r)
    _validate_scalars(scale, dropout_p, seed)
    return rows_per_sample


def _validate_interaction(x, interaction, r: int) -> int:
    """Check C's shape against r and x; return rows_per_sample (the x rows that share one C[b])."""
    rows_per_sample = 1
    if interaction is not None:
        if interaction.dim() == 2:
            if tuple(interaction.shape) != (r, r):
                raise ValueError(
                    f"cflora_linear: interaction must have shape (r, r)=({r}, {r}) or (B, {r}, {r}); "
                    f"got {tuple(interaction.shape)}"
                )
        elif interaction.dim() == 3:
            if tuple(interaction.shape[1:]) != (r, r):
                raise ValueError(
                    f"cflora_linear: interaction must have shape (B, r, r)=(B, {r}, {r}) or ({r}, {r}); "
                    f"got {tuple(interaction.shape)}"
                )
            if x.dim() not in (2, 3):
                raise ValueError(
                    "cflora_linear: a per-sample interaction (B, r, r) needs x of shape (B, T, d_in) or (B, d_in); "
                    f"got x with shape {tuple(x.shape)}"
                )
            if x.shape[0] != interaction.shape[0]:
                raise ValueError(
                    f"cflora_linear: interaction batch {interaction.shape[0]} does not match x's batch "
                    f"{x.shape[0]} (x {tuple(x.shape)}, interaction {tuple(interaction.shape)})"
                )
            rows_per_sample = x.shape[1] if x.dim() == 3 else 1
        else:
            raise ValueError(
                f"cflora_linear: interaction must be None, (r, r) or (B, r, r) with r={r}; "
                f"got {tuple(interaction.shape)}"
            )
    return rows_per_sample


def _validate_scalars(scale, dropout_p, seed) -> None:
    """Check scale, dropout_p and the seed (an int, a one-integer tensor or None)."""
    if (
        isinstance(dropout_p, bool)
        or not isinstance(dropout_p, numbers.Real)
        or not (0.0 <= float(dropout_p) < 1.0)
    ):
        raise ValueError(f"cflora_linear: dropout_p must be a float in [0, 1); got {dropout_p!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"cflora_linear: scale must be a real number; got {scale!r}")
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.dtype not in _SEED_DTYPES:
            raise TypeError(
                "cflora_linear: a tensor seed must hold one integer (dtype int64, int32, int16, int8 or uint8; "
                f"a 0-d CPU int64 tensor avoids any device sync); got shape {tuple(seed.shape)}, dtype {seed.dtype}"
            )
    elif seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(
            f"cflora_linear: seed must be an int, a one-element integer tensor or None; got {seed!r}"
        )
    elif seed is not None and not (-(2**63) <= seed < 2**63):  # no int(seed): it would specialise a SymInt
        raise ValueError(f"cflora_linear: seed must fit in int64; got {seed}")


_SEED_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _draw_seed() -> SeedLike:
    """One int64 in [0, 2^62) from torch's default CPU generator (torch.manual_seed makes dropout reproducible).

    Eager code gets an int. While torch.compile traces, the draw stays in the graph as a 0-d CPU int64 tensor
    (no ``.item()``, so no graph break); the ops read it inside their implementation. Both consume the
    generator in the same way, so eager and compiled (with a backend that keeps torch's RNG, e.g. aot_eager,
    or inductor with ``fallback_random=True``) draw the same seeds.
    """
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu")
    if torch.compiler.is_compiling():
        return seed
    return int(seed.item())


def _graph_seed(seed: Optional[SeedLike]) -> SeedLike:
    """The seed to use when dropout is on: None draws one; while torch.compile traces, an int becomes a 0-d
    CPU int64 tensor, because an int argument of the ops (or the reference's Python hash of it) would
    specialise the graph on its value and recompile it for every new seed."""
    if seed is None:
        return _draw_seed()
    if torch.compiler.is_compiling() and not isinstance(seed, Tensor):
        return torch.full((), seed, dtype=torch.int64, device="cpu")
    return seed


def _seed_value(seed: Tensor) -> int:
    """The int held by a validated seed tensor (inside an op's implementation: opaque to the compiler)."""
    return int(seed.reshape(()).item())


# ----------------------------------------------------------------------------------------------------------
# autocast (one policy for every backend; see cflora_linear's docstring)
# ----------------------------------------------------------------------------------------------------------


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or None when autocast is off there."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_cast(t, device_type: str, dtype: torch.dtype):
    # the eligibility rule of torch's own autocast (torch.amp.autocast_mode._cast, and F.linear's C++ cast):
    # floating-point tensors on the autocast device, float64 excepted
    if (
        isinstance(t, Tensor)
        and t.is_floating_point()
        and t.device.type == device_type
        and t.dtype != torch.float64
    ):
        return t.to(dtype)
    return t


# ----------------------------------------------------------------------------------------------------------
# reference (the oracle)
# ----------------------------------------------------------------------------------------------------------


def _interact_ref(s: Tensor, interaction: Optional[Tensor], rows_per_sample: int) -> Tensor:
    if interaction is None:
        return s
    if interaction.dim() == 2:
        return s @ interaction.T
    n_samples, r = interaction.shape[0], interaction.shape[1]
    return torch.bmm(s.reshape(n_samples, rows_per_sample, r), interaction.transpose(1, 2)).reshape(-1, r)


def cflora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    interaction: Optional[Tensor] = None,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: Optional[SeedLike] = None,
) -> Tensor:
    """PyTorch autograd reference of :func:`cflora_linear` (any float dtype, float64 included).

    It defines the op's semantics, special values included: ``y = (x Wᵀ + b) + scale·((drop(x) Aᵀ) Cᵀ Bᵀ)``
    evaluated in that order with IEEE arithmetic (see :func:`cflora_linear`). The dropout mask is
    :func:`rellax_fast.ops.dropout.dropout_keep_mask_ref` over the flat index of x's (M, d_in) view, so it
    matches the compiled and Triton kernels bit for bit for the same seed. No autocast cast happens here:
    call :func:`cflora_linear` with ``backend="reference"`` for the autocast policy.
    """
    rows_per_sample = _validate(x, weight, bias, lora_a, lora_b, interaction, scale, dropout_p, seed)
    dropout_p = float(dropout_p)
    if dropout_p == 0.0:
        seed = 0
    else:
        seed = _graph_seed(seed)
    return _reference(
        x, weight, bias, lora_a, lora_b, interaction, rows_per_sample, float(scale), dropout_p, seed
    )


def _reference(
    x, weight, bias, lora_a, lora_b, interaction, rows_per_sample, scale, dropout_p, seed
) -> Tensor:
    d_in, d_out = x.shape[-1], weight.shape[0]
    x2d = x.reshape(-1, d_in)
    xd = seeded_dropout_ref(x2d, dropout_p, seed) if dropout_p > 0 else x2d
    s = xd @ lora_a.T
    t = _interact_ref(s, interaction, rows_per_sample)
    y = torch.nn.functional.linear(x2d, weight, bias) + scale * (t @ lora_b.T)
    return y.reshape(*x.shape[:-1], d_out)


# ----------------------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------------------


def cflora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    interaction: Optional[Tensor] = None,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: Optional[SeedLike] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """``x Wᵀ + b + scale·((drop(x) Aᵀ) Cᵀ) Bᵀ`` (ΔW = scale·B C A), differentiable in x, A, B, C (and W, b).

    Args:
        x: (..., d_in). With a per-sample ``interaction`` it must be (B, T, d_in) or (B, d_in).
        weight: (d_out, d_in); bias: (d_out,) or None.
        lora_a: (r, d_in); lora_b: (d_out, r).
        interaction: None (identity, plain LoRA), (r, r) shared, or (B, r, r) per sample.
        scale: the LoRA scale (alpha / r).
        dropout_p: dropout on the LoRA path's input, inverted scaling; 0 costs nothing (the seed is ignored).
        seed: dropout seed: the mask is a hash of (seed, element index), regenerated by the backward.
            An int; or a tensor holding one integer (best a 0-d CPU int64 tensor, e.g. from
            ``torch.randint``), which torch.compile keeps in the graph, the op reading its value inside its
            implementation (no graph break, no GPU sync); or None, which draws one from torch's default CPU
            generator (an int in eager code, a tensor while torch.compile traces), so ``torch.manual_seed``
            reproduces it and gradient checkpointing (which restores the CPU RNG state) redraws the same.
        backend: "reference", "cpp", "cuda", "triton" or None/"auto" (see ``rellax_fast.ops._backend``).

    Autocast (the same on every backend): inside ``torch.autocast(device_type, dtype)`` for x's device type,
    the op behaves like ``F.linear``: every floating-point tensor argument on that device except float64
    (x, weight, bias, lora_a, lora_b, interaction) is cast to the autocast dtype, the op computes in it and
    returns it, and the gradients flow back through the casts to the original (e.g. float32) parameters in
    their own dtype. Outside autocast all tensors must share one dtype.

    Special values (IEEE semantics, defined by the reference and followed by every backend): the result is
    ``(x Wᵀ + b) + scale·P`` with the rank-r product ``P = ((drop(x) Aᵀ) Cᵀ) Bᵀ`` finished before ``scale``
    multiplies it, as PEFT's ``lora_B(lora_A(x)) * scaling``, and the backward starts from ``dP = scale·dY``.
    So NaN and ±Inf anywhere (x, weight, bias, lora_a, lora_b, interaction, scale) propagate as in that
    expression: ``scale = 0`` does not hide a non-finite P (0·Inf = NaN, so an Inf in lora_b gives NaN in
    its output column), ``scale = ±Inf`` gives ±Inf where P ≠ 0 and NaN where P = 0, and a NaN scale gives
    NaN everywhere. Dropout is a select: a dropped element of x is exactly 0 on the LoRA path, even if it
    is Inf or NaN (it still reaches the base path x Wᵀ). Which non-finite values arise by overflow of finite
    ones may differ between backends (they sum in different orders and precisions).
    """
    device_type = x.device.type if isinstance(x, Tensor) else "cpu"
    autocast_dtype = _autocast_dtype(device_type)
    if autocast_dtype is not None:
        x, weight, bias, lora_a, lora_b, interaction = (
            _autocast_cast(t, device_type, autocast_dtype)
            for t in (x, weight, bias, lora_a, lora_b, interaction)
        )
    rows_per_sample = _validate(x, weight, bias, lora_a, lora_b, interaction, scale, dropout_p, seed)
    which = _backend.resolve(OP, x.device, backend, x=x, lora_a=lora_a)
    dropout_p, scale = float(dropout_p), float(scale)
    if dropout_p == 0.0:
        seed = 0
    else:
        seed = _graph_seed(seed)
    return _backend.impl(OP, which)(
        x, weight, bias, lora_a, lora_b, interaction, rows_per_sample, scale, dropout_p, seed
    )


# ----------------------------------------------------------------------------------------------------------
# the C++ ops' fakes and autograd (registered once _C is loaded)
# ----------------------------------------------------------------------------------------------------------


_ext_registered = False


def _register_ext() -> None:
    """Fake implementations and autograd for the C++ ops (runs once, after _C is loaded)."""
    global _ext_registered
    if _ext_registered:
        return
    _ext_registered = True
    torch.library.register_fake("rellax_fast::cflora_fwd")(fwd_fake)
    torch.library.register_fake("rellax_fast::cflora_bwd")(bwd_fake)


# ----------------------------------------------------------------------------------------------------------
# tensor seeds (torch.compile): opaque custom ops that read the seed inside their implementation
# ----------------------------------------------------------------------------------------------------------


def _kernel_ops(backend: str) -> _KernelOps:
    fn = _backend.impl(OP, backend)
    ops = getattr(fn, "kernel_ops", None)
    if ops is None:
        raise ValueError(f"cflora_linear: no tensor-seed kernel for backend {backend!r}")
    return ops


def _fwd_op_for(backend: str):
    return _kernel_ops(backend).fwd()


def _bwd_op_for(backend: str):
    return _kernel_ops(backend).bwd()


@torch.library.custom_op("rellax_fast::cflora_fwd_tensor_seed", mutates_args=())
def _cflora_fwd_tensor_seed(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    interaction: Optional[Tensor],
    rows_per_sample: int,
    scale: float,
    dropout_p: float,
    seed: Tensor,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    # .item() of a CPU tensor here, in the implementation: torch.compile only ever sees the fake below
    return _fwd_op_for(backend)(
        x, weight, bias, lora_a, lora_b, interaction, rows_per_sample, scale, dropout_p, _seed_value(seed)
    )


@torch.library.custom_op("rellax_fast::cflora_bwd_tensor_seed", mutates_args=())
def _cflora_bwd_tensor_seed(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    interaction: Optional[Tensor],
    s: Tensor,
    t: Tensor,
    rows_per_sample: int,
    scale: float,
    dropout_p: float,
    seed: Tensor,
    needs_grad: Sequence[bool],
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(
        _bwd_op_for(backend)(
            grad_y,
            x,
            weight,
            lora_a,
            lora_b,
            interaction,
            s,
            t,
            rows_per_sample,
            scale,
            dropout_p,
            _seed_value(seed),
            list(needs_grad),
        )
    )


_cflora_fwd_tensor_seed.register_fake(fwd_fake)
_cflora_bwd_tensor_seed.register_fake(bwd_fake)
_cflora_fwd_tensor_seed.register_autograd(
    make_fwd_backward(lambda *a: torch.ops.rellax_fast.cflora_bwd_tensor_seed(*a)),
    setup_context=fwd_setup_context,
)
_TensorSeedFunction = make_function(
    "CFLoRA_tensor_seed",
    lambda: torch.ops.rellax_fast.cflora_fwd_tensor_seed,
    lambda *a: torch.ops.rellax_fast.cflora_bwd_tensor_seed(*a),
)


# ----------------------------------------------------------------------------------------------------------
# the implementation table (rellax_fast.ops._backend): fn(x, weight, bias, lora_a, lora_b, interaction,
# rows_per_sample, scale, dropout_p, seed) -> y of shape (..., d_out); seed is an int (0 without dropout) or a
# one-element integer tensor (torch.compile)
# ----------------------------------------------------------------------------------------------------------


class _KernelOps(NamedTuple):
    """The forward and backward torch.library ops of one fused backend (getters: the ops load lazily)."""

    fwd: Callable[[], Any]
    bwd: Callable[[], Any]


def _fused_impl(backend: str, kernel_ops: _KernelOps) -> Callable[..., Tensor]:
    """The table entry of a fused backend: x flattened to (M, d_in) rows, then its forward op (an int seed)
    or the opaque tensor-seed op, which calls the same forward inside its implementation."""

    def run(x, weight, bias, lora_a, lora_b, interaction, rows_per_sample, scale, dropout_p, seed) -> Tensor:
        d_in, d_out = x.shape[-1], weight.shape[0]
        args = (
            x.reshape(-1, d_in),
            weight,
            bias,
            lora_a,
            lora_b,
            interaction,
            rows_per_sample,
            scale,
            dropout_p,
        )
        if isinstance(seed, Tensor):
            y2d, _, _ = _TensorSeedFunction.apply(*args, seed, backend)
        else:
            y2d, _, _ = function.apply(*args, int(seed))
        return y2d.view(*x.shape[:-1], d_out)

    function = make_function(f"CFLoRA_{backend}", kernel_ops.fwd, lambda *a: kernel_ops.bwd()(*a))
    run.kernel_ops = kernel_ops
    return run


# cpp and cuda share one schema; the dispatcher picks the CPU or CUDA kernel by device
_EXT_OPS = _KernelOps(fwd=lambda: ext_op("cflora_fwd"), bwd=lambda: ext_op("cflora_bwd"))
_TRITON_OPS = _KernelOps(
    fwd=lambda: torch.ops.rellax_fast.cflora_fwd_triton, bwd=lambda: torch.ops.rellax_fast.cflora_bwd_triton
)

_backend.register_impl(OP, "reference", _reference)
_backend.register_impl(OP, "cpp", _fused_impl("cpp", _EXT_OPS))
_backend.register_impl(OP, "cuda", _fused_impl("cuda", _EXT_OPS))
_backend.register_impl(
    OP, "triton", _fused_impl("triton", _TRITON_OPS), supports=_cflora_triton.triton_supports
)
_registry.register_ext_hook(_register_ext)
