"""Item text templates (rellax_fast.subr.text)."""

import math

import pandas as pd
import pytest

from rellax_fast.subr.text import book_text, dataset_item_texts, item_text_rows, movie_text


def test_movie_text_has_title_and_all_genres():
    assert movie_text("Toy Story (1995)", ["Animation", "Children's", "Comedy"]) == (
        "Toy Story (1995). Genres: Animation, Children's, Comedy"
    )
    assert movie_text("Solo (2000)", []) == "Solo (2000)"
    assert movie_text("  Two   spaces ", ["Drama", None, ""]) == "Two spaces. Genres: Drama"


def test_book_text_has_title_author_year_publisher_and_skips_missing():
    assert book_text("Emma", "Jane Austen", 1815, "John Murray") == (
        "Emma. Author: Jane Austen. Year: 1815. Publisher: John Murray"
    )
    assert book_text("Emma", None, 0, float("nan")) == "Emma"
    assert book_text("Emma", "Jane Austen", "1815.0", "") == "Emma. Author: Jane Austen. Year: 1815"
    assert book_text(math.nan) == "Unknown book"


def test_item_text_rows_keeps_index_order_and_checks_domain():
    movies = pd.DataFrame(
        {"title": ["B (1990)", "A (1991)"], "genres": [["Drama"], ["Comedy", "Romance"]]},
        index=pd.Index([7, 3], name="item_id"),
    )
    ids, texts = item_text_rows(movies, "movie")
    assert ids == [7, 3]
    assert texts == ["B (1990). Genres: Drama", "A (1991). Genres: Comedy, Romance"]
    books = pd.DataFrame({"title": ["T"], "author": ["Au"], "year": [2001], "publisher": ["P"]}, index=[0])
    assert item_text_rows(books, "book")[1] == ["T. Author: Au. Year: 2001. Publisher: P"]
    with pytest.raises(ValueError, match="domain"):
        item_text_rows(movies, "music")
    with pytest.raises(ValueError, match="title"):
        item_text_rows(movies.drop(columns="title"), "movie")


def test_ml100k_item_texts(ml100k):
    from rellax_fast.data import datasets

    ds = datasets.load_dataset("ml-100k", ml100k, download=False)
    ids, texts = dataset_item_texts(ds)
    assert len(ids) == len(texts) == 1682
    assert texts[ids.index(1)] == "Toy Story (1995). Genres: Animation, Children's, Comedy"
