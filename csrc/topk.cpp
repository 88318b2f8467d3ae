// rellax_fast::semantic_topk — CPU kernel (OpenMP): per-sample causal top-k over packed user histories.
//
// Contract (docs/architecture.md, rellax_fast/ops/topk.py): sample s of user u at position p scores the
// user's positions 0..p-1 against its target (position p) by dot product of (optionally L2-normalised)
// item embeddings; rows are sorted by score descending, ties to the larger position, padded with -1 / -inf.
//
// Algorithm
//   1. The samples are ordered by their flat position seq_offsets[u] + p (grouping them by user, ascending
//      p): no work when they already are, a counting sort when the call covers most of the entries
//      (total <= kCountingShare * S), else a comparison sort of the S keys. Nothing touches every entry of
//      a large history when a call asks for few targets.
//   2. One serial pass over what the call reads: each sampled user's offsets and the entries of its
//      prefix up to its last target are range-checked (the raw torch.ops entry must refuse bad indices
//      cleanly), and the item rows they name are marked.
//   3. Work items = runs of <= kChunk consecutive samples of one user; ordered by cost (sum of p), run
//      with OpenMP dynamic scheduling.
//   4. The marked item rows (only those) are converted to float32 (normalised when cosine; d padded to a
//      multiple of 16 with zeros) plus one zero row.
//   5. Per work item, one of two micro-kernels, both accumulating every dot product as the same ordered
//      sum over x = 0..dp-1 in one vector lane (so a (target, candidate) score is bit-identical whichever
//      runs it, and identical embeddings give identical scores: exact ties are resolved by position):
//      - row-major, for <= kRowMajorMax (32) targets, in passes of 8: the pass's targets are transposed into
//        a (dp x 8) panel (lane = target) and the history rows are read in place, 8 at a time, each
//        broadcast against the panel (no copy of the history, which the panels pay per work item);
//      - panel, for more targets: the history is streamed in tiles of kTileN rows, each transposed once
//        into (d x 32) slabs; for each group of 8 targets and slab of 32 candidates a register-blocked
//        micro-kernel (16 vector accumulators, target scalars broadcast) computes the 256 dot products.
//      Every score that beats the row's current k-th best is inserted into the row's sorted top-k buffer
//      (candidates come in increasing position, so a new equal score goes in front of the older equal
//      ones). Candidates >= the target's position are skipped (causal), and tiles past the group's largest
//      position are never computed.
//   Memory: O(S*k) outputs, one float32 row per marked item, and one (kTileN x dp) buffer per thread; no
//   S x L scores exist.
//   The micro-kernels are compiled for x86-64-v4 (AVX-512), v3 (AVX2+FMA) and baseline via target_clones,
//   chosen at load time, since the extension itself is built without -march flags.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "topk_common.h"

namespace rellax {
namespace topk_cpu {

constexpr int64_t kChunk = 512;        // targets per work item
constexpr int64_t kTileN = 256;        // history rows per tile (panel kernel)
constexpr int64_t kLanes = 16;         // d is padded to a multiple of this
// work items with at most this many targets run the row-major kernel (in passes of kTargets); measured on a
// 2-core EPYC (d=384, histories of 1,500): 2x the panel kernel's rate at 1-8 targets, 1.5x at 12-24, about
// even from 48 (the panels' transposition is then amortised, while each pass re-reads the history)
constexpr int64_t kRowMajorMax = 32;
constexpr int64_t kCountingShare = 8;  // counting sort when total <= this * S, else a comparison sort

typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RELLAX_TOPK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RELLAX_TOPK_CLONES
#endif

constexpr int kRows = 8;    // panel kernel: targets per register block
constexpr int kCols = 32;   // panel kernel: candidates per register block (two 16-lane vectors)
constexpr int kTargets = 8; // row-major kernel: targets per pass (one lane of a v8f each)
constexpr int kCand = 8;    // row-major kernel: history rows per block (independent accumulators)

// Panel kernel, one work item: `n` targets (positions `tpos`, ascending) of a user whose item at position j
// has its float32 row at table + hist[j] * dp (row `zero_row` is all zeros). Writes each target's sorted
// top-k into out_score/out_pos (n x k, pre-filled -inf/-1). `panel` is scratch for one history tile
// transposed into slabs of kCols candidates: slab-major, (dp x kCols) each, so the micro-kernel reads it
// contiguously and broadcasts target scalars.
RELLAX_TOPK_CLONES
void rellax_topk_chunk(const float* table, const int64_t* hist, int64_t zero_row, int64_t dp, const int64_t* tpos,
                       int64_t n, int64_t k, float* out_score, int64_t* out_pos, int64_t* count, float* panel) {
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
            thr[r] = insert_topk(out_score + row * k, out_pos + row * k, count + row, k, s, base + q);
          }
        }
      }
    }
  }
}

