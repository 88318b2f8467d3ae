"""Invalid limits are errors and good results are never replaced by empty or partial ones (issue #13, item 7)."""

import json

import numpy as np
import pytest

from rellax_fast.cli import main


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from corpus import write_clean  # ml-100k format, 8 users x 12 ratings: 44 / 5 / 7 samples

    root = tmp_path_factory.mktemp("limits")
    raw = write_clean(root / "raw")
    assert main(["prepare", "--dataset", "ml-100k", "--data-dir", str(raw), "--out", str(root / "out")]) == 0
    return raw, root / "out"


def retrieve(out, *extra):
    return main(
        ["retrieve", "--dataset", "ml-100k", "--out", str(out), "--k", "2", "--device", "cpu", *extra]
    )


def files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_retrieve_invalid_limit_keeps_the_earlier_results(prepared, capsys):
    raw, out = prepared
    assert retrieve(out) == 0
    before = files(out / "retrieval")
    with np.load(out / "retrieval" / "train.npz") as f:
        assert len(f["item_id"]) == 44
    for bad in ("-3", "0"):
        capsys.readouterr()
        assert retrieve(out, "--limit", bad) == 2
        assert f"--limit must be >= 1 (leave it out for every sample); got {bad}" in capsys.readouterr().err
        assert files(out / "retrieval") == before
    assert retrieve(out, "--splits", " , ") == 2
    assert files(out / "retrieval") == before
    assert retrieve(out, "--limit", "3") == 0
    summary = json.loads((out / "retrieval" / "summary.json").read_text())
    assert {s["samples"] for s in summary["splits"].values()} == {3}
    assert retrieve(out) == 0  # back to every sample: the same files as the first run, but for the timings
    assert {k: v for k, v in files(out / "retrieval").items() if k != "summary.json"} == {
        k: v for k, v in before.items() if k != "summary.json"
    }


def test_retrieve_failing_on_a_later_split_replaces_nothing(prepared, capsys, monkeypatch):
    raw, out = prepared
    assert retrieve(out) == 0
    before = files(out / "retrieval")
    from rellax_fast.subr import retrieval

    real, calls = retrieval.retrieve, []

    def fails_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in the valid split")
        return real(*a, **k)

    monkeypatch.setattr(retrieval, "retrieve", fails_on_second)
    assert retrieve(out, "--limit", "2") == 1  # a RuntimeError: a bug (exit 1)
    assert "injected failure" in capsys.readouterr().err
    assert files(out / "retrieval") == before  # train.npz was computed but not published; no temp files


def test_retrieve_refuses_an_interrupted_prepare(prepared, tmp_path, capsys):
    import shutil

    raw, out = prepared
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "meta.json").unlink()  # what a prepare killed while publishing leaves
    assert retrieve(broken) == 2
    err = capsys.readouterr().err
    assert "meta.json: missing while" in err and "interrupted" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--n-train", "-3"], "argument --n-train: must be an integer >= 0 (0: all); got '-3'"),
        (["train", "--k", "0"], "argument --k: must be an integer >= 1; got '0'"),
        (["train", "--din-hidden", "8", "0"], "argument --din-hidden: must be an integer >= 1; got '0'"),
        (["train-ctr", "--epochs", "0"], "--epochs must be >= 1; got 0"),
        (["train-ctr", "--hidden", "8", "-1"], "--hidden must be >= 1; got -1"),
        (["eval", "--run", "nowhere", "--n", "-1"], "--n must be >= 0 (0: all); got -1"),
    ],
    ids=["n-train", "k", "din-hidden", "din-epochs", "hidden", "eval-n"],
)
def test_invalid_counts_are_errors_before_anything_is_written(prepared, tmp_path, capsys, argv, message):
    raw, _ = prepared
    out = tmp_path / "out"
    assert main([*argv, "--dataset", "ml-100k", "--data-dir", str(raw), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
