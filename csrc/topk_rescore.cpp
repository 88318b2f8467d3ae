// rellax_fast::topk_rescore — CPU kernel of semantic_topk's exact bf16 prefilter, everything after its GEMM
// (rellax_fast/ops/topk_prefilter.py derives the bound and explains why the result is exact).
//
// Input: a batch of padded groups. scores (B, n, W) bf16 holds the bf16 score of target (b, i) against
// history slot j; hist (B, W) and targ (B, n) are item rows of emb64 (N, d) float64; target (b, i) sees the
// slots j < tpos[b, i]; bound (B, n) float32 is its certified error bound E.
// Per target, in parallel: one pass over its row keeps the k best bf16 scores (the k-th is `kth`); a second
// pass rescores in float64 every slot with S >= kth - 2E (every slot when the row has fewer than k) and
// inserts it into a sorted top-k, slots in increasing j so that a new equal score goes in front of the
// older ones (ties to the larger position). Replaces a causal mask, a top-k, a compare, a nonzero and a
// padded float64 gather of the survivors in torch: the row stays in cache between the two passes and only
// the survivors' rows of emb64 are read.
// Output: pos (B, n, k) int64 (slot j, -1 padding) and score (B, n, k) float64 (-inf padding).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "topk_common.h"

namespace rellax {
namespace rescore_cpu {

inline double dot(const double* a, const double* b, int64_t d) {
  double s = 0.0;
  for (int64_t x = 0; x < d; ++x) s += a[x] * b[x];
  return s;
}

// One target: its row of bf16 scores (first `lim` slots valid), its float64 row t, the history rows.
void one_row(const at::BFloat16* row, int64_t lim, const double* t, const int64_t* hist, const double* emb,
             int64_t d, int64_t k, double bound, float* kbuf, int64_t* kpos, double* out_s, int64_t* out_p) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  int64_t cnt = 0;
  float kth = neg_inf;
  for (int64_t j = 0; j < lim; ++j) {
    const float s = static_cast<float>(row[j]);
    if (cnt < k || s > kth) kth = insert_topk<float>(kbuf, kpos, &cnt, k, s, j);
  }
  const double thr = cnt < k ? -std::numeric_limits<double>::infinity() : double(kth) - 2.0 * bound;
  int64_t kept = 0;
  double floor = -std::numeric_limits<double>::infinity();  // the k-th rescored score once k are kept
  for (int64_t j = 0; j < lim; ++j) {
    if (!(double(static_cast<float>(row[j])) >= thr)) continue;
    const double s = dot(t, emb + hist[j] * d, d);
    if (kept < k || s >= floor) floor = insert_topk<double>(out_s, out_p, &kept, k, s, j);
  }
}

void check(const at::Tensor& scores, const at::Tensor& hist, const at::Tensor& targ, const at::Tensor& tpos,
           const at::Tensor& bound, const at::Tensor& emb64, int64_t k) {
  TORCH_CHECK(scores.scalar_type() == at::kBFloat16 && scores.dim() == 3,
              "topk_rescore: scores must be a (B, n, W) bfloat16 tensor; got ", scores.scalar_type(), " of shape ",
              shape_str(scores));
  const int64_t B = scores.size(0), n = scores.size(1), W = scores.size(2);
  TORCH_CHECK(hist.scalar_type() == at::kLong && hist.dim() == 2 && hist.size(0) == B && hist.size(1) == W,
              "topk_rescore: hist must be a (B, W) int64 tensor matching scores; got ", hist.scalar_type(),
              " of shape ", shape_str(hist));
  for (const at::Tensor* t : {&targ, &tpos})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 2 && t->size(0) == B && t->size(1) == n,
                "topk_rescore: targ and tpos must be (B, n) int64 tensors matching scores; got ", t->scalar_type(),
                " of shape ", shape_str(*t));
  TORCH_CHECK(bound.scalar_type() == at::kFloat && bound.dim() == 2 && bound.size(0) == B && bound.size(1) == n,
              "topk_rescore: bound must be a (B, n) float32 tensor; got ", bound.scalar_type(), " of shape ",
              shape_str(bound));
  TORCH_CHECK(emb64.scalar_type() == at::kDouble && emb64.dim() == 2,
              "topk_rescore: emb64 must be a (N, d) float64 tensor; got ", emb64.scalar_type(), " of shape ",
              shape_str(emb64));
  for (const at::Tensor* t : {&scores, &hist, &targ, &tpos, &bound, &emb64})
    TORCH_CHECK(t->device().is_cpu(), "topk_rescore (cpu kernel): every tensor must be on the CPU");
  TORCH_CHECK(k >= 1, "topk_rescore: k must be >= 1; got ", k);
}