// Row-major kernel, n <= kTargets targets of a work item (same arguments as rellax_topk_chunk): the
// targets are transposed into `tpanel` (dp x kTargets, lane i = target i; lanes >= n repeat the last
// target and are never read back), and each history row is read where it lies in the table, kCand rows
// at a time, its scalars broadcast against the panel. Each lane accumulates the ordered sum over x, as the
// panel kernel does, so the scores are bit-identical to it; no history row is copied.
RELLAX_TOPK_CLONES
void rellax_topk_rows(const float* table, const int64_t* hist, int64_t dp, const int64_t* tpos, int64_t n,
                      int64_t k, float* out_score, int64_t* out_pos, int64_t* count, float* tpanel) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float thr[kTargets];
  for (int i = 0; i < kTargets; ++i) {
    const float* t = table + hist[tpos[std::min<int64_t>(i, n - 1)]] * dp;
    for (int64_t x = 0; x < dp; ++x) tpanel[x * kTargets + i] = t[x];
    thr[i] = neg_inf;
  }
  for (int64_t i = 0; i < n; ++i) count[i] = 0;
  const int64_t pmax = tpos[n - 1];
  for (int64_t j0 = 0; j0 < pmax; j0 += kCand) {
    const int64_t m = std::min<int64_t>(kCand, pmax - j0);
    const float* h[kCand];
    for (int c = 0; c < kCand; ++c) h[c] = table + hist[j0 + std::min<int64_t>(c, m - 1)] * dp;
    v8f acc[kCand];
    for (int c = 0; c < kCand; ++c) acc[c] = v8f{};
    for (int64_t x = 0; x < dp; ++x) {
      v8f t;
      std::memcpy(&t, tpanel + x * kTargets, sizeof(v8f));
      for (int c = 0; c < kCand; ++c) acc[c] += h[c][x] * t;
    }
    for (int64_t c = 0; c < m; ++c) {
      float sb[kTargets];
      std::memcpy(sb, &acc[c], sizeof(v8f));
      const int64_t j = j0 + c;
      for (int64_t i = 0; i < n; ++i) {
        if (j >= tpos[i] || !(sb[i] >= thr[i])) continue;
        thr[i] = insert_topk(out_score + i * k, out_pos + i * k, count + i, k, sb[i], j);
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

// Rows of the float32 table for the marked items only (normalised when `normalize`; d padded to dp with
// zeros), plus the zero row n_items. Unmarked rows are left unwritten: nothing reads them.
template <typename scalar_t>
void build_table(const scalar_t* emb, int64_t n_items, int64_t d, int64_t dp, bool normalize,
                 const std::vector<uint8_t>& marked, int nthreads, float* table) {
  for (int64_t x = 0; x < dp; ++x) table[n_items * dp + x] = 0.0f;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < n_items; ++r) {
    if (!marked[r]) continue;
    float* dst = table + r * dp;
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
              const int64_t* sp, const std::vector<int64_t>& order, const std::vector<WorkItem>& work,
              const std::vector<uint8_t>& marked, int64_t k, bool normalize, int nthreads, float* score_ptr,
              int64_t* pos_ptr) {
  const int64_t n_work = static_cast<int64_t>(work.size());
  // uninitialised on purpose: only the marked rows are written, and only those are read
  std::unique_ptr<float[]> table(new float[(n_items + 1) * dp]);
  build_table<scalar_t>(emb, n_items, d, dp, normalize, marked, nthreads, table.get());
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> lscore, panel(std::max<int64_t>(kTileN, kTargets) * dp);
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
      const int64_t* hist = items + offs[it.user];
      if (n <= kRowMajorMax)  // in passes of kTargets targets, each reading the history rows in place
        for (int64_t g = 0; g < n; g += kTargets)
          rellax_topk_rows(table.get(), hist, dp, tpos.data() + g, std::min<int64_t>(kTargets, n - g), k,
                           lscore.data() + g * k, lpos.data() + g * k, count.data() + g, panel.data());
      else
        rellax_topk_chunk(table.get(), hist, n_items, dp, tpos.data(), n, k, lscore.data(), lpos.data(),
                          count.data(), panel.data());
      for (int64_t i = 0; i < n; ++i) {
        const int64_t s = order[it.begin + i];
        std::memcpy(score_ptr + s * k, lscore.data() + i * k, sizeof(float) * k);
        std::memcpy(pos_ptr + s * k, lpos.data() + i * k, sizeof(int64_t) * k);
      }
    }
  }
}

// The samples' flat positions offs[u] + p, after checking each sample's user, that user's offsets and p.
std::vector<int64_t> flat_positions(const int64_t* offs, int64_t U, int64_t total, const int64_t* su,
                                    const int64_t* sp, int64_t S) {
  std::vector<int64_t> flat(S);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t u = su[s];
    TORCH_CHECK(u >= 0 && u < U, "semantic_topk: sample_user[", s, "] = ", u, " is out of [0, ", U, ")");
    TORCH_CHECK(offs[u] >= 0 && offs[u] <= offs[u + 1], "semantic_topk: seq_offsets must be non-negative and ",
                "non-decreasing; seq_offsets[", u, "] = ", offs[u], ", seq_offsets[", u + 1, "] = ", offs[u + 1],
                " (at ", u + 1, ")");
    TORCH_CHECK(offs[u + 1] <= total, "semantic_topk: seq_offsets[", u + 1, "] = ", offs[u + 1],
                " overruns len(seq_items) = ", total);
    const int64_t p = sp[s];
    TORCH_CHECK(p >= 0 && p < offs[u + 1] - offs[u], "semantic_topk: sample_pos[", s, "] = ", p,
                " is out of range for user ", u, " with ", offs[u + 1] - offs[u], " items");
    flat[s] = offs[u] + p;
  }
  return flat;
}

