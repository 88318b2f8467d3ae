"""Model-level CFLoRA API: inject, condition, backend switch, trainable-parameter report, disable, merge/unmerge,
unload / merge_and_unload.

- :func:`inject_cflora` resolves the targets (suffixes, a regex, or ``"all-linear"``; ``exclude_modules``;
  per-module ``rank_pattern`` / ``alpha_pattern``), sets up ``modules_to_save`` (a trainable copy in place, the
  original kept aside) and warns when a target's weight is tied to another module (a tied ``lm_head``).
- ``conditioning.cflora_condition`` feeds the per-sample cond and makes Hugging Face gradient checkpointing
  replay the cond each checkpointed forward saw (see ``conditioning._ReplayCondition``).
- :func:`disable_adapter` (a context) and HF's ``model.disable_adapters()`` / ``enable_adapters()`` give the
  base model's outputs exactly; :func:`unload` / :func:`merge_and_unload` give back plain ``nn.Linear`` /
  ``Conv1D`` modules and a base ``state_dict``.

All functions act on a plain ``nn.Module`` (any Hugging Face model) in place; a DDP / DataParallel
wrapper is unwrapped first, so layer names never carry its ``module.`` prefix.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import re
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..ops._backend import BACKEND_CHOICES
from .conditioning import _remove_checkpoint_replay, _require_layers, cflora_layers, unwrap_model
from .config import ALL_LINEAR, CFLoRAConfig
from .hooks import disable_cflora_cond_kwarg, enable_cflora_cond_kwarg
from .layers import CFLoRALinear, supported_base

logger = logging.getLogger("rellax_fast.cflora")

# unregistered attribute of the root module: {name: {"original": module, "trained": module}} for modules_to_save
_MODULES_TO_SAVE = "_cflora_modules_to_save"
# unregistered attribute of the root module: {"active": name, "stored": {name: adapter kept aside}} (adapters.py)
_ADAPTERS = "_cflora_adapters"
DEFAULT_ADAPTER = "default"
# Hugging Face PeftAdapterMixin methods that CFLoRA answers on an injected model (see _bind_hf_adapter_methods)
_HF_ADAPTER_METHODS = ("disable_adapters", "enable_adapters")
# (install, remove) pairs of instance patches that modules above this one put on every injected model: called
# with the root module at the end of inject_cflora and by unload / merge_and_unload. persistence.py registers
# the save_pretrained wrapper here (it needs save_cflora, and persistence imports this module).
INSTANCE_PATCHES: List[Tuple[Callable[[nn.Module], None], Callable[[nn.Module], None]]] = []


def get_cflora_config(model: nn.Module) -> CFLoRAConfig:
    """The config the model was injected with."""
    return _require_layers(model, "get_cflora_config")[0][1].cflora_config


def _target_matches(name: str, targets) -> bool:
    """PEFT's matching: a list of suffixes (the full name or its tail after a dot) or one full-match regex."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


# attribute names of a sequence-classification head, which "all-linear" leaves out when the model has no
# output embeddings (PEFT's SEQ_CLS_HEAD_NAMES, in its order)
_CLASSIFIER_HEAD_NAMES = ("score", "classifier")


