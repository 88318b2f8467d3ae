"""``rellax-fast bench quality`` at a tiny size on the embedded synthetic data: a tiny BERT backbone, seeded
item embeddings instead of the MiniLM encoder, a small DIN, a few training steps. Checks the table's rows,
statistics and files, the post-hoc mix control, two seeds, resumption, and the baselines' pieces."""

import json
import math

import numpy as np
import pytest


def _argv(model, out, *extra):
    return [
        "bench",
        "quality",
        "--dataset",
        "synthetic",
        "--out",
        str(out),
        "--model",
        model,
        "--n-train",
        "24",
        "--n-test",
        "64",
        "--n-valid",
        "48",
        "--batch-size",
        "8",
        "--k",
        "3",
        "--max-length",
        "96",
        "--cflora-backend",
        "reference",
        "--din-epochs",
        "1",
        "--din-embed-dim",
        "4",
        "--din-hidden",
        "8",
        "--din-max-history",
        "5",
        "--n-boot",
        "50",
        "--no-progress",
        "--save-every",
        "100",
        *extra,
    ]


@pytest.mark.slow  # ~20-30 s on an idle 2-core machine (DIN epoch and the ID regression on ~76k samples)
def test_bench_quality_tiny_end_to_end(tiny_bert, seeded_embeddings, tmp_path, capsys, monkeypatch):
    from rellax_fast.bench import quality
    from rellax_fast.bench.quality import DIN_ROW, ENSEMBLE_ROW, FULL_ROW, LR_ROW, TEXT_DIN_ROW, TEXT_ROW
    from rellax_fast.cli import main

    def no_second_scoring(*a, **k):
        raise AssertionError("the text-only row's valid set was scored again after model selection")

    monkeypatch.setattr(quality, "score_split", no_second_scoring)
    argv = _argv(tiny_bert, tmp_path, "--rows", "full,residual,text-only,din-text", "--seeds", "0,1")
    assert main(argv) == 0
    q = tmp_path / "quality"
    for name in ("quality.md", "quality.json", "quality.png"):
        assert (q / name).stat().st_size > 0, name
    assert (q / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((q / "quality.json").read_text())
    rows = {r["row"]: r for r in res["rows"]}
    residual = "ReLLaX, residual read-out (lambda learned)"
    assert set(rows) == {DIN_ROW, LR_ROW, FULL_ROW, residual, TEXT_ROW, ENSEMBLE_ROW, TEXT_DIN_ROW}
    assert res["meta"]["n_test"] == 64 and res["meta"]["seeds"] == [0, 1]
    for r in rows.values():
        ci = r["auc_ci"]
        assert ci["lo"] <= ci["value"] <= ci["hi"] and 0 <= ci["lo"] and ci["hi"] <= 1
        assert r["logloss_ci"]["lo"] <= r["logloss_ci"]["value"] <= r["logloss_ci"]["hi"]
        assert set(r["vs"]) == {"DIN", "full"}
        for vs in r["vs"].values():
            assert 0 < vs["p_auc"] <= 1 and 0 < vs["p_logloss"] <= 1
    assert rows[DIN_ROW]["vs"]["DIN"]["p_auc"] == 1.0 and rows[FULL_ROW]["vs"]["full"]["d_auc"] == 0.0
    # baselines report valid metrics; LM rows are repeated per seed with mean ± sd
    assert 0 <= rows[DIN_ROW]["valid"]["auc"] <= 1 and 0 <= rows[LR_ROW]["valid"]["auc"] <= 1
    assert rows[FULL_ROW]["n_seeds"] == 2 and rows[FULL_ROW]["auc_sd"] is not None
    assert rows[DIN_ROW]["n_seeds"] == 1 and rows[DIN_ROW]["auc_sd"] is None
    assert set(rows[ENSEMBLE_ROW]["weights"]) == {"0", "1"}
    assert all(math.isfinite(w) for w in rows[ENSEMBLE_ROW]["weights"]["0"].values())
    # the mix is fit on the selected text-only model's own valid scores (handed back by the selection)
    text_best = []
    for seed in (0, 1):
        best = json.loads((q / "runs" / f"text-only-lm-no-spa-identity-c-s{seed}" / "loss.json").read_text())[
            "best"
        ]
        row = json.loads((q / "rows" / f"text-only-lm-no-spa-identity-c-s{seed}.json").read_text())
        assert np.load(row["valid_predictions"]).shape == (48,) and row["best_valid"] == best
        assert rows[TEXT_ROW]["valid_by_seed"][str(seed)]["auc"] == pytest.approx(best["auc"], abs=1e-9)
        text_best.append(best)
    # LM rows show the kept step's valid AUC (mean over seeds) next to the baselines' valid AUC
    assert rows[TEXT_ROW]["valid"]["auc"] == pytest.approx(np.mean([b["auc"] for b in text_best]))
    assert 0 <= res["meta"]["din_valid_subset"]["auc"] <= 1
    # the token budget given (--max-length 96) and what it cuts, per SUBR/SPA setting of the rows
    tb = res["meta"]["token_budget"]
    assert tb["max_length"] == 96 and not tb["auto"] and set(tb["train_prompts_cut"]) == {"SUBR, SPA", "SUBR"}
    for c in tb["train_prompts_cut"].values():
        assert c["n"] == 24 and 0 <= c["n_cut"] <= 24 and c["median_tokens"] > 0
    # the gated residual read-out starts as DIN: its selection scored step 0 first
    residual_valid = json.loads(
        (q / "runs" / "rellax-residual-read-out-lambda-learned-s0" / "loss.json").read_text()
    )["valid"]
    assert residual_valid[0]["step"] == 0
    # the seeds really are different fine-tunings
    p0 = np.load(q / "runs" / "rellax-full-s0" / "predictions.npy")
    p1 = np.load(q / "runs" / "rellax-full-s1" / "predictions.npy")
    assert p0.shape == (64,) and not np.allclose(p0, p1)
    md = (q / "quality.md").read_text()
    assert "max_length 96 (given); training prompts over it" in md
    assert "| row | valid AUC | test AUC |" in md and "≈ marks a difference within noise" in md
    assert f"| {ENSEMBLE_ROW} |" in md and "wall time" in md
    assert "ReLLaX quality bench on synthetic" in capsys.readouterr().out
    # the text-aware DIN: a baseline with its own valid metrics, not DIN's predictions
    assert rows[TEXT_DIN_ROW]["kind"] == "baseline" and 0 <= rows[TEXT_DIN_ROW]["valid"]["auc"] <= 1
    assert not rows[TEXT_DIN_ROW]["vs"]["DIN"]["same_predictions"]
    _check_slices(res, q, rows)

    # a rerun skips every finished row (same inputs) and writes the same table
    before = {r["row"]: r["auc_mean"] for r in res["rows"]}
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 7
    again = {r["row"]: r["auc_mean"] for r in json.loads((q / "quality.json").read_text())["rows"]}
    assert again == pytest.approx(before)


@pytest.mark.slow  # ~3-4 min on the loaded 2-core machine (two points, the whole-split DIN and text-aware DIN)
def test_bench_quality_few_shot_curve_and_ctr_train_samples(tiny_bert, seeded_embeddings, tmp_path, capsys):
    from rellax_fast.bench.quality import DIN_ROW, FULL_ROW, TEXT_DIN_ROW, TEXT_ROW
    from rellax_fast.cli import main

    argv = _argv(
        tiny_bert,
        tmp_path,
        "--rows",
        "full,text-only,din-text",
        "--ctr-train-samples",
        "300",
        "--few-shot",
        "all,300",
    )
    assert main(argv) == 0
    q = tmp_path / "quality"
    res = json.loads((q / "quality.json").read_text())
    assert (
        res["meta"]["ctr_train_samples"] == 300
    )  # the table's DIN, text DIN and LM prompts come from 300 samples
    curve = res["few_shot"]
    assert [p["label"] for p in curve["points"]] == ["N=300", "all"] and curve["n_test"] == 64
    small, whole = curve["points"]
    assert small["train_samples"] == 300 and small["lm_prompts"] == 24 and whole["train_samples"] > 300
    for p in curve["points"]:
        assert set(p["rows"]) == {DIN_ROW, TEXT_DIN_ROW, TEXT_ROW, FULL_ROW}
        for r in p["rows"].values():
            assert 0 <= r["auc_lo"] <= r["auc"] <= r["auc_hi"] <= 1 and 0 < r["vs_din"]["p_auc"] <= 1
        assert p["rows"][DIN_ROW]["vs_din"]["same_predictions"]
    # N=300 is the table's own setting: the same models, read back instead of retrained
    table = {r["row"]: r for r in res["rows"]}
    for name, r in small["rows"].items():
        assert r["auc"] == pytest.approx(table[name]["auc_ci"]["value"]), name
    assert (
        not (q / "few-shot" / "n300" / "ctr").exists()
        and (q / "few-shot" / "all" / "ctr" / "din.json").exists()
    )
    # the whole split trains other models (DIN, text DIN, and the LM rows on their own DIN's h)
    assert whole["rows"][DIN_ROW]["auc"] != small["rows"][DIN_ROW]["auc"]
    assert not np.allclose(
        np.load(q / "few-shot" / "all" / "rows" / "din-text-predictions.npy"),
        np.load(q / "rows" / "din-text-predictions.npy"),
    )
    md = (q / "quality.md").read_text()
    assert "## Few samples" in md and "| row | N=300 (300 samples, 24 prompts) | all (" in md
    assert (q / "few-shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "few-shot point N=300" in capsys.readouterr().out


def test_parse_few_shot_orders_the_counts_with_all_last():
    from rellax_fast.bench.quality import parse_few_shot

    assert parse_few_shot("all,8192, 2048") == [2048, 8192, 0] and parse_few_shot("") == []


def _check_slices(res, q, rows):
    """The sliced table: membership stored once (slices.json), equal to a recomputation by hand from the train
    split, and every row cut by it (identical band sizes); the statistics of a tested band match train.stats."""
    from rellax_fast.bench.quality import DIN_ROW
    from rellax_fast.data import load_dataset, prepare_ctr
    from rellax_fast.train import slices, stats
    from rellax_fast.train.pipeline import subsample

    stored = json.loads((q / "slices.json").read_text())
    data = prepare_ctr(load_dataset("synthetic"), seed=0)
    test = data.splits["test"].subset(subsample(len(data.splits["test"]), 64, 1))
    train_items, train_users = data.splits["train"].item_id, set(data.splits["train"].user_id.tolist())
    counts = [int((train_items == i).sum()) for i in test.item_id]
    assert stored["codes"]["item_train_count"] == [
        0 if c == 0 else 1 if c <= 5 else 2 if c <= 20 else 3 for c in counts
    ]
    assert stored["codes"]["user_in_train"] == [int(u in train_users) for u in test.user_id.tolist()]
    assert stored["codes"]["history_length"] == [
        0 if h < 10 else 1 if h < 50 else 2 if h < 200 else 3 for h in test.pos
    ]
    sliced = res["slices"]["rows"]
    assert set(sliced) == set(rows) and res["slices"]["membership"] == str(q / "slices.json")
    labels = test.label.astype(float)
    for slicing, bands in slices.SLICINGS.items():
        codes = np.asarray(stored["codes"][slicing])
        for i, band in enumerate(bands):
            sizes = {(r[slicing][band]["n"], r[slicing][band]["n_pos"]) for r in sliced.values()}
            assert sizes == {(int((codes == i).sum()), int(labels[codes == i].sum()))}, (slicing, band, sizes)
    full = np.load(q / "runs" / "rellax-full-s0" / "predictions.npy")
    tested = [
        (s, b) for s in slices.SLICINGS for b, v in sliced["ReLLaX (full)"][s].items() if v["status"] is None
    ]
    assert tested, "no band of 64 samples is large enough to test"
    s, b = tested[0]
    m = np.asarray(stored["codes"][s]) == slices.SLICINGS[s].index(b)
    assert sliced["ReLLaX (full)"][s][b]["auc"] == pytest.approx(stats.auc(labels[m], full[m]))
    assert sliced[DIN_ROW][s][b]["vs_ref"]["same_predictions"]  # the reference is DIN itself
    untested = [v for r in sliced.values() for bands in r.values() for v in bands.values() if v["status"]]
    assert all("vs_ref" not in v for v in untested)
    md = (q / "quality.md").read_text()
    assert "## Sliced metrics" in md and "**target item's train interactions: AUC**" in md
    assert "**history length: LogLoss**" in md


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--seeds", "0,x"], "--seeds"),
        (["--seeds", "1,1"], "--seeds"),
        (["--rows", "full,bogus"], "--rows: unknown"),
        (["--n-boot", "3"], "--n-boot"),
        (["--n-train", "-1"], "--n-train"),
        (["--few-shot", "2k"], "--few-shot"),
        (["--few-shot", "100,100"], "--few-shot"),
        (["--ctr-train-samples", "-5"], "--ctr-train-samples"),
    ],
)
def test_bench_quality_bad_options_name_the_flag(tmp_path, capsys, extra, match):
    from rellax_fast.cli import main

    assert main(["bench", "quality", "--out", str(tmp_path), *extra]) == 2
    assert match in capsys.readouterr().err


