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
    return load_dataset("ml-100k", write_variant("clean", tmp_path_factory.mktemp("c") / "ml-100k"), download=False)


def _with_ratings(ds: RecDataset, ratings: pd.DataFrame, domain: str = None) -> RecDataset:
    return RecDataset(ds.name, domain or ds.domain, ratings.reset_index(drop=True), ds.items, ds.users)


def test_clean_samples_pass(clean_ds):
    check_no_leakage(prepare_ctr(clean_ds))


def test_repeated_events_are_refused(clean_ds):
    doubled = _with_ratings(clean_ds, pd.concat([clean_ds.ratings, clean_ds.ratings]))
    data = prepare_ctr(doubled)
    with pytest.raises(LabelLeakageError, match=r"ml-100k: train sample \d+ \(user \d+\): its history holds its own "
                                                r"target event \(item \d+ at time \d+\) at position \d+"):  # fmt: skip
        check_no_leakage(data)
    # only one copy: a re-rating of the same item at the same second, with another rating, leaks too
    one = clean_ds.ratings.iloc[[40]].assign(rating=np.float32(1.0))
    data = prepare_ctr(_with_ratings(clean_ds, pd.concat([clean_ds.ratings, one])))
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
        check_no_leakage(prepare_ctr(raw))
