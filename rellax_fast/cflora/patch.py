"""Kernels-only entry point for PEFT models, Liger-style: :func:`apply_cflora` / :func:`revert_cflora`.

This module owns the patch that runs the LoRA layers of an existing PEFT model (``peft.get_peft_model``,
``PeftModel.from_pretrained``) through the fused op :func:`rellax_fast.ops.cflora_linear` with
``interaction=None``: ``y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ`` in one call instead of PEFT's base linear, two
adapter linears, a dropout and an add. Nothing about the model changes but the forward:

- each ``peft.tuners.lora.Linear`` instance gets the class :class:`CFLoRAFusedLoraLinear`, a subclass that
  only overrides ``forward`` (no new Parameters or buffers, so ``state_dict`` keys and tensors are
  identical, and PEFT's merge / set_adapter / save_pretrained keep working); :func:`revert_cflora` puts
  the original class back.
- PEFT's own forward still runs where the fused op does not apply: adapters disabled
  (``disable_adapter()``), a merged layer, mixed-adapter batches (``adapter_names=``), variant keywords,
  inputs whose dtype differs from the base weight's outside autocast (PEFT raises its own error there).
- Several active adapters run in one fused call: their A and B are concatenated and
  ``C = diag(s_1·1_{r_1}, s_2·1_{r_2}, ...)`` applies each adapter's scaling (``scale=1``). They must then
  share one dropout probability, and they share one dropout mask (PEFT draws one per adapter); with
  different probabilities PEFT's forward runs.
- ``lora_bias=True``: ``s·lora_B.bias`` is added to the base bias inside the op (both get gradients).
- transformers ``Conv1D`` (GPT-2, ``fan_in_fan_out``): the op gets the (d_out, d_in) view of its weight.
- Dropout: the op's mask is a hash of (seed, element index), seeded from torch's generator, not
  ``nn.Dropout``'s RNG stream, so training with dropout matches PEFT in distribution, not mask for mask.
  With dropout 0 or in eval mode the outputs equal PEFT's up to float rounding.
- Adapter weights in another dtype than the base weight (PEFT's default ``autocast_adapter_dtype=True``
  keeps fp32 adapters on a bf16 model) are cast to the base weight's dtype for the fused call (the cast
  is differentiable, so the fp32 Parameters still get their gradients); PEFT computes that path in fp32.

Refused, with an error naming the module: LoRA variants (DoRA ``use_dora``, aLoRA, BD-LoRA, ...), a base
layer that is not ``nn.Linear`` / ``Conv1D``, a dropout module that is not ``nn.Dropout`` / ``nn.Identity``.
Other PEFT layer types (Embedding, Conv2d, quantized linears) are left on PEFT's forward and logged.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from ..ops._backend import BACKEND_CHOICES
from ..ops.cflora import cflora_linear
from .conditioning import unwrap_model
from .layers import _is_conv1d, supported_base

logger = logging.getLogger("rellax_fast.cflora")

_BACKEND_ATTR = "_cflora_fused_backend"

__all__ = ["apply_cflora", "revert_cflora", "cflora_patched_modules"]


def _lora_module():
    try:
        from peft.tuners import lora
    except ImportError as exc:  # peft is optional for the rest of the package
        raise ImportError("apply_cflora needs peft (pip install peft)") from exc
    return lora


_FUSED_CLASS = None


def _fused_class():
    """The subclass of ``peft.tuners.lora.Linear`` with the fused forward (built once, on first use, so that
    importing this module does not import peft)."""
    global _FUSED_CLASS
    if _FUSED_CLASS is None:
        lora = _lora_module()

        class CFLoRAFusedLoraLinear(lora.Linear):
            """``peft.tuners.lora.Linear`` whose forward is one ``ops.cflora_linear`` call."""

            def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                fused = None if args else _fused_arguments(self, x, kwargs)
                if fused is None:
                    return super().forward(x, *args, **kwargs)
                x, weight, bias, lora_a, lora_b, interaction, scale, p = fused
                return cflora_linear(
                    x,
                    weight,
                    bias,
                    lora_a,
                    lora_b,
                    interaction,
                    scale=scale,
                    dropout_p=p,
                    seed=None,
                    backend=self.__dict__.get(_BACKEND_ATTR),
                )

            def __repr__(self) -> str:
                return "cflora_fused." + super().__repr__()

        CFLoRAFusedLoraLinear.__module__ = __name__
        CFLoRAFusedLoraLinear.__qualname__ = "CFLoRAFusedLoraLinear"
        _FUSED_CLASS = CFLoRAFusedLoraLinear
    return _FUSED_CLASS


def __getattr__(name: str):
    # lets pickle / torch.load find the patched class by name
    if name == "CFLoRAFusedLoraLinear":
        return _fused_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _dropout_p(module: nn.Module) -> Optional[float]:
    """The probability applied now by a PEFT lora_dropout entry (None: not a dropout we can fuse)."""
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p) if module.training else 0.0
    return None


def _fused_arguments(layer, x: torch.Tensor, kwargs) -> Optional[Tuple]:
    """(x, weight, bias, lora_a, lora_b, interaction, scale, dropout_p) for the fused call, or None where
    PEFT's own forward must run."""
    if layer.disable_adapters or layer.merged:
        return None
    if any(v is not None for v in kwargs.values()):  # adapter_names, variant keywords, base-layer keywords
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not active:
        return None
    for a in active:
        if a in layer.lora_variant:
            raise RuntimeError(
                f"apply_cflora: adapter {a!r} of {_name(layer)} is a LoRA variant "
                f"({type(layer.lora_variant[a]).__name__}), which the fused op does not implement; "
                "revert_cflora(model) to run it on PEFT's forward"
            )
    base = layer.get_base_layer()
    weight = base.weight.t() if _is_conv1d(base) else base.weight
    dtype = weight.dtype
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        return None  # PEFT's base layer decides (it raises on a dtype mismatch)
    if x.dtype != dtype:
        # under autocast (where F.linear would cast both): one dtype into the op, whose cast policy applies
        x = x.to(dtype)
    ps = [_dropout_p(layer.lora_dropout[a]) for a in active]
    if any(p is None for p in ps) or len(set(ps)) != 1:
        return None
    bias = base.bias
    for a in active:
        b_bias = layer.lora_B[a].bias
        if b_bias is not None:
            term = layer.scaling[a] * b_bias.to(dtype)
            bias = term if bias is None else bias + term
    if len(active) == 1:
        a = active[0]
        lora_a = layer.lora_A[a].weight.to(dtype)
        lora_b = layer.lora_B[a].weight.to(dtype)
        interaction, scale = None, float(layer.scaling[a])
    else:
        lora_a = torch.cat([layer.lora_A[a].weight.to(dtype) for a in active], dim=0)
        lora_b = torch.cat([layer.lora_B[a].weight.to(dtype) for a in active], dim=1)
        scales = torch.cat(
            [torch.full((layer.lora_A[a].weight.shape[0],), float(layer.scaling[a])) for a in active]
        )
        interaction, scale = torch.diag(scales).to(device=weight.device, dtype=dtype), 1.0
    return x, weight, bias, lora_a, lora_b, interaction, scale, ps[0]


