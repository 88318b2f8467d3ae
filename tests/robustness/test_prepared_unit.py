"""A prepared folder is one unit (issue #13, items 2 and 7): killed, concurrent or tampered writes never load
as a mix; empty splits are errors; other files in --out are kept."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rellax_fast.data import prepared as prepared_mod
from rellax_fast.data.ctr import EmptySplitError, ctr_fingerprint, prepare_ctr
from rellax_fast.data.prepared import PreparedDataError, load_prepared, save_prepared
from rellax_fast.data.synthetic import make_synthetic


def tiny(seed):
    return prepare_ctr(make_synthetic(seed=seed, n_users=40, n_items=60, n_ratings=1000))


def assert_same(a, b):
    assert ctr_fingerprint(a) == ctr_fingerprint(b)
    for k in a.splits:
        for f in ("user_index", "pos", "user_id", "item_id", "rating", "label", "timestamp"):
            np.testing.assert_array_equal(getattr(a.splits[k], f), getattr(b.splits[k], f))


def no_temp_files(folder):
    return not [p.name for p in folder.iterdir() if ".tmp" in p.name]


def test_meta_json_carries_a_manifest_and_other_files_are_kept(tmp_path):
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "embeddings" / "keep.npy").write_bytes(b"cache")
    (tmp_path / "notes.txt").write_text("mine")
    data = tiny(0)
    save_prepared(data, tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    files = meta["manifest"]["files"]
    assert set(files) == {
        "train.parquet",
        "valid.parquet",
        "test.parquet",
        "sequences.parquet",
        "items.parquet",
        "users.parquet",
    }
    assert (
        files["train.parquet"]["rows"] == len(data.splits["train"])
        and len(files["test.parquet"]["sha256"]) == 64
    )
    assert meta["manifest"]["fingerprint"] == ctr_fingerprint(data)
    save_prepared(tiny(1), tmp_path)
    assert (tmp_path / "embeddings" / "keep.npy").read_bytes() == b"cache" and (
        tmp_path / "notes.txt"
    ).read_text() == "mine"
    assert_same(load_prepared(tmp_path), tiny(1))
    assert no_temp_files(tmp_path)


def test_failure_between_published_files_is_refused_then_a_rerun_is_clean(tmp_path, monkeypatch):
    save_prepared(tiny(0), tmp_path)
    calls = []
    real = prepared_mod._publish

    def failing(tmp, final):
        calls.append(final.name)
        if len(calls) == 2:  # train.parquet is new, the rest still old
            raise OSError("injected failure between files")
        real(tmp, final)

    monkeypatch.setattr(prepared_mod, "_publish", failing)
    with pytest.raises(OSError, match="injected"):
        save_prepared(tiny(1), tmp_path)
    assert no_temp_files(tmp_path)
    with pytest.raises(PreparedDataError, match=r"meta.json: missing while .*train.parquet.* interrupted"):
        load_prepared(tmp_path)
    monkeypatch.setattr(prepared_mod, "_publish", real)
    save_prepared(tiny(1), tmp_path)
    assert_same(load_prepared(tmp_path), tiny(1))


def test_failure_while_writing_leaves_the_previous_folder_whole(tmp_path, monkeypatch):
    save_prepared(tiny(0), tmp_path)
    real = prepared_mod._write_temp

    def failing(out, name, write):
        if name == "sequences.parquet":
            raise OSError("disk full (injected)")
        return real(out, name, write)

    monkeypatch.setattr(prepared_mod, "_write_temp", failing)
    with pytest.raises(OSError, match="injected"):
        save_prepared(tiny(1), tmp_path)
    assert no_temp_files(tmp_path)
    assert_same(load_prepared(tmp_path), tiny(0))


CHILD = r"""
import sys, time
from pathlib import Path
from rellax_fast.data import ctr, prepared
from rellax_fast.data.synthetic import make_synthetic

out, seed, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = ctr.prepare_ctr(make_synthetic(seed=seed, n_users=40, n_items=60, n_ratings=1000))
real = prepared._publish

