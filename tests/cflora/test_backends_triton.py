"""The model-level backend switch on the Triton path (TRITON_INTERPRET=1 on the CPU): a tiny Llama with
"full" CFLoRA gives the reference backend's logits and gradients."""

from __future__ import annotations

import pytest
import torch
from cflora_models import model_inputs, tiny_llama

from rellax_fast.cflora import CFLoRAConfig, cflora_condition, inject_cflora, set_cflora_backend

pytestmark = pytest.mark.triton


def test_triton_backend_matches_reference_in_a_model():
    model = tiny_llama(num_hidden_layers=1)
    inject_cflora(
        model,
        CFLoRAConfig(
            r=4,
            alpha=8,
            target_modules=["q_proj", "down_proj"],
            interaction="full",
            cond_dim=5,
            init_lora="random",
            generator_init_std=0.2,
        ),
    )
    model.train()
    inputs, cond = model_inputs(batch=2, seq=5), torch.randn(2, 5)

    def run(backend):
        set_cflora_backend(model, backend)
        model.zero_grad(set_to_none=True)
        with cflora_condition(model, cond):
            out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        return out.logits.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
        }

    logits_ref, grads_ref = run("reference")
    logits_tri, grads_tri = run("triton")
    torch.testing.assert_close(logits_tri, logits_ref, rtol=2e-4, atol=2e-4)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_tri[name], g, rtol=2e-3, atol=2e-4, msg=name)
