// rellax_fast::semantic_topk — CPU kernel (OpenMP): per-sample causal top-k over packed user histories.
//
// Contract (docs/architecture.md, rellax_fast/ops/topk.py): sample s of user u at position p scores the
// user's positions 0..p-1 against its target (position p) by dot product of (optionally L2-normalised)
// item embeddings; rows are sorted by score descending, ties to the larger position, padded with -1 / -inf.
//
// Algorithm
//   1. Counting sort of the samples by their flat position seq_offsets[u] + p (O(S + total)): this groups
//      them by user and sorts each user's samples by p.
//   2. Work items = runs of <= kChunk consecutive samples of one user; ordered by cost (sum of p), run
//      with OpenMP dynamic scheduling.
//   3. Once per call the item table is converted to float32 rows (normalised when cosine; d padded to a
//      multiple of 16 with zeros; one extra zero row). Per work item a thread streams the user's history
//      rows (looked up in that table) in history tiles
//      of kTileN rows, each transposed once into (d x 32) slabs. For each group of 8 targets and slab
//      of 32 candidates a register-blocked micro-kernel (16 vector accumulators, target scalars
//      broadcast) computes the 256 dot products; every score that beats the row's current k-th best is
//      inserted into the row's sorted top-k buffer (ties: candidates come in increasing position, so a
//      new equal score goes in front of the older equal ones). Candidates >= the target's position are
//      skipped (causal), and tiles past the group's largest position are never computed.
//   Memory: O(total + S*k) outputs plus one (max L x d) buffer per thread; no S x L scores exist.
//   Every dot product runs through the same micro-kernel code path, so identical embeddings give
//   bit-identical scores and exact ties are resolved by position as contracted.
//   The micro-kernel is compiled for x86-64-v4 (AVX-512), v3 (AVX2+FMA) and baseline via target_clones,
//   chosen at load time, since the extension itself is built without -march flags.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"

namespace rellax {
namespace topk_cpu {

constexpr int64_t kChunk = 512;   // targets per work item
constexpr int64_t kTileN = 256;   // history rows per tile
constexpr int64_t kLanes = 16;    // d is padded to a multiple of this

typedef float v16f __attribute__((vector_size(64)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RELLAX_TOPK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RELLAX_TOPK_CLONES
#endif

constexpr int kRows = 8;    // targets per register block
constexpr int kCols = 32;   // candidates per register block (two 16-lane vectors)

// One work item: `n` targets (positions `tpos`, ascending) of a user whose item at position j has its
// float32 row at table + hist[j] * dp (row `zero_row` is all zeros). Writes each target's sorted top-k into out_score/out_pos (n x k, pre-filled -inf/-1).
// `panel` is scratch for one history tile transposed into slabs of kCols candidates: slab-major,
// (dp x kCols) each, so the micro-kernel reads it contiguously and broadcasts target scalars.
RELLAX_TOPK_CLONES
void rellax_topk_chunk(const float* table, const int64_t* hist, int64_t zero_row, int64_t dp, const int64_t* tpos, int64_t n, int64_t k, float* out_score,
                       int64_t* out_pos, int64_t* count, float* panel) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) count[i] = 0;
  const int64_t pmax = tpos[n - 1];
  for (int64_t j0 = 0; j0 < pmax; j0 += kTileN) {
    const int64_t j1 = std::min(j0 + kTileN, pmax);
    const int64_t nslab = (j1 - j0 + kCols - 1) / kCols;
    for (int64_t sl = 0; sl < nslab; ++sl) {
      float* dst = panel + sl * dp * kCols;
      const float* src[kCols];
      for (int c = 0; c < kCols; ++c) {
        const int64_t row = j0 + sl * kCols + c;
        src[c] = table + (row < j1 ? hist[row] : zero_row) * dp;
      }
      for (int64_t x = 0; x < dp; ++x)
        for (int c = 0; c < kCols; ++c) dst[x * kCols + c] = src[c][x];
    }
    // first group whose largest position reaches into this tile
    int64_t g = 0;
    while (g < n && tpos[std::min<int64_t>(g + kRows - 1, n - 1)] <= j0) g += kRows;
    for (; g < n; g += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, n - g);
      const int64_t jend = std::min(j1, tpos[g + rows - 1]);
      const float* t[kRows];
      float thr[kRows];
      for (int r = 0; r < kRows; ++r) {
        const int64_t row = g + std::min<int64_t>(r, rows - 1);
        t[r] = table + hist[tpos[row]] * dp;
        thr[r] = count[row] < k ? neg_inf : out_score[row * k + k - 1];
      }
      for (int64_t sl = 0; j0 + sl * kCols < jend; ++sl) {
        const float* cp = panel + sl * dp * kCols;
        v16f acc[kRows][2];
        for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = v16f{};
        for (int64_t x = 0; x < dp; ++x) {
          v16f c0, c1;
          std::memcpy(&c0, cp + x * kCols, sizeof(v16f));
          std::memcpy(&c1, cp + x * kCols + 16, sizeof(v16f));
          for (int r = 0; r < kRows; ++r) {
            const float a = t[r][x];
            acc[r][0] += a * c0;
            acc[r][1] += a * c1;
          }
        }
        const int64_t base = j0 + sl * kCols;
        for (int r = 0; r < rows; ++r) {
          const int64_t row = g + r;
          const int64_t lim = std::min<int64_t>(std::min(tpos[row], jend) - base, kCols);
          if (lim <= 0) continue;
          float sc_block[kCols];
          std::memcpy(sc_block, &acc[r][0], sizeof(v16f));
          std::memcpy(sc_block + 16, &acc[r][1], sizeof(v16f));
          for (int64_t q = 0; q < lim; ++q) {
            const float s = sc_block[q];
            if (!(s >= thr[r])) continue;
            // insert: candidates arrive in increasing position, so a new score goes in front of equal ones
            float* sc = out_score + row * k;
            int64_t* ps = out_pos + row * k;
            int64_t slot = count[row] < k ? count[row] : k - 1;
            while (slot > 0 && sc[slot - 1] <= s) {
              sc[slot] = sc[slot - 1];
              ps[slot] = ps[slot - 1];
              --slot;
            }
            sc[slot] = s;
            ps[slot] = base + q;
            if (count[row] < k) ++count[row];
            thr[r] = count[row] < k ? neg_inf : sc[k - 1];
          }
        }
      }
    }
  }
}

struct WorkItem {
  int64_t begin;  // into the sorted sample order
  int64_t end;
  int64_t user;
  double cost;
};

template <typename scalar_t>
void build_table(const scalar_t* emb, int64_t n_items, int64_t d, int64_t dp, bool normalize, int nthreads,
                 float* table) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r <= n_items; ++r) {
    float* dst = table + r * dp;
    if (r == n_items) {  // the zero row used to pad partial slabs
      for (int64_t x = 0; x < dp; ++x) dst[x] = 0.0f;
      continue;
    }
    const scalar_t* src = emb + r * d;
    double sq = 0.0;
    for (int64_t x = 0; x < d; ++x) {
      const float v = static_cast<float>(src[x]);
      dst[x] = v;
      sq += static_cast<double>(v) * v;
    }
    for (int64_t x = d; x < dp; ++x) dst[x] = 0.0f;
    if (normalize) {
      const float inv = static_cast<float>(1.0 / std::max(std::sqrt(sq), 1e-12));
      for (int64_t x = 0; x < d; ++x) dst[x] *= inv;
    }
  }
}

