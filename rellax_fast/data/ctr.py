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

On disk, storage is linear in the number of ratings: ``sequences.parquet`` holds the packed sequences once
and each split file holds per-sample columns only (user_id, item_id, rating, label, timestamp, and the
reference user_index, pos). The flat per-sample ``history`` list column is optional (``save_prepared
(history_column=...)``: none (default), capped at ``max_history``, or full); its full form grows with the
square of history length (2.9e8 entries for 1.2M ratings at 5 % of ML-25M), so nothing here requires it, and
folders written with it still load (it is simply not read).

A prepared folder (``save_prepared`` / ``load_prepared``) is one unit: every file is written to a
temporary name, hashed (the bytes written) and fsynced first; then ``meta.json`` is removed, the files are
renamed into place and ``meta.json`` is written last, carrying a manifest (bytes, sha256 and row count of
each file, and :func:`ctr_fingerprint` of the content). Writers of one folder are serialised by an exclusive
``flock`` on the folder (the last complete writer wins, whole); readers take a shared one. ``load_prepared``
checks every file against the manifest and the splits against the sequences, and refuses a mismatch with
:class:`PreparedDataError` naming the file. Other files in the folder (caches, ``ctr/``, runs) are untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pandas as pd

from .._io import file_lock, file_sha256, fsync_dir
from .datasets import DataFormatError, RecDataset
from .domains import get_domain

__all__ = [
    "UserSequences",
    "CTRSplit",
    "CTRData",
    "prepare_ctr",
    "save_prepared",
    "load_prepared",
    "SPLITS",
    "build_sequences",
    "label_of",
    "ctr_fingerprint",
    "EmptySplitError",
    "PreparedDataError",
    "HISTORY_COLUMNS",
]

SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 2  # 2: meta.json carries the manifest


class EmptySplitError(DataFormatError):
    """The data give no sample to one of the splits (names the dataset, the split and the rule that emptied it)."""


class PreparedDataError(DataFormatError):
    """A prepared folder is incomplete, mixed or modified: a file does not match meta.json's manifest."""


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


def _make_split(seq: UserSequences, user_index: np.ndarray, pos: np.ndarray, domain: str) -> CTRSplit:
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
    splits = {k: _make_split(seq, user_index[s], pos[s], ds.domain) for k, s in cuts.items()}
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
    splits = {k: _make_split(seq, v.astype(np.int64), counts[v] - 1, ds.domain) for k, v in parts.items()}
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


# ------------------------------------------------------------------------------------------------ on disk

DATA_FILES = (
    "train.parquet",
    "valid.parquet",
    "test.parquet",
    "sequences.parquet",
    "items.parquet",
    "users.parquet",
)


def _write_temp(out: Path, name: str, write) -> Path:
    """Write one file under a temporary name in ``out`` (``write(path)``), fsync it; return the temp path.
    The name is ``_io``'s recognisable temporary name and the mode that of a plain ``open`` (umask)."""
    from .._io import temp_path_for

    tmp = temp_path_for(out / name)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    """Rename one written file into place (a separate function so tests can inject a failure between files)."""
    os.replace(tmp, final)


HISTORY_COLUMNS = ("none", "capped", "full")


def _check_history_option(history_column: str, max_history: Optional[int]) -> Optional[int]:
    """The ``history`` column's length cap for ``history_column`` (None: uncapped or no column)."""
    if history_column not in HISTORY_COLUMNS:
        raise ValueError(
            f"history_column: expected one of {', '.join(HISTORY_COLUMNS)}, got {history_column!r}"
        )
    if history_column == "capped":
        if max_history is None or int(max_history) < 1:
            raise ValueError(
                f"max_history: history_column='capped' needs max_history >= 1, got {max_history!r}"
            )
        return int(max_history)
    return None


