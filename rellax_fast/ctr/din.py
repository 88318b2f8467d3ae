"""The conventional CTR model of ReLLaX: a compact Deep Interest Network (DIN, Zhou et al., KDD 2018).

It owns the DIN module, the padded history arrays it reads, its training loop (progress bar, early
stopping on the validation split, then frozen), its evaluation and its save/load.

ReLLaX uses the frozen DIN three ways:
  * ``item_embeddings()``: the item-embedding table, the input of the SPA projector;
  * ``features(...)["h"]``: the pre-logit vector h, the per-sample conditioning of CFLoRA;
  * its own AUC / LogLoss: the conventional baseline ("DIN alone") in the ablation table.

Why not a library DIN: torch-rechub 0.9 (``models.ranking.DIN``) and deepctr-torch 0.3 (``models.DIN``)
both return only ``sigmoid(logit)``; the pre-logit vector sits inside their final MLP and can only be
reached with forward hooks, neither masks padded history positions inside the attention pooling in a way
we can feed from packed offsets, neither has rating-aware behaviour embeddings, and both drive training
through their own feature-column dictionaries and ``fit`` loops. The model below is ~60 lines, reads the
packed (offsets, items, ratings) history directly, and exposes h and the item table as plain tensors.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .._io import atomic_write_bytes, atomic_write_text

N_RATING_BUCKETS = 22  # ratings are bucketed as round(2 * rating) in 0..20 (+1 shift, 0 = padding)


class NonFiniteLossError(ValueError):
    """Training diverged: a step's loss is NaN or infinite (names the step and the learning rate). Raised by
    :func:`train_din` and by the ReLLaX trainer (``train.trainer``), before the step is applied."""


class SingleClassSplitError(ValueError):
    """A split DIN learns or early-stops on holds one label only: its AUC is undefined, no epoch can be chosen."""


@dataclass
class DINConfig:
    n_items: int
    n_users: int = 0  # 0: no user-id embedding
    embed_dim: int = 32
    attention_hidden: int = 36
    mlp_hidden: Sequence[int] = (128, 64)  # the last width is the size of h
    dropout: float = 0.1
    max_history: int = 50

    @property
    def h_dim(self) -> int:
        return int(self.mlp_hidden[-1])


@dataclass
class DINTrainConfig:
    epochs: int = 12
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 1e-6
    patience: int = 2  # early stopping on validation AUC
    seed: int = 0
    progress: bool = True
    # which embedding tables get sparse gradients stepped by SparseAdam (only the rows a batch touches):
    # "auto" those with more than SPARSE_ROWS_PER_LOOKUP rows per lookup of a step, "all", "none" (_optimizers)
    sparse_embeddings: str = "auto"
    # "no": float32; "bf16": bf16 autocast; "fast": bf16 where the CPU computes bf16 natively
    # (ops._backend.cpu_has_native_bf16), else float32. Training only: prediction and the saved weights are
    # float32. Default "no": at DIN's sizes (dim 32, hidden 36) bf16 autocast was 5% slower per CPU-second on
    # an AVX512-BF16 CPU (the casts cost more than the small matmuls save; issue #28's measurement).
    mixed_precision: str = "no"


@dataclass
class DINReport:
    best_epoch: int
    history: List[Dict[str, float]] = field(default_factory=list)
    valid: Dict[str, float] = field(default_factory=dict)
    test: Dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ inputs


def _packed_refs(offsets, user_index, pos, max_len: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, user_index, pos) as int64 arrays, checked: 1-D references of equal length, max_len >= 1."""
    offsets = np.asarray(offsets, dtype=np.int64)
    user_index = np.asarray(user_index, dtype=np.int64)
    pos = np.asarray(pos, dtype=np.int64)
    if user_index.shape != pos.shape or user_index.ndim != 1:
        raise ValueError(
            f"user_index and pos must be 1-D of equal length, got {user_index.shape} and {pos.shape}"
        )
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return offsets, user_index, pos