// The sample order by flat position (ties by sample index): the identity when already sorted, a counting
// sort when the call covers most entries (O(S + total)), else a comparison sort (O(S log S)).
std::vector<int64_t> sort_samples(const std::vector<int64_t>& flat, int64_t total) {
  const int64_t S = static_cast<int64_t>(flat.size());
  std::vector<int64_t> order(S);
  std::iota(order.begin(), order.end(), 0);
  if (std::is_sorted(flat.begin(), flat.end())) return order;
  if (total <= kCountingShare * S) {
    std::vector<int64_t> bucket(total + 1, 0);
    for (int64_t s = 0; s < S; ++s) ++bucket[flat[s] + 1];
    for (int64_t i = 0; i < total; ++i) bucket[i + 1] += bucket[i];
    for (int64_t s = 0; s < S; ++s) order[bucket[flat[s]]++] = s;
    return order;
  }
  std::sort(order.begin(), order.end(),
            [&flat](int64_t a, int64_t b) { return flat[a] < flat[b] || (flat[a] == flat[b] && a < b); });
  return order;
}

// Work items (runs of <= kChunk samples of one user, most expensive first); for each sampled user, the
// entries it reads (its prefix up to its last target) are range-checked and their item rows marked.
std::vector<WorkItem> plan_work(const int64_t* items, const int64_t* offs, int64_t n_items, const int64_t* su,
                                const int64_t* sp, const std::vector<int64_t>& order,
                                std::vector<uint8_t>& marked) {
  const int64_t S = static_cast<int64_t>(order.size());
  std::vector<WorkItem> work;
  for (int64_t b = 0; b < S;) {
    const int64_t u = su[order[b]];
    int64_t e = b;
    double cost = 0.0;
    while (e < S && e - b < kChunk && su[order[e]] == u) {
      cost += static_cast<double>(sp[order[e]]) + 1.0;
      ++e;
    }
    // the first work item of a user checks that user's whole read prefix (its last sample's position)
    if (b == 0 || su[order[b - 1]] != u) {
      int64_t last = e;
      while (last < S && su[order[last]] == u) ++last;
      const int64_t end = offs[u] + sp[order[last - 1]];
      for (int64_t i = offs[u]; i <= end; ++i) {
        TORCH_CHECK(items[i] >= 0 && items[i] < n_items, "semantic_topk: seq_items[", i, "] = ", items[i],
                    " is out of range of item_emb rows [0, ", n_items, ")");
        marked[items[i]] = 1;
      }
    }
    work.push_back({b, e, u, cost});
    b = e;
  }
  std::sort(work.begin(), work.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  return work;
}

void check_args(const at::Tensor& item_emb, const at::Tensor* const idx[4], int64_t k) {
  RELLAX_CHECK_FLOAT(item_emb, "semantic_topk: item_emb");
  TORCH_CHECK(item_emb.dim() == 2, "semantic_topk: item_emb must be 2-D (N_items, d); got shape ",
              shape_str(item_emb));
  const char* names[4] = {"seq_items", "seq_offsets", "sample_user", "sample_pos"};
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(idx[i]->scalar_type() == at::kLong && idx[i]->dim() == 1, "semantic_topk: ", names[i],
                " must be a 1-D int64 tensor; got ", idx[i]->scalar_type(), " of shape ", shape_str(*idx[i]));
    TORCH_CHECK(idx[i]->device().is_cpu(), "semantic_topk (cpu kernel): ", names[i], " must be on the CPU");
  }
  TORCH_CHECK(item_emb.device().is_cpu(), "semantic_topk (cpu kernel): item_emb must be on the CPU");
  TORCH_CHECK(k >= 0, "semantic_topk: k must be >= 0; got ", k);
  TORCH_CHECK(idx[2]->size(0) == idx[3]->size(0),
              "semantic_topk: sample_user and sample_pos must have the same length");
  TORCH_CHECK(idx[1]->size(0) >= 1, "semantic_topk: seq_offsets must have U+1 >= 1 entries");
}

}  // namespace topk_cpu

