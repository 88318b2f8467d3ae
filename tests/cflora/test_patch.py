"""apply_cflora / revert_cflora on PEFT LoRA models (tiny Llama and GPT-2 Conv1D from configs): outputs and
gradients equal plain PEFT's, the state_dict is untouched, the fused op really runs (and does not where
PEFT's forward must: disabled adapters, merged layers), several adapters, lora_bias, fp32 adapters on a
bf16 model, DoRA refused, revert restores PEFT's forward."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from cflora_models import model_inputs, tiny_gpt2, tiny_llama

from rellax_fast.cflora import patch
from rellax_fast.cflora.patch import apply_cflora, cflora_patched_modules, revert_cflora

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners import lora  # noqa: E402

TARGETS = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"]),
}


def _peft(arch: str, seed: int = 0, dropout: float = 0.0, **kw):
    build, targets = TARGETS[arch]
    config = LoraConfig(
        r=4,
        lora_alpha=12,
        lora_dropout=dropout,
        target_modules=targets,
        init_lora_weights=False,
        fan_in_fan_out=arch == "gpt2",
        **kw,
    )
    torch.manual_seed(seed + 100)  # init_lora_weights=False: random A and B, so the adapter is not a no-op
    return get_peft_model(build(seed), config)


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the fused op's calls made by the patched layers."""
    calls = []
    real = patch.cflora_linear

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(patch, "cflora_linear", spy)
    return calls


def _n_lora_linear(model) -> int:
    return sum(isinstance(m, lora.Linear) for m in model.modules())


def _forward_backward(model, inputs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # GPT-2's own attention/residual dropouts draw from torch's generator in train mode
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=inputs["input_ids"])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), embeds.grad, grads


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_outputs_gradients_and_state_dict_match_peft(arch, op_calls):
    ref = _peft(arch).train()
    model = copy.deepcopy(ref)
    before = model.state_dict()
    assert apply_cflora(model) is model
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr() for k in before)
    assert len(cflora_patched_modules(model)) == _n_lora_linear(ref) > 0

    inputs = model_inputs()
    ref_logits, ref_dx, ref_grads = _forward_backward(ref, inputs)
    logits, dx, grads = _forward_backward(model, inputs)
    assert len(op_calls) == _n_lora_linear(ref)  # one fused call per LoRA layer per forward
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-6)
    assert (
        grads.keys() == ref_grads.keys()
        and any("lora_A" in k for k in grads)
        and any("lora_B" in k for k in grads)
    )
    for name in ref_grads:
        assert ref_grads[name].abs().max() > 0, name  # the comparison is not of zeros
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert pickle.loads(pickle.dumps(model.state_dict())).keys() == before.keys()


def test_eval_mode_with_dropout_matches_peft_and_training_dropout_is_seeded():
    ref = _peft("llama", dropout=0.3)
    model = apply_cflora(copy.deepcopy(ref))
    inputs = model_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(**inputs).logits, ref.eval()(**inputs).logits, rtol=1e-5, atol=1e-5
        )
        model.train()
        torch.manual_seed(3)
        a = model(**inputs).logits
        torch.manual_seed(3)
        b = model(**inputs).logits
        torch.manual_seed(4)
        c = model(**inputs).logits
        clean = model.eval()(**inputs).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the mask comes from torch's generator
    assert not torch.allclose(a, c, atol=1e-4) and not torch.allclose(a, clean, atol=1e-4)


def test_multiple_and_switched_adapters_match_peft(op_calls):
    ref = _peft("llama")
    torch.manual_seed(7)
    ref.add_adapter(
        "second", LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model = apply_cflora(copy.deepcopy(ref))
    inputs = model_inputs()
    n_q_v = sum(isinstance(m, lora.Linear) and "second" in m.lora_A for m in ref.modules())
    cases = (
        ("second", n_q_v),
        (["default", "second"], _n_lora_linear(ref)),
        ("default", _n_lora_linear(ref)),
    )
    for active, n_fused in cases:
        for m in (ref, model):
            m.base_model.set_adapter(active)
        op_calls.clear()
        with torch.no_grad():
            got, want = model(**inputs).logits, ref(**inputs).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str(active))
        assert len(op_calls) == n_fused, active
    with torch.no_grad():  # the second adapter is not a no-op, so the cases above differ
        ref.base_model.set_adapter("second")
        assert not torch.allclose(ref(**inputs).logits, want, atol=1e-4)


def test_disabled_and_merged_layers_run_peft_forward(op_calls):
    ref = _peft("gpt2")
    model = apply_cflora(copy.deepcopy(ref))
    inputs = model_inputs()
    with torch.no_grad():
        with ref.disable_adapter():
            base = ref(**inputs).logits
        with model.disable_adapter():
            got = model(**inputs).logits
        assert op_calls == []
        torch.testing.assert_close(got, base, rtol=0, atol=0)
        adapted = model(**inputs).logits
        assert len(op_calls) == _n_lora_linear(ref) and not torch.allclose(adapted, base, atol=1e-4)
        op_calls.clear()
        model.merge_adapter()
        merged = model(**inputs).logits
        assert op_calls == []
        torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(**inputs).logits, adapted, rtol=1e-4, atol=1e-5)
        assert len(op_calls) == _n_lora_linear(ref)


