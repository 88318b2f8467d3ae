"""The BookCrossing reader: the published dump parsed into a :class:`RecDataset`.

Format: ``BX-Book-Ratings.csv``, ``BX-Books.csv``, ``BX-Users.csv``: ``;``-separated, every field quoted,
latin-1, a header row, backslash-escaped quotes inside some titles, ``NULL`` for missing ages. Ratings are
0..10 where 0 is an implicit interaction. ISBNs become dense int item ids (sorted ISBN order); the ISBN is
kept in ``items.isbn``. The dump has no timestamps, so ``timestamp`` is the row's position in
BX-Book-Ratings.csv (file order), and a repeated (user, ISBN) is the repeated event.

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
    check_final_newline,
    check_range,
    drop_duplicate_ratings,
    numeric,
    parse_table,
    ratings_frame,
    read_text,
    require,
)


def _bx(path: Path, names: Sequence[str]) -> pd.DataFrame:
    # Every field is quoted, so a file cut mid-row shows as an unclosed quote or a missing field (an error);
    # a missing final newline alone is only suspicious.
    check_final_newline(path, strict=False)
    text = read_text(path, "latin-1")
    df = parse_table(path, text, ";", names, header=True, quoting=csv.QUOTE_MINIMAL, escapechar="\\")
    require(path, df, names, True)
    return df


def load_bookcrossing(data_dir: Path) -> RecDataset:
    data_dir = Path(data_dir)
    p = data_dir / "BX-Book-Ratings.csv"
    df = _bx(p, ["u", "isbn", "r"])
    r = numeric(p, df, "r", True)
    check_range(p, df, r, "rating", 0, 10, True)
    u = numeric(p, df, "u", True)
    isbn_r = df["isbn"].str.strip().to_numpy()

    pb = data_dir / "BX-Books.csv"
    books = _bx(pb, ["isbn", "title", "author", "year", "publisher", "url_s", "url_m", "url_l"])
    books["isbn"] = books["isbn"].str.strip()
    books = books.drop_duplicates("isbn")
    # Item ids: dense over every ISBN seen (rated or described), in sorted ISBN order.
    all_isbn = np.unique(np.concatenate([isbn_r.astype(str), books["isbn"].to_numpy().astype(str)]))
    item_of = pd.Index(all_isbn)
    ratings = ratings_frame(u, item_of.get_indexer(isbn_r), r, np.arange(len(df)))
    # No time in this dump (timestamp = row), so a repeated (user, ISBN) is the repeated event.
    ratings = drop_duplicate_ratings(p, ratings, ("user_id", "item_id"), True)
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
        index=pd.Index(numeric(pu, dfu, "user_id", True), name="user_id"),
    )
    return RecDataset("bookcrossing", "book", ratings, items, users)
