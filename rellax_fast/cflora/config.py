"""CFLoRAConfig: the adapter's hyper-parameters, validation and JSON round-trip.

The config is modelled on PEFT's ``LoraConfig`` (r, alpha, dropout, target_modules) plus the CFLoRA
parts: which constraint the r x r interaction matrix C obeys, the conditioning size and the generator.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import InitVar, dataclass, field
from typing import Any, Dict, List, Optional, Union

from .._io import atomic_write_bytes
from ..ops._backend import BACKEND_CHOICES
from .interaction import interaction_class

LORA_INITS = ("kaiming", "gaussian", "random")
# target_modules value meaning every nn.Linear / Conv1D except the output head (PEFT's "all-linear")
ALL_LINEAR = "all-linear"
# The "format" tag of a saved config. What each version means (rules enforced by persistence.read_cflora):
# - 1: written before adapters carried a content hash; never held content_sha256 nor the fields version 2 added.
#   Its content cannot be verified, so an adapter directory of format 1 loads only on explicit request
#   (load_cflora(..., allow_unverified=True)); one holding a hash or a version-2 field is refused as relabelled.
# - 2: adds exclude_modules, rank/alpha_pattern, modules_to_save and, in an adapter directory, the mandatory
#   content_sha256 of the config and tensors (a missing hash is an error).
FORMAT_PREFIX = "rellax-fast-cflora/"
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
# the config fields that format 2 added (a format-1 file never holds them)
FORMAT_2_FIELDS = ("exclude_modules", "rank_pattern", "alpha_pattern", "modules_to_save")
# keys of the saved JSON that describe the file, not the config
METADATA_KEYS = ("format", "content_sha256")
# PEFT LoraConfig names that CFLoRAConfig accepts at construction, and the field each one sets (mapped in one
# place, CFLoRAConfig.__post_init__; the config stores and saves only its own names)
PEFT_ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init_lora"}
# PEFT's init_lora_weights values that init_lora represents (PEFT's other schemes - pissa, olora, loftq, ... - not)
PEFT_INIT_LORA = (("kaiming", True), ("gaussian", "gaussian"), ("random", False))


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


def _is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_names_or_regex(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, list) and bool(value) and all(isinstance(t, str) and t for t in value)


@dataclass
class CFLoRAConfig:
    r"""Hyper-parameters of a CFLoRA adapter: ``y = x Wᵀ + b + (alpha/r)·((drop(x) Aᵀ) C_uᵀ) Bᵀ``.

    Args:
        r: LoRA rank.
        alpha: scaling numerator; the LoRA path is scaled by ``alpha / r`` (as in PEFT without rsLoRA). The
            default is PEFT's (``lora_alpha=8``), so at the default r=8 the scale is 1, as in PEFT, and a
            ``LoraConfig`` ported field by field keeps its scale. (The ReLLaX pipeline sets its own alpha=16,
            ``train.model.RELLAX_CFLORA_DEFAULTS``, which its measured results used.) A finite number > 0.
        dropout: dropout probability on the LoRA path's input (training mode only), in [0, 1).
        target_modules: module-name suffixes (PEFT semantics: a module matches when its full name equals
            an entry or ends with ``"." + entry``), one regex string that must match the full name, or
            ``"all-linear"``: every nn.Linear / Conv1D except the output head, as PEFT: the output embeddings
            (``get_output_embeddings()``), or else a classification head named ``score`` / ``classifier``
            (add it to ``modules_to_save`` to train it in full).
        exclude_modules: modules never wrapped, even when target_modules matches them (suffixes or a regex,
            as target_modules).
        layers_to_transform: PEFT's field: only modules inside these transformer layers are wrapped (an int
            or a list of ints; None: every layer). A module's layer index is the number after
            ``layers_pattern`` in its name (``model.layers.27.self_attn.q_proj`` is in layer 27); a module
            with no such number is not wrapped. Used with a list of suffixes or ``"all-linear"``, not with a
            regex (PEFT refuses that too; a regex can name the layers itself); with ``"all-linear"``
            (which PEFT refuses) it wraps every linear module of those layers. ``adapters only in the top N
            layers`` is ``list(range(L - N, L))``: the backward then stops at layer L - N unless something
            below trains (SPA's soft tokens enter at the embeddings, so their gradient still crosses every
            layer).
        layers_pattern: PEFT's field: the name (or names) of the module list holding the layers, e.g.
            ``"layers"`` or ``"h"``; None: any ``<name>.<index>.`` in the module name (PEFT's default).
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
        lora_alpha, lora_dropout, init_lora_weights: PEFT's names, accepted as aliases of ``alpha``,
            ``dropout`` and ``init_lora`` (``init_lora_weights=True`` is "kaiming", ``"gaussian"`` is
            "gaussian", ``False`` is "random"; PEFT's other schemes are refused). Construction only: the
            config keeps, prints and saves its own names. Giving a field and its alias with different
            values is a TypeError, except where the field is given its default value: a dataclass cannot
            tell that from a field left out, so the alias sets it.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: Union[List[str], str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude_modules: Optional[Union[List[str], str]] = None
    layers_to_transform: Optional[Union[List[int], int]] = None
    layers_pattern: Optional[Union[List[str], str]] = None
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
    lora_alpha: InitVar[Optional[float]] = None
    lora_dropout: InitVar[Optional[float]] = None
    init_lora_weights: InitVar[Union[bool, str, None]] = None

    def __post_init__(
        self,
        lora_alpha: Optional[float] = None,
        lora_dropout: Optional[float] = None,
        init_lora_weights: Union[bool, str, None] = None,
    ) -> None:
        self._apply_peft_aliases(
            {"lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "init_lora_weights": init_lora_weights}
        )
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            if isinstance(getattr(self, name), (tuple, set)):
                setattr(
                    self,
                    name,
                    sorted(getattr(self, name))
                    if isinstance(getattr(self, name), set)
                    else list(getattr(self, name)),
                )
        if isinstance(self.layers_to_transform, (tuple, range)):
            self.layers_to_transform = list(self.layers_to_transform)
        self.validate()

    def _apply_peft_aliases(self, given: Dict[str, Any]) -> None:
        """Set each field from its PEFT alias in ``given`` (None: not given); see :data:`PEFT_ALIASES`."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for alias, value in given.items():
            if value is None:
                continue
            name = PEFT_ALIASES[alias]
            if name == "init_lora":
                matches = [
                    ours for ours, peft in PEFT_INIT_LORA if type(value) is type(peft) and value == peft
                ]
                if not matches:
                    supported = ", ".join(repr(peft) for _, peft in PEFT_INIT_LORA)
                    raise ValueError(
                        f"CFLoRAConfig.init_lora_weights (PEFT's name for init_lora) must be one of "
                        f"{supported}; got {value!r}"
                    )
                value = matches[0]
            current = getattr(self, name)
            if current != defaults[name] and current != value:
                raise TypeError(
                    f"CFLoRAConfig: {alias}={value!r} and {name}={current!r} disagree; {alias} is PEFT's "
                    f"name for {name}, give one of them"
                )
            setattr(self, name, value)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the field, the expected value and what was given, for any bad setting."""
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"CFLoRAConfig.r must be a positive int; got {self.r!r}")
        if not (_is_finite_number(self.alpha) and self.alpha > 0):
            raise ValueError(f"CFLoRAConfig.alpha must be a finite number > 0; got {self.alpha!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(
                f"CFLoRAConfig: the scale alpha/r = {self.alpha!r}/{self.r} = {self.scale!r} must be "
                "finite and > 0"
            )
        if not (_is_finite_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"CFLoRAConfig.dropout must be a number in [0, 1); got {self.dropout!r}")
        self._validate_targets()
        self._validate_patterns()
        self._validate_generator()
        if self.init_lora not in LORA_INITS:
            raise ValueError(
                f"CFLoRAConfig.init_lora must be one of {', '.join(LORA_INITS)}; got {self.init_lora!r}"
            )
        for name in ("train_lora", "train_interaction"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"CFLoRAConfig.{name} must be a bool (true/false); got {getattr(self, name)!r}"
                )
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(
                f"CFLoRAConfig.backend must be None or one of {', '.join(BACKEND_CHOICES[1:])}; got {self.backend!r}"
            )

    def _validate_targets(self) -> None:
        tm = self.target_modules
        if isinstance(tm, str):
            if not tm:
                raise ValueError("CFLoRAConfig.target_modules must not be an empty regex")
            try:
                re.compile(tm)
            except re.error as exc:
                raise ValueError(
                    f"CFLoRAConfig.target_modules: {tm!r} is not a valid regex ({exc})"
                ) from None
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
        self._validate_layers()

    def _validate_layers(self) -> None:
        layers, pattern = self.layers_to_transform, self.layers_pattern
        if layers is not None:
            index_list = isinstance(layers, list) and layers and all(_is_index(i) for i in layers)
            if not (_is_index(layers) or index_list):
                raise ValueError(
                    "CFLoRAConfig.layers_to_transform must be None, an int >= 0 or a non-empty list of ints "
                    f">= 0; got {layers!r}"
                )
            if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
                raise ValueError(
                    "CFLoRAConfig.layers_to_transform cannot be used when target_modules is a regex "
                    f"({self.target_modules!r}); give module-name suffixes or 'all-linear', or name the "
                    "layers in the regex"
                )
        if pattern is not None:
            if layers is None:
                raise ValueError(
                    f"CFLoRAConfig.layers_pattern ({pattern!r}) needs layers_to_transform; got None"
                )
            if not _is_names_or_regex(pattern):
                raise ValueError(
                    "CFLoRAConfig.layers_pattern must be None, a module-list name or a non-empty list of "
                    f"them; got {pattern!r}"
                )

    def in_transformed_layer(self, module_name: str) -> bool:
        """Whether ``module_name`` lies in a layer of ``layers_to_transform`` (always true when it is None);
        PEFT's rule (``peft.tuners.tuners_utils.check_target_module_exists``)."""
        if self.layers_to_transform is None:
            return True
        patterns = self.layers_pattern
        patterns = [patterns] if isinstance(patterns, str) else patterns
        regexes = [r".*\.[^.]*\.(\d+)\."] if not patterns else [rf".*\.{p}\.(\d+)\." for p in patterns]
        for regex in regexes:
            found = re.match(regex, module_name)
            if found is not None:
                index = int(found.group(1))
                wanted = self.layers_to_transform
                return index == wanted if isinstance(wanted, int) else index in wanted
        return False

    def _validate_patterns(self) -> None:
        for name, kind in (("rank_pattern", "a positive int"), ("alpha_pattern", "a finite number > 0")):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                raise ValueError(f"CFLoRAConfig.{name} must be a dict {{pattern: value}}; got {pattern!r}")
            for key, value in pattern.items():
                ok = (
                    (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
                    if name == "rank_pattern"
                    else (_is_finite_number(value) and value > 0)
                )
                if not (isinstance(key, str) and key and ok):
                    raise ValueError(
                        f"CFLoRAConfig.{name} maps module-name patterns to {kind}; got {key!r}: {value!r}"
                    )
                try:
                    re.compile(key)
                except re.error as exc:
                    raise ValueError(f"CFLoRAConfig.{name}: {key!r} is not a valid regex ({exc})") from None

    def _validate_generator(self) -> None:
        # the kind's own checks (cond_dim for conditioned kinds, n_experts for moe / recrank1, ...)
        interaction_class(self.interaction).check_config(self)
        for name in ("cond_dim", "generator_hidden"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, int) and not isinstance(value, bool) and value >= 1
            ):
                raise ValueError(f"CFLoRAConfig.{name} must be a positive int or None; got {value!r}")
        if not (
            isinstance(self.n_experts, int) and not isinstance(self.n_experts, bool) and self.n_experts >= 1
        ):
            raise ValueError(f"CFLoRAConfig.n_experts must be a positive int; got {self.n_experts!r}")
        if not (_is_finite_number(self.generator_init_std) and self.generator_init_std >= 0.0):
            raise ValueError(
                f"CFLoRAConfig.generator_init_std must be a finite number >= 0; got "
                f"{self.generator_init_std!r}"
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
        return json.dumps(
            {"format": f"{FORMAT_PREFIX}{FORMAT_VERSION}", **self.to_dict()}, indent=2, sort_keys=True
        )

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
        raise AdapterFileError(
            f"{os.fspath(path)} is not valid JSON (truncated or corrupted?): {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise AdapterFileError(f"{os.fspath(path)} holds a JSON {type(data).__name__}, not an object")
    return data


def pattern_key(patterns: Dict[str, Any], module_name: str) -> Optional[str]:
    """The first key of ``patterns`` matching ``module_name`` as PEFT's rank_pattern does, or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None
