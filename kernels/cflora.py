"""Fused Triton forward and backward of CFLoRA: y = x Wᵀ + b + scale·((drop(x) Aᵀ) Cᵀ) Bᵀ.

Owns the Triton kernels of the CFLoRA op and their launchers ``cflora_fwd`` / ``cflora_bwd``, which the
op wrapper ``rellax_fast.ops.cflora`` calls for ``backend="triton"``.

Shapes: x is flattened to (M, d_in) rows; W (d_out, d_in); b (d_out,) or None; A (r, d_in); B (d_out, r);
C is None (identity: the r×r step is skipped), (r, r) shared, or (n_samples, r, r) per sample, where row m
uses C[m // rows_per_sample]. Dropout touches the LoRA path only (inverted scaling 1/(1-p)); its keep-mask
is the shared hash of (seed, m·d_in + k) from csrc/common.h, recomputed wherever drop(x) is needed, so
nothing mask-shaped is ever stored. dropout_p == 0 compiles the hash away (constexpr DROPOUT).

Algorithm and memory traffic (bytes of the dtype; r << d_in, d_out). Every pointer offset is int64.

Forward (2 kernels, +1 for a per-sample C)
  1. _cflora_shrink_kernel, one program per BLOCK_M rows: S = drop(x) Aᵀ by a K-loop over d_in; with a
     shared C also T = S Cᵀ in registers. Reads x once (M·d_in), A from L2; writes S, T (2·M·r).
  1b. _cflora_interact_fwd_kernel (per-sample C only), one program per sample: C[g] read once, T = S C[g]ᵀ
     over that sample's rows. Decode (one row per sample) costs one 16-row dot per sample, not a
     64-row block looping over 64 samples.
  2. _cflora_fwd_gemm_kernel, tiled GEMM over (M, d_out): acc = x Wᵀ over d_in, then the r-wide step
     acc += (scale·T) Bᵀ (BLOCK_RK ranks at a time), then + b, then a single store of y. On sm_90+ with
     16-byte aligned x, W, y (_tma_ok) _cflora_fwd_gemm_tma_kernel does the same through TMA descriptors
     (cp.async.bulk.tensor loads and store) on a persistent grid of one program per SM; USE_TMA = False
     keeps the pointer kernel everywhere.
  Saved for backward: x (the caller's), S, T. Never a d_out- or d_in-sized activation.

Backward
  3. _cflora_dy_pass_kernel, the ONE pass over dY, grid (row blocks, column splits): every dY tile it reads
     gives both its dT contribution (dT = scale·dY B, summed over d_out in fp32 registers) and its dB
     partial (scale·dY_tileᵀ T, final for the program's rows; T's row block is read once per program)
     and db partial (Σ_rows dY). The dB / db partials go to fp32 (row blocks, d_out, r) / (row blocks,
     d_out) buffers, reduced by 3c. Row blocks are tall (256 rows for 16-bit, 64 for fp32) because each
     one costs a partial; column splits fill the SMs instead, each storing its dT partial, and
  3a. _cflora_dt_finish_kernel sums them in a fixed order and finishes dT (_dt_epilogue: with a shared C,
     dS = dT C and dC += dTᵀ S as one r×r fp32 atomic tile per program). dT / dS: (M, r) fp32. (The
     dT-only pass of 4's case finishes dT in the kernel: one split, the epilogue after its loop.)
  3b. _cflora_interact_bwd_kernel (per-sample C only), one program per sample: dS = dT C[g] in place and
     dC[g] = Σ dTᵀ S summed in registers, stored once (no atomics).
  3c. _cflora_partial_sum_kernel: out = Σ_p part[p] in a fixed order (deterministic, no atomics), for the
     dB / db partials and the split-K dA partials of 4.
     Fusing dB pays while its partials (8·r bytes per row block and column, written and read back) cost
     less than the second read of dY they replace, i.e. for BLOCK_M·elt > 8·r (_fuse_db), and the fused
     tile fits its registers (the compile gate): on the GPU r <= 32 (16-bit) or r <= 16 (fp32). Above
     that, dB and db take 4 over dY instead, and the dY pass computes dT only (short row blocks, one split).
  4. _cflora_rank_grad_kernel, split-K GEMM over the M rows (partials per split, reduced by 3c):
     dAᵀ = drop(x)ᵀ dS / (1-p) (the second read of x, mask regenerated); dB = scale·dYᵀ T with db = Σ dY
     only where 3 does not fuse them.
  5. _cflora_dx_kernel, tiled GEMM over (M, d_in): dx = drop'(dS A) + dY W as ONE accumulator: the r-wide
     step first (masked), then the K loop over d_out (the base GEMM's read of dY). On sm_90+ with aligned
     dY, W, dx: _cflora_dx_tma_kernel (TMA descriptors, a persistent grid), as in 2.
  6. _matmul_kernel: dW = dYᵀ x, only when needed (frozen base weights skip it).
  Traffic beyond the frozen linear's own (x, W, b -> y; dy, W -> dx) at the headline shape (bf16,
  M = 16384, d_in = d_out = 4096, r = 16, per-sample C; tests/ops/test_traffic_model.py): x twice (shrink,
  dA) and dY once (the fused pass), plus the r-sized tensors and 17 MB of dB partials (written and read):
  0.457 GB, 1.13x the minimum of 2·|x| + |dY| = 0.403 GB (1.37x when dB read dY again).

Precision (the same on every GPU; the compile gate checks the tensor-core instructions of every dot):
  - bf16 / fp16: every dot, the r×r interaction steps included, takes bf16/fp16 operands on tensor cores
    with fp32 accumulation. S, T are stored in the input dtype; dT and dS are fp32 in memory and rounded
    to the input dtype as dot operands (what a 16-bit autograd holds).
  - fp32 with torch.backends.cuda.matmul.allow_tf32: TF32 (10-bit mantissa operands, fp32 accumulation).
  - fp32 otherwise: 3xTF32 ("tf32x3": hi/lo split, about fp32 accuracy, still on tensor cores). No dot
    runs as fp32 FMA loops ("ieee"), which spilled 100+ KB per thread at r = 128.
  Under TRITON_INTERPRET=1 the dot operands are upcast to fp32 (constexpr UPCAST) after the same rounding,
  because the interpreter's bf16 dot is wrong.
"""

if not __name__.startswith("rellax_fast."):
    raise ImportError("rellax-fast Triton kernels are only importable as rellax_fast.kernels.*")

import contextlib
import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from rellax_fast._kernel_common import (
    CFLORA_TRITON_DTYPES,
    CFLORA_TRITON_MAX_RANK,
    cdiv,
    dropout_key,
    dropout_threshold,
    next_power_of_2,
    triton_interpreting,
)

MAX_RANK = (
    CFLORA_TRITON_MAX_RANK  # one register tile holds a row block of S/T (BLOCK_R = next pow2 >= r, >= 16)
)
_DTYPES = tuple(getattr(torch, name) for name in CFLORA_TRITON_DTYPES)


# ----------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _mix32(x):
    # lowbias32 on uint32: the multiplications wrap mod 2^32 (csrc/common.h)
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _keep_mask(rows, cols, D_IN, KEY, THRESHOLD):
    """Keep-mask of drop(x) for the (rows, cols) tile: hash of (seed, m·d_in + k), same bits as common.h."""
    # the int64 flat index m·d_in + k, split into 32-bit halves without an int64 tile: the row part is
    # int64 per row, the column part (< 2^32) is added to the low word with a carry into the high word
    base = rows * D_IN
    base_lo = (base & 0xFFFFFFFF).to(tl.uint32)[:, None]
    base_hi = (base >> 32).to(tl.uint32)[:, None]
    lo = base_lo + cols.to(tl.uint32)[None, :]
    hi = base_hi + (lo < base_lo).to(tl.uint32)
    h = _mix32(lo ^ _mix32(hi + KEY.to(tl.uint32)))
    return (h >> 8) >= THRESHOLD.to(tl.uint32)


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a 1-D program id to (pid_m, pid_n) in GROUP_M-tall column sweeps, for L2 reuse of the operands."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


