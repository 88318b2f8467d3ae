"""The CFLoRA linear op: ``y = x Wᵀ + b + scale·((drop(x) Aᵀ) Cᵀ) Bᵀ`` with C = None, (r, r) or (B, r, r).

This module owns the public op :func:`cflora_linear` (validation once for every backend, backend routing,
seed drawing), its PyTorch autograd oracle :func:`cflora_linear_ref` (float64-capable), and the
torch.library glue:

- the C++ ops ``rellax_fast::cflora_fwd`` / ``cflora_bwd`` (schemas and CPU/CUDA kernels in
  ``csrc/cflora.cpp`` and ``csrc/cflora_cuda.cu``) get their fake implementations and autograd here, in
  :func:`_register_ext`;
- the Triton path is wrapped as the Python custom ops ``rellax_fast::cflora_fwd_triton`` /
  ``cflora_bwd_triton`` around the launchers of ``rellax_fast.kernels.cflora`` (imported lazily, only
  when the triton backend runs).

Row layout shared by every backend: x is flattened to (M, d_in) rows; with a per-sample C (B, r, r), row m
uses ``C[m // rows_per_sample]`` (rows_per_sample = T for x (B, T, d_in), 1 for x (B, d_in)). The dropout
mask is the shared hash of (seed, m·d_in + k) (``csrc/common.h``); the backward regenerates it. Autograd
saves x, S = drop(x)Aᵀ and T = SCᵀ (both M×r), never a d_out-sized activation.
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _backend
from ._registry import ext_op
from .dropout import seeded_dropout_ref

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
        raise ValueError(f"cflora_linear: weight must have shape (d_out, d_in={d_in}); got {tuple(weight.shape)}")
    d_out = weight.shape[0]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != d_out):
        raise ValueError(f"cflora_linear: bias must have shape (d_out={d_out},); got {tuple(bias.shape)}")
    if lora_a.dim() != 2 or lora_a.shape[1] != d_in:
        raise ValueError(f"cflora_linear: lora_a must have shape (r, d_in={d_in}); got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"cflora_linear: lora_a must have rank r >= 1; got shape {tuple(lora_a.shape)}")
    if lora_b.dim() != 2 or lora_b.shape[0] != d_out or lora_b.shape[1] != r:
        raise ValueError(
            f"cflora_linear: lora_b must have shape (d_out={d_out}, r={r}); got {tuple(lora_b.shape)}"
        )
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
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"cflora_linear: dropout_p must be a float in [0, 1); got {dropout_p!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"cflora_linear: scale must be a real number; got {scale!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"cflora_linear: seed must be an int or None; got {seed!r}")
    if seed is not None and not (-(2**63) <= int(seed) < 2**63):
        raise ValueError(f"cflora_linear: seed must fit in int64; got {seed}")
    return rows_per_sample


def _draw_seed() -> int:
    """One int64 from torch's default generator (so torch.manual_seed makes dropout reproducible)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


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
    seed: Optional[int] = None,
) -> Tensor:
    """PyTorch autograd reference of :func:`cflora_linear` (any float dtype, float64 included).

    The dropout mask is :func:`rellax_fast.ops.dropout.dropout_keep_mask_ref` over the flat index of x's
    (M, d_in) view, so it matches the compiled and Triton kernels bit for bit for the same seed.
    """
    rows_per_sample = _validate(x, weight, bias, lora_a, lora_b, interaction, scale, dropout_p, seed)
    if seed is None:
        seed = _draw_seed() if dropout_p > 0 else 0
    d_in, d_out = x.shape[-1], weight.shape[0]
    x2d = x.reshape(-1, d_in)
    xd = seeded_dropout_ref(x2d, float(dropout_p), int(seed)) if dropout_p > 0 else x2d
    s = xd @ lora_a.T
    t = _interact_ref(s, interaction, rows_per_sample)
    y = torch.nn.functional.linear(x2d, weight, bias) + float(scale) * (t @ lora_b.T)
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
    seed: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """``x Wᵀ + b + scale·((drop(x) Aᵀ) Cᵀ) Bᵀ`` (ΔW = scale·B C A), differentiable in x, A, B, C (and W, b).

    Args:
        x: (..., d_in). With a per-sample ``interaction`` it must be (B, T, d_in) or (B, d_in).
        weight: (d_out, d_in); bias: (d_out,) or None.
        lora_a: (r, d_in); lora_b: (d_out, r).
        interaction: None (identity, plain LoRA), (r, r) shared, or (B, r, r) per sample.
        scale: the LoRA scale (alpha / r).
        dropout_p: dropout on the LoRA path's input, inverted scaling; 0 costs nothing.
        seed: dropout seed (the mask is a hash of (seed, element index)); None draws one from torch's
            default generator.
        backend: "reference", "cpp", "cuda", "triton" or None/"auto" (see ``rellax_fast.ops._backend``).
    """
    rows_per_sample = _validate(x, weight, bias, lora_a, lora_b, interaction, scale, dropout_p, seed)
    which = _backend.resolve(OP, x.device, backend)
    dropout_p = float(dropout_p)
    if seed is None:
        seed = _draw_seed() if dropout_p > 0 else 0
    if which == "reference":
        return cflora_linear_ref(
            x, weight, bias, lora_a, lora_b, interaction, scale=scale, dropout_p=dropout_p, seed=seed
        )
    d_in, d_out = x.shape[-1], weight.shape[0]
    x2d = x.reshape(-1, d_in)
    args = (x2d, weight, bias, lora_a, lora_b, interaction, rows_per_sample, float(scale), dropout_p, int(seed))
    if which == "triton":
        y2d, _, _ = torch.ops.rellax_fast.cflora_fwd_triton(*args)
    else:  # cpp or cuda: one schema, the dispatcher picks the CPU or CUDA kernel
        y2d, _, _ = ext_op("cflora_fwd")(*args)
    return y2d.view(*x.shape[:-1], d_out)


