"""DIN: padded history arrays, learning a planted signal, early stopping/freezing, save/load, h and item table."""

import numpy as np
import pytest
import torch

from rellax_fast.ctr.din import (
    DIN,
    DINConfig,
    DINTrainConfig,
    history_arrays,
    load_din,
    make_arrays,
    predict,
    save_din,
    train_din,
)


def test_history_arrays_match_a_python_loop():
    rng = np.random.default_rng(0)
    lengths = np.array([0, 1, 7, 30, 3])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = rng.integers(0, 50, offsets[-1])
    ratings = rng.integers(1, 6, offsets[-1]).astype(np.float32)
    users = np.array([1, 2, 2, 3, 3, 4])
    pos = np.array([0, 0, 6, 29, 4, 2])
    L = 5
    got_items, got_ratings = history_arrays(offsets, items, ratings, users, pos, L)
    for s, (u, p) in enumerate(zip(users, pos)):
        hist = items[offsets[u] : offsets[u] + p][-L:]
        hr = ratings[offsets[u] : offsets[u] + p][-L:]
        expect = np.zeros(L, np.int64)
        expect_r = np.zeros(L, np.float32)
        if len(hist):
            expect[-len(hist):] = hist + 1
            expect_r[-len(hist):] = hr
        np.testing.assert_array_equal(got_items[s], expect)
        np.testing.assert_array_equal(got_ratings[s], expect_r)


def test_history_arrays_reject_bad_input():
    offsets = np.array([0, 3])
    with pytest.raises(ValueError, match="pos runs past"):
        history_arrays(offsets, np.arange(3), np.ones(3), np.array([0]), np.array([4]), 2)
    with pytest.raises(ValueError, match="max_len"):
        history_arrays(offsets, np.arange(3), np.ones(3), np.array([0]), np.array([1]), 0)


def _planted(n_users=60, n_items=40, per_user=40, seed=0):
    """Users like items of their own group; liked items in the history carry high ratings."""
    rng = np.random.default_rng(seed)
    user_group = rng.integers(0, 2, n_users)
    item_group = rng.integers(0, 2, n_items)
    items = rng.integers(0, n_items, (n_users, per_user))
    label = (item_group[items] == user_group[:, None]).astype(np.float32)
    flip = rng.random(label.shape) < 0.1
    label = np.where(flip, 1 - label, label)
    ratings = np.where(label > 0, 5.0, 1.0).astype(np.float32)
    offsets = np.arange(n_users + 1) * per_user
    user_index = np.repeat(np.arange(n_users), per_user - 5)
    pos = np.tile(np.arange(5, per_user), n_users)
    flat = offsets[user_index] + pos
    return offsets, items.reshape(-1), ratings.reshape(-1), user_index, pos, items.reshape(-1)[flat], label.reshape(-1)[flat]


def test_din_learns_a_planted_signal_and_is_frozen(tmp_path):
    offsets, items, ratings, users, pos, target, label = _planted()
    idx = np.random.default_rng(1).permutation(len(pos))
    parts = np.split(idx, [int(0.7 * len(idx)), int(0.85 * len(idx))])
    arrays = [make_arrays(offsets, items, ratings, users[p], pos[p], target[p], label[p], 20) for p in parts]
    cfg = DINConfig(n_items=40, n_users=0, embed_dim=8, attention_hidden=8, mlp_hidden=(16, 8), max_history=20)
    model, report = train_din(cfg, *arrays, DINTrainConfig(epochs=15, batch_size=128, lr=1e-2, patience=3, progress=False))
    assert report.test["auc"] > 0.8, report
    assert 1 <= report.best_epoch <= 15 and len(report.history) >= report.best_epoch
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    p, h = predict(model, arrays[2], with_h=True)
    assert p.shape == (len(arrays[2]),) and h.shape == (len(arrays[2]), 8)
    assert torch.all((p > 0) & (p < 1)) and torch.isfinite(h).all()
    assert model.item_embeddings().shape == (40, 8)
    # save / load round trip gives identical outputs
    save_din(model, tmp_path / "din", extra={"note": "x"})
    loaded, meta = load_din(tmp_path / "din")
    assert meta["note"] == "x"
    p2, h2 = predict(loaded, arrays[2], with_h=True)
    assert torch.equal(p, p2) and torch.equal(h, h2)
    assert not any(f.name.endswith(".tmp") for f in (tmp_path / "din").iterdir())


def test_din_says_when_it_stops_early(capsys):
    """#25.10: early stopping used to end DIN training silently (epoch 3 of 4); it now says why, and which epoch is
    kept. A learning rate too small to move the valid AUC stops it after 1 + patience epochs."""
    offsets, items, ratings, users, pos, target, label = _planted()
    parts = np.split(np.random.default_rng(1).permutation(len(pos)), [int(0.7 * len(pos))])
    arrays = [make_arrays(offsets, items, ratings, users[p], pos[p], target[p], label[p], 20) for p in parts]
    cfg = DINConfig(n_items=40, n_users=0, embed_dim=8, attention_hidden=8, mlp_hidden=(16, 8), max_history=20)
    _, report = train_din(cfg, *arrays, train_config=DINTrainConfig(epochs=6, batch_size=512, lr=1e-12, patience=2, progress=True))
    out = capsys.readouterr().out
    assert len(report.history) == 3 and report.best_epoch == 1
    assert "DIN: early stopping after epoch 3 of 6 (no valid-AUC gain for 2 epoch(s)); keeping epoch 1 (valid AUC " in out
    _, report = train_din(cfg, *arrays, train_config=DINTrainConfig(epochs=2, batch_size=512, lr=1e-12, patience=2, progress=True))
    assert "early stopping" not in capsys.readouterr().out  # ran every epoch: nothing to say


def test_din_padding_does_not_leak_into_h():
    """Changing the rating or id stored at a padded slot must not change h (padding is masked)."""
    cfg = DINConfig(n_items=10, n_users=3, embed_dim=4, attention_hidden=4, mlp_hidden=(8,), max_history=4)
    torch.manual_seed(0)
    model = DIN(cfg).eval()
    a = make_arrays(np.array([0, 2, 6, 6]), np.array([1, 2, 3, 4, 5, 6]), np.array([1, 2, 3, 4, 5, 1], np.float32),
                    np.array([0, 1]), np.array([1, 3]), np.array([7, 8]), np.array([1, 0]), 4)
    h = model.hidden(a)
    a.hist_ratings[a.hist_items == 0] = 5.0
    torch.testing.assert_close(model.hidden(a), h, rtol=0, atol=0)


def test_load_din_missing_folder_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-ctr"):
        load_din(tmp_path)
