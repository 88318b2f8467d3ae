"""CTR samples in the paper's setup, stored columnar: per-user sequences by offsets, splits as index arrays.

Layout (consumed directly by ``ops.semantic_topk``): ``UserSequences`` packs every user's ratings in time
order (``items[offsets[u]:offsets[u+1]]``); a sample is (``user_index``, ``pos``): its target is
``items[offsets[u] + pos]`` and its history is positions ``0..pos-1`` of that user, oldest first.

Preprocessing (ReLLa / ReLLaX):

- Timed domains (MovieLens, domain "movie", incl. synthetic): label = the domain record's rule
  (``Domain.label_rule``, recorded in meta.json; movie: rating > 3). A rating that the same user gives the
  same item again within ``repeat_window`` seconds (60 by default; ``prepare --repeat-window``) is dropped, the
  later one kept: as a near-duplicate (e.g. ``timestamp + 1``) it would sit in the later sample's history with
  the target's own item and rating, leaking the label. Each user's ratings are ordered by
  timestamp; same-second ties keep the order of the raw file (stable sort), so "earlier" means earlier in
  that order and history timestamps are <= the target's. Every rating is a sample whose history is all the
  user's earlier ratings; samples with fewer than ``min_history`` (5) earlier ratings are dropped. The rest,
  sorted by global time (timestamp, then user, then position), are split 8:1:1 into train/valid/test, so
  every test timestamp is >= every train timestamp.
- Untimed domains (BookCrossing, domain "book"): label = the domain record's rule (book: rating >= 5, so
  implicit 0s are negatives). Users with more than 5 ratings are kept. For each, one rating (seeded) is the
  target and is placed LAST in the user's sequence; the other ratings, in file order, are its history. Users
  are split at random (seeded) 90/10 into train/test; ``valid`` is a seeded ninth of that 90 % taken out of
  train (so 80/10/10 overall, disjoint).

An empty split is an error (:class:`EmptySplitError`), never an output.

Written to and read from disk by :mod:`rellax_fast.data.prepared` (``save_prepared`` / ``load_prepared``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np
import pandas as pd

from .datasets import DataFormatError, RecDataset
from .domains import get_domain

__all__ = [
    "UserSequences",
    "CTRSplit",
    "CTRData",
    "prepare_ctr",
    "SPLITS",
    "build_sequences",
    "make_split",
    "label_of",
    "ctr_fingerprint",
    "EmptySplitError",
]

SPLITS = ("train", "valid", "test")


class EmptySplitError(DataFormatError):
    """The data give no sample to one of the splits (names the dataset, the split and the rule that emptied it)."""


@dataclass
class UserSequences:
    """Every user's ratings in time order, concatenated; user u owns ``offsets[u]:offsets[u+1]``."""

    user_ids: np.ndarray  # (U,) int64
    offsets: np.ndarray  # (U+1,) int64
    items: np.ndarray  # (total,) int64
    ratings: np.ndarray  # (total,) float32
    timestamps: np.ndarray  # (total,) int64

    def __len__(self) -> int:
        return len(self.user_ids)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class CTRSplit:
    """Samples of one split as parallel arrays. Sample i: history = positions 0..pos[i]-1 of user_index[i]."""

    sequences: UserSequences = field(repr=False)
    user_index: np.ndarray  # (S,) int64 index into sequences
    pos: np.ndarray  # (S,) int64 target position in the user's sequence
    user_id: np.ndarray  # (S,) int64
    item_id: np.ndarray  # (S,) int64
    rating: np.ndarray  # (S,) float32
    label: np.ndarray  # (S,) int8
    timestamp: np.ndarray  # (S,) int64

    def __len__(self) -> int:
        return len(self.user_index)

    def history(self, i: int) -> np.ndarray:
        """Item ids before sample i's target, oldest first."""
        start = int(self.sequences.offsets[self.user_index[i]])
        return self.sequences.items[start : start + int(self.pos[i])]

    def history_ratings(self, i: int) -> np.ndarray:
        start = int(self.sequences.offsets[self.user_index[i]])
        return self.sequences.ratings[start : start + int(self.pos[i])]

    def history_timestamps(self, i: int) -> np.ndarray:
        start = int(self.sequences.offsets[self.user_index[i]])
        return self.sequences.timestamps[start : start + int(self.pos[i])]

    def subset(self, index) -> CTRSplit:
        index = np.asarray(index)
        return CTRSplit(
            self.sequences,
            *(
                getattr(self, n)[index]
                for n in ("user_index", "pos", "user_id", "item_id", "rating", "label", "timestamp")
            ),
        )

    def history_arrays(self, max_history: Optional[int] = None):
        """(offsets (S+1,), values): every sample's history (the last ``max_history`` items when given, oldest
        first), flattened, without a Python loop. Uncapped, its size is the sum of the history lengths, which
        grows with the square of a user's length: derive it for small data only."""
        lengths = self.pos.astype(np.int64)
        if max_history is not None:
            if max_history < 0:
                raise ValueError(f"max_history must be >= 0 or None, got {max_history}")
            lengths = np.minimum(lengths, max_history)
        out_offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(lengths, out=out_offsets[1:])
        starts = self.sequences.offsets[self.user_index] + self.pos - lengths
        gather = np.repeat(starts - out_offsets[:-1], lengths) + np.arange(out_offsets[-1], dtype=np.int64)
        return out_offsets, self.sequences.items[gather]


