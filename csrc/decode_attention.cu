// Flash-decoding: the Tq (1 to 16) newest queries of each sequence against its KV cache, the cache cut into
// chunks along S so that B * H sequences alone do not leave SMs idle (kernels/decode_attention.py's
// contract and method).
//
// Split kernel: one block of 4 warps per (batch * head, chunk). It walks its chunk in blocks of kBlockN
// keys, K and V of the next block landing in shared memory (cp.async, 16 bytes a copy, double-buffered)
// while the current one is used, and keeps an online softmax for all Tq queries in fp32:
//   scores: each warp takes a quarter of the block's keys; a key row is read by D * sizeof(T) / 16 lanes,
//           16 bytes each, whose partial dot products with every query meet by shuffles;
//   softmax: warp w keeps the running max m (log2 units) and sum l of queries w, w + 4, ...;
//   P V: thread t owns 4 output dims, one or a few queries, and a share of the block's keys when Tq
//        leaves threads over (Tq = 1 spreads the keys over all 128 threads); the shares meet at the end.
// Only keys below the sequence's length are copied (rows past it are zero-filled) and they alone get a
// score; a chunk wholly past the length writes the neutral partial (m = -inf, l = 0, acc = 0).
// With several chunks each writes its partial (m, l, acc) to scratch and the combine kernel merges them:
//   out = sum_c 2^(m_c - M) acc_c / sum_c 2^(m_c - M) l_c,  M = max_c m_c;
// with one, the split kernel writes the output itself (one launch per call).
// With k_new/v_new the call also appends: the block whose chunk holds a new position writes that row into the
// cache first, so the append costs no launch of its own.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "attention_tiles.cuh"
#include "gpt2fast.h"
#include "rows.cuh"

