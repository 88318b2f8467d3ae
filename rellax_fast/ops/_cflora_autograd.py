"""The torch.library glue that every fused CFLoRA op shares: fake (meta) implementations and autograd.

The C++ ops (``rellax_fast::cflora_fwd`` / ``cflora_bwd``), the Triton custom ops
(:mod:`rellax_fast.ops._cflora_triton`) and the tensor-seed ops (:mod:`rellax_fast.ops.cflora`) have one
schema shape, so they share these: a forward returns (y, S, T), autograd saves x, W, A, B, C, S and T
(never a d_out-sized activation), and the backward op returns the six gradients, an empty tensor where
one is not needed.

:func:`rellax_fast.cflora_linear` differentiates through :func:`make_function`'s ``autograd.Function``, not
through torch.library's per-call autograd wrapper, which re-fills the schema's defaults on every call
(``torch._library.utils.fill_defaults``, quadratic in the argument count; pytorch/pytorch#176592) and cost
about 50 us of host time per forward on our 10-argument schemas. The Triton and tensor-seed custom ops also
keep a ``register_autograd`` (for opcheck and direct callers; inside the Function's forward grad mode is off,
so it takes its cheap no-grad path); the C++ ops register torch's not-implemented autograd node instead
(``csrc/cflora.cpp``). The same ``fwd_setup_context`` and backward serve both routes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def fwd_fake(x, weight, bias, lora_a, lora_b, interaction, rows_per_sample, scale, dropout_p, seed, *backend):
    m, r, d_out = x.shape[0], lora_a.shape[0], weight.shape[0]
    return x.new_empty(m, d_out), x.new_empty(m, r), x.new_empty(m, r)


def bwd_fake(
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
    *backend,
):
    shapes = (
        x.shape,
        weight.shape,
        weight.shape[:1],
        lora_a.shape,
        lora_b.shape,
        None if interaction is None else interaction.shape,
    )
    return tuple(
        x.new_empty(shape) if (need and shape is not None) else x.new_empty(0)
        for need, shape in zip(needs_grad, shapes)
    )


def fwd_setup_context(ctx, inputs, output):
    # inputs: the 10 arguments of cflora_fwd (int seed), or those with a tensor seed plus the backend name
    x, weight, bias, lora_a, lora_b, interaction, rows_per_sample, scale, dropout_p, seed = inputs[:10]
    _, s, t = output
    ctx.n_inputs = len(inputs)
    ctx.tensor_seed = isinstance(seed, Tensor)
    if ctx.tensor_seed:
        ctx.save_for_backward(x, weight, lora_a, lora_b, interaction, s, t, seed)
        ctx.hyper = (rows_per_sample, scale, dropout_p, None)
        ctx.backend = inputs[10]
    else:
        ctx.save_for_backward(x, weight, lora_a, lora_b, interaction, s, t)
        ctx.hyper = (rows_per_sample, scale, dropout_p, seed)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(s, t)


def make_fwd_backward(bwd_op):
    def _backward(ctx, grad_y, grad_s, grad_t):
        x, weight, lora_a, lora_b, interaction, s, t = ctx.saved_tensors[:7]
        rows_per_sample, scale, dropout_p, seed = ctx.hyper
        extra = ()
        if ctx.tensor_seed:
            seed, extra = ctx.saved_tensors[7], (ctx.backend,)
        need = list(ctx.needs_input_grad[:6])
        need[2] = need[2] and ctx.has_bias
        need[5] = need[5] and interaction is not None
        if not any(need):
            return (None,) * ctx.n_inputs
        grads = bwd_op(
            grad_y.contiguous(),
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
            need,
            *extra,
        )
        out = [g if n else None for g, n in zip(grads, need)]
        return (*out, *([None] * (ctx.n_inputs - 6)))

    return _backward


def make_function(name: str, fwd_op: Callable[[], Callable], bwd_op: Callable[..., tuple]) -> type:
    """An ``autograd.Function`` over a forward op (``fwd_op()`` returns it; ops load lazily) and its backward
    (``bwd_op(*args)``), with the op registration's own setup_context and backward (see the module note)."""

    # forward takes ctx (no separate setup_context): Function.apply binds a setup_context-style forward's
    # arguments with inspect.signature on every call, which costs as much as the wrapper this replaces
    def forward(ctx, *inputs):
        output = fwd_op()(*inputs)
        fwd_setup_context(ctx, inputs, output)
        return output

    return type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(make_fwd_backward(bwd_op))},
    )
