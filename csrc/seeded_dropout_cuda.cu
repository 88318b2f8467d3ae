// CUDA kernel of rellax_fast::seeded_dropout: one thread per element, grid-stride, the shared hash
// from common.h. Memory traffic: one read and one write of x. Runs on the current stream.
// The scaling runs in the accumulate type (at::acc_type: float for fp32/fp16/bf16, double for fp64), so
// float64 inputs keep full precision (a float scale would round 1/(1-p) and x to 24 bits, and the build's
// --use_fast_math only relaxes float arithmetic, never double).
#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"

namespace rellax {

template <typename scalar_t, typename acc_t>
__global__ void seeded_dropout_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t n,
                                      uint32_t key, uint32_t thr, acc_t scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = dropout_keep(key, i, thr) ? static_cast<scalar_t>(static_cast<acc_t>(src[i]) * scale)
                                       : static_cast<scalar_t>(0);
  }
}

at::Tensor seeded_dropout_cuda(const at::Tensor& x_in, double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "seeded_dropout: p must be in [0, 1); got ", p);
  RELLAX_CHECK_FLOAT(x_in, "seeded_dropout: x");
  TORCH_CHECK(x_in.is_cuda(), "seeded_dropout (cuda kernel): x must be a CUDA tensor; got ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535LL * 8);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "seeded_dropout_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    seeded_dropout_kernel<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
        x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, dropout_key(seed), dropout_threshold(p),
        static_cast<acc_t>(1.0 / (1.0 - p)));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace rellax

TORCH_LIBRARY_IMPL(rellax_fast, CUDA, m) {
  m.impl("seeded_dropout", &rellax::seeded_dropout_cuda);
}
