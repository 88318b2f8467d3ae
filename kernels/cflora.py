"""Fused Triton forward and backward of CFLoRA: y = x Wᵀ + b + scale·((drop(x) Aᵀ) Cᵀ) Bᵀ.

Owns the Triton kernels of the CFLoRA op and their launchers ``cflora_fwd`` / ``cflora_bwd``, which the
op wrapper ``rellax_fast.ops.cflora`` calls for ``backend="triton"``.

Shapes: x is flattened to (M, d_in) rows; W (d_out, d_in); b (d_out,) or None; A (r, d_in); B (d_out, r);
C is None (identity: the r×r step is skipped), (r, r) shared, or (n_samples, r, r) per sample, where row m
uses C[m // rows_per_sample]. Dropout touches the LoRA path only (inverted scaling 1/(1-p)); its keep-mask
is the shared hash of (seed, m·d_in + k) from csrc/common.h, recomputed wherever drop(x) is needed, so
nothing mask-shaped is ever stored. dropout_p == 0 compiles the hash away (constexpr DROPOUT).

Algorithm and memory traffic (bytes of the dtype; r ≪ d_in, d_out):

Forward (2 kernels)
  1. _cflora_shrink_kernel, one program per BLOCK_M rows: S = drop(x) Aᵀ by a K-loop over d_in, then
     T = S Cᵀ in registers. A row block may span several samples; it loops over the samples it touches
     and selects each row's C (r×r tiles are tiny). Reads x once (M·d_in), A from L2; writes S, T (2·M·r).
  2. _cflora_fwd_gemm_kernel, tiled GEMM over (M, d_out): acc = x Wᵀ over d_in, then ONE extra r-wide
     K step acc += (scale·T) Bᵀ, then + b, then a single store of y. No d_out-sized intermediate exists:
     traffic is exactly the base linear's (x, W, y) plus M·r for T and d_out·r for B.
  Saved for backward: x (the caller's), S, T. Never a d_out- or d_in-sized activation.

Backward (2 kernels, +1 GEMM for dW only when W requires grad)
  3. _cflora_dy_pass_kernel, one program per BLOCK_M rows, a single pass over dY (M·d_out):
       dT = scale·dY B (registers), dB += scale·dYᵀ T (fp32 atomics, no bf16 atomics),
       db += Σ_rows dY (fp32 atomics, only when the bias needs a grad);
     then, per sample touched by the block, dS = dT C and dC_b += dTᵀ S (fp32 atomics: the per-sample
     reduction). Writes only dS (M·r, fp32).
  4. _cflora_dx_kernel, tiled GEMM over (M, d_in): dx = dY W + drop'(dS A) as ONE accumulator over the
     concatenated K (d_out, then r). With dropout the r-step is masked by the regenerated keep-mask.
     The same program loads its x tile (mask reused) and adds dA += dSᵀ drop(x) (fp32 atomics), so
     x is read once more (M·d_in) and no separate dA pass exists.
  5. _matmul_kernel: dW = dYᵀ x, only when needed (frozen base weights skip it).
  Total: dY read twice (dy pass + dx GEMM; the minimum for a GEMM over d_out), W and x once each.

Precision: tl.dot on the input dtype (bf16/fp16 tensor cores on the GPU) with fp32 accumulation; the
r×r interaction dots run in fp32 ("ieee"). fp32 inputs use tf32 only if torch allows it
(torch.backends.cuda.matmul.allow_tf32). Under TRITON_INTERPRET=1 the dot operands are upcast to fp32
(constexpr UPCAST), because the interpreter's bf16 dot is wrong.
"""

if not __name__.startswith("rellax_fast."):
    raise ImportError("rellax-fast Triton kernels are only importable as rellax_fast.kernels.*")

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from rellax_fast.ops._backend import triton_interpreting
from rellax_fast.ops.dropout import dropout_key, dropout_threshold

