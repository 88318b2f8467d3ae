// Module entry of rellax_fast._C: build facts for `rellax-fast info`, and the torch.library namespace.
// Each op file adds its schemas with TORCH_LIBRARY_FRAGMENT and its kernels with TORCH_LIBRARY_IMPL.
#include <torch/extension.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef RELLAX_CUDA_ARCHS
#define RELLAX_CUDA_ARCHS ""
#endif

namespace {

bool with_cuda() {
#ifdef RELLAX_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int openmp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rellax_fast compiled kernels (ops are registered with torch.library under torch.ops.rellax_fast)";
  m.def("with_cuda", &with_cuda, "whether the CUDA kernels were compiled in");
  m.def("cuda_archs", []() { return std::string(RELLAX_CUDA_ARCHS); }, "TORCH_CUDA_ARCH_LIST used at build time");
  m.def("openmp_threads", &openmp_threads, "OpenMP max threads (0 without OpenMP)");
}