std::tuple<at::Tensor, at::Tensor> semantic_topk_cpu(const at::Tensor& item_emb_in, const at::Tensor& seq_items_in,
                                                     const at::Tensor& seq_offsets_in,
                                                     const at::Tensor& sample_user_in,
                                                     const at::Tensor& sample_pos_in, int64_t k, bool normalize) {
  using namespace topk_cpu;
  const at::Tensor* const idx[4] = {&seq_items_in, &seq_offsets_in, &sample_user_in, &sample_pos_in};
  check_args(item_emb_in, idx, k);
  const at::Tensor item_emb = item_emb_in.contiguous();
  const at::Tensor seq_items = seq_items_in.contiguous();
  const at::Tensor seq_offsets = seq_offsets_in.contiguous();
  const at::Tensor sample_user = sample_user_in.contiguous();
  const at::Tensor sample_pos = sample_pos_in.contiguous();
  const int64_t S = sample_user.size(0);
  const int64_t n_items = item_emb.size(0);
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

  // 1-2. order the samples by flat position, check and mark what they read, cut the work items
  const std::vector<int64_t> order = sort_samples(flat_positions(offs, U, total, su, sp, S), total);
  std::vector<uint8_t> marked(n_items, 0);
  const std::vector<WorkItem> work = plan_work(items, offs, n_items, su, sp, order, marked);

  const int64_t dp = (d + kLanes - 1) / kLanes * kLanes;
  float* score_ptr = out_score.data_ptr<float>();
  int64_t* pos_ptr = out_pos.data_ptr<int64_t>();
  const int nthreads = std::max(1, at::get_num_threads());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, item_emb.scalar_type(), "semantic_topk_cpu", [&] {
    run_work<scalar_t>(item_emb.data_ptr<scalar_t>(), n_items, d, dp, items, offs, sp, order, work, marked, k,
                       normalize, nthreads, score_ptr, pos_ptr);
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
