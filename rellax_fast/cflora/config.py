"""CFLoRAConfig: the adapter's hyper-parameters, validation and JSON round-trip.

The config is modelled on PEFT's ``LoraConfig`` (r, alpha, dropout, target_modules) plus the CFLoRA
parts: which constraint the r x r interaction matrix C obeys, the conditioning size and the generator.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from .._io import atomic_write_bytes

INTERACTIONS = ("identity", "static", "full", "moe", "recrank1")
# interactions whose C depends on the per-sample conditioning vector
CONDITIONED_INTERACTIONS = ("full", "moe", "recrank1")
LORA_INITS = ("kaiming", "gaussian", "random")
BACKEND_CHOICES = (None, "auto", "reference", "cpp", "cuda", "triton")


@dataclass
class CFLoRAConfig:
    """Hyper-parameters of a CFLoRA adapter: ``y = x Wᵀ + b + (alpha/r)·((drop(x) Aᵀ) C_uᵀ) Bᵀ``.

    Args:
        r: LoRA rank.
        alpha: scaling numerator; the LoRA path is scaled by ``alpha / r`` (as in PEFT without rsLoRA).
        dropout: dropout probability on the LoRA path's input (training mode only).
        target_modules: module-name suffixes (PEFT semantics: a module matches when its full name equals
            an entry or ends with ``"." + entry``) or one regex string that must match the full name.
        interaction: constraint on C: "identity" (C = I, plain LoRA), "static" (one learned r x r),
            "full" (dense r x r per sample from a generator), "moe" (block-diagonal, block e is
            ``n·g_e(u)·I``, gates g a softmax), "recrank1" (``n·(w wᵀ) ⊗ I_{r/n}``, w a softmax).
        cond_dim: size of the per-sample conditioning vector (required for conditioned interactions).
        n_experts: number of experts for "moe" and "recrank1" (must divide r).
        generator_hidden: hidden width of the "full" generator (default ``2 r²``).
        generator_init_std: std of the generator's output-layer weights at init. 0 (default) makes a
            fresh per-sample generator produce exactly C = I (resp. uniform gates), so training starts
            from plain LoRA.
        init_lora: "kaiming" (A Kaiming-uniform, B = 0, PEFT's default: a fresh adapter is a no-op),
            "gaussian" (A ~ N(0, 1/r), B = 0) or "random" (A and B both Kaiming-uniform; for tests).
        train_lora: whether A and B train (False: the second stage of the two-stage recipe, which
            keeps a pre-trained LoRA fixed and trains only the interaction).
        train_interaction: whether the interaction (static C or the generator) trains.
        backend: ``ops.cflora_linear`` backend for every layer (None: automatic).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Union[List[str], str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    interaction: str = "identity"
    cond_dim: Optional[int] = None
    n_experts: int = 4
    generator_hidden: Optional[int] = None
    generator_init_std: float = 0.0
    init_lora: str = "kaiming"
    train_lora: bool = True
    train_interaction: bool = True
    backend: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"CFLoRAConfig.r must be a positive int; got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"CFLoRAConfig.alpha must be a positive number; got {self.alpha!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError(f"CFLoRAConfig.dropout must be in [0, 1); got {self.dropout!r}")
        tm = self.target_modules
        if isinstance(tm, str):
            if not tm:
                raise ValueError("CFLoRAConfig.target_modules must not be an empty regex")
        elif not (isinstance(tm, list) and tm and all(isinstance(t, str) and t for t in tm)):
            raise ValueError(
                "CFLoRAConfig.target_modules must be a non-empty list of module-name suffixes or a regex "
                f"string; got {tm!r}"
            )
        if self.interaction not in INTERACTIONS:
            raise ValueError(
                f"CFLoRAConfig.interaction must be one of {', '.join(INTERACTIONS)}; got {self.interaction!r}"
            )
        if self.needs_cond:
            if not (isinstance(self.cond_dim, int) and self.cond_dim >= 1):
                raise ValueError(
                    f"CFLoRAConfig.cond_dim must be a positive int for interaction={self.interaction!r}; "
                    f"got {self.cond_dim!r}"
                )
        if self.interaction in ("moe", "recrank1"):
            if not (isinstance(self.n_experts, int) and self.n_experts >= 1):
                raise ValueError(f"CFLoRAConfig.n_experts must be a positive int; got {self.n_experts!r}")
            if self.r % self.n_experts != 0:
                raise ValueError(
                    f"CFLoRAConfig: interaction={self.interaction!r} needs n_experts to divide r; "
                    f"got r={self.r}, n_experts={self.n_experts}"
                )
        if self.generator_hidden is not None and not (
            isinstance(self.generator_hidden, int) and self.generator_hidden >= 1
        ):
            raise ValueError(
                f"CFLoRAConfig.generator_hidden must be a positive int or None; got {self.generator_hidden!r}"
            )
        if not (self.generator_init_std >= 0.0):
            raise ValueError(f"CFLoRAConfig.generator_init_std must be >= 0; got {self.generator_init_std!r}")
        if self.init_lora not in LORA_INITS:
            raise ValueError(f"CFLoRAConfig.init_lora must be one of {', '.join(LORA_INITS)}; got {self.init_lora!r}")
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(
                f"CFLoRAConfig.backend must be None or one of auto, reference, cpp, cuda, triton; got {self.backend!r}"
            )

    # ------------------------------------------------------------------ derived values
    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.r)

    @property
    def needs_cond(self) -> bool:
        return self.interaction in CONDITIONED_INTERACTIONS

    @property
    def hidden(self) -> int:
        return self.generator_hidden if self.generator_hidden is not None else 2 * self.r * self.r

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> CFLoRAConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"format"})
        if unknown:
            raise ValueError(f"CFLoRAConfig: unknown keys {unknown}; known keys are {sorted(names)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps({"format": "rellax-fast-cflora/1", **self.to_dict()}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CFLoRAConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the JSON config to ``path`` atomically."""
        atomic_write_bytes(path, self.to_json().encode("utf-8"))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> CFLoRAConfig:
        with open(path, encoding="utf-8") as fh:
            return cls.from_json(fh.read())

