"""Dataset loaders: every supported dataset parsed from its own published file format into a RecDataset.

Formats (as documented in each dataset's README):

- ml-100k: ``u.data`` (tab: user, item, rating, unix time), ``u.item`` (``|``, latin-1: id, title, release
  date, video date, IMDb URL, 19 genre flags in ``u.genre`` order), ``u.user`` (``|``: id, age, gender,
  occupation, zip).
- ml-1m: ``::``-separated latin-1 ``ratings.dat`` (user, movie, rating, time), ``movies.dat`` (id, title,
  ``|``-joined genres), ``users.dat`` (id, gender, age code, occupation code, zip).
- ml-20m, ml-25m, ml-latest-small: UTF-8 CSV with a header, ``ratings.csv`` (userId, movieId, rating in half
  stars, timestamp) and ``movies.csv`` (movieId, quoted title, ``|``-joined genres or ``(no genres listed)``).
- bookcrossing: ``BX-Book-Ratings.csv``, ``BX-Books.csv``, ``BX-Users.csv``: ``;``-separated, every field
  quoted, latin-1, a header row, backslash-escaped quotes inside some titles, ``NULL`` for missing ages.
  Ratings are 0..10 where 0 is an implicit interaction. ISBNs become dense int item ids (sorted ISBN order);
  the ISBN is kept in ``items.isbn``. The dump has no timestamps, so ``timestamp`` is the row's position
  in BX-Book-Ratings.csv (file order).
- synthetic: generated, see :mod:`rellax_fast.data.synthetic`.

A truncated or corrupted file raises :class:`DataFormatError` naming the file and the (1-based) line.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

__all__ = ["RecDataset", "DataFormatError", "load_dataset", "DATASETS", "default_data_dir", "ML100K_GENRES"]

DATASETS = ("ml-100k", "ml-1m", "ml-20m", "ml-25m", "ml-latest-small", "bookcrossing", "synthetic")

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

# ml-1m users.dat codes (README of ml-1m).
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer",
)  # fmt: skip


class DataFormatError(ValueError):
    """A raw data file does not follow its published format (names the file and line)."""


@dataclass
class RecDataset:
    """A recommendation log.

    ratings: columns user_id int64, item_id int64, rating float32, timestamp int64 (one row per rating).
    items:   indexed by item_id; movies: title str, genres list[str]; books: title, author, year, publisher.
    users:   indexed by user_id, or None; MovieLens: gender "M"/"F", age int, occupation str;
             BookCrossing: location str, age float (NaN where unknown).
    """

    name: str
    domain: str  # "movie" | "book"
    ratings: pd.DataFrame
    items: pd.DataFrame
    users: Optional[pd.DataFrame] = None

    @property
    def n_users(self) -> int:
        return int(self.ratings["user_id"].nunique())

    @property
    def n_items(self) -> int:
        return int(len(self.items))

    def __repr__(self) -> str:
        return (
            f"RecDataset({self.name!r}, domain={self.domain!r}, ratings={len(self.ratings):,}, "
            f"users={self.n_users:,}, items={self.n_items:,})"
        )


def default_data_dir(name: str) -> Path:
    """``$RELLAX_DATA_DIR/<name>`` if the variable is set, else ``./data/<name>``."""
    root = os.environ.get("RELLAX_DATA_DIR")
    return Path(root) / name if root else Path("data") / name


# ------------------------------------------------------------------------------------------ parsing helpers


def _read_text(path: Path, encoding: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as exc:
        raise DataFormatError(f"{path}: file not found") from exc
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataFormatError(f"{path}: line {line}: not valid {encoding} ({exc.reason})") from exc


def _parse_table(
    path: Path,
    text: str,
    sep: str,
    names: Sequence[str],
    *,
    header: bool,
    quoting: int = csv.QUOTE_NONE,
    escapechar: Optional[str] = None,
) -> pd.DataFrame:
    """Parse delimited ``text`` with pandas' C parser (fast for 25M rows); every value stays a string.

    Rows with too many fields raise here; rows with too few show up as missing values, which
    :func:`_require` reports with their line number. Blank lines are not skipped (they are corruption).
    """
    try:
        df = pd.read_csv(
            io.StringIO(text),
            sep=sep,
            header=0 if header else None,
            names=list(names),
            dtype=str,
            keep_default_na=False,
            na_values=[],
            quoting=quoting,
            escapechar=escapechar,
            skip_blank_lines=False,
            engine="c",
        )
    except pd.errors.ParserError as exc:
        m = re.search(r"line (\d+)", str(exc))
        where = f"line {m.group(1)}: " if m else ""
        raise DataFormatError(f"{path}: {where}wrong number of fields ({exc})") from exc
    return df


def _numeric_columns(
    path: Path, sep: str, names: Sequence[str], kinds: Sequence[str], *, header: bool, encoding: str,
    text: Optional[str] = None,
) -> dict:
    """Parse an all-numeric table (ratings files: up to 25M rows).

    Fast path: pandas' typed C parser straight from the file. If that fails or yields missing values, the
    file is re-parsed as strings to report the first bad line precisely (:func:`_parse_table`).
    """
    dtypes = {n: (np.int64 if k == "int" else np.float64) for n, k in zip(names, kinds)}
    try:
        df = pd.read_csv(
            io.StringIO(text) if text is not None else path, sep=sep, header=0 if header else None,
            names=list(names), dtype=dtypes, quoting=csv.QUOTE_NONE, skip_blank_lines=False, engine="c",
            encoding=None if text is not None else encoding,
        )  # fmt: skip
        cols = {n: df[n].to_numpy() for n in names}
        if all(np.isfinite(v).all() for v in cols.values()):
            return cols
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError):
        pass
    if text is None:
        text = _read_text(path, encoding)
    df = _parse_table(path, text, sep, names, header=header)
    _require(path, df, names, header)
    return {n: _numeric(path, df, n, header, k) for n, k in zip(names, kinds)}


def _line_of(df: pd.DataFrame, row: int, header: bool) -> int:
    return int(row) + 1 + int(header)


def _require(path: Path, df: pd.DataFrame, cols: Sequence[str], header: bool, nonempty: bool = False) -> None:
    """Every listed column must be present (and, with ``nonempty``, not empty) on every row."""
    for col in cols:
        bad = (df[col].isna() | (df[col] == "")).to_numpy() if nonempty else df[col].isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataFormatError(
                f"{path}: line {_line_of(df, row, header)}: missing field {col!r} (wrong number of fields, "
                f"blank or truncated line)"
            )


def _numeric(path: Path, df: pd.DataFrame, col: str, header: bool, kind: str = "int") -> np.ndarray:
    """Convert a string column to int64/float64; a non-numeric value is reported with its line."""
    values = pd.to_numeric(df[col].str.strip(), errors="coerce")
    arr = values.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(arr)
    if kind == "int" and not bad.any():
        bad = arr != np.round(arr)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        value = df[col].iloc[row]
        if value == "":
            raise DataFormatError(
                f"{path}: line {_line_of(df, row, header)}: missing field {col!r} (empty: wrong number of "
                f"fields or truncated line)"
            )
        raise DataFormatError(f"{path}: line {_line_of(df, row, header)}: field {col!r} is not a valid {kind}: {value!r}")
    return arr.astype(np.int64) if kind == "int" else arr


def _check_range(path: Path, df: pd.DataFrame, values: np.ndarray, col: str, lo: float, hi: float, header: bool):
    bad = (values < lo) | (values > hi)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataFormatError(
            f"{path}: line {_line_of(df, row, header)}: {col} {values[row]} outside [{lo}, {hi}]"
        )


def _ratings_frame(user, item, rating, ts) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": np.asarray(user, dtype=np.int64),
            "item_id": np.asarray(item, dtype=np.int64),
            "rating": np.asarray(rating, dtype=np.float32),
            "timestamp": np.asarray(ts, dtype=np.int64),
        }
    )


def _check_known(path: Path, ratings: pd.DataFrame, col: str, known: pd.Index, what: str) -> None:
    unknown = ~ratings[col].isin(known).to_numpy()
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise DataFormatError(
            f"{path}: line {row + 1}: {what} {ratings[col].iloc[row]} is not in the {what} table"
        )


def _split_genres(values: pd.Series) -> list:
    out = []
    for g in values:
        g = g.strip()
        out.append([] if g in ("", "(no genres listed)") else g.split("|"))
    return out


# ----------------------------------------------------------------------------------------------- MovieLens


def load_ml100k(data_dir: Path) -> RecDataset:
    data_dir = Path(data_dir)
    p = data_dir / "u.data"
    c = _numeric_columns(p, "\t", ["u", "i", "r", "t"], ["int"] * 4, header=False, encoding="latin-1")
    _check_range(p, None, c["r"], "rating", 1, 5, False)
    ratings = _ratings_frame(c["u"], c["i"], c["r"], c["t"])

    genre_names = list(ML100K_GENRES)
    pg = data_dir / "u.genre"
    if pg.exists():
        rows = [ln.split("|") for ln in _read_text(pg, "latin-1").splitlines() if ln.strip()]
        for n, row in enumerate(rows, 1):
            if len(row) != 2:
                raise DataFormatError(f"{pg}: line {n}: expected 'name|index', got {'|'.join(row)!r}")
        genre_names = [name for name, _ in sorted(rows, key=lambda x: int(x[1]))]

    p = data_dir / "u.item"
    cols = ["item_id", "title", "release", "video", "url", *[f"g{k}" for k in range(len(genre_names))]]
    df = _parse_table(p, _read_text(p, "latin-1"), "|", cols, header=False)
    _require(p, df, cols, False)
    _require(p, df, ["title"], False, nonempty=True)
    ids = _numeric(p, df, "item_id", False)
    flags = np.stack([_numeric(p, df, f"g{k}", False) for k in range(len(genre_names))], axis=1)
    if not np.isin(flags, (0, 1)).all():
        row = int(np.flatnonzero(~np.isin(flags, (0, 1)).all(axis=1))[0])
        raise DataFormatError(f"{p}: line {row + 1}: genre flags must be 0 or 1")
    genres = [[genre_names[k] for k in np.flatnonzero(f)] for f in flags]
    items = pd.DataFrame(
        {"title": df["title"].to_numpy(), "genres": genres, "release_date": df["release"].to_numpy()},
        index=pd.Index(ids, name="item_id"),
    )

    p = data_dir / "u.user"
    df = _parse_table(p, _read_text(p, "latin-1"), "|", ["user_id", "age", "gender", "occupation", "zip"], header=False)
    _require(p, df, ["user_id", "age", "gender", "occupation", "zip"], False)
    users = pd.DataFrame(
        {
            "gender": df["gender"].to_numpy(),
            "age": _numeric(p, df, "age", False),
            "occupation": df["occupation"].to_numpy(),
            "zip": df["zip"].to_numpy(),
        },
        index=pd.Index(_numeric(p, df, "user_id", False), name="user_id"),
    )
    _check_gender(p, users)
    _check_known(data_dir / "u.data", ratings, "item_id", items.index, "item")
    _check_known(data_dir / "u.data", ratings, "user_id", users.index, "user")
    return RecDataset("ml-100k", "movie", ratings, items, users)


def _check_gender(path: Path, users: pd.DataFrame) -> None:
    bad = ~users["gender"].isin(["M", "F"]).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataFormatError(f"{path}: line {row + 1}: gender must be M or F, got {users['gender'].iloc[row]!r}")


def _dat_text(path: Path) -> str:
    """A ``::``-separated .dat file (ml-1m) with ``::`` mapped to a tab, so the C parser can be used."""
    text = _read_text(path, "latin-1")
    if "\t" in text:
        line = text[: text.index("\t")].count("\n") + 1
        raise DataFormatError(f"{path}: line {line}: unexpected tab character")
    return text.replace("::", "\t")


def _dat(path: Path, names: Sequence[str]) -> pd.DataFrame:
    df = _parse_table(path, _dat_text(path), "\t", names, header=False)
    _require(path, df, names, False)
    return df


def load_ml1m(data_dir: Path) -> RecDataset:
    data_dir = Path(data_dir)
    p = data_dir / "ratings.dat"
    c = _numeric_columns(p, "\t", ["u", "i", "r", "t"], ["int"] * 4, header=False, encoding="latin-1",
                         text=_dat_text(p))  # fmt: skip
    _check_range(p, None, c["r"], "rating", 1, 5, False)
    ratings = _ratings_frame(c["u"], c["i"], c["r"], c["t"])

    p = data_dir / "movies.dat"
    df = _dat(p, ["item_id", "title", "genres"])
    _require(p, df, ["title", "genres"], False, nonempty=True)
    items = pd.DataFrame(
        {"title": df["title"].to_numpy(), "genres": _split_genres(df["genres"])},
        index=pd.Index(_numeric(p, df, "item_id", False), name="item_id"),
    )

    p = data_dir / "users.dat"
    df = _dat(p, ["user_id", "gender", "age", "occupation", "zip"])
    occ = _numeric(p, df, "occupation", False)
    _check_range(p, df, occ, "occupation", 0, len(ML1M_OCCUPATIONS) - 1, False)
    users = pd.DataFrame(
        {
            "gender": df["gender"].to_numpy(),
            "age": _numeric(p, df, "age", False),  # ml-1m age codes: 1 (<18), 18, 25, 35, 45, 50, 56 (56+)
            "occupation": [ML1M_OCCUPATIONS[k] for k in occ],
            "zip": df["zip"].to_numpy(),
        },
        index=pd.Index(_numeric(p, df, "user_id", False), name="user_id"),
    )
    _check_gender(p, users)
    _check_known(data_dir / "ratings.dat", ratings, "item_id", items.index, "item")
    _check_known(data_dir / "ratings.dat", ratings, "user_id", users.index, "user")
    return RecDataset("ml-1m", "movie", ratings, items, users)


def load_movielens_csv(data_dir: Path, name: str) -> RecDataset:
    """ml-20m / ml-25m / ml-latest-small: ratings.csv + movies.csv (UTF-8, header, quoted titles)."""
    data_dir = Path(data_dir)
    p = data_dir / "ratings.csv"
    if not p.exists():
        raise DataFormatError(f"{p}: file not found")
    with open(p, encoding="utf-8", errors="replace") as f:
        _expect_header(p, f.readline(), "userId,movieId,rating,timestamp")
    c = _numeric_columns(p, ",", ["u", "i", "r", "t"], ["int", "int", "float", "int"], header=True, encoding="utf-8")
    _check_range(p, None, c["r"], "rating", 0.5, 5.0, True)
    ratings = _ratings_frame(c["u"], c["i"], c["r"], c["t"])

    p = data_dir / "movies.csv"
    text = _read_text(p, "utf-8")
    _expect_header(p, text, "movieId,title,genres")
    df = _parse_table(p, text, ",", ["item_id", "title", "genres"], header=True, quoting=csv.QUOTE_MINIMAL)
    _require(p, df, ["item_id", "title", "genres"], True, nonempty=True)
    items = pd.DataFrame(
        {"title": df["title"].to_numpy(), "genres": _split_genres(df["genres"])},
        index=pd.Index(_numeric(p, df, "item_id", True), name="item_id"),
    )
    _check_known(data_dir / "ratings.csv", ratings.assign(), "item_id", items.index, "item")
    return RecDataset(name, "movie", ratings, items, None)


def _expect_header(path: Path, text: str, header: str) -> None:
    first = text.split("\n", 1)[0].strip().lstrip("\ufeff")
    if first != header:
        raise DataFormatError(f"{path}: line 1: expected header {header!r}, got {first[:80]!r}")


# ---------------------------------------------------------------------------------------------- BookCrossing


def _bx(path: Path, names: Sequence[str]) -> pd.DataFrame:
    text = _read_text(path, "latin-1")
    df = _parse_table(path, text, ";", names, header=True, quoting=csv.QUOTE_MINIMAL, escapechar="\\")
    _require(path, df, names, True)
    return df


def load_bookcrossing(data_dir: Path) -> RecDataset:
    data_dir = Path(data_dir)
    p = data_dir / "BX-Book-Ratings.csv"
    df = _bx(p, ["u", "isbn", "r"])
    r = _numeric(p, df, "r", True)
    _check_range(p, df, r, "rating", 0, 10, True)
    u = _numeric(p, df, "u", True)
    isbn_r = df["isbn"].str.strip().to_numpy()

    pb = data_dir / "BX-Books.csv"
    books = _bx(pb, ["isbn", "title", "author", "year", "publisher", "url_s", "url_m", "url_l"])
    books["isbn"] = books["isbn"].str.strip()
    books = books.drop_duplicates("isbn")
    # Item ids: dense over every ISBN seen (rated or described), in sorted ISBN order.
    all_isbn = np.unique(np.concatenate([isbn_r.astype(str), books["isbn"].to_numpy().astype(str)]))
    item_of = pd.Index(all_isbn)
    ratings = _ratings_frame(u, item_of.get_indexer(isbn_r), r, np.arange(len(df)))
    books = books.set_index("isbn").reindex(all_isbn)
    year = pd.to_numeric(books["year"], errors="coerce").to_numpy()
    items = pd.DataFrame(
        {
            "isbn": all_isbn,
            "title": books["title"].fillna("").to_numpy(),
            "author": books["author"].fillna("").to_numpy(),
            "year": np.where((year > 0) & np.isfinite(year), year, np.nan),
            "publisher": books["publisher"].fillna("").to_numpy(),
        },
        index=pd.Index(np.arange(len(all_isbn), dtype=np.int64), name="item_id"),
    )
    # Ratings of ISBNs missing from BX-Books.csv keep their id; their title falls back to the ISBN.
    no_title = items["title"] == ""
    items.loc[no_title, "title"] = "ISBN " + items.loc[no_title, "isbn"]

    pu = data_dir / "BX-Users.csv"
    dfu = _bx(pu, ["user_id", "location", "age"])
    age = pd.to_numeric(dfu["age"].replace("NULL", ""), errors="coerce").to_numpy(dtype=np.float64)
    users = pd.DataFrame(
        {"location": dfu["location"].to_numpy(), "age": age},
        index=pd.Index(_numeric(pu, dfu, "user_id", True), name="user_id"),
    )
    return RecDataset("bookcrossing", "book", ratings, items, users)


# -------------------------------------------------------------------------------------------------- entry


def load_dataset(name: str, data_dir=None, download: bool = True, **kwargs) -> RecDataset:
    """Load dataset ``name`` (one of DATASETS) from ``data_dir`` (default :func:`default_data_dir`).

    Missing raw files are downloaded from the official source and checksum-verified when ``download``;
    otherwise (or offline) a :class:`~rellax_fast.data.download.DatasetNotFoundError` says where to put
    which files. ``synthetic`` is generated in memory (``kwargs`` go to its generator, e.g. ``seed``).
    """
    if name not in DATASETS:
        raise ValueError(f"name: unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "synthetic":
        from .synthetic import make_synthetic

        return make_synthetic(**kwargs)
    from .download import ensure_files

    data_dir = Path(data_dir) if data_dir is not None else default_data_dir(name)
    # Accept a parent folder that holds <name>/ (like RELLAX_DATA_DIR) as well as the folder itself.
    if (data_dir / name).is_dir() and not (data_dir / "u.data").exists():
        data_dir = data_dir / name
    ensure_files(name, data_dir, download=download)
    if name == "ml-100k":
        return load_ml100k(data_dir)
    if name == "ml-1m":
        return load_ml1m(data_dir)
    if name == "bookcrossing":
        return load_bookcrossing(data_dir)
    return load_movielens_csv(data_dir, name)
