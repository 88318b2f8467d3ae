"""The trainer's throughput and model-selection features (issue #14, item 3): the per-sample token cache,
length-grouped batches, per-group learning rates, and best-on-valid selection that survives a resume."""

import json

import numpy as np
import pytest
import torch
from test_resume import _config, _dataset, _model

from rellax_fast.train.checkpoint import latest_checkpoint
from rellax_fast.train.trainer import (
    LENGTH_MEGABATCH,
    PARAM_GROUPS,
    PromptDataset,
    TrainConfig,
    epoch_order,
    param_group_of,
    param_groups,
    predict_proba,
    train_model,
)


class _CountingCollator:
    """Wraps a PromptCollator and counts encode() calls per sample index."""

    def __init__(self, collator):
        self.inner, self.calls = collator, {}

    def encode(self, sample):
        self.calls[sample.sample_index] = self.calls.get(sample.sample_index, 0) + 1
        return self.inner.encode(sample)

    def pad(self, encoded):
        return self.inner.pad(encoded)

    def __call__(self, samples):
        return self.pad([self.encode(s) for s in samples])


def test_token_cache_encodes_each_sample_once_and_gives_the_uncached_batches(tiny_bert_dir):
    data, collator = _dataset(tiny_bert_dir, n=11)
    counting = _CountingCollator(collator)
    cached = PromptDataset(data.samples, counting, data.cond)
    idx = [4, 0, 9, 4, 10]
    for _ in range(3):
        got = cached.batch(idx)
    cached.lengths()
    assert counting.calls == {i: 1 for i in range(11)}
    want = data.batch(idx)  # the plain collator path (no cache shared with `cached`)
    assert set(got) == set(want)
    for k in want:
        if isinstance(want[k], torch.Tensor):
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    np.testing.assert_array_equal(
        cached.lengths(), [len(collator.encode(s)["input_ids"]) for s in data.samples]
    )
    with pytest.raises(ValueError, match="at least one encoded sample"):
        collator.pad([])


def test_length_groups_cover_every_sample_once_and_cut_padding(tiny_bert_dir):
    data, _ = _dataset(tiny_bert_dir, n=203, seed=4)
    lengths = data.lengths()
    batch = 4
    plain = TrainConfig(batch_size=batch, seed=7)
    grouped = TrainConfig(batch_size=batch, seed=7, group_by_length=True)

    def padded(order):
        return sum(
            int(lengths[order[i : i + batch]].max()) * len(order[i : i + batch])
            for i in range(0, len(order), batch)
        )

    for epoch in (0, 1):
        a = epoch_order(data, plain, epoch, batch).numpy()
        b = epoch_order(data, grouped, epoch, batch).numpy()
        assert sorted(b.tolist()) == list(range(len(data)))  # a permutation: every sample once
        np.testing.assert_array_equal(
            b, epoch_order(data, grouped, epoch, batch).numpy()
        )  # deterministic (resume)
        assert padded(b) < padded(a)
        # within a megabatch the batches hold disjoint length ranges (cut from one length-sorted order)
        mega = LENGTH_MEGABATCH * batch
        for m0 in range(0, len(b), mega):
            spans = [
                (lengths[b[i : i + batch]].min(), lengths[b[i : i + batch]].max())
                for i in range(m0, min(m0 + mega, len(b)), batch)
            ]
            spans.sort()
            assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:])), spans
    # the short last batch stays last
    tail = len(data) % batch
    assert (
        tail
        and len(set(epoch_order(data, grouped, 0, batch)[-tail:].tolist()) & set(range(len(data)))) == tail
    )


def test_param_groups_take_their_own_learning_rates(tiny_bert_dir):
    _, collator = _dataset(tiny_bert_dir, n=4)
    model = _model(tiny_bert_dir, collator, 0)
    names = {n: param_group_of(n) for n, p in model.named_parameters() if p.requires_grad}
    kinds = set(names.values())
    assert kinds == {"lora", "generator", "projector", "readout"}  # readout: the encoder's verbaliser bias
    assert all(param_group_of("module." + n) == g for n, g in names.items())  # DDP's wrapper prefix
    groups = param_groups(model, 1e-3, {"generator": 5e-3, "projector": 0.0})
    by_name = {g["name"]: g for g in groups}
    assert (
        by_name["lora"]["lr"] == 1e-3
        and by_name["generator"]["lr"] == 5e-3
        and by_name["projector"]["lr"] == 0.0
    )
    assert sum(len(g["params"]) for g in groups) == len(names)
    with pytest.raises(ValueError, match=r"lr_groups: unknown group\(s\) \['lorra'\]"):
        param_groups(model, 1e-3, {"lorra": 1e-3})
    with pytest.raises(
        ValueError, match=r"lr_groups\['lora'\]: expected a finite learning rate >= 0, got -1"
    ):
        param_groups(model, 1e-3, {"lora": -1})
    assert set(PARAM_GROUPS) == {"lora", "generator", "projector", "readout"}


