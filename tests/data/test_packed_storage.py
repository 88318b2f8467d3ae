"""The prepared folder is linear in the ratings: split files reference the packed sequences by
(user_index, pos); the flat ``history`` column is optional (none / capped / full), older folders that carry
it still load, and DIN batches gather only the last ``max_history`` positions of the batch's samples."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rellax_fast.ctr.din import PackedCTRArrays, history_arrays
from rellax_fast.ctr.store import item_vocab, split_arrays, to_index
from rellax_fast.data import load_prepared, make_synthetic, prepare_ctr, save_prepared


@pytest.fixture(scope="module")
def synth():
    return prepare_ctr(make_synthetic(n_users=60, n_items=90, n_ratings=6000, seed=3))


def _python_history(split, i, cap=None):
    h = split.history(i).tolist()
    return h if cap is None else h[max(0, len(h) - cap) :]


def test_default_writes_no_history_column_and_round_trips(synth, tmp_path):
    save_prepared(synth, tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["history_column"] == {"mode": "none", "max_history": None}
    for name in synth.splits:
        cols = pq.read_schema(tmp_path / f"{name}.parquet").names
        assert cols == ["user_id", "item_id", "rating", "label", "timestamp", "user_index", "pos"]
    back = load_prepared(tmp_path)
    for name, split in synth.splits.items():
        np.testing.assert_array_equal(back.splits[name].user_index, split.user_index)
        np.testing.assert_array_equal(back.splits[name].pos, split.pos)
        for i in (0, len(split) // 2, len(split) - 1):
            np.testing.assert_array_equal(back.splits[name].history(i), split.history(i))


def test_capped_history_column_holds_the_last_n_items(synth, tmp_path):
    save_prepared(synth, tmp_path, history_column="capped", max_history=7)
    assert json.loads((tmp_path / "meta.json").read_text())["history_column"] == {
        "mode": "capped",
        "max_history": 7,
    }
    test = synth.splits["test"]
    hist = pq.read_table(tmp_path / "test.parquet", columns=["history"]).column("history").to_pylist()
    assert max(len(h) for h in hist) == 7 and max(test.pos) > 7  # the cap bit
    for i in range(len(test)):
        assert hist[i] == _python_history(test, i, 7)
    load_prepared(tmp_path)  # a capped folder loads


def test_full_history_column_folder_still_loads_with_the_same_content(synth, tmp_path):
    save_prepared(synth, tmp_path / "full", history_column="full")
    save_prepared(synth, tmp_path / "none")
    a, b = load_prepared(tmp_path / "full"), load_prepared(tmp_path / "none")
    for name in synth.splits:
        np.testing.assert_array_equal(a.splits[name].pos, b.splits[name].pos)
    hist = (
        pq.read_table(tmp_path / "full" / "valid.parquet", columns=["history"]).column("history").to_pylist()
    )
    assert [hist[i] for i in (0, 5)] == [_python_history(synth.splits["valid"], i) for i in (0, 5)]
    # without the column the split files are smaller (the flat history is the quadratic part)
    assert (tmp_path / "none" / "train.parquet").stat().st_size < (
        tmp_path / "full" / "train.parquet"
    ).stat().st_size


@pytest.mark.parametrize(
    "mode,cap,match",
    [("capped", None, "max_history"), ("capped", 0, "max_history"), ("flat", None, "history_column")],
)
def test_bad_history_options_are_refused_before_writing(synth, tmp_path, mode, cap, match):
    with pytest.raises(ValueError, match=match):
        save_prepared(synth, tmp_path, history_column=mode, max_history=cap)
    assert not (tmp_path / "meta.json").exists()


def test_cli_prepare_history_column_flag(tmp_path):
    from rellax_fast.cli import main

    assert main(["prepare", "--dataset", "synthetic", "--out", str(tmp_path / "a")]) == 0
    assert "history" not in pq.read_schema(tmp_path / "a" / "test.parquet").names
    assert (
        main(
            [
                "prepare",
                "--dataset",
                "synthetic",
                "--out",
                str(tmp_path / "b"),
                "--history-column",
                "capped",
                "--max-history",
                "3",
            ]
        )
        == 0
    )
    hist = pq.read_table(tmp_path / "b" / "test.parquet", columns=["history"]).column("history").to_pylist()
    assert max(len(h) for h in hist) == 3
    assert (
        main(
            [
                "prepare",
                "--dataset",
                "synthetic",
                "--out",
                str(tmp_path / "c"),
                "--history-column",
                "capped",
                "--max-history",
                "0",
            ]
        )
        == 2
    )


def test_capped_history_arrays_match_a_python_loop(synth):
    s = synth.splits["train"]
    for cap in (None, 1, 4):
        offsets, values = s.history_arrays(cap)
        for i in np.random.default_rng(0).integers(0, len(s), 40):
            assert values[offsets[i] : offsets[i + 1]].tolist() == _python_history(s, int(i), cap)


def test_packed_din_batches_equal_the_padded_arrays(synth):
    """Random batches of the packed form give exactly the rows of the whole-split (S, L) arrays."""
    vocab = item_vocab(synth)
    for L in (1, 5, 200):
        packed = split_arrays(synth, "train", vocab, L)
        assert isinstance(packed, PackedCTRArrays) and len(packed) == len(synth.splits["train"])
        s, seq = synth.splits["train"], synth.sequences
        items, ratings = history_arrays(
            seq.offsets, to_index(vocab, seq.items), seq.ratings, s.user_index, s.pos, L
        )
        idx = torch.from_numpy(np.random.default_rng(L).permutation(len(s))[:257])
        b = packed.batch(idx)
        assert b.hist_items.shape == (257, L)
        torch.testing.assert_close(b.hist_items, torch.from_numpy(items)[idx], rtol=0, atol=0)
        torch.testing.assert_close(b.hist_ratings, torch.from_numpy(ratings)[idx], rtol=0, atol=0)
        torch.testing.assert_close(
            b.target, torch.from_numpy(to_index(vocab, s.item_id))[idx], rtol=0, atol=0
        )
        torch.testing.assert_close(b.label, torch.from_numpy(s.label.astype(np.float32))[idx], rtol=0, atol=0)


def test_packed_din_arrays_share_the_sequences_and_refuse_bad_refs(synth):
    vocab = item_vocab(synth)
    a, b = split_arrays(synth, "train", vocab, 10), split_arrays(synth, "test", vocab, 10)
    assert a.seq_items.data_ptr() == b.seq_items.data_ptr()  # one mapped copy of the items for every split
    seq = synth.sequences
    with pytest.raises(ValueError, match="pos runs past"):
        PackedCTRArrays(seq.offsets, seq.items, seq.ratings, [0], [seq.offsets[1] + 1], [0], [1], 5)
    with pytest.raises(ValueError, match="user_index"):
        PackedCTRArrays(seq.offsets, seq.items, seq.ratings, [len(seq)], [0], [0], [1], 5)
    with pytest.raises(ValueError, match="max_len"):
        PackedCTRArrays(seq.offsets, seq.items, seq.ratings, [0], [0], [0], [1], 0)
