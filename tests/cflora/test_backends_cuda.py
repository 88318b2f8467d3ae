"""On a GPU (scripts/gpu_check.sh): the tiny Llama with "full" CFLoRA on the cuda and triton backends gives
the reference backend's logits and gradients, in float32 and bfloat16, with checkpointing and dropout."""

from __future__ import annotations

import pytest
import torch
from cflora_models import model_inputs, tiny_llama

from rellax_fast.cflora import CFLoRAConfig, cflora_condition, inject_cflora, set_cflora_backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backend_matches_reference_in_a_model(backend, dtype):
    model = tiny_llama(initializer_range=0.1)
    inject_cflora(model, CFLoRAConfig(r=8, alpha=16, dropout=0.1, interaction="full", cond_dim=5,
                                      target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                      init_lora="random", generator_init_std=0.2))
    model = model.to("cuda", dtype).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = {k: v.cuda() for k, v in model_inputs(batch=4, seq=33).items()}
    cond = torch.randn(4, 5, device="cuda")

    def run(which):
        set_cflora_backend(model, which)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the same dropout seed for both backends
        with cflora_condition(model, cond):
            out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        return out.logits.float().detach(), grads

    logits_ref, grads_ref = run("reference")
    logits_got, grads_got = run(backend)
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float32 else {"rtol": 8e-2, "atol": 8e-2}
    torch.testing.assert_close(logits_got, logits_ref, **tol)
    for name, g in grads_ref.items():
        scale = g.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(grads_got[name] / scale, g / scale, **tol, msg=name)
