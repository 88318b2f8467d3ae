"""Several named CFLoRA adapters on one model, PEFT-style: add, switch, delete, list.

:func:`inject_cflora` puts one adapter in place, named ``"default"``. :func:`add_cflora_adapter` builds another
one (its own config: targets, rank, interaction, ``cond_dim``, modules to save) around the same frozen base
modules; :func:`set_cflora_adapter` puts the named one in place. Only the active adapter is in the module tree,
so everything else - the forward, ``cflora_condition`` / ``cflora_cond=`` (with the active adapter's
``cond_dim``), ``disable_adapter``, ``save_cflora``, ``save_pretrained``, ``merge_cflora``, ``state_dict()`` - acts
on it. The others are kept aside (unregistered, so they are not in ``parameters()``: an optimizer built for one
adapter trains that one), exactly as they were. A switch moves no tensor: it swaps module objects.

Not supported: several adapters active at once (PEFT's weighted combinations).
"""

from __future__ import annotations

from typing import Dict, List

from torch import nn

from .conditioning import _require_layers, cflora_layers, unwrap_model
from .config import CFLoRAConfig
from .model import (
    _ADAPTERS,
    _MODULES_TO_SAVE,
    DEFAULT_ADAPTER,
    _modules_to_save_registry,
    _replace_module,
    _use_original_modules,
    inject_cflora,
)

__all__ = [
    "DEFAULT_ADAPTER",
    "add_cflora_adapter",
    "set_cflora_adapter",
    "delete_cflora_adapter",
    "cflora_adapter_names",
    "active_cflora_adapter",
]


def _registry(root: nn.Module) -> Dict[str, object]:
    """The root's adapter registry (set by inject_cflora; a model injected before it existed gets one)."""
    return root.__dict__.setdefault(_ADAPTERS, {"active": DEFAULT_ADAPTER, "stored": {}})


def _refuse_merged(root: nn.Module, what: str) -> None:
    merged = [name for name, layer in cflora_layers(root) if layer.merged]
    if merged:
        raise RuntimeError(
            f"{what}: the active adapter's layers {merged[:3]} are merged into W; unmerge_cflora(model) first"
        )


def _take_out(root: nn.Module) -> Dict[str, object]:
    """Remove the active adapter from the tree (base modules and original modules to save back in place)."""
    layers: List = cflora_layers(root)
    to_save = _modules_to_save_registry(root)
    _use_original_modules(root, original=True)
    for name, layer in layers:
        _replace_module(root, name, layer.base_module())
    root.__dict__.pop(_MODULES_TO_SAVE, None)
    return {"layers": layers, "to_save": to_save}


def _put_in(root: nn.Module, adapter: Dict[str, object]) -> None:
    for name, layer in adapter["layers"]:
        _replace_module(root, name, layer)
    if adapter["to_save"]:
        root.__dict__[_MODULES_TO_SAVE] = adapter["to_save"]
        # follow the enabled state of the adapter's layers (disable_adapter swaps the originals in)
        enabled = not any(layer.disabled for _, layer in adapter["layers"])
        _use_original_modules(root, original=not enabled)


def cflora_adapter_names(model: nn.Module) -> List[str]:
    """The names of the model's adapters, the active one first."""
    root = unwrap_model(model)
    _require_layers(root, "cflora_adapter_names")
    registry = _registry(root)
    return [registry["active"], *sorted(registry["stored"])]


def active_cflora_adapter(model: nn.Module) -> str:
    """The name of the adapter in place (``"default"`` for the one :func:`inject_cflora` put in)."""
    return cflora_adapter_names(model)[0]


def add_cflora_adapter(model: nn.Module, adapter_name: str, config: CFLoRAConfig) -> nn.Module:
    """Add a new adapter ``adapter_name`` with its own ``config`` (as :func:`inject_cflora` would build it on
    the base model); the active adapter stays active (PEFT's ``add_adapter``). Returns the model."""
    root = unwrap_model(model)
    _require_layers(root, "add_cflora_adapter")
    registry = _registry(root)
    if not (isinstance(adapter_name, str) and adapter_name):
        raise ValueError(f"add_cflora_adapter: adapter_name must be a non-empty str; got {adapter_name!r}")
    if adapter_name == registry["active"] or adapter_name in registry["stored"]:
        raise ValueError(
            f"add_cflora_adapter: the model already has an adapter named {adapter_name!r} "
            f"(its adapters: {cflora_adapter_names(root)}); delete_cflora_adapter it first"
        )
    _refuse_merged(root, "add_cflora_adapter")
    active = _take_out(root)
    try:
        inject_cflora(root, config, adapter_name=adapter_name)
    except Exception:
        _put_in(root, active)
        raise
    registry["stored"][adapter_name] = _take_out(root)
    _put_in(root, active)
    return model


def set_cflora_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Put the adapter ``adapter_name`` in place; the active one is kept aside as it is. Returns the model."""
    root = unwrap_model(model)
    names = cflora_adapter_names(root)
    registry = _registry(root)
    if adapter_name == registry["active"]:
        return model
    if adapter_name not in registry["stored"]:
        raise ValueError(
            f"set_cflora_adapter: no adapter named {adapter_name!r}; the model's adapters: {names}"
        )
    _refuse_merged(root, "set_cflora_adapter")
    for _, layer in cflora_layers(root):
        layer._cflora_slot = None  # a kept-aside adapter holds no cond
    registry["stored"][registry["active"]] = _take_out(root)
    _put_in(root, registry["stored"].pop(adapter_name))
    registry["active"] = adapter_name
    return model


def delete_cflora_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Delete the kept-aside adapter ``adapter_name``. The active adapter is not deleted this way: switch to
    another first (:func:`set_cflora_adapter`), or remove the last one with ``unload`` / ``merge_and_unload``."""
    root = unwrap_model(model)
    names = cflora_adapter_names(root)
    registry = _registry(root)
    if adapter_name == registry["active"]:
        raise ValueError(
            f"delete_cflora_adapter: {adapter_name!r} is the active adapter; set_cflora_adapter(model, <another>) "
            "first, or unload(model) / merge_and_unload(model) to remove the adapter from the model"
        )
    if adapter_name not in registry["stored"]:
        raise ValueError(
            f"delete_cflora_adapter: no adapter named {adapter_name!r}; the model's adapters: {names}"
        )
    del registry["stored"][adapter_name]
    return model
