"""CTR samples in the paper's setup, stored columnar: per-user sequences by offsets, splits as index arrays.

Layout (consumed directly by ``ops.semantic_topk``): ``UserSequences`` packs every user's ratings in time
order (``items[offsets[u]:offsets[u+1]]``); a sample is (``user_index``, ``pos``): its target is
``items[offsets[u] + pos]`` and its history is positions ``0..pos-1`` of that user, oldest first.

Preprocessing (ReLLa / ReLLaX):

- MovieLens-style (domain "movie", incl. synthetic): label = rating > 3. Each user's ratings are ordered by
  timestamp; same-second ties keep the order of the raw file (stable sort), so "earlier" means earlier in
  that order and history timestamps are <= the target's. Every rating is a sample whose history is all the
  user's earlier ratings; samples with fewer than ``min_history`` (5) earlier ratings are dropped. The rest,
  sorted by global time (timestamp, then user, then position), are split 8:1:1 into train/valid/test, so
  every test timestamp is >= every train timestamp.
- BookCrossing (domain "book"): label = rating >= 5 (implicit 0s are negatives). Users with more than 5
  ratings are kept. For each, one rating (seeded) is the target and is placed LAST in the user's sequence;
  the other ratings, in file order, are its history. Users are split at random (seeded) 90/10 into
  train/test; ``valid`` is a seeded ninth of that 90 % taken out of train (so 80/10/10 overall, disjoint).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict

import numpy as np
import pandas as pd

from .datasets import RecDataset

__all__ = [
    "UserSequences", "CTRSplit", "CTRData", "prepare_ctr", "save_prepared", "load_prepared", "SPLITS",
    "build_sequences", "label_of",
]  # fmt: skip

SPLITS = ("train", "valid", "test")


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

    def of_user(self, u: int) -> slice:
        return slice(int(self.offsets[u]), int(self.offsets[u + 1]))


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
            self.sequences, *(getattr(self, n)[index] for n in
                              ("user_index", "pos", "user_id", "item_id", "rating", "label", "timestamp"))
        )  # fmt: skip

    def history_arrays(self):
        """(offsets (S+1,), values (sum pos,)): every sample's history, flattened, without a Python loop."""
        lengths = self.pos.astype(np.int64)
        out_offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(lengths, out=out_offsets[1:])
        starts = self.sequences.offsets[self.user_index]
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
    """The paper's binary label: MovieLens rating > 3; BookCrossing rating >= 5."""
    if domain == "movie":
        return (np.asarray(rating) > 3).astype(np.int8)
    if domain == "book":
        return (np.asarray(rating) >= 5).astype(np.int8)
    raise ValueError(f"domain: expected 'movie' or 'book', got {domain!r}")


def build_sequences(ratings: pd.DataFrame) -> UserSequences:
    """Pack ratings per user, ordered by (timestamp, file order); users in ascending id order."""
    order = np.lexsort((np.arange(len(ratings)), ratings["timestamp"].to_numpy(), ratings["user_id"].to_numpy()))
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


def _make_split(seq: UserSequences, user_index: np.ndarray, pos: np.ndarray, domain: str) -> CTRSplit:
    flat = seq.offsets[user_index] + pos
    rating = seq.ratings[flat]
    return CTRSplit(
        seq, user_index.astype(np.int64), pos.astype(np.int64), seq.user_ids[user_index], seq.items[flat],
        rating, label_of(domain, rating), seq.timestamps[flat],
    )  # fmt: skip


def _prepare_movielens(ds: RecDataset, min_history: int):
    seq = build_sequences(ds.ratings)
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
    cuts = {"train": slice(0, n_train), "valid": slice(n_train, n_train + n_valid), "test": slice(n_train + n_valid, n)}
    splits = {k: _make_split(seq, user_index[s], pos[s], ds.domain) for k, s in cuts.items()}
    rule = {
        "label": "rating > 3",
        "history": "all earlier ratings of the user (ties: file order)",
        "min_history": min_history,
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
        user_ids.astype(np.int64), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        r["item_id"].to_numpy(np.int64), r["rating"].to_numpy(np.float32), r["timestamp"].to_numpy(np.int64),
    )  # fmt: skip
    perm = rng.permutation(len(user_ids))
    n_test = int(round(len(perm) * 0.1))
    test, rest = perm[:n_test], perm[n_test:]
    n_valid = int(round(len(rest) / 9))
    parts = {"train": np.sort(rest[n_valid:]), "valid": np.sort(rest[:n_valid]), "test": np.sort(test)}
    splits = {k: _make_split(seq, v.astype(np.int64), counts[v] - 1, ds.domain) for k, v in parts.items()}
    rule = {
        "label": "rating >= 5 (implicit 0 = negative)",
        "users": f"more than {min_ratings_exclusive} ratings",
        "history": "one seeded random target per user placed last; the other ratings, file order",
        "split": "random 90/10 train/test by user; valid = seeded 1/9 of the 90% taken out of train",
    }
    return seq, splits, rule


