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
     acc += (scale·T) Bᵀ (BLOCK_RK ranks at a time), then + b, then a single store of y.
  Saved for backward: x (the caller's), S, T. Never a d_out- or d_in-sized activation.

Backward
  3. _cflora_dy_pass_kernel, one program per BLOCK_M rows: dT = scale·dY B (one read of dY). Shared C:
     dS = dT C and dC += dTᵀ S (one r×r fp32 atomic tile per program). Writes dT or dS (M·r, fp32).
  3b. _cflora_interact_bwd_kernel (per-sample C only), one program per sample: dS = dT C[g] in place and
     dC[g] = Σ dTᵀ S summed in registers, stored once (no atomics).
  4. _cflora_rank_grad_kernel, split-K GEMM over the M rows, partials per split summed on the host in a
     fixed order (deterministic, no atomics): dB = scale·dYᵀ T with db = Σ dY (a second read of dY),
     and dAᵀ = drop(x)ᵀ dS / (1-p) (a second read of x, mask regenerated).
  5. _cflora_dx_kernel, tiled GEMM over (M, d_in): dx = drop'(dS A) + dY W as ONE accumulator: the r-wide
     step first (masked), then the K loop over d_out (third read of dY).
  6. _matmul_kernel: dW = dYᵀ x, only when needed (frozen base weights skip it).

Precision (the same on every GPU; the compile gate checks tensor-core instructions in each):
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
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from rellax_fast._kernel_common import (
    CFLORA_TRITON_DTYPES,
    CFLORA_TRITON_MAX_RANK,
    dropout_key,
    dropout_threshold,
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
    BLOCK_R: tl.constexpr,
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

    # the LoRA expand: r more K columns into the same accumulator, BLOCK_RK at a time (small smem tiles)
    for r0 in range(0, R, BLOCK_RK):  # a runtime loop: one chunk's tiles live at a time
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

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


# ----------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _cflora_dy_pass_kernel(
    dy_ptr,
    b_ptr,
    c_ptr,
    s_ptr,
    dst_ptr,
    dc_ptr,
    M,
    N,
    R,
    stride_dym,
    stride_dyn,
    stride_bn,
    stride_br,
    stride_ci,
    stride_cj,
    stride_sm,
    stride_sr,
    stride_dstm,
    stride_dstr,
    SCALE,
    SHARED_C: tl.constexpr,
    NEED_DS: tl.constexpr,
    NEED_DC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dT = scale·dY B for BLOCK_M rows into dst (fp32). With a shared C, dst gets dS = dT C instead and
    dC += dTᵀ S (one r×r fp32 atomic tile per program); otherwise dst keeps dT (dS itself for C = None,
    the input of _cflora_interact_bwd_kernel for a per-sample C)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rank = tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < M
    rank_ok = rank < R
    tile_mask = row_ok[:, None] & rank_ok[None, :]

    d_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + cols[:, None] * stride_bn + rank[None, :] * stride_br,
            mask=col_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            dy = dy.to(tl.float32)
            b = b.to(tl.float32)
        d_t = tl.dot(dy, b, d_t, input_precision=PRECISION)
    d_t = d_t * SCALE

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
    BLOCK_R: tl.constexpr,
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

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_RK):  # a runtime loop: one chunk's tiles live at a time
        rank = r0 + tl.arange(0, BLOCK_RK).to(tl.int64)
        rank_ok = rank < R
        d_s = tl.load(
            ds_ptr + rows[:, None] * stride_dsm + rank[None, :] * stride_dsr,
            mask=row_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )  # fp32
        d_s = d_s.to(dx_ptr.dtype.element_ty)  # the dot dtype on the GPU; rounded the same when interpreting
        a = tl.load(
            a_ptr + rank[:, None] * stride_ar + cols[None, :] * stride_an,
            mask=rank_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            d_s = d_s.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(d_s, a, acc, input_precision=PRECISION)
    if DROPOUT:
        acc = tl.where(_keep_mask(rows, cols, N, KEY, THRESHOLD), acc * KEEP_SCALE, tl.zeros_like(acc))

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
# Row-block kernels (shrink, dY pass) shrink BLOCK_M when M is small so that the grid still covers the
# SMs. Sizes or row strides that are not multiples of 16 (no divisibility hints: d = 1000) get the smaller
# steps of _unaligned, and the fp32 shrink with a cut row block 8 warps, which the gate showed not to spill. Under the interpreter, small blocks keep each program cheap while still exercising multi-block
# paths (edges, K loops, r chunks, split-K partials, cross-program atomics) on the tiny test shapes.
_GPU16 = {
    "shrink": dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3),
    "gemm": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, BLOCK_RK=64, GROUP_M=8, num_warps=8, num_stages=4),
    "dy": dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    "rank_grad": dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    "interact": dict(BLOCK_M=64, num_warps=4, num_stages=2),
    "dw": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
}
_GPU32 = {
    "shrink": dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=2),
    "gemm": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, BLOCK_RK=32, GROUP_M=8, num_warps=8, num_stages=3),
    "dy": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "rank_grad": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "interact": dict(BLOCK_M=64, num_warps=4, num_stages=2),
    "dw": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
}
_INTERPRET = {
    "shrink": dict(BLOCK_M=16, BLOCK_K=32),
    "gemm": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, BLOCK_RK=16, GROUP_M=2),
    "dy": dict(BLOCK_M=16, BLOCK_N=32),
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
    if name in ("interact", "shrink", "dy") and block_r >= 128:
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


