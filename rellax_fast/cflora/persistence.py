"""Saving, loading and PEFT interop of CFLoRA adapters.

- :func:`save_cflora` / :func:`load_cflora`: a directory with ``cflora_config.json`` and
  ``cflora_adapter.safetensors`` (only the adapter tensors: ``<layer>.lora_A``, ``<layer>.lora_B``,
  ``<layer>.interaction.*``, plus every tensor of the ``modules_to_save``), both written atomically (temp
  file in the same directory + os.replace). The config carries its format version and a sha256 of the
  config and the tensors; :func:`load_cflora` checks the version, the hash, finiteness and shapes before it
  touches the model, and names the file in an :class:`AdapterFileError` when one is truncated or corrupted.
  Format rule (``config.FORMAT_VERSION``): format 2 must carry its hash; format 1 (older files, no hash) is
  unverifiable and loads only with ``allow_unverified=True``.
- ``model.save_pretrained(dir)`` on an injected Hugging Face model writes the base model (its ``model.safetensors``
  holds no adapter tensors, and each module to save's original) and, beside it, the adapter files of
  :func:`save_cflora`; ``load_cflora(AutoModel...from_pretrained(dir), dir)`` restores the adapted model
  (see :func:`_save_pretrained_with_adapter`).
- :func:`load_peft_lora`: read a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
  keys ``base_model.model.<module>.lora_{A,B}.weight``) into A and B - the two-stage recipe.
- :func:`export_peft_lora`: write an identity/static adapter in PEFT's format (static C folded into B:
  ΔW = s·B C A = s·(B C) A), loadable by ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import warnings
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .._io import atomic_write_bytes
from .adapters import (
    active_cflora_adapter,
    add_cflora_adapter,
    cflora_adapter_names,
    delete_cflora_adapter,
    set_cflora_adapter,
)
from .conditioning import _require_layers, cflora_layers, unwrap_model
from .config import (
    FORMAT_2_FIELDS,
    FORMAT_PREFIX,
    FORMAT_VERSION,
    AdapterFileError,
    CFLoRAConfig,
    format_version,
    pattern_key,
    read_json,
)
from .model import (
    DEFAULT_ADAPTER,
    INSTANCE_PATCHES,
    _modules_to_save_registry,
    get_cflora_config,
    inject_cflora,
)

CONFIG_NAME = "cflora_config.json"
WEIGHTS_NAME = "cflora_adapter.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# config fields that change the layers' shapes or outputs: a saved adapter must agree on them
_STRUCTURAL = (
    "r",
    "alpha",
    "interaction",
    "cond_dim",
    "n_experts",
    "hidden",
    "rank_pattern",
    "alpha_pattern",
)

PathLike = Union[str, "os.PathLike[str]"]


def _folder(path: PathLike, what: str, *, for_writing: bool = False) -> str:
    """``path`` as a str, checked: a str or os.PathLike naming a folder (one that may not exist yet when writing)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"{what}: path must be a str or os.PathLike naming a folder; got {type(path).__name__}"
        )
    path = os.fspath(path)
    if for_writing and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what}: path {path!r} is a file; an adapter is saved into a folder")
    return path


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
    for name, pair in _modules_to_save_registry(unwrap_model(model)).items():
        for key, t in pair["trained"].state_dict(keep_vars=True).items():
            state[f"{name}.{key}"] = t
    return state


