"""PEFT's ``layers_to_transform`` / ``layers_pattern`` on CFLoRAConfig (issue #24 item 3: adapters only in the top
N layers of a deep causal LM): the same modules as PEFT wraps, the backward stopping below the lowest adapted
layer, exact-name saves, clear errors, and the pipeline's ``--adapter-layers``."""

from __future__ import annotations

import argparse

import pytest
import torch
from cflora_models import model_inputs, randomise_adapter, tiny_gpt2, tiny_llama

from rellax_fast.cflora import CFLoRAConfig, cflora_layers, inject_cflora, load_cflora, save_cflora


def _peft_names(model, **kw):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **kw))
    return sorted(
        n.removeprefix("base_model.model.").removesuffix(".lora_A")
        for n, m in peft_model.named_modules()
        if n.endswith(".lora_A")
    )


def _ours(model, **kw):
    inject_cflora(model, CFLoRAConfig(r=4, alpha=8, **kw))
    return sorted(n for n, _ in cflora_layers(model))


@pytest.mark.parametrize(
    "factory, kw",
    [
        (tiny_llama, {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1, 3]}),
        (tiny_llama, {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 2}),
        (tiny_llama, {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "layers"}),
        (tiny_llama, {"target_modules": "all-linear", "layers_to_transform": [2, 3]}),
        (tiny_gpt2, {"target_modules": ["c_attn"], "layers_to_transform": [1], "layers_pattern": ["h"]}),
    ],
)
def test_the_same_modules_as_peft(factory, kw):
    size = {"num_hidden_layers": 4} if factory is tiny_llama else {}
    # PEFT refuses "all-linear" with layers_to_transform; CFLoRA allows it (the top layers' every linear), so
    # PEFT is given the same modules by name
    peft_kw = dict(kw)
    if kw["target_modules"] == "all-linear":
        peft_kw["target_modules"] = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    want = _peft_names(factory(**size) if size else factory(), **peft_kw)
    got = _ours(factory(**size) if size else factory(), **kw)
    assert got == want and got  # PEFT's rule, module for module
    layers = kw["layers_to_transform"]
    layers = [layers] if isinstance(layers, int) else layers
    assert {int(n.split(".")[-3]) for n in got} <= set(layers)


def test_no_module_in_the_chosen_layers_names_the_fields():
    with pytest.raises(ValueError, match=r"layers_to_transform=\[7\]"):
        inject_cflora(tiny_llama(), CFLoRAConfig(layers_to_transform=[7]))
    with pytest.raises(ValueError, match="layers_pattern='blocks'"):
        inject_cflora(tiny_llama(), CFLoRAConfig(layers_to_transform=[0], layers_pattern="blocks"))


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"layers_to_transform": -1}, "layers_to_transform must be None, an int >= 0"),
        ({"layers_to_transform": []}, "got \\[\\]"),
        ({"layers_to_transform": [0, True]}, "non-empty list of ints"),
        ({"layers_to_transform": "0"}, "got '0'"),
        (
            {"layers_to_transform": [0], "target_modules": ".*q_proj"},
            "cannot be used when target_modules is a regex",
        ),
        ({"layers_pattern": "layers"}, "needs layers_to_transform"),
        ({"layers_to_transform": [0], "layers_pattern": ""}, "layers_pattern must be None"),
    ],
)
def test_bad_layer_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        CFLoRAConfig(**kw)


def test_a_range_is_kept_as_a_list():
    assert CFLoRAConfig(layers_to_transform=range(2, 4)).layers_to_transform == [2, 3]


def test_the_backward_stops_below_the_lowest_adapted_layer():
    """Adapters in the top 2 of 4 layers: layers 0-1 build no graph (their outputs need no grad), and the
    adapted layers' A and B get gradients."""
    model = tiny_llama(num_hidden_layers=4)
    inject_cflora(model, CFLoRAConfig(r=4, alpha=8, layers_to_transform=[2, 3]))
    randomise_adapter(model)
    needs_grad = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(
            lambda m, a, out, i=i: needs_grad.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out).requires_grad
            )
        )
    model(**model_inputs()).logits.float().square().mean().backward()
    assert needs_grad == {0: False, 1: False, 2: True, 3: True}
    for _, layer in cflora_layers(model):
        assert layer.lora_A.grad is not None and float(layer.lora_A.grad.abs().sum()) > 0


def test_save_and_load_wrap_the_same_layers(tmp_path):
    model = tiny_llama(num_hidden_layers=4)
    inject_cflora(model, CFLoRAConfig(r=4, alpha=8, layers_to_transform=[3]))
    randomise_adapter(model)
    save_cflora(model, tmp_path)
    fresh = load_cflora(tiny_llama(num_hidden_layers=4), tmp_path)
    assert [n for n, _ in cflora_layers(fresh)] == [n for n, _ in cflora_layers(model)]
    inputs = model_inputs()
    torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def _pipeline_args(*argv):
    from rellax_fast.train.args import add_model_arguments

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser.parse_args(list(argv))


def test_adapter_layers_flag_becomes_the_top_layers():
    from rellax_fast.train.args import pipeline_config
    from rellax_fast.train.pipeline import VariantSpec, variant_cflora_config

    cfg = pipeline_config(_pipeline_args("--adapter-layers", "3"))
    assert cfg.adapter_layers == 3
    got = variant_cflora_config(cfg, VariantSpec("x"), 5, "llama", 30)
    assert got.layers_to_transform == [27, 28, 29] and got.target_modules == ["q_proj", "v_proj"]
    assert (
        variant_cflora_config(
            pipeline_config(_pipeline_args()), VariantSpec("x"), 5, "llama", 30
        ).layers_to_transform
        is None
    )
    with pytest.raises(ValueError, match=r"--adapter-layers.*\(2\); got 3"):
        variant_cflora_config(cfg, VariantSpec("x"), 5, "llama", 2)