template <typename scalar_t>
void run_work(const scalar_t* emb, int64_t n_items, int64_t d, int64_t dp, const int64_t* items, const int64_t* offs,
              const int64_t* sp, const std::vector<int64_t>& order, const std::vector<WorkItem>& work, int64_t k,
              bool normalize, int nthreads, float* score_ptr, int64_t* pos_ptr) {
  const int64_t n_work = static_cast<int64_t>(work.size());
  std::vector<float> table((n_items + 1) * dp);
  build_table<scalar_t>(emb, n_items, d, dp, normalize, nthreads, table.data());
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> lscore, panel(kTileN * dp);
    std::vector<int64_t> tpos, lpos, count;
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < n_work; ++w) {
      const WorkItem& it = work[w];
      const int64_t n = it.end - it.begin;
      tpos.resize(n);
      for (int64_t i = 0; i < n; ++i) tpos[i] = sp[order[it.begin + i]];
      lscore.assign(n * k, -std::numeric_limits<float>::infinity());
      lpos.assign(n * k, -1);
      count.resize(n);
      rellax_topk_chunk(table.data(), items + offs[it.user], n_items, dp, tpos.data(), n, k, lscore.data(), lpos.data(), count.data(), panel.data());
      for (int64_t i = 0; i < n; ++i) {
        const int64_t s = order[it.begin + i];
        std::memcpy(score_ptr + s * k, lscore.data() + i * k, sizeof(float) * k);
        std::memcpy(pos_ptr + s * k, lpos.data() + i * k, sizeof(int64_t) * k);
      }
    }
  }
}

}  // namespace topk_cpu

