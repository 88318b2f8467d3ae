"""The ReLLaX model wrapper: any Hugging Face backbone + CFLoRA + SPA soft tokens + a yes/no read-out.

``ReLLaXModel.forward(batch)`` returns the 2-way logits ``[No, Yes]`` per sample; p(click) is their
softmax's second column. The pieces:

* the backbone's input embeddings are looked up, then the SPA projector's outputs replace them at the
  placeholder positions (``spa.soft_tokens.insert_soft_tokens``) and the backbone runs on ``inputs_embeds``;
* CFLoRA layers (``rellax_fast.cflora``) wrap the attention projections; their per-sample interaction is
  generated from the frozen DIN's pre-logit vector h (standardised with train-split statistics), fed
  through ``cflora_condition``;
* read-out:
  - causal LMs (Llama, Qwen2, GPT-2, ...): the final hidden state at ``answer_index`` (the position whose
    next-token distribution is the answer) times the output-embedding rows of the "No"/"Yes" tokens, i.e.
    exactly the LM head's logits for those two tokens, without the full-vocabulary projection;
  - encoder LMs (the default MiniLM): a verbaliser on the [MASK] slot. The offline all-MiniLM-L6-v2
    checkpoint ships no MLM head (it is a sentence-transformers ``BertModel``), so the output layer is the
    tied word-embedding matrix: ``logit_{no,yes} = h_mask · E[no,yes] + b`` with a trainable 2-vector b.
* ``readout="residual"`` (an option beyond the paper; ``"paper"`` is the default): the LM learns a correction
  to the frozen DIN instead of re-learning it, p(click) = σ((logit_Yes − logit_No) + λ·DIN_logit), where
  DIN_logit = w·h + b is the frozen DIN's own output layer applied to the (raw) conditioning vector h of the
  batch, and λ is learned (init 1) or fixed at 1 (``readout_lambda``). With ``readout_gate`` (the default)
  the LM's margin enters through a learned scalar gate g initialised at 0 (ReZero-style, like LoRA's zero
  B): p = σ(g·(logit_Yes − logit_No) + λ·DIN_logit), so the untrained model *is* the frozen DIN, and the
  trainer scores that starting point on the valid set as a selection candidate (``select_from_start``):
  the model kept is never worse than DIN on valid. Without the gate the backbone's untrained margin (a
  per-sample value of a few logits on MiniLM) is added from the first step, i.e. DIN plus noise.
  ``forward`` still returns 2-way logits: λ·DIN_logit is added to the Yes column, so the softmax, the loss
  and ``click_probability`` are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from ..cflora.config import CFLoRAConfig

DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
}


def default_target_modules(model_type: str) -> List[str]:
    return list(DEFAULT_TARGETS.get(model_type, ["q_proj", "v_proj"]))


def backbone_kind(config) -> str:
    """'causal' or 'encoder' from a transformers config."""
    archs = " ".join(getattr(config, "architectures", None) or [])
    if getattr(config, "is_decoder", False) or "CausalLM" in archs or "LMHeadModel" in archs:
        return "causal"
    if config.model_type in ("gpt2", "llama", "qwen2", "mistral", "gpt_neox", "opt", "phi", "gemma", "qwen3"):
        return "causal"
    return "encoder"


def load_backbone(path: str, kind: str = "auto", dtype: Optional[torch.dtype] = None):
    """Load a local HF model for ReLLaX: ``AutoModelForCausalLM`` (causal) or ``AutoModel`` (encoder)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    kind = backbone_kind(config) if kind == "auto" else kind
    if kind not in ("causal", "encoder"):
        raise ValueError(f"kind must be 'auto', 'causal' or 'encoder', got {kind!r}")
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    kw = {"dtype": dtype} if dtype is not None else {}
    return cls.from_pretrained(path, **kw), kind


# ReLLaXOptions().cflora's target_modules meaning "the backbone's own attention projections"
# (default_target_modules of its model_type); ReLLaXModel resolves it. A CFLoRAConfig accepts it as a regex,
# which no module name matches, so a config that skipped ReLLaXModel fails loudly in inject_cflora.
PER_ARCHITECTURE = "per-architecture"
# the adapter settings a ReLLaXModel uses when ReLLaXOptions.cflora leaves them out (other CFLoRAConfig
# fields keep CFLoRAConfig's own defaults)
RELLAX_CFLORA_DEFAULTS: Dict[str, Any] = {
    "r": 8,
    "alpha": 16.0,
    "dropout": 0.05,
    "interaction": "full",
    "n_experts": 4,
    "target_modules": PER_ARCHITECTURE,
}