namespace gpt2fast {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxQueries = static_cast<int>(decode_attention_max_queries);
constexpr int kRowsPerWarp = kMaxQueries / kWarps;  // queries whose softmax statistics one warp keeps
constexpr int kMinChunk = 64;                       // keys: a chunk is at least one block of the split kernel
constexpr double kLog2e = 1.4426950408889634;

struct DecodeParams {
  const void* q;
  void* k;  // written only where the call appends (k_new set)
  void* v;
  const void* k_new;  // null: nothing to append
  const void* v_new;
  const void* lengths;
  void* out;
  float* partial_acc;
  float* partial_max;
  float* partial_sum;
  HeadStrides q_strides, k_strides, v_strides, k_new_strides, v_new_strides;
  int64_t cache_len, chunk;
  int heads, queries, num_splits;
  bool lengths_int64;
  float scale_log2e;  // log2(e) / sqrt(D): scores in log2 units, for exp2
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T, int D>
struct DecodeTiles {
  static constexpr int kVec = kVec16<T>;
  static constexpr int kLanesPerKey = D / kVec;            // lanes that read one key row, 16 bytes each
  static constexpr int kKeysPerPass = 32 / kLanesPerKey;   // key rows a warp reads at once
  static constexpr int kBlockN = D * sizeof(T) <= 128 ? 64 : 32;  // keys per block: K tiles of at most 8 KB
                                                                  // (16 KB for fp32 at D = 128)
  static constexpr int kKeysPerWarp = kBlockN / kWarps;
  static constexpr int kLdS = kBlockN + 1;  // floats per row of S (and P): rows of different queries in different banks
  static constexpr int kDimGroups = D / 4;  // P V: each thread sums 4 dims
  static constexpr int kThreadRows = kThreads / kDimGroups;  // threads per dim group
  static constexpr int kMaxQueriesPerThread = (kMaxQueries + kThreadRows - 1) / kThreadRows;
  // Dynamic shared memory, byte offsets: K and V, two buffers each; the queries, pre-scaled, fp32 [16][D];
  // S then P, fp32 [16][kLdS]; per query alpha, m and l. The P V shares meet over the K/V buffers.
  static constexpr int kTileBytes = kBlockN * D * static_cast<int>(sizeof(T));
  static constexpr int kQ = 4 * kTileBytes;
  static constexpr int kS = kQ + kMaxQueries * D * 4;
  static constexpr int kStats = kS + kMaxQueries * kLdS * 4;
  static constexpr int kBytes = kStats + 3 * kMaxQueries * 4;
  static_assert(kLanesPerKey >= 1 && kLanesPerKey <= 32 && kKeysPerWarp % kKeysPerPass == 0,
                "key rows split over lanes");
  static_assert(kThreads % kDimGroups == 0, "dim groups split the block");
  static_assert((kThreadRows > kMaxQueries ? kThreadRows : kMaxQueries) * D * 4 <= kQ, "P V shares fit over the tiles");
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeParams p) {
  using Tiles = DecodeTiles<T, D>;
  constexpr int kBlockN = Tiles::kBlockN, kLdS = Tiles::kLdS;
  extern __shared__ __align__(128) unsigned char smem[];
  auto k_tile = [&](int buffer) { return reinterpret_cast<T*>(smem + 2 * buffer * Tiles::kTileBytes); };
  auto v_tile = [&](int buffer) { return reinterpret_cast<T*>(smem + (2 * buffer + 1) * Tiles::kTileBytes); };
  float* q_s = reinterpret_cast<float*>(smem + Tiles::kQ);
  float* s = reinterpret_cast<float*>(smem + Tiles::kS);
  float* alpha_s = reinterpret_cast<float*>(smem + Tiles::kStats);
  float* max_s = alpha_s + kMaxQueries;
  float* sum_s = max_s + kMaxQueries;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int bh = blockIdx.x, split = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int queries = p.queries;
  int64_t length =
      p.lengths_int64 ? static_cast<const int64_t*>(p.lengths)[b] : static_cast<const int32_t*>(p.lengths)[b];
  length = length < 0 ? 0 : length > p.cache_len ? p.cache_len : length;  // a bad length must not read past the cache
  const int64_t start = split * p.chunk;
  const int64_t end = start + p.chunk < length ? start + p.chunk : length;
  const int n_blocks = end > start ? static_cast<int>((end - start + kBlockN - 1) / kBlockN) : 0;
  T* k_head = static_cast<T*>(p.k) + b * p.k_strides.batch + h * p.k_strides.head;
  T* v_head = static_cast<T*>(p.v) + b * p.v_strides.batch + h * p.v_strides.head;

  if (p.k_new != nullptr) {
    // Append: this chunk's share of the new positions [length - queries, length) gets k_new's and v_new's
    // rows before any tile is loaded. No other block reads them: each reads only its own chunk.
    const int64_t first_new = length - queries, lo = first_new > start ? first_new : start;
    const T* k_new = static_cast<const T*>(p.k_new) + b * p.k_new_strides.batch + h * p.k_new_strides.head;
    const T* v_new = static_cast<const T*>(p.v_new) + b * p.v_new_strides.batch + h * p.v_new_strides.head;
    for (int64_t i = tid; i < (end - lo) * D; i += kThreads) {
      const int64_t row = lo + i / D, d = i % D;
      k_head[row * p.k_strides.token + d] = k_new[(row - first_new) * p.k_new_strides.token + d];
      v_head[row * p.v_strides.token + d] = v_new[(row - first_new) * p.v_new_strides.token + d];
    }
    __syncthreads();  // the rows are written before this block's copies read them
  }

  if (n_blocks > 0) {
    load_rows_async<D, kBlockN, D, kThreads>(k_tile(0), k_head, p.k_strides.token, start, end);
    load_rows_async<D, kBlockN, D, kThreads>(v_tile(0), v_head, p.v_strides.token, start, end);
  }
  commit_copies();
  const T* q_head = static_cast<const T*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head;
  for (int i = tid; i < queries * D; i += kThreads) {
    q_s[i] = to_float(q_head[(i / D) * p.q_strides.token + i % D]) * p.scale_log2e;
  }

  float row_max[kRowsPerWarp], row_sum[kRowsPerWarp];  // of queries warp + 4 i, the same in every lane
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) row_max[i] = -INFINITY, row_sum[i] = 0.0f;

