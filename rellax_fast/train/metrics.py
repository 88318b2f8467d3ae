"""CTR metrics (AUC, LogLoss, accuracy via scikit-learn), their JSON/Markdown output, and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

EPS = 1e-7


def ctr_metrics(labels, probs) -> Dict[str, float]:
    """AUC, LogLoss and accuracy (threshold 0.5) of click probabilities ``probs`` against 0/1 ``labels``.

    AUC is NaN when the labels hold a single class (sklearn would raise); LogLoss clips p to [1e-7, 1-1e-7].
    """
    from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels and probs must have the same length, got {y.shape[0]} and {p.shape[0]}")
    if y.size == 0:
        raise ValueError("cannot compute CTR metrics on 0 samples")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"probs contain {int((~np.isfinite(p)).sum())} non-finite values")
    if np.any((y != 0) & (y != 1)):
        raise ValueError("labels must be 0 or 1")
    p = np.clip(p, EPS, 1 - EPS)
    auc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
    return {
        "auc": auc,
        "logloss": float(log_loss(y, p, labels=[0, 1])),
        "accuracy": float(accuracy_score(y, p >= 0.5)),
        "n": int(y.size),
    }


def write_metrics_json(path, metrics: Mapping, extra: Optional[Mapping] = None) -> Path:
    from rellax_fast._io import atomic_write_text

    out = {**{k: metrics[k] for k in ("auc", "logloss", "accuracy", "n")}, **(extra or {})}
    atomic_write_text(path, json.dumps(out, indent=2, default=json_default))
    return Path(path)


def json_default(o):
    """``json.dumps`` default for numpy scalars (and anything else: its str)."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] = ("variant", "auc", "logloss", "accuracy", "n")) -> str:
    """A Markdown table; floats to 4 decimals."""

    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def plot_runs(path, loss_curves: Mapping[str, List[float]], aucs: Mapping[str, float], title: str = "") -> Path:
    """PNG with the training-loss curve per variant (left) and the test AUC per variant (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, curve in loss_curves.items():
        if len(curve):
            c = np.asarray(curve, dtype=float)
            w = max(1, len(c) // 20)
            smooth = np.convolve(c, np.ones(w) / w, mode="valid")
            ax1.plot(np.arange(len(smooth)) + w - 1, smooth, label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (moving average)")
    ax1.set_title("training loss")
    if loss_curves:
        ax1.legend(fontsize=8)
    names = list(aucs)
    vals = [aucs[n] for n in names]
    ax2.barh(names, vals, color="tab:blue")
    for i, v in enumerate(vals):
        ax2.text(v, i, f" {v:.4f}", va="center", fontsize=8)
    lo = min([v for v in vals if not math.isnan(v)] + [0.5])
    ax2.set_xlim(max(0.0, lo - 0.05), 1.0)
    ax2.set_xlabel("test AUC")
    ax2.set_title("AUC per variant")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    from rellax_fast._io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
