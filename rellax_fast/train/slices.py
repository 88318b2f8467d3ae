"""Sliced CTR metrics (issue #27): where in the test samples a model wins or loses.

Three slicings of the scored samples, each computed from the prepared data's **train split** only:

* ``item_train_count``: how many train samples have the sample's target item as their target
  (0, 1–5, 6–20, >20): cold items;
* ``user_in_train``: whether the sample's user has any train sample (seen / unseen): cold users;
* ``history_length``: the number of the user's behaviours before the target (the sample's ``pos``), in bands.

A :class:`SliceSet` holds the membership of every scored sample (one band code per sample and slicing),
computed once (:func:`compute_slices`) and stored once (:func:`save_slices`, read back by
:func:`load_slices`), so that every row of a table is cut by the identical membership.
:func:`slice_statistics` gives, per band, AUC and LogLoss with 95% bootstrap intervals and, against a reference
model on the same samples, DeLong's paired test (AUC) and the paired bootstrap (LogLoss), all from
:mod:`rellax_fast.train.stats`. A band with fewer than :data:`MIN_SLICE_N` samples, or fewer than
:data:`MIN_SLICE_CLASS` of either label, gets no interval or test: its ``status`` says why.

Imports ``train.stats`` and ``_io`` only (no model code), so ``bench`` and ``eval`` both use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import numpy as np

from . import stats

MIN_SLICE_N = 30  # fewer samples in a band: no interval, no test ("too small")
MIN_SLICE_CLASS = 5  # fewer positives or negatives in a band: no interval, no test
ITEM_COUNT_EDGES = (1, 6, 21)  # train interactions of the target item: 0 | 1-5 | 6-20 | >20
ITEM_COUNT_BANDS = ("0", "1–5", "6–20", ">20")
USER_BANDS = ("unseen", "seen")
HISTORY_EDGES = (10, 50, 200)  # behaviours before the target
HISTORY_BANDS = ("<10", "10–49", "50–199", "≥200")
SLICINGS = {
    "item_train_count": ITEM_COUNT_BANDS,
    "user_in_train": USER_BANDS,
    "history_length": HISTORY_BANDS,
}
TITLES = {
    "item_train_count": "target item's train interactions",
    "user_in_train": "user in train",
    "history_length": "history length",
}


@dataclass
class SliceSet:
    """Band membership of ``n`` scored samples: ``codes[slicing][i]`` indexes ``SLICINGS[slicing]``."""

    codes: Dict[str, np.ndarray]
    source: Dict  # what the samples are (split, how many, a hash of their identities)

    @property
    def n(self) -> int:
        return int(next(iter(self.codes.values())).size)

    def masks(self, slicing: str) -> Dict[str, np.ndarray]:
        """{band: boolean mask over the samples}, every band of the slicing (empty ones too)."""
        return {band: self.codes[slicing] == i for i, band in enumerate(SLICINGS[slicing])}

    def to_dict(self) -> Dict:
        return {
            "bands": {k: list(v) for k, v in SLICINGS.items()},
            "source": self.source,
            "codes": {k: v.astype(int).tolist() for k, v in self.codes.items()},
        }


def slice_codes(target_items, users, history_lengths, train_items, train_users) -> Dict[str, np.ndarray]:
    """The band codes of samples (their target item ids, user ids and history lengths) given the train split's
    target item ids and user ids."""
    target_items = np.asarray(target_items, np.int64)
    train_items = np.asarray(train_items, np.int64)
    ids, counts = np.unique(train_items, return_counts=True)
    where = np.clip(np.searchsorted(ids, target_items), 0, max(len(ids) - 1, 0))
    n_train = (
        np.where(ids[where] == target_items, counts[where], 0)
        if len(ids)
        else np.zeros(target_items.size, np.int64)
    )
    return {
        "item_train_count": np.searchsorted(ITEM_COUNT_EDGES, n_train, side="right").astype(np.int8),
        "user_in_train": np.isin(np.asarray(users, np.int64), np.asarray(train_users, np.int64)).astype(
            np.int8
        ),
        "history_length": np.searchsorted(
            HISTORY_EDGES, np.asarray(history_lengths, np.int64), side="right"
        ).astype(np.int8),
    }


def compute_slices(data, split, split_name: str) -> SliceSet:
    """The :class:`SliceSet` of the samples of ``split`` (a CTRSplit, e.g. a seeded test subsample) against the
    train split of ``data`` (a prepared CTRData)."""
    from .._io import json_sha256

    train = data.splits["train"]
    codes = slice_codes(split.item_id, split.user_id, split.pos, train.item_id, train.user_id)
    ident = json_sha256(
        [
            np.asarray(split.user_id, np.int64).tolist(),
            np.asarray(split.item_id, np.int64).tolist(),
            np.asarray(split.pos, np.int64).tolist(),
        ]
    )
    return SliceSet(
        codes,
        {
            "split": split_name,
            "n": int(len(split)),
            "samples_sha256": ident,
            "train_samples": int(len(train)),
        },
    )


def save_slices(path, slices: SliceSet) -> None:
    """Write the membership as JSON, atomically."""
    from .._io import atomic_write_text

    atomic_write_text(path, json.dumps(slices.to_dict()))


def load_slices(path) -> SliceSet:
    """Read a file written by :func:`save_slices`; refuses one whose bands differ from this version's."""
    raw = json.loads(open(path, encoding="utf-8").read())
    if raw.get("bands") != {k: list(v) for k, v in SLICINGS.items()}:
        raise ValueError(
            f"{path}: slice bands {raw.get('bands')} differ from this version's; recompute the slices"
        )
    return SliceSet({k: np.asarray(v, np.int8) for k, v in raw["codes"].items()}, raw["source"])


