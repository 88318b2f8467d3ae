"""Seeded dropout: the mask is a pure function of (seed, flat element index), shared by all backends.

The hash is specified in ``csrc/common.h``; :func:`dropout_keep_mask_ref` is its PyTorch twin (the
oracle), and the C++, CUDA and Triton kernels compute the same bits inline, so a backward pass can
regenerate the forward's mask instead of storing it.

A dropped element is set to exactly 0 (a select, not a multiplication by 0), so a dropped Inf or NaN
leaves no NaN behind; every backend does the same. The seed is an int, or an integer tensor holding one
value (the key is then computed with tensor ops, so the reference stays traceable by torch.compile).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .._kernel_common import M32 as _M32
from .._kernel_common import dropout_key, dropout_threshold
from . import _backend, _registry
from ._registry import ext_op

OP = "seeded_dropout"
_backend.register_op(OP, {"cpu": ["cpp", "reference"], "cuda": ["cuda", "reference"]})


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for 0 <= x < 2^32 held in int64, without signed overflow: split c into 16-bit halves.
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_key_tensor(seed: torch.Tensor) -> torch.Tensor:
    """:func:`dropout_key` of an integer tensor holding one seed, as a 0-d int64 tensor (no ``.item()``)."""
    s = seed.reshape(()).to(torch.int64)
    # s >> 32 is an arithmetic shift; masking keeps the high word of the two's-complement uint64, as above
    return mix32((s & _M32) ^ mix32(((s >> 32) & _M32) ^ 0x9E3779B9))


SeedLike = Union[int, torch.Tensor]


def dropout_keep_mask_ref(numel: int, p: float, seed: SeedLike, device=None, offset: int = 0) -> torch.Tensor:
    """Boolean keep-mask for flat indices ``offset .. offset+numel-1`` (the reference of the shared hash).

    ``seed`` is an int or an integer tensor holding one value (any device; a 0-d CPU tensor is read as a
    scalar by the ops below, with no device synchronisation).
    """
    idx = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    key = dropout_key_tensor(seed) if isinstance(seed, torch.Tensor) else dropout_key(seed)
    h = mix32((idx & _M32) ^ mix32(((idx >> 32) + key) & _M32))
    return (h >> 8) >= dropout_threshold(p)


def seeded_dropout_ref(x: torch.Tensor, p: float, seed: SeedLike) -> torch.Tensor:
    """Inverted dropout with the shared mask (PyTorch reference; differentiable).

    Kept elements are ``x / (1 - p)``; dropped ones are exactly 0 (a select: a dropped Inf/NaN gives 0,
    as in the kernels), and the gradient is the same select of the incoming gradient.
    """
    if p == 0.0:
        return x
    keep = dropout_keep_mask_ref(x.numel(), p, seed, device=x.device).view(x.shape)
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)


def _check(x: torch.Tensor, p: float) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"seeded_dropout: x must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"seeded_dropout: x must be a floating tensor; got dtype {x.dtype}")
    if not (0.0 <= p < 1.0):
        raise ValueError(f"seeded_dropout: p must be in [0, 1); got {p}")


def seeded_dropout(x: torch.Tensor, p: float, seed: int, *, backend: Optional[str] = None) -> torch.Tensor:
    """Inverted dropout of ``x`` with the mask hash(seed, flat index); differentiable on every backend."""
    _check(x, p)
    which = _backend.resolve(OP, x.device, backend)
    if p == 0.0:
        return x
    return _backend.impl(OP, which)(x, p, seed)


# ----------------------------------------------------------------------------------------------------------
# implementations: fn(x, p, seed) -> drop(x), one table row per backend (rellax_fast.ops._backend)
# ----------------------------------------------------------------------------------------------------------


def _run_ext(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    # cpp and cuda share one torch.library op; the dispatcher picks the CPU or CUDA kernel by device
    return ext_op(OP)(x.contiguous(), float(p), int(seed))


_backend.register_impl(OP, "reference", seeded_dropout_ref)
_backend.register_impl(OP, "cpp", _run_ext)
_backend.register_impl(OP, "cuda", _run_ext)


def _register_ext() -> None:
    @torch.library.register_fake("rellax_fast::seeded_dropout")
    def _(x, p, seed):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _setup(ctx, inputs, output):
        _, ctx.p, ctx.seed = inputs

    def _backward(ctx, grad):
        # d(drop(x))/dx is the same mask and scale: apply the op to the gradient.
        return torch.ops.rellax_fast.seeded_dropout(grad.contiguous(), ctx.p, ctx.seed), None, None

    torch.library.register_autograd("rellax_fast::seeded_dropout", _backward, setup_context=_setup)


_registry.register_ext_hook(_register_ext)
