"""The ``cflora_cond`` keyword (rellax_fast.cflora.hooks): forward and generate() with the keyword match the
``cflora_condition`` block, failures leave no active block behind, gradient checkpointing, deepcopy, and a
plain ``transformers.Trainer`` fine-tuning with per-sample conditioning and no custom compute_loss (also
with gradient checkpointing), DDP, and a text-generation pipeline."""

from __future__ import annotations

import copy

import pytest
import torch
from cflora_models import VOCAB, model_inputs, tiny_llama

from rellax_fast.cflora import CFLoRAConfig, cflora_condition, cflora_layers, inject_cflora
from rellax_fast.cflora.hooks import (
    cflora_cond_kwarg_enabled,
    disable_cflora_cond_kwarg,
    enable_cflora_cond_kwarg,
)

COND = 5


def _model(seed: int = 0, dropout: float = 0.0):
    model = tiny_llama(seed)
    inject_cflora(
        model,
        CFLoRAConfig(
            r=4,
            alpha=8,
            dropout=dropout,
            target_modules=["q_proj", "v_proj", "down_proj"],
            interaction="full",
            cond_dim=COND,
            init_lora="random",
        ),
    )
    with torch.no_grad():  # move C away from I so that cond changes the output
        for _, layer in cflora_layers(model):
            for p in layer.interaction.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    return enable_cflora_cond_kwarg(model)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_forward_keyword_matches_the_context_manager():
    model = _model().train()
    inputs = model_inputs()
    cond = torch.randn(3, COND)
    with cflora_condition(model, cond):
        ref = model(**inputs, labels=inputs["input_ids"])
    ref.loss.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    got = model(**inputs, labels=inputs["input_ids"], cflora_cond=cond)
    got.loss.backward()
    torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=0)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    other = model(**inputs, cflora_cond=torch.randn(3, COND)).logits
    assert not torch.allclose(other, got.logits, atol=1e-4)  # the keyword's cond is really used
    # without the keyword and outside a block: the layers' own error, never a silent identity
    with pytest.raises(RuntimeError, match="needs per-sample conditioning"):
        model(**inputs)


def test_failures_leave_no_active_block_and_none_defers_to_an_enclosing_block():
    model = _model()
    inputs = model_inputs()
    state = model.__dict__["_cflora_cond_kwarg"]
    with pytest.raises(ValueError, match=r"cond must have shape \(batch, cond_dim=5\)"):
        model(**inputs, cflora_cond=torch.randn(3, COND + 1))  # cflora_condition refuses: nothing entered
    with pytest.raises(ValueError, match="input batch is 3 but cond has 2 rows"):
        model(
            **inputs, cflora_cond=torch.randn(2, COND)
        )  # raises inside the forward, after the block entered
    assert state["stack"] == []
    assert all(not layer._cflora_slot.active for _, layer in cflora_layers(model))
    with pytest.raises(RuntimeError, match="needs per-sample conditioning"):
        model(**inputs)
    cond = torch.randn(3, COND)
    with torch.no_grad():
        with cflora_condition(model, cond):  # a block still opens (no stale active block)
            ref = model(**inputs).logits
            got = model(**inputs, cflora_cond=None).logits  # None: the enclosing block's cond
            with pytest.raises(RuntimeError, match="nesting"):
                model(**inputs, cflora_cond=cond)
        assert state["stack"] == []
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("gen_kwargs", [{"num_beams": 1}, {"num_beams": 2, "num_return_sequences": 2}])
def test_generate_keyword_matches_the_context_manager(gen_kwargs):
    model = _model()
    prompt = model_inputs(batch=2, seq=5)
    cond = torch.randn(2, COND) * 3
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, **gen_kwargs}
    with torch.no_grad(), cflora_condition(model, cond):
        ref = model.generate(**prompt, **kw)
    with torch.no_grad():
        got = model.generate(**prompt, cflora_cond=cond, **kw)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert all(not layer._cflora_slot.active for _, layer in cflora_layers(model))
    # the conditioning decides the continuation: another cond gives another generation for some row
    other = model.generate(**prompt, cflora_cond=-cond, **kw)
    assert not torch.equal(other, got)


