"""inject_cflora on tiny Llama / Qwen2 / GPT-2 (Conv1D): names kept, base frozen, no-op at init, errors;
CFLoRALinear math against a float64 formula; gradients reach exactly the trainable parameters."""

from __future__ import annotations

import pytest
import torch
from cflora_models import MODELS, logits_of, model_inputs, tiny_gpt2, tiny_llama
from transformers.pytorch_utils import Conv1D

from rellax_fast.cflora import (
    CFLoRAConfig,
    CFLoRALinear,
    cflora_condition,
    cflora_layers,
    cflora_trainable_parameters,
    inject_cflora,
    set_cflora_backend,
)
from rellax_fast.ops import BackendUnavailableError

ADAPTER_KEYS = ("lora_A", "lora_B", ".interaction.")


def _is_adapter_key(key: str) -> bool:
    return any(k in key for k in ADAPTER_KEYS)


@pytest.mark.parametrize("interaction", ["identity", "full"])
def test_fresh_adapter_is_a_noop_and_keeps_names(tiny_model_name, interaction):
    factory, targets = MODELS[tiny_model_name]
    model = factory()
    inputs = model_inputs()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_params = dict(model.named_parameters())
    with torch.no_grad():
        expected = logits_of(model, inputs)
    config = CFLoRAConfig(r=4, alpha=8, target_modules=targets, interaction=interaction, cond_dim=6)
    assert inject_cflora(model, config) is model
    layers = cflora_layers(model)
    assert len(layers) == 2 * len(targets) or tiny_model_name == "gpt2"  # 2 decoder layers
    assert all(name.rsplit(".", 1)[-1] in targets for name, _ in layers)
    # the base Parameters are the very same objects under the same names
    for name, p in model.named_parameters():
        if not _is_adapter_key(name):
            assert p is base_params[name]
    # the base state dict still loads: nothing unexpected, only adapter tensors missing
    result = model.load_state_dict(base_state, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(_is_adapter_key(k) for k in result.missing_keys)
    # frozen base, trainable adapter
    for name, p in model.named_parameters():
        assert p.requires_grad == _is_adapter_key(name), name
    trainable, total = cflora_trainable_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if _is_adapter_key(n))
    assert total == sum(v.numel() for k, v in base_state.items() if k in base_params) + trainable
    with torch.no_grad(), cflora_condition(model, torch.randn(inputs["input_ids"].shape[0], 6)):
        got = logits_of(model, inputs)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


def test_gpt2_conv1d_weight_is_not_copied():
    model = tiny_gpt2()
    conv = model.transformer.h[0].attn.c_attn
    assert isinstance(conv, Conv1D)
    weight = conv.weight
    inject_cflora(model, CFLoRAConfig(r=4, target_modules=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, CFLoRALinear) and layer.fan_in_fan_out
    assert layer.weight is weight and layer.weight_out_in().data_ptr() == weight.data_ptr()
    assert (layer.in_features, layer.out_features) == (32, 96)
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (96, 4)


def test_regex_targets_and_trainable_flags():
    model = tiny_llama()
    cfg = CFLoRAConfig(
        r=4,
        target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj",
        interaction="full",
        cond_dim=3,
        train_lora=False,
    )
    inject_cflora(model, cfg)
    assert [n for n, _ in cflora_layers(model)] == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    for _, layer in cflora_layers(model):
        assert not layer.lora_A.requires_grad and not layer.lora_B.requires_grad
        assert all(p.requires_grad for p in layer.interaction.parameters())


def test_inject_errors():
    model = tiny_llama()
    with pytest.raises(TypeError, match=r"inject_cflora: model must be a torch.nn.Module .*; got str"):
        inject_cflora("gpt2", CFLoRAConfig(r=4))
    with pytest.raises(ValueError, match=r"CFLoRAConfig.target_modules: 'q_proj\(\(' is not a valid regex"):
        CFLoRAConfig(r=4, target_modules="q_proj((")
    with pytest.raises(ValueError, match="matches no nn.Linear/Conv1D module.*q_proj"):
        inject_cflora(model, CFLoRAConfig(r=4, target_modules=["query"]))
    with pytest.raises(
        ValueError, match=r"k_proj \(r=3.*n_experts to divide r"
    ):  # q_proj built, k_proj fails
        inject_cflora(
            model,
            CFLoRAConfig(
                r=4,
                target_modules=["q_proj", "k_proj"],
                interaction="moe",
                cond_dim=3,
                n_experts=2,
                rank_pattern={"k_proj": 3},
            ),
        )
    assert not cflora_layers(model)  # a failed injection leaves the model untouched
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="cannot wrap.*LlamaAttention"):
        inject_cflora(model, CFLoRAConfig(r=4, target_modules=["self_attn"]))
    with pytest.raises(TypeError, match="CFLoRAConfig"):
        inject_cflora(model, {"r": 4})
    inject_cflora(model, CFLoRAConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="injecting twice"):
        inject_cflora(model, CFLoRAConfig(r=4, target_modules=["v_proj"]))


