"""Interaction generators: the r x r matrix C of CFLoRA (``ΔW_u = s·B C_u A``) under each constraint.

Every CFLoRA layer owns one generator (the paper's per-layer design). A generator maps the per-sample
conditioning vectors ``cond`` of shape (B, cond_dim) to C, or returns a shared C when it ignores cond:

=========== ====================================== =============================================
kind        C                                      initial value
=========== ====================================== =============================================
identity    I (no module at all: the op gets None) I
static      one learned r x r matrix, shared       I
full        dense r x r per sample:                exactly I (output layer zero, bias = vec(I))
            LayerNorm -> Linear(cond_dim, 2r²)
            -> GELU -> Linear(2r², r²)
moe         block-diagonal, block e = n·g_e(u)·I_k  exactly I (gate layer zero: uniform gates 1/n)
            k = r/n, g = softmax(Linear(LN(cond)))
recrank1    n·(w wᵀ) ⊗ I_k, k = r/n,               (1/n)·11ᵀ ⊗ I_k (see below)
            w = softmax(Linear(LN(cond)))
=========== ====================================== =============================================

Normalisation: "moe" multiplies the gates by n so that uniform gates give C = I exactly, i.e. a fresh
adapter is plain LoRA. "recrank1" uses the same factor n; since ``w wᵀ`` has rank one, C cannot be I;
with uniform w it is the orthogonal projector ``(1/n)·11ᵀ ⊗ I_k`` (eigenvalues 1 and 0, so its scale
matches the identity's), and B = 0 still makes a fresh adapter a no-op. All conditioned generators
layer-normalise cond first so that the gates do not depend on the conditioning vectors' scale.

Registry: every kind is one :class:`InteractionGenerator` subclass decorated with
:func:`register_interaction`; ``INTERACTIONS`` maps kind -> class. The class carries what the rest of the
package asks about a kind: ``needs_cond`` (C depends on the per-sample conditioning vector),
``mergeable`` (C is a constant that ``merge_cflora`` can fold into W), ``ablation_name`` (the row of the
demo's ablation table, or None), :meth:`~InteractionGenerator.check_config` (extra CFLoRAConfig checks)
and :meth:`~InteractionGenerator.from_config` (the generator a layer owns). CFLoRAConfig's validation,
``build_interaction``, the ReLLaX wrapper and the CLI choices all read the registry, so a new kind is one
decorated class here (docs/architecture.md, "Adding an interaction kind").
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn


class InteractionGenerator(nn.Module):
    """Base class: ``forward(cond)`` returns C as (r, r) (shared) or (B, r, r) (per sample).

    Class attributes a registered kind sets: ``kind`` (its name in CFLoRAConfig.interaction),
    ``needs_cond``, ``mergeable`` and ``ablation_name`` (module docstring).
    """

    kind: str = ""
    needs_cond: bool = False
    mergeable: bool = False
    ablation_name: Optional[str] = None

    def __init__(self, r: int):
        super().__init__()
        self.r = r

    @classmethod
    def check_config(cls, config) -> None:
        """Raise ValueError when ``config`` (a CFLoRAConfig with ``interaction == cls.kind``) cannot build this
        kind. The base checks ``cond_dim`` for conditioned kinds; subclasses add their own settings."""
        if cls.needs_cond and not (isinstance(config.cond_dim, int) and config.cond_dim >= 1):
            raise ValueError(
                f"CFLoRAConfig.cond_dim must be a positive int for interaction={cls.kind!r}; got {config.cond_dim!r}"
            )

    @classmethod
    def from_config(cls, config, device=None, dtype=None) -> Optional[InteractionGenerator]:
        """The generator one layer owns (``config.r`` is that layer's rank); None means C = I."""
        raise NotImplementedError(f"{cls.__name__} must implement from_config")

    def _check_cond(self, cond: Optional[torch.Tensor], cond_dim: int) -> torch.Tensor:
        if cond is None:
            raise RuntimeError(
                f"CFLoRA interaction {self.kind!r} needs a conditioning vector: run the model inside "
                "`with cflora_condition(model, cond):` with cond of shape (batch, cond_dim)"
            )
        if cond.dim() != 2 or cond.shape[1] != cond_dim:
            raise ValueError(
                f"CFLoRA interaction {self.kind!r}: cond must have shape (batch, {cond_dim}); "
                f"got {tuple(cond.shape)}"
            )
        if not cond.is_floating_point():
            raise TypeError(
                f"CFLoRA interaction {self.kind!r}: cond must be floating; got dtype {cond.dtype}"
            )
        param = next(self.parameters())
        return cond.to(device=param.device, dtype=param.dtype)


INTERACTIONS: Dict[str, Type[InteractionGenerator]] = {}


def register_interaction(cls: Type[InteractionGenerator]) -> Type[InteractionGenerator]:
    """Class decorator: add ``cls`` to ``INTERACTIONS`` under ``cls.kind`` (the kind's one home)."""
    if not (isinstance(cls, type) and issubclass(cls, InteractionGenerator)):
        raise TypeError(f"register_interaction: expected an InteractionGenerator subclass, got {cls!r}")
    if not (isinstance(cls.kind, str) and cls.kind):
        raise ValueError(
            f"register_interaction: {cls.__name__}.kind must be a non-empty string; got {cls.kind!r}"
        )
    known = INTERACTIONS.get(cls.kind)
    if known is not None and known is not cls:
        raise ValueError(
            f"register_interaction: kind {cls.kind!r} is already registered to {known.__name__}; "
            f"cannot register {cls.__name__} under it"
        )
    INTERACTIONS[cls.kind] = cls
    return cls


def interaction_class(kind: str) -> Type[InteractionGenerator]:
    """The registered class of ``kind``; ValueError naming the registered kinds otherwise."""
    cls = INTERACTIONS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"CFLoRAConfig.interaction must be one of {', '.join(INTERACTIONS)}; got {kind!r}")
    return cls


