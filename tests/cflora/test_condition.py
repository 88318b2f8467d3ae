"""cflora_condition: missing cond errors, gradient checkpointing (backward after the block), dropout
seeds under recomputation, generate() with greedy / beams / num_return_sequences, and DDP."""

from __future__ import annotations

import pytest
import torch
from cflora_models import model_inputs, tiny_llama

from rellax_fast.cflora import (
    CFLoRAConfig,
    cflora_condition,
    cflora_layers,
    clear_cflora_condition,
    inject_cflora,
)

COND = 6


def _conditioned_llama(dropout: float = 0.0, interaction: str = "full", seed: int = 0):
    model = tiny_llama(seed)
    cfg = CFLoRAConfig(
        r=4,
        alpha=8,
        dropout=dropout,
        target_modules=["q_proj", "v_proj", "down_proj"],
        interaction=interaction,
        cond_dim=COND,
        n_experts=2,
        init_lora="random",
        generator_init_std=0.3,
    )
    inject_cflora(model, cfg)
    with torch.no_grad():
        for _, layer in cflora_layers(model):
            for p in layer.interaction.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    return model


def test_missing_cond_is_an_error_not_identity():
    model = _conditioned_llama()
    inputs = model_inputs()
    with pytest.raises(RuntimeError, match="needs per-sample conditioning"):
        model(**inputs)
    with cflora_condition(model, torch.randn(3, COND)):
        model(**inputs)
    with pytest.raises(RuntimeError, match="needs per-sample conditioning"):
        model(**inputs)  # the block has exited: no stale cond outside backward
    with pytest.raises(ValueError, match=r"cond must have shape \(batch, cond_dim=6\)"):
        with cflora_condition(model, torch.randn(3, COND + 1)):
            pass
    with pytest.raises(RuntimeError, match="nesting"):
        with cflora_condition(model, torch.randn(3, COND)), cflora_condition(model, torch.randn(3, COND)):
            pass
    clear_cflora_condition(model)
    assert all(layer._cflora_slot is None for _, layer in cflora_layers(model))


def _grads(model, cond, inputs, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with cflora_condition(model, cond):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()  # after the block has exited, as in a typical training loop
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout, reentrant", [(0.0, False), (0.3, False), (0.3, True)])
def test_gradient_checkpointing_gives_the_same_gradients(dropout, reentrant):
    model = _conditioned_llama(dropout=dropout)
    model.train()
    inputs = model_inputs()
    cond = torch.randn(3, COND)
    loss_ref, ref = _grads(model, cond, inputs, seed=11)

    calls = []
    layer = cflora_layers(model)[0][1]
    handle = layer.register_forward_hook(lambda *a: calls.append(1))
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    loss_ckpt, got = _grads(model, cond, inputs, seed=11)
    handle.remove()
    assert len(calls) == 2, "the checkpointed layer was not recomputed"
    torch.testing.assert_close(loss_ckpt, loss_ref, rtol=0, atol=0)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    if dropout > 0:
        # a different seed gives different dropout masks, so the check above is not vacuous
        _, other = _grads(model, cond, inputs, seed=12)
        assert any(not torch.allclose(other[n], ref[n]) for n in ref)


def test_cond_changes_the_output():
    model = _conditioned_llama()
    inputs = model_inputs(batch=2)
    with torch.no_grad():
        with cflora_condition(model, torch.randn(2, COND)):
            a = model(**inputs).logits
        with cflora_condition(model, torch.randn(2, COND)):
            b = model(**inputs).logits
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("gen_kwargs", [{"num_beams": 1}, {"num_beams": 3, "num_return_sequences": 2}])
def test_generate_matches_per_sample_generation(gen_kwargs):
    model = _conditioned_llama()
    prompt = model_inputs(batch=2, seq=5)
    cond = torch.randn(2, COND) * 3
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, **gen_kwargs}
    with torch.no_grad(), cflora_condition(model, cond):
        out = model.generate(**prompt, **kw)
    n_ret = gen_kwargs.get("num_return_sequences", 1)
    assert out.shape == (2 * n_ret, 5 + 6)
    for b in range(2):
        single = {k: v[b : b + 1] for k, v in prompt.items()}
        with torch.no_grad(), cflora_condition(model, cond[b : b + 1]):
            alone = model.generate(**single, **kw)
        torch.testing.assert_close(out[b * n_ret : (b + 1) * n_ret], alone)


def test_generate_with_wrong_cond_batch_is_a_clear_error():
    model = _conditioned_llama()
    prompt = model_inputs(batch=3, seq=5)
    with pytest.raises(ValueError, match="input batch is 3 but cond has 2 rows"):
        with torch.no_grad(), cflora_condition(model, torch.randn(2, COND)):
            model.generate(**prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_ddp_single_process(one_rank_gloo):
    model = _conditioned_llama()
    model.train()
    inputs = model_inputs()
    cond = torch.randn(3, COND)
    _, ref = _grads(model, cond, inputs, seed=3)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    model.zero_grad(set_to_none=True)
    with cflora_condition(ddp, cond):
        loss = ddp(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_context_fn_replays_each_forwards_own_cond():
    # two conditioned forwards, one backward: the recomputation of the first must see the first cond
    from rellax_fast.cflora import cflora_checkpoint_context_fn

    model = _conditioned_llama()
    model.train()
    a, b = model_inputs(seed=1), model_inputs(seed=2)
    cond_a, cond_b = torch.randn(3, COND), torch.randn(3, COND)

    def two_forwards_one_backward():
        model.zero_grad(set_to_none=True)
        with cflora_condition(model, cond_a):
            loss_a = model(**a, labels=a["input_ids"]).loss
        with cflora_condition(model, cond_b):
            loss_b = model(**b, labels=b["input_ids"]).loss
        (loss_a + loss_b).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref = two_forwards_one_backward()
    kwargs = {"use_reentrant": False, "context_fn": cflora_checkpoint_context_fn(model)}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    got = two_forwards_one_backward()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
