"""Prompt templates per domain (our own wording, the paper's structure) and the ReiT mixed training set.

A prompt has, in order: a user profile sentence where demographics exist (pronouns follow the gender),
the K shown behaviours as a numbered list "title (r stars)" with a note that more stars mean the user
liked it more, the question whether the user will like the target, and a request to answer only yes or no.
With a ``placeholder`` (default ``"<spa>"``), one SPA soft-token placeholder follows each shown behaviour
and the target; ``Prompt.placeholder_item_ids`` lists the item behind each placeholder in text order
(history ids in the order shown, then the target id).

The order of ``shown`` is the caller's choice (SUBR modes: recent / sequential / high / low).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "Prompt", "render_prompt", "apply_chat", "mix_recent_and_retrieved", "format_rating", "age_phrase", "DOMAINS",
]  # fmt: skip

DOMAINS = {
    # noun, plural, past verb, rating scale shown in the note
    "movie": ("movie", "movies", "watched", 5),
    "book": ("book", "books", "read", 10),
}


@dataclass
class Prompt:
    text: str
    placeholder_item_ids: List[int] = field(default_factory=list)


def format_rating(rating: float) -> str:
    """'1 star', '4 stars', '3.5 stars'; 0 (BookCrossing's implicit interaction) is 'no rating given'."""
    r = float(rating)
    if r == 0:
        return "no rating given"
    text = str(int(r)) if r == int(r) else f"{r:g}"
    return f"{text} star" if r == 1 else f"{text} stars"


def age_phrase(age) -> Optional[str]:
    """MovieLens-style age bucket (ml-1m codes 1/18/25/35/45/50/56 land in their own bucket)."""
    if age is None or (isinstance(age, float) and math.isnan(age)):
        return None
    a = float(age)
    if a < 18:
        return "under 18"
    for lo, hi in ((18, 24), (25, 34), (35, 44), (45, 49), (50, 55)):
        if a <= hi:
            return f"{lo} to {hi}"
    return "56 or older"


def _pronouns(profile: Optional[dict]):
    gender = (profile or {}).get("gender")
    if gender == "M":
        return "He", "he", "His", "a man"
    if gender == "F":
        return "She", "she", "Her", "a woman"
    return "The user", "the user", "The user's", None


def _profile_sentence(domain: str, profile: Optional[dict]) -> str:
    if not profile:
        return ""
    subj, _, poss, person = _pronouns(profile)
    parts = []
    if domain == "movie":
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
    else:
        loc = str(profile.get("location") or "").strip(" ,")
        age = profile.get("age")
        known_age = age is not None and not (isinstance(age, float) and math.isnan(age))
        if person:
            parts.append(f"The user is {person}.")
        if loc:
            parts.append(f"{subj} lives in {loc}.")
        if known_age:
            parts.append(f"{subj} is {int(age)} years old.")
    return " ".join(parts)


def render_prompt(
    domain: str,
    profile: Optional[dict],
    shown: Sequence[Tuple[int, str, float]],
    target: Tuple[int, str],
    placeholder: Optional[str] = "<spa>",
) -> Prompt:
    """Render one CTR prompt. ``shown``: (item_id, title, rating) in display order; ``target``: (item_id, title)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain: expected one of {sorted(DOMAINS)}, got {domain!r}")
    noun, plural, verb, scale = DOMAINS[domain]
    subj, subj_lower, _, _ = _pronouns(profile)
    tag = f" {placeholder}" if placeholder else ""
    ids: List[int] = []
    lines = []
    intro = _profile_sentence(domain, profile)
    if intro:
        lines.append(intro)
    if shown:
        lines.append(
            f"{subj} {verb} and rated these {plural} (from 1 to {scale} stars; more stars mean "
            f"{subj_lower} liked the {noun} more):"
        )
        for n, (item_id, title, rating) in enumerate(shown, 1):
            _check_title(title, placeholder)
            lines.append(f"{n}. {title} ({format_rating(rating)}){tag}")
            ids.append(int(item_id))
    else:
        lines.append(f"{subj} has no earlier rated {plural} to show.")
    target_id, target_title = target
    _check_title(target_title, placeholder)
    lines.append(f"Will {subj_lower} like the {noun} \"{target_title}\"{tag}?")
    lines.append("Answer only with yes or no.")
    ids.append(int(target_id))
    return Prompt("\n".join(lines), ids if placeholder else [])


def _check_title(title: str, placeholder: Optional[str]) -> None:
    if placeholder and placeholder in str(title):
        raise ValueError(f"title {title!r} contains the placeholder {placeholder!r}; choose another placeholder")


def apply_chat(text: str, tokenizer=None, system: Optional[str] = None) -> str:
    """Wrap ``text`` in the backbone's chat template (user turn + generation prompt) when it has one."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return text
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def mix_recent_and_retrieved(split, n_shots: int, seed: int = 0):
    """ReLLa's ReiT training set: ``n_shots`` seeded training samples, each twice (recent, then retrieved).

    Returns ``(sample_indices (2N,) int64, modes (2N,) str)`` with ``sample_indices[2j] ==
    sample_indices[2j+1]`` and ``modes`` alternating ``"recent"``, ``"retrieved"``.
    """
    n = len(split)
    if not 0 < n_shots <= n:
        raise ValueError(f"n_shots: expected 1..{n} (the split's size), got {n_shots}")
    chosen = np.random.default_rng(seed).choice(n, size=n_shots, replace=False).astype(np.int64)
    indices = np.repeat(chosen, 2)
    modes = np.tile(np.array(["recent", "retrieved"]), n_shots)
    return indices, modes
