"""Every template renders with the right pronouns, star wording, placeholder count and order."""

from __future__ import annotations

import re

import pytest

from rellax_fast.data import render_prompt
from rellax_fast.data.prompts import age_phrase, apply_chat, escape_placeholder, format_rating

SHOWN = [
    (11, "Toy Story (1995)", 4),
    (12, "GoldenEye (1995)", 1),
    (13, "Heat (1995)", 3.5),
    (14, "Ed (1996)", 5),
]
TARGET = (99, "Four Rooms (1995)")


@pytest.mark.parametrize(
    "profile, subj, poss, person",
    [
        ({"gender": "M", "age": 24, "occupation": "technician"}, "He", "His", "a man aged 18 to 24"),
        ({"gender": "F", "age": 56, "occupation": "writer"}, "She", "Her", "a woman aged 56 or older"),
        ({"age": 30, "occupation": "writer"}, "The user", "The user's", "aged 25 to 34"),
    ],
)
def test_movie_template_pronouns(profile, subj, poss, person):
    p = render_prompt("movie", profile, SHOWN, TARGET)
    lines = p.text.split("\n")
    assert lines[0].startswith(f"The user is {person}.")
    assert f"{poss} occupation is {profile['occupation']}." in lines[0]
    assert lines[1].startswith(f"{subj} watched and rated these movies")
    low = "the user" if subj == "The user" else subj.lower()
    assert f"more stars mean {low} liked the movie more" in lines[1]
    assert lines[-2] == f'Will {low} like the movie "Four Rooms (1995)" <spa>?'
    assert lines[-1] == "Answer only with yes or no."
    other = {"He": ("she", "her"), "She": ("he", "his"), "The user": ("he", "she")}[subj]
    for word in other:
        assert not re.search(rf"\b{word}\b", p.text, flags=re.I), word


def test_star_wording_numbering_and_placeholder_order():
    p = render_prompt("movie", None, SHOWN, TARGET)
    body = p.text.split("\n")
    assert body[1] == "1. Toy Story (1995) (4 stars) <spa>"
    assert body[2] == "2. GoldenEye (1995) (1 star) <spa>"
    assert body[3] == "3. Heat (1995) (3.5 stars) <spa>"
    assert body[4] == "4. Ed (1996) (5 stars) <spa>"
    assert p.placeholder_item_ids == [11, 12, 13, 14, 99]
    assert p.text.count("<spa>") == 5
    # the order is the caller's: reversed input -> reversed ids
    q = render_prompt("movie", None, SHOWN[::-1], TARGET, placeholder="[SPA]")
    assert (
        q.placeholder_item_ids == [14, 13, 12, 11, 99]
        and q.text.count("[SPA]") == 5
        and "<spa>" not in q.text
    )
    none = render_prompt("movie", None, SHOWN, TARGET, placeholder=None)
    assert none.placeholder_item_ids == [] and "<spa>" not in none.text
    assert format_rating(1) == "1 star" and format_rating(1.0) == "1 star" and format_rating(2) == "2 stars"
    assert format_rating(0.5) == "0.5 stars" and format_rating(0) == "no rating given"


def test_book_template_and_empty_history():
    prof = {"location": "tyler, texas, usa", "age": 31.0}
    p = render_prompt("book", prof, [(1, "Flesh Tones", 8), (2, "Rites of Passage", 0)], (3, "Emma"))
    assert p.text.startswith("The user lives in tyler, texas, usa. The user is 31 years old.")
    assert (
        "The user read and rated these books (from 1 to 10 stars; more stars mean the user liked the book more)"
        in p.text
    )
    assert (
        "1. Flesh Tones (8 stars) <spa>" in p.text and "2. Rites of Passage (no rating given) <spa>" in p.text
    )
    assert 'Will the user like the book "Emma" <spa>?' in p.text
    assert p.placeholder_item_ids == [1, 2, 3]
    p = render_prompt("book", {"location": "x", "age": float("nan")}, [], (3, "Emma"))
    assert "years old" not in p.text and "The user has no earlier rated books to show." in p.text
    assert p.placeholder_item_ids == [3]
    p = render_prompt("movie", {"gender": "F"}, [], TARGET)
    assert "She has no earlier rated movies to show." in p.text and "Will she like" in p.text


def test_bad_inputs():
    with pytest.raises(ValueError, match="domain"):
        render_prompt("music", None, SHOWN, TARGET)
    with pytest.raises(
        ValueError, match="cannot escape the placeholder"
    ):  # one that escaping re-forms forever
        render_prompt("movie", None, [(1, "a x title", 3)], TARGET, placeholder=" x")


def test_age_buckets_cover_ml1m_codes():
    assert [age_phrase(a) for a in (1, 18, 25, 35, 45, 50, 56)] == [
        "under 18",
        "18 to 24",
        "25 to 34",
        "35 to 44",
        "45 to 49",
        "50 to 55",
        "56 or older",
    ]
    assert age_phrase(float("nan")) is None and age_phrase(None) is None


def test_chat_wrapper():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    assert apply_chat("hi", None) == "hi"
    assert apply_chat("hi", Tok(), system="be brief") == "<system>be brief<user>hi<assistant>"


def test_a_title_containing_the_placeholder_is_escaped_not_refused():
    """#26: an item titled with the SPA placeholder used to stop the run ("choose another placeholder", with no flag
    to do so); it is now shown escaped, and the prompt keeps exactly one placeholder per shown item and target."""
    shown = [(11, "The <spa> Club (1999)", 4), (12, "Heat (1995)", 3)]
    p = render_prompt("movie", None, shown, (99, "<spa><spa>"))
    assert p.text.count("<spa>") == 3 and p.placeholder_item_ids == [11, 12, 99]
    assert "1. The < spa> Club (1999) (4 stars) <spa>" in p.text
    assert 'like the movie "< spa>< spa>" <spa>?' in p.text
    assert escape_placeholder("aaa", "aa") == "a a a" and escape_placeholder("x <spa>", None) == "x <spa>"
