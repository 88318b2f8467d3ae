"""``train.ablation``: the demo's variant selection and files, usable without the ``demo`` command module."""

import json

import pytest

from rellax_fast.train.ablation import selected_variants, write_ablation
from rellax_fast.train.pipeline import ablations


def test_selected_variants_by_key_all_and_two_stage():
    table = ablations()
    assert [s.name for s in selected_variants("all")] == [s.name for s in table.values()]
    specs = selected_variants(" no-spa , two-stage,full")
    assert [s.name for s in specs] == [table["no-spa"].name, "ReLLaX two-stage", table["full"].name]
    assert specs[1].recipe == "two-stage" and not specs[0].spa
    with pytest.raises(ValueError, match=r"--variants: unknown \['bogus'\]; choose from full,"):
        selected_variants("full,bogus")


def test_demo_refuses_an_unknown_variant_before_any_work(tmp_path, capsys):
    from rellax_fast.cli import main

    assert main(["demo", "--out", str(tmp_path / "o"), "--variants", "full,nope"]) == 2
    err = capsys.readouterr().err
    assert "--variants: unknown ['nope']" in err and not (tmp_path / "o").exists()


def test_write_ablation_writes_the_table_rows_and_plot(tmp_path):
    rows = [
        {"variant": "DIN alone", "auc": 0.61, "logloss": 0.66, "accuracy": 0.6, "n": 10},
        {"variant": "ReLLaX (full)", "auc": 0.64, "logloss": 0.65, "accuracy": 0.62, "n": 10},
    ]
    result = {
        "rows": rows,
        "table": "| variant |\n|---|\n| DIN alone |\n",
        "curves": {"ReLLaX (full)": [0.7, 0.69, 0.68]},
        "aucs": {"DIN alone": 0.61, "ReLLaX (full)": 0.64},
    }
    md, js, png = write_ablation(tmp_path, "synthetic", result, {"n_train": 16})
    assert md.read_text() == "# ReLLaX ablation on synthetic\n\n" + result["table"]
    assert json.loads(js.read_text()) == {"rows": rows, "config": {"dataset": "synthetic", "n_train": 16}}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ #25.10: resume skips finished variants, ETA


def _fake_pipeline(monkeypatch, calls):
    """run_variant writing what the real one writes (metrics.json, loss.json, predictions.npy) and counting calls;
    run_inputs reading a fingerprint off the fake context."""
    import numpy as np

    from rellax_fast._io import atomic_write_npy, atomic_write_text
    from rellax_fast.metrics import ctr_metrics
    from rellax_fast.train import pipeline
    from rellax_fast.train.metrics import write_metrics_json

    def run_variant(ctx, spec, cfg, run_dir, resume=False, log=print):
        calls.append((spec.name, resume))
        run_dir.mkdir(parents=True, exist_ok=True)
        labels = ctx.data.splits["test"].label[ctx.test_index]
        probs = np.clip(labels * 0.6 + 0.2 + 0.01 * len(calls), 0, 1)
        metrics = ctr_metrics(labels, probs)
        atomic_write_npy(run_dir / "predictions.npy", probs)
        atomic_write_text(run_dir / "loss.json", json.dumps({"losses": [0.7, 0.6 - 0.01 * len(calls)]}))
        write_metrics_json(run_dir / "metrics.json", metrics, {"variant": spec.name})
        return {"metrics": metrics, "losses": [0.7, 0.6 - 0.01 * len(calls)], "run_dir": str(run_dir)}

    monkeypatch.setattr(pipeline, "run_variant", run_variant)
    monkeypatch.setattr(pipeline, "run_inputs", lambda ctx, spec: {"data_fingerprint": ctx.fingerprint})


def _fake_context(fingerprint="a"):
    from types import SimpleNamespace

    import numpy as np

    labels = np.array([0, 1] * 20, dtype=np.float32)
    data = SimpleNamespace(splits={"test": SimpleNamespace(label=labels)})
    return SimpleNamespace(
        data=data, test_index=np.arange(40), din_test_probs=np.linspace(0.3, 0.7, 40), fingerprint=fingerprint
    )


