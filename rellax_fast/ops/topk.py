"""``semantic_topk``: per-sample causal top-k retrieval over packed, variable-length user histories (SUBR).

Contract (docs/architecture.md): sample ``s`` belongs to user ``u = sample_user[s]`` and targets position
``p = sample_pos[s]``; its target item is ``seq_items[seq_offsets[u] + p]`` and its candidates are that
user's positions ``0 .. p-1``. The score of a candidate is the cosine (or the dot product) between the
target item's embedding and the candidate item's embedding. Outputs ``pos`` (S, k) int64 and ``score``
(S, k) float32, rows sorted by score descending, ties to the larger position (the more recent behaviour),
padded with ``pos=-1``/``score=-inf`` when a sample has fewer than ``k`` candidates.

Zero vectors under ``metric="cosine"``: rows are normalised as ``x / max(||x||, 1e-12)`` (the
:func:`torch.nn.functional.normalize` rule), so an all-zero embedding has cosine 0 with everything. Every
backend follows this rule.

Host syncs per call (GPU tensors): one, in the validation (every value check and max(sample_pos) read
back together), plus one inside the CUDA C++ op, which re-checks its indices for direct torch.ops callers.
The Triton work list is built on the device. The full-table finiteness check and the cosine
normalisation / float32 conversion of the table are cached per item_emb, and the checks over every entry of
seq_items / seq_offsets per tensor (identity + version counter, see :class:`_TableCache`), so fixed data are
checked and normalised once, not per call; a CPU call that reads a small part of the data hands the C++
kernel only that part (:func:`compact_call`).

This module owns the argument validation (done once here, for every backend), the float64-capable
PyTorch oracle :func:`semantic_topk_ref`, the torch.library fake registration of the C++/CUDA op, and the
backend routing. Backends: ``reference`` (this file), ``cpp`` (csrc/topk.cpp), ``cuda``
(csrc/topk_cuda.cu), ``triton`` (kernels/topk.py).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Optional, Tuple

import torch

from .._kernel_common import NORM_EPS  # the zero-norm rule shared by all backends
from . import _backend, _registry
from ._backend import PREFILTERS
from ._registry import ext_op
from .topk_prefilter import prefilter_tables, prefiltered_topk

OP = "semantic_topk"
_backend.register_op(OP, {"cpu": ["cpp", "reference"], "cuda": ["triton", "cuda", "reference"]})

METRICS = ("cosine", "dot")
_INDEX_ARGS = ("seq_items", "seq_offsets", "sample_user", "sample_pos")


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def validate_topk_args(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, metric) -> int:
    """Raise a clear TypeError/ValueError naming the bad argument (shared by every backend).

    Returns max(sample_pos) (0 without samples), read in the same single host sync as the value checks.
    """
    tensors = dict(
        item_emb=item_emb,
        seq_items=seq_items,
        seq_offsets=seq_offsets,
        sample_user=sample_user,
        sample_pos=sample_pos,
    )
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
            f"semantic_topk: item_emb must be float32, float64, float16 or bfloat16; got {_describe(item_emb)}"
        )
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
                f"semantic_topk: all tensors must be on one device; item_emb is on {device}, {name} is on {t.device}"
            )
    if sample_user.shape[0] != sample_pos.shape[0]:
        raise ValueError(
            "semantic_topk: sample_user and sample_pos must have the same length S; "
            f"got {sample_user.shape[0]} and {sample_pos.shape[0]}"
        )

    return _validate_values(item_emb, seq_items, seq_offsets, sample_user, sample_pos)


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True in a 1-D mask as a 0-d int64 device tensor, len(mask) when none (no sync)."""
    n = mask.shape[0]
    if n == 0:
        return torch.full((), 0, dtype=torch.int64, device=mask.device)
    idx = torch.arange(n, device=mask.device)
    return torch.where(mask, idx, n).min()


