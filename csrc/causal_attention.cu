// Causal (prefill) attention forward, softmax(q k^T / sqrt(D), causal) v, flash-attention style: no T x T
// matrix anywhere, and each query's log-sum-exp for a backward (kernels/causal_attention.py's contract).
//
// One block of 4 warps per (query tile of 64 rows, batch * head); warp w owns query rows 16w .. 16w + 15
// of the tile. The block walks the key tiles from key 0 up to the diagonal (tiles wholly above it are never
// loaded), each staged in shared memory by cp.async, K(t + 1) landing while P V(t) runs and V(t + 1) while
// Q K(t + 1)^T runs. Per key tile each warp:
//   1. S = Q K^T for its 16 rows into its own fp32 scratch in shared memory;
//   2. the online softmax over S in log2 units: two lanes per row keep the running max m and sum l; the
//      diagonal tile (and keys past T, which only it holds) is the only one masked, with -inf. It writes
//      P = exp2(s - m_new), in the element type, over S, and alpha = exp2(m_old - m_new) per row;
//   3. O = alpha O + P V, O in fp32 registers for the whole walk.
// Then O / l goes out through shared memory in 16-byte stores, and lse = (m + log2 l) ln 2.
// fp16 and bf16 multiply on the tensor cores (WMMA, 16 x 16 x 16, fp32 accumulators), fp32 on the FMA
// units. Rows past T are zero-filled in shared memory and never written out.
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention_tiles.cuh"
#include "gpt2fast.h"
#include "rows.cuh"

namespace gpt2fast {
namespace {

using namespace nvcuda;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpRows = 16;  // query rows per warp: one WMMA fragment tall
constexpr int kBlockM = kWarps * kWarpRows;
constexpr int kWarpAux = 256;  // floats of per-warp shared memory beside the scratch (see SharedLayout)
constexpr double kLog2e = 1.4426950408889634;
constexpr float kLn2 = 0.6931471805599453f;

struct CausalParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  HeadStrides q_strides, k_strides, v_strides;
  int heads, seq_len;
  float scale_log2e;  // log2(e) / sqrt(D): scores in log2 units, for exp2
};

__device__ __forceinline__ void store_pair(float* p, float a, float b) { *reinterpret_cast<float2*>(p) = {a, b}; }
__device__ __forceinline__ void store_pair(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}

// Q K^T and P V on the tensor cores. A warp keeps its 16 query rows (matrix_a fragments) and its 16 x D
// output (fp32 accumulators) in registers for the whole walk. Which row an accumulator element belongs to
// is not specified, so the per-row rescale by alpha learns it from an accumulator loaded from a matrix whose
// element (r, c) is r (loads, mma and stores of one fragment type share one element mapping), kept as 4 bits
// per element in `rows_of_elements`.
template <typename T, int D>
struct TensorCoreMath {
  using Element = T;
  static constexpr int kHeadDim = D;
  static constexpr int kBlockN = 64;    // keys per tile
  static constexpr int kLdTile = D + 8;  // elements per Q/K/V row in shared memory: +16 bytes, so that the 8 rows
                                         // one fragment load reads fall in different banks
  static constexpr int kLdS = kBlockN + 4;  // floats per row of S (WMMA stores want a multiple of 4)
  static constexpr int kLdP = kBlockN + 8;  // elements per row of P (WMMA loads want a multiple of 8)
  static constexpr bool kQInScratch = true;  // Q is staged where S goes: it lives in registers once loaded
  static constexpr int kMinBlocks = D <= 64 ? 4 : 2;  // blocks per SM to fit registers for (128 or 255 a thread)

  using RowsFragment = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using KeysFragment = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;  // K^T, read from K's rows
  using ValuesFragment = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  static_assert(Accumulator::num_elements * 4 <= 32, "the row of every element fits in one 32-bit word");

  RowsFragment q[D / 16];
  Accumulator o[D / 16];
  uint32_t rows_of_elements;  // element i of an accumulator lies in row (rows_of_elements >> 4i) & 15