  // P V: thread t sums dims [4 dim_group, 4 dim_group + 4) of queries query_lane + query_lanes * i, over
  // the block's keys n with n % key_lanes == key_lane.
  const int dim_group = tid % Tiles::kDimGroups, thread_row = tid / Tiles::kDimGroups;
  const int key_lanes = max(1, Tiles::kThreadRows / queries), query_lanes = Tiles::kThreadRows / key_lanes;
  const int key_lane = thread_row % key_lanes, query_lane = thread_row / key_lanes;
  float acc[Tiles::kMaxQueriesPerThread][4] = {};

  for (int block = 0; block < n_blocks; ++block) {
    const int buffer = block % 2;
    const int64_t first = start + static_cast<int64_t>(block) * kBlockN;
    if (block + 1 < n_blocks) {  // the other buffer's last readers passed the previous step's final barrier
      load_rows_async<D, kBlockN, D, kThreads>(k_tile(1 - buffer), k_head, p.k_strides.token, first + kBlockN, end);
      load_rows_async<D, kBlockN, D, kThreads>(v_tile(1 - buffer), v_head, p.v_strides.token, first + kBlockN, end);
    }
    commit_copies();
    wait_copies<1>();
    __syncthreads();  // this block's K and V (and, the first time, the queries) are in

    // Scores, masked: key n counts for query i if it lies below the chunk's end and at or before the
    // query's position, length - queries + i.
    {
      const int part = lane % Tiles::kLanesPerKey;
      const T* keys = k_tile(buffer);
#pragma unroll
      for (int pass = 0; pass < Tiles::kKeysPerWarp / Tiles::kKeysPerPass; ++pass) {
        const int n = warp * Tiles::kKeysPerWarp + pass * Tiles::kKeysPerPass + lane / Tiles::kLanesPerKey;
        float key[Tiles::kVec];
        load<Tiles::kVec>(keys + n * D + part * Tiles::kVec, key);
        const int64_t position = first + n;
        for (int i = 0; i < queries; ++i) {
          const float* q_part = q_s + i * D + part * Tiles::kVec;
          float dot = 0.0f;
#pragma unroll
          for (int e = 0; e < Tiles::kVec; e += 4) {
            const float4 q4 = *reinterpret_cast<const float4*>(q_part + e);
            dot = fmaf(q4.x, key[e], fmaf(q4.y, key[e + 1], fmaf(q4.z, key[e + 2], fmaf(q4.w, key[e + 3], dot))));
          }
#pragma unroll
          for (int offset = Tiles::kLanesPerKey / 2; offset > 0; offset /= 2) {
            dot += __shfl_xor_sync(0xffffffffu, dot, offset);
          }
          const bool visible = position < end && position <= length - queries + i;
          if (part == 0) s[i * kLdS + n] = visible ? dot : -INFINITY;
        }
      }
    }
    __syncthreads();

    // Online softmax, one warp per query row; P overwrites S in place (each lane rewrites what it read).
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int i = warp + kWarps * r;
      if (i >= queries) break;
      float x[kBlockN / 32];
      float block_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kBlockN / 32; ++j) {
        x[j] = s[i * kLdS + lane + 32 * j];
        block_max = fmaxf(block_max, x[j]);
      }
      const float m_new = fmaxf(row_max[r], warp_max(block_max));
      // A query that has seen no key yet in this chunk keeps m = -inf: shifting by 0 then gives 0, not NaN.
      const float shift = m_new == -INFINITY ? 0.0f : m_new;
      float block_sum = 0.0f;
#pragma unroll
      for (int j = 0; j < kBlockN / 32; ++j) {
        x[j] = exp2f(x[j] - shift);
        block_sum += x[j];
        s[i * kLdS + lane + 32 * j] = x[j];
      }
      const float alpha = exp2f(row_max[r] - shift);
      row_sum[r] = row_sum[r] * alpha + warp_sum(block_sum);
      row_max[r] = m_new;
      if (lane == 0) alpha_s[i] = alpha;
    }
    __syncthreads();