def test_gradient_checkpointing_with_the_keyword():
    model = _model(dropout=0.2).train()
    inputs = model_inputs()
    cond = torch.randn(3, COND)

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        model(**inputs, labels=inputs["input_ids"], cflora_cond=cond).loss.backward()
        return _grads(model)

    ref = grads()
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    got = grads()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_deepcopy_conditions_the_copy_and_disable_removes_everything():
    model = _model()
    inputs = model_inputs()
    cond = torch.randn(3, COND)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in cflora_layers(twin):
            layer.lora_B.mul_(2.0)
        ref = model(**inputs, cflora_cond=cond).logits
        got = twin(**inputs, cflora_cond=cond).logits
        with cflora_condition(twin, cond):
            twin_ref = twin(**inputs).logits
        twin_out = twin.generate(
            **inputs, cflora_cond=cond, max_new_tokens=2, do_sample=False, pad_token_id=0
        )
    torch.testing.assert_close(got, twin_ref, rtol=0, atol=0)  # the copy's hook conditions the copy's layers
    assert not torch.allclose(got, ref)
    assert twin_out.shape == (3, 9)
    assert enable_cflora_cond_kwarg(model) is model and len(model._forward_pre_hooks) == 1  # idempotent
    disable_cflora_cond_kwarg(model)
    assert not cflora_cond_kwarg_enabled(model) and cflora_cond_kwarg_enabled(twin)
    assert not model._forward_pre_hooks and not model._forward_hooks and "generate" not in model.__dict__
    with pytest.raises(RuntimeError, match="needs per-sample conditioning"):
        model(**inputs, cflora_cond=cond)  # the keyword now goes unread into LlamaForCausalLM's **kwargs
    with pytest.raises(ValueError, match="has no CFLoRA layers"):
        enable_cflora_cond_kwarg(tiny_llama())


# ------------------------------------------------------------------------------------------ Trainer


class _CondDataset(torch.utils.data.Dataset):
    """Prompt [1..5] then one answer token decided by the sign of cond[0] (7 or 9); loss on it only."""

    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(0)
        self.cond = torch.randn(n, COND, generator=g)

    def __len__(self):
        return len(self.cond)

    def __getitem__(self, i):
        ids = torch.tensor([1, 2, 3, 4, 5, 7 if self.cond[i, 0] > 0 else 9])
        labels = torch.full_like(ids, -100)
        labels[-1] = ids[-1]
        return {"input_ids": ids, "labels": labels, "cflora_cond": self.cond[i]}


