// Sampling on the GPU without sorting: the algorithm of csrc/sample_cpu.cpp and kernels/sample.py, one CTA
// of 1024 threads per row.
// - Scores s = (x - max x) / T exactly as the reference computes them. The project builds with
//   --use_fast_math, which flushes subnormals in fp32 arithmetic and compares and so could create or break
//   ties: the max is taken over integer keys, and the subtraction, the division and the conversions they
//   need are written in PTX without .ftz.
// - Ranking uses the scores' keys: their bits as ints that order as the floats do, -0 as +0.
// - Where the row's scores fit in shared memory (V = 50257 in fp32 is 196 KB; an H100 grants a block
//   227 KB, an A100 163 KB), the first pass reads the row from global memory once and the scores stay in
//   shared memory: every later pass (four for top-k, one for Z, about two per draw) reads shared memory,
//   which is faster than L2 for one SM, and the division is paid once. Otherwise every pass reads the row
//   again from L2 and recomputes its scores.
// - top-k's threshold, the k-th largest score: a radix select over the keys, 8 bits per pass (4 passes,
//   exact), each pass a 256-bin histogram in shared memory whose atomics are aggregated per warp (most
//   scores share their top bits, so plain atomics would serialise on a few bins).
// - Z, the mass top-k keeps, and every other mass are sums of p = exp(s) in double.
// - top-p by rejection with pivots (FlashInfer's method): draw j in proportion to p among the tokens
//   ranked above a pivot (by score, then by id), accept j if the mass ranked above it is < top_p * Z, else
//   make j the pivot and draw again above it. An accepted token is in the nucleus; a rejected one moves
//   the pivot strictly up; the top token has nothing above it, so it is accepted whatever top_p (even one
//   that rounds to 0 in fp32, where `above < top_p * Z` never holds) and the loop ends within V rounds.
//   Each round accepts with probability >= top_p.
// - Uniforms come from SplitMix64 keyed by (seed, row, attempt), as on the CPU; the seed is read from
//   device memory, so that a launch needs no host sync and can be captured in a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda/functional>
#include <type_traits>

#include "gpt2fast.h"

