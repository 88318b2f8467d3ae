"""Saving, loading and PEFT interop of CFLoRA adapters.

- :func:`save_cflora` / :func:`load_cflora`: a directory with ``cflora_config.json`` and
  ``cflora_adapter.safetensors`` (only the adapter tensors: ``<layer>.lora_A``, ``<layer>.lora_B``,
  ``<layer>.interaction.*``), both written atomically (temp file in the same directory + os.replace).
- :func:`load_peft_lora`: read a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
  keys ``base_model.model.<module>.lora_{A,B}.weight``) into A and B - the two-stage recipe.
- :func:`export_peft_lora`: write an identity/static adapter in PEFT's format (static C folded into B:
  ΔW = s·B C A = s·(B C) A), loadable by ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Union

import torch
from torch import nn

from .._io import atomic_write_bytes
from .config import CFLoRAConfig
from .model import _require_layers, cflora_layers, get_cflora_config, inject_cflora, unwrap_model

CONFIG_NAME = "cflora_config.json"
WEIGHTS_NAME = "cflora_adapter.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# config fields that change the layers' shapes or outputs: a saved adapter must agree on them
_STRUCTURAL = ("r", "alpha", "interaction", "cond_dim", "n_experts", "hidden")

PathLike = Union[str, "os.PathLike[str]"]


def _refuse_merged(model: nn.Module, what: str) -> None:
    merged = [name for name, layer in cflora_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(
            f"{what}: CFLoRA layers {merged[:3]} are merged into W; loading new adapter weights would leave "
            "the old ΔW inside W - call unmerge_cflora(model) first"
        )


def cflora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter tensors of every CFLoRA layer, keyed ``<layer name>.<param>`` (no base weights)."""
    state = {}
    for name, layer in _require_layers(model, "cflora_state_dict"):
        state[f"{name}.lora_A"] = layer.lora_A
        state[f"{name}.lora_B"] = layer.lora_B
        if layer.interaction is not None:
            for key, t in layer.interaction.state_dict(keep_vars=True).items():
                state[f"{name}.interaction.{key}"] = t
    return state


def save_cflora(model: nn.Module, path: PathLike) -> None:
    """Write the adapter (config JSON + safetensors) into directory ``path``, atomically per file."""
    from safetensors.torch import save

    config = get_cflora_config(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in cflora_state_dict(model).items()}
    os.makedirs(path, exist_ok=True)
    atomic_write_bytes(os.path.join(path, WEIGHTS_NAME), save(tensors, metadata={"format": "pt"}))
    # the target list is stored as the exact layer names, so a reload wraps the same modules
    saved = CFLoRAConfig.from_dict({**config.to_dict(), "target_modules": [n for n, _ in cflora_layers(model)]})
    saved.save(os.path.join(path, CONFIG_NAME))


def _structure(config: CFLoRAConfig) -> Dict[str, object]:
    return {k: getattr(config, k) for k in _STRUCTURAL}