@register_interaction
class IdentityInteraction(InteractionGenerator):
    """C = I: plain LoRA. A layer owns no module at all (``from_config`` is None): the op gets None."""

    kind = "identity"
    mergeable = True
    ablation_name = "w/o CFLoRA (identity)"

    @classmethod
    def from_config(cls, config, device=None, dtype=None) -> None:
        return None

    def forward(self, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.eye(self.r)


@register_interaction
class StaticInteraction(InteractionGenerator):
    """One learned r x r matrix shared by all samples, initialised to I (mergeable into W)."""

    kind = "static"
    mergeable = True

    def __init__(self, r: int, device=None, dtype=None):
        super().__init__(r)
        self.weight = nn.Parameter(torch.eye(r, device=device, dtype=dtype))

    @classmethod
    def from_config(cls, config, device=None, dtype=None) -> StaticInteraction:
        return cls(config.r, device=device, dtype=dtype)

    def forward(self, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.weight


@register_interaction
class FullInteraction(InteractionGenerator):
    """Dense per-sample C from LayerNorm -> Linear(cond_dim, hidden) -> GELU -> Linear(hidden, r²)."""

    kind = "full"
    needs_cond = True

    def __init__(self, r: int, cond_dim: int, hidden: int, init_std: float = 0.0, device=None, dtype=None):
        super().__init__(r)
        self.cond_dim = cond_dim
        kw = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(cond_dim, **kw)
        self.fc1 = nn.Linear(cond_dim, hidden, **kw)
        self.fc2 = nn.Linear(hidden, r * r, **kw)
        with torch.no_grad():
            # zero (or small) output weights and bias vec(I): C starts at (or near) the identity
            if init_std > 0:
                self.fc2.weight.normal_(0.0, init_std)
            else:
                self.fc2.weight.zero_()
            self.fc2.bias.copy_(torch.eye(r, **kw).reshape(-1))

    @classmethod
    def from_config(cls, config, device=None, dtype=None) -> FullInteraction:
        return cls(
            config.r, config.cond_dim, config.hidden, config.generator_init_std, device=device, dtype=dtype
        )

    def forward(self, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        u = self._check_cond(cond, self.cond_dim)
        h = F.gelu(self.fc1(self.norm(u)))
        return self.fc2(h).view(u.shape[0], self.r, self.r)


class _GatedInteraction(InteractionGenerator):
    needs_cond = True

    def __init__(self, r: int, cond_dim: int, n_experts: int, init_std: float = 0.0, device=None, dtype=None):
        super().__init__(r)
        if r % n_experts != 0:
            raise ValueError(f"{self.kind}: n_experts={n_experts} must divide r={r}")
        self.cond_dim = cond_dim
        self.n_experts = n_experts
        self.block = r // n_experts
        kw = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(cond_dim, **kw)
        self.gate = nn.Linear(cond_dim, n_experts, **kw)
        with torch.no_grad():
            # zero gate layer: uniform gates at init (C = I for moe)
            if init_std > 0:
                self.gate.weight.normal_(0.0, init_std)
            else:
                self.gate.weight.zero_()
            self.gate.bias.zero_()

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        n = config.n_experts
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            raise ValueError(f"CFLoRAConfig.n_experts must be a positive int; got {n!r}")
        if config.r % n != 0:
            raise ValueError(
                f"CFLoRAConfig: interaction={cls.kind!r} needs n_experts to divide r; got r={config.r}, n_experts={n}"
            )

    @classmethod
    def from_config(cls, config, device=None, dtype=None) -> _GatedInteraction:
        return cls(
            config.r, config.cond_dim, config.n_experts, config.generator_init_std, device=device, dtype=dtype
        )

    def gates(self, cond: Optional[torch.Tensor]) -> torch.Tensor:
        """Softmax gates (B, n_experts)."""
        u = self._check_cond(cond, self.cond_dim)
        return torch.softmax(self.gate(self.norm(u)), dim=-1)


@register_interaction
class MoEInteraction(_GatedInteraction):
    """Block-diagonal C = n·diag(g) ⊗ I_{r/n}, g = softmax gates (iLoRA / MoE-LoRA style)."""

    kind = "moe"
    ablation_name = "MoE / iLoRA-style"

    def forward(self, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        g = self.gates(cond) * self.n_experts
        return torch.diag_embed(g.repeat_interleave(self.block, dim=1))


@register_interaction
class RecRank1Interaction(_GatedInteraction):
    """C = n·(w wᵀ) ⊗ I_{r/n}, w = softmax weights over n experts (RecLoRA style)."""

    kind = "recrank1"
    ablation_name = "RecLoRA-style (recrank1)"

    def forward(self, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = self.gates(cond)
        outer = self.n_experts * w.unsqueeze(2) * w.unsqueeze(1)  # (B, n, n)
        eye = torch.eye(self.block, device=w.device, dtype=w.dtype)
        c = outer[:, :, None, :, None] * eye[None, None, :, None, :]  # (B, n, k, n, k)
        return c.reshape(w.shape[0], self.r, self.r)


# the built-in kinds in registration order (CLI choices, docs); INTERACTIONS also holds kinds registered later
INTERACTION_KINDS: Tuple[str, ...] = tuple(INTERACTIONS)


def build_interaction(config, device=None, dtype=None) -> Optional[InteractionGenerator]:
    """The generator a layer owns for ``config.interaction`` (None for identity)."""
    return interaction_class(config.interaction).from_config(config, device=device, dtype=dtype)