  // q_rows: the warp's 16 rows of Q (kLdTile apart); aux: kWarpAux floats of the warp's own.
  __device__ void init(const T* q_rows, float* aux) {
    const int lane = threadIdx.x % 32;
    for (int i = lane; i < 256; i += 32) aux[i] = static_cast<float>(i / 16);
    __syncwarp();
    Accumulator row_of;
    wmma::load_matrix_sync(row_of, aux, 16, wmma::mem_row_major);
    rows_of_elements = 0;
#pragma unroll
    for (int i = 0; i < Accumulator::num_elements; ++i) {
      rows_of_elements |= static_cast<uint32_t>(row_of.x[i]) << (4 * i);
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wmma::load_matrix_sync(q[kk], q_rows + kk * 16, kLdTile);
#pragma unroll
    for (int j = 0; j < D / 16; ++j) wmma::fill_fragment(o[j], 0.0f);
  }

  // s (16 x kBlockN, fp32, kLdS apart) = the warp's Q rows times the tile's keys, transposed.
  __device__ void scores(const T* k_tile, float* s) const {
#pragma unroll 1
    for (int n = 0; n < kBlockN / 16; ++n) {
      Accumulator acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        KeysFragment keys;
        wmma::load_matrix_sync(keys, k_tile + n * 16 * kLdTile + kk * 16, kLdTile);
        wmma::mma_sync(acc, q[kk], keys, acc);
      }
      wmma::store_matrix_sync(s + n * 16, acc, kLdS, wmma::mem_row_major);
    }
  }

  // O = alpha O + P V, with P (16 x kBlockN, kLdP apart) and alpha (16 floats) from the softmax step.
  __device__ void add_pv(const T* p, const float* alpha, const T* v_tile) {
#pragma unroll
    for (int i = 0; i < Accumulator::num_elements; ++i) {
      const float a = alpha[(rows_of_elements >> (4 * i)) & 15];
#pragma unroll
      for (int j = 0; j < D / 16; ++j) o[j].x[i] *= a;
    }
#pragma unroll 1
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      RowsFragment probabilities;
      wmma::load_matrix_sync(probabilities, p + kk * 16, kLdP);
#pragma unroll
      for (int j = 0; j < D / 16; ++j) {
        ValuesFragment values;
        wmma::load_matrix_sync(values, v_tile + kk * 16 * kLdTile + j * 16, kLdTile);
        wmma::mma_sync(o[j], probabilities, values, o[j]);
      }
    }
  }

  // The unnormalised 16 x D output, fp32, rows ld floats apart.
  __device__ void store_o(float* out, int ld) const {
#pragma unroll
    for (int j = 0; j < D / 16; ++j) wmma::store_matrix_sync(out + j * 16, o[j], ld, wmma::mem_row_major);
  }
};

// Q K^T and P V in fp32 on the FMA units. For S, lane j computes key j of the 32-key tile against the warp's
// 16 rows (Q stays in shared memory, read as broadcasts); for O, lane j owns columns j, j + 32, ... of the
// warp's 16 rows.
template <int D>
struct FmaMath {
  using Element = float;
  static constexpr int kHeadDim = D;
  static constexpr int kBlockN = 32;
  static constexpr int kLdTile = D + 4;  // floats per row: 16-byte rows that start 4 banks apart, so that 8 lanes'
                                         // float4 reads of 8 rows cover the 32 banks once
  static constexpr int kLdS = kBlockN + 4;
  static constexpr int kLdP = kLdS;  // P is fp32 too: each value overwrites its own score
  static constexpr bool kQInScratch = false;
  static constexpr int kMinBlocks = D == 32 ? 4 : D == 64 ? 3 : 2;
  static constexpr int kColumns = D / 32;  // output columns per lane

  const float* q_rows;
  float o[kWarpRows][kColumns];

  __device__ void init(const float* q_rows_, float*) {
    q_rows = q_rows_;
#pragma unroll
    for (int r = 0; r < kWarpRows; ++r) {
#pragma unroll
      for (int i = 0; i < kColumns; ++i) o[r][i] = 0.0f;
    }
  }

  __device__ void scores(const float* k_tile, float* s) const {
    const int lane = threadIdx.x % 32;
    const float* key = k_tile + lane * kLdTile;
    float acc[kWarpRows] = {};
#pragma unroll 4
    for (int d = 0; d < D; d += 4) {
      const float4 k4 = *reinterpret_cast<const float4*>(key + d);
#pragma unroll
      for (int r = 0; r < kWarpRows; ++r) {
        const float4 q4 = *reinterpret_cast<const float4*>(q_rows + r * kLdTile + d);
        acc[r] = fmaf(q4.x, k4.x, fmaf(q4.y, k4.y, fmaf(q4.z, k4.z, fmaf(q4.w, k4.w, acc[r]))));
      }
    }
#pragma unroll
    for (int r = 0; r < kWarpRows; ++r) s[r * kLdS + lane] = acc[r];
  }

