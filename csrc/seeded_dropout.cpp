// rellax_fast::seeded_dropout — inverted dropout whose mask is the shared hash of (seed, flat index).
// CPU kernel here; CUDA kernel in seeded_dropout_cuda.cu. The CFLoRA kernels apply the same mask inline.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace rellax {

at::Tensor seeded_dropout_cpu(const at::Tensor& x_in, double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "seeded_dropout: p must be in [0, 1); got ", p);
  RELLAX_CHECK_FLOAT(x_in, "seeded_dropout: x");
  TORCH_CHECK(x_in.device().is_cpu(), "seeded_dropout (cpu kernel): x must be a CPU tensor; got ", x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  const uint32_t key = dropout_key(seed);
  const uint32_t thr = dropout_threshold(p);
  const double scale = 1.0 / (1.0 - p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "seeded_dropout_cpu", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        dst[i] = dropout_keep(key, i, thr) ? static_cast<scalar_t>(static_cast<double>(src[i]) * scale)
                                           : static_cast<scalar_t>(0);
      }
    });
  });
  return out;
}

}  // namespace rellax

TORCH_LIBRARY_FRAGMENT(rellax_fast, m) {
  m.def("seeded_dropout(Tensor x, float p, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(rellax_fast, CPU, m) {
  m.impl("seeded_dropout", &rellax::seeded_dropout_cpu);
}