def test_id_logreg_uses_ids_and_leave_one_out_rates(ml100k):
    from rellax_fast.bench.quality import _positive_rates, fit_id_logreg
    from rellax_fast.data import load_dataset, prepare_ctr
    from rellax_fast.data.datasets import RecDataset

    # leave-one-out: a train row's own label never enters its feature
    keys = np.array([1, 1, 2])
    y = np.array([1.0, 0.0, 1.0])
    got = _positive_rates(keys, y, keys, smoothing=2.0, prior=0.5, leave_one_out=True)
    np.testing.assert_allclose(got, [(0 + 1) / (1 + 2), (1 + 1) / (1 + 2), (0 + 1) / (0 + 2)])
    ds = load_dataset("ml-100k", data_dir=ml100k, download=False)
    ratings = ds.ratings[ds.ratings.user_id <= 150]
    data = prepare_ctr(RecDataset(ds.name, ds.domain, ratings, ds.items, ds.users), seed=0)
    lr = fit_id_logreg(data, grid_c=(0.1,), grid_smoothing=(20.0,), log=lambda *_: None)
    from rellax_fast.metrics import ctr_metrics

    m = ctr_metrics(data.splits["test"].label, lr["predict"](data.splits["test"]))
    assert m["auc"] > 0.6  # positive rates of users and items carry real signal on MovieLens


