"""#26 item 3: a partial `retrieve` rerun never leaves a folder that contradicts itself. With the same settings the
summary describes every split on disk; with other settings (here --k) it is refused and nothing changes."""

import json

from rellax_fast.cli import main


def retrieve(out, *extra):
    return main(["retrieve", "--dataset", "ml-100k", "--out", str(out), "--device", "cpu", *extra])


def files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_partial_rerun_with_other_settings_is_refused_and_same_settings_keep_the_summary_whole(
    tmp_path, capsys
):
    from corpus import write_clean  # ml-100k format, 8 users x 12 ratings

    raw = write_clean(tmp_path / "raw")
    out = tmp_path / "out"
    assert main(["prepare", "--dataset", "ml-100k", "--data-dir", str(raw), "--out", str(out)]) == 0
    assert retrieve(out, "--k", "5") == 0
    before = files(out / "retrieval")
    capsys.readouterr()
    assert retrieve(out, "--splits", "train", "--k", "2") == 2
    err = capsys.readouterr().err
    assert "error: --splits train: " in err and "also holds valid, test" in err and "k 5 -> 2" in err
    assert "--splits train,valid,test" in err
    assert files(out / "retrieval") == before  # nothing replaced

    assert retrieve(out, "--splits", "train", "--k", "5", "--limit", "3") == 0
    summary = json.loads((out / "retrieval" / "summary.json").read_text())
    assert set(summary["splits"]) == {"train", "valid", "test"} and summary["k"] == 5
    assert summary["splits"]["train"]["samples"] == 3 and summary["splits"]["valid"]["samples"] == 5
    assert (out / "retrieval" / "valid.npz").read_bytes() == before["valid.npz"]
    assert retrieve(out, "--k", "2") == 0  # every split: allowed, and the summary says k=2 for all
    summary = json.loads((out / "retrieval" / "summary.json").read_text())
    assert summary["k"] == 2 and set(summary["splits"]) == {"train", "valid", "test"}
