// rellax_fast::cflora_fwd / cflora_bwd: schemas and the CPU kernels (ATen GEMMs + an inline dropout mask).
//
//   forward   S = drop(x) Aᵀ (M, r)   T = S Cᵀ (per sample: batched)   y = x Wᵀ + b, then y += scale·T Bᵀ
//             in place (addmm, beta = 1): the LoRA expand lands in the base output, no d_out-sized temp.
//             A scale of 0, ±Inf or NaN takes the reference's IEEE order instead (cflora_common.h).
//   backward  dT = dY (scale·B)   dB = dYᵀ (scale·T)   dC_b = Σ_b dTᵀ S   dS = dT C
//             dA = dSᵀ drop(x)    dx = drop'(dS A) + dY W   (mask applied in place, then addmm beta = 1)
//             dW = dYᵀ x          db = Σ_m dY
// The dropout mask is the shared hash of (seed, m·d_in + k) from common.h, regenerated in the backward.
// With dropout_p = 0 no mask work happens at all. Autograd and fake kernels are registered in Python
// (rellax_fast/ops/cflora.py); the CUDA kernels are in cflora_cuda.cu.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "cflora_common.h"
#include "common.h"

namespace rellax {
namespace {

// dst = src * keep(seed, i) / (1 - p) over the flat (M, d_in) index; dst may alias src (in place).
void cflora_dropout_cpu(const at::Tensor& src, at::Tensor& dst, double p, int64_t seed) {
  const int64_t n = src.numel();
  const uint32_t key = dropout_key(seed);
  const uint32_t thr = dropout_threshold(p);
  const double inv_keep = 1.0 / (1.0 - p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "cflora_dropout_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* out = dst.data_ptr<scalar_t>();
    const acc_t keep_scale = static_cast<acc_t>(inv_keep);
    at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        out[i] = dropout_keep(key, i, thr) ? static_cast<scalar_t>(static_cast<acc_t>(in[i]) * keep_scale)
                                           : static_cast<scalar_t>(0);
      }
    });
  });
}

at::Tensor dropped_cpu(const at::Tensor& x, double p, int64_t seed) {
  if (p == 0.0) return x;
  at::Tensor out = at::empty_like(x);
  cflora_dropout_cpu(x, out, p, seed);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cflora_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
    const at::Tensor& lora_a_in, const at::Tensor& lora_b_in, const c10::optional<at::Tensor>& interaction_in,
    int64_t rows_per_sample, double scale, double dropout_p, int64_t seed) {
  cflora_check_args("cflora_fwd", c10::DeviceType::CPU, x_in, weight_in, bias_in, lora_a_in, lora_b_in,
                    interaction_in, rows_per_sample, dropout_p);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor lora_a = lora_a_in.contiguous();
  const at::Tensor lora_b = lora_b_in.contiguous();

  const at::Tensor s = at::mm(dropped_cpu(x, dropout_p, seed), lora_a.t());
  const at::Tensor t = interaction_in.has_value()
                           ? cflora_interact(s, interaction_in->contiguous(), rows_per_sample, /*transpose_c=*/true)
                           : s.clone();  // identity C: no r×r matmul; a copy because outputs may not alias
  at::Tensor y = bias_in.has_value() ? at::addmm(*bias_in, x, weight.t()) : at::mm(x, weight.t());
  cflora_add_lora_expand(y, t, lora_b, scale);
  return {y, s, t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cflora_bwd_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& lora_a_in,
    const at::Tensor& lora_b_in, const c10::optional<at::Tensor>& interaction_in, const at::Tensor& s_in,
    const at::Tensor& t_in, int64_t rows_per_sample, double scale, double dropout_p, int64_t seed,
    std::array<bool, 6> needs_grad) {
  cflora_check_bwd_args(c10::DeviceType::CPU, grad_y_in, x_in, weight_in, lora_a_in, lora_b_in, interaction_in, s_in,
                        t_in, rows_per_sample, dropout_p);
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor lora_a = lora_a_in.contiguous();
  const at::Tensor lora_b = lora_b_in.contiguous();
  const at::Tensor s = s_in.contiguous();
  const at::Tensor t = t_in.contiguous();
  const bool has_c = interaction_in.has_value();
  const at::Tensor c = has_c ? interaction_in->contiguous() : at::Tensor();
  const bool need_x = needs_grad[0], need_w = needs_grad[1], need_b = needs_grad[2], need_a = needs_grad[3],
             need_lb = needs_grad[4], need_c = needs_grad[5] && has_c;

  at::Tensor dx = cflora_no_grad(x), dw = cflora_no_grad(x), db = cflora_no_grad(x), da = cflora_no_grad(x),
             dlb = cflora_no_grad(x), dc = cflora_no_grad(x);
  const at::Tensor grad_p = (need_lb || need_x || need_a || need_c) ? cflora_special_grad_p(grad_y, scale)
                                                                     : at::Tensor();
  if (need_lb) dlb = cflora_grad_lora_b(grad_y, grad_p, t, scale);
  if (need_x || need_a || need_c) {
    const at::Tensor dt = cflora_grad_t(grad_y, grad_p, lora_b, scale);  // (M, r)
    if (need_c) dc = cflora_interaction_grad_aten(dt, s, c, rows_per_sample);
    if (need_x || need_a) {
      const at::Tensor ds = has_c ? cflora_interact(dt, c, rows_per_sample, /*transpose_c=*/false) : dt;
      if (need_a) da = at::mm(ds.t(), dropped_cpu(x, dropout_p, seed));
      if (need_x) {
        dx = at::mm(ds, lora_a);  // (M, d_in): the LoRA part first, masked in place, then += dY W
        if (dropout_p > 0.0) cflora_dropout_cpu(dx, dx, dropout_p, seed);
        dx.addmm_(grad_y, weight, /*beta=*/1, /*alpha=*/1);
      }
    }
  }
  if (need_w) dw = at::mm(grad_y.t(), x);
  if (need_b) db = grad_y.sum(0);
  return {dx, dw, db, da, dlb, dc};
}

}  // namespace
}  // namespace rellax

TORCH_LIBRARY_FRAGMENT(rellax_fast, m) {
  m.def(
      "cflora_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor? interaction, "
      "int rows_per_sample, float scale, float dropout_p, int seed) -> (Tensor y, Tensor s, Tensor t)");
  m.def(
      "cflora_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor? interaction, "
      "Tensor s, Tensor t, int rows_per_sample, float scale, float dropout_p, int seed, bool[6] needs_grad) -> "
      "(Tensor dx, Tensor dweight, Tensor dbias, Tensor dlora_a, Tensor dlora_b, Tensor dinteraction)");
}

TORCH_LIBRARY_IMPL(rellax_fast, CPU, m) {
  m.impl("cflora_fwd", &rellax::cflora_fwd_cpu);
  m.impl("cflora_bwd", &rellax::cflora_bwd_cpu);
}
