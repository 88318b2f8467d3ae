// rellax_fast::semantic_topk — CUDA kernel: per-sample causal top-k over packed user histories.
//
// Same contract as csrc/topk.cpp (scores = dot of optionally L2-normalised item rows; rows sorted by
// score descending, ties to the larger position, padding -1 / -inf).
//
// Algorithm
//   Host side (all ATen ops on the device, one sync for the argument checks): the item table is converted
//   to float32 (normalised for cosine, rows / max(||row||, 1e-12); the Python entry passes a cached table).
//   Samples are sorted by flat position seq_offsets[u] + p and cut into tiles of up to kTM consecutive
//   samples of one user (the work list, built vectorised on the device; see build_tiles_on_device).
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
                                     const int64_t* __restrict__ tile_start, const int64_t* __restrict__ tile_count,
                                     int64_t k, float* __restrict__ out_score, int64_t* __restrict__ out_pos) {
  __shared__ float Ts[kTM][kDK + 1];
  __shared__ float Cs[kTN][kDK + 1];
  __shared__ float Ss[kTM][kTN + 1];
  __shared__ int64_t srow[kTM], tpos[kTM], titem[kTM], citem[kTN];
  __shared__ int64_t base_s, pmax_s;

  const int tid = threadIdx.x;
  const int cnt = static_cast<int>(tile_count[blockIdx.x]);
  if (cnt == 0) return;  // an unused slot of the upper-bound grid (uniform over the block)
  const int64_t start = tile_start[blockIdx.x];
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

namespace {

int64_t first_true(const at::Tensor& mask) { return mask.nonzero().select(1, 0)[0].item<int64_t>(); }

// The raw op's own argument checks, computed on the device and read back with ONE synchronising copy of a
// few flags (the Python entry has already validated with friendlier messages; these guard direct
// torch.ops calls, since the kernel trusts every index). Only a failed check pays more syncs, to name the
// first bad entry.
void check_indices_on_device(const at::Tensor& seq_items, const at::Tensor& seq_offsets, const at::Tensor& sample_user,
                             const at::Tensor& sample_pos, int64_t n_items) {
  const int64_t U = seq_offsets.size(0) - 1;
  const int64_t S = sample_user.size(0);
  TORCH_CHECK(U >= 1 || S == 0, "semantic_topk: sample_user holds ", S, " samples but there are no users");
  const auto as_long = [](const at::Tensor& t) { return t.to(at::kLong).reshape({1}); };
  std::vector<at::Tensor> flags = {
      as_long(seq_offsets[0] != 0),
      as_long(seq_offsets[U] > seq_items.size(0)),
      as_long(U > 0 ? (seq_offsets.slice(0, 1) < seq_offsets.slice(0, 0, U)).any() : at::zeros({}, seq_offsets.options())),
      as_long(seq_items.numel() ? ((seq_items < 0) | (seq_items >= n_items)).any() : at::zeros({}, seq_items.options())),
  };
  at::Tensor bad_user, bad_pos;
  if (S > 0) {
    bad_user = (sample_user < 0) | (sample_user >= U);
    const at::Tensor u = sample_user.clamp(0, U - 1);
    const at::Tensor len = seq_offsets.index_select(0, u + 1) - seq_offsets.index_select(0, u);
    bad_pos = (sample_pos < 0) | (sample_pos >= len);
    flags.push_back(as_long(bad_user.any()));
    flags.push_back(as_long(bad_pos.any()));
  }
  const at::Tensor host = at::cat(flags).cpu();  // the one sync
  const int64_t* f = host.data_ptr<int64_t>();
  TORCH_CHECK(!f[0], "semantic_topk: seq_offsets must start at 0; got ", seq_offsets[0].item<int64_t>());
  TORCH_CHECK(!f[1], "semantic_topk: seq_offsets[-1] = ", seq_offsets[U].item<int64_t>(),
              " overruns len(seq_items) = ", seq_items.size(0));
  if (f[2]) {
    const int64_t i = first_true(seq_offsets.slice(0, 1) < seq_offsets.slice(0, 0, U)) + 1;
    TORCH_CHECK(false, "semantic_topk: seq_offsets must be non-decreasing (at ", i, ")");
  }
  if (f[3]) {
    const int64_t i = first_true((seq_items < 0) | (seq_items >= n_items));
    TORCH_CHECK(false, "semantic_topk: seq_items[", i, "] = ", seq_items[i].item<int64_t>(),
                " is out of range of item_emb rows [0, ", n_items, ")");
  }
  if (S > 0 && f[4]) {
    const int64_t i = first_true(bad_user);
    TORCH_CHECK(false, "semantic_topk: sample_user[", i, "] = ", sample_user[i].item<int64_t>(), " is out of [0, ",
                U, ")");
  }
  if (S > 0 && f[5]) {
    const int64_t i = first_true(bad_pos);
    TORCH_CHECK(false, "semantic_topk: sample_pos[", i, "] = ", sample_pos[i].item<int64_t>(),
                " is out of range for user ", sample_user[i].item<int64_t>());
  }
}

// The work list, built on the device with no host round trip: samples sorted by flat position
// seq_offsets[u] + p (stable), cut into tiles of <= kTM consecutive samples of one user. The number of tiles
// is data-dependent, so the grid is an upper bound that needs no sync, S / kTM + min(S, U) (each user's
// run adds at most one partial tile); unused slots have count 0 and their blocks exit at once. Tiles are
// ordered by their largest position, longest histories first (load balance).
// Returns (order (S,), tile_start (T,), tile_count (T,)), all int64 on the device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> build_tiles_on_device(const at::Tensor& seq_offsets,
                                                                     const at::Tensor& sample_user,
                                                                     const at::Tensor& sample_pos, int64_t tile_rows) {
  const int64_t S = sample_user.size(0);
  const int64_t U = seq_offsets.size(0) - 1;
  const at::Tensor flat = seq_offsets.index_select(0, sample_user) + sample_pos;
  const at::Tensor order = std::get<1>(flat.sort(/*stable=*/true, 0, /*descending=*/false));
  const at::Tensor user_sorted = sample_user.index_select(0, order);
  const at::Tensor idx = at::arange(S, sample_user.options());
  at::Tensor new_run = at::ones({S}, sample_user.options().dtype(at::kBool));
  if (S > 1) new_run.slice(0, 1).copy_(user_sorted.slice(0, 1) != user_sorted.slice(0, 0, S - 1));
  const at::Tensor run_start = std::get<0>(at::cummax(at::where(new_run, idx, at::zeros_like(idx)), 0));
  const at::Tensor is_start = (idx - run_start).remainder(tile_rows) == 0;
  const at::Tensor tile_of = at::cumsum(is_start, 0, at::kLong) - 1;
  const int64_t max_tiles = std::min(S, S / tile_rows + std::min(S, U));
  const at::Tensor tile_start = at::full({max_tiles}, S, idx.options()).scatter_reduce(0, tile_of, idx, "amin");
  const at::Tensor tile_count = at::zeros({max_tiles}, idx.options()).scatter_add(0, tile_of, at::ones_like(idx));
  const at::Tensor last_pos = at::full({max_tiles}, -1, idx.options())
                                  .scatter_reduce(0, tile_of, sample_pos.index_select(0, order), "amax");
  const at::Tensor by_cost = std::get<1>(last_pos.sort(/*stable=*/true, 0, /*descending=*/true));
  return {order, tile_start.index_select(0, by_cost), tile_count.index_select(0, by_cost)};
}

}  // namespace

