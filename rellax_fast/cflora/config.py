"""CFLoRAConfig: the adapter's hyper-parameters, validation and JSON round-trip.

The config is modelled on PEFT's ``LoraConfig`` (r, alpha, dropout, target_modules) plus the CFLoRA
parts: which constraint the r x r interaction matrix C obeys, the conditioning size and the generator.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from .._io import atomic_write_bytes
from ..ops._backend import BACKENDS
from .interaction import INTERACTION_KINDS, INTERACTIONS, interaction_class  # noqa: F401  (re-exported)

LORA_INITS = ("kaiming", "gaussian", "random")
# None: automatic per call; "auto": the same, spelled out; else one of ops._backend.BACKENDS
BACKEND_CHOICES = (None, "auto", *BACKENDS)
# target_modules value meaning every nn.Linear / Conv1D except the output head (PEFT's "all-linear")
ALL_LINEAR = "all-linear"
# the "format" tag of a saved config: version 2 adds exclude_modules, rank/alpha_pattern, modules_to_save and
# the adapter's content hash; version 1 files (no hash) still load
FORMAT_PREFIX = "rellax-fast-cflora/"
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
# keys of the saved JSON that describe the file, not the config
METADATA_KEYS = ("format", "content_sha256")


class AdapterFileError(ValueError):
    """A saved adapter or config file that cannot be read: truncated, corrupted, or of an unknown format."""


def format_version(tag: Any, source: str = "the config") -> int:
    """The version number of a ``"rellax-fast-cflora/<n>"`` tag; AdapterFileError for anything else."""
    match = re.fullmatch(re.escape(FORMAT_PREFIX) + r"(\d+)", tag) if isinstance(tag, str) else None
    if match is None or int(match.group(1)) not in SUPPORTED_FORMAT_VERSIONS:
        supported = ", ".join(f"{FORMAT_PREFIX}{v}" for v in SUPPORTED_FORMAT_VERSIONS)
        raise AdapterFileError(
            f"{source} has format {tag!r}; this rellax-fast reads {supported} (a file from a newer rellax-fast, "
            "or not a CFLoRA config?)"
        )
    return int(match.group(1))


def _is_names_or_regex(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, list) and bool(value) and all(isinstance(t, str) and t for t in value)


@dataclass
class CFLoRAConfig:
    r"""Hyper-parameters of a CFLoRA adapter: ``y = x Wᵀ + b + (alpha/r)·((drop(x) Aᵀ) C_uᵀ) Bᵀ``.

    Args:
        r: LoRA rank.
        alpha: scaling numerator; the LoRA path is scaled by ``alpha / r`` (as in PEFT without rsLoRA).
        dropout: dropout probability on the LoRA path's input (training mode only).
        target_modules: module-name suffixes (PEFT semantics: a module matches when its full name equals
            an entry or ends with ``"." + entry``), one regex string that must match the full name, or
            ``"all-linear"``: every nn.Linear / Conv1D except the output head, as PEFT: the output embeddings
            (``get_output_embeddings()``), or else a classification head named ``score`` / ``classifier``
            (add it to ``modules_to_save`` to train it in full).
        exclude_modules: modules never wrapped, even when target_modules matches them (suffixes or a regex,
            as target_modules).
        rank_pattern: per-module rank, ``{pattern: r}``; a pattern matches a module whose full name ends with
            it (``re.match(rf"(.*\.)?({pattern})$", name)``, as PEFT); the first matching pattern wins.
        alpha_pattern: per-module alpha, ``{pattern: alpha}``, matched as rank_pattern.
        modules_to_save: modules (suffixes or a regex) that are trained and saved in full, e.g. a read-out
            head; disable_adapter() swaps their original (frozen) copy back in.
        interaction: constraint on C, a kind registered in ``cflora.interaction.INTERACTIONS``: "identity"
            (C = I, plain LoRA), "static" (one learned r x r), "full" (dense r x r per sample from a
            generator), "moe" (block-diagonal, block e is ``n·g_e(u)·I``, gates g a softmax), "recrank1"
            (``n·(w wᵀ) ⊗ I_{r/n}``, w a softmax).
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
    exclude_modules: Optional[Union[List[str], str]] = None
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    modules_to_save: Optional[Union[List[str], str]] = None
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
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            if isinstance(getattr(self, name), (tuple, set)):
                setattr(self, name, sorted(getattr(self, name)) if isinstance(getattr(self, name), set)
                        else list(getattr(self, name)))
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
        for name in ("exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not _is_names_or_regex(value):
                raise ValueError(
                    f"CFLoRAConfig.{name} must be None, a non-empty list of module-name suffixes or a regex "
                    f"string; got {value!r}"
                )
        for name, kind in (("rank_pattern", "a positive int"), ("alpha_pattern", "a positive number")):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                raise ValueError(f"CFLoRAConfig.{name} must be a dict {{pattern: value}}; got {pattern!r}")
            for key, value in pattern.items():
                ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) if name == "rank_pattern" \
                    else (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)
                if not (isinstance(key, str) and key and ok):
                    raise ValueError(
                        f"CFLoRAConfig.{name} maps module-name patterns to {kind}; got {key!r}: {value!r}"
                    )
                try:
                    re.compile(key)
                except re.error as exc:
                    raise ValueError(f"CFLoRAConfig.{name}: {key!r} is not a valid regex ({exc})") from None
        # the kind's own checks (cond_dim for conditioned kinds, n_experts for moe / recrank1, ...)
        interaction_class(self.interaction).check_config(self)
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
                f"CFLoRAConfig.backend must be None or one of {', '.join(BACKEND_CHOICES[1:])}; got {self.backend!r}"
            )

    # ------------------------------------------------------------------ derived values
    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.r)

    @property
    def needs_cond(self) -> bool:
        """Whether the interaction's C depends on the per-sample conditioning vector (from the registry)."""
        return interaction_class(self.interaction).needs_cond

    @property
    def mergeable(self) -> bool:
        """Whether C is a constant that merge_cflora can fold into the base weight (from the registry)."""
        return interaction_class(self.interaction).mergeable

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """(r, alpha) of the module ``module_name`` after rank_pattern / alpha_pattern."""
        r_key = pattern_key(self.rank_pattern, module_name)
        a_key = pattern_key(self.alpha_pattern, module_name)
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[a_key] if a_key is not None else self.alpha
        return int(r), float(alpha)

    @property
    def hidden(self) -> int:
        return self.generator_hidden if self.generator_hidden is not None else 2 * self.r * self.r

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> CFLoRAConfig:
        """The config in ``data`` (a ``"format"`` tag, when present, must be a supported version)."""
        if "format" in data:
            format_version(data["format"])
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - set(METADATA_KEYS))
        if unknown:
            raise ValueError(f"CFLoRAConfig: unknown keys {unknown}; known keys are {sorted(names)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps({"format": f"{FORMAT_PREFIX}{FORMAT_VERSION}", **self.to_dict()}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CFLoRAConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the JSON config to ``path`` atomically."""
        atomic_write_bytes(path, self.to_json().encode("utf-8"))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> CFLoRAConfig:
        """Read a JSON config; AdapterFileError naming ``path`` when it is not valid JSON of a known format."""
        return cls.from_dict(read_json(path))


def read_json(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The JSON object in ``path``; AdapterFileError naming the file when it is truncated or not JSON."""
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{os.fspath(path)} is not valid JSON (truncated or corrupted?): {exc}") from exc
    if not isinstance(data, dict):
        raise AdapterFileError(f"{os.fspath(path)} holds a JSON {type(data).__name__}, not an object")
    return data


def pattern_key(patterns: Dict[str, Any], module_name: str) -> Optional[str]:
    """The first key of ``patterns`` matching ``module_name`` as PEFT's rank_pattern does, or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None

