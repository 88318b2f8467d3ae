// The op sequence of rellax_fast::cflora_fwd / cflora_bwd (below: cflora_fwd_sequence, cflora_bwd_sequence), its
// argument checks and ATen helpers, shared by the CPU (cflora.cpp) and CUDA (cflora_cuda.cu) backends. Python
// (rellax_fast/ops/cflora.py) validates every public call once with friendlier messages; these checks guard
// direct torch.ops calls.
//
// Row layout: x is (M, d_in); with a per-sample interaction C (n_samples, r, r), row m uses
// C[m / rows_per_sample] and M == n_samples * rows_per_sample.
#pragma once

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/util/Optional.h>

#include <array>
#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

namespace rellax {

inline void cflora_check_args(const char* op, c10::DeviceType device_type, const at::Tensor& x,
                              const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& lora_a, const at::Tensor& lora_b,
                              const c10::optional<at::Tensor>& interaction, int64_t rows_per_sample,
                              double dropout_p) {
  RELLAX_CHECK_FLOAT(x, "cflora: x");
  TORCH_CHECK(x.device().type() == device_type, op, ": x must be a ", c10::DeviceTypeName(device_type),
              " tensor for this kernel; got ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (M, d_in); got shape ", shape_str(x));
  const int64_t m = x.size(0), d_in = x.size(1);
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
                "; got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), "; got ",
                t.device());
  };
  same(weight, "weight");
  same(lora_a, "lora_a");
  same(lora_b, "lora_b");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == d_in, op, ": weight must have shape (d_out, d_in=", d_in,
              "); got ", shape_str(weight));
  const int64_t d_out = weight.size(0);
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(1) == d_in && lora_a.size(0) >= 1, op,
              ": lora_a must have shape (r, d_in=", d_in, "); got ", shape_str(lora_a));
  const int64_t r = lora_a.size(0);
  TORCH_CHECK(lora_b.dim() == 2 && lora_b.size(0) == d_out && lora_b.size(1) == r, op,
              ": lora_b must have shape (d_out=", d_out, ", r=", r, "); got ", shape_str(lora_b));
  if (bias.has_value()) {
    same(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d_out, op, ": bias must have shape (d_out=", d_out,
                ",); got ", shape_str(*bias));
  }
  if (interaction.has_value()) {
    const at::Tensor& c = *interaction;
    same(c, "interaction");
    if (c.dim() == 2) {
      TORCH_CHECK(c.size(0) == r && c.size(1) == r, op, ": interaction must have shape (r, r)=(", r, ", ", r,
                  ") or (B, r, r); got ", shape_str(c));
    } else {
      TORCH_CHECK(c.dim() == 3 && c.size(1) == r && c.size(2) == r, op,
                  ": interaction must have shape (r, r) or (B, r, r) with r=", r, "; got ", shape_str(c));
      TORCH_CHECK(rows_per_sample >= 0 && c.size(0) * rows_per_sample == m, op,
                  ": per-sample interaction with ", c.size(0), " samples and rows_per_sample=", rows_per_sample,
                  " needs x with ", c.size(0) * rows_per_sample, " rows; got ", m);
    }
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1); got ", dropout_p);
}

// s (M, r) times C: Cᵀ when transpose_c (forward T = S Cᵀ), C otherwise (backward dS = dT C).
// A per-sample C runs as one batched GEMM over (n_samples, rows_per_sample, r) views.
// The backward's checks: the forward's arguments, plus grad_y (M, d_out) and the saved s, t (M, r) on x's device.
inline void cflora_check_bwd_args(c10::DeviceType device_type, const at::Tensor& grad_y, const at::Tensor& x,
                                  const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                  const c10::optional<at::Tensor>& interaction, const at::Tensor& s,
                                  const at::Tensor& t, int64_t rows_per_sample, double dropout_p) {
  cflora_check_args("cflora_bwd", device_type, x, weight, c10::nullopt, lora_a, lora_b, interaction,
                    rows_per_sample, dropout_p);
  const int64_t m = x.size(0), r = lora_a.size(0), d_out = weight.size(0);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == m && grad_y.size(1) == d_out,
              "cflora_bwd: grad_y must have shape (M=", m, ", d_out=", d_out, "); got ", shape_str(grad_y));
  TORCH_CHECK(s.dim() == 2 && s.size(0) == m && s.size(1) == r && t.sizes() == s.sizes(),
              "cflora_bwd: s and t must have shape (M=", m, ", r=", r, "); got ", shape_str(s), " and ",
              shape_str(t));
  TORCH_CHECK(grad_y.device() == x.device() && s.device() == x.device() && t.device() == x.device(),
              "cflora_bwd: grad_y, s and t must be on x's device ", x.device());
}