def load_cflora(model: nn.Module, path: PathLike) -> nn.Module:
    """Load an adapter saved by :func:`save_cflora` into ``model`` (injecting it first if needed).

    Raises ValueError naming the difference when the model's CFLoRA layers, their config or a tensor's
    shape do not match the saved adapter.
    """
    from safetensors.torch import load_file

    cfg_path, w_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"load_cflora: {p} not found (expected a directory written by save_cflora)")
    saved_config = CFLoRAConfig.load(cfg_path)
    _refuse_merged(model, "load_cflora")
    if not cflora_layers(model):
        inject_cflora(model, saved_config)
    else:
        have = _structure(get_cflora_config(model))
        want = _structure(saved_config)
        diff = {k: (want[k], have[k]) for k in _STRUCTURAL if want[k] != have[k]}
        if diff:
            detail = ", ".join(f"{k}: saved {s!r} vs model {m!r}" for k, (s, m) in diff.items())
            raise ValueError(f"load_cflora: the adapter in {path} does not fit the model's CFLoRA layers ({detail})")
    tensors = load_file(w_path)
    target = cflora_state_dict(model)
    missing = sorted(set(target) - set(tensors))
    unexpected = sorted(set(tensors) - set(target))
    if missing or unexpected:
        raise ValueError(
            f"load_cflora: the adapter in {path} does not fit the model: missing in the file "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, not in the model "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, dest in target.items():
        if tuple(tensors[key].shape) != tuple(dest.shape):
            raise ValueError(
                f"load_cflora: {key} has shape {tuple(tensors[key].shape)} in {path}, but the model expects "
                f"{tuple(dest.shape)} (a model of a different size?)"
            )
    with torch.no_grad():
        for key, dest in target.items():
            dest.copy_(tensors[key])
    return model


# ---------------------------------------------------------------------------------------------- PEFT
def load_peft_lora(model: nn.Module, peft_dir: PathLike, strict: bool = True) -> nn.Module:
    """Initialise every CFLoRA layer's A and B from a PEFT LoRA adapter directory.

    The adapter's rank and scale (lora_alpha / r, or / sqrt(r) with rsLoRA) must equal the model's, and
    every adapter module must be a CFLoRA layer; with ``strict`` every CFLoRA layer must also be in the
    adapter. The interaction is left as is (a fresh one is C = I, so an "identity" model then gives
    PEFT's outputs exactly and a conditioned one starts from them).
    """
    from safetensors.torch import load_file

    cfg_path, w_path = os.path.join(peft_dir, PEFT_CONFIG_NAME), os.path.join(peft_dir, PEFT_WEIGHTS_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"load_peft_lora: {cfg_path} not found (not a PEFT adapter directory)")
    if not os.path.isfile(w_path):
        raise FileNotFoundError(
            f"load_peft_lora: {w_path} not found (only safetensors adapters are read; save the PEFT model "
            "with safe_serialization=True)"
        )
    with open(cfg_path, encoding="utf-8") as fh:
        pcfg = json.load(fh)
    if str(pcfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"load_peft_lora: {cfg_path} is a {pcfg.get('peft_type')} adapter, not LORA")
    for flag in ("use_dora",):
        if pcfg.get(flag):
            raise ValueError(f"load_peft_lora: the adapter uses {flag}=True, which CFLoRA does not represent")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if pcfg.get(pattern):
            raise ValueError(f"load_peft_lora: per-module {pattern} is not supported (got {pcfg[pattern]!r})")
    r = int(pcfg["r"])
    alpha = float(pcfg["lora_alpha"])
    peft_scale = alpha / (r ** 0.5) if pcfg.get("use_rslora") else alpha / r

    layers = dict(_require_layers(model, "load_peft_lora"))
    _refuse_merged(model, "load_peft_lora")
    config = next(iter(layers.values())).cflora_config
    if r != config.r:
        raise ValueError(f"load_peft_lora: the adapter has r={r}, the model's CFLoRA layers r={config.r}")
    if abs(peft_scale - config.scale) > 1e-12 * max(1.0, abs(config.scale)):
        raise ValueError(
            f"load_peft_lora: the adapter's scale is {peft_scale:g} (lora_alpha={alpha:g}, r={r}"
            f"{', rsLoRA' if pcfg.get('use_rslora') else ''}) but the model's is {config.scale:g} "
            f"(alpha={config.alpha:g}); inject with alpha={peft_scale * config.r:g}"
        )

    tensors = load_file(w_path)
    per_module: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                per_module.setdefault(name[: -len(suffix)], {})[part] = value
                break
        else:
            raise ValueError(f"load_peft_lora: unsupported tensor {key!r} in {w_path} (only lora_A/lora_B weights)")
    not_in_model = sorted(set(per_module) - set(layers))
    if not_in_model:
        raise ValueError(
            f"load_peft_lora: the adapter has LoRA weights for {not_in_model[:5]}, which are not CFLoRA layers "
            f"of the model (its CFLoRA layers: {sorted(layers)[:5]} ...)"
        )
    not_in_adapter = sorted(set(layers) - set(per_module))
    if strict and not_in_adapter:
        raise ValueError(
            f"load_peft_lora: CFLoRA layers {not_in_adapter[:5]} have no weights in the adapter; "
            "pass strict=False to keep their fresh initialisation"
        )
    for name, parts in per_module.items():
        layer = layers[name]
        for part in ("lora_A", "lora_B"):
            if part not in parts:
                raise ValueError(f"load_peft_lora: the adapter has no {part} for {name}")
            dest = getattr(layer, part)
            if tuple(parts[part].shape) != tuple(dest.shape):
                raise ValueError(
                    f"load_peft_lora: {name}.{part} has shape {tuple(parts[part].shape)} in the adapter, but "
                    f"the model expects {tuple(dest.shape)}"
                )
    with torch.no_grad():
        for name, parts in per_module.items():
            layers[name].lora_A.copy_(parts["lora_A"])
            layers[name].lora_B.copy_(parts["lora_B"])
    return model


def export_peft_lora(model: nn.Module, out_dir: PathLike) -> None:
    """Write an identity/static CFLoRA adapter as a PEFT LoRA adapter directory (static C folded into B)."""
    from peft import LoraConfig
    from safetensors.torch import save

    layers = _require_layers(model, "export_peft_lora")
    config = layers[0][1].cflora_config
    tensors = {}
    for name, layer in layers:
        gen = layer.interaction
        if gen is not None and not gen.mergeable:
            raise RuntimeError(
                f"export_peft_lora: layer {name} has interaction {gen.kind!r} (C per sample), which plain "
                "LoRA cannot represent; only 'identity' and 'static' adapters export"
            )
        b = layer.lora_B.detach()
        if gen is not None:
            b = (b.float() @ gen().detach().float()).to(b.dtype)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.cpu().contiguous()
    base_config = getattr(unwrap_model(model), "config", None)
    peft_config = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=[name for name, _ in layers],
        fan_in_fan_out=any(layer.fan_in_fan_out for _, layer in layers),
        bias="none",
        base_model_name_or_path=getattr(base_config, "_name_or_path", None) or None,
        inference_mode=True,
    )
    data = peft_config.to_dict()
    data = {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(out_dir, PEFT_WEIGHTS_NAME), save(tensors, metadata={"format": "pt"}))
    atomic_write_bytes(os.path.join(out_dir, PEFT_CONFIG_NAME),
                       json.dumps(data, indent=2, sort_keys=True, default=str).encode("utf-8"))