def history_arrays(
    offsets: np.ndarray,
    seq_items: np.ndarray,
    seq_ratings: np.ndarray,
    user_index: np.ndarray,
    pos: np.ndarray,
    max_len: int,
) -> Tuple[np.ndarray, np.ndarray]:
    """The last ``max_len`` behaviours before each sample's target, right-aligned (most recent last).

    ``seq_items`` must already hold item *indices* (0..n_items-1). Returns (items, ratings) of shape
    (S, max_len): items are index+1 with 0 for padding; ratings are float with 0 at padding.
    """
    offsets, user_index, pos = _packed_refs(offsets, user_index, pos, max_len)
    start = offsets[user_index]
    end = start + pos
    if np.any(end > offsets[user_index + 1]):
        raise ValueError("pos runs past the end of a user's sequence")
    idx = end[:, None] - max_len + np.arange(max_len)[None, :]
    valid = idx >= start[:, None]
    idx = np.where(valid, idx, 0)
    items = np.where(valid, np.asarray(seq_items, dtype=np.int64)[idx] + 1, 0)
    ratings = np.where(valid, np.asarray(seq_ratings, dtype=np.float32)[idx], 0.0).astype(np.float32)
    return items, ratings


@dataclass
class CTRArrays:
    """Everything DIN reads for one split, as tensors (item/user indices are 0-based here)."""

    hist_items: torch.Tensor  # (S, L) int64, index+1, 0 = pad
    hist_ratings: torch.Tensor  # (S, L) float32
    target: torch.Tensor  # (S,) int64 item index
    user: torch.Tensor  # (S,) int64 user index
    label: torch.Tensor  # (S,) float32 in {0, 1}

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def batch(self, idx: torch.Tensor) -> CTRArrays:
        return CTRArrays(
            self.hist_items[idx], self.hist_ratings[idx], self.target[idx], self.user[idx], self.label[idx]
        )


class PackedCTRArrays:
    """One split's DIN inputs kept in the packed form: the shared per-user sequences (offsets, item indices,
    ratings) plus per-sample (user index, position, target, label). Memory is linear in the ratings plus the
    samples; :meth:`batch` gathers the last ``max_len`` behaviours of just the batch's samples (vectorised,
    (B, max_len) indices), so no (S, max_len) history matrix is ever built for the split. Duck-types
    :class:`CTRArrays` for :func:`train_din` and :func:`predict` (``len``, ``batch``, ``target``, ``user``,
    ``label``); ``user`` may be replaced (``eval`` maps JSONL users to sequence rows)."""

    def __init__(self, offsets, seq_items, seq_ratings, user_index, pos, target_item, label, max_len: int):
        offsets, user_index, pos = _packed_refs(offsets, user_index, pos, max_len)
        if len(user_index) and (user_index.min() < 0 or user_index.max() >= len(offsets) - 1):
            raise ValueError(
                f"user_index must lie in [0, {len(offsets) - 1}), got values in "
                f"[{user_index.min()}, {user_index.max()}]"
            )
        start = offsets[user_index]
        if np.any(pos < 0) or np.any(start + pos > offsets[user_index + 1]):
            raise ValueError("pos runs past the end of a user's sequence")
        self.max_len = int(max_len)
        # item indices and ratings, shared (not copied) with the caller's int64 / float32 arrays; those may be
        # read-only (parquet-backed): this class never writes to them, so torch's warning about it is noise
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.seq_items = torch.from_numpy(np.ascontiguousarray(seq_items, dtype=np.int64))
            self.seq_ratings = torch.from_numpy(np.ascontiguousarray(seq_ratings, dtype=np.float32))
        self.start = torch.from_numpy(start)
        self.pos = torch.from_numpy(pos)
        self.target = torch.from_numpy(np.array(target_item, dtype=np.int64))
        self.user = torch.from_numpy(user_index.copy())
        self.label = torch.from_numpy(np.array(label, dtype=np.float32))

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def batch(self, idx) -> CTRArrays:
        idx = torch.as_tensor(idx, dtype=torch.int64)
        start, end = self.start[idx], self.start[idx] + self.pos[idx]
        flat = (
            end[:, None] - self.max_len + torch.arange(self.max_len)[None, :]
        )  # (B, max_len), right-aligned
        valid = flat >= start[:, None]
        flat = torch.where(valid, flat, 0)
        items = torch.where(valid, self.seq_items[flat] + 1, 0)  # index + 1, 0 = padding
        ratings = torch.where(valid, self.seq_ratings[flat], 0.0)
        return CTRArrays(items, ratings, self.target[idx], self.user[idx], self.label[idx])


