"""Model-level CFLoRA API: inject, condition, backend switch, trainable-parameter report, merge/unmerge.

All functions act on a plain ``nn.Module`` (any Hugging Face model) in place; a DDP / DataParallel
wrapper is unwrapped first, so layer names never carry its ``module.`` prefix.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from .config import CFLoRAConfig
from .layers import CFLoRALinear, ConditionSlot, supported_base

logger = logging.getLogger("rellax_fast.cflora")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
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


def get_cflora_config(model: nn.Module) -> CFLoRAConfig:
    """The config the model was injected with."""
    return _require_layers(model, "get_cflora_config")[0][1].cflora_config


def _target_matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def cflora_trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts (shared Parameters counted once)."""
    seen = set()
    trainable = total = 0
    for p in unwrap_model(model).parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def _set_trainable(layer: CFLoRALinear, config: CFLoRAConfig) -> None:
    layer.lora_A.requires_grad_(config.train_lora)
    layer.lora_B.requires_grad_(config.train_lora)
    if layer.interaction is not None:
        for p in layer.interaction.parameters():
            p.requires_grad_(config.train_interaction)


def inject_cflora(model: nn.Module, config: CFLoRAConfig) -> nn.Module:
    """Replace the target ``nn.Linear`` / ``Conv1D`` modules by CFLoRA layers, in place; freeze the base.

    Raises ValueError when the model already has CFLoRA layers, when the targets match no module, when
    a matched module is not Linear/Conv1D, or when ``r`` exceeds a matched module's min(d_in, d_out).
    Returns the model.
    """
    if not isinstance(config, CFLoRAConfig):
        raise TypeError(f"inject_cflora: config must be a CFLoRAConfig; got {type(config).__name__}")
    config.validate()
    root = unwrap_model(model)
    if cflora_layers(root):
        raise ValueError(
            "inject_cflora: the model already has CFLoRA layers; injecting twice is not supported "
            "(load a saved adapter with load_cflora, or build a fresh model)"
        )
    matched, unsupported, candidates = [], [], []
    for name, module in root.named_modules():
        if not name:
            continue
        is_linear = supported_base(module)
        if is_linear:
            candidates.append(name)
        if _target_matches(name, config.target_modules):
            (matched if is_linear else unsupported).append((name, module))
    if unsupported:
        names = ", ".join(f"{n} ({type(m).__name__})" for n, m in unsupported[:5])
        raise ValueError(
            f"inject_cflora: target_modules={config.target_modules!r} matches modules CFLoRA cannot wrap "
            f"(only nn.Linear and transformers Conv1D): {names}"
        )
    if not matched:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ValueError(
            f"inject_cflora: target_modules={config.target_modules!r} matches no nn.Linear/Conv1D module; "
            f"the model's linear module names end in: {', '.join(leaf_names[:20]) or '(none)'}"
        )
    # build every layer before replacing any, so a rank error leaves the model untouched
    new_layers = [(name, CFLoRALinear(module, config, name=name)) for name, module in matched]
    for p in root.parameters():
        p.requires_grad_(False)
    for name, layer in new_layers:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, layer)
        _set_trainable(layer, config)
    trainable, total = cflora_trainable_parameters(root)
    logger.info(
        "CFLoRA (%s, r=%d) injected into %d modules: trainable params %d || all params %d || trainable %.4f%%",
        config.interaction, config.r, len(new_layers), trainable, total, 100.0 * trainable / max(total, 1),
    )
    return model


def set_cflora_backend(model: nn.Module, backend: Optional[str]) -> nn.Module:
    """Route every CFLoRA layer's ``ops.cflora_linear`` call to ``backend`` (None/"auto": automatic)."""
    allowed = (None, "auto", "reference", "cpp", "cuda", "triton")
    if backend not in allowed:
        raise ValueError(f"set_cflora_backend: backend must be None or one of auto, reference, cpp, cuda, "
                         f"triton; got {backend!r}")
    for _, layer in _require_layers(model, "set_cflora_backend"):
        layer.backend = backend
    return model


@contextlib.contextmanager
def cflora_condition(model: nn.Module, cond: torch.Tensor) -> Iterator[nn.Module]:
    """Feed per-sample conditioning vectors ``cond`` (B, cond_dim) to every CFLoRA layer of ``model``.

    Inside the block each conditioned layer generates its C from ``cond``; a model batch that is a
    multiple of B (``generate()`` with beams / ``num_return_sequences``) repeats each sample's C.
    After the block, the layers keep ``cond`` marked inactive: only a backward pass (the recomputation
    of gradient checkpointing) may still use it; a forward outside a block raises. With gradient
    checkpointing, run the backward of a conditioned forward before the next block's forward (the
    usual training loop does), or pass :func:`cflora_checkpoint_context_fn` to the checkpoint function,
    which replays each checkpointed forward's own cond exactly.
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
            raise RuntimeError("cflora_condition: a cflora_condition block is already active on this model; "
                               "nesting is not supported")
    slot = ConditionSlot(cond)
    for _, layer in layers:
        layer._cflora_slot = slot
    try:
        yield model
    finally:
        slot.active = False


def cflora_checkpoint_context_fn(model: nn.Module):
    """A ``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant) that makes every recomputation
    use the cond of its own forward, even when several conditioned forwards run before one backward::

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False, "context_fn": cflora_checkpoint_context_fn(model)})
    """
    layers = [layer for _, layer in _require_layers(model, "cflora_checkpoint_context_fn")]

    @contextlib.contextmanager
    def _replay(slots):
        current = [layer._cflora_slot for layer in layers]
        for layer, slot in zip(layers, slots):
            layer._cflora_slot = slot
        try:
            yield
        finally:
            for layer, slot in zip(layers, current):
                layer._cflora_slot = slot

    def context_fn():
        # called at forward time: capture the slots this forward sees, replay them at recomputation
        slots = [layer._cflora_slot for layer in layers]
        return contextlib.nullcontext(), _replay(slots)

    return context_fn


def clear_cflora_condition(model: nn.Module) -> None:
    """Drop the (inactive) cond kept on the layers for gradient-checkpoint recomputation."""
    for _, layer in cflora_layers(model):
        layer._cflora_slot = None


def merge_cflora(model: nn.Module) -> nn.Module:
    """Fold ΔW = s·B C A into W for every layer (identity or static interaction only)."""
    layers = _require_layers(model, "merge_cflora")
    for name, layer in layers:
        if layer.interaction is not None and not layer.interaction.mergeable:
            raise RuntimeError(
                f"merge_cflora: layer {name} has interaction {layer.interaction.kind!r}, whose C is generated "
                "per sample, so ΔW differs per sample and cannot be folded into W; only 'identity' and "
                "'static' adapters merge"
            )
        if layer.merged:
            raise RuntimeError(f"merge_cflora: layer {name} is already merged")
    for _, layer in layers:
        layer.merge()
    return model


def unmerge_cflora(model: nn.Module) -> nn.Module:
    """Subtract the merged ΔW again (inverse of :func:`merge_cflora`, up to rounding)."""
    layers = _require_layers(model, "unmerge_cflora")
    for name, layer in layers:
        if not layer.merged:
            raise RuntimeError(f"unmerge_cflora: layer {name} is not merged")
    for _, layer in layers:
        layer.unmerge()
    return model
