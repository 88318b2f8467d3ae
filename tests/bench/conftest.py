"""Fixtures shared by the benchmark-harness tests (bench quality, bench lifelong)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer, 32-wide BERT with the offline MiniLM tokenizer, saved to a folder (512 positions: the lifelong
    bench's longest prompts)."""
    from rellax_testing import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert_bench"), max_positions=512)


@pytest.fixture
def seeded_embeddings(monkeypatch):
    """SUBR item embeddings from a seeded generator (the MiniLM encoder is covered by tests/subr)."""
    import rellax_fast.train.pipeline as pipeline

    def fake(data, cache_dir, progress=True):
        ids = list(data.dataset.items.index)
        return np.random.default_rng(0).standard_normal((len(ids), 16)).astype(np.float32), ids

    monkeypatch.setattr(pipeline, "item_embeddings", fake)