// Host syncs per call: one (check_indices_on_device's flags). The table conversion/normalisation is an
// ATen op on the device, skipped when the caller passes a contiguous float32 table with normalize=false
// (the Python entry caches the normalised table per item_emb, see rellax_fast/ops/topk.py).
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
  check_indices_on_device(seq_items, seq_offsets, sample_user, sample_pos, item_emb.size(0));
  // the float32 table, normalised once per call (a no-op for a contiguous float32 table and normalize=false)
  at::Tensor table = item_emb.to(at::kFloat).contiguous();
  if (normalize) table = (table / table.norm(2, {1}, true).clamp_min(1e-12)).contiguous();

  const auto [order, tile_start, tile_count] = build_tiles_on_device(seq_offsets, sample_user, sample_pos, kTM);
  const int64_t n_tiles = tile_start.size(0);
  TORCH_CHECK(n_tiles <= 0x7fffffffLL, "semantic_topk: too many tiles for the CUDA grid (", n_tiles, ")");
  auto stream = at::cuda::getCurrentCUDAStream();
  semantic_topk_kernel<<<static_cast<unsigned int>(n_tiles), kThreads, 0, stream>>>(
      table.data_ptr<float>(), d, seq_items.data_ptr<int64_t>(), seq_offsets.data_ptr<int64_t>(),
      sample_user.data_ptr<int64_t>(), sample_pos.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
      tile_start.data_ptr<int64_t>(), tile_count.data_ptr<int64_t>(), k, out_score.data_ptr<float>(),
      out_pos.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_pos, out_score};
}

}  // namespace rellax

TORCH_LIBRARY_IMPL(rellax_fast, CUDA, m) {
  m.impl("semantic_topk", &rellax::semantic_topk_cuda);
}
