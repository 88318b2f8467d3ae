// CUDA kernels of rellax_fast::cflora_fwd / cflora_bwd (schemas in cflora.cpp). The op sequence is
// cflora_common.h's, shared with the CPU backend: every GEMM is cuBLAS through ATen (tensor cores; TF32 for fp32
// when allowed). This file supplies the sequence's CUDA device kernels (CfloraCudaKernels):
//   dropout                      cflora_dropout_kernel: drop(x) materialised from the common.h hash (one
//                                (M, d_in) temporary in x's dtype, freed after its GEMM)
//   interact_per_sample          T = S C_bᵀ: cflora_interact_rows_kernel (one thread per output, acc_t) when
//                                samples have few rows (decode), a batched GEMM for longer samples
//   interaction_grad_per_sample  cflora_interaction_grad_kernel: rows staged through shared memory, long
//                                samples split over blocks and combined with fp32/fp64 atomics (r <= 64; a
//                                batched GEMM above)
//   masked_rank_add              cflora_masked_rank_add_kernel: dx += drop'(dS A) with the mask regenerated,
//                                one read-modify-write of dx (dropout on; without it the sequence uses addmm)
// The sequence's memory traffic at the headline shape is modelled, per op, by
// tests/ops/test_traffic_model_cuda.py and tabled in docs/backends.md ("CUDA backend traffic").
// All work runs on the current stream under a CUDAGuard (CfloraCudaKernels::Guard).
#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "cflora_common.h"
#include "common.h"

namespace rellax {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxFusedRank = 64;    // larger ranks compute dC with a batched cuBLAS GEMM
constexpr int64_t kInteractGemmRows = 16;  // per-sample T = S C_bᵀ: batched GEMM from this many rows per sample
constexpr int kGradRows = 32;        // rows per shared-memory stage of the dC reduction
constexpr int kGradOutPerThread = kMaxFusedRank * kMaxFusedRank / kThreads;  // 16
constexpr int64_t kGradRowsPerBlock = 256;                                   // rows of one sample per block

// T[row][j] = Σ_k S[row][k] · C[row / rows_per_sample][j][k]: one thread per output element (grid-stride),
// accumulated in acc_t. Used for a per-sample C with few rows per sample (decode, 2-D x), where a batched
// GEMM of (rows_per_sample x r) by (r x r) tiles would waste tensor-core tiles; C[b] (r·r elements) and
// the S row stay in L1 across the r threads that share them. Work: M·r·r FMAs, small next to the shrink's
// M·d_in·r. Traffic: S read, T written (M·r each), C read once per sample from L2.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    cflora_interact_rows_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ c,
                                scalar_t* __restrict__ t, int64_t m, int r, int64_t rows_per_sample) {
  const int64_t n = m * r;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / r;
    const int j = static_cast<int>(i - row * r);
    const scalar_t* s_row = s + row * r;
    const scalar_t* c_row = c + (row / rows_per_sample) * r * r + static_cast<int64_t>(j) * r;
    acc_t v = acc_t(0);
    for (int k = 0; k < r; ++k) v += static_cast<acc_t>(s_row[k]) * static_cast<acc_t>(c_row[k]);
    t[i] = static_cast<scalar_t>(v);
  }
}