@dataclass
class ReLLaXOptions:
    """What the wrapper adds to the backbone (CFLoRA, SPA, conditioning, read-out).

    ``cflora`` is the adapter's configuration, one object from the command line to the saved run:

    * a ``CFLoRAConfig``, used as given, except that ``target_modules == PER_ARCHITECTURE`` becomes the
      backbone's q and v projections and ``cond_dim`` is checked against (or, if None, filled from) the
      model's ``cond_dim`` (the CTR model's h size); ``cond_dim`` is dropped for unconditioned interactions;
    * a dict of CFLoRAConfig fields: :data:`RELLAX_CFLORA_DEFAULTS` updated with it, completed as above;
    * None: :data:`RELLAX_CFLORA_DEFAULTS`.
    """

    cflora: Union[CFLoRAConfig, Dict[str, Any], None] = None
    use_spa: bool = True
    gradient_checkpointing: bool = False
    readout: str = "paper"  # paper: softmax([No, Yes]); residual: + lambda * the frozen DIN's logit
    readout_lambda: str = "learned"  # residual read-out: lambda learned (init 1) or fixed at 1
    # residual read-out: the LM's margin through a learned gate initialised at 0 (the model starts as DIN);
    # False: added ungated from the first step (the first residual runs; old run folders load that way)
    readout_gate: bool = True
    extra: Dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.cflora is None or isinstance(self.cflora, (CFLoRAConfig, dict))):
            raise TypeError(
                f"ReLLaXOptions.cflora must be a CFLoRAConfig, a dict of its fields or None; "
                f"got {type(self.cflora).__name__}"
            )

    def cflora_settings(self) -> Dict[str, Any]:
        """The adapter settings before the model completes them: a dict of CFLoRAConfig fields."""
        if isinstance(self.cflora, CFLoRAConfig):
            return self.cflora.to_dict()
        return {**RELLAX_CFLORA_DEFAULTS, **(self.cflora or {})}

    def cflora_config(self, model_type: str, cond_dim: Optional[int]) -> CFLoRAConfig:
        """The CFLoRAConfig of a backbone of ``model_type`` conditioned on vectors of size ``cond_dim``: the
        per-architecture targets resolved, cond_dim checked / filled (ValueError on a mismatch). A complete
        CFLoRAConfig (``pipeline.variant_cflora_config``'s) is returned as given."""
        from rellax_fast.cflora.interaction import interaction_class

        if isinstance(self.cflora, CFLoRAConfig) and self.cflora.target_modules != PER_ARCHITECTURE:
            needs_cond = interaction_class(self.cflora.interaction).needs_cond
            if (self.cflora.cond_dim == cond_dim) if needs_cond else self.cflora.cond_dim is None:
                return self.cflora

        settings = self.cflora_settings()
        if settings.get("target_modules") == PER_ARCHITECTURE:
            settings["target_modules"] = default_target_modules(model_type)
        if interaction_class(settings.get("interaction", "identity")).needs_cond:
            own = settings.get("cond_dim")
            if own is not None and cond_dim is not None and own != cond_dim:
                raise ValueError(
                    f"ReLLaXOptions.cflora.cond_dim is {own} but the model's cond_dim (the CTR model's "
                    f"h size) is {cond_dim}"
                )
            if own is None and cond_dim is None:
                raise ValueError(
                    f"interaction {settings['interaction']!r} needs cond_dim (the CTR model's h size)"
                )
            settings["cond_dim"] = own if own is not None else cond_dim
        else:
            settings["cond_dim"] = None
        return CFLoRAConfig.from_dict(settings)