def _validate_values(item_emb, seq_items, seq_offsets, sample_user, sample_pos) -> int:
    """The value checks, computed on the device and read back with ONE host sync; returns max(sample_pos).

    Every check becomes a 0-d int64 tensor (a first bad index, or a value); they are stacked and read with
    one ``tolist()``. Only a failing call pays more syncs, to quote the bad entry. The checks that read every
    row of item_emb (finite) or every entry of seq_items / seq_offsets (in range, non-decreasing) are skipped
    when the same tensor (identity and version, :class:`_TableCache`) passed them before: a call's own cost
    then grows with its samples, not with the whole history.
    """
    n_users, n_samples = seq_offsets.shape[0] - 1, sample_user.shape[0]
    if seq_offsets.shape[0] < 1:
        raise ValueError(
            "semantic_topk: seq_offsets must have U+1 >= 1 entries, starting at 0; got an empty tensor"
        )
    if n_samples and n_users == 0:
        raise ValueError(
            "semantic_topk: sample_user must be in [0, 0) (U = len(seq_offsets) - 1); "
            f"sample_user[0] = {int(sample_user[0])}"
        )
    # the checks over every entry of item_emb / seq_items / seq_offsets are paid once per tensor (#28)
    table_checks = (
        (item_emb, "finite", item_emb.numel() > 0),
        (seq_items, f"items in [0, {item_emb.shape[0]})", True),
        (seq_offsets, f"offsets end <= {seq_items.shape[0]}", True),
    )
    needed = [wanted and not _TABLES.known(t, fact) for t, fact, wanted in table_checks]
    flags, user_len = _value_flags(item_emb, seq_items, seq_offsets, sample_user, sample_pos, needed)
    values = flags.tolist()  # the one host sync of a successful call
    _raise_table_errors(item_emb, seq_items, seq_offsets, values[:5])
    for (tensor, fact, _), checked in zip(table_checks, needed):
        if checked:
            _TABLES.mark(tensor, fact)
    _raise_sample_errors(seq_offsets, sample_user, sample_pos, user_len, values[5:7])
    return values[7]


def _value_flags(item_emb, seq_items, seq_offsets, sample_user, sample_pos, needed):
    """(the stacked 0-d checks, each sample's user length or None) without a host sync; ``needed`` says which
    of the whole-table checks (finite, items in range, offsets non-decreasing) run, the others pass."""
    check_finite, check_items, check_offsets = needed
    n_items, total = item_emb.shape[0], seq_items.shape[0]
    n_users, n_samples = seq_offsets.shape[0] - 1, sample_user.shape[0]
    zero = torch.zeros((), dtype=torch.int64, device=seq_offsets.device)
    user_len = None
    if n_samples:
        bad_user = (sample_user < 0) | (sample_user >= n_users)
        u = sample_user.clamp(0, n_users - 1)
        user_len = seq_offsets[u + 1] - seq_offsets[u]
        bad_pos = (sample_pos < 0) | (sample_pos >= user_len)
    flags = torch.stack(
        [
            _first_true((~torch.isfinite(item_emb)).any(dim=1)) if check_finite else zero + n_items,
            seq_offsets[0],
            _first_true(seq_offsets[1:] < seq_offsets[:-1]) if check_offsets else zero + n_users,
            seq_offsets[-1],
            _first_true((seq_items < 0) | (seq_items >= n_items)) if check_items else zero + total,
            _first_true(bad_user) if n_samples else zero,
            _first_true(bad_pos) if n_samples else zero,
            sample_pos.max() if n_samples else zero,
        ]
    )
    return flags, user_len


def _raise_table_errors(item_emb, seq_items, seq_offsets, values) -> None:
    """Raise for the first failing check of item_emb, seq_offsets and seq_items (values from the one sync)."""
    first_nonfinite, offset0, first_decrease, offset_last, first_bad_item = values
    n_items, total, n_users = item_emb.shape[0], seq_items.shape[0], seq_offsets.shape[0] - 1
    if first_nonfinite < n_items:
        raise ValueError(f"semantic_topk: item_emb must be finite; row {first_nonfinite} holds NaN or inf")
    if offset0 != 0:
        raise ValueError(f"semantic_topk: seq_offsets must start at 0; got seq_offsets[0] = {offset0}")
    if first_decrease < n_users:
        i = first_decrease
        raise ValueError(
            f"semantic_topk: seq_offsets must be non-decreasing; seq_offsets[{i + 1}] = {int(seq_offsets[i + 1])} "
            f"< seq_offsets[{i}] = {int(seq_offsets[i])}"
        )
    if offset_last > total:
        raise ValueError(
            f"semantic_topk: seq_offsets overruns seq_items: seq_offsets[-1] = {offset_last} "
            f"> len(seq_items) = {total}"
        )
    if first_bad_item < total:
        bad = first_bad_item
        raise ValueError(
            f"semantic_topk: seq_items holds item ids in [0, {n_items}) (rows of item_emb); "
            f"seq_items[{bad}] = {int(seq_items[bad])}"
        )


