"""Item text templates for SUBR: the one place that turns an item's metadata into the text we embed.

- movies: the title and all genres, e.g. ``"Toy Story (1995). Genres: Animation, Children's, Comedy"``;
- books: title, author, year and publisher, e.g.
  ``"Harry Potter and the Sorcerer's Stone. Author: J. K. Rowling. Year: 1998. Publisher: Scholastic"``.

Missing fields (None, NaN, empty strings, year 0) are left out rather than printed as "nan".
``TEMPLATE_VERSION`` is part of every embedding-cache key: bump it whenever a template changes.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, List, Sequence, Tuple

TEMPLATE_VERSION = "1"

DOMAINS = ("movie", "book")


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    text = str(value).strip()
    return text not in ("", "nan", "None", "NaN", "<NA>")


def _clean(value: Any) -> str:
    return " ".join(str(value).split())


def movie_text(title: Any, genres: Iterable[str] = ()) -> str:
    """``"<title>. Genres: <g1>, <g2>"`` (all genres, in the order given); just the title without genres."""
    title_text = _clean(title) if _present(title) else "Unknown movie"
    genre_list = [] if genres is None or (isinstance(genres, float) and math.isnan(genres)) else list(genres)
    genre_list = [_clean(g) for g in genre_list if _present(g)]
    if not genre_list:
        return title_text
    return f"{title_text}. Genres: {', '.join(genre_list)}"


def _year_text(year: Any) -> str:
    if not _present(year):
        return ""
    try:
        as_int = int(float(year))
    except (TypeError, ValueError):
        return _clean(year)
    return "" if as_int <= 0 else str(as_int)


def book_text(title: Any, author: Any = None, year: Any = None, publisher: Any = None) -> str:
    """``"<title>. Author: <a>. Year: <y>. Publisher: <p>"``, leaving out the fields that are missing."""
    parts = [_clean(title) if _present(title) else "Unknown book"]
    if _present(author):
        parts.append(f"Author: {_clean(author)}")
    year_text = _year_text(year)
    if year_text:
        parts.append(f"Year: {year_text}")
    if _present(publisher):
        parts.append(f"Publisher: {_clean(publisher)}")
    return ". ".join(parts)


def item_text_rows(items, domain: str) -> Tuple[List[Any], List[str]]:
    """Item ids (the items frame's index, in its order) and one text per item for ``domain``.

    ``items`` is a pandas DataFrame indexed by item_id with the columns of its domain
    (movies: title, genres; books: title, author, year, publisher; missing optional columns are fine).
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}; got {domain!r}")
    if "title" not in items.columns:
        raise ValueError(f"items must have a 'title' column; it has {list(items.columns)}")
    ids = list(items.index)
    n = len(items)

    def column(name: str) -> Sequence[Any]:
        return items[name].tolist() if name in items.columns else [None] * n

    if domain == "movie":
        texts = [movie_text(t, g) for t, g in zip(column("title"), column("genres"))]
    else:
        texts = [
            book_text(t, a, y, p)
            for t, a, y, p in zip(column("title"), column("author"), column("year"), column("publisher"))
        ]
    return ids, texts


def dataset_item_texts(dataset) -> Tuple[List[Any], List[str]]:
    """Item ids and texts of a ``RecDataset`` (uses its ``items`` frame and ``domain``)."""
    return item_text_rows(dataset.items, dataset.domain)