def _split_table(split: CTRSplit, history_column: str = "none", max_history: Optional[int] = None):
    """The split's parquet table: the contracted columns, the (user_index, pos) reference into the packed
    sequences, and the optional flat ``history`` list (``history_column``: none / capped / full)."""
    import pyarrow as pa

    columns = {
        "user_id": pa.array(split.user_id, pa.int64()),
        "item_id": pa.array(split.item_id, pa.int64()),
        "rating": pa.array(split.rating, pa.float32()),
        "label": pa.array(split.label, pa.int8()),
        "timestamp": pa.array(split.timestamp, pa.int64()),
    }
    if history_column != "none":
        offsets, values = split.history_arrays(max_history if history_column == "capped" else None)
        columns["history"] = pa.ListArray.from_arrays(
            pa.array(offsets.astype(np.int32) if offsets[-1] < 2**31 else offsets),
            pa.array(values, pa.int64()),
        )
    columns["user_index"] = pa.array(split.user_index, pa.int64())
    columns["pos"] = pa.array(split.pos, pa.int64())
    return pa.table(columns)


def save_prepared(
    data: CTRData, out_dir, history_column: str = "none", max_history: Optional[int] = None
) -> Path:
    """Write {train,valid,test}.parquet, sequences/items/users parquet and meta.json as one unit.

    The split files carry the contracted columns (user_id, item_id, rating, label, timestamp) and the
    reference (user_index, pos) into ``sequences.parquet``, which holds the packed user sequences once, so
    storage is linear in the number of ratings and :func:`load_prepared` rebuilds the exact same CTRData.

    ``history_column`` adds the flat ``history`` list (item ids before the target, oldest first) for users
    who want a self-contained file: ``"capped"`` keeps the last ``max_history`` (linear), ``"full"`` every
    earlier rating (its size grows with the square of a user's history length: small data only). The
    default ``"none"`` writes no such column; every rellax-fast consumer reads the packed form. How the
    folder stays one unit: see the module docstring.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    cap = _check_history_option(history_column, max_history)
    empty = [k for k, s in data.splits.items() if len(s) == 0]
    if empty:
        raise EmptySplitError(f"{data.dataset.name}: refusing to write empty split(s) {empty} to {out_dir}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seq = data.sequences
    seq_table = pa.table(
        {
            "user_id": pa.array(np.repeat(seq.user_ids, seq.lengths()), pa.int64()),
            "item_id": pa.array(seq.items, pa.int64()),
            "rating": pa.array(seq.ratings, pa.float32()),
            "timestamp": pa.array(seq.timestamps, pa.int64()),
        }
    )
    # each split's table is built inside its writer, so only one (with its optional history) is alive at a time
    writers = {
        f"{name}.parquet": (
            lambda p, s=split: pq.write_table(_split_table(s, history_column, cap), p),
            len(split),
        )
        for name, split in data.splits.items()
    }
    writers["sequences.parquet"] = (lambda p: pq.write_table(seq_table, p), len(seq.items))
    writers["items.parquet"] = (lambda p: data.dataset.items.to_parquet(p), len(data.dataset.items))
    if data.dataset.users is not None:
        writers["users.parquet"] = (lambda p: data.dataset.users.to_parquet(p), len(data.dataset.users))
    with file_lock(out, exclusive=True):
        # temp files of a prepare that was killed (no other prepare is alive: we hold the lock)
        from .._io import remove_stale_temps

        remove_stale_temps(out)
        for stale in out.glob(".*.tmp*"):
            if stale.is_file() and any(stale.name.startswith(f".{n}.") for n in (*DATA_FILES, "meta.json")):
                stale.unlink(missing_ok=True)
        temps, manifest = {}, {}
        try:
            for name, (write, rows) in writers.items():
                temps[name] = _write_temp(out, name, write)
                # the hash of the bytes this process wrote, taken before they are published
                manifest[name] = {
                    "bytes": temps[name].stat().st_size,
                    "sha256": file_sha256(temps[name]),
                    "rows": rows,
                }
            meta = dict(
                data.meta,
                format_version=FORMAT_VERSION,
                history_column={"mode": history_column, "max_history": cap},
                manifest={"files": manifest, "fingerprint": ctr_fingerprint(data)},
            )
            meta_tmp = _write_temp(
                out, "meta.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n")
            )
            temps["meta.json"] = meta_tmp
            # from here until meta.json is back, the folder reads as incomplete
            (out / "meta.json").unlink(missing_ok=True)
            fsync_dir(out)
            for name in writers:
                _publish(temps[name], out / name)
                del temps[name]
            if "users.parquet" not in writers:
                (out / "users.parquet").unlink(missing_ok=True)
            _publish(temps["meta.json"], out / "meta.json")
            del temps["meta.json"]
            fsync_dir(out)
        finally:
            for tmp in temps.values():
                tmp.unlink(missing_ok=True)
    return out


def _check_manifest(out: Path, meta: dict) -> dict:
    """Every file of the manifest is there with its size and sha256; returns the manifest's file table."""
    from .._io import PathOutsideFolderError, path_inside

    files = meta["manifest"]["files"]
    if not isinstance(files, dict):
        raise PreparedDataError(
            f"{out / 'meta.json'}: manifest.files is not a table; rerun `rellax-fast prepare --out {out}`"
        )
    try:  # every key, on its text, before any file is opened
        paths = {name: path_inside(out, name, f"{out / 'meta.json'}: manifest key") for name in files}
    except PathOutsideFolderError as exc:
        raise PreparedDataError(f"{exc}; rerun `rellax-fast prepare --out {out}`") from None
    unknown = sorted(name for name in files if name not in DATA_FILES)
    if unknown:
        raise PreparedDataError(
            f"{out / 'meta.json'}: the manifest lists {unknown}, which `prepare` never writes "
            f"(expected some of {list(DATA_FILES)}); rerun `rellax-fast prepare --out {out}`"
        )
    absent = [n for n in DATA_FILES if n != "users.parquet" and n not in files]
    if absent:
        raise PreparedDataError(
            f"{out / 'meta.json'}: the manifest does not list {absent}, so they cannot be "
            f"verified; rerun `rellax-fast prepare --out {out}`"
        )
    for name, entry in files.items():
        path = paths[name]
        if not path.exists():
            raise PreparedDataError(
                f"{path}: missing, but {out / 'meta.json'} lists it; rerun `rellax-fast prepare --out {out}`"
            )
        size = path.stat().st_size
        if size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise PreparedDataError(
                f"{path}: does not match the manifest in {out / 'meta.json'} ({size} bytes, manifest {entry['bytes']}; "
                f"sha256 differs): the folder was modified, or mixed by an interrupted or concurrent `prepare`; "
                f"rerun `rellax-fast prepare --out {out}`"
            )
    return files


