"""#13 item 5: repeated ratings must not leak labels. The loaders drop them; check_no_leakage (called by
`prepare`) refuses CTR samples whose history holds their own target event or a later event."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from corpus import write_variant

from rellax_fast.data.ctr import prepare_ctr
from rellax_fast.data.datasets import DataWarning, RecDataset, load_dataset
from rellax_fast.data.leakage import LabelLeakageError, check_no_leakage


@pytest.fixture(scope="module")
def clean_ds(tmp_path_factory):
    return load_dataset(
        "ml-100k", write_variant("clean", tmp_path_factory.mktemp("c") / "ml-100k"), download=False
    )


def _with_ratings(ds: RecDataset, ratings: pd.DataFrame, domain: str = None) -> RecDataset:
    return RecDataset(ds.name, domain or ds.domain, ratings.reset_index(drop=True), ds.items, ds.users)


def test_clean_samples_pass(clean_ds):
    check_no_leakage(prepare_ctr(clean_ds))


def test_repeated_events_are_refused(clean_ds):
    doubled = _with_ratings(clean_ds, pd.concat([clean_ds.ratings, clean_ds.ratings]))
    data = prepare_ctr(doubled, repeat_window=0)  # the guard itself (prepare_ctr would drop the copies)
    with pytest.raises(
        LabelLeakageError,
        match=r"ml-100k: train sample \d+ \(user \d+\): its history holds its own "
        r"target event \(item \d+ at time \d+\) at position \d+",
    ):
        check_no_leakage(data)
    # only one copy: a re-rating of the same item at the same second, with another rating, leaks too
    one = clean_ds.ratings.iloc[[40]].assign(rating=np.float32(1.0))
    data = prepare_ctr(_with_ratings(clean_ds, pd.concat([clean_ds.ratings, one])), repeat_window=0)
    with pytest.raises(LabelLeakageError, match="its own target event"):
        check_no_leakage(data)
    # the same item rated again later is a new event, not a leak
    later = clean_ds.ratings.iloc[[40]].assign(timestamp=clean_ds.ratings["timestamp"].max() + 1)
    check_no_leakage(prepare_ctr(_with_ratings(clean_ds, pd.concat([clean_ds.ratings, later]))))


def test_history_later_than_target_is_refused(clean_ds):
    data = prepare_ctr(clean_ds)
    split = data.splits["test"]
    flat = int(data.sequences.offsets[split.user_index[0]] + split.pos[0])
    data.sequences.timestamps[flat - 2] = data.sequences.timestamps[flat] + 5  # an event after the target
    with pytest.raises(LabelLeakageError, match=r"history holds an event at time \d+, after the target"):
        check_no_leakage(data)


def test_bookcrossing_repeated_isbn_is_refused(clean_ds):
    # BookCrossing's "timestamps" are file rows: a repeated (user, ISBN) is the leak
    r = clean_ds.ratings.copy()
    r["timestamp"] = np.arange(len(r))
    r = pd.concat([r, r.assign(timestamp=r["timestamp"] + len(clean_ds.ratings))])
    data = prepare_ctr(_with_ratings(clean_ds, r, domain="book"), seed=0)
    with pytest.raises(LabelLeakageError, match=r"its own target event \(item \d+\) at position"):
        check_no_leakage(data)


def test_ml100k_every_row_twice_gives_the_clean_splits(ml100k, tmp_path):
    """The case of the issue: every u.data row twice put 533 of 1,030 training targets into their own history."""
    (tmp_path / "d").mkdir()
    for f in ("u.item", "u.user", "u.genre"):
        (tmp_path / "d" / f).write_bytes((ml100k / f).read_bytes())
    lines = (ml100k / "u.data").read_bytes().splitlines(keepends=True)
    (tmp_path / "d" / "u.data").write_bytes(b"".join(ln for ln in lines for _ in range(2)))
    with pytest.warns(DataWarning, match=r"dropped 100,000 repeated ratings"):
        doubled = load_dataset("ml-100k", tmp_path / "d", download=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        clean = load_dataset("ml-100k", ml100k, download=False)
    pd.testing.assert_frame_equal(doubled.ratings, clean.ratings)
    data = prepare_ctr(doubled)
    check_no_leakage(data)
    # without the loader's fix the check catches it
    raw = _with_ratings(clean, pd.concat([clean.ratings, clean.ratings]))
    with pytest.raises(LabelLeakageError, match=r"train samples are affected"):
        check_no_leakage(prepare_ctr(raw, repeat_window=0))


def _near_repeat_leaks(data, window=60):
    """Samples whose history holds their own target item with the target's rating within ``window`` seconds."""
    seq, n = data.sequences, 0
    for split in data.splits.values():
        for s in range(len(split)):
            start = int(seq.offsets[split.user_index[s]])
            hist = slice(start, start + int(split.pos[s]))
            same = (seq.items[hist] == split.item_id[s]) & (seq.ratings[hist] == split.rating[s])
            n += bool((same & (split.timestamp[s] - seq.timestamps[hist] <= window)).any())
    return n


def test_near_repeats_are_dropped_so_no_history_shows_its_own_label(tmp_path, capsys):
    """#26 item 8: a rating repeated at timestamp + 1 put the target's own item and rating into its history."""
    from corpus import clean_rows, write_clean

    from rellax_fast.cli import main
    from rellax_fast.data.ctr import REPEAT_WINDOW_S
    from rellax_fast.data.parsing import DataWarning
    from rellax_fast.data.prepared import load_prepared

    raw = write_clean(tmp_path / "raw")
    rows = clean_rows()
    again = [f"{u}\t{i}\t{r}\t{int(t) + 1}" for u, i, r, t in (row.split("\t") for row in rows[40:55])]
    (raw / "u.data").write_text("".join(r + "\n" for r in rows + again))
    ds = load_dataset("ml-100k", raw, download=False)
    assert _near_repeat_leaks(prepare_ctr(ds, repeat_window=0)) > 0  # what happened before: the label leaks
    with pytest.warns(
        DataWarning,
        match=r"ml-100k: dropped 15 ratings that the same user gave the same item again "
        rf"within {REPEAT_WINDOW_S} s \(keeping the later one",
    ):
        data = prepare_ctr(ds)
    assert _near_repeat_leaks(data) == 0 and len(data.sequences.items) == len(rows)
    assert data.meta["rules"]["repeats"].endswith(f"within {REPEAT_WINDOW_S} s is dropped (the later kept)")

    capsys.readouterr()
    assert (
        main(["prepare", "--dataset", "ml-100k", "--data-dir", str(raw), "--out", str(tmp_path / "out")]) == 0
    )
    assert "warning: ml-100k: dropped 15 ratings" in capsys.readouterr().err
    assert _near_repeat_leaks(load_prepared(tmp_path / "out")) == 0
    assert (
        main(
            [
                "prepare",
                "--dataset",
                "ml-100k",
                "--data-dir",
                str(raw),
                "--out",
                str(tmp_path / "o0"),
                "--repeat-window",
                "0",
            ]
        )
        == 0
    )
    assert _near_repeat_leaks(load_prepared(tmp_path / "o0")) > 0  # kept on request
    from rellax_fast.cli import build_parser

    assert build_parser().parse_args(["prepare"]).repeat_window == REPEAT_WINDOW_S  # one default