@dataclass
class CTRData:
    dataset: RecDataset
    sequences: UserSequences
    splits: Dict[str, CTRSplit]
    meta: dict

    def __getitem__(self, split: str) -> CTRSplit:
        return self.splits[split]


def label_of(domain: str, rating: np.ndarray) -> np.ndarray:
    """The paper's binary label, the domain record's rule: MovieLens rating > 3; BookCrossing rating >= 5."""
    return get_domain(domain).label(rating)


def build_sequences(ratings: pd.DataFrame) -> UserSequences:
    """Pack ratings per user, ordered by (timestamp, file order); users in ascending id order."""
    order = np.lexsort(
        (np.arange(len(ratings)), ratings["timestamp"].to_numpy(), ratings["user_id"].to_numpy())
    )
    users = ratings["user_id"].to_numpy()[order]
    user_ids, counts = np.unique(users, return_counts=True)
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return UserSequences(
        user_ids.astype(np.int64),
        offsets,
        ratings["item_id"].to_numpy()[order].astype(np.int64),
        ratings["rating"].to_numpy()[order].astype(np.float32),
        ratings["timestamp"].to_numpy()[order].astype(np.int64),
    )


def make_split(seq: UserSequences, user_index: np.ndarray, pos: np.ndarray, domain: str) -> CTRSplit:
    """The split of samples (``user_index``, ``pos``) into ``seq``, labelled by ``domain``'s rule."""
    flat = seq.offsets[user_index] + pos
    rating = seq.ratings[flat]
    return CTRSplit(
        seq,
        user_index.astype(np.int64),
        pos.astype(np.int64),
        seq.user_ids[user_index],
        seq.items[flat],
        rating,
        label_of(domain, rating),
        seq.timestamps[flat],
    )


REPEAT_WINDOW_S = 60  # default of prepare_ctr(repeat_window=...) / `prepare --repeat-window`


def drop_near_repeats(ratings: pd.DataFrame, window: int, name: str = "ratings") -> pd.DataFrame:
    """Drop each rating of a (user, item) that the same user rates again within ``window`` seconds (the later
    rating is kept: a correction or a resubmission; ``window`` 0 keeps everything). Such a near-repeat would
    sit in the history of the later one, showing its own item and, usually, its own rating: the label leaks.
    Exact repeats (same timestamp) are dropped by the loaders already; this catches ``timestamp + 1`` copies.
    Warns (:class:`~rellax_fast.data.parsing.DataWarning`) how many were dropped."""
    import warnings

    from .parsing import DataWarning

    if window <= 0 or len(ratings) < 2:
        return ratings
    user, item, ts = (ratings[c].to_numpy(np.int64) for c in ("user_id", "item_id", "timestamp"))
    order = np.lexsort((np.arange(len(ratings)), ts, item, user))
    u, i, t = user[order], item[order], ts[order]
    again = (u[:-1] == u[1:]) & (i[:-1] == i[1:]) & (t[1:] - t[:-1] <= window)
    drop = np.zeros(len(ratings), dtype=bool)
    drop[order[:-1][again]] = True
    n = int(drop.sum())
    if n == 0:
        return ratings
    warnings.warn(
        f"{name}: dropped {n:,} rating{'s' if n > 1 else ''} that the same user gave the same item again within "
        f"{window} s (keeping the later one; otherwise it would sit in the later one's history and leak its "
        f"label); --repeat-window 0 keeps them",
        DataWarning,
        stacklevel=3,
    )
    return ratings.loc[~drop].reset_index(drop=True)


def _prepare_movielens(ds: RecDataset, min_history: int, repeat_window: int = REPEAT_WINDOW_S):
    seq = build_sequences(drop_near_repeats(ds.ratings, repeat_window, ds.name))
    lengths = seq.lengths()
    user_index = np.repeat(np.arange(len(seq), dtype=np.int64), lengths)
    pos = np.arange(len(seq.items), dtype=np.int64) - np.repeat(seq.offsets[:-1], lengths)
    keep = pos >= min_history
    user_index, pos = user_index[keep], pos[keep]
    ts = seq.timestamps[seq.offsets[user_index] + pos]
    order = np.lexsort((pos, seq.user_ids[user_index], ts))  # global time order
    user_index, pos = user_index[order], pos[order]
    n = len(pos)
    n_train, n_valid = int(n * 0.8), int(n * 0.1)
    cuts = {
        "train": slice(0, n_train),
        "valid": slice(n_train, n_train + n_valid),
        "test": slice(n_train + n_valid, n),
    }
    splits = {k: make_split(seq, user_index[s], pos[s], ds.domain) for k, s in cuts.items()}
    rule = {
        "label": get_domain(ds.domain).label_rule,
        "history": "all earlier ratings of the user (ties: file order)",
        "min_history": min_history,
        "repeats": f"a rating the same user gives the same item again within {repeat_window} s is dropped (the later kept)",
        "split": "8:1:1 by global time order",
    }
    return seq, splits, rule


