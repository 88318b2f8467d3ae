"""The per-block cache of C (``ConditionSlot.interactions``): inside one conditioning block, forwards without
autograd reuse each layer's C instead of rerunning its generator (``generate()`` runs a whole generation in
one block), and every result equals the recomputed one: the cache never serves a C whose generator
parameters, cond or batch changed, and never under autograd (C's gradient must flow)."""

from __future__ import annotations

import pytest
import torch
from cflora_models import model_inputs, randomise_adapter, tiny_llama

from rellax_fast.cflora import CFLoRAConfig, cflora_condition, cflora_layers, inject_cflora

COND = 6


def _model(kind: str = "full"):
    model = tiny_llama(seed=3)
    cfg = CFLoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", interaction=kind, cond_dim=COND)
    inject_cflora(model, cfg)
    randomise_adapter(model)
    return model.eval()


def _count_generator_calls(model):
    calls = []
    for _, layer in cflora_layers(model):
        layer.interaction.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("kind", ["full", "moe"])
def test_no_grad_forwards_in_one_block_run_each_generator_once_and_match(kind):
    model = _model(kind)
    calls = _count_generator_calls(model)
    n_layers = len(cflora_layers(model))
    inputs, cond = model_inputs(batch=2, seq=5), torch.randn(2, COND)
    with cflora_condition(model, cond):
        ref = model(**inputs).logits.detach()  # autograd on: no cache
        assert len(calls) == n_layers
        with torch.no_grad():
            first = model(**inputs).logits
            second = model(**inputs).logits
    assert len(calls) == 2 * n_layers  # the second no-grad forward ran no generator
    torch.testing.assert_close(first, ref, rtol=0, atol=0)
    torch.testing.assert_close(second, ref, rtol=0, atol=0)


def test_autograd_forwards_never_use_the_cache():
    model = _model()
    calls = _count_generator_calls(model)
    inputs, cond = model_inputs(batch=2, seq=5), torch.randn(2, COND)
    with cflora_condition(model, cond):
        with torch.no_grad():
            model(**inputs)
        model(**inputs).logits.sum().backward()
    assert len(calls) == 2 * len(cflora_layers(model))
    assert all(
        p.grad is not None for _, layer in cflora_layers(model) for p in layer.interaction.parameters()
    )


def test_changed_generator_parameters_cond_or_batch_recompute_c():
    model = _model()
    inputs, cond = model_inputs(batch=2, seq=5), torch.randn(2, COND)

    def fresh(ins):
        with cflora_condition(model, cond.clone()), torch.no_grad():
            return model(**ins).logits

    with cflora_condition(model, cond), torch.no_grad():
        model(**inputs)
        layer = cflora_layers(model)[0][1]
        layer.interaction.fc2.bias.add_(0.5)  # an in-place update (an optimizer step) inside the block
        after_param = model(**inputs).logits
    expected_param = fresh(inputs)
    with cflora_condition(model, cond), torch.no_grad():
        model(**inputs)
        cond.mul_(-1)  # cond changed in place
        after_cond = model(**inputs).logits
    expected_cond = fresh(inputs)
    torch.testing.assert_close(after_param, expected_param, rtol=0, atol=0)
    torch.testing.assert_close(after_cond, expected_cond, rtol=0, atol=0)
    four = model_inputs(batch=4, seq=5, seed=2)  # a multiple of cond's batch: C repeated per sample
    with cflora_condition(model, cond), torch.no_grad():
        model(**inputs)
        got = model(**four).logits
    with cflora_condition(model, cond), torch.no_grad():
        want = model(**four).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_generate_runs_each_generator_once_and_matches_uncached_greedy_decoding():
    model = _model()
    calls = _count_generator_calls(model)
    prompt, cond = model_inputs(batch=2, seq=5), torch.randn(2, COND) * 3
    with torch.no_grad():
        got = model.generate(**prompt, cflora_cond=cond, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert len(calls) == len(cflora_layers(model))
    ids = prompt["input_ids"]
    with cflora_condition(model, cond):  # autograd on: every step recomputes C
        for _ in range(4):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    torch.testing.assert_close(got, ids, rtol=0, atol=0)
