"""Sliced metrics (issue #27): band membership checked by hand and against a Python loop on the synthetic data,
per-band statistics equal to ``train.stats`` on the band's samples, bands too small to test say so, and one
membership for every row."""

import numpy as np
import pytest

from rellax_fast.data.ctr import prepare_ctr
from rellax_fast.data.synthetic import make_synthetic
from rellax_fast.train import slices, stats


def test_slice_codes_by_hand_at_every_band_edge():
    # train targets: item 1 once, item 2 five times, item 3 six times, item 4 twenty times, item 5 21 times
    train_items = np.repeat([1, 2, 3, 4, 5], [1, 5, 6, 20, 21])
    train_users = np.array([10, 11])
    codes = slices.slice_codes(
        target_items=[0, 1, 2, 3, 4, 5],
        users=[10, 11, 12, 10, 99, 11],
        history_lengths=[5, 9, 10, 49, 50, 200],
        train_items=train_items,
        train_users=train_users,
    )
    bands = {k: [slices.SLICINGS[k][c] for c in v] for k, v in codes.items()}
    assert bands["item_train_count"] == ["0", "1–5", "1–5", "6–20", "6–20", ">20"]
    assert bands["user_in_train"] == ["seen", "seen", "unseen", "seen", "unseen", "seen"]
    assert bands["history_length"] == ["<10", "<10", "10–49", "10–49", "50–199", "≥200"]


def test_compute_slices_on_the_synthetic_data_matches_a_python_loop(tmp_path):
    data = prepare_ctr(make_synthetic(seed=3, n_users=40, n_items=60, n_ratings=1200), seed=0)
    train, test = data.splits["train"], data.splits["test"]
    got = slices.compute_slices(data, test, "test")
    assert got.n == len(test) and got.source["split"] == "test"
    train_items, train_users = list(train.item_id), set(train.user_id.tolist())
    for i in range(len(test)):
        count = train_items.count(int(test.item_id[i]))
        band = "0" if count == 0 else "1–5" if count <= 5 else "6–20" if count <= 20 else ">20"
        assert slices.SLICINGS["item_train_count"][got.codes["item_train_count"][i]] == band
        assert got.codes["user_in_train"][i] == (int(test.user_id[i]) in train_users)
        h = int(test.pos[i])
        band = "<10" if h < 10 else "10–49" if h < 50 else "50–199" if h < 200 else "≥200"
        assert slices.SLICINGS["history_length"][got.codes["history_length"][i]] == band
    # stored once, read back identically
    slices.save_slices(tmp_path / "slices.json", got)
    back = slices.load_slices(tmp_path / "slices.json")
    assert back.source == got.source
    for k in slices.SLICINGS:
        np.testing.assert_array_equal(back.codes[k], got.codes[k])


def _planted(n, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(float)
    good = np.clip(0.5 + 0.3 * (y - 0.5) + 0.2 * rng.standard_normal(n), 0.01, 0.99)
    weak = np.clip(0.5 + 0.05 * (y - 0.5) + 0.2 * rng.standard_normal(n), 0.01, 0.99)
    return y, good, weak


def test_band_statistics_equal_train_stats_on_the_band_and_small_bands_say_so():
    n = 400
    y, good, weak = _planted(n)
    codes = {
        "item_train_count": np.r_[np.zeros(10), np.full(n - 10, 3)].astype(np.int8),
        "user_in_train": np.r_[np.zeros(300), np.ones(100)].astype(np.int8),
        "history_length": np.zeros(n, np.int8),
    }
    y[:10] = 1  # the 10-sample band '0' is single-class
    s = slices.SliceSet(codes, {"split": "test"})
    got = slices.slice_statistics(y, good, s, reference=weak, n_boot=50)
    cold = got["item_train_count"]["0"]
    assert cold["status"].startswith("single class") and "vs_ref" not in cold and "auc" not in cold
    assert got["item_train_count"]["1–5"] == {"n": 0, "n_pos": 0, "status": "empty"}
    warm = got["item_train_count"][">20"]
    m = codes["item_train_count"] == 3
    assert warm["status"] is None and warm["n"] == n - 10 and warm["n_pos"] == int(y[m].sum())
    dl = stats.delong_test(y[m], good[m], weak[m])
    assert warm["vs_ref"]["d_auc"] == pytest.approx(dl["diff"]) and warm["vs_ref"]["p_auc"] == pytest.approx(
        dl["p"]
    )
    assert warm["vs_ref"]["p_auc"] < 0.05  # the planted gap is found
    assert warm["auc_ci"][0] <= warm["auc"] <= warm["auc_ci"][1]
    assert warm["auc"] == pytest.approx(stats.auc(y[m], good[m]))
    # a band with both labels but under MIN_SLICE_N samples: point values, no interval, no test
    small = slices.band_statistics(y[10:30], good[10:30], weak[10:30], n_boot=50)
    assert small["status"].startswith("too small to test (n=20") and "auc" in small and "vs_ref" not in small
    md = slices.slices_markdown(
        {"good": got, "weak": slices.slice_statistics(y, weak, s, reference=weak, n_boot=50)}
    )
    assert "single class (n=10)" in md and "(p=" in md and "(itself)" in md and "| 0 (n=10, 10 pos) |" in md
    assert (
        "**target item's train interactions: AUC**" in md
        and f"{warm['auc']:.4f} [{warm['auc_ci'][0]:.4f}" in md
    )
    ll = slices.slices_markdown({"good": got}, metric="logloss")
    assert "**user in train: LogLoss**" in ll and f"{warm['logloss']:.4f} [{warm['logloss_ci'][0]:.4f}" in ll
    assert f"vs DIN {stats.format_delta(warm['vs_ref'], 'logloss')}" in ll
    with pytest.raises(ValueError, match="metric: expected 'auc' or 'logloss'"):
        slices.slices_markdown({"good": got}, metric="acc")


def test_rows_cut_by_different_memberships_are_refused():
    y, good, weak = _planted(200)
    a = slices.SliceSet({k: np.zeros(200, np.int8) for k in slices.SLICINGS}, {})
    codes = {k: np.zeros(200, np.int8) for k in slices.SLICINGS}
    codes["user_in_train"][:7] = 1
    b = slices.SliceSet(codes, {})
    same = {
        "x": slices.slice_statistics(y, good, a, n_boot=20),
        "y": slices.slice_statistics(y, weak, a, n_boot=20),
    }
    slices.check_same_membership(same)
    other = {**same, "z": slices.slice_statistics(y, weak, b, n_boot=20)}
    with pytest.raises(ValueError, match="user_in_train=unseen: row 'z'.*same slice membership"):
        slices.check_same_membership(other)


def test_bad_shapes_name_the_argument():
    s = slices.SliceSet({k: np.zeros(5, np.int8) for k in slices.SLICINGS}, {})
    with pytest.raises(ValueError, match=r"labels, probs: expected shape \(5,\)"):
        slices.slice_statistics(np.zeros(4), np.zeros(4), s)
    with pytest.raises(ValueError, match=r"reference: expected shape \(5,\)"):
        slices.slice_statistics(np.zeros(5), np.zeros(5), s, reference=np.zeros(3))