def adapter_sha256(config: CFLoRAConfig, tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the config (canonical JSON) and of every tensor's name, dtype, shape and bytes, by name.

    Stored in the saved config and checked on load: flipped bytes, tensors swapped between layers or an
    edited config all change it. (Hand-written: safetensors itself keeps no checksum.)
    """
    # Not _io.json_sha256: no default=str here (a non-JSON config value must fail, not hash as its str), and
    # the digest goes on over the tensors; the value is stored in saved adapters, so its arguments stay.
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode("utf-8"))
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_safetensors(path: str, what: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise AdapterFileError(
            f"{what}: {path} cannot be read as safetensors (truncated or corrupted?): {exc}"
        ) from exc


def _check_finite(tensors: Mapping[str, torch.Tensor], path: str, what: str) -> None:
    bad = []
    for key in sorted(tensors):
        t = tensors[key]
        if t.is_floating_point() or t.is_complex():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append(f"{key} ({n} of {t.numel()})")
    if bad:
        raise AdapterFileError(
            f"{what}: {path} holds non-finite values (NaN/Inf) in {len(bad)} tensor(s): {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}; the adapter is corrupted or came from a diverged run"
        )


def save_cflora(model: nn.Module, path: PathLike) -> None:
    """Write the adapter (config JSON + safetensors) into directory ``path``, atomically per file.

    The weights are written first and the config (which holds their hash) last, so an interrupted save never
    leaves a pair that loads.
    """
    from safetensors.torch import save

    path = _folder(path, "save_cflora", for_writing=True)
    config = get_cflora_config(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in cflora_state_dict(model).items()}
    # the target list (and the modules to save) are stored as exact names, so a reload wraps the same modules
    to_save = sorted(_modules_to_save_registry(unwrap_model(model)))
    saved = CFLoRAConfig.from_dict(
        {
            **config.to_dict(),
            "target_modules": [n for n, _ in cflora_layers(model)],
            "modules_to_save": to_save or None,
            "layers_to_transform": None,  # the exact names already say which layers
            "layers_pattern": None,
        }
    )
    os.makedirs(path, exist_ok=True)
    atomic_write_bytes(os.path.join(path, WEIGHTS_NAME), save(tensors, metadata={"format": "pt"}))
    document = {
        "format": f"{FORMAT_PREFIX}{FORMAT_VERSION}",
        "content_sha256": adapter_sha256(saved, tensors),
        **saved.to_dict(),
    }
    atomic_write_bytes(
        os.path.join(path, CONFIG_NAME), json.dumps(document, indent=2, sort_keys=True).encode("utf-8")
    )


def _structure(config: CFLoRAConfig) -> Dict[str, object]:
    return {k: getattr(config, k) for k in _STRUCTURAL}


def read_cflora(
    path: PathLike, *, allow_unverified: bool = False
) -> Tuple[CFLoRAConfig, Dict[str, torch.Tensor]]:
    """The config and tensors of the adapter directory ``path``, verified; AdapterFileError naming the file
    otherwise.

    The format rule: a format-2 config must carry ``content_sha256`` and the files must match it. A format-1
    config (written before adapters had a hash) cannot be verified, so it is refused unless
    ``allow_unverified=True`` (then it loads with a warning; save it again to get a verified format-2 file);
    a format-1 config that holds a hash or a field format 2 added is refused in any case (a format-2 file
    relabelled to skip its check). Values must be finite.
    """
    path = _folder(path, "read_cflora")
    cfg_path, w_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"load_cflora: {p} not found (expected a directory written by save_cflora)"
            )
    data = read_json(cfg_path)
    if "format" not in data:
        raise AdapterFileError(f"load_cflora: {cfg_path} has no 'format' tag (not written by save_cflora?)")
    version = format_version(data["format"], source=f"load_cflora: {cfg_path}")
    if version == 1:
        _check_format_1(data, cfg_path, allow_unverified)
    try:
        config = CFLoRAConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(f"load_cflora: {cfg_path} holds an invalid config: {exc}") from exc
    tensors = _read_safetensors(w_path, "load_cflora")
    expected = data.get("content_sha256")
    if version >= 2 and not isinstance(expected, str):
        raise AdapterFileError(
            f"load_cflora: {cfg_path} (format {data['format']}) has no content_sha256; format 2 "
            "always carries it, so the file was edited"
        )
    if expected is not None:
        actual = adapter_sha256(config, tensors)
        if actual != expected:
            raise AdapterFileError(
                f"load_cflora: the adapter in {os.fspath(path)} fails its content check: the sha256 of "
                f"{WEIGHTS_NAME} and {CONFIG_NAME} is {actual[:16]}..., the saved one {str(expected)[:16]}... "
                "(corrupted or edited files, swapped tensors, or weights from another save)"
            )
    _check_finite(tensors, w_path, "load_cflora")
    return config, tensors


def _check_format_1(data: Mapping[str, object], cfg_path: str, allow_unverified: bool) -> None:
    relabelled = [key for key in ("content_sha256", *FORMAT_2_FIELDS) if key in data]
    if relabelled:
        raise AdapterFileError(
            f"load_cflora: {cfg_path} says format {FORMAT_PREFIX}1 but holds {', '.join(relabelled)}, which no "
            "format-1 file has (a format-2 adapter relabelled to skip its content check?)"
        )
    if not allow_unverified:
        raise AdapterFileError(
            f"load_cflora: {cfg_path} has format {FORMAT_PREFIX}1, which carries no content hash, so corrupted or "
            "edited files would load unnoticed. If you trust these files, load them with "
            f"load_cflora(model, path, allow_unverified=True) and save_cflora them again ({FORMAT_PREFIX}"
            f"{FORMAT_VERSION}, verified)"
        )
    warnings.warn(
        f"load_cflora: {cfg_path} has format {FORMAT_PREFIX}1 (no content hash): loaded unverified; "
        "save_cflora it again to get a verified file",
        UserWarning,
        stacklevel=4,
    )


def load_cflora(
    model: nn.Module, path: PathLike, *, adapter_name: Optional[str] = None, allow_unverified: bool = False
) -> nn.Module:
    """Load an adapter saved by :func:`save_cflora` into ``model`` (injecting it first if needed).

    The files are verified first (:func:`read_cflora`: format version, content hash, a valid config, finite
    values; AdapterFileError naming the file), so a bad adapter never reaches the model. Format 2 must carry
    its content hash; format 1 (no hash) loads only with ``allow_unverified=True``. Raises ValueError naming
    the difference when the model's CFLoRA layers, their config or a tensor's shape do not match it.

    ``adapter_name``: a model without CFLoRA layers is injected with the adapter under that name ("default"
    when None). On a model with adapters, None loads into the active one; a name loads into that adapter -
    added from the saved config when the model has none of that name (PEFT's ``load_adapter``) - and leaves
    the active adapter active (:func:`rellax_fast.cflora.set_cflora_adapter` switches).
    """
    path = _folder(path, "load_cflora")
    saved_config, tensors = read_cflora(path, allow_unverified=allow_unverified)
    _refuse_merged(model, "load_cflora")
    if not cflora_layers(model):
        try:
            inject_cflora(model, saved_config, adapter_name=adapter_name or DEFAULT_ADAPTER)
        except ValueError as exc:  # say which call and which adapter, not only the injection's reason
            raise ValueError(f"load_cflora: the adapter in {path} does not fit this model: {exc}") from exc
        _load_into_active(model, path, saved_config, tensors)
        return model
    previous = active_cflora_adapter(model)
    if adapter_name is None or adapter_name == previous:
        _load_into_active(model, path, saved_config, tensors)
        return model
    added = adapter_name not in cflora_adapter_names(model)
    if added:
        add_cflora_adapter(model, adapter_name, saved_config)
    set_cflora_adapter(model, adapter_name)
    try:
        _load_into_active(model, path, saved_config, tensors)
    except BaseException:
        set_cflora_adapter(model, previous)
        if added:
            delete_cflora_adapter(model, adapter_name)  # nothing half-loaded stays behind
        raise
    set_cflora_adapter(model, previous)
    return model


def _load_into_active(
    model: nn.Module, path: PathLike, saved_config: CFLoRAConfig, tensors: Mapping[str, torch.Tensor]
) -> None:
    have = _structure(get_cflora_config(model))
    want = _structure(saved_config)
    diff = {k: (want[k], have[k]) for k in _STRUCTURAL if want[k] != have[k]}
    if diff:
        detail = ", ".join(f"{k}: saved {s!r} vs model {m!r}" for k, (s, m) in diff.items())
        raise ValueError(
            f"load_cflora: the adapter in {path} does not fit the model's CFLoRA layers ({detail})"
        )
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


# ------------------------------------------------------------------------------------ save_pretrained
def base_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The base model's ``state_dict`` while the adapter is injected: no adapter tensors, and each module to save
    as its original (the keys and values an un-injected model has; merged layers are refused by the caller)."""
    root = unwrap_model(model)
    state = root.state_dict()
    for name, layer in cflora_layers(root):
        for key in layer.state_dict():
            if key not in ("weight", "bias"):
                del state[f"{name}.{key}"]
    for name, pair in _modules_to_save_registry(root).items():
        for key, t in pair["original"].state_dict().items():
            state[f"{name}.{key}"] = t
    return state


def _save_pretrained_with_adapter(root: nn.Module, original, save_directory, *args, **kwargs):
    """``model.save_pretrained`` of an injected model (installed by :func:`inject_cflora`, removed by ``unload``).

    It writes the adapter with :func:`save_cflora` into ``save_directory`` (first, so ``push_to_hub`` uploads it
    too) and then the model through transformers' own ``save_pretrained`` with the base ``state_dict``
    (:func:`base_state_dict`), so ``from_pretrained(save_directory)`` loads the base model with no unexpected
    keys and ``load_cflora(model, save_directory)`` puts the adapter back: the same outputs. A merged adapter is
    refused (its ΔW is inside W): ``merge_and_unload`` first saves the merged model, ``unmerge_cflora`` the pair.
    An explicit ``state_dict`` argument is passed through as given. Nothing is written when
    ``is_main_process`` is False.
    """
    merged = [name for name, layer in cflora_layers(root) if layer.merged]
    if merged:
        raise RuntimeError(
            f"save_pretrained: CFLoRA layers {merged[:3]} are merged into W, so the base weights are gone. Call "
            "merge_and_unload(model) to save the merged model as a plain one, or unmerge_cflora(model) to save "
            "the base model with the adapter files beside it"
        )
    if kwargs.get("is_main_process", args[0] if args else True):
        save_cflora(root, save_directory)
    if "state_dict" not in kwargs and len(args) < 2:
        kwargs["state_dict"] = base_state_dict(root)
    return original(save_directory, *args, **kwargs)


def _install_save_pretrained(root: nn.Module) -> None:
    # a partial of a module-level function (no closure): deepcopy / pickle carry it over bound to the copy
    current = root.__dict__.get("save_pretrained")
    if isinstance(current, functools.partial) and current.func is _save_pretrained_with_adapter:
        return  # already installed (add_cflora_adapter injects again)
    if callable(getattr(root, "save_pretrained", None)):
        root.__dict__["save_pretrained"] = functools.partial(
            _save_pretrained_with_adapter, root, root.save_pretrained
        )


def _remove_save_pretrained(root: nn.Module) -> None:
    wrapper = root.__dict__.get("save_pretrained")
    if not (isinstance(wrapper, functools.partial) and wrapper.func is _save_pretrained_with_adapter):
        return
    del root.__dict__["save_pretrained"]
    inner = wrapper.args[1]
    if getattr(inner, "__func__", None) is not getattr(type(root), "save_pretrained", None):
        root.__dict__["save_pretrained"] = inner  # an instance-level save_pretrained someone installed before


INSTANCE_PATCHES.append((_install_save_pretrained, _remove_save_pretrained))


# ---------------------------------------------------------------------------------------------- PEFT
def _read_peft_adapter(peft_dir: PathLike):
    """(PEFT config dict, {module: {"lora_A": t, "lora_B": t}}, module -> (r, lora_alpha, scale)) of a PEFT LoRA
    adapter directory, checked (LORA, no DoRA, safetensors, finite, only lora_A / lora_B weights)."""
    cfg_path, w_path = os.path.join(peft_dir, PEFT_CONFIG_NAME), os.path.join(peft_dir, PEFT_WEIGHTS_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"load_peft_lora: {cfg_path} not found (not a PEFT adapter directory)")
    if not os.path.isfile(w_path):
        raise FileNotFoundError(
            f"load_peft_lora: {w_path} not found (only safetensors adapters are read; save the PEFT model "
            "with safe_serialization=True)"
        )
    pcfg = read_json(cfg_path)
    if str(pcfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"load_peft_lora: {cfg_path} is a {pcfg.get('peft_type')} adapter, not LORA")
    for flag in ("use_dora",):
        if pcfg.get(flag):
            raise ValueError(f"load_peft_lora: the adapter uses {flag}=True, which CFLoRA does not represent")
    r_default, alpha_default = int(pcfg["r"]), float(pcfg["lora_alpha"])
    rank_pattern, alpha_pattern = pcfg.get("rank_pattern") or {}, pcfg.get("alpha_pattern") or {}

    def peft_rank_scale(module: str) -> Tuple[int, float, float]:
        # PEFT's own per-module resolution (peft.utils.other.get_pattern_key)
        r_key, a_key = pattern_key(rank_pattern, module), pattern_key(alpha_pattern, module)
        r = int(rank_pattern[r_key]) if r_key is not None else r_default
        alpha = float(alpha_pattern[a_key]) if a_key is not None else alpha_default
        return r, alpha, alpha / (r**0.5) if pcfg.get("use_rslora") else alpha / r

    tensors = _read_safetensors(w_path, "load_peft_lora")
    _check_finite(tensors, w_path, "load_peft_lora")
    per_module: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                per_module.setdefault(name[: -len(suffix)], {})[part] = value
                break
        else:
            raise ValueError(
                f"load_peft_lora: unsupported tensor {key!r} in {w_path} (only lora_A/lora_B weights)"
            )
    return pcfg, per_module, peft_rank_scale


def _config_from_peft(pcfg: Mapping[str, object], modules, peft_rank_scale) -> CFLoRAConfig:
    """An "identity" CFLoRAConfig that wraps exactly the adapter's modules with PEFT's rank and scale for each
    (rsLoRA's alpha/√r becomes alpha·√r/r; a module off the defaults gets an exact-name pattern)."""
    names = sorted(modules)
    r = int(pcfg["r"])
    alpha = float(pcfg["lora_alpha"]) * (r**0.5 if pcfg.get("use_rslora") else 1.0)
    rank_pattern, alpha_pattern = {}, {}
    for name in names:
        layer_r, _, scale = peft_rank_scale(name)
        if layer_r != r:
            rank_pattern[re.escape(name)] = layer_r
        if scale * layer_r != alpha:
            alpha_pattern[re.escape(name)] = scale * layer_r
    return CFLoRAConfig(
        r=r,
        alpha=alpha,
        dropout=float(pcfg.get("lora_dropout") or 0.0),
        target_modules=names,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )


def load_peft_lora(model: nn.Module, peft_dir: PathLike, strict: bool = True) -> nn.Module:
    """Initialise every CFLoRA layer's A and B from a PEFT LoRA adapter directory.

    A model without CFLoRA layers is injected first (as :func:`load_cflora` does): an "identity" adapter on
    exactly the adapter's modules, with PEFT's rank, scale and dropout for each, so the model then gives PEFT's
    outputs. To start a conditioned adapter from a PEFT LoRA (the two-stage recipe), call :func:`inject_cflora`
    with its config first. On an injected model, each module's rank and scale (lora_alpha / r, or / sqrt(r)
    with rsLoRA; PEFT's rank_pattern / alpha_pattern resolved as PEFT does) must equal the CFLoRA layer's, and
    every adapter module must be a CFLoRA layer; with ``strict`` every CFLoRA layer must also be in the
    adapter. The interaction is left as is (a fresh one is C = I, so an "identity" model then gives
    PEFT's outputs exactly and a conditioned one starts from them).
    """
    pcfg, per_module, peft_rank_scale = _read_peft_adapter(peft_dir)
    _refuse_merged(model, "load_peft_lora")
    if not cflora_layers(model):
        inject_cflora(model, _config_from_peft(pcfg, per_module, peft_rank_scale))
    layers = dict(_require_layers(model, "load_peft_lora"))
    for name in sorted(set(per_module) & set(layers)):
        layer = layers[name]
        r, alpha, peft_scale = peft_rank_scale(name)
        if r != layer.r:
            raise ValueError(
                f"load_peft_lora: the adapter has r={r} for {name}, the model's CFLoRA layer r={layer.r}"
            )
        if abs(peft_scale - layer.scale) > 1e-12 * max(1.0, abs(layer.scale)):
            raise ValueError(
                f"load_peft_lora: the adapter's scale is {peft_scale:g} for {name} (lora_alpha={alpha:g}, r={r}"
                f"{', rsLoRA' if pcfg.get('use_rslora') else ''}) but the model's is {layer.scale:g} "
                f"(alpha={layer.alpha:g}); inject with alpha={peft_scale * layer.r:g}"
            )
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
    if _modules_to_save_registry(unwrap_model(model)):
        raise RuntimeError(
            "export_peft_lora: the adapter has modules_to_save, which this export does not write; save it with "
            "save_cflora, or merge_and_unload(model) and save_pretrained the whole model"
        )
    # per-layer rank / alpha (rank_pattern / alpha_pattern) as PEFT patterns on the exact module names
    rank_pattern = {re.escape(name): layer.r for name, layer in layers if layer.r != config.r}
    alpha_pattern = {re.escape(name): layer.alpha for name, layer in layers if layer.alpha != config.alpha}
    base_config = getattr(unwrap_model(model), "config", None)
    peft_config = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
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
    atomic_write_bytes(
        os.path.join(out_dir, PEFT_CONFIG_NAME),
        json.dumps(data, indent=2, sort_keys=True, default=str).encode("utf-8"),
    )
