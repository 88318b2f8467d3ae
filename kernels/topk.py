"""Triton ``semantic_topk``: flash-style causal top-k over packed user histories (varlen, many users per launch).

Algorithm. On the host the samples are sorted by flat position ``seq_offsets[u] + p`` (grouping them by
user, ascending p) and cut into tiles of BLOCK_M consecutive samples of one user: the work list
(tile start, tile size), longest histories first. One program per tile:
  1. loads its BLOCK_M target rows' item ids (seq_items[base + p]);
  2. streams the user's history in tiles of BLOCK_N candidates up to the tile's largest p; for each it
     computes the (BLOCK_M x BLOCK_N) score block with ``tl.dot`` over BLOCK_D slices of d (fp32
     accumulation; bf16/fp16 operands stay in their dtype on the GPU, fp32 uses IEEE precision), and masks
     candidates at or after each target's position (causal) to -inf;
  3. merges the block into a running top-k kept in registers (BLOCK_M x KPAD scores and positions) by K
     selection steps over the union: take the row maximum, among equal maxima the largest position (the
     contract's tie rule), record it, remove it.
  4. writes each row's K results; -inf entries get position -1.
Cosine is handled on the host by normalising the embedding table once (x / max(||x||, 1e-12)).

Memory traffic: per tile, BLOCK_M target rows plus every history row before the tile's largest position
(each embedding row read once per target tile, d·elem bytes), the int64 item ids, and K·12 bytes of output
per sample. Nothing of size S x L is written: the scores live only in registers.

Large k: KPAD is the next power of two of min(k, longest prefix); the selection costs K steps per history
tile, so very large k is correct but slow (no separate two-stage path).
Under TRITON_INTERPRET=1 the dot operands are upcast to fp32 (UPCAST constexpr): the interpreter's bf16
``tl.dot`` is wrong.
"""

if not __name__.startswith("rellax_fast."):
    raise ImportError("rellax-fast Triton kernels are only importable as rellax_fast.kernels.*")


import torch
import triton
import triton.language as tl

from rellax_fast.ops._backend import triton_interpreting

NORM_EPS = 1e-12


@triton.jit
def _semantic_topk_kernel(
    emb_ptr, seq_items_ptr, seq_offsets_ptr, sample_user_ptr, sample_pos_ptr, order_ptr, tile_start_ptr,
    tile_count_ptr, out_pos_ptr, out_score_ptr, D, stride_emb, stride_out,
    K: tl.constexpr, KPAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    start = tl.load(tile_start_ptr + pid)
    count = tl.load(tile_count_ptr + pid)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < count
    sample = tl.load(order_ptr + start + rows, mask=row_ok, other=0)
    user = tl.load(sample_user_ptr + tl.load(order_ptr + start))
    base = tl.load(seq_offsets_ptr + user)
    p = tl.load(sample_pos_ptr + sample, mask=row_ok, other=0)
    pmax = tl.max(p, axis=0)
    target_item = tl.load(seq_items_ptr + base + p, mask=row_ok, other=0)

    kcol = tl.arange(0, KPAD)[None, :]
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
            t = tl.load(emb_ptr + target_item[:, None] * stride_emb + dk[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            c = tl.load(emb_ptr + cand_item[None, :] * stride_emb + dk[:, None],
                        mask=d_ok[:, None] & cand_ok[None, :], other=0.0)
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
        new_s = tl.full((BLOCK_M, KPAD), float("-inf"), tl.float32)
        new_p = tl.full((BLOCK_M, KPAD), -1, tl.int32)
        for i in range(0, K):
            m = tl.maximum(tl.max(sc, axis=1), tl.max(top_s, axis=1))
            pick = tl.maximum(tl.max(tl.where(sc == m[:, None], cand_p, -1), axis=1),
                              tl.max(tl.where(top_s == m[:, None], top_p, -1), axis=1))
            new_s = tl.where(kcol == i, m[:, None], new_s)
            new_p = tl.where(kcol == i, pick[:, None], new_p)
            sc = tl.where(cand_p == pick[:, None], float("-inf"), sc)
            top_s = tl.where(top_p == pick[:, None], float("-inf"), top_s)
        top_s = new_s
        top_p = new_p
    out_p = tl.where(top_s == float("-inf"), -1, top_p).to(tl.int64)
    offs = sample[:, None].to(tl.int64) * stride_out + kcol
    mask = row_ok[:, None] & (kcol < K)
    tl.store(out_pos_ptr + offs, out_p, mask=mask)
    tl.store(out_score_ptr + offs, top_s, mask=mask)


def _tiles(seq_offsets, sample_user, sample_pos, block_m: int):
    """Host work list: sample order sorted by (user, p), tile starts and sizes (longest prefixes first)."""
    n = sample_user.shape[0]
    flat = seq_offsets[sample_user] + sample_pos
    order = torch.sort(flat, stable=True).indices
    user_sorted = sample_user[order]
    idx = torch.arange(n, device=order.device)
    new_run = torch.ones(n, dtype=torch.bool, device=order.device)
    new_run[1:] = user_sorted[1:] != user_sorted[:-1]
    run_id = torch.cumsum(new_run.to(torch.int64), 0) - 1
    run_start = idx[new_run][run_id]
    run_len = torch.bincount(run_id)[run_id]
    rank = idx - run_start
    is_start = rank % block_m == 0
    tile_start = idx[is_start]
    tile_count = torch.clamp(run_len[is_start] - rank[is_start], max=block_m)
    last = sample_pos[order[tile_start + tile_count - 1]]
    by_cost = torch.sort(last, descending=True, stable=True).indices
    return order, tile_start[by_cost].contiguous(), tile_count[by_cost].contiguous()


def semantic_topk_triton(item_emb, seq_items, seq_offsets, sample_user, sample_pos, k: int, normalize: bool,
                         block_m: int = 16, block_n: int = 32):
    """Launch helper: validated inputs in, (pos (S,k) int64, score (S,k) float32) out."""
    device = item_emb.device
    n = sample_user.shape[0]
    out_pos = torch.full((n, k), -1, dtype=torch.int64, device=device)
    out_score = torch.full((n, k), float("-inf"), dtype=torch.float32, device=device)
    if n == 0 or k == 0:
        return out_pos, out_score
    k_eff = min(k, int(sample_pos.max()))
    if k_eff == 0:
        return out_pos, out_score
    emb = item_emb
    if emb.dtype == torch.float64:
        emb = emb.to(torch.float32)
    if normalize:
        e32 = emb.to(torch.float32)
        emb = (e32 / e32.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)).to(emb.dtype)
    emb = emb.contiguous()
    d = emb.shape[1]
    order, tile_start, tile_count = _tiles(seq_offsets, sample_user, sample_pos, block_m)
    kpad = triton.next_power_of_2(k_eff)
    block_d = min(64, max(16, triton.next_power_of_2(d)))
    interpreting = triton_interpreting()
    _semantic_topk_kernel[(tile_start.shape[0],)](
        emb, seq_items, seq_offsets, sample_user, sample_pos, order, tile_start, tile_count, out_pos, out_score,
        d, emb.stride(0), out_pos.stride(0),
        K=k_eff, KPAD=kpad, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        UPCAST=interpreting, IEEE=(emb.dtype == torch.float32 and not interpreting),
    )
    return out_pos, out_score