namespace gpt2fast {
namespace {

constexpr int kThreads = 1024;  // one SM per row: at B = 1 all its warps are needed to keep loads in flight
constexpr int kMaxVocab = 1 << 30;  // ids and loop bounds stay in int
constexpr int kNoKey = INT_MIN;  // below every key (even -inf's): a threshold all pass, a pivot all rank above

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float sub_rn(float a, float b) {
  float d;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

__device__ __forceinline__ double widen(float x) {
  double w;
  asm("cvt.f64.f32 %0, %1;" : "=d"(w) : "f"(x));
  return w;
}

// d / t rounded as IEEE division rounds it, given inv_t = 1 / t in double rounded once: d * inv_t is within
// 2^-52 of the quotient, one Markstein correction makes it the quotient rounded to double, and a double
// quotient of two floats rounds to the float the exact one rounds to (53 >= 2 * 24 + 2 bits). div.rn.f32
// would call a slow path whose calling convention costs registers in every loop that recomputes scores.
// d = -inf stays -inf; d = -0 gives +0, which keys do not tell apart.
__device__ __forceinline__ float div_rn(float d, float t, double inv_t) {
  if (d == -INFINITY) return d;
  const double wide_d = widen(d), q = __dmul_rn(wide_d, inv_t);
  float rounded;
  asm("cvt.rn.f32.f64 %0, %1;" : "=f"(rounded) : "d"(__fma_rn(__fma_rn(-q, widen(t), wide_d), inv_t, q)));
  return rounded;
}

// The float's bits as an int that orders as the float does (negative floats get their magnitude bits
// flipped); -0 becomes +0, which it equals.
__device__ __forceinline__ int key_of(float s) {
  int bits = __float_as_int(s);
  bits = bits == INT_MIN ? 0 : bits;
  return bits ^ ((bits >> 31) & INT_MAX);
}

__device__ __forceinline__ float float_of(int key) { return __int_as_float(key ^ ((key >> 31) & INT_MAX)); }

// The reference's scores of a row's logits.
struct Scorer {
  float x_max, temperature;
  double inv_temperature;  // 1 / temperature in double, rounded once
  // A row holding +inf gives its +inf entries 0 and the rest -inf (all the mass, evenly, on the +inf entries).
  __device__ __forceinline__ float operator()(float x) const {
    if (x_max == INFINITY) return x == INFINITY ? 0.0f : -INFINITY;
    const float shifted = sub_rn(x, x_max);
    return temperature == 1.0f ? shifted : div_rn(shifted, temperature, inv_temperature);  // x / 1 is x
  }
};

// SplitMix64, as csrc/sample_cpu.cpp: uniform(seed, stream, draw) is a counter-based draw in [0, 1).
__device__ __forceinline__ uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

__device__ __forceinline__ double uniform(uint64_t seed, uint64_t stream, uint64_t draw) {
  const uint64_t key = mix(seed + 0x9e3779b97f4a7c15ULL * (stream + 1)) + 0x9e3779b97f4a7c15ULL * (draw + 1);
  return static_cast<double>(mix(key) >> 11) * 0x1.0p-53;
}

// The row's scores where shared memory holds them.
struct HeldScores {
  const float* held;
  __device__ __forceinline__ float operator[](int i) const { return held[i]; }
};

// The row's scores recomputed from its logits, on each read.
template <typename T>
struct StreamedScores {
  const T* x;
  Scorer score;
  __device__ __forceinline__ float operator[](int i) const { return score(to_float(__ldg(x + i))); }
};

// The tokens a draw chooses among: kept by top-k (key >= min_key) and ranked above the pivot (a higher
// score, or the same score and a higher id: HF's stable ascending sort puts the higher id above).
struct Candidates {
  int min_key, pivot_key, pivot_id;
  // p = exp(s) of token i if it is a candidate, else 0.
  __device__ __forceinline__ float p(float s, int i) const {
    const int key = key_of(s);
    const bool above = key > pivot_key || (key == pivot_key && i > pivot_id);
    return key >= min_key && above ? __expf(s) : 0.0f;
  }
};

using IdReduce = cub::BlockReduce<int, kThreads>;
using MassReduce = cub::BlockReduce<double, kThreads>;
using MassScan = cub::BlockScan<double, kThreads, cub::BLOCK_SCAN_WARP_SCANS>;
using CountScan = cub::BlockScan<int, kThreads, cub::BLOCK_SCAN_WARP_SCANS>;

struct Shared {
  union {
    IdReduce::TempStorage ids;
    MassReduce::TempStorage mass;
    MassScan::TempStorage mass_scan;
    CountScan::TempStorage count_scan;
  } cub;
  unsigned histogram[256];  // the radix select's counts per digit
  int digit, rank;          // the radix select's choice after each pass
  int id_result;
  double mass_result;
};

// Thread 0's `value` (where CUB leaves a block-wide result), for every thread. The second barrier keeps the
// slot and CUB's storage from being written again before every thread has read them.
template <typename T>
__device__ __forceinline__ T to_all(T* slot, T value) {
  if (threadIdx.x == 0) *slot = value;
  __syncthreads();
  value = *slot;
  __syncthreads();
  return value;
}

__device__ __forceinline__ double block_sum(Shared& sh, double mass) {
  return to_all(&sh.mass_result, MassReduce(sh.cub.mass).Sum(mass));
}

// The row's max. With kHeld the row is also copied, as fp32, into `held` (ids i = thread + n * kThreads: the
// threads that later turn it into scores read what they wrote).
template <bool kHeld, typename T>
__device__ float row_max(Shared& sh, const T* x, int vocab, float* held) {
  constexpr int kLoads = 8;  // loads in flight per thread
  int max_key = kNoKey;
  for (int base = 0; base < vocab; base += kThreads * kLoads) {
    float v[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = base + u * kThreads + threadIdx.x;
      v[u] = i < vocab ? to_float(__ldg(x + i)) : -INFINITY;
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = base + u * kThreads + threadIdx.x;
      max_key = max(max_key, key_of(v[u]));
      if (kHeld && i < vocab) held[i] = v[u];
    }
  }
  return float_of(to_all(&sh.id_result, IdReduce(sh.cub.ids).Reduce(max_key, cuda::maximum<>{})));
}

// Turns the logits in `held` into scores; returns this thread's part of the mass of all tokens when asked
// (that is Z when top-k is off).
__device__ double hold_scores(float* held, int vocab, Scorer score, bool sum_mass) {
  double mass = 0.0;
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const float s = score(held[i]);
    held[i] = s;
    if (sum_mass) mass += __expf(s);
  }
  __syncthreads();  // from here on threads read each other's scores
  return mass;
}

// This thread's part of the candidates' mass.
template <class Scores>
__device__ double thread_mass(const Scores& scores, int vocab, Candidates c) {
  double mass = 0.0;
  for (int i = threadIdx.x; i < vocab; i += kThreads) mass += c.p(scores[i], i);
  return mass;
}

// The key of the k-th largest score (1 <= k < vocab): radix select over the keys as unsigned ints, 8 bits
// per pass from the top. Each pass counts the keys that share the digits found so far, per next digit,
// and keeps the digit whose bin holds the k-th largest of them.
template <class Scores>
__device__ int kth_largest_key(Shared& sh, const Scores& scores, int vocab, int k) {
  const unsigned lane = threadIdx.x % 32;
  unsigned prefix = 0, decided = 0;  // the digits found so far, and the mask of their bits
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (threadIdx.x < 256) sh.histogram[threadIdx.x] = 0;
    __syncthreads();
    for (int base = 0; base < vocab; base += kThreads) {  // whole warps iterate together, as __match_any_sync needs
      const int i = base + threadIdx.x;
      const unsigned u = i < vocab ? static_cast<unsigned>(key_of(scores[i])) ^ 0x80000000u : 0u;
      const bool counted = i < vocab && (u & decided) == prefix;
      const unsigned digit = counted ? (u >> shift) & 255u : 256u;
      const unsigned peers = __match_any_sync(0xffffffffu, digit);
      if (counted && lane == static_cast<unsigned>(__ffs(peers) - 1)) atomicAdd(&sh.histogram[digit], __popc(peers));
    }
    __syncthreads();
    const int count = threadIdx.x < 256 ? static_cast<int>(sh.histogram[255 - threadIdx.x]) : 0;  // top bin first
    int above;  // keys in higher bins
    CountScan(sh.cub.count_scan).ExclusiveSum(count, above);
    if (above < k && k <= above + count) {
      sh.digit = 255 - static_cast<int>(threadIdx.x);
      sh.rank = k - above;
    }
    __syncthreads();
    prefix |= static_cast<unsigned>(sh.digit) << shift;
    decided |= 255u << shift;
    k = sh.rank;
    __syncthreads();  // every thread has read digit and rank, and the histogram, before the next pass
  }
  return static_cast<int>(prefix ^ 0x80000000u);
}

// The first candidate, in id order, at which the running sum of p passes `target`; where rounding leaves
// the whole sum at or below it, the last candidate with p > 0; -1 if there is none. Tokens with p = 0 are
// never drawn. Each thread takes kItems consecutive ids of a tile, so that one block-wide scan per tile
// gives it the sum before them; the walk ends at the first tile holding the answer.
template <class Scores>
__device__ int draw(Shared& sh, const Scores& scores, int vocab, Candidates c, double target) {
  constexpr int kItems = 7;  // odd: a warp's reads of the held scores fall in 32 different banks
  double before_tile = 0.0;
  int last = -1;
  for (int base = 0; base < vocab; base += kThreads * kItems) {
    const int start = base + static_cast<int>(threadIdx.x) * kItems;
    float p[kItems];
    double mass = 0.0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      p[j] = start + j < vocab ? c.p(scores[start + j], start + j) : 0.0f;
      mass += p[j];
    }
    double before, tile;
    MassScan(sh.cub.mass_scan).ExclusiveSum(mass, before, tile);
    double running = before_tile + before;
    int first = INT_MAX;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (p[j] > 0.0f) {
        running += p[j];
        last = start + j;
        if (first == INT_MAX && running > target) first = start + j;
      }
    }
    before_tile += tile;
    // The barrier also ends this tile's scan before the next one reuses its storage.
    if (__syncthreads_or(first != INT_MAX)) {
      return to_all(&sh.id_result, IdReduce(sh.cub.ids).Reduce(first, cuda::minimum<>{}));
    }
  }
  return to_all(&sh.id_result, IdReduce(sh.cub.ids).Reduce(last, cuda::maximum<>{}));
}

