"""The residual read-out (#14, beyond the paper): p(click) = sigmoid((logit_Yes - logit_No) + lambda * DIN_logit),
with DIN_logit the frozen DIN's output layer on the batch's h; lambda learned (init 1) or fixed at 1. Checked on a
tiny BERT: the math against a float64 reference, lambda's gradient against its closed form and finite
differences, what is trainable and saved, bad options, and a pipeline run that eval reloads exactly."""

import json
import zlib

import numpy as np
import pytest
import torch

from rellax_fast.data.collate import PromptCollator, PromptSample
from rellax_fast.train.model import ReLLaXModel, ReLLaXOptions, click_probability, load_backbone
from rellax_fast.train.trainer import answer_loss_sum

N_ITEMS, E, H = 12, 6, 5


def _samples(n=4):
    out = []
    for i in range(n):
        shown = [(10 + j, f"Movie {j} (199{j})", float(1 + (i + j) % 5)) for j in range(2 + i)]
        out.append(PromptSample("movie", None, shown, (11 + i, f"Target {i}"), i % 2, i))
    return out


def _build(
    path, readout="residual", readout_lambda="learned", interaction="full", din_head=True, seed=0, gate=True
):
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    backbone, kind = load_backbone(path)
    tok = AutoTokenizer.from_pretrained(path)
    collator = PromptCollator(tok, kind=kind, max_length=200, placeholder="<spa>")
    g = torch.Generator().manual_seed(99)
    head = (torch.randn(1, H, generator=g), torch.randn(1, generator=g)) if din_head else None
    model = ReLLaXModel(
        backbone,
        kind,
        (collator.no_token_id, collator.yes_token_id),
        ReLLaXOptions(
            cflora={"interaction": interaction, "backend": "reference", "dropout": 0.0},
            readout=readout,
            readout_lambda=readout_lambda,
            readout_gate=gate,
        ),
        item_table=torch.randn(N_ITEMS, E, generator=g),
        item_ids=torch.arange(10, 10 + N_ITEMS),
        cond_dim=H,
        din_head=head,
    )
    with torch.no_grad():  # non-trivial adapters, the same for every read-out (keyed by name, not by order)
        for name, p in model.named_parameters():
            if p.requires_grad and name not in ("readout_lambda", "readout_gate"):
                p.copy_(
                    torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
                    * 0.3
                )
    batch = collator(_samples())
    batch["cond"] = torch.randn(4, H, generator=torch.Generator().manual_seed(5))
    return model.eval(), batch, head


def test_residual_adds_lambda_times_the_din_logit_to_the_paper_margin(tiny_bert_dir):
    paper, batch, _ = _build(tiny_bert_dir, readout="paper")
    model, _, (w, b) = _build(tiny_bert_dir, gate=False)
    with torch.no_grad():
        model.readout_lambda.fill_(0.7)
        base = paper(batch).double()
        got = model(batch).double()
    din_logit = batch["cond"].double() @ w.double().reshape(-1) + b.double()
    torch.testing.assert_close(got[:, 0], base[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 1], base[:, 1] + 0.7 * din_logit, rtol=1e-5, atol=1e-5)
    expected_p = torch.sigmoid(base[:, 1] - base[:, 0] + 0.7 * din_logit)
    torch.testing.assert_close(click_probability(got).double(), expected_p, rtol=1e-5, atol=1e-6)
    # the DIN logit is the frozen DIN output layer on the raw h (not the standardised condition)
    torch.testing.assert_close(model.din_logit(batch["cond"]).double(), din_logit, rtol=1e-5, atol=1e-5)


