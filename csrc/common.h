// Shared helpers for rellax_fast._C: argument checks and the seeded dropout hash.
//
// Dropout contract (docs/architecture.md): the mask is a pure function of (seed, element index); backward
// regenerates it, nothing is stored. Every backend (PyTorch reference, C++, CUDA, Triton) uses this
// exact hash so masks agree bit for bit:
//   mix32(x)   = lowbias32: x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16
//   key(seed)  = mix32(lo32(seed) ^ mix32(hi32(seed) ^ 0x9e3779b9))
//   h(idx)     = mix32(lo32(idx) ^ mix32(hi32(idx) + key))
//   keep       = (h >> 8) >= floor(p * 2^24)         (24-bit uniform; p = 0 keeps everything)
// idx is the element's flat index in the row-major (M, d_in) view of x.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>

#include <torch/extension.h>

#if defined(__CUDACC__)
#define RELLAX_HD __host__ __device__ __forceinline__
#else
#define RELLAX_HD inline
#endif

namespace rellax {

RELLAX_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

RELLAX_HD uint32_t dropout_key(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return mix32(static_cast<uint32_t>(s) ^ mix32(static_cast<uint32_t>(s >> 32) ^ 0x9e3779b9U));
}

RELLAX_HD uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 16777216.0);
}

RELLAX_HD bool dropout_keep(uint32_t key, int64_t idx, uint32_t threshold) {
  const uint64_t i = static_cast<uint64_t>(idx);
  const uint32_t h = mix32(static_cast<uint32_t>(i) ^ mix32(static_cast<uint32_t>(i >> 32) + key));
  return (h >> 8) >= threshold;
}

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

}  // namespace rellax

#define RELLAX_CHECK_FLOAT(t, name)                                                          \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||         \
                  (t).scalar_type() == at::kBFloat16 || (t).scalar_type() == at::kDouble,  \
              name " must be float64, float32, float16 or bfloat16; got ", (t).scalar_type())