// dC[b][i][j] (+)= Σ_{rows q of sample b in this block's slice} dT[q][i] · S[q][j].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    cflora_interaction_grad_kernel(const scalar_t* __restrict__ dt, const scalar_t* __restrict__ s,
                                   acc_t* __restrict__ dc, int r, int64_t rows_per_sample, bool accumulate) {
  __shared__ acc_t dt_tile[kGradRows][kMaxFusedRank + 1];
  __shared__ acc_t s_tile[kGradRows][kMaxFusedRank + 1];
  const int64_t sample = blockIdx.x;
  const int64_t begin = sample * rows_per_sample + static_cast<int64_t>(blockIdx.y) * kGradRowsPerBlock;
  const int64_t end = std::min(begin + kGradRowsPerBlock, (sample + 1) * rows_per_sample);
  const int tid = threadIdx.x;
  const int n_out = r * r;
  acc_t acc[kGradOutPerThread];
#pragma unroll
  for (int o = 0; o < kGradOutPerThread; ++o) acc[o] = acc_t(0);

  for (int64_t q0 = begin; q0 < end; q0 += kGradRows) {
    for (int i = tid; i < kGradRows * r; i += kThreads) {
      const int qq = i / r, j = i % r;
      const int64_t q = q0 + qq;
      const bool in = q < end;
      dt_tile[qq][j] = in ? static_cast<acc_t>(dt[q * r + j]) : acc_t(0);
      s_tile[qq][j] = in ? static_cast<acc_t>(s[q * r + j]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int o = 0; o < kGradOutPerThread; ++o) {
      const int out = tid + o * kThreads;
      if (out < n_out) {
        const int i = out / r, j = out % r;
        acc_t sum = acc[o];
#pragma unroll 8
        for (int qq = 0; qq < kGradRows; ++qq) sum += dt_tile[qq][i] * s_tile[qq][j];
        acc[o] = sum;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int o = 0; o < kGradOutPerThread; ++o) {
    const int out = tid + o * kThreads;
    if (out < n_out) {
      acc_t* dst = dc + sample * n_out + out;
      if (accumulate) {
        atomicAdd(dst, acc[o]);
      } else {
        *dst = acc[o];
      }
    }
  }
}

// dst = src · keep(seed, i) / (1 - p) over the flat index; dst may alias src.
template <typename scalar_t, typename acc_t>
__global__ void cflora_dropout_kernel(const scalar_t* src, scalar_t* dst, int64_t n, uint32_t key,
                                      uint32_t threshold, acc_t inv_keep) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = dropout_keep(key, i, threshold) ? static_cast<scalar_t>(static_cast<acc_t>(src[i]) * inv_keep)
                                             : static_cast<scalar_t>(0);
  }
}

// dx[m][k] += keep(seed, m·d_in + k) · Σ_j dS[m][j] A[j][k] / (1 - p): one thread per element (grid-stride),
// the rank-r dot in acc_t, dx rounded once. A dropped element is not touched (drop' gives exactly 0). The dS row
// (r values) is shared by the d_in threads of a row and A (r·d_in) stays in L2. Traffic: dx read and written,
// dS and A read from cache; work M·d_in·r FMAs, no (M, d_in) temporary and no separate mask pass.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    cflora_masked_rank_add_kernel(scalar_t* __restrict__ dx, const scalar_t* __restrict__ ds,
                                  const scalar_t* __restrict__ a, int64_t n, int64_t d_in, int r, uint32_t key,
                                  uint32_t threshold, acc_t inv_keep) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (!dropout_keep(key, i, threshold)) continue;
    const int64_t row = i / d_in;
    const int64_t col = i - row * d_in;
    const scalar_t* ds_row = ds + row * r;
    acc_t v = acc_t(0);
    for (int j = 0; j < r; ++j) v += static_cast<acc_t>(ds_row[j]) * static_cast<acc_t>(a[j * d_in + col]);
    dx[i] = static_cast<scalar_t>(static_cast<acc_t>(dx[i]) + v * inv_keep);
  }
}

void launch_dropout(const at::Tensor& src, at::Tensor& dst, double p, int64_t seed) {
  const int64_t n = src.numel();
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 8);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "cflora_dropout_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    cflora_dropout_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        src.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), n, dropout_key(seed), dropout_threshold(p),
        static_cast<acc_t>(1.0 / (1.0 - p)));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// T = S C_bᵀ for a per-sample C: the row kernel when samples have few rows, a batched GEMM otherwise.
