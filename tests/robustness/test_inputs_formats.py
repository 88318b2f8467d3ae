"""The same input checks in every other format (ml-1m .dat, MovieLens CSV, BookCrossing): extra columns,
files cut mid-line, negative or oversized timestamps, repeated ratings. Small files in tmp_path."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from test_loaders import write_bx, write_ml1m, write_ml_csv  # noqa: E402  (the loader tests' real-format writers)

from rellax_fast.data.datasets import DataFormatError, DataWarning, load_dataset  # noqa: E402

CSV_HEAD = "userId,movieId,rating,timestamp\n"
BX_HEAD = b'"User-ID";"ISBN";"Book-Rating"\n'

ERROR_CASES = {
    "dat_extra_column": (
        "ml-1m",
        write_ml1m,
        "ratings.dat",
        b"1::1193::5::978300760::x\n1::661::3::978302109::x\n",
        r"ratings\.dat: line 1: 5 fields on every line, expected 4",
    ),
    "dat_cut_mid_line": (
        "ml-1m",
        write_ml1m,
        "ratings.dat",
        b"1::1193::5::978300760\n1::661::3::97830",
        r"ratings\.dat: line 2: the file does not end with a newline.*'1::661::3::97830'",
    ),
    "dat_negative_time": (
        "ml-1m",
        write_ml1m,
        "ratings.dat",
        b"1::1193::5::978300760\n1::661::3::-1\n",
        r"ratings\.dat: line 2: timestamp -1 is negative",
    ),
    "dat_huge_time": (
        "ml-1m",
        write_ml1m,
        "ratings.dat",
        b"1::1193::5::9223372036854775808\n",
        r"ratings\.dat: line 1: field 't' is outside the 64-bit integer range",
    ),
    "csv_extra_column": (
        "ml-25m",
        write_ml_csv,
        "ratings.csv",
        (CSV_HEAD + "1,1,4.0,1147880044,9\n").encode(),
        r"ratings\.csv: line 2: 5 fields on every line, expected 4",
    ),
    "csv_extra_in_row_3": (
        "ml-25m",
        write_ml_csv,
        "ratings.csv",
        (CSV_HEAD + "1,1,4.0,1147880044\n1,2,4.0,1147880045,9\n").encode(),
        r"ratings\.csv: line 3: 5 fields, expected 4",
    ),
    "csv_cut_mid_line": (
        "ml-25m",
        write_ml_csv,
        "ratings.csv",
        (CSV_HEAD + "1,1,4.0,1147880044\n1,2,4.0,11478").encode(),
        r"ratings\.csv: line 3: the file does not end with a newline",
    ),
    "csv_negative_time": (
        "ml-25m",
        write_ml_csv,
        "ratings.csv",
        (CSV_HEAD + "1,1,4.0,-5\n").encode(),
        r"ratings\.csv: line 2: timestamp -5 is negative",
    ),
    "csv_movies_extra_column": (
        "ml-25m",
        write_ml_csv,
        "movies.csv",
        b"movieId,title,genres\n1,Toy Story,Comedy,x\n",
        r"movies\.csv: line 2: 4 fields on every line, expected 3",
    ),
    "bx_extra_column": (
        "bookcrossing",
        write_bx,
        "BX-Book-Ratings.csv",
        BX_HEAD + b'"276725";"034545104X";"0";"1"\n"276726";"0155061224";"5";"1"\n',
        r"BX-Book-Ratings\.csv: line 2: 4 fields on every line, expected 3",
    ),
    "bx_cut_in_quotes": (
        "bookcrossing",
        write_bx,
        "BX-Book-Ratings.csv",
        BX_HEAD + b'"276725";"034545104X";"0"\n"276726";"01550',
        r"BX-Book-Ratings\.csv: line 3: a quoted field is never closed",
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_names_file_and_line(tmp_path, case):
    dataset, write, name, content, message = ERROR_CASES[case]
    d = write(tmp_path / "d")
    (d / name).write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # e.g. a cut file's missing newline, reported besides
        with pytest.raises(DataFormatError) as err:
            load_dataset(dataset, d, download=False)
    assert str(d / name) in str(err.value)
    assert re.search(message, str(err.value)), str(err.value)


def _load_warns(dataset, d, pattern):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        ds = load_dataset(dataset, d, download=False)
    msgs = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(msgs) == 1 and re.search(pattern, msgs[0]), msgs
    return ds


def test_repeated_ratings_keep_the_last_row_in_every_format(tmp_path):
    d = write_ml1m(tmp_path / "a")
    (d / "ratings.dat").write_bytes(b"1::1193::5::978300760\n1::1193::5::978300760\n2::1193::4::978298413\n")
    ds = _load_warns(
        "ml-1m",
        d,
        r"ratings\.dat: dropped 1 repeated rating of the same \(user_id, item_id, "
        r"timestamp\) \(1 exact copy\), keeping the last row of each; the first dropped is line 1",
    )
    assert ds.ratings[["user_id", "item_id", "timestamp"]].values.tolist() == [
        [1, 1193, 978300760],
        [2, 1193, 978298413],
    ]

    d = write_ml_csv(tmp_path / "b")
    (d / "ratings.csv").write_text(CSV_HEAD + "1,1,4.0,1147880044\n1,1,3.5,1147880044\n2,3,0.5,1147868828\n")
    ds = _load_warns("ml-25m", d, r"ratings\.csv: dropped 1 repeated rating .*\(0 exact copies\).* line 2")
    assert ds.ratings["rating"].tolist() == [3.5, 0.5]  # the later row of (1, 1, 1147880044) wins

    d = write_bx(tmp_path / "c")
    (d / "BX-Book-Ratings.csv").write_bytes(
        BX_HEAD + b'"276725";"034545104X";"0"\n"276726";"0155061224";"5"\n"276725";"034545104X";"7"\n'
    )
    ds = _load_warns(
        "bookcrossing",
        d,
        r"BX-Book-Ratings\.csv: dropped 1 repeated rating of the same "
        r"\(user_id, item_id\) .* line 2",
    )
    assert sorted(ds.ratings["rating"].tolist()) == [5.0, 7.0]


def test_metadata_without_final_newline_only_warns(tmp_path):
    d = write_ml_csv(tmp_path / "a")
    clean = load_dataset("ml-25m", d, download=False)
    (d / "movies.csv").write_bytes((d / "movies.csv").read_bytes().rstrip(b"\n"))
    ds = _load_warns("ml-25m", d, r"movies\.csv: line 5: the file does not end with a newline")
    assert ds.items.equals(clean.items)


def test_duplicate_search_fast_path_matches_pandas():
    """The packed (user, item) pre-filter used from 100k rows on finds exactly pandas' duplicates."""
    import numpy as np
    import pandas as pd

    from rellax_fast.data.parsing import _duplicated_last

    rng = np.random.default_rng(1)
    n = 150_000
    df = pd.DataFrame(
        {
            "user_id": rng.integers(0, 300, n),
            "item_id": rng.integers(0, 400, n),
            "timestamp": rng.integers(0, 40, n),
            "rating": rng.integers(1, 6, n),
        }
    )
    keys = ["user_id", "item_id", "timestamp"]
    expected = df.duplicated(subset=keys, keep="last").to_numpy()
    got = _duplicated_last(df, keys)
    assert expected.sum() > 1000 and (got == expected).all()
    big = df.assign(item_id=df["item_id"] + 2**33)  # ids beyond the packing: the plain path
    assert (_duplicated_last(big, keys) == expected).all()
