"""Dataset records: :class:`RecDataset` (one loaded log) and :class:`Domain` (what its domain means).

A leaf module of ``rellax_fast.data`` (it imports numpy, pandas and the standard library only), so that the
loaders, the synthetic generator, the CTR splits, the prompt templates and SUBR's item texts all read from
here and none of them imports another for it.

A *domain* ("movie", "book") is one :class:`Domain` record in ``DOMAINS``. It holds everything that differs
between domains:

- the label rule: ``label = rating > positive_above`` (``>=`` with ``positive_inclusive``);
- the prompt nouns: noun, plural, the past verb ("watched") and the rating scale shown in the prompt;
- the item-text template SUBR embeds: ``item_text(*row)`` over the items-frame columns ``item_fields``;
- the user features: ``profile(features)`` writes the prompt's profile sentences from the users-frame
  columns ``user_fields`` (pronouns follow ``gender`` when it is one of them);
- ``timed``: whether ratings carry real timestamps (MovieLens: a global-time split; BookCrossing has none:
  one seeded target per user, split by user).

A new domain is one more record here, registered with :func:`register_domain` (docs/architecture.md,
"Adding a dataset / domain"). Missing text fields (None, NaN, empty strings, year 0) are left out of item
texts rather than printed as "nan".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

__all__ = [
    "RecDataset",
    "Domain",
    "DOMAINS",
    "register_domain",
    "get_domain",
    "movie_text",
    "book_text",
    "age_phrase",
    "pronouns",
]


@dataclass
class RecDataset:
    """A recommendation log.

    ratings: columns user_id int64, item_id int64, rating float32, timestamp int64 (one row per rating).
    items:   indexed by item_id, with the columns of its domain's ``item_fields`` (movies: title str, genres
             list[str]; books: title, author, year, publisher).
    users:   indexed by user_id, or None; the domain's ``user_fields`` (MovieLens: gender "M"/"F", age int,
             occupation str; BookCrossing: location str, age float, NaN where unknown).
    """

    name: str
    domain: str  # a key of DOMAINS: "movie" | "book"
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


# ------------------------------------------------------------------------------------------ text helpers


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    text = str(value).strip()
    return text not in ("", "nan", "None", "NaN", "<NA>")


def _clean(value: Any) -> str:
    return " ".join(str(value).split())


def _known_number(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def age_phrase(age) -> Optional[str]:
    """MovieLens-style age bucket (ml-1m codes 1/18/25/35/45/50/56 land in their own bucket)."""
    if not _known_number(age):
        return None
    a = float(age)
    if a < 18:
        return "under 18"
    for lo, hi in ((18, 24), (25, 34), (35, 44), (45, 49), (50, 55)):
        if a <= hi:
            return f"{lo} to {hi}"
    return "56 or older"


def pronouns(profile: Optional[dict]) -> Tuple[str, str, str, Optional[str]]:
    """(subject, subject lower-case, possessive, "a man"/"a woman"/None) from the profile's gender."""
    gender = (profile or {}).get("gender")
    if gender == "M":
        return "He", "he", "His", "a man"
    if gender == "F":
        return "She", "she", "Her", "a woman"
    return "The user", "the user", "The user's", None


# ------------------------------------------------------------------------------------------ movie


def movie_text(title: Any, genres: Iterable[str] = ()) -> str:
    """``"<title>. Genres: <g1>, <g2>"`` (all genres, in the order given); just the title without genres."""
    title_text = _clean(title) if _present(title) else "Unknown movie"
    genre_list = [] if genres is None or (isinstance(genres, float) and math.isnan(genres)) else list(genres)
    genre_list = [_clean(g) for g in genre_list if _present(g)]
    if not genre_list:
        return title_text
    return f"{title_text}. Genres: {', '.join(genre_list)}"


def movie_profile(profile: dict) -> List[str]:
    """ "The user is a man aged 18 to 24." and "His occupation is technician." (MovieLens users)."""
    _, _, poss, person = pronouns(profile)
    parts = []
    age = age_phrase(profile.get("age"))
    if person and age:
        parts.append(f"The user is {person} aged {age}.")
    elif person:
        parts.append(f"The user is {person}.")
    elif age:
        parts.append(f"The user is aged {age}.")
    occ = profile.get("occupation")
    if occ and occ not in ("none", "other"):
        parts.append(f"{poss} occupation is {occ}.")
    return parts


# ------------------------------------------------------------------------------------------ book


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


