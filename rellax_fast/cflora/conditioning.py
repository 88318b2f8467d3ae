"""Conditioning of the CFLoRA layers of a model: finding them (``cflora_layers`` through DDP/DP wrappers),
feeding per-sample ``cond`` vectors to them for one block (``cflora_condition``), and replaying each forward's
cond in gradient-checkpoint recomputations. Below ``model`` (injection, merge, disable) and ``hooks`` (the
``cflora_cond=`` keyword), which both import it; it imports only ``layers``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, List, Tuple

import torch
from torch import nn

from .layers import CFLoRALinear, ConditionSlot


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    if not isinstance(model, nn.Module):  # every adapter function takes its model through here
        raise TypeError(
            f"model must be a torch.nn.Module (e.g. a transformers model); got {type(model).__name__}"
        )
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def cflora_layers(model: nn.Module) -> List[Tuple[str, CFLoRALinear]]:
    """(name, layer) of every CFLoRA layer, in module order."""
    return [(n, m) for n, m in unwrap_model(model).named_modules() if isinstance(m, CFLoRALinear)]


def _require_layers(model: nn.Module, what: str) -> List[Tuple[str, CFLoRALinear]]:
    layers = cflora_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no CFLoRA layers; call inject_cflora(model, config) first")
    return layers


@contextlib.contextmanager
def cflora_condition(model: nn.Module, cond: torch.Tensor) -> Iterator[nn.Module]:
    """Feed per-sample conditioning vectors ``cond`` (B, cond_dim) to every CFLoRA layer of ``model``.

    Inside the block each conditioned layer generates its C from ``cond``; a model batch that is a
    multiple of B (``generate()`` with beams / ``num_return_sequences``) repeats each sample's C.
    After the block, the layers keep ``cond`` marked inactive: only a backward pass (the recomputation
    of gradient checkpointing) may still use it; a forward outside a block raises. Hugging Face gradient
    checkpointing (``gradient_checkpointing_enable``) replays each checkpointed forward's own cond, so several
    conditioned forwards may precede one backward; when calling ``torch.utils.checkpoint`` yourself, pass
    :func:`cflora_checkpoint_context_fn` as its ``context_fn`` for the same. Without either, a non-reentrant
    recomputation that cannot tell which block's cond it needs raises instead of giving wrong gradients.
    """
    slot = begin_condition(model, cond)
    try:
        yield model
    finally:
        end_condition(slot)


def begin_condition(model: nn.Module, cond: torch.Tensor) -> ConditionSlot:
    """Enter a conditioning block (what ``with cflora_condition(model, cond)`` does on entry); return its slot.

    :func:`end_condition` leaves it again. These are plain functions, not a context-manager object, so the
    ``cflora_cond=`` forward hooks (``hooks.py``) that call them trace under ``torch.compile(fullgraph=True)``.
    """
    layers = _require_layers(model, "cflora_condition")
    cond_dim = layers[0][1].cflora_config.cond_dim
    if not isinstance(cond, torch.Tensor):
        raise TypeError(f"cflora_condition: cond must be a torch.Tensor; got {type(cond).__name__}")
    if cond.dim() != 2 or (cond_dim is not None and cond.shape[1] != cond_dim):
        raise ValueError(
            f"cflora_condition: cond must have shape (batch, cond_dim={cond_dim}); got {tuple(cond.shape)}"
        )
    if not cond.is_floating_point():
        raise TypeError(f"cflora_condition: cond must be a floating tensor; got dtype {cond.dtype}")
    for _, layer in layers:
        slot = layer._cflora_slot
        if slot is not None and slot.active:
            raise RuntimeError(
                "cflora_condition: a cflora_condition block is already active on this model; "
                "nesting is not supported"
            )
    _install_checkpoint_replay(unwrap_model(model))
    slot = ConditionSlot(cond)
    for _, layer in layers:
        layer._cflora_slot = slot
    return slot


def end_condition(slot: ConditionSlot) -> None:
    """Leave the block :func:`begin_condition` entered; the layers keep its cond, inactive (for the
    recomputation of gradient checkpointing only), and drop its cache of C."""
    slot.active = False
    slot.interactions.clear()


# ------------------------------------------------------------------------------------- gradient checkpointing
class _ReplayCondition:
    """Wraps a Hugging Face module's ``_gradient_checkpointing_func`` so each checkpointed call runs - in its
    forward and again in its recomputation inside ``backward()`` - with the cond slots of the CFLoRA layers
    under it as they were at the forward. Two conditioned forwards followed by one backward then recompute
    each forward with its own cond, with ``use_reentrant`` True or False and any ``context_fn``.

    It is installed by :func:`cflora_condition` on every module that has a ``_gradient_checkpointing_func``
    (``gradient_checkpointing_enable`` may run after injection, so this is re-checked on every block).
    """

    def __init__(self, func, module: nn.Module):
        self.func = func
        self.module = module

    def __call__(self, function, *args, **kwargs):
        layers = [m for m in self.module.modules() if isinstance(m, CFLoRALinear)]
        if not layers:
            return self.func(function, *args, **kwargs)
        slots = [layer._cflora_slot for layer in layers]
        return self.func(functools.partial(_run_with_slots, function, layers, slots), *args, **kwargs)


@contextlib.contextmanager
def _slots_replayed(layers: List[CFLoRALinear], slots) -> Iterator[None]:
    """Set each layer's slot to the one its forward saw, marked as a replay (the recomputation then trusts it)."""
    current = [(layer._cflora_slot, layer._cflora_replaying) for layer in layers]
    for layer, slot in zip(layers, slots):
        layer._cflora_slot = slot
        layer._cflora_replaying = True
    try:
        yield
    finally:
        for layer, (slot, replaying) in zip(layers, current):
            layer._cflora_slot = slot
            layer._cflora_replaying = replaying


def _run_with_slots(function, layers, slots, *args, **kwargs):
    with _slots_replayed(layers, slots):
        return function(*args, **kwargs)


def _install_checkpoint_replay(root: nn.Module) -> None:
    for module in root.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None and not isinstance(func, _ReplayCondition):
            module._gradient_checkpointing_func = _ReplayCondition(func, module)


def _remove_checkpoint_replay(root: nn.Module) -> None:
    for module in root.modules():
        func = module.__dict__.get("_gradient_checkpointing_func")
        if isinstance(func, _ReplayCondition):
            module._gradient_checkpointing_func = func.func


def cflora_checkpoint_context_fn(model: nn.Module):
    """A ``context_fn`` for calling ``torch.utils.checkpoint`` (non-reentrant) yourself: every recomputation
    uses the cond of its own forward, even when several conditioned forwards run before one backward::

        torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False,
                                          context_fn=cflora_checkpoint_context_fn(model))

    Hugging Face's ``gradient_checkpointing_enable`` needs nothing: :func:`cflora_condition` makes its
    checkpoint function replay the cond by itself.
    """
    layers = [layer for _, layer in _require_layers(model, "cflora_checkpoint_context_fn")]

    def context_fn():
        # called at forward time: capture the slots this forward sees, replay them at recomputation
        slots = [layer._cflora_slot for layer in layers]
        return contextlib.nullcontext(), _slots_replayed(layers, slots)

    return context_fn


def clear_cflora_condition(model: nn.Module) -> None:
    """Drop the (inactive) cond kept on the layers for gradient-checkpoint recomputation."""
    for _, layer in cflora_layers(model):
        layer._cflora_slot = None
