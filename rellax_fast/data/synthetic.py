"""The embedded ``synthetic`` dataset: a MovieLens-shaped log generated deterministically in about a second.

How it is built (all draws from one ``numpy.random.Generator(PCG64(seed))``, so a seed fixes every byte):

1. **Genres and items.** 18 MovieLens genre names. Each of ``n_items`` items gets a primary genre (popular
   genres more often) and with some probability one or two secondary genres, a release year (1930-2000),
   a latent *quality* q_i ~ N(0, 0.55) and a popularity weight (log-normal). Its title is built from word
   vocabularies that depend on the primary genre ("The Silent Harbor (1994)" for a drama, "Blood Crypt"
   for horror, ...), so the title text alone carries the genre: semantic retrieval over titles finds
   same-genre behaviours. Titles are made unique with a sequel numeral where needed.
2. **Users.** ``n_users`` users with gender, age and a MovieLens occupation. Each user has a taste vector
   over genres θ_u ~ N(0, 1.1²) (gender nudges a few genres), a drift vector δ_u ~ N(0, 0.7²) so the taste
   at normalised time τ ∈ [0, 1] of the user's activity is θ_u + τ·δ_u, and a personal bias b_u ~ N(0, 0.45²)
   (lenient or strict raters).
3. **Behaviour.** The user's number of ratings is log-normal (at least 20), scaled so the total is about
   ``n_ratings``. Activity windows start at random points of a 7-month span; timestamps are sorted uniform
   draws inside the window. Items are chosen without replacement in four time chunks, each with probability
   ∝ popularity · exp(0.8 · current taste of the item's genres), so histories cluster by genre and follow
   the drift.
4. **Ratings.** score = 3.22 + b_u + q_i + 0.75 · taste_u(τ)·genres_i / |genres_i| + ε, ε ~ N(0, 0.6²),
   rounded and clipped to 1..5 stars. About 55 % of ratings are > 3 (the CTR label), as in ml-100k.

Why retrieval and collaborative signals help: the label depends on the user's taste *for the target's
genres* (visible in the user's earlier ratings of same-genre items, which similarity retrieval brings
forward while a recency window may miss them), on the user's bias (the user's mean rating) and on the
item's quality (its mean rating over other users), on top of noise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .domains import RecDataset

__all__ = ["make_synthetic", "SYNTHETIC_GENRES"]

SYNTHETIC_GENRES = (
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

# Per-genre (adjectives, nouns): the title vocabulary that makes text similarity follow genre.
_VOCAB = {
    "Action": (
        "Deadly Iron Rapid Final Bullet Steel Lethal",
        "Strike Force Target Fury Mission Blast Vengeance",
    ),
    "Adventure": (
        "Lost Golden Hidden Wild Distant Secret",
        "Island Treasure Expedition Jungle Voyage Temple",
    ),
    "Animation": ("Little Magic Happy Dancing Tiny Painted", "Bunny Dragon Toybox Cartoon Kitten Balloon"),
    "Children's": ("Friendly Lucky Merry Brave Sunny Playful", "Puppy Pony Schoolyard Treehouse Buddy Teddy"),
    "Comedy": (
        "Crazy Silly Awkward Wacky Hilarious Clumsy",
        "Wedding Roommates Vacation Neighbors Party Prank",
    ),
    "Crime": ("Dirty Corrupt Stolen Underground Cold Crooked", "Heist Mob Racket Getaway Syndicate Hustle"),
    "Documentary": (
        "True Untold Real Inside Living Modern",
        "Story Record Journey Portrait Chronicle Witness",
    ),
    "Drama": ("Silent Quiet Broken Long Tender Distant", "Harbor Letters Season Promise Winter Homecoming"),
    "Fantasy": (
        "Enchanted Ancient Elven Mystic Forgotten Crystal",
        "Kingdom Sword Wizard Realm Crown Prophecy",
    ),
    "Film-Noir": ("Dark Smoky Midnight Rainy Crooked Fatal", "Alley Detective Dame Nightclub Alibi Shadow"),
    "Horror": (
        "Bloody Haunted Cursed Rotting Screaming Possessed",
        "Crypt Asylum Ghoul Cellar Graveyard Demon",
    ),
    "Musical": (
        "Singing Swinging Broadway Rhythmic Jazzy Melodic",
        "Melody Chorus Ballroom Serenade Tango Overture",
    ),
    "Mystery": (
        "Missing Strange Puzzling Locked Vanishing Hidden",
        "Clue Manor Riddle Key Disappearance Portrait",
    ),
    "Romance": ("Sweet Endless Summer Secret Paris Tender", "Love Kiss Heart Romance Honeymoon Valentine"),
    "Sci-Fi": (
        "Quantum Galactic Robotic Alien Orbital Cyber",
        "Planet Android Starship Nebula Colony Signal",
    ),
    "Thriller": (
        "Deadly Silent Hidden Final Twisted Sudden",
        "Conspiracy Witness Pursuit Trap Hostage Countdown",
    ),
    "War": (
        "Bloody Last Frozen Burning Fallen Heroic",
        "Battalion Beachhead Trenches Frontline Platoon Siege",
    ),
    "Western": ("Dusty Lonesome Wild Outlaw Golden Rusty", "Frontier Saloon Ranch Gunslinger Canyon Sheriff"),
}

_OCCUPATIONS = (
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
)

_NUMERALS = ("II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X")


def _titles(rng: np.random.Generator, primary: np.ndarray, years: np.ndarray) -> list:
    seen = {}
    titles = []
    for g, year in zip(primary, years):
        adjs, nouns = (w.split() for w in _VOCAB[SYNTHETIC_GENRES[g]])
        form = rng.integers(3)
        adj, noun = adjs[rng.integers(len(adjs))], nouns[rng.integers(len(nouns))]
        noun2 = nouns[rng.integers(len(nouns))]
        base = (f"The {adj} {noun}", f"{adj} {noun}", f"{noun} of the {adj} {noun2}")[form]
        k = seen.get(base, 0)
        seen[base] = k + 1
        if k:
            base = f"{base} {_NUMERALS[(k - 1) % len(_NUMERALS)]}" + ("" if k <= len(_NUMERALS) else f"-{k}")
        titles.append(f"{base} ({year})")
    return titles


def make_synthetic(
    seed: int = 0, n_users: int = 950, n_items: int = 1700, n_ratings: int = 100_000
) -> RecDataset:
    """Generate the synthetic dataset (see the module docstring for the model)."""
    if n_users < 1 or n_items < 40 or n_ratings < 20 * n_users:
        raise ValueError(
            f"n_users/n_items/n_ratings: need n_users >= 1, n_items >= 40 and n_ratings >= 20*n_users, "
            f"got {n_users}, {n_items}, {n_ratings}"
        )
    rng = np.random.default_rng(seed)  # one stream, drawn in a fixed order: items, users, then behaviour
    items = _synthetic_items(rng, n_items)
    users = _synthetic_users(rng, n_users)
    # 3. behaviour
    counts = rng.lognormal(0.0, 0.8, size=n_users)
    counts = np.maximum(20, np.round(counts / counts.sum() * n_ratings)).astype(np.int64)
    counts = np.minimum(counts, n_items // 2)
    columns = [_user_ratings(rng, u, int(counts[u]), items, users) for u in range(n_users)]
    ratings = pd.DataFrame(
        {
            "user_id": np.concatenate(
                [np.full(len(ts), u + 1, dtype=np.int64) for u, (ts, _, _) in enumerate(columns)]
            ),
            "item_id": np.concatenate([items["item_ids"][chosen] for _, chosen, _ in columns]),
            "rating": np.concatenate([r for _, _, r in columns]).astype(np.float32),
            "timestamp": np.concatenate([ts for ts, _, _ in columns]),
        }
    )
    ratings = ratings.sort_values(["timestamp", "user_id"], kind="stable").reset_index(drop=True)
    items_df = pd.DataFrame(
        {"title": items["titles"], "genres": items["genres"], "year": items["years"]},
        index=pd.Index(items["item_ids"], name="item_id"),
    )
    users_df = pd.DataFrame(
        {"gender": users["gender"], "age": users["age"], "occupation": users["occupation"]},
        index=pd.Index(np.arange(1, n_users + 1, dtype=np.int64), name="user_id"),
    )
    return RecDataset("synthetic", "movie", ratings, items_df, users_df)


def _synthetic_items(rng: np.random.Generator, n_items: int) -> dict:
    """1. items: genre memberships (a primary genre and up to two more), years, quality, popularity, titles."""
    G = len(SYNTHETIC_GENRES)
    genre_pop = rng.dirichlet(np.full(G, 2.0))
    primary = rng.choice(G, size=n_items, p=genre_pop)
    member = np.zeros((n_items, G), dtype=np.float64)
    member[np.arange(n_items), primary] = 1.0
    for _ in range(2):
        extra = rng.integers(G, size=n_items)
        add = rng.random(n_items) < 0.35
        member[np.flatnonzero(add), extra[add]] = 1.0
    years = rng.integers(1930, 2001, size=n_items)
    quality = rng.normal(0.0, 0.55, size=n_items)
    popularity = rng.lognormal(0.0, 1.0, size=n_items)
    return {
        "member": member,
        "years": years,
        "quality": quality,
        "log_pop": np.log(popularity),
        "n_genres_of": member.sum(1),
        "titles": _titles(rng, primary, years),
        "genres": [[SYNTHETIC_GENRES[g] for g in np.flatnonzero(row)] for row in member],
        "item_ids": np.arange(1, n_items + 1, dtype=np.int64),
    }


def _synthetic_users(rng: np.random.Generator, n_users: int) -> dict:
    """2. users: gender, age, occupation, genre taste (shifted by gender), its drift over time, a rating bias."""
    G = len(SYNTHETIC_GENRES)
    gender = np.where(rng.random(n_users) < 0.71, "M", "F")
    age = np.clip(rng.normal(33, 11, size=n_users).round(), 7, 73).astype(np.int64)
    occupation = np.asarray(_OCCUPATIONS)[rng.integers(len(_OCCUPATIONS), size=n_users)]
    taste = rng.normal(0.0, 1.1, size=(n_users, G))
    fem = gender == "F"
    for g, shift in (("Romance", 0.6), ("Drama", 0.3), ("War", -0.5), ("Action", -0.3)):
        taste[fem, SYNTHETIC_GENRES.index(g)] += shift
    drift = rng.normal(0.0, 0.7, size=(n_users, G))
    user_bias = rng.normal(0.0, 0.45, size=n_users)
    return {
        "gender": gender,
        "age": age,
        "occupation": occupation,
        "taste": taste,
        "drift": drift,
        "user_bias": user_bias,
    }


_SPAN_S = 7 * 30 * 86400  # the whole log spans seven months
_T0 = 874_724_710  # the first second of ml-100k's span, for familiarity
_N_CHUNKS = 4  # a user's items are chosen in this many time chunks, each under the taste of its midpoint


def _user_ratings(rng: np.random.Generator, u: int, n: int, items: dict, users: dict):
    """3.-4. user ``u``'s ``n`` behaviours: (timestamps, chosen item indices, ratings). Items are drawn without
    replacement by popularity and the drifting taste (Gumbel top-k per time chunk), then rated."""
    member, n_genres_of = items["member"], items["n_genres_of"]
    taste, drift = users["taste"][u], users["drift"][u]
    length = rng.uniform(0.05, 1.0) * _SPAN_S
    start = _T0 + rng.uniform(0, _SPAN_S - length)
    ts = np.sort(rng.uniform(start, start + length, size=n)).astype(np.int64)
    tau = (ts - ts[0]) / max(ts[-1] - ts[0], 1)
    chosen = np.empty(n, dtype=np.int64)
    taken = np.zeros(len(member), dtype=bool)
    bounds = np.linspace(0, n, _N_CHUNKS + 1).round().astype(int)
    for c in range(_N_CHUNKS):
        lo, hi = bounds[c], bounds[c + 1]
        if hi <= lo:
            continue
        theta = taste + tau[(lo + hi) // 2] * drift
        logits = items["log_pop"] + 0.8 * (member @ theta) / n_genres_of
        gumbel = logits + rng.gumbel(size=len(member))
        gumbel[taken] = -np.inf
        pick = np.argpartition(-gumbel, hi - lo - 1)[: hi - lo]
        pick = pick[np.argsort(-gumbel[pick], kind="stable")]
        chosen[lo:hi] = rng.permutation(pick)
        taken[pick] = True
    # 4. ratings
    theta_t = taste[None, :] + tau[:, None] * drift[None, :]
    affinity = (theta_t * member[chosen]).sum(1) / n_genres_of[chosen]
    score = (
        3.22 + users["user_bias"][u] + items["quality"][chosen] + 0.75 * affinity + rng.normal(0, 0.6, size=n)
    )
    return ts, chosen, np.clip(np.round(score), 1, 5)
