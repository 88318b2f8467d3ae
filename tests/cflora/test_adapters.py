"""Several named adapters on one model (issue #25.7): add, switch, disable, delete, save/load per name, each
with its own config and per-sample conditioning; the adapter kept aside is untouched and out of the graph."""

from __future__ import annotations

import pytest
import torch
from cflora_models import logits_of, model_inputs, randomise_adapter, tiny_llama

from rellax_fast.cflora import (
    CFLoRAConfig,
    active_cflora_adapter,
    add_cflora_adapter,
    cflora_adapter_names,
    cflora_condition,
    cflora_layers,
    delete_cflora_adapter,
    disable_adapter,
    inject_cflora,
    load_cflora,
    save_cflora,
    set_cflora_adapter,
    unload,
)

FIRST = CFLoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], interaction="full", cond_dim=5)
SECOND = CFLoRAConfig(
    r=2,
    alpha=4,
    target_modules=["q_proj", "down_proj"],
    interaction="moe",
    cond_dim=3,
    n_experts=2,
    modules_to_save=["lm_head"],
)


def _run(model, inputs, cond):
    with torch.no_grad():
        return model(**inputs, cflora_cond=cond).logits


def _two_adapters():
    model = inject_cflora(tiny_llama(), FIRST)
    randomise_adapter(model)
    add_cflora_adapter(model, "second", SECOND)
    set_cflora_adapter(model, "second")
    randomise_adapter(model)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)  # the second adapter's trained copy of its module to save
    set_cflora_adapter(model, "default")
    return model


def test_add_switch_disable_and_delete_named_adapters(tmp_path):
    torch.manual_seed(0)
    inputs, cond5, cond3 = model_inputs(), torch.randn(3, 5), torch.randn(3, 3)
    with torch.no_grad():
        base = logits_of(tiny_llama(), inputs)
    model = inject_cflora(tiny_llama(), FIRST)
    randomise_adapter(model)
    first = _run(model, inputs, cond5)
    add_cflora_adapter(model, "second", SECOND)
    assert cflora_adapter_names(model) == ["default", "second"] and active_cflora_adapter(model) == "default"
    assert torch.equal(_run(model, inputs, cond5), first)  # adding leaves the active adapter as it was
    set_cflora_adapter(model, "second")
    assert sorted(n for n, _ in cflora_layers(model)) == sorted(
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")
    )
    randomise_adapter(model)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)
    second = _run(model, inputs, cond3)
    assert not torch.allclose(second, first, atol=1e-3) and not torch.allclose(second, base, atol=1e-3)
    with pytest.raises(ValueError, match=r"cond_dim=3"):  # the active adapter's conditioning size
        _run(model, inputs, cond5)
    with torch.no_grad(), cflora_condition(model, cond3):
        assert torch.equal(logits_of(model, inputs), second)
    # only the active adapter is in the graph and in parameters(): training touches it alone
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {
        id(p) for _, layer in cflora_layers(model) for p in layer.parameters() if p.requires_grad
    } | {id(model.lm_head.weight)}
    with disable_adapter(model):
        with torch.no_grad():
            assert torch.equal(logits_of(model, inputs), base)  # the original lm_head is back as well
    set_cflora_adapter(model, "default")
    assert torch.equal(_run(model, inputs, cond5), first)  # the second adapter changed nothing of the first's
    with disable_adapter(model), torch.no_grad():
        assert torch.equal(logits_of(model, inputs), base)
    set_cflora_adapter(model, "second")
    assert torch.equal(_run(model, inputs, cond3), second)
    with pytest.raises(ValueError, match="'second' is the active adapter; set_cflora_adapter"):
        delete_cflora_adapter(model, "second")
    with pytest.raises(
        ValueError, match=r"no adapter named 'third'; the model's adapters: \['second', 'default'\]"
    ):
        set_cflora_adapter(model, "third")
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        add_cflora_adapter(model, "default", FIRST)
    delete_cflora_adapter(model, "default")
    assert cflora_adapter_names(model) == ["second"]
    unload(model)
    assert not cflora_layers(model) and "_cflora_adapters" not in model.__dict__


def test_save_and_load_adapters_by_name(tmp_path):
    torch.manual_seed(1)
    inputs, cond5, cond3 = model_inputs(), torch.randn(3, 5), torch.randn(3, 3)
    model = _two_adapters()
    first = _run(model, inputs, cond5)
    save_cflora(model, tmp_path / "first")  # the active adapter
    set_cflora_adapter(model, "second")
    second = _run(model, inputs, cond3)
    save_cflora(model, tmp_path / "second")
    # each saved adapter stands alone on a fresh base model
    assert torch.equal(_run(load_cflora(tiny_llama(), tmp_path / "second"), inputs, cond3), second)
    # load by name into one model: added from the saved config, the active adapter stays active
    fresh = load_cflora(tiny_llama(), tmp_path / "first", adapter_name="mine")
    assert cflora_adapter_names(fresh) == ["mine"]
    load_cflora(fresh, tmp_path / "second", adapter_name="theirs")
    assert cflora_adapter_names(fresh) == ["mine", "theirs"]
    assert torch.equal(_run(fresh, inputs, cond5), first)
    set_cflora_adapter(fresh, "theirs")
    assert torch.equal(_run(fresh, inputs, cond3), second)
    # a failed load by name leaves no half-loaded adapter behind
    with pytest.raises(ValueError, match="does not fit"):
        load_cflora(fresh, tmp_path / "first", adapter_name="theirs")  # into the existing one: other config
    assert cflora_adapter_names(fresh) == ["theirs", "mine"]


def test_a_second_inject_says_what_to_do_instead():
    model = inject_cflora(tiny_llama(), FIRST)
    with pytest.raises(
        ValueError,
        match=r"injecting twice is not supported. To add a second adapter, call "
        r"add_cflora_adapter\(model, name, config\) and switch with "
        r"set_cflora_adapter\(model, name\); to replace the adapter, unload\(model\)",
    ):
        inject_cflora(model, SECOND)
    add_cflora_adapter(model, "second", SECOND)  # what the message says works
    assert cflora_adapter_names(model) == ["default", "second"]