def _row_block(cfg: dict, m: int, device: torch.device) -> dict:
    """Halve BLOCK_M (down to 16) while the row grid would leave SMs idle: M = 2048 gives 128 CTAs, not 32."""
    if triton_interpreting():
        return cfg
    sms = (
        _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if device.type == "cuda"
        else _DEFAULT_SMS
    )
    while cfg["BLOCK_M"] > _MIN_BLOCK_M and triton.cdiv(m, cfg["BLOCK_M"]) < sms:
        cfg["BLOCK_M"] //= 2
    return cfg


def _interact_block_m(cfg: dict, rows_per_group: int) -> dict:
    """The per-sample r×r kernels step over one sample's rows: decode (1 row) needs only the 16-row minimum."""
    cfg["BLOCK_M"] = max(_MIN_BLOCK_M, min(cfg["BLOCK_M"], triton.next_power_of_2(max(rows_per_group, 1))))
    return cfg


def _splits(m: int, n_col_blocks: int, block_m: int) -> int:
    """Split-K over rows for the dB / dA GEMMs: enough programs for ~2 waves, each at least 4 row blocks deep."""
    if triton_interpreting():
        return min(2, triton.cdiv(m, block_m))  # exercise the partial-sum path on small shapes
    want = triton.cdiv(2 * _DEFAULT_SMS, n_col_blocks)
    return max(1, min(want, triton.cdiv(m, 4 * block_m)))


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


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


def _rank_grad(u, v, out, colsum, scale, dropout, key, threshold, upcast, precision, block_r, dummy):
    """out (N, r) = scale·drop(u)ᵀ v and colsum (N,) = Σ_rows u via _cflora_rank_grad_kernel (split-K over
    the M rows of u (M, N) and v (M, r); partials summed here in a fixed order). out may be a strided view."""
    m, n = u.shape
    r = v.shape[1]
    if m == 0:
        for buf in (out, colsum):
            if buf is not None:
                buf.zero_()
        return
    f32 = torch.float32
    cfg = _config("rank_grad", u.dtype, block_r)
    if dropout:  # the keep-mask on an unaligned u (no %16 hints) spilled at 4 warps: see _unaligned
        cfg = _unaligned(cfg, {"num_warps": 8}, n, u.stride(0))
    n_col = triton.cdiv(n, cfg["BLOCK_N"])
    splits = _splits(m, n_col, cfg["BLOCK_M"])
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    splits = triton.cdiv(m, rows_per_split)
    out_part = torch.empty((splits, n, r), dtype=f32, device=u.device) if out is not None else None
    colsum_part = torch.empty((splits, n), dtype=f32, device=u.device) if colsum is not None else None
    _cflora_rank_grad_kernel[(n_col, splits)](
        u,
        v,
        out_part if out is not None else dummy,
        colsum_part if colsum is not None else dummy,
        m,
        n,
        r,
        rows_per_split,
        u.stride(0),
        u.stride(1),
        v.stride(0),
        v.stride(1),
        float(scale),
        key,
        threshold,
        NEED_OUT=out is not None,
        NEED_COLSUM=colsum is not None,
        DROPOUT=dropout,
        UPCAST=upcast,
        PRECISION=precision,
        BLOCK_R=block_r,
        **cfg,
    )
    if out is not None:  # a fixed-order sum of the partials: deterministic, unlike atomics
        out.copy_(out_part.sum(dim=0))
    if colsum is not None:
        colsum.copy_(colsum_part.sum(dim=0))


