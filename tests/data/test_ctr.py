"""The paper's CTR preprocessing on real ml-100k, the BookCrossing rules, the parquet round trip, the CLI,
and the synthetic generator (deterministic, MovieLens-shaped, with signals that really predict the label)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from rellax_fast.data import (
    RecDataset,
    build_sequences,
    load_dataset,
    load_prepared,
    make_synthetic,
    mix_recent_and_retrieved,
    prepare_ctr,
    save_prepared,
)


@pytest.fixture(scope="module")
def ml100k_ctr():
    from rellax_testing import ml100k_dir

    return prepare_ctr(load_dataset("ml-100k", ml100k_dir(), download=False))


def test_ml100k_counts_and_labels(ml100k_ctr):
    ds = ml100k_ctr.dataset
    assert len(ds.ratings) == 100_000 and ds.n_users == 943 and ds.n_items == 1682
    assert ds.ratings["user_id"].nunique() == 943 and ds.ratings["item_id"].nunique() == 1682
    rate = float((ds.ratings["rating"] > 3).mean())
    assert rate == pytest.approx(55_375 / 100_000)  # 21,201 fours + 34,174 fives in u.data
    for s in ml100k_ctr.splits.values():
        np.testing.assert_array_equal(s.label, (s.rating > 3).astype(np.int8))


def test_ml100k_split_sizes_follow_8_1_1(ml100k_ctr):
    lengths = ml100k_ctr.sequences.lengths()
    n = int(np.maximum(lengths - 5, 0).sum())  # samples with at least 5 earlier ratings
    assert n == 100_000 - 943 * 5  # every ml-100k user has >= 20 ratings
    sizes = {k: len(s) for k, s in ml100k_ctr.splits.items()}
    assert sizes == {"train": int(n * 0.8), "valid": int(n * 0.1), "test": n - int(n * 0.8) - int(n * 0.1)}
    assert ml100k_ctr.meta["splits"]["test"]["n"] == sizes["test"]


def test_ml100k_no_time_leakage_and_histories_earlier(ml100k_ctr):
    tr, va, te = (ml100k_ctr.splits[k] for k in ("train", "valid", "test"))
    assert te.timestamp.min() >= tr.timestamp.max() and va.timestamp.min() >= tr.timestamp.max()
    assert te.timestamp.min() >= va.timestamp.max()
    seq = ml100k_ctr.sequences
    for split in (tr, te):
        assert (split.pos >= 5).all()
        rng = np.random.default_rng(0)
        for i in rng.choice(len(split), 300, replace=False):
            hist = split.history(i)
            assert len(hist) == split.pos[i]
            assert (split.history_timestamps(i) <= split.timestamp[i]).all()
            u = split.user_index[i]
            assert (
                seq.user_ids[u] == split.user_id[i]
                and seq.items[seq.offsets[u] + split.pos[i]] == split.item_id[i]
            )
            assert split.item_id[i] not in hist  # MovieLens: an item is rated once per user
    # the sequence itself is time ordered inside every user
    for u in range(len(seq)):
        assert np.all(np.diff(seq.timestamps[seq.offsets[u] : seq.offsets[u + 1]]) >= 0)
    # history = every earlier rating: the user's items at earlier positions, matched against the raw log
    r = ml100k_ctr.dataset.ratings
    i = int(np.argmax(te.pos))
    raw = r[r.user_id == te.user_id[i]]
    earlier = raw[raw.timestamp < te.timestamp[i]]
    assert set(earlier.item_id) <= set(te.history(i))


def test_history_arrays_match_history(ml100k_ctr):
    s = ml100k_ctr.splits["valid"].subset(np.arange(50))
    offsets, values = s.history_arrays()
    for i in range(50):
        np.testing.assert_array_equal(values[offsets[i] : offsets[i + 1]], s.history(i))


def test_save_load_roundtrip_and_parquet_columns(ml100k_ctr, tmp_path):
    save_prepared(ml100k_ctr, tmp_path, history_column="full")
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["splits"]["train"]["n"] == len(ml100k_ctr.splits["train"])
    assert meta["history_column"] == {"mode": "full", "max_history": None}
    df = pd.read_parquet(tmp_path / "test.parquet")
    for col in ("user_id", "item_id", "rating", "label", "timestamp", "history", "user_index", "pos"):
        assert col in df.columns
    te = ml100k_ctr.splits["test"]
    for i in (0, 17, len(te) - 1):
        assert list(df.history.iloc[i]) == te.history(i).tolist()
    back = load_prepared(tmp_path)
    for k, s in ml100k_ctr.splits.items():
        for f in ("user_index", "pos", "user_id", "item_id", "rating", "label", "timestamp"):
            np.testing.assert_array_equal(getattr(back.splits[k], f), getattr(s, f))
    np.testing.assert_array_equal(back.sequences.offsets, ml100k_ctr.sequences.offsets)
    assert back.dataset.items.loc[543, "title"] == "Misérables, Les (1995)"
    assert back.dataset.users.loc[1, "occupation"] == "technician"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cli_prepare(tmp_path, capsys):
    from rellax_testing import ml100k_dir

    from rellax_fast.cli import main

    rc = main(["prepare", "--dataset", "ml-100k", "--data-dir", str(ml100k_dir()), "--out", str(tmp_path)])
    assert rc == 0
    assert "train" in capsys.readouterr().out
    assert {p.name for p in tmp_path.iterdir()} >= {
        "train.parquet",
        "valid.parquet",
        "test.parquet",
        "meta.json",
    }
    rc = main(
        [
            "prepare",
            "--dataset",
            "ml-1m",
            "--data-dir",
            str(tmp_path / "none"),
            "--no-download",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2 and "ratings.dat" in capsys.readouterr().err


def _books(seed=0):
    rng = np.random.default_rng(seed)
    n_users, rows = 60, []
    for u in range(n_users):
        for _ in range(int(rng.integers(2, 15))):
            rows.append((u + 1, int(rng.integers(0, 300)), float(rng.integers(0, 11)), len(rows)))
    r = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).astype(
        {"user_id": "int64", "item_id": "int64", "rating": "float32", "timestamp": "int64"}
    )
    items = pd.DataFrame(
        {"title": [f"Book {i}" for i in range(300)]}, index=pd.Index(range(300), name="item_id")
    )
    return RecDataset("bookcrossing", "book", r, items, None)


def test_bookcrossing_rules():
    ds = _books()
    data = prepare_ctr(ds, seed=3)
    counts = ds.ratings.groupby("user_id").size()
    kept = set(counts[counts > 5].index)
    assert set(data.sequences.user_ids.tolist()) == kept
    all_users = np.concatenate([s.user_id for s in data.splits.values()])
    assert sorted(all_users.tolist()) == sorted(kept)  # one sample per kept user, splits disjoint
    n = len(kept)
    assert len(data.splits["test"]) == round(n * 0.1)
    assert len(data.splits["valid"]) == round((n - round(n * 0.1)) / 9)
    for s in data.splits.values():
        np.testing.assert_array_equal(s.pos, data.sequences.lengths()[s.user_index] - 1)  # target is last
        np.testing.assert_array_equal(s.label, (s.rating >= 5).astype(np.int8))  # 0 (implicit) negative
        # the history + target is exactly the user's ratings (as a multiset)
        for i in range(len(s)):
            u = s.user_id[i]
            raw = sorted(ds.ratings[ds.ratings.user_id == u].item_id.tolist())
            assert sorted([*s.history(i).tolist(), int(s.item_id[i])]) == raw
    again = prepare_ctr(ds, seed=3)
    other = prepare_ctr(ds, seed=4)
    np.testing.assert_array_equal(again.splits["test"].user_id, data.splits["test"].user_id)
    assert not np.array_equal(other.sequences.items, data.sequences.items) or not np.array_equal(
        other.splits["test"].user_id, data.splits["test"].user_id
    )


def test_mix_recent_and_retrieved(ml100k_ctr):
    tr = ml100k_ctr.splits["train"]
    idx, modes = mix_recent_and_retrieved(tr, 64, seed=1)
    assert len(idx) == 128 and (idx[0::2] == idx[1::2]).all() and len(set(idx.tolist())) == 64
    assert (modes[0::2] == "recent").all() and (modes[1::2] == "retrieved").all()
    idx2, _ = mix_recent_and_retrieved(tr, 64, seed=1)
    np.testing.assert_array_equal(idx, idx2)
    assert not np.array_equal(idx, mix_recent_and_retrieved(tr, 64, seed=2)[0])
    with pytest.raises(ValueError, match="n_shots"):
        mix_recent_and_retrieved(tr, len(tr) + 1)


# ---------------------------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synth():
    return make_synthetic(seed=0)


def test_synthetic_deterministic_and_seeded(synth):
    again = make_synthetic(seed=0)
    pd.testing.assert_frame_equal(synth.ratings, again.ratings)
    pd.testing.assert_frame_equal(synth.items, again.items)
    pd.testing.assert_frame_equal(synth.users, again.users)
    other = make_synthetic(seed=1)
    assert not synth.ratings.equals(other.ratings)
    assert list(synth.items.title) != list(other.items.title)


def test_synthetic_shape(synth):
    r = synth.ratings
    assert 90_000 <= len(r) <= 110_000 and synth.n_users == 950 and len(synth.items) == 1700
    assert set(r.rating.unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 0.45 < (r.rating > 3).mean() < 0.65
    assert (np.diff(r.timestamp.to_numpy()) >= 0).all()  # time ordered
    assert synth.items.title.is_unique and synth.items.title.str.match(r".+ \(\d{4}\)$").all()
    assert synth.items.genres.map(len).min() >= 1
    assert not r.duplicated(["user_id", "item_id"]).any()
    assert synth.users.gender.isin(["M", "F"]).all()


def _auc(y, s):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(y, s)


def test_synthetic_signals_predict_the_label(synth):
    """User/item positive rates (collaborative) and same-genre history (what similarity retrieval finds)
    each predict the test label well above chance, and same-genre beats the plain recent window."""
    data = prepare_ctr(synth)
    seq, tr, te = data.sequences, data.splits["train"], data.splits["test"]
    prior = tr.label.mean()
    tr_df = pd.DataFrame({"u": tr.user_id, "i": tr.item_id, "y": tr.label})
    u_rate = tr_df.groupby("u").y.agg(["sum", "count"])
    i_rate = tr_df.groupby("i").y.agg(["sum", "count"])

    def smooth(table, keys):
        t = table.reindex(keys)
        return ((t["sum"].fillna(0) + 5 * prior) / (t["count"].fillna(0) + 5)).to_numpy()

    collab = np.log(smooth(u_rate, te.user_id)) + np.log(smooth(i_rate, te.item_id))
    assert _auc(te.label, collab) > 0.68

    names = sorted({g for gs in synth.items.genres for g in gs})
    member = np.zeros((int(synth.items.index.max()) + 1, len(names)), dtype=bool)
    for item_id, gs in synth.items.genres.items():
        member[item_id, [names.index(g) for g in gs]] = True
    rng = np.random.default_rng(0)
    pick = rng.choice(len(te), 3000, replace=False)
    same, recent, y = [], [], []
    for i in pick:
        start = seq.offsets[te.user_index[i]]
        hist = seq.items[start : start + te.pos[i]]
        hist_r = seq.ratings[start : start + te.pos[i]]
        match = (member[hist] & member[te.item_id[i]]).any(axis=1)
        same.append(hist_r[match][-10:].mean() if match.any() else hist_r.mean())
        recent.append(hist_r[-10:].mean())
        y.append(te.label[i])
    auc_same, auc_recent = _auc(y, same), _auc(y, recent)
    print(f"collab AUC {_auc(te.label, collab):.3f}, same-genre {auc_same:.3f}, recent {auc_recent:.3f}")
    assert auc_same > 0.6 and auc_same > auc_recent + 0.02, (auc_same, auc_recent)


def test_build_sequences_ties_keep_file_order():
    r = pd.DataFrame(
        {
            "user_id": [2, 1, 1, 1],
            "item_id": [9, 30, 10, 20],
            "rating": [1.0, 5, 4, 3],
            "timestamp": [5, 7, 7, 6],
        }
    ).astype({"rating": "float32"})
    seq = build_sequences(r)
    assert seq.user_ids.tolist() == [1, 2] and seq.offsets.tolist() == [0, 3, 4]
    assert seq.items.tolist() == [20, 30, 10, 9]