at::Tensor interact_per_sample_cuda(const at::Tensor& s, const at::Tensor& c, int64_t rows_per_sample) {
  const int64_t m = s.size(0), r = s.size(1);
  if (rows_per_sample >= kInteractGemmRows) return cflora_interact(s, c, rows_per_sample, /*transpose_c=*/true);
  at::Tensor t = at::empty_like(s);
  if (m == 0) return t;
  const int64_t blocks = std::min<int64_t>((m * r + kThreads - 1) / kThreads, 65535LL * 8);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "cflora_interact_rows_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    cflora_interact_rows_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        s.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), m, static_cast<int>(r),
        rows_per_sample);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return t;
}

// dC for a per-sample C: (n, r, r).
at::Tensor interaction_grad_cuda(const at::Tensor& dt, const at::Tensor& s, const at::Tensor& c,
                                 int64_t rows_per_sample) {
  const int64_t n = c.size(0), r = c.size(1);
  if (r > kMaxFusedRank) return cflora_interaction_grad_aten(dt, s, c, rows_per_sample);
  const int64_t splits = std::max<int64_t>(1, (rows_per_sample + kGradRowsPerBlock - 1) / kGradRowsPerBlock);
  const bool accumulate = splits > 1;
  const auto acc_dtype = at::toAccumulateType(dt.scalar_type(), /*is_cuda=*/true);
  at::Tensor dc_acc = accumulate ? at::zeros({n, r, r}, dt.options().dtype(acc_dtype))
                                 : at::empty({n, r, r}, dt.options().dtype(acc_dtype));
  if (n == 0) return dc_acc.to(dt.scalar_type());
  if (rows_per_sample == 0) return dc_acc.zero_().to(dt.scalar_type());
  TORCH_CHECK(n <= 0x7fffffffLL && splits <= 65535, "cflora_bwd: per-sample grid too large (", n, " samples x ",
              splits, " splits)");
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(splits));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt.scalar_type(), "cflora_interaction_grad_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    cflora_interaction_grad_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        dt.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), dc_acc.data_ptr<acc_t>(), static_cast<int>(r),
        rows_per_sample, accumulate);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dc_acc.scalar_type() == dt.scalar_type() ? dc_acc : dc_acc.to(dt.scalar_type());
}

void launch_masked_rank_add(at::Tensor& dx, const at::Tensor& ds, const at::Tensor& lora_a, double p,
                            int64_t seed) {
  const int64_t n = dx.numel(), d_in = dx.size(1);
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 8);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), "cflora_masked_rank_add_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    cflora_masked_rank_add_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        dx.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>(), lora_a.data_ptr<scalar_t>(), n, d_in,
        static_cast<int>(ds.size(1)), dropout_key(seed), dropout_threshold(p), static_cast<acc_t>(1.0 / (1.0 - p)));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The CUDA device kernels of cflora_common.h's op sequence.
struct CfloraCudaKernels {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  using Guard = c10::cuda::CUDAGuard;
  static void dropout(const at::Tensor& src, at::Tensor& dst, double p, int64_t seed) {
    launch_dropout(src, dst, p, seed);
  }
  static at::Tensor interact_per_sample(const at::Tensor& s, const at::Tensor& c, int64_t rows_per_sample) {
    return interact_per_sample_cuda(s, c, rows_per_sample);
  }
  static at::Tensor interaction_grad_per_sample(const at::Tensor& dt, const at::Tensor& s, const at::Tensor& c,
                                                int64_t rows_per_sample) {
    return interaction_grad_cuda(dt, s, c, rows_per_sample);
  }
  static void masked_rank_add(at::Tensor& dx, const at::Tensor& ds, const at::Tensor& lora_a, double p,
                              int64_t seed) {
    launch_masked_rank_add(dx, ds, lora_a, p, seed);
  }
};

}  // namespace
}  // namespace rellax

TORCH_LIBRARY_IMPL(rellax_fast, CUDA, m) {
  m.impl("cflora_fwd", &rellax::cflora_fwd_sequence<rellax::CfloraCudaKernels>);
  m.impl("cflora_bwd", &rellax::cflora_bwd_sequence<rellax::CfloraCudaKernels>);
}
