"""Triton ``semantic_topk``: flash-style causal top-k over packed user histories (varlen, many users per launch).

Algorithm. With torch ops on the device (no host sync) the samples are sorted by flat position
``seq_offsets[u] + p`` (grouping them by user, ascending p) and cut into tiles of BLOCK_M consecutive
samples of one user: the work list (tile start, tile size), longest histories first, padded to an upper
bound of slots that is known from the shapes alone. One program per slot:
  1. loads its BLOCK_M target rows' item ids (seq_items[base + p]);
  2. streams the user's history in tiles of BLOCK_N candidates up to the tile's largest p; for each it
     computes the (BLOCK_M x BLOCK_N) score block with ``tl.dot`` over BLOCK_D slices of d (fp32
     accumulation; bf16/fp16 operands stay in their dtype on the GPU, fp32 uses IEEE precision), and masks
     candidates at or after each target's position (causal) to -inf;
  3. merges the block into a running top-k kept in registers (BLOCK_M x KPAD scores and positions) by K
     selection steps over the union: take the row maximum, among equal maxima the largest position (the
     contract's tie rule), record it, remove it.
  4. writes all k columns of each row (no prefilled output): its K results, -inf entries with position -1,
     and the padding columns beyond the longest prefix.
Cosine is handled by normalising the embedding table (x / max(||x||, 1e-12)) in :func:`prepare_table`;
rellax_fast.ops.topk caches that table per item_emb, so repeated calls do not renormalise.

Memory traffic: per tile, BLOCK_M target rows plus every history row before the tile's largest position
(each embedding row read once per target tile, d·elem bytes), the int64 item ids, and K·12 bytes of output
per sample. Nothing of size S x L is written: the scores live only in registers.

Compiles: KPAD (next power of two of K = min(k, longest prefix)) is the only shape constexpr; K and k are
runtime arguments (not specialised), so new history lengths do not recompile.
Large k: the selection costs K steps per history tile and the BLOCK_M x KPAD state lives in registers
(no spills up to k=256 on sm_90a, ~10 KB per thread at k=1024), so very large k is correct but slow; there
is no two-stage path. The op's backend table limits triton to k <= 256 (rellax_fast.ops.topk.TRITON_MAX_K,
a ``supports`` check): automatic choice takes the CUDA kernel beyond it, a forced triton refuses.
Under TRITON_INTERPRET=1 the dot operands are upcast to fp32 (UPCAST constexpr): the interpreter's bf16
``tl.dot`` is wrong.
"""

if not __name__.startswith("rellax_fast."):
    raise ImportError("rellax-fast Triton kernels are only importable as rellax_fast.kernels.*")


import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from rellax_fast._kernel_common import NORM_EPS, next_power_of_2, triton_interpreting