inline at::Tensor cflora_interact(const at::Tensor& s, const at::Tensor& c, int64_t rows_per_sample,
                                  bool transpose_c) {
  if (c.dim() == 2) return at::mm(s, transpose_c ? c.t() : c);
  const int64_t n = c.size(0), r = c.size(1);
  return at::bmm(s.view({n, rows_per_sample, r}), transpose_c ? c.transpose(1, 2) : c).view({s.size(0), r});
}

// dC: shared -> dTᵀ S (r, r); per sample -> dC_b = Σ_{rows of b} dT_mᵀ S_m as one batched GEMM.
inline at::Tensor cflora_interaction_grad_aten(const at::Tensor& dt, const at::Tensor& s, const at::Tensor& c,
                                               int64_t rows_per_sample) {
  if (c.dim() == 2) return at::mm(dt.t(), s);
  const int64_t n = c.size(0), r = c.size(1);
  return at::bmm(dt.view({n, rows_per_sample, r}).transpose(1, 2), s.view({n, rows_per_sample, r}));
}

inline at::Tensor cflora_no_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

// IEEE semantics of `scale` (defined by the reference, rellax_fast/ops/cflora.py): it multiplies the finished
// rank-r product P = T Bᵀ, y = (x Wᵀ + b) + scale·P, and in the backward dP = scale·dY comes first. For a
// finite non-zero scale, folding it into a GEMM's alpha or into the r-sized factor (B or T) only changes
// rounding. For scale = 0, ±Inf or NaN it changes which entries are NaN/Inf (a GEMM with alpha = 0 skips the
// product, so 0·Inf would vanish; Inf·T then ·B mixes signs), so those scales take the reference's order.
inline bool cflora_scale_is_special(double scale) { return scale == 0.0 || !std::isfinite(scale); }

// y += scale·(T Bᵀ): fused into y (addmm, no d_out-sized temporary) unless the scale is special.
inline void cflora_add_lora_expand(at::Tensor& y, const at::Tensor& t, const at::Tensor& lora_b, double scale) {
  if (cflora_scale_is_special(scale)) {
    y.add_(at::mm(t, lora_b.t()).mul_(scale));
  } else {
    y.addmm_(t, lora_b.t(), /*beta=*/1, /*alpha=*/scale);
  }
}

// dP = scale·dY, materialised (M, d_out) only for a special scale; undefined otherwise (the scale then
// folds into the r-sized factor of each GEMM below).
inline at::Tensor cflora_special_grad_p(const at::Tensor& grad_y, double scale) {
  return cflora_scale_is_special(scale) ? grad_y.mul(scale) : at::Tensor();
}

// dB = dPᵀ T
inline at::Tensor cflora_grad_lora_b(const at::Tensor& grad_y, const at::Tensor& grad_p, const at::Tensor& t,
                                     double scale) {
  return grad_p.defined() ? at::mm(grad_p.t(), t) : at::mm(grad_y.t(), t.mul(scale));
}

// dT = dP B  (M, r)
inline at::Tensor cflora_grad_t(const at::Tensor& grad_y, const at::Tensor& grad_p, const at::Tensor& lora_b,
                                double scale) {
  return grad_p.defined() ? at::mm(grad_p, lora_b) : at::mm(grad_y, lora_b.mul(scale));
}