def test_a_zero_group_learning_rate_freezes_that_group_in_training(tiny_bert_dir, tmp_path):
    data, collator = _dataset(tiny_bert_dir, n=16)
    model = _model(tiny_bert_dir, collator, 0)
    before = {n: p.detach().clone() for n, p in model.trainable_state().items()}
    res = train_model(model, data, _config(lr_groups={"projector": 0.0}), tmp_path, log=lambda *_: None)
    after = res["model"].trainable_state()
    moved = {param_group_of(n) for n in before if not torch.equal(before[n], after[n])}
    assert "projector" not in moved and "lora" in moved


def test_best_on_valid_is_kept_and_a_resumed_run_selects_the_same(tiny_bert_dir, tmp_path):
    data, collator = _dataset(tiny_bert_dir, n=36)
    valid, _ = _dataset(tiny_bert_dir, n=30, seed=1)
    cfg = _config(eval_every_steps=2)
    logs = []
    ref = train_model(
        _model(tiny_bert_dir, collator, 0), data, cfg, tmp_path / "ref", valid=valid, log=logs.append
    )
    hist = ref["valid"]
    assert [r["step"] for r in hist] == [2, 4, 5, 6, 8, 10]  # every 2 steps and at both epoch ends
    best = max(hist, key=lambda r: r["auc"])
    assert ref["best"]["step"] == best["step"] and ref["best"]["auc"] == best["auc"]
    # the returned model is the selected one: it scores the best AUC on valid again
    from rellax_fast.metrics import ctr_metrics

    again_probs = predict_proba(ref["model"], valid, progress=False)
    again = ctr_metrics(valid.labels(), again_probs)["auc"]
    assert again == pytest.approx(best["auc"], abs=1e-9)
    # ... and the selection hands back its valid probabilities, so callers need not score valid again
    np.testing.assert_allclose(ref["valid_probs"], again_probs, rtol=1e-6, atol=1e-7)
    if best["step"] != hist[-1]["step"]:
        assert any("kept the trainable tensors of step" in line for line in logs)

    # interrupted after step 7 (checkpoint at 6), resumed with a fresh init: the same history and selection
    with pytest.raises(KeyboardInterrupt):
        train_model(
            _model(tiny_bert_dir, collator, 0),
            data,
            _config(eval_every_steps=2, stop_after_steps=7),
            tmp_path / "run",
            valid=valid,
            log=lambda *_: None,
        )
    ckpt = latest_checkpoint(tmp_path / "run")
    saved = json.loads((ckpt / "state.json").read_text())
    assert [r["step"] for r in saved["valid"]] == [2, 4, 5, 6] and (ckpt / "best.safetensors").exists()
    res = train_model(
        _model(tiny_bert_dir, collator, 1),
        data,
        cfg,
        tmp_path / "run",
        resume=True,
        valid=valid,
        log=lambda *_: None,
    )
    assert res["valid"] == hist and res["best"] == ref["best"]
    for k, v in ref["model"].trainable_state().items():
        torch.testing.assert_close(res["model"].trainable_state()[k], v, rtol=0, atol=0, msg=k)
    # a step selected before the resume was scored by the killed process: unknown here, never stale
    if best["step"] <= 6:
        assert res["valid_probs"] is None
    else:
        np.testing.assert_allclose(res["valid_probs"], again_probs, rtol=1e-6, atol=1e-7)


def test_without_selection_the_last_step_is_kept(tiny_bert_dir, tmp_path):
    data, collator = _dataset(tiny_bert_dir, n=24)
    valid, _ = _dataset(tiny_bert_dir, n=20, seed=2)
    a = train_model(
        _model(tiny_bert_dir, collator, 0),
        data,
        _config(eval_every_steps=1, select_best=False),
        tmp_path / "a",
        valid=valid,
        log=lambda *_: None,
    )
    b = train_model(_model(tiny_bert_dir, collator, 0), data, _config(), tmp_path / "b", log=lambda *_: None)
    assert len(a["valid"]) == a["global_step"] and b["valid"] == [] and b["best"] is None
    # without selection the returned model is the last step's, whose valid scores were the last ones taken
    np.testing.assert_allclose(
        a["valid_probs"], predict_proba(a["model"], valid, progress=False), rtol=1e-6, atol=1e-7
    )
    assert b["valid_probs"] is None
    for k, v in b["model"].trainable_state().items():
        torch.testing.assert_close(a["model"].trainable_state()[k], v, rtol=0, atol=0, msg=k)


def test_one_process_trains_in_fp32_then_bf16_then_fp32(tiny_bert_dir, tmp_path):
    """accelerate's process-wide state would refuse the second precision ("restart your runtime"); the trainer
    gives a single process a fresh state when the precision changes. bf16 autocast runs on any CPU (emulated
    where not native), only slower."""
    data, collator = _dataset(tiny_bert_dir, n=8)
    losses = {}
    for i, precision in enumerate(("no", "bf16", "no")):
        cfg = TrainConfig(epochs=1, batch_size=8, lr=5e-3, progress=False, seed=3, mixed_precision=precision)
        res = train_model(
            _model(tiny_bert_dir, collator, 0), data, cfg, tmp_path / str(i), log=lambda *_: None
        )
        losses[i] = res["losses"]
    assert losses[0] == losses[2]  # fp32 again: the same run
    assert losses[1] != losses[0] and np.allclose(losses[1], losses[0], atol=0.05)  # bf16: close, not equal
