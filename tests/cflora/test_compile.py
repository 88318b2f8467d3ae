"""torch.compile of the tiny Llama with "full" CFLoRA: our layers cause no graph break, and the compiled
model (forward and backward) matches eager."""

from __future__ import annotations

import os

import pytest
import torch
from cflora_models import model_inputs, tiny_llama

from rellax_fast.cflora import CFLoRAConfig, cflora_condition, inject_cflora

COND = 5
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + "/rellax_fast"


@pytest.fixture
def model():
    torch._dynamo.reset()
    m = tiny_llama(num_hidden_layers=1)
    inject_cflora(m, CFLoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                  interaction="full", cond_dim=COND, init_lora="random", generator_init_std=0.2))
    yield m
    torch._dynamo.reset()


def test_no_graph_break_from_cflora_layers(model):
    inputs, cond = model_inputs(), torch.randn(3, COND)
    with cflora_condition(model, cond):
        # one eager call first: the extension's one-time lazy load (a lock and an import) is not traceable
        model(**inputs)
        explanation = torch._dynamo.explain(model)(**inputs)
    ours = [
        b.reason
        for b in explanation.break_reasons
        if any(PACKAGE_DIR in str(frame.filename) for frame in b.user_stack)
    ]
    assert ours == [], f"graph breaks in rellax_fast code: {ours}"
    # transformers' tiny Llama itself compiles to one graph here, so the whole forward is break-free
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


def test_compiled_forward_and_backward_match_eager(model):
    model.train()
    inputs, cond = model_inputs(), torch.randn(3, COND)

    def loss_and_grads(m):
        model.zero_grad(set_to_none=True)
        with cflora_condition(model, cond):
            loss = m(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_eager, grads_eager = loss_and_grads(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_compiled, grads_compiled = loss_and_grads(compiled)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-5)
    for name, g in grads_eager.items():
        torch.testing.assert_close(grads_compiled[name], g, rtol=1e-4, atol=1e-5, msg=name)