    // acc = alpha acc + P V, over the keys below the chunk's end only (P is 0 past it).
    {
      const T* values = v_tile(buffer);
      const int valid = end - first < kBlockN ? static_cast<int>(end - first) : kBlockN;
#pragma unroll
      for (int r = 0; r < Tiles::kMaxQueriesPerThread; ++r) {
        const int i = query_lane + query_lanes * r;
        if (i < queries) {
          const float alpha = alpha_s[i];
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[r][e] *= alpha;
        }
      }
      for (int n = key_lane; n < valid; n += key_lanes) {
        float value[4];
        load<4>(values + n * D + 4 * dim_group, value);
#pragma unroll
        for (int r = 0; r < Tiles::kMaxQueriesPerThread; ++r) {
          const int i = query_lane + query_lanes * r;
          if (i < queries) {
            const float weight = s[i * kLdS + n];
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[r][e] = fmaf(weight, value[e], acc[r][e]);
          }
        }
      }
    }
    __syncthreads();  // every thread is done with this block's buffers, S and alpha
  }

  // The key lanes' shares meet over the K/V buffers ([key_lanes][queries][D]); the last commit was empty.
  float* shares = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int r = 0; r < Tiles::kMaxQueriesPerThread; ++r) {
    const int i = query_lane + query_lanes * r;
    if (i < queries) {
      *reinterpret_cast<float4*>(shares + (key_lane * queries + i) * D + 4 * dim_group) =
          make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = warp + kWarps * r;
    if (lane == 0 && i < queries) max_s[i] = row_max[r], sum_s[i] = row_sum[r];
  }
  __syncthreads();
  const int64_t part = static_cast<int64_t>(bh) * p.num_splits + split;  // this chunk's partial
  for (int j = tid; j < queries * D; j += kThreads) {
    const int i = j / D, d = j % D;
    float total = 0.0f;
    for (int lane_share = 0; lane_share < key_lanes; ++lane_share) total += shares[(lane_share * queries + i) * D + d];
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[(static_cast<int64_t>(bh) * queries + i) * D + d] = from_float<T>(total / sum_s[i]);
    } else {
      p.partial_acc[(part * queries + i) * D + d] = total;
    }
  }
  if (p.num_splits > 1 && tid < queries) {
    p.partial_max[part * queries + tid] = max_s[tid];
    p.partial_sum[part * queries + tid] = sum_s[tid];
  }
}

// One warp per (batch * head, query): merges its num_splits partials into D outputs.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_combine_kernel(const DecodeParams p, int rows) {
  constexpr int kDimsPerLane = (D + 31) / 32;
  const int row = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int bh = row / p.queries, i = row % p.queries;
  const int64_t first = static_cast<int64_t>(bh) * p.num_splits * p.queries + i;  // split c at first + c * queries
  float m = -INFINITY;
  for (int c = 0; c < p.num_splits; ++c) m = fmaxf(m, p.partial_max[first + c * p.queries]);
  // m is finite: every query sees key 0, which the first chunk holds.
  float l = 0.0f, acc[kDimsPerLane] = {};
  for (int c = 0; c < p.num_splits; ++c) {
    const int64_t part = first + c * p.queries;
    const float weight = exp2f(p.partial_max[part] - m);  // 0 for a chunk that saw none of this query's keys
    l += weight * p.partial_sum[part];
#pragma unroll
    for (int j = 0; j < kDimsPerLane; ++j) {
      const int d = lane + 32 * j;
      if (d < D) acc[j] += weight * p.partial_acc[part * D + d];
    }
  }
  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(row) * D;
#pragma unroll
  for (int j = 0; j < kDimsPerLane; ++j) {
    const int d = lane + 32 * j;
    if (d < D) out[d] = from_float<T>(acc[j] / l);
  }
}