def _name(layer) -> str:
    return layer.__dict__.get("_cflora_name", type(layer).__name__)


def _check_patchable(name: str, layer) -> None:
    base = layer.get_base_layer()
    if not supported_base(base):
        raise ValueError(
            f"apply_cflora: {name} wraps a {type(base).__name__}; the fused op covers nn.Linear and transformers "
            "Conv1D base layers only"
        )
    for adapter, variant in layer.lora_variant.items():
        kind = "DoRA (use_dora=True)" if type(variant).__name__.startswith("Dora") else type(variant).__name__
        raise ValueError(
            f"apply_cflora: {name} adapter {adapter!r} is a LoRA variant, {kind}; the fused op implements plain "
            "LoRA only (y = x W^T + b + s·B A x), so this model cannot be patched"
        )
    for adapter, dropout in layer.lora_dropout.items():
        if _dropout_p(dropout) is None:
            raise ValueError(
                f"apply_cflora: {name} adapter {adapter!r} uses dropout module {type(dropout).__name__}; the fused "
                "op implements nn.Dropout / nn.Identity only"
            )


def cflora_patched_modules(model: nn.Module) -> List[str]:
    """Names of the modules :func:`apply_cflora` patched."""
    cls = _FUSED_CLASS
    if cls is None:
        return []
    return [n for n, m in unwrap_model(model).named_modules() if type(m) is cls]


def apply_cflora(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Run every ``peft.tuners.lora.Linear`` of ``model`` through ``ops.cflora_linear``; returns ``model``.

    ``backend`` forces an ``ops.cflora_linear`` backend (None/"auto": the fastest for the device);
    applying again only updates it. Checks every layer before patching any: raises ValueError for DoRA and
    other LoRA variants, unsupported base layers or dropout modules (naming the module), and when the
    model has no PEFT LoRA Linear layer. Undo with :func:`revert_cflora`.
    """
    if backend not in BACKEND_CHOICES:
        raise ValueError(
            f"apply_cflora: backend must be None or one of {', '.join(BACKEND_CHOICES[1:])}; got {backend!r}"
        )
    lora = _lora_module()
    cls = _fused_class()
    root = unwrap_model(model)
    targets, others = [], []
    for name, module in root.named_modules():
        if type(module) in (lora.Linear, cls):
            targets.append((name, module))
        elif isinstance(module, lora.LoraLayer):
            others.append(f"{name} ({type(module).__name__})")
    if not targets:
        raise ValueError(
            "apply_cflora: the model has no PEFT LoRA Linear layers (peft.tuners.lora.Linear); build it with "
            "peft.get_peft_model or PeftModel.from_pretrained first"
            + (f"; found only {', '.join(others[:5])}" if others else "")
        )
    for name, module in targets:
        _check_patchable(name, module)
    for name, module in targets:
        module.__class__ = cls
        module.__dict__[_BACKEND_ATTR] = backend
        module.__dict__["_cflora_name"] = name
    if others:
        logger.info("apply_cflora: left on PEFT's forward (not a plain LoRA Linear): %s", ", ".join(others))
    logger.info("apply_cflora: %d PEFT LoRA Linear layers run ops.cflora_linear", len(targets))
    return model


def revert_cflora(model: nn.Module) -> nn.Module:
    """Give every layer patched by :func:`apply_cflora` its PEFT class (and forward) back; returns ``model``."""
    cls = _FUSED_CLASS
    if cls is None:
        return model
    lora = _lora_module()
    for _, module in unwrap_model(model).named_modules():
        if type(module) is cls:
            module.__class__ = lora.Linear
            module.__dict__.pop(_BACKEND_ATTR, None)
            module.__dict__.pop("_cflora_name", None)
    return model