def _check_split(out: Path, name: str, table, seq: UserSequences, expected_rows) -> None:
    """The split's rows (a DataFrame) point into the sequences and agree with them (catches a split from other
    data: the sequences of another `prepare`)."""
    path = out / f"{name}.parquet"
    ui, pos = table["user_index"].to_numpy(np.int64), table["pos"].to_numpy(np.int64)
    if expected_rows is not None and len(ui) != expected_rows:
        raise PreparedDataError(f"{path}: {len(ui)} rows, {out / 'meta.json'} says {expected_rows}")
    if len(ui) == 0:
        raise PreparedDataError(f"{path}: the split is empty; rerun `rellax-fast prepare --out {out}`")
    lengths = seq.lengths()
    bad = (ui < 0) | (ui >= len(seq)) | (pos < 0)
    bad[~bad] |= pos[~bad] >= lengths[ui[~bad]]
    flat = seq.offsets[np.clip(ui, 0, len(seq) - 1)] + np.where(bad, 0, pos)
    flat = np.clip(flat, 0, max(len(seq.items) - 1, 0))
    bad |= table["item_id"].to_numpy(np.int64) != seq.items[flat]
    bad |= table["user_id"].to_numpy(np.int64) != seq.user_ids[np.clip(ui, 0, len(seq) - 1)]
    if bad.any():
        raise PreparedDataError(
            f"{path}: {int(bad.sum())} of {len(ui)} samples do not match sequences.parquet (user/position out of "
            f"range or a different target item): the files come from different `prepare` runs; "
            f"rerun `rellax-fast prepare --out {out}`"
        )


