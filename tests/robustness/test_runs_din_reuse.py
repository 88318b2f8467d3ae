"""The DIN in <out>/ctr is reused only for the same data and options (issue #13, item 4)."""

import json

import numpy as np
import pytest

from rellax_fast.ctr.din import DINTrainConfig
from rellax_fast.ctr.store import din_fingerprint, fit_din, load_ctr, save_ctr, train_or_load_ctr
from rellax_fast.data.ctr import prepare_ctr
from rellax_fast.data.synthetic import make_synthetic

OPTS = {"embed_dim": 4, "mlp_hidden": (8,), "max_history": 5, "attention_hidden": 4}


def data(seed=0):
    return prepare_ctr(make_synthetic(seed=seed, n_users=40, n_items=60, n_ratings=1200))


def cfg(**kw):
    return DINTrainConfig(epochs=1, progress=False, **kw)


@pytest.fixture
def trained(tmp_path):
    d = data()
    model, vocab, report = train_or_load_ctr(d, tmp_path / "ctr", OPTS, cfg(), log=lambda *_: None)
    return d, din_fingerprint(model, vocab)


def test_same_data_and_options_reuse_the_din(tmp_path, trained):
    d, fp = trained
    logs = []
    model, vocab, _ = train_or_load_ctr(d, tmp_path / "ctr", dict(OPTS), cfg(), log=logs.append)
    assert "using the trained DIN" in logs[0] and din_fingerprint(model, vocab) == fp
    # defaults spelled out or left out are the same options
    meta = json.loads((tmp_path / "ctr" / "din.json").read_text())
    assert meta["reuse_key"]["options"]["dropout"] == 0.1 and meta["reuse_key"]["train"]["batch_size"] == 1024


@pytest.mark.parametrize(
    "change, expect",
    [
        (dict(opts={**OPTS, "embed_dim": 6}), "options.embed_dim 4 -> 6"),
        (dict(opts={**OPTS, "mlp_hidden": (8, 6)}), "options.mlp_hidden [8] -> [8, 6]"),
        (dict(train=cfg(lr=1e-2)), "train.lr 0.002 -> 0.01"),
        (dict(train=cfg(seed=1)), "train.seed 0 -> 1"),
        (dict(data=data(seed=1)), "data_fingerprint"),  # same dataset name, other content
    ],
    ids=["embed-dim", "hidden", "lr", "seed", "data"],
)
def test_other_data_or_options_retrain_and_say_why(tmp_path, trained, change, expect):
    d, fp = trained
    logs = []
    model, vocab, _ = train_or_load_ctr(
        change.get("data", d),
        tmp_path / "ctr",
        change.get("opts", OPTS),
        change.get("train", cfg()),
        log=logs.append,
    )
    assert logs and logs[0].startswith("retraining the DIN") and expect in logs[0], logs
    assert din_fingerprint(model, vocab) != fp
    if "opts" in change:
        assert model.config.embed_dim == change["opts"]["embed_dim"]
    # the retrained DIN is what the folder now holds, and it is reused next time
    again = []
    model2, vocab2, _ = train_or_load_ctr(
        change.get("data", d),
        tmp_path / "ctr",
        change.get("opts", OPTS),
        change.get("train", cfg()),
        log=again.append,
    )
    assert "using the trained DIN" in again[0] and din_fingerprint(model2, vocab2) == din_fingerprint(
        model, vocab
    )


def test_a_mixed_ctr_folder_is_refused_and_retrained(tmp_path, trained):
    d, fp = trained
    other, _, vocab = fit_din(d, OPTS, cfg(seed=5))
    save_ctr(other, vocab, None, tmp_path / "other")
    (tmp_path / "other" / "din.safetensors").replace(tmp_path / "ctr" / "din.safetensors")
    with pytest.raises(ValueError, match=r"din.safetensors: weights do not match the hash in .*din.json"):
        load_ctr(tmp_path / "ctr")
    logs = []
    train_or_load_ctr(d, tmp_path / "ctr", OPTS, cfg(), log=logs.append)
    assert "retraining the DIN" in logs[0] and "does not load" in logs[0]
    model, vocab, _ = load_ctr(tmp_path / "ctr")
    assert din_fingerprint(model, vocab) == fp  # same data and options: the same DIN again


def test_older_din_without_a_reuse_key_is_retrained(tmp_path, trained):
    d, _ = trained
    meta = json.loads((tmp_path / "ctr" / "din.json").read_text())
    del meta["reuse_key"]
    (tmp_path / "ctr" / "din.json").write_text(json.dumps(meta))
    logs = []
    train_or_load_ctr(d, tmp_path / "ctr", OPTS, cfg(), log=logs.append)
    assert "records no data fingerprint" in logs[0]


def test_cli_train_ctr_with_a_new_embed_dim_retrains(tmp_path, capsys):
    from corpus import write_clean  # a tiny dataset in ml-100k's format (8 users x 12 ratings)

    from rellax_fast.cli import main

    raw = write_clean(tmp_path / "raw")
    common = [
        "train-ctr",
        "--dataset",
        "ml-100k",
        "--data-dir",
        str(raw),
        "--out",
        str(tmp_path / "out"),
        "--epochs",
        "1",
        "--hidden",
        "8",
        "--max-history",
        "5",
        "--batch-size",
        "16",
        "--no-progress",
    ]
    assert main(common + ["--embed-dim", "4"]) == 0
    assert main(common + ["--embed-dim", "4"]) == 0
    assert "using the trained DIN" in capsys.readouterr().out
    assert main(common + ["--embed-dim", "6"]) == 0
    out = capsys.readouterr().out
    assert (
        "retraining the DIN" in out
        and "options.embed_dim 4 -> 6" in out
        and "using the trained DIN" not in out
    )
    model, vocab, _ = load_ctr(tmp_path / "out" / "ctr")
    assert model.config.embed_dim == 6 and np.all(np.diff(vocab) > 0)