template <typename T, int D>
cudaError_t launch_decode_attention(DecodeParams p, int batch_heads, cudaStream_t stream) {
  using Tiles = DecodeTiles<T, D>;
  // Whole blocks per chunk; splits past the cache (when rounding up leaves them empty) write neutral partials.
  p.chunk = (p.cache_len + p.num_splits - 1) / p.num_splits;
  p.chunk = (p.chunk + Tiles::kBlockN - 1) / Tiles::kBlockN * Tiles::kBlockN;
  const auto split_kernel = decode_split_kernel<T, D>;
  if (Tiles::kBytes > 48 * 1024) {  // past the default limit of dynamic shared memory: opt in
    const cudaError_t err =
        cudaFuncSetAttribute(split_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tiles::kBytes);
    if (err != cudaSuccess) return err;
  }
  split_kernel<<<dim3(batch_heads, p.num_splits), kThreads, Tiles::kBytes, stream>>>(p);
  if (p.num_splits == 1) return cudaGetLastError();
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int rows = batch_heads * p.queries;
  decode_combine_kernel<T, D><<<(rows + kWarps - 1) / kWarps, kThreads, 0, stream>>>(p, rows);
  return cudaGetLastError();
}

}  // namespace

cudaError_t decode_attention_splits(int64_t batch_heads, int64_t cache_len, int* splits) {
  int sms = 0;
  const cudaError_t err = multiprocessors(&sms);
  if (err != cudaSuccess) return err;
  // About four blocks per SM: the split kernel is memory-bound, and more blocks keep more of the cache in
  // flight; no chunk under kMinChunk keys, so that the partials stay small next to the cache they stand for.
  const int64_t wanted = (4 * static_cast<int64_t>(sms) + std::max<int64_t>(batch_heads, 1) - 1) /
                         std::max<int64_t>(batch_heads, 1);
  const int64_t most = std::max<int64_t>((cache_len + kMinChunk - 1) / kMinChunk, 1);
  *splits = static_cast<int>(std::min({wanted, most, int64_t{65535}}));
  return cudaSuccess;
}

cudaError_t decode_attention_cuda(DType dtype, const void* q, HeadStrides q_strides, void* k_cache,
                                  HeadStrides k_strides, void* v_cache, HeadStrides v_strides, const void* k_new,
                                  HeadStrides k_new_strides, const void* v_new, HeadStrides v_new_strides,
                                  const void* lengths, bool lengths_int64, void* out, float* partial_acc,
                                  float* partial_max, float* partial_sum, int64_t batch, int64_t heads,
                                  int64_t queries, int64_t cache_len, int64_t head_dim, int num_splits,
                                  cudaStream_t stream) {
  if (batch < 0 || heads < 0 || batch * heads > INT32_MAX || queries < 1 || queries > kMaxQueries ||
      queries > cache_len || num_splits < 1 || num_splits > 65535 ||
      (num_splits > 1 && (!partial_acc || !partial_max || !partial_sum)) || (k_new == nullptr) != (v_new == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (batch * heads == 0) return cudaSuccess;
  const DecodeParams p{q, k_cache, v_cache, k_new, v_new, lengths, out, partial_acc, partial_max, partial_sum,
                       q_strides, k_strides, v_strides, k_new_strides, v_new_strides, cache_len, 0,
                       static_cast<int>(heads),
                       static_cast<int>(queries), num_splits, lengths_int64,
                       static_cast<float>(kLog2e / std::sqrt(static_cast<double>(head_dim)))};
  const int batch_heads = static_cast<int>(batch * heads);
  return with_element_type(dtype, [&](auto zero) -> cudaError_t {
    using T = decltype(zero);
    if (!head_rows_take_16_byte_vectors<T>(q, q_strides, head_dim) ||
        !head_rows_take_16_byte_vectors<T>(k_cache, k_strides, head_dim) ||
        !head_rows_take_16_byte_vectors<T>(v_cache, v_strides, head_dim)) {
      return cudaErrorInvalidValue;
    }
    return with_head_dim<decode_attention_head_dims>(head_dim, [&](auto d) {
      return launch_decode_attention<T, decltype(d)::value>(p, batch_heads, stream);
    });
  });
}

}  // namespace gpt2fast
