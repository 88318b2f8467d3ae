"""CTR metrics and their outputs (JSON, Markdown, PNG)."""

import json
import math

import numpy as np
import pytest

from rellax_fast.metrics import ctr_metrics
from rellax_fast.train.metrics import markdown_table, plot_runs, write_metrics_json


def test_ctr_metrics_match_hand_computation():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.1, 0.6, 0.7, 0.4, 0.9, 0.2])
    m = ctr_metrics(y, p)
    # AUC: fraction of (pos, neg) pairs ranked correctly
    pairs = [(a, b) for a in p[y == 1] for b in p[y == 0]]
    assert m["auc"] == pytest.approx(np.mean([a > b for a, b in pairs]))
    assert m["logloss"] == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert m["accuracy"] == pytest.approx(np.mean((p >= 0.5) == y))
    assert m["n"] == 6


def test_ctr_metrics_edge_cases():
    m = ctr_metrics([1, 1], [1.0, 0.0])  # one class: AUC undefined, LogLoss clipped and finite
    assert math.isnan(m["auc"]) and math.isfinite(m["logloss"])
    with pytest.raises(ValueError, match="same length"):
        ctr_metrics([0, 1], [0.5])
    with pytest.raises(ValueError, match="non-finite"):
        ctr_metrics([0, 1], [0.5, float("nan")])
    with pytest.raises(ValueError, match="0 or 1"):
        ctr_metrics([0, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match="0 samples"):
        ctr_metrics([], [])


def test_outputs(tmp_path):
    m = ctr_metrics([0, 1, 1, 0], [0.2, 0.8, 0.6, 0.3])
    write_metrics_json(tmp_path / "metrics.json", m, {"variant": "x"})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved) == {"auc", "logloss", "accuracy", "n", "variant"} and saved["auc"] == 1.0
    table = markdown_table([{"variant": "x", **m}])
    assert table.splitlines()[0] == "| variant | auc | logloss | accuracy | n |" and "| x | 1.0000 |" in table
    png = plot_runs(tmp_path / "p.png", {"x": [0.7, 0.6, 0.5]}, {"x": 1.0, "DIN": 0.7})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_table_formats_cells_and_columns():
    rows = [
        {"variant": "full", "auc": 0.71234567, "logloss": float("nan"), "accuracy": np.float64(0.5), "n": 7},
        {"variant": "DIN", "auc": None, "n": 3, "extra": "ignored"},
    ]
    lines = markdown_table(rows).splitlines()
    assert lines[:2] == ["| variant | auc | logloss | accuracy | n |", "|---|---|---|---|---|"]
    assert lines[2] == "| full | 0.7123 | nan | 0.5000 | 7 |"
    assert lines[3] == "| DIN |  |  |  | 3 |"  # None and a missing key: empty cells
    assert len(lines) == 4
    assert markdown_table(rows, ["n", "auc"], float_format=".2e").splitlines()[2] == "| 7 | 7.12e-01 |"
    assert (
        markdown_table(rows, None).splitlines()[0] == "| variant | auc | logloss | accuracy | n |"
    )  # first row
    assert markdown_table([]) == "| variant | auc | logloss | accuracy | n |\n|---|---|---|---|---|\n"
    assert markdown_table([], None) == "(no rows)\n"