  __device__ void add_pv(const float* p, const float* alpha, const float* v_tile) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < kWarpRows; ++r) {
      const float a = alpha[r];
#pragma unroll
      for (int i = 0; i < kColumns; ++i) o[r][i] *= a;
    }
#pragma unroll 2
    for (int j = 0; j < kBlockN; j += 4) {
      float v[4][kColumns];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
        for (int i = 0; i < kColumns; ++i) v[jj][i] = v_tile[(j + jj) * kLdTile + lane + 32 * i];
      }
#pragma unroll
      for (int r = 0; r < kWarpRows; ++r) {
        const float4 p4 = *reinterpret_cast<const float4*>(p + r * kLdP + j);
#pragma unroll
        for (int i = 0; i < kColumns; ++i) {
          o[r][i] = fmaf(p4.x, v[0][i], fmaf(p4.y, v[1][i], fmaf(p4.z, v[2][i], fmaf(p4.w, v[3][i], o[r][i]))));
        }
      }
    }
  }

  __device__ void store_o(float* out, int ld) const {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < kWarpRows; ++r) {
#pragma unroll
      for (int i = 0; i < kColumns; ++i) out[r * ld + lane + 32 * i] = o[r][i];
    }
  }
};

// Byte offsets into the block's dynamic shared memory, every region 128-byte aligned:
//   [Q (FMA only)] [K tile] [V tile] [scratch: 16 x kLdS fp32 per warp, S then P; Q's tile first (tensor
//   cores)] [aux: kWarpAux floats per warp: the row-index matrix (tensor cores), then alpha, then 1 / l].
// The output goes out through the first kBlockM x (D + 4) floats, over the tiles, once the walk is done.
template <class Math>
struct SharedLayout {
  using T = typename Math::Element;
  static constexpr int kTileRowBytes = Math::kLdTile * static_cast<int>(sizeof(T));
  static constexpr int kQTileBytes = kBlockM * kTileRowBytes;
  static constexpr int kKVTileBytes = Math::kBlockN * kTileRowBytes;
  static constexpr int kWarpScratchBytes = kWarpRows * Math::kLdS * 4;
  static constexpr int kScratchBytes = Math::kQInScratch && kQTileBytes > kWarps * kWarpScratchBytes
                                           ? kQTileBytes
                                           : kWarps * kWarpScratchBytes;
  static constexpr int kK = Math::kQInScratch ? 0 : kQTileBytes;
  static constexpr int kV = kK + kKVTileBytes;
  static constexpr int kScratch = kV + kKVTileBytes;
  static constexpr int kQ = Math::kQInScratch ? kScratch : 0;
  static constexpr int kAux = kScratch + kScratchBytes;
  static constexpr int kBytes = kAux + kWarps * kWarpAux * 4;
  static constexpr int kLdOut = Math::kHeadDim + 4;  // floats per staged output row
  static_assert(kBlockM * kLdOut * 4 <= kScratch, "the staged output must fit over the tiles");
  static_assert(kTileRowBytes % 16 == 0 && kKVTileBytes % 128 == 0 && kWarpScratchBytes % 128 == 0,
                "regions and rows must stay aligned for cp.async and WMMA");
  static_assert(Math::kLdP * static_cast<int>(sizeof(T)) <= Math::kLdS * 4, "a row of P fits over its row of S");
};