def test_demo_resume_reads_finished_variants_instead_of_rescoring_them(tmp_path, monkeypatch):
    from rellax_fast.train.ablation import run_ablation
    from rellax_fast.train.pipeline import PipelineConfig

    calls, logs = [], []
    _fake_pipeline(monkeypatch, calls)
    specs, cfg = selected_variants("full,no-spa"), PipelineConfig()
    first = run_ablation(_fake_context(), specs, cfg, tmp_path, n_boot=20, log=logs.append)
    assert [c[0] for c in calls] == [s.name for s in specs]
    # resumed: both variants finished under the same inputs -> read back, nothing trained, the same rows
    again = run_ablation(_fake_context(), specs, cfg, tmp_path, resume=True, n_boot=20, log=logs.append)
    assert len(calls) == 2 and again["rows"] == first["rows"] and again["curves"] == first["curves"]
    assert sum("finished before, read from" in line for line in logs) == 2
    # without --resume, or with other inputs or options, a variant runs again
    run_ablation(_fake_context(), specs[:1], cfg, tmp_path, n_boot=20, log=logs.append)
    assert calls[-1] == (specs[0].name, False)
    run_ablation(_fake_context("b"), specs[:1], cfg, tmp_path, resume=True, n_boot=20, log=logs.append)
    assert calls[-1] == (
        specs[0].name,
        False,
    )  # finished under other inputs: nothing to continue, trained anew
    assert "finished before under other options or inputs: trained again" in logs[-1]
    from dataclasses import replace

    run_ablation(
        _fake_context("b"), specs, replace(cfg, k=3), tmp_path, resume=True, n_boot=20, log=logs.append
    )
    assert [c[0] for c in calls[-2:]] == [s.name for s in specs]
    # a finished run folder missing a file is not finished; an interrupted one (no row file) continues
    (tmp_path / "rellax-full" / "loss.json").unlink()
    (tmp_path / "w-o-spa" / "ablation_row.json").unlink()
    n = len(calls)
    run_ablation(
        _fake_context("b"), specs, replace(cfg, k=3), tmp_path, resume=True, n_boot=20, log=logs.append
    )
    assert calls[n:] == [(specs[0].name, False), (specs[1].name, True)]


def test_demo_prints_an_eta_from_the_first_variant(tmp_path, monkeypatch):
    from rellax_fast.train import ablation
    from rellax_fast.train.pipeline import PipelineConfig

    calls, logs = [], []
    _fake_pipeline(monkeypatch, calls)
    specs = selected_variants("full,no-spa,two-stage")
    ablation.run_ablation(_fake_context(), specs, PipelineConfig(), tmp_path, n_boot=20, log=logs.append)
    eta = [line for line in logs if line.startswith("[demo] ETA:")]
    assert len(eta) == 1 and "2 more variant(s), about " in eta[0] and "done around " in eta[0]
    assert logs.index(eta[0]) == 1  # right after the first variant's line
    assert (
        ablation.variant_cost(specs[2], PipelineConfig()) == 1.5
        and ablation.variant_cost(specs[0], PipelineConfig()) == 1
    )
    assert ablation.eta_text(30, now=0).startswith("about 30 s (done around ")
    assert ablation.eta_text(600, now=0).startswith("about 10 min (done around ")


def test_ablation_png_has_the_auc_intervals_and_names_the_smoothing_window(tmp_path, monkeypatch):
    import numpy as np

    from rellax_fast import _io
    from rellax_fast.train.metrics import plot_runs, smoothing_window

    figures = []
    monkeypatch.setattr(_io, "atomic_write_png", lambda path, fig: figures.append(fig) or path)
    curves = {"ReLLaX (full)": list(np.linspace(0.7, 0.5, 100))}
    plot_runs(
        tmp_path / "p.png",
        curves,
        {"DIN alone": 0.61, "ReLLaX (full)": 0.64},
        auc_ci={"DIN alone": (0.58, 0.65), "ReLLaX (full)": (0.60, 0.69)},
    )
    ax_loss, ax_auc = figures[0].axes
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == [
        f"ReLLaX (full) (mean of {smoothing_window(100)} steps)"
    ]
    assert smoothing_window(100) == 5 and smoothing_window(10) == 1
    from matplotlib.container import ErrorbarContainer

    errorbars = [c for c in ax_auc.containers if isinstance(c, ErrorbarContainer)]
    assert len(errorbars) == 1
    segments = errorbars[0].lines[2][0].get_segments()
    assert np.allclose([[s[0][0], s[1][0]] for s in segments], [[0.58, 0.65], [0.60, 0.69]])
    assert "95% bootstrap interval" in ax_auc.get_xlabel()