# ----------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------
# KEY/THRESHOLD change with every seed: keep them runtime values (no ==1 / %16 specialisation)
@triton.jit(do_not_specialize=["KEY", "THRESHOLD"])
def _cflora_shrink_kernel(
    x_ptr,
    a_ptr,
    c_ptr,
    s_ptr,
    t_ptr,
    M,
    D_IN,
    R,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_ci,
    stride_cj,
    stride_sm,
    stride_sr,
    stride_tm,
    stride_tr,
    KEY,
    THRESHOLD,
    KEEP_SCALE,
    SHARED_C: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """S = drop(x) Aᵀ for BLOCK_M rows; with a shared C also T = S Cᵀ (else T is written by another kernel)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: every pointer offset below is int64
    rank = tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < M
    rank_ok = rank < R

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < D_IN
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if DROPOUT:
            keep = _keep_mask(rows, ks, D_IN, KEY, THRESHOLD)
            x = tl.where(keep, x, tl.zeros_like(x))
        a_t = tl.load(
            a_ptr + rank[None, :] * stride_ar + ks[:, None] * stride_ak,
            mask=k_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )  # (BLOCK_K, BLOCK_R) = Aᵀ tile
        if UPCAST:
            x = x.to(tl.float32)
            a_t = a_t.to(tl.float32)
        acc = tl.dot(x, a_t, acc, input_precision=PRECISION)
    if DROPOUT:
        acc = acc * KEEP_SCALE

    out_mask = row_ok[:, None] & rank_ok[None, :]
    s = acc.to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + rows[:, None] * stride_sm + rank[None, :] * stride_sr, s, mask=out_mask)
    if SHARED_C:
        # T = S Cᵀ on the rounded S, in the input dtype (tensor cores, no fp32 FMA tile); c_t[j, i] = C[i, j]
        c_t = tl.load(
            c_ptr + rank[None, :] * stride_ci + rank[:, None] * stride_cj,
            mask=rank_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            s = s.to(tl.float32)
            c_t = c_t.to(tl.float32)
        t = tl.dot(s, c_t, input_precision=PRECISION)
        tl.store(
            t_ptr + rows[:, None] * stride_tm + rank[None, :] * stride_tr,
            t.to(t_ptr.dtype.element_ty),
            mask=out_mask,
        )


@triton.jit
def _cflora_interact_fwd_kernel(
    s_ptr,
    c_ptr,
    t_ptr,
    ROWS_PER_GROUP,
    R,
    stride_sm,
    stride_sr,
    stride_cg,
    stride_ci,
    stride_cj,
    stride_tm,
    stride_tr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Per-sample C: one program per sample g, T = S C[g]ᵀ over that sample's rows (C[g] read once)."""
    g = tl.program_id(0).to(tl.int64)
    rank = tl.arange(0, BLOCK_R).to(tl.int64)
    rank_ok = rank < R
    c_t = tl.load(
        c_ptr + g * stride_cg + rank[None, :] * stride_ci + rank[:, None] * stride_cj,
        mask=rank_ok[:, None] & rank_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        c_t = c_t.to(tl.float32)
    for m0 in range(0, ROWS_PER_GROUP, BLOCK_M):
        local = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        rows = g * ROWS_PER_GROUP + local
        mask = (local < ROWS_PER_GROUP)[:, None] & rank_ok[None, :]
        s = tl.load(s_ptr + rows[:, None] * stride_sm + rank[None, :] * stride_sr, mask=mask, other=0.0)
        if UPCAST:
            s = s.to(tl.float32)
        t = tl.dot(s, c_t, input_precision=PRECISION)
        tl.store(
            t_ptr + rows[:, None] * stride_tm + rank[None, :] * stride_tr,
            t.to(t_ptr.dtype.element_ty),
            mask=mask,
        )


@triton.jit
def _lora_expand(
    acc,
    t_ptr,
    b_ptr,
    rows,
    cols,
    R,
    stride_tm,
    stride_tr,
    stride_bn,
    stride_br,
    SCALE,
    M,
    N,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_RK: tl.constexpr,
):
    """acc += (SCALE·T) Bᵀ over the tile's rows and cols: r more K columns into the GEMM's accumulator,
    BLOCK_RK ranks at a time (a runtime loop: one chunk's small tiles live at a time)."""
    row_ok = rows < M
    col_ok = cols < N
    for r0 in range(0, R, BLOCK_RK):
        rank = r0 + tl.arange(0, BLOCK_RK).to(tl.int64)
        rank_ok = rank < R
        t = tl.load(
            t_ptr + rows[:, None] * stride_tm + rank[None, :] * stride_tr,
            mask=row_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        b_t = tl.load(
            b_ptr + cols[None, :] * stride_bn + rank[:, None] * stride_br,
            mask=rank_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # (BLOCK_RK, BLOCK_N) = Bᵀ tile
        t = (t.to(tl.float32) * SCALE).to(b_t.dtype)
        if UPCAST:
            t = t.to(tl.float32)
            b_t = b_t.to(tl.float32)
        acc = tl.dot(t, b_t, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _cflora_fwd_gemm_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    t_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_tm,
    stride_tr,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    SCALE,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_RK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_t = tl.load(
            w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # (BLOCK_K, BLOCK_N) = Wᵀ tile
        if UPCAST:
            x = x.to(tl.float32)
            w_t = w_t.to(tl.float32)
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION)

    # the LoRA expand: r more K columns into the same accumulator
    acc = _lora_expand(
        acc,
        t_ptr,
        b_ptr,
        rows,
        cols,
        R,
        stride_tm,
        stride_tr,
        stride_bn,
        stride_br,
        SCALE,
        M,
        N,
        UPCAST,
        PRECISION,
        BLOCK_RK,
    )
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


# TMA + persistent variants of the two big GEMMs (sm_90+, tensors whose base and row strides are 16-byte
# aligned: _tma_ok). x / W / y (forward) and dY / W / dx (dx) move through host-built TensorDescriptors
# (the copy engine fills shared memory: cp.async.bulk.tensor, no address arithmetic in registers, out-of-range
# rows and columns zero-filled on load and clipped on store), and NUM_SMS programs walk the output tiles in
# the same grouped order, so each SM keeps one program resident instead of one per tile. The r-wide LoRA
# steps keep pointer loads: T, B, dS, A are (·, r) tensors whose row stride (r elements) is often not
# 16-byte aligned, and they are a few KB per tile. Without `flatten` (the epilogue/prologue overlap of the
# persistent tutorial): two sibling inner loops per tile, and the plain loop compiles under triton 3.6 too.
@triton.jit
def _cflora_fwd_gemm_tma_kernel(
    x_desc,
    w_desc,
    y_desc,
    bias_ptr,
    t_ptr,
    b_ptr,
    M,
    N,
    K,
    R,
    stride_tm,
    stride_tr,
    stride_bn,
    stride_br,
    SCALE,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_RK: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
):
    """y = x Wᵀ + (SCALE·T) Bᵀ + b over (M, N = d_out) tiles, TMA loads and stores, a persistent grid."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([off_m, k0])
            w = w_desc.load([off_n, k0])  # (BLOCK_N, BLOCK_K): W's rows; the dot takes its transpose
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w.T, acc, input_precision=PRECISION)
        rows = off_m.to(tl.int64) + tl.arange(0, BLOCK_M)
        cols = off_n.to(tl.int64) + tl.arange(0, BLOCK_N)
        acc = _lora_expand(
            acc,
            t_ptr,
            b_ptr,
            rows,
            cols,
            R,
            stride_tm,
            stride_tr,
            stride_bn,
            stride_br,
            SCALE,
            M,
            N,
            UPCAST,
            PRECISION,
            BLOCK_RK,
        )
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


# ----------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _dt_epilogue(
    d_t,
    rows,
    rank,
    row_ok,
    rank_ok,
    c_ptr,
    s_ptr,
    dst_ptr,
    dc_ptr,
    R,
    stride_ci,
    stride_cj,
    stride_sm,
    stride_sr,
    stride_dstm,
    stride_dstr,
    SHARED_C: tl.constexpr,
    NEED_DS: tl.constexpr,
    NEED_DC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The finished dT (fp32, BLOCK_M rows) into dst. With a shared C, dst gets dS = dT C instead and
    dC += dTᵀ S (one r×r fp32 atomic tile per program); otherwise dst keeps dT (dS itself for C = None,
    the input of _cflora_interact_bwd_kernel for a per-sample C)."""
    tile_mask = row_ok[:, None] & rank_ok[None, :]
    if SHARED_C:
        # the r×r steps run in the input dtype (dT rounded to it, as a 16-bit autograd would hold it)
        d_t_lo = d_t.to(c_ptr.dtype.element_ty)
        if UPCAST:
            d_t_lo = d_t_lo.to(tl.float32)
        if NEED_DC:
            s = tl.load(
                s_ptr + rows[:, None] * stride_sm + rank[None, :] * stride_sr, mask=tile_mask, other=0.0
            )
            if UPCAST:
                s = s.to(tl.float32)
            d_c = tl.dot(tl.trans(d_t_lo), s, input_precision=PRECISION)  # (BLOCK_R, BLOCK_R)
            tl.atomic_add(
                dc_ptr + rank[:, None] * R + rank[None, :],
                d_c,
                mask=rank_ok[:, None] & rank_ok[None, :],
                sem="relaxed",
            )
        if NEED_DS:
            c = tl.load(
                c_ptr + rank[:, None] * stride_ci + rank[None, :] * stride_cj,
                mask=rank_ok[:, None] & rank_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                c = c.to(tl.float32)
            d_s = tl.dot(d_t_lo, c, input_precision=PRECISION)
            tl.store(dst_ptr + rows[:, None] * stride_dstm + rank[None, :] * stride_dstr, d_s, mask=tile_mask)
    else:
        tl.store(dst_ptr + rows[:, None] * stride_dstm + rank[None, :] * stride_dstr, d_t, mask=tile_mask)


@triton.jit
def _cflora_dy_pass_kernel(
    dy_ptr,
    b_ptr,
    t_ptr,
    c_ptr,
    s_ptr,
    dst_ptr,
    dc_ptr,
    db_part_ptr,
    dbias_part_ptr,
    M,
    N,
    R,
    COLS_PER_SPLIT,
    stride_dym,
    stride_dyn,
    stride_bn,
    stride_br,
    stride_tm,
    stride_tr,
    stride_ci,
    stride_cj,
    stride_sm,
    stride_sr,
    stride_dsts,
    stride_dstm,
    stride_dstr,
    SCALE,
    NEED_DT: tl.constexpr,
    NEED_DB: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    EPILOGUE: tl.constexpr,
    SHARED_C: tl.constexpr,
    NEED_DS: tl.constexpr,
    NEED_DC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """The one pass over dY. Program (m, split) owns BLOCK_M rows and COLS_PER_SPLIT columns of d_out; each
    dY tile it reads gives its dT contribution (dY B, summed over the columns in fp32) and its dB partial
    (scale·dY_tileᵀ T, BLOCK_N × r, final for these rows) and db partial (Σ_rows dY), stored per row block
    into db_part (n_row_blocks, d_out, r) / dbias_part (n_row_blocks, d_out) and summed afterwards in a
    fixed order by _cflora_partial_sum_kernel. dT: EPILOGUE (the dT-only pass, one split) finishes it here
    (_dt_epilogue); else each split's partial goes to dst[split] (fp32 (splits, M, r)) and
    _cflora_dt_finish_kernel sums them."""
    pid_m = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rank = tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < M
    rank_ok = rank < R
    if NEED_DB:  # T's row block: the right operand of every dB tile of this program, read once
        t = tl.load(
            t_ptr + rows[:, None] * stride_tm + rank[None, :] * stride_tr,
            mask=row_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            t = t.to(tl.float32)

    d_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, COLS_PER_SPLIT, BLOCK_N):
        local = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cols = split * COLS_PER_SPLIT + local
        col_ok = (local < COLS_PER_SPLIT) & (cols < N)
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if NEED_DBIAS:
            tl.store(dbias_part_ptr + pid_m * N + cols, tl.sum(dy.to(tl.float32), axis=0), mask=col_ok)
        if UPCAST:
            dy = dy.to(tl.float32)
        if NEED_DT:
            b = tl.load(
                b_ptr + cols[:, None] * stride_bn + rank[None, :] * stride_br,
                mask=col_ok[:, None] & rank_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                b = b.to(tl.float32)
            d_t = tl.dot(dy, b, d_t, input_precision=PRECISION)
        if NEED_DB:
            d_b = tl.dot(tl.trans(dy), t, input_precision=PRECISION)  # (BLOCK_N, BLOCK_R)
            tl.store(
                db_part_ptr + pid_m * N * R + cols[:, None] * R + rank[None, :],
                d_b * SCALE,
                mask=col_ok[:, None] & rank_ok[None, :],
            )
    if NEED_DT:
        d_t = d_t * SCALE
        if EPILOGUE:
            _dt_epilogue(
                d_t,
                rows,
                rank,
                row_ok,
                rank_ok,
                c_ptr,
                s_ptr,
                dst_ptr,
                dc_ptr,
                R,
                stride_ci,
                stride_cj,
                stride_sm,
                stride_sr,
                stride_dstm,
                stride_dstr,
                SHARED_C,
                NEED_DS,
                NEED_DC,
                UPCAST,
                PRECISION,
            )
        else:
            tl.store(
                dst_ptr + split * stride_dsts + rows[:, None] * stride_dstm + rank[None, :] * stride_dstr,
                d_t,
                mask=row_ok[:, None] & rank_ok[None, :],
            )


@triton.jit
def _cflora_dt_finish_kernel(
    part_ptr,
    c_ptr,
    s_ptr,
    dst_ptr,
    dc_ptr,
    M,
    R,
    SPLITS,
    stride_ci,
    stride_cj,
    stride_sm,
    stride_sr,
    stride_dstm,
    stride_dstr,
    SHARED_C: tl.constexpr,
    NEED_DS: tl.constexpr,
    NEED_DC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dT of BLOCK_M rows = Σ of the dY pass's column-split partials (fp32 (SPLITS, M, r), fixed order),
    then the same epilogue as a one-split dY pass (_dt_epilogue)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rank = tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < M
    rank_ok = rank < R
    offs = rows[:, None] * R + rank[None, :]
    d_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for sp in range(0, SPLITS):
        d_t += tl.load(part_ptr + sp * M * R + offs, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    _dt_epilogue(
        d_t,
        rows,
        rank,
        row_ok,
        rank_ok,
        c_ptr,
        s_ptr,
        dst_ptr,
        dc_ptr,
        R,
        stride_ci,
        stride_cj,
        stride_sm,
        stride_sr,
        stride_dstm,
        stride_dstr,
        SHARED_C,
        NEED_DS,
        NEED_DC,
        UPCAST,
        PRECISION,
    )


@triton.jit
def _cflora_partial_sum_kernel(
    part_ptr,
    out_ptr,
    N,
    R,
    PARTS,
    stride_on,
    stride_or,
    BLOCK: tl.constexpr,
):
    """out (N, R) = Σ_p part[p] over the fp32 partials (PARTS, N, R), in a fixed order (deterministic, no
    atomics): the reduction of the split-K / per-row-block dB, db and dA partials. out may be strided."""
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    ok = idx < N * R
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p in range(0, PARTS):
        acc += tl.load(part_ptr + p * N * R + idx, mask=ok, other=0.0)
    tl.store(out_ptr + (idx // R) * stride_on + (idx % R) * stride_or, acc, mask=ok)


@triton.jit
def _cflora_interact_bwd_kernel(
    dst_ptr,
    s_ptr,
    c_ptr,
    dc_ptr,
    ROWS_PER_GROUP,
    R,
    stride_dstm,
    stride_dstr,
    stride_sm,
    stride_sr,
    stride_cg,
    stride_ci,
    stride_cj,
    NEED_DS: tl.constexpr,
    NEED_DC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Per-sample C: one program per sample g over its rows. Reads dT from dst and overwrites it with
    dS = dT C[g]; dC[g] = Σ dTᵀ S is summed in registers and stored once (no atomics, no zero-fill)."""
    g = tl.program_id(0).to(tl.int64)
    rank = tl.arange(0, BLOCK_R).to(tl.int64)
    rank_ok = rank < R
    rr_mask = rank_ok[:, None] & rank_ok[None, :]
    if NEED_DS:
        c = tl.load(
            c_ptr + g * stride_cg + rank[:, None] * stride_ci + rank[None, :] * stride_cj,
            mask=rr_mask,
            other=0.0,
        )
        if UPCAST:
            c = c.to(tl.float32)
    d_c = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, ROWS_PER_GROUP, BLOCK_M):
        local = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        rows = g * ROWS_PER_GROUP + local
        mask = (local < ROWS_PER_GROUP)[:, None] & rank_ok[None, :]
        d_t = tl.load(
            dst_ptr + rows[:, None] * stride_dstm + rank[None, :] * stride_dstr, mask=mask, other=0.0
        )
        d_t = d_t.to(c_ptr.dtype.element_ty)
        if UPCAST:
            d_t = d_t.to(tl.float32)
        if NEED_DC:
            s = tl.load(s_ptr + rows[:, None] * stride_sm + rank[None, :] * stride_sr, mask=mask, other=0.0)
            if UPCAST:
                s = s.to(tl.float32)
            d_c = tl.dot(tl.trans(d_t), s, d_c, input_precision=PRECISION)
        if NEED_DS:
            d_s = tl.dot(d_t, c, input_precision=PRECISION)
            tl.store(dst_ptr + rows[:, None] * stride_dstm + rank[None, :] * stride_dstr, d_s, mask=mask)
    if NEED_DC:
        tl.store(dc_ptr + g * R * R + rank[:, None] * R + rank[None, :], d_c, mask=rr_mask)


# KEY/THRESHOLD change with every seed: keep them runtime values (no ==1 / %16 specialisation)
@triton.jit(do_not_specialize=["KEY", "THRESHOLD"])
def _cflora_rank_grad_kernel(
    u_ptr,
    v_ptr,
    out_ptr,
    colsum_ptr,
    M,
    N,
    R,
    ROWS_PER_SPLIT,
    stride_um,
    stride_un,
    stride_vm,
    stride_vr,
    SCALE,
    KEY,
    THRESHOLD,
    NEED_OUT: tl.constexpr,
    NEED_COLSUM: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out = SCALE·drop(U)ᵀ V (N, r) and colsum = Σ_rows U, a split-K GEMM over the M rows. Used twice:
    dB = scale·dYᵀ T with db = Σ dY, and dA = dSᵀ drop(x)·1/(1-p) (as its transpose, dAᵀ = drop(x)ᵀ dS).
    Program (n, split) owns a BLOCK_N slice of N and ROWS_PER_SPLIT rows and writes its partial to
    out[split] / colsum[split]; the launcher sums the splits: no atomics, a deterministic result."""
    pid_n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rank = tl.arange(0, BLOCK_R).to(tl.int64)
    col_ok = cols < N
    rank_ok = rank < R
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = split * ROWS_PER_SPLIT
    for m0 in range(0, ROWS_PER_SPLIT, BLOCK_M):
        local = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        rows = first + local
        row_ok = (local < ROWS_PER_SPLIT) & (rows < M)
        u = tl.load(
            u_ptr + rows[:, None] * stride_um + cols[None, :] * stride_un,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if DROPOUT:
            u = tl.where(_keep_mask(rows, cols, N, KEY, THRESHOLD), u, tl.zeros_like(u))
        if NEED_COLSUM:
            colsum += tl.sum(u.to(tl.float32), axis=0)
        if NEED_OUT:
            v = tl.load(
                v_ptr + rows[:, None] * stride_vm + rank[None, :] * stride_vr,
                mask=row_ok[:, None] & rank_ok[None, :],
                other=0.0,
            )
            v = v.to(u_ptr.dtype.element_ty)  # dS arrives as fp32: the dot runs in the input dtype
            if UPCAST:
                u = u.to(tl.float32)
                v = v.to(tl.float32)
            acc = tl.dot(tl.trans(u), v, acc, input_precision=PRECISION)
    if NEED_OUT:
        tl.store(
            out_ptr + split * N * R + cols[:, None] * R + rank[None, :],
            acc * SCALE,
            mask=col_ok[:, None] & rank_ok[None, :],
        )
    if NEED_COLSUM:
        tl.store(colsum_ptr + split * N + cols, colsum, mask=col_ok)


@triton.jit
def _lora_dx_start(
    ds_ptr,
    a_ptr,
    rows,
    cols,
    R,
    M,
    N,
    stride_dsm,
    stride_dsr,
    stride_ar,
    stride_an,
    KEY,
    THRESHOLD,
    KEEP_SCALE,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_RK: tl.constexpr,
):
    """drop'(dS A) for the tile's rows and cols (N = d_in): the dx accumulator's start, BLOCK_RK ranks at a
    time, masked by the keep-mask, so the mask and dS are dead before the long K loop over d_out."""
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_RK):  # a runtime loop: one chunk's tiles live at a time
        rank = r0 + tl.arange(0, BLOCK_RK).to(tl.int64)
        rank_ok = rank < R
        a = tl.load(
            a_ptr + rank[:, None] * stride_ar + cols[None, :] * stride_an,
            mask=rank_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        d_s = tl.load(
            ds_ptr + rows[:, None] * stride_dsm + rank[None, :] * stride_dsr,
            mask=row_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )  # fp32
        # the dot dtype on the GPU (A has dx's dtype); rounded the same when interpreting
        d_s = d_s.to(a.dtype)
        if UPCAST:
            d_s = d_s.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(d_s, a, acc, input_precision=PRECISION)
    if DROPOUT:
        acc = tl.where(_keep_mask(rows, cols, N, KEY, THRESHOLD), acc * KEEP_SCALE, tl.zeros_like(acc))
    return acc


@triton.jit(do_not_specialize=["KEY", "THRESHOLD"])
def _cflora_dx_kernel(
    dy_ptr,
    w_ptr,
    ds_ptr,
    a_ptr,
    dx_ptr,
    M,
    N,
    K,
    R,
    stride_dym,
    stride_dyk,
    stride_wk,
    stride_wn,
    stride_dsm,
    stride_dsr,
    stride_ar,
    stride_an,
    stride_dxm,
    stride_dxn,
    KEY,
    THRESHOLD,
    KEEP_SCALE,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_RK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dx = dY W + drop'(dS A) for one (BLOCK_M, BLOCK_N) tile of (M, d_in), one accumulator.

    The r-wide LoRA step runs FIRST, BLOCK_RK ranks at a time: it starts the accumulator and is masked by
    the keep-mask, so the mask and dS are dead before the long K loop over d_out."""
    # N = d_in (output columns), K = d_out (the base GEMM's reduction)
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N

    acc = _lora_dx_start(
        ds_ptr,
        a_ptr,
        rows,
        cols,
        R,
        M,
        N,
        stride_dsm,
        stride_dsr,
        stride_ar,
        stride_an,
        KEY,
        THRESHOLD,
        KEEP_SCALE,
        DROPOUT,
        UPCAST,
        PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_RK,
    )

    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < K
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + ks[None, :] * stride_dyk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    tl.store(
        dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxn,
        acc.to(dx_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit(do_not_specialize=["KEY", "THRESHOLD"])
def _cflora_dx_tma_kernel(
    dy_desc,
    w_desc,
    dx_desc,
    ds_ptr,
    a_ptr,
    M,
    N,
    K,
    R,
    stride_dsm,
    stride_dsr,
    stride_ar,
    stride_an,
    KEY,
    THRESHOLD,
    KEEP_SCALE,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_RK: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
):
    """dx = dY W + drop'(dS A) over (M, N = d_in) tiles (K = d_out), TMA loads and stores, a persistent grid
    (see _cflora_fwd_gemm_tma_kernel); the masked LoRA step starts each tile's accumulator as in
    _cflora_dx_kernel."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = off_m.to(tl.int64) + tl.arange(0, BLOCK_M)
        cols = off_n.to(tl.int64) + tl.arange(0, BLOCK_N)
        acc = _lora_dx_start(
            ds_ptr,
            a_ptr,
            rows,
            cols,
            R,
            M,
            N,
            stride_dsm,
            stride_dsr,
            stride_ar,
            stride_an,
            KEY,
            THRESHOLD,
            KEEP_SCALE,
            DROPOUT,
            UPCAST,
            PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_RK,
        )
        for k0 in range(0, K, BLOCK_K):
            dy = dy_desc.load([off_m, k0])
            w = w_desc.load([k0, off_n])
            if UPCAST:
                dy = dy.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)
        dx_desc.store([off_m, off_n], acc.to(dx_desc.dtype))


@triton.jit
def _matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C = A B with arbitrary strides (used for dW = dYᵀ x, A given as a transposed view)."""
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = ks < K
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(
        c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
        acc.to(c_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


# ----------------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------------
# One fixed config per kernel and dtype class, checked by the ahead-of-time compile gate
# (tests/ops/test_triton_compile_gate.py) to fit sm_80's 166,912 B and sm_90's 232,448 B of shared memory,
# with no spills on sm_90a and at most 84 B per thread on sm_80 (fp32 at r = 128; BENCHMARKS.md). The big GEMMs use 128x128 tiles and 8 warps for 16-bit operands (a 64-deep K step, a
# 4-stage pipeline of 4 x 32 KB); fp32 operands (3xTF32 keeps hi/lo halves in registers) 128x64 tiles, 8
# warps, a 32-deep K step with 3 stages. The
# r-wide LoRA step of the GEMMs runs BLOCK_RK ranks at a time so that rank 128 adds at most 32 KB.
# Row-block kernels (shrink, the dT-only dY pass) shrink BLOCK_M when M is small so that the grid still covers
# the SMs; the fused dY pass keeps its tall row blocks (each one more costs a dB partial) and splits d_out. Sizes or row strides that are not multiples of 16 (no divisibility hints: d = 1000) get the smaller
# steps of _unaligned, and the fp32 shrink with a cut row block 8 warps, which the gate showed not to spill. Under the interpreter, small blocks keep each program cheap while still exercising multi-block
# paths (edges, K loops, r chunks, split-K partials, cross-program atomics) on the tiny test shapes.
_GPU16 = {
    "shrink": dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3),
    "gemm": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_RK=64, GROUP_M=8, num_warps=8, num_stages=4),
    "dy": dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    "dy_fused": dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, num_stages=3),
    "dt_finish": dict(BLOCK_M=64, num_warps=4, num_stages=1),
    "partial_sum": dict(BLOCK=512, num_warps=4, num_stages=1),
    "rank_grad": dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    "interact": dict(BLOCK_M=64, num_warps=4, num_stages=2),
    "dw": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
}
_GPU32 = {
    "shrink": dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=2),
    "gemm": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, BLOCK_RK=32, GROUP_M=8, num_warps=8, num_stages=3),
    "dy": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "dy_fused": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=3),
    "dt_finish": dict(BLOCK_M=64, num_warps=4, num_stages=1),
    "partial_sum": dict(BLOCK=512, num_warps=4, num_stages=1),
    "rank_grad": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "interact": dict(BLOCK_M=64, num_warps=4, num_stages=2),
    "dw": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
}
_INTERPRET = {
    "shrink": dict(BLOCK_M=16, BLOCK_K=32),
    "gemm": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, BLOCK_RK=16, GROUP_M=2),
    "dy": dict(BLOCK_M=16, BLOCK_N=32),
    "dy_fused": dict(BLOCK_M=16, BLOCK_N=32),
    "dt_finish": dict(BLOCK_M=16),
    "partial_sum": dict(BLOCK=64),
    "rank_grad": dict(BLOCK_M=16, BLOCK_N=32),
    "interact": dict(BLOCK_M=16),
    "dw": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=2),
}
_DEFAULT_SMS = 132  # H100/H200 SXM; the real count is read from the tensor's device when it is on CUDA
_MIN_BLOCK_M = 16  # the smallest tl.dot M


def _config(name: str, dtype: torch.dtype, block_r: int) -> dict:
    if triton_interpreting():
        return dict(_INTERPRET[name])
    cfg = dict((_GPU32 if dtype == torch.float32 else _GPU16)[name])
    if name == "rank_grad" and block_r >= 128:
        cfg["BLOCK_N"] = 64  # the (BLOCK_N, r) fp32 accumulator stays at 64 registers per thread
    if name in ("interact", "shrink", "dy", "dt_finish") and block_r >= 128:
        cfg["num_warps"] = 8  # (r, r) tiles (C, the dC accumulator) at r = 128: spread over 256 threads
    if dtype == torch.float32 and block_r >= 64:
        # fp32 operands at rank >= 64: the r-wide tiles are 2-4x a bf16 r = 64 tile; halve the other side
        # (at r = 64 the 3xTF32 dy pass, dB/dA and shrink spilled 200-1,100 B/thread on sm_80 otherwise)
        cfg.update(
            {
                "shrink": dict(BLOCK_K=32, BLOCK_M=32),
                "dy": dict(BLOCK_N=32, BLOCK_M=32),
                "rank_grad": dict(BLOCK_M=32),
            }.get(name, {})
        )
    if name == "interact" and _big_interaction(dtype, block_r):
        cfg["BLOCK_M"] = 16  # the r×r tiles dominate: keep the row chunk at the dot minimum
    if name == "shrink" and dtype == torch.float32 and block_r >= 64:
        cfg["BLOCK_K"] = 32
    if "BLOCK_RK" in cfg:
        cfg["BLOCK_RK"] = min(cfg["BLOCK_RK"], block_r)
    return cfg


def _unaligned(cfg: dict, changes: dict, *sizes_and_strides: int) -> dict:
    """Apply ``changes`` when a size or row stride is not a multiple of 16 elements (d = 1000): Triton's
    specialisation then gives no divisibility hint, the loads are not vectorised and stay in registers, and
    the aligned tiles spilled on sm_90a (the compile gate): the 16-bit 128x128x64 GEMM tile 136 B/thread at
    255 registers (a 32-deep K step keeps the tile, no spill), the dA split-K tile with dropout 196 B (8 warps:
    206 registers, no spill)."""
    if not triton_interpreting() and any(v % 16 for v in sizes_and_strides):
        cfg.update({k: (min(cfg[k], v) if k.startswith("BLOCK") else v) for k, v in changes.items()})
    return cfg


def _unaligned_k(cfg: dict, *sizes_and_strides: int) -> dict:
    return _unaligned(cfg, {"BLOCK_K": 32}, *sizes_and_strides)


def _small_row_block_warps(cfg: dict, dtype: torch.dtype, block_r: int) -> dict:
    """fp32 (3xTF32) shrink at r >= 64 with the row block cut below 64 (M = 8192: 32 rows) spilled 16 B on
    sm_90a at 4 warps (capped at 128 registers); 8 warps need 76 and do not spill (the compile gate)."""
    if not triton_interpreting() and dtype == torch.float32 and block_r >= 64 and cfg["BLOCK_M"] < 64:
        cfg["num_warps"] = max(cfg["num_warps"], 8)
    return cfg


def _big_interaction(dtype: torch.dtype, block_r: int) -> bool:
    """r×r tiles too big to hold C and the dC accumulator in registers together (3xTF32 doubles fp32's)."""
    return block_r >= 128 or (dtype == torch.float32 and block_r >= 32)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _sms(device: torch.device) -> int:
    """The SM count of a CUDA device; _DEFAULT_SMS for CPU tensors (the compile gate's captured launches)."""
    if device.type != "cuda":
        return _DEFAULT_SMS
    return _sm_count(_cuda_index(device))


# The GPU that launches on CPU tensors describe (the compile gate's captured launches, the interpreter's tests):
# an H100, as _DEFAULT_SMS. The gate sets 80 to capture what an A100 launches.
_CPU_CAPABILITY = 90
# The TMA + persistent GEMMs where _tma_ok allows them; False forces the pointer GEMMs everywhere (an A/B on a
# GPU: scripts/gpu_lean.py's "triton, no TMA" row).
USE_TMA = True


@functools.cache
def _cuda_capability(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def _capability(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_CAPABILITY
    return _cuda_capability(_cuda_index(device))


def _tma_ok(device: torch.device, *tensors: torch.Tensor) -> bool:
    """TMA descriptors for these 2-D tensors: sm_90+, and each non-empty with unit column stride, rows that do
    not overlap, and its base and row stride 16-byte aligned (what cuTensorMapEncodeTiled requires)."""
    if not USE_TMA or _capability(device) < 90:
        return False
    return all(
        t.numel() > 0
        and t.stride(1) == 1
        and t.stride(0) >= t.shape[1]
        and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
        for t in tensors
    )


def _persistent_programs(device: torch.device) -> int:
    """Programs of a persistent grid: one per SM; 2 under the interpreter, so each walks several tiles."""
    return 2 if triton_interpreting() else _sms(device)


def _row_block(cfg: dict, m: int, device: torch.device) -> dict:
    """Halve BLOCK_M (down to 16) while the row grid would leave SMs idle: M = 2048 gives 128 CTAs, not 32."""
    if triton_interpreting():
        return cfg
    sms = _sms(device)
    while cfg["BLOCK_M"] > _MIN_BLOCK_M and cdiv(m, cfg["BLOCK_M"]) < sms:
        cfg["BLOCK_M"] //= 2
    return cfg


def _interact_block_m(cfg: dict, rows_per_group: int) -> dict:
    """The per-sample r×r kernels step over one sample's rows: decode (1 row) needs only the 16-row minimum."""
    cfg["BLOCK_M"] = max(_MIN_BLOCK_M, min(cfg["BLOCK_M"], next_power_of_2(max(rows_per_group, 1))))
    return cfg


def _splits(m: int, n_col_blocks: int, block_m: int) -> int:
    """Split-K over rows for the dB / dA GEMMs: enough programs for ~2 waves, each at least 4 row blocks deep."""
    if triton_interpreting():
        return min(2, cdiv(m, block_m))  # exercise the partial-sum path on small shapes
    want = cdiv(2 * _DEFAULT_SMS, n_col_blocks)
    return max(1, min(want, cdiv(m, 4 * block_m)))


def _block_r(r: int) -> int:
    return max(16, next_power_of_2(r))


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision. 16-bit operands ignore it (native bf16/fp16 MMA); fp32 operands get TF32 when
    torch allows it, else 3xTF32 (hi/lo split, close to fp32 accuracy, still on tensor cores)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device for the launches."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _dropout_args(dropout_p: float, seed: Optional[int]) -> Tuple[bool, int, int, float]:
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"cflora (triton): dropout_p must be in [0, 1); got {dropout_p}")
    if dropout_p == 0.0:
        return False, 0, 0, 1.0
    if seed is None:
        raise ValueError("cflora (triton): dropout_p > 0 needs an integer seed; got seed=None")
    return True, dropout_key(int(seed)), dropout_threshold(float(dropout_p)), 1.0 / (1.0 - float(dropout_p))


def _interaction_groups(
    interaction: Optional[torch.Tensor], m: int, rows_per_sample: int
) -> Tuple[int, tuple]:
    """(number of C groups, (stride_g, stride_i, stride_j)) for the three C shapes."""
    if interaction is None:
        return 1, (0, 0, 0)
    if interaction.dim() == 2:
        return 1, (0, interaction.stride(0), interaction.stride(1))
    n = interaction.shape[0]
    # rows_per_sample == 0 is x (B, 0, d_in): no rows, an empty result (and a zero dC), like the reference
    if rows_per_sample < 0 or n * rows_per_sample != m:
        raise ValueError(
            f"cflora (triton): per-sample interaction of shape {tuple(interaction.shape)} needs "
            f"n_samples * rows_per_sample == M; got {n} * {rows_per_sample} != {m}"
        )
    return n, tuple(interaction.stride())


def _check(x2d, weight, lora_a, lora_b, interaction) -> Tuple[int, int, int, int]:
    if x2d.dim() != 2:
        raise ValueError(f"cflora (triton): x2d must be 2-D (M, d_in); got shape {tuple(x2d.shape)}")
    if x2d.dtype not in _DTYPES:
        raise TypeError(f"cflora (triton): x must be float32, float16 or bfloat16; got {x2d.dtype}")
    m, d_in = x2d.shape
    d_out = weight.shape[0]
    r = lora_a.shape[0]
    if weight.shape != (d_out, d_in):
        raise ValueError(f"cflora (triton): weight must be (d_out, {d_in}); got {tuple(weight.shape)}")
    if lora_a.shape != (r, d_in):
        raise ValueError(f"cflora (triton): lora_a must be (r, {d_in}); got {tuple(lora_a.shape)}")
    if lora_b.shape != (d_out, r):
        raise ValueError(f"cflora (triton): lora_b must be ({d_out}, {r}); got {tuple(lora_b.shape)}")
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"cflora (triton): rank r must be in [1, {MAX_RANK}]; got {r}")
    if interaction is not None and tuple(interaction.shape[-2:]) != (r, r):
        raise ValueError(
            f"cflora (triton): interaction must be ({r}, {r}) or (n, {r}, {r}); "
            f"got {tuple(interaction.shape)}"
        )
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("interaction", interaction)):
        if t is not None and (t.dtype != x2d.dtype or t.device != x2d.device):
            raise TypeError(
                f"cflora (triton): {name} must be {x2d.dtype} on {x2d.device} like x; "
                f"got {t.dtype} on {t.device}"
            )
    return m, d_in, d_out, r


class _Run(NamedTuple):
    """What every launch of one cflora_fwd / cflora_bwd call shares."""

    dtype: torch.dtype
    device: torch.device
    upcast: bool  # the interpreter: dot operands upcast to fp32 after the same rounding
    precision: str
    block_r: int
    dropout: bool
    key: int
    threshold: int
    keep_scale: float
    shared_c: bool
    per_sample_c: bool
    groups: int  # number of C matrices (1 for None / shared)
    c_strides: tuple  # (stride_g, stride_i, stride_j) of C, zeros for None
    c_arg: torch.Tensor  # C, or a never-read stand-in (lora_a) when there is none
    dummy: torch.Tensor  # a stand-in for pointer arguments that a constexpr flag leaves unread


def _run_args(x2d, lora_a, interaction, m, rows_per_sample, dropout_p, seed) -> _Run:
    dropout, key, threshold, keep_scale = _dropout_args(dropout_p, seed)
    groups, c_strides = _interaction_groups(interaction, m, rows_per_sample)
    return _Run(
        dtype=x2d.dtype,
        device=x2d.device,
        upcast=triton_interpreting(),
        precision=_precision(x2d.dtype),
        block_r=_block_r(lora_a.shape[0]),
        dropout=dropout,
        key=key,
        threshold=threshold,
        keep_scale=keep_scale,
        shared_c=interaction is not None and interaction.dim() == 2,
        per_sample_c=interaction is not None and interaction.dim() == 3,
        groups=groups,
        c_strides=c_strides,
        c_arg=interaction if interaction is not None else lora_a,
        dummy=lora_a,
    )


def _partial_sum(part: torch.Tensor, out: torch.Tensor, run: _Run) -> None:
    """out (N, R) or (N,) = Σ_p part[p] for fp32 partials part (P, N[, R]), in a fixed order (deterministic)."""
    out2d = out if out.dim() == 2 else out.unsqueeze(1)
    n, r = out2d.shape
    if part.shape[0] == 0 or n * r == 0:
        out.zero_()
        return
    cfg = _config("partial_sum", run.dtype, run.block_r)
    _cflora_partial_sum_kernel[(cdiv(n * r, cfg["BLOCK"]),)](
        part, out2d, n, r, part.shape[0], out2d.stride(0), out2d.stride(1), **cfg
    )


def _rank_grad(u, v, out, colsum, scale, dropout, run: _Run) -> None:
    """out (N, r) = scale·drop(u)ᵀ v and colsum (N,) = Σ_rows u via _cflora_rank_grad_kernel (split-K over
    the M rows of u (M, N) and v (M, r); partials summed by _partial_sum in a fixed order). out may be a
    strided view."""
    m, n = u.shape
    r = v.shape[1]
    if m == 0:
        for buf in (out, colsum):
            if buf is not None:
                buf.zero_()
        return
    f32 = torch.float32
    cfg = _config("rank_grad", u.dtype, run.block_r)
    if dropout:  # the keep-mask on an unaligned u (no %16 hints) spilled at 4 warps: see _unaligned
        cfg = _unaligned(cfg, {"num_warps": 8}, n, u.stride(0))
    n_col = cdiv(n, cfg["BLOCK_N"])
    splits = _splits(m, n_col, cfg["BLOCK_M"])
    rows_per_split = cdiv(cdiv(m, splits), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    splits = cdiv(m, rows_per_split)
    out_part = torch.empty((splits, n, r), dtype=f32, device=u.device) if out is not None else None
    colsum_part = torch.empty((splits, n), dtype=f32, device=u.device) if colsum is not None else None
    _cflora_rank_grad_kernel[(n_col, splits)](
        u,
        v,
        out_part if out is not None else run.dummy,
        colsum_part if colsum is not None else run.dummy,
        m,
        n,
        r,
        rows_per_split,
        u.stride(0),
        u.stride(1),
        v.stride(0),
        v.stride(1),
        float(scale),
        run.key,
        run.threshold,
        NEED_OUT=out is not None,
        NEED_COLSUM=colsum is not None,
        DROPOUT=dropout,
        UPCAST=run.upcast,
        PRECISION=run.precision,
        BLOCK_R=run.block_r,
        **cfg,
    )
    for part, buf in ((out_part, out), (colsum_part, colsum)):
        if buf is not None:
            _partial_sum(part, buf, run)


# ----------------------------------------------------------------------------------------------------
# forward launcher
# ----------------------------------------------------------------------------------------------------
def cflora_fwd(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    interaction: Optional[torch.Tensor],
    rows_per_sample: int,
    scale: float,
    dropout_p: float,
    seed: Optional[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: returns (y (M, d_out), S (M, r), T (M, r)), all in x's dtype; S and T are saved for backward.

    Inputs may be any strided or expanded views (the kernels take strides); outputs are contiguous.
    """
    m, d_in, d_out, r = _check(x2d, weight, lora_a, lora_b, interaction)
    if bias is not None and (bias.shape != (d_out,) or bias.device != x2d.device):
        raise ValueError(
            f"cflora (triton): bias must be ({d_out},) on {x2d.device}; "
            f"got {tuple(bias.shape)} on {bias.device}"
        )
    run = _run_args(x2d, lora_a, interaction, m, rows_per_sample, dropout_p, seed)
    y = torch.empty((m, d_out), dtype=x2d.dtype, device=x2d.device)
    s = torch.empty((m, r), dtype=x2d.dtype, device=x2d.device)
    t = torch.empty((m, r), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return y, s, t
    with _device_guard(x2d):
        _launch_shrink(run, x2d, lora_a, s, t)
        if run.per_sample_c:
            _launch_interact_fwd(run, s, interaction, t, rows_per_sample)
        elif interaction is None:
            t.copy_(s)  # T = S; a separate tensor because the custom op's outputs must not alias
        _launch_fwd_gemm(run, x2d, weight, bias, t, lora_b, y, scale)
    return y, s, t


def _launch_shrink(run: _Run, x2d, lora_a, s, t) -> None:
    """S = drop(x) Aᵀ (and T = S Cᵀ for a shared C), one program per row block."""
    m, d_in = x2d.shape
    cfg = _row_block(_config("shrink", run.dtype, run.block_r), m, run.device)
    cfg = _small_row_block_warps(cfg, run.dtype, run.block_r)
    _cflora_shrink_kernel[(cdiv(m, cfg["BLOCK_M"]),)](
        x2d,
        lora_a,
        run.c_arg,
        s,
        t,
        m,
        d_in,
        lora_a.shape[0],
        x2d.stride(0),
        x2d.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        run.c_strides[1],
        run.c_strides[2],
        s.stride(0),
        s.stride(1),
        t.stride(0),
        t.stride(1),
        run.key,
        run.threshold,
        run.keep_scale,
        SHARED_C=run.shared_c,
        DROPOUT=run.dropout,
        UPCAST=run.upcast,
        PRECISION=run.precision,
        BLOCK_R=run.block_r,
        **cfg,
    )


def _launch_interact_fwd(run: _Run, s, interaction, t, rows_per_sample: int) -> None:
    """Per-sample C: T = S C[g]ᵀ, one program per sample."""
    cfg = _interact_block_m(_config("interact", run.dtype, run.block_r), rows_per_sample)
    _cflora_interact_fwd_kernel[(run.groups,)](
        s,
        interaction,
        t,
        rows_per_sample,
        s.shape[1],
        s.stride(0),
        s.stride(1),
        *run.c_strides,
        t.stride(0),
        t.stride(1),
        UPCAST=run.upcast,
        PRECISION=run.precision,
        BLOCK_R=run.block_r,
        **cfg,
    )


def _launch_fwd_gemm(run: _Run, x2d, weight, bias, t, lora_b, y, scale: float) -> None:
    """y = x Wᵀ + (scale·T) Bᵀ + b, one tiled GEMM."""
    if _tma_ok(run.device, x2d, weight, y):
        return _launch_fwd_gemm_tma(run, x2d, weight, bias, t, lora_b, y, scale)
    m, d_in = x2d.shape
    d_out = weight.shape[0]
    cfg = _unaligned_k(_config("gemm", run.dtype, run.block_r), d_in, x2d.stride(0), weight.stride(0))
    grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(d_out, cfg["BLOCK_N"]),)
    _cflora_fwd_gemm_kernel[grid](
        x2d,
        weight,
        bias.contiguous() if bias is not None else weight,
        t,
        lora_b,
        y,
        m,
        d_out,
        d_in,
        t.shape[1],
        x2d.stride(0),
        x2d.stride(1),
        weight.stride(0),
        weight.stride(1),
        t.stride(0),
        t.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        y.stride(0),
        y.stride(1),
        float(scale),
        HAS_BIAS=bias is not None,
        UPCAST=run.upcast,
        PRECISION=run.precision,
        **cfg,
    )


def _launch_fwd_gemm_tma(run: _Run, x2d, weight, bias, t, lora_b, y, scale: float) -> None:
    """_launch_fwd_gemm through TMA descriptors on a persistent grid (the %16 BLOCK_K cut of _unaligned_k is
    for the pointer loads' missing divisibility hints; the descriptors' loads need none)."""
    m, d_in = x2d.shape
    d_out = weight.shape[0]
    cfg = _config("gemm", run.dtype, run.block_r)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    programs = _persistent_programs(run.device)
    grid = (min(programs, cdiv(m, bm) * cdiv(d_out, bn)),)
    _cflora_fwd_gemm_tma_kernel[grid](
        TensorDescriptor.from_tensor(x2d, [bm, bk]),
        TensorDescriptor.from_tensor(weight, [bn, bk]),
        TensorDescriptor.from_tensor(y, [bm, bn]),
        bias.contiguous() if bias is not None else weight,
        t,
        lora_b,
        m,
        d_out,
        d_in,
        t.shape[1],
        t.stride(0),
        t.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        float(scale),
        HAS_BIAS=bias is not None,
        UPCAST=run.upcast,
        PRECISION=run.precision,
        NUM_SMS=programs,
        **cfg,
    )


# ----------------------------------------------------------------------------------------------------
# backward launcher
# ----------------------------------------------------------------------------------------------------
class _Grads(NamedTuple):
    """The backward's fp32 (dA, dB, db, dC) or input-dtype (dx, dW) outputs, None where not needed, and
    d_st: dT, then (in place) dS, as fp32 (M, r)."""

    dx: Optional[torch.Tensor]
    dweight: Optional[torch.Tensor]
    dbias: Optional[torch.Tensor]
    dlora_a: Optional[torch.Tensor]
    dlora_b: Optional[torch.Tensor]
    d_c: Optional[torch.Tensor]
    d_st: Optional[torch.Tensor]


def cflora_bwd(
    grad_y2d: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    interaction: Optional[torch.Tensor],
    s: torch.Tensor,
    t: torch.Tensor,
    rows_per_sample: int,
    scale: float,
    dropout_p: float,
    seed: Optional[int],
    needs_grad: Sequence[bool],
) -> Tuple[Optional[torch.Tensor], ...]:
    """Backward: (dx, dweight, dbias, dlora_a, dlora_b, dinteraction); None where needs_grad is False.

    ``needs_grad`` lists 6 bools in that order. The dropout mask is regenerated from (dropout_p, seed).
    Inputs may be any strided or expanded views.
    """
    m, d_in, d_out, r = _check(x2d, weight, lora_a, lora_b, interaction)
    if len(needs_grad) != 6:
        raise ValueError(f"cflora (triton): needs_grad must hold 6 bools; got {len(needs_grad)}")
    for name, ten, shape in (("grad_y", grad_y2d, (m, d_out)), ("s", s, (m, r)), ("t", t, (m, r))):
        if tuple(ten.shape) != shape or ten.device != x2d.device:
            raise ValueError(
                f"cflora (triton): {name} must be {shape} on {x2d.device}; "
                f"got {tuple(ten.shape)} on {ten.device}"
            )
    run = _run_args(x2d, lora_a, interaction, m, rows_per_sample, dropout_p, seed)
    g = _alloc_grads(run, x2d, weight, lora_a, interaction, [bool(v) for v in needs_grad])
    if grad_y2d.dtype != run.dtype:
        grad_y2d = grad_y2d.to(run.dtype)
    need_ds = g.dx is not None or g.dlora_a is not None
    with _device_guard(x2d):
        _dy_pass(run, grad_y2d, lora_b, t, s, g, scale, need_ds)
        if run.per_sample_c and m > 0 and g.d_st is not None:
            _launch_interact_bwd(run, g, s, interaction, rows_per_sample, need_ds)
        if g.dlora_a is not None:  # dAᵀ = drop(x)ᵀ dS / (1 - p): (d_in, r), into the transposed view of dA
            _rank_grad(x2d, g.d_st, g.dlora_a.T, None, run.keep_scale, run.dropout, run)
        if g.dx is not None and m > 0:
            _launch_dx(run, grad_y2d, weight, g.d_st, lora_a, g.dx)
        if g.dweight is not None:
            _launch_dw(run, grad_y2d, x2d, g.dweight)
    d_c = g.d_c
    if d_c is not None:
        d_c = (d_c[0] if interaction.dim() == 2 else d_c).to(interaction.dtype)
    return (
        g.dx,
        g.dweight,
        g.dbias.to(weight.dtype) if g.dbias is not None else None,
        g.dlora_a.to(lora_a.dtype) if g.dlora_a is not None else None,
        g.dlora_b.to(lora_b.dtype) if g.dlora_b is not None else None,
        d_c,
    )


def _alloc_grads(run: _Run, x2d, weight, lora_a, interaction, needs: Sequence[bool]) -> _Grads:
    need_dx, need_dw, need_dbias, need_da, need_db, need_dc = needs
    need_dc = need_dc and interaction is not None
    (m, d_in), d_out, r = x2d.shape, weight.shape[0], lora_a.shape[0]
    dev, f32 = run.device, torch.float32
    need_dt = need_dx or need_da or need_dc
    d_c = None
    if need_dc:  # shared C: atomics into a zeroed tile; per-sample: every C[g] is stored once
        alloc = torch.zeros if run.shared_c or m == 0 else torch.empty
        d_c = alloc((run.groups, r, r), dtype=f32, device=dev)
    return _Grads(
        dx=torch.empty((m, d_in), dtype=run.dtype, device=dev) if need_dx else None,
        dweight=torch.empty((d_out, d_in), dtype=weight.dtype, device=dev) if need_dw else None,
        dbias=torch.empty((d_out,), dtype=f32, device=dev) if need_dbias else None,
        dlora_a=torch.empty((r, d_in), dtype=f32, device=dev) if need_da else None,
        dlora_b=torch.empty((d_out, r), dtype=f32, device=dev) if need_db else None,
        d_c=d_c,
        d_st=torch.empty((m, r), dtype=f32, device=dev) if need_dt else None,
    )


def _fuse_db(m: int, d_out: int, r: int, block_m: int, block_r: int, elt: int) -> bool:
    """Compute dB (and db) in the dY pass when its per-row-block fp32 partials (written, then read by the
    reduction: 8·r bytes per row block and column) cost less than the second read of dY they replace
    (elt bytes per row and column), and the rank fits the fused tile's registers (the compile gate: 16-bit
    up to BLOCK_R 32; fp32's 3xTF32 hi/lo halves spilled 236 B/thread at 32). Under the interpreter always
    (its small blocks would never pass the first test, and the fused kernel is what it must check)."""
    if triton_interpreting():
        return True
    return block_r <= (32 if elt == 2 else 16) and 8 * r * cdiv(m, block_m) * d_out < elt * m * d_out


def _fused_dy_config(run: _Run, grad_y) -> dict:
    """The fused dY pass's tile: tall row blocks (few dB partials), cut to the rows there are; 16-bit without
    %16 hints (d = 1000) 128 rows (the compile gate: 255 registers and 96 B of spills at 256 rows on sm_90a).
    fp32 (3xTF32 hi/lo halves) keeps 64 rows: 128 spilled 32-40 B on sm_90a and 84 B on sm_80."""
    m, d_out = grad_y.shape
    cfg = _config("dy_fused", run.dtype, run.block_r)
    if run.dtype != torch.float32:
        cfg = _unaligned(cfg, {"BLOCK_M": 128}, d_out, grad_y.stride(0))
    cfg["BLOCK_M"] = max(_MIN_BLOCK_M, min(cfg["BLOCK_M"], next_power_of_2(max(m, 1))))
    return cfg


def _col_splits(n_row_blocks: int, n_col_blocks: int, device: torch.device) -> int:
    """Column splits of the fused dY pass: enough programs to cover the SMs (its row blocks are tall, so
    few), at most one per column block. The interpreter takes 2 to exercise the dT partial path."""
    if triton_interpreting():
        return min(2, n_col_blocks)
    return max(1, min(cdiv(_sms(device), n_row_blocks), n_col_blocks))


class _DyPlan(NamedTuple):
    """How one dY pass runs: its config, the column splits, and where dT and the dB / db partials go."""

    cfg: dict
    splits: int
    cols_per_split: int
    epilogue: bool  # dT finished in the dY pass (dT only, one split) rather than by the finish kernel
    dt_out: Optional[torch.Tensor]  # (splits, M, r) fp32 partials; d_st itself (unsqueezed) with epilogue
    db_part: Optional[torch.Tensor]  # (row blocks, d_out, r) fp32 when dB is fused
    dbias_part: Optional[torch.Tensor]  # (row blocks, d_out) fp32 when db is fused


def _dy_pass(run: _Run, grad_y, lora_b, t, s, g: _Grads, scale: float, need_ds: bool) -> None:
    """The dY pass: dT into g.d_st (dS for a shared C, with dC), and dB / db fused into the same read of dY
    when _fuse_db says so; otherwise dB / db by _rank_grad (a second read of dY)."""
    m, d_out = grad_y.shape
    want_db = g.dlora_b is not None or g.dbias is not None
    fused_cfg = _fused_dy_config(run, grad_y)
    elt = grad_y.element_size()
    fuse = want_db and m > 0 and _fuse_db(m, d_out, t.shape[1], fused_cfg["BLOCK_M"], run.block_r, elt)
    if want_db and not fuse:
        _rank_grad(grad_y, t, g.dlora_b, g.dbias, float(scale), False, run)
    if m == 0 or not (g.d_st is not None or fuse):
        return
    plan = _plan_dy_pass(run, m, d_out, t.shape[1], g, fused_cfg if fuse else None)
    _launch_dy_pass(run, plan, grad_y, lora_b, t, s, g, scale, need_ds)
    if plan.dt_out is not None and not plan.epilogue:
        _launch_dt_finish(run, plan.dt_out, s, g, need_ds)
    for part, buf in ((plan.db_part, g.dlora_b), (plan.dbias_part, g.dbias)):
        if part is not None:
            _partial_sum(part, buf, run)


def _plan_dy_pass(run: _Run, m: int, d_out: int, r: int, g: _Grads, fused_cfg: Optional[dict]) -> _DyPlan:
    """Fused (fused_cfg given): tall row blocks, never cut (each one more costs a dB partial), column splits
    to fill the SMs, dT partials per split summed by the finish kernel (the in-kernel epilogue on top of the
    fused tile spilled 360-600 B/thread in fp32). dT only: today's row blocks, cut by _row_block to fill the
    SMs, one split, dT finished in the kernel."""
    if fused_cfg is not None:
        cfg = fused_cfg
        n_rb = cdiv(m, cfg["BLOCK_M"])
        splits = _col_splits(n_rb, cdiv(d_out, cfg["BLOCK_N"]), run.device)
    else:
        cfg = _row_block(_config("dy", run.dtype, run.block_r), m, run.device)
        n_rb, splits = cdiv(m, cfg["BLOCK_M"]), 1
    cols_per_split = cdiv(cdiv(d_out, splits), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    splits = cdiv(d_out, cols_per_split)
    f32, dev, fuse = torch.float32, run.device, fused_cfg is not None
    dt_out = None
    if g.d_st is not None:  # the epilogue finishes dT in the kernel, into d_st itself
        dt_out = torch.empty((splits, m, r), dtype=f32, device=dev) if fuse else g.d_st.unsqueeze(0)
    return _DyPlan(
        cfg=cfg,
        splits=splits,
        cols_per_split=cols_per_split,
        epilogue=not fuse,
        dt_out=dt_out,
        db_part=torch.empty((n_rb, d_out, r), dtype=f32, device=dev)
        if fuse and g.dlora_b is not None
        else None,
        dbias_part=torch.empty((n_rb, d_out), dtype=f32, device=dev)
        if fuse and g.dbias is not None
        else None,
    )


def _launch_dy_pass(run: _Run, plan: _DyPlan, grad_y, lora_b, t, s, g: _Grads, scale, need_ds) -> None:
    """_cflora_dy_pass_kernel over (row blocks, column splits), as planned."""
    m, d_out = grad_y.shape
    dt_out, db_part, dbias_part, cfg = plan.dt_out, plan.db_part, plan.dbias_part, plan.cfg
    need_dt = dt_out is not None
    _cflora_dy_pass_kernel[(cdiv(m, cfg["BLOCK_M"]), plan.splits)](
        grad_y,
        lora_b,
        t,
        run.c_arg,
        s,
        dt_out if need_dt else run.dummy,
        g.d_c if run.shared_c and g.d_c is not None else run.dummy,
        db_part if db_part is not None else run.dummy,
        dbias_part if dbias_part is not None else run.dummy,
        m,
        d_out,
        t.shape[1],
        plan.cols_per_split,
        grad_y.stride(0),
        grad_y.stride(1),
        lora_b.stride(0),
        lora_b.stride(1),
        t.stride(0),
        t.stride(1),
        run.c_strides[1],
        run.c_strides[2],
        s.stride(0),
        s.stride(1),
        *(dt_out.stride() if need_dt else (0, 0, 0)),
        float(scale),
        NEED_DT=need_dt,
        NEED_DB=db_part is not None,
        NEED_DBIAS=dbias_part is not None,
        EPILOGUE=plan.epilogue,
        SHARED_C=run.shared_c,
        NEED_DS=need_ds,
        NEED_DC=g.d_c is not None,
        UPCAST=run.upcast,
        PRECISION=run.precision,
        BLOCK_R=run.block_r,
        **cfg,
    )


def _launch_dt_finish(run: _Run, dt_part, s, g: _Grads, need_ds: bool) -> None:
    """dT = Σ of the column-split partials (splits, M, r), then the epilogue, into g.d_st."""
    splits, m, r = dt_part.shape
    cfg = _config("dt_finish", run.dtype, run.block_r)
    _cflora_dt_finish_kernel[(cdiv(m, cfg["BLOCK_M"]),)](
        dt_part,
        run.c_arg,
        s,
        g.d_st,
        g.d_c if run.shared_c and g.d_c is not None else run.dummy,
        m,
        r,
        splits,
        run.c_strides[1],
        run.c_strides[2],
        s.stride(0),
        s.stride(1),
        g.d_st.stride(0),
        g.d_st.stride(1),
        SHARED_C=run.shared_c,
        NEED_DS=need_ds,
        NEED_DC=g.d_c is not None,
        UPCAST=run.upcast,
        PRECISION=run.precision,
        BLOCK_R=run.block_r,
        **cfg,
    )


def _launch_interact_bwd(run: _Run, g: _Grads, s, interaction, rows_per_sample: int, need_ds: bool) -> None:
    """Per-sample C: dS = dT C[g] in place in g.d_st and dC[g] = Σ dTᵀ S, one program per sample."""
    cfg = _interact_block_m(_config("interact", run.dtype, run.block_r), rows_per_sample)
    # big r: the dC accumulator and C do not fit in registers together (sm_80 spilled 7 KB at r = 128):
    # dC first (it reads dT), then dS (overwrites dT in place), as two launches
    need_dc = g.d_c is not None
    passes = (
        [(False, need_dc), (need_ds, False)]
        if _big_interaction(run.dtype, run.block_r)
        else [(need_ds, need_dc)]
    )
    for pass_ds, pass_dc in passes:
        if not (pass_ds or pass_dc):
            continue
        _cflora_interact_bwd_kernel[(run.groups,)](
            g.d_st,
            s,
            interaction,
            g.d_c if pass_dc else run.dummy,
            rows_per_sample,
            s.shape[1],
            g.d_st.stride(0),
            g.d_st.stride(1),
            s.stride(0),
            s.stride(1),
            *run.c_strides,
            NEED_DS=pass_ds,
            NEED_DC=pass_dc,
            UPCAST=run.upcast,
            PRECISION=run.precision,
            BLOCK_R=run.block_r,
            **cfg,
        )


def _launch_dx(run: _Run, grad_y, weight, d_s, lora_a, dx) -> None:
    """dx = dY W + drop'(dS A), one tiled GEMM."""
    if _tma_ok(run.device, grad_y, weight, dx):
        return _launch_dx_tma(run, grad_y, weight, d_s, lora_a, dx)
    m, d_out = grad_y.shape
    d_in = weight.shape[1]
    cfg = _unaligned_k(_config("gemm", run.dtype, run.block_r), d_out, grad_y.stride(0), weight.stride(0))
    grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(d_in, cfg["BLOCK_N"]),)
    _cflora_dx_kernel[grid](
        grad_y,
        weight,
        d_s,
        lora_a,
        dx,
        m,
        d_in,
        d_out,
        lora_a.shape[0],
        grad_y.stride(0),
        grad_y.stride(1),
        weight.stride(0),
        weight.stride(1),
        d_s.stride(0),
        d_s.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        dx.stride(0),
        dx.stride(1),
        run.key,
        run.threshold,
        run.keep_scale,
        DROPOUT=run.dropout,
        UPCAST=run.upcast,
        PRECISION=run.precision,
        **cfg,
    )


def _launch_dx_tma(run: _Run, grad_y, weight, d_s, lora_a, dx) -> None:
    """_launch_dx through TMA descriptors on a persistent grid (as _launch_fwd_gemm_tma)."""
    m, d_out = grad_y.shape
    d_in = weight.shape[1]
    cfg = _config("gemm", run.dtype, run.block_r)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    programs = _persistent_programs(run.device)
    grid = (min(programs, cdiv(m, bm) * cdiv(d_in, bn)),)
    _cflora_dx_tma_kernel[grid](
        TensorDescriptor.from_tensor(grad_y, [bm, bk]),
        TensorDescriptor.from_tensor(weight, [bk, bn]),
        TensorDescriptor.from_tensor(dx, [bm, bn]),
        d_s,
        lora_a,
        m,
        d_in,
        d_out,
        lora_a.shape[0],
        d_s.stride(0),
        d_s.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        run.key,
        run.threshold,
        run.keep_scale,
        DROPOUT=run.dropout,
        UPCAST=run.upcast,
        PRECISION=run.precision,
        NUM_SMS=programs,
        **cfg,
    )


def _launch_dw(run: _Run, grad_y, x2d, dweight) -> None:
    """dW = dYᵀ x (only when the base weight trains)."""
    m, d_out = grad_y.shape
    d_in = x2d.shape[1]
    if m == 0:
        dweight.zero_()
        return
    cfg = _unaligned_k(_config("dw", run.dtype, run.block_r), m, grad_y.stride(0), x2d.stride(0))
    grid = (cdiv(d_out, cfg["BLOCK_M"]) * cdiv(d_in, cfg["BLOCK_N"]),)
    _matmul_kernel[grid](
        grad_y,
        x2d,
        dweight,
        d_out,
        d_in,
        m,
        grad_y.stride(1),
        grad_y.stride(0),
        x2d.stride(0),
        x2d.stride(1),
        dweight.stride(0),
        dweight.stride(1),
        UPCAST=run.upcast,
        PRECISION=run.precision,
        **cfg,
    )