def _raise_sample_errors(seq_offsets, sample_user, sample_pos, user_len, values) -> None:
    """Raise for the first out-of-range sample_user, then sample_pos (values from the one sync)."""
    n_samples, n_users = sample_user.shape[0], seq_offsets.shape[0] - 1
    if not n_samples:
        return
    first_bad_user, first_bad_pos = values
    if first_bad_user < n_samples:
        bad = first_bad_user
        raise ValueError(
            f"semantic_topk: sample_user must be in [0, {n_users}) (U = len(seq_offsets) - 1); "
            f"sample_user[{bad}] = {int(sample_user[bad])}"
        )
    if first_bad_pos < n_samples:
        bad = first_bad_pos
        raise ValueError(
            f"semantic_topk: sample_pos must be in [0, len of the user's sequence) since the target sits at "
            f"that position; sample_pos[{bad}] = {int(sample_pos[bad])} but user {int(sample_user[bad])} "
            f"has {int(user_len[bad])} items"
        )


class _TableCache:
    """Per-tensor facts reused across calls: checks passed ("finite" for item_emb, the range checks of
    seq_items and seq_offsets) and item_emb's prepared kernel tables.

    Keyed on the tensor's identity (a weak reference: nothing here keeps item_emb alive) and validated on
    every lookup against its version counter (bumped by every in-place write through torch), data pointer,
    shape, strides, dtype and device, so a modified table is checked and normalised again. Writes that
    bypass the version counter (``.data`` or another framework aliasing the memory) are not seen; pass a
    fresh tensor after such writes. Prepared tables (a normalised copy, or a float32 copy) cost one extra
    table of memory while item_emb lives; at most ``capacity`` tensors are remembered (least recent out).
    """

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._entries: OrderedDict[int, dict] = OrderedDict()

    @staticmethod
    def _signature(t: torch.Tensor):
        try:
            version = t._version
        except RuntimeError:  # inference tensors have no version counter: never cached
            return None
        return (version, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)

    def _entry(self, t: torch.Tensor, create: bool):
        sig = self._signature(t)
        if sig is None:
            return None
        key = id(t)
        entry = self._entries.get(key)
        if entry is not None and (entry["ref"]() is not t or entry["sig"] != sig):
            del self._entries[key]
            entry = None
        if entry is None and create:
            self._entries[key] = entry = {
                "ref": weakref.ref(t, lambda _r, k=key: self._entries.pop(k, None)),
                "sig": sig,
                "facts": set(),
                "tables": {},
            }
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def known(self, t: torch.Tensor, fact: str) -> bool:
        """Whether ``t`` (this identity and version) passed the check named ``fact`` before."""
        entry = self._entry(t, create=False)
        return bool(entry and fact in entry["facts"])

    def mark(self, t: torch.Tensor, fact: str) -> None:
        entry = self._entry(t, create=True)
        if entry is not None:
            entry["facts"].add(fact)

    def table(self, t: torch.Tensor, kind: str, make):
        """``make(t)`` (a tensor or a tuple of them) cached under ``kind``; a result that is ``t`` itself (or
        a view of its memory) is returned but not stored."""
        entry = self._entry(t, create=True)
        if entry is not None and kind in entry["tables"]:
            return entry["tables"][kind]
        value = make(t)
        aliases = isinstance(value, torch.Tensor) and (value is t or value.data_ptr() == t.data_ptr())
        if entry is not None and not aliases:
            entry["tables"][kind] = value
        return value

    def clear(self) -> None:
        self._entries.clear()


_TABLES = _TableCache()