def make_arrays(
    offsets, seq_items, seq_ratings, user_index, pos, target_item, label, max_len: int
) -> CTRArrays:
    """The padded (S, max_len) inputs of a whole split at once; :class:`PackedCTRArrays` is the linear-memory
    form used by training and prediction."""
    items, ratings = history_arrays(offsets, seq_items, seq_ratings, user_index, pos, max_len)
    return CTRArrays(
        hist_items=torch.from_numpy(items),
        hist_ratings=torch.from_numpy(ratings),
        target=torch.from_numpy(np.array(target_item, dtype=np.int64)),
        user=torch.from_numpy(np.array(user_index, dtype=np.int64)),
        label=torch.from_numpy(np.array(label, dtype=np.float32)),
    )


# ------------------------------------------------------------------------------------------- model


class ActivationUnit(nn.Module):
    """DIN's target attention: score(t, h) = MLP([t, h, t - h, t * h]), un-normalised, padding masked.

    The first Linear is computed split (issue #28), never on the concatenation: with its weight cut into the
    four (hidden, dim) blocks W = [W_t | W_h | W_d | W_p] acting on t, h, t - h and t * h,

        [t, h, t - h, t * h] W^T = t (W_t + W_d)^T + h (W_h - W_d)^T + (t * h) W_p^T
                                 = t (W_t + W_d)^T + h M_b,   M_b = (W_h - W_d)^T + diag(t_b) W_p^T  (dim, hidden)

    so the target's term is computed once per sample instead of once per history position, no (B, L, 4 dim)
    concatenation is built, and each position costs one dim x hidden product instead of 4 dim x hidden (one
    batched matmul against the per-sample M_b). The parameters stay those of ``mlp`` (checkpoints unchanged);
    the formula is the same (tests/ctr/test_din.py checks it against the concatenated form in float64)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(4 * dim, hidden), nn.PReLU(), nn.Linear(hidden, 1))

    def forward(self, history: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        first, activation, last = self.mlp
        w_t, w_h, w_d, w_p = first.weight.split(self.dim, dim=1)  # each (hidden, dim)
        target_term = nn.functional.linear(target, w_t + w_d, first.bias)  # (B, hidden)
        per_sample = (w_h - w_d).t().unsqueeze(0) + target.unsqueeze(2) * w_p.t().unsqueeze(
            0
        )  # (B, dim, hidden)
        pre = torch.baddbmm(target_term.unsqueeze(1), history, per_sample)  # (B, L, hidden)
        w = last(activation(pre)).squeeze(-1)  # (B, L)
        w = w * mask
        return torch.einsum("bl,bld->bd", w, history)


def mlp_head(in_dim: int, config: DINConfig) -> Tuple[nn.Sequential, nn.Linear]:
    """DIN's prediction MLP (Linear, PReLU, Dropout per ``config.mlp_hidden`` width) over ``in_dim`` inputs, and
    its output layer; shared with the text-aware DIN (``ctr/text_din.py``)."""
    layers: List[nn.Module] = []
    for width in config.mlp_hidden:
        layers += [nn.Linear(in_dim, width), nn.PReLU(width), nn.Dropout(config.dropout)]
        in_dim = width
    return nn.Sequential(*layers), nn.Linear(in_dim, 1)


class DIN(nn.Module):
    """Item + rating-aware behaviour embeddings, target attention, MLP -> h -> logit."""

    def __init__(self, config: DINConfig):
        super().__init__()
        self.config = config
        e = config.embed_dim
        self.item_embedding = nn.Embedding(config.n_items + 1, e, padding_idx=0)
        self.rating_embedding = nn.Embedding(N_RATING_BUCKETS, e, padding_idx=0)
        self.user_embedding = nn.Embedding(config.n_users, e) if config.n_users > 0 else None
        self.attention = ActivationUnit(e, config.attention_hidden)
        in_dim = e * (4 if self.user_embedding is not None else 3)
        self.mlp, self.out = mlp_head(in_dim, config)
        nn.init.normal_(self.item_embedding.weight, std=0.05)
        nn.init.normal_(self.rating_embedding.weight, std=0.05)
        if self.user_embedding is not None:
            nn.init.normal_(self.user_embedding.weight, std=0.05)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
            self.rating_embedding.weight[0].zero_()

    @staticmethod
    def rating_bucket(ratings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, (ratings * 2).round().long().clamp(0, N_RATING_BUCKETS - 2) + 1, 0)

    def hidden(self, batch: CTRArrays) -> torch.Tensor:
        """The pre-logit vector h, shape (B, h_dim)."""
        mask = batch.hist_items > 0
        hist = self.item_embedding(batch.hist_items) + self.rating_embedding(
            self.rating_bucket(batch.hist_ratings, mask)
        )
        target = self.item_embedding(batch.target + 1)
        pooled = self.attention(hist, target, mask.to(hist.dtype))
        parts = [pooled, target, pooled * target]
        if self.user_embedding is not None:
            parts.append(self.user_embedding(batch.user.clamp(0, self.config.n_users - 1)))
        return self.mlp(torch.cat(parts, dim=-1))

    def forward(self, batch: CTRArrays) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns (logit (B,), h (B, h_dim))."""
        h = self.hidden(batch)
        return self.out(h).squeeze(-1), h

    def item_embeddings(self) -> torch.Tensor:
        """The item table (n_items, embed_dim), row i = item index i (padding row dropped)."""
        return self.item_embedding.weight[1:].detach()


