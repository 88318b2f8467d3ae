"""A prepared folder on disk: what ``rellax-fast prepare`` writes (:func:`save_prepared`) and every command
reads back, checked (:func:`load_prepared`), with the manifest in ``meta.json`` and the folder lock.

On disk, storage is linear in the number of ratings: ``sequences.parquet`` holds the packed sequences once
and each split file holds per-sample columns only (user_id, item_id, rating, label, timestamp, and the
reference user_index, pos). The flat per-sample ``history`` list column is optional (``save_prepared
(history_column=...)``: none (default), capped at ``max_history``, or full); its full form grows with the
square of history length (2.9e8 entries for 1.2M ratings at 5 % of ML-25M), so nothing here requires it, and
folders written with it still load (it is simply not read).

A prepared folder is one unit: every file is written to a temporary name, hashed (the bytes written) and
fsynced first; then ``meta.json`` is removed, the files are renamed into place and ``meta.json`` is written
last, carrying a manifest (bytes, sha256 and row count of each file, and
:func:`~rellax_fast.data.ctr.ctr_fingerprint` of the content). Writers of one folder are serialised by an
exclusive ``flock`` on the folder (:func:`rellax_fast._io.file_lock`; the last complete writer wins, whole);
readers take a shared one. ``load_prepared`` checks every file against the manifest and the splits against
the sequences, and refuses a mismatch with :class:`PreparedDataError` naming the file. Other files in the
folder (caches, ``ctr/``, runs) are untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pandas as pd

from .._io import (
    PathOutsideFolderError,
    file_lock,
    file_sha256,
    fsync_dir,
    path_inside,
    remove_stale_temps,
    temp_path_for,
)
from .ctr import SPLITS, CTRData, CTRSplit, EmptySplitError, UserSequences, ctr_fingerprint, make_split
from .datasets import DataFormatError, RecDataset

__all__ = [
    "save_prepared",
    "load_prepared",
    "PreparedDataError",
    "DATA_FILES",
    "HISTORY_COLUMNS",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 2  # 2: meta.json carries the manifest


class PreparedDataError(DataFormatError):
    """A prepared folder is incomplete, mixed or modified: a file does not match meta.json's manifest."""


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
    cap = _check_history_option(history_column, max_history)
    empty = [k for k, s in data.splits.items() if len(s) == 0]
    if empty:
        raise EmptySplitError(f"{data.dataset.name}: refusing to write empty split(s) {empty} to {out_dir}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writers = _file_writers(data, history_column, cap)
    with file_lock(out, exclusive=True):
        _remove_killed_writes(out)
        temps: Dict[str, Path] = {}
        try:
            manifest = _write_temps(out, writers, temps)
            meta = dict(
                data.meta,
                format_version=FORMAT_VERSION,
                history_column={"mode": history_column, "max_history": cap},
                manifest={"files": manifest, "fingerprint": ctr_fingerprint(data)},
            )
            temps["meta.json"] = _write_temp(
                out, "meta.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n")
            )
            _publish_folder(out, temps)
        finally:
            for tmp in temps.values():
                tmp.unlink(missing_ok=True)
    return out


def _file_writers(data: CTRData, history_column: str, cap: Optional[int]) -> dict:
    """{file name: (write(path), rows)} of every data file of ``data``. Each split's table is built inside its
    writer, so only one (with its optional history) is alive at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    seq = data.sequences
    seq_table = pa.table(
        {
            "user_id": pa.array(np.repeat(seq.user_ids, seq.lengths()), pa.int64()),
            "item_id": pa.array(seq.items, pa.int64()),
            "rating": pa.array(seq.ratings, pa.float32()),
            "timestamp": pa.array(seq.timestamps, pa.int64()),
        }
    )
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
    return writers


def _remove_killed_writes(out: Path) -> None:
    """Remove the temporary files of a `prepare` that was killed (the caller holds the folder's exclusive lock,
    so no other `prepare` of this folder is alive)."""
    remove_stale_temps(out)
    for stale in out.glob(".*.tmp*"):
        if stale.is_file() and any(stale.name.startswith(f".{n}.") for n in (*DATA_FILES, "meta.json")):
            stale.unlink(missing_ok=True)


def _write_temps(out: Path, writers: dict, temps: Dict[str, Path]) -> dict:
    """Write every file of ``writers`` under a temporary name (each recorded in ``temps`` as soon as it exists,
    for the caller's cleanup); returns the manifest's file table: bytes, sha256 (of the bytes this process
    wrote, taken before they are published) and rows of each."""
    manifest = {}
    for name, (write, rows) in writers.items():
        temps[name] = _write_temp(out, name, write)
        manifest[name] = {
            "bytes": temps[name].stat().st_size,
            "sha256": file_sha256(temps[name]),
            "rows": rows,
        }
    return manifest


def _publish_folder(out: Path, temps: Dict[str, Path]) -> None:
    """Move the written files into place, meta.json last (``temps``: {name: temporary path}; each entry is
    removed once published). From meta.json's removal until it is back, the folder reads as incomplete."""
    files = [n for n in temps if n != "meta.json"]
    (out / "meta.json").unlink(missing_ok=True)
    fsync_dir(out)
    for name in files:
        _publish(temps[name], out / name)
        del temps[name]
    if "users.parquet" not in files:  # an older prepare's users of another dataset
        (out / "users.parquet").unlink(missing_ok=True)
    _publish(temps["meta.json"], out / "meta.json")
    del temps["meta.json"]
    fsync_dir(out)


def _check_manifest(out: Path, meta: dict) -> dict:
    """Every file of the manifest is there with its size and sha256; returns the manifest's file table."""
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
            splits[name] = make_split(
                seq, t["user_index"].to_numpy(np.int64), t["pos"].to_numpy(np.int64), ds.domain
            )
    return CTRData(ds, seq, splits, meta)
