"""torch.compile of the tiny Llama with "full" CFLoRA: our layers cause no graph break, and the compiled
model (forward and backward) matches eager."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from cflora_models import model_inputs, tiny_llama

from rellax_fast.cflora import CFLoRAConfig, cflora_condition, cflora_layers, inject_cflora

COND = 5
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + "/rellax_fast"


@pytest.fixture
def model():
    torch._dynamo.reset()
    m = tiny_llama(num_hidden_layers=1)
    inject_cflora(
        m,
        CFLoRAConfig(
            r=4,
            alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            interaction="full",
            cond_dim=COND,
            init_lora="random",
            generator_init_std=0.2,
        ),
    )
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


@pytest.mark.parametrize("backend", ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_compiled_training_with_dropout_matches_eager(backend):
    """fullgraph=True with dropout: the layers pass seed=None, so the op draws its seed inside the graph (a CPU
    int64 tensor, read by the opaque op: no .item() in the graph). aot_eager keeps torch's RNG, so under the same
    torch.manual_seed the compiled steps see the eager masks: same losses, grads and updated weights."""
    torch._dynamo.reset()
    eager = tiny_llama(num_hidden_layers=1)
    inject_cflora(
        eager,
        CFLoRAConfig(
            r=4,
            alpha=8,
            dropout=0.3,
            target_modules=["q_proj", "v_proj", "down_proj"],
            interaction="full",
            cond_dim=COND,
            init_lora="random",
            generator_init_std=0.2,
            backend=backend,
        ),
    )
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    inputs, cond = model_inputs(), torch.randn(3, COND)

    def loss_and_grads(model, run, seed):
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with cflora_condition(model, cond):
            loss = run(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    # dropout is really on: another seed gives another loss
    assert not torch.allclose(loss_and_grads(eager, eager, 99)[0], loss_and_grads(eager, eager, 11)[0])
    opt_eager = torch.optim.SGD([p for p in eager.parameters() if p.requires_grad], lr=0.5)
    opt_twin = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.5)
    for seed in (11, 12, 13):
        loss_e, grads_e = loss_and_grads(eager, eager, seed)
        loss_c, grads_c = loss_and_grads(twin, compiled, seed)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        for name, g in grads_e.items():
            torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-5, msg=f"step {seed}: {name}")
        opt_eager.step()
        opt_twin.step()
    for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("path", ["keyword", "block"])
def test_compiled_training_with_the_cond_keyword_matches_eager(path):
    """Issue #25.1: ``model(**batch, cflora_cond=cond)`` compiles with fullgraph=True (the forward hooks enter
    and leave the conditioning block with plain functions, no context-manager object in the graph), as does
    the ``with cflora_condition(...)`` block; with dropout, both match eager step by step, compile once, and
    leave the block closed after each call."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    eager = tiny_llama(num_hidden_layers=1)
    inject_cflora(
        eager,
        CFLoRAConfig(
            r=4,
            alpha=8,
            dropout=0.3,
            target_modules=["q_proj", "v_proj"],
            interaction="full",
            cond_dim=COND,
            init_lora="random",
            generator_init_std=0.2,
        ),
    )
    twin = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(twin, backend=counter, fullgraph=True)
    inputs = model_inputs()

    def loss_and_grads(model, run, seed, cond):
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        if path == "keyword":
            loss = run(**inputs, labels=inputs["input_ids"], cflora_cond=cond).loss
        else:
            with cflora_condition(model, cond):
                loss = run(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    for step in range(3):
        cond = torch.randn(3, COND)  # a new cond each step: the graph must read it, not bake it in
        loss_e, grads_e = loss_and_grads(eager, eager, step, cond)
        loss_c, grads_c = loss_and_grads(twin, compiled, step, cond)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        for name, g in grads_e.items():
            torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-5, msg=f"step {step}: {name}")
        # the block is closed after the call: a forward without cond is the layers' own error
        assert all(not layer._cflora_slot.active for _, layer in cflora_layers(twin))
        assert twin.__dict__["_cflora_cond_kwarg"]["stack"] == []
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times (recompiles per step?)"
    with pytest.raises(RuntimeError, match="needs per-sample conditioning"):
        compiled(**inputs)
