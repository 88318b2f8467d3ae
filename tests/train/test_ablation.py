"""``train.ablation``: the demo's variant selection and files, usable without the ``demo`` command module."""

import json

import pytest

from rellax_fast.train.ablation import selected_variants, write_ablation
from rellax_fast.train.pipeline import ABLATIONS


def test_selected_variants_by_key_all_and_two_stage():
    assert [s.name for s in selected_variants("all")] == [s.name for s in ABLATIONS.values()]
    specs = selected_variants(" no-spa , two-stage,full")
    assert [s.name for s in specs] == [ABLATIONS["no-spa"].name, "ReLLaX two-stage", ABLATIONS["full"].name]
    assert specs[1].recipe == "two-stage" and not specs[0].spa
    with pytest.raises(ValueError, match=r"--variants: unknown \['bogus'\]; choose from full,"):
        selected_variants("full,bogus")


def test_demo_refuses_an_unknown_variant_before_any_work(tmp_path, capsys):
    from rellax_fast.cli import main

    assert main(["demo", "--out", str(tmp_path / "o"), "--variants", "full,nope"]) == 2
    err = capsys.readouterr().err
    assert "--variants: unknown ['nope']" in err and not (tmp_path / "o").exists()


def test_write_ablation_writes_the_table_rows_and_plot(tmp_path):
    rows = [{"variant": "DIN alone", "auc": 0.61, "logloss": 0.66, "accuracy": 0.6, "n": 10},
            {"variant": "ReLLaX (full)", "auc": 0.64, "logloss": 0.65, "accuracy": 0.62, "n": 10}]  # fmt: skip
    result = {"rows": rows, "table": "| variant |\n|---|\n| DIN alone |\n", "curves": {"ReLLaX (full)": [0.7, 0.69, 0.68]},
              "aucs": {"DIN alone": 0.61, "ReLLaX (full)": 0.64}}  # fmt: skip
    md, js, png = write_ablation(tmp_path, "synthetic", result, {"n_train": 16})
    assert md.read_text() == "# ReLLaX ablation on synthetic\n\n" + result["table"]
    assert json.loads(js.read_text()) == {"rows": rows, "config": {"dataset": "synthetic", "n_train": 16}}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
