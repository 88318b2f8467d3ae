"""Uncertainty of CTR metrics on one test sample: bootstrap confidence intervals for AUC and LogLoss, the
paired bootstrap test for a LogLoss (or AUC) difference, and DeLong's test for an AUC difference.

Every function takes 0/1 ``labels`` and click probabilities of the same samples; paired functions take two
models' probabilities *of the same samples* (the quality bench and the demo score every row on one seeded
test sample, which is what makes the tests paired). Point values are scikit-learn's ``roc_auc_score`` and
``log_loss`` with the same clipping as :func:`rellax_fast.metrics.ctr_metrics`.

Why DeLong is written here: neither scikit-learn nor SciPy ships DeLong's test (scikit-learn has no AUC
variance at all; ``scipy.stats`` has no ROC code), and the usual Python ports are unpackaged snippets. The
implementation below is the fast O(n log n) algorithm of Sun & Xu (2014, IEEE SPL 21(11), "Fast
implementation of DeLong's algorithm for comparing the areas under correlated receiver operating
characteristic curves"): the structural components (placement values) of DeLong, DeLong & Clarke-Pearson
(1988) are obtained from three mid-rankings instead of the O(m·n) pairwise kernel.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

EPS = 1e-7  # the clipping of metrics.ctr_metrics
CHUNK = 64  # bootstrap resamples drawn per chunk (bounds memory at CHUNK x n indices)


# ------------------------------------------------------------------------------------------ inputs


def _labels(labels, name: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array of 0/1 labels, got shape {y.shape}")
    y = y.astype(np.float64)
    if np.any((y != 0) & (y != 1)):
        raise ValueError(f"{name}: labels must be 0 or 1, got values {np.unique(y)[:6].tolist()}")
    return y


def _probs(probs, n: int, name: str) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},) (one probability per label), got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name}: {int((~np.isfinite(p)).sum())} non-finite values")
    if np.any((p < 0) | (p > 1)):
        raise ValueError(
            f"{name}: probabilities must lie in [0, 1], got range [{p.min():.4g}, {p.max():.4g}]"
        )
    return np.clip(p, EPS, 1 - EPS)


def _both_classes(y: np.ndarray, what: str) -> None:
    if y.min() == y.max():
        raise ValueError(f"labels: {what} needs both classes, got only {int(y[0])}s ({y.size} samples)")


def _check_level(level: float, n_boot: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level: expected a confidence level in (0, 1), got {level}")
    if n_boot < 10:
        raise ValueError(f"n_boot: expected >= 10 bootstrap resamples, got {n_boot}")


# ------------------------------------------------------------------------------------------ metrics


def auc(labels, probs) -> float:
    """sklearn's ROC AUC (probabilities clipped like ``ctr_metrics``)."""
    from sklearn.metrics import roc_auc_score

    y = _labels(labels)
    _both_classes(y, "AUC")
    return float(roc_auc_score(y, _probs(probs, y.size, "probs")))


def logloss(labels, probs) -> float:
    """sklearn's LogLoss (probabilities clipped like ``ctr_metrics``)."""
    from sklearn.metrics import log_loss

    y = _labels(labels)
    return float(log_loss(y, _probs(probs, y.size, "probs"), labels=[0, 1]))