class ReLLaXModel(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        kind: str,
        yes_no_ids,
        options: ReLLaXOptions,
        item_table: Optional[torch.Tensor] = None,
        item_ids: Optional[torch.Tensor] = None,
        cond_dim: Optional[int] = None,
        cond_mean: Optional[torch.Tensor] = None,
        cond_std: Optional[torch.Tensor] = None,
        din_head: Optional[tuple] = None,
    ):
        super().__init__()
        from rellax_fast.cflora import inject_cflora

        from ..spa.projector import SPAProjector

        if kind not in ("causal", "encoder"):
            raise ValueError(f"kind must be 'causal' or 'encoder', got {kind!r}")
        self.kind = kind
        self.options = options
        self.backbone = backbone
        no_id, yes_id = (int(i) for i in yes_no_ids)
        self.register_buffer(
            "answer_token_ids", torch.tensor([no_id, yes_id], dtype=torch.long), persistent=False
        )
        model_type = getattr(backbone.config, "model_type", "")
        self.cflora_config = options.cflora_config(model_type, cond_dim)
        inject_cflora(backbone, self.cflora_config)  # freezes the base weights
        d_model = backbone.get_input_embeddings().weight.shape[1]
        if options.use_spa:
            if item_table is None or item_ids is None:
                raise ValueError("use_spa=True needs the CTR model's item_table and item_ids")
            self.projector = SPAProjector(item_table, d_model)
            lut = torch.full((int(item_ids.max()) + 2,), -1, dtype=torch.long)
            lut[item_ids.long()] = torch.arange(len(item_ids))
            self.register_buffer("item_lut", lut, persistent=True)
        else:
            self.projector = None
        if self.cflora_config.needs_cond:
            cond_dim = self.cflora_config.cond_dim
            self.register_buffer(
                "cond_mean", (cond_mean if cond_mean is not None else torch.zeros(cond_dim)).float().clone()
            )
            self.register_buffer(
                "cond_std", (cond_std if cond_std is not None else torch.ones(cond_dim)).float().clone()
            )
        self.verbaliser_bias = nn.Parameter(torch.zeros(2)) if kind == "encoder" else None
        self._init_readout(options, din_head, cond_dim)
        if options.gradient_checkpointing:
            if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5.x name
                backbone.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
            else:
                backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(backbone, "config"):
                backbone.config.use_cache = False

    def _init_readout(self, options: ReLLaXOptions, din_head, cond_dim) -> None:
        if options.readout not in ("paper", "residual"):
            raise ValueError(f"options.readout must be 'paper' or 'residual', got {options.readout!r}")
        if options.readout_lambda not in ("learned", "fixed"):
            raise ValueError(
                f"options.readout_lambda must be 'learned' or 'fixed', got {options.readout_lambda!r}"
            )
        if options.readout == "paper":
            return
        if din_head is None:
            raise ValueError(
                "readout='residual' needs din_head=(weight, bias): the frozen DIN's output layer (din.out)"
            )
        weight, bias = (torch.as_tensor(t).detach().float() for t in din_head)
        weight, bias = weight.reshape(-1), bias.reshape(-1)
        if bias.numel() != 1 or (cond_dim is not None and weight.numel() != cond_dim):
            raise ValueError(
                f"din_head: expected weight ({cond_dim},) and bias (1,) (DIN's output layer over h), got "
                f"{tuple(din_head[0].shape)} and {tuple(din_head[1].shape)}"
            )
        # frozen copies (persistent buffers: saved with the run, checked against the DIN by its fingerprint)
        self.register_buffer("din_out_weight", weight.clone())
        self.register_buffer("din_out_bias", bias.clone())
        if options.readout_lambda == "learned":
            self.readout_lambda = nn.Parameter(torch.ones(()))
        else:
            self.register_buffer("readout_lambda", torch.ones(()))
        if options.readout_gate:
            self.readout_gate = nn.Parameter(torch.zeros(()))

    @property
    def select_from_start(self) -> bool:
        """True when the untrained model is a meaningful candidate for model selection on valid: the gated
        residual read-out starts as the frozen DIN exactly, so the trainer scores step 0 too."""
        return self.options.readout == "residual" and bool(self.options.readout_gate)

    def din_logit(self, cond: torch.Tensor) -> torch.Tensor:
        """The frozen DIN's logit (B,) from its raw pre-logit vector h = ``batch['cond']``."""
        return cond.float() @ self.din_out_weight + self.din_out_bias

    # ------------------------------------------------------------------ pieces
    def _item_rows(self, placeholder_item_ids: torch.Tensor) -> torch.Tensor:
        valid = placeholder_item_ids >= 0
        ids = placeholder_item_ids.clamp(min=0, max=self.item_lut.shape[0] - 1)
        rows = torch.where(valid, self.item_lut[ids], -1)
        if bool(((rows < 0) & valid).any()) or bool((placeholder_item_ids >= self.item_lut.shape[0]).any()):
            raise KeyError("placeholder_item_ids hold item ids unknown to the CTR model's item table")
        return rows

    def input_embeddings(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The backbone's input embeddings with SPA soft tokens at the placeholder positions."""
        from ..spa.soft_tokens import insert_soft_tokens

        emb_layer = self.backbone.get_input_embeddings()
        input_ids = batch["input_ids"]
        mask = batch.get("placeholder_mask")
        if mask is not None and bool(mask.any()):
            # placeholder tokens may be added tokens beyond the embedding matrix: look up a safe id there
            input_ids = input_ids.masked_fill(mask.bool(), 0)
        embeds = emb_layer(input_ids)
        if self.projector is not None and mask is not None:
            rows = self._item_rows(batch["placeholder_item_ids"])
            embeds = insert_soft_tokens(embeds, mask, rows, self.projector)
        return embeds

    def condition(self, cond: torch.Tensor) -> torch.Tensor:
        return (cond.float() - self.cond_mean) / self.cond_std

    def _encode(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        embeds = self.input_embeddings(batch)
        base = self.backbone.base_model if self.kind == "causal" else self.backbone
        out = base(inputs_embeds=embeds, attention_mask=batch["attention_mask"], return_dict=True)
        return out.last_hidden_state

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """2-way logits (B, 2) = [No, Yes] at each sample's answer slot."""
        from rellax_fast.cflora import cflora_condition

        if self.cflora_config.needs_cond:
            if batch.get("cond") is None:
                raise ValueError(
                    f"interaction {self.cflora_config.interaction!r} needs batch['cond'] (B, cond_dim)"
                )
            with cflora_condition(self.backbone, self.condition(batch["cond"])):
                hidden = self._encode(batch)
        else:
            hidden = self._encode(batch)
        rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["answer_index"]]
        if self.kind == "causal":
            head = self.backbone.get_output_embeddings()
            w = head.weight[self.answer_token_ids]
            logits = rows.to(w.dtype) @ w.t()
            if getattr(head, "bias", None) is not None:
                logits = logits + head.bias[self.answer_token_ids]
        else:
            w = self.backbone.get_input_embeddings().weight[self.answer_token_ids]
            logits = rows.to(w.dtype) @ w.t() + self.verbaliser_bias.to(w.dtype)
        logits = logits.float()
        if self.options.readout == "residual":
            if batch.get("cond") is None:
                raise ValueError(
                    "readout='residual' needs batch['cond'] (B, cond_dim): the DIN's h, for its logit"
                )
            shift = self.readout_lambda * self.din_logit(batch["cond"])
            if self.options.readout_gate:
                logits = logits * self.readout_gate
            logits = torch.stack([logits[:, 0], logits[:, 1] + shift], dim=1)
        return logits

    # ------------------------------------------------------------------ trainable state
    def trainable_state(self) -> Dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def set_stage(self, stage: Union[str, None]) -> None:
        """'joint' (A, B, generators, projector, bias), 'lora' (stage 1: A, B, bias) or 'interaction'
        (stage 2: generators, projector, bias; A and B frozen)."""
        from rellax_fast.cflora import cflora_layers

        for _, layer in cflora_layers(self.backbone):
            lora = stage in ("joint", "lora", None)
            layer.lora_A.requires_grad_(lora)
            layer.lora_B.requires_grad_(lora)
            if layer.interaction is not None:
                for p in layer.interaction.parameters():
                    p.requires_grad_(stage in ("joint", "interaction", None))
        if self.projector is not None:
            for p in self.projector.parameters():
                p.requires_grad_(stage in ("joint", "interaction", None))


def click_probability(logits: torch.Tensor) -> torch.Tensor:
    """p(click) = softmax([No, Yes])[Yes]."""
    return torch.softmax(logits.float(), dim=-1)[:, 1]
