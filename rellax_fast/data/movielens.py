"""The MovieLens readers: each release parsed from its own published format into a :class:`RecDataset`.

Formats (as documented in each release's README):

- ml-100k: ``u.data`` (tab: user, item, rating, unix time), ``u.item`` (``|``, latin-1: id, title, release
  date, video date, IMDb URL, 19 genre flags in ``u.genre`` order), ``u.user`` (``|``: id, age, gender,
  occupation, zip).
- ml-1m: ``::``-separated latin-1 ``ratings.dat`` (user, movie, rating, time), ``movies.dat`` (id, title,
  ``|``-joined genres), ``users.dat`` (id, gender, age code, occupation code, zip).
- ml-20m, ml-25m, ml-latest-small: UTF-8 CSV with a header, ``ratings.csv`` (userId, movieId, rating in half
  stars, timestamp) and ``movies.csv`` (movieId, quoted title, ``|``-joined genres or ``(no genres listed)``).

Parsing and the corruption checks are :mod:`.parsing`'s.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .domains import RecDataset
from .parsing import (
    EVENT_KEYS,
    DataFormatError,
    check_final_newline,
    check_known,
    check_range,
    check_timestamps,
    drop_duplicate_ratings,
    expect_header,
    numeric,
    numeric_columns,
    parse_table,
    ratings_frame,
    read_text,
    require,
)

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

# ml-1m users.dat codes (README of ml-1m).
ML1M_OCCUPATIONS = (
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)


def _split_genres(values: pd.Series) -> list:
    out = []
    for g in values:
        g = g.strip()
        out.append([] if g in ("", "(no genres listed)") else g.split("|"))
    return out


def load_ml100k(data_dir: Path) -> RecDataset:
    data_dir = Path(data_dir)
    p = data_dir / "u.data"
    check_final_newline(p, strict=True)
    c = numeric_columns(p, "\t", ["u", "i", "r", "t"], ["int"] * 4, header=False, encoding="latin-1")
    check_range(p, None, c["r"], "rating", 1, 5, False)
    check_timestamps(p, c["t"], False)
    ratings = drop_duplicate_ratings(p, ratings_frame(c["u"], c["i"], c["r"], c["t"]), EVENT_KEYS, False)

    genre_names = list(ML100K_GENRES)
    pg = data_dir / "u.genre"
    if pg.exists():
        check_final_newline(pg, strict=False)
        rows = [ln.split("|") for ln in read_text(pg, "latin-1").splitlines() if ln.strip()]
        for n, row in enumerate(rows, 1):
            if len(row) != 2:
                raise DataFormatError(f"{pg}: line {n}: expected 'name|index', got {'|'.join(row)!r}")
        genre_names = [name for name, _ in sorted(rows, key=lambda x: int(x[1]))]

    p = data_dir / "u.item"
    check_final_newline(p, strict=False)
    cols = ["item_id", "title", "release", "video", "url", *[f"g{k}" for k in range(len(genre_names))]]
    df = parse_table(p, read_text(p, "latin-1"), "|", cols, header=False)
    require(p, df, cols, False)
    require(p, df, ["title"], False, nonempty=True)
    ids = numeric(p, df, "item_id", False)
    flags = np.stack([numeric(p, df, f"g{k}", False) for k in range(len(genre_names))], axis=1)
    if not np.isin(flags, (0, 1)).all():
        row = int(np.flatnonzero(~np.isin(flags, (0, 1)).all(axis=1))[0])
        raise DataFormatError(f"{p}: line {row + 1}: genre flags must be 0 or 1")
    genres = [[genre_names[k] for k in np.flatnonzero(f)] for f in flags]
    items = pd.DataFrame(
        {"title": df["title"].to_numpy(), "genres": genres, "release_date": df["release"].to_numpy()},
        index=pd.Index(ids, name="item_id"),
    )

    p = data_dir / "u.user"
    check_final_newline(p, strict=False)
    df = parse_table(
        p, read_text(p, "latin-1"), "|", ["user_id", "age", "gender", "occupation", "zip"], header=False
    )
    require(p, df, ["user_id", "age", "gender", "occupation", "zip"], False)
    users = pd.DataFrame(
        {
            "gender": df["gender"].to_numpy(),
            "age": numeric(p, df, "age", False),
            "occupation": df["occupation"].to_numpy(),
            "zip": df["zip"].to_numpy(),
        },
        index=pd.Index(numeric(p, df, "user_id", False), name="user_id"),
    )
    _check_gender(p, users)
    check_known(data_dir / "u.data", ratings, "item_id", items.index, "item")
    check_known(data_dir / "u.data", ratings, "user_id", users.index, "user")
    return RecDataset("ml-100k", "movie", ratings, items, users)


def _check_gender(path: Path, users: pd.DataFrame) -> None:
    bad = ~users["gender"].isin(["M", "F"]).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataFormatError(
            f"{path}: line {row + 1}: gender must be M or F, got {users['gender'].iloc[row]!r}"
        )


def _dat_text(path: Path) -> str:
    """A ``::``-separated .dat file (ml-1m) with ``::`` mapped to a tab, so the C parser can be used."""
    text = read_text(path, "latin-1")
    if "\t" in text:
        line = text[: text.index("\t")].count("\n") + 1
        raise DataFormatError(f"{path}: line {line}: unexpected tab character")
    return text.replace("::", "\t")


def _dat(path: Path, names: Sequence[str]) -> pd.DataFrame:
    check_final_newline(path, strict=False)
    df = parse_table(path, _dat_text(path), "\t", names, header=False)
    require(path, df, names, False)
    return df


def load_ml1m(data_dir: Path) -> RecDataset:
    data_dir = Path(data_dir)
    p = data_dir / "ratings.dat"
    check_final_newline(p, strict=True)
    c = numeric_columns(
        p, "\t", ["u", "i", "r", "t"], ["int"] * 4, header=False, encoding="latin-1", text=_dat_text(p)
    )
    check_range(p, None, c["r"], "rating", 1, 5, False)
    check_timestamps(p, c["t"], False)
    ratings = drop_duplicate_ratings(p, ratings_frame(c["u"], c["i"], c["r"], c["t"]), EVENT_KEYS, False)

    p = data_dir / "movies.dat"
    df = _dat(p, ["item_id", "title", "genres"])
    require(p, df, ["title", "genres"], False, nonempty=True)
    items = pd.DataFrame(
        {"title": df["title"].to_numpy(), "genres": _split_genres(df["genres"])},
        index=pd.Index(numeric(p, df, "item_id", False), name="item_id"),
    )

    p = data_dir / "users.dat"
    df = _dat(p, ["user_id", "gender", "age", "occupation", "zip"])
    occ = numeric(p, df, "occupation", False)
    check_range(p, df, occ, "occupation", 0, len(ML1M_OCCUPATIONS) - 1, False)
    users = pd.DataFrame(
        {
            "gender": df["gender"].to_numpy(),
            "age": numeric(p, df, "age", False),  # ml-1m age codes: 1 (<18), 18, 25, 35, 45, 50, 56 (56+)
            "occupation": [ML1M_OCCUPATIONS[k] for k in occ],
            "zip": df["zip"].to_numpy(),
        },
        index=pd.Index(numeric(p, df, "user_id", False), name="user_id"),
    )
    _check_gender(p, users)
    check_known(data_dir / "ratings.dat", ratings, "item_id", items.index, "item")
    check_known(data_dir / "ratings.dat", ratings, "user_id", users.index, "user")
    return RecDataset("ml-1m", "movie", ratings, items, users)


def load_movielens_csv(data_dir: Path, name: str) -> RecDataset:
    """ml-20m / ml-25m / ml-latest-small: ratings.csv + movies.csv (UTF-8, header, quoted titles)."""
    data_dir = Path(data_dir)
    p = data_dir / "ratings.csv"
    check_final_newline(p, strict=True)
    with open(p, encoding="utf-8", errors="replace") as f:
        expect_header(p, f.readline(), "userId,movieId,rating,timestamp")
    c = numeric_columns(
        p, ",", ["u", "i", "r", "t"], ["int", "int", "float", "int"], header=True, encoding="utf-8"
    )
    check_range(p, None, c["r"], "rating", 0.5, 5.0, True)
    check_timestamps(p, c["t"], True)
    ratings = drop_duplicate_ratings(p, ratings_frame(c["u"], c["i"], c["r"], c["t"]), EVENT_KEYS, True)

    p = data_dir / "movies.csv"
    check_final_newline(p, strict=False)
    text = read_text(p, "utf-8")
    expect_header(p, text, "movieId,title,genres")
    df = parse_table(p, text, ",", ["item_id", "title", "genres"], header=True, quoting=csv.QUOTE_MINIMAL)
    require(p, df, ["item_id", "title", "genres"], True, nonempty=True)
    items = pd.DataFrame(
        {"title": df["title"].to_numpy(), "genres": _split_genres(df["genres"])},
        index=pd.Index(numeric(p, df, "item_id", True), name="item_id"),
    )
    check_known(data_dir / "ratings.csv", ratings.assign(), "item_id", items.index, "item")
    return RecDataset(name, "movie", ratings, items, None)