# ---------------------------------------------------------------------------------------- training


@torch.no_grad()
def predict(model: DIN, data: CTRArrays, batch_size: int = 4096, with_h: bool = False):
    """Returns p(click) (S,) and, if asked, h (S, h_dim), in eval mode."""
    was_training = model.training
    model.eval()
    probs, hs = [], []
    for start in range(0, len(data), batch_size):
        b = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        logit, h = model(b)
        probs.append(torch.sigmoid(logit))
        if with_h:
            hs.append(h)
    model.train(was_training)
    p = torch.cat(probs) if probs else torch.zeros(0)
    if with_h:
        return p, (torch.cat(hs) if hs else torch.zeros(0, model.config.h_dim))
    return p


def train_din(
    config: DINConfig,
    train: CTRArrays,
    valid: CTRArrays,
    test: Optional[CTRArrays] = None,
    train_config: Optional[DINTrainConfig] = None,
    build: Callable[[DINConfig], DIN] = DIN,
) -> Tuple[DIN, DINReport]:
    """Train DIN on the whole training split with early stopping on validation AUC; return it frozen. ``build``
    makes the model from ``config`` after seeding (a DIN subclass such as ``ctr.text_din.TextDIN``)."""
    from ..metrics import ctr_metrics

    tc = train_config or DINTrainConfig()
    _check_train_splits(train, valid)
    autocast = _autocast(tc.mixed_precision)
    gen = torch.Generator().manual_seed(tc.seed)
    torch.manual_seed(tc.seed)
    model = build(config)
    step_optimizers = _optimizers(model, tc)
    best_auc, best_state, best_epoch, bad = -math.inf, None, -1, 0
    report = DINReport(best_epoch=-1)
    for epoch in range(tc.epochs):
        order = torch.randperm(len(train), generator=gen)
        mean_loss = _train_epoch(model, train, order, tc, epoch, autocast, step_optimizers)
        val = _validate(model, valid, tc, epoch)
        report.history.append(
            {"epoch": epoch + 1, "train_loss": mean_loss, **{f"valid_{k}": v for k, v in val.items()}}
        )
        if tc.progress:
            print(
                f"DIN epoch {epoch + 1}: train loss {mean_loss:.4f}  valid AUC {val['auc']:.4f}  LogLoss {val['logloss']:.4f}"
            )
        if val["auc"] > best_auc + 1e-5:
            best_auc, best_state, best_epoch, bad = (
                val["auc"],
                copy.deepcopy(model.state_dict()),
                epoch + 1,
                0,
            )
        else:
            bad += 1
            if bad >= tc.patience:
                if tc.progress:
                    print(
                        f"DIN: early stopping after epoch {epoch + 1} of {tc.epochs} (no valid-AUC gain for {tc.patience} "
                        f"epoch(s)); keeping epoch {best_epoch} (valid AUC {best_auc:.4f})"
                    )
                break
    model.load_state_dict(best_state)
    freeze(model)
    report.best_epoch = best_epoch
    report.valid = ctr_metrics(valid.label.numpy(), predict(model, valid).numpy())
    if test is not None and len(test):
        report.test = ctr_metrics(test.label.numpy(), predict(model, test).numpy())
    return model, report


