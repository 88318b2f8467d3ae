"""The training layer's report helpers: ``metrics.json`` on disk, Markdown tables and the loss/AUC plots.

:func:`markdown_table` is the one Markdown-table writer of the package (``bench.report.markdown_table`` is a
thin wrapper: 4 significant digits, columns from the first row); it lives here because ``train`` may not
import ``bench``.

The metrics themselves (``ctr_metrics``, ``json_default``) live in the leaf :mod:`rellax_fast.metrics`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import numpy as np

from ..metrics import metrics_json


def write_metrics_json(path, metrics: Mapping, extra: Optional[Mapping] = None) -> Path:
    """Write ``metrics.json`` (auc, logloss, accuracy, n, then ``extra``) atomically."""
    from rellax_fast._io import atomic_write_text

    atomic_write_text(path, metrics_json(metrics, extra))
    return Path(path)


CTR_COLUMNS = ("variant", "auc", "logloss", "accuracy", "n")


def markdown_table(
    rows: Sequence[Mapping], columns: Optional[Sequence[str]] = CTR_COLUMNS, *, float_format: str = ".4f"
) -> str:
    """A Markdown table of ``rows`` (mappings) in ``columns``, one line per row.

    ``columns`` None or empty: the first row's keys (and ``(no rows)`` when there are no rows either).
    Floats (numpy float64 included) are written with ``format(v, float_format)`` (NaN as ``nan``); a missing
    key or None is an empty cell; anything else is ``str(v)``.
    """
    if not columns:
        if not rows:
            return "(no rows)\n"
        columns = list(rows[0].keys())

    def fmt(v) -> str:
        if isinstance(v, float):
            return format(v, float_format)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def smoothing_window(n_steps: int) -> int:
    """The moving-average window of a loss curve of ``n_steps`` points in :func:`plot_runs`: 1/20 of its length."""
    return max(1, n_steps // 20)


def plot_runs(
    path,
    loss_curves: Mapping[str, List[float]],
    aucs: Mapping[str, float],
    title: str = "",
    auc_ci: Optional[Mapping[str, Sequence[float]]] = None,
) -> Path:
    """PNG with the training-loss curve per variant (left; a moving average, its window in the legend) and the test
    AUC per variant (right), with its 95% interval as an error bar where ``auc_ci`` ({name: (lo, hi)}) has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, curve in loss_curves.items():
        if len(curve):
            c = np.asarray(curve, dtype=float)
            w = smoothing_window(len(c))
            smooth = np.convolve(c, np.ones(w) / w, mode="valid")
            label = f"{name} (mean of {w} steps)" if w > 1 else f"{name} (raw)"
            ax1.plot(np.arange(len(smooth)) + w - 1, smooth, label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (trailing mean; window per curve in the legend)")
    ax1.set_title("training loss")
    if loss_curves:
        ax1.legend(fontsize=8)
    names = list(aucs)
    vals = [aucs[n] for n in names]
    ci = [tuple(auc_ci[n]) if auc_ci and n in auc_ci else (math.nan, math.nan) for n in names]
    has_ci = [not (math.isnan(lo) or math.isnan(hi)) for lo, hi in ci]
    xerr = None
    if any(has_ci):  # asymmetric bars: (below, above) each AUC; none where a row has no interval
        xerr = np.array(
            [
                [v - lo if ok else 0.0 for v, (lo, _), ok in zip(vals, ci, has_ci)],
                [hi - v if ok else 0.0 for v, (_, hi), ok in zip(vals, ci, has_ci)],
            ]
        )
    ax2.barh(names, vals, color="tab:blue", xerr=xerr, capsize=3 if xerr is not None else 0)
    for i, v in enumerate(vals):
        end = ci[i][1] if has_ci[i] else v
        ax2.text(end, i, f" {v:.4f}", va="center", fontsize=8)
    lo = min([v for v in vals + [c[0] for c, ok in zip(ci, has_ci) if ok] if not math.isnan(v)] + [0.5])
    ax2.set_xlim(max(0.0, lo - 0.05), 1.0)
    ax2.set_xlabel("test AUC" + (" (bars: 95% bootstrap interval)" if xerr is not None else ""))
    ax2.set_title("AUC per variant")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from rellax_fast._io import atomic_write_png

    return atomic_write_png(path, fig)
