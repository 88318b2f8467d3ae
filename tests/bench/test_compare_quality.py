"""scripts/compare_quality.py (the paired comparison of two bench quality runs, e.g. SmolLM2 against MiniLM in
BENCHMARKS.md): rows matched by name and compared sample by sample, a row of one run listed as such, runs on
different test samples refused."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from rellax_testing import REPO

from rellax_fast.train import stats


def _module():
    spec = importlib.util.spec_from_file_location("compare_quality", REPO / "scripts" / "compare_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_run(folder, rows, n_test=200, seed=0):
    (folder / "quality" / "rows").mkdir(parents=True)
    config = {"dataset": "ml-100k", "n_test": n_test, "seed": seed, "ctr_train_samples": 0, "model": None}
    (folder / "quality" / "quality.json").write_text(json.dumps({"meta": {"config": config}}))
    for i, (name, probs) in enumerate(rows.items()):
        np.save(folder / f"p{i}.npy", probs)
        row = {"name": name, "predictions": str(folder / f"p{i}.npy")}
        (folder / "quality" / "rows" / f"r{i}-s0.json").write_text(json.dumps(row))
    return str(folder)


def test_rows_are_compared_sample_by_sample(tmp_path, monkeypatch, capsys):
    mod = _module()
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 200)
    weak, strong = rng.random(200), np.clip(labels * 0.3 + rng.random(200) * 0.7, 0.01, 0.99)
    a = _fake_run(tmp_path / "a", {"full": weak, "only-a": weak})
    b = _fake_run(tmp_path / "b", {"full": strong})
    monkeypatch.setattr(mod, "test_labels", lambda cfg, data_dir: labels)
    assert mod.main([a, b, "--n-boot", "50"]) == 0
    out = capsys.readouterr().out
    delong = stats.delong_test(labels, strong, weak)
    assert (
        f"| full | {stats.auc(labels, weak):.4f} | {stats.auc(labels, strong):.4f} | {delong['diff']:+.4f}"
        in out
    )
    assert "| only-a | only in A |" in out
    rows = mod.compare(mod._run(a), mod._run(b), labels, 50)
    full = next(r for r in rows if r["row"] == "full")
    assert full["delta_auc"] > 0.1 and full["p_auc"] < 0.01
    assert full["delta_logloss"] == pytest.approx(
        stats.logloss(labels, strong) - stats.logloss(labels, weak), abs=1e-4
    )


def test_runs_on_other_test_samples_are_refused(tmp_path, monkeypatch):
    mod = _module()
    a = _fake_run(tmp_path / "a", {"full": np.full(200, 0.5)})
    b = _fake_run(tmp_path / "b", {"full": np.full(300, 0.5)}, n_test=300)
    with pytest.raises(SystemExit, match="differ in {'n_test': \\(200, 300\\)}"):
        mod.main([a, b])
    with pytest.raises(SystemExit, match="not found"):
        mod.main([a, str(tmp_path / "nothing")])
