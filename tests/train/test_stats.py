"""train.stats: DeLong (fast Sun & Xu) against the O(m·n) structural-component definition, a hand-computed case
and the bootstrap; bootstrap intervals and the paired bootstrap test; bad inputs."""

import math

import numpy as np
import pytest

from rellax_fast.train import stats


def _data(n, seed, signal=1.0, noise=(1.0, 1.0), ties=False):
    """Labels and two correlated scorers (shared signal + own noise), as probabilities."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.45).astype(np.int8)
    y[:2] = [0, 1]
    base = signal * (y - 0.5) + rng.standard_normal(n)
    a = base + noise[0] * rng.standard_normal(n)
    b = base + noise[1] * rng.standard_normal(n)
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    return y, sig(a), sig(b)


def _delong_bruteforce(y, scores):
    """DeLong et al. (1988) by definition: psi(x, z) = 1[x > z] + 0.5 1[x = z] over every (pos, neg) pair."""
    pos, neg = y == 1, y == 0
    m, n = pos.sum(), neg.sum()
    v10, v01, aucs = [], [], []
    for s in scores:
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    return np.array(aucs), np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n


@pytest.mark.parametrize("n,ties,seed", [(37, False, 0), (211, True, 1), (500, True, 2)])
def test_fast_delong_equals_the_pairwise_definition(n, ties, seed):
    y, a, b = _data(n, seed, ties=ties)
    aucs, cov = stats.delong_covariance(y, np.stack([a, b]))
    ref_aucs, ref_cov = _delong_bruteforce(y, [a, b])
    np.testing.assert_allclose(aucs, ref_aucs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-9, atol=1e-14)
    from sklearn.metrics import roc_auc_score

    assert aucs[0] == pytest.approx(roc_auc_score(y, a), abs=1e-12)


def test_delong_hand_computed_case():
    # positives 0.9, 0.4; negatives 0.6, 0.1. Placements: V10 = [1, 0.5], V01 = [0.5, 1]; AUC = 3/4;
    # S10 = S01 = var([1, 0.5], ddof=1) = 0.125; Var(AUC) = 0.125/2 + 0.125/2 = 0.125.
    y = np.array([1, 1, 0, 0])
    p = np.array([0.9, 0.4, 0.6, 0.1])
    aucs, cov = stats.delong_covariance(y, p[None])
    assert aucs[0] == pytest.approx(0.75) and cov[0, 0] == pytest.approx(0.125)
    # the reversed scorer has AUC 1/4 and, perfectly anti-correlated, Var(a - b) = 4 Var(a) = 0.5
    t = stats.delong_test(y, p, 1 - p)
    assert t["diff"] == pytest.approx(0.5) and t["se"] == pytest.approx(math.sqrt(0.5))
    assert t["p"] == pytest.approx(math.erfc(0.5 / math.sqrt(0.5) / math.sqrt(2)))


def test_delong_variance_matches_the_bootstrap():
    y, a, b = _data(1500, 3, noise=(0.7, 1.3))
    t = stats.delong_test(y, a, b)
    boot = stats._bootstrap_values(
        y.astype(float), [np.clip(a, 1e-7, 1 - 1e-7), np.clip(b, 1e-7, 1 - 1e-7)], "auc", 400, 0
    )
    sd = np.std(boot[:, 0] - boot[:, 1], ddof=1)
    assert 0.8 < t["se"] / sd < 1.25, (t["se"], sd)
    assert t["diff"] > 0 and t["p"] < 0.05  # a carries less noise


def test_delong_p_values_hold_their_size_under_the_null():
    # equally good, correlated scorers: the share of p < 0.05 must be near 5% (the covariance term matters:
    # dropping it would make the test far too conservative here)
    ps = [stats.delong_test(*_data(300, 100 + s, noise=(0.8, 0.8)))["p"] for s in range(300)]
    rate = np.mean(np.array(ps) < 0.05)
    assert 0.015 <= rate <= 0.10, rate
    assert stats.delong_test(*_data(300, 7)[:2], _data(300, 7)[1])["p"] == 1.0  # a model against itself


def test_per_sample_logloss_mean_is_sklearns_logloss():
    from sklearn.metrics import log_loss

    y, a, _ = _data(333, 4)
    p = np.clip(a, 1e-7, 1 - 1e-7)
    assert stats.per_sample_logloss(y.astype(float), p).mean() == pytest.approx(log_loss(y, p), rel=1e-12)
    assert stats.logloss(y, a) == pytest.approx(log_loss(y, p), rel=1e-12)


@pytest.mark.parametrize("metric", ["auc", "logloss"])
def test_bootstrap_interval_brackets_the_value_and_shrinks_with_n(metric):
    widths = []
    for n in (400, 3600):
        y, a, _ = _data(n, 5)
        ci = stats.bootstrap_ci(y, a, metric, n_boot=300, seed=1)
        assert ci["lo"] < ci["value"] < ci["hi"] and ci["n_boot"] == 300
        widths.append(ci["hi"] - ci["lo"])
    assert 2.0 < widths[0] / widths[1] < 4.5  # ~ sqrt(9) = 3


def test_bootstrap_interval_covers_the_population_auc():
    # the AUC of an infinite sample of the same generator, approximated by a large one
    y_big, a_big, _ = _data(200_000, 99)
    truth = stats.auc(y_big, a_big)
    covered = 0
    for s in range(30):
        y, a, _ = _data(300, 200 + s)
        ci = stats.bootstrap_ci(y, a, "auc", n_boot=200, seed=s)
        covered += ci["lo"] <= truth <= ci["hi"]
    assert covered >= 24  # 95% nominal; 30 draws


def test_paired_bootstrap_detects_a_better_model_and_not_itself():
    y, a, b = _data(2000, 6, noise=(0.5, 1.5))
    res = stats.paired_bootstrap(y, a, b, "logloss", n_boot=400, seed=0)
    assert res["diff"] < 0 and res["hi"] < 0 and res["p"] < 0.01
    same = stats.paired_bootstrap(y, a, a, "logloss", n_boot=100, seed=0)
    assert same["diff"] == 0 and same["p"] == 1.0
    auc_res = stats.paired_bootstrap(y, a, b, "auc", n_boot=200, seed=0)
    assert auc_res["diff"] > 0 and auc_res["lo"] > 0
    # same direction and similar p-scale as DeLong on the same samples
    assert stats.delong_test(y, a, b)["p"] < 0.01


def test_row_statistics_shape_and_within_noise():
    y, a, b = _data(800, 8, noise=(1.0, 1.0))
    row = stats.row_statistics(y, a, {"DIN": b, "self": a}, n_boot=100, seed=0)
    assert set(row) == {"auc_ci", "logloss_ci", "vs"} and set(row["vs"]) == {"DIN", "self"}
    assert row["vs"]["self"]["p_auc"] == 1.0 and row["vs"]["self"]["d_logloss"] == 0
    assert stats.within_noise(row["vs"]["self"]["p_auc"])
    assert not stats.within_noise(0.01) and stats.within_noise(0.2)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: stats.auc([0, 1, 2], [0.1, 0.2, 0.3]), "labels must be 0 or 1"),
        (lambda: stats.auc([1, 1, 1], [0.1, 0.2, 0.3]), "both classes"),
        (lambda: stats.bootstrap_ci([0, 1], [0.5], "auc"), r"probs: expected shape \(2,\)"),
        (lambda: stats.delong_test([0, 1], [0.2, 0.8], [0.3, np.nan]), "probs_b: 1 non-finite"),
        (lambda: stats.bootstrap_ci([0, 1], [0.2, 1.5], "auc"), r"probs: probabilities must lie in \[0, 1\]"),
        (
            lambda: stats.bootstrap_ci([0, 1, 0, 1], [0.2, 0.6, 0.3, 0.9], "f1"),
            "metric: expected 'auc' or 'logloss'",
        ),
        (lambda: stats.bootstrap_ci([0, 1, 0, 1], [0.2, 0.6, 0.3, 0.9], "auc", level=95), "level"),
        (lambda: stats.delong_covariance([0, 1], np.zeros((2, 3))), r"scores: expected shape \(k, 2\)"),
    ],
)
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_weighted_auc_equals_sklearn_on_resamples():
    from sklearn.metrics import roc_auc_score

    y, a, _ = _data(157, 11, ties=True)
    idx = np.random.default_rng(0).integers(0, y.size, size=(5, y.size))
    counts = stats.resample_counts(idx, y.size)
    assert np.array_equal(counts.sum(axis=1), np.full(5, y.size))
    got = stats.weighted_auc(y.astype(float), a, counts)
    for i in range(5):
        assert got[i] == pytest.approx(roc_auc_score(y[idx[i]], a[idx[i]]), abs=1e-12)
        assert got[i] == pytest.approx(roc_auc_score(y, a, sample_weight=counts[i]), abs=1e-12)
    one_class = np.where(y == 1, 1.0, 0.0)[None]
    assert np.isnan(stats.weighted_auc(y.astype(float), a, one_class))[0]


def test_demo_table_marks_differences_within_noise():
    from rellax_fast.metrics import ctr_metrics
    from rellax_fast.train.ablation import add_noise_columns, noise_table

    y, good, weak = _data(600, 12, noise=(0.3, 3.0))
    rng = np.random.default_rng(3)
    near = np.clip(
        good + 0.03 * rng.standard_normal(good.size), 1e-6, 1 - 1e-6
    )  # a tiny perturbation of full
    probs = {"DIN alone": weak, "ReLLaX (full)": good, "w/o SPA": near}
    rows = [{"variant": k, **ctr_metrics(y, p)} for k, p in probs.items()]
    note = add_noise_columns(rows, y, probs, n_boot=200)
    by = {r["variant"]: r for r in rows}
    assert by["w/o SPA"]["vs"]["full"]["p_auc"] >= 0.05 and by["DIN alone"]["vs"]["full"]["p_auc"] < 0.05
    assert "Within noise of full ReLLaX in AUC: w/o SPA." in note
    table = noise_table(rows)
    line = {ln.split(" | ")[0][2:]: ln for ln in table.splitlines()[2:]}
    assert line["w/o SPA"].split(" | ")[5].endswith("≈")  # ΔAUC vs full
    assert not line["DIN alone"].split(" | ")[5].endswith("≈")
    assert "(itself)" in line["ReLLaX (full)"].split(" | ")[5]
    assert all(r["auc_lo"] <= r["auc"] <= r["auc_hi"] for r in rows)