MAX_RANK = 128  # one register tile holds a row block of S/T (BLOCK_R = next pow2 >= r, at least 16)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    idx = rows[:, None] * D_IN + cols[None, :]  # int64 flat index
    lo = (idx & 0xFFFFFFFF).to(tl.uint32)
    hi = (idx >> 32).to(tl.uint32)
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
    x_ptr, a_ptr, c_ptr, s_ptr, t_ptr,
    M, D_IN, R, ROWS_PER_GROUP,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_cg, stride_ci, stride_cj,
    stride_sm, stride_sr, stride_tm, stride_tr,
    KEY, THRESHOLD, KEEP_SCALE,
    HAS_C: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rank = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    rank_ok = rank < R

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D_IN
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if DROPOUT:
            keep = _keep_mask(rows, ks, D_IN, KEY, THRESHOLD)
            x = tl.where(keep, x, tl.zeros_like(x))
        a_t = tl.load(a_ptr + rank[None, :] * stride_ar + ks[:, None] * stride_ak,
                      mask=k_ok[:, None] & rank_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_R) = Aᵀ tile
        if UPCAST:
            x = x.to(tl.float32)
            a_t = a_t.to(tl.float32)
        acc = tl.dot(x, a_t, acc, input_precision=PRECISION)
    if DROPOUT:
        acc = acc * KEEP_SCALE

    out_mask = row_ok[:, None] & rank_ok[None, :]
    tl.store(s_ptr + rows[:, None] * stride_sm + rank[None, :] * stride_sr,
             acc.to(s_ptr.dtype.element_ty), mask=out_mask)
    if HAS_C:
        # T = S Cᵀ with each row's C: loop over the samples this block touches (one for shared C).
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        first = (pid * BLOCK_M) // ROWS_PER_GROUP
        last = (tl.minimum(pid * BLOCK_M + BLOCK_M, M) - 1) // ROWS_PER_GROUP
        group_of_row = rows // ROWS_PER_GROUP
        for g in range(first, last + 1):
            # c_t[j, i] = C[g, i, j]
            c_t = tl.load(c_ptr + g * stride_cg + rank[None, :] * stride_ci + rank[:, None] * stride_cj,
                          mask=rank_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
            part = tl.dot(acc, c_t, input_precision="ieee")
            t = tl.where((group_of_row == g)[:, None], part, t)
    else:
        t = acc
    tl.store(t_ptr + rows[:, None] * stride_tm + rank[None, :] * stride_tr,
             t.to(t_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _cflora_fwd_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, t_ptr, b_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_tr, stride_bn, stride_br,
    stride_ym, stride_yn,
    SCALE,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
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
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                      mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N) = Wᵀ tile
        if UPCAST:
            x = x.to(tl.float32)
            w_t = w_t.to(tl.float32)
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION)

    # the LoRA expand: one more r-wide K step into the same accumulator
    rank = tl.arange(0, BLOCK_R)
    rank_ok = rank < R
    t = tl.load(t_ptr + rows[:, None] * stride_tm + rank[None, :] * stride_tr,
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    b_t = tl.load(b_ptr + cols[None, :] * stride_bn + rank[:, None] * stride_br,
                  mask=rank_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_N) = Bᵀ tile
    t = (t.to(tl.float32) * SCALE).to(b_t.dtype)
    if UPCAST:
        t = t.to(tl.float32)
        b_t = b_t.to(tl.float32)
    acc = tl.dot(t, b_t, acc, input_precision=PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _cflora_dy_pass_kernel(
    dy_ptr, b_ptr, c_ptr, s_ptr, t_ptr,
    ds_ptr, dlora_b_ptr, dbias_ptr, dc_ptr,
    M, N, R, ROWS_PER_GROUP,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_cg, stride_ci, stride_cj,
    stride_sm, stride_sr, stride_tm, stride_tr, stride_dsm, stride_dsr,
    SCALE,
    HAS_C: tl.constexpr, NEED_DT: tl.constexpr, NEED_DS: tl.constexpr, NEED_DB: tl.constexpr,
    NEED_DBIAS: tl.constexpr, NEED_DC: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # dlora_b_ptr (d_out, r), dbias_ptr (d_out,), dc_ptr (groups, r, r): contiguous fp32, zero-filled
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rank = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    rank_ok = rank < R
    tile_mask = row_ok[:, None] & rank_ok[None, :]

    if NEED_DB:
        t = tl.load(t_ptr + rows[:, None] * stride_tm + rank[None, :] * stride_tr, mask=tile_mask, other=0.0)
        if UPCAST:
            t = t.to(tl.float32)
    d_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if NEED_DBIAS:
            tl.atomic_add(dbias_ptr + cols, tl.sum(dy.to(tl.float32), axis=0), mask=col_ok, sem="relaxed")
        if UPCAST:
            dy = dy.to(tl.float32)
        if NEED_DT:
            b = tl.load(b_ptr + cols[:, None] * stride_bn + rank[None, :] * stride_br,
                        mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
            if UPCAST:
                b = b.to(tl.float32)
            d_t = tl.dot(dy, b, d_t, input_precision=PRECISION)
        if NEED_DB:
            part = tl.dot(tl.trans(dy), t, input_precision=PRECISION) * SCALE  # (BLOCK_N, BLOCK_R)
            tl.atomic_add(dlora_b_ptr + cols[:, None] * R + rank[None, :], part,
                          mask=col_ok[:, None] & rank_ok[None, :], sem="relaxed")

    if NEED_DT:
        d_t = d_t * SCALE
        if HAS_C:
            d_s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            if NEED_DC:
                s = tl.load(s_ptr + rows[:, None] * stride_sm + rank[None, :] * stride_sr,
                            mask=tile_mask, other=0.0).to(tl.float32)
            first = (pid * BLOCK_M) // ROWS_PER_GROUP
            last = (tl.minimum(pid * BLOCK_M + BLOCK_M, M) - 1) // ROWS_PER_GROUP
            group_of_row = rows // ROWS_PER_GROUP
            for g in range(first, last + 1):
                in_group = (group_of_row == g)[:, None]
                if NEED_DS:
                    c = tl.load(c_ptr + g * stride_cg + rank[:, None] * stride_ci + rank[None, :] * stride_cj,
                                mask=rank_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
                    d_s = tl.where(in_group, tl.dot(d_t, c, input_precision="ieee"), d_s)
                if NEED_DC:
                    d_t_g = tl.where(in_group, d_t, tl.zeros_like(d_t))
                    d_c = tl.dot(tl.trans(d_t_g), s, input_precision="ieee")  # (BLOCK_R, BLOCK_R)
                    tl.atomic_add(dc_ptr + g * R * R + rank[:, None] * R + rank[None, :], d_c,
                                  mask=rank_ok[:, None] & rank_ok[None, :], sem="relaxed")
        else:
            d_s = d_t
        if NEED_DS:
            tl.store(ds_ptr + rows[:, None] * stride_dsm + rank[None, :] * stride_dsr, d_s, mask=tile_mask)


# KEY/THRESHOLD change with every seed: keep them runtime values (no ==1 / %16 specialisation)
@triton.jit(do_not_specialize=["KEY", "THRESHOLD"])
def _cflora_dx_kernel(
    dy_ptr, w_ptr, ds_ptr, a_ptr, x_ptr, dx_ptr, dlora_a_ptr,
    M, N, K, R,
    stride_dym, stride_dyk, stride_wk, stride_wn, stride_dsm, stride_dsr, stride_ar, stride_an,
    stride_xm, stride_xn, stride_dxm, stride_dxn,
    KEY, THRESHOLD, KEEP_SCALE,
    DROPOUT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # N = d_in (output columns), K = d_out (the base GEMM's reduction); dlora_a_ptr (r, d_in) fp32 zeroed
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rank = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    col_ok = cols < N
    rank_ok = rank < R
    out_mask = row_ok[:, None] & col_ok[None, :]

    d_s = tl.load(ds_ptr + rows[:, None] * stride_dsm + rank[None, :] * stride_dsr,
                  mask=row_ok[:, None] & rank_ok[None, :], other=0.0)  # fp32
    d_s = d_s.to(x_ptr.dtype.element_ty)  # the dot dtype on the GPU; rounded the same when interpreting
    if UPCAST:
        d_s = d_s.to(tl.float32)
    if DROPOUT:
        keep = _keep_mask(rows, cols, N, KEY, THRESHOLD)

    if NEED_DX:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            dy = tl.load(dy_ptr + rows[:, None] * stride_dym + ks[None, :] * stride_dyk,
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                dy = dy.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)
        # the concatenated K step: r more columns (dS) against A
        a = tl.load(a_ptr + rank[:, None] * stride_ar + cols[None, :] * stride_an,
                    mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        if DROPOUT:
            lora = tl.dot(d_s, a, input_precision=PRECISION) * KEEP_SCALE
            acc = acc + tl.where(keep, lora, tl.zeros_like(lora))
        else:
            acc = tl.dot(d_s, a, acc, input_precision=PRECISION)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :] * stride_dxn,
                 acc.to(dx_ptr.dtype.element_ty), mask=out_mask)

    if NEED_DA:
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=out_mask, other=0.0)
        if DROPOUT:
            x = tl.where(keep, x, tl.zeros_like(x))
        if UPCAST:
            x = x.to(tl.float32)
        part = tl.dot(tl.trans(d_s), x, input_precision=PRECISION)  # (BLOCK_R, BLOCK_N)
        if DROPOUT:
            part = part * KEEP_SCALE
        tl.atomic_add(dlora_a_ptr + rank[:, None] * N + cols[None, :], part,
                      mask=rank_ok[:, None] & col_ok[None, :], sem="relaxed")


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
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
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------------
# One fixed config per kernel. GPU sizes target H100/H200 (bf16 tensor cores, 227 KB smem per CTA): the
# big GEMMs use 128x128x64 tiles, 8 warps and a 4-deep cp.async pipeline (4 x 32 KB); fp32 operands are
# twice as wide, so they get 2 stages. Under the interpreter, small blocks keep each program cheap while
# still exercising multi-block paths (edges, K loops, cross-program atomics) on the tiny test shapes.
_GPU = {
    "shrink": dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3),
    "gemm": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    "dy": dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    "dw": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
}
_INTERPRET = {
    "shrink": dict(BLOCK_M=16, BLOCK_K=32),
    "gemm": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2),
    "dy": dict(BLOCK_M=16, BLOCK_N=32),
    "dw": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=2),
}


def _config(name: str, dtype: torch.dtype) -> dict:
    if triton_interpreting():
        return dict(_INTERPRET[name])
    cfg = dict(_GPU[name])
    if dtype == torch.float32:
        cfg["num_stages"] = 2
    return cfg


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by tl.dot for 16-bit operands


def _dropout_args(dropout_p: float, seed: Optional[int]) -> Tuple[bool, int, int, float]:
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"cflora (triton): dropout_p must be in [0, 1); got {dropout_p}")
    if dropout_p == 0.0:
        return False, 0, 0, 1.0
    if seed is None:
        raise ValueError("cflora (triton): dropout_p > 0 needs an integer seed; got seed=None")
    return True, dropout_key(int(seed)), dropout_threshold(float(dropout_p)), 1.0 / (1.0 - float(dropout_p))


def _interaction_groups(interaction: Optional[torch.Tensor], m: int, rows_per_sample: int) -> Tuple[int, int, tuple]:
    """(rows per C group, number of groups, (stride_g, stride_i, stride_j)) for the three C shapes."""
    if interaction is None:
        return max(m, 1), 1, (0, 0, 0)
    if interaction.dim() == 2:
        return max(m, 1), 1, (0, interaction.stride(0), interaction.stride(1))
    n = interaction.shape[0]
    if rows_per_sample < 1 or n * rows_per_sample != m:
        raise ValueError(
            f"cflora (triton): per-sample interaction of shape {tuple(interaction.shape)} needs "
            f"n_samples * rows_per_sample == M; got {n} * {rows_per_sample} != {m}")
    return rows_per_sample, n, tuple(interaction.stride())


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
        raise ValueError(f"cflora (triton): interaction must be ({r}, {r}) or (n, {r}, {r}); "
                         f"got {tuple(interaction.shape)}")
    for name, t in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("interaction", interaction)):
        if t is not None and (t.dtype != x2d.dtype or t.device != x2d.device):
            raise TypeError(f"cflora (triton): {name} must be {x2d.dtype} on {x2d.device} like x; "
                            f"got {t.dtype} on {t.device}")
    return m, d_in, d_out, r


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def cflora_fwd(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
               lora_b: torch.Tensor, interaction: Optional[torch.Tensor], rows_per_sample: int, scale: float,
               dropout_p: float, seed: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: returns (y (M, d_out), S (M, r), T (M, r)), all in x's dtype; S and T are saved for backward."""
    m, d_in, d_out, r = _check(x2d, weight, lora_a, lora_b, interaction)
    if bias is not None and (bias.shape != (d_out,) or bias.device != x2d.device):
        raise ValueError(f"cflora (triton): bias must be ({d_out},) on {x2d.device}; "
                         f"got {tuple(bias.shape)} on {bias.device}")
    dropout, key, threshold, keep_scale = _dropout_args(dropout_p, seed)
    rows_per_group, _, c_strides = _interaction_groups(interaction, m, rows_per_sample)
    y = torch.empty((m, d_out), dtype=x2d.dtype, device=x2d.device)
    s = torch.empty((m, r), dtype=x2d.dtype, device=x2d.device)
    t = torch.empty((m, r), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return y, s, t
    upcast = triton_interpreting()
    precision = _precision(x2d.dtype)
    block_r = _block_r(r)
    c_arg = interaction if interaction is not None else lora_a  # never read when HAS_C is False

    cfg = _config("shrink", x2d.dtype)
    _cflora_shrink_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        x2d, lora_a, c_arg, s, t,
        m, d_in, r, rows_per_group,
        x2d.stride(0), x2d.stride(1), lora_a.stride(0), lora_a.stride(1), *c_strides,
        s.stride(0), s.stride(1), t.stride(0), t.stride(1),
        key, threshold, keep_scale,
        HAS_C=interaction is not None, DROPOUT=dropout, UPCAST=upcast, PRECISION=precision,
        BLOCK_R=block_r, **cfg,
    )

    cfg = _config("gemm", x2d.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(d_out, cfg["BLOCK_N"]),)
    _cflora_fwd_gemm_kernel[grid](
        x2d, weight, bias.contiguous() if bias is not None else weight, t, lora_b, y,
        m, d_out, d_in, r,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), t.stride(0), t.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
        float(scale),
        HAS_BIAS=bias is not None, UPCAST=upcast, PRECISION=precision, BLOCK_R=block_r, **cfg,
    )
    return y, s, t


