"""Prompt templates (our own wording, the paper's structure) and the ReiT mixed training set.

The template is shared by every domain; what differs (nouns, verb, rating scale, the profile sentences) is
the domain's record in :mod:`rellax_fast.data.domains`.

A prompt has, in order: a user profile sentence where demographics exist (pronouns follow the gender),
the K shown behaviours as a numbered list "title (r stars)" with a note that more stars mean the user
liked it more, the question whether the user will like the target, and a request to answer only yes or no.
With a ``placeholder`` (default ``"<spa>"``), one SPA soft-token placeholder follows each shown behaviour
and the target; ``Prompt.placeholder_item_ids`` lists the item behind each placeholder in text order
(history ids in the order shown, then the target id). A title that contains the placeholder is shown with it
escaped (a space after its first character: ``<spa>`` becomes ``< spa>``), so a title never adds a soft token.

The order of ``shown`` is the caller's choice (SUBR modes: recent / sequential / high / low).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .domains import DOMAINS, age_phrase, get_domain, pronouns

__all__ = [
    "Prompt",
    "render_prompt",
    "apply_chat",
    "mix_recent_and_retrieved",
    "format_rating",
    "age_phrase",
    "DOMAINS",
]


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


def render_prompt(
    domain: str,
    profile: Optional[dict],
    shown: Sequence[Tuple[int, str, float]],
    target: Tuple[int, str],
    placeholder: Optional[str] = "<spa>",
) -> Prompt:
    """Render one CTR prompt. ``shown``: (item_id, title, rating) in display order; ``target``: (item_id, title)."""
    record = get_domain(domain)
    noun, plural, verb, scale = record.noun, record.plural, record.verb, record.rating_scale
    subj, subj_lower, _, _ = pronouns(profile)
    tag = f" {placeholder}" if placeholder else ""
    ids: List[int] = []
    lines = []
    intro = record.profile_sentence(profile)
    if intro:
        lines.append(intro)
    if shown:
        lines.append(
            f"{subj} {verb} and rated these {plural} (from 1 to {scale} stars; more stars mean "
            f"{subj_lower} liked the {noun} more):"
        )
        for n, (item_id, title, rating) in enumerate(shown, 1):
            title = escape_placeholder(title, placeholder)
            lines.append(f"{n}. {title} ({format_rating(rating)}){tag}")
            ids.append(int(item_id))
    else:
        lines.append(f"{subj} has no earlier rated {plural} to show.")
    target_id, target_title = target
    target_title = escape_placeholder(target_title, placeholder)
    lines.append(f'Will {subj_lower} like the {noun} "{target_title}"{tag}?')
    lines.append("Answer only with yes or no.")
    ids.append(int(target_id))
    return Prompt("\n".join(lines), ids if placeholder else [])


def escape_placeholder(title, placeholder: Optional[str]) -> str:
    """``title`` with every occurrence of ``placeholder`` broken by a space after its first character."""
    title = str(title)
    if not placeholder or len(placeholder) < 2:
        return title
    for _ in range(len(title) + 1):  # a replacement forms a new occurrence only with a repetitive placeholder
        if placeholder not in title:
            return title
        title = title.replace(placeholder, f"{placeholder[0]} {placeholder[1:]}")
    raise ValueError(
        f"title {title!r}: cannot escape the placeholder {placeholder!r} in it; use another placeholder"
    )


def apply_chat(text: str, tokenizer=None, system: Optional[str] = None) -> str:
    """Wrap ``text`` in the backbone's chat template (user turn + generation prompt) when it has one."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return text
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
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
