"""Glue between the prepared CTR data (``rellax_fast.data``) and DIN: the item vocabulary, the per-split
DIN inputs, fitting, and the frozen DIN's outputs (p(click) and h per sample) that ReLLaX consumes.

A saved CTR model is a folder with ``din.safetensors``, ``din.json`` (config + metrics) and
``item_ids.npy`` (row i of the item table is item id ``item_ids[i]``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .din import (
    DIN,
    CTRArrays,
    DINConfig,
    DINReport,
    DINTrainConfig,
    load_din,
    make_arrays,
    predict,
    save_din,
    train_din,
)


def item_vocab(data) -> np.ndarray:
    """Sorted item ids of the dataset (catalogue plus everything rated)."""
    ids = np.asarray(data.dataset.items.index, dtype=np.int64)
    return np.union1d(ids, np.asarray(data.sequences.items, dtype=np.int64))


def to_index(vocab: np.ndarray, ids) -> np.ndarray:
    """Map item ids to rows of the item table; raises on ids not in the vocabulary."""
    ids = np.asarray(ids, dtype=np.int64)
    idx = np.searchsorted(vocab, ids)
    idx_c = np.clip(idx, 0, len(vocab) - 1)
    bad = vocab[idx_c] != ids
    if np.any(bad):
        raise KeyError(f"{int(bad.sum())} item ids are not in the CTR model's vocabulary, e.g. {ids[bad][:5].tolist()}")
    return idx_c


def split_arrays(data, split: str, vocab: np.ndarray, max_len: int) -> CTRArrays:
    s = data.splits[split]
    seq = data.sequences
    return make_arrays(seq.offsets, to_index(vocab, seq.items), seq.ratings, s.user_index, s.pos,
                       to_index(vocab, s.item_id), s.label, max_len)  # fmt: skip


def fit_din(data, config: Optional[dict] = None, train_config: Optional[DINTrainConfig] = None) -> Tuple[DIN, DINReport, np.ndarray]:
    """Train DIN on ``data``'s train split (early stopping on valid), evaluate on test; return it frozen."""
    vocab = item_vocab(data)
    use_users = data.dataset.domain == "movie"  # book test users are unseen in train: no user embedding
    cfg = DINConfig(n_items=len(vocab), n_users=len(data.sequences) if use_users else 0, **(config or {}))
    arrays = {k: split_arrays(data, k, vocab, cfg.max_history) for k in ("train", "valid", "test")}
    model, report = train_din(cfg, arrays["train"], arrays["valid"], arrays["test"], train_config)
    return model, report, vocab


def din_outputs(model: DIN, data, vocab: np.ndarray, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(p(click) (S,), h (S, h_dim)) of the frozen DIN for every sample of ``split``."""
    return predict(model, split_arrays(data, split, vocab, model.config.max_history), with_h=True)


def save_ctr(model: DIN, vocab: np.ndarray, report: Optional[DINReport], path, extra: Optional[dict] = None) -> Path:
    path = Path(path)
    save_din(model, path, extra={"report": asdict(report) if report is not None else None, **(extra or {})})
    fd, tmp = tempfile.mkstemp(dir=path, suffix=".npy.tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, np.asarray(vocab, dtype=np.int64))
    os.replace(tmp, path / "item_ids.npy")
    return path


def load_ctr(path) -> Tuple[DIN, np.ndarray, Dict]:
    model, meta = load_din(path)
    vocab = np.load(Path(path) / "item_ids.npy")
    if len(vocab) != model.config.n_items:
        raise ValueError(f"{path}: item_ids.npy has {len(vocab)} ids but the DIN table has {model.config.n_items} rows")
    return model, vocab, meta