def test_gated_residual_starts_as_the_frozen_din_then_adds_the_gated_margin(tiny_bert_dir):
    paper, batch, _ = _build(tiny_bert_dir, readout="paper")
    model, _, (w, b) = _build(tiny_bert_dir)
    assert model.select_from_start and not paper.select_from_start
    assert float(model.readout_gate.detach()) == 0.0 and "readout_gate" in model.trainable_state()
    din_logit = batch["cond"].double() @ w.double().reshape(-1) + b.double()
    with torch.no_grad():
        # untrained: exactly DIN's probability, whatever the (random, non-trivial) adapters say
        torch.testing.assert_close(
            click_probability(model(batch)).double(), torch.sigmoid(din_logit), rtol=1e-5, atol=1e-6
        )
        model.readout_gate.fill_(-0.4)
        model.readout_lambda.fill_(1.3)
        margin = paper(batch).double()
        expected = torch.sigmoid(-0.4 * (margin[:, 1] - margin[:, 0]) + 1.3 * din_logit)
        torch.testing.assert_close(click_probability(model(batch)).double(), expected, rtol=1e-5, atol=1e-6)
    # at gate 0 the gate's own gradient is the closed form mean((p - y) * margin); the LM side gets none yet
    with torch.no_grad():
        model.readout_gate.zero_()
        model.readout_lambda.fill_(1.0)
    label = torch.tensor([0, 1, 1, 0])
    mean_loss(model(batch), label).backward()
    p = torch.sigmoid(din_logit)
    closed = float(((p - label.double()) * (margin[:, 1] - margin[:, 0])).mean())
    assert model.readout_gate.grad.item() == pytest.approx(closed, rel=1e-4, abs=1e-6)
    lora_b = [q for n, q in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(q.grad is None or float(q.grad.abs().sum()) == 0 for q in lora_b)


def mean_loss(logits, label):
    """The trainer's loss (a sum over the global batch) per sample."""
    return answer_loss_sum(logits, label) / len(label)


def test_lambda_gradient_matches_closed_form_and_finite_differences(tiny_bert_dir):
    model, batch, (w, b) = _build(tiny_bert_dir, gate=False)
    label = torch.tensor([0, 1, 1, 0])
    loss = mean_loss(model(batch), label)
    loss.backward()
    with torch.no_grad():
        p = click_probability(model(batch)).double()
        d = batch["cond"].double() @ w.double().reshape(-1) + b.double()
        closed = float(((p - label.double()) * d).mean())  # d/dlambda of mean BCE(sigmoid(m + lambda d), y)
        assert model.readout_lambda.grad.item() == pytest.approx(closed, rel=1e-4, abs=1e-6)
        eps = 1e-2
        model.readout_lambda.add_(eps)
        up = float(mean_loss(model(batch), label))
        model.readout_lambda.sub_(2 * eps)
        down = float(mean_loss(model(batch), label))
    assert (up - down) / (2 * eps) == pytest.approx(closed, rel=2e-2, abs=1e-4)
    # the DIN head is a frozen buffer: never a parameter, never a gradient
    assert "din_out_weight" not in dict(model.named_parameters())
    assert "readout_lambda" in model.trainable_state()
    # gradients still reach the LM side (LoRA B) through the residual read-out
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora_b)


def test_fixed_lambda_is_one_and_not_trained(tiny_bert_dir):
    model, batch, _ = _build(tiny_bert_dir, readout_lambda="fixed", gate=False)
    assert "readout_lambda" not in dict(model.named_parameters())
    assert dict(model.named_buffers())["readout_lambda"].item() == 1.0
    assert "readout_lambda" not in model.trainable_state()
    learned, _, _ = _build(tiny_bert_dir, gate=False)
    with torch.no_grad():  # at init (lambda = 1) both give the same probabilities
        torch.testing.assert_close(click_probability(model(batch)), click_probability(learned(batch)))


def test_residual_works_without_conditioned_interaction(tiny_bert_dir):
    model, batch, _ = _build(tiny_bert_dir, interaction="identity", gate=False)
    with torch.no_grad():
        a = model(batch)
        batch2 = dict(batch, cond=batch["cond"] * 2)
        assert not torch.allclose(a[:, 1], model(batch2)[:, 1])  # the DIN term reads cond even for identity C


def test_bad_readout_options(tiny_bert_dir):
    with pytest.raises(ValueError, match="options.readout must be 'paper' or 'residual'"):
        _build(tiny_bert_dir, readout="sum")
    with pytest.raises(ValueError, match="options.readout_lambda must be 'learned' or 'fixed'"):
        _build(tiny_bert_dir, readout_lambda="frozen")
    with pytest.raises(ValueError, match="needs din_head"):
        _build(tiny_bert_dir, din_head=False)
    model, batch, _ = _build(tiny_bert_dir, interaction="identity")
    batch.pop("cond")
    with pytest.raises(ValueError, match=r"needs batch\['cond'\]"):
        model(batch)


def test_residual_run_reloads_exactly_in_eval(ml100k_slice, tiny_bert_dir, tmp_path):
    from rellax_fast.ctr.din import DINTrainConfig
    from rellax_fast.ctr.store import fit_din, save_ctr
    from rellax_fast.train.pipeline import (
        PipelineConfig,
        VariantSpec,
        build_context,
        pipeline_cflora_config,
        run_variant,
    )
    from rellax_fast.train.runs import score
    from rellax_fast.train.trainer import TrainConfig

    data = ml100k_slice
    din, report, vocab = fit_din(
        data,
        {"embed_dim": 8, "mlp_hidden": (16, 8), "max_history": 20, "attention_hidden": 8},
        DINTrainConfig(epochs=2, progress=False),
    )
    ctr_dir = save_ctr(din, vocab, report, tmp_path / "ctr", extra={"dataset": data.dataset.name})
    cfg = PipelineConfig(
        model=tiny_bert_dir,
        k=3,
        n_train=24,
        n_test=40,
        max_length=160,
        cflora=pipeline_cflora_config(backend="reference"),
        train=TrainConfig(batch_size=8, lr=3e-2, save_every_steps=0, progress=False),
    )
    ctx = build_context(data, din, vocab, report, cfg)
    ctx.ctr_dir = str(ctr_dir)
    spec = VariantSpec("residual", subr=False, spa=False, interaction="identity", readout="residual")
    res = run_variant(ctx, spec, cfg, tmp_path / "run")
    lam = float(res["model"].readout_lambda.detach())
    assert lam != 1.0  # trained
    meta = json.loads((tmp_path / "run" / "rellax.json").read_text())
    assert meta["variant"]["readout"] == "residual" and meta["variant"]["readout_lambda"] == "learned"
    _, probs, _, spec2 = score(tmp_path / "run", data, progress=False)
    assert spec2.readout == "residual"
    np.testing.assert_allclose(probs, np.load(tmp_path / "run" / "predictions.npy"), rtol=1e-5, atol=1e-6)


