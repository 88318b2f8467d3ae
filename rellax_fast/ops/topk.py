"""``semantic_topk``: per-sample causal top-k retrieval over packed, variable-length user histories (SUBR).

Contract (DESIGN.md): sample ``s`` belongs to user ``u = sample_user[s]`` and targets position
``p = sample_pos[s]``; its target item is ``seq_items[seq_offsets[u] + p]`` and its candidates are that
user's positions ``0 .. p-1``. The score of a candidate is the cosine (or the dot product) between the
target item's embedding and the candidate item's embedding. Outputs ``pos`` (S, k) int64 and ``score``
(S, k) float32, rows sorted by score descending, ties to the larger position (the more recent behaviour),
padded with ``pos=-1``/``score=-inf`` when a sample has fewer than ``k`` candidates.

Zero vectors under ``metric="cosine"``: rows are normalised as ``x / max(||x||, 1e-12)`` (the
:func:`torch.nn.functional.normalize` rule), so an all-zero embedding has cosine 0 with everything. Every
backend follows this rule.

This module owns the argument validation (done once here, for every backend), the float64-capable
PyTorch oracle :func:`semantic_topk_ref`, the torch.library fake registration of the C++/CUDA op, and the
backend routing. Backends: ``reference`` (this file), ``cpp`` (csrc/topk.cpp), ``cuda``
(csrc/topk_cuda.cu), ``triton`` (kernels/topk.py).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _backend
from ._registry import ext_op

OP = "semantic_topk"
_backend.register_op(OP, {"cpu": ["cpp", "reference"], "cuda": ["triton", "cuda", "reference"]},
                     implemented=("reference", "cpp", "cuda", "triton"))

METRICS = ("cosine", "dot")
NORM_EPS = 1e-12  # zero-norm rule shared by all backends: x / max(||x||, NORM_EPS)
_INDEX_ARGS = ("seq_items", "seq_offsets", "sample_user", "sample_pos")


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def validate_topk_args(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, metric) -> None:
    """Raise a clear TypeError/ValueError naming the bad argument (shared by every backend)."""
    tensors = dict(item_emb=item_emb, seq_items=seq_items, seq_offsets=seq_offsets,
                   sample_user=sample_user, sample_pos=sample_pos)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"semantic_topk: {name} must be a torch.Tensor; got {type(t).__name__}")
    if metric not in METRICS:
        raise ValueError(f"semantic_topk: metric must be one of {METRICS}; got {metric!r}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"semantic_topk: k must be an int; got {type(k).__name__} {k!r}")
    if k < 0:
        raise ValueError(f"semantic_topk: k must be >= 0; got {k}")

    if item_emb.dim() != 2:
        raise ValueError(f"semantic_topk: item_emb must be 2-D (N_items, d); got {_describe(item_emb)}")
    if item_emb.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(
            f"semantic_topk: item_emb must be float32, float64, float16 or bfloat16; got {_describe(item_emb)}")
    for name in _INDEX_ARGS:
        t = tensors[name]
        if t.dim() != 1:
            raise ValueError(f"semantic_topk: {name} must be 1-D; got {_describe(t)}")
        if t.dtype != torch.int64:
            raise TypeError(f"semantic_topk: {name} must be int64; got {_describe(t)}")
    device = item_emb.device
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(
                f"semantic_topk: all tensors must be on one device; item_emb is on {device}, {name} is on {t.device}")
    if sample_user.shape[0] != sample_pos.shape[0]:
        raise ValueError(
            "semantic_topk: sample_user and sample_pos must have the same length S; "
            f"got {sample_user.shape[0]} and {sample_pos.shape[0]}")

    n_items, total = item_emb.shape[0], seq_items.shape[0]
    if item_emb.numel() and not bool(torch.isfinite(item_emb).all()):
        bad = int((~torch.isfinite(item_emb)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"semantic_topk: item_emb must be finite; row {bad} holds NaN or inf")
    if seq_offsets.shape[0] < 1:
        raise ValueError("semantic_topk: seq_offsets must have U+1 >= 1 entries, starting at 0; got an empty tensor")
    if int(seq_offsets[0]) != 0:
        raise ValueError(f"semantic_topk: seq_offsets must start at 0; got seq_offsets[0] = {int(seq_offsets[0])}")
    lengths = seq_offsets[1:] - seq_offsets[:-1]
    if lengths.numel() and bool((lengths < 0).any()):
        i = int((lengths < 0).nonzero()[0, 0])
        raise ValueError(
            f"semantic_topk: seq_offsets must be non-decreasing; seq_offsets[{i + 1}] = {int(seq_offsets[i + 1])} "
            f"< seq_offsets[{i}] = {int(seq_offsets[i])}")
    if int(seq_offsets[-1]) > total:
        raise ValueError(
            f"semantic_topk: seq_offsets overruns seq_items: seq_offsets[-1] = {int(seq_offsets[-1])} "
            f"> len(seq_items) = {total}")
    if total and (int(seq_items.min()) < 0 or int(seq_items.max()) >= n_items):
        bad = int(((seq_items < 0) | (seq_items >= n_items)).nonzero()[0, 0])
        raise ValueError(
            f"semantic_topk: seq_items holds item ids in [0, {n_items}) (rows of item_emb); "
            f"seq_items[{bad}] = {int(seq_items[bad])}")
    n_users = seq_offsets.shape[0] - 1
    if sample_user.numel():
        if int(sample_user.min()) < 0 or int(sample_user.max()) >= n_users:
            bad = int(((sample_user < 0) | (sample_user >= n_users)).nonzero()[0, 0])
            raise ValueError(
                f"semantic_topk: sample_user must be in [0, {n_users}) (U = len(seq_offsets) - 1); "
                f"sample_user[{bad}] = {int(sample_user[bad])}")
        user_len = lengths[sample_user]
        bad_mask = (sample_pos < 0) | (sample_pos >= user_len)
        if bool(bad_mask.any()):
            bad = int(bad_mask.nonzero()[0, 0])
            raise ValueError(
                f"semantic_topk: sample_pos must be in [0, len of the user's sequence) since the target sits at "
                f"that position; sample_pos[{bad}] = {int(sample_pos[bad])} but user {int(sample_user[bad])} "
                f"has {int(user_len[bad])} items")


def _empty_result(n_samples: int, k: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    return (torch.full((n_samples, k), -1, dtype=torch.int64, device=device),
            torch.full((n_samples, k), float("-inf"), dtype=torch.float32, device=device))


def normalized_rows(item_emb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``item_emb`` in ``dtype`` with each row divided by max(||row||, NORM_EPS) (cosine preprocessing)."""
    x = item_emb.to(dtype)
    return x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def semantic_topk_ref(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k: int, metric: str = "cosine",
                      *, compute_dtype: torch.dtype = torch.float64, chunk: int = 4096):
    """PyTorch oracle: padded (chunk × max p) score matrices computed in ``compute_dtype``, sorted stably.

    Returns ``(pos int64, score compute_dtype)``; the public op casts the score to float32. Memory-hungry
    by design (it materialises the padded scores of ``chunk`` samples at a time); no validation here.
    """
    device = item_emb.device
    n_samples = sample_user.shape[0]
    pos_out = torch.full((n_samples, k), -1, dtype=torch.int64, device=device)
    score_out = torch.full((n_samples, k), float("-inf"), dtype=compute_dtype, device=device)
    if n_samples == 0 or k == 0:
        return pos_out, score_out
    emb = normalized_rows(item_emb, compute_dtype) if metric == "cosine" else item_emb.to(compute_dtype)
    starts = seq_offsets[sample_user]
    target = emb[seq_items[starts + sample_pos]]  # (S, d)
    max_elems = 1 << 24  # bound the padded (chunk, width, d) gather to ~16M elements
    lo = 0
    while lo < n_samples:
        hi = min(n_samples, lo + chunk)
        width = int(sample_pos[lo:hi].max())
        rows = max(1, min(hi - lo, max_elems // max(1, width * emb.shape[1])))
        hi = lo + rows
        p = sample_pos[lo:hi]
        width = int(p.max())
        if width == 0:
            lo = hi
            continue
        # candidate positions listed from the most recent down, so a stable descending sort puts the
        # larger position first among exact ties
        cand_pos = (p[:, None] - 1 - torch.arange(width, device=device)[None, :])  # (C, W), descending
        valid = cand_pos >= 0
        flat = (starts[lo:hi, None] + cand_pos.clamp_min(0))
        cand = emb[seq_items[flat]]  # (C, W, d)
        scores = torch.einsum("cwd,cd->cw", cand, target[lo:hi])
        scores = scores.masked_fill(~valid, float("-inf"))
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        top_scores = scores.gather(1, order)
        top_pos = cand_pos.gather(1, order).masked_fill(~valid.gather(1, order), -1)
        kk = top_pos.shape[1]
        pos_out[lo:hi, :kk] = top_pos
        score_out[lo:hi, :kk] = top_scores
        lo = hi
    return pos_out, score_out


def semantic_topk(item_emb: torch.Tensor, seq_items: torch.Tensor, seq_offsets: torch.Tensor,
                  sample_user: torch.Tensor, sample_pos: torch.Tensor, k: int, *, metric: str = "cosine",
                  backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` most similar earlier behaviours of every sample; returns ``(pos (S,k) int64, score (S,k) float32)``.

    See the module docstring for the contract. ``backend`` forces ``reference``/``cpp``/``cuda``/``triton``
    (default: the fastest available for ``item_emb``'s device, or ``$RELLAX_BACKEND``). Not differentiable.
    """
    validate_topk_args(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, metric)
    which = _backend.resolve(OP, item_emb.device, backend)
    n_samples = sample_user.shape[0]
    if n_samples == 0 or k == 0:
        return _empty_result(n_samples, k, item_emb.device)
    with torch.no_grad():
        if which == "reference":
            compute = torch.float64 if item_emb.device.type == "cpu" else torch.float32
            pos, score = semantic_topk_ref(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, metric,
                                           compute_dtype=compute)
            return pos, score.to(torch.float32)
        if which == "triton":
            from rellax_fast.kernels.topk import semantic_topk_triton

            return semantic_topk_triton(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k,
                                        normalize=(metric == "cosine"))
        # cpp and cuda share one torch.library op; the dispatcher picks the kernel by device
        return ext_op(OP)(item_emb.contiguous(), seq_items.contiguous(), seq_offsets.contiguous(),
                          sample_user.contiguous(), sample_pos.contiguous(), k, metric == "cosine")


def _register_ext() -> None:
    @torch.library.register_fake("rellax_fast::semantic_topk")
    def _(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, normalize):
        n_samples = sample_user.shape[0]
        return (item_emb.new_empty((n_samples, k), dtype=torch.int64),
                item_emb.new_empty((n_samples, k), dtype=torch.float32))