def test_lora_bias_gets_its_gradient():
    # Llama's projections have no bias (PEFT refuses lora_bias there): use GPT-2's Conv1D, which has one
    build, targets = TARGETS["gpt2"]
    torch.manual_seed(1)
    ref = get_peft_model(
        build(1),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=targets,
            lora_bias=True,
            init_lora_weights=False,
            fan_in_fan_out=True,
        ),
    )
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, lora.Linear):
                m.lora_B["default"].bias.normal_()
    model = apply_cflora(copy.deepcopy(ref.train()))
    inputs = model_inputs()
    ref_logits, _, ref_grads = _forward_backward(ref, inputs)
    logits, _, grads = _forward_backward(model, inputs)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    bias_keys = [k for k in ref_grads if k.endswith("lora_B.default.bias")]
    assert bias_keys
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fp32_adapters_on_a_bf16_model(op_calls):
    # PEFT's default autocast_adapter_dtype=True keeps the adapters in fp32 on a bf16 base model
    build, targets = TARGETS["llama"]
    torch.manual_seed(2)
    ref = get_peft_model(
        build(2).to(torch.bfloat16),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
    )
    lora_params = [p for n, p in ref.named_parameters() if "lora_" in n]
    assert all(p.dtype == torch.float32 for p in lora_params)
    model = apply_cflora(copy.deepcopy(ref.train()))
    inputs = model_inputs()
    ref_logits, _, ref_grads = _forward_backward(ref, inputs)
    logits, _, grads = _forward_backward(model, inputs)
    assert logits.dtype == ref_logits.dtype == torch.bfloat16
    assert len(op_calls) == _n_lora_linear(ref)  # fused, with the adapters cast to bf16 for the call
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=0.05, atol=0.05)
    for name in ref_grads:
        assert grads[name].dtype == torch.float32
        err = (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm()
        assert err < 0.05, (name, float(err))


def test_dora_and_other_variants_are_refused_and_nothing_is_patched():
    build, targets = TARGETS["llama"]
    model = get_peft_model(build(0), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    with pytest.raises(ValueError, match=r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj .*DoRA"):
        apply_cflora(model)
    assert cflora_patched_modules(model) == []
    assert all(type(m) is lora.Linear for m in model.modules() if isinstance(m, lora.Linear))


def test_revert_restores_peft_forward(op_calls):
    ref = _peft("llama")
    model = apply_cflora(copy.deepcopy(ref), backend="reference")
    inputs = model_inputs()
    with torch.no_grad():
        model(**inputs)
    assert op_calls and set(op_calls) == {"reference"}
    apply_cflora(model)  # applying again only changes the backend
    op_calls.clear()
    with torch.no_grad():
        model(**inputs)
    assert set(op_calls) == {None}
    twin = copy.deepcopy(model)  # deepcopy keeps the patch
    assert cflora_patched_modules(twin) == cflora_patched_modules(model)
    assert revert_cflora(model) is model
    assert cflora_patched_modules(model) == []
    layers = [m for m in model.modules() if isinstance(m, lora.Linear)]
    assert layers and all(
        type(m) is lora.Linear and "_cflora_fused_backend" not in m.__dict__ for m in layers
    )
    op_calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits, rtol=0, atol=0)
    assert op_calls == []
    assert revert_cflora(model) is model  # nothing patched: a no-op


def test_bad_calls_are_clear_errors():
    with pytest.raises(ValueError, match="no PEFT LoRA Linear layers"):
        apply_cflora(tiny_llama())
    with pytest.raises(ValueError, match="backend must be None or one of"):
        apply_cflora(_peft("llama"), backend="cuda-graphs")


def test_cpu_autocast_matches_peft(op_calls):
    """fp32 model under torch.autocast("cpu", bfloat16), as Trainer/accelerate mixed precision runs it."""
    ref = _peft("llama").train()
    model = apply_cflora(copy.deepcopy(ref))
    inputs = model_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logits, _, ref_grads = _forward_backward(ref, inputs)
        logits, _, grads = _forward_backward(model, inputs)
    assert len(op_calls) == _n_lora_linear(ref)
    assert logits.dtype == ref_logits.dtype
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=0.05, atol=0.05)
    for name in ref_grads:
        assert grads[name].dtype == torch.float32
        err = (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm()
        assert err < 0.05, (name, float(err))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_patched_peft_matches_peft(backend, dtype, op_calls):
    """On a GPU (scripts/gpu_check.sh): the patched PEFT model on the cuda / triton backend gives PEFT's
    logits and LoRA gradients, in float32 and bfloat16 (adapters in the model dtype)."""
    build, targets = TARGETS["llama"]
    torch.manual_seed(0)
    ref = (
        get_peft_model(
            build(0, initializer_range=0.1),
            LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False),
            autocast_adapter_dtype=False,
        )
        .to("cuda", dtype)
        .train()
    )
    model = apply_cflora(copy.deepcopy(ref), backend=backend)
    inputs = {k: v.cuda() for k, v in model_inputs(batch=4, seq=33).items()}
    ref_logits, _, ref_grads = _forward_backward(ref, inputs)
    logits, _, grads = _forward_backward(model, inputs)
    assert set(op_calls) == {backend}
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == torch.float32 else {"rtol": 8e-2, "atol": 8e-2}
    torch.testing.assert_close(logits.float(), ref_logits.float(), **tol)
    for name, g in ref_grads.items():
        scale = g.float().abs().max().clamp_min(1e-6)
        torch.testing.assert_close(grads[name].float() / scale, g.float() / scale, **tol, msg=name)