# ----------------------------------------------------------------------------------------------------------
# torch.library glue shared by the C++ and Triton ops
# ----------------------------------------------------------------------------------------------------------


def _fwd_fake(x, weight, bias, lora_a, lora_b, interaction, rows_per_sample, scale, dropout_p, seed):
    m, r, d_out = x.shape[0], lora_a.shape[0], weight.shape[0]
    return x.new_empty(m, d_out), x.new_empty(m, r), x.new_empty(m, r)


def _bwd_fake(grad_y, x, weight, lora_a, lora_b, interaction, s, t, rows_per_sample, scale, dropout_p, seed,
              needs_grad):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_a.shape, lora_b.shape,
              None if interaction is None else interaction.shape)
    return tuple(x.new_empty(shape) if (need and shape is not None) else x.new_empty(0)
                 for need, shape in zip(needs_grad, shapes))


def _fwd_setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, interaction, rows_per_sample, scale, dropout_p, seed = inputs
    _, s, t = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, interaction, s, t)
    ctx.hyper = (rows_per_sample, scale, dropout_p, seed)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(s, t)


def _make_fwd_backward(bwd_op):
    def _backward(ctx, grad_y, grad_s, grad_t):
        x, weight, lora_a, lora_b, interaction, s, t = ctx.saved_tensors
        rows_per_sample, scale, dropout_p, seed = ctx.hyper
        need = list(ctx.needs_input_grad[:6])
        need[2] = need[2] and ctx.has_bias
        need[5] = need[5] and interaction is not None
        if not any(need):
            return (None,) * 10
        grads = bwd_op(grad_y.contiguous(), x, weight, lora_a, lora_b, interaction, s, t,
                       rows_per_sample, scale, dropout_p, seed, need)
        out = [g if n else None for g, n in zip(grads, need)]
        return (*out, None, None, None, None)

    return _backward


_ext_registered = False


def _register_ext() -> None:
    """Fake implementations and autograd for the C++ ops (runs once, after _C is loaded)."""
    global _ext_registered
    if _ext_registered:
        return
    _ext_registered = True
    torch.library.register_fake("rellax_fast::cflora_fwd")(_fwd_fake)
    torch.library.register_fake("rellax_fast::cflora_bwd")(_bwd_fake)
    torch.library.register_autograd(
        "rellax_fast::cflora_fwd",
        _make_fwd_backward(lambda *a: torch.ops.rellax_fast.cflora_bwd(*a)),
        setup_context=_fwd_setup_context,
    )


# ----------------------------------------------------------------------------------------------------------
# Triton path: Python custom ops around rellax_fast.kernels.cflora (imported lazily)
# ----------------------------------------------------------------------------------------------------------


def _triton_kernels():
    try:
        from rellax_fast.kernels import cflora as kernels_cflora
    except ImportError as exc:
        raise _backend.BackendUnavailableError(
            f"cflora_linear: the triton backend needs rellax_fast.kernels.cflora, which failed to import: {exc}"
        ) from exc
    for name in ("cflora_fwd", "cflora_bwd"):
        if not hasattr(kernels_cflora, name):
            raise _backend.BackendUnavailableError(
                f"cflora_linear: rellax_fast.kernels.cflora has no launcher {name}() (triton backend incomplete)"
            )
    return kernels_cflora


@torch.library.custom_op("rellax_fast::cflora_fwd_triton", mutates_args=())
def _cflora_fwd_triton(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    interaction: Optional[Tensor],
    rows_per_sample: int,
    scale: float,
    dropout_p: float,
    seed: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    y, s, t = _triton_kernels().cflora_fwd(
        x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), lora_a.contiguous(),
        lora_b.contiguous(), None if interaction is None else interaction.contiguous(), rows_per_sample, scale,
        dropout_p, seed,
    )
    if t is s or t.untyped_storage().data_ptr() == s.untyped_storage().data_ptr():
        t = t.clone()  # a custom op's outputs may not alias each other (C = None gives T = S)
    return y, s, t


@torch.library.custom_op("rellax_fast::cflora_bwd_triton", mutates_args=())
def _cflora_bwd_triton(
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
    seed: int,
    needs_grad: Sequence[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _triton_kernels().cflora_bwd(
        grad_y.contiguous(), x.contiguous(), weight.contiguous(), lora_a.contiguous(), lora_b.contiguous(),
        None if interaction is None else interaction.contiguous(), s.contiguous(), t.contiguous(),
        rows_per_sample, scale, dropout_p, seed, list(needs_grad),
    )
    inputs = {id(v) for v in (grad_y, x, weight, lora_a, lora_b, interaction, s, t) if v is not None}
    out: List[Tensor] = []
    for g, need in zip(grads, needs_grad):
        if g is None or not need:
            out.append(x.new_empty(0))
        elif id(g) in inputs:
            out.append(g.clone())  # outputs may not alias inputs
        else:
            out.append(g)
    return tuple(out)


_cflora_fwd_triton.register_fake(_fwd_fake)
_cflora_bwd_triton.register_fake(_bwd_fake)
_cflora_fwd_triton.register_autograd(
    _make_fwd_backward(lambda *a: torch.ops.rellax_fast.cflora_bwd_triton(*a)),
    setup_context=_fwd_setup_context,
)