def _output_head_names(root: nn.Module) -> set:
    """Names of the output head, which ``"all-linear"`` leaves out, as PEFT does: the output embeddings
    (``get_output_embeddings()``, e.g. ``lm_head``) or, when there are none, a classification head named
    ``score`` or ``classifier`` (the first that the model has)."""
    getter = getattr(root, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        head = next(
            (h for h in (getattr(root, n, None) for n in _CLASSIFIER_HEAD_NAMES) if isinstance(h, nn.Module)),
            None,
        )
    if head is None:
        return set()
    return {name for name, module in root.named_modules(remove_duplicate=False) if module is head}


def _parameter_names(root: nn.Module) -> Dict[int, List[str]]:
    """id(Parameter) -> every name it is registered under (several names: tied weights)."""
    names: Dict[int, List[str]] = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _tied_with(names: Dict[int, List[str]], layer_name: str, weight: torch.Tensor) -> List[str]:
    return [n for n in names.get(id(weight), []) if n != f"{layer_name}.weight"]


def _modules_to_save(root: nn.Module, config: CFLoRAConfig) -> List[Tuple[str, nn.Module]]:
    """The outermost modules matching ``config.modules_to_save``."""
    if config.modules_to_save is None:
        return []
    found: List[Tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if name and _target_matches(name, config.modules_to_save):
            if not any(name.startswith(prev + ".") for prev, _ in found):
                found.append((name, module))
    if not found:
        raise ValueError(
            f"inject_cflora: modules_to_save={config.modules_to_save!r} matches no module of the model"
        )
    return found


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: … || all params: … || trainable%: …`` (PEFT's line; shared Parameters once)."""
    trainable, total = cflora_trainable_parameters(model)
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100.0 * trainable / max(total, 1):.4f}"
    )


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


def inject_cflora(
    model: nn.Module,
    config: CFLoRAConfig,
    *,
    verbose: bool = False,
    cond_kwarg: bool = True,
    adapter_name: str = DEFAULT_ADAPTER,
) -> nn.Module:
    """Replace the target ``nn.Linear`` / ``Conv1D`` modules by CFLoRA layers, in place; freeze the base.

    Targets are ``config.target_modules`` (suffixes, a regex, or ``"all-linear"``: every Linear/Conv1D but the
    output head) minus ``config.exclude_modules`` and the ``modules_to_save``; each layer gets its rank and
    alpha from ``rank_pattern`` / ``alpha_pattern``. Each ``modules_to_save`` module is replaced by a trainable
    copy (its original is kept aside for :func:`disable_adapter`). A target whose weight is tied to another
    module (e.g. ``lm_head`` and the input embeddings) is wrapped with a warning: training is fine, but
    :func:`merge_cflora` refuses it unless ``untie=True``. ``verbose=True`` prints
    :func:`print_trainable_parameters`' line (it is always logged at INFO). When the interaction needs a
    per-sample condition and ``cond_kwarg`` is true (the default), ``model(**batch, cflora_cond=cond)`` and
    ``model.generate(..., cflora_cond=cond)`` work as well as :func:`cflora_condition`
    (:func:`rellax_fast.cflora.hooks.enable_cflora_cond_kwarg`; :func:`unload` removes it again). On a Hugging
    Face model, ``model.save_pretrained(dir)`` then writes the base model and the adapter files beside it, and
    ``load_cflora(AutoModel...from_pretrained(dir), dir)`` restores the adapted model
    (``persistence._save_pretrained_with_adapter``; :func:`unload` removes the wrapper).

    A rank above a module's min(d_in, d_out) is accepted, as PEFT accepts it (ΔW then has full rank; the
    adapter has more parameters than it needs).

    The adapter is named ``adapter_name``; :func:`rellax_fast.cflora.add_cflora_adapter` adds more and
    :func:`rellax_fast.cflora.set_cflora_adapter` switches between them.

    Raises ValueError when the model already has CFLoRA layers, when the targets match no module, or when
    a matched module is not Linear/Conv1D. Returns the model.
    """
    root = _checked_root(model, config, adapter_name)
    to_save = _modules_to_save(root, config)
    matched = _matched_targets(root, config, tuple(name for name, _ in to_save))
    # build every layer before replacing any, so a rank error leaves the model untouched
    new_layers = [
        (name, CFLoRALinear(module, config, name=name, **_rank_alpha(config, name)))
        for name, module in matched
    ]
    _warn_tied_targets(root, new_layers)
    _install(root, config, new_layers, to_save, adapter_name)
    trainable, total = cflora_trainable_parameters(root)
    logger.info(
        "CFLoRA (%s, r=%d) injected into %d modules (%d modules to save): trainable params %d || all params %d "
        "|| trainable %.4f%%",
        config.interaction,
        config.r,
        len(new_layers),
        len(to_save),
        trainable,
        total,
        100.0 * trainable / max(total, 1),
    )
    if cond_kwarg and config.needs_cond:
        enable_cflora_cond_kwarg(root)
    if verbose:
        print_trainable_parameters(root)
    return model


def _checked_root(model: nn.Module, config: CFLoRAConfig, adapter_name: str) -> nn.Module:
    """The unwrapped model, once ``config`` and ``adapter_name`` are checked and the model has no CFLoRA layer."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"inject_cflora: model must be a torch.nn.Module (load it first, e.g. with "
            f"AutoModelForCausalLM.from_pretrained); got {type(model).__name__}"
        )
    if not isinstance(config, CFLoRAConfig):
        raise TypeError(f"inject_cflora: config must be a CFLoRAConfig; got {type(config).__name__}")
    config.validate()
    if not (isinstance(adapter_name, str) and adapter_name):
        raise ValueError(f"inject_cflora: adapter_name must be a non-empty str; got {adapter_name!r}")
    root = unwrap_model(model)
    if cflora_layers(root):
        raise ValueError(
            "inject_cflora: the model already has CFLoRA layers; injecting twice is not supported. To add a "
            "second adapter, call add_cflora_adapter(model, name, config) and switch with "
            "set_cflora_adapter(model, name); to replace the adapter, unload(model) or merge_and_unload(model) "
            "first; to load a saved one, load_cflora(model, path, adapter_name=name)"
        )
    return root


def _matched_targets(root: nn.Module, config: CFLoRAConfig, saved_prefixes: Tuple[str, ...]) -> List:
    """[(name, module)] that ``config`` targets (not under a module to save, not excluded); raises ValueError
    when a target is not Linear/Conv1D or when nothing matches."""
    all_linear = config.target_modules == ALL_LINEAR
    heads = _output_head_names(root) if all_linear else set()
    matched, unsupported, candidates = [], [], []
    for name, module in root.named_modules():
        if not name:
            continue
        is_linear = supported_base(module)
        if is_linear:
            candidates.append(name)
        if any(name == p or name.startswith(p + ".") for p in saved_prefixes):
            continue  # a module to save is trained in full, not adapted
        if _target_matches(name, config.exclude_modules) or not config.in_transformed_layer(name):
            continue
        if all_linear:
            if is_linear and name not in heads:
                matched.append((name, module))
        elif _target_matches(name, config.target_modules):
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
            f"inject_cflora: target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}, "
            f"layers_to_transform={config.layers_to_transform!r}, layers_pattern={config.layers_pattern!r}) "
            f"matches no nn.Linear/Conv1D module; the model's linear module names end in: "
            f"{', '.join(leaf_names[:20]) or '(none)'}"
        )
    return matched


def _warn_tied_targets(root: nn.Module, new_layers) -> None:
    """A UserWarning (at inject_cflora's caller) per target whose weight is shared with another module."""
    param_names = _parameter_names(root)
    for name, layer in new_layers:
        tied = _tied_with(param_names, name, layer.weight)
        if tied:
            warnings.warn(
                f"inject_cflora: the weight of target module {name} is tied to {', '.join(tied)} (one shared "
                "Parameter). Training the adapter is fine, but merging it would change those modules too, so "
                "merge_cflora / merge_and_unload refuse unless called with untie=True (which gives the merged "
                "module its own copy of the weight).",
                UserWarning,
                stacklevel=3,
            )


def _install(root: nn.Module, config: CFLoRAConfig, new_layers, to_save, adapter_name: str) -> None:
    """Freeze the base, put the new layers and the trainable copies of the modules to save in place, and bind
    the adapter bookkeeping (HF adapter methods, the adapter registry, the instance patches)."""
    for p in root.parameters():
        p.requires_grad_(False)
    for name, layer in new_layers:
        _replace_module(root, name, layer)
        _set_trainable(layer, config)
    if to_save:
        registry = {}
        for name, original in to_save:
            trained = copy.deepcopy(original)
            for p in trained.parameters():
                p.requires_grad_(True)
            _replace_module(root, name, trained)
            registry[name] = {"original": original, "trained": trained}
        root.__dict__[_MODULES_TO_SAVE] = registry
    _bind_hf_adapter_methods(root)
    root.__dict__.setdefault(_ADAPTERS, {"active": adapter_name, "stored": {}})
    for install, _ in INSTANCE_PATCHES:
        install(root)


def _rank_alpha(config: CFLoRAConfig, name: str) -> Dict[str, object]:
    r, alpha = config.rank_and_alpha(name)
    return {"r": r, "alpha": alpha}


def _replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def set_cflora_backend(model: nn.Module, backend: Optional[str]) -> nn.Module:
    """Route every CFLoRA layer's ``ops.cflora_linear`` call to ``backend`` (None/"auto": automatic)."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(
            f"set_cflora_backend: backend must be None or one of "
            f"{', '.join(BACKEND_CHOICES[1:])}; got {backend!r}"
        )
    for _, layer in _require_layers(model, "set_cflora_backend"):
        layer.backend = backend
    return model


# ------------------------------------------------------------------------------------------ disable
def _modules_to_save_registry(root: nn.Module) -> Dict[str, Dict[str, nn.Module]]:
    return root.__dict__.get(_MODULES_TO_SAVE, {})


def _use_original_modules(root: nn.Module, original: bool) -> None:
    """Put each module to save's original (True) or trained copy (False) in place."""
    for name, pair in _modules_to_save_registry(root).items():
        module = pair["original" if original else "trained"]
        if original:
            # follow .to() / .half() applied to the model since injection (the original is unregistered)
            ref = next((p for p in pair["trained"].parameters() if p.is_floating_point()), None)
            if ref is not None:
                module.to(device=ref.device, dtype=ref.dtype)
        _replace_module(root, name, module)


def cflora_enabled(model: nn.Module) -> bool:
    """False while the adapter is disabled (:func:`disable_adapter`, ``model.disable_adapters()``)."""
    return not any(layer.disabled for _, layer in _require_layers(model, "cflora_enabled"))


def set_cflora_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn every CFLoRA layer and module to save on (the adapted model) or off (the base model, exactly).

    Raises RuntimeError when disabling a merged adapter (its ΔW is inside W; unmerge first).
    """
    root = unwrap_model(model)
    layers = _require_layers(root, "set_cflora_enabled")
    if not enabled:
        merged = [name for name, layer in layers if layer.merged]
        if merged:
            raise RuntimeError(
                f"disable_adapter: CFLoRA layers {merged[:3]} are merged into W, so the base outputs are gone; "
                "call unmerge_cflora(model) first"
            )
    for _, layer in layers:
        layer.disabled = not enabled
    _use_original_modules(root, original=not enabled)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block: every CFLoRA layer calls the wrapped module's own forward and each
    module to save is its original, so the outputs are exactly the base model's (PEFT's ``disable_adapter``).
    No cond is needed inside. Raises RuntimeError on a merged adapter."""
    was_enabled = cflora_enabled(model)
    set_cflora_enabled(model, False)
    try:
        yield model
    finally:
        set_cflora_enabled(model, was_enabled)


def _hf_disable_adapters(root: nn.Module) -> None:
    set_cflora_enabled(root, False)
    if getattr(root, "_hf_peft_config_loaded", False):  # PEFT adapters loaded through transformers as well
        type(root).disable_adapters(root)


def _hf_enable_adapters(root: nn.Module) -> None:
    set_cflora_enabled(root, True)
    if getattr(root, "_hf_peft_config_loaded", False):
        type(root).enable_adapters(root)


def _bind_hf_adapter_methods(root: nn.Module) -> None:
    """Make transformers' ``model.disable_adapters()`` / ``enable_adapters()`` act on the CFLoRA adapter.

    transformers' own methods only know PEFT layers (and, with an older peft, stop at a version check), so
    the injected instance gets its own: ``functools.partial`` of module-level functions, which
    ``copy.deepcopy`` and pickle carry over to the copy. :func:`unload` removes them.
    """
    for method, func in zip(_HF_ADAPTER_METHODS, (_hf_disable_adapters, _hf_enable_adapters)):
        if callable(getattr(type(root), method, None)):
            root.__dict__[method] = functools.partial(func, root)


def _unbind_hf_adapter_methods(root: nn.Module) -> None:
    for method in _HF_ADAPTER_METHODS:
        root.__dict__.pop(method, None)


# ------------------------------------------------------------------------------------------ merge / unload
def _untie(root: nn.Module, layer_name: str, layer: CFLoRALinear, tied: List[str]) -> None:
    """Give ``layer`` its own copy of its weight; keep transformers from tying it again."""
    layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
    names = {f"{layer_name}.weight", *tied}
    mapping = getattr(root, "all_tied_weights_keys", None)
    hf_tied = False
    if isinstance(mapping, dict):
        for key, value in list(mapping.items()):
            if key in names or value in names:
                mapping.pop(key)
                hf_tied = True
    config = getattr(root, "config", None)
    if hf_tied and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # so save_pretrained / from_pretrained keep the two apart
    logger.warning(
        "merge_cflora: untied %s from %s (it now has its own weight)%s",
        layer_name,
        ", ".join(tied),
        "; set config.tie_word_embeddings=False" if hf_tied else "",
    )


def merge_cflora(model: nn.Module, *, untie: bool = False) -> nn.Module:
    """Fold ΔW = s·B C A into W for every layer (identity or static interaction only).

    A layer whose weight is tied to another module (``lm_head`` and the input embeddings) is refused: the
    merge would change the other module too. ``untie=True`` first gives such a layer its own copy of the
    weight (and sets ``config.tie_word_embeddings=False`` on a transformers model so a save / reload keeps
    them apart).
    """
    root = unwrap_model(model)
    layers = _require_layers(root, "merge_cflora")
    for name, layer in layers:
        if layer.interaction is not None and not layer.interaction.mergeable:
            raise RuntimeError(
                f"merge_cflora: layer {name} has interaction {layer.interaction.kind!r}, whose C is generated "
                "per sample, so ΔW differs per sample and cannot be folded into W; only 'identity' and "
                "'static' adapters merge"
            )
        if layer.merged:
            raise RuntimeError(f"merge_cflora: layer {name} is already merged")
    param_names = _parameter_names(root)
    tied = {name: t for name, layer in layers if (t := _tied_with(param_names, name, layer.weight))}
    if tied and not untie:
        detail = "; ".join(f"{name} is tied to {', '.join(t)}" for name, t in tied.items())
        raise RuntimeError(
            f"merge_cflora: {detail} (one shared Parameter), so merging ΔW would change those modules too. "
            "Pass untie=True to give the merged module its own copy of the weight first, or keep the adapter "
            "unmerged"
        )
    for name, layer in layers:
        if name in tied:
            _untie(root, name, layer, tied[name])
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


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapter without merging: every CFLoRA layer becomes the ``nn.Linear`` / ``Conv1D`` it wrapped
    (the same module object and Parameters), each module to save keeps its trained copy (as PEFT), and
    ``state_dict()`` has the base model's keys only. The base Parameters stay frozen. Adapters kept aside
    (:func:`rellax_fast.cflora.add_cflora_adapter`) are dropped too. Returns the model.

    Raises RuntimeError when layers are merged (use :func:`merge_and_unload`, or unmerge first).
    """
    root = unwrap_model(model)
    layers = _require_layers(root, "unload")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(
            f"unload: CFLoRA layers {merged[:3]} are merged into W; unload would keep ΔW inside W without saying so. "
            "Use merge_and_unload(model) for the merged model, or unmerge_cflora(model) first"
        )
    _unload(root, layers)
    return model


def merge_and_unload(model: nn.Module, *, untie: bool = False) -> nn.Module:
    """Merge ΔW into W (:func:`merge_cflora`; identity / static only; ``untie`` as there) and return the model
    with plain ``nn.Linear`` / ``Conv1D`` modules and a base ``state_dict``: ``save_pretrained`` /
    ``from_pretrained`` then round-trip it as an ordinary transformers model."""
    root = unwrap_model(model)
    layers = _require_layers(root, "merge_and_unload")
    if any(layer.merged for _, layer in layers):
        if not all(layer.merged for _, layer in layers):
            raise RuntimeError(
                "merge_and_unload: only some CFLoRA layers are merged; unmerge_cflora(model) first"
            )
    else:
        merge_cflora(root, untie=untie)
    _unload(root, layers)
    return model


def _unload(root: nn.Module, layers: List[Tuple[str, CFLoRALinear]]) -> None:
    _use_original_modules(root, original=False)
    root.__dict__.pop(_MODULES_TO_SAVE, None)
    for name, layer in layers:
        base = layer.base_module()
        layer.disabled = False
        layer._cflora_slot = None
        _replace_module(root, name, base)
    _unbind_hf_adapter_methods(root)
    root.__dict__.pop(_ADAPTERS, None)  # the adapters kept aside go with the adapter in place
    for _, remove in INSTANCE_PATCHES:
        remove(root)
    _remove_checkpoint_replay(root)
    disable_cflora_cond_kwarg(root)