def load_prepared(out_dir) -> CTRData:
    """Read what :func:`save_prepared` wrote, checked. ``dataset.ratings`` holds the ratings kept in the sequences.

    Raises :class:`PreparedDataError` when meta.json is missing next to data files (an interrupted write), when it
    has no manifest (a folder of format 1, from before the manifest: its files cannot be verified, so it is refused
    with the command that rebuilds it), when a manifest key is not one of the files ``prepare`` writes (a path
    such as ``../x`` is refused before anything is opened), when a file does not match the manifest, or when a
    split does not agree with the sequences.
    """
    import pyarrow.parquet as pq

    out = Path(out_dir)
    meta_path = out / "meta.json"
    if not out.is_dir():
        raise FileNotFoundError(f"{meta_path}: not found; run `rellax-fast prepare --out {out}` first")
    with file_lock(out, exclusive=False):
        if not meta_path.exists():
            present = [n for n in DATA_FILES if (out / n).exists()]
            if present:
                raise PreparedDataError(
                    f"{meta_path}: missing while {', '.join(present)} exist: a `prepare` into {out} was interrupted "
                    f"(or is running); rerun `rellax-fast prepare --out {out}`"
                )
            raise FileNotFoundError(f"{meta_path}: not found; run `rellax-fast prepare --out {out}` first")
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise PreparedDataError(
                f"{meta_path}: unreadable ({exc}); rerun `rellax-fast prepare --out {out}`"
            ) from exc
        if "manifest" not in meta:  # its files cannot be verified: a copied-over split would load silently
            raise PreparedDataError(
                f"{meta_path}: no manifest (format {meta.get('format_version', 1)}, written by an older rellax-fast), "
                f"so its files cannot be verified; rebuild the folder: rellax-fast prepare --dataset "
                f"{meta.get('dataset', '<name>')} --out {out}"
            )
        files = _check_manifest(out, meta)
        seq_df = pq.read_table(out / "sequences.parquet").to_pandas()
        # The rows are already packed by user in sequence order; recover the offsets.
        users = seq_df["user_id"].to_numpy(np.int64)
        if not np.all(np.diff(users) >= 0):
            raise PreparedDataError(f"{out / 'sequences.parquet'}: rows are not grouped by ascending user_id")
        user_ids, starts = np.unique(users, return_index=True)
        seq = UserSequences(
            user_ids,
            np.append(starts, len(users)).astype(np.int64),
            seq_df["item_id"].to_numpy(np.int64),
            seq_df["rating"].to_numpy(np.float32),
            seq_df["timestamp"].to_numpy(np.int64),
        )
        if meta.get("n_sequence_ratings", len(users)) != len(users):
            raise PreparedDataError(
                f"{out / 'sequences.parquet'}: {len(users)} rows, {meta_path} says {meta['n_sequence_ratings']}"
            )
        items = pd.read_parquet(out / "items.parquet")
        if "genres" in items:
            items["genres"] = [list(g) for g in items["genres"]]
        has_users = "users.parquet" in files
        users_df = pd.read_parquet(out / "users.parquet") if has_users else None
        ds = RecDataset(meta["dataset"], meta["domain"], seq_df, items, users_df)
        splits = {}
        for name in SPLITS:
            t = pq.read_table(
                out / f"{name}.parquet", columns=["user_index", "pos", "user_id", "item_id"]
            ).to_pandas()
            _check_split(out, name, t, seq, meta.get("splits", {}).get(name, {}).get("n"))
            splits[name] = _make_split(
                seq, t["user_index"].to_numpy(np.int64), t["pos"].to_numpy(np.int64), ds.domain
            )
    return CTRData(ds, seq, splits, meta)
