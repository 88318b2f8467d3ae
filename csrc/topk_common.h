// Shared by the CPU top-k kernels (topk.cpp, topk_rescore.cpp): insertion into a row's sorted top-k.
#pragma once

#include <cstdint>
#include <limits>

namespace rellax {

// Insert score s of candidate `pos` into a row's sorted top-k (sc, ps, *cnt entries so far). Candidates
// arrive in increasing position, so a new score goes in front of equal ones (ties: the larger position).
// Returns the row's new threshold (the k-th best, or -inf while the row is not full).
template <typename T>
inline T insert_topk(T* sc, int64_t* ps, int64_t* cnt, int64_t k, T s, int64_t pos) {
  int64_t slot = *cnt < k ? *cnt : k - 1;
  while (slot > 0 && sc[slot - 1] <= s) {
    sc[slot] = sc[slot - 1];
    ps[slot] = ps[slot - 1];
    --slot;
  }
  sc[slot] = s;
  ps[slot] = pos;
  if (*cnt < k) ++*cnt;
  return *cnt < k ? -std::numeric_limits<T>::infinity() : sc[k - 1];
}

}  // namespace rellax
