"""Every variant of the bad-input corpus (tests/robustness/corpus.py), through the loader and through
`rellax-fast prepare`: a clear error naming the file and line, or exactly the clean result."""

from __future__ import annotations

import re
import warnings

import pandas as pd
import pytest
from corpus import VARIANTS, Expect, write_variant

from rellax_fast.cli import main
from rellax_fast.data import download
from rellax_fast.data.datasets import DataFormatError, DataWarning, load_dataset

ERRORS = {"DataFormatError": DataFormatError, "DatasetNotFoundError": download.DatasetNotFoundError}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    folder = write_variant("clean", tmp_path_factory.mktemp("clean") / "ml-100k")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        ds = load_dataset("ml-100k", folder, download=False)
    return ds


def _load(folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        ds = load_dataset("ml-100k", folder, download=False)
    return ds, [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_loader_on_corpus_variant(tmp_path, clean, name):
    variant = VARIANTS[name]
    folder = write_variant(name, tmp_path / "ml-100k")
    if variant.expect is Expect.error:
        with pytest.raises(ERRORS[variant.error]) as err:
            _load(folder)
        msg = str(err.value)
        assert str(folder) in msg, msg  # the message names the file (full path)
        assert re.search(variant.message, msg), msg
        return
    ds, caught = _load(folder)
    pd.testing.assert_frame_equal(ds.ratings, clean.ratings)
    pd.testing.assert_frame_equal(ds.items, clean.items)
    pd.testing.assert_frame_equal(ds.users, clean.users)
    if variant.warning:
        assert len(caught) == 1 and re.search(variant.warning, caught[0]), caught
        assert str(folder) in caught[0]
    else:
        assert caught == []


def _prepare(folder, out):
    return main(
        ["prepare", "--dataset", "ml-100k", "--data-dir", str(folder), "--out", str(out), "--no-download"]
    )


@pytest.fixture(scope="module")
def clean_prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean_prepared")
    folder = write_variant("clean", root / "ml-100k")
    assert _prepare(folder, root / "out") == 0
    return root / "out"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_prepare_on_corpus_variant(tmp_path, capsys, clean_prepared, name):
    variant = VARIANTS[name]
    folder = write_variant(name, tmp_path / "ml-100k")
    out = tmp_path / "out"
    rc = _prepare(folder, out)
    err = capsys.readouterr().err
    if variant.expect is Expect.error:
        assert rc == 2
        line = next(ln for ln in err.splitlines() if ln.startswith("error: "))
        assert str(folder) in line and re.search(variant.message, line), err
        assert "Traceback" not in err
        assert not (out / "train.parquet").exists()
        return
    assert rc == 0, err
    if variant.warning:
        assert re.search("warning: .*" + variant.warning, err), err
    for split in ("train", "valid", "test"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(out / f"{split}.parquet"), pd.read_parquet(clean_prepared / f"{split}.parquet")
        )
