// rellax_fast::semantic_topk — CUDA kernel: per-sample causal top-k over packed user histories.
//
// Same contract as csrc/topk.cpp (scores = dot of optionally L2-normalised item rows; rows sorted by
// score descending, ties to the larger position, padding -1 / -inf).
//
// Algorithm
//   Host: the item table is converted once to float32 (normalised for cosine, rows / max(||row||, 1e-12)).
//   Samples are sorted by flat position seq_offsets[u] + p and cut into tiles of up to kTM consecutive
//   samples of one user (the work list, built on the host from the sorted order).
//   Device: one block of 128 threads per tile. The user's history is streamed in tiles of kTN candidates
//   up to the tile's largest position; for each, the (kTM x kTN) score block is computed from shared-memory
//   slices of kDK dims (each thread owns one target row and 8 candidates, sequential fmaf over d, so every
//   score has the same summation order: identical embeddings tie exactly). Scores go to shared memory and
//   one thread per target row merges the causal ones (position < p) into that row's sorted top-k, kept in
//   the output rows themselves (insertion with a k-th-score threshold held in a register; a new equal
//   score goes in front of older ones since positions arrive in increasing order).
//   Memory: O(total + S*k); no S x L scores exist. Traffic: each history row is read once per target tile.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "common.h"

namespace rellax {
namespace topk_cuda {

constexpr int kTM = 32;       // targets per block
constexpr int kTN = 32;       // candidates per history tile
constexpr int kDK = 64;       // dims per shared-memory slice
constexpr int kThreads = 128; // kTM rows x 4 groups of 8 candidates

__global__ void semantic_topk_kernel(const float* __restrict__ table, int64_t d, const int64_t* __restrict__ seq_items,
                                     const int64_t* __restrict__ offsets, const int64_t* __restrict__ sample_user,
                                     const int64_t* __restrict__ sample_pos, const int64_t* __restrict__ order,
                                     const int64_t* __restrict__ tile_start, const int* __restrict__ tile_count,
                                     int64_t k, float* __restrict__ out_score, int64_t* __restrict__ out_pos) {
  __shared__ float Ts[kTM][kDK + 1];
  __shared__ float Cs[kTN][kDK + 1];
  __shared__ float Ss[kTM][kTN + 1];
  __shared__ int64_t srow[kTM], tpos[kTM], titem[kTM], citem[kTN];
  __shared__ int64_t base_s, pmax_s;

  const int tid = threadIdx.x;
  const int64_t start = tile_start[blockIdx.x];
  const int cnt = tile_count[blockIdx.x];
  if (tid < kTM) {
    if (tid < cnt) {
      const int64_t s = order[start + tid];
      srow[tid] = s;
      tpos[tid] = sample_pos[s];
    } else {
      srow[tid] = -1;
      tpos[tid] = 0;
    }
  }
  if (tid == 0) {
    base_s = offsets[sample_user[order[start]]];
    pmax_s = sample_pos[order[start + cnt - 1]];  // the tile's samples are sorted by position
  }
  __syncthreads();
  const int64_t base = base_s;
  const int64_t pmax = pmax_s;
  if (tid < kTM) titem[tid] = tid < cnt ? seq_items[base + tpos[tid]] : 0;

  const float neg_inf = -std::numeric_limits<float>::infinity();
  int count = 0;        // results held by this thread's row (tid < cnt)
  float thr = neg_inf;  // k-th best so far once the row is full
  const int r = tid / 4;
  const int c0 = (tid % 4) * 8;

  for (int64_t j0 = 0; j0 < pmax; j0 += kTN) {
    if (tid < kTN) citem[tid] = (j0 + tid < pmax) ? seq_items[base + j0 + tid] : -1;
    __syncthreads();
    float acc[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) acc[q] = 0.0f;
    for (int64_t d0 = 0; d0 < d; d0 += kDK) {
      for (int idx = tid; idx < kTM * kDK; idx += kThreads) {
        const int rr = idx / kDK, x = idx % kDK;
        Ts[rr][x] = (rr < cnt && d0 + x < d) ? table[titem[rr] * d + d0 + x] : 0.0f;
      }
      for (int idx = tid; idx < kTN * kDK; idx += kThreads) {
        const int cc = idx / kDK, x = idx % kDK;
        Cs[cc][x] = (citem[cc] >= 0 && d0 + x < d) ? table[citem[cc] * d + d0 + x] : 0.0f;
      }
      __syncthreads();
#pragma unroll 8
      for (int x = 0; x < kDK; ++x) {
        const float a = Ts[r][x];
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[q] = fmaf(a, Cs[c0 + q][x], acc[q]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < 8; ++q) Ss[r][c0 + q] = acc[q];
    __syncthreads();
    if (tid < cnt) {
      const int64_t p = tpos[tid];
      float* sc = out_score + srow[tid] * k;
      int64_t* ps = out_pos + srow[tid] * k;
      for (int c = 0; c < kTN; ++c) {
        const int64_t j = j0 + c;
        if (j >= p) break;
        const float s = Ss[tid][c];
        if (!(s >= thr)) continue;
        int64_t slot = count < k ? count : k - 1;
        while (slot > 0 && sc[slot - 1] <= s) {
          sc[slot] = sc[slot - 1];
          ps[slot] = ps[slot - 1];
          --slot;
        }
        sc[slot] = s;
        ps[slot] = j;
        if (count < k) ++count;
        thr = count < k ? neg_inf : sc[k - 1];
      }
    }
    __syncthreads();
  }
}

}  // namespace topk_cuda

std::tuple<at::Tensor, at::Tensor> semantic_topk_cuda(const at::Tensor& item_emb, const at::Tensor& seq_items_in,
                                                      const at::Tensor& seq_offsets_in,
                                                      const at::Tensor& sample_user_in,
                                                      const at::Tensor& sample_pos_in, int64_t k, bool normalize) {
  using namespace topk_cuda;
  RELLAX_CHECK_FLOAT(item_emb, "semantic_topk: item_emb");
  TORCH_CHECK(item_emb.dim() == 2, "semantic_topk: item_emb must be 2-D (N_items, d); got shape ",
              shape_str(item_emb));
  const at::Tensor* idx[4] = {&seq_items_in, &seq_offsets_in, &sample_user_in, &sample_pos_in};
  const char* names[4] = {"seq_items", "seq_offsets", "sample_user", "sample_pos"};
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(idx[i]->scalar_type() == at::kLong && idx[i]->dim() == 1, "semantic_topk: ", names[i],
                " must be a 1-D int64 tensor; got ", idx[i]->scalar_type(), " of shape ", shape_str(*idx[i]));
    TORCH_CHECK(idx[i]->device() == item_emb.device(), "semantic_topk (cuda kernel): ", names[i],
                " must be on ", item_emb.device(), "; got ", idx[i]->device());
  }
  TORCH_CHECK(item_emb.is_cuda(), "semantic_topk (cuda kernel): item_emb must be a CUDA tensor");
  TORCH_CHECK(k >= 0, "semantic_topk: k must be >= 0; got ", k);
  TORCH_CHECK(sample_user_in.size(0) == sample_pos_in.size(0),
              "semantic_topk: sample_user and sample_pos must have the same length");
  TORCH_CHECK(seq_offsets_in.size(0) >= 1, "semantic_topk: seq_offsets must have U+1 >= 1 entries");
  const c10::cuda::CUDAGuard guard(item_emb.device());

  const int64_t S = sample_user_in.size(0);
  const int64_t d = item_emb.size(1);
  at::Tensor out_pos = at::full({S, k}, -1, seq_items_in.options());
  at::Tensor out_score =
      at::full({S, k}, -std::numeric_limits<float>::infinity(), item_emb.options().dtype(at::kFloat));
  if (S == 0 || k == 0) return {out_pos, out_score};

  const at::Tensor seq_items = seq_items_in.contiguous();
  const at::Tensor seq_offsets = seq_offsets_in.contiguous();
  const at::Tensor sample_user = sample_user_in.contiguous();
  const at::Tensor sample_pos = sample_pos_in.contiguous();
  // the float32 table, normalised once
  at::Tensor table = item_emb.to(at::kFloat).contiguous();
  if (normalize) table = (table / table.norm(2, {1}, true).clamp_min(1e-12)).contiguous();

  // work list on the host: sort by flat position, tiles of <= kTM samples of one user
  const at::Tensor offs_cpu = seq_offsets.cpu();
  const at::Tensor su_cpu = sample_user.cpu();
  const at::Tensor sp_cpu = sample_pos.cpu();
  const int64_t U = offs_cpu.size(0) - 1;
  const int64_t* offs = offs_cpu.data_ptr<int64_t>();
  const int64_t* su = su_cpu.data_ptr<int64_t>();
  const int64_t* sp = sp_cpu.data_ptr<int64_t>();
  TORCH_CHECK(offs[0] == 0 && offs[U] <= seq_items.size(0), "semantic_topk: seq_offsets must start at 0 and not overrun seq_items");
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(su[s] >= 0 && su[s] < U, "semantic_topk: sample_user[", s, "] = ", su[s], " is out of [0, ", U, ")");
    TORCH_CHECK(sp[s] >= 0 && sp[s] < offs[su[s] + 1] - offs[su[s]], "semantic_topk: sample_pos[", s, "] = ", sp[s],
                " is out of range for user ", su[s]);
  }
  TORCH_CHECK(seq_items.numel() == 0 || (seq_items.min().item<int64_t>() >= 0 &&
                                         seq_items.max().item<int64_t>() < item_emb.size(0)),
              "semantic_topk: seq_items must hold rows of item_emb in [0, ", item_emb.size(0), ")");
  const at::Tensor flat = seq_offsets.index_select(0, sample_user) + sample_pos;
  const at::Tensor order = std::get<1>(flat.sort(/*stable=*/true, 0, false));
  const at::Tensor order_cpu = order.cpu();
  const int64_t* ord = order_cpu.data_ptr<int64_t>();
  std::vector<int64_t> starts;
  std::vector<int> counts;
  for (int64_t b = 0; b < S;) {
    const int64_t u = su[ord[b]];
    int64_t e = b;
    while (e < S && e - b < kTM && su[ord[e]] == u) ++e;
    starts.push_back(b);
    counts.push_back(static_cast<int>(e - b));
    b = e;
  }
  const auto long_opts = at::TensorOptions().dtype(at::kLong);
  const at::Tensor tile_start =
      at::from_blob(starts.data(), {static_cast<int64_t>(starts.size())}, long_opts).to(item_emb.device());
  const at::Tensor tile_count = at::from_blob(counts.data(), {static_cast<int64_t>(counts.size())},
                                              at::TensorOptions().dtype(at::kInt))
                                    .to(item_emb.device());
  const int64_t n_tiles = static_cast<int64_t>(starts.size());
  auto stream = at::cuda::getCurrentCUDAStream();
  semantic_topk_kernel<<<static_cast<unsigned int>(n_tiles), kThreads, 0, stream>>>(
      table.data_ptr<float>(), d, seq_items.data_ptr<int64_t>(), seq_offsets.data_ptr<int64_t>(),
      sample_user.data_ptr<int64_t>(), sample_pos.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
      tile_start.data_ptr<int64_t>(), tile_count.data_ptr<int>(), k, out_score.data_ptr<float>(),
      out_pos.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_pos, out_score};
}

}  // namespace rellax

TORCH_LIBRARY_IMPL(rellax_fast, CUDA, m) {
  m.impl("semantic_topk", &rellax::semantic_topk_cuda);
}