def sliced_report(data, split, probs, reference, path, source: str, n_boot: int = 1000) -> Dict:
    """What ``eval`` records under ``slices``: the membership of ``split``'s samples (from ``data``'s train split)
    stored in ``path`` and read back, and per band :func:`slice_statistics` against ``reference`` (the run's
    frozen DIN on the same samples)."""
    from pathlib import Path

    save_slices(path, compute_slices(data, split, source))
    membership = load_slices(path)
    return {
        "membership": Path(path).name,
        "reference": "the run's frozen DIN",
        "train_samples": membership.source["train_samples"],
        **slice_statistics(split.label, probs, membership, reference=reference, n_boot=n_boot),
    }


def _band_status(y: np.ndarray) -> Optional[str]:
    n, pos = int(y.size), int(y.sum())
    if n == 0:
        return "empty"
    if pos == 0 or pos == n:
        return f"single class (n={n})"
    if n < MIN_SLICE_N or min(pos, n - pos) < MIN_SLICE_CLASS:
        return f"too small to test (n={n}, {pos} pos)"
    return None


def band_statistics(
    labels, probs, reference=None, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Dict:
    """One band's numbers: n, positives, AUC / LogLoss with bootstrap intervals and, with a ``reference``
    (probabilities of the same samples), the paired tests; ``status`` None when tested, else why not (then only
    n, positives and the point values that exist)."""
    y = np.asarray(labels, np.float64)
    out: Dict = {"n": int(y.size), "n_pos": int(y.sum()), "status": _band_status(y)}
    if y.size == 0:
        return out
    out["logloss"] = stats.logloss(y, probs)
    if out["status"] is not None:
        if 0 < out["n_pos"] < y.size:
            out["auc"] = stats.auc(y, probs)
        return out
    st = stats.row_statistics(
        y, probs, {"ref": reference} if reference is not None else None, n_boot, level, seed
    )
    out.update(
        auc=st["auc_ci"]["value"],
        auc_ci=[st["auc_ci"]["lo"], st["auc_ci"]["hi"]],
        logloss_ci=[st["logloss_ci"]["lo"], st["logloss_ci"]["hi"]],
        vs_ref=st["vs"].get("ref"),
    )
    return out


def slice_statistics(
    labels, probs, slices: SliceSet, reference=None, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Dict[str, Dict[str, Dict]]:
    """{slicing: {band: :func:`band_statistics`}} of one model's ``probs`` on the samples of ``slices``."""
    y = np.asarray(labels, np.float64)
    p = np.asarray(probs, np.float64)
    if y.shape != (slices.n,) or p.shape != (slices.n,):
        raise ValueError(
            f"labels, probs: expected shape ({slices.n},) (one per sample of the slices), got {y.shape} and "
            f"{p.shape}"
        )
    ref = None if reference is None else np.asarray(reference, np.float64)
    if ref is not None and ref.shape != (slices.n,):
        raise ValueError(f"reference: expected shape ({slices.n},), got {ref.shape}")
    out: Dict[str, Dict[str, Dict]] = {}
    for slicing in SLICINGS:
        out[slicing] = {
            band: band_statistics(y[m], p[m], None if ref is None else ref[m], n_boot, level, seed)
            for band, m in slices.masks(slicing).items()
        }
    return out


def _cell(b: Mapping, ref_name: str, metric: str) -> str:
    if b["n"] == 0:
        return "–"
    value = f"{b[metric]:.4f}" if b.get(metric) is not None else "n/a"
    if b["status"] is not None:
        return f"{value} ({b['status']})"
    ci = b[f"{metric}_ci"]
    text = f"{value} [{ci[0]:.4f}, {ci[1]:.4f}]"
    vs = b.get("vs_ref")
    if vs is not None:
        text += f"; vs {ref_name} {stats.format_delta(vs, metric)}"
    return text


def slices_markdown(rows: Mapping[str, Mapping], ref_name: str = "DIN", metric: str = "auc") -> str:
    """Markdown tables, one per slicing: a line per row ({row name: :func:`slice_statistics`}), a column per band
    (``metric``, 'auc' or 'logloss', with its 95% interval and the paired test against ``ref_name``: DeLong for
    AUC, the paired bootstrap for LogLoss; or why the band is not tested), with the bands' sizes in the header."""
    if metric not in ("auc", "logloss"):
        raise ValueError(f"metric: expected 'auc' or 'logloss', got {metric!r}")
    if not rows:
        return ""
    first = next(iter(rows.values()))
    parts = []
    for slicing, bands in first.items():
        head = [f"{band} (n={b['n']}, {b['n_pos']} pos)" for band, b in bands.items()]
        title = f"**{TITLES.get(slicing, slicing)}: {'AUC' if metric == 'auc' else 'LogLoss'}**"
        lines = [title, "", "| row | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for name, sl in rows.items():
            lines.append(
                f"| {name} | " + " | ".join(_cell(b, ref_name, metric) for b in sl[slicing].values()) + " |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def check_same_membership(rows: Mapping[str, Mapping]) -> None:
    """Raise ValueError when two rows' sliced statistics count different samples in a band (every row must be
    cut by one :class:`SliceSet`)."""
    seen: Dict = {}
    for name, sl in rows.items():
        sizes = {(s, band): (b["n"], b["n_pos"]) for s, bands in sl.items() for band, b in bands.items()}
        for key, size in sizes.items():
            if seen.setdefault(key, (name, size))[1] != size:
                raise ValueError(
                    f"slice {key[0]}={key[1]}: row {name!r} has (n, positives) {size} but row "
                    f"{seen[key][0]!r} has {seen[key][1]}; every row must use the same slice membership"
                )