def _residual_run(data, tiny_bert_dir, tmp_path, lr, n_valid=0):
    from rellax_fast.ctr.din import DINTrainConfig
    from rellax_fast.ctr.store import fit_din, save_ctr
    from rellax_fast.train.pipeline import (
        PipelineConfig,
        VariantSpec,
        build_context,
        pipeline_cflora_config,
        run_variant,
    )
    from rellax_fast.train.trainer import TrainConfig

    din, report, vocab = fit_din(
        data,
        {"embed_dim": 8, "mlp_hidden": (16, 8), "max_history": 20, "attention_hidden": 8},
        DINTrainConfig(epochs=2, progress=False),
    )
    ctr_dir = save_ctr(din, vocab, report, tmp_path / "ctr", extra={"dataset": data.dataset.name})
    cfg = PipelineConfig(
        model=tiny_bert_dir,
        k=3,
        n_train=24,
        n_test=40,
        n_valid=n_valid,
        max_length=160,
        cflora=pipeline_cflora_config(backend="reference"),
        train=TrainConfig(batch_size=8, lr=lr, save_every_steps=0, progress=False, eval_every_steps=1),
    )
    ctx = build_context(data, din, vocab, report, cfg)
    ctx.ctr_dir = str(ctr_dir)
    spec = VariantSpec("residual", subr=False, spa=False, interaction="identity", readout="residual")
    return ctx, run_variant(ctx, spec, cfg, tmp_path / "run", log=lambda *_: None)


def test_residual_selection_scores_the_starting_din_and_keeps_it_when_training_only_hurts(
    ml100k_slice, tiny_bert_dir, tmp_path
):
    from rellax_fast.ctr.store import din_outputs
    from rellax_fast.metrics import ctr_metrics
    from rellax_fast.train.pipeline import subset_view

    # a learning rate this large wrecks the LM margin at once: every later valid score is below the start
    ctx, res = _residual_run(ml100k_slice, tiny_bert_dir, tmp_path, lr=30.0, n_valid=60)
    hist = json.loads((tmp_path / "run" / "loss.json").read_text())["valid"]
    assert hist[0]["step"] == 0 and len(hist) == 1 + 3  # step 0, then every step (24 samples, batch 8)
    p_din_valid, _ = din_outputs(ctx.din, subset_view(ctx.data, "valid", ctx.valid_index), ctx.vocab, "valid")
    labels = ctx.data.splits["valid"].label[ctx.valid_index]
    din_auc = ctr_metrics(labels, np.asarray(p_din_valid, np.float64))["auc"]
    assert hist[0]["auc"] == pytest.approx(din_auc, abs=1e-6)  # the untrained model is DIN exactly
    assert all(r["auc"] < hist[0]["auc"] for r in hist[1:])
    # kept: step 0, i.e. the frozen DIN; its test predictions are DIN's
    assert float(res["model"].readout_gate.detach()) == 0.0
    np.testing.assert_allclose(
        np.load(tmp_path / "run" / "predictions.npy"), ctx.din_test_probs, rtol=1e-5, atol=1e-6
    )


def test_a_residual_run_saved_before_the_gate_loads_ungated(ml100k_slice, tiny_bert_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from rellax_fast.train.runs import score

    _, res = _residual_run(ml100k_slice, tiny_bert_dir, tmp_path, lr=3e-2)
    assert float(res["model"].readout_gate.detach()) not in (0.0, 1.0)  # trained
    path = tmp_path / "run" / "trainable.safetensors"
    tensors = load_file(str(path))
    _, gated, _, _ = score(tmp_path / "run", ml100k_slice, progress=False)
    save_file(dict(tensors, readout_gate=torch.ones(())), str(path))
    _, gate_one, _, _ = score(tmp_path / "run", ml100k_slice, progress=False)
    save_file(
        {k: v for k, v in tensors.items() if k != "readout_gate"}, str(path)
    )  # the old run folders' form
    _, old, _, _ = score(tmp_path / "run", ml100k_slice, progress=False)
    assert not np.allclose(gated, gate_one)
    np.testing.assert_array_equal(old, gate_one)