// ---------------------------------------------------------------------------------------------------------
// The op sequence of cflora_fwd / cflora_bwd, one home for both backends. The CPU (cflora.cpp) and CUDA
// (cflora_cuda.cu) kernels are this sequence of ATen calls (GEMMs: MKL/OpenBLAS on the CPU, cuBLAS on CUDA)
// plus four device kernels that each backend supplies as static members of `Kernels` (with kDevice, the device
// type its arguments must have, and Guard, constructed from x's device once the arguments are checked):
//   dropout(src, dst, p, seed)                       dst = drop(src) over the flat (M, d_in) index; may alias
//   interact_per_sample(s, c, rows_per_sample)       T = S C_bᵀ for a per-sample C (n, r, r)
//   interaction_grad_per_sample(dt, s, c, rps)       dC_b = Σ_{rows of b} dTᵀ S
//   masked_rank_add(dx, ds, lora_a, p, seed)         dx += drop'(dS A), p > 0: one read-modify-write of dx
// Each runs inside a RECORD_FUNCTION range "rellax::<name>" whose inputs are the tensors it reads. That is what
// tests/ops/test_traffic_model_cuda.py records with torch.profiler on the CPU backend to model the CUDA
// backend's memory traffic: one sequence, so the CPU run's ATen calls are the CUDA run's cuBLAS calls.
// ---------------------------------------------------------------------------------------------------------

template <class Kernels>
at::Tensor cflora_dropped(const at::Tensor& x, double p, int64_t seed) {
  if (p == 0.0) return x;
  RECORD_FUNCTION("rellax::dropout", std::vector<c10::IValue>({x}));
  at::Tensor out = at::empty_like(x);
  Kernels::dropout(x, out, p, seed);
  return out;
}

// T = S Cᵀ: identity copies S (outputs may not alias), a shared C is one GEMM, a per-sample C the device's.
template <class Kernels>
at::Tensor cflora_interact_fwd(const at::Tensor& s, const at::Tensor& c, int64_t rows_per_sample) {
  if (!c.defined()) return s.clone();
  if (c.dim() == 2) return at::mm(s, c.t());
  RECORD_FUNCTION("rellax::interact_per_sample", std::vector<c10::IValue>({s, c}));
  return Kernels::interact_per_sample(s, c, rows_per_sample);
}

template <class Kernels>
at::Tensor cflora_interaction_grad(const at::Tensor& dt, const at::Tensor& s, const at::Tensor& c,
                                   int64_t rows_per_sample) {
  if (c.dim() == 2) return at::mm(dt.t(), s);
  RECORD_FUNCTION("rellax::interaction_grad_per_sample", std::vector<c10::IValue>({dt, s, c}));
  return Kernels::interaction_grad_per_sample(dt, s, c, rows_per_sample);
}

// y = x Wᵀ + b + scale·(S Cᵀ) Bᵀ with S = drop(x) Aᵀ; returns (y, S, T). Checks the arguments for
// Kernels::kDevice and makes every input contiguous once.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cflora_fwd_sequence(
    const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_a_in, const at::Tensor& lora_b_in, const c10::optional<at::Tensor>& interaction,
    int64_t rows_per_sample, double scale, double dropout_p, int64_t seed) {
  cflora_check_args("cflora_fwd", Kernels::kDevice, x_in, weight_in, bias, lora_a_in, lora_b_in, interaction,
                    rows_per_sample, dropout_p);
  const typename Kernels::Guard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), lora_a = lora_a_in.contiguous(),
                   lora_b = lora_b_in.contiguous();
  const at::Tensor c = interaction.has_value() ? interaction->contiguous() : at::Tensor();

  const at::Tensor s = at::mm(cflora_dropped<Kernels>(x, dropout_p, seed), lora_a.t());
  const at::Tensor t = cflora_interact_fwd<Kernels>(s, c, rows_per_sample);
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  cflora_add_lora_expand(y, t, lora_b, scale);  // y += scale·T Bᵀ in place (addmm, beta = 1)
  return {y, s, t};
}