// One id per row (block). top_k is 0 when off; top_p 1 when off. Every loop bound and branch that meets a
// barrier is the same in every thread: it depends on the arguments or on block-wide results.
template <typename T, bool kHeld>
__global__ void __launch_bounds__(kThreads, 1)
    sample_kernel(const T* __restrict__ logits, int64_t row_stride, int vocab, float temperature,
                  double inv_temperature, int top_k, float top_p, const int64_t* __restrict__ seed,
                  int64_t* __restrict__ ids) {
  __shared__ Shared sh;
  extern __shared__ float held[];  // with kHeld: the row's scores
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  const Scorer score{row_max<kHeld>(sh, x, vocab, held), temperature, inv_temperature};
  using Scores = std::conditional_t<kHeld, HeldScores, StreamedScores<T>>;
  Scores scores;
  double mass = 0.0;  // this thread's part of Z
  if constexpr (kHeld) {
    mass = hold_scores(held, vocab, score, top_k == 0);
    scores = HeldScores{held};
  } else {
    scores = StreamedScores<T>{x, score};
  }
  const Candidates kept{top_k > 0 ? kth_largest_key(sh, scores, vocab, top_k) : kNoKey, kNoKey, -1};
  if (top_k > 0 || !kHeld) mass = thread_mass(scores, vocab, kept);
  const double z = block_sum(sh, mass);

  const auto seed_value = static_cast<uint64_t>(*seed);
  Candidates region = kept;  // the tokens above the pivot: all that top-k keeps at first
  double region_mass = z;
  int choice;
  for (uint64_t attempt = 0;; ++attempt) {
    choice = draw(sh, scores, vocab, region, uniform(seed_value, static_cast<uint64_t>(row), attempt) * region_mass);
    if (top_p >= 1.0f || choice < 0) break;  // no top-p; or a row outside the contract (NaN, all -inf)
    const Candidates above_choice{kept.min_key, key_of(scores[choice]), choice};
    const double above = block_sum(sh, thread_mass(scores, vocab, above_choice));
    if (above == 0.0 || above < static_cast<double>(top_p) * z) break;  // the top token: always kept
    region = above_choice;
    region_mass = above;
  }
  if (threadIdx.x == 0) ids[row] = choice;
}