# ----------------------------------------------------------------------------------------------------
# launchers
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
    dropout, key, threshold, keep_scale = _dropout_args(dropout_p, seed)
    groups, c_strides = _interaction_groups(interaction, m, rows_per_sample)
    y = torch.empty((m, d_out), dtype=x2d.dtype, device=x2d.device)
    s = torch.empty((m, r), dtype=x2d.dtype, device=x2d.device)
    t = torch.empty((m, r), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return y, s, t
    upcast = triton_interpreting()
    precision = _precision(x2d.dtype)
    block_r = _block_r(r)
    shared_c = interaction is not None and interaction.dim() == 2
    per_sample_c = interaction is not None and interaction.dim() == 3
    c_arg = interaction if interaction is not None else lora_a  # never read when there is no C

    with _device_guard(x2d):
        cfg = _small_row_block_warps(
            _row_block(_config("shrink", x2d.dtype, block_r), m, x2d.device), x2d.dtype, block_r
        )
        _cflora_shrink_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
            x2d,
            lora_a,
            c_arg,
            s,
            t,
            m,
            d_in,
            r,
            x2d.stride(0),
            x2d.stride(1),
            lora_a.stride(0),
            lora_a.stride(1),
            c_strides[1],
            c_strides[2],
            s.stride(0),
            s.stride(1),
            t.stride(0),
            t.stride(1),
            key,
            threshold,
            keep_scale,
            SHARED_C=shared_c,
            DROPOUT=dropout,
            UPCAST=upcast,
            PRECISION=precision,
            BLOCK_R=block_r,
            **cfg,
        )
        if per_sample_c:
            cfg = _interact_block_m(_config("interact", x2d.dtype, block_r), rows_per_sample)
            _cflora_interact_fwd_kernel[(groups,)](
                s,
                interaction,
                t,
                rows_per_sample,
                r,
                s.stride(0),
                s.stride(1),
                *c_strides,
                t.stride(0),
                t.stride(1),
                UPCAST=upcast,
                PRECISION=precision,
                BLOCK_R=block_r,
                **cfg,
            )
        elif interaction is None:
            t.copy_(s)  # T = S; a separate tensor because the custom op's outputs must not alias

        cfg = _unaligned_k(_config("gemm", x2d.dtype, block_r), d_in, x2d.stride(0), weight.stride(0))
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(d_out, cfg["BLOCK_N"]),)
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
            r,
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
            UPCAST=upcast,
            PRECISION=precision,
            BLOCK_R=block_r,
            **cfg,
        )
    return y, s, t


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
    need_dx, need_dw, need_dbias, need_da, need_db, need_dc = (bool(v) for v in needs_grad)
    need_dc = need_dc and interaction is not None
    for name, ten, shape in (("grad_y", grad_y2d, (m, d_out)), ("s", s, (m, r)), ("t", t, (m, r))):
        if tuple(ten.shape) != shape or ten.device != x2d.device:
            raise ValueError(
                f"cflora (triton): {name} must be {shape} on {x2d.device}; "
                f"got {tuple(ten.shape)} on {ten.device}"
            )
    dropout, key, threshold, keep_scale = _dropout_args(dropout_p, seed)
    groups, c_strides = _interaction_groups(interaction, m, rows_per_sample)
    dev, dtype = x2d.device, x2d.dtype
    upcast = triton_interpreting()
    precision = _precision(dtype)
    block_r = _block_r(r)
    if grad_y2d.dtype != dtype:
        grad_y2d = grad_y2d.to(dtype)
    shared_c = interaction is not None and interaction.dim() == 2
    per_sample_c = interaction is not None and interaction.dim() == 3

    need_ds = need_dx or need_da
    need_dt = need_ds or need_dc
    f32 = torch.float32
    # d_st: dT, then (in place) dS, as fp32 (M, r)
    d_st = torch.empty((m, r), dtype=f32, device=dev) if need_dt else None
    dlora_b = torch.empty((d_out, r), dtype=f32, device=dev) if need_db else None
    dbias = torch.empty((d_out,), dtype=f32, device=dev) if need_dbias else None
    d_c = None
    if need_dc:  # shared C: atomics into a zeroed tile; per-sample: every C[g] is stored once
        d_c = (torch.zeros if shared_c or m == 0 else torch.empty)((groups, r, r), dtype=f32, device=dev)
    dlora_a = torch.empty((r, d_in), dtype=f32, device=dev) if need_da else None
    dx = torch.empty((m, d_in), dtype=dtype, device=dev) if need_dx else None
    dweight = torch.empty((d_out, d_in), dtype=weight.dtype, device=dev) if need_dw else None
    c_arg = interaction if interaction is not None else lora_a
    dummy = lora_a

    with _device_guard(x2d):
        if m > 0 and need_dt:
            cfg = _row_block(_config("dy", dtype, block_r), m, dev)
            _cflora_dy_pass_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
                grad_y2d,
                lora_b,
                c_arg,
                s,
                d_st,
                d_c if shared_c and need_dc else dummy,
                m,
                d_out,
                r,
                grad_y2d.stride(0),
                grad_y2d.stride(1),
                lora_b.stride(0),
                lora_b.stride(1),
                c_strides[1],
                c_strides[2],
                s.stride(0),
                s.stride(1),
                d_st.stride(0),
                d_st.stride(1),
                float(scale),
                SHARED_C=shared_c,
                NEED_DS=need_ds,
                NEED_DC=need_dc,
                UPCAST=upcast,
                PRECISION=precision,
                BLOCK_R=block_r,
                **cfg,
            )
            if per_sample_c:
                cfg = _interact_block_m(_config("interact", dtype, block_r), rows_per_sample)
                # big r: the dC accumulator and C do not fit in registers together (sm_80 spilled 7 KB at
                # r = 128): dC first (it reads dT), then dS (overwrites dT in place), as two launches
                big = _big_interaction(dtype, block_r)
                passes = [(False, need_dc), (need_ds, False)] if big else [(need_ds, need_dc)]
                for pass_ds, pass_dc in passes:
                    if not (pass_ds or pass_dc):
                        continue
                    _cflora_interact_bwd_kernel[(groups,)](
                        d_st,
                        s,
                        interaction,
                        d_c if pass_dc else dummy,
                        rows_per_sample,
                        r,
                        d_st.stride(0),
                        d_st.stride(1),
                        s.stride(0),
                        s.stride(1),
                        *c_strides,
                        NEED_DS=pass_ds,
                        NEED_DC=pass_dc,
                        UPCAST=upcast,
                        PRECISION=precision,
                        BLOCK_R=block_r,
                        **cfg,
                    )

        if need_db or need_dbias:
            _rank_grad(
                grad_y2d,
                t,
                dlora_b if need_db else None,
                dbias if need_dbias else None,
                float(scale),
                False,
                key,
                threshold,
                upcast,
                precision,
                block_r,
                dummy,
            )
        if need_da:
            # dAᵀ = drop(x)ᵀ dS / (1 - p): (d_in, r), stored into the transposed view of dA
            _rank_grad(
                x2d,
                d_st,
                dlora_a.T,
                None,
                keep_scale,
                dropout,
                key,
                threshold,
                upcast,
                precision,
                block_r,
                dummy,
            )

        if m > 0 and need_dx:
            cfg = _unaligned_k(_config("gemm", dtype, block_r), d_out, grad_y2d.stride(0), weight.stride(0))
            grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(d_in, cfg["BLOCK_N"]),)
            _cflora_dx_kernel[grid](
                grad_y2d,
                weight,
                d_st,
                lora_a,
                dx,
                m,
                d_in,
                d_out,
                r,
                grad_y2d.stride(0),
                grad_y2d.stride(1),
                weight.stride(0),
                weight.stride(1),
                d_st.stride(0),
                d_st.stride(1),
                lora_a.stride(0),
                lora_a.stride(1),
                dx.stride(0),
                dx.stride(1),
                key,
                threshold,
                keep_scale,
                DROPOUT=dropout,
                UPCAST=upcast,
                PRECISION=precision,
                BLOCK_R=block_r,
                **cfg,
            )

        if need_dw:
            if m == 0:
                dweight.zero_()
            else:
                cfg = _unaligned_k(_config("dw", dtype, block_r), m, grad_y2d.stride(0), x2d.stride(0))
                grid = (triton.cdiv(d_out, cfg["BLOCK_M"]) * triton.cdiv(d_in, cfg["BLOCK_N"]),)
                _matmul_kernel[grid](
                    grad_y2d,
                    x2d,
                    dweight,
                    d_out,
                    d_in,
                    m,
                    grad_y2d.stride(1),
                    grad_y2d.stride(0),
                    x2d.stride(0),
                    x2d.stride(1),
                    dweight.stride(0),
                    dweight.stride(1),
                    UPCAST=upcast,
                    PRECISION=precision,
                    **cfg,
                )

    if d_c is not None:
        d_c = d_c[0] if interaction.dim() == 2 else d_c
        d_c = d_c.to(interaction.dtype)
    return (
        dx,
        dweight,
        dbias.to(weight.dtype) if dbias is not None else None,
        dlora_a.to(lora_a.dtype) if dlora_a is not None else None,
        dlora_b.to(lora_b.dtype) if dlora_b is not None else None,
        d_c,
    )