// dx = dY W + drop'(dS A). Without dropout the LoRA part is written first and dY W is added by addmm (beta = 1),
// so the large sum is rounded once; with dropout dY W is written first and masked_rank_add adds the masked
// rank-r product in one pass (no (M, d_in) temporary, no separate mask pass).
template <class Kernels>
at::Tensor cflora_grad_x(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& ds,
                         const at::Tensor& lora_a, double dropout_p, int64_t seed) {
  at::Tensor dx;
  if (dropout_p == 0.0) {
    dx = at::mm(ds, lora_a);
    dx.addmm_(grad_y, weight, /*beta=*/1, /*alpha=*/1);
  } else {
    dx = at::mm(grad_y, weight);
    RECORD_FUNCTION("rellax::masked_rank_add", std::vector<c10::IValue>({dx, ds, lora_a}));
    Kernels::masked_rank_add(dx, ds, lora_a, dropout_p, seed);
  }
  return dx;
}

// The backward (docs/architecture.md, op contracts): dT = dY (scale·B), dB = dYᵀ (scale·T), dC, dS = dT C, dA = dSᵀ drop(x),
// dx = dY W + drop'(dS A), dW = dYᵀ x, db = Σ_m dY; only the gradients in needs_grad (x, W, b, A, B, C) are
// computed, the others are empty. Checks the arguments for Kernels::kDevice, makes inputs contiguous once.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cflora_bwd_sequence(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& lora_a_in,
    const at::Tensor& lora_b_in, const c10::optional<at::Tensor>& interaction, const at::Tensor& s_in,
    const at::Tensor& t_in, int64_t rows_per_sample, double scale, double dropout_p, int64_t seed,
    std::array<bool, 6> needs_grad) {
  cflora_check_bwd_args(Kernels::kDevice, grad_y_in, x_in, weight_in, lora_a_in, lora_b_in, interaction, s_in,
                        t_in, rows_per_sample, dropout_p);
  const typename Kernels::Guard guard(x_in.device());
  const at::Tensor grad_y = grad_y_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous(),
                   lora_a = lora_a_in.contiguous(), lora_b = lora_b_in.contiguous(), s = s_in.contiguous(),
                   t = t_in.contiguous();
  const at::Tensor c = interaction.has_value() ? interaction->contiguous() : at::Tensor();
  const bool need_x = needs_grad[0], need_w = needs_grad[1], need_b = needs_grad[2], need_a = needs_grad[3],
             need_lb = needs_grad[4], need_c = needs_grad[5] && c.defined();
  at::Tensor dx = cflora_no_grad(x), dw = cflora_no_grad(x), db = cflora_no_grad(x), da = cflora_no_grad(x),
             dlb = cflora_no_grad(x), dc = cflora_no_grad(x);
  // scale = 0, ±Inf or NaN take the reference's order (cflora_scale_is_special)
  const at::Tensor grad_p = (need_lb || need_x || need_a || need_c) ? cflora_special_grad_p(grad_y, scale)
                                                                     : at::Tensor();
  if (need_lb) dlb = cflora_grad_lora_b(grad_y, grad_p, t, scale);
  if (need_x || need_a || need_c) {
    const at::Tensor dt = cflora_grad_t(grad_y, grad_p, lora_b, scale);  // (M, r)
    if (need_c) dc = cflora_interaction_grad<Kernels>(dt, s, c, rows_per_sample);
    if (need_x || need_a) {
      const at::Tensor ds = c.defined() ? cflora_interact(dt, c, rows_per_sample, /*transpose_c=*/false) : dt;
      if (need_a) da = at::mm(ds.t(), cflora_dropped<Kernels>(x, dropout_p, seed));
      if (need_x) dx = cflora_grad_x<Kernels>(grad_y, weight, ds, lora_a, dropout_p, seed);
    }
  }
  if (need_w) dw = at::mm(grad_y.t(), x);
  if (need_b) db = grad_y.sum(0);
  return {dx, dw, db, da, dlb, dc};
}

}  // namespace rellax