template <typename T>
cudaError_t launch(const T* logits, int rows, int vocab, int64_t row_stride, float temperature, int top_k,
                   float top_p, const int64_t* seed, int64_t* ids, cudaStream_t stream) {
  int device = 0, max_shared = 0;
  cudaFuncAttributes held_kernel;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&held_kernel, sample_kernel<T, true>);
  if (err != cudaSuccess) return err;
  const double inv_temperature = 1.0 / static_cast<double>(temperature);
  const size_t held_bytes = static_cast<size_t>(vocab) * sizeof(float);
  if (held_kernel.sharedSizeBytes + held_bytes <= static_cast<size_t>(max_shared)) {
    err = cudaFuncSetAttribute(sample_kernel<T, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(held_bytes));
    if (err != cudaSuccess) return err;
    sample_kernel<T, true><<<rows, kThreads, held_bytes, stream>>>(logits, row_stride, vocab, temperature,
                                                                   inv_temperature, top_k, top_p, seed, ids);
  } else {
    sample_kernel<T, false><<<rows, kThreads, 0, stream>>>(logits, row_stride, vocab, temperature,
                                                           inv_temperature, top_k, top_p, seed, ids);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t sample_cuda(DType dtype, const void* logits, int64_t logits_row_stride, int64_t rows, int64_t vocab,
                        float temperature, int64_t top_k, float top_p, const int64_t* seed, int64_t* ids,
                        cudaStream_t stream) {
  if (rows < 0 || rows > INT_MAX || vocab < 1 || vocab > kMaxVocab || !(temperature > 0.0f) ||
      !(top_p > 0.0f && top_p <= 1.0f) || top_k < 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const int k = top_k < vocab ? static_cast<int>(top_k) : 0;  // k >= V keeps every token
  const int r = static_cast<int>(rows), v = static_cast<int>(vocab);
  const int64_t stride = logits_row_stride;
  switch (dtype) {
    case DType::Float32:
      return launch(static_cast<const float*>(logits), r, v, stride, temperature, k, top_p, seed, ids, stream);
    case DType::Float16:
      return launch(static_cast<const __half*>(logits), r, v, stride, temperature, k, top_p, seed, ids, stream);
    case DType::BFloat16:
      return launch(static_cast<const __nv_bfloat16*>(logits), r, v, stride, temperature, k, top_p, seed, ids,
                    stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gpt2fast