// Every index read below is checked first (a direct torch.ops caller must get an error, not a crash).
void check_values(const int64_t* hist, const int64_t* targ, const int64_t* tpos, int64_t B, int64_t n, int64_t W,
                  int64_t N) {
  for (int64_t r = 0; r < B * n; ++r) {
    TORCH_CHECK(tpos[r] >= 0 && tpos[r] <= W, "topk_rescore: tpos[", r, "] = ", tpos[r], " is out of [0, ", W, "]");
    TORCH_CHECK(targ[r] >= 0 && targ[r] < N, "topk_rescore: targ[", r, "] = ", targ[r], " is out of [0, ", N, ")");
  }
  for (int64_t e = 0; e < B * W; ++e)
    TORCH_CHECK(hist[e] >= 0 && hist[e] < N, "topk_rescore: hist[", e, "] = ", hist[e], " is out of [0, ", N, ")");
}

}  // namespace rescore_cpu

std::tuple<at::Tensor, at::Tensor> topk_rescore_cpu(const at::Tensor& scores_in, const at::Tensor& hist_in,
                                                    const at::Tensor& targ_in, const at::Tensor& tpos_in,
                                                    const at::Tensor& bound_in, const at::Tensor& emb64_in,
                                                    int64_t k) {
  using namespace rescore_cpu;
  check(scores_in, hist_in, targ_in, tpos_in, bound_in, emb64_in, k);
  const at::Tensor scores = scores_in.contiguous(), hist = hist_in.contiguous(), targ = targ_in.contiguous();
  const at::Tensor tpos = tpos_in.contiguous(), bound = bound_in.contiguous(), emb64 = emb64_in.contiguous();
  const int64_t B = scores.size(0), n = scores.size(1), W = scores.size(2), N = emb64.size(0), d = emb64.size(1);
  at::Tensor out_pos = at::full({B, n, k}, -1, hist.options());
  at::Tensor out_score = at::full({B, n, k}, -std::numeric_limits<double>::infinity(), emb64.options());
  const int64_t *hp = hist.data_ptr<int64_t>(), *tp = targ.data_ptr<int64_t>(), *pp = tpos.data_ptr<int64_t>();
  check_values(hp, tp, pp, B, n, W, N);
  const at::BFloat16* sp = scores.data_ptr<at::BFloat16>();
  const float* bp = bound.data_ptr<float>();
  const double* ep = emb64.data_ptr<double>();
  double* os = out_score.data_ptr<double>();
  int64_t* op = out_pos.data_ptr<int64_t>();
  at::parallel_for(0, B * n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kbuf(k);
    std::vector<int64_t> kpos(k);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / n;
      one_row(sp + r * W, pp[r], ep + tp[r] * d, hp + b * W, ep, d, k, double(bp[r]), kbuf.data(), kpos.data(),
              os + r * k, op + r * k);
    }
  });
  return {out_pos, out_score};
}

}  // namespace rellax

TORCH_LIBRARY_FRAGMENT(rellax_fast, m) {
  m.def(
      "topk_rescore(Tensor scores, Tensor hist, Tensor targ, Tensor tpos, Tensor bound, Tensor emb64, int k) "
      "-> (Tensor pos, Tensor score)");
}

TORCH_LIBRARY_IMPL(rellax_fast, CPU, m) {
  m.impl("topk_rescore", &rellax::topk_rescore_cpu);
}