def test_posthoc_mix_recovers_the_generating_weights():
    from rellax_fast.bench.quality import fit_posthoc_mix

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(20000), rng.standard_normal(20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-(0.8 * a + 0.3 * b - 0.2)))).astype(int)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    fit = fit_posthoc_mix(y, sig(a), sig(b))
    assert fit["w_din"] == pytest.approx(0.8, abs=0.08) and fit["w_lm"] == pytest.approx(0.3, abs=0.08)
    assert fit["c"] == pytest.approx(-0.2, abs=0.08)
    p = fit["predict"](sig(a[:5]), sig(b[:5]))
    np.testing.assert_allclose(p, sig(fit["w_din"] * a[:5] + fit["w_lm"] * b[:5] + fit["c"]), rtol=1e-6)


@pytest.mark.slow  # ~20-30 s on an idle 2-core machine (DIN epoch and the ID regression on ~76k samples)
def test_demo_table_says_what_is_within_noise(tiny_bert, seeded_embeddings, tmp_path, capsys):
    from rellax_fast.cli import main

    argv = [
        "demo",
        "--out",
        str(tmp_path),
        "--model",
        tiny_bert,
        "--n-train",
        "16",
        "--n-test",
        "64",
        "--batch-size",
        "8",
        "--k",
        "3",
        "--max-length",
        "96",
        "--cflora-backend",
        "reference",
        "--din-epochs",
        "1",
        "--din-embed-dim",
        "4",
        "--din-hidden",
        "8",
        "--din-max-history",
        "5",
        "--n-boot",
        "50",
        "--no-progress",
        "--variants",
        "full,no-spa",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| variant | AUC | AUC 95% CI | LogLoss | accuracy | ΔAUC vs full | ΔAUC vs DIN |" in out
    assert "≈: within noise (p ≥ 0.05)" in out and (
        "Within noise of full ReLLaX in AUC" in out or "outside noise" in out
    )
    res = json.loads((tmp_path / "ablation.json").read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"DIN alone", "ReLLaX (full)", "w/o SPA"}
    for r in rows.values():
        assert r["auc_lo"] <= r["auc"] <= r["auc_hi"] and set(r["vs"]) == {"DIN", "full"}
    assert (
        rows["ReLLaX (full)"]["vs"]["full"]["same_predictions"]
        and not rows["w/o SPA"]["vs"]["full"]["same_predictions"]
    )
    assert "ΔAUC vs full" in (tmp_path / "ablation.md").read_text()