def _cuda_table(item_emb: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The float32 table the CUDA kernel reads (normalised for cosine), contiguous."""
    t = item_emb.to(torch.float32)
    if normalize:
        t = t / t.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return t.contiguous()


def _empty_result(n_samples: int, k: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.full((n_samples, k), -1, dtype=torch.int64, device=device),
        torch.full((n_samples, k), float("-inf"), dtype=torch.float32, device=device),
    )


def normalized_rows(item_emb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``item_emb`` in ``dtype`` with each row divided by max(||row||, NORM_EPS) (cosine preprocessing)."""
    x = item_emb.to(dtype)
    return x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def semantic_topk_ref(
    item_emb,
    seq_items,
    seq_offsets,
    sample_user,
    sample_pos,
    k: int,
    metric: str = "cosine",
    *,
    compute_dtype: torch.dtype = torch.float64,
    chunk: int = 4096,
):
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
        cand_pos = p[:, None] - 1 - torch.arange(width, device=device)[None, :]  # (C, W), descending
        valid = cand_pos >= 0
        flat = starts[lo:hi, None] + cand_pos.clamp_min(0)
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


# The Triton kernel keeps each row's running top-k in registers (BLOCK_M x next_pow2(k) scores and positions)
# and merges by k selection steps per 32-candidate tile: compiled for sm_90a (bf16, d=384) it holds 225
# registers and no spills at k=256, but spills ~10 KB per thread at k=1024, and the selection work grows as
# k·L. The CUDA kernel keeps the top-k in the output rows (insertion behind a k-th-score threshold), so large
# k costs it little. Hence a `supports` limit: automatic choice takes the next backend (cuda, else the
# reference) for larger k, and a forced triton refuses it.
TRITON_MAX_K = 256


def _triton_supports(k: int, **_call) -> Optional[str]:
    """The Triton kernel's limit on k (its register-resident top-k); None when it can run the call."""
    if k > TRITON_MAX_K:
        return (
            f"k={k} exceeds the triton kernel's limit of {TRITON_MAX_K} (its register-resident top-k "
            "spills beyond it); the cuda backend has no such limit"
        )
    return None


def semantic_topk(
    item_emb: torch.Tensor,
    seq_items: torch.Tensor,
    seq_offsets: torch.Tensor,
    sample_user: torch.Tensor,
    sample_pos: torch.Tensor,
    k: int,
    *,
    metric: str = "cosine",
    backend: Optional[str] = None,
    prefilter: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` most similar earlier behaviours of every sample; returns ``(pos (S,k) int64, score (S,k) float32)``.

    See the module docstring for the contract. ``backend`` forces ``reference``/``cpp``/``cuda``/``triton``
    (default: the fastest available for ``item_emb``'s device that supports the call, or ``$RELLAX_BACKEND``;
    triton runs k <= TRITON_MAX_K only). ``prefilter="bf16"`` scores in bfloat16 by batched GEMM and
    rescores in float64 only the candidates a certified error bound keeps: the result is the float64
    oracle's (the ``reference`` backend's), see :mod:`rellax_fast.ops.topk_prefilter`; it takes no
    ``backend``. Not differentiable.
    """
    if prefilter is not None and prefilter not in PREFILTERS:
        raise ValueError(f"semantic_topk: prefilter must be None or one of {PREFILTERS}; got {prefilter!r}")
    if prefilter is not None and backend not in (None, "auto"):
        raise ValueError(
            f"semantic_topk: prefilter={prefilter!r} runs on torch GEMMs and takes no backend; got "
            f"backend={backend!r} (pass one or the other)"
        )
    max_pos = validate_topk_args(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, metric)
    if prefilter is not None:
        n_samples = sample_user.shape[0]
        if n_samples == 0 or k == 0:
            return _empty_result(n_samples, k, item_emb.device)
        with torch.no_grad():
            return _run_prefiltered(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, metric)
    which = _backend.resolve(OP, item_emb.device, backend, k=k)
    n_samples = sample_user.shape[0]
    if n_samples == 0 or k == 0:
        return _empty_result(n_samples, k, item_emb.device)
    with torch.no_grad():
        return _backend.impl(OP, which)(
            item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, metric == "cosine", max_pos
        )


# ----------------------------------------------------------------------------------------------------------
# implementations: fn(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, normalize, max_pos)
# -> (pos, score float32), on validated arguments with S > 0 and k > 0; one table row per backend
# ----------------------------------------------------------------------------------------------------------


def _run_reference(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, normalize, max_pos):
    compute = torch.float64 if item_emb.device.type == "cpu" else torch.float32
    pos, score = semantic_topk_ref(
        item_emb,
        seq_items,
        seq_offsets,
        sample_user,
        sample_pos,
        k,
        "cosine" if normalize else "dot",
        compute_dtype=compute,
    )
    return pos, score.to(torch.float32)


def _run_triton(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, normalize, max_pos):
    from rellax_fast.kernels.topk import prepare_table, semantic_topk_triton

    table = _TABLES.table(item_emb, f"triton-{normalize}", lambda t: prepare_table(t, normalize))
    return semantic_topk_triton(
        table,
        seq_items,
        seq_offsets,
        sample_user,
        sample_pos,
        k,
        normalize=normalize,
        max_pos=max_pos,
        prepared=True,
    )


def _run_prefiltered(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, metric):
    normalize = metric == "cosine"
    tables = _TABLES.table(item_emb, f"prefilter-{normalize}", lambda t: prefilter_tables(t, normalize))
    return prefiltered_topk(*tables, seq_items, seq_offsets, sample_user, sample_pos, k)


def _call_ext(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, normalize):
    return ext_op(OP)(
        item_emb.contiguous(),
        seq_items.contiguous(),
        seq_offsets.contiguous(),
        sample_user.contiguous(),
        sample_pos.contiguous(),
        k,
        normalize,
    )


# compact a CPU call when the samples' users, cut after their last target, hold at most this share of the entries
COMPACT_MAX_SHARE = 0.25


def compact_call(item_emb, seq_items, seq_offsets, sample_user, sample_pos):
    """The same query on only what it reads, or None when that is most of the data (#28).

    The CPU kernel's fixed work per call grows with the whole input: it range-checks every entry of
    ``seq_items``, counting-sorts the samples into a (total + 1) bucket array and builds a padded
    (normalised) float32 copy of all of ``item_emb``. A call for a few targets (a retrieval chunk, a
    history band) reads only its users' sequences up to their last target. Here the samples are sorted
    (``torch.unique`` on the users: O(S log S), no pass over every entry), those prefixes are packed into
    a smaller ``seq_items`` / ``seq_offsets`` (positions within a user are unchanged), and, when they name
    at most half of the items, ``item_emb`` is cut to those rows (ids remapped). Each row is normalised
    alone, so scores and positions are bit-identical to the uncompacted call (tests/subr/test_retrieval.py).
    Returns (item_emb, seq_items, seq_offsets, sample_user, sample_pos) or None.
    """
    users, local_user = torch.unique(sample_user, return_inverse=True)
    last = torch.full((users.shape[0],), -1, dtype=torch.int64).scatter_reduce(
        0, local_user, sample_pos, "amax"
    )
    lengths = last + 1
    offsets = torch.zeros(users.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    kept = int(offsets[-1])
    if kept > COMPACT_MAX_SHARE * seq_items.shape[0]:
        return None
    flat = torch.repeat_interleave(seq_offsets[users] - offsets[:-1], lengths) + torch.arange(kept)
    items = seq_items[flat]
    rows, local_items = torch.unique(items, return_inverse=True)
    if 2 * rows.shape[0] <= item_emb.shape[0]:
        item_emb, items = item_emb[rows], local_items
    return item_emb, items, offsets, local_user, sample_pos


def _run_cpp(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, normalize, max_pos):
    # the CPU kernel builds its own padded table, fused with the normalisation, inside the op
    compact = compact_call(item_emb, seq_items, seq_offsets, sample_user, sample_pos)
    if compact is not None:
        return _call_ext(*compact, k, normalize)
    return _call_ext(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, normalize)


def _run_cuda(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, normalize, max_pos):
    # the same torch.library op as cpp (the dispatcher picks the kernel by device); the CUDA kernel gets the
    # cached float32 (normalised) table with normalize=False
    table = _TABLES.table(item_emb, f"cuda-{normalize}", lambda t: _cuda_table(t, normalize))
    return _call_ext(table, seq_items, seq_offsets, sample_user, sample_pos, k, False)


_backend.register_impl(OP, "reference", _run_reference)
_backend.register_impl(OP, "cpp", _run_cpp)
_backend.register_impl(OP, "cuda", _run_cuda)
_backend.register_impl(OP, "triton", _run_triton, supports=_triton_supports)


def _register_ext() -> None:
    @torch.library.register_fake("rellax_fast::semantic_topk")
    def _(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k, normalize):
        n_samples = sample_user.shape[0]
        return (
            item_emb.new_empty((n_samples, k), dtype=torch.int64),
            item_emb.new_empty((n_samples, k), dtype=torch.float32),
        )


_registry.register_ext_hook(_register_ext)
