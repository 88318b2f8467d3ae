"""Item text for SUBR: the one entry point that turns a dataset's item metadata into the texts we embed.

The template itself belongs to the dataset's domain (:mod:`rellax_fast.data.domains`, ``Domain.item_text``
over ``Domain.item_fields``):

- movies: the title and all genres, e.g. ``"Toy Story (1995). Genres: Animation, Children's, Comedy"``;
- books: title, author, year and publisher, e.g.
  ``"Harry Potter and the Sorcerer's Stone. Author: J. K. Rowling. Year: 1998. Publisher: Scholastic"``.

Missing fields (None, NaN, empty strings, year 0) are left out rather than printed as "nan".
``TEMPLATE_VERSION`` is part of every embedding-cache key: bump it whenever a template changes.
"""

from __future__ import annotations

from typing import Any, List, Tuple

from ..data.domains import DOMAINS, book_text, get_domain, movie_text

__all__ = ["TEMPLATE_VERSION", "DOMAINS", "movie_text", "book_text", "item_text_rows", "dataset_item_texts"]

TEMPLATE_VERSION = "1"


def item_text_rows(items, domain: str) -> Tuple[List[Any], List[str]]:
    """Item ids (the items frame's index, in its order) and one text per item for ``domain``.

    ``items`` is a pandas DataFrame indexed by item_id with the columns of its domain's ``item_fields``
    (movies: title, genres; books: title, author, year, publisher; missing optional columns are fine).
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {tuple(DOMAINS)}; got {domain!r}")
    return list(items.index), get_domain(domain).item_texts(items)


def dataset_item_texts(dataset) -> Tuple[List[Any], List[str]]:
    """Item ids and texts of a ``RecDataset`` (uses its ``items`` frame and ``domain``)."""
    return item_text_rows(dataset.items, dataset.domain)
