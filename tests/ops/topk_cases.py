"""Shared data builders and checks for the semantic_topk tests (reference, cpp, triton, cuda)."""

from __future__ import annotations

import torch

from rellax_fast.ops.topk import normalized_rows, semantic_topk_ref


def ragged_case(
    lengths, n_items: int, d: int, seed: int, device="cpu", dtype=torch.float32, dup_items: bool = True
):
    """Random packed histories; every position of a user with <= 200 items is a sample, samples shuffled.

    ``dup_items``: items are drawn from a small pool so a history repeats items (exact score ties).
    """
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_items, d, generator=gen, dtype=torch.float64)
    emb[0] = 0.0  # an all-zero embedding: cosine 0 with everything (documented rule)
    emb[2] = emb[1] * 3.0  # same direction: exact cosine ties between different items
    offsets = torch.tensor(
        [0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int64
    )
    total = int(offsets[-1])
    pool = max(2, n_items // 4) if dup_items else n_items
    items = torch.randint(0, pool, (total,), generator=gen)
    users = torch.cat(
        [torch.full((n,), u, dtype=torch.int64) for u, n in enumerate(lengths)]
        + [torch.zeros(0, dtype=torch.int64)]
    )
    pos = torch.cat(
        [torch.arange(n, dtype=torch.int64) for n in lengths] + [torch.zeros(0, dtype=torch.int64)]
    )
    # long histories: every 9th position plus the last few (keeps the float64 oracle affordable)
    user_len = torch.tensor(lengths, dtype=torch.int64)[users] if users.numel() else users
    keep = (user_len <= 200) | (pos % 9 == 0) | (pos >= user_len - 3)
    users, pos = users[keep], pos[keep]
    perm = torch.randperm(users.numel(), generator=gen)
    users, pos = users[perm], pos[perm]
    return tuple(t.to(device) for t in (emb.to(dtype), items, offsets, users, pos))


def _strided(t: torch.Tensor, junk) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous view: every third element of a junk-filled buffer (offset 1).

    The junk (out-of-range ids, huge floats) makes a kernel that ignores the stride read wrong values, or
    out of bounds, instead of passing by luck.
    """
    buf = torch.full((t.shape[0], 3) + tuple(t.shape[1:]), junk, dtype=t.dtype, device=t.device)
    buf[:, 1] = t
    view = buf[:, 1]
    assert not view.is_contiguous() or t.shape[0] <= 1
    return view


def _padded_rows(emb: torch.Tensor) -> torch.Tensor:
    """``emb`` as a column slice of a wider junk-filled buffer: row stride d + 5, storage offset 2."""
    n, d = emb.shape
    buf = torch.full((n, d + 5), 1e30, dtype=emb.dtype, device=emb.device)
    buf[:, 2 : 2 + d] = emb
    return buf[:, 2 : 2 + d]


def view_cases(lengths, n_items: int, d: int, seed: int, device="cpu"):
    """Strided and expanded views of the op's inputs: [(name, case)], each case a 5-tuple like ragged_case.

    - "strided": every index tensor is a stride-3 view into junk, item_emb a column slice (row stride d + 5);
    - "column_major": item_emb with transposed storage (stride (1, N)); index tensors contiguous;
    - "expanded": the longest user alone, 7 samples at its last position: sample_user and sample_pos are
      stride-0 expands of one element (item_emb the padded-rows view; an expanded item_emb would make every
      score tie and test nothing).
    """
    emb, items, offsets, users, pos = ragged_case(lengths, n_items, d, seed, device=device)
    strided = (
        _padded_rows(emb),
        _strided(items, 10**9),
        _strided(offsets, -(10**9)),
        _strided(users, 10**9),
        _strided(pos, 10**9),
    )
    column_major = (emb.t().contiguous().t(), items, offsets, users, pos)
    longest = max(range(len(lengths)), key=lambda u: lengths[u])
    n = lengths[longest]
    start = int(offsets[longest])
    one_items = items[start : start + n]
    one_offsets = torch.tensor([0, n], dtype=torch.int64, device=device)
    p = torch.tensor([n - 1], dtype=torch.int64, device=device)
    expanded = (
        _padded_rows(emb),
        one_items,
        one_offsets,
        torch.zeros(1, dtype=torch.int64, device=device).expand(7),
        p.expand(7),
    )
    return [("strided", strided), ("column_major", column_major), ("expanded", expanded)]


def exact_tie_embeddings(d: int = 19) -> torch.Tensor:
    """Four item rows whose dot products and cosines are exact in any summation order, on any CPU or BLAS.

    Each row holds four entries of +1 (norm 2, so a normalised entry is exactly 0.5): every partial sum of a
    dot product is a small multiple of 0.25, which float32 represents exactly. Tests of tie order must use
    such values: with random floats, two "equal" scores computed in different tiles (different BLAS paths,
    different CPU models) can differ in the last bit.
    Rows 1 and 2 overlap in two entries (cosine 0.5, dot 2); row 3 overlaps neither; row 0 is disjoint too.
    """
    if d < 16:
        raise ValueError(f"exact_tie_embeddings needs d >= 16, got {d}")
    emb = torch.zeros(4, d, dtype=torch.float32)
    emb[0, 12:16] = 1.0
    emb[1, 0:4] = 1.0
    emb[2, 2:6] = 1.0
    emb[3, 6:10] = 1.0
    return emb


def oracle(case, k: int, metric: str):
    """float64 reference (pos, score) of a case on the CPU."""
    emb, items, offsets, users, samples = (t.cpu() for t in case)
    return semantic_topk_ref(emb, items, offsets, users, samples, k, metric)


def check_against_reference(result, case, k: int, metric: str, atol: float, ref=None):
    """Compare a backend's (pos, score) with the float64 oracle by gathered scores, modulo exact ties.

    - shapes, dtypes, padding (-1 / -inf exactly where the sample has fewer than k candidates);
    - every returned position is a real candidate (0 <= pos < p) with no repeats in a row;
    - the returned scores match the score recomputed in float64 at the returned position;
    - the float64 score at each returned position matches the oracle's sorted row (so the set is a top-k
      set up to ties within ``atol``), and rows are sorted descending;
    - where the oracle's scores are separated by more than 2*atol, positions must agree exactly.

    ``ref``: a precomputed :func:`oracle` with at least k+1 columns (its rows are full stable sorts, so
    the first k columns are the top-k oracle).
    """
    pos, score = result
    emb, items, offsets, users, samples = (t.cpu() for t in case)
    n = users.numel()
    assert pos.shape == (n, k) and score.shape == (n, k)
    assert pos.dtype == torch.int64 and score.dtype == torch.float32
    pos, score = pos.cpu(), score.cpu()
    if ref is None or ref[0].shape[1] < k + 1:
        ref = oracle(case, k + 1, metric)
    ext_pos, ext_score = ref[0][:, : k + 1], ref[1][:, : k + 1]
    ref_pos, ref_score = ext_pos[:, :k], ext_score[:, :k]
    n_cand = samples.clamp(max=k)
    col = torch.arange(k)[None, :]
    real = col < n_cand[:, None]
    assert torch.equal(pos == -1, ~real), "padding positions (-1) must be exactly the missing candidates"
    assert torch.equal(torch.isneginf(score), ~real), (
        "padding scores (-inf) must be exactly the missing candidates"
    )
    assert bool(((pos < samples[:, None]) | ~real).all()), "a returned position is not before the target"
    if k > 1:
        srt = pos.masked_fill(~real, -1).sort(dim=1).values
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        assert not bool(dup.any()), "a position is returned twice in a row"
    # recompute the score of each returned position in float64
    vec = normalized_rows(emb, torch.float64) if metric == "cosine" else emb.to(torch.float64)
    start = offsets[users]
    target = vec[items[start + samples]]
    flat = start[:, None] + pos.clamp_min(0)
    gathered = torch.empty(flat.shape, dtype=torch.float64)
    step = max(1, (1 << 22) // max(1, k * vec.shape[1]))  # bound the (rows, k, d) gather
    for lo in range(0, n, step):
        gathered[lo : lo + step] = torch.einsum(
            "rkd,rd->rk", vec[items[flat[lo : lo + step]]], target[lo : lo + step]
        )
    gathered = gathered.masked_fill(~real, float("-inf"))
    finite = real
    torch.testing.assert_close(score[finite].double(), gathered[finite], rtol=1e-6, atol=atol)
    torch.testing.assert_close(gathered[finite], ref_score[finite], rtol=1e-6, atol=atol)
    if k > 1:
        sdiff = score[:, :-1] - score[:, 1:]
        assert bool(((sdiff >= 0) | torch.isnan(sdiff)).all()), "rows must be sorted by score, descending"
    # separated scores: positions must match exactly
    gap = torch.full_like(ref_score, float("inf"))
    if k > 1:
        d = (ref_score[:, :-1] - ref_score[:, 1:]).abs().nan_to_num(float("inf"))
        gap[:, :-1] = torch.minimum(gap[:, :-1], d)
        gap[:, 1:] = torch.minimum(gap[:, 1:], d)
    # the k-th entry also competes with the first left-out candidate: compare against a k+1 oracle
    last_gap = (ext_score[:, k - 1] - ext_score[:, k]).abs().nan_to_num(float("inf")) if k > 0 else None
    if k > 0:
        gap[:, k - 1] = torch.minimum(gap[:, k - 1], last_gap)
    clear = real & (gap > 2 * atol)
    assert torch.equal(pos[clear], ref_pos[clear]), "positions differ where the scores are clearly separated"
