"""``train.context``: the Python API builds the same shared context as the commands, without a CLI module."""

import argparse
import math
from pathlib import Path

import numpy as np
import pytest

from rellax_fast.ctr.din import DINTrainConfig
from rellax_fast.ctr.store import din_fingerprint
from rellax_fast.data.ctr import prepare_ctr
from rellax_fast.data.synthetic import make_synthetic
from rellax_fast.train import pipeline
from rellax_fast.train.context import build_shared_context, shared_context
from rellax_fast.train.pipeline import PipelineConfig
from rellax_fast.train.trainer import TrainConfig

DIN_OPTS = {"embed_dim": 4, "mlp_hidden": (8,), "max_history": 5}


def small_dataset(*_args, **_kwargs):
    return make_synthetic(seed=3, n_users=40, n_items=60, n_ratings=1200)


@pytest.fixture
def fast_embeddings(monkeypatch):
    """Seeded random SUBR item embeddings: a fast stand-in for the MiniLM encoder (covered by tests/subr)."""

    def item_embeddings(data, cache_dir, progress=True):
        ids = list(data.dataset.items.index)
        return np.random.default_rng(0).standard_normal((len(ids), 12)).astype(np.float32), ids

    monkeypatch.setattr(pipeline, "item_embeddings", item_embeddings)


def test_shared_context_trains_the_din_once_and_samples_as_configured(tmp_path, fast_embeddings):
    data = prepare_ctr(small_dataset(), seed=0)
    cfg = PipelineConfig(n_train=16, n_test=12, n_valid=8, train=TrainConfig(progress=False))
    din_train = DINTrainConfig(epochs=1, progress=False)
    logs = []
    ctx = shared_context(data, tmp_path, cfg, DIN_OPTS, din_train, progress=False, log=logs.append)
    assert not logs  # nothing to reuse yet: trained silently
    for name in ("din.json", "din.safetensors", "item_ids.npy", "metrics.json"):
        assert (tmp_path / "ctr" / name).exists(), name
    assert ctx.ctr_dir == str(tmp_path / "ctr") and Path(ctx.subr_path) == tmp_path / "subr_embeddings.npz"
    assert Path(ctx.subr_path).exists()
    assert len(ctx.train_index) == 16 and len(ctx.test_index) == 12 and len(ctx.valid_index) == 8
    assert ctx.cond_train.shape == (16, ctx.din.config.h_dim) and ctx.cond_valid.shape == (
        8,
        ctx.din.config.h_dim,
    )
    p = np.asarray(ctx.din_test_probs)
    assert p.shape == (12,) and np.all((p > 0) & (p < 1))
    assert math.isfinite(ctx.din_report.test["auc"])

    again = shared_context(data, tmp_path, cfg, DIN_OPTS, din_train, progress=False, log=logs.append)
    assert len(logs) == 1 and "using the trained DIN" in logs[0]
    assert din_fingerprint(again.din, again.vocab) == din_fingerprint(ctx.din, ctx.vocab)
    np.testing.assert_array_equal(again.train_index, ctx.train_index)
    np.testing.assert_array_equal(again.test_index, ctx.test_index)

    logs.clear()
    other = shared_context(
        data, tmp_path, cfg, {**DIN_OPTS, "embed_dim": 6}, din_train, progress=False, log=logs.append
    )
    assert "options.embed_dim 4 -> 6" in logs[0] and other.din.config.embed_dim == 6


def test_build_shared_context_from_options_equals_the_api(tmp_path, fast_embeddings, monkeypatch):
    import rellax_fast.data

    monkeypatch.setattr(rellax_fast.data, "load_dataset", small_dataset)
    args = argparse.Namespace(
        dataset="synthetic",
        data_dir=None,
        out=str(tmp_path),
        seed=0,
        no_progress=True,
        din_epochs=1,
        din_patience=2,
        din_embed_dim=4,
        din_hidden=[8],
        din_max_history=5,
    )
    cfg = PipelineConfig(n_train=10, n_test=10, train=TrainConfig(progress=False))
    from_args = build_shared_context(args, cfg, log=lambda _: None)
    logs = []
    api = shared_context(
        prepare_ctr(small_dataset(), seed=0),
        tmp_path,
        cfg,
        DIN_OPTS,
        DINTrainConfig(epochs=1, patience=2, seed=0, progress=False),
        progress=False,
        log=logs.append,
    )
    assert "using the trained DIN" in logs[0]  # same data and options: the DIN the options trained
    assert din_fingerprint(api.din, api.vocab) == din_fingerprint(from_args.din, from_args.vocab)
    np.testing.assert_array_equal(api.train_index, from_args.train_index)
    np.testing.assert_allclose(api.din_test_probs, from_args.din_test_probs, rtol=1e-6, atol=1e-7)
