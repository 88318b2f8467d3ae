"""The models of ``rellax-fast bench e2e``: the size table and the builders every provider starts from.

Owns :class:`E2ESize` / :data:`SIZES` (model shape and workload of each ``--size``), the adapter targets
(:data:`TARGET_MODULES`, every attention and MLP projection of a Llama layer: the TALLRec/ReLLa recipe),
the frozen random-weight base model and the CFLoRA and PEFT LoRA copies made from it. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, Optional, Tuple

# Every projection of a Llama layer (the TALLRec/ReLLa fine-tuning recipe), not the per-model-type default of
# `rellax-fast train` (train.model.DEFAULT_TARGETS: attention query/value, or GPT-2's fused c_attn): the bench
# measures the heaviest adapter placement.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIZE_ALIASES = {"cpu": "tiny", "gpu": "1b"}


@dataclasses.dataclass(frozen=True)
class E2ESize:
    """Model shape and workload of one ``--size``."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    train_batch: int
    seq: int
    infer_batches: Tuple[int, ...]
    prompt: int
    r: int = 16
    alpha: float = 32.0
    lora_dropout: float = 0.05
    cond_dim: int = 64


SIZES: Dict[str, E2ESize] = {
    "tiny": E2ESize(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=172, vocab=256, train_batch=2,
                    seq=64, infer_batches=(1, 4), prompt=32),
    "1b": E2ESize(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=5632, vocab=32000, train_batch=8,
                  seq=512, infer_batches=(1, 32), prompt=512),
    "7b-layer": E2ESize(hidden=4096, layers=2, heads=32, kv_heads=32, intermediate=11008, vocab=32000,
                        train_batch=8, seq=512, infer_batches=(1, 32), prompt=512),
}


def resolve_size(size: str) -> str:
    size = SIZE_ALIASES.get(size, size)
    if size not in SIZES:
        raise ValueError(f"bench e2e: --size must be one of tiny, 1b, 7b-layer, cpu, gpu; got {size!r}")
    return size


def build_base_model(spec: E2ESize, device, dtype):
    """A frozen random-weight ``LlamaForCausalLM`` of ``spec``'s shape on ``device`` in ``dtype``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=max(spec.seq, spec.prompt) + 16,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the bench dtype on the device (no fp32 copy)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model


def cflora_model(base, spec: E2ESize, interaction: str, backend: Optional[str], device, dtype):
    from rellax_fast.cflora import CFLoRAConfig, inject_cflora
    from rellax_fast.cflora.interaction import INTERACTIONS

    model = copy.deepcopy(base)
    config = CFLoRAConfig(
        r=spec.r, alpha=spec.alpha, dropout=spec.lora_dropout, target_modules=list(TARGET_MODULES),
        interaction=interaction, cond_dim=spec.cond_dim if INTERACTIONS[interaction].needs_cond else None, backend=backend,
    )
    inject_cflora(model, config)
    return model.to(device=device, dtype=dtype)


def peft_model(base, spec: E2ESize, device, dtype, patched: bool = False):
    """PEFT LoRA on a copy of ``base``; ``patched``: with :func:`rellax_fast.cflora.apply_cflora` (fused op)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.lora_dropout,
                        target_modules=list(TARGET_MODULES), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)
    model = model.to(device=device, dtype=dtype)
    if patched:
        from rellax_fast.cflora import apply_cflora

        apply_cflora(model)
    return model


def resolved_backend(device, backend: Optional[str]) -> str:
    from rellax_fast.ops import resolve

    try:
        return resolve("cflora_linear", device, backend)
    except Exception as exc:  # reported in the row's note, the run itself raises the same error
        return f"unavailable ({exc})"