def prepare_ctr(ds: RecDataset, seed: int = 42, min_history: int = 5) -> CTRData:
    """Build the CTR samples and the train/valid/test splits of ``ds`` (rules in the module docstring)."""
    if ds.domain == "movie":
        seq, splits, rule = _prepare_movielens(ds, min_history)
    elif ds.domain == "book":
        seq, splits, rule = _prepare_bookcrossing(ds, seed)
    else:
        raise ValueError(f"ds.domain: expected 'movie' or 'book', got {ds.domain!r}")
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
            k: {"n": int(len(s)), "positive_rate": float(s.label.mean()) if len(s) else float("nan"),
                "mean_history": float(s.pos.mean()) if len(s) else 0.0}
            for k, s in splits.items()
        },  # fmt: skip
    }
    return CTRData(ds, seq, splits, meta)


# ------------------------------------------------------------------------------------------------ on disk


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _split_table(split: CTRSplit):
    import pyarrow as pa

    offsets, values = split.history_arrays()
    history = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32) if offsets[-1] < 2**31 else offsets),
                                       pa.array(values, pa.int64()))  # fmt: skip
    return pa.table(
        {
            "user_id": pa.array(split.user_id, pa.int64()),
            "item_id": pa.array(split.item_id, pa.int64()),
            "rating": pa.array(split.rating, pa.float32()),
            "label": pa.array(split.label, pa.int8()),
            "timestamp": pa.array(split.timestamp, pa.int64()),
            "history": history,
            "user_index": pa.array(split.user_index, pa.int64()),
            "pos": pa.array(split.pos, pa.int64()),
        }
    )


def save_prepared(data: CTRData, out_dir) -> Path:
    """Write {train,valid,test}.parquet, sequences/items/users parquet and meta.json (last), each atomically.

    The split files carry the contracted columns (user_id, item_id, rating, label, timestamp, history) plus
    user_index and pos; ``sequences.parquet`` holds the packed user sequences so that :func:`load_prepared`
    rebuilds the exact same CTRData.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, split in data.splits.items():
        table = _split_table(split)
        _atomic_write(out / f"{name}.parquet", lambda p, t=table: pq.write_table(t, p))
    seq = data.sequences
    lengths = seq.lengths()
    seq_table = pa.table(
        {
            "user_id": pa.array(np.repeat(seq.user_ids, lengths), pa.int64()),
            "item_id": pa.array(seq.items, pa.int64()),
            "rating": pa.array(seq.ratings, pa.float32()),
            "timestamp": pa.array(seq.timestamps, pa.int64()),
        }
    )
    _atomic_write(out / "sequences.parquet", lambda p: pq.write_table(seq_table, p))
    _atomic_write(out / "items.parquet", lambda p: data.dataset.items.to_parquet(p))
    if data.dataset.users is not None:
        _atomic_write(out / "users.parquet", lambda p: data.dataset.users.to_parquet(p))
    elif (out / "users.parquet").exists():
        os.unlink(out / "users.parquet")
    meta = dict(data.meta, format_version=1)
    _atomic_write(out / "meta.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return out


def load_prepared(out_dir) -> CTRData:
    """Read what :func:`save_prepared` wrote. ``dataset.ratings`` holds the ratings kept in the sequences."""
    import pyarrow.parquet as pq

    out = Path(out_dir)
    meta_path = out / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: not found; run `rellax-fast prepare --out {out}` first")
    meta = json.loads(meta_path.read_text())
    seq_df = pq.read_table(out / "sequences.parquet").to_pandas()
    # The rows are already packed by user in sequence order; recover the offsets.
    users = seq_df["user_id"].to_numpy(np.int64)
    user_ids, starts = np.unique(users, return_index=True)
    if not np.all(np.diff(users) >= 0):
        raise ValueError(f"{out / 'sequences.parquet'}: rows are not grouped by ascending user_id")
    seq = UserSequences(
        user_ids, np.append(starts, len(users)).astype(np.int64), seq_df["item_id"].to_numpy(np.int64),
        seq_df["rating"].to_numpy(np.float32), seq_df["timestamp"].to_numpy(np.int64),
    )  # fmt: skip
    items = pd.read_parquet(out / "items.parquet")
    if "genres" in items:
        items["genres"] = [list(g) for g in items["genres"]]
    users_df = pd.read_parquet(out / "users.parquet") if (out / "users.parquet").exists() else None
    ds = RecDataset(meta["dataset"], meta["domain"], seq_df, items, users_df)
    splits = {}
    for name in SPLITS:
        t = pq.read_table(out / f"{name}.parquet", columns=["user_index", "pos"]).to_pandas()
        splits[name] = _make_split(seq, t["user_index"].to_numpy(np.int64), t["pos"].to_numpy(np.int64), ds.domain)
    return CTRData(ds, seq, splits, meta)