// One online-softmax step over a warp's 16 x kBlockN scores s (fp32, kLdS apart). Lane owns row lane / 2
// (its statistics m and l duplicated in lanes 2r and 2r + 1) and the column pairs 4j + 2 (lane % 2).
// Writes P, in the element type, over s (kLdP apart) and alpha for each row into alpha[16].
template <class Math>
__device__ __forceinline__ void softmax_step(float* s, float* alpha, float& m, float& l, int row, int first_key,
                                             int seq_len, bool masked, float scale_log2e) {
  constexpr int kPairs = Math::kBlockN / 4;
  const int lane = threadIdx.x % 32, r = lane / 2, c0 = 2 * (lane % 2);
  float2 x[kPairs];
  float tile_max = -INFINITY;
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    x[j] = *reinterpret_cast<const float2*>(s + r * Math::kLdS + 4 * j + c0);
    x[j].x *= scale_log2e;
    x[j].y *= scale_log2e;
    if (masked) {
      const int key = first_key + 4 * j + c0;
      if (key > row || key >= seq_len) x[j].x = -INFINITY;
      if (key + 1 > row || key + 1 >= seq_len) x[j].y = -INFINITY;
    }
    tile_max = fmaxf(tile_max, fmaxf(x[j].x, x[j].y));
  }
  tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
  // Finite from the first tile on: it holds key 0, which every row (padding rows past T too) sees.
  const float m_new = fmaxf(m, tile_max);
  const float a = exp2f(m - m_new);  // 0 on the first tile, where m = -inf
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    x[j].x = exp2f(x[j].x - m_new);
    x[j].y = exp2f(x[j].y - m_new);
    sum += x[j].x + x[j].y;
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  l = l * a + sum;
  m = m_new;
  __syncwarp();  // every lane has read its scores before P, over the same bytes, is written
  auto* p = reinterpret_cast<typename Math::Element*>(s);
#pragma unroll
  for (int j = 0; j < kPairs; ++j) store_pair(p + r * Math::kLdP + 4 * j + c0, x[j].x, x[j].y);
  if (c0 == 0) alpha[r] = a;
  __syncwarp();  // P and alpha are visible to the whole warp
}

template <class Math>
__global__ void __launch_bounds__(kThreads, Math::kMinBlocks) causal_attention_kernel(const CausalParams p) {
  using T = typename Math::Element;
  using Layout = SharedLayout<Math>;
  constexpr int D = Math::kHeadDim, kBlockN = Math::kBlockN, kLd = Math::kLdTile;
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_tile = reinterpret_cast<T*>(smem + Layout::kQ);
  T* k_tile = reinterpret_cast<T*>(smem + Layout::kK);
  T* v_tile = reinterpret_cast<T*>(smem + Layout::kV);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* scratch = reinterpret_cast<float*>(smem + Layout::kScratch) + warp * kWarpRows * Math::kLdS;
  float* aux = reinterpret_cast<float*>(smem + Layout::kAux) + warp * kWarpAux;

  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int seq_len = p.seq_len;
  // The last query tiles first: they see the most keys, and the light ones fill in behind them.
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kBlockM;
  const T* q_head = static_cast<const T*>(p.q) + b * p.q_strides.batch + h * p.q_strides.head;
  const T* k_head = static_cast<const T*>(p.k) + b * p.k_strides.batch + h * p.k_strides.head;
  const T* v_head = static_cast<const T*>(p.v) + b * p.v_strides.batch + h * p.v_strides.head;

  // Copy groups in flight, oldest first: Q, K(0), V(0); then K(t + 1), V(t + 1) each step.
  load_rows_async<D, kBlockM, kLd, kThreads>(q_tile, q_head, p.q_strides.token, m0, seq_len);
  commit_copies();
  load_rows_async<D, kBlockN, kLd, kThreads>(k_tile, k_head, p.k_strides.token, 0, seq_len);
  commit_copies();
  load_rows_async<D, kBlockN, kLd, kThreads>(v_tile, v_head, p.v_strides.token, 0, seq_len);
  commit_copies();
  wait_copies<2>();
  __syncthreads();  // Q is in

  Math math;
  math.init(q_tile + warp * kWarpRows * kLd, aux);
  const int row = m0 + warp * kWarpRows + lane / 2;  // the query row whose statistics this lane keeps
  float m = -INFINITY, l = 0.0f;

  // Key tiles up to the last query of the tile (or T); those past the tile's first query hold masked keys.
  const int n_tiles = (min(m0 + kBlockM, seq_len) + kBlockN - 1) / kBlockN;
  for (int t = 0; t < n_tiles; ++t) {
    const int n0 = t * kBlockN;
    wait_copies<1>();
    __syncthreads();  // K(t) is in; with Q read into fragments, the scratch may take S
    math.scores(k_tile, scratch);
    __syncwarp();
    softmax_step<Math>(scratch, aux, m, l, row, n0, seq_len, n0 + kBlockN - 1 > m0, p.scale_log2e);
    wait_copies<0>();
    __syncthreads();  // V(t) is in, and every warp is done with K(t)
    if (t + 1 < n_tiles) {
      load_rows_async<D, kBlockN, kLd, kThreads>(k_tile, k_head, p.k_strides.token, n0 + kBlockN, seq_len);
    }
    commit_copies();
    math.add_pv(reinterpret_cast<const T*>(scratch), aux, v_tile);
    __syncthreads();  // every warp is done with V(t)
    if (t + 1 < n_tiles) {
      load_rows_async<D, kBlockN, kLd, kThreads>(v_tile, v_head, p.v_strides.token, n0 + kBlockN, seq_len);
    }
    commit_copies();
  }

  // Out through shared memory, over the tiles: the loop's last barrier saw every warp done with them, and
  // its last commits were empty, so no copy is in flight.
  float* staged = reinterpret_cast<float*>(smem) + warp * kWarpRows * Layout::kLdOut;
  math.store_o(staged, Layout::kLdOut);
  if (lane % 2 == 0) aux[lane / 2] = 1.0f / l;
  __syncwarp();
  constexpr int kVec = kVec16<T>, kChunks = D / kVec;
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(bh) * seq_len + m0 + warp * kWarpRows) * D;
  static_assert(kWarpRows * kChunks % 32 == 0, "every lane writes the same number of chunks");
