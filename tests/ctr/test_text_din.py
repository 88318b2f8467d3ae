"""The text-aware DIN baseline (issue #27): it reads the item text (a signal plain DIN cannot see on items it
never trained on), its text table is aligned with the DIN vocabulary, padding stays zero, bad input is named,
and the seeded train subset of the few-samples curve."""

import numpy as np
import pytest
import torch

from rellax_fast.ctr.din import DINConfig, DINTrainConfig, make_arrays, predict, train_din
from rellax_fast.ctr.text_din import TextDIN, fit_text_din, item_text_table, train_subset_view
from rellax_fast.metrics import ctr_metrics


def _cold_item_task(seed=0, n_items=80, n_warm=60, n_users=50, per_user=60, d_text=8):
    """Clicks depend only on the target item's group, which its text embedding encodes; the test targets are
    items never seen in train or valid (cold), so only the text can tell their group."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, n_items)
    text = rng.standard_normal((n_items, d_text)).astype(np.float32) * 0.3
    text[:, 0] += np.where(group == 1, 1.0, -1.0)
    offsets = np.arange(n_users + 1) * per_user
    items = rng.integers(0, n_warm, n_users * per_user)
    ratings = rng.integers(1, 6, items.size).astype(np.float32)
    users = np.repeat(np.arange(n_users), per_user - 1)
    pos = np.tile(np.arange(1, per_user), n_users)
    targets = rng.integers(0, n_warm, users.size)
    cold = rng.integers(n_warm, n_items, users.size)
    flip = rng.random(users.size) < 0.1

    def arrays(mask, tgt):
        y = np.where(flip[mask], 1 - group[tgt[mask]], group[tgt[mask]]).astype(np.float32)
        return make_arrays(offsets, items, ratings, users[mask], pos[mask], tgt[mask], y, 10)

    split = rng.random(users.size)
    return (
        text,
        arrays(split < 0.7, targets),
        arrays((split >= 0.7) & (split < 0.85), targets),
        arrays(split >= 0.85, cold),
    )


def test_text_din_reads_the_item_text_on_cold_items_where_din_cannot():
    text, train, valid, test = _cold_item_task()
    cfg = DINConfig(n_items=80, n_users=50, embed_dim=8, attention_hidden=8, mlp_hidden=(16,), max_history=10)
    tc = DINTrainConfig(epochs=6, batch_size=128, lr=5e-3, patience=2, progress=False)
    plain, _ = train_din(cfg, train, valid, train_config=tc)
    texty, report = train_din(
        cfg, train, valid, train_config=tc, build=lambda c: TextDIN(c, torch.from_numpy(text))
    )
    assert isinstance(texty, TextDIN) and report.best_epoch >= 1
    auc_plain = ctr_metrics(test.label.numpy(), predict(plain, test).numpy())["auc"]
    auc_text = ctr_metrics(test.label.numpy(), predict(texty, test).numpy())["auc"]
    assert auc_text > 0.8 and auc_plain < 0.65, (auc_text, auc_plain)
    # frozen like DIN: the text table is a buffer, never trained; h has DIN's width
    assert not any(p.requires_grad for p in texty.parameters()) and "text" in dict(texty.named_buffers())
    logit, h = texty(test.batch(torch.arange(4)))
    assert logit.shape == (4,) and h.shape == (4, cfg.h_dim)


def test_padding_rows_are_zero_and_bad_text_is_named():
    cfg = DINConfig(n_items=5, n_users=0, embed_dim=4, attention_hidden=4, mlp_hidden=(8,), max_history=3)
    model = TextDIN(cfg, torch.randn(5, 6))
    assert torch.equal(model.projected_text(torch.tensor([0])), torch.zeros(1, 4))
    torch.testing.assert_close(model.text[1:].norm(dim=1), torch.ones(5))  # L2-normalised rows
    with pytest.raises(ValueError, match=r"text: expected shape \(5, d_text\).*got \(4, 6\)"):
        TextDIN(cfg, torch.randn(4, 6))
    with pytest.raises(ValueError, match="text: 1 non-finite"):
        TextDIN(cfg, torch.tensor([[float("nan")] + [0.0] * 5] + [[1.0] * 6] * 4))


def test_item_text_table_aligns_rows_with_the_vocabulary():
    emb = np.array([[1, 1], [2, 2], [3, 3]], np.float32)
    table = item_text_table(np.array([3, 5, 7, 9]), emb, [7, 3, 11])
    np.testing.assert_array_equal(table.numpy(), [[2, 2], [0, 0], [1, 1], [0, 0]])  # 5 and 9 have no text
    with pytest.raises(ValueError, match=r"item_emb: expected shape \(2, d\)"):
        item_text_table(np.array([3]), emb, [7, 3])


def test_train_subset_view_is_seeded_and_leaves_the_other_splits():
    from rellax_fast.data.ctr import prepare_ctr
    from rellax_fast.data.synthetic import make_synthetic

    data = prepare_ctr(make_synthetic(seed=3, n_users=40, n_items=60, n_ratings=1200), seed=0)
    a, b, c = (
        train_subset_view(data, 100, 0),
        train_subset_view(data, 100, 0),
        train_subset_view(data, 100, 1),
    )
    assert len(a.splits["train"]) == 100 and a.splits["test"] is data.splits["test"]
    np.testing.assert_array_equal(a.splits["train"].pos, b.splits["train"].pos)
    assert not np.array_equal(a.splits["train"].user_index, c.splits["train"].user_index)
    assert len(data.splits["train"]) > 100  # the original is untouched
    assert train_subset_view(data, 0, 0) is data and train_subset_view(data, 10**9, 0) is data
    with pytest.raises(ValueError, match="n: expected a number of train samples >= 0"):
        train_subset_view(data, -1, 0)
    # fit on the subset: trains and reports valid/test like DIN
    rng = np.random.default_rng(0)
    ids = list(data.dataset.items.index)
    model, report, vocab = fit_text_din(
        a,
        rng.standard_normal((len(ids), 6)).astype(np.float32),
        ids,
        {"embed_dim": 4, "mlp_hidden": (8,), "max_history": 5},
        DINTrainConfig(epochs=1, progress=False),
    )
    assert (
        isinstance(model, TextDIN)
        and 0 <= report.valid["auc"] <= 1
        and report.test["n"] == len(data.splits["test"])
    )
    assert model.text.shape == (len(vocab) + 1, 6)
