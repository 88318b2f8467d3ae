"""The exact bf16 prefilter of ``semantic_topk`` (``prefilter="bf16"``, #28).

Every (target, candidate) score is first computed from bfloat16 copies of the (normalised) rows by one
batched ``torch.bmm`` (oneDNN, AMX or AVX512-BF16 where the CPU has them; tensor cores on a GPU). A bound
``E`` on that score's error, certified below, then decides which candidates can still be in the exact top-k;
only those survivors are rescored in float64, and the top-k among them is taken with the op's tie rule
(score descending, then the larger position). So the result is the float64 oracle's
(:func:`~rellax_fast.ops.topk.semantic_topk_ref`, the ``reference`` backend), not an approximation: the
positions are the same, and the float32 scores too, unless two candidates' exact scores differ by less than
float64 rounding (the rescoring sums in another order than the oracle's einsum).

Why it is exact. Let ``s`` be the oracle's float64 score and ``S`` the bf16 one of candidate j for target i,
with ``|s - S| <= E_i`` for every j. The k-th best exact score is then at least ``kth_j(S) - E_i`` (the k
candidates with the best S all have s >= S - E_i), so a candidate with ``S + E_i < kth(S) - E_i`` has an
exact score strictly below the k-th best and cannot be in the top-k, ties included. Survivors are the rest:
``S >= kth(S) - 2 E_i`` (every valid candidate when there are fewer than k).

The bound ``E_i`` (per target, taking the maxima over the table's rows, so one scalar per row of scores):
with x the float64 row, x~ its bf16 copy and D = x - x~,
- the inputs' rounding: ``|x.y - x~.y~| <= ||x~|| ||D_y|| + ||D_x|| ||y||`` (Cauchy-Schwarz on
  ``x~.(y - y~) + (x - x~).y``), with the norms of D measured per row, not assumed;
- the float32 accumulation of the d exact bf16 products (both oneDNN's and ATen's bf16 GEMMs accumulate in
  float32): ``gamma_d ||x~|| ||y~||`` with ``gamma_d = d u32 / (1 - d u32)``, taken twice over as a margin
  for blocked or split-K sums;
- the bf16 rounding of the output (CPU ``bmm`` has no float32-output form): ``2^-8 |S_acc|``, with
  ``|S_acc| <= (1 + gamma_d) ||x~|| ||y~||``;
- the oracle's own float64 rounding: ``d u64 / (1 - d u64) ||x|| ||y||``, twice over;
and the sum is widened by a relative 1e-6 (rounding in computing the bound) and an absolute 1e-30
(flushed subnormal products). A denser-than-necessary window only costs rescoring; a tighter one is wrong.

Cost: one bf16 batched GEMM over padded groups of a user's targets and history (users sorted by history
length so padding stays small), a top-k, a compare, and a float64 rescoring of the survivors (about k plus
the near-ties per target). The float64 and bf16 tables and their norms are cached per ``item_emb`` like
the other backends' tables.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .._kernel_common import NORM_EPS
from ._registry import ext_op, register_ext_hook

_U32 = 2.0**-24
_U64 = 2.0**-53
_BF16_OUT = 2.0**-8 / (1.0 - 2.0**-8)  # round-to-nearest bf16: |S_acc - S| <= 2^-8 |S_acc|
SCORE_BUDGET = 1 << 22  # padded scores per batched GEMM (8 MiB of bf16)
GATHER_BUDGET = 1 << 24  # gathered bf16 history elements per batched GEMM (32 MiB); binds when few targets
TARGETS_PER_GROUP = 256  # a user's targets are cut into groups of at most this many (bounds the padding)


def error_coefficients(d: int) -> Tuple[float, float]:
    """(accumulation, oracle) coefficients of the bound: float32 and float64 gamma_d, each doubled."""
    gamma32 = d * _U32 / (1.0 - d * _U32)
    gamma64 = d * _U64 / (1.0 - d * _U64)
    return 2.0 * gamma32, 2.0 * gamma64


def prefilter_tables(item_emb: torch.Tensor, normalize: bool):
    """What the prefilter keeps per table: ``(emb64, lo, norms)``: the oracle's float64 rows (normalised by
    the same expression as :func:`~rellax_fast.ops.topk.normalized_rows`, so bit for bit), their bf16 copy,
    and (N, 3) float64 ``||x||``, ``||x~||``, ``||x - x~||`` for the bound. The float64 table costs 8 bytes
    per element while ``item_emb`` lives; rebuilding its rows from ``item_emb`` at each rescoring instead
    measured several times slower (a float64 division over every gathered element)."""
    n = item_emb.shape[0]
    emb64 = torch.empty(item_emb.shape, dtype=torch.float64, device=item_emb.device)
    lo = torch.empty(item_emb.shape, dtype=torch.bfloat16, device=item_emb.device)
    norms = torch.empty((n, 3), dtype=torch.float64, device=item_emb.device)
    for r in range(0, n, 8192):  # in row blocks: the float64 temporaries stay small
        x = item_emb[r : r + 8192].to(torch.float64)
        if normalize:
            x = x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        emb64[r : r + 8192] = x
        lo[r : r + 8192] = x.to(torch.bfloat16)
        lo64 = lo[r : r + 8192].to(torch.float64)
        norms[r : r + 8192] = torch.stack([x.norm(dim=1), lo64.norm(dim=1), (x - lo64).norm(dim=1)], dim=1)
    return emb64, lo, norms


def row_bounds(norms: torch.Tensor, target_rows: torch.Tensor, d: int) -> torch.Tensor:
    """E_i for each target row (see the module docstring), float32, rounded up."""
    acc, oracle = error_coefficients(d)
    x, x_lo, dx = norms[target_rows].unbind(-1)
    y_max, y_lo_max, dy_max = norms.max(dim=0).values.unbind(-1)
    inputs = x_lo * dy_max + dx * y_max
    s_acc = (1.0 + acc) * x_lo * y_lo_max
    bound = inputs + acc * x_lo * y_lo_max + _BF16_OUT * s_acc + oracle * x * y_max
    bound = (bound * (1.0 + 1e-6) + 1e-30).to(torch.float32)
    return bound.nextafter(torch.full_like(bound, float("inf")))  # rounded up, not to nearest


def _groups(seq_offsets, sample_user, sample_pos):
    """The samples cut into groups: runs of <= TARGETS_PER_GROUP targets of one user, ascending by position.
    Returns (order: the samples sorted by (user, position), start and count of each group in ``order``, its
    user, its width = the largest target position), all tensors; no Python loop over users."""
    order = torch.argsort(seq_offsets[sample_user] + sample_pos, stable=True)
    users = sample_user[order]
    idx = torch.arange(order.shape[0], device=order.device)
    new_run = torch.ones_like(users, dtype=torch.bool)
    new_run[1:] = users[1:] != users[:-1]
    rank = idx - torch.cummax(torch.where(new_run, idx, 0), 0).values
    start = torch.nonzero(new_run | (rank % TARGETS_PER_GROUP == 0)).flatten()
    end = torch.cat([start[1:], start.new_tensor([order.shape[0]])])
    return order, start, end - start, users[start], sample_pos[order[end - 1]]


def _batches(width, count, d: int):
    """[lo, hi) ranges over the groups sorted by width, packed so that a batch's padded (groups x targets x
    history) scores stay within SCORE_BUDGET and its gathered (groups x history x d) rows within
    GATHER_BUDGET (a lone larger group is its own batch). Groups of width 0 (targets at position 0, no
    candidates) are left out: their rows stay padding."""
    ws, ns = width.tolist(), count.tolist()
    first = next((i for i, w in enumerate(ws) if w > 0), len(ws))
    lo, n_max = first, 0
    for g in range(first, len(ws)):
        n_max = max(n_max, ns[g])
        size = (g - lo + 1) * ws[g]
        if g > lo and (size * n_max > SCORE_BUDGET or size * d > GATHER_BUDGET):
            yield lo, g
            lo, n_max = g, ns[g]
    if lo < len(ws):
        yield lo, len(ws)


def _padded_indices(order, start, count, user, width, seq_items, seq_offsets, sample_pos):
    """For the groups of one batch: (hist (B, W) item rows, targ (B, n) item rows, tpos (B, n), samples
    (B, n), -1 for padding). Padded targets get tpos 0 (no candidates) and history slots past a group's
    width repeat its last row; both are masked by position."""
    dev = seq_items.device
    n_max = int(count.max())
    slot = torch.arange(n_max, device=dev)[None, :]
    real = slot < count[:, None]
    samples = torch.where(real, order[(start[:, None] + slot).clamp_max(order.shape[0] - 1)], -1)
    starts = seq_offsets[user]
    tpos = torch.where(real, sample_pos[samples.clamp_min(0)], 0)
    targ = seq_items[starts[:, None] + tpos]
    col = torch.arange(int(width.max()), device=dev)[None, :]
    flat = starts[:, None] + col.minimum((width[:, None] - 1).clamp_min(0))
    return seq_items[flat], targ, tpos, samples


def _rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` as an embedding lookup: a row copy each (measured 1.8x faster than index_select and
    several times faster than advanced indexing for bf16 rows on the CPU)."""
    return torch.nn.functional.embedding(idx, table)


