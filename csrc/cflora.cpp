// rellax_fast::cflora_fwd / cflora_bwd: schemas and the CPU kernels. The op sequence (ATen GEMMs) is
// cflora_common.h's, shared with the CUDA backend (cflora_cuda.cu); this file supplies its CPU device kernels:
//   dropout              dst = src · keep(seed, m·d_in + k) / (1 - p), the shared hash of common.h
//   interact_per_sample  T = S C_bᵀ as one batched GEMM; interaction_grad_per_sample likewise
//   masked_rank_add      dx += drop'(dS A), row by row (the rank-r product in the op math type, rounded once)
// With dropout_p = 0 no mask work happens at all. Fake kernels are registered in Python
// (rellax_fast/ops/cflora.py); autograd is the Python autograd.Function that cflora_linear applies
// (rellax_fast/ops/_cflora_autograd.py), with these two ops as its forward and backward.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

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

// dx[m][k] += keep(seed, m·d_in + k) · Σ_j dS[m][j] A[j][k] / (1 - p): the row's rank-r product is accumulated
// in the op math type and added to dx once (a dropped element leaves dx as it is: drop' gives exactly 0).
void cflora_masked_rank_add_cpu(at::Tensor& dx, const at::Tensor& ds, const at::Tensor& lora_a, double p,
                                int64_t seed) {
  const int64_t m = dx.size(0), d_in = dx.size(1), r = ds.size(1);
  const uint32_t key = dropout_key(seed);
  const uint32_t thr = dropout_threshold(p);
  const double inv_keep = 1.0 / (1.0 - p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), "cflora_masked_rank_add_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* out = dx.data_ptr<scalar_t>();
    const scalar_t* ds_p = ds.data_ptr<scalar_t>();
    const scalar_t* a_p = lora_a.data_ptr<scalar_t>();
    const acc_t keep_scale = static_cast<acc_t>(inv_keep);
    at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(d_in, 1)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(static_cast<size_t>(d_in));
      for (int64_t row = begin; row < end; ++row) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < r; ++j) {
          const acc_t d = static_cast<acc_t>(ds_p[row * r + j]);
          const scalar_t* a_row = a_p + j * d_in;
          for (int64_t k = 0; k < d_in; ++k) acc[k] += d * static_cast<acc_t>(a_row[k]);
        }
        scalar_t* out_row = out + row * d_in;
        for (int64_t k = 0; k < d_in; ++k) {
          if (dropout_keep(key, row * d_in + k, thr)) {
            out_row[k] = static_cast<scalar_t>(static_cast<acc_t>(out_row[k]) + acc[k] * keep_scale);
          }
        }
      }
    });
  });
}

// The CPU device kernels of cflora_common.h's op sequence.
struct CfloraCpuKernels {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  struct Guard {  // the CPU has no current device to set
    explicit Guard(c10::Device) {}
  };
  static void dropout(const at::Tensor& src, at::Tensor& dst, double p, int64_t seed) {
    cflora_dropout_cpu(src, dst, p, seed);
  }
  static at::Tensor interact_per_sample(const at::Tensor& s, const at::Tensor& c, int64_t rows_per_sample) {
    return cflora_interact(s, c, rows_per_sample, /*transpose_c=*/true);
  }
  static at::Tensor interaction_grad_per_sample(const at::Tensor& dt, const at::Tensor& s, const at::Tensor& c,
                                                int64_t rows_per_sample) {
    return cflora_interaction_grad_aten(dt, s, c, rows_per_sample);
  }
  static void masked_rank_add(at::Tensor& dx, const at::Tensor& ds, const at::Tensor& lora_a, double p,
                              int64_t seed) {
    cflora_masked_rank_add_cpu(dx, ds, lora_a, p, seed);
  }
};

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
  m.impl("cflora_fwd", &rellax::cflora_fwd_sequence<rellax::CfloraCpuKernels>);
  m.impl("cflora_bwd", &rellax::cflora_bwd_sequence<rellax::CfloraCpuKernels>);
}

// The ops themselves are not differentiable: called directly on inputs that need gradients they record a
// node that raises at backward ("derivative for rellax_fast::cflora_fwd is not implemented"), rather than
// torch's default fallback, which would differentiate the CPU kernel's inner ATen calls with a warning. Under
// no_grad (the autograd.Function's forward) this costs one C++ redispatch, where a Python register_autograd
// wrapper cost about 50 us per call (rellax_fast/ops/_cflora_autograd.py).
TORCH_LIBRARY_IMPL(rellax_fast, Autograd, m) {
  m.impl("cflora_fwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("cflora_bwd", torch::autograd::autogradNotImplementedFallback());
}