def cflora_bwd(grad_y2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
               lora_b: torch.Tensor, interaction: Optional[torch.Tensor], s: torch.Tensor, t: torch.Tensor,
               rows_per_sample: int, scale: float, dropout_p: float, seed: Optional[int],
               needs_grad: Sequence[bool]) -> Tuple[Optional[torch.Tensor], ...]:
    """Backward: (dx, dweight, dbias, dlora_a, dlora_b, dinteraction); None where needs_grad is False.

    ``needs_grad`` lists 6 bools in that order. The dropout mask is regenerated from (dropout_p, seed).
    """
    m, d_in, d_out, r = _check(x2d, weight, lora_a, lora_b, interaction)
    if len(needs_grad) != 6:
        raise ValueError(f"cflora (triton): needs_grad must hold 6 bools; got {len(needs_grad)}")
    need_dx, need_dw, need_dbias, need_da, need_db, need_dc = (bool(v) for v in needs_grad)
    need_dc = need_dc and interaction is not None
    for name, ten, shape in (("grad_y", grad_y2d, (m, d_out)), ("s", s, (m, r)), ("t", t, (m, r))):
        if tuple(ten.shape) != shape or ten.device != x2d.device:
            raise ValueError(f"cflora (triton): {name} must be {shape} on {x2d.device}; "
                             f"got {tuple(ten.shape)} on {ten.device}")
    dropout, key, threshold, keep_scale = _dropout_args(dropout_p, seed)
    rows_per_group, groups, c_strides = _interaction_groups(interaction, m, rows_per_sample)
    dev, dtype = x2d.device, x2d.dtype
    upcast = triton_interpreting()
    precision = _precision(dtype)
    block_r = _block_r(r)
    if grad_y2d.dtype != dtype:
        grad_y2d = grad_y2d.to(dtype)

    need_ds = need_dx or need_da
    need_dt = need_ds or need_dc
    f32 = torch.float32
    d_s = torch.empty((m, r), dtype=f32, device=dev) if need_ds else None
    dlora_b = torch.zeros((d_out, r), dtype=f32, device=dev) if need_db else None
    dbias = torch.zeros((d_out,), dtype=f32, device=dev) if need_dbias else None
    d_c = torch.zeros((groups, r, r), dtype=f32, device=dev) if need_dc else None
    dlora_a = torch.zeros((r, d_in), dtype=f32, device=dev) if need_da else None
    dx = torch.empty((m, d_in), dtype=dtype, device=dev) if need_dx else None
    dweight = torch.empty((d_out, d_in), dtype=weight.dtype, device=dev) if need_dw else None
    c_arg = interaction if interaction is not None else lora_a
    dummy = lora_a

    if m > 0 and (need_dt or need_db or need_dbias):
        cfg = _config("dy", x2d.dtype)
        if block_r >= 128 and not upcast:
            cfg["BLOCK_N"] = 64  # keep the dY, B and dB tiles of a rank-128 pass inside shared memory
        _cflora_dy_pass_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
            grad_y2d, lora_b, c_arg, s, t,
            d_s if d_s is not None else dummy, dlora_b if dlora_b is not None else dummy,
            dbias if dbias is not None else dummy, d_c if d_c is not None else dummy,
            m, d_out, r, rows_per_group,
            grad_y2d.stride(0), grad_y2d.stride(1), lora_b.stride(0), lora_b.stride(1), *c_strides,
            s.stride(0), s.stride(1), t.stride(0), t.stride(1),
            d_s.stride(0) if d_s is not None else 0, d_s.stride(1) if d_s is not None else 0,
            float(scale),
            HAS_C=interaction is not None, NEED_DT=need_dt, NEED_DS=need_ds, NEED_DB=need_db,
            NEED_DBIAS=need_dbias, NEED_DC=need_dc, UPCAST=upcast, PRECISION=precision,
            BLOCK_R=block_r, **cfg,
        )

    if m > 0 and need_ds:
        cfg = _config("gemm", x2d.dtype)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(d_in, cfg["BLOCK_N"]),)
        _cflora_dx_kernel[grid](
            grad_y2d, weight, d_s, lora_a, x2d,
            dx if dx is not None else dummy, dlora_a if dlora_a is not None else dummy,
            m, d_in, d_out, r,
            grad_y2d.stride(0), grad_y2d.stride(1), weight.stride(0), weight.stride(1),
            d_s.stride(0), d_s.stride(1), lora_a.stride(0), lora_a.stride(1),
            x2d.stride(0), x2d.stride(1),
            dx.stride(0) if dx is not None else 0, dx.stride(1) if dx is not None else 0,
            key, threshold, keep_scale,
            DROPOUT=dropout, NEED_DX=need_dx, NEED_DA=need_da, UPCAST=upcast, PRECISION=precision,
            BLOCK_R=block_r, **cfg,
        )
    elif need_dx:
        dx.zero_()  # m == 0: nothing to write (kept for clarity; an empty tensor has no elements)

    if need_dw:
        if m == 0:
            dweight.zero_()
        else:
            cfg = _config("dw", x2d.dtype)
            grid = (triton.cdiv(d_out, cfg["BLOCK_M"]) * triton.cdiv(d_in, cfg["BLOCK_N"]),)
            _matmul_kernel[grid](
                grad_y2d, x2d, dweight,
                d_out, d_in, m,
                grad_y2d.stride(1), grad_y2d.stride(0), x2d.stride(0), x2d.stride(1),
                dweight.stride(0), dweight.stride(1),
                UPCAST=upcast, PRECISION=precision, **cfg,
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