def _check_train_splits(train: CTRArrays, valid: CTRArrays) -> None:
    """Both splits non-empty (ValueError) and holding both labels (:class:`SingleClassSplitError`)."""
    if len(train) == 0 or len(valid) == 0:
        raise ValueError(
            f"DIN needs non-empty train and valid splits, got {len(train)} and {len(valid)} samples"
        )
    for name, split in (("train", train), ("valid", valid)):
        classes = np.unique(split.label.numpy())
        if len(classes) < 2:
            raise SingleClassSplitError(
                f"the {name} split holds only label {int(classes[0])} ({len(split)} samples): "
                + (
                    "DIN cannot learn to tell clicks from non-clicks"
                    if name == "train"
                    else "its AUC is undefined, so early stopping cannot choose an epoch"
                )
                + "; the data need both positive and negative ratings (check the dataset and its label rule)"
            )


def _train_epoch(
    model: DIN, train: CTRArrays, order, tc: DINTrainConfig, epoch: int, autocast, step_optimizers
):
    """One pass over ``train`` in ``order``; returns the mean training loss. A non-finite loss raises
    :class:`NonFiniteLossError` before its step is applied."""
    from tqdm.auto import tqdm

    model.train()
    loss_fn = nn.BCEWithLogitsLoss()
    steps = math.ceil(len(train) / tc.batch_size)
    total = 0.0
    bar = tqdm(range(steps), desc=f"DIN epoch {epoch + 1}/{tc.epochs}", disable=not tc.progress, leave=False)
    for step in bar:
        b = train.batch(order[step * tc.batch_size : (step + 1) * tc.batch_size])
        with autocast:
            logit, _ = model(b)
        loss = loss_fn(logit.float(), b.label)
        if not math.isfinite(float(loss.detach())):  # before the step is applied
            raise NonFiniteLossError(
                f"DIN training diverged: the loss is {float(loss.detach())} at epoch {epoch + 1}, step {step + 1} "
                f"with --lr {tc.lr}; lower --lr"
            )
        model.zero_grad(set_to_none=True)
        loss.backward()
        step_optimizers()
        total += float(loss.detach()) * len(b)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    bar.close()
    return total / len(train)