def _trainer(model, dataset, tmp_path, steps, **overrides):
    from transformers import Trainer, TrainingArguments, default_data_collator

    kwargs = dict(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    kwargs.update(overrides)
    # default_data_collator stacks the per-example cflora_cond vectors into (batch, cond_dim)
    return Trainer(
        model=model,
        args=TrainingArguments(**kwargs),
        train_dataset=dataset,
        data_collator=default_data_collator,
    )


def test_plain_trainer_with_per_sample_cond(tmp_path):
    model = tiny_llama(3)
    inject_cflora(
        model,
        CFLoRAConfig(
            r=4,
            alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            interaction="full",
            cond_dim=COND,
            init_lora="random",
        ),
    )
    enable_cflora_cond_kwarg(model)
    dataset = _CondDataset()
    probe = {"input_ids": torch.stack([dataset[i]["input_ids"] for i in range(8)])}
    conds = dataset.cond[:8]
    with torch.no_grad():  # a fresh "full" generator gives C = I whatever the cond
        torch.testing.assert_close(
            model(**probe, cflora_cond=conds).logits,
            model(**probe, cflora_cond=torch.zeros_like(conds)).logits,
            rtol=0,
            atol=0,
        )

    seen = []
    layer = cflora_layers(model)[0][1]
    handle = layer.register_forward_hook(lambda mod, args, out: seen.append(mod._cflora_slot.cond.clone()))
    trainer = _trainer(model, dataset, tmp_path / "run", steps=10)
    trainer.train()
    handle.remove()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2, losses
    # every forward got its own batch's rows of the dataset's cond, stacked by the collator
    assert len(seen) == 10
    rows = {tuple(c.tolist()) for c in dataset.cond}
    for batch_cond in seen:
        assert batch_cond.shape == (8, COND) and all(tuple(c.tolist()) in rows for c in batch_cond)
    # the generators were trained through cond: the output now depends on it
    model.eval()
    with torch.no_grad():
        moved = (
            model(**probe, cflora_cond=conds).logits
            - model(**probe, cflora_cond=torch.zeros_like(conds)).logits
        )
    assert moved.abs().max() > 1e-3

    # Trainer's default remove_unused_columns=True drops cflora_cond (it is not in forward's signature):
    # the model then fails loudly instead of training unconditioned, naming the column and the option (#25.8)
    dropped = _trainer(model.train(), dataset, tmp_path / "dropped", steps=1, remove_unused_columns=True)
    with pytest.raises(
        RuntimeError,
        match=r"needs per-sample conditioning.*no 'cflora_cond' column because the "
        r"Trainer drops.*TrainingArguments\(remove_unused_columns=False\)",
    ):
        dropped.train()


def test_keyword_through_ddp(one_rank_gloo):
    model = _model().train()
    inputs = model_inputs()
    cond = torch.randn(3, COND)
    ref = model(**inputs, labels=inputs["input_ids"], cflora_cond=cond)
    ref.loss.backward()
    ref_grads = _grads(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    enable_cflora_cond_kwarg(ddp)  # unwraps to the module: already enabled, no second hook
    assert len(model._forward_pre_hooks) == 1
    model.zero_grad(set_to_none=True)
    ddp(**inputs, labels=inputs["input_ids"], cflora_cond=cond).loss.backward()
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_with_gradient_checkpointing_and_dropout_gives_the_same_losses(tmp_path):
    def losses(checkpointing: bool):
        model = tiny_llama(3)
        inject_cflora(
            model,
            CFLoRAConfig(
                r=4,
                alpha=8,
                dropout=0.1,
                target_modules=["q_proj", "v_proj", "down_proj"],
                interaction="full",
                cond_dim=COND,
                init_lora="random",
            ),
        )
        enable_cflora_cond_kwarg(model)
        calls = []
        cflora_layers(model)[0][1].register_forward_hook(lambda *args: calls.append(1))
        trainer = _trainer(
            model,
            _CondDataset(),
            tmp_path / str(checkpointing),
            steps=3,
            gradient_checkpointing=checkpointing,
        )
        trainer.train()
        return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h]), len(calls)

    (plain, n_plain), (checkpointed, n_checkpointed) = losses(False), losses(True)
    assert n_plain == 3 and n_checkpointed == 6  # the decoder layers were recomputed in backward
    assert len(plain) == 3 and plain[-1] < plain[0]  # the later losses depend on the earlier gradients
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6)


def test_text_generation_pipeline_passes_the_keyword_to_generate():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    # a word-level tokenizer built in memory (no download): "t<i>" is token i
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t0", unk_token="t0")
    model = _model()
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    cond = torch.randn(1, COND) * 3
    kw = {"max_new_tokens": 6, "do_sample": False}
    got = pipe("t1 t2 t3 t4", cflora_cond=cond, **kw)
    with cflora_condition(model, cond):
        ref = pipe("t1 t2 t3 t4", **kw)
    assert got == ref and got[0]["generated_text"].startswith("t1 t2 t3 t4")
    assert pipe("t1 t2 t3 t4", cflora_cond=-cond, **kw) != got


def test_inject_enables_the_keyword_for_conditioned_kinds_and_unload_removes_it():
    from rellax_fast.cflora import unload

    inputs = model_inputs()
    cond = torch.randn(3, COND)
    model = tiny_llama(0)
    inject_cflora(
        model, CFLoRAConfig(r=4, alpha=8, target_modules=["q_proj"], interaction="full", cond_dim=COND)
    )
    assert cflora_cond_kwarg_enabled(model)
    with cflora_condition(model, cond):
        ref = model(**inputs).logits
    torch.testing.assert_close(model(**inputs, cflora_cond=cond).logits, ref, rtol=0, atol=0)
    unload(model)
    assert not cflora_cond_kwarg_enabled(model)
    assert not model._forward_pre_hooks and not model._forward_hooks and "generate" not in model.__dict__
    # opting out, and kinds without a condition, leave the model's call untouched
    opted_out = inject_cflora(
        tiny_llama(0),
        CFLoRAConfig(r=4, alpha=8, target_modules=["q_proj"], interaction="full", cond_dim=COND),
        cond_kwarg=False,
    )
    plain = inject_cflora(tiny_llama(0), CFLoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
    assert not cflora_cond_kwarg_enabled(opted_out) and not cflora_cond_kwarg_enabled(plain)
