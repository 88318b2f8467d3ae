"""The label-leakage check of prepared CTR samples: no history may hold its own target event or a later one.

A sample's history is positions ``0..pos-1`` of its user's packed sequence (:mod:`rellax_fast.data.ctr`).
:func:`check_no_leakage` verifies, for every sample of every split, vectorised over the packed arrays:

- the history holds no copy of the target event: the same (item, timestamp) for time-stamped data, the same
  item for BookCrossing (whose "timestamps" are file rows); a copy would show the label in the prompt;
- for time-stamped data (a domain whose record is ``timed``, e.g. "movie"), no history event is later than
  the target.

The loaders drop repeated ratings (:mod:`rellax_fast.data.datasets`), so this holds for their output; it
guards against a ``RecDataset`` built elsewhere and against a change in the split rules.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .datasets import DataFormatError
from .domains import get_domain

__all__ = ["LabelLeakageError", "check_no_leakage"]


class LabelLeakageError(DataFormatError):
    """A sample's history holds its own target event or a later event (names the split, sample and event)."""


def check_no_leakage(data) -> None:
    """Raise :class:`LabelLeakageError` if any history of ``data`` (a ``CTRData``) leaks its target.

    Costs a few passes over the packed sequence (a grouped running max and a duplicate search): about a
    second at ML-25M scale, nothing next to building the samples.
    """
    seq = data.sequences
    domain = data.dataset.domain
    n = len(seq.items)
    if n == 0:
        return
    owner = np.repeat(np.arange(len(seq.user_ids), dtype=np.int64), np.diff(seq.offsets))
    timed = get_domain(domain).timed  # the domain record: real timestamps (movie) or file rows (book)
    keys = {"u": owner, "i": seq.items}
    if timed:
        keys["t"] = seq.timestamps
    # an earlier copy of the same event in the same user's sequence (the first copy is not flagged)
    repeated = pd.DataFrame(keys).duplicated(keep="first").to_numpy()
    # the latest timestamp up to and including each position, within its user
    latest = pd.Series(seq.timestamps).groupby(owner).cummax().to_numpy() if timed else None
    for name, split in data.splits.items():
        if len(split) == 0:
            continue
        flat = seq.offsets[split.user_index] + split.pos
        bad = repeated[flat]
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            f = int(flat[i])
            start = int(seq.offsets[split.user_index[i]])
            same = (seq.items[start:f] == seq.items[f]) & (
                (seq.timestamps[start:f] == seq.timestamps[f]) if timed else True
            )
            where = int(np.flatnonzero(same)[0])
            event = f"item {int(seq.items[f])}" + (f" at time {int(seq.timestamps[f])}" if timed else "")
            raise LabelLeakageError(
                f"{data.dataset.name}: {name} sample {i} (user {int(seq.user_ids[split.user_index[i]])}): its "
                f"history holds its own target event ({event}) at position {where} of {int(split.pos[i])}, so "
                f"the label leaks; {int(bad.sum()):,} {name} samples are affected. Drop repeated ratings "
                f"(the dataset loaders do) before building CTR samples"
            )
        if timed:
            has_history = split.pos > 0
            later = np.zeros(len(split), dtype=bool)
            later[has_history] = latest[flat[has_history] - 1] > seq.timestamps[flat[has_history]]
            if later.any():
                i = int(np.flatnonzero(later)[0])
                f = int(flat[i])
                raise LabelLeakageError(
                    f"{data.dataset.name}: {name} sample {i} (user {int(seq.user_ids[split.user_index[i]])}, "
                    f"target at time {int(seq.timestamps[f])}): its history holds an event at time "
                    f"{int(latest[f - 1])}, after the target; {int(later.sum()):,} {name} samples are affected. "
                    f"Each user's sequence must be in time order"
                )