def _validate(model: DIN, valid: CTRArrays, tc: DINTrainConfig, epoch: int) -> dict:
    """The valid split's metrics after ``epoch``; non-finite probabilities raise :class:`NonFiniteLossError`."""
    from ..metrics import ctr_metrics

    valid_probs = predict(model, valid).numpy()
    if not np.isfinite(valid_probs).all():
        raise NonFiniteLossError(
            f"DIN training diverged: its valid probabilities are not finite after epoch "
            f"{epoch + 1} with --lr {tc.lr}; lower --lr"
        )
    return ctr_metrics(valid.label.numpy(), valid_probs)


def training_precision(mixed_precision: str) -> str:
    """ "bf16" or "fp32": what the training forward computes in for a ``DINTrainConfig.mixed_precision`` value."""
    from ..ops._backend import cpu_has_native_bf16

    if mixed_precision not in ("fast", "bf16", "no"):
        raise ValueError(f"mixed_precision: expected 'fast', 'bf16' or 'no', got {mixed_precision!r}")
    bf16 = mixed_precision == "bf16" or (mixed_precision == "fast" and cpu_has_native_bf16())
    return "bf16" if bf16 else "fp32"


def _autocast(mixed_precision: str):
    """The training forward's autocast context for a ``DINTrainConfig.mixed_precision`` value."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=training_precision(mixed_precision) == "bf16")


def matmul_flops_per_sample(config: DINConfig, history: Optional[int] = None) -> int:
    """The matmul FLOPs (2 per multiply-add) of one sample's forward: the attention unit as computed (the
    target term, then per position one dim x hidden product and the score), the pooling and the MLP, at
    ``history`` positions (default: ``max_history``, the padded width every batch computes); elementwise work
    is not counted (torch's FlopCounterMode counts the same, tests/ctr/test_din.py). A training step costs
    about 3x this (the backward computes two products per forward one)."""
    e, hidden, positions = (
        config.embed_dim,
        config.attention_hidden,
        config.max_history if history is None else history,
    )
    attention = 2 * e * hidden + positions * (2 * e * hidden + 2 * hidden + 2 * e)
    widths = [e * (4 if config.n_users > 0 else 3), *config.mlp_hidden, 1]
    return int(attention + sum(2 * a * b for a, b in zip(widths[:-1], widths[1:])))


def _embeddings(model: DIN) -> List[nn.Embedding]:
    return [e for e in (model.item_embedding, model.rating_embedding, model.user_embedding) if e is not None]


# "auto" gives a table sparse gradients when it has more than this many rows per lookup of a training step
SPARSE_ROWS_PER_LOOKUP = 16


def sparse_tables(model: DIN, tc: DINTrainConfig) -> List[nn.Embedding]:
    """The embedding tables :func:`train_din` steps sparsely for ``tc.sparse_embeddings``.

    A dense Adam step reads and writes every row of a table (Adam's moments move untouched rows too); a
    sparse one costs about the step's lookups (coalescing them, then the touched rows). "auto" makes a table
    sparse when it has more than SPARSE_ROWS_PER_LOOKUP rows per lookup of a step (batch for the user table,
    batch x (max_history + 1) for the items). Measured on one thread of this 2-core AVX512 machine, SparseAdam
    on every table was 12% slower than dense Adam at 1,500 users and 62k items (1.5 user and 1.2 item rows
    per lookup at batch 1,024), while at ML-25M's 162,541 users the dense step over the user table took 51 of
    161 ms per step with at most 1,024 of its rows touched (issue #28): 159 rows per lookup.
    """
    if tc.sparse_embeddings not in ("auto", "all", "none"):
        raise ValueError(f"sparse_embeddings: expected 'auto', 'all' or 'none', got {tc.sparse_embeddings!r}")
    lookups = {
        "item_embedding": tc.batch_size * (model.config.max_history + 1),
        "rating_embedding": tc.batch_size * model.config.max_history,
        "user_embedding": tc.batch_size,
    }
    tables = [(getattr(model, name), n) for name, n in lookups.items() if getattr(model, name) is not None]
    if tc.sparse_embeddings == "none":
        return []
    return [
        e for e, n in tables if tc.sparse_embeddings == "all" or e.num_embeddings > SPARSE_ROWS_PER_LOOKUP * n
    ]


def _optimizers(model: DIN, tc: DINTrainConfig):
    """The optimizer step of :func:`train_din` (a callable applied after ``backward``).

    Dense tables and every other parameter: one Adam with L2 weight decay. Sparse tables (:func:`sparse_tables`)
    produce sparse gradients (``nn.Embedding.sparse``, switched on here for training and off again by
    :func:`freeze`) and ``torch.optim.SparseAdam`` updates only the touched rows ("lazy Adam": a row's moments
    advance only when a batch uses it). SparseAdam has no weight decay, so the same L2 term is added to the
    gradient of the touched rows (what Adam's ``weight_decay`` does, restricted to them). The two differ in
    how untouched rows drift; tests/ctr/test_din.py checks equal valid AUC within a tolerance.
    """
    chosen = sparse_tables(model, tc)
    if not chosen:
        opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        return opt.step
    tables = [e.weight for e in chosen]
    for e in chosen:
        e.sparse = True
    table_ids = {id(t) for t in tables}
    dense = torch.optim.Adam(
        [p for p in model.parameters() if id(p) not in table_ids], lr=tc.lr, weight_decay=tc.weight_decay
    )
    sparse = torch.optim.SparseAdam(tables, lr=tc.lr)

    def step() -> None:
        if tc.weight_decay:
            for t in (t for t in tables if t.grad is not None):
                g = t.grad.coalesce()
                rows = g.indices()[0]
                t.grad = torch.sparse_coo_tensor(
                    g.indices(),
                    g.values() + tc.weight_decay * t.detach()[rows],
                    g.shape,
                    is_coalesced=True,
                    check_invariants=False,
                )
        dense.step()
        sparse.step()

    return step


def freeze(model: DIN) -> DIN:
    for e in _embeddings(model):
        e.sparse = (
            False  # frozen: no gradients; a caller fine-tuning it later gets dense ones (any optimizer)
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------ saving


def save_din(model: DIN, path, extra: Optional[dict] = None) -> Path:
    """Write ``din.safetensors`` + ``din.json`` into the folder ``path``, each atomically (:mod:`rellax_fast._io`)."""
    from safetensors.torch import save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"config": {**asdict(model.config), "mlp_hidden": list(model.config.mlp_hidden)}, **(extra or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # bytes through atomic_write_bytes: the umask's mode, as every other output (save_file makes the file 0600)
    atomic_write_bytes(path / "din.safetensors", save(tensors))
    atomic_write_text(path / "din.json", json.dumps(meta, indent=2))
    return path


def load_din(path) -> Tuple[DIN, dict]:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "din.json").exists() or not (path / "din.safetensors").exists():
        raise FileNotFoundError(
            f"no DIN checkpoint in {path} (expected din.json and din.safetensors; run `rellax-fast train-ctr`)"
        )
    try:
        meta = json.loads((path / "din.json").read_text(encoding="utf-8"))
        cfg = dict(meta["config"])
        cfg["mlp_hidden"] = tuple(cfg["mlp_hidden"])
        model = DIN(DINConfig(**cfg))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path / 'din.json'}: unreadable or incomplete ({type(exc).__name__}: {exc}); retrain the "
            "DIN with `rellax-fast train-ctr`"
        ) from None
    try:
        model.load_state_dict(load_file(str(path / "din.safetensors")))
    except (
        Exception
    ) as exc:  # safetensors' error (truncated file), or tensors that do not fit din.json's config
        raise ValueError(
            f"{path / 'din.safetensors'}: does not load ({type(exc).__name__}: {exc}); retrain the DIN "
            "with `rellax-fast train-ctr`"
        ) from None
    return freeze(model), meta
