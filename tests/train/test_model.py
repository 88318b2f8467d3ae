"""The ReLLaX wrapper: conditioning reaches every CFLoRA layer, SPA only touches placeholder positions,
and the causal / encoder read-outs equal the backbone's own logits for the answer tokens."""

import pytest
import torch

from rellax_fast.cflora import cflora_layers
from rellax_fast.data.collate import PromptCollator, PromptSample
from rellax_fast.train.model import ReLLaXModel, ReLLaXOptions, click_probability, load_backbone

N_ITEMS, E, H = 12, 6, 5


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


def _build(path, interaction="full", use_spa=True, seed=0, gradient_checkpointing=False):
    torch.manual_seed(seed)
    backbone, kind = load_backbone(path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    collator = PromptCollator(tok, kind=kind, max_length=200, placeholder="<spa>" if use_spa else None)
    item_ids = torch.arange(10, 10 + N_ITEMS)
    model = ReLLaXModel(
        backbone,
        kind,
        (collator.no_token_id, collator.yes_token_id),
        ReLLaXOptions(
            cflora={"interaction": interaction, "backend": "reference", "dropout": 0.0},
            use_spa=use_spa,
            gradient_checkpointing=gradient_checkpointing,
        ),
        item_table=torch.randn(N_ITEMS, E),
        item_ids=item_ids,
        cond_dim=H,
    )
    # make every adapter tensor non-trivial (B = 0 and a zero generator output layer at init are no-ops)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    batch = collator(_samples())
    batch["cond"] = torch.randn(3, H)
    return model.eval(), batch, kind


@pytest.mark.parametrize("interaction", ["full", "moe", "recrank1"])
def test_conditioning_reaches_every_cflora_layer(tiny_bert_dir, interaction):
    model, batch, _ = _build(tiny_bert_dir, interaction)
    layers = cflora_layers(model.backbone)
    assert len(layers) == 4  # query and value of 2 layers
    seen, outputs = {}, {}
    hooks = [
        layer.interaction.register_forward_hook(
            lambda m, a, o, n=n: seen.__setitem__(n, a[0].detach().clone())
        )
        for n, layer in layers
    ]
    hooks += [
        layer.register_forward_hook(lambda m, a, o, n=n: outputs.__setitem__(n, o.detach().clone()))
        for n, layer in layers
    ]
    model(batch)
    first = dict(outputs)
    assert set(seen) == {n for n, _ in layers}
    for n in seen:  # each layer received the standardised DIN vector of its own samples
        torch.testing.assert_close(seen[n], model.condition(batch["cond"]))
    batch2 = dict(batch, cond=torch.randn(3, H, generator=torch.Generator().manual_seed(7)))
    model(batch2)
    for n, _ in layers:  # and each layer's output depends on it
        assert not torch.allclose(first[n], outputs[n]), n
    for h in hooks:
        h.remove()


def test_identity_interaction_ignores_the_condition(tiny_bert_dir):
    model, batch, _ = _build(tiny_bert_dir, "identity")
    a = model(batch)
    b = model(dict(batch, cond=None))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_spa_changes_the_embeddings_at_placeholders_only(tiny_bert_dir):
    model, batch, _ = _build(tiny_bert_dir, "full", use_spa=True)
    mask = batch["placeholder_mask"]
    assert int(mask.sum()) == sum(len(s.shown) + 1 for s in _samples())
    with torch.no_grad():
        spa = model.input_embeddings(batch)
        plain = model.backbone.get_input_embeddings()(batch["input_ids"].masked_fill(mask, 0))
    assert torch.equal(spa[~mask], plain[~mask])
    assert not torch.isclose(spa[mask], plain[mask]).all(dim=-1).any()
    # the soft token of the target (last placeholder of each row) is the projection of the target item
    for b, s in enumerate(_samples()):
        last = torch.nonzero(mask[b]).flatten()[-1]
        expected = model.projector(torch.tensor([s.target[0] - 10]))[0]
        torch.testing.assert_close(spa[b, last], expected)


def test_unknown_placeholder_item_raises(tiny_bert_dir):
    model, batch, _ = _build(tiny_bert_dir)
    batch["placeholder_item_ids"] = batch["placeholder_item_ids"].masked_fill(
        batch["placeholder_item_ids"] == 11, 99
    )
    with pytest.raises(KeyError, match="unknown"):
        model(batch)


def test_encoder_readout_is_the_tied_embedding_verbaliser(tiny_bert_dir):
    model, batch, kind = _build(tiny_bert_dir, "identity", use_spa=False)
    assert kind == "encoder"
    logits = model(batch)
    with torch.no_grad():
        hidden = model.backbone(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        rows = hidden[torch.arange(3), batch["answer_index"]]
        w = model.backbone.get_input_embeddings().weight[model.answer_token_ids]
    torch.testing.assert_close(logits, rows @ w.T + model.verbaliser_bias, rtol=1e-5, atol=1e-5)
    p = click_probability(logits)
    assert p.shape == (3,) and torch.all((p > 0) & (p < 1))


def test_causal_readout_equals_the_lm_head_logits_at_the_answer_slot(tiny_gpt2_dir):
    model, batch, kind = _build(tiny_gpt2_dir, "full", use_spa=True)
    assert kind == "causal"
    assert [n.rsplit(".", 1)[-1] for n, _ in cflora_layers(model.backbone)] == ["c_attn", "c_attn"]
    logits = model(batch)
    from rellax_fast.cflora import cflora_condition

    with torch.no_grad(), cflora_condition(model.backbone, model.condition(batch["cond"])):
        full = model.backbone(
            inputs_embeds=model.input_embeddings(batch), attention_mask=batch["attention_mask"]
        ).logits
    expected = full[torch.arange(3), batch["answer_index"]][:, model.answer_token_ids]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # the answer slot is the last prompt token: the next label is the answer token
    for b in range(3):
        assert batch["labels"][b, batch["answer_index"][b] + 1] in model.answer_token_ids.tolist()


def test_stages_select_the_trainable_tensors(tiny_bert_dir):
    model, _, _ = _build(tiny_bert_dir, "full")
    model.set_stage("lora")
    names = set(model.trainable_state())
    assert names and all(("lora_" in n) or n == "verbaliser_bias" for n in names)
    model.set_stage("interaction")
    names = set(model.trainable_state())
    assert not any("lora_" in n for n in names)
    assert any(n.startswith("projector.") for n in names) and any(".interaction." in n for n in names)
    model.set_stage("joint")
    assert any("lora_" in n for n in model.trainable_state()) and any(
        n.startswith("projector.") for n in model.trainable_state()
    )
    assert not any(
        n.startswith("backbone.") and "lora_" not in n and ".interaction." not in n
        for n in model.trainable_state()
    )


def test_gradient_checkpointing_gives_the_same_gradients(tiny_bert_dir):
    grads = []
    for ckpt in (False, True):
        model, batch, _ = _build(tiny_bert_dir, "full", seed=3, gradient_checkpointing=ckpt)
        bb = model.backbone
        active = (
            bb.is_activation_checkpointing
            if hasattr(bb, "is_activation_checkpointing")
            else bb.is_gradient_checkpointing
        )
        assert active == ckpt
        model.train()
        torch.manual_seed(11)  # same dropout masks (checkpointing replays the RNG state)
        loss = torch.nn.functional.cross_entropy(model(batch), batch["label"].long())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)
    assert any(".interaction." in n and grads[1][n].abs().sum() > 0 for n in grads[1])