def slow(tmp, final):
    real(tmp, final)
    if mode == "hang":
        print("published", final.name, flush=True)
        time.sleep(60)
    time.sleep(0.05)

prepared._publish = slow
print("ready", flush=True)
prepared.save_prepared(data, out)
"""


def _child(out, seed, mode):
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out), str(seed), mode], stdout=subprocess.PIPE, text=True
    )


def test_sigkill_mid_write_is_refused_then_a_rerun_is_clean(tmp_path):
    save_prepared(tiny(0), tmp_path)
    proc = _child(tmp_path, 1, "hang")
    try:
        deadline = time.time() + 60
        line = ""
        while "published" not in line and time.time() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the writer ended before it could be killed"
        assert "published train.parquet" in line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(PreparedDataError, match="interrupted"):
        load_prepared(tmp_path)
    save_prepared(tiny(2), tmp_path)  # also removes the killed writer's temp files
    assert no_temp_files(tmp_path)
    assert_same(load_prepared(tmp_path), tiny(2))


def test_two_concurrent_writers_never_interleave(tmp_path):
    procs = [_child(tmp_path, seed, "slow") for seed in (3, 4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    got = load_prepared(tmp_path)
    fingerprints = {ctr_fingerprint(tiny(s)): s for s in (3, 4)}
    assert ctr_fingerprint(got) in fingerprints  # one writer's output, whole
    assert_same(got, tiny(fingerprints[ctr_fingerprint(got)]))
    assert no_temp_files(tmp_path)


def test_a_file_swapped_in_from_another_prepare_is_refused(tmp_path):
    save_prepared(tiny(0), tmp_path / "a")
    save_prepared(tiny(1), tmp_path / "b")
    os.replace(tmp_path / "b" / "test.parquet", tmp_path / "a" / "test.parquet")
    with pytest.raises(PreparedDataError, match=r"test.parquet: does not match the manifest"):
        load_prepared(tmp_path / "a")


def test_a_folder_without_manifest_is_refused_with_the_rebuild_command(tmp_path):
    """A folder from before the manifest (format 1) cannot be verified: even one whose test.parquet is a copy of
    valid.parquet would load. It is refused, naming the command that rebuilds it (#26 item 4)."""
    save_prepared(tiny(0), tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    del meta["manifest"]
    meta.pop("format_version")
    (tmp_path / "a" / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "a" / "test.parquet").write_bytes((tmp_path / "a" / "valid.parquet").read_bytes())
    with pytest.raises(
        PreparedDataError,
        match=r"meta.json: no manifest \(format 1.*rellax-fast prepare --dataset "
        r"synthetic --out .*a$",
    ):
        load_prepared(tmp_path / "a")


def test_empty_splits_are_an_error_and_nothing_is_written(tmp_path):
    ds = make_synthetic(seed=0, n_users=40, n_items=60, n_ratings=1000)
    with pytest.raises(
        EmptySplitError, match=r"synthetic: the train/valid/test splits would be empty.*min_history=1000"
    ):
        prepare_ctr(ds, min_history=1000)
    few = ds.ratings.groupby("user_id").head(4)  # every user under 5 ratings
    from rellax_fast.data.datasets import RecDataset

    with pytest.raises(EmptySplitError, match="min-history"):
        prepare_ctr(RecDataset(ds.name, ds.domain, few, ds.items, ds.users))
    with pytest.raises(EmptySplitError):
        prepare_ctr(RecDataset(ds.name, ds.domain, ds.ratings.iloc[:0], ds.items, ds.users))


def test_cli_prepare_with_empty_splits_keeps_the_good_folder(tmp_path, capsys):
    from rellax_fast.cli import main

    assert main(["prepare", "--dataset", "synthetic", "--out", str(tmp_path)]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["prepare", "--dataset", "synthetic", "--out", str(tmp_path), "--min-history", "100000"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "would be empty" in err and "--min-history" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_prepared_files_get_the_umask_mode_like_open(tmp_path):
    old = os.umask(0o027)
    try:
        save_prepared(tiny(0), tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes and set(modes.values()) == {0o640}, modes
