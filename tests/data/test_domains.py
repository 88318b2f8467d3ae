"""Dataset domains as one record (rellax_fast.data.domains): the prompts, item texts and labels of each
registered domain come from its record, and a toy domain registered in a test works through render_prompt,
item_text_rows, label_of and prepare_ctr without any other file knowing about it."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import rellax_fast.data as data_pkg
from rellax_fast.data import domains
from rellax_fast.data.ctr import label_of, prepare_ctr
from rellax_fast.data.domains import DOMAINS, Domain, RecDataset, get_domain, pronouns, register_domain
from rellax_fast.data.prompts import format_rating, render_prompt
from rellax_fast.data.synthetic import make_synthetic
from rellax_fast.subr.text import book_text, item_text_rows, movie_text

PROFILES = [
    None,
    {"gender": "M", "age": 24, "occupation": "technician", "zip": "55105"},
    {"gender": "F", "age": 56.0, "occupation": "writer", "location": "tyler, texas, usa"},
    {"age": 31.0, "location": "porto, portugal"},
    {"age": float("nan"), "location": " , ", "occupation": "none"},
]
SHOWN = [(11, "Toy Story (1995)", 4), (12, "Emma", 0), (13, "Heat (1995)", 3.5)]
TARGET = (99, 'Four "Rooms"')


def expected_prompt(record: Domain, profile, shown, target, placeholder) -> str:
    """The prompt written out from the record's fields (the template's structure, the record's words)."""
    subj, low, _, _ = pronouns(profile)
    tag = f" {placeholder}" if placeholder else ""
    lines = [record.profile_sentence(profile)] if profile else []
    lines = [line for line in lines if line]
    if shown:
        lines.append(
            f"{subj} {record.verb} and rated these {record.plural} (from 1 to {record.rating_scale} stars; "
            f"more stars mean {low} liked the {record.noun} more):"
        )
        lines += [f"{n}. {t} ({format_rating(r)}){tag}" for n, (_, t, r) in enumerate(shown, 1)]
    else:
        lines.append(f"{subj} has no earlier rated {record.plural} to show.")
    lines += [f'Will {low} like the {record.noun} "{target[1]}"{tag}?', "Answer only with yes or no."]
    return "\n".join(lines)


@pytest.mark.parametrize("name", ["movie", "book"])
@pytest.mark.parametrize("placeholder", ["<spa>", None])
def test_builtin_domain_prompts_come_from_the_record(name, placeholder):
    record = get_domain(name)
    for profile in PROFILES:
        for shown in (SHOWN, []):
            p = render_prompt(name, profile, shown, TARGET, placeholder)
            assert p.text == expected_prompt(record, profile, shown, TARGET, placeholder)
            assert p.placeholder_item_ids == ([i for i, _, _ in shown] + [99] if placeholder else [])


def test_builtin_profiles_read_only_their_user_fields():
    movie, book = get_domain("movie"), get_domain("book")
    assert (
        movie.profile_sentence(PROFILES[1])
        == "The user is a man aged 18 to 24. His occupation is technician."
    )
    assert (
        book.profile_sentence(PROFILES[2])
        == "The user is a woman. She lives in tyler, texas, usa. She is 56 years old."
    )
    assert movie.profile_sentence(PROFILES[4]) == "" and book.profile_sentence({}) == ""
    # a field outside user_fields changes nothing
    for record in (movie, book):
        for profile in PROFILES[1:]:
            extra = {**profile, "favourite": "x", "location" if record is movie else "occupation": "lisbon"}
            assert record.profile_sentence(extra) == record.profile_sentence(profile)


def test_builtin_item_texts_come_from_the_record():
    movies = pd.DataFrame(
        {"title": ["B (1990)", None, " A  (1991) "], "genres": [["Drama"], ["Comedy", ""], float("nan")]},
        index=[5, 7, 9],
    )
    books = pd.DataFrame(
        {
            "title": ["T", "", "U"],
            "author": ["Au", None, float("nan")],
            "year": [2001, 0, "1815.0"],
            "publisher": ["P", float("nan"), ""],
        },
        index=[0, 1, 2],
    )
    ids, texts = item_text_rows(movies, "movie")
    assert ids == [5, 7, 9] and texts == [movie_text(t, g) for t, g in zip(movies["title"], movies["genres"])]
    assert texts == [
        get_domain("movie").item_text(*row)
        for row in movies[list(get_domain("movie").item_fields)].itertuples(index=False)
    ]
    ids, texts = item_text_rows(books, "book")
    assert ids == [0, 1, 2] and texts == [book_text(*row) for row in books.itertuples(index=False)]
    assert texts[1] == "Unknown book" and texts[2] == "U. Year: 1815"
    # optional columns may be missing; the title may not
    assert item_text_rows(books[["title"]], "book")[1] == ["T", "Unknown book", "U"]
    with pytest.raises(ValueError, match="'title' column"):
        item_text_rows(books.drop(columns="title"), "book")
    with pytest.raises(ValueError, match="domain must be one of"):
        item_text_rows(books, "music")