def per_sample_logloss(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """-log p(label) per sample. LogLoss is their mean, so a resample's LogLoss is the mean over its indices:
    the bootstrap below averages these instead of calling ``log_loss`` per resample (same value, tested
    against sklearn, and vectorised over the resamples)."""
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def _resamples(n: int, n_boot: int, seed: int):
    """Bootstrap index chunks (CHUNK, n); the same seed gives the same resamples (pairing across rows)."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        size = min(CHUNK, n_boot - done)
        yield rng.integers(0, n, size=(size, n))
        done += size


def resample_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(B, n) multiplicities of each sample in each resample of ``idx`` (B, n)."""
    b = idx.shape[0]
    flat = (idx + (np.arange(b) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def weighted_auc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of (y, p) under each row of sample ``weights`` (B, n): equal to sklearn's
    ``roc_auc_score(y, p, sample_weight=w)`` (tested), NaN where a row weighs one class only.

    Why not sklearn per resample: a bootstrap resample is the sample under integer weights (its counts), so
    the scores are sorted once and each resample is a few O(n) cumulative sums, vectorised over the resamples,
    instead of one sort and sklearn's input validation per resample (~4 ms x 1000 resamples x every row)."""
    order = np.argsort(p, kind="stable")
    ps, ys = p[order], y[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])  # tie groups of equal scores
    w = np.atleast_2d(weights)[:, order]
    pos = np.add.reduceat(w * ys, starts, axis=1)
    neg = np.add.reduceat(w * (1 - ys), starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _bootstrap_values(
    y: np.ndarray, probs: Sequence[np.ndarray], metric: str, n_boot: int, seed: int
) -> np.ndarray:
    """(n_boot, len(probs)) metric values on shared resamples; NaN for AUC on a one-class resample."""
    if metric not in ("auc", "logloss"):
        raise ValueError(f"metric: expected 'auc' or 'logloss', got {metric!r}")
    out = np.full((n_boot, len(probs)), np.nan)
    row = 0
    losses = [per_sample_logloss(y, p) for p in probs] if metric == "logloss" else None
    for idx in _resamples(y.size, n_boot, seed):
        if metric == "logloss":
            for j, loss in enumerate(losses):
                out[row : row + len(idx), j] = loss[idx].mean(axis=1)
        else:
            counts = resample_counts(idx, y.size)
            for j, p in enumerate(probs):
                out[row : row + len(idx), j] = weighted_auc(y, p, counts)
        row += len(idx)
    return out


def bootstrap_ci(
    labels, probs, metric: str = "auc", n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Dict[str, float]:
    """Percentile bootstrap interval of ``metric`` ('auc' or 'logloss') over resamples of the test samples.

    Returns {"value" (on all samples), "lo", "hi", "n_boot" (resamples used)}."""
    y = _labels(labels)
    p = _probs(probs, y.size, "probs")
    _check_level(level, n_boot)
    if metric == "auc":
        _both_classes(y, "AUC")
    value = auc(y, p) if metric == "auc" else logloss(y, p)
    vals = _bootstrap_values(y, [p], metric, n_boot, seed)[:, 0]
    vals = vals[np.isfinite(vals)]
    tail = (1 - level) / 2
    lo, hi = np.quantile(vals, [tail, 1 - tail])
    return {"value": value, "lo": float(lo), "hi": float(hi), "n_boot": int(vals.size)}


def paired_bootstrap(
    labels, probs_a, probs_b, metric: str = "logloss", n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Dict[str, float]:
    """Paired bootstrap of ``metric(a) - metric(b)``: both models are scored on the same resamples.

    Returns {"diff" (on all samples), "lo", "hi" (percentile interval), "p" (two-sided), "n_boot"}. The p-value
    inverts the percentile interval: 2 * the smaller share of resampled differences on either side of 0, with
    the (count + 1) / (B + 1) correction, so it is never exactly 0 and ``p < 1 - level`` exactly when the
    interval excludes 0 (up to that correction)."""
    y = _labels(labels)
    a = _probs(probs_a, y.size, "probs_a")
    b = _probs(probs_b, y.size, "probs_b")
    _check_level(level, n_boot)
    if metric == "auc":
        _both_classes(y, "AUC")
        diff = auc(y, a) - auc(y, b)
    else:
        diff = logloss(y, a) - logloss(y, b)
    vals = _bootstrap_values(y, [a, b], metric, n_boot, seed)
    d = vals[:, 0] - vals[:, 1]
    d = d[np.isfinite(d)]
    tail = (1 - level) / 2
    lo, hi = np.quantile(d, [tail, 1 - tail])
    below, above = int((d <= 0).sum()), int((d >= 0).sum())
    p = min(1.0, 2 * (min(below, above) + 1) / (d.size + 1))
    return {"diff": float(diff), "lo": float(lo), "hi": float(hi), "p": float(p), "n_boot": int(d.size)}


# ------------------------------------------------------------------------------------------ DeLong


def _midrank(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the mean of their ranks (O(n log n))."""
    from scipy.stats import rankdata

    return rankdata(x, method="average")


def delong_covariance(labels, scores) -> Tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) and their DeLong covariance matrix (k, k) for k score vectors ``scores`` (k, n) of the same
    samples (Sun & Xu 2014, Algorithm 1). Any monotone transform of a score gives the same result."""
    y = _labels(labels)
    _both_classes(y, "DeLong")
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if s.ndim != 2 or s.shape[1] != y.size:
        raise ValueError(
            f"scores: expected shape (k, {y.size}) (k models, one score per label), got {np.shape(scores)}"
        )
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores: {int((~np.isfinite(s)).sum())} non-finite values")
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    k = s.shape[0]
    v10 = np.empty((k, m))  # placement of each positive among the negatives: P(neg < pos) + 0.5 P(tie)
    v01 = np.empty((k, n))  # placement of each negative: P(pos > neg) + 0.5 P(tie)
    aucs = np.empty(k)
    for r in range(k):
        x, z = s[r, pos], s[r, neg]
        tx, ty, tz = _midrank(x), _midrank(z), _midrank(np.concatenate([x, z]))
        aucs[r] = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
        v10[r] = (tz[:m] - tx) / n
        v01[r] = 1.0 - (tz[m:] - ty) / m
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((k, k))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((k, k))
    return aucs, s10 / m + s01 / n


def delong_test(labels, probs_a, probs_b) -> Dict[str, float]:
    """DeLong's test of AUC(a) = AUC(b) on the same samples (two-sided, normal approximation).

    Returns {"auc_a", "auc_b", "diff", "se", "z", "p"}; identical rankings give se 0, z 0 and p 1."""
    y = _labels(labels)
    a = _probs(probs_a, y.size, "probs_a")
    b = _probs(probs_b, y.size, "probs_b")
    aucs, cov = delong_covariance(y, np.stack([a, b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    if se < 1e-15:
        z, p = 0.0 if abs(diff) < 1e-15 else math.copysign(math.inf, diff), 1.0 if abs(diff) < 1e-15 else 0.0
    else:
        z = diff / se
        p = math.erfc(abs(z) / math.sqrt(2))
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "diff": diff,
        "se": se,
        "z": float(z),
        "p": float(p),
    }


# ------------------------------------------------------------------------------------------ table rows


def row_statistics(
    labels,
    probs,
    references: Optional[Mapping[str, np.ndarray]] = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Dict:
    """What one row of an ablation table reports about ``probs``: AUC and LogLoss with bootstrap intervals, and
    for each reference model (name -> its probabilities on the same samples) the paired differences: DeLong
    for AUC (``d_auc``, ``p_auc``) and the paired bootstrap for LogLoss (``d_logloss``, ``p_logloss``,
    ``d_logloss_lo``/``_hi``). Every row uses the same resamples (``seed``)."""
    y = _labels(labels)
    out = {
        "auc_ci": bootstrap_ci(y, probs, "auc", n_boot, level, seed),
        "logloss_ci": bootstrap_ci(y, probs, "logloss", n_boot, level, seed),
        "vs": {},
    }
    for name, ref in (references or {}).items():
        dl = delong_test(y, probs, ref)
        pb = paired_bootstrap(y, probs, ref, "logloss", n_boot, level, seed)
        out["vs"][name] = {
            "d_auc": dl["diff"],
            "se_auc": dl["se"],
            "p_auc": dl["p"],
            "d_logloss": pb["diff"],
            "d_logloss_lo": pb["lo"],
            "d_logloss_hi": pb["hi"],
            "p_logloss": pb["p"],
            "same_predictions": bool(np.array_equal(np.asarray(probs), np.asarray(ref))),
        }
    return out


def within_noise(p_auc: float, alpha: float = 0.05) -> bool:
    """True when a paired AUC difference is not significant at ``alpha`` (the tables' 'within noise' mark)."""
    return not (p_auc < alpha)


def format_delta(vs: Optional[Mapping], metric: str = "auc", alpha: float = 0.05) -> str:
    """'+0.0123 (p=0.031)' for a ``row_statistics`` comparison, with ' ≈' appended when the difference is
    within noise (p >= alpha); '(itself)' for a row compared with its own predictions, '–' for no comparison."""
    if vs is None:
        return "–"
    d, p = vs[f"d_{metric}"], vs[f"p_{metric}"]
    if vs.get("same_predictions"):
        return "(itself)"
    return f"{d:+.4f} (p={p:.2g})" + (" ≈" if p >= alpha else "")