def book_profile(profile: dict) -> List[str]:
    """ "She lives in tyler, texas, usa." and "She is 31 years old." (BookCrossing users)."""
    subj, _, _, person = pronouns(profile)
    parts = []
    loc = str(profile.get("location") or "").strip(" ,")
    age = profile.get("age")
    if person:
        parts.append(f"The user is {person}.")
    if loc:
        parts.append(f"{subj} lives in {loc}.")
    if _known_number(age):
        parts.append(f"{subj} is {int(age)} years old.")
    return parts


# ------------------------------------------------------------------------------------------ the record


@dataclass(frozen=True)
class Domain:
    """Everything that differs between domains (module docstring); one record per domain in ``DOMAINS``."""

    name: str
    noun: str  # "movie": 'Will she like the movie "..."?'
    plural: str  # "movies": 'She watched and rated these movies'
    verb: str  # past tense of consuming an item: "watched", "read"
    rating_scale: int  # top of the star scale named in the prompt ("from 1 to 5 stars")
    positive_above: float  # label rule: rating > positive_above (>= with positive_inclusive)
    positive_inclusive: bool
    item_fields: Tuple[
        str, ...
    ]  # items-frame columns item_text reads, in argument order; the first is "title"
    item_text: Callable[..., str]  # item_text(*values of item_fields) -> the text SUBR embeds
    user_fields: Tuple[str, ...]  # users-frame columns the profile sentences read
    profile: Callable[[dict], List[str]]  # profile({field: value}) -> the prompt's profile sentences
    timed: bool = (
        True  # ratings carry real timestamps (global-time split) or not (one seeded target per user)
    )

    @property
    def label_rule(self) -> str:
        """The label rule in words, e.g. ``"rating > 3"``."""
        return f"rating {'>=' if self.positive_inclusive else '>'} {self.positive_above:g}"

    def label(self, rating) -> np.ndarray:
        """The binary CTR label (int8) of ``rating``."""
        rating = np.asarray(rating)
        positive = rating >= self.positive_above if self.positive_inclusive else rating > self.positive_above
        return positive.astype(np.int8)

    def profile_sentence(self, profile: Optional[dict]) -> str:
        """The prompt's opening sentences about the user ("" without a profile)."""
        if not profile:
            return ""
        return " ".join(self.profile({k: profile.get(k) for k in self.user_fields}))

    def item_texts(self, items: pd.DataFrame) -> List[str]:
        """One text per row of ``items`` (missing optional columns are fine; ``title`` is required)."""
        if "title" not in items.columns:
            raise ValueError(f"items must have a 'title' column; it has {list(items.columns)}")
        n = len(items)

        def column(name: str) -> Sequence[Any]:
            return items[name].tolist() if name in items.columns else [None] * n

        return [self.item_text(*values) for values in zip(*(column(f) for f in self.item_fields))]


DOMAINS: Dict[str, Domain] = {}


def register_domain(domain: Domain) -> Domain:
    """Add ``domain`` to ``DOMAINS`` (a name registered to a different record is an error)."""
    if not isinstance(domain, Domain):
        raise TypeError(f"register_domain: expected a Domain record, got {type(domain).__name__}")
    known = DOMAINS.get(domain.name)
    if known is not None and known != domain:
        raise ValueError(f"register_domain: domain {domain.name!r} is already registered to another record")
    if not domain.item_fields or domain.item_fields[0] != "title":
        raise ValueError(
            f"register_domain: {domain.name!r}: item_fields must start with 'title'; got {domain.item_fields}"
        )
    DOMAINS[domain.name] = domain
    return domain


def get_domain(name: str) -> Domain:
    """The record of domain ``name``; ValueError naming the known domains otherwise."""
    domain = DOMAINS.get(name) if isinstance(name, str) else None
    if domain is None:
        raise ValueError(f"domain: expected one of {sorted(DOMAINS)}, got {name!r}")
    return domain


MOVIE = register_domain(
    Domain(
        name="movie",
        noun="movie",
        plural="movies",
        verb="watched",
        rating_scale=5,
        positive_above=3,
        positive_inclusive=False,  # the paper: MovieLens rating > 3
        item_fields=("title", "genres"),
        item_text=movie_text,
        user_fields=("gender", "age", "occupation"),
        profile=movie_profile,
        timed=True,
    )
)

BOOK = register_domain(
    Domain(
        name="book",
        noun="book",
        plural="books",
        verb="read",
        rating_scale=10,
        positive_above=5,
        positive_inclusive=True,  # the paper: BookCrossing rating >= 5 (implicit 0 = negative)
        item_fields=("title", "author", "year", "publisher"),
        item_text=book_text,
        user_fields=("gender", "location", "age"),
        profile=book_profile,
        timed=False,
    )
)