def test_label_rules():
    rng = np.random.default_rng(0)
    ratings = np.concatenate([rng.integers(0, 11, 200).astype(np.float32), np.float32([3, 3.5, 5, 4.999])])
    assert np.array_equal(label_of("movie", ratings), (ratings > 3).astype(np.int8))
    assert np.array_equal(label_of("book", ratings), (ratings >= 5).astype(np.int8))
    assert label_of("movie", ratings).dtype == np.int8
    assert get_domain("movie").label_rule == "rating > 3" and get_domain("book").label_rule == "rating >= 5"
    assert get_domain("movie").timed and not get_domain("book").timed
    with pytest.raises(ValueError, match=r"domain: expected one of \['book', 'movie'\], got 'music'"):
        label_of("music", ratings)


def _music_profile(profile: dict) -> list:
    subj = pronouns(profile)[0]
    country = profile.get("country")
    return [f"{subj} lives in {country}."] if country else []


MUSIC = Domain(
    name="music",
    noun="album",
    plural="albums",
    verb="listened to",
    rating_scale=5,
    positive_above=4,
    positive_inclusive=True,
    item_fields=("title", "artist"),
    item_text=lambda title, artist=None: f"{title} by {artist}" if isinstance(artist, str) else str(title),
    user_fields=("gender", "country"),
    profile=_music_profile,
    timed=True,
)


@pytest.fixture
def music(monkeypatch):
    monkeypatch.setitem(DOMAINS, "music", MUSIC)
    return MUSIC


def test_toy_domain_record_renders_prompts_texts_and_labels(music):
    p = render_prompt("music", {"gender": "F", "country": "Chile", "age": 3}, SHOWN[:2], (5, "Blue"))
    assert p.text == (
        "She lives in Chile.\n"
        "She listened to and rated these albums (from 1 to 5 stars; more stars mean she liked the album more):\n"
        "1. Toy Story (1995) (4 stars) <spa>\n2. Emma (no rating given) <spa>\n"
        'Will she like the album "Blue" <spa>?\nAnswer only with yes or no.'
    )
    assert p.text == expected_prompt(
        music, {"gender": "F", "country": "Chile"}, SHOWN[:2], (5, "Blue"), "<spa>"
    )
    items = pd.DataFrame({"title": ["Blue", "Kid A"], "artist": ["Joni Mitchell", None]}, index=[3, 4])
    assert item_text_rows(items, "music") == ([3, 4], ["Blue by Joni Mitchell", "Kid A"])
    assert np.array_equal(label_of("music", np.float32([3, 3.5, 4, 5])), np.int8([0, 0, 1, 1]))
    assert music.label_rule == "rating >= 4"

    # a timed domain goes through the global-time split with its own label rule
    ds = make_synthetic(seed=0, n_users=30, n_items=80, n_ratings=900)
    data = prepare_ctr(
        RecDataset("toy-music", "music", ds.ratings, ds.items.rename(columns={"genres": "artist"}), None)
    )
    for split in data.splits.values():
        assert len(split) > 0 and np.array_equal(split.label, (split.rating >= 4).astype(np.int8))
    assert data.meta["domain"] == "music"


@pytest.mark.parametrize("timed", [True, False])
def test_meta_records_the_domain_records_label_rule(monkeypatch, timed):
    # meta.json's rules name the domain's own label rule (they used to be hard-coded "rating > 3" / ">= 5")
    record = dataclasses.replace(
        MUSIC, timed=timed, positive_above=4 if timed else 2, positive_inclusive=timed
    )
    monkeypatch.setitem(DOMAINS, "music", record)
    ds = make_synthetic(seed=1, n_users=30, n_items=80, n_ratings=900)
    data = prepare_ctr(
        RecDataset("toy-music", "music", ds.ratings, ds.items.rename(columns={"genres": "artist"}), None)
    )
    rule = "rating >= 4" if timed else "rating > 2"
    assert record.label_rule == rule and data.meta["rules"]["label"] == rule
    for split in data.splits.values():
        assert np.array_equal(split.label, record.label(split.rating))
    for name in ("movie", "book"):  # the built-in domains record their records' rules too
        built_in = get_domain(name)
        monkeypatch.setitem(DOMAINS, "music", dataclasses.replace(built_in, name="music", timed=timed))
        again = prepare_ctr(
            RecDataset("toy-music", "music", ds.ratings, ds.items.rename(columns={"genres": "artist"}), None)
        )
        assert again.meta["rules"]["label"] == built_in.label_rule


def test_register_domain_checks(monkeypatch):
    monkeypatch.setattr(domains, "DOMAINS", dict(DOMAINS))
    assert register_domain(MUSIC) is MUSIC and domains.DOMAINS["music"] is MUSIC
    assert register_domain(MUSIC) is MUSIC  # the same record again: no-op
    with pytest.raises(ValueError, match="'movie' is already registered"):
        register_domain(dataclasses.replace(MUSIC, name="movie"))
    with pytest.raises(ValueError, match="item_fields must start with 'title'"):
        register_domain(dataclasses.replace(MUSIC, name="podcast", item_fields=("artist", "title")))
    with pytest.raises(TypeError, match="expected a Domain record"):
        register_domain({"name": "podcast"})


def test_domains_is_a_leaf_and_synthetic_does_not_import_the_loaders():
    """The record module imports nothing of rellax_fast, and datasets.py <-> synthetic.py is no cycle."""
    root = Path(data_pkg.__file__).parent

    def imports(name: str) -> set:
        tree = ast.parse((root / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                found.add("." * node.level + (node.module or ""))
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        return found

    assert not {m for m in imports("domains") if m.startswith(".") or m.startswith("rellax_fast")}
    assert ".datasets" not in imports("synthetic") and ".domains" in imports("synthetic")
