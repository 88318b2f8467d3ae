"""CFLoRALinear: the layer that replaces an ``nn.Linear`` or transformers ``Conv1D`` in place.

The layer keeps the wrapped module's ``weight`` and ``bias`` Parameters under the same names (so the
base model's state-dict keys are unchanged) and adds ``lora_A`` (r, d_in), ``lora_B`` (d_out, r) and the
``interaction`` generator. Its forward is one call of :func:`rellax_fast.ops.cflora_linear`, which
routes to the fastest backend.

Conditioning: :func:`rellax_fast.cflora.cflora_condition` puts one :class:`ConditionSlot` on every layer
of a model. The slot stays on the layers after the ``with`` block exits, marked inactive, so that the
recomputation of gradient checkpointing (which runs inside ``backward()``, usually after the block has
exited) sees the same cond; outside a backward pass an inactive slot is an error, never a silent
identity. (For several conditioned forwards before one backward, Hugging Face gradient checkpointing replays
each forward's own slot during its recomputation - ``cflora_condition`` wraps its checkpoint function - and
``cflora_checkpoint_context_fn`` does the same for a direct ``torch.utils.checkpoint`` call.) The slot lives on the module instances (no global state), so DDP replicas are independent.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.cflora import cflora_linear
from .config import CFLoRAConfig
from .interaction import InteractionGenerator, build_interaction


class ConditionSlot:
    """The per-sample conditioning vectors (B, cond_dim) shared by the CFLoRA layers of one model.

    ``interactions`` caches each layer's C for forwards without autograd inside the block: ``generate()``
    runs its whole generation in one block, so every decode step after the first reuses C instead of
    running each layer's generator again (the generator's work per token is as large as the layer's own at
    decode sizes). An entry holds until the generator's parameters or cond change in place (version
    counters) or the batch differs; with autograd on, C is always recomputed, so its gradient flows.
    """

    __slots__ = ("cond", "active", "interactions")

    def __init__(self, cond: torch.Tensor):
        self.cond = cond
        self.active = True
        self.interactions: dict = {}


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D (weight (d_in, d_out)); checked by class name so that importing
    # this module never imports transformers
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def supported_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _in_backward() -> bool:
    # True while autograd runs a backward pass (where checkpoint recomputation happens); the same
    # private call torch.utils.checkpoint uses. Without it, an inactive slot is simply an error.
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


def _saved_tensor_hooks_active() -> bool:
    # non-reentrant checkpointing (and activation offloading) runs the forward under saved-tensor hooks;
    # only then can this forward be recomputed later, so only then is it tracked (private call: when
    # missing, track every grad-recording forward)
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return True if top is None else top(False) is not None


class _PendingForward:
    """One grad-recording conditioned forward of a layer whose backward has not run yet.

    It is stored on the forward's autograd node (so it dies with the graph) and marked done by a hook when
    that node has run. A checkpoint recomputation that is not replayed (see ``_cflora_replaying``) while
    another cond's forward of the same layer is pending cannot know which cond to use, and raises.
    """

    __slots__ = ("slot", "done", "__weakref__")

    def __init__(self, slot: ConditionSlot):
        self.slot = slot
        self.done = False

    def __call__(self, grad_inputs, grad_outputs) -> None:  # autograd node post-hook
        self.done = True


# layer -> weak references to its pending forwards; keyed weakly by the layer instance, so nothing is
# stored in the module itself (deepcopy / pickle unaffected) and replicas stay independent
_PENDING: weakref.WeakKeyDictionary[nn.Module, List[weakref.ref]] = weakref.WeakKeyDictionary()


class CFLoRALinear(nn.Module):
    """``y = x Wᵀ + b + s·((drop(x) Aᵀ) C_uᵀ) Bᵀ`` around the frozen weight of the wrapped module."""

    def __init__(
        self,
        base: nn.Module,
        config: CFLoRAConfig,
        name: str = "",
        *,
        r: Optional[int] = None,
        alpha: Optional[float] = None,
    ):
        super().__init__()
        if not supported_base(base):
            raise TypeError(
                f"CFLoRA can wrap nn.Linear or transformers Conv1D; {name or 'module'} is {type(base).__name__}"
            )
        self.fan_in_fan_out = _is_conv1d(base)
        weight = base.weight
        if self.fan_in_fan_out:
            d_in, d_out = weight.shape
            self.nx, self.nf = d_in, d_out  # Conv1D's attribute names
        else:
            d_out, d_in = weight.shape
        # per-layer rank / alpha (rank_pattern / alpha_pattern); the model-level config stays cflora_config
        r = config.r if r is None else int(r)
        alpha = config.alpha if alpha is None else float(alpha)
        # r > min(d_in, d_out) is accepted, as PEFT accepts it: ΔW = s·B C A then simply has full rank
        self.in_features, self.out_features = d_in, d_out
        self.layer_name = name
        self.cflora_config = config
        self.r = r
        self.alpha = alpha
        self.scale = alpha / r
        self.dropout_p = float(config.dropout)
        self.backend = config.backend
        self.merged = False
        self.disabled = False  # set by disable_adapter(): the forward is the wrapped module's own
        self._cflora_replaying = False  # True while a checkpoint replay has set this forward's own slot
        self._cflora_slot: Optional[ConditionSlot] = None
        # the wrapped module itself, kept unregistered (not in parameters() / state_dict()): its forward is the
        # exact base output under disable_adapter(), and unload() puts it back in place
        self.__dict__["_base_module"] = base
        # the wrapped module's own Parameters, under the same names
        self.weight = weight
        if base.bias is not None:
            self.bias = base.bias
        else:
            self.register_parameter("bias", None)
        kw = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **kw))
        self.lora_B = nn.Parameter(torch.empty(d_out, r, **kw))
        layer_config = config
        if (r, alpha) != (config.r, config.alpha):
            try:
                layer_config = dataclasses.replace(config, r=r, alpha=alpha)
            except ValueError as exc:
                raise ValueError(f"CFLoRA layer {name or '?'} (r={r}, alpha={alpha:g}): {exc}") from None
        self.interaction: Optional[InteractionGenerator] = build_interaction(layer_config, **kw)
        self.reset_lora_parameters(config.init_lora)

    # ------------------------------------------------------------------ init
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """PEFT's LoRA init: A Kaiming-uniform (a=√5, as nn.Linear), B = 0 - a fresh adapter is a no-op."""
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init == "random":
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B)

    # ------------------------------------------------------------------ helpers
    @property
    def needs_cond(self) -> bool:
        return self.interaction is not None and self.interaction.needs_cond

    def base_module(self) -> nn.Module:
        """The wrapped ``nn.Linear`` / ``Conv1D``, holding this layer's current weight and bias Parameters."""
        base = self.__dict__["_base_module"]
        if base._parameters.get("weight") is not self.weight:
            base.weight = self.weight  # e.g. a weight untied by merge_cflora(untie=True)
        if base._parameters.get("bias") is not self.bias:
            base.bias = self.bias
        return base

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as (d_out, d_in): a transposed view for Conv1D (no copy)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _condition(self) -> torch.Tensor:
        slot = self._cflora_slot
        if slot is not None and slot.active:
            return slot.cond
        if slot is not None and not torch.compiler.is_compiling() and _in_backward():
            # inactive but inside backward: the recomputation of gradient checkpointing (never while
            # torch.compile traces: a compiled graph recomputes inside its own backward, without Python)
            if not self._cflora_replaying:
                self._check_unambiguous_recompute(slot)
            return slot.cond
        raise RuntimeError(
            f"CFLoRA layer {self.layer_name or '?'} (interaction {self.cflora_config.interaction!r}) needs "
            "per-sample conditioning: call model(**batch, cflora_cond=cond) or run the model inside "
            "`with rellax_fast.cflora_condition(model, cond):`, with cond of shape (batch, cond_dim). With "
            "transformers.Trainer, the batch has no 'cflora_cond' column because the Trainer drops the dataset "
            "columns that forward() does not name: set TrainingArguments(remove_unused_columns=False)"
        )

    def _check_unambiguous_recompute(self, slot: ConditionSlot) -> None:
        pending = [t for t in (ref() for ref in _PENDING.get(self, ())) if t is not None and not t.done]
        if any(t.slot is not slot for t in pending):
            raise RuntimeError(
                f"CFLoRA layer {self.layer_name or '?'}: gradient checkpointing is recomputing a conditioned "
                "forward while forwards of several cflora_condition blocks still wait for their backward, so "
                "the recomputation cannot tell which cond it used (the gradients would be wrong). Use Hugging "
                "Face gradient checkpointing (model.gradient_checkpointing_enable(), which replays each "
                "forward's cond), pass context_fn=rellax_fast.cflora.cflora_checkpoint_context_fn(model) to "
                "torch.utils.checkpoint(use_reentrant=False), or run each backward before the next forward"
            )

    def _track_pending(self, out: torch.Tensor) -> torch.Tensor:
        """Record a conditioned forward that checkpointing may recompute (see :class:`_PendingForward`)."""
        node = out.grad_fn
        if node is None:
            return out
        token = _PendingForward(self._cflora_slot)
        node.metadata["cflora_pending"] = token
        node.register_hook(token)
        refs = [ref for ref in _PENDING.get(self, ()) if (t := ref()) is not None and not t.done]
        refs.append(weakref.ref(token))
        _PENDING[self] = refs
        return out

    def interaction_matrix(self, batch: Optional[int] = None) -> Optional[torch.Tensor]:
        """C for this forward: None (identity), (r, r) shared, or (batch, r, r) per sample.

        When the model's batch is a multiple of cond's batch (``generate()`` with beams or
        ``num_return_sequences`` repeats every sample consecutively), C is repeated to match.
        """
        gen = self.interaction
        if gen is None:
            return None
        if not gen.needs_cond:
            return gen()
        cached = self._cached_interaction(gen, batch)
        if cached is not None:
            return cached
        c = gen(self._condition())
        n_cond = c.shape[0]
        if batch is not None and batch != n_cond:
            if n_cond == 0 or batch % n_cond != 0:
                raise ValueError(
                    f"CFLoRA layer {self.layer_name or '?'}: the input batch is {batch} but cond has "
                    f"{n_cond} rows; the batch must equal cond's, or be a multiple of it (generate() with "
                    "num_beams / num_return_sequences repeats each sample consecutively)"
                )
            c = c.repeat_interleave(batch // n_cond, dim=0)
        self._store_interaction(gen, batch, c)
        return c

    def _cache_key(self, gen: InteractionGenerator, params: tuple, batch: Optional[int]):
        slot = self._cflora_slot
        cond_version = None if slot.cond.is_inference() else slot.cond._version
        return (gen, batch, cond_version, tuple(p._version for p in params))

    def _cacheable_slot(self) -> Optional[ConditionSlot]:
        """The active slot when this forward may use its C cache (no autograd, not traced), else None."""
        slot = self._cflora_slot
        if slot is None or not slot.active or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        return slot

    def _cached_interaction(self, gen: InteractionGenerator, batch: Optional[int]) -> Optional[torch.Tensor]:
        slot = self._cacheable_slot()
        entry = slot.interactions.get(self) if slot is not None else None
        if entry is None:
            return None
        params, key, c = entry
        return c if self._cache_key(gen, params, batch) == key else None

    def _store_interaction(self, gen: InteractionGenerator, batch: Optional[int], c: torch.Tensor) -> None:
        slot = self._cacheable_slot()
        if slot is not None:
            params = tuple(gen.parameters())
            slot.interactions[self] = (params, self._cache_key(gen, params, batch), c)

    def delta_weight(self) -> torch.Tensor:
        """s·B C A as (d_out, d_in) in float32 (shared C only)."""
        gen = self.interaction
        if gen is not None and not gen.mergeable:
            raise RuntimeError(
                f"CFLoRA layer {self.layer_name or '?'}: interaction {gen.kind!r} gives a per-sample C, so "
                "ΔW differs per sample and cannot be merged into W; only identity and static merge"
            )
        a = self.lora_A.detach().float()
        b = self.lora_B.detach().float()
        if gen is not None:
            b = b @ gen().detach().float()
        return self.scale * (b @ a)

    # ------------------------------------------------------------------ merge
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError(f"CFLoRA layer {self.layer_name or '?'} is already merged")
        delta = self.delta_weight()
        with torch.no_grad():
            w = self.weight_out_in()
            w.copy_((w.float() + delta).to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError(f"CFLoRA layer {self.layer_name or '?'} is not merged")
        delta = self.delta_weight()
        with torch.no_grad():
            w = self.weight_out_in()
            w.copy_((w.float() - delta).to(w.dtype))
        self.merged = False

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            if self.merged:
                raise RuntimeError(
                    f"CFLoRA layer {self.layer_name or '?'} is disabled but merged into W; "
                    "unmerge_cflora(model) first"
                )
            return self.base_module()(x)  # the wrapped module's own forward: exactly the base output
        weight = self.weight_out_in()
        if self.merged:
            return F.linear(x, weight, self.bias)
        c = self.interaction_matrix(x.shape[0] if x.dim() >= 2 else None)
        if c is not None and c.dtype != x.dtype:
            c = c.to(x.dtype)
        out = cflora_linear(
            x,
            weight,
            self.bias,
            self.lora_A,
            self.lora_B,
            c,
            scale=self.scale,
            dropout_p=self.dropout_p if self.training else 0.0,
            seed=None,
            backend=self.backend,
        )
        if (
            c is not None
            and c.dim() == 3
            and not torch.compiler.is_compiling()
            and torch.is_grad_enabled()
            and not _in_backward()
            and _saved_tensor_hooks_active()
        ):
            return self._track_pending(out)
        return out

    def extra_repr(self) -> str:
        kind = self.cflora_config.interaction
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scale={self.scale:g}, dropout={self.dropout_p:g}, interaction={kind!r}, "
            f"conv1d={self.fan_in_fan_out}, merged={self.merged}"
        )