@triton.jit
def _merge_block(sc, cand_p, top_s, top_p, K, KPAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """The K best of a score block (BLOCK_M x BLOCK_N, positions cand_p) and the running top-k (BLOCK_M x KPAD)
    by K selection steps: the row maximum, among equal maxima the largest position (the tie rule)."""
    kcol = tl.arange(0, KPAD)[None, :]
    new_s = tl.full((BLOCK_M, KPAD), float("-inf"), tl.float32)
    new_p = tl.full((BLOCK_M, KPAD), -1, tl.int32)
    for i in range(0, K):
        m = tl.maximum(tl.max(sc, axis=1), tl.max(top_s, axis=1))
        pick = tl.maximum(
            tl.max(tl.where(sc == m[:, None], cand_p, -1), axis=1),
            tl.max(tl.where(top_s == m[:, None], top_p, -1), axis=1),
        )
        new_s = tl.where(kcol == i, m[:, None], new_s)
        new_p = tl.where(kcol == i, pick[:, None], new_p)
        sc = tl.where(cand_p == pick[:, None], float("-inf"), sc)
        top_s = tl.where(top_p == pick[:, None], float("-inf"), top_s)
    return new_s, new_p


@triton.jit
def _store_rows(
    out_pos_ptr,
    out_score_ptr,
    sample,
    row_ok,
    top_s,
    top_p,
    stride_out,
    KOUT,
    KPAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Write all KOUT columns of each valid row: the top-k (positions of -inf entries as -1), then padding."""
    # columns K..KPAD-1 still hold -inf / -1; columns KPAD..KOUT-1 (k beyond the longest prefix) are padding
    kcol = tl.arange(0, KPAD)[None, :]
    out_p = tl.where(top_s == float("-inf"), -1, top_p).to(tl.int64)
    row_off = sample[:, None].to(tl.int64) * stride_out
    tl.store(out_pos_ptr + row_off + kcol, out_p, mask=row_ok[:, None] & (kcol < KOUT))
    tl.store(out_score_ptr + row_off + kcol, top_s, mask=row_ok[:, None] & (kcol < KOUT))
    pad_p = tl.full((BLOCK_M, KPAD), -1, tl.int64)
    pad_s = tl.full((BLOCK_M, KPAD), float("-inf"), tl.float32)
    for c0 in range(KPAD, KOUT, KPAD):
        cols = c0 + kcol
        mask = row_ok[:, None] & (cols < KOUT)
        tl.store(out_pos_ptr + row_off + cols, pad_p, mask=mask)
        tl.store(out_score_ptr + row_off + cols, pad_s, mask=mask)


@triton.jit(do_not_specialize=["K", "KOUT"])
def _semantic_topk_kernel(
    emb_ptr,
    seq_items_ptr,
    seq_offsets_ptr,
    sample_user_ptr,
    sample_pos_ptr,
    order_ptr,
    tile_start_ptr,
    tile_count_ptr,
    out_pos_ptr,
    out_score_ptr,
    D,
    stride_emb,
    stride_out,
    K,
    KOUT,
    KPAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    start = tl.load(tile_start_ptr + pid)
    count = tl.load(tile_count_ptr + pid)  # 0 for an unused slot of the upper-bound grid: nothing is stored
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < count
    sample = tl.load(order_ptr + start + rows, mask=row_ok, other=0)
    user = tl.load(
        sample_user_ptr + tl.load(order_ptr + start, mask=count > 0, other=0), mask=count > 0, other=0
    )
    base = tl.load(seq_offsets_ptr + user, mask=count > 0, other=0)
    p = tl.load(sample_pos_ptr + sample, mask=row_ok, other=0)
    pmax = tl.max(p, axis=0)
    target_item = tl.load(seq_items_ptr + base + p, mask=row_ok, other=0)

    top_s = tl.full((BLOCK_M, KPAD), float("-inf"), tl.float32)
    top_p = tl.full((BLOCK_M, KPAD), -1, tl.int32)
    for j0 in range(0, pmax, BLOCK_N):
        cand = j0 + tl.arange(0, BLOCK_N)
        cand_ok = cand < pmax
        cand_item = tl.load(seq_items_ptr + base + cand, mask=cand_ok, other=0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dk = d0 + tl.arange(0, BLOCK_D)
            d_ok = dk < D
            t = tl.load(
                emb_ptr + target_item[:, None] * stride_emb + dk[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            c = tl.load(
                emb_ptr + cand_item[None, :] * stride_emb + dk[:, None],
                mask=d_ok[:, None] & cand_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                t = t.to(tl.float32)
                c = c.to(tl.float32)
            if IEEE:
                acc = tl.dot(t, c, acc, input_precision="ieee")
            else:
                acc = tl.dot(t, c, acc)
        valid = (cand[None, :] < p[:, None]) & row_ok[:, None]
        sc = tl.where(valid, acc, float("-inf"))
        cand_p = tl.zeros((BLOCK_M, BLOCK_N), tl.int32) + cand[None, :].to(tl.int32)
        top_s, top_p = _merge_block(sc, cand_p, top_s, top_p, K, KPAD, BLOCK_M)
    _store_rows(out_pos_ptr, out_score_ptr, sample, row_ok, top_s, top_p, stride_out, KOUT, KPAD, BLOCK_M)


def prepare_table(item_emb: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The table the kernel reads: contiguous rows; float64 becomes float32; for cosine each row is divided by
    max(||row||, 1e-12) in float32 and stored back in the input dtype (bf16/fp16 stay 16-bit for the
    tensor-core dot). rellax_fast.ops.topk caches the result per item_emb (identity and version)."""
    emb = item_emb
    if emb.dtype == torch.float64:
        emb = emb.to(torch.float32)
    if normalize:
        e32 = emb.to(torch.float32)
        emb = (e32 / e32.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)).to(emb.dtype)
    return emb.contiguous()


def _tiles(seq_offsets, sample_user, sample_pos, block_m: int):
    """Work list built on the device with no host sync: (order, tile_start, tile_count), all int64.

    Samples sorted by flat position (grouped by user, ascending p), cut into tiles of <= block_m samples of
    one user. The grid size must be known on the host without reading the data, so the list has the upper
    bound S // block_m + min(S, U) slots (each user's run adds at most one partial tile); unused slots have
    count 0 and start 0. Slots are ordered by their largest position, longest prefixes first (load balance).
    """
    n = sample_user.shape[0]
    n_users = seq_offsets.shape[0] - 1
    device = sample_user.device
    flat = seq_offsets[sample_user] + sample_pos
    order = torch.sort(flat, stable=True).indices
    user_sorted = sample_user[order]
    idx = torch.arange(n, device=device)
    new_run = torch.ones(n, dtype=torch.bool, device=device)
    new_run[1:] = user_sorted[1:] != user_sorted[:-1]
    run_start = torch.cummax(torch.where(new_run, idx, 0), 0).values
    is_start = (idx - run_start) % block_m == 0
    tile_of = torch.cumsum(is_start, 0) - 1
    n_slots = min(n, n // block_m + min(n, n_users))
    tile_start = torch.zeros(n_slots, dtype=torch.int64, device=device).scatter_reduce(
        0, tile_of, idx, "amin", include_self=False
    )
    tile_count = torch.zeros(n_slots, dtype=torch.int64, device=device).scatter_add(
        0, tile_of, torch.ones_like(idx)
    )
    last = torch.full((n_slots,), -1, dtype=torch.int64, device=device).scatter_reduce(
        0, tile_of, sample_pos[order], "amax", include_self=False
    )
    by_cost = torch.sort(last, descending=True, stable=True).indices
    return order, tile_start[by_cost].contiguous(), tile_count[by_cost].contiguous()


def _outputs(out, n: int, k: int, device):
    """``out`` checked ((n, k) contiguous int64 and float32 buffers on ``device``), or new empty ones."""
    if out is None:
        return (
            torch.empty((n, k), dtype=torch.int64, device=device),
            torch.empty((n, k), dtype=torch.float32, device=device),
        )
    out_pos, out_score = out
    if (
        out_pos.shape != (n, k)
        or out_pos.dtype != torch.int64
        or out_score.shape != (n, k)
        or out_score.dtype != torch.float32
        or out_pos.device != device
        or out_score.device != device
        or not out_pos.is_contiguous()
        or not out_score.is_contiguous()
    ):
        raise ValueError(
            f"semantic_topk_triton: out must be contiguous ({n}, {k}) int64 and float32 tensors on "
            f"{device}; got {out_pos.dtype} {tuple(out_pos.shape)} on {out_pos.device} and "
            f"{out_score.dtype} {tuple(out_score.shape)} on {out_score.device}"
        )
    return out_pos, out_score


def semantic_topk_triton(
    item_emb,
    seq_items,
    seq_offsets,
    sample_user,
    sample_pos,
    k: int,
    normalize: bool,
    *,
    max_pos: Optional[int] = None,
    prepared: bool = False,
    out=None,
    block_m: int = 16,
    block_n: int = 32,
):
    """Launch helper: validated inputs in, (pos (S,k) int64, score (S,k) float32) out.

    ``max_pos``: max(sample_pos) when the caller already read it (the op's validation does), else one sync
    here. ``prepared``: item_emb is already :func:`prepare_table`'s output. ``out``: optional (pos, score)
    buffers to fill; the kernel writes every entry (no prefill), so poisoned buffers come back fully
    overwritten. Index tensors may be strided or expanded views (made contiguous here: the kernel reads them
    with unit stride). Runs on item_emb's device whatever the current CUDA device is.
    """
    device = item_emb.device
    n = sample_user.shape[0]
    out_pos, out_score = _outputs(out, n, k, device)
    if n == 0 or k == 0:
        return out_pos, out_score
    if max_pos is None:
        max_pos = int(sample_pos.max())
    k_eff = min(k, max_pos)
    emb = item_emb if prepared else prepare_table(item_emb, normalize)
    seq_items, seq_offsets, sample_user, sample_pos = (
        t.contiguous() for t in (seq_items, seq_offsets, sample_user, sample_pos)
    )
    d = emb.shape[1]
    # KPAD is the only shape constexpr (K and k are runtime values): a power of two, so histories of any
    # length compile at most log2(k) variants
    kpad = next_power_of_2(max(1, k_eff))
    block_d = min(64, max(16, next_power_of_2(d)))
    interpreting = triton_interpreting()
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:  # Triton launches on the current device, not the tensors'
        order, tile_start, tile_count = _tiles(seq_offsets, sample_user, sample_pos, block_m)
        _semantic_topk_kernel[(tile_start.shape[0],)](
            emb,
            seq_items,
            seq_offsets,
            sample_user,
            sample_pos,
            order,
            tile_start,
            tile_count,
            out_pos,
            out_score,
            d,
            emb.stride(0),
            out_pos.stride(0),
            k_eff,
            k,
            KPAD=kpad,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            UPCAST=interpreting,
            IEEE=(emb.dtype == torch.float32 and not interpreting),
        )
    return out_pos, out_score