std::tuple<at::Tensor, at::Tensor> semantic_topk_cpu(const at::Tensor& item_emb_in, const at::Tensor& seq_items_in,
                                                     const at::Tensor& seq_offsets_in,
                                                     const at::Tensor& sample_user_in,
                                                     const at::Tensor& sample_pos_in, int64_t k, bool normalize) {
  using namespace topk_cpu;
  RELLAX_CHECK_FLOAT(item_emb_in, "semantic_topk: item_emb");
  TORCH_CHECK(item_emb_in.dim() == 2, "semantic_topk: item_emb must be 2-D (N_items, d); got shape ",
              shape_str(item_emb_in));
  const at::Tensor* idx[4] = {&seq_items_in, &seq_offsets_in, &sample_user_in, &sample_pos_in};
  const char* names[4] = {"seq_items", "seq_offsets", "sample_user", "sample_pos"};
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(idx[i]->scalar_type() == at::kLong && idx[i]->dim() == 1, "semantic_topk: ", names[i],
                " must be a 1-D int64 tensor; got ", idx[i]->scalar_type(), " of shape ", shape_str(*idx[i]));
    TORCH_CHECK(idx[i]->device().is_cpu(), "semantic_topk (cpu kernel): ", names[i], " must be on the CPU");
  }
  TORCH_CHECK(item_emb_in.device().is_cpu(), "semantic_topk (cpu kernel): item_emb must be on the CPU");
  TORCH_CHECK(k >= 0, "semantic_topk: k must be >= 0; got ", k);
  TORCH_CHECK(sample_user_in.size(0) == sample_pos_in.size(0),
              "semantic_topk: sample_user and sample_pos must have the same length");
  TORCH_CHECK(seq_offsets_in.size(0) >= 1, "semantic_topk: seq_offsets must have U+1 >= 1 entries");

  const at::Tensor item_emb = item_emb_in.contiguous();
  const at::Tensor seq_items = seq_items_in.contiguous();
  const at::Tensor seq_offsets = seq_offsets_in.contiguous();
  const at::Tensor sample_user = sample_user_in.contiguous();
  const at::Tensor sample_pos = sample_pos_in.contiguous();
  const int64_t S = sample_user.size(0);
  const int64_t d = item_emb.size(1);
  const int64_t total = seq_items.size(0);
  const int64_t U = seq_offsets.size(0) - 1;

  at::Tensor out_pos = at::full({S, k}, -1, seq_items.options());
  at::Tensor out_score = at::full({S, k}, -std::numeric_limits<float>::infinity(),
                                  item_emb.options().dtype(at::kFloat));
  if (S == 0 || k == 0) return {out_pos, out_score};

  const int64_t* items = seq_items.data_ptr<int64_t>();
  const int64_t* offs = seq_offsets.data_ptr<int64_t>();
  const int64_t* su = sample_user.data_ptr<int64_t>();
  const int64_t* sp = sample_pos.data_ptr<int64_t>();
  TORCH_CHECK(offs[U] <= total, "semantic_topk: seq_offsets[-1] = ", offs[U], " overruns len(seq_items) = ", total);

  for (int64_t i = 0; i < offs[U]; ++i)
    TORCH_CHECK(items[i] >= 0 && items[i] < item_emb.size(0), "semantic_topk: seq_items[", i, "] = ", items[i],
                " is out of range of item_emb rows [0, ", item_emb.size(0), ")");
  for (int64_t u = 0; u < U; ++u)
    TORCH_CHECK(offs[u + 1] >= offs[u], "semantic_topk: seq_offsets must be non-decreasing (at ", u + 1, ")");

  // 1. counting sort of the samples by flat position (groups by user, sorts by p)
  std::vector<int64_t> flat(S);
  std::vector<int64_t> bucket(total + 1, 0);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t u = su[s];
    TORCH_CHECK(u >= 0 && u < U, "semantic_topk: sample_user[", s, "] = ", u, " is out of [0, ", U, ")");
    const int64_t p = sp[s];
    TORCH_CHECK(p >= 0 && p < offs[u + 1] - offs[u], "semantic_topk: sample_pos[", s, "] = ", p,
                " is out of range for user ", u, " with ", offs[u + 1] - offs[u], " items");
    flat[s] = offs[u] + p;
    ++bucket[flat[s] + 1];
  }
  for (int64_t i = 0; i < total; ++i) bucket[i + 1] += bucket[i];
  std::vector<int64_t> order(S);
  for (int64_t s = 0; s < S; ++s) order[bucket[flat[s]]++] = s;
  std::vector<int64_t>().swap(bucket);

  // 2. work items: runs of <= kChunk samples of one user, most expensive first
  std::vector<WorkItem> work;
  for (int64_t b = 0; b < S;) {
    const int64_t u = su[order[b]];
    int64_t e = b;
    double cost = 0.0;
    while (e < S && e - b < kChunk && su[order[e]] == u) {
      cost += static_cast<double>(sp[order[e]]) + 1.0;
      ++e;
    }
    work.push_back({b, e, u, cost});
    b = e;
  }
  std::sort(work.begin(), work.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });

  const int64_t dp = (d + kLanes - 1) / kLanes * kLanes;
  float* score_ptr = out_score.data_ptr<float>();
  int64_t* pos_ptr = out_pos.data_ptr<int64_t>();
  const int nthreads = std::max(1, at::get_num_threads());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, item_emb.scalar_type(), "semantic_topk_cpu", [&] {
    run_work<scalar_t>(item_emb.data_ptr<scalar_t>(), item_emb.size(0), d, dp, items, offs, sp, order, work, k, normalize, nthreads,
                       score_ptr, pos_ptr);
  });
  return {out_pos, out_score};
}

}  // namespace rellax

TORCH_LIBRARY_FRAGMENT(rellax_fast, m) {
  m.def(
      "semantic_topk(Tensor item_emb, Tensor seq_items, Tensor seq_offsets, Tensor sample_user, "
      "Tensor sample_pos, int k, bool normalize) -> (Tensor pos, Tensor score)");
}

TORCH_LIBRARY_IMPL(rellax_fast, CPU, m) {
  m.impl("semantic_topk", &rellax::semantic_topk_cpu);
}
