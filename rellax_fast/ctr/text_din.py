"""A text-aware DIN: the practitioner's baseline of issue #27 (a CTR model fed the same item-text embeddings the
LLM sees), the row an LLM has to beat to be worth its cost.

:class:`TextDIN` is :class:`rellax_fast.ctr.din.DIN` with one more item feature: the frozen item-text embedding
(the SUBR encoder's, L2-normalised, a non-trainable buffer) mapped by a learned linear layer (no bias, so the
padding row stays zero) to ``embed_dim``, concatenated to the item-id embedding of the target and of every
history item, as DIN concatenates an item's feature embeddings. Target attention, the MLP and the read-out are
DIN's own pieces at twice the item width; training is DIN's (:func:`~rellax_fast.ctr.din.train_din`, early
stopping on the valid AUC) through its ``build`` hook. ReLLaX's SPA keeps the plain DIN: this model is a
baseline row only (``bench quality --rows din-text``).

:func:`fit_text_din` trains it on a prepared CTRData (optionally on a seeded subset of the train split, the
few-samples curve); :func:`train_subset_view` is that subset.
"""

from __future__ import annotations

from copy import copy
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .din import DIN, ActivationUnit, CTRArrays, DINConfig, DINReport, DINTrainConfig, mlp_head, train_din


class TextDIN(DIN):
    """DIN whose items are [id embedding, W · text embedding] (2 · embed_dim wide) for the target and the
    history. ``text``: (n_items, d_text) float, row i = item index i (zeros for items without text)."""

    def __init__(self, config: DINConfig, text: torch.Tensor):
        super().__init__(config)
        text = torch.as_tensor(text, dtype=torch.float32)
        if text.ndim != 2 or text.shape[0] != config.n_items:
            raise ValueError(
                f"text: expected shape ({config.n_items}, d_text) (one row per item of the DIN's "
                f"vocabulary), got {tuple(text.shape)}"
            )
        if not torch.isfinite(text).all():
            raise ValueError(f"text: {int((~torch.isfinite(text)).sum())} non-finite values")
        e = config.embed_dim
        # row 0 is padding (item indices are shifted by one, as in item_embedding)
        self.register_buffer(
            "text", torch.cat([text.new_zeros(1, text.shape[1]), nn.functional.normalize(text, dim=1)])
        )
        self.text_projection = nn.Linear(text.shape[1], e, bias=False)
        self.attention = ActivationUnit(2 * e, config.attention_hidden)
        in_dim = 2 * e * 3 + (e if self.user_embedding is not None else 0)
        self.mlp, self.out = mlp_head(in_dim, config)

    def projected_text(self, shifted_items: torch.Tensor) -> torch.Tensor:
        """W · text embedding of item indices + 1 (0 = padding, giving zeros), in the id embedding's dtype."""
        return self.text_projection(self.text[shifted_items]).to(self.item_embedding.weight.dtype)

    def hidden(self, batch: CTRArrays) -> torch.Tensor:
        """The pre-logit vector h, shape (B, h_dim)."""
        mask = batch.hist_items > 0
        behaviour = self.item_embedding(batch.hist_items) + self.rating_embedding(
            self.rating_bucket(batch.hist_ratings, mask)
        )
        hist = torch.cat([behaviour, self.projected_text(batch.hist_items)], dim=-1)
        shifted = batch.target + 1
        target = torch.cat([self.item_embedding(shifted), self.projected_text(shifted)], dim=-1)
        pooled = self.attention(hist, target, mask.to(hist.dtype))
        parts = [pooled, target, pooled * target]
        if self.user_embedding is not None:
            parts.append(self.user_embedding(batch.user.clamp(0, self.config.n_users - 1)))
        return self.mlp(torch.cat(parts, dim=-1))


def item_text_table(vocab: np.ndarray, item_emb: np.ndarray, item_ids: Sequence[int]) -> torch.Tensor:
    """(len(vocab), d) float32: row i is the text embedding of item id ``vocab[i]``; zeros for ids without one."""
    emb = np.asarray(item_emb, dtype=np.float32)
    ids = np.asarray(item_ids, dtype=np.int64)
    if emb.ndim != 2 or emb.shape[0] != ids.size:
        raise ValueError(f"item_emb: expected shape ({ids.size}, d) (one row per item id), got {emb.shape}")
    table = np.zeros((len(vocab), emb.shape[1]), np.float32)
    order = np.argsort(ids)
    where = np.clip(np.searchsorted(ids[order], vocab), 0, max(ids.size - 1, 0))
    found = ids[order][where] == vocab if ids.size else np.zeros(len(vocab), bool)
    table[found] = emb[order][where[found]]
    return torch.from_numpy(table)


def train_subset_view(data, n: int, seed: int):
    """A shallow view of ``data`` whose train split is a seeded subset of ``n`` samples (``n`` <= 0 or >= the
    split's size: the whole split); the other splits and the sequences are shared. The same (n, seed) always
    gives the same samples."""
    train = data.splits["train"]
    if n < 0:
        raise ValueError(f"n: expected a number of train samples >= 0 (0: all), got {n}")
    if n == 0 or n >= len(train):
        return data
    index = np.sort(np.random.default_rng(seed).choice(len(train), size=n, replace=False))
    view = copy(data)
    view.splits = {**data.splits, "train": train.subset(index)}
    return view


def fit_text_din(
    data,
    item_emb,
    item_ids,
    config: Optional[dict] = None,
    train_config: Optional[DINTrainConfig] = None,
) -> Tuple[TextDIN, DINReport, np.ndarray]:
    """Train a :class:`TextDIN` on ``data``'s train split (early stopping on valid), evaluate on test; return it
    frozen with its report and item vocabulary. ``item_emb``/``item_ids``: the SUBR item embeddings (frozen)."""
    from rellax_fast.data.domains import get_domain

    from .store import item_vocab, split_arrays

    vocab = item_vocab(data)
    use_users = get_domain(data.dataset.domain).timed  # as fit_din: an untimed domain's test users are unseen
    cfg = DINConfig(n_items=len(vocab), n_users=len(data.sequences) if use_users else 0, **(config or {}))
    text = item_text_table(vocab, item_emb, item_ids)
    arrays = {k: split_arrays(data, k, vocab, cfg.max_history) for k in ("train", "valid", "test")}
    model, report = train_din(
        cfg, arrays["train"], arrays["valid"], arrays["test"], train_config, build=lambda c: TextDIN(c, text)
    )
    return model, report, vocab
