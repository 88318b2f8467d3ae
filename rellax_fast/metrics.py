"""CTR metrics: AUC, LogLoss and accuracy of click probabilities (scikit-learn), and the JSON text of a
``metrics.json``.

A leaf: it imports nothing from ``rellax_fast``, so every layer (``ctr``, ``train``, ``bench``) can use it
without importing upward. Writing files, Markdown tables and plots stay with their callers
(``train.metrics``)."""

from __future__ import annotations

import json
from typing import Dict, Mapping, Optional

import numpy as np

EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] before LogLoss

METRIC_KEYS = ("auc", "logloss", "accuracy", "n")


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


def json_default(o):
    """``json.dumps`` default for numpy scalars (and anything else: its str)."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def metrics_json(metrics: Mapping, extra: Optional[Mapping] = None) -> str:
    """The text of a ``metrics.json``: auc, logloss, accuracy and n from ``metrics``, then ``extra``."""
    out = {**{k: metrics[k] for k in METRIC_KEYS}, **(extra or {})}
    return json.dumps(out, indent=2, default=json_default)
