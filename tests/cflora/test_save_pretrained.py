"""``model.save_pretrained`` on an injected model (issue #25.2): it writes the base model with no adapter
tensors and the adapter files beside it, so ``from_pretrained`` + ``load_cflora`` gives the adapted model's
outputs exactly; a merged adapter is refused rather than saved half; ``unload`` and ``deepcopy`` behave."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from cflora_models import model_inputs, randomise_adapter, tiny_llama
from safetensors.torch import load_file

from rellax_fast.cflora import CFLoRAConfig, inject_cflora, load_cflora, merge_cflora, unload, unmerge_cflora
from rellax_fast.cflora.persistence import CONFIG_NAME, WEIGHTS_NAME

COND = 5


def _adapted(**kw):
    config = CFLoRAConfig(
        r=4,
        alpha=8,
        target_modules=["q_proj", "v_proj"],
        interaction="full",
        cond_dim=COND,
        modules_to_save=["lm_head"],
        **kw,
    )
    model = inject_cflora(tiny_llama(), config)
    randomise_adapter(model)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)  # the trained copy of the module to save differs from the original
    return model


def test_save_pretrained_then_from_pretrained_and_load_cflora_restores_the_adapter(tmp_path):
    from transformers import LlamaForCausalLM

    model = _adapted()
    inputs, cond = model_inputs(), torch.randn(3, COND)
    with torch.no_grad():
        expected = model(**inputs, cflora_cond=cond).logits
        base = tiny_llama()(**inputs).logits
    model.save_pretrained(tmp_path)
    assert {CONFIG_NAME, WEIGHTS_NAME, "config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    # the model file is the base model: its keys and values, the original head, no adapter tensors
    saved = load_file(tmp_path / "model.safetensors")
    reference = tiny_llama().state_dict()
    assert set(saved) == set(reference)
    for key, value in reference.items():
        assert torch.equal(saved[key], value), key
    reloaded, info = LlamaForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**inputs).logits, base)
        load_cflora(reloaded, tmp_path)
        assert torch.equal(reloaded(**inputs, cflora_cond=cond).logits, expected)


def test_save_pretrained_refuses_a_merged_adapter_and_unload_restores_the_plain_method(tmp_path):
    model = inject_cflora(
        tiny_llama(), CFLoRAConfig(r=4, alpha=8, target_modules=["q_proj"], interaction="static")
    )
    randomise_adapter(model)
    merge_cflora(model)
    with pytest.raises(
        RuntimeError, match=r"save_pretrained: .*merged into W.*merge_and_unload.*unmerge_cflora"
    ):
        model.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    unmerge_cflora(model)
    unload(model)
    assert "save_pretrained" not in model.__dict__
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / CONFIG_NAME).exists()


def test_save_pretrained_of_a_deepcopy_saves_the_copy(tmp_path):
    model = _adapted()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[0].self_attn.q_proj.lora_B.add_(1.0)
    twin.save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert torch.equal(
        saved["model.layers.0.self_attn.q_proj.lora_B"], twin.model.layers[0].self_attn.q_proj.lora_B
    )
    assert not torch.equal(
        saved["model.layers.0.self_attn.q_proj.lora_B"], model.model.layers[0].self_attn.q_proj.lora_B
    )
