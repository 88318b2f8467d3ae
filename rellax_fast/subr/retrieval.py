"""SUBR retrieval on top of ``ops.semantic_topk``, the faiss global-ranking alternative, and prompt ordering.

- :func:`retrieve`: for every sample of a split (user u, target position p), the top-K most similar of
  the user's earlier behaviours (positions 0..p-1), by the fused per-sample op, chunked over samples;
  ``max_history=W`` restricts the candidates to the W most recent ones (p-W..p-1) for lifelong histories.
  :func:`retrieve_sharded` splits the samples by user range over the processes of a launcher.
- :func:`retrieve_global`: ReLLa's ML-1M recipe. A faiss ``IndexFlatIP`` over all (normalised) item
  embeddings ranks items for each target item; walking that ranking and keeping the items found in the
  user's history before the target gives the same (pos, score) result as the op (under cosine the same
  top-K set, up to exact ties). Only the top ``top_n`` of each ranking is fetched; history items beyond it
  are scored exactly and ranked after it, so the result is complete for any ``top_n``.
- :func:`shown_positions`: the K positions shown to the LM per sample, in the prompt order of a mode:
  ``recent`` (the K most recent, no SUBR), ``sequential`` (the retrieved top-K put back in time order:
  the paper's main mode), ``high`` / ``low`` (by similarity, descending / ascending).

Every position result is a padded (S, K) int64 array of positions within the user's sequence, -1 padding
at the end of each row. Scores are float32 with -inf at padding. ``positions_to_items`` maps positions
to item ids.

Item ids versus rows: ``sequences.items`` holds item ids; the embedding table's row i embeds
``item_ids[i]`` (the cache stores that list). Pass ``item_ids`` and the ids are mapped to rows; leave it
None when ``sequences.items`` already are row indices.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from .encoders import normalize_rows, progress_bar

MODES = ("recent", "sequential", "high", "low")
METRICS = ("cosine", "dot")
DEFAULT_CHUNK = 65536
DEFAULT_WINDOW_BUDGET = 1 << 24  # window entries (int64) gathered at once by retrieve(max_history=...)
DEFAULT_WINDOW_BAND = 64  # targets of one user this close share one window sequence (and the op's tiles)
DEFAULT_TOP_N_CAP = 4096  # ranks all items of ML-1M (3,706) in one faiss search per target
FAISS_GPU_MAX_K = 2048  # faiss GPU flat-index searches return at most 2048 neighbours


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def item_rows(seq_items, item_ids: Optional[Sequence[Any]] = None) -> np.ndarray:
    """``seq_items`` (item ids) as rows of an embedding table whose row i embeds ``item_ids[i]``."""
    items = _np(seq_items)
    if item_ids is None:
        return items.astype(np.int64, copy=False)
    import pandas as pd

    index = pd.Index(list(item_ids))
    if not index.is_unique:
        raise ValueError("item_ids must be unique (one embedding row per item)")
    rows = index.get_indexer(items)
    if (rows < 0).any():
        missing = np.unique(items[rows < 0])[:5].tolist()
        raise ValueError(
            f"{int((rows < 0).sum())} history entries have no embedding row (e.g. item ids {missing}); "
            "the embeddings were built for another item set"
        )
    return rows.astype(np.int64)


_SEQUENCE_ROWS: OrderedDict[int, dict] = OrderedDict()  # id(sequences.items) -> entry (sequence_rows)
SEQUENCE_ROWS_CAPACITY = 4


def sequence_rows(sequences, item_ids: Optional[Sequence[Any]] = None, device=None):
    """(rows, seq, off): ``item_rows(sequences.items, item_ids)`` and, when ``device`` is given, the op's
    ``seq_items`` / ``seq_offsets`` tensors on it; built once per sequences (#28), not once per call.

    Building the row map reads every history entry (0.6-1.6 s at ML-25M's 24.7M entries), and passing the
    same tensors on every call lets ``ops.semantic_topk`` skip its checks over every entry (it caches them per
    tensor identity and version). The cache is keyed on the ``sequences.items`` object (a weak reference:
    the entry goes when the array does; at most SEQUENCE_ROWS_CAPACITY arrays, least recent out) and checked
    on every lookup: the same ``item_ids`` and ``sequences.offsets`` objects, the same shapes and, for torch
    tensors, the same version counter. A numpy array written in place keeps its identity: pass new arrays
    (or new ``sequences``) after changing them. Objects that take no weak reference are not cached.
    """
    items, offsets = sequences.items, sequences.offsets
    signature = (
        np.shape(items),
        getattr(items, "_version", None),
        np.shape(offsets),
        getattr(offsets, "_version", None),
    )
    key = id(items)
    entry = _SEQUENCE_ROWS.get(key)
    if entry is not None and (
        entry["ref"]() is not items
        or entry["item_ids"] is not item_ids
        or entry["offsets"] is not offsets
        or entry["sig"] != signature
    ):
        del _SEQUENCE_ROWS[key]
        entry = None
    if entry is None:
        entry = {
            "item_ids": item_ids,
            "offsets": offsets,
            "sig": signature,
            "rows": item_rows(items, item_ids),
            "tensors": {},
        }
        try:
            entry["ref"] = weakref.ref(items, lambda _r, k=key: _SEQUENCE_ROWS.pop(k, None))
        except TypeError:  # a list: not cached
            pass
        else:
            _SEQUENCE_ROWS[key] = entry
            while len(_SEQUENCE_ROWS) > SEQUENCE_ROWS_CAPACITY:
                _SEQUENCE_ROWS.popitem(last=False)
    if key in _SEQUENCE_ROWS:
        _SEQUENCE_ROWS.move_to_end(key)
    if device is None:
        return entry["rows"], None, None
    import torch

    dev = torch.device(device)
    if str(dev) not in entry["tensors"]:
        entry["tensors"][str(dev)] = (
            torch.as_tensor(entry["rows"], device=dev),
            torch.as_tensor(_np(offsets).astype(np.int64, copy=False), device=dev),
        )
    return (entry["rows"], *entry["tensors"][str(dev)])


def _split_arrays(sequences, split) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    offsets = _np(sequences.offsets).astype(np.int64, copy=False)
    users = _np(split.user_index).astype(np.int64, copy=False)
    pos = _np(split.pos).astype(np.int64, copy=False)
    if users.shape != pos.shape or users.ndim != 1:
        raise ValueError(
            f"split.user_index and split.pos must be 1-D of equal length; got {users.shape}, {pos.shape}"
        )
    if len(users) and (users.min() < 0 or users.max() >= len(offsets) - 1):
        raise ValueError(
            f"split.user_index must be in [0, {len(offsets) - 1}); got values up to {users.max()}"
        )
    lengths = offsets[users + 1] - offsets[users] if len(users) else np.zeros(0, np.int64)
    if len(pos) and ((pos < 0).any() or (pos >= lengths).any()):
        raise ValueError("split.pos must be in [0, length of the user's sequence) for every sample")
    return offsets, users, pos


def retrieve(
    item_emb,
    sequences,
    split,
    k: int,
    *,
    metric: str = "cosine",
    backend: Optional[str] = None,
    prefilter: Optional[str] = None,
    item_ids: Optional[Sequence[Any]] = None,
    device=None,
    chunk_size: int = DEFAULT_CHUNK,
    show_progress: Optional[bool] = None,
    max_history: Optional[int] = None,
    window_budget: int = DEFAULT_WINDOW_BUDGET,
    window_band: int = DEFAULT_WINDOW_BAND,
):
    """Per-sample SUBR top-K via :func:`rellax_fast.ops.semantic_topk`: (pos (S,k) int64, score (S,k) float32).

    Tensors are returned on the CPU. ``device`` (default: the embeddings' device) is where the op runs.
    ``metric``, ``backend`` and ``prefilter`` (``"bf16"``: the op's exact bf16 prefilter) go to the op.

    ``max_history`` (W, default None: the whole history): only the W most recent behaviours before each
    target are candidates, positions p-W..p-1, for lifelong histories where behaviours from years ago
    should not compete with recent ones (and to bound the cost per sample at W·d). Positions are still
    positions in the user's full sequence. It runs on the unchanged op contract (see :func:`_windowed_topk`):
    samples with at most W earlier behaviours go to the op as they are; the others are grouped into bands of
    one user's targets less than ``window_band`` positions apart, each band gets one packed window sequence
    (from W before its first target to its last), and the op's top-(k + band - 1) of each row, shifted back,
    keeps the k best inside the row's own window. At most ``window_budget`` window entries are gathered at
    a time.
    """
    import itertools

    import torch

    _check_retrieve_options(k, chunk_size, max_history)
    offsets, users, pos = _split_arrays(sequences, split)
    emb = torch.as_tensor(item_emb)
    if not emb.is_floating_point():
        raise ValueError(f"item_emb must be a float tensor (N_items, d); got dtype {emb.dtype}")
    dev = torch.device(device) if device is not None else emb.device
    emb = emb.to(dev)
    rows, seq, off = sequence_rows(sequences, item_ids, dev)  # once per sequences object, not per call
    n = len(users)
    out_pos = torch.full((n, k), -1, dtype=torch.int64)
    out_score = torch.full((n, k), float("-inf"), dtype=torch.float32)
    windowed = np.zeros(n, dtype=bool) if max_history is None else pos > max_history
    opts = dict(metric=metric, backend=backend, prefilter=prefilter)  # semantic_topk's keywords
    parts = _direct_topk(emb, seq, off, users, pos, np.flatnonzero(~windowed), k, chunk_size, opts)
    if windowed.any() and k > 0:
        wide = np.flatnonzero(windowed)
        windows = (emb, rows, offsets, users, pos, wide, k, int(max_history), window_band, window_budget)
        parts = itertools.chain(parts, _windowed_topk(*windows, opts, dev))
    with progress_bar(n, f"SUBR top-{k}", show_progress, unit="sample", unit_scale=True) as bar:
        for idx, p, s in parts:
            out_pos[idx] = p
            out_score[idx] = s
            bar.update(len(idx))
        if windowed.any() and k == 0:
            bar.update(int(windowed.sum()))
    return out_pos, out_score


def _check_retrieve_options(k: int, chunk_size: int, max_history: Optional[int]) -> None:
    """:func:`retrieve`'s scalar arguments, checked before anything is moved or computed."""
    if k < 0:
        raise ValueError(f"k must be >= 0; got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if max_history is not None and (
        isinstance(max_history, bool) or int(max_history) != max_history or max_history < 1
    ):
        raise ValueError(
            f"max_history must be an integer >= 1 (or None: the whole history); got {max_history!r}"
        )


def _direct_topk(emb, seq, off, users, pos, direct, k, chunk_size, opts):
    """Yield (sample indices, pos, score), on the CPU, of :func:`retrieve`'s samples that see their whole
    history (``direct``): ``ops.semantic_topk`` on ``chunk_size`` of them at a time."""
    import torch

    from rellax_fast import ops

    for start in range(0, len(direct), chunk_size):
        idx = direct[start : start + chunk_size]
        p, s = ops.semantic_topk(
            emb,
            seq,
            off,
            torch.as_tensor(users[idx], device=emb.device),
            torch.as_tensor(pos[idx], device=emb.device),
            k,
            **opts,
        )
        yield idx, p.cpu(), s.cpu()


def _windowed_topk(emb, rows, offsets, users, pos, wide, k, window, band, budget, opts, dev):
    """Yield (sample indices, pos, score) of :func:`retrieve`'s windowed samples (``wide``: p > window).

    Why bands: semantic_topk's fast kernels share each history tile among the targets of one user, so a
    window sequence per sample (one target per "user") would run them at a fraction of their speed (10x
    slower than the full scan in the C++ kernel). Targets of one user within ``band`` positions share one
    sequence [first - W, last]; a target p there also sees the up to p - first (< band) candidates older
    than its window, so the op is asked for k + band - 1 and those are dropped, which leaves the exact top-k
    of the window in the op's order (score desc, ties to the larger position). An optional per-sample start
    argument of the op would make this unnecessary.
    """
    import torch

    from rellax_fast import ops

    band = max(1, min(int(band), window))
    order = wide[np.lexsort((pos[wide], users[wide]))]
    u, p = users[order], pos[order]
    key = u * (int(p.max()) // band + 1) + p // band  # fixed grid of band-wide position bins per user
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(order)]
    first, last = p[starts], p[ends - 1]
    lengths = last - first + window + 1  # the window before the first target, through the last target
    kk = k + band - 1
    b0 = 0
    while b0 < len(starts):  # bands in chunks of about `budget` gathered entries
        b1 = b0 + 1 + int(np.searchsorted(np.cumsum(lengths[b0 + 1 :]), budget - lengths[b0], side="right"))
        b1 = min(b1, len(starts))
        lens = lengths[b0:b1]
        seq_start = offsets[u[starts[b0:b1]]] + first[b0:b1] - window  # flat index of each sequence's start
        voff = np.concatenate([[0], np.cumsum(lens)])
        flat = np.repeat(seq_start - voff[:-1], lens) + np.arange(voff[-1], dtype=np.int64)
        members = np.arange(starts[b0], ends[b1 - 1])
        band_of = np.repeat(np.arange(b1 - b0, dtype=np.int64), ends[b0:b1] - starts[b0:b1])
        vpos = p[members] - first[b0:b1][band_of] + window
        got_p, got_s = ops.semantic_topk(
            emb,
            torch.as_tensor(rows[flat], device=dev),
            torch.as_tensor(voff, device=dev),
            torch.as_tensor(band_of, device=dev),
            torch.as_tensor(vpos, device=dev),
            kk,
            **opts,
        )
        got_p, got_s = got_p.cpu().numpy(), got_s.cpu().numpy()
        real = got_p + (first[b0:b1][band_of] - window)[:, None]  # positions in the user's sequence
        keep = (got_p >= 0) & (real >= (p[members] - window)[:, None])
        rank = np.cumsum(keep, axis=1) - 1
        sel = keep & (rank < k)
        r, c = np.nonzero(sel)
        out_p = np.full((len(members), k), -1, dtype=np.int64)
        out_s = np.full((len(members), k), -np.inf, dtype=np.float32)
        out_p[r, rank[r, c]] = real[r, c]
        out_s[r, rank[r, c]] = got_s[r, c]
        yield order[members], torch.from_numpy(out_p), torch.from_numpy(out_s)
        b0 = b1


def retrieve_sharded(
    item_emb, sequences, split, k: int, *, shard_dir, show_progress: Optional[bool] = None, **kwargs
):
    """:func:`retrieve` under ``torchrun`` / ``accelerate launch``: rank r takes the samples of a contiguous
    user range (ranges balanced by candidate count), writes its (pos, score) rows as a shard under
    ``shard_dir`` atomically, and after a barrier rank 0 merges the shards into the full result in split
    order; the other ranks return None. In one process this is :func:`retrieve`."""
    from rellax_fast import distributed

    if not distributed.launched():
        return retrieve(item_emb, sequences, split, k, show_progress=show_progress, **kwargs)
    import types

    import torch

    rank, world = distributed.rank_world()
    offsets, users, pos = _split_arrays(sequences, split)
    n_users = len(offsets) - 1
    work = (
        np.bincount(users, weights=(pos + 1).astype(np.float64), minlength=n_users)
        if len(users)
        else np.zeros(n_users)
    )
    cuts = distributed.shard_bounds(work, world)
    mine = np.flatnonzero((users >= cuts[rank]) & (users < cuts[rank + 1]))
    part = types.SimpleNamespace(user_index=users[mine], pos=pos[mine])
    p, s = retrieve(
        item_emb, sequences, part, k, show_progress=show_progress if rank == 0 else False, **kwargs
    )
    distributed.write_shard(shard_dir, rank, world, {"index": mine, "pos": p.numpy(), "score": s.numpy()})
    distributed.barrier()  # every shard is written
    if rank != 0:
        return None
    out_pos = torch.full((len(users), k), -1, dtype=torch.int64)
    out_score = torch.full((len(users), k), float("-inf"), dtype=torch.float32)
    seen = np.zeros(len(users), dtype=np.int64)
    for shard in distributed.read_shards(shard_dir, world):
        out_pos[shard["index"]] = torch.from_numpy(shard["pos"])
        out_score[shard["index"]] = torch.from_numpy(shard["score"])
        np.add.at(seen, shard["index"], 1)
    distributed.remove_shards(shard_dir)
    if not (seen == 1).all():
        raise RuntimeError(f"{shard_dir}: the shards do not cover every sample exactly once")
    return out_pos, out_score


# ------------------------------------------------------------------------------------- global ranking


def _faiss_index(emb: np.ndarray, use_gpu: Optional[bool]):
    import faiss

    index = faiss.IndexFlatIP(emb.shape[1])
    gpu = False
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
        index._rellax_resources = resources  # keep the GPU resources alive as long as the index
        gpu = True
    elif use_gpu:
        raise RuntimeError(
            "use_gpu=True but faiss has no GPU support here (install faiss-gpu) or sees no GPU"
        )
    index.add(emb)
    return index, gpu


def _faiss_has_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def retrieve_global(
    item_emb,
    sequences,
    split,
    k: int,
    *,
    metric: str = "cosine",
    item_ids: Optional[Sequence[Any]] = None,
    top_n: Optional[int] = None,
    use_gpu: Optional[bool] = None,
    element_budget: int = 1 << 22,
    pair_budget: int = 1 << 23,
    show_progress: Optional[bool] = None,
):
    """SUBR by global item-to-item ranking (faiss), in the op's (pos, score) format (CPU torch tensors).

    ``top_n``: how much of each target's ranking faiss returns (default min(n_items, 4096); at most 2048 on
    a faiss GPU index). History items outside it are scored exactly and ranked after it.
    ``element_budget`` bounds the padded (samples x history) chunk, ``pair_budget`` the ranking entries held
    at once (targets are processed in batches of ``pair_budget // top_n``).
    ``use_gpu``: None = a faiss GPU index when ``item_emb`` is a CUDA tensor and faiss-gpu sees a GPU (else
    the CPU index); True requires the GPU index (clear error without faiss-gpu); False forces the CPU.
    """
    import torch

    if use_gpu is None:
        use_gpu = bool(getattr(item_emb, "is_cuda", False)) and _faiss_has_gpu()

    emb = _global_embeddings(item_emb, metric, k)
    n_items = emb.shape[0]
    offsets, users, pos = _split_arrays(sequences, split)
    seq_rows, _, _ = sequence_rows(sequences, item_ids)
    n = len(users)
    out_pos = np.full((n, k), -1, dtype=np.int64)
    out_score = np.full((n, k), -np.inf, dtype=np.float32)
    if n == 0 or k == 0:
        return torch.from_numpy(out_pos), torch.from_numpy(out_score)

    if metric == "cosine":
        emb = normalize_rows(emb)
    target_rows = seq_rows[offsets[users] + pos]
    unique_targets, target_local = np.unique(target_rows, return_inverse=True)
    target_local = target_local.reshape(-1)
    top_n = min(n_items, top_n or DEFAULT_TOP_N_CAP)
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1; got {top_n}")
    index, on_gpu = _faiss_index(emb, use_gpu)
    if on_gpu:
        top_n = min(top_n, FAISS_GPU_MAX_K)
    # targets in batches, so that the rankings held at once stay within pair_budget (target, item) pairs
    per_batch = max(1, pair_budget // top_n)
    by_target = np.argsort(target_local, kind="stable")
    bounds = np.searchsorted(
        target_local[by_target], np.arange(0, len(unique_targets) + per_batch, per_batch)
    )
    with progress_bar(n, f"global top-{k}", show_progress, unit="sample", unit_scale=True) as bar:
        for batch, t0 in enumerate(range(0, len(unique_targets), per_batch)):
            lookup = _ranking_lookup(index, emb, unique_targets[t0 : t0 + per_batch], top_n)
            for chunk in _chunks_by_history(
                by_target[bounds[batch] : bounds[batch + 1]], pos, element_budget
            ):
                _global_chunk(
                    chunk,
                    k,
                    emb,
                    seq_rows,
                    offsets,
                    users,
                    pos,
                    target_rows,
                    target_local[chunk] - t0,
                    *lookup,
                    n_items,
                    top_n,
                    out_pos,
                    out_score,
                )
                bar.update(len(chunk))
    return torch.from_numpy(out_pos), torch.from_numpy(out_score)


def _global_embeddings(item_emb, metric: str, k: int) -> np.ndarray:
    """:func:`retrieve_global`'s embeddings as a contiguous float32 array, after checking the arguments."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0; got {k}")
    emb = np.ascontiguousarray(_np(item_emb), dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"item_emb must be (N_items, d); got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("item_emb contains NaN or Inf values")
    return emb


def _ranking_lookup(index, emb: np.ndarray, rows: np.ndarray, top_n: int):
    """(keys, ranks, scores): the faiss ranking of each target row in ``rows`` as a sorted (target, item) ->
    (rank, score) lookup. Each ranking is sorted by item row, so that the flattened keys
    ``local_target * n_items + item_row`` are globally sorted and ``np.searchsorted`` finds any pair."""
    n_items = emb.shape[0]
    scores, ids = index.search(emb[rows], top_n)
    by_item = np.argsort(ids, axis=1, kind="stable")
    local = np.arange(len(rows), dtype=np.int64)[:, None]
    keys = (local * n_items + np.take_along_axis(ids, by_item, 1)).ravel()
    return keys, by_item.ravel(), np.take_along_axis(scores, by_item, 1).ravel()


def _chunks_by_history(samples: np.ndarray, pos: np.ndarray, element_budget: int):
    """Yield ``samples`` in chunks ordered by history length, each padded (chunk size x longest history)
    chunk holding about ``element_budget`` entries."""
    samples = samples[np.argsort(pos[samples], kind="stable")]
    start = 0
    while start < len(samples):
        # widths ascend along `samples`, so (chunk size x longest history) grows with stop
        stop = min(len(samples), start + max(1, element_budget // max(1, int(pos[samples[start]]))))
        while stop - start > 1 and (stop - start) * int(pos[samples[stop - 1]]) > element_budget:
            stop = start + (stop - start) // 2
        yield samples[start:stop]
        start = stop


def _global_chunk(
    chunk,
    k,
    emb,
    seq_rows,
    offsets,
    users,
    pos,
    target_rows,
    chunk_target_local,
    keys,
    ranks,
    pair_scores,
    n_items,
    top_n,
    out_pos,
    out_score,
):
    """Walk the rankings for one chunk of samples: pick each sample's k best-ranked history positions."""
    width = max(1, int(pos[chunk].max()))
    col = np.arange(width, dtype=np.int64)
    length = pos[chunk]
    valid = col[None, :] < length[:, None]
    flat = np.where(valid, offsets[users[chunk]][:, None] + col[None, :], 0)
    hist = seq_rows[flat]
    query = chunk_target_local[:, None] * n_items + hist
    at = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    found = valid & (keys[at] == query)
    # rank key: ranked items by their faiss rank (0..top_n-1); history items beyond the fetched ranking
    # after them, by exact score; padding last. Ties (the same item twice) go to the larger position.
    score = np.where(found, pair_scores[at], -np.inf).astype(np.float32)
    rank_key = np.where(found, ranks[at].astype(np.float64), np.inf)
    beyond = valid & ~found
    if beyond.any():
        r, c = np.nonzero(beyond)
        exact = np.einsum("ij,ij->i", emb[hist[r, c]], emb[target_rows[chunk[r]]])
        score[r, c] = exact
        # integer ranks (equal scores share one) so that the position tie-break below stays secondary
        _, dense_rank = np.unique(-exact, return_inverse=True)
        rank_key[r, c] = top_n + dense_rank.reshape(-1)
    composite = rank_key * (width + 1) + (width - col)[None, :]
    take = min(k, width)
    if take < width:
        best = np.argpartition(composite, take - 1, axis=1)[:, :take]
    else:
        best = np.broadcast_to(col, composite.shape).copy()
    best = np.take_along_axis(
        best, np.argsort(np.take_along_axis(composite, best, 1), axis=1, kind="stable"), 1
    )
    ok = np.take_along_axis(valid, best, 1)
    out_pos[chunk, :take] = np.where(ok, best, -1)
    out_score[chunk, :take] = np.where(ok, np.take_along_axis(score, best, 1), -np.inf)


# ------------------------------------------------------------------------------------------ ordering


def recent_positions(sample_pos, k: int) -> np.ndarray:
    """The K most recent positions before each target, oldest first: (S, K) int64, -1 padded at the end."""
    p = _np(sample_pos).astype(np.int64)
    n = np.minimum(p, k)
    col = np.arange(k, dtype=np.int64)
    return np.where(col[None, :] < n[:, None], (p - n)[:, None] + col[None, :], -1)


def order_retrieved(retrieved_pos, mode: str, k: Optional[int] = None, retrieved_score=None) -> np.ndarray:
    """Reorder retrieved top-K rows (score desc, -1 padding) for ``mode`` in sequential/high/low.

    ``retrieved_score``, when given, is used to (re)sort by score desc with ties to the larger position,
    so rows from any source work; without it the rows must already be in that order.
    """
    if mode not in ("sequential", "high", "low"):
        raise ValueError(f"order_retrieved mode must be 'sequential', 'high' or 'low'; got {mode!r}")
    rp = _np(retrieved_pos).astype(np.int64)
    if rp.ndim != 2:
        raise ValueError(f"retrieved_pos must be (S, K); got shape {rp.shape}")
    valid = rp >= 0
    if retrieved_score is not None:
        rs = _np(retrieved_score).astype(np.float64)
        if rs.shape != rp.shape:
            raise ValueError(f"retrieved_score must have retrieved_pos's shape {rp.shape}; got {rs.shape}")
        # sort key: padding last, then score desc, then position desc
        order = np.lexsort((-rp, -np.where(valid, rs, -np.inf), ~valid), axis=-1)
        rp = np.take_along_axis(rp, order, 1)
        valid = rp >= 0
    k = rp.shape[1] if k is None else k
    if k > rp.shape[1]:
        raise ValueError(f"k={k} is more than the {rp.shape[1]} retrieved positions per sample")
    rp, valid = rp[:, :k], valid[:, :k]
    if not (valid[:, 1:] <= valid[:, :-1]).all():
        raise ValueError("retrieved_pos rows must hold their -1 padding at the end")
    if mode == "high":
        return rp.copy()
    count = valid.sum(axis=1)
    col = np.arange(k, dtype=np.int64)
    if mode == "low":
        src = np.clip(count[:, None] - 1 - col[None, :], 0, max(k - 1, 0))
        return np.where(col[None, :] < count[:, None], np.take_along_axis(rp, src, 1), -1)
    big = np.iinfo(np.int64).max
    ordered = np.sort(np.where(valid, rp, big), axis=1)
    return np.where(ordered == big, -1, ordered)


order_history = order_retrieved  # the name used in the SUBR issue text


def shown_positions(
    sequences, split, k: int, mode: str, retrieved_pos=None, retrieved_score=None
) -> np.ndarray:
    """The K history positions shown to the LM per sample, in prompt order for ``mode``: (S, K) int64, -1 padded.

    ``recent`` needs no retrieval; the other modes reorder ``retrieved_pos`` (from :func:`retrieve` or
    :func:`retrieve_global`; at least K columns).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0; got {k}")
    _, _, pos = _split_arrays(sequences, split)
    if mode == "recent":
        return recent_positions(pos, k)
    if retrieved_pos is None:
        raise ValueError(f"mode {mode!r} needs retrieved_pos (from retrieve() or retrieve_global())")
    if len(_np(retrieved_pos)) != len(pos):
        raise ValueError(
            f"retrieved_pos has {len(_np(retrieved_pos))} rows for a split of {len(pos)} samples"
        )
    return order_retrieved(retrieved_pos, mode, k, retrieved_score)


def positions_to_items(sequences, split, positions) -> np.ndarray:
    """Item ids at ``positions`` (S, K) of each sample's user sequence; -1 where the position is -1."""
    offsets, users, _ = _split_arrays(sequences, split)
    p = _np(positions).astype(np.int64)
    items = _np(sequences.items)
    flat = np.where(p >= 0, offsets[users][:, None] + p, 0)
    return np.where(p >= 0, items[flat], -1)