#pragma unroll
  for (int j = 0; j < kWarpRows * kChunks / 32; ++j) {
    const int r = (j * 32 + lane) / kChunks, c = (j * 32 + lane) % kChunks;
    if (m0 + warp * kWarpRows + r >= seq_len) continue;
    float values[kVec];
    const float inv_l = aux[r];
#pragma unroll
    for (int e = 0; e < kVec; e += 4) {
      const float4 x = *reinterpret_cast<const float4*>(staged + r * Layout::kLdOut + c * kVec + e);
      values[e] = x.x * inv_l;
      values[e + 1] = x.y * inv_l;
      values[e + 2] = x.z * inv_l;
      values[e + 3] = x.w * inv_l;
    }
    store<kVec>(out + r * D + c * kVec, values);
  }
  if (lane % 2 == 0 && row < seq_len) p.lse[static_cast<int64_t>(bh) * seq_len + row] = (m + log2f(l)) * kLn2;
}

template <class Math>
cudaError_t launch_causal_attention(const CausalParams& p, int batch_heads, cudaStream_t stream) {
  constexpr int kBytes = SharedLayout<Math>::kBytes;
  const auto kernel = causal_attention_kernel<Math>;
  if (kBytes > 48 * 1024) {  // past the default limit of dynamic shared memory: opt in
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(batch_heads, (p.seq_len + kBlockM - 1) / kBlockM);
  kernel<<<grid, kThreads, kBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
using MathFor = std::conditional_t<std::is_same_v<T, float>, FmaMath<D>, TensorCoreMath<T, D>>;

}  // namespace

cudaError_t causal_attention_forward_cuda(DType dtype, const void* q, HeadStrides q_strides, const void* k,
                                          HeadStrides k_strides, const void* v, HeadStrides v_strides, void* out,
                                          float* lse, int64_t batch, int64_t heads, int64_t seq_len,
                                          int64_t head_dim, cudaStream_t stream) {
  if (batch < 0 || heads < 0 || seq_len < 0 || batch * heads > INT32_MAX ||
      (seq_len + kBlockM - 1) / kBlockM > 65535) {
    return cudaErrorInvalidValue;
  }
  if (batch * heads == 0 || seq_len == 0) return cudaSuccess;
  const float scale_log2e = static_cast<float>(kLog2e / std::sqrt(static_cast<double>(head_dim)));
  const CausalParams p{q, k, v, out, lse, q_strides, k_strides, v_strides, static_cast<int>(heads),
                       static_cast<int>(seq_len), scale_log2e};
  const int batch_heads = static_cast<int>(batch * heads);
  return with_element_type(dtype, [&](auto zero) -> cudaError_t {
    using T = decltype(zero);
    if (!head_rows_take_16_byte_vectors<T>(q, q_strides, head_dim) ||
        !head_rows_take_16_byte_vectors<T>(k, k_strides, head_dim) ||
        !head_rows_take_16_byte_vectors<T>(v, v_strides, head_dim) || reinterpret_cast<uintptr_t>(out) % 16 != 0) {
      return cudaErrorInvalidValue;
    }
    return with_head_dim<causal_attention_head_dims>(head_dim, [&](auto d) {
      return launch_causal_attention<MathFor<T, decltype(d)::value>>(p, batch_heads, stream);
    });
  });
}

}  // namespace gpt2fast