def _survivors(scores, bound, tpos, k):
    """(b, i, j) of the candidates that can be in a target's exact top-k (module docstring), from the bf16
    ``scores`` (B, n, W), masked here in place. Comparing in bf16 is exact: the threshold is rounded down
    to a bf16 value, which keeps at least the candidates the float32 threshold keeps."""
    causal = torch.arange(scores.shape[2], device=scores.device)[None, None, :] >= tpos[:, :, None]
    scores.masked_fill_(causal, float("-inf"))
    if k <= scores.shape[2]:
        kth = torch.topk(scores, k, dim=2).values[:, :, -1:].to(torch.float32)
    else:
        kth = torch.full((*scores.shape[:2], 1), float("-inf"), device=scores.device)
    thr = kth - 2.0 * bound[:, :, None]
    # fewer than k candidates: every finite (valid) score survives, the -inf (masked) ones do not
    thr = thr.clamp_min(torch.finfo(torch.bfloat16).min)
    low = thr.to(torch.bfloat16)
    low = torch.where(low.to(torch.float32) > thr, low.nextafter(torch.full_like(low, float("-inf"))), low)
    return torch.nonzero(scores >= low).unbind(1)


def _rescored_topk(emb64, hist, targ, b, i, j, k):
    """Per (b, i) row: the top-k of its survivors by float64 score, ties to the larger position j.
    Returns (row ids, rank within the row, j, score) for the kept entries (``nonzero`` lists them by row)."""
    n = targ.shape[1]
    row = b * n + i
    rows, counts = torch.unique_consecutive(row, return_counts=True)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(row.shape[0], device=row.device) - torch.repeat_interleave(start, counts)
    width = int(counts.max())
    # (rows, width) padded candidates, one float64 GEMV per row: each target row is read once
    cand = torch.full((rows.shape[0], width), -1, dtype=torch.int64, device=row.device)
    cand[torch.repeat_interleave(torch.arange(rows.shape[0], device=row.device), counts), slot] = j
    t = _rows(emb64, targ.flatten()[rows])
    flat = (rows // n)[:, None] * hist.shape[1] + cand.clamp_min(0)  # into hist.flatten()
    h = _rows(emb64, hist.flatten()[flat])
    score = torch.bmm(h, t[:, :, None])[:, :, 0].masked_fill(cand < 0, float("-inf"))
    # (score desc, position desc): sort by position first, then stably by score
    by_pos = torch.argsort(cand, dim=1, descending=True, stable=True)
    order = by_pos.gather(1, torch.argsort(score.gather(1, by_pos), dim=1, descending=True, stable=True))
    kk = min(k, width)
    top_j, top_s = cand.gather(1, order[:, :kk]), score.gather(1, order[:, :kk])
    keep = top_j >= 0
    rank = torch.arange(kk, device=row.device).expand_as(top_j)
    return rows[:, None].expand_as(top_j)[keep], rank[keep], top_j[keep], top_s[keep]


def _finish_torch(scores, bound, emb64, hist, targ, tpos, k):
    """(row, rank, j, score) of every kept entry, in torch ops (any device, no extension)."""
    b, i, j = _survivors(scores, bound, tpos, k)
    return _rescored_topk(emb64, hist, targ, b, i, j, k)


def _finish_cpp(scores, bound, emb64, hist, targ, tpos, k):
    """The same by the C++ op ``topk_rescore`` (csrc/topk_rescore.cpp): one pass per target for its k-th bf16
    score, a second that rescores the survivors in place, no padded gathers."""
    pos, score = ext_op("topk_rescore")(scores, hist, targ, tpos, bound, emb64, k)
    pos, score = pos.flatten(0, 1), score.flatten(0, 1)
    row, rank = torch.nonzero(pos >= 0).unbind(1)
    return row, rank, pos[row, rank], score[row, rank]


def finisher(device: torch.device):
    """The C++ finishing step on the CPU when ``_C`` is built, else the torch one."""
    from ._backend import cpp_unavailable

    return _finish_cpp if cpp_unavailable(device.type) is None else _finish_torch


def prefiltered_topk(emb64, lo, norms, seq_items, seq_offsets, sample_user, sample_pos, k, finish=None):
    """``semantic_topk`` on validated arguments (S > 0, k > 0) with the exact bf16 prefilter;
    ``emb64, lo, norms`` are :func:`prefilter_tables` of the table; ``finish`` is :func:`_finish_cpp` or
    :func:`_finish_torch` (default: :func:`finisher`)."""
    n_samples, d = sample_user.shape[0], emb64.shape[1]
    dev = emb64.device
    finish = finish or finisher(dev)
    pos_out = torch.full((n_samples, k), -1, dtype=torch.int64, device=dev)
    score_out = torch.full((n_samples, k), float("-inf"), dtype=torch.float32, device=dev)
    order, start, count, user, width = _groups(seq_offsets, sample_user, sample_pos)
    by_width = torch.argsort(width, stable=True)
    start, count, user, width = start[by_width], count[by_width], user[by_width], width[by_width]
    for g0, g1 in _batches(width.cpu(), count.cpu(), d):
        group = (start[g0:g1], count[g0:g1], user[g0:g1], width[g0:g1])
        hist, targ, tpos, samples = _padded_indices(order, *group, seq_items, seq_offsets, sample_pos)
        scores = torch.bmm(_rows(lo, targ), _rows(lo, hist).transpose(1, 2))  # (B, n, W) bf16
        row, rank, j, score = finish(scores, row_bounds(norms, targ, d), emb64, hist, targ, tpos, k)
        sample = samples.flatten()[row]
        pos_out[sample, rank] = j
        score_out[sample, rank] = score.to(torch.float32)
    return pos_out, score_out


def _register_ext() -> None:
    @torch.library.register_fake("rellax_fast::topk_rescore")
    def _(scores, hist, targ, tpos, bound, emb64, k):
        shape = (*scores.shape[:2], k)
        return hist.new_empty(shape), emb64.new_empty(shape)


register_ext_hook(_register_ext)