def _prepare_bookcrossing(ds: RecDataset, seed: int, min_ratings_exclusive: int = 5):
    r = ds.ratings
    counts = r.groupby("user_id")["user_id"].transform("size").to_numpy()
    r = r[counts > min_ratings_exclusive]
    rng = np.random.default_rng(seed)
    # File order inside each user, then one seeded target per user moved to the end.
    order = np.lexsort((np.arange(len(r)), r["user_id"].to_numpy()))
    r = r.iloc[order].reset_index(drop=True)
    users = r["user_id"].to_numpy()
    user_ids, starts, counts = np.unique(users, return_index=True, return_counts=True)
    target_row = starts + (rng.random(len(user_ids)) * counts).astype(np.int64)
    is_target = np.zeros(len(r), dtype=bool)
    is_target[target_row] = True
    r = r.iloc[np.lexsort((is_target, users))].reset_index(drop=True)  # target last per user
    seq = UserSequences(
        user_ids.astype(np.int64),
        np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        r["item_id"].to_numpy(np.int64),
        r["rating"].to_numpy(np.float32),
        r["timestamp"].to_numpy(np.int64),
    )
    perm = rng.permutation(len(user_ids))
    n_test = int(round(len(perm) * 0.1))
    test, rest = perm[:n_test], perm[n_test:]
    n_valid = int(round(len(rest) / 9))
    parts = {"train": np.sort(rest[n_valid:]), "valid": np.sort(rest[:n_valid]), "test": np.sort(test)}
    splits = {k: make_split(seq, v.astype(np.int64), counts[v] - 1, ds.domain) for k, v in parts.items()}
    rule = {
        "label": get_domain(ds.domain).label_rule,
        "users": f"more than {min_ratings_exclusive} ratings",
        "history": "one seeded random target per user placed last; the other ratings, file order",
        "split": "random 90/10 train/test by user; valid = seeded 1/9 of the 90% taken out of train",
    }
    return seq, splits, rule


def prepare_ctr(
    ds: RecDataset, seed: int = 42, min_history: int = 5, repeat_window: int = REPEAT_WINDOW_S
) -> CTRData:
    """Build the CTR samples and the train/valid/test splits of ``ds`` (rules in the module docstring).
    ``repeat_window``: time-stamped data: :func:`drop_near_repeats` (0: off)."""
    if repeat_window < 0:
        raise ValueError(f"repeat_window: expected seconds >= 0 (0: off), got {repeat_window}")
    if get_domain(ds.domain).timed:
        seq, splits, rule = _prepare_movielens(ds, min_history, repeat_window)
    else:
        seq, splits, rule = _prepare_bookcrossing(ds, seed)
    empty = [k for k, v in splits.items() if len(v) == 0]
    if empty:
        n = sum(len(v) for v in splits.values())
        why = (
            f"samples need at least min_history={min_history} earlier ratings of the user (prepare --min-history)"
            if get_domain(ds.domain).timed
            else "users need more than 5 ratings"
        )
        raise EmptySplitError(
            f"{ds.name}: the {'/'.join(empty)} split{'s' if len(empty) > 1 else ''} would be empty: "
            f"{len(ds.ratings):,} ratings of {ds.ratings['user_id'].nunique() if len(ds.ratings) else 0:,} users give "
            f"{n:,} samples in all ({why}); need more ratings per user or a lower --min-history"
        )
    meta = {
        "dataset": ds.name,
        "domain": ds.domain,
        "seed": seed,
        "rules": rule,
        "n_ratings": int(len(ds.ratings)),
        "n_users": int(ds.ratings["user_id"].nunique()),
        "n_items": int(len(ds.items)),
        "n_sequence_users": int(len(seq)),
        "n_sequence_ratings": int(len(seq.items)),
        "splits": {
            k: {"n": int(len(s)), "positive_rate": float(s.label.mean()), "mean_history": float(s.pos.mean())}
            for k, s in splits.items()
        },
    }
    return CTRData(ds, seq, splits, meta)


def ctr_fingerprint(data: CTRData) -> str:
    """sha256 of what the CTR samples are made of: dataset name and domain, the item catalogue's ids, the packed
    sequences (users, offsets, items, ratings, timestamps) and each split's (user_index, pos). Independent of
    file formats and library versions; the DIN is reused only for data with the same fingerprint."""
    digest = hashlib.sha256()
    digest.update(json.dumps([data.dataset.name, data.dataset.domain, list(data.splits)]).encode())
    seq = data.sequences
    arrays = [
        np.asarray(data.dataset.items.index, np.int64),
        seq.user_ids,
        seq.offsets,
        seq.items,
        seq.timestamps,
    ]
    for a in arrays:
        digest.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(seq.ratings, dtype="<f4").tobytes())
    for name, split in data.splits.items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(split.user_index, dtype="<i8").tobytes())
        digest.update(np.ascontiguousarray(split.pos, dtype="<i8").tobytes())
    return digest.hexdigest()