def _formula_f64(layer: CFLoRALinear, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    w = layer.weight_out_in().double()
    y = x.double() @ w.T + (layer.bias.double() if layer.bias is not None else 0)
    s = x.double() @ layer.lora_A.double().T
    if c is None:
        t = s
    elif c.dim() == 2:
        t = s @ c.double().T
    else:
        t = torch.einsum("btr,bqr->btq", s, c.double())
    return y + layer.scale * t @ layer.lora_B.double().T


@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
@pytest.mark.parametrize("interaction", ["identity", "static", "full", "moe", "recrank1"])
def test_layer_matches_float64_formula(base_kind, interaction):
    d_in, d_out = 13, 11
    base = torch.nn.Linear(d_in, d_out) if base_kind == "linear" else Conv1D(d_out, d_in)
    if base_kind == "conv1d":
        torch.nn.init.normal_(base.weight)
        torch.nn.init.normal_(base.bias)
    cfg = CFLoRAConfig(
        r=4,
        alpha=6,
        interaction=interaction,
        cond_dim=5,
        n_experts=2,
        init_lora="random",
        generator_init_std=0.3,
        target_modules=["x"],
    )
    layer = CFLoRALinear(base, cfg, name="x")
    if layer.interaction is not None:
        with torch.no_grad():
            for p in layer.interaction.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(3, 7, d_in)
    cond = torch.randn(3, 5)
    layer._cflora_slot = None
    from rellax_fast.cflora.layers import ConditionSlot

    layer._cflora_slot = ConditionSlot(cond)
    c = layer.interaction_matrix(3)
    got = layer(x)
    torch.testing.assert_close(got.double(), _formula_f64(layer, x, c), rtol=2e-5, atol=2e-5)
    # generate()-style expansion: every sample repeated twice, consecutively
    x2 = x.repeat_interleave(2, dim=0)
    got2 = layer(x2)
    torch.testing.assert_close(got2, got.repeat_interleave(2, dim=0), rtol=1e-5, atol=1e-5)
    if c is not None and c.dim() == 3:
        with pytest.raises(ValueError, match="input batch is 4 but cond has 3 rows"):
            layer(torch.randn(4, 7, d_in))


@pytest.mark.parametrize("interaction", ["identity", "static", "full", "moe", "recrank1"])
@pytest.mark.parametrize("train_lora, train_interaction", [(True, True), (False, True), (True, False)])
def test_gradients_reach_exactly_the_trainable_parameters(interaction, train_lora, train_interaction):
    model = tiny_llama()
    cfg = CFLoRAConfig(
        r=4,
        target_modules=["q_proj", "v_proj", "up_proj"],
        interaction=interaction,
        cond_dim=5,
        n_experts=2,
        init_lora="random",
        generator_init_std=0.2,
        train_lora=train_lora,
        train_interaction=train_interaction,
    )
    inject_cflora(model, cfg)
    if interaction == "identity" and not train_lora:
        assert cflora_trainable_parameters(model)[0] == 0  # nothing left to train
        return
    model.train()
    inputs = model_inputs()
    with cflora_condition(model, torch.randn(3, 5)):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    for name, p in model.named_parameters():
        is_lora = "lora_A" in name or "lora_B" in name
        is_interaction = ".interaction." in name
        should = (is_lora and train_lora) or (is_interaction and train_interaction)
        assert p.requires_grad == should, name
        if should:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert p.grad is None, f"{name} should be frozen but got a gradient"


def test_backend_switch():
    model = tiny_llama()
    inject_cflora(model, CFLoRAConfig(r=4, target_modules=["q_proj"], init_lora="random"))
    inputs = model_inputs()
    set_cflora_backend(model, "reference")
    assert all(layer.backend == "reference" for _, layer in cflora_layers(model))
    with torch.no_grad():
        ref = logits_of(model, inputs)
    set_cflora_backend(model, None)
    with torch.no_grad():
        auto = logits_of(model, inputs)
    torch.testing.assert_close(auto, ref, rtol=2e-5, atol=2e-5)
    if not torch.cuda.is_available():
        set_cflora_backend(model, "cuda")
        with pytest.raises(BackendUnavailableError, match="cuda"):
            logits_of(model, inputs)
    with pytest.raises(ValueError, match="backend must be"):
        set_cflora_backend(model, "fast")


def test_inject_logs_trainable_parameters(caplog):
    import logging

    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="rellax_fast.cflora"):
        inject_cflora(model, CFLoRAConfig(r=4, target_modules=["q_proj"]))
    trainable, total = cflora_trainable_parameters(model)
    assert trainable == 2 * (4 * 32 + 32 * 4)  # two layers of A (4x32) and B (32x4)
    assert f"trainable params {trainable} || all params {total}" in caplog.text


def test_bf16_model_trains_in_bf16():
    model = tiny_llama().to(torch.bfloat16)
    inject_cflora(
        model,
        CFLoRAConfig(
            r=4,
            target_modules=["q_proj", "down_proj"],
            interaction="moe",
            cond_dim=3,
            n_experts=2,
            init_lora="random",
        ),
    )
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model.train()
    inputs = model_inputs()
    with cflora_condition(model, torch.randn(3, 3)):  # float32 cond is cast to the generator's dtype
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(
        p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad
    )
