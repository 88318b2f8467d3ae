"""The Triton path of the CFLoRA op: Python custom ops around the launchers of ``rellax_fast.kernels.cflora``.

Owns ``rellax_fast::cflora_fwd_triton`` / ``cflora_bwd_triton`` (schemas, fakes and autograd from
:mod:`rellax_fast.ops._cflora_autograd`), the unfused PyTorch backward a non-finite ``scale`` takes, and
:func:`triton_supports`, the Triton kernel's limits that the backend table (``rellax_fast.ops.cflora``
registers it, with ``supports``) consults. The kernels module (and so triton) is imported lazily, only
when the triton backend runs: ``import rellax_fast`` stays light.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._kernel_common import CFLORA_TRITON_DTYPES, CFLORA_TRITON_MAX_RANK
from . import _backend
from ._cflora_autograd import bwd_fake, fwd_fake, fwd_setup_context, make_fwd_backward
from .dropout import seeded_dropout_ref


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
    nonfinite_scale = not math.isfinite(scale)
    y, s, t = _triton_kernels().cflora_fwd(
        x.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        lora_a.contiguous(),
        lora_b.contiguous(),
        None if interaction is None else interaction.contiguous(),
        rows_per_sample,
        1.0 if nonfinite_scale else scale,
        dropout_p,
        seed,
    )
    if nonfinite_scale:
        # the fused GEMM folds scale into T before the r-sum, which for ±Inf/NaN gives other NaN/Inf than the
        # op's semantics (scale times the finished T Bᵀ); this degenerate case takes an unfused epilogue
        y = torch.nn.functional.linear(x, weight, bias) + scale * (t @ lora_b.T)
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
    if math.isfinite(scale):
        grads = _triton_kernels().cflora_bwd(
            grad_y.contiguous(),
            x.contiguous(),
            weight.contiguous(),
            lora_a.contiguous(),
            lora_b.contiguous(),
            None if interaction is None else interaction.contiguous(),
            s.contiguous(),
            t.contiguous(),
            rows_per_sample,
            scale,
            dropout_p,
            seed,
            list(needs_grad),
        )
    else:  # the fused kernels fold scale into B and T; ±Inf/NaN need dP = scale·dY first (see the forward)
        grads = _unfused_backward(
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
            seed,
            needs_grad,
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


def _unfused_backward(
    grad_y, x, weight, lora_a, lora_b, interaction, s, t, rows_per_sample, scale, dropout_p, seed, needs_grad
) -> List[Optional[Tensor]]:
    """The backward in PyTorch ops, in the reference's order (dP = scale·dY first), for a non-finite scale."""
    need_x, need_w, need_b, need_a, need_lb, need_c = needs_grad
    grad_y = grad_y.to(x.dtype)
    grad_p = grad_y * scale
    grads: List[Optional[Tensor]] = [None] * 6
    if need_lb:
        grads[4] = grad_p.T @ t
    if need_x or need_a or need_c:
        d_t = grad_p @ lora_b
        n, r = (interaction.shape[0] if interaction is not None else 1), lora_a.shape[0]
        if interaction is None:
            d_s = d_t
        elif interaction.dim() == 2:
            d_s = d_t @ interaction
            if need_c:
                grads[5] = d_t.T @ s
        else:
            d_s = torch.bmm(d_t.view(n, rows_per_sample, r), interaction).view(-1, r)
            if need_c:
                grads[5] = torch.bmm(
                    d_t.view(n, rows_per_sample, r).transpose(1, 2), s.view(n, rows_per_sample, r)
                )
        if need_a:
            grads[3] = d_s.T @ (seeded_dropout_ref(x, dropout_p, seed) if dropout_p > 0 else x)
        if need_x:
            lora = d_s @ lora_a
            grads[0] = grad_y @ weight + (
                seeded_dropout_ref(lora, dropout_p, seed) if dropout_p > 0 else lora
            )
    if need_w:
        grads[1] = grad_y.T @ x
    if need_b:
        grads[2] = grad_y.sum(0)
    return grads


_cflora_fwd_triton.register_fake(fwd_fake)
_cflora_bwd_triton.register_fake(bwd_fake)
_cflora_fwd_triton.register_autograd(
    make_fwd_backward(lambda *a: torch.ops.rellax_fast.cflora_bwd_triton(*a)),
    setup_context=fwd_setup_context,
)


_TRITON_DTYPES = tuple(getattr(torch, name) for name in CFLORA_TRITON_DTYPES)


def triton_supports(x: Tensor, lora_a: Tensor, **_call) -> Optional[str]:
    """The Triton kernel's limits: one register tile per row block of S/T caps the rank; no float64."""
    r = lora_a.shape[0]
    if r > CFLORA_TRITON_MAX_RANK:
        return f"rank r={r} exceeds the triton kernel's limit of {CFLORA_TRITON_MAX_RANK}"
    if x.dtype not in _TRITON_DTYPES:
        return f"the triton kernel runs {', '.join(CFLORA_TRITON_DTYPES)} only; got {x.dtype}"
    return None
